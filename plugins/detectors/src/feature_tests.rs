//! Tests of the feature-space detectors: the math on synthetic features with known answers,
//! and fit -> state file -> detect through the SDK's test host (its linear model's features are
//! the scaled stored values, so the features are chosen exactly).

use adverse_plugin_sdk::FrameMeta;
use adverse_plugin_sdk::testing::{self, Outcome, TestHost, TestModel};
use serde_json::{Value, json};

use super::adverse_plugin_library;
use crate::feature::{FitData, SplitMix, spd_inverse};
use crate::kde::{bayes_uncertainty, fit_logistic, log_kde};
use crate::lid::{lid_mle, lid_mle_grad};
use crate::mahalanobis::{fit_state, ledoit_wolf};

fn gauss(rng: &mut SplitMix) -> f64 {
    // Box-Muller.
    let u1 = rng.next_f64().max(1e-300);
    let u2 = rng.next_f64();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// Two classes of correlated Gaussian features in `d` dims, `n` per class.
fn two_classes(n: usize, d: usize, seed: u64) -> (FitData, Vec<u32>) {
    let mut rng = SplitMix(seed);
    let mut fit = FitData {
        model_id: "m".into(),
        dim: d,
        k: 2,
        ..FitData::default()
    };
    let mut labels = Vec::new();
    for c in 0..2u32 {
        for _ in 0..n {
            let z: Vec<f64> = (0..d).map(|_| gauss(&mut rng)).collect();
            for j in 0..d {
                // Correlated: x_j = z_j + 0.5 z_{j-1}, scaled per dim, shifted per class.
                let prev = if j > 0 { z[j - 1] } else { 0.0 };
                let v = (z[j] + 0.5 * prev) * (1.0 + j as f64 * 0.3) + 3.0 * f64::from(c);
                fit.feats.push(v as f32);
            }
            fit.labels.push(Some(c));
            fit.held.push(false);
            labels.push(c);
        }
    }
    (fit, labels)
}

/// Gauss-Jordan inverse (an independent check of the Cholesky one).
fn gauss_jordan(a: &[f64], d: usize) -> Vec<f64> {
    let mut m: Vec<Vec<f64>> = (0..d)
        .map(|i| {
            let mut r = a[i * d..(i + 1) * d].to_vec();
            r.extend((0..d).map(|j| if i == j { 1.0 } else { 0.0 }));
            r
        })
        .collect();
    for c in 0..d {
        let p = (c..d)
            .max_by(|&i, &j| m[i][c].abs().total_cmp(&m[j][c].abs()))
            .unwrap();
        m.swap(c, p);
        let piv = m[c][c];
        for v in m[c].iter_mut() {
            *v /= piv;
        }
        for r in 0..d {
            if r != c {
                let f = m[r][c];
                let row_c = m[c].clone();
                for (v, w) in m[r].iter_mut().zip(&row_c) {
                    *v -= f * w;
                }
            }
        }
    }
    m.into_iter().flat_map(|r| r[d..].to_vec()).collect()
}

#[test]
fn mahalanobis_matches_a_direct_computation() {
    let d = 5;
    let (fit, labels) = two_classes(200, d, 3);
    let rows: Vec<usize> = (0..fit.len()).collect();
    for alpha in [0.0, 0.25] {
        let st = fit_state(&fit, &rows, &labels, Some(alpha)).unwrap();
        // Direct: class means, pooled covariance (1/n), shrink, invert, distances.
        let mut means = vec![vec![0f64; d]; 2];
        for &r in &rows {
            for j in 0..d {
                means[labels[r] as usize][j] += f64::from(fit.row(r)[j]) / 200.0;
            }
        }
        let mut cov = vec![0f64; d * d];
        for &r in &rows {
            let m = &means[labels[r] as usize];
            for i in 0..d {
                for j in 0..d {
                    cov[i * d + j] += (f64::from(fit.row(r)[i]) - m[i])
                        * (f64::from(fit.row(r)[j]) - m[j])
                        / rows.len() as f64;
                }
            }
        }
        let tr = (0..d).map(|i| cov[i * d + i]).sum::<f64>() / d as f64;
        let shrunk: Vec<f64> = (0..d * d)
            .map(|ij| (1.0 - alpha) * cov[ij] + if ij / d == ij % d { alpha * tr } else { 0.0 })
            .collect();
        let p = gauss_jordan(&shrunk, d);
        for (m_got, m_want) in st.means.iter().zip(&means) {
            for (a, b) in m_got.iter().zip(m_want) {
                assert!((a - b).abs() < 1e-9);
            }
        }
        for x in [[0.5f32, -1.0, 2.0, 0.0, 1.0], [3.0, 3.5, 2.0, 4.0, 3.0]] {
            let want = (0..2)
                .map(|c| {
                    let diff: Vec<f64> = (0..d).map(|j| f64::from(x[j]) - means[c][j]).collect();
                    (0..d)
                        .map(|i| {
                            (0..d)
                                .map(|j| diff[i] * p[i * d + j] * diff[j])
                                .sum::<f64>()
                        })
                        .sum::<f64>()
                })
                .fold(f64::INFINITY, f64::min);
            let (got, _) = st.score(&x);
            assert!(
                (got - want).abs() < 1e-8 * want.max(1.0),
                "alpha {alpha}: {got} vs {want}"
            );
        }
        // The nearest class is the one the point was drawn near.
        assert_eq!(st.score(&[3.0, 3.0, 3.0, 3.0, 3.0]).1, 1);
        assert_eq!(st.score(&[0.0, 0.0, 0.0, 0.0, 0.0]).1, 0);
    }
}

/// The score gradient an adaptive attack descends (ABI `score_grad`) against central
/// differences in float64, at points near each class mean (so the nearest class, where the
/// minimum is differentiated, does not change within the step).
#[test]
fn mahalanobis_score_gradient_matches_finite_differences() {
    let d = 5;
    let (fit, labels) = two_classes(200, d, 5);
    let rows: Vec<usize> = (0..fit.len()).collect();
    let st = fit_state(&fit, &rows, &labels, Some(0.1)).unwrap();
    for x in [[0.5f32, -1.0, 2.0, 0.0, 1.0], [3.0, 3.5, 2.0, 4.0, 3.0]] {
        let (s, g) = st.score_grad(&x);
        assert_eq!(s, st.score(&x).0);
        for j in 0..d {
            let (mut hi, mut lo) = (x, x);
            hi[j] += 0.01;
            lo[j] -= 0.01;
            let step = f64::from(hi[j]) - f64::from(lo[j]);
            let fd = (st.score(&hi).0 - st.score(&lo).0) / step;
            assert!(
                (fd - g[j]).abs() < 1e-6 * g[j].abs().max(1.0),
                "d score / d f[{j}]: analytic {} vs finite difference {fd}",
                g[j]
            );
        }
    }
    // At a class mean the score and its gradient vanish.
    let m: Vec<f32> = st.means[1].iter().map(|&v| v as f32).collect();
    let (s, g) = st.score_grad(&m);
    assert!(s < 1e-9 && g.iter().all(|v| v.abs() < 1e-4), "{s} {g:?}");
}

/// LID's gradient (neighbour set fixed) against central differences, at points whose
/// neighbour set does not change within the step.
#[test]
fn lid_score_gradient_matches_finite_differences() {
    let reference: Vec<Vec<f32>> = subspace_points(60, 6, 11);
    let mut rng = SplitMix(13);
    let mut checked = 0;
    for _ in 0..6 {
        // Points in the 12-dimensional ambient space of the reference.
        let x: Vec<f32> = (0..12)
            .map(|_| (0.5 + 0.5 * gauss(&mut rng)) as f32)
            .collect();
        let Some((s, g)) = lid_mle_grad(&x, &reference, 10) else {
            continue;
        };
        let want = lid_mle(&x, reference.iter().map(|r| r.as_slice()), 10).unwrap();
        assert!(
            (s - want).abs() < 1e-9 * want.abs().max(1.0),
            "{s} vs {want}"
        );
        for j in 0..12 {
            let (mut hi, mut lo) = (x.clone(), x.clone());
            hi[j] += 1e-3;
            lo[j] -= 1e-3;
            let step = f64::from(hi[j]) - f64::from(lo[j]);
            let at = |p: &[f32]| lid_mle(p, reference.iter().map(|r| r.as_slice()), 10).unwrap();
            let fd = (at(&hi) - at(&lo)) / step;
            assert!(
                (fd - g[j]).abs() < 1e-3 * g[j].abs().max(1.0),
                "d LID / d x[{j}]: analytic {} vs finite difference {fd}",
                g[j]
            );
        }
        checked += 1;
    }
    assert!(checked >= 4, "only {checked} points had a defined LID");
}

#[test]
fn cholesky_inverse_is_an_inverse() {
    let a = [4.0, 1.0, 0.5, 1.0, 3.0, 0.2, 0.5, 0.2, 2.0];
    let inv = spd_inverse(&a, 3).unwrap();
    let gj = gauss_jordan(&a, 3);
    for (x, y) in inv.iter().zip(&gj) {
        assert!((x - y).abs() < 1e-12);
    }
    assert!(
        spd_inverse(&[1.0, 2.0, 2.0, 1.0], 2).is_none(),
        "indefinite"
    );
}

#[test]
fn ledoit_wolf_shrinks_isotropic_data_more_than_correlated_data() {
    let d = 10;
    let n = 400;
    let mut rng = SplitMix(11);
    let iso: Vec<f64> = (0..n * d).map(|_| gauss(&mut rng)).collect();
    // Strongly anisotropic: dimension j has standard deviation 2^j / 8.
    let aniso: Vec<f64> = (0..n * d)
        .map(|i| gauss(&mut rng) * 2f64.powi((i % d) as i32) / 8.0)
        .collect();
    let cov = |x: &[f64]| {
        let mut c = vec![0f64; d * d];
        for r in x.chunks(d) {
            for i in 0..d {
                for j in 0..d {
                    c[i * d + j] += r[i] * r[j] / n as f64;
                }
            }
        }
        c
    };
    let a_iso = ledoit_wolf(&iso, n, d, &cov(&iso));
    let a_aniso = ledoit_wolf(&aniso, n, d, &cov(&aniso));
    assert!(
        a_iso > 0.5,
        "isotropic data: the identity target is right: {a_iso}"
    );
    assert!(
        a_aniso < 0.05,
        "anisotropic data: little shrinkage: {a_aniso}"
    );
    assert!((0.0..=1.0).contains(&a_iso) && (0.0..=1.0).contains(&a_aniso));
}

/// Points uniform in a `dim`-dimensional cube embedded (rotated) in 12 ambient dimensions.
fn subspace_points(n: usize, dim: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = SplitMix(seed);
    let ambient = 12;
    // A fixed orthonormal-ish embedding: basis vectors e_j mixed with e_{j+dim}.
    (0..n)
        .map(|_| {
            let u: Vec<f64> = (0..dim).map(|_| rng.next_f64()).collect();
            let mut x = vec![0f32; ambient];
            for (j, &v) in u.iter().enumerate() {
                x[j] += (v * 0.8) as f32;
                x[(j + dim) % ambient] += (v * 0.6) as f32;
            }
            x
        })
        .collect()
}

#[test]
fn lid_mle_recovers_the_dimension_of_a_subspace() {
    let mut means = Vec::new();
    for dim in [2usize, 5] {
        let reference = subspace_points(4000, dim, 5);
        let queries = subspace_points(200, dim, 9);
        let lids: Vec<f64> = queries
            .iter()
            .map(|q| lid_mle(q, reference.iter().map(|r| r.as_slice()), 20).unwrap())
            .collect();
        let mean = lids.iter().sum::<f64>() / lids.len() as f64;
        // The MLE is biased low near the cube's faces; within 30% of the true dimension.
        assert!(
            (mean - dim as f64).abs() < 0.3 * dim as f64,
            "dimension {dim}: mean LID {mean}"
        );
        means.push(mean);
    }
    assert!(means[1] > means[0] + 1.5, "{means:?}");
    // Hand-checked: distances 1, 2, 4 (k = 3): LID = -1 / mean(ln(1/4), ln(2/4), 0).
    let x = [0f32, 0.0];
    let refs: Vec<Vec<f32>> = vec![
        vec![1.0, 0.0],
        vec![0.0, 2.0],
        vec![-4.0, 0.0],
        vec![9.0, 9.0],
    ];
    let got = lid_mle(&x, refs.iter().map(|r| r.as_slice()), 3).unwrap();
    let want = -1.0 / (((0.25f64).ln() + (0.5f64).ln()) / 3.0);
    assert!((got - want).abs() < 1e-12, "{got} vs {want}");
}

#[test]
fn kde_is_the_direct_kernel_sum_and_bu_the_dropout_variance() {
    let pts: Vec<Vec<f32>> = vec![vec![0.0, 0.0], vec![1.0, 0.0], vec![0.0, 2.0]];
    let x = [0.5f32, 0.5];
    let sigma = 0.8f64;
    let direct = pts
        .iter()
        .map(|p| {
            let d2: f64 = p
                .iter()
                .zip(&x)
                .map(|(a, b)| (f64::from(*a) - f64::from(*b)).powi(2))
                .sum();
            (-d2 / (sigma * sigma)).exp()
        })
        .sum::<f64>()
        / 3.0;
    assert!((log_kde(&x, &pts, sigma) - direct.ln()).abs() < 1e-12);
    // Far away: log-sum-exp keeps it finite where the direct sum underflows.
    let far = [100f32, 100.0];
    assert!(log_kde(&far, &pts, 0.1).is_finite());
    assert_eq!(log_kde(&x, &[], 1.0), f64::NEG_INFINITY);
    // BU: passes [1, 0] and [0, 1]: mean of squared norms 1, squared norm of the mean 0.5.
    assert!((bayes_uncertainty(&[vec![1.0, 0.0], vec![0.0, 1.0]]) - 0.5).abs() < 1e-15);
    assert_eq!(bayes_uncertainty(&[vec![0.3, 0.7], vec![0.3, 0.7]]), 0.0);
}

#[test]
fn logistic_regression_weights_point_towards_the_positives() {
    let mut rng = SplitMix(4);
    let mut z = Vec::new();
    let mut y = Vec::new();
    for i in 0..400 {
        let pos = i % 2 == 0;
        let shift = if pos { 1.5 } else { 0.0 };
        z.push([gauss(&mut rng) + shift, gauss(&mut rng) + 0.5 * shift]);
        y.push(pos);
    }
    let w = fit_logistic(&z, &y);
    assert!(w[1] > 0.5 && w[2] > 0.1, "{w:?}");
    // The fitted model classifies better than chance.
    let acc = z
        .iter()
        .zip(&y)
        .filter(|(zi, yi)| (w[0] + w[1] * zi[0] + w[2] * zi[1] > 0.0) == **yi)
        .count() as f64
        / z.len() as f64;
    assert!(acc > 0.75, "{acc}");
}

// ---- through the plugin ABI (SDK test host) -----------------------------------------------------

/// A 1x4 frame description with a label.
fn frame(label: u32) -> FrameMeta {
    let mut f = TestHost::frame(1, 4);
    f.label = Some(label);
    f
}

/// A 2-class linear model over 4 features.
fn model(seed: f32) -> TestModel {
    TestModel {
        weights: vec![1.0, 0.5, 0.0, -0.5, -1.0, 0.25, seed, 0.5],
        bias: vec![0.0, 0.1],
    }
}

/// `batches` batches of 16 frames (labels alternate 0/1): class c centred at 3c.
fn clean_batches(batches: usize, seed: u64) -> (Vec<Vec<f32>>, Vec<FrameMeta>) {
    let mut rng = SplitMix(seed);
    let metas: Vec<FrameMeta> = (0..16).map(|i| frame(i % 2)).collect();
    let data = (0..batches)
        .map(|_| {
            (0..16)
                .flat_map(|i| {
                    let c = (i % 2) as f64;
                    (0..4)
                        .map(|j| (3.0 * c + gauss(&mut rng) * (1.0 + 0.2 * j as f64)) as f32)
                        .collect::<Vec<_>>()
                })
                .collect()
        })
        .collect();
    (data, metas)
}

fn fit(name: &str, params: Value, m: &TestModel) -> Result<(), testing::Failure> {
    let (data, metas) = clean_batches(8, 21);
    let mut host = TestHost::new(metas).with_model(m.clone()).with_seed(3);
    let batches: Vec<(&[f32], [usize; 4])> =
        data.iter().map(|d| (d.as_slice(), [16, 1, 1, 4])).collect();
    testing::run_batches(adverse_plugin_library(), name, &params, &mut host, &batches)?;
    Ok(())
}

fn detect(
    name: &str,
    params: Value,
    m: &TestModel,
    x: &[f32],
) -> Result<Outcome, testing::Failure> {
    let n = x.len() / 4;
    let metas: Vec<FrameMeta> = (0..n).map(|i| frame(i as u32 % 2)).collect();
    let mut host = TestHost::new(metas).with_model(m.clone()).with_seed(5);
    testing::run(
        adverse_plugin_library(),
        name,
        &params,
        &mut host,
        x,
        [n, 1, 1, 4],
    )
}

fn extra_params(name: &str) -> Value {
    match name {
        "lid" => json!({"k": 10}),
        "kde-bu" => json!({"passes": 20}),
        _ => json!({}),
    }
}

fn with(mut base: Value, extra: Value) -> Value {
    for (k, v) in extra.as_object().unwrap() {
        base[k] = v.clone();
    }
    base
}

#[test]
fn fit_then_detect_round_trips_through_the_state_file() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(0.3);
    for name in ["mahalanobis", "lid", "kde-bu"] {
        let state = dir.path().join(format!("{name}.json"));
        let sp = state.display().to_string();
        fit(
            name,
            with(
                json!({"mode": "fit", "state": sp, "fpr": 0.1}),
                extra_params(name),
            ),
            &m,
        )
        .unwrap_or_else(|e| panic!("{name} fit: {e}"));
        let text = std::fs::read_to_string(&state).unwrap_or_else(|e| panic!("{name}: {e}"));
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["format"], "adverse-detector-state");
        assert_eq!(v["detector"], name);
        assert_eq!(v["feature_dim"], 4);
        assert_eq!(v["fpr"], 0.1);
        let held = v["held_out_frames"].as_u64().unwrap();
        let fitted = v["fit_frames"].as_u64().unwrap();
        assert_eq!(held + fitted, 128, "{name}");
        assert!((20..=32).contains(&held), "{name}: {held} held out of 128");
        assert!(v["held_out_fpr"].as_f64().unwrap() <= 0.1);
        // Clean frames near the class centres vs frames far off the clean manifold.
        let clean: Vec<f32> = vec![0.1, -0.2, 0.3, 0.0, 3.1, 2.8, 3.2, 3.0];
        let off: Vec<f32> = vec![12.0, -9.0, 10.0, -11.0, -8.0, 14.0, -10.0, 9.0];
        let x: Vec<f32> = clean.iter().chain(&off).copied().collect();
        let p = with(json!({"mode": "detect", "state": sp}), extra_params(name));
        let o = detect(name, p, &m, &x).unwrap_or_else(|e| panic!("{name} detect: {e}"));
        let s: Vec<f64> = o
            .audit
            .iter()
            .map(|a| a["score"].as_f64().unwrap())
            .collect();
        let f: Vec<bool> = o
            .audit
            .iter()
            .map(|a| a["flag"].as_bool().unwrap())
            .collect();
        let thr = v["threshold"].as_f64().unwrap();
        for i in 0..4 {
            assert_eq!(f[i], s[i] > thr, "{name}: flag is score > threshold");
        }
        if name != "lid" {
            // LID measures local dimension, not distance: far points are not its target.
            assert!(
                s[2] > s[0] && s[3] > s[1],
                "{name}: off-manifold scores {s:?}"
            );
            assert!(
                f[2] && f[3] && !f[0] && !f[1],
                "{name}: flags {f:?} scores {s:?} thr {thr}"
            );
        }
    }
}

/// Through the C ABI: the fitted detector's `score_grad` returns the scores `detect` audits
/// for the same features and the state's analytic gradient; fit mode and detectors whose score
/// is no function of the features say so.
#[test]
fn mahalanobis_exports_its_score_gradient_through_the_abi() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(0.3);
    let state = dir.path().join("m.json");
    let sp = state.display().to_string();
    fit("mahalanobis", json!({"mode": "fit", "state": sp}), &m).unwrap();
    let st: crate::mahalanobis::MahalanobisState =
        serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    let f: Vec<f32> = vec![0.1, -0.2, 0.3, 0.0, 5.0, -4.0, 2.0, 7.0];
    let detect_params = json!({"mode": "detect", "state": sp});
    let mut host = TestHost::new(Vec::new());
    let (scores, grad) = testing::score_grad(
        adverse_plugin_library(),
        "mahalanobis",
        &detect_params,
        &mut host,
        &f,
        2,
        4,
    )
    .unwrap();
    for r in 0..2 {
        let (s, g) = st.score_grad(&f[r * 4..(r + 1) * 4]);
        assert!(
            (f64::from(scores[r]) - s).abs() < 1e-4 * s.max(1.0),
            "{scores:?} vs {s}"
        );
        for j in 0..4 {
            let got = f64::from(grad[r * 4 + j]);
            assert!(
                (got - g[j]).abs() < 1e-4 * g[j].abs().max(1.0),
                "{grad:?} vs {g:?}"
            );
        }
    }
    assert!(
        scores[1] > scores[0],
        "far features score higher: {scores:?}"
    );
    // Wrong feature size, fit mode, and a detector without a feature score.
    let e = testing::score_grad(
        adverse_plugin_library(),
        "mahalanobis",
        &detect_params,
        &mut host,
        &f,
        1,
        8,
    )
    .unwrap_err();
    assert!(e.message.contains("8 features per row"), "{e:?}");
    let fit_params =
        json!({"mode": "fit", "state": dir.path().join("x.json").display().to_string()});
    let e = testing::score_grad(
        adverse_plugin_library(),
        "mahalanobis",
        &fit_params,
        &mut host,
        &f,
        2,
        4,
    )
    .unwrap_err();
    assert!(e.message.contains("fit mode"), "{e:?}");
    let e = testing::score_grad(
        adverse_plugin_library(),
        "feature-squeezing",
        &json!({}),
        &mut host,
        &f,
        2,
        4,
    )
    .unwrap_err();
    assert_eq!(
        e.status,
        adverse_plugin_sdk::abi::ADV_ERR_UNSUPPORTED,
        "{e:?}"
    );
}

/// kde-bu through the C ABI: its `score_grad` scores as `detect` does (predicted class and BU
/// from the model head) and its gradient is the density term's (BU held constant), checked
/// against central differences of the state's −log K at the predicted class.
#[test]
fn kde_bu_exports_the_gradient_of_its_density_term() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(0.3);
    let state = dir.path().join("k.json");
    let sp = state.display().to_string();
    fit(
        "kde-bu",
        with(json!({"mode": "fit", "state": sp}), extra_params("kde-bu")),
        &m,
    )
    .unwrap();
    let st: crate::kde::KdeState =
        serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    let f: Vec<f32> = vec![0.4, -0.1, 0.3, 0.2, 2.6, 3.3, 2.9, 3.1];
    let params = with(
        json!({"mode": "detect", "state": sp}),
        extra_params("kde-bu"),
    );
    let mut host = TestHost::new(Vec::new()).with_model(m.clone());
    let (scores, grad) = testing::score_grad(
        adverse_plugin_library(),
        "kde-bu",
        &params,
        &mut host,
        &f,
        2,
        4,
    )
    .unwrap();
    // The same features through `detect` (the test model's features are its input): the
    // class and density the gradient follows are the ones detect audits (the BU term differs
    // by its dropout draws, another seed here).
    let o = detect("kde-bu", params, &m, &f).unwrap();
    for (r, a) in o.audit.iter().enumerate() {
        assert!(scores[r].is_finite(), "{scores:?}");
        let c = a["class"].as_f64().unwrap() as usize;
        let nll = -a["log_density"].as_f64().unwrap();
        let x = &f[r * 4..(r + 1) * 4];
        assert!((st.nll(x, c) - nll).abs() < 1e-9 * nll.abs().max(1.0));
        let k = st.score_per_nll();
        for j in 0..4 {
            let (mut hi, mut lo) = (x.to_vec(), x.to_vec());
            hi[j] += 1e-3;
            lo[j] -= 1e-3;
            let step = f64::from(hi[j]) - f64::from(lo[j]);
            let fd = k * (st.nll(&hi, c) - st.nll(&lo, c)) / step;
            let got = f64::from(grad[r * 4 + j]);
            assert!(
                (fd - got).abs() < 1e-3 * fd.abs().max(1.0),
                "row {r}, d score / d f[{j}]: analytic {got} vs finite difference {fd}"
            );
        }
    }
}

#[test]
fn a_state_fitted_on_another_model_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["mahalanobis", "lid", "kde-bu"] {
        let sp = dir
            .path()
            .join(format!("{name}.json"))
            .display()
            .to_string();
        fit(
            name,
            with(json!({"mode": "fit", "state": sp}), extra_params(name)),
            &model(0.3),
        )
        .unwrap();
        let p = with(json!({"mode": "detect", "state": sp}), extra_params(name));
        let e = detect(name, p.clone(), &model(0.9), &[0.0; 8]).unwrap_err();
        assert!(
            e.message.contains("fitted on another model") && e.message.contains(&sp),
            "{name}: {e}"
        );
        assert!(detect(name, p, &model(0.3), &[0.0; 8]).is_ok());
    }
}

#[test]
fn bad_state_files_are_refused_naming_the_file_and_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.json");
    fit(
        "mahalanobis",
        json!({"mode": "fit", "state": good.display().to_string()}),
        &model(0.3),
    )
    .unwrap();
    let text = std::fs::read_to_string(&good).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    let mut cases: Vec<(&str, String, &str)> = vec![
        ("missing", String::new(), "cannot read"),
        ("garbage", "{not json".into(), "not JSON"),
        (
            "format",
            json!({"format": "x"}).to_string(),
            "not an adverse detector state",
        ),
    ];
    let edit = |f: &dyn Fn(&mut Value)| {
        let mut w = v.clone();
        f(&mut w);
        w.to_string()
    };
    let version = edit(&|w| w["version"] = json!(99));
    let other = edit(&|w| w["detector"] = json!("lid"));
    let dims = edit(&|w| w["precision"] = json!([1.0, 2.0]));
    let missing_field = edit(&|w| {
        w.as_object_mut().unwrap().remove("means");
    });
    let thr = edit(&|w| w["threshold"] = json!(null));
    cases.push(("version", version, "version 99"));
    cases.push(("detector", other, "fitted by `lid`"));
    cases.push(("dims", dims, "inconsistent"));
    cases.push(("field", missing_field, "malformed"));
    cases.push(("threshold", thr, "malformed"));
    for (what, body, want) in cases {
        let path = dir.path().join(format!("{what}.json"));
        if what != "missing" {
            std::fs::write(&path, body).unwrap();
        }
        let e = detect(
            "mahalanobis",
            json!({"mode": "detect", "state": path.display().to_string()}),
            &model(0.3),
            &[0.0; 8],
        )
        .unwrap_err();
        assert!(
            e.message.contains(want) && e.message.contains(&path.display().to_string()),
            "{what}: {e}"
        );
    }
}

#[test]
fn fit_needs_labels_and_writes_nothing_without_them() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("s.json");
    let (data, _) = clean_batches(2, 1);
    let metas: Vec<FrameMeta> = (0..16).map(|_| TestHost::frame(1, 4)).collect();
    let mut host = TestHost::new(metas).with_model(model(0.3));
    let batches: Vec<(&[f32], [usize; 4])> =
        data.iter().map(|d| (d.as_slice(), [16, 1, 1, 4])).collect();
    testing::run_batches(
        adverse_plugin_library(),
        "mahalanobis",
        &json!({"mode": "fit", "state": state.display().to_string()}),
        &mut host,
        &batches,
    )
    .unwrap();
    assert!(!state.exists(), "no state from unlabelled frames");
}

#[test]
fn kde_fit_lr_adds_a_logistic_regression_that_keeps_the_clean_fpr() {
    let dir = tempfile::tempdir().unwrap();
    let sp = dir.path().join("kde.json").display().to_string();
    let m = model(0.3);
    fit(
        "kde-bu",
        json!({"mode": "fit", "state": sp, "passes": 20}),
        &m,
    )
    .unwrap();
    // Adversarial stand-ins: frames between the classes (low density, high uncertainty).
    let mut rng = SplitMix(8);
    let adv: Vec<f32> = (0..16 * 4)
        .map(|_| (1.5 + gauss(&mut rng) * 0.3) as f32)
        .collect();
    let metas: Vec<FrameMeta> = (0..16).map(|i| frame(i % 2)).collect();
    let mut host = TestHost::new(metas).with_model(m.clone()).with_seed(2);
    testing::run_batches(
        adverse_plugin_library(),
        "kde-bu",
        &json!({"mode": "fit-lr", "state": sp, "passes": 20}),
        &mut host,
        &[(&adv, [16, 1, 1, 4])],
    )
    .unwrap();
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&sp).unwrap()).unwrap();
    let lr = &v["lr"];
    assert_eq!(lr["positives"], 16, "{v}");
    assert!(v["held_out_fpr"].as_f64().unwrap() <= 0.05);
    // The LR's log-odds are higher on the frames it was fitted to flag than on clean ones.
    let (clean, _) = clean_batches(1, 77);
    let p = json!({"mode": "detect", "state": sp, "passes": 20});
    let mean = |x: &[f32]| {
        let o = detect("kde-bu", p.clone(), &m, x).unwrap();
        o.audit
            .iter()
            .map(|a| a["score"].as_f64().unwrap())
            .sum::<f64>()
            / o.audit.len() as f64
    };
    let (sa, sc) = (mean(&adv), mean(&clean[0]));
    assert!(sa > sc + 1.0, "adversarial {sa} vs clean {sc}: {lr}");
    // The other detectors have no fit-lr mode.
    let e = detect(
        "mahalanobis",
        json!({"mode": "fit-lr", "state": sp}),
        &m,
        &[0.0; 8],
    )
    .unwrap_err();
    assert!(e.message.contains("fit-lr"), "{e}");
}

#[test]
fn an_abi_1_1_host_without_the_feature_services_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let sp = dir.path().join("s.json").display().to_string();
    let metas: Vec<FrameMeta> = (0..2).map(frame).collect();
    let size = std::mem::offset_of!(adverse_plugin_sdk::abi::AdvHost, model_features) as u32;
    let mut host = TestHost::new(metas)
        .with_model(model(0.3))
        .with_table_size(size);
    let e = testing::run(
        adverse_plugin_library(),
        "lid",
        &json!({"mode": "fit", "state": sp}),
        &mut host,
        &[0.0; 8],
        [2, 1, 1, 4],
    )
    .unwrap_err();
    assert!(e.message.contains("predates ABI 1.2"), "{e}");
}
