//! Local intrinsic dimensionality (Ma et al., ICLR 2018): adversarial regions of feature space
//! have a higher local dimension than the clean data manifold. The maximum-likelihood estimate
//! (Levina & Bickel; Amsaleg et al. 2015) of a point's LID from its `k` nearest neighbours at
//! distances `r_1 <= … <= r_k` is `LID = −( (1/k) Σ_i log(r_i / r_k) )⁻¹`.
//!
//! Ma et al. estimate it within a minibatch of clean examples; here the neighbours come from a
//! stored reference set of clean features (up to `reference` fit frames, evenly strided), so a
//! frame's score does not depend on which frames share its batch. The score is the LID of the
//! model's feature vector (one layer: the last hidden layer by default; Ma et al. use every
//! layer with a logistic regression).

use std::path::PathBuf;

use adverse_plugin_sdk::serde::{Deserialize, Serialize};
use adverse_plugin_sdk::{Batch, Detector, Error, Host, PluginInfo, Result};

use crate::feature::{
    COMMON_SCHEMA, Common, FitData, Header, MODE_SCHEMA, Mode, State, batch_features, batch_labels,
    check_model, dist2, fitted_for, load_state, save_state, score_grad_rows, subsample,
};

#[derive(Debug, Deserialize)]
#[serde(crate = "adverse_plugin_sdk::serde")]
pub struct LidParams {
    #[serde(flatten)]
    pub common: Common,
    /// Neighbours in the estimate.
    #[serde(default = "default_k")]
    pub k: usize,
    /// Largest reference set (fit frames kept in the state).
    #[serde(default = "default_reference")]
    pub reference: usize,
}

fn default_k() -> usize {
    20
}
fn default_reference() -> usize {
    1000
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(crate = "adverse_plugin_sdk::serde")]
pub struct LidState {
    #[serde(flatten)]
    pub header: Header,
    pub k: usize,
    /// `[R][D]` clean reference features.
    pub reference: Vec<Vec<f32>>,
}

impl State for LidState {
    const DETECTOR: &'static str = "lid";
    fn header(&self) -> &Header {
        &self.header
    }
    fn check(&self) -> std::result::Result<(), String> {
        let d = self.header.feature_dim;
        if self.k < 2 {
            return Err(format!("k = {} (at least 2)", self.k));
        }
        if self.reference.len() < self.k {
            return Err(format!(
                "{} reference points for k = {}",
                self.reference.len(),
                self.k
            ));
        }
        if let Some(r) = self.reference.iter().find(|r| r.len() != d) {
            return Err(format!(
                "a reference point has {} values for {d} features",
                r.len()
            ));
        }
        Ok(())
    }
}

/// The MLE LID of `x` from its `k` nearest neighbours among `reference` (distances of exactly
/// zero, duplicates of `x`, are skipped). `None` with fewer than 2 usable neighbours or when
/// all neighbours are equidistant.
pub fn lid_mle<'a>(x: &[f32], reference: impl Iterator<Item = &'a [f32]>, k: usize) -> Option<f64> {
    let mut d: Vec<f64> = reference
        .map(|r| dist2(x, r))
        .filter(|&v| v > 0.0)
        .collect();
    if d.len() < 2 || k < 2 {
        return None;
    }
    let k = k.min(d.len());
    d.select_nth_unstable_by(k - 1, f64::total_cmp);
    let mut near: Vec<f64> = d[..k].iter().map(|v| v.sqrt()).collect();
    near.sort_by(f64::total_cmp);
    let rk = near[k - 1];
    let s: f64 = near.iter().map(|r| (r / rk).ln()).sum::<f64>() / k as f64;
    if s >= 0.0 { None } else { Some(-1.0 / s) }
}

/// [`lid_mle`] and its gradient w.r.t. `x`, with the `k` nearest neighbours held fixed (the
/// estimate is piecewise smooth: it is differentiated inside the region where the neighbour
/// set does not change). With `r_i` the sorted neighbour distances and
/// `s = (1/k) sum_i ln(r_i / r_k)`, LID = -1/s and `dLID/dx = ds/dx / s^2`, where
/// `ds/dx = (1/k) sum_i ((x - n_i) / r_i^2 - (x - n_k) / r_k^2)`. `None` where `lid_mle` is.
pub fn lid_mle_grad(x: &[f32], reference: &[Vec<f32>], k: usize) -> Option<(f64, Vec<f64>)> {
    let mut d: Vec<(f64, usize)> = reference
        .iter()
        .enumerate()
        .map(|(i, r)| (dist2(x, r), i))
        .filter(|&(v, _)| v > 0.0)
        .collect();
    if d.len() < 2 || k < 2 {
        return None;
    }
    let k = k.min(d.len());
    d.select_nth_unstable_by(k - 1, |a, b| a.0.total_cmp(&b.0));
    let mut near = d[..k].to_vec();
    near.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (rk2, kk) = near[k - 1];
    let rk = rk2.sqrt();
    let s: f64 = near.iter().map(|&(v, _)| (v.sqrt() / rk).ln()).sum::<f64>() / k as f64;
    if s >= 0.0 {
        return None;
    }
    let mut ds = vec![0f64; x.len()];
    for &(v, i) in &near {
        for (j, g) in ds.iter_mut().enumerate() {
            let xj = f64::from(x[j]);
            *g += ((xj - f64::from(reference[i][j])) / v
                - (xj - f64::from(reference[kk][j])) / rk2)
                / k as f64;
        }
    }
    let inv = 1.0 / (s * s);
    Some((-1.0 / s, ds.into_iter().map(|g| g * inv).collect()))
}

impl LidState {
    pub fn score(&self, f: &[f32]) -> f64 {
        lid_mle(f, self.reference.iter().map(|r| r.as_slice()), self.k).unwrap_or(0.0)
    }

    /// The score and its gradient (zero where the estimate is undefined and the score is 0).
    pub fn score_grad(&self, f: &[f32]) -> (f64, Vec<f64>) {
        lid_mle_grad(f, &self.reference, self.k).unwrap_or_else(|| (0.0, vec![0.0; f.len()]))
    }
}

#[derive(Debug)]
pub struct Lid {
    p: LidParams,
    fit: FitData,
    state: Option<LidState>,
    checked: bool,
}

impl PluginInfo for Lid {
    const NAME: &'static str = "lid";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str = "Local intrinsic dimensionality of the model's features among clean reference features (Ma 2018, MLE estimate); fit on clean frames, then detect";
    type Params = LidParams;
    fn param_schema() -> &'static str {
        static S: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        S.get_or_init(|| {
            format!(
                r#"{{"type":"object","properties":{{{MODE_SCHEMA},{COMMON_SCHEMA},"k":{{"type":"integer","minimum":2,"maximum":1000,"default":20,"description":"nearest neighbours in the estimate"}},"reference":{{"type":"integer","minimum":2,"maximum":100000,"default":1000,"description":"largest number of clean fit frames kept as the reference set"}}}},"required":["mode","state"],"additionalProperties":false}}"#
            )
        })
    }
    fn create(p: LidParams, _host: &Host<'_>) -> Result<Self> {
        p.common.validate()?;
        if p.k < 2 || p.reference < p.k {
            return Err(Error::new("k must be at least 2 and reference at least k"));
        }
        let state = match p.common.mode {
            Mode::Detect => Some(load_state::<LidState>(&p.common.state)?),
            Mode::Fit => None,
            Mode::FitLr => return Err(Error::new("lid has no fit-lr mode")),
        };
        Ok(Lid {
            p,
            fit: FitData::default(),
            state,
            checked: false,
        })
    }
}

impl Lid {
    fn finish(&self) -> Result<PathBuf> {
        let train = self.fit.train_rows();
        let held = self.fit.held_rows();
        if held.is_empty() || train.len() < self.p.k {
            return Err(Error::new(format!(
                "{} fit and {} held-out frames: need at least k = {} fit frames and one held out",
                train.len(),
                held.len(),
                self.p.k
            )));
        }
        let refs = subsample(&train, self.p.reference);
        let mut st = LidState {
            header: Header::new(LidState::DETECTOR, &self.fit),
            k: self.p.k,
            reference: refs.iter().map(|&r| self.fit.row(r).to_vec()).collect(),
        };
        let scores: Vec<f64> = held.iter().map(|&r| st.score(self.fit.row(r))).collect();
        st.header.set_threshold(&scores, self.p.common.fpr)?;
        save_state(&self.p.common.state, &st)?;
        Ok(self.p.common.state.clone())
    }
}

impl Detector for Lid {
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
                    let s = st.score(&f[i * d..(i + 1) * d]);
                    batch.audit_number(i, "score", s)?;
                    batch.audit_flag(i, "flag", s > st.header.threshold)?;
                }
            }
        }
        Ok(())
    }
}

impl Lid {
    fn score_grad_rows(&self, f: &[f32], rows: usize, dim: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        let st = fitted_for(self.state.as_ref(), f, rows, dim)?;
        Ok(score_grad_rows(f, rows, dim, |_, x| st.score_grad(x)))
    }
}

impl Drop for Lid {
    fn drop(&mut self) {
        if self.state.is_none()
            && !self.fit.is_empty()
            && let Err(e) = self.finish()
        {
            eprintln!("lid: fit failed, no state written: {e}");
        }
    }
}
