//! Measures the feature-space detectors (mahalanobis, lid, kde-bu) on the demo model against a
//! non-adaptive PGD-L∞ attacker (10 steps, α = ε/4, ε = 4 and 8 stored units):
//! - fit on the PneumoniaMNIST train split (clean; 20% held out sets the threshold at 5% FPR),
//! - kde-bu's logistic regression (`fit-lr`) on PGD (ε = 8) outputs of the val split,
//! - detect on the 468 test images, clean and attacked: ROC AUC (all attacked frames, and the
//!   frames PGD fooled), TPR at the state's threshold with the clean test FPR it gives, and TPR
//!   at 5% FPR set on the clean test scores.
//!
//! `cargo run --release -p adverse-plugins-detectors --example feature_eval -- [--train N]
//! [--test N] [--model NAME]`

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Instant;

use adverse::plugin::runner::MemoryRunner;
use adverse::runtime::cpu::CpuBackend;
use adverse_plugins_detectors::adverse_plugin_library as detectors;
use adverse_plugins_detectors::stats::{rate_above, roc_auc, threshold_at_fpr};
use serde_json::{Value, json};
use support::*;

fn arg_value(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn with(mut base: Value, extra: &Value) -> Value {
    for (k, v) in extra.as_object().expect("object") {
        base[k] = v.clone();
    }
    base
}

/// Runs `name` over `frames` with `params` (fit modes write the state when the instance drops).
fn run(
    runner: &mut MemoryRunner<'_, CpuBackend>,
    backend: &CpuBackend,
    name: &str,
    params: &Value,
    frames: &Frames,
) -> Vec<Audit> {
    let mut inst = instance("detectors", detectors(), name, params, backend);
    let (_, a) = run_batched(runner, backend, &mut inst, frames, 64, 3);
    drop(inst);
    a
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let n_train: usize =
        arg_value(&args, "--train").map_or(usize::MAX, |v| v.parse().expect("--train"));
    let n_test: usize =
        arg_value(&args, "--test").map_or(usize::MAX, |v| v.parse().expect("--test"));
    let model_name = arg_value(&args, "--model").unwrap_or_else(|| "pneumonia-cnn".into());
    let backend = CpuBackend::new(None);
    let model = load_model(&model_name);
    let mut runner = MemoryRunner::new(Some(&model));
    let train = load_npz_split("train", 0, n_train);
    let val = load_npz_split("val", 0, usize::MAX);
    let test = load_npz_split("test", 0, n_test);
    println!(
        "model {model_name}: fit on {} train frames, fit-lr on {} val frames (PGD eps 8), test {} frames; backend cpu",
        train.len(),
        val.len(),
        test.len()
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let detectors_list: Vec<(&str, Value)> = vec![
        ("mahalanobis", json!({})),
        ("lid", json!({"k": 20, "reference": 1000})),
        ("kde-bu", json!({"passes": 50, "dropout": 0.5})),
    ];
    for (name, extra) in &detectors_list {
        let t = Instant::now();
        let state = dir.path().join(format!("{name}.json"));
        let p = with(
            json!({"mode": "fit", "state": state.display().to_string(), "fpr": 0.05}),
            extra,
        );
        run(&mut runner, &backend, name, &p, &train);
        let v: Value =
            serde_json::from_str(&std::fs::read_to_string(&state).expect("state written"))
                .expect("state JSON");
        println!(
            "fit {name}: {:.1} s, {} fit + {} held-out frames, threshold {:.4} (held-out FPR {:.3}), state {} KiB{}",
            t.elapsed().as_secs_f64(),
            v["fit_frames"],
            v["held_out_frames"],
            v["threshold"].as_f64().unwrap_or(f64::NAN),
            v["held_out_fpr"].as_f64().unwrap_or(f64::NAN),
            std::fs::metadata(&state)
                .map(|m| m.len() / 1024)
                .unwrap_or(0),
            match (v.get("shrinkage"), v.get("bandwidth")) {
                (Some(s), _) => format!(", shrinkage {s:.4}"),
                (_, Some(b)) => format!(", bandwidth {b:.4}"),
                _ => String::new(),
            }
        );
    }

    let (_adir, attack_lib) = attack_library();
    let pgd = |runner: &mut MemoryRunner<'_, CpuBackend>, frames: &Frames, eps: f64| {
        let mut inst = instance_from(
            &attack_lib,
            "pgd",
            &json!({"eps": eps, "steps": 10}),
            &backend,
        );
        let (adv, audits) = run_batched(runner, &backend, &mut inst, frames, 64, 7);
        let fooled: Vec<bool> = audits.iter().map(|a| flag(a, "success")).collect();
        (frames.with_data(adv), fooled)
    };
    // kde-bu + LR: a copy of the state, its LR fitted on PGD outputs of the val split.
    let t = Instant::now();
    let kde = dir.path().join("kde-bu.json");
    let kde_lr = dir.path().join("kde-bu-lr.json");
    std::fs::copy(&kde, &kde_lr).expect("copy the kde state");
    let (val_adv, _) = pgd(&mut runner, &val, 8.0);
    run(
        &mut runner,
        &backend,
        "kde-bu",
        &json!({"mode": "fit-lr", "state": kde_lr.display().to_string()}),
        &val_adv,
    );
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(&kde_lr).expect("read")).expect("state JSON");
    println!(
        "fit-lr kde-bu on val PGD eps 8: {:.1} s, LR {}",
        t.elapsed().as_secs_f64(),
        v["lr"]
    );

    let mut rows: Vec<(String, &str, Value)> = detectors_list
        .iter()
        .map(|(n, e)| (n.to_string(), *n, e.clone()))
        .collect();
    rows.push(("kde-bu+lr".into(), "kde-bu", json!({})));
    let state_of = |label: &str| {
        if label == "kde-bu+lr" {
            kde_lr.clone()
        } else {
            dir.path().join(format!("{label}.json"))
        }
    };
    let detect =
        |runner: &mut MemoryRunner<'_, CpuBackend>, label: &str, name: &str, frames: &Frames| {
            let p = json!({"mode": "detect", "state": state_of(label).display().to_string()});
            let a = run(runner, &backend, name, &p, frames);
            let s: Vec<f64> = a.iter().map(|r| num(r, "score")).collect();
            let f: Vec<bool> = a.iter().map(|r| flag(r, "flag")).collect();
            (s, f)
        };
    let clean: Vec<(Vec<f64>, Vec<bool>)> = rows
        .iter()
        .map(|(label, name, _)| detect(&mut runner, label, name, &test))
        .collect();
    for eps in [4.0, 8.0] {
        let t = Instant::now();
        let (adv, fooled) = pgd(&mut runner, &test, eps);
        println!(
            "\nPGD-10 eps {eps} stored units (alpha eps/4, non-adaptive): fooled {} of {} ({:.1} s)",
            fooled.iter().filter(|&&f| f).count(),
            test.len(),
            t.elapsed().as_secs_f64()
        );
        println!(
            "{:<12} {:>8} {:>11} {:>14} {:>13} {:>14}",
            "detector", "AUC all", "AUC fooled", "TPR@state thr", "clean FPR", "TPR@5% (test)"
        );
        for ((label, name, _), (cs, cf)) in rows.iter().zip(&clean) {
            let (s, f) = detect(&mut runner, label, name, &adv);
            let sf: Vec<f64> = s
                .iter()
                .zip(&fooled)
                .filter(|(_, f)| **f)
                .map(|(s, _)| *s)
                .collect();
            let thr = threshold_at_fpr(cs, 0.05).unwrap_or(f64::NAN);
            println!(
                "{:<12} {:>8.4} {:>11.4} {:>14.3} {:>13.3} {:>14.3}",
                label,
                roc_auc(cs, &s).unwrap_or(f64::NAN),
                roc_auc(cs, &sf).unwrap_or(f64::NAN),
                f.iter().filter(|&&x| x).count() as f64 / f.len() as f64,
                cf.iter().filter(|&&x| x).count() as f64 / cf.len() as f64,
                rate_above(&s, thr),
            );
        }
    }
}
