//! `adverse validate` end to end: pipelines written here (so their line numbers are known)
//! against the real built plugin library of `plugins/basic`, the bundled model and samples.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use adverse_tests::{adverse_bin, repo_root};
use serde_json::Value;

/// A folder holding only the built-in plugin libraries (basic: median, gaussian; attacks: fgsm,
/// pgd, ...), built once per test process with the profile of this test binary.
fn basic_plugin_dir() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        adverse_tests::plugin_dir(
            &["adverse-plugins-basic", "adverse-plugins-attacks"],
            &["adverse_plugins_basic", "adverse_plugins_attacks"],
        )
    })
    .path()
}

fn validate(args: &[&str]) -> Output {
    Command::new(adverse_bin())
        .arg("validate")
        .args(args)
        .env_remove("ADVERSE_PLUGIN_PATH")
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run adverse validate")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn samples() -> PathBuf {
    repo_root().join("pipelines/samples/pneumoniamnist")
}

/// Writes `text` as `<tmp>/p.yaml`.
fn pipeline(tmp: &tempfile::TempDir, text: &str) -> PathBuf {
    let p = tmp.path().join("p.yaml");
    std::fs::write(&p, text).expect("write pipeline");
    p
}

#[test]
fn three_distinct_mistakes_are_all_reported_with_their_lines() {
    let tmp = tempfile::tempdir().unwrap();
    let text = format!(
        "name: three-mistakes\n\
         input: {{ path: {samples} }}\n\
         model:\n  \
           onnx: models/missing.onnx\n\
         stages:\n  \
           - purifier: median\n    \
             params:\n      \
               radius: 12\n  \
           - purifier: sharpen\n\
         output: {{ dir: out }}\n\
         plugins: {{ dirs: [{plugins}] }}\n",
        samples = samples().display(),
        plugins = basic_plugin_dir().display(),
    );
    let file = pipeline(&tmp, &text);
    let f = file.display().to_string();
    let o = validate(&[&f]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(o.stdout.is_empty(), "text output goes to stderr");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 4, "three problems and the count:\n{err}");
    assert!(
        lines[0].starts_with(&format!("{f}:4:3: model.onnx: model file ")),
        "{err}"
    );
    assert!(lines[0].contains("missing.onnx does not exist"), "{err}");
    assert_eq!(
        lines[1],
        format!(
            "{f}:8:7: stages[0].params.radius: median: parameter `radius` must be <= 8, got 12"
        )
    );
    assert!(
        lines[2].starts_with(&format!(
            "{f}:9:5: stages[1].purifier: no plugin named `sharpen`"
        )),
        "{err}"
    );
    assert!(
        ["fgsm, ", "gaussian, ", "median, ", "pgd, "]
            .iter()
            .all(|n| lines[2].contains(n)),
        "{err}"
    );
    assert_eq!(lines[3], "3 problems");

    // The same report as one JSON object on stdout.
    let o = validate(&[&f, "--json"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).expect("one JSON object");
    assert_eq!(v["ok"], false);
    assert_eq!(v["name"], "three-mistakes");
    assert_eq!(v["stages"], 2);
    let got: Vec<(u64, &str)> = v["problems"]
        .as_array()
        .expect("problems")
        .iter()
        .map(|p| (p["line"].as_u64().unwrap(), p["key"].as_str().unwrap()))
        .collect();
    assert_eq!(
        got,
        [
            (4, "model.onnx"),
            (8, "stages[0].params.radius"),
            (9, "stages[1].purifier")
        ]
    );
    let choices = v["problems"][2]["choices"].as_array().expect("choices");
    for n in ["fgsm", "gaussian", "median", "pgd"] {
        assert!(choices.contains(&serde_json::json!(n)), "{choices:?}");
    }
}

#[test]
fn a_good_pipeline_validates() {
    let tmp = tempfile::tempdir().unwrap();
    let text = format!(
        "name: good\n\
         input: {{ path: {samples}, include: [\"*.dcm\"] }}\n\
         model: {{ onnx: {model} }}\n\
         labels: {{ csv: {samples}/labels.csv }}\n\
         stages:\n  \
           - attack: fgsm\n    \
             params: {{ eps: 4 }}\n  \
           - purifier: median\n    \
             params: {{ radius: 2 }}\n\
         output: {{ dir: out/good, previews: true }}\n\
         plugins: {{ dirs: [{plugins}] }}\n\
         run: {{ backend: cpu, batch_size: 8 }}\n",
        samples = samples().display(),
        model = repo_root()
            .join("pipelines/models/pneumonia-cnn.onnx")
            .display(),
        plugins = basic_plugin_dir().display(),
    );
    let file = pipeline(&tmp, &text);
    let f = file.display().to_string();
    let o = validate(&[&f]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stderr(&o).trim_end(), format!("{f}: OK (good, 2 stages)"));
    let o = validate(&[&f, "--json"]);
    assert_eq!(o.status.code(), Some(0));
    let v: Value = serde_json::from_slice(&o.stdout).expect("one JSON object");
    assert_eq!(v["ok"], true);
    assert_eq!(v["problems"], serde_json::json!([]));
    assert_eq!(v["stages"], 2);
}

#[test]
fn plugins_found_through_the_environment_wrong_kind_and_pin_mismatch() {
    let tmp = tempfile::tempdir().unwrap();
    let zeros = "0".repeat(64);
    let text = format!(
        "name: roles\n\
         input: {{ path: {samples} }}\n\
         stages:\n  \
           - purifier: fgsm\n    \
             params: {{ eps: 1 }}\n  \
           - purifier: gaussian\n    \
             params: {{ sigma: 1 }}\n\
         output: {{ dir: out }}\n\
         plugins:\n  \
           pins:\n    \
             gaussian: \"sha256:{zeros}\"\n",
        samples = samples().display(),
    );
    let file = pipeline(&tmp, &text);
    let f = file.display().to_string();
    let o = Command::new(adverse_bin())
        .args(["validate", &f])
        .env("ADVERSE_PLUGIN_PATH", basic_plugin_dir())
        .output()
        .expect("run adverse validate");
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 3, "{err}");
    assert_eq!(
        lines[0],
        format!(
            "{f}:4:5: stages[0].purifier: `fgsm` is an attack plugin, not a purifier: write `attack: fgsm` (valid: median, gaussian)"
        )
    );
    assert!(
        lines[1].starts_with(&format!("{f}:11:5: plugins.pins.gaussian: the library ")),
        "{err}"
    );
    assert!(
        lines[1].contains(&format!("not the pinned {zeros}")),
        "{err}"
    );
    assert_eq!(lines[2], "2 problems");
}

#[test]
fn yaml_syntax_errors_and_missing_files_exit_2() {
    let tmp = tempfile::tempdir().unwrap();
    let file = pipeline(&tmp, "name: x\ninput: { path: in\noutput: { dir: out }\n");
    let f = file.display().to_string();
    let o = validate(&[&f]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    let first = err.lines().next().unwrap_or_default();
    assert!(first.starts_with(&format!("{f}:3:")), "{err}");
    assert!(first.contains("not valid YAML"), "{err}");

    let gone = tmp.path().join("absent.yaml");
    let o = validate(&[gone.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("cannot read the pipeline file"));
}
