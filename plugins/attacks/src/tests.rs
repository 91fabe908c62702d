//! In-process tests through the SDK's test host (linear models with exact gradients).

use adverse_plugin_sdk::FrameMeta;
use adverse_plugin_sdk::testing::{self, Failure, Outcome, TestHost, TestModel};
use serde_json::{Value, json};

use super::adverse_plugin_library;
use crate::common::{Budget, lattice_box, project_l2, project_linf, round_sample};
use crate::gradient::{di_adjoint, di_apply, di_maps, gaussian_taps, smooth};

fn frame(rows: u32, cols: u32, label: Option<u32>) -> FrameMeta {
    let mut f = TestHost::frame(rows, cols);
    f.label = label;
    f
}

fn run(
    name: &str,
    params: Value,
    frames: Vec<FrameMeta>,
    model: &TestModel,
    x: &[f32],
    seed: u64,
) -> Result<Outcome, Failure> {
    let (h, w) = (frames[0].rows as usize, frames[0].cols as usize);
    let n = frames.len();
    let mut host = TestHost::new(frames)
        .with_model(model.clone())
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

fn ok(name: &str, params: Value, frames: Vec<FrameMeta>, model: &TestModel, x: &[f32]) -> Outcome {
    run(name, params, frames, model, x, 1).unwrap_or_else(|e| panic!("{name}: {e}"))
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

/// Deterministic pseudo-random numbers in [-1, 1).
fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn logits(m: &TestModel, x: &[f32]) -> Vec<f32> {
    let k = m.bias.len();
    let d = m.weights.len() / k;
    (0..k)
        .map(|c| m.bias[c] + (0..d).map(|j| m.weights[c * d + j] * x[j]).sum::<f32>())
        .collect()
}

/// A binary model whose class-1 minus class-0 logit is `w·x + b` (class 0 weights zero).
fn binary(w: &[f32], b: f32) -> TestModel {
    let mut weights = vec![0f32; w.len()];
    weights.extend_from_slice(w);
    TestModel {
        weights,
        bias: vec![0.0, b],
    }
}

/// A 3-class model over 4x4 frames with logits near (1, 0, -1) at the frames of [`easy_frames`].
fn three_class() -> TestModel {
    let d = 16;
    let w: Vec<f32> = noise(3 * d, 5).iter().map(|v| 0.05 * v).collect();
    let mean = vec![2000f32; d];
    let bias = (0..3)
        .map(|c| {
            let wx: f32 = (0..d).map(|j| w[c * d + j] * mean[j]).sum();
            [1.0, 0.0, -1.0][c] - wx
        })
        .collect();
    TestModel { weights: w, bias }
}

/// Two integer 4x4 frames near 2000.
fn easy_frames() -> Vec<f32> {
    noise(32, 9)
        .iter()
        .map(|v| (2000.0 + 3.0 * v).round())
        .collect()
}

fn assert_integers_within(out: &[f32], x0: &[f32], eps: f32, lo: f32, hi: f32) {
    for (a, b) in out.iter().zip(x0) {
        assert_eq!(a.fract(), 0.0, "written value {a} is not an integer");
        assert!((a - b).abs() <= eps, "|{a} - {b}| exceeds eps {eps}");
        assert!((lo..=hi).contains(a), "{a} outside the stored range");
    }
}

#[test]
fn fgsm_is_eps_times_sign_w_on_a_linear_binary_model() {
    // 4x4, w with both signs and zeros; class 0 predicted with a small margin.
    let w: Vec<f32> = noise(16, 3)
        .iter()
        .enumerate()
        .map(|(j, v)| {
            if j % 5 == 0 {
                0.0
            } else {
                v.signum() * 0.01 * (1.0 + v.abs())
            }
        })
        .collect();
    let mut x: Vec<f32> = noise(16, 4)
        .iter()
        .map(|v| (2000.0 + 100.0 * v).round())
        .collect();
    x[1] = 4093.0; // clipped at the top of the 12-bit range if w[1] > 0
    let b = -(w.iter().zip(&x).map(|(a, b)| a * b).sum::<f32>()) - 1.0;
    let m = binary(&w, b);
    let out = ok(
        "fgsm",
        json!({"eps": 7}),
        vec![frame(4, 4, Some(0))],
        &m,
        &x,
    );
    let y = out.output.clone().unwrap();
    for j in 0..16 {
        let want = (x[j]
            + 7.0
                * if w[j] > 0.0 {
                    1.0
                } else if w[j] < 0.0 {
                    -1.0
                } else {
                    0.0
                })
        .clamp(0.0, 4095.0);
        assert_eq!(y[j], want, "pixel {j} (w {})", w[j]);
    }
    assert_eq!(num(&out, 0, "linf"), 7.0);
    assert!(flag(&out, 0, "success"));
    assert_eq!(num(&out, 0, "pred_before"), 0.0);
    assert_eq!(num(&out, 0, "pred_after"), 1.0);
    assert_eq!(num(&out, 0, "iterations"), 1.0);
    let ce = f64::from((1.0 + (logits(&m, &x)[1] - logits(&m, &x)[0]).exp()).ln());
    assert!((num(&out, 0, "loss_before") - ce).abs() < 1e-5);
}

#[test]
fn deepfool_reaches_the_minimal_distance_in_one_step() {
    let w: Vec<f32> = noise(16, 11).iter().map(|v| 0.02 * v).collect();
    let x: Vec<f32> = noise(16, 12).iter().map(|v| 500.0 + 50.0 * v).collect();
    let b = -(w.iter().zip(&x).map(|(a, b)| a * b).sum::<f32>()) - 2.5;
    let m = binary(&w, b);
    // Float-pixel frame: no rounding, the raw DeepFool point is written.
    let mut f = frame(4, 4, None);
    f.float = true;
    f.value_range = (-1e6, 1e6);
    let f_x = (logits(&m, &x)[1] - logits(&m, &x)[0]) as f64;
    let w2 = w.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>();
    let w1 = w.iter().map(|v| f64::from(v.abs())).sum::<f64>();
    for (norm, want) in [("l2", f_x.abs() / w2.sqrt()), ("linf", f_x.abs() / w1)] {
        let out = ok(
            "deepfool",
            json!({"norm": norm, "overshoot": 0.0, "steps": 1}),
            vec![f.clone()],
            &m,
            &x,
        );
        let y = out.output.clone().unwrap();
        let key = if norm == "l2" { "l2" } else { "linf" };
        let got = num(&out, 0, key);
        assert!(
            (got - want).abs() <= 1e-4 * want,
            "{norm}: distance {got} vs minimal {want}"
        );
        // The point lies on the decision boundary.
        let z = logits(&m, &y);
        assert!((z[1] - z[0]).abs() < 1e-3, "{norm}: margin {}", z[1] - z[0]);
        assert_eq!(num(&out, 0, "iterations"), 1.0);
    }
    // With the default overshoot it crosses and succeeds, still after one step.
    let out = ok("deepfool", json!({}), vec![f], &m, &x);
    assert!(flag(&out, 0, "success"));
    assert_eq!(num(&out, 0, "iterations"), 1.0);
    assert!((num(&out, 0, "l2") - f_x.abs() / w2.sqrt() * 1.02).abs() < 1e-3);
}

#[test]
fn mifgsm_one_step_equals_fgsm_and_ti_1x1_equals_mi() {
    let m = three_class();
    let x = easy_frames();
    let frames = || vec![frame(4, 4, None), frame(4, 4, None)];
    let fgsm = ok("fgsm", json!({"eps": 5}), frames(), &m, &x);
    let mi1 = ok("mifgsm", json!({"eps": 5, "steps": 1}), frames(), &m, &x);
    assert_eq!(fgsm.output, mi1.output);
    let mi = ok(
        "mifgsm",
        json!({"eps": 6, "steps": 6, "alpha": 2}),
        frames(),
        &m,
        &x,
    );
    let ti1 = ok(
        "tifgsm",
        json!({"eps": 6, "steps": 6, "alpha": 2, "kernel": 1, "momentum": 1.0}),
        frames(),
        &m,
        &x,
    );
    assert_eq!(mi.output, ti1.output);
    // A wider kernel smooths the sign pattern, so it changes the result on a 1-channel frame.
    let ti5 = ok(
        "tifgsm",
        json!({"eps": 6, "steps": 6, "alpha": 2, "kernel": 3, "sigma": 1.0, "momentum": 1.0}),
        frames(),
        &m,
        &x,
    );
    assert_ne!(mi.output, ti5.output);
    // Input diversity with nothing to diversify (resize 1) is I-FGSM.
    let bim = ok("bim", json!({"eps": 6, "steps": 3}), frames(), &m, &x);
    let di = ok(
        "difgsm",
        json!({"eps": 6, "steps": 3, "prob": 1.0, "resize": 1.0}),
        frames(),
        &m,
        &x,
    );
    assert_eq!(bim.output, di.output);
}

#[test]
fn projections_are_exact() {
    let x0 = vec![10.0, 20.0, 30.0, 0.0, 0.0, 0.0];
    let mut x = vec![13.0, 16.0, 30.5, 3.0, 4.0, 0.0];
    project_linf(&mut x, &x0, &[1.5, 1.0], 3);
    assert_eq!(x, vec![11.5, 18.5, 30.5, 1.0, 1.0, 0.0]);
    let mut y = vec![13.0, 24.0, 30.0, 0.3, 0.4, 0.0];
    project_l2(&mut y, &x0, &[2.5, 1.0], 3);
    // (3, 4, 0) of norm 5 scaled to 2.5; (0.3, 0.4, 0) is inside its ball and stays.
    assert_eq!(y, vec![11.5, 22.0, 30.0, 0.3, 0.4, 0.0]);
}

#[test]
fn rounding_never_exceeds_eps_and_stays_on_the_lattice() {
    let r = noise(4000, 21);
    for t in 0..1000 {
        let x0 = (2000.0 * (r[4 * t] + 1.0)).round();
        let eps = 3.0 * (r[4 * t + 1] + 1.0); // fractional, in [0, 6)
        let adv = x0 + eps * r[4 * t + 2];
        let (a, b) = lattice_box(x0, Some(eps), 0.0, 4095.0);
        assert!(a <= x0 && x0 <= b && (b - x0) <= eps && (x0 - a) <= eps);
        let got = round_sample(&[adv], &[x0], Budget::Linf, Some(eps), 0.0, 4095.0)[0];
        assert_eq!(got.fract(), 0.0);
        assert!(
            (got - x0).abs() <= eps,
            "x0 {x0} eps {eps} adv {adv} -> {got}"
        );
        assert!((got - adv).abs() <= 1.0);
    }
    // L2: nearest rounding can leave the ball; the fallback truncates towards x0.
    let x0 = [100.0, 100.0, 100.0, 100.0];
    let adv = [100.6, 100.6, 100.6, 100.6]; // norm 1.2 <= 1.25
    let got = round_sample(&adv, &x0, Budget::L2, Some(1.25), 0.0, 255.0);
    assert_eq!(got, vec![100.0; 4]);
    let adv = [101.1, 100.0, 100.0, 100.0];
    let got = round_sample(&adv, &x0, Budget::L2, Some(1.25), 0.0, 255.0);
    assert_eq!(got, vec![101.0, 100.0, 100.0, 100.0]);
}

#[test]
fn rounding_keeps_success_where_the_lattice_allows() {
    // One 0.4-unit step flips the float frame (margin 1 < 4 * 0.4), but rounds back to x.
    let w = [1.0f32; 4];
    let x = [100.0f32, 100.0, 100.0, 100.0];
    let m = binary(&w, -401.0);
    let frames = || vec![frame(2, 2, Some(0))];
    let out = ok(
        "bim",
        json!({"eps": 2, "steps": 1, "alpha": 0.4}),
        frames(),
        &m,
        &x,
    );
    assert!(flag(&out, 0, "success"));
    assert!(flag(&out, 0, "rounding_repaired"));
    assert_eq!(num(&out, 0, "linf"), 1.0);
    assert_eq!(out.output.unwrap(), vec![101.0; 4]);
    // With eps 0.9 no integer but x itself is within budget: success is lost, nothing moves.
    let out = ok(
        "bim",
        json!({"eps": 0.9, "steps": 1, "alpha": 0.4}),
        frames(),
        &m,
        &x,
    );
    assert!(!flag(&out, 0, "success"));
    assert_eq!(num(&out, 0, "linf"), 0.0);
    assert_eq!(out.output.unwrap(), x.to_vec());
}

#[test]
fn dlr_is_refused_on_two_classes_and_runs_on_three() {
    let m = binary(&[0.01; 16], -0.5);
    let x = vec![20.0; 16];
    let err = run(
        "apgd-dlr",
        json!({"eps": 4}),
        vec![frame(4, 4, None)],
        &m,
        &x,
        1,
    )
    .unwrap_err();
    assert!(err.message.contains("2 classes"), "{err}");
    assert!(err.message.contains("at least 3"), "{err}");
    let out = ok(
        "apgd-dlr",
        json!({"eps": 40, "steps": 20}),
        vec![frame(4, 4, None), frame(4, 4, None)],
        &three_class(),
        &easy_frames(),
    );
    assert!(flag(&out, 0, "success") && flag(&out, 1, "success"));
}

/// Every attack flips both frames of an easy 3-class case, writes integers and stays within ε.
#[test]
fn every_attack_succeeds_on_an_easy_case_within_budget() {
    let m = three_class();
    let x = easy_frames();
    let dir = tempfile::tempdir().unwrap();
    let uap = dir.path().join("v.npy");
    let cases: Vec<(&str, Value, Option<f32>)> = vec![
        ("fgsm", json!({"eps": 40}), Some(40.0)),
        ("bim", json!({"eps": 40}), Some(40.0)),
        ("pgd", json!({"eps": 40}), Some(40.0)),
        (
            "pgd",
            json!({"eps": 40, "restarts": 3, "early_stop": true}),
            Some(40.0),
        ),
        ("mifgsm", json!({"eps": 40}), Some(40.0)),
        ("tifgsm", json!({"eps": 40}), Some(40.0)),
        (
            "difgsm",
            json!({"eps": 40, "momentum": 1.0, "ti_kernel": 3}),
            Some(40.0),
        ),
        ("apgd-ce", json!({"eps": 40, "steps": 20}), Some(40.0)),
        ("square", json!({"eps": 40, "queries": 300}), Some(40.0)),
        ("deepfool", json!({}), None),
        ("deepfool", json!({"norm": "linf"}), None),
        ("cw-l2", json!({"steps": 100, "search_steps": 6}), None),
        (
            "uap-fit",
            json!({"eps": 60, "path": uap.to_str().unwrap()}),
            Some(60.0),
        ),
    ];
    for (name, params, eps) in cases {
        let out = ok(name, params.clone(), vec![frame(4, 4, None); 2], &m, &x);
        let y = out.output.clone().unwrap();
        assert_integers_within(&y, &x, eps.unwrap_or(f32::INFINITY), 0.0, 4095.0);
        for i in 0..2 {
            assert!(
                flag(&out, i, "success"),
                "{name} {params}: frame {i} {:?}",
                out.audit[i]
            );
            let z = logits(&m, &y[i * 16..(i + 1) * 16]);
            let z0 = logits(&m, &x[i * 16..(i + 1) * 16]);
            let (p, p0) = (crate::common::argmax(&z), crate::common::argmax(&z0));
            assert_ne!(p, p0, "{name}: the written frame {i} must be adversarial");
            assert_eq!(num(&out, i, "pred_after"), p as f64);
            if let Some(e) = eps {
                assert!(num(&out, i, "linf") <= f64::from(e));
            }
        }
    }
    // L2 PGD: the written perturbation stays inside the L2 ball.
    let out = ok(
        "pgd",
        json!({"eps": 120, "norm": "l2", "alpha": 40}),
        vec![frame(4, 4, None); 2],
        &m,
        &x,
    );
    let y = out.output.clone().unwrap();
    for i in 0..2 {
        assert!(flag(&out, i, "success"), "{:?}", out.audit[i]);
        let l2: f32 = (0..16)
            .map(|j| (y[i * 16 + j] - x[i * 16 + j]).powi(2))
            .sum::<f32>()
            .sqrt();
        assert!(l2 <= 120.0 && num(&out, i, "l2") <= 120.0);
    }
    // C&W finds a smaller perturbation than PGD-L2 at the same success on a linear model.
    let cw = ok(
        "cw-l2",
        json!({"steps": 200, "search_steps": 8}),
        vec![frame(4, 4, None); 2],
        &m,
        &x,
    );
    for i in 0..2 {
        assert!(
            num(&cw, i, "l2") < num(&out, i, "l2"),
            "C&W {:?} PGD {:?}",
            cw.audit[i],
            out.audit[i]
        );
    }
}

#[test]
fn targeted_attacks_reach_the_target() {
    let m = three_class();
    let x = easy_frames();
    let preds: Vec<usize> = (0..2)
        .map(|i| crate::common::argmax(&logits(&m, &x[i * 16..(i + 1) * 16])))
        .collect();
    let frames: Vec<FrameMeta> = preds
        .iter()
        .map(|&p| {
            let mut f = frame(4, 4, Some(p as u32));
            f.target = Some(((p + 2) % 3) as u32);
            f
        })
        .collect();
    for (name, params) in [
        ("pgd", json!({"eps": 60, "targeted": true})),
        ("mifgsm", json!({"eps": 60, "targeted": true})),
        ("apgd-ce", json!({"eps": 60, "targeted": true, "steps": 20})),
        (
            "square",
            json!({"eps": 60, "targeted": true, "queries": 500}),
        ),
        ("deepfool", json!({"targeted": true})),
        (
            "cw-l2",
            json!({"targeted": true, "steps": 100, "search_steps": 6}),
        ),
    ] {
        let out = ok(name, params, frames.clone(), &m, &x);
        let y = out.output.clone().unwrap();
        for i in 0..2 {
            let want = frames[i].target.unwrap() as usize;
            assert!(flag(&out, i, "success"), "{name}: {:?}", out.audit[i]);
            assert_eq!(
                crate::common::argmax(&logits(&m, &y[i * 16..(i + 1) * 16])),
                want,
                "{name}"
            );
        }
    }
    // A targeted attack on a frame without a target names it.
    let err = run(
        "pgd",
        json!({"eps": 4, "targeted": true}),
        vec![frame(4, 4, None); 2],
        &m,
        &x,
        1,
    )
    .unwrap_err();
    assert!(err.message.contains("frame 0 has no target"), "{err}");
}

#[test]
fn the_same_seed_gives_the_same_result() {
    let m = three_class();
    let x = easy_frames();
    for (name, params) in [
        ("pgd", json!({"eps": 3, "steps": 2})),
        ("difgsm", json!({"eps": 3, "steps": 3, "resize": 0.5})),
        (
            "square",
            json!({"eps": 3, "queries": 20, "early_stop": false}),
        ),
    ] {
        let go = |seed| {
            run(
                name,
                params.clone(),
                vec![frame(4, 4, None); 2],
                &m,
                &x,
                seed,
            )
            .unwrap()
            .output
        };
        let a = go(7);
        assert_eq!(a, go(7), "{name}");
        assert_ne!(a, go(8), "{name}: the seed must matter");
    }
}

#[test]
fn eps_units_convert_or_refuse_clearly() {
    let m = three_class();
    let x = easy_frames();
    let err = run(
        "pgd",
        json!({"eps": 10, "unit": "hu"}),
        vec![frame(4, 4, None); 2],
        &m,
        &x,
        1,
    )
    .unwrap_err();
    assert!(
        err.message.contains("'hu' needs CT") && err.message.contains("'OT'"),
        "{err}"
    );
    let err = run(
        "fgsm",
        json!({"eps": 0.1, "unit": "window"}),
        vec![frame(4, 4, None); 2],
        &m,
        &x,
        1,
    )
    .unwrap_err();
    assert!(err.message.contains("needs a VOI window"), "{err}");
    let mut ct = frame(4, 4, None);
    ct.modality = "CT".into();
    ct.rescale_slope = 2.0;
    ct.rescale_intercept = -1024.0;
    ct.window = Some((40.0, 400.0));
    let out = ok(
        "fgsm",
        json!({"eps": 10, "unit": "hu"}),
        vec![ct.clone(); 2],
        &m,
        &x,
    );
    assert_eq!(num(&out, 0, "eps_stored"), 5.0);
    assert_eq!(num(&out, 0, "linf"), 5.0);
    // 1% of a 400-HU window at 2 HU per stored unit: 2 stored units.
    let out = ok(
        "fgsm",
        json!({"eps": 0.01, "unit": "window"}),
        vec![ct; 2],
        &m,
        &x,
    );
    assert_eq!(num(&out, 0, "eps_stored"), 2.0);
    assert_eq!(num(&out, 1, "linf"), 2.0);
}

#[test]
fn uap_fits_across_batches_saves_and_applies() {
    let m = three_class();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("uap.npy");
    let a = easy_frames();
    let b: Vec<f32> = noise(32, 77)
        .iter()
        .map(|v| (2000.0 + 3.0 * v).round())
        .collect();
    let mut host = TestHost::new(vec![frame(4, 4, None); 2]).with_model(m.clone());
    let outs = testing::run_batches(
        adverse_plugin_library(),
        "uap-fit",
        &json!({"eps": 60, "path": path.to_str().unwrap(), "fooling_target": 1.0}),
        &mut host,
        &[(&a, [2, 1, 4, 4]), (&b, [2, 1, 4, 4])],
    )
    .unwrap();
    let (v, shape) = crate::uap::load_npy(&path).unwrap();
    assert_eq!(shape, [1, 4, 4]);
    assert!(v.iter().any(|x| *x != 0.0) && v.iter().all(|x| x.abs() <= 60.0));
    // The running fooling rate counts the frames of both batches.
    let fooled: f64 = outs
        .iter()
        .flat_map(|o| (0..2).map(|i| num(o, i, "fooled")))
        .sum();
    assert_eq!(num(&outs[1], 1, "fooling_rate"), fooled / 4.0);
    // Held-out frames: x + round(v), clipped; the fooling rate is reported.
    let held: Vec<f32> = noise(32, 99)
        .iter()
        .map(|v| (2000.0 + 3.0 * v).round())
        .collect();
    let out = ok(
        "uap-apply",
        json!({"path": path.to_str().unwrap()}),
        vec![frame(4, 4, None); 2],
        &m,
        &held,
    );
    let y = out.output.clone().unwrap();
    let reach = v.iter().fold(0f32, |mx, x| mx.max(x.abs())).floor();
    assert_integers_within(&y, &held, reach, 0.0, 4095.0);
    for i in 0..2 {
        let z = logits(&m, &y[i * 16..(i + 1) * 16]);
        let z0 = logits(&m, &held[i * 16..(i + 1) * 16]);
        let fooled = crate::common::argmax(&z) != crate::common::argmax(&z0);
        assert_eq!(flag(&out, i, "success"), fooled);
    }
    // A perturbation of another geometry is refused, naming both.
    let err = run(
        "uap-apply",
        json!({"path": path.to_str().unwrap()}),
        vec![frame(2, 8, None)],
        &binary(&[0.0; 16], 0.0),
        &[0.0; 16],
        1,
    )
    .unwrap_err();
    assert!(
        err.message.contains("1x4x4") && err.message.contains("1x2x8"),
        "{err}"
    );
}

#[test]
fn smoothing_and_input_diversity_are_what_they_claim() {
    // An impulse through the separable kernel gives the outer product of the taps.
    let taps = gaussian_taps(3, 1.0);
    assert!((taps.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    assert_eq!(gaussian_taps(1, 3.0), vec![1.0]);
    let mut g = vec![0f32; 25];
    g[12] = 1.0;
    let s = smooth(&g, &taps, 5, 5);
    for i in 0..5 {
        for j in 0..5 {
            let want = if (1..4).contains(&i) && (1..4).contains(&j) {
                taps[i - 1] * taps[j - 1]
            } else {
                0.0
            };
            assert!((s[i * 5 + j] - want).abs() < 1e-7);
        }
    }
    // The DI gradient is the transpose of the transform: <T x, g> = <x, T' g> (x >= 0 with a
    // zero pixel, so the padding value is 0 and T is linear).
    let maps = di_maps(3, 6, 6, 1.0, 0.5, 42, 1);
    assert!(maps.iter().all(|m| m.is_some()));
    let mut x: Vec<f32> = noise(108, 1).iter().map(|v| v.abs()).collect();
    (0..3).for_each(|i| x[i * 36] = 0.0);
    let gr = noise(108, 2);
    let tx = di_apply(&x, &maps, 1, 36);
    let tg = di_adjoint(&gr, &maps, 1, 36);
    let lhs: f32 = tx.iter().zip(&gr).map(|(a, b)| a * b).sum();
    let rhs: f32 = x.iter().zip(&tg).map(|(a, b)| a * b).sum();
    assert!((lhs - rhs).abs() < 1e-4, "{lhs} vs {rhs}");
}

/// Each plugin's schema is valid JSON, closed, and its defaults are accepted by `create`.
#[test]
fn schemas_are_closed_and_their_defaults_create() {
    let lib = adverse_plugin_library();
    let names = [
        "fgsm", "bim", "pgd", "mifgsm", "tifgsm", "difgsm", "cw-l2", "deepfool", "apgd-ce",
        "apgd-dlr", "uap-fit", "square", "noise",
    ];
    assert_eq!(lib.plugin_count, 14);
    let dir = tempfile::tempdir().unwrap();
    for name in names {
        let desc = testing::find(lib, name).unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!(testing::kind(desc), Some(adverse_plugin_sdk::Kind::Attack));
        // SAFETY: descriptor schemas are NUL-terminated static strings.
        let text = unsafe { std::ffi::CStr::from_ptr(desc.param_schema) }
            .to_str()
            .unwrap();
        let schema: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(schema["additionalProperties"], json!(false), "{name}");
        let mut params = serde_json::Map::new();
        for (k, v) in schema["properties"].as_object().unwrap() {
            if let Some(d) = v.get("default") {
                params.insert(k.clone(), d.clone());
            }
        }
        params.insert("eps".into(), json!(2));
        if name == "uap-fit" {
            params.insert("path".into(), json!(dir.path().join("u.npy")));
        }
        if ["deepfool", "cw-l2"].contains(&name) {
            params.remove("eps");
        }
        run(
            name,
            Value::Object(params.clone()),
            vec![frame(4, 4, None); 2],
            &three_class(),
            &easy_frames(),
            1,
        )
        .unwrap_or_else(|e| panic!("{name} with schema defaults {params:?}: {e}"));
        // An unknown parameter is refused by the typed parameters too.
        params.insert("bogus".into(), json!(1));
        let err = run(
            name,
            Value::Object(params),
            vec![frame(4, 4, None); 2],
            &three_class(),
            &easy_frames(),
            1,
        )
        .unwrap_err();
        assert!(err.message.contains("bogus"), "{name}: {err}");
    }
}

#[test]
fn apgd_checkpoints_follow_croce_and_hein() {
    // p = 0, .22, .41, .57, .70, .80, .87, .93, .99 of T = 100.
    assert_eq!(
        crate::apgd::checkpoint_intervals(100),
        vec![22, 19, 16, 13, 10, 7, 6, 6]
    );
    assert_eq!(crate::apgd::checkpoint_intervals(1), vec![1]);
}

#[test]
fn noise_moves_every_pixel_by_exactly_eps_and_keeps_a_fooling_draw() {
    // A model that no ±3 perturbation of these frames can flip (huge margin): every pixel moves
    // by exactly ±eps (none is near the range ends), signs are mixed, and the seed fixes them.
    let w: Vec<f32> = vec![0.001; 16];
    let m = binary(&w, -100.0);
    let x: Vec<f32> = noise(16, 4)
        .iter()
        .map(|v| (2000.0 + 100.0 * v).round())
        .collect();
    let a = ok(
        "noise",
        json!({"eps": 3}),
        vec![frame(4, 4, Some(0))],
        &m,
        &x,
    );
    let y = a.output.clone().unwrap();
    let d: Vec<f32> = y.iter().zip(&x).map(|(p, q)| p - q).collect();
    assert!(d.iter().all(|v| v.abs() == 3.0), "{d:?}");
    assert!(d.iter().any(|&v| v > 0.0) && d.iter().any(|&v| v < 0.0));
    assert!(!flag(&a, 0, "success"));
    assert_eq!(num(&a, 0, "linf"), 3.0);
    let again = ok(
        "noise",
        json!({"eps": 3}),
        vec![frame(4, 4, Some(0))],
        &m,
        &x,
    );
    assert_eq!(again.output, a.output);
    let other = run(
        "noise",
        json!({"eps": 3}),
        vec![frame(4, 4, Some(0))],
        &m,
        &x,
        2,
    )
    .unwrap();
    assert_ne!(other.output, a.output, "another seed draws other signs");
    // Near the boundary (w·x + b ≈ 0): with enough draws one flips it, and that draw is kept.
    let b = -(w.iter().zip(&x).map(|(p, q)| p * q).sum::<f32>()) - 0.0005;
    let m = binary(&w, b);
    let f = ok(
        "noise",
        json!({"eps": 3, "draws": 50}),
        vec![frame(4, 4, Some(0))],
        &m,
        &x,
    );
    assert!(flag(&f, 0, "success"));
    assert!(num(&f, 0, "draws") >= 1.0 && num(&f, 0, "draws") <= 50.0);
    let z = logits(&m, f.output.as_ref().unwrap());
    assert!(z[1] > z[0], "the kept draw fools the model: {z:?}");
    assert!(
        run(
            "noise",
            json!({"eps": -1}),
            vec![frame(4, 4, Some(0))],
            &m,
            &x,
            1
        )
        .is_err()
    );
}
