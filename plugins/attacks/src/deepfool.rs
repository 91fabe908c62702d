//! DeepFool (Moosavi-Dezfooli et al. 2016, arXiv 1511.04599), L2 and L∞.

use adverse_plugin_sdk::serde::Deserialize;
use adverse_plugin_sdk::{Attack, Batch, Error, Host, LossKind, PluginInfo, Result, Tensor};

use crate::common::{Budget, NormKind, Setup, Unit, finish};

/// The CW margin with an unreachable κ is the plain logit difference `z_k - max_{i≠k} z_i`,
/// with gradient `∇z_k - ∇z_top`: the linearised boundary DeepFool needs.
pub const NO_KAPPA: f32 = f32::MAX;

/// Runs DeepFool from `start` for the frames where `active` holds, up to `steps` iterations;
/// returns the final point (`start + (1 + overshoot)·Σ r`, clipped) and iterations per frame.
pub fn deepfool(
    s: &Setup<'_>,
    start: &[f32],
    norm: NormKind,
    overshoot: f32,
    steps: u32,
    mut active: Vec<bool>,
) -> Result<(Vec<f32>, Vec<f64>)> {
    let (n, d, k) = (s.n, s.d, s.k);
    let mut x = start.to_vec();
    let mut r_tot = vec![0f32; n * d];
    let mut iters = vec![0f64; n];
    // The candidate classes of every frame: the target, or every class but the reference.
    let candidates: Vec<Vec<u32>> = (0..n)
        .map(|i| {
            if s.targeted {
                vec![s.targets[i]]
            } else {
                (0..k as u32).filter(|&c| c != s.targets[i]).collect()
            }
        })
        .collect();
    let rounds = if s.targeted { 1 } else { k - 1 };
    for _ in 0..steps {
        if !active.iter().any(|&a| a) {
            break;
        }
        // Per frame: the best (distance, f, w) over the candidate classes.
        let mut best: Vec<Option<(f32, f32, Vec<f32>)>> = vec![None; n];
        for r in 0..rounds {
            let targets: Vec<u32> = candidates.iter().map(|c| c[r]).collect();
            let (f, g) =
                s.loss_grad_for(&x, LossKind::CwMargin { kappa: NO_KAPPA }, true, &targets)?;
            for i in (0..n).filter(|&i| active[i]) {
                let w = &g[i * d..(i + 1) * d];
                let q = match norm {
                    NormKind::L2 => w.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt(),
                    NormKind::Linf => w.iter().map(|v| f64::from(v.abs())).sum::<f64>(),
                } as f32;
                if q <= 0.0 {
                    continue;
                }
                let dist = f[i].abs() / q;
                if best[i].as_ref().is_none_or(|b| dist < b.0) {
                    best[i] = Some((dist, f[i], w.to_vec()));
                }
            }
        }
        for i in 0..n {
            if !active[i] {
                continue;
            }
            let Some((_, f, w)) = &best[i] else {
                // A flat model around this frame: nothing to linearise.
                active[i] = false;
                continue;
            };
            let rt = &mut r_tot[i * d..(i + 1) * d];
            match norm {
                NormKind::L2 => {
                    let sq: f32 = w.iter().map(|v| v * v).sum();
                    let c = f.abs() / sq;
                    rt.iter_mut().zip(w).for_each(|(r, wv)| *r += c * wv);
                }
                NormKind::Linf => {
                    let l1: f32 = w.iter().map(|v| v.abs()).sum();
                    let c = f.abs() / l1;
                    rt.iter_mut()
                        .zip(w)
                        .for_each(|(r, wv)| *r += c * wv.signum() * f32::from(*wv != 0.0));
                }
            }
            for j in i * d..(i + 1) * d {
                x[j] = start[j] + (1.0 + overshoot) * r_tot[j];
            }
            iters[i] += 1.0;
        }
        s.clip(&mut x);
        let ok = s.success(&s.preds(&s.forward(&x)?));
        active.iter_mut().zip(&ok).for_each(|(a, o)| *a &= !o);
    }
    Ok((x, iters))
}

fn l2() -> NormKind {
    NormKind::L2
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, crate = "adverse_plugin_sdk::serde")]
pub struct DeepFoolParams {
    #[serde(default = "l2")]
    pub norm: NormKind,
    #[serde(default)]
    pub overshoot: Option<f32>,
    #[serde(default)]
    pub steps: Option<u32>,
    #[serde(default)]
    pub targeted: bool,
    /// Optional L∞ cap in `unit`.
    #[serde(default)]
    pub eps: Option<f32>,
    #[serde(default)]
    pub unit: Unit,
}

/// DeepFool: linearise the classifier at the current point, step to the nearest linearised
/// boundary (L2: `|f|/‖w‖₂² · w`; L∞: `|f|/‖w‖₁ · sign(w)`), repeat until the class changes;
/// the accumulated step is scaled by `1 + overshoot`. Parameters: `norm` (l2), `overshoot`
/// (0.02), `steps` (50), `targeted` (only the target's boundary), optional `eps` + `unit`
/// (an L∞ cap on the written perturbation). On a linear binary model one step reaches the
/// minimal L2 distance `|w·x + b| / ‖w‖`. Costs K-1 gradients per step (one when targeted).
#[derive(Debug)]
pub struct DeepFool {
    p: DeepFoolParams,
}

impl PluginInfo for DeepFool {
    const NAME: &'static str = "deepfool";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str = "DeepFool minimal-perturbation attack (L2 or L-inf)";
    type Params = DeepFoolParams;
    fn param_schema() -> &'static str {
        r#"{"type":"object","properties":{"norm":{"enum":["l2","linf"],"default":"l2"},"overshoot":{"type":"number","minimum":0,"maximum":10,"default":0.02},"steps":{"type":"integer","minimum":1,"maximum":10000,"default":50},"targeted":{"type":"boolean","default":false},"eps":{"type":"number","minimum":0,"description":"optional L-inf cap, in `unit`"},"unit":{"enum":["stored","hu","window"],"default":"stored"}},"additionalProperties":false}"#
    }
    fn create(p: DeepFoolParams, _host: &Host<'_>) -> Result<Self> {
        if p.overshoot.is_some_and(|o| !(o.is_finite() && o >= 0.0)) {
            return Err(Error::new("overshoot must be finite and >= 0"));
        }
        Ok(DeepFool { p })
    }
}

impl Attack for DeepFool {
    fn attack(&mut self, batch: &Batch<'_>) -> Result<Tensor> {
        let p = &self.p;
        let s = Setup::new(batch, p.targeted, p.eps.map(|e| (e, p.unit)))?;
        let active: Vec<bool> = s.success(&s.pred0).iter().map(|o| !o).collect();
        let (x, iters) = deepfool(
            &s,
            &s.x0,
            p.norm,
            p.overshoot.unwrap_or(0.02),
            p.steps.unwrap_or(50),
            active,
        )?;
        let budget = if p.eps.is_some() {
            Budget::Linf
        } else {
            Budget::Unbounded
        };
        finish(&s, &x, budget, true, &[("iterations", &iters)])
    }
}
