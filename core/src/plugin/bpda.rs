//! Adaptive attacks through purifiers: Backward Pass Differentiable Approximation (Athalye,
//! Carlini and Wagner 2018, "Obfuscated Gradients Give a False Sense of Security").
//!
//! A purifier evaluated only against attacks that ignore it looks far stronger than it is: a
//! median filter or a JPEG round trip has no useful gradient, so a plain attack never learns to
//! survive it. With BPDA the attack's model service runs the real purifier plugin in the forward
//! pass (the attack sees, and re-checks its success on, what the model will really see) and
//! treats it as the identity in the backward pass: the gradient of the loss at the purified
//! image is applied to the unpurified one.
//!
//! A randomised purifier (`random-noise`) needs more: the gradient of one draw says little about the
//! next. With `eot` > 1 every model call averages the logits, losses and BPDA gradients over
//! that many fresh draws (Expectation over Transformation, Athalye et al. 2018, section 4), so
//! the attack climbs the expected loss the defense will actually present.
//!
//! Shadow purifiers (`ensemble`) are not applied to the output at all: they stand for the
//! squeezers of a detector that compares the model's outputs with and without them. The attack
//! then optimises the mean over the unpurified image and each purifier's version, each path
//! with the identity backward, so its image fools the model with and without every squeezer and
//! the detector sees no disagreement (Carlini and Wagner 2017, "Adversarial examples are not
//! easily detected"; He et al. 2017 for feature squeezing). With `score_weights` the attack
//! also descends the detector's own score, the disagreement between the softmax outputs.

use std::cell::{Cell, RefCell};

use super::host::{BatchInput, BatchModel, Instance, PluginBackend};
use crate::runtime::backend::LossTargets;
use crate::runtime::backend::Tensor;
use crate::runtime::loss::{LossSpec, objective};
use adverse_plugin_sdk::FrameMeta;

pub struct Bpda<'a, B: PluginBackend> {
    pub inner: &'a dyn BatchModel<B>,
    /// The purifiers, applied in order; a `RefCell` because `BatchModel` calls take `&self`
    /// while a plugin instance runs with `&mut` (calls never overlap: the attack is waiting).
    pub purifiers: RefCell<Vec<&'a mut Instance>>,
    pub frames: Vec<FrameMeta>,
    pub seed: u64,
    /// Draws per model call (1: one fixed draw per batch, as for a deterministic purifier).
    pub eot: u32,
    /// Model calls so far, so each call's draws are fresh.
    pub calls: Cell<u64>,
    /// Average over the identity and each purifier alone instead of chaining them.
    pub ensemble: bool,
    /// Ensemble only, per purifier: the weight of its detector-score term (0: none; see
    /// `loss_grad_scored`).
    pub score_weights: Vec<f32>,
}

impl<B: PluginBackend> Bpda<'_, B> {
    /// The seeds of this call's draws: the batch's seed without EOT, else `eot` fresh ones.
    fn draws(&self) -> Vec<u64> {
        if self.eot <= 1 {
            return vec![self.seed];
        }
        let call = self.calls.get();
        self.calls.set(call + 1);
        let k = u64::from(self.eot);
        (0..k)
            .map(|i| adverse_plugin_sdk::cpu::stream_seed(self.seed, call * k + i))
            .collect()
    }

    /// The versions of `x` the model is averaged over: the chained purifiers' output per draw,
    /// or (ensemble) `x` itself and each purifier's output.
    fn paths(&self, b: &B, x: &Tensor<B>) -> Result<Vec<Tensor<B>>, String> {
        if self.ensemble {
            let seed = self.seed;
            let n = self.purifiers.borrow().len();
            let mut out = vec![b.upload(&b.download(x), &x.shape)];
            for k in 0..n {
                out.push(self.purify(b, x, seed, Some(k))?);
            }
            return Ok(out);
        }
        self.draws()
            .into_iter()
            .map(|seed| self.purify(b, x, seed, None))
            .collect()
    }

    /// Runs every purifier in order (`only`: just that one).
    fn purify(
        &self,
        b: &B,
        x: &Tensor<B>,
        seed: u64,
        only: Option<usize>,
    ) -> Result<Tensor<B>, String> {
        let mut cur = b.upload(&b.download(x), &x.shape);
        // A model call may carry several copies of the batch (rows r uses frame r mod N).
        let rows = x.shape.first().copied().unwrap_or(0);
        let frames: Vec<FrameMeta> = (0..rows)
            .filter_map(|r| self.frames.get(r % self.frames.len().max(1)).cloned())
            .collect();
        for (k, inst) in self.purifiers.borrow_mut().iter_mut().enumerate() {
            if only.is_some_and(|o| o != k) {
                continue;
            }
            let name = inst.handle().name.clone();
            let out = inst
                .process(BatchInput {
                    backend: b,
                    frames: frames.clone(),
                    input: b.upload(&b.download(&cur), &cur.shape),
                    model: None,
                    seed,
                })
                .map_err(|e| format!("purifier `{name}` inside the attack (BPDA): {e}"))?;
            if let Some(t) = out.output {
                cur = t;
            }
        }
        Ok(cur)
    }
}

impl<B: PluginBackend> Bpda<'_, B> {
    /// The shadow ensemble's objective with the detector's score in it:
    ///
    /// `J(x) = mean_k L(z_k) - sum_k w_k * |softmax(z_0) - softmax(z_k)|_1`
    ///
    /// with `z_0` the logits of `x` and `z_k` those of purifier `k`'s version of it (identity
    /// backward through the purifier). The first term alone (the plain ensemble) only asks
    /// every version to be misclassified; a detector that thresholds the L1 distance between
    /// the softmax outputs (feature squeezing, Xu et al. 2018) still sees the versions disagree
    /// in confidence. The second term is that score itself (summed over squeezers, an upper
    /// bound of the detector's maximum), so the attack descends what the detector measures
    /// (Carlini and Wagner 2017, section 5: the attacker's loss includes the detector's).
    /// Per image it applies only once the image fools the model: before that, an image that
    /// stays correctly classified everywhere has no disagreement to lose, and the score term
    /// would only hold the attack back (measured: with it always on, PGD fooled 15 of 60
    /// images instead of 60).
    ///
    /// Cost per call: one forward per path, then one vector-Jacobian product per path whose
    /// seed is not zero.
    fn loss_grad_scored(
        &self,
        b: &B,
        x: &Tensor<B>,
        spec: LossSpec,
        targets: &[u32],
    ) -> Result<(Vec<f32>, Tensor<B>), String> {
        let paths = self.paths(b, x)?;
        let m = paths.len() as f32;
        let mut logits = Vec::with_capacity(paths.len());
        let mut seeds = Vec::with_capacity(paths.len());
        let mut losses: Vec<f32> = Vec::new();
        for y in &paths {
            let z = self.inner.forward(b, y)?;
            let (l, dz) = objective(b, spec, &z, &LossTargets::Classes(targets))
                .map_err(|e| e.to_string())?;
            let l = b.download(&l);
            losses.resize(l.len(), 0.0);
            for (a, v) in losses.iter_mut().zip(&l) {
                *a += v / m;
            }
            seeds.push(b.download(&dz).iter().map(|v| v / m).collect::<Vec<f32>>());
            logits.push((b.download(&z), z.shape.clone()));
        }
        let (z0, shape) = &logits[0];
        let k = shape.get(1).copied().unwrap_or(1).max(1);
        for (p, &w) in self.score_weights.iter().enumerate() {
            let Some((zp, _)) = logits.get(p + 1) else {
                break;
            };
            if w <= 0.0 {
                continue;
            }
            for (r, loss) in losses.iter_mut().enumerate() {
                let rows = r * k..(r + 1) * k;
                if !fooled(&z0[rows.clone()], targets.get(r).copied(), spec) {
                    continue;
                }
                let (d, g0, gp) = softmax_l1(&z0[rows.clone()], &zp[rows.clone()]);
                *loss -= w * d;
                for (j, i) in rows.enumerate() {
                    seeds[0][i] -= w * g0[j];
                    seeds[p + 1][i] -= w * gp[j];
                }
            }
        }
        let mut sum: Option<(Vec<f32>, Vec<usize>)> = None;
        for (y, seed) in paths.iter().zip(&seeds) {
            if seed.iter().all(|&v| v == 0.0) {
                continue;
            }
            let (_, g) = self.inner.vjp(b, y, &b.upload(seed, shape))?;
            accumulate(&mut sum, b.download(&g), &g.shape);
        }
        let (v, gshape) = sum.unwrap_or_else(|| (vec![0.0; x.len()], x.shape.clone()));
        Ok((losses, b.upload(&v, &gshape)))
    }
}

/// Whether logits `z` already reach the attack's goal for `target` (the true class when
/// untargeted, the wanted one when targeted).
fn fooled(z: &[f32], target: Option<u32>, spec: LossSpec) -> bool {
    let Some(t) = target else { return false };
    let top = z
        .iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
            if v > bv { (i, v) } else { (bi, bv) }
        })
        .0;
    let targeted = match spec {
        LossSpec::CrossEntropy { targeted } | LossSpec::CwMargin { targeted, .. } => targeted,
        _ => false,
    };
    (top == t as usize) == targeted
}

/// `|softmax(a) - softmax(b)|_1` and its gradients w.r.t. `a` and `b` (a subgradient where a
/// component difference is exactly zero). Softmax Jacobian: `d(v . p)/dz = p * (v - v . p)`.
pub(crate) fn softmax_l1(a: &[f32], b: &[f32]) -> (f32, Vec<f32>, Vec<f32>) {
    let softmax = |z: &[f32]| {
        let mx = z
            .iter()
            .fold(f64::NEG_INFINITY, |m, &v| m.max(f64::from(v)));
        let e: Vec<f64> = z.iter().map(|&v| (f64::from(v) - mx).exp()).collect();
        let s: f64 = e.iter().sum();
        e.into_iter().map(|v| v / s).collect::<Vec<f64>>()
    };
    let (pa, pb) = (softmax(a), softmax(b));
    let sign: Vec<f64> = pa
        .iter()
        .zip(&pb)
        .map(|(x, y)| {
            if x > y {
                1.0
            } else if x < y {
                -1.0
            } else {
                0.0
            }
        })
        .collect();
    let d: f64 = pa.iter().zip(&pb).map(|(x, y)| (x - y).abs()).sum();
    let grad = |p: &[f64], v: f64| {
        let dot: f64 = sign.iter().zip(p).map(|(s, q)| v * s * q).sum();
        p.iter()
            .zip(&sign)
            .map(|(q, s)| (q * (v * s - dot)) as f32)
            .collect::<Vec<f32>>()
    };
    (d as f32, grad(&pa, 1.0), grad(&pb, -1.0))
}

impl<B: PluginBackend> BatchModel<B> for Bpda<'_, B> {
    /// The logits of the purified batch (their mean over the draws or ensemble paths).
    fn forward(&self, b: &B, x: &Tensor<B>) -> Result<Tensor<B>, String> {
        let paths = self.paths(b, x)?;
        if let [y] = &paths[..] {
            return self.inner.forward(b, y);
        }
        let mut sum: Option<(Vec<f32>, Vec<usize>)> = None;
        for y in &paths {
            let z = self.inner.forward(b, y)?;
            accumulate(&mut sum, b.download(&z), &z.shape);
        }
        let (v, shape) = mean(sum, paths.len());
        Ok(b.upload(&v, &shape))
    }

    /// The gradient at the purified image, returned as the gradient at `x` (identity backward);
    /// the mean loss and gradient over the draws or ensemble paths.
    fn loss_grad(
        &self,
        b: &B,
        x: &Tensor<B>,
        spec: LossSpec,
        targets: &[u32],
    ) -> Result<(Vec<f32>, Tensor<B>), String> {
        if self.ensemble && self.score_weights.iter().any(|&w| w > 0.0) {
            return self.loss_grad_scored(b, x, spec, targets);
        }
        let paths = self.paths(b, x)?;
        if let [y] = &paths[..] {
            return self.inner.loss_grad(b, y, spec, targets);
        }
        let mut losses = Vec::new();
        let mut sum: Option<(Vec<f32>, Vec<usize>)> = None;
        for y in &paths {
            let (l, g) = self.inner.loss_grad(b, y, spec, targets)?;
            if losses.is_empty() {
                losses = vec![0f32; l.len()];
            }
            for (a, v) in losses.iter_mut().zip(&l) {
                *a += v / paths.len() as f32;
            }
            accumulate(&mut sum, b.download(&g), &g.shape);
        }
        let (v, shape) = mean(sum, paths.len());
        Ok((losses, b.upload(&v, &shape)))
    }

    fn input_scale(&self, b: &B) -> Result<Vec<f64>, String> {
        self.inner.input_scale(b)
    }

    /// The features of the purified image (what the model sees: the batch's own draw); with
    /// shadow purifiers, of the image itself (the output is not purified).
    fn features(&self, b: &B, x: &Tensor<B>) -> Result<Tensor<B>, String> {
        if self.ensemble {
            return self.inner.features(b, x);
        }
        let y = self.purify(b, x, self.seed, None)?;
        self.inner.features(b, &y)
    }

    /// Identity backward through the purifiers, as for the loss.
    fn features_vjp(&self, b: &B, x: &Tensor<B>, df: &Tensor<B>) -> Result<Tensor<B>, String> {
        if self.ensemble {
            return self.inner.features_vjp(b, x, df);
        }
        let y = self.purify(b, x, self.seed, None)?;
        self.inner.features_vjp(b, &y, df)
    }

    fn head(&self, b: &B, f: &Tensor<B>) -> Result<Tensor<B>, String> {
        self.inner.head(b, f)
    }

    fn model_id(&self) -> Result<String, String> {
        self.inner.model_id()
    }
}

/// An attack's model service that also descends the scores of the detectors after it (stages
/// with `adaptive: true`): for a detector whose score is a differentiable function of the
/// model's features (ABI 1.3 `score_grad`: Mahalanobis, for instance), the objective becomes
///
/// `J(x) = L(x) - sum_d w_d * score_d(features(x))`
///
/// per image once it fools the model (before that the score would only hold the attack back,
/// as for the squeezers' score in `Bpda::loss_grad_scored`). The score's gradient comes from
/// the detector itself and is carried to the stored values by the backward pass of the feature
/// sub-graph, so the attack climbs the model's loss and descends what the detector
/// thresholds (Carlini and Wagner 2017, "Adversarial examples are not easily detected").
pub struct DetectorScore<'a, B: PluginBackend> {
    pub inner: &'a dyn BatchModel<B>,
    pub backend: &'a B,
    /// Each detector instance and its weight `w_d`.
    pub detectors: RefCell<Vec<(&'a mut Instance, f32)>>,
}

impl<B: PluginBackend> BatchModel<B> for DetectorScore<'_, B> {
    fn forward(&self, b: &B, x: &Tensor<B>) -> Result<Tensor<B>, String> {
        self.inner.forward(b, x)
    }

    fn loss_grad(
        &self,
        b: &B,
        x: &Tensor<B>,
        spec: LossSpec,
        targets: &[u32],
    ) -> Result<(Vec<f32>, Tensor<B>), String> {
        let (mut losses, g) = self.inner.loss_grad(b, x, spec, targets)?;
        let z = self.inner.forward(b, x)?;
        let k = z.shape.get(1).copied().unwrap_or(1).max(1);
        let zv = b.download(&z);
        let fooled: Vec<bool> = (0..z.shape.first().copied().unwrap_or(0))
            .map(|r| {
                zv.get(r * k..(r + 1) * k)
                    .is_some_and(|row| fooled(row, targets.get(r).copied(), spec))
            })
            .collect();
        // No image fools the model yet: the score term is off, no features or detector calls.
        if !fooled.contains(&true) {
            return Ok((losses, g));
        }
        let f = self.inner.features(b, x)?;
        let (rows, dim) = match f.shape[..] {
            [r, d] if r == fooled.len() => (r, d),
            _ => return Err(format!("features of shape {:?}", f.shape)),
        };
        let fv = b.download(&f);
        let mut seed = vec![0f32; rows * dim];
        for (det, w) in self.detectors.borrow_mut().iter_mut() {
            if *w <= 0.0 {
                continue;
            }
            let name = det.handle().name.clone();
            let (s, ds) = det
                .score_grad(self.backend, Some(self.inner), &fv, rows, dim)
                .map_err(|e| format!("adaptive detector `{name}` inside the attack: {e}"))?;
            for r in (0..rows).filter(|&r| fooled[r]) {
                if let Some(l) = losses.get_mut(r) {
                    *l -= *w * s[r];
                }
                for j in r * dim..(r + 1) * dim {
                    seed[j] -= *w * ds[j];
                }
            }
        }
        if seed.iter().all(|&v| v == 0.0) {
            return Ok((losses, g));
        }
        let gf = self
            .inner
            .features_vjp(b, x, &b.upload(&seed, &[rows, dim]))?;
        let mut gv = b.download(&g);
        for (a, v) in gv.iter_mut().zip(b.download(&gf)) {
            *a += v;
        }
        Ok((losses, b.upload(&gv, &g.shape)))
    }

    fn vjp(&self, b: &B, x: &Tensor<B>, dz: &Tensor<B>) -> Result<(Tensor<B>, Tensor<B>), String> {
        self.inner.vjp(b, x, dz)
    }

    fn features_vjp(&self, b: &B, x: &Tensor<B>, df: &Tensor<B>) -> Result<Tensor<B>, String> {
        self.inner.features_vjp(b, x, df)
    }

    fn input_scale(&self, b: &B) -> Result<Vec<f64>, String> {
        self.inner.input_scale(b)
    }

    fn features(&self, b: &B, x: &Tensor<B>) -> Result<Tensor<B>, String> {
        self.inner.features(b, x)
    }

    fn head(&self, b: &B, f: &Tensor<B>) -> Result<Tensor<B>, String> {
        self.inner.head(b, f)
    }

    fn model_id(&self) -> Result<String, String> {
        self.inner.model_id()
    }
}

fn accumulate(sum: &mut Option<(Vec<f32>, Vec<usize>)>, v: Vec<f32>, shape: &[usize]) {
    match sum {
        None => *sum = Some((v, shape.to_vec())),
        Some((s, _)) => {
            for (a, b) in s.iter_mut().zip(&v) {
                *a += b;
            }
        }
    }
}

fn mean(sum: Option<(Vec<f32>, Vec<usize>)>, n: usize) -> (Vec<f32>, Vec<usize>) {
    let (mut v, shape) = sum.unwrap_or_default();
    for a in &mut v {
        *a /= n as f32;
    }
    (v, shape)
}

#[cfg(test)]
mod tests {
    use super::softmax_l1;

    /// The detector-score gradient against central differences in float64, on logits where
    /// no component difference crosses zero within the step.
    #[test]
    fn softmax_l1_gradient_matches_finite_differences() {
        let cases: [(&[f32], &[f32]); 3] = [
            (&[2.0, -1.0], &[0.5, 0.25]),
            (&[0.3, 1.7, -2.2], &[1.1, -0.4, 0.9]),
            (&[4.0, 0.0, 1.0, -3.0], &[-1.0, 2.5, 0.0, 0.5]),
        ];
        for (a, b) in cases {
            let (d, ga, gb) = softmax_l1(a, b);
            assert!(d > 0.0 && d <= 2.0, "L1 of two distributions: {d}");
            let h = 1e-3f32;
            for (which, g) in [(0, &ga), (1, &gb)] {
                for j in 0..a.len() {
                    let bump = |s: f32| {
                        let (mut x, mut y) = (a.to_vec(), b.to_vec());
                        if which == 0 {
                            x[j] += s
                        } else {
                            y[j] += s
                        }
                        f64::from(softmax_l1(&x, &y).0)
                    };
                    let fd = (bump(h) - bump(-h)) / (2.0 * f64::from(h));
                    assert!(
                        (fd - f64::from(g[j])).abs() < 2e-3,
                        "d/d{}[{j}]: analytic {} vs finite difference {fd}",
                        ["a", "b"][which],
                        g[j]
                    );
                }
            }
        }
        // Equal inputs: no disagreement, no gradient.
        let (d, ga, gb) = softmax_l1(&[1.0, 2.0], &[1.0, 2.0]);
        assert_eq!(d, 0.0);
        assert!(ga.iter().chain(&gb).all(|&v| v == 0.0));
    }
}
