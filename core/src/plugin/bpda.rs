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
//! easily detected"; He et al. 2017 for feature squeezing).

use std::cell::{Cell, RefCell};

use super::host::{BatchInput, BatchModel, Instance, PluginBackend};
use crate::runtime::backend::Tensor;
use crate::runtime::loss::LossSpec;
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
