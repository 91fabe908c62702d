//! The executor: evaluates a [`Graph`] on any [`Backend`] by lowering each IR op to backend
//! primitives, and the user-facing entry points (forward, loss + input gradient, loss + parameter
//! gradients) built on it and on `runtime::autodiff`.
//!
//! Shapes are re-inferred per call from the actual inputs (the graph stores batch-1 shapes), so
//! one [`Model`] serves any batch size; the geometry each primitive receives comes from
//! `runtime::shape`, the same code import validated the model with.

use super::autodiff;
use super::backend::{Backend, Binary, LossTargets, ReduceOp, Tensor, Unary};
use super::ir::{Graph, Node, Op, ReshapeRule, ValueId, ValueKind};
use super::loss::{self, LossSpec};
use super::shape::{self, ShapeError};

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("the model takes {want} input(s), {got} given")]
    InputCount { want: usize, got: usize },
    #[error(
        "input `{name}`: shape {got:?} does not match the model's {want:?} (axis 0, the batch, may differ)"
    )]
    InputShape {
        name: String,
        got: Vec<usize>,
        want: Vec<usize>,
    },
    #[error("inputs disagree on the batch size ({0} vs {1})")]
    BatchMismatch(usize, usize),
    #[error("empty batch")]
    EmptyBatch,
    #[error(transparent)]
    Shape(#[from] ShapeError),
    #[error("loss: {0}")]
    Loss(String),
    #[error("output index {index} out of range (the model has {count} outputs)")]
    OutputIndex { index: usize, count: usize },
    #[error("parameter {index} out of range (the model has {count} parameters)")]
    ParamIndex { index: usize, count: usize },
    #[error("parameter `{name}`: shape {got:?}, expected {want:?}")]
    ParamShape {
        name: String,
        got: Vec<usize>,
        want: Vec<usize>,
    },
}

/// A graph plus its parameters uploaded to a backend.
pub struct Model<B: Backend> {
    pub graph: Graph,
    params: Vec<Tensor<B>>,
    /// Which of `graph.outputs` the losses read (the logits).
    pub logits_output: usize,
}

/// Everything a forward pass computed, kept for the backward pass.
pub struct Tape<B: Backend> {
    /// Indexed by [`ValueId`]; `None` for values never computed (or freed in inference mode).
    pub values: Vec<Option<Tensor<B>>>,
    /// Batch size of this run.
    pub n: usize,
}

impl<B: Backend> Tape<B> {
    pub(crate) fn get(&self, v: ValueId) -> &Tensor<B> {
        match &self.values[v] {
            Some(t) => t,
            // The executor computes every value before any consumer runs and, when taping,
            // keeps all of them but the outputs of Convs fused with their ReLU, which no
            // backward rule reads; reaching this is an executor bug.
            None => panic!("tape value {v} missing"),
        }
    }
}

impl<B: Backend> Model<B> {
    /// Upload the graph's parameters.
    pub fn new(backend: &B, graph: Graph) -> Self {
        let params = graph
            .params
            .iter()
            .map(|p| backend.upload(&p.data, &p.shape))
            .collect();
        Model {
            graph,
            params,
            logits_output: 0,
        }
    }

    /// Pick the output the losses read, by index.
    pub fn with_logits_output(mut self, index: usize) -> Result<Self, ExecError> {
        if index >= self.graph.outputs.len() {
            return Err(ExecError::OutputIndex {
                index,
                count: self.graph.outputs.len(),
            });
        }
        self.logits_output = index;
        Ok(self)
    }

    pub fn params(&self) -> &[Tensor<B>] {
        &self.params
    }

    /// Replace parameter `i` (training). The shape must not change.
    pub fn set_param(&mut self, i: usize, t: Tensor<B>) -> Result<(), ExecError> {
        let count = self.params.len();
        let p = self
            .graph
            .params
            .get(i)
            .ok_or(ExecError::ParamIndex { index: i, count })?;
        if t.shape != p.shape {
            return Err(ExecError::ParamShape {
                name: p.name.clone(),
                got: t.shape.clone(),
                want: p.shape.clone(),
            });
        }
        self.params[i] = t;
        Ok(())
    }

    fn check_inputs(&self, inputs: &[&Tensor<B>]) -> Result<usize, ExecError> {
        let g = &self.graph;
        if inputs.len() != g.inputs.len() {
            return Err(ExecError::InputCount {
                want: g.inputs.len(),
                got: inputs.len(),
            });
        }
        let mut n = None;
        for (t, &vid) in inputs.iter().zip(&g.inputs) {
            let v = &g.values[vid];
            if t.shape.len() != v.shape.len() || t.shape[1..] != v.shape[1..] {
                return Err(ExecError::InputShape {
                    name: v.name.clone(),
                    got: t.shape.clone(),
                    want: v.shape.clone(),
                });
            }
            match n {
                None => n = Some(t.shape[0]),
                Some(m) if m != t.shape[0] => return Err(ExecError::BatchMismatch(m, t.shape[0])),
                _ => {}
            }
        }
        match n {
            Some(0) | None => Err(ExecError::EmptyBatch),
            Some(n) => Ok(n),
        }
    }

    /// The contiguous sample ranges a batch of `n` is cut into when the backend asks for slices
    /// and every op of the graph keeps samples apart (see [`per_sample`]); `None`: one pass.
    fn slice_ranges(&self, b: &B, n: usize, grad: bool) -> Option<Vec<(usize, usize)>> {
        let parts = if grad {
            b.batch_slices(n)
        } else {
            b.batch_slices_forward(n)
        }
        .min(n);
        if parts < 2 || !per_sample(&self.graph) {
            return None;
        }
        Some(
            (0..parts)
                .map(|i| (i * n / parts, (i + 1) * n / parts))
                .collect(),
        )
    }

    /// `f` on each slice of the inputs, concurrently through [`Backend::run_slices`]; the
    /// results in slice order, or the first slice's error.
    fn run_sliced<R: Send>(
        &self,
        b: &B,
        inputs: &[&Tensor<B>],
        ranges: &[(usize, usize)],
        f: impl Fn((usize, usize), &[&Tensor<B>]) -> Result<R, ExecError> + Sync,
    ) -> Result<Vec<R>, ExecError> {
        let slots: Vec<std::sync::Mutex<Option<Result<R, ExecError>>>> =
            ranges.iter().map(|_| std::sync::Mutex::new(None)).collect();
        b.run_slices(ranges.len(), &|i| {
            let (s, e) = ranges[i];
            let ins: Vec<Tensor<B>> = inputs.iter().map(|t| b.slice(t, 0, s, e)).collect();
            let refs: Vec<&Tensor<B>> = ins.iter().collect();
            let r = f((s, e), &refs);
            *slots[i].lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
        });
        slots
            .into_iter()
            .map(|m| {
                m.into_inner()
                    .unwrap_or_else(|p| p.into_inner())
                    .expect("run_slices calls every slice")
            })
            .collect()
    }

    /// Run the graph. `keep_all` keeps every intermediate (for backward); otherwise values are
    /// dropped after their last use to bound memory.
    pub fn run(&self, b: &B, inputs: &[&Tensor<B>], keep_all: bool) -> Result<Tape<B>, ExecError> {
        let n = self.check_inputs(inputs)?;
        let g = &self.graph;
        let mut vals: Vec<Option<Tensor<B>>> = vec![None; g.values.len()];
        for (t, &vid) in inputs.iter().zip(&g.inputs) {
            vals[vid] = Some((*t).clone());
        }
        for (i, p) in g.params.iter().enumerate() {
            vals[p.value] = Some(self.params[i].clone());
        }
        let last_use = if keep_all { Vec::new() } else { last_uses(g) };
        let (fuse, binary_acts) = if keep_all {
            (taped_conv_relu_fusions(g), Vec::new())
        } else {
            (conv_act_fusions(g), binary_act_fusions(g))
        };
        let mut skip = 0;
        for (ni, node) in g.nodes.iter().enumerate() {
            if skip > 0 {
                // Computed together with the Conv before it.
                skip -= 1;
                continue;
            }
            let ins: Vec<&Tensor<B>> = node
                .inputs
                .iter()
                .map(|&i| vals[i].as_ref().expect("value computed before use"))
                .collect();
            if let Some(&Some(f)) = fuse.get(ni) {
                let last = &g.nodes[ni + f.covers()];
                let pool = f.pool.then_some(last);
                let y = forward_conv_act(b, &node.op, &ins, n, f.act, pool)
                    .map_err(|e| e.at_node(&node.name))?;
                vals[last.output] = Some(y);
                skip = f.covers();
            } else if let (Op::Binary(op), Some(&Some(act))) = (&node.op, binary_acts.get(ni)) {
                let next = &g.nodes[ni + 1];
                let y =
                    forward_binary_act(b, *op, &ins, n, act).map_err(|e| e.at_node(&node.name))?;
                vals[next.output] = Some(y);
                skip = 1;
            } else {
                let y = forward_op(b, &node.op, &ins, n).map_err(|e| e.at_node(&node.name))?;
                vals[node.output] = Some(y);
            }
            if !keep_all {
                for &i in &node.inputs {
                    if last_use[i] == ni
                        && matches!(g.values[i].kind, ValueKind::Node(_))
                        && !g.outputs.contains(&i)
                    {
                        vals[i] = None;
                    }
                }
            }
        }
        Ok(Tape { values: vals, n })
    }

    /// All outputs, in graph order.
    pub fn forward(&self, b: &B, input: &Tensor<B>) -> Result<Vec<Tensor<B>>, ExecError> {
        self.forward_multi(b, &[input])
    }

    pub fn forward_multi(&self, b: &B, inputs: &[&Tensor<B>]) -> Result<Vec<Tensor<B>>, ExecError> {
        let n = self.check_inputs(inputs)?;
        if let Some(ranges) = self.slice_ranges(b, n, false) {
            let parts = self.run_sliced(b, inputs, &ranges, |_, ins| self.forward_whole(b, ins))?;
            let outs = parts.iter().map(|p| p.as_slice()).collect::<Vec<_>>();
            return Ok(concat_parts(b, &outs));
        }
        self.forward_whole(b, inputs)
    }

    fn forward_whole(&self, b: &B, inputs: &[&Tensor<B>]) -> Result<Vec<Tensor<B>>, ExecError> {
        let tape = self.run(b, inputs, false)?;
        Ok(self
            .graph
            .outputs
            .iter()
            .map(|&o| tape.get(o).clone())
            .collect())
    }

    /// Per-sample objective values, the gradient of their sum w.r.t. the (first) input, and the
    /// logits, for the whole batch in one forward + backward pass.
    pub fn loss_and_input_grad(
        &self,
        b: &B,
        input: &Tensor<B>,
        spec: LossSpec,
        targets: &LossTargets<'_, B>,
    ) -> Result<(Vec<f32>, Tensor<B>, Tensor<B>), ExecError> {
        let (losses, mut grads, logits) =
            self.loss_and_grads(b, &[input], spec, targets, &[0], &[])?;
        Ok((losses, grads.inputs.swap_remove(0), logits))
    }

    /// Like [`Model::loss_and_input_grad`] for multi-input graphs (e.g. preprocessing with
    /// per-frame constants); gradients w.r.t. the inputs listed in `wrt_inputs` and the params
    /// listed in `wrt_params`.
    pub fn loss_and_grads(
        &self,
        b: &B,
        inputs: &[&Tensor<B>],
        spec: LossSpec,
        targets: &LossTargets<'_, B>,
        wrt_inputs: &[usize],
        wrt_params: &[usize],
    ) -> Result<(Vec<f32>, autodiff::Grads<B>, Tensor<B>), ExecError> {
        // Parameter gradients sum over the batch; only per-sample results are sliced.
        if wrt_params.is_empty() {
            let n = self.check_inputs(inputs)?;
            if let Some(ranges) = self.slice_ranges(b, n, true) {
                let parts = self.run_sliced(b, inputs, &ranges, |(s, e), ins| {
                    let dense;
                    let t = match targets {
                        LossTargets::Classes(c) => LossTargets::Classes(&c[s..e]),
                        LossTargets::Dense(t) => {
                            dense = b.slice(t, 0, s, e);
                            LossTargets::Dense(&dense)
                        }
                    };
                    self.loss_and_grads_whole(b, ins, spec, &t, wrt_inputs, wrt_params)
                        .map(|(l, g, z)| (l, g.inputs, z))
                })?;
                let losses = parts.iter().flat_map(|p| p.0.iter().copied()).collect();
                let grads = parts.iter().map(|p| p.1.as_slice()).collect::<Vec<_>>();
                let logits = parts.iter().map(|p| &p.2).collect::<Vec<_>>();
                let grads = autodiff::Grads {
                    inputs: concat_parts(b, &grads),
                    params: Vec::new(),
                };
                return Ok((losses, grads, b.concat(&logits, 0)));
            }
        }
        self.loss_and_grads_whole(b, inputs, spec, targets, wrt_inputs, wrt_params)
    }

    fn loss_and_grads_whole(
        &self,
        b: &B,
        inputs: &[&Tensor<B>],
        spec: LossSpec,
        targets: &LossTargets<'_, B>,
        wrt_inputs: &[usize],
        wrt_params: &[usize],
    ) -> Result<(Vec<f32>, autodiff::Grads<B>, Tensor<B>), ExecError> {
        for &p in wrt_params {
            if p >= self.params.len() {
                return Err(ExecError::ParamIndex {
                    index: p,
                    count: self.params.len(),
                });
            }
        }
        let tape = self.run(b, inputs, true)?;
        let out = self.graph.outputs[self.logits_output];
        let logits = tape.get(out).clone();
        let (losses, dlogits) = loss::objective(b, spec, &logits, targets)?;
        let grads = autodiff::backward(
            b,
            &self.graph,
            &tape,
            &[(out, dlogits)],
            wrt_inputs,
            wrt_params,
        )?;
        // Read back after the backward pass is recorded: on a GPU this one wait covers the
        // forward, the loss and the backward, instead of stalling the device between them.
        Ok((b.download(&losses), grads, logits))
    }

    /// Training: per-sample losses, the gradients of their sum w.r.t. the chosen parameters
    /// (indices into `graph.params`), and the logits.
    pub fn loss_and_param_grads(
        &self,
        b: &B,
        input: &Tensor<B>,
        spec: LossSpec,
        targets: &LossTargets<'_, B>,
        params: &[usize],
    ) -> Result<(Vec<f32>, Vec<Tensor<B>>, Tensor<B>), ExecError> {
        let (losses, grads, logits) =
            self.loss_and_grads(b, &[input], spec, targets, &[], params)?;
        Ok((losses, grads.params, logits))
    }
}

/// Per-slice tensor lists (one entry per output) joined along the batch axis.
fn concat_parts<B: Backend>(b: &B, parts: &[&[Tensor<B>]]) -> Vec<Tensor<B>> {
    (0..parts[0].len())
        .map(|k| {
            let xs: Vec<&Tensor<B>> = parts.iter().map(|p| &p[k]).collect();
            b.concat(&xs, 0)
        })
        .collect()
}

/// Whether every output sample depends on that sample's inputs alone, so that running slices
/// of the batch separately and joining the results along axis 0 gives the whole batch's
/// outputs. Conservative: an op that could mix samples (anything along axis 0, a batched
/// right-hand matrix operand, a batched weight) or a value that loses the batch axis says no.
pub(crate) fn per_sample(g: &Graph) -> bool {
    let batched = |v: ValueId| g.values[v].batched;
    let rank = |v: ValueId| g.values[v].shape.len();
    g.outputs.iter().all(|&o| batched(o))
        && g.nodes.iter().all(|node| {
            let ins = &node.inputs;
            if !ins.iter().any(|&i| batched(i)) {
                return true; // constants only
            }
            if !batched(node.output) {
                return false;
            }
            match &node.op {
                Op::Conv { .. } | Op::ConvTranspose { .. } => !ins[1..].iter().any(|&i| batched(i)),
                Op::Unary(_) | Op::Binary(_) | Op::Pool { .. } | Op::Resize { .. } => true,
                Op::Reduce { axes, .. } => !axes.contains(&0),
                Op::Gemm { trans_a, .. } => !trans_a && !batched(ins[1]),
                Op::MatMul => !batched(ins[1]) || (rank(ins[0]) >= 3 && rank(ins[1]) >= 3),
                Op::Concat { axis } | Op::Slice { axis, .. } => *axis != 0,
                Op::Transpose { perm } => perm.first() == Some(&0),
                Op::Softmax { axis, .. } => *axis != 0,
                Op::Pad { pads, .. } => pads.first().is_none_or(|p| *p == (0, 0)),
                Op::Reshape(rule) => match rule {
                    ReshapeRule::Flatten { axis } => *axis >= 1,
                    ReshapeRule::Squeeze { axes } | ReshapeRule::Unsqueeze { axes } => {
                        !axes.contains(&0)
                    }
                    // Import keeps the batch on axis 0 (a dims list that merges it is refused),
                    // and the output is batched (checked above).
                    ReshapeRule::Spec { .. } => true,
                },
            }
        })
}

/// An inference-only fusion starting at a Conv node (see [`conv_act_fusions`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct ConvFusion {
    /// The activation node right after the Conv.
    pub act: Unary,
    /// The node after the activation is a Pool that is the activation's only consumer: the
    /// three run as one [`Backend::conv2d_act_pool`].
    pub pool: bool,
}

impl ConvFusion {
    /// How many nodes after the Conv the fusion computes.
    fn covers(&self) -> usize {
        1 + usize::from(self.pool)
    }
}

/// Inference-only fusions: `Some` at a Conv node whose output feeds only the very next
/// node, an elementwise activation, and is not a graph output (so nothing else ever needs the
/// pre-activation value). The pair then runs as one [`Backend::conv2d_act`]; where the
/// activation's output in turn feeds only the next node, a Pool, and is not a graph output,
/// the three run as one [`Backend::conv2d_act_pool`].
pub(crate) fn conv_act_fusions(g: &Graph) -> Vec<Option<ConvFusion>> {
    let uses = value_uses(g);
    let only_consumer = |node: &Node, next: &Node| only_consumer(g, &uses, node, next);
    g.nodes
        .iter()
        .enumerate()
        .map(|(ni, node)| {
            let next = g.nodes.get(ni + 1)?;
            match (&node.op, &next.op) {
                (Op::Conv { .. }, Op::Unary(act)) if only_consumer(node, next) => {
                    let pool = g.nodes.get(ni + 2).is_some_and(|after| {
                        matches!(after.op, Op::Pool { .. }) && only_consumer(next, after)
                    });
                    Some(ConvFusion { act: *act, pool })
                }
                _ => None,
            }
        })
        .collect()
}

/// The fusions a taped run (one kept for the backward pass) takes: a Conv and the ReLU that
/// is its output's only consumer, computed as one [`Backend::conv2d_act`], never with the
/// pooling after them (whose backward reads the ReLU's output). The Conv's output is then
/// never computed and stays absent from the tape: no backward rule reads it (the Conv's reads
/// its input and weights, the ReLU's its own output, whose sign is the input's).
pub(crate) fn taped_conv_relu_fusions(g: &Graph) -> Vec<Option<ConvFusion>> {
    #[cfg(test)]
    if NO_TAPED_FUSION.load(std::sync::atomic::Ordering::Relaxed) {
        return Vec::new();
    }
    conv_act_fusions(g)
        .into_iter()
        .map(|f| {
            f.filter(|f| f.act == Unary::Relu)
                .map(|f| ConvFusion { pool: false, ..f })
        })
        .collect()
}

/// Test-only switch off the taped run's Conv + ReLU fusion, for equality tests and timing
/// A/B runs.
#[cfg(test)]
pub(crate) static NO_TAPED_FUSION: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Inference-only fusions: `Some(act)` at a Binary node whose output feeds only the very next
/// node, an elementwise activation `act`, and is not a graph output: a residual block's Add and
/// ReLU, which then run as one [`Backend::binary_act`] (one pass over the data, not two).
pub(crate) fn binary_act_fusions(g: &Graph) -> Vec<Option<Unary>> {
    #[cfg(test)]
    if NO_BINARY_ACT.load(std::sync::atomic::Ordering::Relaxed) {
        return Vec::new();
    }
    let uses = value_uses(g);
    g.nodes
        .iter()
        .enumerate()
        .map(|(ni, node)| {
            let next = g.nodes.get(ni + 1)?;
            match (&node.op, &next.op) {
                (Op::Binary(_), Op::Unary(act)) if only_consumer(g, &uses, node, next) => {
                    Some(*act)
                }
                _ => None,
            }
        })
        .collect()
}

/// Test-only switch off the Binary + activation fusion, for the timing tool's A/B runs.
#[cfg(test)]
pub(crate) static NO_BINARY_ACT: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// `next` reads only `node`'s output, nothing else reads it (`uses`: [`value_uses`]), and it is
/// not a graph output: what a fusion needs to never write `node`'s output.
fn only_consumer(g: &Graph, uses: &[usize], node: &Node, next: &Node) -> bool {
    next.inputs == [node.output] && uses[node.output] == 1 && !g.outputs.contains(&node.output)
}

/// How many node inputs read each value.
pub(crate) fn value_uses(g: &Graph) -> Vec<usize> {
    let mut uses = vec![0usize; g.values.len()];
    for n in &g.nodes {
        for &i in &n.inputs {
            uses[i] += 1;
        }
    }
    uses
}

/// A Binary node followed by `act`, validated like [`forward_op`] validates the Binary alone
/// (an elementwise activation keeps the shape).
fn forward_binary_act<B: Backend>(
    b: &B,
    op: Binary,
    ins: &[&Tensor<B>],
    n: usize,
    act: Unary,
) -> Result<Tensor<B>, ShapeError> {
    let shapes: Vec<&[usize]> = ins.iter().map(|t| t.shape.as_slice()).collect();
    shape::infer(&Op::Binary(op), &shapes, n)?;
    Ok(b.binary_act(op, ins[0], ins[1], act))
}

/// A Conv node followed by `act`, validated like [`forward_op`] validates the Conv alone (an
/// elementwise activation keeps the shape), and with `pool` the Pool node after it, validated
/// on the activation's shape (its errors name it, not the Conv).
fn forward_conv_act<B: Backend>(
    b: &B,
    op: &Op,
    ins: &[&Tensor<B>],
    n: usize,
    act: Unary,
    pool: Option<&Node>,
) -> Result<Tensor<B>, ShapeError> {
    let shapes: Vec<&[usize]> = ins.iter().map(|t| t.shape.as_slice()).collect();
    let y_shape = shape::infer(op, &shapes, n)?;
    let (p, _) = shape::conv_geometry(op, &ins[0].shape, &ins[1].shape)?;
    match pool {
        None => Ok(b.conv2d_act(ins[0], ins[1], ins.get(2).copied(), &p, act)),
        Some(pool) => {
            let (pp, _) =
                shape::pool_geometry(&pool.op, &y_shape).map_err(|e| e.at_node(&pool.name))?;
            Ok(b.conv2d_act_pool(ins[0], ins[1], ins.get(2).copied(), &p, act, &pp))
        }
    }
}

fn last_uses(g: &Graph) -> Vec<usize> {
    let mut last = vec![usize::MAX; g.values.len()];
    for (ni, n) in g.nodes.iter().enumerate() {
        for &i in &n.inputs {
            last[i] = ni;
        }
    }
    last
}

/// Evaluate one op. `n` is the batch size (for batch-dependent reshapes).
pub fn forward_op<B: Backend>(
    b: &B,
    op: &Op,
    ins: &[&Tensor<B>],
    n: usize,
) -> Result<Tensor<B>, ShapeError> {
    let shapes: Vec<&[usize]> = ins.iter().map(|t| t.shape.as_slice()).collect();
    // Validates every input shape before any primitive sees it (primitives may panic on bad
    // shapes; user inputs must never reach them unchecked).
    let out_shape = shape::infer(op, &shapes, n)?;
    Ok(match op {
        Op::Conv { .. } => {
            let (p, _) = shape::conv_geometry(op, &ins[0].shape, &ins[1].shape)?;
            b.conv2d(ins[0], ins[1], ins.get(2).copied(), &p)
        }
        Op::ConvTranspose { .. } => {
            let (p, out) = shape::conv_transpose_geometry(op, &ins[0].shape, &ins[1].shape)?;
            let y = b.conv2d_backward_input(ins[0], ins[1], &p, [out[0], out[1], out[2], out[3]]);
            match ins.get(2) {
                Some(bias) => b.binary(
                    super::backend::Binary::Add,
                    &y,
                    &bias.reshape(&[1, out[1], 1, 1]),
                ),
                None => y,
            }
        }
        Op::Unary(u) => b.unary(*u, ins[0]),
        Op::Binary(op) => b.binary(*op, ins[0], ins[1]),
        Op::Pool { .. } => {
            let (p, _) = shape::pool_geometry(op, &ins[0].shape)?;
            b.pool2d(ins[0], &p)
        }
        Op::Reduce { axes, op, keepdims } => b.reduce(ins[0], axes, *op, *keepdims),
        Op::Gemm {
            alpha,
            beta,
            trans_a,
            trans_b,
        } => {
            let mut y = b.matmul(ins[0], ins[1], *trans_a, *trans_b);
            if *alpha != 1.0 {
                y = b.unary(Unary::Affine { a: *alpha, b: 0.0 }, &y);
            }
            if let Some(c) = ins.get(2)
                && *beta != 0.0
            {
                let c = if *beta != 1.0 {
                    b.unary(Unary::Affine { a: *beta, b: 0.0 }, c)
                } else {
                    (*c).clone()
                };
                y = b.binary(super::backend::Binary::Add, &y, &c);
            }
            y
        }
        Op::MatMul => b.matmul(ins[0], ins[1], false, false),
        Op::Concat { axis } => b.concat(ins, *axis),
        Op::Slice { axis, start, end } => b.slice(ins[0], *axis, *start, *end),
        Op::Reshape(_) => ins[0].reshape(&out_shape),
        Op::Transpose { perm } => b.transpose(ins[0], perm),
        Op::Resize { .. } => {
            let (p, _) = shape::resize_geometry(op, &ins[0].shape)?;
            b.resize(ins[0], &p)
        }
        Op::Pad { pads, mode, value } => b.pad(ins[0], pads, *mode, *value),
        Op::Softmax { axis, log, legacy } => {
            if *legacy {
                let s = &ins[0].shape;
                let flat = [
                    s[..*axis].iter().product::<usize>(),
                    s[*axis..].iter().product(),
                ];
                b.softmax(&ins[0].reshape(&flat), 1, *log).reshape(s)
            } else {
                b.softmax(ins[0], *axis, *log)
            }
        }
    })
}

/// Sum over `axes` then broadcast back: used by reduce's adjoint.
pub(crate) fn reduce_adjoint<B: Backend>(
    b: &B,
    dy: &Tensor<B>,
    x_shape: &[usize],
    axes: &[usize],
    op: ReduceOp,
) -> Tensor<B> {
    let kept: Vec<usize> = x_shape
        .iter()
        .enumerate()
        .map(|(i, &d)| if axes.contains(&i) { 1 } else { d })
        .collect();
    let g = b.broadcast_to(&dy.reshape(&kept), x_shape);
    match op {
        ReduceOp::Sum => g,
        ReduceOp::Mean => {
            let count: usize = axes.iter().map(|&a| x_shape[a]).product();
            b.unary(
                Unary::Affine {
                    a: 1.0 / count as f32,
                    b: 0.0,
                },
                &g,
            )
        }
    }
}
