//! Random noise at the attack's budget: the baseline of Carlini et al. 2019's sanity checks
//! ("random noise of the same budget must do far worse than a white-box attack"). Without it an
//! evaluation cannot tell a strong attack from a model that fails under any perturbation.

use adverse_plugin_sdk::serde::Deserialize;
use adverse_plugin_sdk::{Attack, Batch, Error, Host, PluginInfo, Result, Tensor};

use crate::common::{Budget, NormKind, Setup, Unit, finish, uniforms};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, crate = "adverse_plugin_sdk::serde")]
pub struct NoiseParams {
    pub eps: f32,
    #[serde(default)]
    pub unit: Unit,
    /// Independent draws per frame; the first that fools the model is kept (1 = one draw).
    #[serde(default)]
    pub draws: Option<u32>,
}

/// Uniform random corners of the L∞ ball: every pixel moves by exactly ±ε (the largest random
/// perturbation the budget allows, so the baseline is as strong as random noise can be), then
/// the stored range clips it. With `draws` > 1 each frame keeps its first fooling draw (or the
/// last draw). Never uses the model's gradient; audits the same values as every attack.
#[derive(Debug)]
pub struct Noise {
    p: NoiseParams,
}

impl PluginInfo for Noise {
    const NAME: &'static str = "noise";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str =
        "Random +-eps noise (L-inf corners): the random baseline for sanity checks";
    type Params = NoiseParams;
    fn param_schema() -> &'static str {
        r#"{"type":"object","properties":{"eps":{"type":"number","minimum":0,"maximum":100000,"description":"L-inf budget in `unit`"},"unit":{"enum":["stored","hu","window"],"default":"stored"},"draws":{"type":"integer","minimum":1,"maximum":10000,"default":1}},"required":["eps"],"additionalProperties":false}"#
    }
    fn create(p: NoiseParams, _host: &Host<'_>) -> Result<Self> {
        if !(p.eps.is_finite() && p.eps >= 0.0) || p.draws == Some(0) {
            return Err(Error::new("noise needs eps >= 0 and draws >= 1"));
        }
        Ok(Noise { p })
    }
}

impl Attack for Noise {
    fn attack(&mut self, batch: &Batch<'_>) -> Result<Tensor> {
        let s = Setup::new(batch, false, Some((self.p.eps, self.p.unit)))?;
        let (n, d) = (s.n, s.d);
        let draws = self.p.draws.unwrap_or(1);
        let mut best = s.x0.clone();
        let mut done = vec![false; n];
        let mut tried = vec![0f64; n];
        for k in 0..draws {
            let u = uniforms(batch.seed(), u64::from(k), n * d);
            let mut x = s.x0.clone();
            for (j, v) in x.iter_mut().enumerate() {
                let i = j / d;
                *v += if u[j] < 0.5 { -s.eps[i] } else { s.eps[i] };
            }
            s.constrain(&mut x, NormKind::Linf);
            let ok = s.success(&s.preds(&s.forward(&x)?));
            for i in 0..n {
                if done[i] {
                    continue;
                }
                tried[i] += 1.0;
                best[i * d..(i + 1) * d].copy_from_slice(&x[i * d..(i + 1) * d]);
                done[i] = ok[i];
            }
            if done.iter().all(|&v| v) {
                break;
            }
        }
        finish(&s, &best, Budget::Linf, false, &[("draws", &tried)])
    }
}
