//! Adaptive attacks through purifiers: Backward Pass Differentiable Approximation (Athalye,
//! Carlini and Wagner 2018, "Obfuscated Gradients Give a False Sense of Security").
//!
//! A purifier evaluated only against attacks that ignore it looks far stronger than it is: a
//! median filter or a JPEG round trip has no useful gradient, so a plain attack never learns to
//! survive it. With BPDA the attack's model service runs the real purifier plugin in the forward
//! pass (the attack sees, and re-checks its success on, what the model will really see) and
//! treats it as the identity in the backward pass: the gradient of the loss at the purified
//! image is applied to the unpurified one.

use std::cell::RefCell;

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
}

impl<B: PluginBackend> Bpda<'_, B> {
    fn purify(&self, b: &B, x: &Tensor<B>) -> Result<Tensor<B>, String> {
        let mut cur = b.upload(&b.download(x), &x.shape);
        // A model call may carry several copies of the batch (rows r uses frame r mod N).
        let rows = x.shape.first().copied().unwrap_or(0);
        let frames: Vec<FrameMeta> = (0..rows)
            .filter_map(|r| self.frames.get(r % self.frames.len().max(1)).cloned())
            .collect();
        for inst in self.purifiers.borrow_mut().iter_mut() {
            let name = inst.handle().name.clone();
            let out = inst
                .process(BatchInput {
                    backend: b,
                    frames: frames.clone(),
                    input: b.upload(&b.download(&cur), &cur.shape),
                    model: None,
                    seed: self.seed,
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
    fn forward(&self, b: &B, x: &Tensor<B>) -> Result<Tensor<B>, String> {
        let y = self.purify(b, x)?;
        self.inner.forward(b, &y)
    }

    /// The gradient at the purified image, returned as the gradient at `x` (identity backward).
    fn loss_grad(
        &self,
        b: &B,
        x: &Tensor<B>,
        spec: LossSpec,
        targets: &[u32],
    ) -> Result<(Vec<f32>, Tensor<B>), String> {
        let y = self.purify(b, x)?;
        self.inner.loss_grad(b, &y, spec, targets)
    }

    fn input_scale(&self, b: &B) -> Result<Vec<f64>, String> {
        self.inner.input_scale(b)
    }

    /// The features of the purified image (what the model sees).
    fn features(&self, b: &B, x: &Tensor<B>) -> Result<Tensor<B>, String> {
        let y = self.purify(b, x)?;
        self.inner.features(b, &y)
    }

    fn head(&self, b: &B, f: &Tensor<B>) -> Result<Tensor<B>, String> {
        self.inner.head(b, f)
    }

    fn model_id(&self) -> Result<String, String> {
        self.inner.model_id()
    }
}
