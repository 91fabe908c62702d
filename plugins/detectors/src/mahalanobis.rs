//! Mahalanobis distance in feature space (Lee, Lee, Lee & Shin, NeurIPS 2018): a class-
//! conditional Gaussian model of the clean features with per-class means and one shared (tied)
//! covariance; the score of a frame is the smallest squared Mahalanobis distance of its features
//! to a class mean, `min_c (f - μ_c)ᵀ Σ⁻¹ (f - μ_c)` (Lee et al.'s confidence is its negative).
//! Large = far from every clean class = suspicious. (Lee et al. also add input pre-processing
//! and combine several layers with a logistic regression; this is the single-layer score.)
//!
//! The covariance is regularised by shrinkage towards a scaled identity,
//! `Σ_s = (1 − α) Σ + α (tr Σ / D) I`, because the features after a ReLU have dead units (zero
//! variance) and D may approach the number of clean frames per class: the sample covariance is
//! then singular or badly conditioned and its inverse amplifies noise in exactly the directions
//! that carry no information. α is Ledoit & Wolf's (2004) estimate by default (the
//! MSE-optimal shrinkage for the sample size, what scikit-learn's `LedoitWolf` computes) or a
//! fixed `shrinkage` parameter.

use std::path::PathBuf;

use adverse_plugin_sdk::serde::{Deserialize, Serialize};
use adverse_plugin_sdk::{Batch, Detector, Error, Host, PluginInfo, Result};

use crate::feature::{
    COMMON_SCHEMA, Common, FitData, Header, MODE_SCHEMA, Mode, State, batch_features, batch_labels,
    check_model, fitted_for, load_state, quad_form, save_state, score_grad_rows, spd_inverse,
};

/// (Unknown fields are refused by the host's schema check: serde's `deny_unknown_fields` does
/// not work with `flatten`.)
#[derive(Debug, Deserialize)]
#[serde(crate = "adverse_plugin_sdk::serde")]
pub struct MahalanobisParams {
    #[serde(flatten)]
    pub common: Common,
    /// Shrinkage α in [0, 1]; `null` = Ledoit-Wolf.
    #[serde(default)]
    pub shrinkage: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(crate = "adverse_plugin_sdk::serde")]
pub struct MahalanobisState {
    #[serde(flatten)]
    pub header: Header,
    /// The shrinkage used.
    pub shrinkage: f64,
    /// `[K][D]` class means (a class without fit frames has an empty mean and is skipped).
    pub means: Vec<Vec<f64>>,
    /// `[D * D]` inverse of the shrunk shared covariance, row-major.
    pub precision: Vec<f64>,
}

impl State for MahalanobisState {
    const DETECTOR: &'static str = "mahalanobis";
    fn header(&self) -> &Header {
        &self.header
    }
    fn check(&self) -> std::result::Result<(), String> {
        let d = self.header.feature_dim;
        if self.precision.len() != d * d {
            return Err(format!(
                "precision has {} values for {d} features",
                self.precision.len()
            ));
        }
        if self.means.len() != self.header.classes {
            return Err(format!(
                "{} class means for {} classes",
                self.means.len(),
                self.header.classes
            ));
        }
        if self.means.iter().all(|m| m.is_empty()) {
            return Err("no class has a mean".into());
        }
        if let Some(m) = self.means.iter().find(|m| !m.is_empty() && m.len() != d) {
            return Err(format!(
                "a class mean has {} values for {d} features",
                m.len()
            ));
        }
        if self.precision.iter().any(|v| !v.is_finite()) {
            return Err("the precision matrix is not finite".into());
        }
        Ok(())
    }
}

impl MahalanobisState {
    /// (score, class): the smallest squared distance over the classes and its class.
    pub fn score(&self, f: &[f32]) -> (f64, usize) {
        self.means
            .iter()
            .enumerate()
            .filter(|(_, m)| !m.is_empty())
            .map(|(c, m)| (quad_form(f, m, &self.precision), c))
            .fold((f64::INFINITY, 0), |a, b| if b.0 < a.0 { b } else { a })
    }
}

impl MahalanobisState {
    /// The score and its gradient w.r.t. the features: for the nearest class mean `m`,
    /// `d/df (f - m)' P (f - m) = (P + P')(f - m)` (the minimum over classes is differentiated
    /// at its argmin, where it is locally that class's quadratic form).
    pub fn score_grad(&self, f: &[f32]) -> (f64, Vec<f64>) {
        let (s, c) = self.score(f);
        let m = &self.means[c];
        let d = m.len();
        let diff: Vec<f64> = f.iter().zip(m).map(|(&a, &b)| f64::from(a) - b).collect();
        let p = &self.precision;
        let g = (0..d)
            .map(|i| {
                (0..d)
                    .map(|j| (p[i * d + j] + p[j * d + i]) * diff[j])
                    .sum::<f64>()
            })
            .collect();
        (s, g)
    }
}

/// Ledoit-Wolf shrinkage of the covariance of the (already centred) rows `x` `[n, d]`.
pub fn ledoit_wolf(x: &[f64], n: usize, d: usize, s: &[f64]) -> f64 {
    if n == 0 || d == 0 {
        return 1.0;
    }
    let (nf, df) = (n as f64, d as f64);
    let tr: f64 = (0..d).map(|i| s[i * d + i]).sum();
    let mu = tr / df;
    let fro2: f64 = s.iter().map(|v| v * v).sum();
    let beta_: f64 = x
        .chunks(d)
        .map(|r| {
            let q: f64 = r.iter().map(|v| v * v).sum();
            q * q
        })
        .sum();
    let beta = (beta_ / nf - fro2) / (df * nf);
    let delta = (fro2 - 2.0 * mu * tr + df * mu * mu) / df;
    let beta = beta.min(delta);
    if beta <= 0.0 || delta <= 0.0 {
        0.0
    } else {
        beta / delta
    }
}

/// Fits means and the shrunk tied covariance on `rows` of `fit` with labels `labels`.
pub fn fit_state(
    fit: &FitData,
    rows: &[usize],
    labels: &[u32],
    shrinkage: Option<f64>,
) -> Result<MahalanobisState> {
    let d = fit.dim;
    let k = fit.classes();
    let mut sums = vec![vec![0f64; d]; k];
    let mut counts = vec![0usize; k];
    for &r in rows {
        let c = labels[r] as usize;
        counts[c] += 1;
        for (s, &v) in sums[c].iter_mut().zip(fit.row(r)) {
            *s += f64::from(v);
        }
    }
    let means: Vec<Vec<f64>> = sums
        .into_iter()
        .zip(&counts)
        .map(|(s, &n)| {
            if n == 0 {
                Vec::new()
            } else {
                s.into_iter().map(|v| v / n as f64).collect()
            }
        })
        .collect();
    let n = rows.len();
    if n < 2 {
        return Err(Error::new(format!(
            "mahalanobis fit needs at least 2 fit frames, got {n}"
        )));
    }
    let mut x = Vec::with_capacity(n * d);
    for &r in rows {
        let m = &means[labels[r] as usize];
        x.extend(fit.row(r).iter().zip(m).map(|(&v, &mv)| f64::from(v) - mv));
    }
    let mut cov = vec![0f64; d * d];
    for row in x.chunks(d) {
        for i in 0..d {
            let xi = row[i];
            if xi == 0.0 {
                continue;
            }
            for j in i..d {
                cov[i * d + j] += xi * row[j];
            }
        }
    }
    for i in 0..d {
        for j in i..d {
            let v = cov[i * d + j] / n as f64;
            cov[i * d + j] = v;
            cov[j * d + i] = v;
        }
    }
    let alpha = match shrinkage {
        Some(a) => a,
        None => ledoit_wolf(&x, n, d, &cov),
    };
    let mu = (0..d).map(|i| cov[i * d + i]).sum::<f64>() / d as f64;
    let target = if mu > 0.0 { mu } else { 1.0 };
    let mut shrunk: Vec<f64> = cov.iter().map(|v| (1.0 - alpha) * v).collect();
    for i in 0..d {
        shrunk[i * d + i] += alpha * target;
    }
    let precision = spd_inverse(&shrunk, d).ok_or_else(|| {
        Error::new(format!(
            "the shrunk covariance (shrinkage {alpha:.4}) is singular: give a larger `shrinkage`"
        ))
    })?;
    Ok(MahalanobisState {
        header: Header::new(MahalanobisState::DETECTOR, fit),
        shrinkage: alpha,
        means,
        precision,
    })
}

#[derive(Debug)]
pub struct Mahalanobis {
    p: MahalanobisParams,
    fit: FitData,
    state: Option<MahalanobisState>,
    checked: bool,
}

impl PluginInfo for Mahalanobis {
    const NAME: &'static str = "mahalanobis";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str = "Mahalanobis distance of the model's features to the clean class means (Lee 2018), tied covariance with shrinkage; fit on clean frames, then detect";
    type Params = MahalanobisParams;
    fn param_schema() -> &'static str {
        static S: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        S.get_or_init(|| {
            format!(
                r#"{{"type":"object","properties":{{{MODE_SCHEMA},{COMMON_SCHEMA},"shrinkage":{{"type":["number","null"],"minimum":0,"maximum":1,"default":null,"description":"covariance shrinkage towards a scaled identity; null = Ledoit-Wolf"}}}},"required":["mode","state"],"additionalProperties":false}}"#
            )
        })
    }
    fn create(p: MahalanobisParams, _host: &Host<'_>) -> Result<Self> {
        p.common.validate()?;
        if let Some(a) = p.shrinkage
            && !(0.0..=1.0).contains(&a)
        {
            return Err(Error::new("shrinkage must lie in [0, 1]"));
        }
        let state = match p.common.mode {
            Mode::Detect => Some(load_state::<MahalanobisState>(&p.common.state)?),
            Mode::Fit => None,
            Mode::FitLr => return Err(Error::new("mahalanobis has no fit-lr mode")),
        };
        Ok(Mahalanobis {
            p,
            fit: FitData::default(),
            state,
            checked: false,
        })
    }
}

impl Mahalanobis {
    fn finish(&self) -> Result<PathBuf> {
        let labels = self.fit.require_labels(MahalanobisState::DETECTOR)?;
        let train = self.fit.train_rows();
        let held = self.fit.held_rows();
        if held.is_empty() {
            return Err(Error::new(
                "no held-out frames to set the threshold (too few frames)",
            ));
        }
        let mut st = fit_state(&self.fit, &train, &labels, self.p.shrinkage)?;
        let scores: Vec<f64> = held.iter().map(|&r| st.score(self.fit.row(r)).0).collect();
        st.header.set_threshold(&scores, self.p.common.fpr)?;
        save_state(&self.p.common.state, &st)?;
        Ok(self.p.common.state.clone())
    }
}

impl Detector for Mahalanobis {
    fn score_grad(
        &mut self,
        _host: &Host<'_>,
        features: &[f32],
        rows: usize,
        dim: usize,
    ) -> Option<Result<(Vec<f32>, Vec<f32>)>> {
        Some(self.score_grad_rows(features, rows, dim))
    }

    fn detect(&mut self, batch: &Batch<'_>) -> Result<()> {
        let (f, d, id) = batch_features(batch)?;
        match &self.state {
            None => {
                let labels = batch_labels(batch)?;
                let start = self.fit.len();
                self.fit.push(&id, &f, d, &labels, self.p.common.holdout)?;
                for i in 0..batch.len() {
                    batch.audit_flag(i, "held_out", self.fit.held[start + i])?;
                }
            }
            Some(st) => {
                if !self.checked {
                    check_model(&self.p.common.state, &st.header, &id, d)?;
                    self.checked = true;
                }
                for i in 0..batch.len() {
                    let (s, c) = st.score(&f[i * d..(i + 1) * d]);
                    batch.audit_number(i, "score", s)?;
                    batch.audit_flag(i, "flag", s > st.header.threshold)?;
                    batch.audit_number(i, "class", c as f64)?;
                }
            }
        }
        Ok(())
    }
}

impl Mahalanobis {
    fn score_grad_rows(&self, f: &[f32], rows: usize, dim: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        let st = fitted_for(self.state.as_ref(), f, rows, dim)?;
        Ok(score_grad_rows(f, rows, dim, |_, x| st.score_grad(x)))
    }
}

impl Drop for Mahalanobis {
    fn drop(&mut self) {
        if self.state.is_none()
            && !self.fit.is_empty()
            && let Err(e) = self.finish()
        {
            eprintln!("mahalanobis: fit failed, no state written: {e}");
        }
    }
}
