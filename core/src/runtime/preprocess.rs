//! Differentiable preprocessing: DICOM stored values -> model input, as IR nodes prepended to the
//! model graph, so attacks perturb stored values (what gets written back to DICOM) and get exact
//! gradients through rescale, windowing, resizing, channel replication and normalisation.
//!
//! Per-frame quantities (rescale slope/intercept, the DICOM window, min/max for `minmax`) are
//! folded on the host, in float64, into one per-sample affine `a * S + b` fed as two extra graph
//! inputs of shape `[N, 1, 1, 1]`. They are constants of the batch: `minmax` scaling uses the
//! original frame's min/max and is not differentiated through (a perturbation must not move the
//! normalisation it is measured against).

use super::backend::{Backend, Binary, CoordTransform, LossTargets, ResizeMode, Tensor, Unary};
use super::exec::{ExecError, Model};
use super::ir::{Graph, Op, ResizeSize, ValueId, ValueKind};
use super::loss::LossSpec;
use super::shape::ShapeError;

#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    #[error("the model input must be [N, C, H, W], got {0:?}")]
    ModelInput(Vec<usize>),
    #[error("the card says input [C, H, W] = {card:?} but the model takes {model:?}")]
    CardMismatch { card: [usize; 3], model: Vec<usize> },
    #[error("frame {frame}: the card asks for the DICOM window but the frame has none")]
    NoWindow { frame: usize },
    #[error("frame {frame}: window width {width} must be > 1")]
    WindowWidth { frame: usize, width: f64 },
    #[error("{frames} frame parameter sets for a batch of {n}")]
    FrameCount { frames: usize, n: usize },
    #[error("stored values: {got} samples for shape {shape:?}")]
    StoredSize { got: usize, shape: Vec<usize> },
    #[error("{got} image channels: preprocessing takes 1-channel frames")]
    Channels { got: usize },
    #[error(transparent)]
    Shape(#[from] ShapeError),
    #[error(transparent)]
    Exec(#[from] ExecError),
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum WindowSpec {
    Fixed { center: f64, width: f64 },
    FromDicom,
    MinMax,
    None,
}

/// What the model card asks for.
#[derive(Clone, Debug, PartialEq)]
pub struct PreprocessSpec {
    /// Apply each frame's Rescale Slope/Intercept.
    pub rescale: bool,
    pub window: WindowSpec,
    pub resize: ResizeMode,
    pub replicate_channels: bool,
    /// Multiplier after windowing (e.g. 255 or 1/255 to match the training range).
    pub scale: f32,
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    /// Model input [C, H, W].
    pub out_chw: [usize; 3],
}

/// Per-frame values read from DICOM.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FrameParams {
    pub slope: f64,
    pub intercept: f64,
    /// (center, width) of the frame's VOI LUT window, if any.
    pub window: Option<(f64, f64)>,
}

impl Default for FrameParams {
    fn default() -> Self {
        FrameParams {
            slope: 1.0,
            intercept: 0.0,
            window: None,
        }
    }
}

impl PreprocessSpec {
    fn clips(&self) -> bool {
        matches!(
            self.window,
            WindowSpec::Fixed { .. } | WindowSpec::FromDicom
        )
    }

    /// Host-side fold of one frame into `(a, b)` with `pre_clip = a * S + b`.
    pub fn frame_affine(
        &self,
        frame_idx: usize,
        f: &FrameParams,
        stored: &[f32],
    ) -> Result<(f64, f64), PreprocessError> {
        let (s, i) = if self.rescale {
            (f.slope, f.intercept)
        } else {
            (1.0, 0.0)
        };
        let win = |c: f64, w: f64| -> Result<(f64, f64), PreprocessError> {
            if w.is_nan() || w <= 1.0 {
                return Err(PreprocessError::WindowWidth {
                    frame: frame_idx,
                    width: w,
                });
            }
            // DICOM linear VOI: (x - (c - 0.5)) / (w - 1) + 0.5, with x = s*S + i.
            Ok((s / (w - 1.0), (i - (c - 0.5)) / (w - 1.0) + 0.5))
        };
        Ok(match self.window {
            WindowSpec::Fixed { center, width } => win(center, width)?,
            WindowSpec::FromDicom => {
                let (c, w) = f
                    .window
                    .ok_or(PreprocessError::NoWindow { frame: frame_idx })?;
                win(c, w)?
            }
            WindowSpec::MinMax => {
                let (lo, hi) =
                    stored
                        .iter()
                        .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), &v| {
                            let x = s * v as f64 + i;
                            (l.min(x), h.max(x))
                        });
                let sc = self.scale as f64;
                if hi > lo {
                    (sc * s / (hi - lo), sc * (i - lo) / (hi - lo))
                } else {
                    (0.0, 0.0)
                }
            }
            WindowSpec::None => (s * self.scale as f64, i * self.scale as f64),
        })
    }

    /// Build `stored [N,1,h,w], a [N,1,1,1], b [N,1,1,1] -> model outputs` for frames of `in_hw`.
    pub fn build(&self, model: &Graph, in_hw: [usize; 2]) -> Result<Graph, PreprocessError> {
        let mi = model
            .inputs
            .first()
            .map(|&v| model.values[v].shape.clone())
            .unwrap_or_default();
        if mi.len() != 4 {
            return Err(PreprocessError::ModelInput(mi));
        }
        if mi[1..] != self.out_chw {
            return Err(PreprocessError::CardMismatch {
                card: self.out_chw,
                model: mi,
            });
        }
        let [c, h, w] = self.out_chw;
        let mut g = Graph {
            opset: model.opset,
            ..Graph::default()
        };
        let stored = g.add_input("stored_values", vec![1, 1, in_hw[0], in_hw[1]]);
        let a = g.add_input("pp_scale", vec![1, 1, 1, 1]);
        let b = g.add_input("pp_offset", vec![1, 1, 1, 1]);
        let mut x = g.add_node("pp/affine_mul", Op::Binary(Binary::Mul), vec![stored, a])?;
        x = g.add_node("pp/affine_add", Op::Binary(Binary::Add), vec![x, b])?;
        if self.clips() {
            x = g.add_node(
                "pp/window_clip",
                Op::Unary(Unary::Clip { min: 0.0, max: 1.0 }),
                vec![x],
            )?;
            if self.scale != 1.0 {
                x = g.add_node(
                    "pp/scale",
                    Op::Unary(Unary::Affine {
                        a: self.scale,
                        b: 0.0,
                    }),
                    vec![x],
                )?;
            }
        }
        if in_hw != [h, w] {
            let coord = CoordTransform::HalfPixel;
            x = g.add_node(
                "pp/resize",
                Op::Resize {
                    mode: self.resize,
                    coord,
                    size: ResizeSize::Sizes([h, w]),
                },
                vec![x],
            )?;
        }
        if c > 1 {
            if !self.replicate_channels {
                return Err(PreprocessError::Channels { got: c });
            }
            x = g.add_node("pp/replicate", Op::Concat { axis: 1 }, vec![x; c])?;
        }
        if self.mean.iter().any(|&m| m != 0.0) {
            let m = g.add_param("pp/mean", vec![c, 1, 1], self.mean.clone());
            x = g.add_node("pp/sub_mean", Op::Binary(Binary::Sub), vec![x, m])?;
        }
        if self.std.iter().any(|&s| s != 1.0) {
            let s = g.add_param("pp/std", vec![c, 1, 1], self.std.clone());
            x = g.add_node("pp/div_std", Op::Binary(Binary::Div), vec![x, s])?;
        }
        splice(&mut g, model, x);
        Ok(g)
    }
}

/// Append `model` to `g`, feeding its first input from `x`.
fn splice(g: &mut Graph, model: &Graph, x: ValueId) {
    let mut map = vec![usize::MAX; model.values.len()];
    map[model.inputs[0]] = x;
    for p in &model.params {
        map[p.value] = g.add_param(p.name.clone(), p.shape.clone(), p.data.clone());
    }
    for n in &model.nodes {
        let nid = g.nodes.len();
        let v = &model.values[n.output];
        let out = g.add_value(
            v.name.clone(),
            ValueKind::Node(nid),
            v.shape.clone(),
            v.batched,
        );
        map[n.output] = out;
        g.nodes.push(super::ir::Node {
            name: n.name.clone(),
            op: n.op.clone(),
            inputs: n.inputs.iter().map(|&i| map[i]).collect(),
            output: out,
        });
    }
    g.outputs = model.outputs.iter().map(|&o| map[o]).collect();
}

/// A model with its preprocessing, for frames of one size.
pub struct Pipeline<B: Backend> {
    pub model: Model<B>,
    pub spec: PreprocessSpec,
    pub in_hw: [usize; 2],
    /// The features / head split, built on first use (see [`Pipeline::features`]).
    split: std::sync::OnceLock<Result<Split<B>, String>>,
}

/// The pipeline split at the feature value: stored values -> features, features -> logits.
struct Split<B: Backend> {
    features: Model<B>,
    head: Model<B>,
    /// The feature value's shape at batch 1 (features are returned flattened to `[N, D]`).
    shape: Vec<usize>,
    dim: usize,
}

/// The per-batch constants: one (a, b) per frame.
pub struct FrameConsts<B: Backend> {
    pub a: Tensor<B>,
    pub b: Tensor<B>,
}

impl<B: Backend> Pipeline<B> {
    pub fn new(
        backend: &B,
        spec: PreprocessSpec,
        model: &Graph,
        in_hw: [usize; 2],
        logits_output: usize,
    ) -> Result<Self, PreprocessError> {
        let g = spec.build(model, in_hw)?;
        let model = Model::new(backend, g).with_logits_output(logits_output)?;
        Ok(Pipeline {
            model,
            spec,
            in_hw,
            split: std::sync::OnceLock::new(),
        })
    }

    /// The split at the feature value named `feature` (or the default: the input of the last
    /// Gemm/MatMul before the logits). The name is fixed per pipeline: the first call decides.
    fn split(&self, backend: &B, feature: Option<&str>) -> Result<&Split<B>, String> {
        self.split
            .get_or_init(|| {
                let g = &self.model.graph;
                let logits = g.outputs[self.model.logits_output];
                let f = super::split::feature_value(g, logits, feature)?;
                let fg = super::split::subgraph(g, &g.inputs, &[f])?;
                let hg = super::split::subgraph(g, &[f], &[logits])?;
                let shape = g.values[f].shape.clone();
                let dim = shape[1..].iter().product();
                Ok(Split {
                    features: Model::new(backend, fg),
                    head: Model::new(backend, hg),
                    shape,
                    dim,
                })
            })
            .as_ref()
            .map_err(|e| e.clone())
    }

    /// Features `[N, D]` (the feature value flattened per sample) for stored values.
    pub fn features(
        &self,
        backend: &B,
        stored: &Tensor<B>,
        k: &FrameConsts<B>,
        feature: Option<&str>,
    ) -> Result<Tensor<B>, String> {
        self.check(stored, k).map_err(|e| e.to_string())?;
        let s = self.split(backend, feature)?;
        let out = s
            .features
            .forward_multi(backend, &[stored, &k.a, &k.b])
            .map_err(|e| e.to_string())?;
        let f = out
            .into_iter()
            .next()
            .ok_or("the feature graph has no output")?;
        let n = f.shape.first().copied().unwrap_or(0);
        Ok(f.reshape(&[n, s.dim]))
    }

    /// The gradient w.r.t. the stored values of `sum(df * features)`, `df` `[N, D]` like
    /// [`Pipeline::features`]' output: the backward pass of the feature sub-graph, for
    /// objectives defined on the features (a detector's score).
    pub fn features_vjp(
        &self,
        backend: &B,
        stored: &Tensor<B>,
        k: &FrameConsts<B>,
        feature: Option<&str>,
        df: &Tensor<B>,
    ) -> Result<Tensor<B>, String> {
        self.check(stored, k).map_err(|e| e.to_string())?;
        let s = self.split(backend, feature)?;
        let n = stored.shape.first().copied().unwrap_or(0);
        if df.shape != [n, s.dim] {
            return Err(format!(
                "feature gradient of shape {:?} for features [{n}, {}]",
                df.shape, s.dim
            ));
        }
        let mut shape = s.shape.clone();
        shape[0] = n;
        let (_, mut g, _) = s
            .features
            .loss_and_grads(
                backend,
                &[stored, &k.a, &k.b],
                LossSpec::Dense,
                &LossTargets::Dense(&df.reshape(&shape)),
                &[0],
                &[],
            )
            .map_err(|e| e.to_string())?;
        Ok(g.inputs.swap_remove(0))
    }

    /// Logits `[R, K]` of the head for features `[R, D]` (any number of rows).
    pub fn head(
        &self,
        backend: &B,
        features: &Tensor<B>,
        feature: Option<&str>,
    ) -> Result<Tensor<B>, String> {
        let s = self.split(backend, feature)?;
        if features.shape.len() != 2 || features.shape[1] != s.dim || features.shape[0] == 0 {
            return Err(format!(
                "features of shape {:?} for a head that takes [R, {}]",
                features.shape, s.dim
            ));
        }
        let mut shape = s.shape.clone();
        shape[0] = features.shape[0];
        let out = s
            .head
            .forward(backend, &features.reshape(&shape))
            .map_err(|e| e.to_string())?;
        out.into_iter()
            .next()
            .ok_or_else(|| "the head graph has no output".to_string())
    }

    /// Fold each frame's parameters (and, for `minmax`, its original stored values
    /// `[N, 1, h, w]` on the host) into the batch constants.
    pub fn frame_consts(
        &self,
        backend: &B,
        stored: &[f32],
        frames: &[FrameParams],
    ) -> Result<FrameConsts<B>, PreprocessError> {
        let per = self.in_hw[0] * self.in_hw[1];
        let n = frames.len();
        if stored.len() != n * per {
            return Err(PreprocessError::StoredSize {
                got: stored.len(),
                shape: vec![n, 1, self.in_hw[0], self.in_hw[1]],
            });
        }
        let mut a = Vec::with_capacity(n);
        let mut b = Vec::with_capacity(n);
        for (i, f) in frames.iter().enumerate() {
            let (ai, bi) = self
                .spec
                .frame_affine(i, f, &stored[i * per..(i + 1) * per])?;
            a.push(ai as f32);
            b.push(bi as f32);
        }
        Ok(FrameConsts {
            a: backend.upload(&a, &[n, 1, 1, 1]),
            b: backend.upload(&b, &[n, 1, 1, 1]),
        })
    }

    pub fn forward(
        &self,
        backend: &B,
        stored: &Tensor<B>,
        k: &FrameConsts<B>,
    ) -> Result<Vec<Tensor<B>>, PreprocessError> {
        self.check(stored, k)?;
        Ok(self.model.forward_multi(backend, &[stored, &k.a, &k.b])?)
    }

    /// Per-sample objectives, the gradient w.r.t. the stored values, and the logits.
    pub fn loss_and_stored_grad(
        &self,
        backend: &B,
        stored: &Tensor<B>,
        k: &FrameConsts<B>,
        spec: LossSpec,
        targets: &LossTargets<'_, B>,
    ) -> Result<(Vec<f32>, Tensor<B>, Tensor<B>), PreprocessError> {
        self.check(stored, k)?;
        let (l, mut g, z) =
            self.model
                .loss_and_grads(backend, &[stored, &k.a, &k.b], spec, targets, &[0], &[])?;
        Ok((l, g.inputs.swap_remove(0), z))
    }

    fn check(&self, stored: &Tensor<B>, k: &FrameConsts<B>) -> Result<(), PreprocessError> {
        let n = stored.shape.first().copied().unwrap_or(0);
        if k.a.shape[0] != n {
            return Err(PreprocessError::FrameCount {
                frames: k.a.shape[0],
                n,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::graph_tests::refbackend::{RefBackend, data64, tensor64};
    use crate::runtime::ir::Graph;

    /// A tiny model: conv 3x3 on C channels -> global average -> flatten -> [N, C*2].
    fn tiny(c: usize, h: usize, w: usize) -> Graph {
        let mut g = Graph::default();
        let x = g.add_input("x", vec![1, c, h, w]);
        let wt: Vec<f32> = (0..2 * c * 9)
            .map(|i| ((i * 7 % 11) as f32 - 5.0) / 7.0)
            .collect();
        let wv = g.add_param("w", vec![2 * c, 1, 3, 3], wt);
        let op = Op::Conv {
            kernel: [3, 3],
            stride: [1, 1],
            dilation: [1, 1],
            pad: super::super::ir::PadSpec::Explicit([1; 4]),
            groups: c,
        };
        let y = g.add_node("conv", op, vec![x, wv]).unwrap();
        let y = g
            .add_node("sq", Op::Binary(Binary::Mul), vec![y, y])
            .unwrap();
        let y = g
            .add_node(
                "gap",
                Op::Reduce {
                    axes: vec![2, 3],
                    op: crate::runtime::backend::ReduceOp::Mean,
                    keepdims: false,
                },
                vec![y],
            )
            .unwrap();
        g.outputs.push(y);
        g
    }

    fn spec(c: usize, hw: [usize; 2], window: WindowSpec, resize: ResizeMode) -> PreprocessSpec {
        PreprocessSpec {
            rescale: true,
            window,
            resize,
            replicate_channels: c == 3,
            scale: 2.0,
            mean: vec![0.1; c],
            std: vec![0.5, 0.25, 2.0][..c].to_vec(),
            out_chw: [c, hw[0], hw[1]],
        }
    }

    /// FD on stored values through the whole chain, including points inside and outside the
    /// window (zero gradient there: the clamp's subgradient).
    fn check_chain(ps: PreprocessSpec, in_hw: [usize; 2], frames: &[FrameParams]) {
        let b = RefBackend;
        let [c, h, w] = ps.out_chw;
        let model = tiny(c, h, w);
        let pipe = Pipeline::new(&b, ps, &model, in_hw, 0).unwrap();
        let n = frames.len();
        let per = in_hw[0] * in_hw[1];
        // Stored values 0..2000 so a soft-tissue window [-160, 240] after rescale (-1024)
        // leaves some pixels below, some inside, some above.
        let stored: Vec<f32> = (0..n * per)
            .map(|i| (i * 787 % 2000) as f32 + 0.25)
            .collect();
        let k = pipe.frame_consts(&b, &stored, frames).unwrap();
        let st = tensor64(
            stored.iter().map(|&v| v as f64).collect(),
            &[n, 1, in_hw[0], in_hw[1]],
        );
        let wts: Vec<f64> = (0..n * 2 * c).map(|i| 1.0 + (i % 3) as f64).collect();
        let obj = |s: &[f64]| -> f64 {
            let o = pipe
                .forward(&b, &tensor64(s.to_vec(), &st.shape), &k)
                .unwrap();
            data64(&o[0]).iter().zip(&wts).map(|(a, b)| a * b).sum()
        };
        let dense = tensor64(wts.clone(), &[n, 2 * c]);
        let (_, g, _) = pipe
            .loss_and_stored_grad(&b, &st, &k, LossSpec::Dense, &LossTargets::Dense(&dense))
            .unwrap();
        let g = data64(&g);
        let scale = g.iter().fold(0f64, |m, v| m.max(v.abs()));
        assert!(scale > 0.0);
        let (mut zeros, mut nonzeros) = (0, 0);
        let s0: Vec<f64> = data64(&st);
        for i in (0..s0.len()).step_by(3) {
            let hh = 1e-3;
            let mut p = s0.clone();
            p[i] += hh;
            let up = obj(&p);
            p[i] -= 2.0 * hh;
            let dn = obj(&p);
            let fd = (up - dn) / (2.0 * hh);
            assert!(
                (g[i] - fd).abs() <= 1e-5 * scale + 1e-4 * fd.abs(),
                "stored[{i}]: grad {} vs fd {fd}",
                g[i]
            );
            if g[i] == 0.0 {
                zeros += 1
            } else {
                nonzeros += 1
            }
        }
        if pipe.spec.clips() {
            assert!(
                zeros > 0 && nonzeros > 0,
                "window test must hit pixels inside and outside ({zeros} zero, {nonzeros} non-zero)"
            );
        }
    }

    #[test]
    fn window_resize_replicate_normalise_gradients_match_fd() {
        let ct = FrameParams {
            slope: 1.0,
            intercept: -1024.0,
            window: Some((40.0, 400.0)),
        };
        let ct2 = FrameParams {
            slope: 0.5,
            intercept: -500.0,
            window: Some((100.0, 300.0)),
        };
        check_chain(
            spec(3, [4, 4], WindowSpec::FromDicom, ResizeMode::Linear),
            [6, 5],
            &[ct, ct2],
        );
        check_chain(
            spec(
                1,
                [3, 3],
                WindowSpec::Fixed {
                    center: 40.0,
                    width: 400.0,
                },
                ResizeMode::Area,
            ),
            [7, 6],
            &[ct],
        );
        check_chain(
            spec(1, [4, 4], WindowSpec::MinMax, ResizeMode::Linear),
            [5, 5],
            &[ct, ct2],
        );
        check_chain(
            spec(3, [5, 5], WindowSpec::None, ResizeMode::Linear),
            [5, 5],
            &[ct],
        );
    }

    #[test]
    fn window_matches_dicom_formula_and_errors_are_typed() {
        let s = spec(
            1,
            [2, 2],
            WindowSpec::Fixed {
                center: 40.0,
                width: 400.0,
            },
            ResizeMode::Linear,
        );
        let f = FrameParams {
            slope: 1.0,
            intercept: -1024.0,
            window: None,
        };
        let (a, b) = s.frame_affine(0, &f, &[]).unwrap();
        // Stored 1064 -> HU 40 (the centre) -> (40 - 39.5)/399 + 0.5.
        let want = (40.0 - 39.5) / 399.0 + 0.5;
        assert!((a * 1064.0 + b - want).abs() < 1e-12);
        let d = spec(1, [2, 2], WindowSpec::FromDicom, ResizeMode::Linear);
        assert!(matches!(
            d.frame_affine(3, &f, &[]),
            Err(PreprocessError::NoWindow { frame: 3 })
        ));
        let bad = FrameParams {
            window: Some((0.0, 1.0)),
            ..f
        };
        assert!(matches!(
            d.frame_affine(0, &bad, &[]),
            Err(PreprocessError::WindowWidth { .. })
        ));
        let m = tiny(1, 3, 3);
        assert!(matches!(
            spec(1, [4, 4], WindowSpec::None, ResizeMode::Linear).build(&m, [4, 4]),
            Err(PreprocessError::CardMismatch { .. })
        ));
    }
}
