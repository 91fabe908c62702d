//! Built-in architectures: a small conv/pool/linear stack described in the training config,
//! turned into an IR [`Graph`] with seeded He-uniform initial weights.
//!
//! The graph uses only ops every part of adverse handles (Conv, Relu-like unaries, MaxPool /
//! AveragePool, Flatten, Gemm), so a model trained from a spec exports to plain ONNX that
//! onnxruntime runs and that imports back unchanged.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;

use crate::runtime::backend::{PoolKind, Unary};
use crate::runtime::ir::{Graph, Op, PadSpec, ReshapeRule};

#[derive(Debug, thiserror::Error)]
pub enum ArchError {
    #[error("architecture: layer {index} ({layer}): {msg}")]
    Layer {
        index: usize,
        layer: String,
        msg: String,
    },
    #[error("architecture: {0}")]
    Invalid(String),
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Layer {
    Conv {
        out: usize,
        kernel: usize,
        #[serde(default = "one")]
        stride: usize,
        #[serde(default)]
        pad: usize,
    },
    MaxPool {
        kernel: usize,
        #[serde(default)]
        stride: Option<usize>,
    },
    AvgPool {
        kernel: usize,
        #[serde(default)]
        stride: Option<usize>,
    },
    Relu,
    LeakyRelu {
        alpha: f32,
    },
    Tanh,
    Sigmoid,
    Flatten,
    Linear {
        out: usize,
    },
}

fn one() -> usize {
    1
}

/// `input: [C, H, W]` plus the layers, in order; the last layer's width is the class count.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ArchSpec {
    pub input: Vec<usize>,
    /// `- relu` or `- conv: {out: 16, kernel: 3}` (one-key maps, not YAML tags).
    #[serde(with = "serde_yaml::with::singleton_map_recursive")]
    pub layers: Vec<Layer>,
}

impl ArchSpec {
    /// Build the graph (input `input`, output `logits`) with weights drawn from `seed`.
    pub fn build(&self, seed: u64) -> Result<Graph, ArchError> {
        let [c, h, w] = <[usize; 3]>::try_from(self.input.as_slice()).map_err(|_| {
            ArchError::Invalid(format!("`input` must be [C, H, W], got {:?}", self.input))
        })?;
        if c == 0 || h == 0 || w == 0 {
            return Err(ArchError::Invalid(format!(
                "`input` has a zero size: {:?}",
                self.input
            )));
        }
        if self.layers.is_empty() {
            return Err(ArchError::Invalid("no layers".into()));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut g = Graph::default();
        let mut x = g.add_input("input", vec![1, c, h, w]);
        let last = self.layers.len() - 1;
        for (i, layer) in self.layers.iter().enumerate() {
            let lerr = |msg: String| ArchError::Layer {
                index: i,
                layer: format!("{layer:?}"),
                msg,
            };
            let shape = g.values[x].shape.clone();
            let (op, extra): (Op, Vec<usize>) = match *layer {
                Layer::Conv {
                    out,
                    kernel,
                    stride,
                    pad,
                } => {
                    if shape.len() != 4 {
                        return Err(lerr(format!("needs an NCHW input, got {shape:?}")));
                    }
                    if out == 0 || kernel == 0 || stride == 0 {
                        return Err(lerr("out, kernel and stride must be positive".into()));
                    }
                    let cin = shape[1];
                    let fan_in = cin * kernel * kernel;
                    let wdata = he_uniform(&mut rng, out * fan_in, fan_in);
                    let wv = g.add_param(
                        format!("conv{i}.weight"),
                        vec![out, cin, kernel, kernel],
                        wdata,
                    );
                    let bv = g.add_param(format!("conv{i}.bias"), vec![out], vec![0.0; out]);
                    (
                        Op::Conv {
                            kernel: [kernel; 2],
                            stride: [stride; 2],
                            dilation: [1, 1],
                            pad: PadSpec::Explicit([pad; 4]),
                            groups: 1,
                        },
                        vec![wv, bv],
                    )
                }
                Layer::MaxPool { kernel, stride } | Layer::AvgPool { kernel, stride } => {
                    if shape.len() != 4 {
                        return Err(lerr(format!("needs an NCHW input, got {shape:?}")));
                    }
                    let stride = stride.unwrap_or(kernel);
                    if kernel == 0 || stride == 0 {
                        return Err(lerr("kernel and stride must be positive".into()));
                    }
                    let kind = if matches!(layer, Layer::MaxPool { .. }) {
                        PoolKind::Max
                    } else {
                        PoolKind::Avg {
                            count_include_pad: false,
                        }
                    };
                    (
                        Op::Pool {
                            kind,
                            kernel: [kernel; 2],
                            stride: [stride; 2],
                            dilation: [1, 1],
                            pad: PadSpec::Explicit([0; 4]),
                            ceil_mode: false,
                        },
                        vec![],
                    )
                }
                Layer::Relu => (Op::Unary(Unary::Relu), vec![]),
                Layer::LeakyRelu { alpha } => (Op::Unary(Unary::LeakyRelu { alpha }), vec![]),
                Layer::Tanh => (Op::Unary(Unary::Tanh), vec![]),
                Layer::Sigmoid => (Op::Unary(Unary::Sigmoid), vec![]),
                Layer::Flatten => (Op::Reshape(ReshapeRule::Flatten { axis: 1 }), vec![]),
                Layer::Linear { out } => {
                    if shape.len() != 2 {
                        return Err(lerr(format!(
                            "needs a [N, features] input (add `flatten` before it), got {shape:?}"
                        )));
                    }
                    if out == 0 {
                        return Err(lerr("out must be positive".into()));
                    }
                    let fan_in = shape[1];
                    let wdata = he_uniform(&mut rng, out * fan_in, fan_in);
                    let wv = g.add_param(format!("fc{i}.weight"), vec![out, fan_in], wdata);
                    let bv = g.add_param(format!("fc{i}.bias"), vec![out], vec![0.0; out]);
                    (
                        Op::Gemm {
                            alpha: 1.0,
                            beta: 1.0,
                            trans_a: false,
                            trans_b: true,
                        },
                        vec![wv, bv],
                    )
                }
            };
            let name = if i == last {
                "logits".to_string()
            } else {
                format!("layer{i}")
            };
            let mut inputs = vec![x];
            inputs.extend(extra);
            x = g
                .add_node(name, op, inputs)
                .map_err(|e| lerr(e.to_string()))?;
        }
        if g.values[x].shape.len() != 2 {
            return Err(ArchError::Invalid(format!(
                "the last layer must give [N, classes] logits, got {:?}",
                g.values[x].shape
            )));
        }
        g.outputs.push(x);
        Ok(g)
    }
}

/// He (Kaiming) uniform: U(-b, b), b = sqrt(6 / fan_in), the ReLU-preserving variance.
fn he_uniform(rng: &mut ChaCha8Rng, n: usize, fan_in: usize) -> Vec<f32> {
    let b = (6.0 / fan_in.max(1) as f64).sqrt() as f32;
    (0..n).map(|_| rng.random_range(-b..b)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> ArchSpec {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn builds_a_cnn_with_expected_shapes_and_seeded_weights() {
        let s = spec(
            "input: [1, 8, 8]\nlayers:\n  - conv: {out: 4, kernel: 3, pad: 1}\n  - relu\n  - max_pool: {kernel: 2}\n  - flatten\n  - linear: {out: 3}\n",
        );
        let g = s.build(7).unwrap();
        let out = g.outputs[0];
        assert_eq!(g.values[out].shape, vec![1, 3]);
        assert_eq!(g.values[out].name, "logits");
        assert_eq!(g.params.len(), 4);
        assert_eq!(g.params[2].shape, vec![3, 4 * 4 * 4]);
        let again = s.build(7).unwrap();
        assert_eq!(g.params[0].data, again.params[0].data);
        let other = s.build(8).unwrap();
        assert_ne!(g.params[0].data, other.params[0].data);
        let b = (6.0f32 / 9.0).sqrt();
        assert!(g.params[0].data.iter().all(|v| v.abs() <= b));
    }

    #[test]
    fn rejects_inconsistent_specs() {
        let e = spec("input: [1, 8, 8]\nlayers:\n  - linear: {out: 3}\n")
            .build(0)
            .unwrap_err();
        assert!(e.to_string().contains("flatten"), "{e}");
        let e = spec("input: [1, 8, 8]\nlayers:\n  - conv: {out: 2, kernel: 3}\n")
            .build(0)
            .unwrap_err();
        assert!(e.to_string().contains("logits"), "{e}");
        let e = spec("input: [1, 2, 2]\nlayers:\n  - conv: {out: 2, kernel: 5}\n  - flatten\n")
            .build(0)
            .unwrap_err();
        assert!(matches!(e, ArchError::Layer { index: 0, .. }), "{e}");
        assert!(spec("input: [8, 8]\nlayers: [relu]\n").build(0).is_err());
        assert!(serde_yaml::from_str::<ArchSpec>("input: [1, 2, 2]\nlayers: [bogus]\n").is_err());
    }
}
