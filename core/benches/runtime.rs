//! Runtime benchmark: images/s for forward and forward + input gradient on the CPU backend (and
//! a hardware GPU when present) against onnxruntime's CPU forward, measured in the same run on
//! the same ONNX files (scripts/oracle/make_models.py --bench). Prints a table with ratios.
//!
//! `cargo bench -p adverse --bench runtime` (env `ADVERSE_BENCH_QUICK=1` for fewer iterations,
//! `ADVERSE_BENCH_MODELS=demo_cnn` for one model).

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use adverse::runtime::backend::{Backend, LossTargets, counter_uniform};
use adverse::runtime::cpu::CpuBackend;
use adverse::runtime::exec::Model;
use adverse::runtime::gpu::{AdapterPolicy, GpuBackend, GpuOptions};
use adverse::runtime::loss::LossSpec;
use adverse::runtime::onnx;

mod common;
use common::{ort_ips, python, repo_root};

struct Row {
    model: String,
    what: String,
    ips: f64,
    reference: f64,
}

fn time_backend<B: Backend>(b: &B, path: &Path, shape: &[usize], iters: usize, grad: bool) -> f64 {
    let model = Model::new(b, onnx::load(path).expect("import"));
    let n = shape[0];
    let data: Vec<f32> = (0..shape.iter().product::<usize>())
        .map(|i| counter_uniform(1, i as u32))
        .collect();
    let x = b.upload(&data, shape);
    let labels: Vec<u32> = (0..n as u32).map(|i| i % 10).collect();
    let step = || {
        if grad {
            let (_, g, _) = model
                .loss_and_input_grad(
                    b,
                    &x,
                    LossSpec::CrossEntropy { targeted: false },
                    &LossTargets::Classes(&labels),
                )
                .expect("grad");
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

/// Per-node forward times (`ADVERSE_BENCH_PROFILE=1`): where a model's forward time goes.
fn profile_forward<B: Backend>(b: &B, path: &Path, shape: &[usize], iters: usize) {
    let model = Model::new(b, onnx::load(path).expect("import"));
    let g = &model.graph;
    let data: Vec<f32> = (0..shape.iter().product::<usize>())
        .map(|i| counter_uniform(1, i as u32))
        .collect();
    let x = b.upload(&data, shape);
    let mut times = vec![0.0f64; g.nodes.len()];
    let mut cpu = vec![0.0f64; g.nodes.len()];
    for _ in 0..iters + 1 {
        let mut vals: Vec<Option<adverse::runtime::backend::Tensor<B>>> =
            vec![None; g.values.len()];
        vals[g.inputs[0]] = Some(x.clone());
        for (i, p) in g.params.iter().enumerate() {
            vals[p.value] = Some(model.params()[i].clone());
        }
        for (ni, node) in g.nodes.iter().enumerate() {
            let ins: Vec<_> = node
                .inputs
                .iter()
                .map(|&i| vals[i].as_ref().expect("value"))
                .collect();
            let (t, c) = (Instant::now(), cpu_ns());
            let y = adverse::runtime::exec::forward_op(b, &node.op, &ins, shape[0]).expect("op");
            times[ni] += t.elapsed().as_secs_f64();
            cpu[ni] += (cpu_ns() - c) as f64 * 1e-9;
            vals[node.output] = Some(y);
        }
    }
    let total: f64 = cpu.iter().sum();
    println!(
        "  {:<24} {:>9} {:>12} {:>7}",
        "node", "wall", "cpu (all)", "cpu %"
    );
    for ((node, t), c) in g.nodes.iter().zip(&times).zip(&cpu) {
        println!(
            "  {:<24} {:>6.3} ms {:>9.3} ms {:>6.1}%",
            node.name,
            1e3 * t / (iters + 1) as f64,
            1e3 * c / (iters + 1) as f64,
            100.0 * c / total
        );
    }
}

/// CPU time of every thread of this process so far (Linux `schedstat`, ns; 0 elsewhere): a
/// per-op cost that the other processes on a shared machine do not inflate the way they inflate
/// wall time.
fn cpu_ns() -> u64 {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    dir.flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

fn main() {
    let quick = std::env::var_os("ADVERSE_BENCH_QUICK").is_some();
    let dir = tempfile::tempdir().expect("tempdir");
    let st = Command::new(python())
        .arg(repo_root().join("scripts/oracle/make_models.py"))
        .arg("--bench")
        .arg(dir.path())
        .status()
        .expect("make_models.py");
    assert!(st.success(), "make_models.py --bench failed");
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cpu = CpuBackend::new(Some(threads));
    let gpu = GpuBackend::new(GpuOptions {
        adapter: AdapterPolicy::HardwareOnly,
    })
    .ok();
    let mut rows = Vec::new();
    // (name, input shape at batch 1, batch, iterations)
    let cases: [(&str, [usize; 3], usize, usize); 2] = [
        ("demo_cnn", [1, 28, 28], 64, if quick { 3 } else { 20 }),
        ("resnet18", [3, 224, 224], 4, if quick { 1 } else { 3 }),
    ];
    // `ADVERSE_BENCH_MODELS=demo_cnn` (comma-separated) restricts the run, for profiling.
    let only = std::env::var("ADVERSE_BENCH_MODELS").ok();
    for (name, chw, batch, iters) in cases {
        if only
            .as_ref()
            .is_some_and(|o| !o.split(',').any(|m| m == name))
        {
            continue;
        }
        let path = dir.path().join(format!("{name}.onnx"));
        let shape = [batch, chw[0], chw[1], chw[2]];
        if std::env::var_os("ADVERSE_BENCH_PROFILE").is_some() {
            println!("{name}: per-node forward, {}", cpu.describe());
            profile_forward(&cpu, &path, &shape, iters);
            continue;
        }
        let ort = ort_ips(&path, batch, iters, threads);
        rows.push(Row {
            model: name.into(),
            what: "onnxruntime forward (cpu)".into(),
            ips: ort,
            reference: ort,
        });
        let f = time_backend(&cpu, &path, &shape, iters, false);
        rows.push(Row {
            model: name.into(),
            what: format!("{} forward", cpu.describe()),
            ips: f,
            reference: ort,
        });
        let g = time_backend(&cpu, &path, &shape, iters, true);
        rows.push(Row {
            model: name.into(),
            what: format!("{} forward+input grad", cpu.describe()),
            ips: g,
            reference: ort,
        });
        if let Some(gpu) = &gpu {
            let f = time_backend(gpu, &path, &shape, iters, false);
            rows.push(Row {
                model: name.into(),
                what: format!("{} forward", gpu.describe()),
                ips: f,
                reference: ort,
            });
            let g = time_backend(gpu, &path, &shape, iters, true);
            rows.push(Row {
                model: name.into(),
                what: format!("{} forward+input grad", gpu.describe()),
                ips: g,
                reference: ort,
            });
        }
    }
    if gpu.is_none() {
        println!("(no hardware GPU adapter: GPU rows skipped)");
    }
    println!(
        "{:<10} {:<48} {:>12} {:>12}",
        "model", "runtime", "images/s", "vs ort fwd"
    );
    for r in rows {
        println!(
            "{:<10} {:<48} {:>12.2} {:>11.2}x",
            r.model,
            r.what,
            r.ips,
            r.ips / r.reference
        );
    }
}
