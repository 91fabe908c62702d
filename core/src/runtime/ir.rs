//! The graph IR both backends execute: a topologically ordered list of single-output nodes over
//! numbered values, with float parameters held on the host.
//!
//! The IR is deliberately smaller than ONNX: shape arithmetic is folded away at import
//! (`runtime::onnx`), BatchNormalization becomes a per-channel affine (or disappears into the
//! preceding Conv), Dropout/Identity vanish. Every remaining op lowers to a handful of
//! [`Backend`](super::backend::Backend) primitives in both directions (`runtime::exec`).
//!
//! Batch convention: axis 0 of every *batched* value is the batch. Stored shapes are the shapes
//! at batch 1; at run time the executor re-infers every shape with the actual batch, which is
//! what lets one imported graph serve any batch size.

use super::backend::{Binary, CoordTransform, PoolKind, ReduceOp, ResizeMode, Unary};

/// Index into [`Graph::values`].
pub type ValueId = usize;

/// Where a value comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum ValueKind {
    /// The i-th graph input (fed by the caller at run time).
    Input(usize),
    /// The i-th entry of [`Graph::params`] (initializers and folded float constants).
    Param(usize),
    /// Output of the i-th node.
    Node(usize),
}

#[derive(Clone, Debug)]
pub struct Value {
    pub name: String,
    pub kind: ValueKind,
    /// Shape at batch size 1.
    pub shape: Vec<usize>,
    /// Whether axis 0 is the (dynamic) batch axis.
    pub batched: bool,
}

/// A host-side float tensor the executor uploads once; trainable when the caller says so.
#[derive(Clone, Debug)]
pub struct Param {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
    pub value: ValueId,
}

/// An integer that may depend on the run-time batch size `n`: `coef * n + offset`.
///
/// PyTorch exports `x.view(x.size(0), -1)` as Shape -> Gather -> Concat -> Reshape; folding that
/// chain at import with a symbolic batch keeps the model batch-agnostic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SymInt {
    pub coef: i64,
    pub offset: i64,
}

impl SymInt {
    pub const fn lit(v: i64) -> Self {
        SymInt { coef: 0, offset: v }
    }
    pub const BATCH: SymInt = SymInt { coef: 1, offset: 0 };
    pub fn eval(self, n: usize) -> i64 {
        self.coef * n as i64 + self.offset
    }
    pub fn as_lit(self) -> Option<i64> {
        (self.coef == 0).then_some(self.offset)
    }
}

/// How a reshape-like op computes its output shape from its input shape.
#[derive(Clone, Debug, PartialEq)]
pub enum ReshapeRule {
    /// ONNX `Reshape`: 0 copies the input dim (unless `allowzero`), -1 is inferred.
    Spec { dims: Vec<SymInt>, allowzero: bool },
    /// ONNX `Flatten`: `[prod(d[..axis]), prod(d[axis..])]`.
    Flatten { axis: usize },
    /// Remove these (size-1) axes, sorted ascending, relative to the input rank.
    Squeeze { axes: Vec<usize> },
    /// Insert size-1 axes at these output positions, sorted ascending.
    Unsqueeze { axes: Vec<usize> },
}

/// Convolution/pool padding: explicit, or ONNX `auto_pad` resolved against the run-time input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PadSpec {
    /// [top, left, bottom, right]
    Explicit([usize; 4]),
    SameUpper,
    SameLower,
}

/// How `Resize` picks its output size.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ResizeSize {
    /// Scale factors on H and W (output = floor(in * scale)).
    Scales([f32; 2]),
    /// Fixed output [oh, ow].
    Sizes([usize; 2]),
}

#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// Inputs: x, w, optional bias.
    Conv {
        kernel: [usize; 2],
        stride: [usize; 2],
        dilation: [usize; 2],
        pad: PadSpec,
        groups: usize,
    },
    /// Inputs: x, w `[Cin, Cout/groups, kh, kw]`, optional bias. `pads` is [top, left, bottom,
    /// right]; `output_shape` (ONNX attribute) overrides the size and recomputes the pads.
    ConvTranspose {
        kernel: [usize; 2],
        stride: [usize; 2],
        dilation: [usize; 2],
        pads: [usize; 4],
        output_padding: [usize; 2],
        groups: usize,
        output_shape: Option<[usize; 2]>,
        same_upper: Option<bool>,
    },
    Unary(Unary),
    /// NumPy broadcasting.
    Binary(Binary),
    Pool {
        kind: PoolKind,
        kernel: [usize; 2],
        stride: [usize; 2],
        dilation: [usize; 2],
        pad: PadSpec,
        ceil_mode: bool,
    },
    Reduce {
        axes: Vec<usize>,
        op: ReduceOp,
        keepdims: bool,
    },
    /// Inputs: A, B, optional C. `Y = alpha * op(A) op(B) + beta * C`.
    Gemm {
        alpha: f32,
        beta: f32,
        trans_a: bool,
        trans_b: bool,
    },
    /// Rank >= 2 operands, broadcast batch axes.
    MatMul,
    Concat {
        axis: usize,
    },
    /// Elements `start..end` of one (non-batch) axis.
    Slice {
        axis: usize,
        start: usize,
        end: usize,
    },
    Reshape(ReshapeRule),
    Transpose {
        perm: Vec<usize>,
    },
    /// NCHW only.
    Resize {
        mode: ResizeMode,
        coord: CoordTransform,
        size: ResizeSize,
    },
    Pad {
        pads: Vec<(usize, usize)>,
        mode: super::backend::PadMode,
        value: f32,
    },
    /// `legacy`: opset < 13 semantics (coerce to 2-D at `axis`, softmax over the flattened tail).
    Softmax {
        axis: usize,
        log: bool,
        legacy: bool,
    },
}

impl Op {
    /// Short operator name for summaries and errors.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Op::Conv { .. } => "Conv",
            Op::ConvTranspose { .. } => "ConvTranspose",
            Op::Unary(u) => match u {
                Unary::Relu => "Relu",
                Unary::LeakyRelu { .. } => "LeakyRelu",
                Unary::Sigmoid => "Sigmoid",
                Unary::Tanh => "Tanh",
                Unary::Clip { .. } => "Clip",
                Unary::Neg => "Neg",
                Unary::Exp => "Exp",
                Unary::Log => "Log",
                Unary::Sqrt => "Sqrt",
                Unary::Abs => "Abs",
                Unary::Affine { .. } => "Affine",
                Unary::Powf { .. } => "Pow",
                Unary::Sign => "Sign",
            },
            Op::Binary(b) => match b {
                Binary::Add => "Add",
                Binary::Sub => "Sub",
                Binary::Mul => "Mul",
                Binary::Div => "Div",
                Binary::Max => "Max",
                Binary::Min => "Min",
            },
            Op::Pool {
                kind: PoolKind::Max,
                ..
            } => "MaxPool",
            Op::Pool {
                kind: PoolKind::Avg { .. },
                ..
            } => "AveragePool",
            Op::Reduce {
                op: ReduceOp::Mean, ..
            } => "ReduceMean",
            Op::Reduce {
                op: ReduceOp::Sum, ..
            } => "ReduceSum",
            Op::Gemm { .. } => "Gemm",
            Op::MatMul => "MatMul",
            Op::Concat { .. } => "Concat",
            Op::Slice { .. } => "Slice",
            Op::Reshape(_) => "Reshape",
            Op::Transpose { .. } => "Transpose",
            Op::Resize { .. } => "Resize",
            Op::Pad { .. } => "Pad",
            Op::Softmax { log: false, .. } => "Softmax",
            Op::Softmax { log: true, .. } => "LogSoftmax",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Node {
    /// ONNX node name (or a synthesised one), for errors.
    pub name: String,
    pub op: Op,
    pub inputs: Vec<ValueId>,
    pub output: ValueId,
}

#[derive(Clone, Debug, Default)]
pub struct Graph {
    pub values: Vec<Value>,
    /// Topological order.
    pub nodes: Vec<Node>,
    pub params: Vec<Param>,
    pub inputs: Vec<ValueId>,
    pub outputs: Vec<ValueId>,
    /// Default-domain opset the model was exported with (0 for graphs built in code).
    pub opset: i64,
}

impl Graph {
    pub fn add_value(
        &mut self,
        name: impl Into<String>,
        kind: ValueKind,
        shape: Vec<usize>,
        batched: bool,
    ) -> ValueId {
        self.values.push(Value {
            name: name.into(),
            kind,
            shape,
            batched,
        });
        self.values.len() - 1
    }

    /// Add a parameter (host data) and its value.
    pub fn add_param(
        &mut self,
        name: impl Into<String>,
        shape: Vec<usize>,
        data: Vec<f32>,
    ) -> ValueId {
        let name = name.into();
        let pid = self.params.len();
        let vid = self.add_value(name.clone(), ValueKind::Param(pid), shape.clone(), false);
        self.params.push(Param {
            name,
            shape,
            data,
            value: vid,
        });
        vid
    }

    /// Add a graph input whose axis 0 is the batch; `shape` is at batch 1.
    pub fn add_input(&mut self, name: impl Into<String>, shape: Vec<usize>) -> ValueId {
        let idx = self.inputs.len();
        let vid = self.add_value(name, ValueKind::Input(idx), shape, true);
        self.inputs.push(vid);
        vid
    }

    /// Append a node; the output value's batch-1 shape is inferred here.
    pub fn add_node(
        &mut self,
        name: impl Into<String>,
        op: Op,
        inputs: Vec<ValueId>,
    ) -> Result<ValueId, super::shape::ShapeError> {
        let name = name.into();
        let shapes: Vec<&[usize]> = inputs
            .iter()
            .map(|&v| self.values[v].shape.as_slice())
            .collect();
        let shape = super::shape::infer(&op, &shapes, 1).map_err(|e| e.at_node(&name))?;
        let batched = inputs.iter().any(|&v| self.values[v].batched);
        let nid = self.nodes.len();
        let out = self.add_value(name.clone(), ValueKind::Node(nid), shape, batched);
        self.nodes.push(Node {
            name,
            op,
            inputs,
            output: out,
        });
        Ok(out)
    }

    pub fn value_by_name(&self, name: &str) -> Option<ValueId> {
        self.values.iter().position(|v| v.name == name)
    }

    /// Number of scalar parameters (all float initializers).
    pub fn param_count(&self) -> usize {
        self.params.iter().map(|p| p.data.len()).sum()
    }

    /// Counts of each op kind, sorted by name.
    pub fn op_counts(&self) -> Vec<(&'static str, usize)> {
        let mut m = std::collections::BTreeMap::new();
        for n in &self.nodes {
            *m.entry(n.op.kind_name()).or_insert(0usize) += 1;
        }
        m.into_iter().collect()
    }

    /// Multiply-accumulates x2 per image (batch 1) for the dense ops; elementwise ops count one
    /// FLOP per output element. An estimate for `model info`, not a benchmark.
    pub fn flops_per_image(&self) -> u64 {
        let mut total: u64 = 0;
        for n in &self.nodes {
            let out: u64 = self.values[n.output].shape.iter().product::<usize>() as u64;
            let f = match &n.op {
                Op::Conv { kernel, groups, .. } => {
                    let cin = self.values[n.inputs[0]].shape.get(1).copied().unwrap_or(1) as u64;
                    2 * out * (cin / *groups as u64).max(1) * (kernel[0] * kernel[1]) as u64
                }
                Op::ConvTranspose { kernel, groups, .. } => {
                    let xin: u64 = self.values[n.inputs[0]].shape.iter().product::<usize>() as u64;
                    let cout = self.values[n.output].shape.get(1).copied().unwrap_or(1) as u64;
                    2 * xin * (cout / *groups as u64).max(1) * (kernel[0] * kernel[1]) as u64
                }
                Op::Gemm { trans_a, .. } => {
                    let a = &self.values[n.inputs[0]].shape;
                    let k = if *trans_a { a[0] } else { a[a.len() - 1] };
                    2 * out * k as u64
                }
                Op::MatMul => {
                    let a = &self.values[n.inputs[0]].shape;
                    2 * out * a[a.len() - 1] as u64
                }
                Op::Pool { kernel, .. } => out * (kernel[0] * kernel[1]) as u64,
                Op::Reshape(_)
                | Op::Transpose { .. }
                | Op::Concat { .. }
                | Op::Slice { .. }
                | Op::Pad { .. } => 0,
                _ => out,
            };
            total += f;
        }
        total
    }
}
