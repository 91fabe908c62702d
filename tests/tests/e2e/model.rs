//! `adverse model info` / `adverse model run --npy` end to end: outputs checked against
//! onnxruntime, the written input gradient against onnxruntime finite differences.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("ADVERSE_PYTHON") {
        return PathBuf::from(p);
    }
    let p = repo().join(".venv/bin/python");
    assert!(
        p.exists(),
        "no Python oracle: set ADVERSE_PYTHON or create {} (scripts/test.sh does)",
        p.display()
    );
    p
}

/// The `adverse` binary next to this test's target directory (built by `cargo build --bins`).
fn adverse() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join(format!("adverse{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "{} not built: run `cargo build --workspace --bins` first",
        bin.display()
    );
    bin
}

fn py(code: &str, args: &[&str]) -> String {
    let out = Command::new(python())
        .arg("-c")
        .arg(code)
        .args(args)
        .output()
        .expect("python");
    assert!(
        out.status.success(),
        "python failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn run(args: &[&str]) -> Output {
    Command::new(adverse())
        .args(args)
        .env("ADVERSE_BACKEND", "cpu")
        .output()
        .expect("run adverse")
}

fn models() -> &'static tempfile::TempDir {
    static D: OnceLock<tempfile::TempDir> = OnceLock::new();
    D.get_or_init(|| {
        let d = tempfile::tempdir().expect("tempdir");
        let script = repo().join("scripts/oracle/make_models.py");
        let out = Command::new(python())
            .arg(script)
            .arg(d.path())
            .output()
            .expect("make_models");
        assert!(
            out.status.success(),
            "make_models.py failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        d
    })
}

#[test]
fn model_info_prints_the_graph_summary() {
    let m = models().path().join("plain_cnn.onnx");
    let out = run(&["model", "info", m.to_str().unwrap_or_default()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    // Parameter count and operator counts from onnx itself.
    let want = py(
        "import onnx,sys,numpy as np,collections as c\nm=onnx.load(sys.argv[1])\nprint(sum(int(np.prod(i.dims)) for i in m.graph.initializer))\nk=c.Counter(n.op_type for n in m.graph.node)\nprint(k['Conv'], k['MaxPool'], m.opset_import[0].version)",
        &[m.to_str().unwrap_or_default()],
    );
    let mut lines = want.lines();
    let params = lines.next().unwrap_or_default().trim().to_string();
    let counts: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert!(text.contains(&format!("parameters: {params} ")), "{text}");
    assert!(text.contains(&format!("Conv x{}", counts[0])), "{text}");
    assert!(text.contains(&format!("MaxPool x{}", counts[1])), "{text}");
    assert!(text.contains(&format!("opset: {}", counts[2])), "{text}");
    assert!(text.contains("input: input [N, 1, 12, 12]"), "{text}");
    assert!(text.contains("[N, 5]"), "{text}");
    // A missing file is a usage error with the path, not a panic.
    let bad = run(&["model", "info", "/nonexistent/model.onnx"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("/nonexistent/model.onnx"));
}

#[test]
fn model_run_npy_writes_outputs_and_the_input_gradient() {
    let d = models().path();
    let m = d.join("resnet_block.onnx");
    let (x, o, g) = (d.join("x.npy"), d.join("out.npy"), d.join("grad.npy"));
    py(
        "import numpy as np,sys\nnp.save(sys.argv[1], np.random.RandomState(3).uniform(-1,1,(3,3,8,8)).astype(np.float32))",
        &[x.to_str().unwrap_or_default()],
    );
    let s = |p: &Path| p.to_str().unwrap_or_default().to_string();
    let out = run(&[
        "model",
        "run",
        &s(&m),
        "--npy",
        &s(&x),
        "--out",
        &s(&o),
        "--grad",
        &s(&g),
        "--label",
        "2,0,3",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("sample 2: class"), "{stdout}");
    // Oracle: onnxruntime logits; the gradient checked by central differences of the
    // cross-entropy (onnxruntime, float32) along the gradient itself and along random
    // directions: d/dt CE(x + t v) = <grad, v>.
    let report = py(
        r#"
import sys, numpy as np, onnxruntime as ort
m, x, o, g = sys.argv[1:5]
s = ort.InferenceSession(m, providers=["CPUExecutionProvider"])
x = np.load(x).astype(np.float64); out = np.load(o); grad = np.load(g).astype(np.float64)
labels = np.array([2, 0, 3])
def ce(xx):
    z = s.run(None, {"input": xx.astype(np.float32)})[0].astype(np.float64)
    z = z - z.max(1, keepdims=True)
    return float(np.sum(np.log(np.exp(z).sum(1)) - z[np.arange(3), labels]))
ref = s.run(None, {"input": x.astype(np.float32)})[0]
print(np.abs(out - ref).max() / np.abs(ref).max())
rng = np.random.RandomState(0)
dirs = [grad / np.linalg.norm(grad)] + [rng.randn(*x.shape) for _ in range(3)]
worst = 0.0
for v in dirs:
    v = v / np.linalg.norm(v)
    h = 1e-2
    fd = (ce(x + h * v) - ce(x - h * v)) / (2 * h)
    an = float(np.sum(grad * v))
    worst = max(worst, abs(fd - an) / max(abs(fd), 1e-2 * np.linalg.norm(grad)))
print(worst)
print(np.linalg.norm(grad))
"#,
        &[&s(&m), &s(&x), &s(&o), &s(&g)],
    );
    let v: Vec<f64> = report
        .lines()
        .map(|l| l.trim().parse().expect("number"))
        .collect();
    assert!(
        v[0] <= 1e-4,
        "logits vs onnxruntime: relative error {}",
        v[0]
    );
    assert!(
        v[1] <= 2e-2,
        "input gradient vs finite differences: relative error {}",
        v[1]
    );
    assert!(v[2] > 0.0, "zero gradient");
    // Wrong label count and a label out of range are usage errors.
    let bad = run(&[
        "model",
        "run",
        &s(&m),
        "--npy",
        &s(&x),
        "--grad",
        &s(&g),
        "--label",
        "1,2",
    ]);
    assert_eq!(bad.status.code(), Some(2));
    let bad = run(&[
        "model",
        "run",
        &s(&m),
        "--npy",
        &s(&x),
        "--grad",
        &s(&g),
        "--label",
        "99",
    ]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("label 99"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}

#[test]
fn model_run_on_dicom_matches_a_pydicom_numpy_onnxruntime_pipeline() {
    let d = models().path();
    let m = d.join("plain_cnn.onnx");
    std::fs::write(
        d.join("plain_cnn.card.yaml"),
        "name: demo\ninput: [1, 12, 12]\npreprocessing:\n  rescale: auto\n  window: from_dicom\n  resize: area\n  scale: 2.0\n  mean: [0.5]\n  std: [0.25]\nclasses: [a, b, c, d, e]\n",
    )
    .expect("card");
    let data = repo().join("tests/data/dicom/pydicom-data");
    let ct = data.join("693_UNCI.dcm");
    let rgb = data.join("SC_rgb.dcm");
    let s = |p: &Path| p.to_str().unwrap_or_default().to_string();
    let out = run(&["model", "run", &s(&m), &s(&ct), &s(&rgb)]);
    // The RGB file fails (single-channel model), the CT file is classified: exit 1.
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("SC_rgb.dcm"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = stdout
        .lines()
        .find(|l| l.contains("693_UNCI.dcm frame 0:"))
        .unwrap_or_else(|| panic!("{stdout}"));
    let want = py(
        r#"
import sys, numpy as np, pydicom, onnxruntime as ort
m, f = sys.argv[1:3]
ds = pydicom.dcmread(f)
x = ds.pixel_array.astype(np.float64) * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
wc = ds.WindowCenter; ww = ds.WindowWidth
c = float(wc[0] if isinstance(wc, pydicom.multival.MultiValue) else wc)
w = float(ww[0] if isinstance(ww, pydicom.multival.MultiValue) else ww)
y = np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0, 1) * 2.0
H, W = y.shape
def area(v, n, axis):
    L = v.shape[axis]
    parts = [np.take(v, range(i * L // n, -(-(i + 1) * L // n)), axis=axis).mean(axis=axis, keepdims=True) for i in range(n)]
    return np.concatenate(parts, axis=axis)
y = area(area(y, 12, 0), 12, 1)
y = (y - 0.5) / 0.25
s = ort.InferenceSession(m, providers=["CPUExecutionProvider"])
z = s.run(None, {"input": y[None, None].astype(np.float32)})[0][0].astype(np.float64)
p = np.exp(z - z.max()); p /= p.sum()
print(int(p.argmax()), float(p.max()))
"#,
        &[&s(&m), &s(&ct)],
    );
    let mut it = want.split_whitespace();
    let class: usize = it.next().and_then(|v| v.parse().ok()).expect("class");
    let p: f64 = it.next().and_then(|v| v.parse().ok()).expect("p");
    let names = ["a", "b", "c", "d", "e"];
    assert!(
        line.contains(&format!(": {} (p=", names[class])),
        "{line} vs class {class}"
    );
    let got: f64 = line
        .rsplit("p=")
        .next()
        .and_then(|v| v.trim_end_matches(')').parse().ok())
        .expect("p in output");
    assert!((got - p).abs() < 2e-4, "{line}: p {got} vs {p}");
}
