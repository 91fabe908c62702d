//! `adverse detector fit`: fits a feature-space detector plugin (`mahalanobis`, `lid`,
//! `kde-bu`, or any detector taking `mode: fit` and `state: PATH`) on clean labelled frames and
//! writes its state file.
//!
//! The frames go through the plugin host in memory ([`MemoryRunner`]: the same model service as
//! `adverse run`), from an npz archive split (integer images: stored values are the integers,
//! described as unsigned MONOCHROME2 frames of the type's bit depth) or from DICOM files listed
//! in a CSV with `file` and `label` columns (each file's real metadata). The plugin writes its
//! state when its instance is destroyed at the end of the run; this command checks that it did.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Instant, SystemTime};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde_json::Value;

use super::exit;
use super::plugins::SearchArgs;
use crate::dicom::{DecodeLimits, DicomFile};
use crate::plugin::host::{Instance, PluginBackend};
use crate::plugin::loader::Pins;
use crate::plugin::runner::{MemoryRunner, RunModel, batch_seed, frame_meta, to_planar};
use crate::plugin::{Registry, SearchPath};
use crate::runtime::card::{ModelCard, card_path};
use crate::runtime::select::{self, BackendChoice};
use adverse_plugin_sdk::FrameMeta;

#[derive(Args, Debug)]
pub struct DetectorArgs {
    #[command(subcommand)]
    pub cmd: DetectorCmd,
}

#[derive(Subcommand, Debug)]
pub enum DetectorCmd {
    /// Fit a detector on clean labelled frames and write its state file.
    Fit(FitArgs),
}

#[derive(Args, Debug)]
pub struct FitArgs {
    /// The detector plugin (e.g. mahalanobis, lid, kde-bu).
    #[arg(long)]
    pub detector: String,
    /// ONNX model (with its `<model>.card.yaml`) whose features the detector models.
    #[arg(long)]
    pub model: PathBuf,
    /// Clean frames: an npz archive (`<split>_images`, `<split>_labels`).
    #[arg(long, conflicts_with = "csv")]
    pub npz: Option<PathBuf>,
    /// The npz split.
    #[arg(long, default_value = "train")]
    pub split: String,
    /// Clean frames: a CSV with `file` (relative to the CSV) and `label` columns of DICOM files.
    #[arg(long)]
    pub csv: Option<PathBuf>,
    /// The state file to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Further detector parameters (JSON object, or @FILE); `mode` and `state` are set here.
    #[arg(long, default_value = "{}")]
    pub params: String,
    /// Use at most this many frames (the first ones).
    #[arg(long)]
    pub limit: Option<usize>,
    /// auto, cpu, gpu or gpu-software (default: $ADVERSE_BACKEND, else auto).
    #[arg(long)]
    pub backend: Option<BackendChoice>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Frames per `process` call.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    #[command(flatten)]
    pub search: SearchArgs,
}

pub fn run(args: DetectorArgs) -> anyhow::Result<ExitCode> {
    match args.cmd {
        DetectorCmd::Fit(a) => fit(a),
    }
}

fn usage(e: impl std::fmt::Display) -> anyhow::Result<ExitCode> {
    eprintln!("adverse: error: {e}");
    Ok(ExitCode::from(exit::USAGE))
}

/// Clean frames of one geometry: stored values `[n, 1, h, w]` and their descriptions.
struct Frames {
    data: Vec<f32>,
    metas: Vec<FrameMeta>,
    hw: [usize; 2],
}

fn load_npz_frames(path: &Path, split: &str) -> anyhow::Result<Frames> {
    let ds = crate::train::data::load_npz(path, split)?;
    let [c, h, w] = ds.chw;
    if c != 1 {
        bail!(
            "{}: {c}-channel images; detector fit takes 1-sample frames",
            ds.origin
        );
    }
    // load_npz scales integer images by 1 / (largest value of the type); undo it.
    let max = integer_max(path, split)?;
    let bits = (max + 1.0).log2().round() as u32;
    let data: Vec<f32> = ds
        .images
        .iter()
        .map(|&v| (f64::from(v) * max).round() as f32)
        .collect();
    let meta = |label: u32| FrameMeta {
        rows: h as u32,
        cols: w as u32,
        samples_per_pixel: 1,
        bits_allocated: if bits <= 8 { 8 } else { 16 },
        bits_stored: bits,
        signed: false,
        float: false,
        frame_index: 0,
        rescale_slope: 1.0,
        rescale_intercept: 0.0,
        window: None,
        value_range: (0.0, max),
        label: Some(label),
        target: None,
        modality: "OT".into(),
    };
    Ok(Frames {
        metas: ds.labels.iter().map(|&l| meta(l)).collect(),
        data,
        hw: [h, w],
    })
}

/// The largest value of the npz images' integer type (8- or 16-bit unsigned).
fn integer_max(path: &Path, split: &str) -> anyhow::Result<f64> {
    let name = format!("{split}_images");
    for (max, wide) in [(255.0, false), (65535.0, true)] {
        let mut npz = npyz::npz::NpzArchive::open(path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        let arr = npz
            .by_name(&name)
            .with_context(|| format!("{}: cannot read {name}", path.display()))?
            .with_context(|| format!("{}: no array {name}", path.display()))?;
        let ok = if wide {
            arr.into_vec::<u16>().is_ok()
        } else {
            arr.into_vec::<u8>().is_ok()
        };
        if ok {
            return Ok(max);
        }
    }
    bail!(
        "{}: {name} is not 8- or 16-bit unsigned integers; detector fit takes integer images (stored values)",
        path.display()
    )
}

fn load_csv_frames(csv: &Path) -> anyhow::Result<Frames> {
    let text =
        std::fs::read_to_string(csv).with_context(|| format!("cannot read {}", csv.display()))?;
    let dir = csv.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header = lines
        .next()
        .with_context(|| format!("{}: empty", csv.display()))?;
    let cols: Vec<&str> = header.split(',').map(str::trim).collect();
    let col = |n: &str| {
        cols.iter()
            .position(|c| c.eq_ignore_ascii_case(n))
            .with_context(|| format!("{}: no `{n}` column in {header}", csv.display()))
    };
    let (fc, lc) = (col("file")?, col("label")?);
    let limits = DecodeLimits::default();
    let mut out = Frames {
        data: Vec::new(),
        metas: Vec::new(),
        hw: [0, 0],
    };
    for (i, line) in lines.enumerate() {
        let f: Vec<&str> = line.split(',').map(str::trim).collect();
        let (Some(file), Some(label)) = (f.get(fc), f.get(lc)) else {
            bail!("{}: line {}: too few columns", csv.display(), i + 2);
        };
        let label: u32 = label.parse().with_context(|| {
            format!(
                "{}: line {}: label `{label}` is not a class index",
                csv.display(),
                i + 2
            )
        })?;
        let path = dir.join(file);
        let img = DicomFile::open(&path, &limits)
            .and_then(|d| d.decode(&limits))
            .with_context(|| format!("{}", path.display()))?;
        let m = &img.meta;
        if m.samples_per_pixel != 1 {
            bail!(
                "{}: {} samples per pixel",
                path.display(),
                m.samples_per_pixel
            );
        }
        let hw = [m.rows as usize, m.cols as usize];
        if out.metas.is_empty() {
            out.hw = hw;
        } else if hw != out.hw {
            bail!(
                "{}: {}x{} frames, the first file has {}x{}: fit on frames of one size",
                path.display(),
                hw[0],
                hw[1],
                out.hw[0],
                out.hw[1]
            );
        }
        for k in 0..img.frame_count() {
            let v = img
                .frame_f32(k)
                .with_context(|| format!("{}: frame {k}", path.display()))?;
            out.data.extend(to_planar(&v, 1));
            out.metas.push(frame_meta(m, k as u32, Some(label), None));
        }
    }
    if out.metas.is_empty() {
        bail!("{}: no files listed", csv.display());
    }
    Ok(out)
}

fn fit(a: FitArgs) -> anyhow::Result<ExitCode> {
    let mut params: Value = match a.params.strip_prefix('@') {
        Some(p) => {
            let t = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read parameters file {p}"))?;
            serde_json::from_str(&t).with_context(|| format!("{p}: not JSON"))?
        }
        None => match serde_json::from_str(&a.params) {
            Ok(v) => v,
            Err(e) => return usage(format!("--params is not valid JSON: {e}")),
        },
    };
    let Some(obj) = params.as_object_mut() else {
        return usage("--params must be a JSON object");
    };
    obj.insert("mode".into(), Value::from("fit"));
    obj.insert("state".into(), Value::from(a.out.display().to_string()));
    if a.batch_size == 0 {
        return usage("--batch-size must be at least 1");
    }
    let registry =
        SearchPath::new(&[], &a.search.plugin_dir, true).and_then(|s| Registry::discover(&s));
    let handle = match Pins::parse(&a.search.pin).and_then(|pins| registry?.get(&a.detector, &pins))
    {
        Ok(h) => h,
        Err(e) => return usage(e),
    };
    if handle.kind != adverse_plugin_sdk::Kind::Detector {
        return usage(format!(
            "`{}` is a {}, not a detector",
            handle.name, handle.kind
        ));
    }
    if let Err(e) = handle.validate_params(&params) {
        return usage(e);
    }
    let mut frames = match (&a.npz, &a.csv) {
        (Some(n), None) => load_npz_frames(n, &a.split)?,
        (None, Some(c)) => load_csv_frames(c)?,
        _ => return usage("give the clean frames with --npz FILE or --csv FILE"),
    };
    if let Some(l) = a.limit {
        let per = frames.hw[0] * frames.hw[1];
        frames.metas.truncate(l);
        frames.data.truncate(l * per);
    }
    let graph = crate::runtime::onnx::load(&a.model)?;
    let cp = card_path(&a.model);
    let card = ModelCard::load(&cp)
        .with_context(|| format!("{}: the model needs its card", a.model.display()))?;
    let logits_output = card.logits_index(&graph)?;
    let model = RunModel {
        graph,
        card,
        logits_output,
    };
    let backend = select::select(select::resolve_choice(a.backend)?)?;
    eprintln!("backend: {}", backend.describe());
    let before = std::fs::metadata(&a.out).and_then(|m| m.modified()).ok();
    let started = SystemTime::now();
    let t = Instant::now();
    let n = frames.metas.len();
    crate::with_backend!(&backend, |b| fit_on(
        b, handle, &params, &model, &frames, &a
    ))?;
    let after = std::fs::metadata(&a.out).and_then(|m| m.modified()).ok();
    let written = match (after, before) {
        (Some(t1), Some(t0)) => t1 != t0 || t1 >= started,
        (Some(_), None) => true,
        _ => false,
    };
    if !written {
        eprintln!(
            "adverse detector fit: {} did not write {} (its message, if any, is above)",
            a.detector,
            a.out.display()
        );
        return Ok(ExitCode::from(exit::SOME_FAILED));
    }
    let summary = std::fs::read_to_string(&a.out)
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .map(|v| {
            let keys = [
                "fit_frames",
                "held_out_frames",
                "feature_dim",
                "classes",
                "fpr",
                "threshold",
                "held_out_fpr",
            ];
            keys.iter()
                .filter_map(|k| v.get(*k).map(|x| format!("{k} {x}")))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default();
    println!(
        "{}: fitted {} on {n} frames in {:.1} s: {summary}",
        a.out.display(),
        a.detector,
        t.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

fn fit_on<B: PluginBackend>(
    b: &B,
    handle: std::sync::Arc<crate::plugin::PluginHandle>,
    params: &Value,
    model: &RunModel,
    frames: &Frames,
    a: &FitArgs,
) -> anyhow::Result<()> {
    let name = handle.name.clone();
    let mut inst = Instance::create(handle, params, b)?;
    let mut runner = MemoryRunner::new(Some(model));
    let per = frames.hw[0] * frames.hw[1];
    let n = frames.metas.len();
    for (bi, start) in (0..n).step_by(a.batch_size).enumerate() {
        let end = (start + a.batch_size).min(n);
        runner
            .process(
                b,
                &mut inst,
                &frames.data[start * per..end * per],
                [end - start, 1, frames.hw[0], frames.hw[1]],
                frames.metas[start..end].to_vec(),
                batch_seed(a.seed, &name, bi as u64),
            )
            .with_context(|| format!("fitting {name} (frames {start}..{end})"))?;
    }
    // Destroying the instance ends the fit: the plugin writes its state now.
    drop(inst);
    Ok(())
}
