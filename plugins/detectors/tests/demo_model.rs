//! The detectors on the real demo model (pipelines/models/pneumonia-cnn.onnx with its card),
//! run in-process through the adverse host's services table and model service on the CPU
//! backend, with PGD from the attack catalogue crafting the adversarial frames.

mod support;

use adverse::plugin::runner::MemoryRunner;
use adverse::runtime::cpu::CpuBackend;
use adverse_plugins_detectors::adverse_plugin_library as detectors;
use adverse_plugins_detectors::stats::roc_auc;
use serde_json::json;
use support::*;

#[test]
fn squeezing_scores_pgd_frames_above_clean_ones() {
    let backend = CpuBackend::new(Some(2));
    let model = load_model("pneumonia-cnn");
    let mut runner = MemoryRunner::new(Some(&model));
    let clean = load_samples(32);
    let (_dir, attack_lib) = attack_library();
    let mut pgd = instance_from(
        &attack_lib,
        "pgd",
        &json!({"eps": 8, "steps": 10}),
        &backend,
    );
    let (adv, audits) = run_batched(&mut runner, &backend, &mut pgd, &clean, 32, 1);
    let fooled = audits.iter().filter(|a| flag(a, "success")).count();
    assert!(fooled >= 24, "PGD eps 8 fooled only {fooled} of 32");
    let adv = clean.with_data(adv);

    let mut fs = instance(
        "detectors",
        detectors(),
        "feature-squeezing",
        &json!({}),
        &backend,
    );
    let (out, s_clean) = run_batched(&mut runner, &backend, &mut fs, &clean, 32, 2);
    assert_eq!(out, clean.data, "a detector leaves the frames as they were");
    let (_, s_adv) = run_batched(&mut runner, &backend, &mut fs, &adv, 32, 2);
    let sc: Vec<f64> = s_clean.iter().map(|a| num(a, "score")).collect();
    let sa: Vec<f64> = s_adv.iter().map(|a| num(a, "score")).collect();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    assert!(
        mean(&sa) > mean(&sc),
        "adversarial mean score {} <= clean {}",
        mean(&sa),
        mean(&sc)
    );
    assert!(roc_auc(&sc, &sa).unwrap() > 0.5);
}

#[test]
fn squeezing_scores_zero_for_a_frame_it_leaves_unchanged() {
    let backend = CpuBackend::new(Some(2));
    let model = load_model("pneumonia-cnn");
    let mut runner = MemoryRunner::new(Some(&model));
    // A flat frame: no 8-bit level or median changes it.
    let flat = load_samples(1).with_data(vec![93.0; 28 * 28]);
    let mut fs = instance(
        "detectors",
        detectors(),
        "feature-squeezing",
        &json!({"bit_depth": 8, "median": [2, 3], "threshold": 0}),
        &backend,
    );
    let (_, a) = run_batched(&mut runner, &backend, &mut fs, &flat, 1, 1);
    assert_eq!(num(&a[0], "score"), 0.0);
    assert!(!flag(&a[0], "flag"));
    // A real sample does move under 4-bit squeezing.
    let mut fs4 = instance(
        "detectors",
        detectors(),
        "feature-squeezing",
        &json!({"bit_depth": 4, "median": []}),
        &backend,
    );
    let (_, a) = run_batched(&mut runner, &backend, &mut fs4, &load_samples(1), 1, 1);
    assert!(num(&a[0], "score") > 0.0);
}

#[test]
fn smoothing_converts_sigma_with_the_card_scale_and_is_reproducible() {
    let backend = CpuBackend::new(Some(2));
    let model = load_model("pneumonia-cnn");
    let mut runner = MemoryRunner::new(Some(&model));
    let frames = load_samples(4);
    let params = json!({"sigma": 0.25, "n0": 16, "n": 64, "batch": 64});
    let mut sm = instance("detectors", detectors(), "smoothing", &params, &backend);
    let (_, a) = run_batched(&mut runner, &backend, &mut sm, &frames, 4, 9);
    let (_, b) = run_batched(&mut runner, &backend, &mut sm, &frames, 4, 9);
    assert_eq!(a, b, "same seed, same certificates");
    for r in &a {
        // The card scales stored values by 1/255: sigma 0.25 is 63.75 stored units.
        // (The scale reaches the host as f32: 1e-6 relative.)
        assert!((num(r, "sigma_stored") / 63.75 - 1.0).abs() < 1e-6, "{r:?}");
        let (rs, ri) = (num(r, "radius_stored"), num(r, "radius_input"));
        assert!((ri - rs / 255.0).abs() <= 1e-6 * ri.max(1e-3));
        assert!(num(r, "count") <= 64.0);
        if !flag(r, "abstain") {
            assert!(ri > 0.0);
            assert!(num(r, "p_lower") > 0.5);
        }
    }
    assert!(
        a.iter().any(|r| !flag(r, "abstain")),
        "the demo model certifies some sample at sigma 0.25: {a:?}"
    );
}
