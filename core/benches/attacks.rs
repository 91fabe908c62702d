//! Attack throughput (issue 7): images/s of FGSM and PGD-10 on the bundled demo model through
//! the whole tool (the streaming engine in-process: decode, model predictions before and after,
//! the attack plugin through the C ABI, the final rounding and re-check), against onnxruntime's
//! forward pass alone on the same ONNX file, the floor of any attack's cost. Measured in one run;
//! the ratio column says how many onnxruntime forward passes one attacked image costs.
//! A hardware GPU adapter, when one exists, gets its own rows; without one they say so.
//!
//! `cargo bench -p adverse --bench attacks` (`ADVERSE_BENCH_COPIES=8`: copies of the 64 bundled
//! samples to attack, default 8 = 512 images).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use adverse::pipeline::config::Pipeline;
use adverse::pipeline::engine::{self, RunOptions};
use adverse::runtime::select::{self, BackendChoice};

mod common;
use common::{bin_dir, ensure_plugins, ort_ips, repo_root, target_dir};

const BATCH: usize = 32;

fn copies() -> usize {
    std::env::var("ADVERSE_BENCH_COPIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(8)
}

/// `copies` copies of the bundled samples under distinct names.
fn input(copies: usize) -> PathBuf {
    let src = repo_root().join("pipelines/samples/pneumoniamnist");
    let dir = target_dir()
        .join("bench-data")
        .join(format!("attacks-x{copies}"));
    if dir.exists() {
        return dir;
    }
    let tmp = dir.with_extension("tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).expect("create bench input");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&src)
        .expect("bundled samples")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "dcm"))
        .collect();
    files.sort();
    for c in 0..copies {
        for f in &files {
            let name = format!("c{c}-{}", f.file_name().unwrap().to_string_lossy());
            std::fs::copy(f, tmp.join(name)).expect("copy a sample");
        }
    }
    std::fs::rename(&tmp, &dir).expect("publish bench input");
    dir
}

/// Images/s of one pipeline run (frames over the engine's wall time, setup included).
fn run(stage: Option<&str>, backend: BackendChoice, input: &Path, work: &Path) -> (f64, usize) {
    let q = |p: &Path| serde_json::to_string(&p.display().to_string()).expect("a string");
    let out = work.join("out");
    let _ = std::fs::remove_dir_all(&out);
    let yaml = work.join("bench-attack.yaml");
    let root = repo_root();
    std::fs::write(
        &yaml,
        format!(
            "name: bench-attack\ninput: {{ path: {} }}\n\
             model: {{ onnx: {} }}\nlabels: {{ all: 1 }}\n\
             {}\n\
             output: {{ dir: {}, dicom: false, fsync: false }}\n\
             plugins: {{ dirs: [{}] }}\nrun: {{ jobs: 2, batch_size: {BATCH}, seed: 1 }}\n",
            q(input),
            q(&root.join("pipelines/models/pneumonia-cnn.onnx")),
            stage.map_or("stages: []".to_string(), |s| format!("stages:\n  - {s}")),
            q(&out),
            q(&bin_dir()),
        ),
    )
    .expect("write the bench pipeline");
    let p = Pipeline::load(&yaml).expect("bench pipeline");
    let opts = RunOptions {
        backend: Some(backend),
        force: true,
        ..RunOptions::default()
    };
    let s = engine::run(&p, &opts, Arc::new(AtomicBool::new(false))).expect("bench run");
    assert_eq!(s.failed, 0, "bench run failed files: {:?}", s.failures);
    (s.frames as f64 / s.seconds, s.frames)
}

fn main() {
    ensure_plugins("adverse-plugins-attacks", "adverse_plugins_attacks");
    let n = copies();
    let input = input(n);
    let work = target_dir().join("bench-data").join("attacks-work");
    std::fs::create_dir_all(&work).expect("bench work folder");
    let ort = ort_ips(
        &repo_root().join("pipelines/models/pneumonia-cnn.onnx"),
        BATCH,
        300,
        2,
    );
    let stages = [
        ("decode + predict (no attack)", None),
        ("FGSM", Some("attack: fgsm\n    params: { eps: 4 }")),
        (
            "PGD-10",
            Some("attack: pgd\n    params: { eps: 4, steps: 10 }"),
        ),
    ];
    let gpu = select::select(BackendChoice::Gpu)
        .ok()
        .map(|b| b.describe());
    let mut rows = vec![(
        "onnxruntime forward only (CPU, 2 threads)".to_string(),
        ort,
        0,
    )];
    for (backend, label) in [(BackendChoice::Cpu, "cpu")]
        .into_iter()
        .chain(gpu.iter().map(|_| (BackendChoice::Gpu, "gpu")))
    {
        for (name, stage) in &stages {
            let (ips, frames) = run(*stage, backend, &input, &work);
            rows.push((format!("adverse {label}: {name}"), ips, frames));
        }
    }
    println!(
        "\nattack throughput, demo CNN (1x28x28), batch {BATCH}, {} images, this machine ({} CPUs)",
        64 * n,
        std::thread::available_parallelism().map_or(1, |v| v.get())
    );
    println!("{:<48} {:>12} {:>16}", "", "images/s", "vs ort forward");
    for (name, ips, _) in &rows {
        println!("{name:<48} {ips:>12.1} {:>15.3}x", ips / ort);
    }
    match gpu {
        Some(g) => println!("GPU rows on {g}"),
        None => println!("no hardware GPU adapter: GPU rows not measured"),
    }
}
