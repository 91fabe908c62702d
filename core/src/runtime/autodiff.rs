//! Reverse-mode autodiff over the IR: walks a forward [`Tape`] backwards, expressing every
//! operator's adjoint with backend primitives (so both backends get gradients from the same
//! rules, and a backend whose primitives match the reference gives correct whole-graph
//! gradients).
//!
//! Only values on a path from a requested input or parameter to a seeded output get gradients;
//! everything else is skipped, which keeps attacks (input gradient only) from paying for weight
//! gradients.

use super::backend::{Backend, Binary, PadMode, ReduceOp, Tensor, Unary};
use super::exec::{ExecError, Tape, reduce_adjoint, value_uses};
use super::ir::{Graph, Op, ValueId, ValueKind};
use super::shape;

/// Gradients returned by [`backward`], in the order requested.
pub struct Grads<B: Backend> {
    pub inputs: Vec<Tensor<B>>,
    pub params: Vec<Tensor<B>>,
}

/// Accumulate `g` into slot `v`.
fn acc<B: Backend>(b: &B, grads: &mut [Option<Tensor<B>>], v: ValueId, g: Tensor<B>) {
    grads[v] = Some(match grads[v].take() {
        Some(prev) => b.binary(Binary::Add, &prev, &g),
        None => g,
    });
}

/// Sum a broadcast gradient back to the operand's shape.
fn unbroadcast<B: Backend>(b: &B, g: Tensor<B>, shape: &[usize]) -> Tensor<B> {
    if g.shape == shape {
        g
    } else if g.len() == shape.iter().product::<usize>() && g.shape.len() < shape.len() {
        g.reshape(shape)
    } else {
        let r = b.reduce_sum_to(&g, shape);
        if r.shape != shape {
            r.reshape(shape)
        } else {
            r
        }
    }
}

/// Backpropagate `seeds` (value, dL/dvalue) through the tape.
pub fn backward<B: Backend>(
    b: &B,
    g: &Graph,
    tape: &Tape<B>,
    seeds: &[(ValueId, Tensor<B>)],
    wrt_inputs: &[usize],
    wrt_params: &[usize],
) -> Result<Grads<B>, ExecError> {
    // Which values lie downstream of something we differentiate w.r.t.
    let mut needs = vec![false; g.values.len()];
    for &i in wrt_inputs {
        if let Some(&v) = g.inputs.get(i) {
            needs[v] = true;
        }
    }
    for &p in wrt_params {
        needs[g.params[p].value] = true;
    }
    for n in &g.nodes {
        if n.inputs.iter().any(|&i| needs[i]) {
            needs[n.output] = true;
        }
    }
    let uses = value_uses(g);
    let mut grads: Vec<Option<Tensor<B>>> = vec![None; g.values.len()];
    for (v, s) in seeds {
        let want = &tape.get(*v).shape;
        if s.len() != want.iter().product::<usize>() {
            return Err(ExecError::Loss(format!(
                "seed gradient shape {:?} does not match output shape {want:?}",
                s.shape
            )));
        }
        acc(b, &mut grads, *v, s.reshape(want));
    }
    for node in g.nodes.iter().rev() {
        if !needs[node.output] {
            continue;
        }
        let Some(dy) = grads[node.output].take() else {
            continue;
        };
        let x = |i: usize| tape.get(node.inputs[i]);
        let want = |i: usize| node.inputs.get(i).is_some_and(|&v| needs[v]);
        let mut out: Vec<(usize, Tensor<B>)> = Vec::new();
        match &node.op {
            Op::Conv { .. } => {
                let (p, _) = shape::conv_geometry(&node.op, &x(0).shape, &x(1).shape)
                    .map_err(|e| e.at_node(&node.name))?;
                let xs = &x(0).shape;
                if want(0) {
                    out.push((
                        0,
                        b.conv2d_backward_input(&dy, x(1), &p, [xs[0], xs[1], xs[2], xs[3]]),
                    ));
                }
                if want(1) {
                    let ws = &x(1).shape;
                    out.push((
                        1,
                        b.conv2d_backward_weight(&dy, x(0), &p, [ws[0], ws[1], ws[2], ws[3]]),
                    ));
                }
                if want(2) {
                    out.push((2, b.reduce(&dy, &[0, 2, 3], ReduceOp::Sum, false)));
                }
            }
            Op::ConvTranspose { .. } => {
                let (p, _) = shape::conv_transpose_geometry(&node.op, &x(0).shape, &x(1).shape)
                    .map_err(|e| e.at_node(&node.name))?;
                if want(0) {
                    out.push((0, b.conv2d(&dy, x(1), None, &p)));
                }
                if want(1) {
                    let ws = &x(1).shape;
                    out.push((
                        1,
                        b.conv2d_backward_weight(x(0), &dy, &p, [ws[0], ws[1], ws[2], ws[3]]),
                    ));
                }
                if want(2) {
                    out.push((2, b.reduce(&dy, &[0, 2, 3], ReduceOp::Sum, false)));
                }
            }
            // A ReLU's derivative from its output (`y > 0` exactly where `x > 0`): a taped run
            // that fuses a Conv with its ReLU never keeps the Conv's output.
            Op::Unary(Unary::Relu) => {
                let y = tape.get(node.output);
                out.push((0, b.unary_backward(Unary::Relu, y, y, &dy)))
            }
            Op::Unary(u) => out.push((0, b.unary_backward(*u, x(0), tape.get(node.output), &dy))),
            Op::Binary(op) => {
                let (a, c) = (x(0), x(1));
                let (da, dc) = match op {
                    Binary::Add => (Some(dy.clone()), Some(dy.clone())),
                    Binary::Sub => (Some(dy.clone()), want(1).then(|| b.unary(Unary::Neg, &dy))),
                    Binary::Mul => (
                        want(0).then(|| b.binary(Binary::Mul, &dy, c)),
                        want(1).then(|| b.binary(Binary::Mul, &dy, a)),
                    ),
                    Binary::Div => {
                        let q = b.binary(Binary::Div, &dy, c);
                        let dc = want(1).then(|| {
                            b.unary(
                                Unary::Neg,
                                &b.binary(Binary::Mul, &q, tape.get(node.output)),
                            )
                        });
                        (Some(q), dc)
                    }
                    Binary::Max | Binary::Min => {
                        // Mask 1 where `a` wins, 0 where `c` wins, 1/2 on ties (a valid
                        // subgradient that splits the flow evenly).
                        let diff = if *op == Binary::Max {
                            b.binary(Binary::Sub, a, c)
                        } else {
                            b.binary(Binary::Sub, c, a)
                        };
                        let mask = b.unary(
                            Unary::Affine { a: 0.5, b: 0.5 },
                            &b.unary(Unary::Sign, &diff),
                        );
                        let inv = b.unary(Unary::Affine { a: -1.0, b: 1.0 }, &mask);
                        (
                            Some(b.binary(Binary::Mul, &dy, &mask)),
                            Some(b.binary(Binary::Mul, &dy, &inv)),
                        )
                    }
                };
                if let (true, Some(da)) = (want(0), da) {
                    out.push((0, unbroadcast(b, da, &a.shape)));
                }
                if let (true, Some(dc)) = (want(1), dc) {
                    out.push((1, unbroadcast(b, dc, &c.shape)));
                }
            }
            Op::Pool { .. } => {
                let (p, _) = shape::pool_geometry(&node.op, &x(0).shape)
                    .map_err(|e| e.at_node(&node.name))?;
                // A ReLU whose output only this pooling reads (not a graph output, not seeded):
                // both backward passes as one, straight to the ReLU's input, which the ReLU's
                // own turn then finds without a gradient and skips.
                let v = node.inputs[0];
                let relu = match g.values[v].kind {
                    ValueKind::Node(ri) => Some(&g.nodes[ri]),
                    _ => None,
                }
                .filter(|r| {
                    matches!(r.op, Op::Unary(Unary::Relu))
                        && uses[v] == 1
                        && !g.outputs.contains(&v)
                        && grads[v].is_none()
                        && fuse_relu_pool()
                });
                match relu {
                    Some(r) => {
                        let gi = b.relu_pool2d_backward(&dy, x(0), &p);
                        if needs[r.inputs[0]] {
                            acc(b, &mut grads, r.inputs[0], gi);
                        }
                    }
                    None => out.push((0, b.pool2d_backward(&dy, x(0), &p))),
                }
            }
            Op::Reduce { axes, op, .. } => {
                out.push((0, reduce_adjoint(b, &dy, &x(0).shape, axes, *op)))
            }
            Op::Gemm {
                alpha,
                beta,
                trans_a,
                trans_b,
            } => {
                let (a, m) = (x(0), x(1));
                let (ta, tb) = (*trans_a, *trans_b);
                let scaled = if *alpha != 1.0 {
                    b.unary(Unary::Affine { a: *alpha, b: 0.0 }, &dy)
                } else {
                    dy.clone()
                };
                if want(0) {
                    let da = if ta {
                        b.matmul(m, &scaled, tb, true)
                    } else {
                        b.matmul(&scaled, m, false, !tb)
                    };
                    out.push((0, da));
                }
                if want(1) {
                    let dm = if tb {
                        b.matmul(&scaled, a, true, ta)
                    } else {
                        b.matmul(a, &scaled, !ta, false)
                    };
                    out.push((1, dm));
                }
                if want(2) {
                    let dc = if *beta != 1.0 {
                        b.unary(Unary::Affine { a: *beta, b: 0.0 }, &dy)
                    } else {
                        dy.clone()
                    };
                    out.push((2, unbroadcast(b, dc, &x(2).shape)));
                }
            }
            Op::MatMul => {
                let (a, m) = (x(0), x(1));
                if want(0) {
                    out.push((0, unbroadcast(b, b.matmul(&dy, m, false, true), &a.shape)));
                }
                if want(1) {
                    out.push((1, unbroadcast(b, b.matmul(a, &dy, true, false), &m.shape)));
                }
            }
            Op::Concat { axis } => {
                let mut off = 0;
                for (i, &v) in node.inputs.iter().enumerate() {
                    let len = tape.get(v).shape[*axis];
                    if needs[v] {
                        out.push((i, b.slice(&dy, *axis, off, off + len)));
                    }
                    off += len;
                }
            }
            Op::Slice { axis, start, end } => {
                let xs = &x(0).shape;
                let mut pads = vec![(0, 0); xs.len()];
                pads[*axis] = (*start, xs[*axis] - end);
                out.push((0, b.pad(&dy, &pads, PadMode::Constant, 0.0)));
            }
            Op::Reshape(_) => out.push((0, dy.reshape(&x(0).shape))),
            Op::Transpose { perm } => {
                let mut inv = vec![0; perm.len()];
                for (i, &p) in perm.iter().enumerate() {
                    inv[p] = i;
                }
                out.push((0, b.transpose(&dy, &inv)));
            }
            Op::Resize { .. } => {
                let (p, _) = shape::resize_geometry(&node.op, &x(0).shape)
                    .map_err(|e| e.at_node(&node.name))?;
                let xs = &x(0).shape;
                out.push((0, b.resize_backward(&dy, [xs[0], xs[1], xs[2], xs[3]], &p)));
            }
            Op::Pad { pads, mode, .. } => {
                out.push((0, b.pad_backward(&dy, &x(0).shape, pads, *mode)))
            }
            Op::Softmax { axis, log, legacy } => {
                let y = tape.get(node.output);
                let dx = if *legacy {
                    let s = &y.shape;
                    let flat = [
                        s[..*axis].iter().product::<usize>(),
                        s[*axis..].iter().product(),
                    ];
                    b.softmax_backward(&y.reshape(&flat), &dy.reshape(&flat), 1, *log)
                        .reshape(s)
                } else {
                    b.softmax_backward(y, &dy, *axis, *log)
                };
                out.push((0, dx));
            }
        }
        for (i, gi) in out {
            let v = node.inputs[i];
            if needs[v] {
                acc(b, &mut grads, v, gi);
            }
        }
    }
    let take = |v: ValueId, grads: &mut Vec<Option<Tensor<B>>>| -> Tensor<B> {
        match grads[v].clone() {
            Some(t) => t,
            // Not reached by any seed: the gradient is genuinely zero.
            None => b.zeros(&tape.get(v).shape),
        }
    };
    let inputs = wrt_inputs
        .iter()
        .map(|&i| {
            let v = *g.inputs.get(i).ok_or(ExecError::InputCount {
                want: i + 1,
                got: g.inputs.len(),
            })?;
            Ok(take(v, &mut grads))
        })
        .collect::<Result<Vec<_>, ExecError>>()?;
    let params = wrt_params
        .iter()
        .map(|&p| {
            let v = g.params[p].value;
            debug_assert!(matches!(g.values[v].kind, ValueKind::Param(_)));
            take(v, &mut grads)
        })
        .collect();
    Ok(Grads { inputs, params })
}

/// Test-only switch off the ReLU + pooling backward fusion, for equality tests and timing A/B
/// runs.
#[cfg(test)]
pub(crate) static NO_RELU_POOL: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Whether [`backward`] fuses a ReLU's backward into its pooling's (always, outside tests).
fn fuse_relu_pool() -> bool {
    #[cfg(test)]
    return !NO_RELU_POOL.load(std::sync::atomic::Ordering::Relaxed);
    #[cfg(not(test))]
    true
}
