//! Helpers the bench binaries share: where the repository, the built binary and plugins, and
//! the Python oracle are.

#![allow(dead_code)] // each bench uses its own subset

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("core/ has a parent")
        .to_path_buf()
}

/// `target/<profile>` of this build (`target/release` under `cargo bench`): the `adverse`
/// binary's folder, where the plugin libraries are built too.
pub fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_adverse"))
        .parent()
        .expect("the adverse binary has a folder")
        .to_path_buf()
}

pub fn target_dir() -> PathBuf {
    bin_dir()
        .parent()
        .expect("target/<profile> has a parent")
        .to_path_buf()
}

pub fn python() -> PathBuf {
    let p = std::env::var_os("ADVERSE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".venv/bin/python"));
    assert!(
        p.exists(),
        "no Python oracle at {} (set ADVERSE_PYTHON or create the venv: scripts/test.sh)",
        p.display()
    );
    p
}

/// Builds plugin package `package` (library `lib`) beside the binary with the same profile
/// (`cargo build --release -p PACKAGE` under `cargo bench`), so the bench measures the plugin
/// code of this tree, never a stale library.
pub fn ensure_plugins(package: &str, lib: &str) {
    let dir = bin_dir();
    let path = dir.join(format!(
        "{}{lib}{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    ));
    if !Path::new(env!("CARGO")).exists() && path.exists() {
        // A bench binary copied to a machine without the toolchain (a lent GPU machine) runs
        // with the libraries copied beside it; there is nothing to rebuild them with.
        println!("(no cargo here: using the prebuilt {})", path.display());
        return;
    }
    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(repo_root()).args(["build", "-p", package]);
    match dir.file_name().and_then(|s| s.to_str()) {
        Some("release") => {
            cmd.arg("--release");
        }
        Some("debug") | None => {}
        Some(profile) => {
            cmd.args(["--profile", profile]);
        }
    }
    let status = cmd.status().expect("run cargo build");
    assert!(
        status.success() && path.exists(),
        "{cmd:?} did not produce {}",
        path.display()
    );
}

/// `ort_run.py MODE PATH` timing batches of `batch` in rounds of `iters` on `threads` threads.
fn ort_command(mode: &str, path: &Path, batch: usize, iters: usize, threads: usize) -> Command {
    let mut cmd = Command::new(python());
    cmd.arg(repo_root().join("scripts/oracle/ort_run.py"))
        .arg(mode)
        .arg(path)
        .args([
            "--batch",
            &batch.to_string(),
            "--iters",
            &iters.to_string(),
            "--threads",
            &threads.to_string(),
        ]);
    cmd
}

/// onnxruntime's CPU forward pass alone (scripts/oracle/ort_run.py --bench): images/s over
/// `iters` batches of `batch` random inputs with `threads` intra-op threads.
pub fn ort_ips(path: &Path, batch: usize, iters: usize, threads: usize) -> f64 {
    let out = ort_command("--bench", path, batch, iters, threads)
        .output()
        .expect("run onnxruntime (python venv)");
    assert!(
        out.status.success(),
        "ort_run.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ort_run.py JSON");
    v["images_per_s"].as_f64().expect("images_per_s")
}

/// onnxruntime's CPU forward as a server (`ort_run.py --serve`): one session, made and warmed
/// once, that times a round of `iters` batches each time [`OrtServer::round`] asks. Why: a bench
/// that alternates whole runs of each side (seconds apart) on these shared VMs compares phases
/// of the machine as much as the runtimes; rounds interleaved one by one see the same phases.
pub struct OrtServer {
    child: std::process::Child,
    out: std::io::BufReader<std::process::ChildStdout>,
}

impl OrtServer {
    pub fn start(path: &Path, batch: usize, iters: usize, threads: usize) -> OrtServer {
        use std::io::BufRead;
        use std::process::Stdio;
        let mut child = ort_command("--serve", path, batch, iters, threads)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("run onnxruntime (python venv)");
        let mut out = std::io::BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut line = String::new();
        out.read_line(&mut line).expect("ort_run.py --serve");
        assert_eq!(line.trim(), "ready", "ort_run.py --serve did not start");
        OrtServer { child, out }
    }

    /// Seconds of one round.
    pub fn round(&mut self) -> f64 {
        use std::io::{BufRead, Write};
        let stdin = self.child.stdin.as_mut().expect("piped stdin");
        stdin
            .write_all(b"round\n")
            .and_then(|()| stdin.flush())
            .expect("ort_run.py --serve: write");
        let mut line = String::new();
        self.out
            .read_line(&mut line)
            .expect("ort_run.py --serve: read");
        line.trim()
            .parse()
            .unwrap_or_else(|_| panic!("ort_run.py --serve: {line:?}"))
    }
}

impl Drop for OrtServer {
    fn drop(&mut self) {
        // EOF on its stdin ends the server's loop.
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// The `q` quantile of ascending `sorted` (the nearest rank; `q = 0.5` is the median, the
/// middle element of an odd count).
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}
