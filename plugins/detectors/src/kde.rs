//! Kernel density and Bayesian uncertainty (Feinman, Curtin, Shintre & Gardner, 2017,
//! "Detecting Adversarial Samples from Artifacts").
//!
//! - KDE: a Gaussian kernel density of the clean last-hidden-layer features of each class,
//!   `K(x) = (1/|X_c|) Σ_{x_i ∈ X_c} exp(−‖x − x_i‖² / σ²)`, evaluated at the class the model
//!   predicts. Adversarial features land off the clean manifold of their (wrong) class: low
//!   density.
//! - BU: Monte-Carlo dropout uncertainty, `U = (1/T) Σ_t ŷ_tᵀŷ_t − ȳᵀȳ` over T stochastic passes
//!   (ŷ_t the softmax). The demo model has no dropout layer, so dropout (rate `dropout`, inverted
//!   scaling) is applied to the last-hidden-layer features and the T passes run through the
//!   model's head (`model_head`, ABI 1.2) — Gal & Ghahramani's approximation at that one layer.
//!
//! Both are standardised with the mean and standard deviation of the clean held-out frames
//! (z(−log K) and z(U): larger = more suspicious). Feinman et al. combine them with a logistic
//! regression trained on clean + noisy (negatives) against adversarial (positives) examples.
//! Here:
//! - `fit` (clean frames) writes a state whose score is the unweighted sum z(−log K) + z(U)
//!   (no adversarial examples are needed), thresholded at `fpr` on the held-out frames;
//! - `fit-lr` (optional, on adversarial frames, e.g. the outputs of a PGD pipeline) fits the
//!   logistic regression on those frames (positives) against the stored clean held-out frames
//!   (negatives), rewrites the state with its weights, and re-sets the threshold at the same
//!   `fpr` on the clean held-out frames. Noisy negatives are not used (Feinman et al. add them to
//!   keep the LR from flagging plain noise; the clean-only negatives here may).
//!
//! Scores: `score` (the combined score, the LR's log-odds after `fit-lr`), `flag`,
//! `log_density`, `bu`, `class` (the predicted class).

use std::path::PathBuf;

use adverse_plugin_sdk::serde::{Deserialize, Serialize};
use adverse_plugin_sdk::{Batch, Detector, Error, Host, PluginInfo, Result};

use crate::feature::{
    COMMON_SCHEMA, Common, FitData, Header, Mode, SplitMix, State, batch_features, batch_labels,
    check_model, dist2, fitted_for, load_state, save_state, score_grad_rows, subsample,
};

#[derive(Debug, Deserialize)]
#[serde(crate = "adverse_plugin_sdk::serde")]
pub struct KdeParams {
    #[serde(flatten)]
    pub common: Common,
    /// Kernel bandwidth σ in feature units; `null` = the median distance of a fit frame to its
    /// nearest fit neighbour of the same class.
    #[serde(default)]
    pub bandwidth: Option<f64>,
    /// Largest number of clean fit frames kept per class.
    #[serde(default = "default_per_class")]
    pub per_class: usize,
    /// Dropout rate on the features for BU.
    #[serde(default = "default_dropout")]
    pub dropout: f64,
    /// Monte-Carlo passes for BU.
    #[serde(default = "default_passes")]
    pub passes: usize,
}

fn default_per_class() -> usize {
    1000
}
fn default_dropout() -> f64 {
    0.5
}
fn default_passes() -> usize {
    50
}

/// The logistic regression on the standardised (−log K, U).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(crate = "adverse_plugin_sdk::serde")]
pub struct Lr {
    /// [bias, w_kde, w_bu].
    pub weights: [f64; 3],
    pub positives: usize,
    pub negatives: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(crate = "adverse_plugin_sdk::serde")]
pub struct KdeState {
    #[serde(flatten)]
    pub header: Header,
    pub bandwidth: f64,
    pub dropout: f64,
    pub passes: usize,
    /// `[K][n_c][D]` clean features per class.
    pub reference: Vec<Vec<Vec<f32>>>,
    /// Mean and standard deviation of −log K and of U on the clean held-out frames.
    pub nll_mean: f64,
    pub nll_std: f64,
    pub bu_mean: f64,
    pub bu_std: f64,
    /// The clean held-out frames' (−log K, U), the negatives of `fit-lr`.
    pub held_out: Vec<[f64; 2]>,
    /// Set by `fit-lr`.
    pub lr: Option<Lr>,
}

impl State for KdeState {
    const DETECTOR: &'static str = "kde-bu";
    fn header(&self) -> &Header {
        &self.header
    }
    fn check(&self) -> std::result::Result<(), String> {
        let d = self.header.feature_dim;
        if self.reference.len() != self.header.classes || self.reference.is_empty() {
            return Err(format!(
                "{} reference classes for {} classes",
                self.reference.len(),
                self.header.classes
            ));
        }
        if self.reference.iter().flatten().any(|r| r.len() != d) {
            return Err(format!("a reference point does not have {d} features"));
        }
        if !(self.bandwidth.is_finite() && self.bandwidth > 0.0) {
            return Err(format!("bandwidth {}", self.bandwidth));
        }
        if !(0.0..1.0).contains(&self.dropout) || self.passes < 2 {
            return Err(format!("dropout {} / passes {}", self.dropout, self.passes));
        }
        if !(self.nll_std > 0.0 && self.bu_std > 0.0) {
            return Err("zero spread of the held-out scores".into());
        }
        Ok(())
    }
}

/// `log K(x)` over `points` with kernel `exp(−‖x − x_i‖² / σ²)` (log-sum-exp); −∞ when empty.
pub fn log_kde(x: &[f32], points: &[Vec<f32>], sigma: f64) -> f64 {
    if points.is_empty() {
        return f64::NEG_INFINITY;
    }
    let s2 = sigma * sigma;
    let e: Vec<f64> = points.iter().map(|p| -dist2(x, p) / s2).collect();
    let m = e.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let sum: f64 = e.iter().map(|v| (v - m).exp()).sum();
    m + sum.ln() - (points.len() as f64).ln()
}

/// Feinman's BU from `passes` softmax rows `[T][K]`.
pub fn bayes_uncertainty(probs: &[Vec<f64>]) -> f64 {
    let t = probs.len() as f64;
    if probs.is_empty() {
        return 0.0;
    }
    let k = probs[0].len();
    let mut mean = vec![0f64; k];
    let mut sq = 0.0;
    for p in probs {
        sq += p.iter().map(|v| v * v).sum::<f64>();
        for (m, v) in mean.iter_mut().zip(p) {
            *m += v;
        }
    }
    sq / t - mean.iter().map(|m| (m / t) * (m / t)).sum::<f64>()
}

fn softmax(z: &[f32]) -> Vec<f64> {
    let m = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f64> = z.iter().map(|&v| f64::from(v - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.into_iter().map(|v| v / s).collect()
}

/// Fits `score = b + w·z` by Newton's method on the logistic loss (tiny L2 on the weights for
/// separable data); `z` rows are (z_nll, z_bu), `y` 1 for adversarial.
pub fn fit_logistic(z: &[[f64; 2]], y: &[bool]) -> [f64; 3] {
    let mut w = [0f64; 3];
    let lambda = 1e-3;
    for _ in 0..100 {
        let mut g = [0f64; 3];
        let mut h = [[0f64; 3]; 3];
        for (zi, &yi) in z.iter().zip(y) {
            let x = [1.0, zi[0], zi[1]];
            let s = w[0] + w[1] * x[1] + w[2] * x[2];
            let p = 1.0 / (1.0 + (-s).exp());
            let r = p - if yi { 1.0 } else { 0.0 };
            let q = p * (1.0 - p);
            for a in 0..3 {
                g[a] += r * x[a];
                for b in 0..3 {
                    h[a][b] += q * x[a] * x[b];
                }
            }
        }
        for a in 1..3 {
            g[a] += lambda * w[a];
            h[a][a] += lambda;
        }
        h[0][0] += 1e-9;
        let step = solve3(h, g);
        let mut change = 0.0f64;
        for a in 0..3 {
            w[a] -= step[a];
            change = change.max(step[a].abs());
        }
        if change < 1e-10 {
            break;
        }
    }
    w
}

/// Solves a 3x3 system by Gaussian elimination with partial pivoting (zeros when singular).
fn solve3(mut a: [[f64; 3]; 3], mut b: [f64; 3]) -> [f64; 3] {
    for c in 0..3 {
        let p = (c..3)
            .max_by(|&i, &j| a[i][c].abs().total_cmp(&a[j][c].abs()))
            .unwrap_or(c);
        if a[p][c].abs() < 1e-300 {
            return [0.0; 3];
        }
        a.swap(c, p);
        b.swap(c, p);
        for r in c + 1..3 {
            let f = a[r][c] / a[c][c];
            for k in c..3 {
                a[r][k] -= f * a[c][k];
            }
            b[r] -= f * b[c];
        }
    }
    let mut x = [0f64; 3];
    for r in (0..3).rev() {
        let s: f64 = (r + 1..3).map(|k| a[r][k] * x[k]).sum();
        x[r] = (b[r] - s) / a[r][r];
    }
    x
}

fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len().max(1) as f64;
    let m = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / n;
    (m, var.sqrt())
}

impl KdeState {
    /// Standardised (−log K, U).
    pub fn z(&self, nll: f64, bu: f64) -> [f64; 2] {
        [
            (nll - self.nll_mean) / self.nll_std,
            (bu - self.bu_mean) / self.bu_std,
        ]
    }
    pub fn combine(&self, z: [f64; 2]) -> f64 {
        match &self.lr {
            Some(lr) => lr.weights[0] + lr.weights[1] * z[0] + lr.weights[2] * z[1],
            None => z[0] + z[1],
        }
    }
    /// The gradient of [`KdeState::nll`] w.r.t. the features: `(2/σ²) Σ_m w_m (f − p_m)`
    /// with `w_m` the kernel weights normalised to one (zero where the density underflowed and
    /// `nll` is clamped).
    pub fn nll_grad(&self, f: &[f32], c: usize) -> Vec<f64> {
        let pts = self.reference.get(c).map_or(&[][..], |r| r.as_slice());
        let s2 = self.bandwidth * self.bandwidth;
        let e: Vec<f64> = pts.iter().map(|p| -dist2(f, p) / s2).collect();
        let m = e.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let mut g = vec![0f64; f.len()];
        if !m.is_finite() {
            return g;
        }
        let w: Vec<f64> = e.iter().map(|v| (v - m).exp()).collect();
        let total: f64 = w.iter().sum();
        for (p, wi) in pts.iter().zip(&w) {
            for (j, gj) in g.iter_mut().enumerate() {
                *gj += 2.0 / s2 * (wi / total) * (f64::from(f[j]) - f64::from(p[j]));
            }
        }
        g
    }
    /// d score / d nll (the score is linear in the z-scores).
    pub fn score_per_nll(&self) -> f64 {
        let w = self.lr.as_ref().map_or(1.0, |lr| lr.weights[1]);
        w / self.nll_std
    }
    /// −log K at class `c` (a large finite value when far from every reference point).
    pub fn nll(&self, f: &[f32], c: usize) -> f64 {
        let v = -log_kde(
            f,
            self.reference.get(c).map_or(&[][..], |r| r.as_slice()),
            self.bandwidth,
        );
        if v.is_finite() { v } else { 1e300 }
    }
}

/// Per frame of a batch: predicted class and BU, from one `model_head` call on the clean
/// features plus `passes` dropout copies.
fn class_and_bu(
    batch: &Batch<'_>,
    f: &[f32],
    d: usize,
    dropout: f64,
    passes: usize,
    stream: u64,
) -> Result<Vec<(usize, f64)>> {
    class_and_bu_rows(
        batch.host(),
        batch.len(),
        batch.seed(),
        f,
        d,
        dropout,
        passes,
        stream,
    )
}

/// [`class_and_bu`] for `n` rows of features `f` through `h`'s model head, dropout masks from
/// `seed ^ stream`.
#[allow(clippy::too_many_arguments)]
fn class_and_bu_rows(
    h: &Host<'_>,
    n: usize,
    seed: u64,
    f: &[f32],
    d: usize,
    dropout: f64,
    passes: usize,
    stream: u64,
) -> Result<Vec<(usize, f64)>> {
    let mut rng = SplitMix(seed ^ stream);
    let keep = 1.0 - dropout;
    let mut rows = Vec::with_capacity((passes + 1) * n * d);
    rows.extend_from_slice(f);
    for _ in 0..passes {
        for &v in f {
            let m = if rng.next_f64() < keep {
                (1.0 / keep) as f32
            } else {
                0.0
            };
            rows.push(v * m);
        }
    }
    let t = h.upload(&rows, &[(passes + 1) * n, d])?;
    let z = h.model_head(t)?;
    let zv = h.download(z)?;
    h.free(z)?;
    h.free(t)?;
    let k = zv.len() / ((passes + 1) * n).max(1);
    if k == 0 {
        return Err(Error::new("the model head returned no logits"));
    }
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let z0 = &zv[i * k..(i + 1) * k];
        let c = z0
            .iter()
            .enumerate()
            .fold(
                (0, f32::NEG_INFINITY),
                |a, (j, &v)| if v > a.1 { (j, v) } else { a },
            )
            .0;
        let probs: Vec<Vec<f64>> = (1..=passes)
            .map(|p| softmax(&zv[(p * n + i) * k..(p * n + i + 1) * k]))
            .collect();
        out.push((c, bayes_uncertainty(&probs)));
    }
    Ok(out)
}

/// Median distance of (up to 500 per class) reference points to their nearest same-class
/// neighbour.
pub fn auto_bandwidth(reference: &[Vec<Vec<f32>>]) -> Option<f64> {
    let mut nn = Vec::new();
    for pts in reference {
        let idx: Vec<usize> = (0..pts.len()).collect();
        for &i in &subsample(&idx, 500) {
            let m = pts
                .iter()
                .enumerate()
                .filter(|&(j, p)| j != i && dist2(&pts[i], p) > 0.0)
                .map(|(_, p)| dist2(&pts[i], p))
                .fold(f64::INFINITY, f64::min);
            if m.is_finite() {
                nn.push(m.sqrt());
            }
        }
    }
    if nn.is_empty() {
        return None;
    }
    nn.sort_by(f64::total_cmp);
    Some(nn[nn.len() / 2]).filter(|&b| b > 0.0)
}

#[derive(Debug)]
pub struct KdeBu {
    p: KdeParams,
    fit: FitData,
    /// Per fit frame: predicted class and BU.
    fit_cb: Vec<(usize, f64)>,
    state: Option<KdeState>,
    /// fit-lr: the adversarial frames' (−log K, U).
    adversarial: Vec<[f64; 2]>,
    checked: bool,
}

const STREAM_BU: u64 = 0x6b64_655f_6275_0001;

impl PluginInfo for KdeBu {
    const NAME: &'static str = "kde-bu";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str = "Kernel density of the model's features at the predicted class plus MC-dropout Bayesian uncertainty (Feinman 2017); fit on clean frames, optionally fit-lr on adversarial frames, then detect";
    type Params = KdeParams;
    fn param_schema() -> &'static str {
        static S: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        S.get_or_init(|| {
            format!(
                r#"{{"type":"object","properties":{{"mode":{{"enum":["fit","fit-lr","detect"],"description":"fit: clean frames, writes the state; fit-lr: adversarial frames, adds the logistic regression to the state; detect: score frames"}},{COMMON_SCHEMA},"bandwidth":{{"type":["number","null"],"exclusiveMinimum":0,"default":null,"description":"kernel bandwidth in feature units; null = median nearest-neighbour distance of the clean features"}},"per_class":{{"type":"integer","minimum":1,"maximum":100000,"default":1000,"description":"largest number of clean features kept per class"}},"dropout":{{"type":"number","exclusiveMinimum":0,"exclusiveMaximum":1,"default":0.5,"description":"dropout rate on the features for the MC passes"}},"passes":{{"type":"integer","minimum":2,"maximum":1000,"default":50,"description":"MC-dropout passes"}}}},"required":["mode","state"],"additionalProperties":false}}"#
            )
        })
    }
    fn create(p: KdeParams, _host: &Host<'_>) -> Result<Self> {
        p.common.validate()?;
        if !(p.dropout > 0.0 && p.dropout < 1.0) || p.passes < 2 || p.per_class == 0 {
            return Err(Error::new(
                "dropout must lie in (0, 1), passes be at least 2 and per_class at least 1",
            ));
        }
        if let Some(b) = p.bandwidth
            && !(b.is_finite() && b > 0.0)
        {
            return Err(Error::new("bandwidth must be a finite number > 0"));
        }
        let state = match p.common.mode {
            Mode::Detect | Mode::FitLr => Some(load_state::<KdeState>(&p.common.state)?),
            Mode::Fit => None,
        };
        Ok(KdeBu {
            p,
            fit: FitData::default(),
            fit_cb: Vec::new(),
            state,
            adversarial: Vec::new(),
            checked: false,
        })
    }
}

impl KdeBu {
    fn finish_fit(&self) -> Result<PathBuf> {
        let labels = self.fit.require_labels(KdeState::DETECTOR)?;
        let train = self.fit.train_rows();
        let held = self.fit.held_rows();
        if held.len() < 2 {
            return Err(Error::new("fewer than 2 held-out frames (too few frames)"));
        }
        let k = self.fit.classes();
        let mut reference = vec![Vec::new(); k];
        for (c, r) in reference.iter_mut().enumerate() {
            let rows: Vec<usize> = train
                .iter()
                .copied()
                .filter(|&i| labels[i] as usize == c)
                .collect();
            *r = subsample(&rows, self.p.per_class)
                .iter()
                .map(|&i| self.fit.row(i).to_vec())
                .collect();
        }
        let bandwidth = match self.p.bandwidth {
            Some(b) => b,
            None => auto_bandwidth(&reference).ok_or_else(|| {
                Error::new(
                    "cannot choose a bandwidth (too few distinct fit features): set `bandwidth`",
                )
            })?,
        };
        let mut st = KdeState {
            header: Header::new(KdeState::DETECTOR, &self.fit),
            bandwidth,
            dropout: self.p.dropout,
            passes: self.p.passes,
            reference,
            nll_mean: 0.0,
            nll_std: 1.0,
            bu_mean: 0.0,
            bu_std: 1.0,
            held_out: Vec::new(),
            lr: None,
        };
        st.held_out = held
            .iter()
            .map(|&i| {
                let (c, bu) = self.fit_cb[i];
                [st.nll(self.fit.row(i), c), bu]
            })
            .collect();
        // A held-out frame predicted as a class without fit frames has no density (its −log K
        // is clamped): standardising over it would overflow, so the fit is refused instead.
        if let Some(c) = held
            .iter()
            .zip(&st.held_out)
            .find(|(_, v)| v[0] >= 1e300)
            .map(|(&i, _)| self.fit_cb[i].0)
        {
            let have: Vec<usize> = (0..k).filter(|&c| !st.reference[c].is_empty()).collect();
            return Err(Error::new(format!(
                "held-out frames are predicted as class {c}, which has no fit frames (fit frames cover classes {have:?}): fit on frames of every class"
            )));
        }
        let (nm, ns) = mean_std(&st.held_out.iter().map(|v| v[0]).collect::<Vec<_>>());
        let (bm, bs) = mean_std(&st.held_out.iter().map(|v| v[1]).collect::<Vec<_>>());
        if !(ns > 0.0 && bs > 0.0) {
            return Err(Error::new(
                "the held-out densities or uncertainties do not vary: cannot standardise them",
            ));
        }
        (st.nll_mean, st.nll_std, st.bu_mean, st.bu_std) = (nm, ns, bm, bs);
        let scores = held_scores(&st);
        st.header.set_threshold(&scores, self.p.common.fpr)?;
        save_state(&self.p.common.state, &st)?;
        Ok(self.p.common.state.clone())
    }

    fn finish_lr(&self) -> Result<PathBuf> {
        let mut st = self
            .state
            .clone()
            .ok_or_else(|| Error::new("fit-lr without a state"))?;
        let mut z: Vec<[f64; 2]> = st.held_out.iter().map(|v| st.z(v[0], v[1])).collect();
        let mut y = vec![false; z.len()];
        z.extend(self.adversarial.iter().map(|v| st.z(v[0], v[1])));
        y.resize(z.len(), true);
        let w = fit_logistic(&z, &y);
        st.lr = Some(Lr {
            weights: w,
            positives: self.adversarial.len(),
            negatives: st.held_out.len(),
        });
        let scores = held_scores(&st);
        let fpr = st.header.fpr;
        st.header.set_threshold(&scores, fpr)?;
        save_state(&self.p.common.state, &st)?;
        Ok(self.p.common.state.clone())
    }
}

fn held_scores(st: &KdeState) -> Vec<f64> {
    st.held_out
        .iter()
        .map(|v| st.combine(st.z(v[0], v[1])))
        .collect()
}

impl KdeBu {
    /// Scores as `detect` computes them (predicted class and BU from the model head), and the
    /// gradient of the density term w.r.t. the features at the predicted class; BU is held
    /// constant (its dropout masks are random: an attacker sees its expectation, not its
    /// gradient).
    fn score_grad_rows(
        &self,
        h: &Host<'_>,
        f: &[f32],
        rows: usize,
        dim: usize,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let st = fitted_for(self.state.as_ref(), f, rows, dim)?;
        let cb = class_and_bu_rows(h, rows, 0, f, dim, st.dropout, st.passes, STREAM_BU)?;
        let k = st.score_per_nll();
        Ok(score_grad_rows(f, rows, dim, |r, x| {
            let (c, bu) = cb[r];
            let g = st.nll_grad(x, c).into_iter().map(|g| k * g).collect();
            (st.combine(st.z(st.nll(x, c), bu)), g)
        }))
    }
}

impl Detector for KdeBu {
    fn score_grad(
        &mut self,
        host: &Host<'_>,
        features: &[f32],
        rows: usize,
        dim: usize,
    ) -> Option<Result<(Vec<f32>, Vec<f32>)>> {
        Some(self.score_grad_rows(host, features, rows, dim))
    }

    fn detect(&mut self, batch: &Batch<'_>) -> Result<()> {
        let (f, d, id) = batch_features(batch)?;
        let n = batch.len();
        match (&self.state, self.p.common.mode) {
            (None, _) => {
                let cb = class_and_bu(batch, &f, d, self.p.dropout, self.p.passes, STREAM_BU)?;
                let labels = batch_labels(batch)?;
                let start = self.fit.len();
                self.fit.push(&id, &f, d, &labels, self.p.common.holdout)?;
                self.fit_cb.extend(&cb);
                self.fit.k = self
                    .fit
                    .k
                    .max(cb.iter().map(|c| c.0 + 1).max().unwrap_or(0));
                for i in 0..n {
                    batch.audit_flag(i, "held_out", self.fit.held[start + i])?;
                }
            }
            (Some(st), mode) => {
                if !self.checked {
                    check_model(&self.p.common.state, &st.header, &id, d)?;
                    self.checked = true;
                }
                let cb = class_and_bu(batch, &f, d, st.dropout, st.passes, STREAM_BU)?;
                let mut adv = Vec::new();
                for (i, &(c, bu)) in cb.iter().enumerate() {
                    let nll = st.nll(&f[i * d..(i + 1) * d], c);
                    let s = st.combine(st.z(nll, bu));
                    batch.audit_number(i, "score", s)?;
                    batch.audit_flag(i, "flag", s > st.header.threshold)?;
                    batch.audit_number(i, "log_density", -nll)?;
                    batch.audit_number(i, "bu", bu)?;
                    batch.audit_number(i, "class", c as f64)?;
                    adv.push([nll, bu]);
                }
                if mode == Mode::FitLr {
                    self.adversarial.extend(adv);
                }
            }
        }
        Ok(())
    }
}

impl Drop for KdeBu {
    fn drop(&mut self) {
        let r = match (
            self.p.common.mode,
            self.fit.is_empty(),
            self.adversarial.is_empty(),
        ) {
            (Mode::Fit, false, _) => self.finish_fit(),
            (Mode::FitLr, _, false) => self.finish_lr(),
            _ => return,
        };
        if let Err(e) = r {
            eprintln!("kde-bu: fit failed, no state written: {e}");
        }
    }
}
