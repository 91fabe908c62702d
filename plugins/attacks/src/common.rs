//! What every attack shares: the batch set-up (reference classes, ε in stored units per frame),
//! model queries, projections, and the final rounding to stored integers that keeps success.
//!
//! Vector arithmetic on a batch happens here on the plugin side (the frames of one batch are a
//! few megabytes at most); the host is asked only for what needs the model: logits and
//! objective gradients. That keeps one code path for both host backends and lets ε differ per
//! frame (HU or window units give each frame its own budget in stored units).

use adverse_plugin_sdk::serde::Deserialize;
use adverse_plugin_sdk::{Batch, Error, FrameMeta, Host, LossKind, Result, Tensor, cpu};

/// The unit `eps` is given in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase", crate = "adverse_plugin_sdk::serde")]
pub enum Unit {
    /// Stored values (the integers in Pixel Data).
    #[default]
    Stored,
    /// Hounsfield units: `eps / RescaleSlope` stored units; CT frames only.
    Hu,
    /// A fraction of the frame's VOI window width: `eps * width / RescaleSlope` stored units.
    Window,
}

/// The JSON-schema properties every budgeted attack takes (spliced into each plugin's schema).
macro_rules! common_props {
    () => {
        r#""eps":{"type":"number","minimum":0,"maximum":100000,"description":"budget (L-inf unless the attack says otherwise), in `unit`"},"unit":{"enum":["stored","hu","window"],"default":"stored","description":"stored values; hu = eps/RescaleSlope (CT only); window = fraction of the window width"},"targeted":{"type":"boolean","default":false,"description":"reach FrameMeta.target instead of leaving the true class"},"early_stop":{"type":"boolean","default":false,"description":"stop updating a frame once it is adversarial"}"#
    };
}
pub(crate) use common_props;

/// Converts `eps` in `unit` to stored units for frame `i`.
pub fn eps_stored(eps: f32, unit: Unit, m: &FrameMeta, i: usize) -> Result<f32> {
    if !eps.is_finite() || eps < 0.0 {
        return Err(Error::new(format!(
            "eps must be a finite number >= 0, got {eps}"
        )));
    }
    let slope = m.rescale_slope;
    let slope_ok = || -> Result<f64> {
        if slope.is_finite() && slope > 0.0 {
            Ok(slope)
        } else {
            Err(Error::new(format!(
                "frame {i}: RescaleSlope {slope} cannot convert eps to stored units"
            )))
        }
    };
    let v = match unit {
        Unit::Stored => return Ok(eps),
        Unit::Hu => {
            if !m.modality.eq_ignore_ascii_case("CT") {
                return Err(Error::new(format!(
                    "eps unit 'hu' needs CT frames; frame {i} has modality '{}' (use unit 'stored' or 'window')",
                    m.modality
                )));
            }
            f64::from(eps) / slope_ok()?
        }
        Unit::Window => {
            let Some((_, width)) = m.window else {
                return Err(Error::new(format!(
                    "eps unit 'window' needs a VOI window; frame {i} has none (use unit 'stored')"
                )));
            };
            if !(width.is_finite() && width > 0.0) {
                return Err(Error::new(format!(
                    "frame {i}: window width {width} cannot scale eps"
                )));
            }
            f64::from(eps) * width / slope_ok()?
        }
    };
    Ok(v as f32)
}

/// Index of the first maximum of `row`.
pub fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .fold(
            (0, f32::NEG_INFINITY),
            |m, (j, &v)| {
                if v > m.1 { (j, v) } else { m }
            },
        )
        .0
}

/// Cross-entropy `-log softmax(z)[t]`.
pub fn cross_entropy(z: &[f32], t: usize) -> f32 {
    let mx = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = mx + z.iter().map(|v| (v - mx).exp()).sum::<f32>().ln();
    lse - z[t]
}

/// Clamps every sample `s` (chunks of `d`) of `x` into `[lo[s], hi[s]]`.
pub fn clip(x: &mut [f32], d: usize, lo: &[f32], hi: &[f32]) {
    for (s, xs) in x.chunks_mut(d).enumerate() {
        xs.iter_mut().for_each(|v| *v = v.clamp(lo[s], hi[s]));
    }
}

/// Projects each sample of `x` onto the L∞ ball of radius `eps[s]` around `x0`.
pub fn project_linf(x: &mut [f32], x0: &[f32], eps: &[f32], d: usize) {
    for (s, (xs, os)) in x.chunks_mut(d).zip(x0.chunks(d)).enumerate() {
        let e = eps[s];
        xs.iter_mut()
            .zip(os)
            .for_each(|(p, &q)| *p = p.clamp(q - e, q + e));
    }
}

/// Projects each sample of `x` onto the L2 ball of radius `eps[s]` around `x0` (rescaling).
pub fn project_l2(x: &mut [f32], x0: &[f32], eps: &[f32], d: usize) {
    for (s, (xs, os)) in x.chunks_mut(d).zip(x0.chunks(d)).enumerate() {
        let n = l2_dist(xs, os);
        if n > eps[s] {
            let k = eps[s] / n;
            xs.iter_mut()
                .zip(os)
                .for_each(|(p, &q)| *p = q + (*p - q) * k);
        }
    }
}

pub fn l2_dist(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(p, q)| {
            let d = f64::from(p - q);
            d * d
        })
        .sum::<f64>()
        .sqrt() as f32
}

pub fn linf_dist(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).fold(0f32, |m, (p, q)| m.max((p - q).abs()))
}

/// Uniform numbers in [0, 1) of random stream `stream` of this batch (the host's counter-based
/// generator, so a run is reproducible from its seed).
pub fn uniforms(seed: u64, stream: u64, n: usize) -> Vec<f32> {
    let s = cpu::stream_seed(seed, stream);
    (0..n).map(|i| cpu::counter_uniform(s, i as u32)).collect()
}

/// Standard normal numbers of random stream `stream`.
pub fn normals(seed: u64, stream: u64, n: usize) -> Vec<f32> {
    let s = cpu::stream_seed(seed, stream);
    (0..n).map(|i| cpu::counter_normal(s, i as u32)).collect()
}

/// The norm a budget is measured in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase", crate = "adverse_plugin_sdk::serde")]
pub enum NormKind {
    #[default]
    Linf,
    L2,
}

/// How the final rounding constrains the written perturbation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    /// `|x' - x| <= eps` per pixel (the set-up's per-frame ε).
    Linf,
    /// `||x' - x||_2 <= eps`.
    L2,
    /// Minimal-norm attacks without a cap: only the stored range.
    Unbounded,
}

/// One batch, ready to attack: the clean frames, what the model says about them, and the class
/// each frame must leave (untargeted) or reach (targeted).
pub struct Setup<'a> {
    pub batch: Batch<'a>,
    pub host: Host<'a>,
    pub n: usize,
    /// `[N, C, H, W]`.
    pub shape: [usize; 4],
    /// Values per frame (`C * H * W`).
    pub d: usize,
    pub metas: Vec<FrameMeta>,
    pub x0: Vec<f32>,
    /// Stored-value range per frame.
    pub lo: Vec<f32>,
    pub hi: Vec<f32>,
    /// Number of classes.
    pub k: usize,
    pub logits0: Vec<f32>,
    pub pred0: Vec<u32>,
    pub targeted: bool,
    /// Untargeted: the true label (or the model's prediction where none is known); targeted:
    /// the target class.
    pub targets: Vec<u32>,
    /// ε in stored units per frame (empty when the attack has no budget).
    pub eps: Vec<f32>,
}

impl<'a> Setup<'a> {
    /// Reads the batch, runs the model once on the clean frames and resolves classes and ε.
    pub fn new(batch: &Batch<'a>, targeted: bool, eps: Option<(f32, Unit)>) -> Result<Self> {
        let host = *batch.host();
        let x = batch.input();
        let sh = host.shape(x)?;
        let [n, c, h, w] = <[usize; 4]>::try_from(sh.as_slice()).map_err(|_| {
            Error::new(format!(
                "attacks take [N, C, H, W] stored values, got shape {sh:?}"
            ))
        })?;
        if n != batch.len() {
            return Err(Error::new(format!(
                "input holds {n} frames for a batch of {}",
                batch.len()
            )));
        }
        let d = c * h * w;
        let x0 = host.download(x)?;
        let metas = (0..n).map(|i| batch.meta(i)).collect::<Result<Vec<_>>>()?;
        let lo = metas.iter().map(|m| m.value_range.0 as f32).collect();
        let hi = metas.iter().map(|m| m.value_range.1 as f32).collect();
        let mut s = Setup {
            batch: *batch,
            host,
            n,
            shape: [n, c, h, w],
            d,
            metas,
            x0,
            lo,
            hi,
            k: 0,
            logits0: Vec::new(),
            pred0: Vec::new(),
            targeted,
            targets: Vec::new(),
            eps: Vec::new(),
        };
        let z = s.forward_raw(&s.x0)?;
        s.k = z.len().checked_div(n).unwrap_or(0);
        if s.k < 2 || z.len() != n * s.k {
            return Err(Error::new(format!(
                "the model returned {} logits for {n} frames; attacks need a classifier with at least 2 classes",
                z.len()
            )));
        }
        s.pred0 = z.chunks(s.k).map(|r| argmax(r) as u32).collect();
        s.logits0 = z;
        s.targets = (0..n)
            .map(|i| {
                let m = &s.metas[i];
                let t = if targeted {
                    m.target.ok_or_else(|| {
                        Error::new(format!("frame {i} has no target class (give --target)"))
                    })?
                } else {
                    m.label.unwrap_or(s.pred0[i])
                };
                if t as usize >= s.k {
                    return Err(Error::new(format!(
                        "frame {i}: class {t} out of range for a model with {} classes",
                        s.k
                    )));
                }
                Ok(t)
            })
            .collect::<Result<_>>()?;
        if let Some((e, unit)) = eps {
            s.eps = s
                .metas
                .iter()
                .enumerate()
                .map(|(i, m)| eps_stored(e, unit, m, i))
                .collect::<Result<_>>()?;
        }
        Ok(s)
    }

    fn forward_raw(&self, x: &[f32]) -> Result<Vec<f32>> {
        let t = self.host.upload(x, &self.shape)?;
        let z = self.host.model_forward(t)?;
        let v = self.host.download(z)?;
        self.host.free(z)?;
        self.host.free(t)?;
        Ok(v)
    }

    /// Logits `[N * K]` of stored values `x` (the batch's shape).
    pub fn forward(&self, x: &[f32]) -> Result<Vec<f32>> {
        let z = self.forward_raw(x)?;
        if z.len() != self.n * self.k {
            return Err(Error::new("the model's class count changed within a batch"));
        }
        Ok(z)
    }

    pub fn preds(&self, logits: &[f32]) -> Vec<u32> {
        logits.chunks(self.k).map(|r| argmax(r) as u32).collect()
    }

    /// Whether each prediction counts as a success of the attack.
    pub fn success(&self, preds: &[u32]) -> Vec<bool> {
        preds
            .iter()
            .zip(&self.targets)
            .map(|(p, t)| if self.targeted { p == t } else { p != t })
            .collect()
    }

    /// The cross-entropy objective the attack ascends, from logits: CE of the reference class
    /// (untargeted) or minus CE of the target (targeted).
    pub fn ce_objective(&self, logits: &[f32]) -> Vec<f32> {
        logits
            .chunks(self.k)
            .zip(&self.targets)
            .map(|(z, &t)| {
                let ce = cross_entropy(z, t as usize);
                if self.targeted { -ce } else { ce }
            })
            .collect()
    }

    /// Per-frame objective and its gradient with respect to the stored values `x`.
    pub fn loss_grad(&self, x: &[f32], loss: LossKind) -> Result<(Vec<f32>, Vec<f32>)> {
        self.loss_grad_for(x, loss, self.targeted, &self.targets)
    }

    pub fn loss_grad_for(
        &self,
        x: &[f32],
        loss: LossKind,
        targeted: bool,
        targets: &[u32],
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let t = self.host.upload(x, &self.shape)?;
        let (l, g) = self.host.model_loss_grad(t, loss, targeted, targets)?;
        let gv = self.host.download(g)?;
        self.host.free(g)?;
        self.host.free(t)?;
        if gv.len() != x.len() {
            return Err(Error::new("the gradient does not have the input's shape"));
        }
        Ok((l, gv))
    }

    pub fn clip(&self, x: &mut [f32]) {
        clip(x, self.d, &self.lo, &self.hi);
    }

    /// Clips to the stored range and projects onto the ε-ball of `norm`.
    pub fn constrain(&self, x: &mut [f32], norm: NormKind) {
        match norm {
            NormKind::Linf => project_linf(x, &self.x0, &self.eps, self.d),
            NormKind::L2 => project_l2(x, &self.x0, &self.eps, self.d),
        }
        self.clip(x);
    }

    pub fn sample<'v>(&self, v: &'v [f32], s: usize) -> &'v [f32] {
        &v[s * self.d..(s + 1) * self.d]
    }

    /// Uploads `x` as the batch's output tensor.
    pub fn output(&self, x: &[f32]) -> Result<Tensor> {
        self.host.upload(x, &self.shape)
    }
}

/// The written result of an attack.
#[derive(Debug, Clone)]
pub struct Final {
    pub x: Vec<f32>,
    pub pred: Vec<u32>,
    pub success: Vec<bool>,
    /// Frames whose success the lattice search restored after rounding had lost it.
    pub repaired: Vec<bool>,
}

/// Integer box `[lo, hi]` a pixel may take: within the stored range and, for an L∞ budget,
/// within `eps` of the clean value (floor/ceil, so `|x' - x| <= eps` exactly).
pub fn lattice_box(x0: f32, eps: Option<f32>, lo: f32, hi: f32) -> (f32, f32) {
    let (mut a, mut b) = (lo.ceil(), hi.floor());
    if let Some(e) = eps {
        let (x, e) = (f64::from(x0), f64::from(e));
        a = a.max((x - e).ceil() as f32);
        b = b.min((x + e).floor() as f32);
    }
    if a > b {
        // No integer fits (a non-integer clean value with eps < 1/2): leave the pixel alone.
        (x0, x0)
    } else {
        (a, b)
    }
}

/// Rounds sample `xf` (already inside its budget and range) to the integer lattice within the
/// budget. For L2 a rounding that leaves the ball falls back to truncation towards `x0`, which
/// never lengthens any component.
pub fn round_sample(
    xf: &[f32],
    x0: &[f32],
    budget: Budget,
    eps: Option<f32>,
    lo: f32,
    hi: f32,
) -> Vec<f32> {
    let box_eps = if budget == Budget::Linf { eps } else { None };
    let mut r: Vec<f32> = xf
        .iter()
        .zip(x0)
        .map(|(&v, &o)| {
            let (a, b) = lattice_box(o, box_eps, lo, hi);
            v.round().clamp(a, b)
        })
        .collect();
    if let (Budget::L2, Some(e)) = (budget, eps)
        && l2_dist(&r, x0) > e
    {
        r = xf
            .iter()
            .zip(x0)
            .map(|(&v, &o)| {
                let (a, b) = lattice_box(o, None, lo, hi);
                (o + (v - o).trunc()).clamp(a, b)
            })
            .collect();
    }
    r
}

/// Rounds the attack's result to stored integers without losing success where the lattice
/// allows it, and reports the outcome. Every attack ends here.
///
/// 1. clip to the stored range and project onto the budget;
/// 2. round each pixel inside its integer box (float-pixel frames keep their float values);
/// 3. re-check with the model; frames that were adversarial before rounding and are not after
///    get a short search on the integer lattice (`repair`): unit sign steps of the objective's
///    gradient inside the box (L∞), greedy unit steps on the strongest pixels inside the ball
///    (L2), or a growing rescaling of the perturbation (unbounded, minimal-norm attacks);
/// 4. a frame the search cannot restore keeps its plain rounding.
pub fn finalize(s: &Setup<'_>, x_adv: &[f32], budget: Budget, repair: bool) -> Result<Final> {
    let d = s.d;
    let mut xf = x_adv.to_vec();
    match budget {
        Budget::Linf => project_linf(&mut xf, &s.x0, &s.eps, d),
        Budget::L2 => project_l2(&mut xf, &s.x0, &s.eps, d),
        Budget::Unbounded => {}
    }
    s.clip(&mut xf);
    let eps_of = |i: usize| s.eps.get(i).copied();
    let mut xr = xf.clone();
    for i in 0..s.n {
        if s.metas[i].float {
            continue;
        }
        let r = round_sample(
            s.sample(&xf, i),
            s.sample(&s.x0, i),
            budget,
            eps_of(i),
            s.lo[i],
            s.hi[i],
        );
        xr[i * d..(i + 1) * d].copy_from_slice(&r);
    }
    let mut pred = s.preds(&s.forward(&xr)?);
    let mut success = s.success(&pred);
    let mut repaired = vec![false; s.n];
    let lost: Vec<bool> = if repair && (0..s.n).any(|i| !success[i] && !s.metas[i].float) {
        let pf = s.preds(&s.forward(&xf)?);
        s.success(&pf)
            .iter()
            .enumerate()
            .map(|(i, &sf)| sf && !success[i] && !s.metas[i].float)
            .collect()
    } else {
        vec![false; s.n]
    };
    if lost.iter().any(|&l| l) {
        let mut cand = xr.clone();
        let mut open = lost.clone();
        const ROUNDS: usize = 8;
        for round in 0..ROUNDS {
            if !open.iter().any(|&o| o) {
                break;
            }
            match budget {
                Budget::Unbounded => {
                    const GAMMA: [f32; ROUNDS] = [1.05, 1.1, 1.2, 1.35, 1.5, 2.0, 3.0, 4.0];
                    let gamma = GAMMA[round];
                    for i in (0..s.n).filter(|&i| open[i]) {
                        for j in i * d..(i + 1) * d {
                            let (a, b) = lattice_box(s.x0[j], None, s.lo[i], s.hi[i]);
                            cand[j] = (s.x0[j] + gamma * (xf[j] - s.x0[j])).round().clamp(a, b);
                        }
                    }
                }
                Budget::Linf | Budget::L2 => {
                    let (_, g) = s.loss_grad(&cand, LossKind::CrossEntropy)?;
                    for i in (0..s.n).filter(|&i| open[i]) {
                        let e = eps_of(i);
                        let range = i * d..(i + 1) * d;
                        if budget == Budget::Linf {
                            for j in range {
                                let (a, b) = lattice_box(s.x0[j], e, s.lo[i], s.hi[i]);
                                cand[j] = (cand[j] + sign(g[j])).clamp(a, b);
                            }
                        } else {
                            l2_lattice_step(
                                &mut cand[range.clone()],
                                &s.x0[range.clone()],
                                &g[range],
                                e.unwrap_or(f32::INFINITY),
                                s.lo[i],
                                s.hi[i],
                            );
                        }
                    }
                }
            }
            let p = s.preds(&s.forward(&cand)?);
            let ok = s.success(&p);
            for i in 0..s.n {
                if !(open[i] && ok[i]) {
                    continue;
                }
                xr[i * d..(i + 1) * d].copy_from_slice(&cand[i * d..(i + 1) * d]);
                pred[i] = p[i];
                success[i] = true;
                repaired[i] = true;
                open[i] = false;
            }
        }
    }
    Ok(Final {
        x: xr,
        pred,
        success,
        repaired,
    })
}

fn sign(v: f32) -> f32 {
    if v > 0.0 {
        1.0
    } else if v < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// One greedy step on the integer lattice inside an L2 ball: unit moves along the gradient's
/// sign on the pixels with the largest gradient, as long as the ball and the range allow.
fn l2_lattice_step(x: &mut [f32], x0: &[f32], g: &[f32], eps: f32, lo: f32, hi: f32) {
    let mut order: Vec<usize> = (0..x.len()).filter(|&j| g[j] != 0.0).collect();
    order.sort_by(|&a, &b| g[b].abs().total_cmp(&g[a].abs()));
    let budget = f64::from(eps) * f64::from(eps);
    let mut sq: f64 = x
        .iter()
        .zip(x0)
        .map(|(a, b)| f64::from(a - b).powi(2))
        .sum();
    let per_step = (x.len() / 16).max(1);
    let mut moved = 0;
    for j in order {
        if moved == per_step {
            break;
        }
        let (a, b) = lattice_box(x0[j], None, lo, hi);
        let v = (x[j] + sign(g[j])).clamp(a, b);
        let new_sq = sq - f64::from(x[j] - x0[j]).powi(2) + f64::from(v - x0[j]).powi(2);
        if v != x[j] && new_sq <= budget {
            x[j] = v;
            sq = new_sq;
            moved += 1;
        }
    }
}

/// Writes the common audit values of every frame, plus `extra` per-frame numbers.
pub fn audit(s: &Setup<'_>, fin: &Final, extra: &[(&str, &[f64])]) -> Result<()> {
    let b = &s.batch;
    for i in 0..s.n {
        let (xs, os) = (s.sample(&fin.x, i), s.sample(&s.x0, i));
        b.audit_flag(i, "success", fin.success[i])?;
        b.audit_number(i, "linf", f64::from(linf_dist(xs, os)))?;
        b.audit_number(i, "l2", f64::from(l2_dist(xs, os)))?;
        b.audit_number(i, "pred_before", f64::from(s.pred0[i]))?;
        b.audit_number(i, "pred_after", f64::from(fin.pred[i]))?;
        let z0 = &s.logits0[i * s.k..(i + 1) * s.k];
        b.audit_number(
            i,
            "loss_before",
            f64::from(cross_entropy(z0, s.targets[i] as usize)),
        )?;
        if let Some(e) = s.eps.get(i) {
            b.audit_number(i, "eps_stored", f64::from(*e))?;
        }
        b.audit_flag(i, "rounding_repaired", fin.repaired[i])?;
        for (key, v) in extra {
            b.audit_number(i, key, v[i])?;
        }
    }
    Ok(())
}

/// Finishes an attack: final rounding, audit, output tensor.
pub fn finish(
    s: &Setup<'_>,
    x_adv: &[f32],
    budget: Budget,
    repair: bool,
    extra: &[(&str, &[f64])],
) -> Result<Tensor> {
    let fin = finalize(s, x_adv, budget, repair)?;
    audit(s, &fin, extra)?;
    s.output(&fin.x)
}
