//! Randomized smoothing (Cohen, Rosenfeld & Kolter, ICML 2019). The smoothed classifier
//! g(x) = argmax_c P(f(x + ε) = c), ε ~ N(0, σ²I), is certifiably robust: if the top class has
//! probability at least p_A, g is constant within the L2 ball of radius σ·Φ⁻¹(p_A).
//!
//! - `certify`: the class from `n0` noisy samples, a one-sided Clopper-Pearson lower bound on its
//!   probability from `n` fresh samples at confidence 1 − α, and the radius σ·Φ⁻¹(p_lower);
//!   abstain when p_lower ≤ 1/2.
//! - `predict`: the top class of `n` samples, returned only when a two-sided binomial test of
//!   its count against the runner-up's rejects p = 1/2 at level α.
//!
//! The noise is added to the stored values, so the certificate is about what a DICOM reader
//! sees. σ is given in model-input units by default (the literature's "σ = 0.25" on [0, 1]
//! inputs) and converted per frame with the host's `model_input_scale` (model-input units per
//! stored unit, from the model card's preprocessing: 1/255 for the 8-bit demo model). Radii are
//! reported in model-input units, stored units and, for CT, HU (stored × |RescaleSlope|). The
//! input-unit radius is exact when frames reach the model at their own size; a resize makes it
//! the radius of the stored-value certificate times the per-pixel scale.
//!
//! Reproducible: the noise comes from the host's counter-based generator keyed by the batch seed
//! and a stream number per phase and chunk.

use adverse_plugin_sdk::serde::Deserialize;
use adverse_plugin_sdk::{Batch, Detector, Error, Host, PluginInfo, Result, Tensor};

use crate::stats::{binomial_test_half, certified_radius, clopper_pearson_lower};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase", crate = "adverse_plugin_sdk::serde")]
pub enum Mode {
    Certify,
    Predict,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase", crate = "adverse_plugin_sdk::serde")]
pub enum SigmaUnit {
    /// Model-input units (converted with `model_input_scale`).
    Input,
    /// Stored values.
    Stored,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, crate = "adverse_plugin_sdk::serde")]
pub struct SmoothingParams {
    pub sigma: f64,
    #[serde(default = "unit_input")]
    pub sigma_unit: SigmaUnit,
    #[serde(default = "mode_certify")]
    pub mode: Mode,
    #[serde(default = "n0_default")]
    pub n0: u32,
    #[serde(default = "n_default")]
    pub n: u32,
    #[serde(default = "alpha_default")]
    pub alpha: f64,
    /// Rows per model call (noisy copies of every frame of the batch).
    #[serde(default = "batch_default")]
    pub batch: u32,
}

fn unit_input() -> SigmaUnit {
    SigmaUnit::Input
}
fn mode_certify() -> Mode {
    Mode::Certify
}
fn n0_default() -> u32 {
    100
}
fn n_default() -> u32 {
    1000
}
fn alpha_default() -> f64 {
    0.001
}
fn batch_default() -> u32 {
    256
}

/// Stream numbers: the phase in the high bits, the chunk below.
const PHASE_SELECT: u64 = 1 << 48;
const PHASE_ESTIMATE: u64 = 2 << 48;
const PHASE_PREDICT: u64 = 3 << 48;

#[derive(Debug)]
pub struct Smoothing {
    p: SmoothingParams,
}

impl PluginInfo for Smoothing {
    const NAME: &'static str = "smoothing";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str = "Randomized smoothing (Cohen 2019): Gaussian-noise majority vote; certify reports a certified L2 radius per frame";
    type Params = SmoothingParams;
    fn param_schema() -> &'static str {
        r#"{"type":"object","properties":{"sigma":{"type":"number","exclusiveMinimum":0,"maximum":1000000,"description":"noise standard deviation, in sigma_unit"},"sigma_unit":{"enum":["input","stored"],"default":"input","description":"input = model-input units (converted per frame with the model's preprocessing scale); stored = stored values"},"mode":{"enum":["certify","predict"],"default":"certify"},"n0":{"type":"integer","minimum":1,"maximum":1000000,"default":100,"description":"samples that select the class (certify)"},"n":{"type":"integer","minimum":1,"maximum":10000000,"default":1000,"description":"samples that estimate its probability"},"alpha":{"type":"number","exclusiveMinimum":0,"exclusiveMaximum":1,"default":0.001,"description":"failure probability of the certificate / level of the predict test"},"batch":{"type":"integer","minimum":1,"maximum":100000,"default":256,"description":"rows per model call"}},"required":["sigma"],"additionalProperties":false}"#
    }
    fn create(p: SmoothingParams, _host: &Host<'_>) -> Result<Self> {
        if !(p.sigma.is_finite() && p.sigma > 0.0) {
            return Err(Error::new("sigma must be a finite number > 0"));
        }
        if !(p.alpha > 0.0 && p.alpha < 1.0) {
            return Err(Error::new("alpha must lie in (0, 1)"));
        }
        if p.n == 0 || p.n0 == 0 || p.batch == 0 {
            return Err(Error::new("n, n0 and batch must be at least 1"));
        }
        Ok(Smoothing { p })
    }
}

fn argmax(v: &[u64]) -> usize {
    v.iter()
        .enumerate()
        .fold((0, 0u64), |a, (c, &x)| if x > a.1 { (c, x) } else { a })
        .0
}

impl Smoothing {
    /// Per-frame class counts of the model's predictions on `samples` noisy copies of every
    /// frame (noise N(0, sigma_stored[i]²) on stored values).
    fn counts(
        &self,
        batch: &Batch<'_>,
        x: &[f32],
        shape: &[usize],
        sigma_stored: &[f64],
        samples: u64,
        phase: u64,
    ) -> Result<Vec<Vec<u64>>> {
        let h = batch.host();
        let n = batch.len();
        let per: usize = shape[1..].iter().product();
        let copies_max = (u64::from(self.p.batch) / n as u64).max(1);
        let uniform = sigma_stored.iter().all(|&s| s == sigma_stored[0]);
        let mut counts: Vec<Vec<u64>> = vec![Vec::new(); n];
        let mut tiled: Option<(u64, Tensor)> = None;
        let (mut drawn, mut chunk) = (0u64, 0u64);
        while drawn < samples {
            let m = copies_max.min(samples - drawn);
            let rows = m as usize * n;
            let mut rshape = shape.to_vec();
            rshape[0] = rows;
            let base = match tiled {
                Some((mm, t)) if mm == m => t,
                prev => {
                    if let Some((_, t)) = prev {
                        h.free(t)?;
                    }
                    let rep: Vec<f32> = x.iter().copied().cycle().take(rows * per).collect();
                    let t = h.upload(&rep, &rshape)?;
                    tiled = Some((m, t));
                    t
                }
            };
            let stream = phase | chunk;
            let noisy = if uniform {
                let e = h.random_normal(&rshape, 1.0, stream)?;
                let y = h.axpby(1.0, base, sigma_stored[0] as f32, e)?;
                h.free(e)?;
                y
            } else {
                let e = h.random_normal(&rshape, 1.0, stream)?;
                let mut ev = h.download(e)?;
                h.free(e)?;
                for (r, row) in ev.chunks_mut(per).enumerate() {
                    let (s, x0) = (sigma_stored[r % n] as f32, &x[(r % n) * per..]);
                    for (v, xv) in row.iter_mut().zip(x0) {
                        *v = xv + s * *v;
                    }
                }
                h.upload(&ev, &rshape)?
            };
            let z = h.model_forward(noisy)?;
            let zv = h.download(z)?;
            h.free(z)?;
            h.free(noisy)?;
            let k = zv.len() / rows;
            if k == 0 {
                return Err(Error::new("the model returned no logits"));
            }
            for (r, row) in zv.chunks(k).enumerate() {
                let c = counts.get_mut(r % n).ok_or("row out of range")?;
                if c.len() < k {
                    c.resize(k, 0);
                }
                let best = row
                    .iter()
                    .enumerate()
                    .fold(
                        (0, f32::NEG_INFINITY),
                        |a, (j, &v)| if v > a.1 { (j, v) } else { a },
                    )
                    .0;
                c[best] += 1;
            }
            drawn += m;
            chunk += 1;
        }
        if let Some((_, t)) = tiled {
            h.free(t)?;
        }
        Ok(counts)
    }
}

impl Detector for Smoothing {
    fn detect(&mut self, batch: &Batch<'_>) -> Result<()> {
        let h = batch.host();
        let n = batch.len();
        let shape = h.shape(batch.input())?;
        if shape.len() < 2 || shape[0] != n {
            return Err(Error::new(format!("input shape {shape:?} for {n} frames")));
        }
        let x = h.download(batch.input())?;
        let scales = match batch.model_input_scale() {
            Ok(s) => Some(s),
            Err(e) if self.p.sigma_unit == SigmaUnit::Input => {
                return Err(Error::new(format!(
                    "sigma in model-input units needs the model's input scale: {e}"
                )));
            }
            Err(_) => None,
        };
        let mut sigma_stored = Vec::with_capacity(n);
        for i in 0..n {
            let s = match (self.p.sigma_unit, &scales) {
                (SigmaUnit::Input, Some(sc)) => {
                    let a = sc[i].abs();
                    if !(a.is_finite() && a > 0.0) {
                        return Err(Error::new(format!(
                            "frame {i}: model-input scale {} cannot convert sigma",
                            sc[i]
                        )));
                    }
                    self.p.sigma / a
                }
                _ => self.p.sigma,
            };
            sigma_stored.push(s);
        }
        let metas = (0..n).map(|i| batch.meta(i)).collect::<Result<Vec<_>>>()?;
        let alpha = self.p.alpha;
        match self.p.mode {
            Mode::Predict => {
                let c = self.counts(
                    batch,
                    &x,
                    &shape,
                    &sigma_stored,
                    self.p.n.into(),
                    PHASE_PREDICT,
                )?;
                for i in 0..n {
                    let top = argmax(&c[i]);
                    let na = c[i][top];
                    let nb = c[i]
                        .iter()
                        .enumerate()
                        .filter(|(j, _)| *j != top)
                        .map(|(_, &v)| v)
                        .max()
                        .unwrap_or(0);
                    let pv = binomial_test_half(na, na + nb);
                    let abstain = pv > alpha;
                    batch.audit_number(i, "class", if abstain { -1.0 } else { top as f64 })?;
                    batch.audit_flag(i, "abstain", abstain)?;
                    batch.audit_number(i, "p_value", pv)?;
                    batch.audit_number(i, "count", na as f64)?;
                    batch.audit_number(i, "sigma_stored", sigma_stored[i])?;
                    if let Some(l) = metas[i].label {
                        batch.audit_flag(i, "correct", !abstain && top as u32 == l)?;
                    }
                }
            }
            Mode::Certify => {
                let c0 = self.counts(
                    batch,
                    &x,
                    &shape,
                    &sigma_stored,
                    self.p.n0.into(),
                    PHASE_SELECT,
                )?;
                let c = self.counts(
                    batch,
                    &x,
                    &shape,
                    &sigma_stored,
                    self.p.n.into(),
                    PHASE_ESTIMATE,
                )?;
                for i in 0..n {
                    let ca = argmax(&c0[i]);
                    let na = c[i].get(ca).copied().unwrap_or(0);
                    let p_lower = clopper_pearson_lower(na, self.p.n.into(), alpha)
                        .ok_or("invalid Clopper-Pearson arguments")?;
                    let r_stored = certified_radius(sigma_stored[i], p_lower);
                    let abstain = r_stored.is_none();
                    let r_stored = r_stored.unwrap_or(0.0);
                    batch.audit_number(i, "class", if abstain { -1.0 } else { ca as f64 })?;
                    batch.audit_flag(i, "abstain", abstain)?;
                    batch.audit_number(i, "p_lower", p_lower)?;
                    batch.audit_number(i, "count", na as f64)?;
                    batch.audit_number(i, "sigma_stored", sigma_stored[i])?;
                    batch.audit_number(i, "radius_stored", r_stored)?;
                    if let Some(sc) = &scales {
                        batch.audit_number(i, "radius_input", r_stored * sc[i].abs())?;
                    }
                    if metas[i].modality.eq_ignore_ascii_case("CT") {
                        batch.audit_number(
                            i,
                            "radius_hu",
                            r_stored * metas[i].rescale_slope.abs(),
                        )?;
                    }
                    if let Some(l) = metas[i].label {
                        batch.audit_flag(i, "correct", !abstain && ca as u32 == l)?;
                    }
                }
            }
        }
        Ok(())
    }
}
