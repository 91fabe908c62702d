//! Watch-mode benchmark (issue 8): drop-to-output latency of single files at idle, and
//! sustained files/s of `adverse watch` against `adverse run` (batch mode) on the same files,
//! measured in the same run. Pipeline: the median purifier (plugins/basic) on copies of the
//! 28x28 PneumoniaMNIST samples, CPU backend, derived DICOM written with fsync.
//!
//! `cargo bench -p adverse --bench watch`. Environment: `ADVERSE_BENCH_FILES` (throughput
//! files, default 2000), `ADVERSE_BENCH_LATENCY_N` (single drops per configuration, default 40).
//! Latency configurations: native events and polling (100 ms), each with the default settle
//! time (500 ms) and with 100 ms; a file is dropped by a rename (complete at once) and the time
//! runs until the input reaches `done/`, i.e. its derived output is written and read back and its
//! audit record is fsynced (a little later than the output file alone appears).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{bin_dir, ensure_plugins, percentile, repo_root};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .filter(|v| *v > 0)
        .unwrap_or(default)
}

fn samples() -> Vec<Vec<u8>> {
    let dir = repo_root().join("pipelines/samples/pneumoniamnist");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("samples folder")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "dcm"))
        .collect();
    v.sort();
    v.iter()
        .map(|p| std::fs::read(p).expect("sample"))
        .collect()
}

fn pipeline(dir: &Path, input: &Path, out: &Path, settle_ms: u64) -> PathBuf {
    let p = dir.join(format!("watch-{settle_ms}.yaml"));
    std::fs::write(
        &p,
        format!(
            "name: watch-bench\ninput: {{ path: {} }}\nstages:\n  - purifier: median\n    params: {{ radius: 1 }}\noutput: {{ dir: {} }}\nplugins: {{ dirs: [{}] }}\nrun: {{ jobs: 2 }}\nwatch: {{ settle_ms: {settle_ms}, status_every_s: 0 }}\n",
            input.display(),
            out.display(),
            bin_dir().display()
        ),
    )
    .expect("write pipeline");
    p
}

fn start_watch(pipe: &Path, poll: Option<u64>, log: &Path) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_adverse"));
    cmd.arg("watch")
        .arg(pipe)
        .args(["--instance", "bench"])
        .env("ADVERSE_BACKEND", "cpu")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("log"));
    if let Some(ms) = poll {
        cmd.args(["--poll", &ms.to_string()]);
    }
    cmd.spawn().expect("start adverse watch")
}

fn stop(mut c: Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &c.id().to_string()])
        .status();
    let st = c.wait().expect("wait");
    assert!(st.success(), "adverse watch exited with {st:?}");
}

/// Waits until `path` exists (the engine creates the audit log once it is set up).
fn wait_for(path: &Path, limit: Duration) {
    let t = Instant::now();
    while !path.exists() {
        assert!(t.elapsed() < limit, "{} did not appear", path.display());
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Drop-to-output times (ms) of `n` single files dropped 300 ms apart.
fn latency(work: &Path, data: &[Vec<u8>], poll: Option<u64>, settle_ms: u64, n: usize) -> Vec<f64> {
    let tag = format!(
        "lat-{}-{settle_ms}",
        poll.map_or("native".into(), |p| format!("poll{p}"))
    );
    let root = work.join(&tag);
    let (drop_dir, out, stage) = (root.join("drop"), root.join("out"), root.join("stage"));
    for d in [&drop_dir, &stage] {
        std::fs::create_dir_all(d).expect("mkdir");
    }
    let pipe = pipeline(&root, &drop_dir, &out, settle_ms);
    let w = start_watch(&pipe, poll, &root.join("watch.log"));
    wait_for(&out.join("audit/bench.jsonl"), Duration::from_secs(120));
    std::thread::sleep(Duration::from_millis(300));
    let mut v = Vec::with_capacity(n);
    for i in 0..n {
        let name = format!("l{i:04}.dcm");
        std::fs::write(stage.join(&name), &data[i % data.len()]).expect("write");
        let target = drop_dir.join(".adverse/done").join(&name);
        let t = Instant::now();
        std::fs::rename(stage.join(&name), drop_dir.join(&name)).expect("drop");
        while !target.exists() {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "{name} never came out; see {}",
                root.join("watch.log").display()
            );
            std::thread::sleep(Duration::from_micros(500));
        }
        v.push(t.elapsed().as_secs_f64() * 1e3);
        std::thread::sleep(Duration::from_millis(300));
    }
    stop(w);
    let _ = std::fs::remove_dir_all(&root);
    v.sort_by(f64::total_cmp);
    v
}

fn fill(dir: &Path, data: &[Vec<u8>], n: usize) {
    std::fs::create_dir_all(dir).expect("mkdir");
    for i in 0..n {
        std::fs::write(dir.join(format!("t{i:05}.dcm")), &data[i % data.len()]).expect("write");
    }
}

fn count_dcm(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |rd| {
        rd.flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "dcm"))
            .count()
    })
}

/// Seconds for `adverse run` over `n` files.
fn batch(work: &Path, data: &[Vec<u8>], n: usize) -> f64 {
    let root = work.join("batch");
    let (input, out) = (root.join("in"), root.join("out"));
    fill(&input, data, n);
    let pipe = pipeline(&root, &input, &out, 500);
    let t = Instant::now();
    let o = Command::new(env!("CARGO_BIN_EXE_adverse"))
        .args(["run", "-q"])
        .arg(&pipe)
        .env("ADVERSE_BACKEND", "cpu")
        .output()
        .expect("run adverse run");
    let secs = t.elapsed().as_secs_f64();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("summary.json")).expect("summary"))
            .expect("summary json");
    assert_eq!(summary["processed"], n as u64);
    let _ = std::fs::remove_dir_all(&root);
    secs
}

/// Seconds from dropping `n` files at once (renamed in) to the last output, watch mode.
fn sustained(work: &Path, data: &[Vec<u8>], n: usize, poll: Option<u64>, settle_ms: u64) -> f64 {
    let root = work.join("sustained");
    let (drop_dir, out, stage) = (root.join("drop"), root.join("out"), root.join("stage"));
    std::fs::create_dir_all(&drop_dir).expect("mkdir");
    fill(&stage, data, n);
    let pipe = pipeline(&root, &drop_dir, &out, settle_ms);
    let w = start_watch(&pipe, poll, &root.join("watch.log"));
    wait_for(&out.join("audit/bench.jsonl"), Duration::from_secs(120));
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    for e in std::fs::read_dir(&stage).expect("stage").flatten() {
        std::fs::rename(e.path(), drop_dir.join(e.file_name())).expect("drop");
    }
    let done = drop_dir.join(".adverse/done");
    while count_dcm(&done) < n {
        assert!(
            t.elapsed() < Duration::from_secs(1800),
            "watch did not finish; see {}",
            root.join("watch.log").display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let secs = t.elapsed().as_secs_f64();
    stop(w);
    let _ = std::fs::remove_dir_all(&root);
    secs
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    ensure_plugins("adverse-plugins-basic", "adverse_plugins_basic");
    let data = samples();
    let files = env_usize("ADVERSE_BENCH_FILES", 2000);
    let lat_n = env_usize("ADVERSE_BENCH_LATENCY_N", 40);
    let work = tempfile::tempdir().expect("tempdir");
    let profile = bin_dir()
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    println!("adverse watch benchmark ({profile} build, CPU backend, median 3x3 on 28x28 8-bit)");
    println!();
    println!("drop-to-output latency, single files at idle ({lat_n} drops each)");
    println!("| events        | settle_ms | p50 ms | p99 ms | max ms |");
    println!("|---------------|-----------|--------|--------|--------|");
    for (poll, settle) in [(None, 500), (None, 100), (Some(100), 500), (Some(100), 100)] {
        let v = latency(work.path(), &data, poll, settle, lat_n);
        println!(
            "| {:13} | {settle:9} | {:6.0} | {:6.0} | {:6.0} |",
            poll.map_or("native".to_string(), |p| format!("poll {p} ms")),
            percentile(&v, 0.5),
            percentile(&v, 0.99),
            v[v.len() - 1]
        );
    }
    println!();
    println!("sustained throughput, {files} files dropped at once (jobs 2)");
    let b = batch(work.path(), &data, files);
    println!("| mode                          | seconds | files/s | vs batch |");
    println!("|-------------------------------|---------|---------|----------|");
    println!(
        "| adverse run (batch)           | {b:7.2} | {:7.1} | {:8.2} |",
        files as f64 / b,
        1.0
    );
    for (poll, settle) in [(None, 500), (Some(100), 500)] {
        let s = sustained(work.path(), &data, files, poll, settle);
        println!(
            "| watch {:12} settle {settle} | {s:7.2} | {:7.1} | {:8.2} |",
            poll.map_or("native".to_string(), |p| format!("poll {p}ms")),
            files as f64 / s,
            b / s
        );
    }
}
