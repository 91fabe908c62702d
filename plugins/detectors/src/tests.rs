//! In-process tests through the SDK's test host (linear models with known answers) and against
//! scipy (the Python oracle) for the statistics and the 2x2 median convention. The tests on the
//! real demo model are in `tests/demo_model.rs`.

use std::path::PathBuf;
use std::process::Command;

use adverse_plugin_sdk::FrameMeta;
use adverse_plugin_sdk::testing::{self, Failure, Outcome, TestHost, TestModel};
use serde_json::{Value, json};

use super::adverse_plugin_library;
use crate::squeeze::{median2x2, reduce_bits, softmax_rows, squeeze_range};
use crate::stats::{clopper_pearson_lower, normal_quantile};

/// The oracle interpreter: `ADVERSE_PYTHON`, else `<repo>/.venv/bin/python`; a missing oracle
/// fails the test (never skips).
fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("ADVERSE_PYTHON") {
        return PathBuf::from(p);
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python");
    assert!(
        p.exists(),
        "no Python oracle: set ADVERSE_PYTHON or create {} (pip install -r scripts/requirements-oracle.txt)",
        p.display()
    );
    p
}

fn oracle(code: &str) -> String {
    let out = Command::new(python())
        .args(["-c", code])
        .output()
        .expect("run the Python oracle");
    assert!(
        out.status.success(),
        "oracle failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An 8-bit 28x28-style frame description of `rows` x `cols`.
fn frame8(rows: u32, cols: u32, label: Option<u32>) -> FrameMeta {
    let mut f = TestHost::frame(rows, cols);
    f.bits_allocated = 8;
    f.bits_stored = 8;
    f.value_range = (0.0, 255.0);
    f.label = label;
    f
}

/// A binary model whose class-1 minus class-0 logit is `w·(s x) + b`.
fn binary(w: &[f32], b: f32) -> TestModel {
    let mut weights = vec![0f32; w.len()];
    weights.extend_from_slice(w);
    TestModel {
        weights,
        bias: vec![0.0, b],
    }
}

fn run(
    name: &str,
    params: Value,
    frames: Vec<FrameMeta>,
    model: &TestModel,
    scale: f64,
    x: &[f32],
    seed: u64,
) -> Result<Outcome, Failure> {
    let (h, w) = (frames[0].rows as usize, frames[0].cols as usize);
    let n = frames.len();
    let mut host = TestHost::new(frames)
        .with_model(model.clone())
        .with_input_scale(scale)
        .with_seed(seed);
    testing::run(
        adverse_plugin_library(),
        name,
        &params,
        &mut host,
        x,
        [n, 1, h, w],
    )
}

fn num(o: &Outcome, i: usize, key: &str) -> f64 {
    o.audit[i][key]
        .as_f64()
        .unwrap_or_else(|| panic!("audit {key} of frame {i}: {:?}", o.audit[i]))
}

fn flag(o: &Outcome, i: usize, key: &str) -> bool {
    o.audit[i][key]
        .as_bool()
        .unwrap_or_else(|| panic!("audit {key} of frame {i}: {:?}", o.audit[i]))
}

#[test]
fn clopper_pearson_matches_scipy_beta_ppf() {
    let cases = [
        (990u64, 1000u64, 0.001f64),
        (600, 1000, 0.001),
        (51, 100, 0.05),
        (3, 10, 0.01),
        (99_000, 100_000, 0.001),
    ];
    let list: Vec<String> = cases
        .iter()
        .map(|(k, n, a)| format!("({k},{n},{a})"))
        .collect();
    let code = format!(
        "from scipy.stats import beta\nfor k,n,a in [{}]:\n    print(repr(float(beta.ppf(a, k, n-k+1))))",
        list.join(",")
    );
    let out = oracle(&code);
    let want: Vec<f64> = out.lines().map(|l| l.trim().parse().unwrap()).collect();
    assert_eq!(want.len(), cases.len());
    for ((k, n, a), w) in cases.iter().zip(want) {
        let got = clopper_pearson_lower(*k, *n, *a).unwrap();
        assert!(
            (got - w).abs() <= 1e-9 * w.max(1e-3),
            "k {k} n {n} alpha {a}: {got} vs scipy {w}"
        );
    }
}

#[test]
fn median2x2_matches_scipy_reflect_convention() {
    let (h, w) = (5usize, 7usize);
    let plane: Vec<f32> = (0..h * w).map(|i| ((i * 37 + 11) % 23) as f32).collect();
    let code = format!(
        "import numpy as np\nfrom scipy.ndimage import median_filter\nx=np.array({:?},dtype=np.float32).reshape({h},{w})\nprint(' '.join(repr(float(v)) for v in median_filter(x,size=2,mode='reflect').ravel()))",
        plane
    );
    let want: Vec<f32> = oracle(&code)
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect();
    assert_eq!(median2x2(&plane, h, w), want);
}

#[test]
fn bit_depth_is_the_identity_at_full_depth_and_relative_to_the_ct_window() {
    let f = frame8(2, 2, None);
    let mut v: Vec<f32> = (0..=255).map(|i| i as f32).collect();
    let orig = v.clone();
    reduce_bits(&mut v, 8, squeeze_range(&f, &orig));
    assert_eq!(v, orig);
    // 1 bit: two levels, the ends of the range.
    reduce_bits(&mut v, 1, squeeze_range(&f, &orig));
    assert!(v.iter().all(|&x| x == 0.0 || x == 255.0));
    assert_eq!(v[127], 0.0);
    assert_eq!(v[128], 255.0);
    // CT: window C 40 W 400 HU, slope 1, intercept -1024: HU [39.5 - 199.5, 39.5 + 199.5] =
    // [-160, 239], stored [864, 1263].
    let mut ct = TestHost::frame(2, 2);
    ct.modality = "CT".into();
    ct.rescale_intercept = -1024.0;
    ct.window = Some((40.0, 400.0));
    let (lo, hi) = squeeze_range(&ct, &[]);
    assert_eq!((lo, hi), (864.0, 1263.0));
    let mut c = vec![0.0f32, 1000.0, 1100.0, 4000.0];
    reduce_bits(&mut c, 2, (lo, hi));
    // Levels lo + {0, 1/3, 2/3, 1} * 399.
    assert_eq!(c, vec![864.0, 997.0, 1130.0, 1263.0]);
}

#[test]
fn squeezing_scores_zero_for_a_frame_squeezing_leaves_unchanged() {
    let w: Vec<f32> = (0..16).map(|j| 0.01 * (j as f32 - 7.5)).collect();
    let m = binary(&w, 0.3);
    let x = vec![77f32; 16];
    let out = run(
        "feature-squeezing",
        json!({"bit_depth": 8, "median": [2, 3], "threshold": 0.0}),
        vec![frame8(4, 4, None)],
        &m,
        1.0,
        &x,
        1,
    )
    .unwrap();
    assert!(out.output.is_none(), "a detector must not change the frame");
    for key in ["score", "score_bits8", "score_median2", "score_median3"] {
        assert_eq!(num(&out, 0, key), 0.0, "{key}");
    }
    assert!(!flag(&out, 0, "flag"));
}

#[test]
fn squeezing_score_is_the_largest_softmax_l1_distance() {
    // The logit difference reads pixels 5 and 10 only, centred near the impulse frame's median.
    let mut w = vec![0f32; 16];
    w[5] = 0.05;
    w[10] = -0.03;
    let m = binary(&w, -0.5);
    // Two frames: a smooth ramp and one with an impulse the median removes.
    let mut x: Vec<f32> = (0..16).map(|j| 100.0 + 3.0 * j as f32).collect();
    let mut x2: Vec<f32> = (0..16).map(|j| 120.0 + (j % 4) as f32).collect();
    // 0.05 * 121 - 0.03 * 122 - 0.5 = 1.89 after the median, 8.34 with the impulse.
    x2[5] = 250.0;
    x.extend_from_slice(&x2);
    let frames = vec![frame8(4, 4, None), frame8(4, 4, None)];
    let out = run(
        "feature-squeezing",
        json!({"bit_depth": null, "median": [2], "threshold": 0.01}),
        frames,
        &m,
        1.0,
        &x,
        1,
    )
    .unwrap();
    let logits = |v: &[f32]| -> Vec<f32> {
        let d: f32 = w.iter().zip(v).map(|(a, b)| a * b).sum();
        vec![0.0, d - 0.5]
    };
    for i in 0..2 {
        let xi = &x[i * 16..(i + 1) * 16];
        let p0 = softmax_rows(&logits(xi), 2);
        let p1 = softmax_rows(&logits(&median2x2(xi, 4, 4)), 2);
        let want: f64 = p0.iter().zip(&p1).map(|(a, b)| (a - b).abs()).sum();
        let got = num(&out, i, "score");
        assert!((got - want).abs() < 1e-6, "frame {i}: {got} vs {want}");
        assert_eq!(num(&out, i, "score_median2"), got);
        assert_eq!(flag(&out, i, "flag"), got > 0.01);
    }
    assert!(num(&out, 1, "score") > 0.01, "the impulse frame moves");
}

#[test]
fn squeezing_refuses_an_empty_squeezer_list() {
    let m = binary(&[0.0; 4], 0.0);
    let e = run(
        "feature-squeezing",
        json!({"bit_depth": null, "median": []}),
        vec![frame8(2, 2, None)],
        &m,
        1.0,
        &[0.0; 4],
        1,
    )
    .unwrap_err();
    assert!(e.message.contains("no squeezer"), "{e}");
}

/// A 4x4 frame at 128 and a binary model with unit-norm weights over the model input.
fn smoothing_setup(margin_input: f32) -> (TestModel, Vec<f32>) {
    let w = vec![0.25f32; 16]; // ||w||_2 = 1
    // The model sees s x with s = 1/255; margin = w·(s x) + b.
    let x = vec![128f32; 16];
    let wx: f32 = w.iter().map(|a| a * 128.0 / 255.0).sum();
    (binary(&w, margin_input - wx), x)
}

#[test]
fn certify_far_from_the_boundary_gives_the_closed_form_radius_in_every_unit() {
    // Margin 10 sigma: every noisy sample is class 1.
    let (m, x) = smoothing_setup(2.5);
    let mut ct = frame8(4, 4, Some(1));
    ct.modality = "CT".into();
    ct.rescale_slope = 2.0;
    let (n, alpha, sigma) = (500u64, 0.001f64, 0.25f64);
    let out = run(
        "smoothing",
        json!({"sigma": sigma, "n0": 20, "n": n, "alpha": alpha, "batch": 64}),
        vec![frame8(4, 4, Some(1)), ct],
        &m,
        1.0 / 255.0,
        &[x.clone(), x].concat(),
        3,
    )
    .unwrap();
    let p = alpha.powf(1.0 / n as f64);
    let r_in = sigma * normal_quantile(p).unwrap();
    for i in 0..2 {
        assert_eq!(num(&out, i, "class"), 1.0);
        assert!(!flag(&out, i, "abstain"));
        assert!(flag(&out, i, "correct"));
        assert_eq!(num(&out, i, "count"), n as f64);
        assert!((num(&out, i, "p_lower") - p).abs() < 1e-12);
        assert!((num(&out, i, "sigma_stored") - 63.75).abs() < 1e-9);
        assert!((num(&out, i, "radius_input") - r_in).abs() < 1e-9);
        assert!((num(&out, i, "radius_stored") - r_in * 255.0).abs() < 1e-6);
    }
    assert!(!out.audit[0].contains_key("radius_hu"), "not CT");
    assert!((num(&out, 1, "radius_hu") - 2.0 * r_in * 255.0).abs() < 1e-6);
}

#[test]
fn certify_abstains_on_the_decision_boundary() {
    let (m, x) = smoothing_setup(0.0);
    let out = run(
        "smoothing",
        json!({"sigma": 0.25, "n0": 50, "n": 400}),
        vec![frame8(4, 4, Some(0))],
        &m,
        1.0 / 255.0,
        &x,
        5,
    )
    .unwrap();
    assert!(flag(&out, 0, "abstain"));
    assert_eq!(num(&out, 0, "class"), -1.0);
    assert_eq!(num(&out, 0, "radius_input"), 0.0);
    assert!(num(&out, 0, "p_lower") <= 0.5);
    assert!(!flag(&out, 0, "correct"));
}

#[test]
fn noise_count_matches_the_gaussian_probability_and_is_reproducible() {
    // P(class 1) = Φ(margin / sigma) = Φ(1.2816) = 0.9.
    let sigma = 0.25f64;
    let (m, x) = smoothing_setup((1.281_551_565_5 * sigma) as f32);
    let params = json!({"sigma": sigma, "n0": 30, "n": 4000, "batch": 500});
    let go = |seed| {
        run(
            "smoothing",
            params.clone(),
            vec![frame8(4, 4, None)],
            &m,
            1.0 / 255.0,
            &x,
            seed,
        )
        .unwrap()
    };
    let (a, b, c) = (go(7), go(7), go(8));
    let frac = num(&a, 0, "count") / 4000.0;
    let sd = (0.9f64 * 0.1 / 4000.0).sqrt();
    assert!((frac - 0.9).abs() < 4.0 * sd, "fraction {frac}");
    assert_eq!(a.audit, b.audit, "same seed, same result");
    assert_ne!(
        a.audit[0]["count"], c.audit[0]["count"],
        "another seed draws other noise"
    );
    assert!(
        !a.audit[0].contains_key("correct"),
        "no label, no correctness"
    );
}

#[test]
fn sigma_in_stored_units_is_used_as_given() {
    let (m, x) = smoothing_setup(2.5);
    let out = run(
        "smoothing",
        json!({"sigma": 10, "sigma_unit": "stored", "n0": 10, "n": 100}),
        vec![frame8(4, 4, None)],
        &m,
        1.0 / 255.0,
        &x,
        1,
    )
    .unwrap();
    assert_eq!(num(&out, 0, "sigma_stored"), 10.0);
    let r = num(&out, 0, "radius_stored");
    assert!((num(&out, 0, "radius_input") - r / 255.0).abs() < 1e-9);
}

#[test]
fn predict_returns_the_class_far_away_and_abstains_on_the_boundary() {
    let (far, x) = smoothing_setup(2.5);
    let out = run(
        "smoothing",
        json!({"sigma": 0.25, "mode": "predict", "n": 200}),
        vec![frame8(4, 4, None)],
        &far,
        1.0 / 255.0,
        &x,
        1,
    )
    .unwrap();
    assert_eq!(num(&out, 0, "class"), 1.0);
    let want = 2.0 * 0.5f64.powi(200);
    assert!((num(&out, 0, "p_value") / want - 1.0).abs() < 1e-6);
    let (edge, x) = smoothing_setup(0.0);
    let out = run(
        "smoothing",
        json!({"sigma": 0.25, "mode": "predict", "n": 200, "alpha": 0.001}),
        vec![frame8(4, 4, None)],
        &edge,
        1.0 / 255.0,
        &x,
        1,
    )
    .unwrap();
    assert!(flag(&out, 0, "abstain"));
    assert_eq!(num(&out, 0, "class"), -1.0);
}
