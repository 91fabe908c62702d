//! The training config (`adverse train CONFIG.yaml`): model, data, optimiser, schedule,
//! stopping, checkpointing, adversarial training, export and evaluation. Relative paths are
//! relative to the config file, so a config in `pipelines/train/` works from any directory.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer};

use super::arch::ArchSpec;
use super::optim::{OptimizerKind, Schedule};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read training config {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("training config {path}: {msg}")]
    Yaml { path: String, msg: String },
    #[error("training config {path}: {msg}")]
    Invalid { path: String, msg: String },
}

/// A number written as `0.5`, `8` or a fraction `"8/255"` (epsilons read best in stored units).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Num(pub f32);

impl<'de> Deserialize<'de> for Num {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            F(f64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::F(v) => Ok(Num(v as f32)),
            Raw::S(s) => {
                let parse = |t: &str| t.trim().parse::<f64>().ok();
                let v = match s.split_once('/') {
                    Some((a, b)) => parse(a).zip(parse(b)).map(|(a, b)| a / b),
                    None => parse(&s),
                };
                v.filter(|v| v.is_finite())
                    .map(|v| Num(v as f32))
                    .ok_or_else(|| {
                        serde::de::Error::custom(format!(
                            "`{s}` is not a number or an a/b fraction"
                        ))
                    })
            }
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ModelSource {
    /// A conv/pool/linear stack built and initialised from the seed.
    Builtin(ArchSpec),
    /// An ONNX file whose initializers are the initial weights (all float parameters train).
    Onnx(PathBuf),
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum DataSource {
    /// `<split>_images` / `<split>_labels` arrays of one `.npz`.
    Npz {
        path: PathBuf,
        #[serde(default = "split_train")]
        train: String,
        #[serde(default = "split_val")]
        val: Option<String>,
        #[serde(default = "split_test")]
        test: Option<String>,
    },
    /// Labels CSVs (`file,label` columns) of DICOM folders.
    Dicom {
        train: PathBuf,
        #[serde(default)]
        val: Option<PathBuf>,
        #[serde(default)]
        test: Option<PathBuf>,
    },
}

fn split_train() -> String {
    "train".into()
}
fn split_val() -> Option<String> {
    Some("val".into())
}
fn split_test() -> Option<String> {
    Some("test".into())
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum StopMetric {
    Loss,
    Accuracy,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EarlyStopping {
    /// Epochs without improvement of the validation metric before stopping.
    pub patience: usize,
    #[serde(default = "metric_loss")]
    pub metric: StopMetric,
}

fn metric_loss() -> StopMetric {
    StopMetric::Loss
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum AdvMethod {
    /// Madry et al.: train on PGD examples of the cross-entropy.
    Madry,
    /// Zhang et al.: CE(clean) + beta * KL(clean || adversarial), examples maximise the KL.
    Trades,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum AdvMix {
    /// Each batch is replaced by its PGD examples.
    Replace,
    /// Each batch is the clean samples plus their PGD examples.
    Mix,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdversarialCfg {
    pub method: AdvMethod,
    /// L∞ radius in model-input units (`8/255` = 8 stored units of an 8-bit image / 255).
    pub eps: Num,
    pub steps: usize,
    pub step_size: Num,
    #[serde(default = "mix_replace")]
    pub mix: AdvMix,
    /// TRADES weight of the KL term.
    #[serde(default = "trades_beta")]
    pub beta: f32,
    /// Ramp eps (and the step size) linearly from eps/warmup to eps over this many epochs: a
    /// small CNN trained at full eps from random weights tends to collapse to a constant
    /// prediction.
    #[serde(default)]
    pub warmup_epochs: usize,
}

impl AdversarialCfg {
    /// The settings for `epoch` (0-based) after the warm-up ramp.
    pub fn at_epoch(&self, epoch: usize) -> AdversarialCfg {
        let f = if self.warmup_epochs == 0 {
            1.0
        } else {
            ((epoch + 1) as f32 / self.warmup_epochs as f32).min(1.0)
        };
        AdversarialCfg {
            eps: Num(self.eps.0 * f),
            step_size: Num(self.step_size.0 * f),
            ..self.clone()
        }
    }
}

fn mix_replace() -> AdvMix {
    AdvMix::Replace
}
fn trades_beta() -> f32 {
    6.0
}

/// Robust-accuracy evaluation after training (PGD with random start, cross-entropy).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PgdEvalCfg {
    /// Radii in model-input units.
    pub eps: Vec<Num>,
    pub steps: usize,
    /// Step size as a fraction of eps (2.5 * eps / steps is Madry's choice).
    #[serde(default = "rel_step")]
    pub rel_step: f32,
    /// Evaluate on the first `limit` test samples only.
    #[serde(default)]
    pub limit: Option<usize>,
}

fn rel_step() -> f32 {
    0.25
}

/// Where the trained model goes, plus the model-card fields that describe its input.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OutputCfg {
    pub onnx: PathBuf,
    pub name: String,
    #[serde(default)]
    pub classes: Vec<String>,
    /// The `preprocessing:` block of the card, copied verbatim.
    #[serde(default)]
    pub preprocessing: Option<serde_yaml::Value>,
    #[serde(default)]
    pub notes: Option<String>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    #[serde(default)]
    pub seed: u64,
    pub model: ModelSource,
    pub data: DataSource,
    /// Use only the first N training samples (quick runs, tests).
    #[serde(default)]
    pub limit_train: Option<usize>,
    #[serde(default)]
    pub limit_val: Option<usize>,
    pub epochs: usize,
    pub batch_size: usize,
    pub optimizer: OptimizerKind,
    pub lr: f32,
    #[serde(default)]
    pub weight_decay: f32,
    #[serde(default)]
    pub schedule: Schedule,
    #[serde(default)]
    pub early_stopping: Option<EarlyStopping>,
    /// Written after every epoch; `--resume` continues from it.
    #[serde(default)]
    pub checkpoint: Option<PathBuf>,
    #[serde(default)]
    pub augment: Option<AugmentCfg>,
    #[serde(default)]
    pub adversarial: Option<AdversarialCfg>,
    /// Per-sample value range crafted examples are clamped to (model-input units).
    #[serde(default = "unit_range")]
    pub input_range: [f32; 2],
    #[serde(default)]
    pub output: Option<OutputCfg>,
    #[serde(default)]
    pub pgd_eval: Option<PgdEvalCfg>,
}

/// Random per-sample training augmentation (seeded per batch).
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct AugmentCfg {
    /// Shift by up to this many pixels in each axis (edge pixels repeat into the gap).
    #[serde(default)]
    pub shift: usize,
    /// Mirror left-right with probability 1/2.
    #[serde(default)]
    pub hflip: bool,
    /// Standard deviation of Gaussian noise added to every input value (model-input units,
    /// unclipped). Randomized smoothing certifies only what its base classifier gets right under
    /// noise, so the base model is trained under the smoothing σ (Cohen et al. 2019, section 5).
    #[serde(default)]
    pub noise: f32,
}

fn unit_range() -> [f32; 2] {
    [0.0, 1.0]
}

impl TrainConfig {
    /// Read, parse, validate and resolve relative paths against the file's folder.
    pub fn load(path: &Path) -> Result<TrainConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, &path.display().to_string(), base)
    }

    pub fn parse(text: &str, origin: &str, base: &Path) -> Result<TrainConfig, ConfigError> {
        let de = serde_yaml::Deserializer::from_str(text);
        let mut c: TrainConfig = serde_yaml::with::singleton_map_recursive::deserialize(de)
            .map_err(|e| ConfigError::Yaml {
                path: origin.to_string(),
                msg: e.to_string(),
            })?;
        let bad = |msg: String| ConfigError::Invalid {
            path: origin.to_string(),
            msg,
        };
        if c.epochs == 0 {
            return Err(bad("`epochs` must be at least 1".into()));
        }
        if c.batch_size == 0 {
            return Err(bad("`batch_size` must be at least 1".into()));
        }
        if !(c.lr.is_finite() && c.lr > 0.0) {
            return Err(bad(format!("`lr` must be positive, got {}", c.lr)));
        }
        if !(c.weight_decay.is_finite() && c.weight_decay >= 0.0) {
            return Err(bad("`weight_decay` must be >= 0".into()));
        }
        if c.input_range[0].partial_cmp(&c.input_range[1]) != Some(std::cmp::Ordering::Less) {
            return Err(bad(format!("`input_range` {:?} is empty", c.input_range)));
        }
        if let Some(a) = &c.adversarial
            && (!a.eps.0.is_finite()
                || a.eps.0 <= 0.0
                || !a.step_size.0.is_finite()
                || a.step_size.0 <= 0.0
                || a.steps == 0)
        {
            return Err(bad(
                "adversarial: eps, step_size and steps must be positive".into(),
            ));
        }
        let abs = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        match &mut c.model {
            ModelSource::Onnx(p) => abs(p),
            ModelSource::Builtin(_) => {}
        }
        match &mut c.data {
            DataSource::Npz { path, .. } => abs(path),
            DataSource::Dicom { train, val, test } => {
                abs(train);
                val.iter_mut().for_each(abs);
                test.iter_mut().for_each(abs);
            }
        }
        c.checkpoint.iter_mut().for_each(abs);
        if let Some(o) = &mut c.output {
            abs(&mut o.onnx);
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = "model:\n  builtin:\n    input: [1, 4, 4]\n    layers: [flatten, {linear: {out: 2}}]\ndata:\n  npz: {path: d.npz}\nepochs: 1\nbatch_size: 4\noptimizer: {sgd: {momentum: 0.9}}\nlr: 0.1\n";

    #[test]
    fn parses_and_resolves_paths() {
        let c = TrainConfig::parse(MIN, "c.yaml", Path::new("/cfg")).unwrap();
        assert_eq!(
            c.data,
            DataSource::Npz {
                path: "/cfg/d.npz".into(),
                train: "train".into(),
                val: Some("val".into()),
                test: Some("test".into())
            }
        );
        assert_eq!(
            c.optimizer,
            OptimizerKind::Sgd {
                momentum: 0.9,
                nesterov: false
            }
        );
        let adv = format!(
            "{MIN}adversarial: {{method: trades, eps: 8/255, steps: 3, step_size: \"2/255\"}}\nschedule: {{step: {{every: 2, gamma: 0.1}}}}\n"
        );
        let c = TrainConfig::parse(&adv, "c.yaml", Path::new("/cfg")).unwrap();
        let a = c.adversarial.unwrap();
        assert!(
            (a.eps.0 - 8.0 / 255.0).abs() < 1e-7
                && a.method == AdvMethod::Trades
                && a.mix == AdvMix::Replace
        );
        assert_eq!(
            c.schedule,
            Schedule::Step {
                every: 2,
                gamma: 0.1
            }
        );
    }

    #[test]
    fn rejects_bad_values_with_the_file_name() {
        for (from, to) in [
            ("epochs: 1", "epochs: 0"),
            ("batch_size: 4", "batch_size: 0"),
            ("lr: 0.1", "lr: -1"),
            ("lr: 0.1", "lr: 0.1\nbogus: 1"),
        ] {
            let e =
                TrainConfig::parse(&MIN.replace(from, to), "bad.yaml", Path::new(".")).unwrap_err();
            assert!(e.to_string().contains("bad.yaml"), "{e}");
        }
        let e = TrainConfig::parse(
            &format!("{MIN}adversarial: {{method: madry, eps: x/2, steps: 1, step_size: 1}}\n"),
            "bad.yaml",
            Path::new("."),
        )
        .unwrap_err();
        assert!(e.to_string().contains("x/2"), "{e}");
    }
}
