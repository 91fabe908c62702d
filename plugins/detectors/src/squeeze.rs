//! Feature squeezing (Xu, Evans & Qi, NDSS 2018): an adversarial perturbation is fragile, so
//! squeezing the input (fewer intensity levels, a small median filter) moves the model's
//! softmax far more for an adversarial frame than for a clean one. The score is the largest L1
//! distance between the softmax of the frame and of each squeezed version; a frame is flagged
//! when it exceeds a threshold chosen at a target false-positive rate on clean data.
//!
//! Squeezers work on stored values, so what is measured is what a DICOM reader would see:
//! - bit-depth reduction to `b` bits *relative to the window*: the frame's first VOI window
//!   (converted to stored units through Rescale Slope/Intercept) is split into `2^b` levels, and
//!   values outside it snap to its ends; without a window the representable stored range is used
//!   (the data range for float pixels). On 8-bit data without a window, 8 bits is the identity;
//! - median filters of 2x2 (Xu et al.'s choice for small images; computed here, scipy's
//!   `median_filter(size=2, mode="reflect")` convention: window rows/cols {i-1, i}, upper median)
//!   and 3x3 (the host's `median_filter` service).

use adverse_plugin_sdk::serde::Deserialize;
use adverse_plugin_sdk::{Batch, Detector, Error, FrameMeta, Host, PluginInfo, Result, Tensor};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, crate = "adverse_plugin_sdk::serde")]
pub struct SqueezeParams {
    /// Bits of the bit-depth squeezer; `null` turns it off.
    #[serde(default = "default_bits")]
    pub bit_depth: Option<u32>,
    /// Median window sizes (2 and/or 3).
    #[serde(default = "default_median")]
    pub median: Vec<u32>,
    /// Flag frames whose score exceeds this (scores lie in [0, 2]).
    #[serde(default = "default_threshold")]
    pub threshold: f64,
}

fn default_bits() -> Option<u32> {
    Some(DEFAULT_BITS)
}
fn default_median() -> Vec<u32> {
    DEFAULT_MEDIAN.to_vec()
}
fn default_threshold() -> f64 {
    DEFAULT_THRESHOLD
}

/// Defaults (see plugins/README.md for how they were chosen on the demo model).
pub const DEFAULT_BITS: u32 = 5;
pub const DEFAULT_MEDIAN: [u32; 2] = [2, 3];
pub const DEFAULT_THRESHOLD: f64 = 0.05;

/// One squeezer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Squeezer {
    Bits(u32),
    Median(u32),
}

impl Squeezer {
    /// The audit key of this squeezer's own score.
    pub fn key(self) -> String {
        match self {
            Squeezer::Bits(b) => format!("score_bits{b}"),
            Squeezer::Median(k) => format!("score_median{k}"),
        }
    }
}

/// The stored-value interval the bit-depth squeezer quantises: the frame's window, else its
/// representable range, else (float pixels) the data range.
pub fn squeeze_range(m: &FrameMeta, data: &[f32]) -> (f64, f64) {
    if let Some((c, w)) = m.window
        && w > 1.0
        && m.rescale_slope != 0.0
        && m.rescale_slope.is_finite()
    {
        // DICOM linear VOI: the window covers [c - 0.5 - (w-1)/2, c - 0.5 + (w-1)/2].
        let lo = (c - 0.5 - (w - 1.0) / 2.0 - m.rescale_intercept) / m.rescale_slope;
        let hi = (c - 0.5 + (w - 1.0) / 2.0 - m.rescale_intercept) / m.rescale_slope;
        return (lo.min(hi), lo.max(hi));
    }
    if !m.float {
        return m.value_range;
    }
    data.iter()
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), &v| {
            (l.min(f64::from(v)), h.max(f64::from(v)))
        })
}

/// Quantises `data` in place to `2^bits` levels spanning `[lo, hi]` (values outside snap to
/// the ends). An empty or degenerate interval leaves the data unchanged.
pub fn reduce_bits(data: &mut [f32], bits: u32, (lo, hi): (f64, f64)) {
    if hi.is_nan() || lo.is_nan() || hi <= lo || bits == 0 || bits > 24 {
        return;
    }
    let levels = f64::from((1u32 << bits) - 1);
    for v in data {
        let u = ((f64::from(*v) - lo) / (hi - lo)).clamp(0.0, 1.0);
        *v = (lo + (u * levels).round() / levels * (hi - lo)) as f32;
    }
}

pub use adverse_plugin_sdk::cpu::median2x2;

/// Softmax rows of `[n, k]` logits, in f64.
pub fn softmax_rows(z: &[f32], k: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(z.len());
    for row in z.chunks(k.max(1)) {
        let mx = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let e: Vec<f64> = row.iter().map(|&v| f64::from(v - mx).exp()).collect();
        let s: f64 = e.iter().sum();
        out.extend(e.iter().map(|v| v / s));
    }
    out
}

/// The feature-squeezing detector.
#[derive(Debug)]
pub struct FeatureSqueezing {
    squeezers: Vec<Squeezer>,
    threshold: f64,
}

impl FeatureSqueezing {
    fn squeeze(
        &self,
        batch: &Batch<'_>,
        s: Squeezer,
        x: &[f32],
        shape: &[usize],
    ) -> Result<Tensor> {
        let h = batch.host();
        match s {
            Squeezer::Median(3) => h.median_filter(batch.input(), 1),
            Squeezer::Median(_) => {
                let (hh, ww) = (shape[2], shape[3]);
                let y: Vec<f32> = x
                    .chunks(hh * ww)
                    .flat_map(|p| median2x2(p, hh, ww))
                    .collect();
                h.upload(&y, shape)
            }
            Squeezer::Bits(b) => {
                let per: usize = shape[1..].iter().product();
                let mut y = x.to_vec();
                for (i, frame) in y.chunks_mut(per).enumerate() {
                    let m = batch.meta(i)?;
                    let range = squeeze_range(&m, &x[i * per..(i + 1) * per]);
                    reduce_bits(frame, b, range);
                }
                h.upload(&y, shape)
            }
        }
    }
}

impl PluginInfo for FeatureSqueezing {
    const NAME: &'static str = "feature-squeezing";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str = "Feature-squeezing detector (Xu 2018): max L1 distance between the softmax of a frame and of its bit-depth-reduced / median-filtered versions";
    type Params = SqueezeParams;
    fn param_schema() -> &'static str {
        r#"{"type":"object","properties":{"bit_depth":{"type":["integer","null"],"minimum":1,"maximum":16,"default":5,"description":"bits of the bit-depth squeezer, relative to the frame's window (else its stored range); null = off"},"median":{"type":"array","items":{"enum":[2,3]},"maxItems":2,"default":[2,3],"description":"median squeezer window sizes"},"threshold":{"type":"number","minimum":0,"maximum":2,"default":0.05,"description":"flag when the score (L1 distance of softmaxes, 0..2) exceeds this; set it at a target false-positive rate on clean data"}},"additionalProperties":false}"#
    }
    fn create(p: SqueezeParams, _host: &Host<'_>) -> Result<Self> {
        let mut squeezers: Vec<Squeezer> = p.bit_depth.map(Squeezer::Bits).into_iter().collect();
        for k in p.median {
            if !(k == 2 || k == 3) {
                return Err(Error::new(format!("median size {k}: use 2 or 3")));
            }
            if !squeezers.contains(&Squeezer::Median(k)) {
                squeezers.push(Squeezer::Median(k));
            }
        }
        if let Some(b) = p.bit_depth
            && !(1..=16).contains(&b)
        {
            return Err(Error::new(format!("bit_depth {b}: use 1..16")));
        }
        if squeezers.is_empty() {
            return Err(Error::new(
                "no squeezer: give bit_depth and/or median sizes",
            ));
        }
        if !(p.threshold.is_finite() && p.threshold >= 0.0) {
            return Err(Error::new("threshold must be a finite number >= 0"));
        }
        Ok(FeatureSqueezing {
            squeezers,
            threshold: p.threshold,
        })
    }
}

impl Detector for FeatureSqueezing {
    fn detect(&mut self, batch: &Batch<'_>) -> Result<()> {
        let h = batch.host();
        let shape = h.shape(batch.input())?;
        if shape.len() != 4 {
            return Err(Error::new(format!(
                "expected [N, C, H, W] input, got {shape:?}"
            )));
        }
        let n = batch.len();
        let x = h.download(batch.input())?;
        let z = h.model_forward(batch.input())?;
        let zv = h.download(z)?;
        let k = zv.len() / n.max(1);
        let p0 = softmax_rows(&zv, k);
        h.free(z)?;
        let mut best = vec![0f64; n];
        for &s in &self.squeezers {
            let y = self.squeeze(batch, s, &x, &shape)?;
            let zy = h.model_forward(y)?;
            let p1 = softmax_rows(&h.download(zy)?, k);
            h.free(zy)?;
            h.free(y)?;
            for i in 0..n {
                let d: f64 = p0[i * k..(i + 1) * k]
                    .iter()
                    .zip(&p1[i * k..(i + 1) * k])
                    .map(|(a, b)| (a - b).abs())
                    .sum();
                best[i] = best[i].max(d);
                batch.audit_number(i, &s.key(), d)?;
            }
        }
        for (i, &score) in best.iter().enumerate() {
            let pred = p0[i * k..(i + 1) * k]
                .iter()
                .enumerate()
                .fold(
                    (0, f64::NEG_INFINITY),
                    |a, (c, &v)| if v > a.1 { (c, v) } else { a },
                )
                .0;
            batch.audit_number(i, "score", score)?;
            batch.audit_flag(i, "flag", score > self.threshold)?;
            batch.audit_number(i, "pred", pred as f64)?;
        }
        Ok(())
    }
}
