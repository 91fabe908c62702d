//! The training loop: seeded shuffling, mini-batches, an optimiser step on host weights after
//! each batch, validation and early stopping per epoch, a checkpoint per epoch.
//!
//! Reproducibility: the shuffle of epoch e and the PGD random starts of batch i are derived
//! from (seed, e, i) alone, never from a running generator, so a run resumed from a checkpoint
//! takes exactly the steps the uninterrupted run would have; with deterministic backend kernels
//! (the contract) and host-side updates, the same seed on the same backend gives bit-identical
//! weights.

use std::path::Path;
use std::time::Instant;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};

use crate::runtime::backend::{Backend, LossTargets, Tensor};
use crate::runtime::exec::{ExecError, Model};
use crate::runtime::ir::Graph;
use crate::runtime::loss::LossSpec;
use crate::runtime::pgd::{PgdError, PgdParams};
use crate::runtime::{export, onnx};

use super::adversarial;
use super::arch::ArchError;
use super::checkpoint::{self, CheckpointError, EpochStats, TrainState};
use super::config::{
    AdvMethod, AdvMix, ConfigError, DataSource, ModelSource, StopMetric, TrainConfig,
};
use super::data::{self, DataError, Dataset};
use super::metrics;
use super::optim::Optimizer;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Arch(#[from] ArchError),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Onnx(#[from] onnx::OnnxError),
    #[error(transparent)]
    Exec(#[from] ExecError),
    #[error(transparent)]
    Pgd(#[from] PgdError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Export(#[from] export::ExportError),
    #[error("model: {0}")]
    Model(String),
    #[error("training diverged at epoch {epoch}: the loss is {loss}")]
    Diverged { epoch: usize, loss: f64 },
}

/// splitmix64: independent seeds for (run seed, epoch, batch) triples.
pub fn mix_seed(seed: u64, a: u64, b: u64) -> u64 {
    let mut z =
        seed ^ a.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ b.wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The initial graph of a config (built-in spec seeded from `seed`, or the ONNX file).
pub fn build_graph(cfg: &TrainConfig) -> Result<Graph, TrainError> {
    let g = match &cfg.model {
        ModelSource::Builtin(spec) => spec.build(cfg.seed)?,
        ModelSource::Onnx(p) => onnx::load(p)?,
    };
    if g.inputs.len() != 1 {
        return Err(TrainError::Model(format!(
            "training needs a single-input model, this one has {}",
            g.inputs.len()
        )));
    }
    if g.params.is_empty() {
        return Err(TrainError::Model(
            "the model has no parameters to train".into(),
        ));
    }
    Ok(g)
}

/// [C, H, W] of the model input and the class count of its logits.
pub fn model_io(g: &Graph) -> Result<([usize; 3], usize), TrainError> {
    let s = &g.values[g.inputs[0]].shape;
    let chw = <[usize; 3]>::try_from(&s[1..]).map_err(|_| {
        TrainError::Model(format!(
            "training needs an NCHW input, the model's is {s:?}"
        ))
    })?;
    let o = &g.values[g.outputs[0]].shape;
    if o.len() != 2 || o[1] < 2 {
        return Err(TrainError::Model(format!(
            "training needs [N, classes >= 2] logits, the model gives {o:?}"
        )));
    }
    Ok((chw, o[1]))
}

/// (train, val, test) of a config, validated against the model.
pub fn load_data(
    cfg: &TrainConfig,
    chw: [usize; 3],
    k: usize,
) -> Result<(Dataset, Option<Dataset>, Option<Dataset>), TrainError> {
    let (mut train, val, test) = match &cfg.data {
        DataSource::Npz {
            path,
            train,
            val,
            test,
        } => (
            data::load_npz(path, train)?,
            val.as_ref().map(|s| data::load_npz(path, s)).transpose()?,
            test.as_ref().map(|s| data::load_npz(path, s)).transpose()?,
        ),
        DataSource::Dicom { train, val, test } => (
            data::load_dicom_csv(train)?,
            val.as_ref().map(|p| data::load_dicom_csv(p)).transpose()?,
            test.as_ref().map(|p| data::load_dicom_csv(p)).transpose()?,
        ),
    };
    if let Some(n) = cfg.limit_train {
        train = train.truncate(n);
    }
    let val = val.map(|v| match cfg.limit_val {
        Some(n) => v.truncate(n),
        None => v,
    });
    for d in [Some(&train), val.as_ref(), test.as_ref()]
        .into_iter()
        .flatten()
    {
        d.validate(chw, k)?;
    }
    Ok((train, val, test))
}

/// Loss, accuracy and AUC of a model on a data set (batched forward passes).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EvalResult {
    pub n: usize,
    pub loss: f64,
    pub accuracy: f64,
    pub auc: Option<f64>,
}

/// All logits of `ds` (batched).
pub fn predict<B: Backend>(
    b: &B,
    model: &Model<B>,
    ds: &Dataset,
    batch: usize,
) -> Result<Vec<f32>, TrainError> {
    let [c, h, w] = ds.chw;
    let mut out = Vec::new();
    let idx: Vec<usize> = (0..ds.len()).collect();
    for chunk in idx.chunks(batch.max(1)) {
        let (x, _) = ds.gather(chunk);
        let xt = b.upload(&x, &[chunk.len(), c, h, w]);
        let y = model.forward(b, &xt)?;
        out.extend(b.download(&y[model.logits_output]));
    }
    Ok(out)
}

pub fn evaluate<B: Backend>(
    b: &B,
    model: &Model<B>,
    ds: &Dataset,
    batch: usize,
) -> Result<EvalResult, TrainError> {
    let z = predict(b, model, ds, batch)?;
    let k = z.len() / ds.len().max(1);
    let p = metrics::softmax_rows(&z, k);
    let loss = ds
        .labels
        .iter()
        .enumerate()
        .map(|(i, &t)| -p[i * k + t as usize].max(1e-300).ln())
        .sum::<f64>()
        / ds.len().max(1) as f64;
    Ok(EvalResult {
        n: ds.len(),
        loss,
        accuracy: metrics::accuracy(&z, k, &ds.labels),
        auc: metrics::auc(&z, k, &ds.labels),
    })
}

/// Accuracy under an L∞ PGD attack of the cross-entropy (per-batch seeds from `p.seed`).
pub fn pgd_accuracy<B: Backend>(
    b: &B,
    model: &Model<B>,
    ds: &Dataset,
    batch: usize,
    p: &PgdParams,
    range: [f32; 2],
) -> Result<f64, TrainError> {
    let [c, h, w] = ds.chw;
    let idx: Vec<usize> = (0..ds.len()).collect();
    let mut hits = 0usize;
    for (bi, chunk) in idx.chunks(batch.max(1)).enumerate() {
        let (x, y) = ds.gather(chunk);
        let xt = b.upload(&x, &[chunk.len(), c, h, w]);
        let pb = PgdParams {
            seed: mix_seed(p.seed, 0xE7A1, bi as u64),
            ..*p
        };
        let xa = adversarial::craft_ce(b, model, &xt, &y, &pb, range)?;
        let z = b.download(&model.forward(b, &xa)?[model.logits_output]);
        let k = z.len() / chunk.len();
        hits += metrics::argmax_rows(&z, k)
            .iter()
            .zip(&y)
            .filter(|(a, t)| a == t)
            .count();
    }
    Ok(hits as f64 / ds.len().max(1) as f64)
}

/// A run in progress.
pub struct Trainer<'b, B: Backend> {
    b: &'b B,
    pub cfg: TrainConfig,
    pub model: Model<B>,
    pub classes: usize,
    pub state: TrainState,
    fingerprint: String,
}

impl<'b, B: Backend> Trainer<'b, B> {
    pub fn new(b: &'b B, cfg: TrainConfig, graph: Graph) -> Result<Self, TrainError> {
        let (_, classes) = model_io(&graph)?;
        let params: Vec<Vec<f32>> = graph.params.iter().map(|p| p.data.clone()).collect();
        let sizes: Vec<usize> = params.iter().map(Vec::len).collect();
        let fingerprint = fingerprint(&cfg, &graph);
        let opt = Optimizer::new(cfg.optimizer, cfg.weight_decay, &sizes);
        Ok(Trainer {
            b,
            model: Model::new(b, graph),
            classes,
            state: TrainState {
                next_epoch: 0,
                params,
                opt,
                best: None,
                since_best: 0,
                stopped_early: false,
                history: Vec::new(),
            },
            cfg,
            fingerprint,
        })
    }

    /// Whether the configured epochs ran (or early stopping ended the run).
    pub fn finished(&self) -> bool {
        self.state.stopped_early || self.state.next_epoch >= self.cfg.epochs
    }

    /// Continue from a checkpoint written by this same config.
    pub fn resume(&mut self, path: &Path) -> Result<(), TrainError> {
        let s = checkpoint::load(path, &self.fingerprint)?;
        if s.params.len() != self.state.params.len()
            || s.params
                .iter()
                .zip(&self.state.params)
                .any(|(a, b)| a.len() != b.len())
        {
            return Err(CheckpointError::Mismatch {
                path: path.display().to_string(),
                msg: "parameter sizes differ".into(),
            }
            .into());
        }
        self.state = s;
        self.upload_params()?;
        Ok(())
    }

    fn upload_params(&mut self) -> Result<(), TrainError> {
        for (i, p) in self.state.params.iter().enumerate() {
            let shape = self.model.graph.params[i].shape.clone();
            self.model.set_param(i, self.b.upload(p, &shape))?;
        }
        Ok(())
    }

    /// The weights to ship: the best validation epoch's when there was validation, else the last.
    pub fn final_params(&self) -> &[Vec<f32>] {
        self.state
            .best
            .as_ref()
            .map_or(&self.state.params, |b| &b.2)
    }

    /// A model carrying [`Trainer::final_params`].
    pub fn final_model(&self) -> Result<Model<B>, TrainError> {
        let mut g = self.model.graph.clone();
        for (p, w) in g.params.iter_mut().zip(self.final_params()) {
            p.data = w.clone();
        }
        Ok(Model::new(self.b, g).with_logits_output(self.model.logits_output)?)
    }

    /// One optimiser step on a batch; returns (sum of per-sample losses, correct predictions)
    /// on the samples the step trained on.
    pub fn step(
        &mut self,
        x: &[f32],
        y: &[u32],
        lr: f32,
        seed: u64,
    ) -> Result<(f64, usize), TrainError> {
        let b = self.b;
        let n = y.len();
        let [c, h, w] =
            <[usize; 3]>::try_from(&self.model.graph.values[self.model.graph.inputs[0]].shape[1..])
                .map_err(|_| TrainError::Model("input is not NCHW".into()))?;
        let xt = b.upload(x, &[n, c, h, w]);
        let all: Vec<usize> = (0..self.state.params.len()).collect();
        let range = self.cfg.input_range;
        let (losses, grads, logits, labels): (Vec<f32>, Vec<Tensor<B>>, Vec<f32>, Vec<u32>) =
            match &self.cfg.adversarial {
                None => {
                    let (l, g, z) = self.model.loss_and_param_grads(
                        b,
                        &xt,
                        LossSpec::CrossEntropy { targeted: false },
                        &LossTargets::Classes(y),
                        &all,
                    )?;
                    (l, g, b.download(&z), y.to_vec())
                }
                Some(a) if a.method == AdvMethod::Madry => {
                    let xa = adversarial::madry_batch(b, &self.model, &xt, y, a, range, seed)?;
                    let (xin, lab) = match a.mix {
                        AdvMix::Replace => (xa, y.to_vec()),
                        AdvMix::Mix => (
                            b.concat(&[&xt, &xa], 0),
                            y.iter().chain(y).copied().collect(),
                        ),
                    };
                    let (l, g, z) = self.model.loss_and_param_grads(
                        b,
                        &xin,
                        LossSpec::CrossEntropy { targeted: false },
                        &LossTargets::Classes(&lab),
                        &all,
                    )?;
                    (l, g, b.download(&z), lab)
                }
                Some(a) => {
                    let (l, g, z) =
                        adversarial::trades_grads(b, &self.model, &xt, y, a, range, seed)?;
                    // trades_grads already averages; undo so the scaling below is uniform.
                    let g = g
                        .into_iter()
                        .map(|t| {
                            b.unary(
                                crate::runtime::backend::Unary::Affine {
                                    a: n as f32,
                                    b: 0.0,
                                },
                                &t,
                            )
                        })
                        .collect();
                    (l, g, z, y.to_vec())
                }
            };
        let m = labels.len() as f32;
        let host: Vec<Vec<f32>> = grads
            .iter()
            .map(|g| b.download(g).into_iter().map(|v| v / m).collect())
            .collect();
        self.state.opt.step(&mut self.state.params, &host, lr);
        self.upload_params()?;
        let k = self.classes;
        let correct = metrics::argmax_rows(&logits, k)
            .iter()
            .zip(&labels)
            .filter(|(a, t)| a == t)
            .count();
        // For Mix, report on the samples' clean and adversarial halves together.
        Ok((losses.iter().map(|&l| l as f64).sum(), correct))
    }

    /// Train until `epochs` or early stopping; `on_epoch` sees each finished epoch (logging).
    pub fn run(
        &mut self,
        train: &Dataset,
        val: Option<&Dataset>,
        progress: bool,
        until: Option<usize>,
        mut on_epoch: impl FnMut(&EpochStats),
    ) -> Result<(), TrainError> {
        let cfg = self.cfg.clone();
        let end = cfg.epochs.min(until.unwrap_or(usize::MAX));
        while self.state.next_epoch < end && !self.state.stopped_early {
            let epoch = self.state.next_epoch;
            let t0 = Instant::now();
            let lr = cfg.schedule.lr(cfg.lr, epoch, cfg.epochs);
            let mut order: Vec<usize> = (0..train.len()).collect();
            order.shuffle(&mut ChaCha8Rng::seed_from_u64(mix_seed(
                cfg.seed,
                epoch as u64,
                u64::MAX,
            )));
            let nb = order.len().div_ceil(cfg.batch_size);
            let bar = progress_bar(progress, nb, epoch, cfg.epochs);
            let (mut loss_sum, mut correct, mut seen) = (0.0f64, 0usize, 0usize);
            for (bi, chunk) in order.chunks(cfg.batch_size).enumerate() {
                let (mut x, y) = train.gather(chunk);
                if let Some(aug) = &cfg.augment {
                    augment(
                        &mut x,
                        train.chw,
                        aug,
                        mix_seed(cfg.seed, epoch as u64, (bi as u64) ^ 0xA5A5_0000_0000),
                    );
                }
                let (l, c) = self.step(&x, &y, lr, mix_seed(cfg.seed, epoch as u64, bi as u64))?;
                let counted = if matches!(&cfg.adversarial, Some(a) if a.method == AdvMethod::Madry && a.mix == AdvMix::Mix)
                {
                    2 * y.len()
                } else {
                    y.len()
                };
                loss_sum += l;
                correct += c;
                seen += counted;
                if let Some(bar) = &bar {
                    bar.inc(1);
                    bar.set_message(format!(
                        "loss {:.4} acc {:.3}",
                        loss_sum / seen as f64,
                        correct as f64 / seen as f64
                    ));
                }
            }
            if let Some(bar) = &bar {
                bar.finish_and_clear();
            }
            let train_loss = loss_sum / seen.max(1) as f64;
            if !train_loss.is_finite() {
                return Err(TrainError::Diverged {
                    epoch,
                    loss: train_loss,
                });
            }
            let ev = val
                .map(|v| evaluate(self.b, &self.model, v, cfg.batch_size.max(64)))
                .transpose()?;
            let stats = EpochStats {
                epoch,
                lr,
                train_loss,
                train_accuracy: correct as f64 / seen.max(1) as f64,
                val_loss: ev.map(|e| e.loss),
                val_accuracy: ev.map(|e| e.accuracy),
                seconds: t0.elapsed().as_secs_f64(),
            };
            if let Some(e) = ev {
                let metric = match cfg.early_stopping.map(|s| s.metric) {
                    Some(StopMetric::Accuracy) => -e.accuracy,
                    _ => e.loss,
                };
                if self.state.best.as_ref().is_none_or(|b| metric < b.1) {
                    self.state.best = Some((epoch, metric, self.state.params.clone()));
                    self.state.since_best = 0;
                } else {
                    self.state.since_best += 1;
                }
                if let Some(es) = cfg.early_stopping
                    && self.state.since_best >= es.patience
                {
                    self.state.stopped_early = true;
                }
            }
            self.state.history.push(stats.clone());
            self.state.next_epoch += 1;
            if let Some(path) = &cfg.checkpoint {
                checkpoint::save(path, &self.fingerprint, &self.state)?;
            }
            on_epoch(&stats);
        }
        Ok(())
    }
}

/// Shift (edge-replicating), mirror and add Gaussian noise to each image of a batch in place.
pub fn augment(x: &mut [f32], chw: [usize; 3], a: &super::config::AugmentCfg, seed: u64) {
    use rand::Rng;
    let [c, h, w] = chw;
    let il = c * h * w;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let s = a.shift as i64;
    let mut tmp = vec![0f32; il];
    for img in x.chunks_mut(il) {
        let dy = if s > 0 { rng.random_range(-s..=s) } else { 0 };
        let dx = if s > 0 { rng.random_range(-s..=s) } else { 0 };
        let flip = a.hflip && rng.random_bool(0.5);
        for ch in 0..c {
            for yy in 0..h {
                let sy = (yy as i64 - dy).clamp(0, h as i64 - 1) as usize;
                for xx in 0..w {
                    let ox = if flip { w - 1 - xx } else { xx };
                    let sx = (ox as i64 - dx).clamp(0, w as i64 - 1) as usize;
                    tmp[ch * h * w + yy * w + xx] = img[ch * h * w + sy * w + sx];
                }
            }
        }
        img.copy_from_slice(&tmp);
        if a.noise > 0.0 {
            // Box-Muller: two uniforms in (0, 1] give two independent standard normals.
            for pair in img.chunks_mut(2) {
                let u1: f64 = 1.0 - rng.random::<f64>();
                let u2: f64 = rng.random::<f64>();
                let r = (-2.0 * u1.ln()).sqrt();
                let t = std::f64::consts::TAU * u2;
                pair[0] += a.noise * (r * t.cos()) as f32;
                if let Some(v) = pair.get_mut(1) {
                    *v += a.noise * (r * t.sin()) as f32;
                }
            }
        }
    }
}

fn progress_bar(
    on: bool,
    len: usize,
    epoch: usize,
    epochs: usize,
) -> Option<indicatif::ProgressBar> {
    if !on {
        return None;
    }
    let bar = indicatif::ProgressBar::new(len as u64);
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} ({elapsed})")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(format!("epoch {}/{}", epoch + 1, epochs));
    Some(bar)
}

/// Identifies what a checkpoint belongs to: everything that changes the trajectory.
fn fingerprint(cfg: &TrainConfig, g: &Graph) -> String {
    let mut h = Sha256::new();
    h.update(
        format!(
            "{:?}|{:?}|{:?}|{:?}|{}|{}|{:?}|{}|{}|{:?}|{:?}|{:?}",
            cfg.model,
            cfg.data,
            cfg.limit_train,
            cfg.optimizer,
            cfg.lr,
            cfg.weight_decay,
            cfg.schedule,
            cfg.batch_size,
            cfg.seed,
            (cfg.adversarial.clone(), cfg.augment),
            cfg.input_range,
            cfg.epochs
        )
        .as_bytes(),
    );
    for p in &g.params {
        h.update(p.name.as_bytes());
        h.update(format!("{:?}", p.shape).as_bytes());
    }
    hex::encode(&h.finalize()[..16])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::cpu::CpuBackend;
    use crate::train::config::TrainConfig;

    const CFG: &str = "seed: 3\nmodel:\n  builtin:\n    input: [1, 6, 6]\n    layers:\n      - conv: {out: 8, kernel: 3}\n      - relu\n      - flatten\n      - linear: {out: 2}\ndata:\n  npz: {path: unused.npz}\nepochs: 6\nbatch_size: 4\noptimizer: {sgd: {momentum: 0.0}}\nlr: 0.3\n";

    /// 12 images: class 1 has a bright left half.
    fn toy() -> Dataset {
        let mut images = Vec::new();
        let mut labels = Vec::new();
        for i in 0..12 {
            let l = (i % 2) as u32;
            for p in 0..36 {
                let bright = l == 1 && p % 6 < 3;
                images.push(if bright { 0.8 } else { 0.2 } + 0.01 * ((i * 7 + p) % 5) as f32);
            }
            labels.push(l);
        }
        Dataset {
            images,
            labels,
            chw: [1, 6, 6],
            origin: "toy".into(),
        }
    }

    fn trainer<'a>(b: &'a CpuBackend, extra: &str) -> Trainer<'a, CpuBackend> {
        let cfg = TrainConfig::parse(&format!("{CFG}{extra}"), "t.yaml", Path::new(".")).unwrap();
        let g = build_graph(&cfg).unwrap();
        Trainer::new(b, cfg, g).unwrap()
    }

    fn mean_loss(t: &Trainer<'_, CpuBackend>, b: &CpuBackend, x: &[f32], y: &[u32]) -> f64 {
        let xt = b.upload(x, &[y.len(), 1, 6, 6]);
        let (l, _, _) = t
            .model
            .loss_and_param_grads(
                b,
                &xt,
                LossSpec::CrossEntropy { targeted: false },
                &LossTargets::Classes(y),
                &[],
            )
            .unwrap();
        l.iter().map(|&v| v as f64).sum::<f64>() / y.len() as f64
    }

    #[test]
    fn one_sgd_step_changes_the_loss_as_the_gradient_predicts() {
        let b = CpuBackend::new(Some(1));
        let mut t = trainer(&b, "");
        let ds = toy();
        let idx: Vec<usize> = (0..8).collect();
        let (x, y) = ds.gather(&idx);
        let all: Vec<usize> = (0..t.state.params.len()).collect();
        let xt = b.upload(&x, &[8, 1, 6, 6]);
        let (_, g, _) = t
            .model
            .loss_and_param_grads(
                &b,
                &xt,
                LossSpec::CrossEntropy { targeted: false },
                &LossTargets::Classes(&y),
                &all,
            )
            .unwrap();
        // First-order prediction of the mean loss change for w -= lr * g_mean: -lr * |g_mean|^2.
        let gsq: f64 = g
            .iter()
            .flat_map(|t| b.download(t))
            .map(|v| (v as f64 / 8.0).powi(2))
            .sum();
        let lr = 0.01f32;
        let before = mean_loss(&t, &b, &x, &y);
        t.step(&x, &y, lr, 0).unwrap();
        let after = mean_loss(&t, &b, &x, &y);
        let predicted = -(lr as f64) * gsq;
        assert!(after < before, "{before} -> {after}");
        assert!(
            ((after - before) - predicted).abs() < 0.1 * predicted.abs(),
            "change {} vs predicted {predicted}",
            after - before
        );
    }

    #[test]
    fn training_learns_the_toy_task_and_resume_equals_uninterrupted() {
        let b = CpuBackend::new(Some(1));
        let ds = toy();
        let mut full = trainer(&b, "");
        full.run(&ds, Some(&ds), false, None, |_| {}).unwrap();
        let acc = evaluate(&b, &full.final_model().unwrap(), &ds, 5)
            .unwrap()
            .accuracy;
        assert_eq!(acc, 1.0);
        assert_eq!(full.state.history.len(), 6);
        assert!(full.state.history[5].train_loss < full.state.history[0].train_loss);
        let dir = tempfile::tempdir().unwrap();
        let ck = dir.path().join("c.ckpt");
        let extra = format!("checkpoint: {}\n", ck.display());
        let mut first = trainer(&b, &extra);
        first.run(&ds, Some(&ds), false, Some(1), |_| {}).unwrap();
        assert!(!first.finished());
        let mut second = trainer(&b, &extra);
        second.resume(&ck).unwrap();
        second.run(&ds, Some(&ds), false, None, |_| {}).unwrap();
        assert_eq!(second.state.params, full.state.params);
        assert_eq!(second.final_params(), full.final_params());
    }

    #[test]
    fn trades_with_zero_beta_is_plain_cross_entropy() {
        let b = CpuBackend::new(Some(1));
        let t = trainer(
            &b,
            "adversarial: {method: trades, eps: 0.1, steps: 2, step_size: 0.05, beta: 0}\n",
        );
        let ds = toy();
        let (x, y) = ds.gather(&[0, 1, 2, 3, 4]);
        let xt = b.upload(&x, &[5, 1, 6, 6]);
        let all: Vec<usize> = (0..t.state.params.len()).collect();
        let a = t.cfg.adversarial.clone().unwrap();
        let (l, g, _) =
            adversarial::trades_grads(&b, &t.model, &xt, &y, &a, [0.0, 1.0], 1).unwrap();
        let (l2, g2, _) = t
            .model
            .loss_and_param_grads(
                &b,
                &xt,
                LossSpec::CrossEntropy { targeted: false },
                &LossTargets::Classes(&y),
                &all,
            )
            .unwrap();
        for (u, v) in l.iter().zip(&l2) {
            assert!((u - v).abs() < 1e-5, "{u} vs {v}");
        }
        for (u, v) in g.iter().zip(&g2) {
            for (p, q) in b.download(u).iter().zip(b.download(v)) {
                assert!((p - q / 5.0).abs() < 1e-5, "{p} vs {}", q / 5.0);
            }
        }
        // With beta > 0 the KL term adds gradient.
        let a6 = AdversarialCfgExt::with_beta(&a, 6.0);
        let (l6, _, _) =
            adversarial::trades_grads(&b, &t.model, &xt, &y, &a6, [0.0, 1.0], 1).unwrap();
        assert!(l6.iter().zip(&l).all(|(p, q)| p >= q) && l6.iter().zip(&l).any(|(p, q)| p > q));
    }

    trait AdversarialCfgExt {
        fn with_beta(&self, beta: f32) -> Self;
    }
    impl AdversarialCfgExt for crate::train::config::AdversarialCfg {
        fn with_beta(&self, beta: f32) -> Self {
            Self {
                beta,
                ..self.clone()
            }
        }
    }

    #[test]
    fn augmentation_is_seeded_and_keeps_values() {
        let mut a: Vec<f32> = (0..2 * 16).map(|v| v as f32).collect();
        let mut b2 = a.clone();
        let cfg = crate::train::config::AugmentCfg {
            shift: 1,
            hflip: true,
            noise: 0.0,
        };
        augment(&mut a, [1, 4, 4], &cfg, 9);
        augment(&mut b2, [1, 4, 4], &cfg, 9);
        assert_eq!(a, b2);
        // Values are only moved/replicated within each image.
        assert!(
            a[..16].iter().all(|v| (0.0..16.0).contains(v))
                && a[16..].iter().all(|v| (16.0..32.0).contains(v))
        );
    }

    #[test]
    fn noise_augmentation_has_the_requested_spread() {
        let n = 20_000;
        let mut x = vec![0.5f32; n];
        let cfg = crate::train::config::AugmentCfg {
            shift: 0,
            hflip: false,
            noise: 0.25,
        };
        augment(&mut x, [1, 100, 100], &cfg, 3);
        let mean = x.iter().map(|v| f64::from(*v)).sum::<f64>() / n as f64;
        let var = x
            .iter()
            .map(|v| (f64::from(*v) - mean).powi(2))
            .sum::<f64>()
            / n as f64;
        // Standard errors: mean 0.25/sqrt(n) = 0.0018, std about 0.0013.
        assert!((mean - 0.5).abs() < 0.01, "mean {mean}");
        assert!((var.sqrt() - 0.25).abs() < 0.008, "std {}", var.sqrt());
        // Seeded: the same batch seed gives the same noise.
        let mut y = vec![0.5f32; n];
        augment(&mut y, [1, 100, 100], &cfg, 3);
        assert_eq!(x, y);
    }
}
