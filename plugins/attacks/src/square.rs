//! Square attack (Andriushchenko et al. 2020, arXiv 1912.00049), L∞, black box.

use adverse_plugin_sdk::serde::Deserialize;
use adverse_plugin_sdk::{Attack, Batch, Error, Host, PluginInfo, Result, Tensor};

use crate::common::{Budget, NormKind, Setup, Unit, finish, uniforms};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, crate = "adverse_plugin_sdk::serde")]
pub struct SquareParams {
    pub eps: f32,
    #[serde(default)]
    pub unit: Unit,
    #[serde(default)]
    pub targeted: bool,
    #[serde(default)]
    pub early_stop: Option<bool>,
    #[serde(default)]
    pub queries: Option<u32>,
    #[serde(default)]
    pub p_init: Option<f32>,
}

/// The fraction of pixels a square covers at query `it` of `total` (the paper's schedule,
/// stated for 10 000 queries and rescaled to the budget).
pub fn p_schedule(p_init: f32, it: u32, total: u32) -> f32 {
    let i = (u64::from(it) * 10_000 / u64::from(total.max(1))) as u32;
    let div = match i {
        0..=10 => 1.0,
        11..=50 => 2.0,
        51..=200 => 4.0,
        201..=500 => 8.0,
        501..=1000 => 16.0,
        1001..=2000 => 32.0,
        2001..=4000 => 64.0,
        4001..=6000 => 128.0,
        6001..=8000 => 256.0,
        _ => 512.0,
    };
    p_init / div
}

/// Square attack: predictions only (the model's logits through `model_forward`, never a
/// gradient). Starts from vertical stripes of ±ε, then at each query replaces a random square
/// (side `sqrt(p·H·W)`, `p` from `p_init` 0.8 halving on the paper's schedule) with a random ±ε
/// per channel, and keeps it when the margin loss `Z_y − max_{i≠y} Z_i` (targeted:
/// `max_{i≠t} Z_i − Z_t`) decreases. Parameters: `eps`, `unit`, `targeted`, `queries` (5000
/// per frame, the initial point included), `p_init`, `early_stop` (default true: a frame stops
/// querying once adversarial). Reports `queries` per frame. Being black box, its final rounding
/// does not use gradients: the ±ε points are already on the integer lattice when ε is an
/// integer number of stored units.
#[derive(Debug)]
pub struct Square {
    p: SquareParams,
}

impl PluginInfo for Square {
    const NAME: &'static str = "square";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str = "Square attack (black box, L-inf, margin loss, query budget)";
    type Params = SquareParams;
    fn param_schema() -> &'static str {
        r#"{"type":"object","properties":{"eps":{"type":"number","minimum":0,"maximum":100000,"description":"L-inf budget in `unit`"},"unit":{"enum":["stored","hu","window"],"default":"stored"},"targeted":{"type":"boolean","default":false},"early_stop":{"type":"boolean","default":true},"queries":{"type":"integer","minimum":1,"maximum":1000000,"default":5000},"p_init":{"type":"number","exclusiveMinimum":0,"maximum":1,"default":0.8}},"required":["eps"],"additionalProperties":false}"#
    }
    fn create(p: SquareParams, _host: &Host<'_>) -> Result<Self> {
        if !(p.eps.is_finite() && p.eps >= 0.0)
            || p.queries == Some(0)
            || p.p_init.is_some_and(|v| !(v > 0.0 && v <= 1.0))
        {
            return Err(Error::new(
                "square needs eps >= 0, queries >= 1 and 0 < p_init <= 1",
            ));
        }
        Ok(Square { p })
    }
}

impl Square {
    fn margins(s: &Setup<'_>, z: &[f32]) -> Vec<f32> {
        z.chunks(s.k)
            .zip(&s.targets)
            .map(|(row, &t)| {
                let t = t as usize;
                let other = row
                    .iter()
                    .enumerate()
                    .filter(|&(j, _)| j != t)
                    .fold(f32::NEG_INFINITY, |m, (_, &v)| m.max(v));
                if s.targeted {
                    other - row[t]
                } else {
                    row[t] - other
                }
            })
            .collect()
    }
}

impl Attack for Square {
    fn attack(&mut self, batch: &Batch<'_>) -> Result<Tensor> {
        let p = &self.p;
        let s = Setup::new(batch, p.targeted, Some((p.eps, p.unit)))?;
        let (n, d) = (s.n, s.d);
        let [_, c, h, w] = s.shape;
        let total = p.queries.unwrap_or(5000);
        let p_init = p.p_init.unwrap_or(0.8);
        let early = p.early_stop.unwrap_or(true);
        let seed = batch.seed();
        // Vertical stripes: one ±ε per (channel, column).
        let u = uniforms(seed, 0, n * c * w);
        let mut x = s.x0.clone();
        for i in 0..n {
            for ch in 0..c {
                for col in 0..w {
                    let sg = if u[(i * c + ch) * w + col] < 0.5 {
                        -1.0
                    } else {
                        1.0
                    };
                    for row in 0..h {
                        let j = i * d + (ch * h + row) * w + col;
                        x[j] += sg * s.eps[i];
                    }
                }
            }
        }
        s.constrain(&mut x, NormKind::Linf);
        let mut best = Square::margins(&s, &s.forward(&x)?);
        let mut queries = vec![1f64; n];
        for it in 1..total {
            let active: Vec<bool> = best.iter().map(|&m| !(early && m < 0.0)).collect();
            if !active.iter().any(|&a| a) {
                break;
            }
            let frac = p_schedule(p_init, it, total);
            let side = (((frac * (h * w) as f32).sqrt().round()) as usize).clamp(1, h.min(w));
            let r = uniforms(seed, u64::from(it), n * (2 + c));
            let mut cand = x.clone();
            for i in (0..n).filter(|&i| active[i]) {
                let ru = &r[i * (2 + c)..(i + 1) * (2 + c)];
                let top = ((ru[0] * (h - side + 1) as f32) as usize).min(h - side);
                let left = ((ru[1] * (w - side + 1) as f32) as usize).min(w - side);
                let signs: Vec<f32> = (0..c)
                    .map(|ch| if ru[2 + ch] < 0.5 { -1.0 } else { 1.0 })
                    .collect();
                let write = |cand: &mut [f32], signs: &[f32]| {
                    let mut changed = false;
                    for (ch, sg) in signs.iter().enumerate() {
                        for row in top..top + side {
                            for col in left..left + side {
                                let j = i * d + (ch * h + row) * w + col;
                                let v = (s.x0[j] + sg * s.eps[i]).clamp(s.lo[i], s.hi[i]);
                                changed |= v != x[j];
                                cand[j] = v;
                            }
                        }
                    }
                    changed
                };
                if !write(&mut cand, &signs) {
                    // The square already holds these signs: flip them so the query is useful.
                    let flipped: Vec<f32> = signs.iter().map(|v| -v).collect();
                    write(&mut cand, &flipped);
                }
            }
            let m = Square::margins(&s, &s.forward(&cand)?);
            for i in (0..n).filter(|&i| active[i]) {
                queries[i] += 1.0;
                if m[i] < best[i] {
                    best[i] = m[i];
                    x[i * d..(i + 1) * d].copy_from_slice(&cand[i * d..(i + 1) * d]);
                }
            }
        }
        finish(&s, &x, Budget::Linf, false, &[("queries", &queries)])
    }
}
