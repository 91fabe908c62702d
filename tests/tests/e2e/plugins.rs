//! Plugins end to end: the built-in Rust plugin library, the C example plugin (built here with
//! the `cc` crate), deliberately broken libraries, and scaffolded plugin crates, all driven
//! through the `adverse` binary on real DICOM frames. Pixel results are checked against
//! pydicom + SciPy / NumPy.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use adverse_tests::{adverse_bin, pydicom_data, python, repo_root};
use serde_json::Value;

/// The libraries the tests load, each alone in its own directory.
pub(crate) struct Libs {
    _dir: tempfile::TempDir,
    rust: PathBuf,
    /// The built-in attack catalogue (`plugins/attacks`).
    pub(crate) attacks: PathBuf,
    fixtures: PathBuf,
    c: PathBuf,
    c_bad_abi: PathBuf,
}

fn lib_file(name: &str) -> String {
    format!(
        "{}{name}{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    )
}

/// `target/<profile>` of this test binary.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps")
        .to_path_buf()
}

fn target_triple() -> String {
    let arch = std::env::consts::ARCH;
    match std::env::consts::OS {
        "macos" => format!("{arch}-apple-darwin"),
        _ => format!("{arch}-unknown-linux-gnu"),
    }
}

/// Compiles the C example plugin into `out` (a shared library), with extra `-D` defines.
fn build_c_plugin(out: &Path, defines: &[(&str, &str)]) {
    let triple = target_triple();
    let mut b = cc::Build::new();
    b.target(&triple)
        .host(&triple)
        .opt_level(1)
        .cargo_metadata(false)
        .warnings(true)
        .include(repo_root().join("plugins/sdk/include"));
    for (k, v) in defines {
        b.define(k, Some(*v));
    }
    let compiler = b
        .try_get_compiler()
        .expect("a C compiler (cc) is needed to build the C example plugin");
    let mut cmd = compiler.to_command();
    cmd.arg("-shared")
        .arg("-fPIC")
        .arg("-o")
        .arg(out)
        .arg(repo_root().join("plugins/examples/c-purifier/window_clamp.c"))
        .arg("-lm");
    let o = cmd.output().expect("run the C compiler");
    assert!(
        o.status.success(),
        "C plugin build failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Builds every plugin library once per test process.
pub(crate) fn libs() -> &'static Libs {
    static L: OnceLock<Libs> = OnceLock::new();
    L.get_or_init(|| {
        let pdir = profile_dir();
        let profile = pdir
            .file_name()
            .and_then(|s| s.to_str())
            .unwrap_or("debug")
            .to_string();
        let mut cmd = Command::new(env!("CARGO"));
        cmd.current_dir(repo_root()).args([
            "build",
            "-p",
            "adverse-plugins-basic",
            "-p",
            "adverse-plugins-attacks",
            "-p",
            "adverse-plugin-test-fixtures",
        ]);
        if profile == "release" {
            cmd.arg("--release");
        } else if profile != "debug" {
            cmd.args(["--profile", &profile]);
        }
        let st = cmd
            .status()
            .expect("run cargo build for the plugin libraries");
        assert!(st.success(), "cargo build of the plugin libraries failed");
        let dir = tempfile::tempdir().expect("tempdir");
        let place = |sub: &str, file: &str| -> PathBuf {
            let d = dir.path().join(sub);
            std::fs::create_dir_all(&d).expect("mkdir");
            d.join(file)
        };
        let rust = place("rust", &lib_file("adverse_plugins_basic"));
        std::fs::copy(pdir.join(lib_file("adverse_plugins_basic")), &rust)
            .expect("copy the basic plugin library");
        let attacks = place("attacks", &lib_file("adverse_plugins_attacks"));
        std::fs::copy(pdir.join(lib_file("adverse_plugins_attacks")), &attacks)
            .expect("copy the attack plugin library");
        let fixtures = place("fixtures", &lib_file("adverse_plugin_test_fixtures"));
        std::fs::copy(
            pdir.join(lib_file("adverse_plugin_test_fixtures")),
            &fixtures,
        )
        .expect("copy the fixture library");
        let c = place("c", &lib_file("window_clamp"));
        build_c_plugin(&c, &[]);
        let c_bad_abi = place("bad-abi", &lib_file("window_clamp"));
        build_c_plugin(&c_bad_abi, &[("WC_ABI_MAJOR", "99")]);
        Libs {
            rust,
            attacks,
            fixtures,
            c,
            c_bad_abi,
            _dir: dir,
        }
    })
}

pub(crate) fn dir_of(p: &Path) -> &str {
    p.parent().and_then(Path::to_str).expect("utf-8 temp path")
}

pub(crate) fn adverse(args: &[&str]) -> Output {
    Command::new(adverse_bin())
        .args(args)
        .env("ADVERSE_BACKEND", "cpu")
        .env_remove("ADVERSE_PLUGIN_PATH")
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run adverse")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub(crate) fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub(crate) fn rows(o: &Output) -> Vec<Value> {
    stdout(o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("row is not JSON ({e}): {l}")))
        .collect()
}

fn dcm(name: &str) -> String {
    pydicom_data().join(name).display().to_string()
}

pub(crate) fn py(code: &str, args: &[&str]) -> String {
    let o = Command::new(python())
        .arg("-c")
        .arg(code)
        .args(args)
        .output()
        .expect("run python");
    assert!(
        o.status.success(),
        "python failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn sha256_line(info: &str) -> String {
    info.lines()
        .find_map(|l| l.strip_prefix("sha256: "))
        .expect("info prints sha256")
        .trim()
        .to_string()
}

#[test]
fn rust_and_c_plugins_are_listed_loaded_and_run_on_real_frames() {
    let l = libs();
    let list = adverse(&[
        "plugins",
        "list",
        "--plugin-dir",
        dir_of(&l.rust),
        "--plugin-dir",
        dir_of(&l.attacks),
        "--plugin-dir",
        dir_of(&l.c),
    ]);
    assert!(list.status.success(), "{}", stderr(&list));
    let text = stdout(&list);
    // The same libraries through ADVERSE_PLUGIN_PATH (missing entries are skipped).
    let path = std::env::join_paths([
        Path::new(dir_of(&l.rust)),
        Path::new(dir_of(&l.attacks)),
        Path::new("/nonexistent-adverse"),
        Path::new(dir_of(&l.c)),
    ])
    .unwrap();
    let env_list = Command::new(adverse_bin())
        .args(["plugins", "list"])
        .env("ADVERSE_PLUGIN_PATH", &path)
        .output()
        .expect("run adverse");
    assert!(env_list.status.success(), "{}", stderr(&env_list));
    assert_eq!(
        stdout(&env_list),
        text,
        "env search path lists the same plugins"
    );
    for (name, kind) in [
        ("median", "purifier"),
        ("gaussian", "purifier"),
        ("fgsm", "attack"),
        ("window-clamp", "purifier"),
    ] {
        assert!(
            text.lines()
                .any(|line| line.starts_with(&format!("{name}\t{kind}\t"))),
            "{name} missing from:\n{text}"
        );
    }

    // The Rust median purifier on a 10-frame MR, in batches of 4 (3 process calls).
    let out = tempfile::tempdir().unwrap();
    let o = out.path().to_str().unwrap();
    let src = dcm("emri_small.dcm");
    let run = adverse(&[
        "plugins",
        "run",
        "median",
        "--params",
        r#"{"radius": 1}"#,
        "--batch-size",
        "4",
        "--out",
        o,
        "--plugin-dir",
        dir_of(&l.rust),
        &src,
    ]);
    assert!(run.status.success(), "{}", stderr(&run));
    let r = rows(&run);
    assert_eq!(r.len(), 10, "one row per frame");
    let written = out.path().join("emri_small.dcm");
    for (k, row) in r.iter().enumerate() {
        assert_eq!(row["status"], "ok");
        assert_eq!(row["frame"], k);
        assert_eq!(row["plugin"], "median");
        assert_eq!(row["output"], written.display().to_string());
        assert!(row["values"]["l2_change"].as_f64().unwrap() > 0.0, "{row}");
    }
    // Oracle: SciPy's 3x3 median (reflect border) of each input frame, read with pydicom, equals
    // the written frames; the audited norms equal the actual change.
    let check = py(
        "import sys, json, numpy as np, pydicom\nfrom scipy.ndimage import median_filter\n\
         a = pydicom.dcmread(sys.argv[1]).pixel_array.astype(np.float64)\nb = pydicom.dcmread(sys.argv[2]).pixel_array.astype(np.float64)\n\
         want = np.stack([median_filter(f, size=3, mode='reflect') for f in a])\n\
         d = (b - a).reshape(len(a), -1)\n\
         print(json.dumps({'equal': bool((want == b).all()), 'l2': np.sqrt((d * d).sum(1)).tolist(), 'linf': np.abs(d).max(1).tolist()}))",
        &[&src, written.to_str().unwrap()],
    );
    let c: Value = serde_json::from_str(check.trim()).unwrap();
    assert_eq!(
        c["equal"], true,
        "written frames differ from scipy's median"
    );
    for (k, row) in r.iter().enumerate() {
        let (l2, linf) = (c["l2"][k].as_f64().unwrap(), c["linf"][k].as_f64().unwrap());
        assert!(
            (row["values"]["l2_change"].as_f64().unwrap() - l2).abs() <= 1e-3 * l2.max(1.0),
            "frame {k}: {row} vs {l2}"
        );
        assert_eq!(
            row["values"]["linf_change"].as_f64().unwrap(),
            linf,
            "frame {k}"
        );
    }
    let results = std::fs::read_to_string(out.path().join("results.jsonl")).unwrap();
    assert_eq!(results.lines().count(), 10);
    let audit: Value = serde_json::from_str(
        std::fs::read_to_string(out.path().join("audit.jsonl"))
            .unwrap()
            .trim(),
    )
    .unwrap();
    assert_eq!(audit["plugin"], "median");
    assert_eq!(audit["params"]["radius"], 1);
    assert_eq!(audit["library_sha256"].as_str().unwrap().len(), 64);
    assert_eq!(audit["frames"].as_array().unwrap().len(), 10);

    // The C plugin on a CT with a 40/100 window (rescale intercept -1024).
    let out = tempfile::tempdir().unwrap();
    let o = out.path().to_str().unwrap();
    let src = dcm("693_UNCR.dcm");
    let run = adverse(&[
        "plugins",
        "run",
        "window-clamp",
        "--params",
        r#"{"margin": 0.5}"#,
        "--out",
        o,
        "--plugin-dir",
        dir_of(&l.c),
        &src,
    ]);
    assert!(run.status.success(), "{}", stderr(&run));
    let r = rows(&run);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0]["values"]["has_window"], true);
    let clamped = r[0]["values"]["clamped"].as_f64().unwrap();
    assert!(clamped > 0.0, "{}", r[0]);
    let check = py(
        "import sys, json, math, numpy as np, pydicom\n\
         s = pydicom.dcmread(sys.argv[1]); a = s.pixel_array.astype(np.float64); b = pydicom.dcmread(sys.argv[2]).pixel_array.astype(np.float64)\n\
         c, w = float(s.WindowCenter), float(s.WindowWidth); m, k = float(s.RescaleSlope), float(s.RescaleIntercept)\n\
         half = w / 2 + 0.5 * w; lo = math.ceil((c - half - k) / m); hi = math.floor((c + half - k) / m)\n\
         print(json.dumps({'equal': bool((np.clip(a, lo, hi) == b).all()), 'changed': int((a != b).sum())}))",
        &[&src, out.path().join("693_UNCR.dcm").to_str().unwrap()],
    );
    let c: Value = serde_json::from_str(check.trim()).unwrap();
    assert_eq!(c["equal"], true, "C plugin output is not the window clamp");
    assert_eq!(
        c["changed"].as_f64().unwrap(),
        clamped,
        "audited count equals the changed pixels"
    );
}

#[test]
fn a_library_of_another_abi_major_is_refused_with_both_versions() {
    let l = libs();
    let o = adverse(&[
        "plugins",
        "info",
        "window-clamp",
        "--plugin-dir",
        dir_of(&l.c_bad_abi),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stdout(&o));
    let e = stderr(&o);
    assert!(
        e.contains("plugin ABI mismatch")
            && e.contains("built for ABI 99.")
            && e.contains("this host speaks ABI 1.3"),
        "{e}"
    );
    let o = adverse(&[
        "plugins",
        "list",
        "--plugin-dir",
        dir_of(&l.c_bad_abi),
        "--plugin-dir",
        dir_of(&l.c),
    ]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "a refused library makes list exit 1"
    );
    assert!(
        stderr(&o).contains("refused") && stdout(&o).starts_with("window-clamp\tpurifier"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn a_panicking_or_failing_plugin_fails_only_its_files() {
    let l = libs();
    for (plugin, message) in [
        (
            "panicky",
            "plugin panicked: fixture panic on a frame of 64 rows",
        ),
        ("failing", "fixture error on a frame of 64 rows"),
    ] {
        let out = tempfile::tempdir().unwrap();
        let o = out.path().to_str().unwrap();
        let (ct, mr) = (dcm("693_UNCR.dcm"), dcm("emri_small.dcm"));
        let run = adverse(&[
            "plugins",
            "run",
            plugin,
            "--params",
            r#"{"rows": 64}"#,
            "--out",
            o,
            "--plugin-dir",
            dir_of(&l.fixtures),
            &mr,
            &ct,
        ]);
        assert_eq!(
            run.status.code(),
            Some(1),
            "{plugin}: some files failed: {}",
            stderr(&run)
        );
        let r = rows(&run);
        let ct_rows: Vec<&Value> = r.iter().filter(|x| x["file"] == ct.as_str()).collect();
        let mr_rows: Vec<&Value> = r.iter().filter(|x| x["file"] == mr.as_str()).collect();
        assert_eq!((ct_rows.len(), mr_rows.len()), (1, 10), "{plugin}");
        assert_eq!(
            ct_rows[0]["status"], "ok",
            "{plugin}: the other file went on"
        );
        assert!(out.path().join("693_UNCR.dcm").exists());
        for row in mr_rows {
            assert_eq!(row["status"], "failed");
            assert!(
                row["error"].as_str().unwrap().contains(message),
                "{plugin}: {row}"
            );
        }
        assert!(
            !out.path().join("emri_small.dcm").exists(),
            "{plugin}: no output for a failed file"
        );
        assert!(stderr(&run).contains(message));
    }
}

#[test]
fn bad_parameters_are_refused_before_any_file_is_processed() {
    let l = libs();
    let out = tempfile::tempdir().unwrap();
    let o = out.path().join("never");
    let src = dcm("emri_small.dcm");
    for (params, want) in [
        (
            r#"{"radius": 0}"#,
            "plugin `median`: parameter `radius` must be >= 1",
        ),
        (
            r#"{"radius": 1.5}"#,
            "plugin `median`: parameter `radius` must be of type integer",
        ),
        (
            r#"{"radius": 1, "sigma": 2}"#,
            "plugin `median`: parameter `sigma` is not a parameter of this plugin",
        ),
        (r#"{"radius": "#, "--params is not valid JSON"),
    ] {
        let run = adverse(&[
            "plugins",
            "run",
            "median",
            "--params",
            params,
            "--out",
            o.to_str().unwrap(),
            "--plugin-dir",
            dir_of(&l.rust),
            &src,
        ]);
        assert_eq!(run.status.code(), Some(2), "{params}: {}", stderr(&run));
        assert!(stderr(&run).contains(want), "{params}: {}", stderr(&run));
        assert!(
            stdout(&run).is_empty() && !o.exists(),
            "{params}: nothing may be processed"
        );
    }
    let run = adverse(&[
        "plugins",
        "run",
        "gaussian",
        "--out",
        o.to_str().unwrap(),
        "--plugin-dir",
        dir_of(&l.rust),
        &src,
    ]);
    assert!(
        stderr(&run).contains("plugin `gaussian`: parameter `sigma` is required"),
        "{}",
        stderr(&run)
    );
}

#[test]
fn a_pinned_hash_mismatch_is_refused() {
    let l = libs();
    let info = adverse(&["plugins", "info", "median", "--plugin-dir", dir_of(&l.rust)]);
    assert!(info.status.success(), "{}", stderr(&info));
    let text = stdout(&info);
    assert!(
        text.contains("kind: purifier") && text.contains("abi: 1.3") && text.contains("\"radius\""),
        "{text}"
    );
    let actual = sha256_line(&text);
    assert_eq!(actual.len(), 64);
    let wrong = "0".repeat(64);
    let out = tempfile::tempdir().unwrap();
    let src = dcm("emri_small.dcm");
    let o = out.path().to_str().unwrap();
    let pin = format!("median={wrong}");
    let run = adverse(&[
        "plugins",
        "run",
        "median",
        "--pin",
        &pin,
        "--out",
        o,
        "--plugin-dir",
        dir_of(&l.rust),
        &src,
    ]);
    assert_eq!(run.status.code(), Some(2));
    let e = stderr(&run);
    assert!(
        e.contains(&wrong) && e.contains(&actual) && e.contains("refusing"),
        "{e}"
    );
    assert!(!out.path().join("results.jsonl").exists());
    let pin = format!("median={actual}");
    let run = adverse(&[
        "plugins",
        "run",
        "median",
        "--pin",
        &pin,
        "--out",
        o,
        "--plugin-dir",
        dir_of(&l.rust),
        &src,
    ]);
    assert!(run.status.success(), "the right pin runs: {}", stderr(&run));
}

#[test]
fn scaffolded_plugins_build_pass_their_tests_and_load() {
    let dir = tempfile::tempdir().unwrap();
    // A target dir that persists between runs so the SDK and serde compile once.
    let target = profile_dir()
        .parent()
        .expect("target dir")
        .join("plugin-scaffold");
    for kind in ["attack", "purifier", "detector"] {
        let name = format!("demo-{kind}");
        let o = adverse(&[
            "plugin",
            "new",
            &name,
            "--kind",
            kind,
            "--dir",
            dir.path().to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let root = dir.path().join(&name);
        // The workspace's lock file pins the same dependency versions, offline.
        std::fs::copy(repo_root().join("Cargo.lock"), root.join("Cargo.lock")).unwrap();
        let t = Command::new(env!("CARGO"))
            .current_dir(&root)
            .args(["test", "--offline", "--quiet"])
            .env("CARGO_TARGET_DIR", &target)
            .output()
            .expect("cargo test");
        assert!(
            t.status.success(),
            "{name}: cargo test failed:\n{}\n{}",
            String::from_utf8_lossy(&t.stdout),
            String::from_utf8_lossy(&t.stderr)
        );
        assert!(
            String::from_utf8_lossy(&t.stdout).contains("1 passed"),
            "{name}: its test ran"
        );
    }
    // The detector's library loads in the host.
    let root = dir.path().join("demo-detector");
    let b = Command::new(env!("CARGO"))
        .current_dir(&root)
        .args(["build", "--offline", "--quiet"])
        .env("CARGO_TARGET_DIR", &target)
        .output()
        .expect("cargo build");
    assert!(b.status.success(), "{}", String::from_utf8_lossy(&b.stderr));
    let lib = target.join("debug").join(lib_file("demo_detector"));
    let info = adverse(&[
        "plugins",
        "info",
        "demo-detector",
        "--plugin-dir",
        lib.to_str().unwrap(),
    ]);
    assert!(info.status.success(), "{}", stderr(&info));
    assert!(
        stdout(&info).contains("kind: detector"),
        "{}",
        stdout(&info)
    );
    // Scaffolding refuses to overwrite and bad names.
    let again = adverse(&[
        "plugin",
        "new",
        "demo-detector",
        "--kind",
        "detector",
        "--dir",
        dir.path().to_str().unwrap(),
    ]);
    assert_eq!(again.status.code(), Some(2));
    let bad = adverse(&[
        "plugin",
        "new",
        "Bad Name",
        "--kind",
        "attack",
        "--dir",
        dir.path().to_str().unwrap(),
    ]);
    assert_eq!(bad.status.code(), Some(2));
}

#[test]
fn an_attack_plugin_uses_the_model_services() {
    let l = libs();
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("linear.onnx");
    // A linear classifier over a 64x64 frame, logits = W (0.001 * stored) + b.
    py(
        "import sys, numpy as np, onnx\nfrom onnx import helper, TensorProto, numpy_helper\n\
         r = np.random.default_rng(3); W = r.normal(0, 1, (3, 4096)).astype(np.float32); b = np.array([0.5, 0, -0.5], np.float32)\n\
         g = helper.make_graph([helper.make_node('Flatten', ['input'], ['f'], axis=1), helper.make_node('Gemm', ['f', 'W', 'b'], ['logits'], transB=1)], 'lin',\n\
             [helper.make_tensor_value_info('input', TensorProto.FLOAT, ['N', 1, 64, 64])], [helper.make_tensor_value_info('logits', TensorProto.FLOAT, ['N', 3])],\n\
             [numpy_helper.from_array(W, 'W'), numpy_helper.from_array(b, 'b')])\n\
         onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid('', 17)]), sys.argv[1])",
        &[model.to_str().unwrap()],
    );
    std::fs::write(dir.path().join("linear.card.yaml"), "name: linear\ninput: [1, 64, 64]\npreprocessing:\n  rescale: none\n  scale: 0.001\nclasses: [a, b, c]\n").unwrap();
    let out = dir.path().join("out");
    let src = dcm("emri_small.dcm");
    let run = adverse(&[
        "plugins",
        "run",
        "fgsm",
        "--params",
        r#"{"eps": 40}"#,
        "--model",
        model.to_str().unwrap(),
        "--label",
        "0",
        "--out",
        out.to_str().unwrap(),
        "--plugin-dir",
        dir_of(&l.attacks),
        &src,
    ]);
    assert!(run.status.success(), "{}", stderr(&run));
    let r = rows(&run);
    assert_eq!(r.len(), 10);
    // Oracle: onnxruntime on the original and the written frames.
    let check = py(
        "import sys, json, numpy as np, pydicom, onnxruntime as ort\n\
         s = ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])\n\
         a = pydicom.dcmread(sys.argv[2]).pixel_array.astype(np.float32); b = pydicom.dcmread(sys.argv[3]).pixel_array.astype(np.float32)\n\
         run = lambda x: s.run(None, {'input': (x * np.float32(0.001))[:, None]})[0].astype(np.float64)\n\
         z0, z1 = run(a), run(b)\n\
         ce = np.log(np.exp(z0 - z0.max(1, keepdims=True)).sum(1)) + z0.max(1) - z0[:, 0]\n\
         d = np.abs(b - a).reshape(len(a), -1)\n\
         print(json.dumps({'ce': ce.tolist(), 'adv': z1.argmax(1).tolist(), 'linf': d.max(1).tolist(), 'moved': (d > 0).mean(1).tolist()}))",
        &[
            model.to_str().unwrap(),
            &src,
            out.join("emri_small.dcm").to_str().unwrap(),
        ],
    );
    let c: Value = serde_json::from_str(check.trim()).unwrap();
    for (k, row) in r.iter().enumerate() {
        let v = &row["values"];
        let (ce, loss) = (
            c["ce"][k].as_f64().unwrap(),
            v["loss_before"].as_f64().unwrap(),
        );
        assert!(
            (ce - loss).abs() <= 1e-3 * ce.abs().max(1.0),
            "frame {k}: loss {loss} vs onnxruntime {ce}"
        );
        assert_eq!(
            v["pred_after"].as_f64().unwrap(),
            c["adv"][k].as_f64().unwrap(),
            "frame {k}: predicted class after the attack"
        );
        assert_eq!(
            v["success"],
            c["adv"][k].as_u64().unwrap() != 0,
            "frame {k}"
        );
        assert_eq!(
            v["linf"].as_f64().unwrap(),
            c["linf"][k].as_f64().unwrap(),
            "frame {k}"
        );
        assert!(
            c["linf"][k].as_f64().unwrap() <= 40.0 && c["moved"][k].as_f64().unwrap() > 0.5,
            "frame {k}: {c}"
        );
    }
}
