//! `adverse model info|run`: inspect an ONNX model and run it (raw arrays via `--npy`), with
//! the cross-entropy input gradient on request.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};

use crate::runtime::backend::{Backend, LossTargets};
use crate::runtime::card::{ModelCard, card_path};
use crate::runtime::exec::Model;
use crate::runtime::ir::Graph;
use crate::runtime::loss::LossSpec;
use crate::runtime::onnx;
use crate::runtime::select::{self, BackendChoice};

#[derive(Args, Debug)]
pub struct ModelArgs {
    #[command(subcommand)]
    pub cmd: ModelCmd,
}

#[derive(Subcommand, Debug)]
pub enum ModelCmd {
    /// Print the graph summary: opset, inputs/outputs, operator counts, parameters, FLOPs.
    Info {
        /// The ONNX model.
        model: PathBuf,
    },
    /// Run the model on a float32 array (`--npy`) and write its outputs (and input gradient).
    Run(RunArgs),
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// The ONNX model.
    pub model: PathBuf,
    /// DICOM files to classify (needs the model card `<model>.card.yaml`).
    pub dicom: Vec<PathBuf>,
    /// Input array [N, C, H, W] (float32 or float64 .npy), fed to the raw graph (no card).
    #[arg(long)]
    pub npy: Option<PathBuf>,
    /// Where to write the logits output (.npy).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Also write d CE(logits, label) / d input here (.npy).
    #[arg(long, requires = "label")]
    pub grad: Option<PathBuf>,
    /// True label(s) for `--grad`: one for the whole batch or one per sample (comma separated).
    #[arg(long, value_delimiter = ',')]
    pub label: Vec<u32>,
    /// auto, cpu, gpu or gpu-software (default: $ADVERSE_BACKEND, else auto).
    #[arg(long)]
    pub backend: Option<BackendChoice>,
}

pub fn run(args: ModelArgs) -> anyhow::Result<ExitCode> {
    match args.cmd {
        ModelCmd::Info { model } => info(&model),
        ModelCmd::Run(r) => run_model(r),
    }
}

fn load(path: &Path) -> anyhow::Result<Graph> {
    Ok(onnx::load(path)?)
}

fn shape_str(s: &[usize], batched: bool) -> String {
    let dims: Vec<String> = s.iter().enumerate().map(|(i, d)| if i == 0 && batched { "N".to_string() } else { d.to_string() }).collect();
    format!("[{}]", dims.join(", "))
}

fn info(path: &Path) -> anyhow::Result<ExitCode> {
    let g = load(path)?;
    println!("model: {}", path.display());
    println!("opset: {}", g.opset);
    for &i in &g.inputs {
        let v = &g.values[i];
        println!("input: {} {}", v.name, shape_str(&v.shape, v.batched));
    }
    for &o in &g.outputs {
        let v = &g.values[o];
        println!("output: {} {}", v.name, shape_str(&v.shape, v.batched));
    }
    println!("nodes: {}", g.nodes.len());
    let ops: Vec<String> = g.op_counts().iter().map(|(k, c)| format!("{k} x{c}")).collect();
    println!("operators: {}", ops.join(", "));
    println!("parameters: {} ({} tensors)", g.param_count(), g.params.len());
    let f = g.flops_per_image();
    println!("flops_per_image: {f} ({:.3} GFLOP)", f as f64 / 1e9);
    let cp = card_path(path);
    if cp.exists() {
        let card = ModelCard::load(&cp)?;
        println!("card: {} (input {:?}, {} classes)", card.name, card.input_chw, card.classes.len());
    }
    Ok(ExitCode::SUCCESS)
}

fn read_npy(path: &Path) -> anyhow::Result<(Vec<f32>, Vec<usize>)> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let npy = npyz::NpyFile::new(&bytes[..]).with_context(|| format!("{}: not a .npy file", path.display()))?;
    let shape: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
    if npy.order() != npyz::Order::C {
        bail!("{}: Fortran-order arrays are not supported (save with np.ascontiguousarray)", path.display());
    }
    let data = match npy.dtype() {
        npyz::DType::Plain(ts) if ts.type_char() == npyz::TypeChar::Float && ts.size_field() == 4 => npy.into_vec::<f32>(),
        npyz::DType::Plain(ts) if ts.type_char() == npyz::TypeChar::Float && ts.size_field() == 8 => npy.into_vec::<f64>().map(|v| v.into_iter().map(|x| x as f32).collect()),
        other => bail!("{}: dtype {other:?} is not supported (float32 or float64)", path.display()),
    }
    .with_context(|| format!("{}: cannot decode the array", path.display()))?;
    Ok((data, shape))
}

fn write_npy(path: &Path, data: &[f32], shape: &[usize]) -> anyhow::Result<()> {
    use npyz::WriterBuilder;
    let f = std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let shape64: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
    let mut w = npyz::WriteOptions::<f32>::new().default_dtype().shape(&shape64).writer(std::io::BufWriter::new(f)).begin_nd()?;
    w.extend(data.iter().copied())?;
    w.finish().with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

fn run_model(a: RunArgs) -> anyhow::Result<ExitCode> {
    let Some(npy) = &a.npy else {
        if a.dicom.is_empty() {
            bail!("give DICOM files or --npy IN.npy");
        }
        bail!("`model run` on DICOM files needs the DICOM decoder, which this build does not have yet; run the raw graph with --npy");
    };
    if !a.dicom.is_empty() {
        bail!("give either DICOM files or --npy, not both");
    }
    let g = load(&a.model)?;
    let logits_idx = match card_path(&a.model) {
        p if p.exists() => ModelCard::load(&p)?.logits_index(&g)?,
        _ => 0,
    };
    let (data, shape) = read_npy(npy)?;
    let backend = select::select(select::resolve_choice(a.backend)?)?;
    eprintln!("backend: {}", backend.describe());
    crate::with_backend!(&backend, |b| run_on(b, g, logits_idx, &data, &shape, &a))
}

fn run_on<B: Backend>(b: &B, g: Graph, logits_idx: usize, data: &[f32], shape: &[usize], a: &RunArgs) -> anyhow::Result<ExitCode> {
    let model = Model::new(b, g).with_logits_output(logits_idx)?;
    let x = b.upload(data, shape);
    let n = shape.first().copied().unwrap_or(0);
    let logits = if let Some(gp) = &a.grad {
        let labels: Vec<u32> = match a.label.len() {
            1 => vec![a.label[0]; n],
            k if k == n => a.label.clone(),
            k => bail!("{k} labels for a batch of {n} (give one, or one per sample)"),
        };
        let (losses, grad, logits) = model.loss_and_input_grad(b, &x, LossSpec::CrossEntropy { targeted: false }, &LossTargets::Classes(&labels))?;
        write_npy(gp, &b.download(&grad), &grad.shape)?;
        for (i, l) in losses.iter().enumerate() {
            println!("sample {i}: cross_entropy {l:.6}");
        }
        logits
    } else {
        let outs = model.forward(b, &x)?;
        outs[logits_idx].clone()
    };
    let z = b.download(&logits);
    if let Some(o) = &a.out {
        write_npy(o, &z, &logits.shape)?;
    }
    let k = z.len() / n.max(1);
    for (i, row) in z.chunks(k.max(1)).enumerate() {
        let (best, score) = row.iter().enumerate().fold((0, f32::NEG_INFINITY), |m, (j, &v)| if v > m.1 { (j, v) } else { m });
        println!("sample {i}: class {best} (score {score:.6})");
    }
    Ok(ExitCode::SUCCESS)
}
