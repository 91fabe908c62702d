//! Whole-graph tests: import + executor against onnxruntime (CPU and GPU backends), and
//! autodiff against float64 central finite differences through the same executor running on
//! the float64 reference ([`refbackend::RefBackend`]).

mod grads;
mod import;
mod oracle;
pub mod refbackend;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::runtime::backend::counter_uniform;

/// Repository root (the workspace holding `core/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// The oracle interpreter: `ADVERSE_PYTHON`, else `<repo>/.venv/bin/python`; fails (never skips)
/// when neither exists.
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("ADVERSE_PYTHON") {
        return PathBuf::from(p);
    }
    let p = repo_root().join(".venv/bin/python");
    assert!(
        p.exists(),
        "no Python oracle: set ADVERSE_PYTHON or create {} (scripts/test.sh does)",
        p.display()
    );
    p
}

pub fn run_py(args: &[&str]) {
    let out = Command::new(python())
        .args(args)
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "python {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub struct ModelInfo {
    pub name: String,
    pub path: PathBuf,
    pub input_shape: Vec<usize>,
    pub ops: Vec<String>,
}

/// Generated once per test process: the models of scripts/oracle/make_models.py.
pub fn models() -> &'static (tempfile::TempDir, Vec<ModelInfo>) {
    static M: OnceLock<(tempfile::TempDir, Vec<ModelInfo>)> = OnceLock::new();
    M.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let script = repo_root().join("scripts/oracle/make_models.py");
        run_py(&[
            script.to_str().unwrap_or_default(),
            dir.path().to_str().unwrap_or_default(),
        ]);
        let manifest: serde_json::Value = serde_json::from_slice(
            &std::fs::read(dir.path().join("manifest.json")).expect("manifest"),
        )
        .expect("json");
        let list = manifest
            .as_array()
            .expect("array")
            .iter()
            .map(|m| ModelInfo {
                name: m["name"].as_str().unwrap_or_default().to_string(),
                path: dir.path().join(m["file"].as_str().unwrap_or_default()),
                input_shape: m["input_shape"]
                    .as_array()
                    .expect("shape")
                    .iter()
                    .map(|v| v.as_u64().unwrap_or(0) as usize)
                    .collect(),
                ops: m["ops"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .map(|v| v.as_str().unwrap_or_default().to_string())
                            .collect()
                    })
                    .unwrap_or_default(),
            })
            .collect();
        (dir, list)
    })
}

/// Deterministic input in [lo, hi).
pub fn input_data(n: usize, seed: u64, lo: f32, hi: f32) -> Vec<f32> {
    (0..n)
        .map(|i| lo + (hi - lo) * counter_uniform(seed, i as u32))
        .collect()
}

pub fn write_npy(path: &Path, data: &[f32], shape: &[usize]) {
    let f = std::fs::File::create(path).expect("create npy");
    use npyz::WriterBuilder;
    let mut w = npyz::WriteOptions::<f32>::new()
        .default_dtype()
        .shape(&shape.iter().map(|&d| d as u64).collect::<Vec<_>>())
        .writer(std::io::BufWriter::new(f))
        .begin_nd()
        .expect("npy header");
    w.extend(data.iter().copied()).expect("npy data");
    w.finish().expect("npy finish");
}

pub fn read_npy(path: &Path) -> (Vec<f32>, Vec<usize>) {
    let bytes = std::fs::read(path).expect("read npy");
    let npy = npyz::NpyFile::new(&bytes[..]).expect("npy");
    let shape = npy.shape().iter().map(|&d| d as usize).collect();
    (npy.into_vec::<f32>().expect("f32 npy"), shape)
}

/// max |got - want| / max |want| (a norm-relative error; 0 for identical tensors).
pub fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "length mismatch");
    let scale = want
        .iter()
        .fold(0f64, |m, &v| m.max((v as f64).abs()))
        .max(1e-12);
    got.iter()
        .zip(want)
        .fold(0f64, |m, (&a, &b)| m.max((a as f64 - b as f64).abs()))
        / scale
}
