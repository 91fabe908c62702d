//! Model cards: the YAML beside an ONNX file (`model.onnx` -> `model.card.yaml`) that says how
//! DICOM stored values become the model's input and how to read its output. The ONNX file alone
//! cannot say this (windowing, channel replication and normalisation live in the training code),
//! and attacks must go through exactly that chain to be differentiable end to end.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::backend::ResizeMode;
use super::preprocess::{PreprocessSpec, WindowSpec};

#[derive(Debug, thiserror::Error)]
pub enum CardError {
    #[error("cannot read model card {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("model card {path}:{line}:{column}: {msg}")]
    Yaml {
        path: String,
        line: usize,
        column: usize,
        msg: String,
    },
    #[error("model card {path}: {msg}")]
    Invalid { path: String, msg: String },
}

/// Where the logits are: an output name or index.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum OutputRef {
    Index(usize),
    Name(String),
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
enum WindowCfg {
    Fixed { center: f64, width: f64 },
    Named(String),
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PreprocessingCfg {
    #[serde(default = "default_auto")]
    rescale: String,
    #[serde(default)]
    window: Option<WindowCfg>,
    #[serde(default = "default_bilinear")]
    resize: String,
    #[serde(default)]
    replicate_channels: bool,
    #[serde(default)]
    mean: Option<Vec<f32>>,
    #[serde(default)]
    std: Option<Vec<f32>>,
    #[serde(default)]
    scale: Option<f32>,
}

fn default_auto() -> String {
    "auto".into()
}
fn default_bilinear() -> String {
    "bilinear".into()
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CardFile {
    name: String,
    /// [C, H, W]
    input: Vec<usize>,
    #[serde(default)]
    channels: Option<usize>,
    preprocessing: Option<PreprocessingCfg>,
    #[serde(default)]
    classes: Vec<String>,
    #[serde(default)]
    logits: Option<OutputRef>,
    #[serde(default)]
    notes: Option<String>,
    /// The intermediate value feature-space detectors read (default: the input of the last
    /// Gemm/MatMul before the logits).
    #[serde(default)]
    features: Option<String>,
    /// Provenance written by `adverse train` (command, seed, backend, timing); not interpreted.
    #[serde(default)]
    #[allow(dead_code)]
    training: Option<serde_yaml::Value>,
    /// Measured metrics written by `adverse train`; not interpreted.
    #[serde(default)]
    #[allow(dead_code)]
    evaluation: Option<serde_yaml::Value>,
}

/// A validated model card.
#[derive(Clone, Debug)]
pub struct ModelCard {
    pub name: String,
    /// Model input [C, H, W].
    pub input_chw: [usize; 3],
    pub preprocess: PreprocessSpec,
    pub classes: Vec<String>,
    pub logits: OutputRef,
    pub notes: Option<String>,
    /// `features: <value name>`: the value `model_features` returns (None: the input of the
    /// last Gemm/MatMul before the logits).
    pub features: Option<String>,
}

/// `dir/model.onnx` -> `dir/model.card.yaml`.
pub fn card_path(model: &Path) -> PathBuf {
    let stem = model
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    model.with_file_name(format!("{stem}.card.yaml"))
}

impl ModelCard {
    pub fn load(path: &Path) -> Result<ModelCard, CardError> {
        let text = std::fs::read_to_string(path).map_err(|source| CardError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parse card YAML; `origin` names the file in errors.
    pub fn parse(text: &str, origin: &str) -> Result<ModelCard, CardError> {
        let raw: CardFile = serde_yaml::from_str(text).map_err(|e| {
            let (line, column) = e.location().map_or((0, 0), |l| (l.line(), l.column()));
            CardError::Yaml {
                path: origin.to_string(),
                line,
                column,
                msg: e.to_string(),
            }
        })?;
        let bad = |msg: String| CardError::Invalid {
            path: origin.to_string(),
            msg,
        };
        let [c, h, w] = <[usize; 3]>::try_from(raw.input.as_slice())
            .map_err(|_| bad(format!("`input` must be [C, H, W], got {:?}", raw.input)))?;
        if c == 0 || h == 0 || w == 0 {
            return Err(bad(format!("`input` has a zero size: {:?}", raw.input)));
        }
        if let Some(ch) = raw.channels
            && ch != c
        {
            return Err(bad(format!(
                "`channels: {ch}` disagrees with input channels {c}"
            )));
        }
        let p = raw.preprocessing.unwrap_or(PreprocessingCfg {
            rescale: default_auto(),
            window: None,
            resize: default_bilinear(),
            replicate_channels: false,
            mean: None,
            std: None,
            scale: None,
        });
        let rescale = match p.rescale.as_str() {
            "auto" => true,
            "none" => false,
            o => return Err(bad(format!("`rescale: {o}`: expected auto or none"))),
        };
        let window = match p.window {
            None => WindowSpec::None,
            Some(WindowCfg::Fixed { center, width }) => {
                if width.is_nan() || width <= 1.0 || !center.is_finite() {
                    return Err(bad(format!(
                        "window width must be > 1 (got center {center}, width {width})"
                    )));
                }
                WindowSpec::Fixed { center, width }
            }
            Some(WindowCfg::Named(n)) => match n.as_str() {
                "from_dicom" => WindowSpec::FromDicom,
                "minmax" => WindowSpec::MinMax,
                "none" => WindowSpec::None,
                o => {
                    return Err(bad(format!(
                        "`window: {o}`: expected {{center, width}}, from_dicom, minmax or none"
                    )));
                }
            },
        };
        let resize = match p.resize.as_str() {
            "bilinear" | "linear" => ResizeMode::Linear,
            "area" => ResizeMode::Area,
            "nearest" => ResizeMode::Nearest(super::backend::NearestMode::RoundPreferFloor),
            o => {
                return Err(bad(format!(
                    "`resize: {o}`: expected bilinear, area or nearest"
                )));
            }
        };
        if p.replicate_channels && c != 3 {
            return Err(bad(format!(
                "replicate_channels needs a 3-channel input, the card says {c}"
            )));
        }
        let per_channel =
            |v: Option<Vec<f32>>, what: &str, default: f32| -> Result<Vec<f32>, CardError> {
                match v {
                    None => Ok(vec![default; c]),
                    Some(v) if v.len() == 1 => Ok(vec![v[0]; c]),
                    Some(v) if v.len() == c => Ok(v),
                    Some(v) => Err(bad(format!(
                        "`{what}` has {} values for {c} channels",
                        v.len()
                    ))),
                }
            };
        let mean = per_channel(p.mean, "mean", 0.0)?;
        let std = per_channel(p.std, "std", 1.0)?;
        if std.iter().any(|&s| s == 0.0 || !s.is_finite()) {
            return Err(bad("`std` must be finite and non-zero".into()));
        }
        let scale = p.scale.unwrap_or(1.0);
        if !scale.is_finite() || scale == 0.0 {
            return Err(bad("`scale` must be finite and non-zero".into()));
        }
        Ok(ModelCard {
            name: raw.name,
            input_chw: [c, h, w],
            preprocess: PreprocessSpec {
                rescale,
                window,
                resize,
                replicate_channels: p.replicate_channels,
                scale,
                mean,
                std,
                out_chw: [c, h, w],
            },
            classes: raw.classes,
            logits: raw.logits.unwrap_or(OutputRef::Index(0)),
            notes: raw.notes,
            features: raw.features,
        })
    }

    /// Resolve the logits output against a graph's outputs.
    pub fn logits_index(&self, g: &super::ir::Graph) -> Result<usize, CardError> {
        let bad = |msg: String| CardError::Invalid {
            path: self.name.clone(),
            msg,
        };
        match &self.logits {
            OutputRef::Index(i) if *i < g.outputs.len() => Ok(*i),
            OutputRef::Index(i) => Err(bad(format!(
                "logits output {i} out of range ({} outputs)",
                g.outputs.len()
            ))),
            OutputRef::Name(n) => g
                .outputs
                .iter()
                .position(|&o| g.values[o].name == *n)
                .ok_or_else(|| bad(format!("no output named `{n}`"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_card() {
        let c = ModelCard::parse(
            "name: chest\ninput: [3, 224, 224]\npreprocessing:\n  rescale: auto\n  window: {center: 40, width: 400}\n  resize: area\n  replicate_channels: true\n  mean: [0.485, 0.456, 0.406]\n  std: [0.229, 0.224, 0.225]\nclasses: [normal, pneumonia]\nlogits: logits\nnotes: demo\n",
            "c.yaml",
        )
        .unwrap();
        assert_eq!(c.input_chw, [3, 224, 224]);
        assert_eq!(
            c.preprocess.window,
            WindowSpec::Fixed {
                center: 40.0,
                width: 400.0
            }
        );
        assert_eq!(c.preprocess.resize, ResizeMode::Area);
        assert!(c.preprocess.replicate_channels && c.preprocess.rescale);
        assert_eq!(c.logits, OutputRef::Name("logits".into()));
        let m = ModelCard::parse(
            "name: m\ninput: [1, 28, 28]\npreprocessing:\n  window: minmax\n  scale: 0.5\n",
            "m.yaml",
        )
        .unwrap();
        assert_eq!(m.preprocess.window, WindowSpec::MinMax);
        assert_eq!(m.preprocess.scale, 0.5);
        assert_eq!(m.logits, OutputRef::Index(0));
        assert_eq!(
            card_path(Path::new("/a/b/model.onnx")),
            PathBuf::from("/a/b/model.card.yaml")
        );
    }

    #[test]
    fn errors_carry_file_and_line() {
        let e = ModelCard::parse(
            "name: x\ninput: [1, 2, 2]\npreprocessing:\n  window: sideways\n",
            "bad.yaml",
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("bad.yaml") && e.to_string().contains("sideways"),
            "{e}"
        );
        let e = ModelCard::parse("name: x\ninput: [1, 2, 2]\nbogus: 3\n", "bad.yaml").unwrap_err();
        match &e {
            CardError::Yaml { line, .. } => assert_eq!(*line, 3, "{e}"),
            other => panic!("{other}"),
        }
        assert!(ModelCard::parse("name: x\ninput: [1, 2]\n", "b.yaml").is_err());
        assert!(
            ModelCard::parse(
                "name: x\ninput: [1, 2, 2]\npreprocessing:\n  window: {center: 1, width: 0.5}\n",
                "b.yaml"
            )
            .is_err()
        );
        assert!(
            ModelCard::parse(
                "name: x\ninput: [1, 2, 2]\npreprocessing:\n  replicate_channels: true\n",
                "b.yaml"
            )
            .is_err()
        );
    }
}
