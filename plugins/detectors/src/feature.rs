//! What the feature-space detectors (`mahalanobis`, `lid`, `kde-bu`) share: the fit / detect
//! modes, the versioned state file, the accumulation of clean features over a fit run, and the
//! small dense linear algebra they need.
//!
//! Fit runs over clean frames, accumulating the model's features (`model_features`, ABI 1.2)
//! with the frames' labels. A deterministic share of frames (`holdout`, by a golden-ratio
//! sequence over the run's frame order) is held out: the detector is fitted on the rest, scores
//! the held-out frames, and sets its threshold at the target false-positive rate `fpr` on them.
//!
//! The plugin ABI has no end-of-run call, so a fitting instance writes its state when it is
//! destroyed (the host destroys every instance once the run is over). The write is atomic (a
//! temporary file renamed over the target); a failure is printed on stderr, and
//! `adverse detector fit` checks that the state file was written.
//!
//! The state is JSON: `format`, `version`, the detector's name, the model identity
//! (`model_id`: sha256 of the imported graph) and the feature size, then the detector's own
//! fields. Detect refuses a state of another format, version, detector, model or feature size
//! with a message naming the file.

use std::path::{Path, PathBuf};

use adverse_plugin_sdk::serde::de::DeserializeOwned;
use adverse_plugin_sdk::serde::{Deserialize, Serialize};
use adverse_plugin_sdk::{Batch, Error, Result, serde_json};

use crate::stats::threshold_at_fpr;

pub const STATE_FORMAT: &str = "adverse-detector-state";
pub const STATE_VERSION: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", crate = "adverse_plugin_sdk::serde")]
pub enum Mode {
    /// Accumulate clean features; write the state when the run ends.
    Fit,
    /// Score frames against a fitted state.
    Detect,
    /// `kde-bu` only: fit the logistic regression on adversarial frames (positives) against the
    /// clean held-out frames stored by `fit`; rewrites the state.
    FitLr,
}

/// The part of every state file that says what it is and what it was fitted on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(crate = "adverse_plugin_sdk::serde")]
pub struct Header {
    pub format: String,
    pub version: u32,
    pub detector: String,
    /// `model_id` of the model the features came from.
    pub model_id: String,
    pub feature_dim: usize,
    pub classes: usize,
    /// Frames the detector was fitted on / held out to set the threshold.
    pub fit_frames: usize,
    pub held_out_frames: usize,
    /// Target false-positive rate and the threshold that achieves it on the held-out frames:
    /// `flag = score > threshold`.
    pub fpr: f64,
    pub threshold: f64,
    /// Held-out clean false-positive rate at that threshold (<= fpr).
    pub held_out_fpr: f64,
}

impl Header {
    pub fn new(detector: &str, fit: &FitData) -> Header {
        Header {
            format: STATE_FORMAT.into(),
            version: STATE_VERSION,
            detector: detector.into(),
            model_id: fit.model_id.clone(),
            feature_dim: fit.dim,
            classes: fit.classes(),
            fit_frames: fit.train_rows().len(),
            held_out_frames: fit.held_rows().len(),
            fpr: 0.0,
            threshold: f64::INFINITY,
            held_out_fpr: 0.0,
        }
    }

    /// Sets the threshold at `fpr` on the clean held-out scores.
    pub fn set_threshold(&mut self, held_out_scores: &[f64], fpr: f64) -> Result<()> {
        let t = threshold_at_fpr(held_out_scores, fpr).ok_or_else(|| {
            Error::new(format!(
                "cannot set a threshold at fpr {fpr} on {} held-out scores (none, or NaN)",
                held_out_scores.len()
            ))
        })?;
        self.fpr = fpr;
        self.threshold = t;
        self.held_out_fpr = crate::stats::rate_above(held_out_scores, t);
        Ok(())
    }
}

/// A detector state: a [`Header`] plus the detector's fields.
pub trait State: Serialize + DeserializeOwned {
    const DETECTOR: &'static str;
    fn header(&self) -> &Header;
    /// Checks the detector's own fields against the header (sizes); the message names no file.
    fn check(&self) -> std::result::Result<(), String>;
}

/// Reads and checks a state file, naming the file in every error.
pub fn load_state<S: State>(path: &Path) -> Result<S> {
    let shown = path.display();
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::new(format!("detector state {shown}: cannot read it: {e}")))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::new(format!("detector state {shown}: not JSON: {e}")))?;
    let format = v.get("format").and_then(|f| f.as_str()).unwrap_or("");
    if format != STATE_FORMAT {
        return Err(Error::new(format!(
            "detector state {shown}: not an adverse detector state (format `{format}`, expected `{STATE_FORMAT}`)"
        )));
    }
    let version = v.get("version").and_then(|f| f.as_u64()).unwrap_or(0);
    if version != u64::from(STATE_VERSION) {
        return Err(Error::new(format!(
            "detector state {shown}: version {version}, this plugin reads version {STATE_VERSION} (refit it)"
        )));
    }
    let det = v.get("detector").and_then(|f| f.as_str()).unwrap_or("");
    if det != S::DETECTOR {
        return Err(Error::new(format!(
            "detector state {shown}: fitted by `{det}`, not `{}`",
            S::DETECTOR
        )));
    }
    let s: S = serde_json::from_value(v)
        .map_err(|e| Error::new(format!("detector state {shown}: malformed: {e}")))?;
    s.check()
        .map_err(|e| Error::new(format!("detector state {shown}: inconsistent: {e}")))?;
    let h = s.header();
    if !h.threshold.is_finite() || !(0.0..=1.0).contains(&h.fpr) {
        return Err(Error::new(format!(
            "detector state {shown}: threshold {} at fpr {} is not usable",
            h.threshold, h.fpr
        )));
    }
    Ok(s)
}

/// Writes `s` to `path` atomically (a temporary file in the same directory, then a rename).
pub fn save_state<S: State>(path: &Path, s: &S) -> Result<()> {
    let text = serde_json::to_string(s)
        .map_err(|e| Error::new(format!("cannot serialise the detector state: {e}")))?;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(d) = dir {
        std::fs::create_dir_all(d).map_err(|e| {
            Error::new(format!(
                "detector state {}: cannot create {}: {e}",
                path.display(),
                d.display()
            ))
        })?;
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "state".into());
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    std::fs::write(&tmp, text.as_bytes())
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Error::new(format!(
                "detector state {}: cannot write it: {e}",
                path.display()
            ))
        })
}

/// Checks the run's model against the one a state was fitted on.
pub fn check_model(path: &Path, h: &Header, model_id: &str, dim: usize) -> Result<()> {
    if h.model_id != model_id {
        return Err(Error::new(format!(
            "detector state {} was fitted on another model (model id {}…), this run's model is {}…: refit the detector on this model",
            path.display(),
            short(&h.model_id),
            short(model_id)
        )));
    }
    if h.feature_dim != dim {
        return Err(Error::new(format!(
            "detector state {}: {} features, the model gives {dim}",
            path.display(),
            h.feature_dim
        )));
    }
    Ok(())
}

fn short(s: &str) -> &str {
    s.get(..12).unwrap_or(s)
}

/// Parameters every feature-space detector takes.
#[derive(Debug, Clone, Deserialize)]
#[serde(crate = "adverse_plugin_sdk::serde")]
pub struct Common {
    pub mode: Mode,
    /// The state file: written by `fit`, read by `detect`.
    pub state: PathBuf,
    /// Target false-positive rate on held-out clean frames (fit).
    #[serde(default = "default_fpr")]
    pub fpr: f64,
    /// Share of the fit frames held out to set the threshold.
    #[serde(default = "default_holdout")]
    pub holdout: f64,
}

fn default_fpr() -> f64 {
    0.05
}
fn default_holdout() -> f64 {
    0.2
}

/// JSON Schema of `mode` for the detectors without an LR stage.
pub const MODE_SCHEMA: &str = r#""mode":{"enum":["fit","detect"],"description":"fit: accumulate clean features and write the state when the run ends; detect: score frames against the state"}"#;

/// JSON Schema properties of [`Common`] but `mode` (to splice into each detector's schema).
pub const COMMON_SCHEMA: &str = r#""state":{"type":"string","minLength":1,"description":"state file (JSON) written by fit, read by detect"},"fpr":{"type":"number","minimum":0,"maximum":1,"default":0.05,"description":"fit: target false-positive rate on the held-out clean frames"},"holdout":{"type":"number","exclusiveMinimum":0,"exclusiveMaximum":1,"default":0.2,"description":"fit: share of frames held out to set the threshold"}"#;

impl Common {
    pub fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.fpr) {
            return Err(Error::new("fpr must lie in [0, 1]"));
        }
        if !(self.holdout > 0.0 && self.holdout < 1.0) {
            return Err(Error::new("holdout must lie in (0, 1)"));
        }
        Ok(())
    }
}

/// Whether fit frame `i` (in run order) is held out: a golden-ratio low-discrepancy sequence, so
/// any prefix of the run holds out close to `share` of its frames, spread evenly.
pub fn held_out(i: usize, share: f64) -> bool {
    const PHI: f64 = 0.618_033_988_749_894_9;
    ((i as f64 + 1.0) * PHI).fract() < share
}

/// The clean features a fit run accumulated.
#[derive(Debug, Clone, Default)]
pub struct FitData {
    pub model_id: String,
    pub dim: usize,
    /// Row-major `[n, dim]`.
    pub feats: Vec<f32>,
    pub labels: Vec<Option<u32>>,
    pub held: Vec<bool>,
    /// Per frame, a detector-specific number computed with the batch (e.g. BU).
    pub extra: Vec<f64>,
    /// Classes seen (labels and logits width).
    pub k: usize,
}

impl FitData {
    pub fn len(&self) -> usize {
        self.held.len()
    }
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
    pub fn row(&self, i: usize) -> &[f32] {
        &self.feats[i * self.dim..(i + 1) * self.dim]
    }
    pub fn classes(&self) -> usize {
        self.k
    }
    pub fn train_rows(&self) -> Vec<usize> {
        (0..self.len()).filter(|&i| !self.held[i]).collect()
    }
    pub fn held_rows(&self) -> Vec<usize> {
        (0..self.len()).filter(|&i| self.held[i]).collect()
    }

    /// Appends a batch of features `[n, dim]`.
    pub fn push(
        &mut self,
        model_id: &str,
        feats: &[f32],
        dim: usize,
        labels: &[Option<u32>],
        holdout: f64,
    ) -> Result<()> {
        if self.is_empty() && self.model_id.is_empty() {
            self.model_id = model_id.to_string();
            self.dim = dim;
        } else if self.model_id != model_id || self.dim != dim {
            return Err(Error::new(
                "the model changed during the fit run (another model identity or feature size)",
            ));
        }
        for (i, l) in labels.iter().enumerate() {
            let idx = self.len();
            self.feats.extend_from_slice(&feats[i * dim..(i + 1) * dim]);
            self.labels.push(*l);
            self.held.push(held_out(idx, holdout));
            if let Some(c) = l {
                self.k = self.k.max(*c as usize + 1);
            }
        }
        Ok(())
    }

    /// Labels of every frame, or an error naming the detector that needs them.
    pub fn require_labels(&self, detector: &str) -> Result<Vec<u32>> {
        self.labels
            .iter()
            .enumerate()
            .map(|(i, l)| {
                l.ok_or_else(|| {
                    Error::new(format!(
                        "{detector} fit needs the true class of every frame; fit frame {i} has none (give --label or fit on labelled data)"
                    ))
                })
            })
            .collect()
    }
}

/// The batch's features `[n, dim]` (downloaded), with the model identity.
pub fn batch_features(batch: &Batch<'_>) -> Result<(Vec<f32>, usize, String)> {
    let h = batch.host();
    let f = h.model_features(batch.input())?;
    let shape = h.shape(f)?;
    let v = h.download(f)?;
    h.free(f)?;
    let n = batch.len();
    if shape.len() != 2 || shape[0] != n || shape[1] == 0 {
        return Err(Error::new(format!(
            "model_features returned shape {shape:?} for {n} frames"
        )));
    }
    if v.iter().any(|x| !x.is_finite()) {
        return Err(Error::new("the model's features contain NaN or infinity"));
    }
    Ok((v, shape[1], h.model_id()?))
}

/// Frame labels of a batch (None where absent).
pub fn batch_labels(batch: &Batch<'_>) -> Result<Vec<Option<u32>>> {
    (0..batch.len())
        .map(|i| batch.meta(i).map(|m| m.label))
        .collect()
}

// ---- small dense linear algebra (f64, row-major) -----------------------------------------------

/// Lower-triangular Cholesky factor of a symmetric positive definite `[d, d]` matrix.
pub fn cholesky(a: &[f64], d: usize) -> Option<Vec<f64>> {
    let mut l = vec![0f64; d * d];
    for i in 0..d {
        for j in 0..=i {
            let mut s = a[i * d + j];
            for k in 0..j {
                s -= l[i * d + k] * l[j * d + k];
            }
            if i == j {
                if s <= 0.0 || !s.is_finite() {
                    return None;
                }
                l[i * d + i] = s.sqrt();
            } else {
                l[i * d + j] = s / l[j * d + j];
            }
        }
    }
    Some(l)
}

/// The inverse of a symmetric positive definite matrix through its Cholesky factor.
pub fn spd_inverse(a: &[f64], d: usize) -> Option<Vec<f64>> {
    let l = cholesky(a, d)?;
    let mut inv = vec![0f64; d * d];
    let mut e = vec![0f64; d];
    for col in 0..d {
        e.iter_mut().for_each(|v| *v = 0.0);
        e[col] = 1.0;
        // L y = e
        let mut y = vec![0f64; d];
        for i in 0..d {
            let s: f64 = (0..i).map(|k| l[i * d + k] * y[k]).sum();
            y[i] = (e[i] - s) / l[i * d + i];
        }
        // L^T x = y
        let mut x = vec![0f64; d];
        for i in (0..d).rev() {
            let s: f64 = (i + 1..d).map(|k| l[k * d + i] * x[k]).sum();
            x[i] = (y[i] - s) / l[i * d + i];
        }
        for i in 0..d {
            inv[i * d + col] = x[i];
        }
    }
    Some(inv)
}

/// `(x - m)^T P (x - m)`.
pub fn quad_form(x: &[f32], m: &[f64], p: &[f64]) -> f64 {
    let d = m.len();
    let diff: Vec<f64> = x.iter().zip(m).map(|(&a, &b)| f64::from(a) - b).collect();
    let mut s = 0.0;
    for i in 0..d {
        let row = &p[i * d..(i + 1) * d];
        let r: f64 = row.iter().zip(&diff).map(|(a, b)| a * b).sum();
        s += diff[i] * r;
    }
    s
}

/// The fitted state a `score_grad` call scores with, after checking the features' shape
/// against it; a detector still in fit mode has no score yet.
pub fn fitted_for<'s, S: State>(
    state: Option<&'s S>,
    f: &[f32],
    rows: usize,
    dim: usize,
) -> Result<&'s S> {
    let st = state.ok_or_else(|| {
        Error::new(format!(
            "{} in fit mode has no score yet: run it with `mode: detect`",
            S::DETECTOR
        ))
    })?;
    let want = st.header().feature_dim;
    if dim != want || f.len() != rows * dim {
        return Err(Error::new(format!(
            "{dim} features per row for a state fitted on {want}"
        )));
    }
    Ok(st)
}

/// Scores and gradients for `rows` rows of `dim` features (already checked by
/// [`fitted_for`]), one row at a time through `score_grad`.
pub fn score_grad_rows(
    f: &[f32],
    rows: usize,
    dim: usize,
    score_grad: impl Fn(usize, &[f32]) -> (f64, Vec<f64>),
) -> (Vec<f32>, Vec<f32>) {
    let mut scores = Vec::with_capacity(rows);
    let mut grad = Vec::with_capacity(rows * dim);
    for r in 0..rows {
        let (s, g) = score_grad(r, &f[r * dim..(r + 1) * dim]);
        scores.push(s as f32);
        grad.extend(g.into_iter().map(|v| v as f32));
    }
    (scores, grad)
}

/// Squared Euclidean distance.
pub fn dist2(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| {
            let d = f64::from(x) - f64::from(y);
            d * d
        })
        .sum()
}

/// A small deterministic generator (SplitMix64) for plugin-side sampling.
#[derive(Debug, Clone)]
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// At most `max` of `rows`, evenly strided (deterministic, order kept).
pub fn subsample(rows: &[usize], max: usize) -> Vec<usize> {
    if rows.len() <= max {
        return rows.to_vec();
    }
    (0..max).map(|j| rows[j * rows.len() / max]).collect()
}
