//! Feature-space detectors end to end: `adverse detector fit` on the PneumoniaMNIST npz train
//! split (clean), then `adverse run` pipelines over the 64 demo samples, clean and after PGD-10
//! (eps 8 stored units), scoring them with the fitted state; the ROC AUC of clean vs attacked
//! scores is measured. States fitted on another model, and broken state files, are refused.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use adverse_tests::{adverse_bin, plugin_dir, repo_root};
use serde_json::Value;

fn adverse(args: &[&str]) -> Output {
    Command::new(adverse_bin())
        .args(args)
        .env("ADVERSE_BACKEND", "cpu")
        .output()
        .expect("run adverse")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn model(name: &str) -> PathBuf {
    repo_root().join(format!("pipelines/models/{name}.onnx"))
}

fn fit(plugins: &Path, detector: &str, model_name: &str, limit: usize, out: &Path) -> Output {
    adverse(&[
        "detector",
        "fit",
        "--detector",
        detector,
        "--model",
        model(model_name).to_str().unwrap(),
        "--npz",
        repo_root()
            .join("tests/data/pneumoniamnist/pneumoniamnist.npz")
            .to_str()
            .unwrap(),
        "--split",
        "train",
        "--limit",
        &limit.to_string(),
        "--out",
        out.to_str().unwrap(),
        "--plugin-dir",
        plugins.to_str().unwrap(),
    ])
}

/// Runs a pipeline over the demo samples: optionally PGD (eps 8), then `detector` in detect
/// mode with `state` (`adaptive`: the detector is adaptive with this score weight, so PGD also
/// descends its score); the run's output and the per-frame detector scores.
fn run(
    tmp: &Path,
    plugins: &Path,
    tag: &str,
    attack: bool,
    detector: &str,
    state: &Path,
    adaptive: Option<f32>,
) -> (Output, Vec<f64>) {
    let samples = repo_root().join("pipelines/samples/pneumoniamnist");
    let out = tmp.join(format!("out-{tag}"));
    let p = tmp.join(format!("{tag}.yaml"));
    let attack_stage = if attack {
        "  - attack: pgd\n    params: { eps: 8, unit: stored, steps: 10, norm: linf }\n"
    } else {
        ""
    };
    let adaptive = adaptive
        .map(|w| format!("    adaptive: true\n    score_weight: {w}\n"))
        .unwrap_or_default();
    std::fs::write(
        &p,
        format!(
            "name: e2e-{tag}\ninput: {{ path: {}, include: [\"*.dcm\"] }}\nmodel: {{ onnx: {} }}\nlabels: {{ csv: {} }}\nstages:\n{attack_stage}  - detector: {detector}\n    params: {{ mode: detect, state: {} }}\n{adaptive}output: {{ dir: {} }}\nplugins: {{ dirs: [{}] }}\nrun: {{ seed: 7 }}\n",
            samples.display(),
            model("pneumonia-cnn").display(),
            samples.join("labels.csv").display(),
            state.display(),
            out.display(),
            plugins.display(),
        ),
    )
    .unwrap();
    let o = adverse(&["run", p.to_str().unwrap(), "-q"]);
    let scores = std::fs::read_to_string(out.join("results.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|r| find_number(&r["stages"][detector], "score"))
        .collect();
    (o, scores)
}

/// The first number under `key` anywhere in `v`.
fn find_number(v: &Value, key: &str) -> Option<f64> {
    match v {
        Value::Object(m) => m
            .get(key)
            .and_then(Value::as_f64)
            .or_else(|| m.values().find_map(|x| find_number(x, key))),
        Value::Array(a) => a.iter().find_map(|x| find_number(x, key)),
        _ => None,
    }
}

/// P(attacked score > clean score), ties half.
fn auc(neg: &[f64], pos: &[f64]) -> f64 {
    let mut s = 0.0;
    for p in pos {
        for n in neg {
            s += if p > n {
                1.0
            } else if p == n {
                0.5
            } else {
                0.0
            };
        }
    }
    s / (pos.len() * neg.len()) as f64
}

#[test]
fn mahalanobis_fitted_on_clean_train_frames_detects_pgd_outputs() {
    let plugins = plugin_dir(
        &["adverse-plugins-detectors", "adverse-plugins-attacks"],
        &["adverse_plugins_detectors", "adverse_plugins_attacks"],
    );
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("states/mahalanobis.json");
    let o = fit(plugins.path(), "mahalanobis", "pneumonia-cnn", 1000, &state);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        text(&o).contains("fitted mahalanobis on 1000 frames"),
        "{}",
        text(&o)
    );
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    assert_eq!(v["feature_dim"], 64);
    assert_eq!(v["classes"], 2);
    assert_eq!(v["fpr"], 0.05);

    let (o, clean) = run(
        tmp.path(),
        plugins.path(),
        "clean",
        false,
        "mahalanobis",
        &state,
        None,
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let (o, adv) = run(
        tmp.path(),
        plugins.path(),
        "pgd",
        true,
        "mahalanobis",
        &state,
        None,
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!((clean.len(), adv.len()), (64, 64), "one score per frame");
    let a = auc(&clean, &adv);
    eprintln!("mahalanobis: clean vs PGD-10 eps 8 on the 64 demo samples: ROC AUC {a:.4}");
    assert!(a > 0.8, "AUC {a}");
    // The adaptive attack (the detector's score gradient, ABI 1.3, through the model's
    // features) brings the detector close to chance (measured: AUC 0.99 naive, 0.55 adaptive).
    let (o, adaptive) = run(
        tmp.path(),
        plugins.path(),
        "pgd-adaptive",
        true,
        "mahalanobis",
        &state,
        Some(0.1),
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(adaptive.len(), 64);
    let aa = auc(&clean, &adaptive);
    eprintln!("mahalanobis: clean vs adaptive PGD-10 eps 8: ROC AUC {aa:.4}");
    assert!(aa < 0.7 && aa < a - 0.3, "adaptive AUC {aa} vs naive {a}");
    let fooled = std::fs::read_to_string(tmp.path().join("out-pgd-adaptive/results.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|r| r["attack_success"] == true)
        .count();
    assert!(
        fooled >= 48,
        "the adaptive attack still fools the model: {fooled} of 64"
    );

    // A state fitted on another model is refused, naming the file.
    let other = tmp.path().join("states/other.json");
    let o = fit(
        plugins.path(),
        "mahalanobis",
        "pneumonia-cnn-pgd",
        200,
        &other,
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let (o, scores) = run(
        tmp.path(),
        plugins.path(),
        "other",
        false,
        "mahalanobis",
        &other,
        None,
    );
    assert_ne!(o.status.code(), Some(0));
    assert!(scores.is_empty());
    let out = std::fs::read_to_string(tmp.path().join("out-other/results.jsonl"))
        .unwrap_or_default()
        + &text(&o);
    assert!(
        out.contains("fitted on another model") && out.contains("other.json"),
        "{out}"
    );

    // A broken state file is refused before any file is processed.
    let bad = tmp.path().join("states/bad.json");
    std::fs::write(
        &bad,
        "{\"format\": \"adverse-detector-state\", \"version\": 1",
    )
    .unwrap();
    let (o, _) = run(
        tmp.path(),
        plugins.path(),
        "bad",
        false,
        "mahalanobis",
        &bad,
        None,
    );
    assert_ne!(o.status.code(), Some(0));
    let out = std::fs::read_to_string(tmp.path().join("out-bad/results.jsonl")).unwrap_or_default()
        + &text(&o);
    assert!(
        out.contains("bad.json") && out.contains("not JSON"),
        "{out}"
    );
}

#[test]
fn detector_fit_reports_a_missing_model_card_and_a_non_detector() {
    let plugins = plugin_dir(
        &["adverse-plugins-detectors", "adverse-plugins-attacks"],
        &["adverse_plugins_detectors", "adverse_plugins_attacks"],
    );
    let tmp = tempfile::tempdir().unwrap();
    let o = adverse(&[
        "detector",
        "fit",
        "--detector",
        "pgd",
        "--model",
        model("pneumonia-cnn").to_str().unwrap(),
        "--npz",
        "x.npz",
        "--out",
        tmp.path().join("s.json").to_str().unwrap(),
        "--plugin-dir",
        plugins.path().to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("not a detector"), "{}", text(&o));
}
