//! Helpers for the end-to-end tests: locate the `adverse` binary, the repository, its data and
//! the Python oracle interpreter.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The repository root (the workspace folder holding `Cargo.lock`).
pub fn repo_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| here.to_path_buf())
}

/// `tests/data/<rel>`.
pub fn data(rel: &str) -> PathBuf {
    repo_root().join("tests").join("data").join(rel)
}

/// The bundled pydicom-data corpus folder.
pub fn pydicom_data() -> PathBuf {
    data("dicom/pydicom-data")
}

/// Every `.dcm` file of the pydicom-data corpus, sorted by name.
pub fn pydicom_files() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(pydicom_data())
        .expect("tests/data/dicom/pydicom-data must exist")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "dcm"))
        .collect();
    v.sort();
    v
}

/// The `adverse` binary of the profile these tests were built with, built once per test
/// process if it is missing.
pub fn adverse_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        // target/<profile>/deps/e2e-xxxx -> target/<profile>/adverse
        let exe = std::env::current_exe().expect("current_exe");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test binary lives in target/<profile>/deps")
            .to_path_buf();
        let bin = profile_dir.join(format!("adverse{}", std::env::consts::EXE_SUFFIX));
        if !bin.exists() {
            let profile = profile_dir
                .file_name()
                .and_then(|s| s.to_str())
                .unwrap_or("debug")
                .to_string();
            let mut cmd = Command::new(env!("CARGO"));
            cmd.current_dir(repo_root())
                .args(["build", "-p", "adverse", "--bin", "adverse"]);
            if profile == "release" {
                cmd.arg("--release");
            } else if profile != "debug" {
                cmd.args(["--profile", &profile]);
            }
            let status = cmd.status().expect("run cargo build");
            assert!(
                status.success(),
                "cargo build -p adverse --bin adverse failed"
            );
        }
        assert!(
            bin.exists(),
            "adverse binary not found at {}",
            bin.display()
        );
        bin
    })
    .clone()
}

/// The Python interpreter of the oracle venv: `ADVERSE_PYTHON`, else `<repo>/.venv/bin/python`.
/// Panics with instructions when neither exists (tests never skip the oracle).
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("ADVERSE_PYTHON") {
        let p = PathBuf::from(p);
        assert!(p.exists(), "ADVERSE_PYTHON={} does not exist", p.display());
        return p;
    }
    let p = repo_root().join(".venv").join("bin").join("python");
    assert!(
        p.exists(),
        "no Python oracle: set ADVERSE_PYTHON or create {} (scripts/test.sh does: python3 -m venv .venv && .venv/bin/pip install -r scripts/requirements-oracle.txt)",
        p.display()
    );
    p
}

/// Run `scripts/oracle/<script>` with `args` under the oracle interpreter; returns stdout.
/// Panics with the script's stderr on failure.
pub fn run_oracle<I, S>(script: &str, args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let out = Command::new(python())
        .arg(repo_root().join("scripts").join("oracle").join(script))
        .args(args)
        .output()
        .expect("run the Python oracle");
    assert!(
        out.status.success(),
        "oracle {script} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("oracle output is UTF-8")
}

/// A fresh directory holding copies of the built plugin libraries `libs` (library names such as
/// `adverse_plugins_basic`) of `packages`, built first in this test binary's profile. A copy per
/// test keeps other libraries of `target/` (test fixtures) off the search path.
pub fn plugin_dir(packages: &[&str], libs: &[&str]) -> tempfile::TempDir {
    let exe = std::env::current_exe().expect("current_exe");
    let pdir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps")
        .to_path_buf();
    let profile = pdir
        .file_name()
        .and_then(|s| s.to_str())
        .unwrap_or("debug")
        .to_string();
    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(repo_root()).arg("build");
    for p in packages {
        cmd.args(["-p", p]);
    }
    if profile == "release" {
        cmd.arg("--release");
    } else if profile != "debug" {
        cmd.args(["--profile", &profile]);
    }
    let st = cmd.status().expect("run cargo build for plugin libraries");
    assert!(st.success(), "cargo build of {packages:?} failed");
    let dir = tempfile::tempdir().expect("tempdir");
    for l in libs {
        let f = format!(
            "{}{l}{}",
            std::env::consts::DLL_PREFIX,
            std::env::consts::DLL_SUFFIX
        );
        std::fs::copy(pdir.join(&f), dir.path().join(&f))
            .unwrap_or_else(|e| panic!("copy {f}: {e}"));
    }
    dir
}
