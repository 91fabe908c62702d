//! Forward outputs vs onnxruntime on every generated model, on the CPU and the GPU (lavapipe)
//! backends, at batch 2 (so the batch-agnostic import is exercised too).

use super::*;
use crate::runtime::backend::Backend;
use crate::runtime::cpu::CpuBackend;
use crate::runtime::exec::Model;
use crate::runtime::gpu::{AdapterPolicy, GpuBackend, GpuOptions};
use crate::runtime::onnx;

const BATCH: usize = 2;
const TOL: f64 = 1e-4;

struct Case {
    name: String,
    input: Vec<f32>,
    shape: Vec<usize>,
    want: Vec<(Vec<f32>, Vec<usize>)>,
}

/// Inputs and onnxruntime outputs, computed once per process.
fn cases() -> &'static Vec<Case> {
    static C: OnceLock<Vec<Case>> = OnceLock::new();
    C.get_or_init(|| {
        let (dir, list) = models();
        let script = repo_root().join("scripts/oracle/ort_run.py");
        list.iter()
            .enumerate()
            .map(|(k, m)| {
                let mut shape = m.input_shape.clone();
                shape[0] = BATCH;
                let input = input_data(shape.iter().product(), 77 + k as u64, -1.0, 1.0);
                let inp = dir.path().join(format!("{}.in.npy", m.name));
                write_npy(&inp, &input, &shape);
                let prefix = dir.path().join(format!("{}.ort", m.name));
                run_py(&[
                    script.to_str().unwrap_or_default(),
                    m.path.to_str().unwrap_or_default(),
                    inp.to_str().unwrap_or_default(),
                    prefix.to_str().unwrap_or_default(),
                ]);
                let mut want = Vec::new();
                for i in 0.. {
                    let p = dir.path().join(format!("{}.ort.{i}.npy", m.name));
                    if !p.exists() {
                        break;
                    }
                    want.push(read_npy(&p));
                }
                Case {
                    name: m.name.clone(),
                    input,
                    shape,
                    want,
                }
            })
            .collect()
    })
}

fn run_all<B: Backend>(b: &B) -> Vec<Vec<Vec<f32>>> {
    let (_, list) = models();
    let cases = cases();
    assert!(
        list.len() >= 8,
        "expected at least 8 oracle models, got {}",
        list.len()
    );
    let mut all = Vec::new();
    for (m, c) in list.iter().zip(cases) {
        let g = onnx::load(&m.path).unwrap_or_else(|e| panic!("{}: import failed: {e}", m.name));
        let model = Model::new(b, g);
        let x = b.upload(&c.input, &c.shape);
        let outs = model
            .forward(b, &x)
            .unwrap_or_else(|e| panic!("{}: forward failed: {e}", m.name));
        assert_eq!(outs.len(), c.want.len(), "{}: output count", c.name);
        let mut got_all = Vec::new();
        for (i, (o, (want, wshape))) in outs.iter().zip(&c.want).enumerate() {
            assert_eq!(&o.shape, wshape, "{} output {i}: shape", c.name);
            let got = b.download(o);
            let e = rel_err(&got, want);
            assert!(
                e <= TOL,
                "{} output {i} on {}: relative error {e:.3e} > {TOL:e}",
                c.name,
                b.describe()
            );
            got_all.push(got);
        }
        all.push(got_all);
    }
    all
}

#[test]
fn models_cover_every_required_operator() {
    let (_, list) = models();
    let have: std::collections::BTreeSet<&str> = list
        .iter()
        .flat_map(|m| m.ops.iter().map(String::as_str))
        .collect();
    for op in [
        "Conv",
        "ConvTranspose",
        "BatchNormalization",
        "Relu",
        "LeakyRelu",
        "Sigmoid",
        "Tanh",
        "Clip",
        "MaxPool",
        "AveragePool",
        "GlobalAveragePool",
        "Gemm",
        "MatMul",
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Concat",
        "Flatten",
        "Reshape",
        "Transpose",
        "Resize",
        "Pad",
        "Softmax",
        "Dropout",
        "Constant",
        "Shape",
        "Gather",
        "Unsqueeze",
        "Squeeze",
        "Cast",
        "Slice",
        "ConstantOfShape",
    ] {
        assert!(have.contains(op), "no oracle model exercises {op}");
    }
}

#[test]
fn cpu_forward_matches_onnxruntime() {
    run_all(&CpuBackend::new(Some(2)));
}

#[test]
fn gpu_forward_matches_onnxruntime_and_cpu() {
    let gpu = GpuBackend::new(GpuOptions {
        adapter: AdapterPolicy::SoftwareOnly,
    })
    .expect("lavapipe adapter (install mesa-vulkan-drivers)");
    let g = run_all(&gpu);
    let c = run_all(&CpuBackend::new(Some(1)));
    for (k, (go, co)) in g.iter().zip(&c).enumerate() {
        for (a, b) in go.iter().zip(co) {
            let e = rel_err(a, b);
            assert!(e <= TOL, "model {k}: GPU vs CPU relative error {e:.3e}");
        }
    }
}
