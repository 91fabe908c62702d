//! APGD-CE and APGD-DLR (Croce & Hein 2020, arXiv 2003.01690), L∞.

use adverse_plugin_sdk::serde::Deserialize;
use adverse_plugin_sdk::{Attack, Batch, Error, Host, LossKind, PluginInfo, Result, Tensor};

use crate::common::{Budget, NormKind, Setup, Unit, common_props, finish, uniforms};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, crate = "adverse_plugin_sdk::serde")]
pub struct ApgdParams {
    pub eps: f32,
    #[serde(default)]
    pub unit: Unit,
    #[serde(default)]
    pub targeted: bool,
    #[serde(default)]
    pub early_stop: bool,
    #[serde(default)]
    pub steps: Option<u32>,
    #[serde(default)]
    pub restarts: Option<u32>,
    #[serde(default)]
    pub rho: Option<f32>,
}

/// The iterations after which APGD checks its progress: `w_j = ceil(p_j T)` with `p_0 = 0`,
/// `p_1 = 0.22`, `p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06)`, as the interval lengths
/// the reference implementation uses (integer parts of 0.22T, −0.03T per check, at least 0.06T).
pub fn checkpoint_intervals(steps: u32) -> Vec<u32> {
    let t = steps as f32;
    let first = ((0.22 * t) as u32).max(1);
    let min = ((0.06 * t) as u32).max(1);
    let decr = ((0.03 * t) as u32).max(1);
    let mut out = Vec::new();
    let (mut k, mut at) = (first, 0u32);
    while at + k <= steps {
        at += k;
        out.push(k);
        k = k.saturating_sub(decr).max(min);
    }
    out
}

/// The shared APGD loop for one objective.
pub struct Apgd {
    eps: f32,
    unit: Unit,
    targeted: bool,
    early_stop: bool,
    steps: u32,
    restarts: u32,
    rho: f32,
    loss: LossKind,
    name: &'static str,
}

impl Apgd {
    fn new(p: ApgdParams, loss: LossKind, name: &'static str) -> Result<Self> {
        let a = Apgd {
            eps: p.eps,
            unit: p.unit,
            targeted: p.targeted,
            early_stop: p.early_stop,
            steps: p.steps.unwrap_or(100),
            restarts: p.restarts.unwrap_or(1),
            rho: p.rho.unwrap_or(0.75),
            loss,
            name,
        };
        if !(a.eps.is_finite() && a.eps >= 0.0) || a.steps == 0 || a.restarts == 0 {
            return Err(Error::new(format!(
                "{name} needs eps >= 0 and at least one step and restart"
            )));
        }
        if !(0.0..=1.0).contains(&a.rho) {
            return Err(Error::new(format!("{name}: rho must be in [0, 1]")));
        }
        if matches!(loss, LossKind::Dlr) && a.targeted {
            return Err(Error::new(
                "apgd-dlr is untargeted (the DLR loss has no targeted form here); use apgd-ce with targeted",
            ));
        }
        Ok(a)
    }

    fn run(&self, batch: &Batch<'_>) -> Result<Tensor> {
        let s = Setup::new(batch, self.targeted, Some((self.eps, self.unit)))?;
        if matches!(self.loss, LossKind::Dlr) && s.k < 3 {
            return Err(Error::new(format!(
                "{} needs a model with at least 3 classes (the DLR loss divides by z_pi1 - z_pi3); this model has {} classes: use apgd-ce",
                self.name, s.k
            )));
        }
        let (n, d) = (s.n, s.d);
        let norm = NormKind::Linf;
        let intervals = checkpoint_intervals(self.steps);
        let mut found = vec![false; n];
        let mut out = s.x0.clone();
        let mut out_loss = vec![f32::NEG_INFINITY; n];
        let mut iters = vec![0f64; n];
        let seed = batch.seed();
        for r in 0..self.restarts {
            if found.iter().all(|&f| f) {
                break;
            }
            // Random start: a uniform draw rescaled so its largest component reaches ε.
            let u = uniforms(seed, 100 + u64::from(r), n * d);
            let mut x = s.x0.clone();
            for i in 0..n {
                let t: Vec<f32> = u[i * d..(i + 1) * d]
                    .iter()
                    .map(|v| 2.0 * v - 1.0)
                    .collect();
                let mx = t.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
                for j in 0..d {
                    x[i * d + j] += s.eps[i] * t[j] / mx;
                }
            }
            s.constrain(&mut x, norm);
            let (mut loss, mut g) = s.loss_grad(&x, self.loss)?;
            let mut ok = s.success(&s.preds(&s.forward(&x)?));
            let mut x_best = x.clone();
            let mut g_best = g.clone();
            let mut loss_best = loss.clone();
            let mut step: Vec<f32> = s.eps.iter().map(|e| 2.0 * e).collect();
            let mut x_old = x.clone();
            let mut history: Vec<Vec<f32>> = vec![loss.clone()];
            let mut reduced_last = vec![false; n];
            let mut best_last_check = loss_best.clone();
            let (mut next_check, mut interval_idx) = (intervals.first().copied(), 0usize);
            let mut since_check = 0u32;
            let record = |x: &[f32], ok: &[bool], found: &mut [bool], out: &mut [f32]| {
                for i in (0..n).filter(|&i| ok[i]) {
                    found[i] = true;
                    out[i * d..(i + 1) * d].copy_from_slice(&x[i * d..(i + 1) * d]);
                }
            };
            record(&x, &ok, &mut found, &mut out);
            for it in 0..self.steps {
                if self.early_stop && found.iter().all(|&f| f) {
                    break;
                }
                let a = if it > 0 { 0.75 } else { 1.0 };
                let mut z = x.clone();
                for j in 0..n * d {
                    z[j] += step[j / d] * sgn(g[j]);
                }
                s.constrain(&mut z, norm);
                let mut xn = x.clone();
                for j in 0..n * d {
                    xn[j] = x[j] + a * (z[j] - x[j]) + (1.0 - a) * (x[j] - x_old[j]);
                }
                s.constrain(&mut xn, norm);
                x_old = std::mem::replace(&mut x, xn);
                (loss, g) = s.loss_grad(&x, self.loss)?;
                ok = s.success(&s.preds(&s.forward(&x)?));
                record(&x, &ok, &mut found, &mut out);
                iters.iter_mut().for_each(|v| *v += 1.0);
                for i in 0..n {
                    if loss[i] > loss_best[i] {
                        loss_best[i] = loss[i];
                        x_best[i * d..(i + 1) * d].copy_from_slice(&x[i * d..(i + 1) * d]);
                        g_best[i * d..(i + 1) * d].copy_from_slice(&g[i * d..(i + 1) * d]);
                    }
                }
                history.push(loss.clone());
                since_check += 1;
                if Some(since_check) == next_check {
                    let k = since_check as usize;
                    let len = history.len();
                    for i in 0..n {
                        let increases = (len - k..len)
                            .filter(|&h| history[h][i] > history[h - 1][i])
                            .count();
                        let oscillating = (increases as f32) < self.rho * k as f32;
                        let stalled = !reduced_last[i] && best_last_check[i] >= loss_best[i];
                        let reduce = oscillating || stalled;
                        reduced_last[i] = reduce;
                        best_last_check[i] = loss_best[i];
                        if reduce {
                            step[i] /= 2.0;
                            x[i * d..(i + 1) * d].copy_from_slice(&x_best[i * d..(i + 1) * d]);
                            g[i * d..(i + 1) * d].copy_from_slice(&g_best[i * d..(i + 1) * d]);
                        }
                    }
                    since_check = 0;
                    interval_idx += 1;
                    next_check = intervals
                        .get(interval_idx)
                        .copied()
                        .or_else(|| intervals.last().copied());
                }
            }
            for i in 0..n {
                if found[i] || loss_best[i] <= out_loss[i] {
                    continue;
                }
                out_loss[i] = loss_best[i];
                out[i * d..(i + 1) * d].copy_from_slice(&x_best[i * d..(i + 1) * d]);
            }
        }
        finish(&s, &out, Budget::Linf, true, &[("iterations", &iters)])
    }
}

fn sgn(v: f32) -> f32 {
    if v > 0.0 {
        1.0
    } else if v < 0.0 {
        -1.0
    } else {
        0.0
    }
}

macro_rules! apgd_schema {
    () => {
        concat!(
            r#"{"type":"object","properties":{"#,
            common_props!(),
            r#","steps":{"type":"integer","minimum":1,"maximum":100000,"default":100},"restarts":{"type":"integer","minimum":1,"maximum":100,"default":1},"rho":{"type":"number","minimum":0,"maximum":1,"default":0.75,"description":"fraction of successful steps below which the step size halves"}},"required":["eps"],"additionalProperties":false}"#
        )
    };
}

/// APGD-CE: PGD with momentum 0.75 and an adaptive step size (2ε, halved at checkpoints when
/// fewer than ρ = 0.75 of the steps since the last one raised the loss, or when the best loss
/// did not improve and the step was not just halved; the search then restarts from the best
/// point). Checkpoints at 0.22T, intervals shrinking by 0.03T, at least 0.06T. Parameters:
/// `eps`, `unit`, `targeted` (−CE of the target), `early_stop`, `steps` T (100), `restarts`
/// (1, each from a random start), `rho` (0.75). Keeps the adversarial point found, else the
/// highest-loss one.
#[derive(Debug)]
pub struct ApgdCe(Apgd);

/// APGD-DLR: APGD on the Difference of Logits Ratio −(Z_y − max_{i≠y} Z_i)/(Z_π1 − Z_π3),
/// invariant to the logits' scale. Untargeted only; a model with fewer than 3 classes is
/// refused at the first batch (binary medical models: use apgd-ce). Parameters as apgd-ce.
#[derive(Debug)]
pub struct ApgdDlr(Apgd);

impl std::fmt::Debug for Apgd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Apgd").field("name", &self.name).finish()
    }
}

impl PluginInfo for ApgdCe {
    const NAME: &'static str = "apgd-ce";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str = "Auto-PGD with cross-entropy (Croce & Hein 2020), L-inf";
    type Params = ApgdParams;
    fn param_schema() -> &'static str {
        apgd_schema!()
    }
    fn create(p: ApgdParams, _host: &Host<'_>) -> Result<Self> {
        Ok(ApgdCe(Apgd::new(p, LossKind::CrossEntropy, Self::NAME)?))
    }
}

impl Attack for ApgdCe {
    fn attack(&mut self, batch: &Batch<'_>) -> Result<Tensor> {
        self.0.run(batch)
    }
}

impl PluginInfo for ApgdDlr {
    const NAME: &'static str = "apgd-dlr";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str =
        "Auto-PGD with the DLR loss (Croce & Hein 2020), L-inf, untargeted, >= 3 classes";
    type Params = ApgdParams;
    fn param_schema() -> &'static str {
        apgd_schema!()
    }
    fn create(p: ApgdParams, _host: &Host<'_>) -> Result<Self> {
        Ok(ApgdDlr(Apgd::new(p, LossKind::Dlr, Self::NAME)?))
    }
}

impl Attack for ApgdDlr {
    fn attack(&mut self, batch: &Batch<'_>) -> Result<Tensor> {
        self.0.run(batch)
    }
}
