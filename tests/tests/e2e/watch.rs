//! `adverse watch` end to end, every scenario in native-event and poll mode (a matrix: each
//! scenario is one function taking the mode, instantiated twice by `matrix!`). The median
//! purifier (plugins/basic) runs on copies of the 28x28 samples under new names; checks are on
//! the files (outputs, done/, quarantine/, processing/) and on the audit logs (one `ok` record
//! per input across all logs, chains verified by `adverse audit verify`).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use adverse_tests::{adverse_bin, plugin_dir, repo_root};
use serde_json::Value;
use sha2::{Digest, Sha256};

#[derive(Debug, Clone, Copy)]
enum Mode {
    Native,
    Poll,
}

impl Mode {
    fn args(self) -> Vec<String> {
        match self {
            Mode::Native => vec![],
            Mode::Poll => vec!["--poll".into(), "100".into()],
        }
    }
}

macro_rules! matrix {
    ($scenario:ident) => {
        mod $scenario {
            #[test]
            fn native() {
                super::$scenario(super::Mode::Native);
            }
            #[test]
            fn poll() {
                super::$scenario(super::Mode::Poll);
            }
        }
    };
}

fn samples() -> Vec<Vec<u8>> {
    let dir = repo_root().join("pipelines/samples/pneumoniamnist");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "dcm"))
        .collect();
    v.sort();
    v.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

/// A drop folder, an output folder, a pipeline (median purifier, no model) and the plugins.
struct Env {
    _tmp: tempfile::TempDir,
    _plugins: tempfile::TempDir,
    drop: PathBuf,
    out: PathBuf,
    pipeline: PathBuf,
    samples: Vec<Vec<u8>>,
}

fn env() -> Env {
    let plugins = plugin_dir(&["adverse-plugins-basic"], &["adverse_plugins_basic"]);
    let tmp = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(tmp.path()).unwrap();
    let drop = root.join("drop");
    let out = root.join("out");
    std::fs::create_dir_all(&drop).unwrap();
    let pipeline = root.join("watch.yaml");
    std::fs::write(
        &pipeline,
        format!(
            "name: watch-e2e\ninput: {{ path: {} }}\nstages:\n  - purifier: median\n    params: {{ radius: 1 }}\noutput: {{ dir: {} }}\nplugins: {{ dirs: [{}] }}\nwatch: {{ settle_ms: 150, status_every_s: 1 }}\n",
            drop.display(),
            out.display(),
            plugins.path().display()
        ),
    )
    .unwrap();
    Env {
        _tmp: tmp,
        _plugins: plugins,
        drop,
        out,
        pipeline,
        samples: samples(),
    }
}

impl Env {
    fn start(&self, mode: Mode, instance: &str, extra: &[&str]) -> Child {
        let log =
            std::fs::File::create(self.drop.parent().unwrap().join(format!("{instance}.log")))
                .unwrap();
        Command::new(adverse_bin())
            .arg("watch")
            .arg(&self.pipeline)
            .args(["--instance", instance])
            .args(mode.args())
            .args(extra)
            .env("ADVERSE_BACKEND", "cpu")
            .env("ADVERSE_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start adverse watch")
    }

    fn log(&self, instance: &str) -> String {
        std::fs::read_to_string(self.drop.parent().unwrap().join(format!("{instance}.log")))
            .unwrap_or_default()
    }

    fn state(&self, sub: &str) -> PathBuf {
        self.drop.join(".adverse").join(sub)
    }

    fn count(&self, dir: &Path, suffix: &str) -> usize {
        walk(dir)
            .iter()
            .filter(|p| p.to_string_lossy().ends_with(suffix))
            .count()
    }

    fn done(&self) -> usize {
        self.count(&self.state("done"), ".dcm")
    }

    fn quarantined(&self) -> usize {
        self.count(&self.state("quarantine"), ".dcm")
    }

    /// Waits until `pred` holds; on timeout fails with the watcher logs.
    fn wait(&self, what: &str, secs: u64, logs: &[&str], mut pred: impl FnMut(&Env) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < deadline {
            if pred(self) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let l: Vec<String> = logs
            .iter()
            .map(|i| format!("--- {i}:\n{}", self.log(i)))
            .collect();
        panic!(
            "timed out waiting for {what} (done {}, quarantined {})\n{}",
            self.done(),
            self.quarantined(),
            l.join("\n")
        );
    }

    /// `ok` audit records per input over every instance's log, after checking each chain.
    fn audited(&self) -> BTreeMap<String, Vec<Value>> {
        let mut m: BTreeMap<String, Vec<Value>> = BTreeMap::new();
        for log in walk(&self.out.join("audit")) {
            let v = Command::new(adverse_bin())
                .args(["audit", "verify"])
                .arg(&log)
                .output()
                .unwrap();
            assert!(
                v.status.success(),
                "{}: {}",
                log.display(),
                String::from_utf8_lossy(&v.stdout)
            );
            for line in std::fs::read_to_string(&log).unwrap().lines() {
                let r: Value = serde_json::from_str(line).unwrap();
                if r["kind"] == "instance" {
                    m.entry(r["input"].as_str().unwrap().to_string())
                        .or_default()
                        .push(r);
                }
            }
        }
        m
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

/// SIGTERM, then the exit status (must come within 60 s).
fn terminate(mut c: Child) -> std::process::ExitStatus {
    let st = Command::new("kill")
        .args(["-TERM", &c.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(s) = c.try_wait().unwrap() {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "watch did not stop after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn sha(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// Each name processed exactly once (one `ok` record), its input in done/, nothing left in
/// processing/, and the output present where the record names one.
fn assert_exactly_once(e: &Env, names: &[String]) {
    let audited = e.audited();
    for n in names {
        let recs = audited.get(n).map(Vec::as_slice).unwrap_or_default();
        let ok: Vec<&Value> = recs.iter().filter(|r| r["outcome"] == "ok").collect();
        assert_eq!(ok.len(), 1, "{n}: {} ok records ({recs:?})", ok.len());
        assert!(e.state("done").join(n).is_file(), "{n} not in done/");
        assert!(
            !e.state("done").join(format!("{n}.1")).exists(),
            "{n} done twice"
        );
        if let Some(o) = ok[0]["output"].as_str() {
            assert!(e.out.join(o).is_file(), "{n}: output {o} missing");
        }
    }
    assert_eq!(e.done(), names.len());
    let left: Vec<PathBuf> = walk(&e.state("processing"))
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|f| f != ".heartbeat"))
        .collect();
    assert!(left.is_empty(), "left in processing: {left:?}");
}

fn burst(mode: Mode) {
    let e = env();
    let status_file = e.drop.parent().unwrap().join("status.json");
    let w = e.start(mode, "a", &["--status-file", status_file.to_str().unwrap()]);
    let n = 2000;
    let names: Vec<String> = (0..n).map(|i| format!("f{i:04}.dcm")).collect();
    // Dropped at once: written elsewhere on the same filesystem, then renamed in.
    let stage = e.drop.parent().unwrap().join("stage");
    std::fs::create_dir_all(&stage).unwrap();
    for (i, name) in names.iter().enumerate() {
        std::fs::write(stage.join(name), &e.samples[i % e.samples.len()]).unwrap();
    }
    for name in &names {
        std::fs::rename(stage.join(name), e.drop.join(name)).unwrap();
    }
    e.wait("2000 files done", 240, &["a"], |e| e.done() == n);
    let st = terminate(w);
    assert!(st.success(), "exit {st:?}\n{}", e.log("a"));
    assert_exactly_once(&e, &names);
    let status: Value = serde_json::from_slice(&std::fs::read(&status_file).unwrap()).unwrap();
    assert_eq!(status["processed"], n as u64, "{status}");
    assert_eq!(status["failed"], 0);
    assert!(
        e.log("a").contains("processed"),
        "no status line:\n{}",
        e.log("a")
    );
}

fn slow_writer(mode: Mode) {
    let e = env();
    let w = e.start(mode, "a", &[]);
    let full = e.samples[3].clone();
    let path = e.drop.join("slow.dcm");
    let mut f = std::fs::File::create(&path).unwrap();
    // Five chunks 400 ms apart: each pause is longer than the 150 ms settle time, so only the
    // complete-DICOM check keeps the file from being taken early.
    let chunk = full.len().div_ceil(5);
    for c in full.chunks(chunk) {
        f.write_all(c).unwrap();
        f.flush().unwrap();
        std::thread::sleep(Duration::from_millis(400));
    }
    drop(f);
    e.wait("slow.dcm done", 60, &["a"], |e| e.done() == 1);
    assert!(terminate(w).success());
    assert_eq!(e.quarantined(), 0, "{}", e.log("a"));
    let recs = &e.audited()["slow.dcm"];
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0]["outcome"], "ok");
    assert_eq!(recs[0]["input_sha256"], sha(&full));
    assert_exactly_once(&e, &["slow.dcm".to_string()]);
}

fn temp_name_then_rename(mode: Mode) {
    let e = env();
    let w = e.start(mode, "a", &[]);
    let part = e.drop.join("x.dcm.part");
    std::fs::write(&part, &e.samples[5]).unwrap();
    std::thread::sleep(Duration::from_millis(1200));
    assert!(part.is_file(), "a .part file was taken");
    assert_eq!(e.done(), 0);
    std::fs::rename(&part, e.drop.join("x.dcm")).unwrap();
    e.wait("x.dcm done", 60, &["a"], |e| e.done() == 1);
    std::thread::sleep(Duration::from_millis(500));
    assert!(terminate(w).success());
    let audited = e.audited();
    assert_eq!(audited.keys().collect::<Vec<_>>(), vec!["x.dcm"]);
    assert_exactly_once(&e, &["x.dcm".to_string()]);
}

fn bad_files_are_quarantined(mode: Mode) {
    let e = env();
    let w = e.start(mode, "a", &["--incomplete-timeout-ms", "800"]);
    let s = &e.samples[7];
    std::fs::write(e.drop.join("truncated.dcm"), &s[..s.len() / 2]).unwrap();
    std::fs::write(
        e.drop.join("notes.dcm"),
        "not a DICOM file, just text\n".repeat(20),
    )
    .unwrap();
    std::fs::write(e.drop.join("good.dcm"), s).unwrap();
    e.wait("2 quarantined, 1 done", 60, &["a"], |e| {
        e.quarantined() == 2 && e.done() == 1
    });
    assert!(terminate(w).success());
    for (name, stage) in [("truncated.dcm", "decode"), ("notes.dcm", "decode")] {
        let r: Value = serde_json::from_slice(
            &std::fs::read(e.state("quarantine").join(format!("{name}.reason.json"))).unwrap(),
        )
        .unwrap();
        assert_eq!(r["stage"], stage, "{name}: {r}");
        assert!(!r["error"].as_str().unwrap().is_empty());
        assert!(r["time"].as_str().unwrap().ends_with('Z'));
        assert_eq!(r["instance"], "a");
    }
    let audited = e.audited();
    assert_eq!(audited["truncated.dcm"][0]["outcome"], "failed");
    assert_eq!(audited["notes.dcm"][0]["outcome"], "failed");
    assert_eq!(audited["good.dcm"][0]["outcome"], "ok");
}

fn two_watchers(mode: Mode) {
    let e = env();
    let a = e.start(mode, "a", &[]);
    let b = e.start(mode, "b", &[]);
    // Only once `a` runs (its first status line) can a namesake be refused; started earlier,
    // the namesake would win the lock and `a` would be the one refused.
    e.wait("a running", 60, &["a"], |e| {
        e.log("a").contains("adverse watch [a]")
    });
    // A third process with a running instance's name is refused.
    let dup = Command::new(adverse_bin())
        .arg("watch")
        .arg(&e.pipeline)
        .args(["--instance", "a"])
        .output()
        .unwrap();
    assert_eq!(dup.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&dup.stderr).contains("instance name `a` is running"),
        "{}",
        String::from_utf8_lossy(&dup.stderr)
    );
    let n = 400;
    let names: Vec<String> = (0..n).map(|i| format!("s/g{i:03}.dcm")).collect();
    std::fs::create_dir_all(e.drop.join("s")).unwrap();
    for (i, name) in names.iter().enumerate() {
        std::fs::write(e.drop.join(name), &e.samples[i % e.samples.len()]).unwrap();
    }
    e.wait("all done by two watchers", 240, &["a", "b"], |e| {
        e.done() == n
    });
    assert!(terminate(a).success());
    assert!(terminate(b).success());
    assert_exactly_once(&e, &names);
    assert_eq!(
        walk(&e.out.join("audit")).len(),
        2,
        "one audit log per instance"
    );
}

fn sigkill_and_restart(mode: Mode) {
    let e = env();
    let n = 600;
    let names: Vec<String> = (0..n).map(|i| format!("k{i:03}.dcm")).collect();
    for (i, name) in names.iter().enumerate() {
        std::fs::write(e.drop.join(name), &e.samples[i % e.samples.len()]).unwrap();
    }
    let mut w = e.start(mode, "a", &[]);
    e.wait("some done", 120, &["a"], |e| e.done() >= 20);
    w.kill().unwrap();
    w.wait().unwrap();
    let before = e.done();
    assert!(
        before < n,
        "everything finished before the kill; nothing tested"
    );
    let w = e.start(mode, "a", &[]);
    e.wait("all done after restart", 240, &["a"], |e| e.done() == n);
    assert!(terminate(w).success());
    assert_exactly_once(&e, &names);
}

matrix!(burst);
matrix!(slow_writer);
matrix!(temp_name_then_rename);
matrix!(bad_files_are_quarantined);
matrix!(two_watchers);
matrix!(sigkill_and_restart);
