//! Runtime benchmark: images/s for forward and forward + input gradient on the CPU backend (and
//! a hardware GPU when present) against onnxruntime's CPU forward, measured in the same run on
//! the same ONNX files (scripts/oracle/make_models.py --bench). Prints a table with ratios.
//!
//! `cargo bench -p adverse --bench runtime` (env `ADVERSE_BENCH_QUICK=1` for fewer iterations).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use adverse::runtime::backend::{Backend, LossTargets, counter_uniform};
use adverse::runtime::cpu::CpuBackend;
use adverse::runtime::exec::Model;
use adverse::runtime::gpu::{AdapterPolicy, GpuBackend, GpuOptions};
use adverse::runtime::loss::LossSpec;
use adverse::runtime::onnx;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

fn python() -> PathBuf {
    std::env::var_os("ADVERSE_PYTHON").map(PathBuf::from).unwrap_or_else(|| repo().join(".venv/bin/python"))
}

struct Row {
    model: String,
    what: String,
    ips: f64,
    reference: f64,
}

fn time_backend<B: Backend>(b: &B, path: &Path, shape: &[usize], iters: usize, grad: bool) -> f64 {
    let model = Model::new(b, onnx::load(path).expect("import"));
    let n = shape[0];
    let data: Vec<f32> = (0..shape.iter().product::<usize>()).map(|i| counter_uniform(1, i as u32)).collect();
    let x = b.upload(&data, shape);
    let labels: Vec<u32> = (0..n as u32).map(|i| i % 10).collect();
    let step = || {
        if grad {
            let (_, g, _) = model.loss_and_input_grad(b, &x, LossSpec::CrossEntropy { targeted: false }, &LossTargets::Classes(&labels)).expect("grad");
            b.download(&g);
        } else {
            let o = model.forward(b, &x).expect("forward");
            b.download(&o[0]);
        }
    };
    step(); // warm-up (pipelines, pools)
    let t = Instant::now();
    for _ in 0..iters {
        step();
    }
    (n * iters) as f64 / t.elapsed().as_secs_f64()
}

fn ort_ips(path: &Path, batch: usize, iters: usize, threads: usize) -> f64 {
    let script = repo().join("scripts/oracle/ort_run.py");
    let out = Command::new(python())
        .arg(script)
        .args(["--bench", path.to_str().unwrap_or_default(), "--batch", &batch.to_string(), "--iters", &iters.to_string(), "--threads", &threads.to_string()])
        .output()
        .expect("run onnxruntime (python venv)");
    assert!(out.status.success(), "ort_run.py failed: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    v["images_per_s"].as_f64().unwrap_or(0.0)
}

fn main() {
    let quick = std::env::var_os("ADVERSE_BENCH_QUICK").is_some();
    let dir = tempfile::tempdir().expect("tempdir");
    let st = Command::new(python()).arg(repo().join("scripts/oracle/make_models.py")).arg("--bench").arg(dir.path()).status().expect("make_models.py");
    assert!(st.success(), "make_models.py --bench failed");
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cpu = CpuBackend::new(Some(threads));
    let gpu = GpuBackend::new(GpuOptions { adapter: AdapterPolicy::HardwareOnly }).ok();
    let mut rows = Vec::new();
    // (name, input shape at batch 1, batch, iterations)
    let cases: [(&str, [usize; 3], usize, usize); 2] = [("demo_cnn", [1, 28, 28], 64, if quick { 3 } else { 20 }), ("resnet18", [3, 224, 224], 4, if quick { 1 } else { 3 })];
    for (name, chw, batch, iters) in cases {
        let path = dir.path().join(format!("{name}.onnx"));
        let shape = [batch, chw[0], chw[1], chw[2]];
        let ort = ort_ips(&path, batch, iters, threads);
        rows.push(Row { model: name.into(), what: "onnxruntime forward (cpu)".into(), ips: ort, reference: ort });
        let f = time_backend(&cpu, &path, &shape, iters, false);
        rows.push(Row { model: name.into(), what: format!("{} forward", cpu.describe()), ips: f, reference: ort });
        let g = time_backend(&cpu, &path, &shape, iters, true);
        rows.push(Row { model: name.into(), what: format!("{} forward+input grad", cpu.describe()), ips: g, reference: ort });
        if let Some(gpu) = &gpu {
            let f = time_backend(gpu, &path, &shape, iters, false);
            rows.push(Row { model: name.into(), what: format!("{} forward", gpu.describe()), ips: f, reference: ort });
            let g = time_backend(gpu, &path, &shape, iters, true);
            rows.push(Row { model: name.into(), what: format!("{} forward+input grad", gpu.describe()), ips: g, reference: ort });
        }
    }
    if gpu.is_none() {
        println!("(no hardware GPU adapter: GPU rows skipped)");
    }
    println!("{:<10} {:<48} {:>12} {:>12}", "model", "runtime", "images/s", "vs ort fwd");
    for r in rows {
        println!("{:<10} {:<48} {:>12.2} {:>11.2}x", r.model, r.what, r.ips, r.ips / r.reference);
    }
}
