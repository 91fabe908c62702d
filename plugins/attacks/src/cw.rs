//! Carlini-Wagner L2 (Carlini & Wagner 2017, arXiv 1608.04644).

use adverse_plugin_sdk::serde::Deserialize;
use adverse_plugin_sdk::{Attack, Batch, Error, Host, LossKind, PluginInfo, Result, Tensor};

use crate::common::{Budget, Setup, Unit, finish, l2_dist};
use crate::deepfool::NO_KAPPA;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, crate = "adverse_plugin_sdk::serde")]
pub struct CwParams {
    #[serde(default)]
    pub kappa: Option<f32>,
    #[serde(default)]
    pub c_init: Option<f32>,
    #[serde(default)]
    pub search_steps: Option<u32>,
    #[serde(default)]
    pub steps: Option<u32>,
    #[serde(default)]
    pub lr: Option<f32>,
    #[serde(default)]
    pub abort_early: Option<bool>,
    #[serde(default)]
    pub targeted: bool,
    /// Optional L∞ cap in `unit`.
    #[serde(default)]
    pub eps: Option<f32>,
    #[serde(default)]
    pub unit: Unit,
}

/// C&W L2: minimise `‖δ‖₂² + c·max(Z_y − max_{i≠y} Z_i, −κ)` (targeted:
/// `max_{i≠t} Z_i − Z_t`) over `w` with `x = lo + (hi − lo)(tanh w + 1)/2`, so the stored range
/// holds by construction; Adam (`lr` 0.01) for `steps` (1000) iterations, aborting early when
/// the objective stalls (checked every `steps`/10); `search_steps` (9) rounds of binary search
/// on c from `c_init` (1e-3; ×10 while no success is known). Keeps per frame the smallest-L2
/// adversarial point found (success counted with the κ margin). `eps` + `unit`: optional L∞
/// cap on the written perturbation. The distance term is measured in units of the frame's
/// stored range (`‖δ / (hi − lo)‖₂²`), so c keeps the scale it has in the paper whatever the
/// bit depth; the reported `l2` is in stored units.
#[derive(Debug)]
pub struct CwL2 {
    kappa: f32,
    c_init: f32,
    search_steps: u32,
    steps: u32,
    lr: f32,
    abort_early: bool,
    targeted: bool,
    eps: Option<(f32, Unit)>,
}

impl PluginInfo for CwL2 {
    const NAME: &'static str = "cw-l2";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str =
        "Carlini-Wagner L2 attack (tanh space, Adam, binary search over c)";
    type Params = CwParams;
    fn param_schema() -> &'static str {
        r#"{"type":"object","properties":{"kappa":{"type":"number","minimum":0,"maximum":1000,"default":0},"c_init":{"type":"number","exclusiveMinimum":0,"maximum":1e10,"default":0.001},"search_steps":{"type":"integer","minimum":1,"maximum":50,"default":9},"steps":{"type":"integer","minimum":1,"maximum":100000,"default":1000},"lr":{"type":"number","exclusiveMinimum":0,"maximum":10,"default":0.01},"abort_early":{"type":"boolean","default":true},"targeted":{"type":"boolean","default":false},"eps":{"type":"number","minimum":0,"description":"optional L-inf cap, in `unit`"},"unit":{"enum":["stored","hu","window"],"default":"stored"}},"additionalProperties":false}"#
    }
    fn create(p: CwParams, _host: &Host<'_>) -> Result<Self> {
        let cw = CwL2 {
            kappa: p.kappa.unwrap_or(0.0),
            c_init: p.c_init.unwrap_or(1e-3),
            search_steps: p.search_steps.unwrap_or(9),
            steps: p.steps.unwrap_or(1000),
            lr: p.lr.unwrap_or(0.01),
            abort_early: p.abort_early.unwrap_or(true),
            targeted: p.targeted,
            eps: p.eps.map(|e| (e, p.unit)),
        };
        let finite_pos = |v: f32| v.is_finite() && v >= 0.0;
        if !(finite_pos(cw.kappa) && cw.c_init > 0.0 && finite_pos(cw.c_init) && cw.lr > 0.0)
            || cw.steps == 0
            || cw.search_steps == 0
        {
            return Err(Error::new(
                "cw-l2 needs kappa >= 0, c_init > 0, lr > 0 and at least one step",
            ));
        }
        Ok(cw)
    }
}

impl Attack for CwL2 {
    fn attack(&mut self, batch: &Batch<'_>) -> Result<Tensor> {
        let s = Setup::new(batch, self.targeted, self.eps)?;
        let (n, d) = (s.n, s.d);
        let span: Vec<f64> = (0..n)
            .map(|i| f64::from(s.hi[i] - s.lo[i]).max(1e-6))
            .collect();
        let to_x = |w: &[f64], x: &mut [f32]| {
            for (j, (xv, wv)) in x.iter_mut().zip(w).enumerate() {
                let i = j / d;
                *xv = (f64::from(s.lo[i]) + span[i] * (wv.tanh() + 1.0) / 2.0) as f32;
            }
        };
        let w0: Vec<f64> =
            s.x0.iter()
                .enumerate()
                .map(|(j, &v)| {
                    let i = j / d;
                    let u = (f64::from(v - s.lo[i]) / span[i] * 2.0 - 1.0)
                        .clamp(-1.0 + 1e-6, 1.0 - 1e-6);
                    u.atanh()
                })
                .collect();
        let mut c = vec![f64::from(self.c_init); n];
        let mut lower = vec![0f64; n];
        let mut upper = vec![1e10f64; n];
        let mut best_l2 = vec![f32::INFINITY; n];
        let mut best_x = s.x0.clone();
        let mut iters = vec![0f64; n];
        let kappa = self.kappa;
        let check_every = (self.steps / 10).max(1);
        let mut x = s.x0.clone();
        for _ in 0..self.search_steps {
            let mut w = w0.clone();
            let (mut m, mut v) = (vec![0f64; n * d], vec![0f64; n * d]);
            let mut found = vec![false; n];
            let mut prev = f64::INFINITY;
            for it in 0..self.steps {
                to_x(&w, &mut x);
                let (l, g) = s.loss_grad(&x, LossKind::CwMargin { kappa: NO_KAPPA })?;
                let mut total = 0f64;
                for i in 0..n {
                    // The service's objective is minus the margin (it ascends towards success).
                    let margin = -l[i];
                    let (xs, os) = (s.sample(&x, i), s.sample(&s.x0, i));
                    let l2 = l2_dist(xs, os);
                    let inv2 = 1.0 / (span[i] * span[i]);
                    total += f64::from(l2).powi(2) * inv2 + c[i] * f64::from(margin.max(-kappa));
                    if margin < 0.0 && margin <= -kappa {
                        found[i] = true;
                        if l2 < best_l2[i] {
                            best_l2[i] = l2;
                            best_x[i * d..(i + 1) * d].copy_from_slice(xs);
                        }
                    }
                    let on = margin > -kappa;
                    let t = (it + 1) as i32;
                    for j in i * d..(i + 1) * d {
                        // d/dx of ‖(x − x0)/span‖² + c·max(margin, −κ); d margin/dx = −g.
                        let gx = 2.0 * f64::from(x[j] - s.x0[j]) * inv2
                            - if on { c[i] * f64::from(g[j]) } else { 0.0 };
                        let th = w[j].tanh();
                        let gw = gx * span[i] / 2.0 * (1.0 - th * th);
                        m[j] = 0.9 * m[j] + 0.1 * gw;
                        v[j] = 0.999 * v[j] + 0.001 * gw * gw;
                        let mh = m[j] / (1.0 - 0.9f64.powi(t));
                        let vh = v[j] / (1.0 - 0.999f64.powi(t));
                        w[j] -= f64::from(self.lr) * mh / (vh.sqrt() + 1e-8);
                    }
                    iters[i] += 1.0;
                }
                if self.abort_early && it % check_every == 0 {
                    if total > prev * 0.9999 {
                        break;
                    }
                    prev = total;
                }
            }
            for i in 0..n {
                if found[i] {
                    upper[i] = upper[i].min(c[i]);
                    c[i] = (lower[i] + upper[i]) / 2.0;
                } else {
                    lower[i] = lower[i].max(c[i]);
                    c[i] = if upper[i] < 1e9 {
                        (lower[i] + upper[i]) / 2.0
                    } else {
                        c[i] * 10.0
                    };
                }
            }
        }
        let budget = if self.eps.is_some() {
            Budget::Linf
        } else {
            Budget::Unbounded
        };
        finish(&s, &best_x, budget, true, &[("iterations", &iters)])
    }
}
