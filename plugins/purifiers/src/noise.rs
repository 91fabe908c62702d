//! Random noise injection: a *randomised* purifier (in the spirit of Xie et al. 2018 and the
//! random self-ensemble of Liu et al. 2018): Gaussian noise of standard deviation `sigma` is
//! added to every stored value, then rounded to the stored grid and clamped to the range.
//!
//! Why it is here: a randomised defense hides the gradient in its randomness, and an attack that
//! differentiates one draw overfits to that draw. It is the defense that Expectation over
//! Transformation (EOT, Athalye et al. 2018) exists for: an evaluation attacks it with
//! `adaptive: true` and `eot: K` (the gradient averaged over K draws); without EOT its reported
//! robustness is inflated.
//!
//! `sigma` is in stored units, or a fraction of the frame's reference interval (window, else
//! stored range) with `unit: window`, so the same file works for 8-bit and CT data. The noise
//! comes from the host's counter-based generator (`random_normal`, stream 0 of the batch seed):
//! the same batch seed gives the same draw on either backend.

use adverse_plugin_sdk::serde::Deserialize;
use adverse_plugin_sdk::{Batch, Error, Host, PluginInfo, Purifier, Result, Tensor};

use crate::{audit_change, finish, metas, nchw, reference_span, rounds, stored_range};

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq)]
#[serde(rename_all = "lowercase", crate = "adverse_plugin_sdk::serde")]
pub enum NoiseUnit {
    #[default]
    Stored,
    Window,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, crate = "adverse_plugin_sdk::serde")]
pub struct NoiseParams {
    pub sigma: f64,
    #[serde(default)]
    pub unit: NoiseUnit,
}

/// Adds rounded Gaussian noise to every frame.
#[derive(Debug)]
pub struct Noise {
    sigma: f64,
    unit: NoiseUnit,
}

impl PluginInfo for Noise {
    const NAME: &'static str = "random-noise";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str =
        "Random Gaussian noise injection (a randomised defense; attack it with EOT)";
    type Params = NoiseParams;
    fn param_schema() -> &'static str {
        r#"{"type":"object","properties":{"sigma":{"type":"number","exclusiveMinimum":0,"description":"standard deviation, in `unit`"},"unit":{"enum":["stored","window"],"default":"stored","description":"stored values, or a fraction of the frame's window (stored range without one)"}},"required":["sigma"],"additionalProperties":false}"#
    }
    fn create(p: NoiseParams, _host: &Host<'_>) -> Result<Self> {
        if !(p.sigma.is_finite() && p.sigma > 0.0) {
            return Err(Error::new(format!(
                "random-noise: sigma must be a positive number, got {}",
                p.sigma
            )));
        }
        Ok(Noise {
            sigma: p.sigma,
            unit: p.unit,
        })
    }
}

impl Purifier for Noise {
    fn purify(&mut self, batch: &Batch<'_>) -> Result<Tensor> {
        let h = batch.host();
        let x = batch.input();
        let (n, c, hh, w) = nchw(batch, x)?;
        let ms = metas(batch, n)?;
        // One unit-variance draw, scaled per frame (frames may differ in window).
        let z = h.random_normal(&[n, c, hh, w], 1.0, 0)?;
        let noise = h.download(z)?;
        h.free(z)?;
        let mut data = h.download(x)?;
        let per = c * hh * w;
        for (i, m) in ms.iter().enumerate() {
            let (lo, hi) = stored_range(m).map_err(|e| Error::new(format!("frame {i}: {e}")))?;
            let s = match self.unit {
                NoiseUnit::Stored => self.sigma,
                NoiseUnit::Window => {
                    let (a, z) = reference_span(m)?;
                    self.sigma * (z - a)
                }
            } as f32;
            let round = rounds(m);
            let range = i * per..(i + 1) * per;
            for (v, e) in data[range.clone()].iter_mut().zip(&noise[range]) {
                *v = finish(*v + s * e, lo as f32, hi as f32, round);
            }
        }
        let y = h.upload(&data, &[n, c, hh, w])?;
        audit_change(batch, x, y)?;
        Ok(y)
    }
}
