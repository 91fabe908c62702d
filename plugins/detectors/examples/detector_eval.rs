//! Measures the detectors on the demo model (non-adaptive attacker):
//! - feature squeezing against PGD-L∞ (ε = 4 and 8 stored units, 10 steps, α = ε/4): ROC AUC
//!   and TPR at 5% FPR, over all attacked frames and over the frames PGD fooled, per squeezer
//!   and for the default combination;
//! - randomized smoothing (σ = 0.25 in model-input units): certified accuracy at L2 radii
//!   0 / 0.25 / 0.5 / 1.0 (model-input units).
//!
//! `cargo run -p adverse-plugins-detectors --example detector_eval -- [--all] [--n N] [--n0 N]
//! [--model NAME] [--no-smoothing]`; `--all` uses the 468 PneumoniaMNIST test images instead of
//! the 64 demo samples (which are test images 0..64).

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

/// Feature-squeezing scores of `f` with parameters `p`.
fn scores(
    runner: &mut MemoryRunner<'_, CpuBackend>,
    backend: &CpuBackend,
    f: &Frames,
    p: &Value,
) -> Vec<f64> {
    let mut inst = instance("detectors", detectors(), "feature-squeezing", p, backend);
    let (_, a) = run_batched(runner, backend, &mut inst, f, 64, 1);
    a.iter().map(|r| num(r, "score")).collect()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let all = args.iter().any(|a| a == "--all");
    let n: u64 = arg_value(&args, "--n").map_or(1000, |v| v.parse().expect("--n"));
    let n0: u64 = arg_value(&args, "--n0").map_or(100, |v| v.parse().expect("--n0"));
    let model_name = arg_value(&args, "--model").unwrap_or_else(|| "pneumonia-cnn".into());
    let smoothing = !args.iter().any(|a| a == "--no-smoothing");

    let backend = CpuBackend::new(None);
    let model = load_model(&model_name);
    let mut runner = MemoryRunner::new(Some(&model));
    let clean = if all {
        load_npz_test(0, usize::MAX)
    } else {
        load_samples(64)
    };
    let labels = clean.labels();
    println!(
        "model {model_name}, {} frames ({}), backend cpu",
        clean.len(),
        if all {
            "PneumoniaMNIST test split"
        } else {
            "demo samples"
        }
    );

    let configs: Vec<(&str, Value)> = vec![
        ("bits1", json!({"bit_depth": 1, "median": []})),
        ("bits3", json!({"bit_depth": 3, "median": []})),
        ("bits4", json!({"bit_depth": 4, "median": []})),
        ("bits5", json!({"bit_depth": 5, "median": []})),
        ("bits6", json!({"bit_depth": 6, "median": []})),
        ("median2", json!({"bit_depth": null, "median": [2]})),
        ("median3", json!({"bit_depth": null, "median": [3]})),
        ("bits5+median2", json!({"bit_depth": 5, "median": [2]})),
        ("default (bits5+median2+median3)", json!({})),
    ];
    let t = Instant::now();
    let clean_scores: Vec<Vec<f64>> = configs
        .iter()
        .map(|(_, p)| scores(&mut runner, &backend, &clean, p))
        .collect();
    println!("clean squeezing scores: {:.1} s", t.elapsed().as_secs_f64());

    let (_dir, attack_lib) = attack_library();
    for eps in [4.0, 8.0] {
        let t = Instant::now();
        let mut pgd = instance_from(
            &attack_lib,
            "pgd",
            &json!({"eps": eps, "steps": 10}),
            &backend,
        );
        let (adv, audits) = run_batched(&mut runner, &backend, &mut pgd, &clean, 64, 7);
        let fooled: Vec<bool> = audits.iter().map(|a| flag(a, "success")).collect();
        let correct0 = audits
            .iter()
            .zip(&labels)
            .filter(|(a, l)| num(a, "pred_before") as u32 == **l)
            .count();
        let correct1 = audits
            .iter()
            .zip(&labels)
            .filter(|(a, l)| num(a, "pred_after") as u32 == **l)
            .count();
        let adv = clean.with_data(adv);
        println!(
            "\nPGD-10 eps {eps} stored units (alpha eps/4): clean accuracy {:.3}, adversarial accuracy {:.3}, fooled {} of {} ({:.1} s)",
            correct0 as f64 / clean.len() as f64,
            correct1 as f64 / clean.len() as f64,
            fooled.iter().filter(|&&f| f).count(),
            clean.len(),
            t.elapsed().as_secs_f64()
        );
        println!(
            "{:<34} {:>8} {:>12} {:>12} {:>14} {:>11}",
            "squeezer", "AUC all", "AUC fooled", "TPR@5%FPR", "TPR@5% fooled", "thr@5%FPR"
        );
        for ((name, p), sc) in configs.iter().zip(&clean_scores) {
            let sa = scores(&mut runner, &backend, &adv, p);
            let sf: Vec<f64> = sa
                .iter()
                .zip(&fooled)
                .filter(|(_, f)| **f)
                .map(|(s, _)| *s)
                .collect();
            let thr = threshold_at_fpr(sc, 0.05).unwrap_or(f64::NAN);
            println!(
                "{:<34} {:>8.4} {:>12.4} {:>12.3} {:>14.3} {:>11.5}",
                name,
                roc_auc(sc, &sa).unwrap_or(f64::NAN),
                roc_auc(sc, &sf).unwrap_or(f64::NAN),
                rate_above(&sa, thr),
                rate_above(&sf, thr),
                thr
            );
        }
    }

    if smoothing {
        let t = Instant::now();
        let mut sm = instance(
            "detectors",
            detectors(),
            "smoothing",
            &json!({"sigma": 0.25, "n0": n0, "n": n, "alpha": 0.001, "batch": 1024}),
            &backend,
        );
        let (_, a) = run_batched(&mut runner, &backend, &mut sm, &clean, 64, 11);
        println!(
            "\nrandomized smoothing, sigma 0.25 (model input; {:.2} stored units), n0 {n0}, n {n}, alpha 0.001 ({:.1} s)",
            num(&a[0], "sigma_stored"),
            t.elapsed().as_secs_f64()
        );
        let abstain = a.iter().filter(|r| flag(r, "abstain")).count();
        println!("abstained on {abstain} of {}", a.len());
        for r in [0.0, 0.25, 0.5, 1.0] {
            let ok = a
                .iter()
                .filter(|x| flag(x, "correct") && num(x, "radius_input") >= r)
                .count();
            println!(
                "certified accuracy at L2 radius {r:.2} (model input; {:.1} stored units): {:.3}",
                r * num(&a[0], "sigma_stored") / 0.25,
                ok as f64 / a.len() as f64
            );
        }
    }
}
