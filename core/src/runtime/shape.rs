//! Shape inference for the IR, shared by import (batch 1, to validate and summarise the model)
//! and the executor (actual batch, to derive each primitive's geometry). Keeping one function for
//! both means the geometry the backends see is exactly the one import validated.

use super::backend::{Conv2dParams, Pool2dParams, ResizeParams};
use super::ir::{Op, PadSpec, ReshapeRule, ResizeSize};

#[derive(Debug, thiserror::Error)]
pub enum ShapeError {
    #[error("{0}")]
    Invalid(String),
    #[error("node `{node}`: {inner}")]
    AtNode {
        node: String,
        inner: Box<ShapeError>,
    },
}

impl ShapeError {
    /// Attach the node name (once).
    pub fn at_node(self, node: &str) -> ShapeError {
        match self {
            e @ ShapeError::AtNode { .. } => e,
            e => ShapeError::AtNode {
                node: node.to_string(),
                inner: Box::new(e),
            },
        }
    }
}

fn bad(msg: impl Into<String>) -> ShapeError {
    ShapeError::Invalid(msg.into())
}

fn rank_at_least(s: &[usize], r: usize, what: &str) -> Result<(), ShapeError> {
    if s.len() < r {
        Err(bad(format!("{what} needs rank >= {r}, got shape {s:?}")))
    } else {
        Ok(())
    }
}

fn nchw(s: &[usize], what: &str) -> Result<[usize; 4], ShapeError> {
    if s.len() != 4 {
        return Err(bad(format!(
            "{what} needs a 4-D NCHW input, got shape {s:?}"
        )));
    }
    Ok([s[0], s[1], s[2], s[3]])
}

/// NumPy broadcast of two shapes.
pub fn broadcast(a: &[usize], b: &[usize]) -> Result<Vec<usize>, ShapeError> {
    let r = a.len().max(b.len());
    let mut out = vec![0; r];
    for i in 0..r {
        let da = if i + a.len() >= r {
            a[i + a.len() - r]
        } else {
            1
        };
        let db = if i + b.len() >= r {
            b[i + b.len() - r]
        } else {
            1
        };
        out[i] = if da == db || db == 1 {
            da
        } else if da == 1 {
            db
        } else {
            return Err(bad(format!("shapes {a:?} and {b:?} do not broadcast")));
        };
    }
    Ok(out)
}

fn effective(k: usize, d: usize) -> usize {
    (k - 1) * d + 1
}

/// Resolve `auto_pad` against the input's spatial size.
pub fn resolve_pads(
    spec: PadSpec,
    in_hw: [usize; 2],
    kernel: [usize; 2],
    stride: [usize; 2],
    dil: [usize; 2],
) -> [usize; 4] {
    match spec {
        PadSpec::Explicit(p) => p,
        PadSpec::SameUpper | PadSpec::SameLower => {
            let mut p = [0; 4];
            for i in 0..2 {
                let out = in_hw[i].div_ceil(stride[i].max(1));
                let need = ((out.saturating_sub(1)) * stride[i] + effective(kernel[i], dil[i]))
                    .saturating_sub(in_hw[i]);
                let (head, tail) = if spec == PadSpec::SameUpper {
                    (need / 2, need - need / 2)
                } else {
                    (need - need / 2, need / 2)
                };
                p[i] = head;
                p[i + 2] = tail;
            }
            p
        }
    }
}

fn conv_out(
    inp: usize,
    pad: usize,
    k_eff: usize,
    stride: usize,
    what: &str,
) -> Result<usize, ShapeError> {
    if inp + pad < k_eff {
        return Err(bad(format!(
            "{what}: kernel extent {k_eff} exceeds padded input {}",
            inp + pad
        )));
    }
    Ok((inp + pad - k_eff) / stride + 1)
}

/// Conv geometry for input shape `x` and weight shape `w`; returns (params, output shape).
pub fn conv_geometry(
    op: &Op,
    x: &[usize],
    w: &[usize],
) -> Result<(Conv2dParams, Vec<usize>), ShapeError> {
    let Op::Conv {
        kernel,
        stride,
        dilation,
        pad,
        groups,
    } = op
    else {
        return Err(bad("conv_geometry on a non-Conv op"));
    };
    let [n, c, h, wd] = nchw(x, "Conv")?;
    if w.len() != 4 {
        return Err(bad(format!("Conv weight must be 4-D, got {w:?}")));
    }
    if [w[2], w[3]] != *kernel {
        return Err(bad(format!(
            "Conv weight spatial size {:?} differs from kernel_shape {kernel:?}",
            &w[2..]
        )));
    }
    if *groups == 0
        || !c.is_multiple_of(*groups)
        || !w[0].is_multiple_of(*groups)
        || w[1] * groups != c
    {
        return Err(bad(format!(
            "Conv channels: input {c}, weight {w:?}, groups {groups} are inconsistent"
        )));
    }
    let pads = resolve_pads(*pad, [h, wd], *kernel, *stride, *dilation);
    let oh = conv_out(
        h,
        pads[0] + pads[2],
        effective(kernel[0], dilation[0]),
        stride[0],
        "Conv",
    )?;
    let ow = conv_out(
        wd,
        pads[1] + pads[3],
        effective(kernel[1], dilation[1]),
        stride[1],
        "Conv",
    )?;
    Ok((
        Conv2dParams {
            stride: *stride,
            pad: pads,
            dilation: *dilation,
            groups: *groups,
        },
        vec![n, w[0], oh, ow],
    ))
}

/// ConvTranspose geometry: the conv params whose *backward-input* is this op's forward.
pub fn conv_transpose_geometry(
    op: &Op,
    x: &[usize],
    w: &[usize],
) -> Result<(Conv2dParams, Vec<usize>), ShapeError> {
    let Op::ConvTranspose {
        kernel,
        stride,
        dilation,
        pads,
        output_padding,
        groups,
        output_shape,
        same_upper,
    } = op
    else {
        return Err(bad("conv_transpose_geometry on a non-ConvTranspose op"));
    };
    let [n, c, h, wd] = nchw(x, "ConvTranspose")?;
    if w.len() != 4 || w[0] != c || [w[2], w[3]] != *kernel {
        return Err(bad(format!(
            "ConvTranspose weight {w:?} does not match input channels {c} / kernel {kernel:?}"
        )));
    }
    if *groups == 0 || c % groups != 0 {
        return Err(bad(format!(
            "ConvTranspose: {c} input channels not divisible by groups {groups}"
        )));
    }
    for i in 0..2 {
        if output_padding[i] >= stride[i].max(dilation[i]) {
            return Err(bad(format!(
                "ConvTranspose output_padding {output_padding:?} must be < stride {stride:?}"
            )));
        }
    }
    let cout = w[1] * groups;
    let inp = [h, wd];
    let mut p = *pads;
    let mut out = [0usize; 2];
    for i in 0..2 {
        let full = stride[i] * inp[i].saturating_sub(1)
            + output_padding[i]
            + effective(kernel[i], dilation[i]);
        let target = match (output_shape, same_upper) {
            (Some(o), _) => Some(o[i]),
            (None, Some(_)) => Some(inp[i] * stride[i]),
            (None, None) => None,
        };
        match target {
            Some(t) => {
                if t > full {
                    return Err(bad(format!(
                        "ConvTranspose output size {t} larger than the full extent {full}"
                    )));
                }
                let total = full - t;
                let (head, tail) = if *same_upper == Some(true) {
                    (total / 2, total - total / 2)
                } else {
                    (total - total / 2, total / 2)
                };
                p[i] = head;
                p[i + 2] = tail;
                out[i] = t;
            }
            None => {
                if p[i] + p[i + 2] >= full {
                    return Err(bad(format!(
                        "ConvTranspose pads {pads:?} remove the whole output"
                    )));
                }
                out[i] = full - p[i] - p[i + 2];
            }
        }
    }
    // Backend convention: output_padding rows are covered by conv2d_backward_input's x_shape.
    Ok((
        Conv2dParams {
            stride: *stride,
            pad: p,
            dilation: *dilation,
            groups: *groups,
        },
        vec![n, cout, out[0], out[1]],
    ))
}

/// Pool geometry for input `x` (ONNX output-size rules, including onnxruntime's "the last
/// window must start inside the input" correction for `ceil_mode`).
pub fn pool_geometry(op: &Op, x: &[usize]) -> Result<(Pool2dParams, Vec<usize>), ShapeError> {
    let Op::Pool {
        kind,
        kernel,
        stride,
        dilation,
        pad,
        ceil_mode,
    } = op
    else {
        return Err(bad("pool_geometry on a non-Pool op"));
    };
    let [n, c, h, w] = nchw(x, "pooling")?;
    let pads = resolve_pads(*pad, [h, w], *kernel, *stride, *dilation);
    let inp = [h, w];
    let mut out = [0; 2];
    for i in 0..2 {
        let ke = effective(kernel[i], dilation[i]);
        let padded = inp[i] + pads[i] + pads[i + 2];
        if padded < ke {
            return Err(bad(format!(
                "pool kernel extent {ke} exceeds padded input {padded}"
            )));
        }
        let span = padded - ke;
        let mut o = if *ceil_mode {
            span.div_ceil(stride[i]) + 1
        } else {
            span / stride[i] + 1
        };
        if *ceil_mode && (o - 1) * stride[i] >= inp[i] + pads[i] {
            o -= 1;
        }
        out[i] = o;
    }
    Ok((
        Pool2dParams {
            kind: *kind,
            kernel: *kernel,
            stride: *stride,
            pad: pads,
            dilation: *dilation,
            out_hw: out,
        },
        vec![n, c, out[0], out[1]],
    ))
}

pub fn resize_geometry(op: &Op, x: &[usize]) -> Result<(ResizeParams, Vec<usize>), ShapeError> {
    let Op::Resize { mode, coord, size } = op else {
        return Err(bad("resize_geometry on a non-Resize op"));
    };
    let [n, c, h, w] = nchw(x, "Resize")?;
    let out = match size {
        ResizeSize::Sizes(s) => *s,
        ResizeSize::Scales(s) => {
            let mut o = [0; 2];
            for (i, &d) in [h, w].iter().enumerate() {
                let v = d as f64 * s[i] as f64;
                if (v - v.round()).abs() > 1e-4 {
                    return Err(bad(format!(
                        "Resize scale {} on size {d} gives a non-integer size {v}: only integral output sizes are supported",
                        s[i]
                    )));
                }
                o[i] = v.round() as usize;
            }
            o
        }
    };
    if out[0] == 0 || out[1] == 0 {
        return Err(bad(format!("Resize to an empty size {out:?}")));
    }
    Ok((
        ResizeParams {
            mode: *mode,
            coord: *coord,
            out_hw: out,
        },
        vec![n, c, out[0], out[1]],
    ))
}

/// Resolve a reshape rule against the input shape and batch size `n`.
pub fn reshape_target(rule: &ReshapeRule, x: &[usize], n: usize) -> Result<Vec<usize>, ShapeError> {
    let count: usize = x.iter().product();
    match rule {
        ReshapeRule::Spec { dims, allowzero } => {
            let mut out = Vec::with_capacity(dims.len());
            let mut infer = None;
            for (i, d) in dims.iter().enumerate() {
                let v = d.eval(n);
                if v == -1 {
                    if infer.is_some() {
                        return Err(bad("Reshape with more than one -1"));
                    }
                    infer = Some(i);
                    out.push(1);
                } else if v == 0 && !allowzero {
                    let Some(&d) = x.get(i) else {
                        return Err(bad(format!(
                            "Reshape copies axis {i} of a rank-{} input",
                            x.len()
                        )));
                    };
                    out.push(d);
                } else if v < 0 {
                    return Err(bad(format!("Reshape to a negative size {v}")));
                } else {
                    out.push(v as usize);
                }
            }
            if let Some(i) = infer {
                let known: usize = out.iter().product();
                if known == 0 || !count.is_multiple_of(known) {
                    return Err(bad(format!(
                        "Reshape of {x:?} to {dims:?} (-1 not inferable)"
                    )));
                }
                out[i] = count / known;
            }
            if out.iter().product::<usize>() != count {
                return Err(bad(format!(
                    "Reshape of {x:?} ({count} elements) to {out:?}"
                )));
            }
            Ok(out)
        }
        ReshapeRule::Flatten { axis } => {
            if *axis > x.len() {
                return Err(bad(format!("Flatten axis {axis} beyond rank {}", x.len())));
            }
            Ok(vec![
                x[..*axis].iter().product(),
                x[*axis..].iter().product(),
            ])
        }
        ReshapeRule::Squeeze { axes } => {
            let mut out = Vec::new();
            for (i, &d) in x.iter().enumerate() {
                if axes.contains(&i) {
                    if d != 1 {
                        return Err(bad(format!("Squeeze of axis {i} with size {d}")));
                    }
                } else {
                    out.push(d);
                }
            }
            Ok(out)
        }
        ReshapeRule::Unsqueeze { axes } => {
            let r = x.len() + axes.len();
            let mut out = Vec::with_capacity(r);
            let mut it = x.iter();
            for i in 0..r {
                if axes.contains(&i) {
                    out.push(1);
                } else {
                    match it.next() {
                        Some(&d) => out.push(d),
                        None => {
                            return Err(bad(format!(
                                "Unsqueeze axes {axes:?} out of range for {x:?}"
                            )));
                        }
                    }
                }
            }
            Ok(out)
        }
    }
}

/// Output shape of the Gemm/MatMul product (without the C term).
pub fn matmul_shape(
    a: &[usize],
    b: &[usize],
    ta: bool,
    tb: bool,
) -> Result<Vec<usize>, ShapeError> {
    rank_at_least(a, 2, "MatMul A")?;
    rank_at_least(b, 2, "MatMul B")?;
    let (m, ka) = if ta {
        (a[a.len() - 1], a[a.len() - 2])
    } else {
        (a[a.len() - 2], a[a.len() - 1])
    };
    let (kb, nn) = if tb {
        (b[b.len() - 1], b[b.len() - 2])
    } else {
        (b[b.len() - 2], b[b.len() - 1])
    };
    if ka != kb {
        return Err(bad(format!(
            "matrix product of {a:?} and {b:?}: inner sizes {ka} != {kb}"
        )));
    }
    let mut out = broadcast(&a[..a.len() - 2], &b[..b.len() - 2])?;
    out.push(m);
    out.push(nn);
    Ok(out)
}

/// Output shape of `op` given its input shapes and the batch size `n`.
pub fn infer(op: &Op, ins: &[&[usize]], n: usize) -> Result<Vec<usize>, ShapeError> {
    let need = |k: usize| -> Result<(), ShapeError> {
        if ins.len() < k {
            Err(bad(format!(
                "{} needs {k} inputs, got {}",
                op.kind_name(),
                ins.len()
            )))
        } else {
            Ok(())
        }
    };
    match op {
        Op::Conv { .. } => {
            need(2)?;
            let (_, out) = conv_geometry(op, ins[0], ins[1])?;
            if let Some(b) = ins.get(2)
                && *b != [out[1]]
            {
                return Err(bad(format!("Conv bias shape {b:?}, expected [{}]", out[1])));
            }
            Ok(out)
        }
        Op::ConvTranspose { .. } => {
            need(2)?;
            let (_, out) = conv_transpose_geometry(op, ins[0], ins[1])?;
            if let Some(b) = ins.get(2)
                && *b != [out[1]]
            {
                return Err(bad(format!(
                    "ConvTranspose bias shape {b:?}, expected [{}]",
                    out[1]
                )));
            }
            Ok(out)
        }
        Op::Unary(_) => {
            need(1)?;
            Ok(ins[0].to_vec())
        }
        Op::Binary(_) => {
            need(2)?;
            broadcast(ins[0], ins[1])
        }
        Op::Pool { .. } => {
            need(1)?;
            Ok(pool_geometry(op, ins[0])?.1)
        }
        Op::Reduce { axes, keepdims, .. } => {
            need(1)?;
            let x = ins[0];
            if axes.iter().any(|&a| a >= x.len()) {
                return Err(bad(format!("reduce axes {axes:?} out of range for {x:?}")));
            }
            Ok(x.iter()
                .enumerate()
                .filter_map(|(i, &d)| {
                    if axes.contains(&i) {
                        keepdims.then_some(1)
                    } else {
                        Some(d)
                    }
                })
                .collect())
        }
        Op::Gemm {
            trans_a, trans_b, ..
        } => {
            need(2)?;
            if ins[0].len() != 2 || ins[1].len() != 2 {
                return Err(bad(format!(
                    "Gemm needs 2-D operands, got {:?} and {:?}",
                    ins[0], ins[1]
                )));
            }
            let out = matmul_shape(ins[0], ins[1], *trans_a, *trans_b)?;
            if let Some(c) = ins.get(2) {
                let bc = broadcast(&out, c)?;
                if bc != out {
                    return Err(bad(format!("Gemm C {c:?} does not broadcast to {out:?}")));
                }
            }
            Ok(out)
        }
        Op::MatMul => {
            need(2)?;
            matmul_shape(ins[0], ins[1], false, false)
        }
        Op::Concat { axis } => {
            need(1)?;
            let first = ins[0];
            if *axis >= first.len() {
                return Err(bad(format!(
                    "Concat axis {axis} out of range for {first:?}"
                )));
            }
            let mut out = first.to_vec();
            for s in &ins[1..] {
                if s.len() != first.len()
                    || s.iter()
                        .zip(first)
                        .enumerate()
                        .any(|(i, (a, b))| i != *axis && a != b)
                {
                    return Err(bad(format!(
                        "Concat of {first:?} and {s:?} along axis {axis}"
                    )));
                }
                out[*axis] += s[*axis];
            }
            Ok(out)
        }
        Op::Slice { axis, start, end } => {
            need(1)?;
            let x = ins[0];
            if *axis >= x.len() || start > end || *end > x[*axis] {
                return Err(bad(format!(
                    "Slice {start}..{end} of axis {axis} out of range for {x:?}"
                )));
            }
            let mut out = x.to_vec();
            out[*axis] = end - start;
            Ok(out)
        }
        Op::Reshape(rule) => {
            need(1)?;
            reshape_target(rule, ins[0], n)
        }
        Op::Transpose { perm } => {
            need(1)?;
            let x = ins[0];
            let mut seen = vec![false; x.len()];
            if perm.len() != x.len()
                || perm
                    .iter()
                    .any(|&p| p >= x.len() || std::mem::replace(&mut seen[p], true))
            {
                return Err(bad(format!("Transpose perm {perm:?} invalid for {x:?}")));
            }
            Ok(perm.iter().map(|&p| x[p]).collect())
        }
        Op::Resize { .. } => {
            need(1)?;
            Ok(resize_geometry(op, ins[0])?.1)
        }
        Op::Pad { pads, .. } => {
            need(1)?;
            let x = ins[0];
            if pads.len() != x.len() {
                return Err(bad(format!(
                    "Pad has {} axis pads for a rank-{} input",
                    pads.len(),
                    x.len()
                )));
            }
            Ok(x.iter().zip(pads).map(|(&d, &(a, b))| d + a + b).collect())
        }
        Op::Softmax { axis, .. } => {
            need(1)?;
            if *axis >= ins[0].len() {
                return Err(bad(format!(
                    "Softmax axis {axis} out of range for {:?}",
                    ins[0]
                )));
            }
            Ok(ins[0].to_vec())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::backend::{PoolKind, ResizeMode};
    use crate::runtime::ir::SymInt;

    #[test]
    fn same_upper_pads_match_onnx_rule() {
        // in 5, k 3, s 2: out 3, need (3-1)*2+3-5 = 2 -> 1/1; in 6: out 3, need 1 -> 0/1 upper.
        assert_eq!(
            resolve_pads(PadSpec::SameUpper, [5, 6], [3, 3], [2, 2], [1, 1]),
            [1, 0, 1, 1]
        );
        assert_eq!(
            resolve_pads(PadSpec::SameLower, [5, 6], [3, 3], [2, 2], [1, 1]),
            [1, 1, 1, 0]
        );
    }

    #[test]
    fn pool_ceil_mode_drops_window_starting_in_padding() {
        let op = Op::Pool {
            kind: PoolKind::Max,
            kernel: [2, 2],
            stride: [2, 2],
            dilation: [1, 1],
            pad: PadSpec::Explicit([0, 0, 1, 1]),
            ceil_mode: true,
        };
        // padded 5, span 3 -> ceil(3/2)+1 = 3, but window 2 would start at 4 >= 4+0: dropped.
        let (p, out) = pool_geometry(&op, &[1, 1, 4, 4]).unwrap();
        assert_eq!(out, vec![1, 1, 2, 2]);
        assert_eq!(p.out_hw, [2, 2]);
        let floor = Op::Pool {
            kind: PoolKind::Max,
            kernel: [3, 3],
            stride: [2, 2],
            dilation: [1, 1],
            pad: PadSpec::Explicit([0; 4]),
            ceil_mode: true,
        };
        assert_eq!(
            pool_geometry(&floor, &[1, 1, 6, 6]).unwrap().1,
            vec![1, 1, 3, 3]
        );
    }

    #[test]
    fn conv_transpose_output_size() {
        let op = Op::ConvTranspose {
            kernel: [3, 3],
            stride: [2, 2],
            dilation: [1, 1],
            pads: [1, 1, 1, 1],
            output_padding: [1, 1],
            groups: 1,
            output_shape: None,
            same_upper: None,
        };
        let (_, out) = conv_transpose_geometry(&op, &[2, 4, 5, 5], &[4, 3, 3, 3]).unwrap();
        assert_eq!(out, vec![2, 3, 10, 10]);
    }

    #[test]
    fn reshape_with_symbolic_batch() {
        let rule = ReshapeRule::Spec {
            dims: vec![SymInt::BATCH, SymInt::lit(-1)],
            allowzero: false,
        };
        assert_eq!(
            reshape_target(&rule, &[3, 4, 2, 2], 3).unwrap(),
            vec![3, 16]
        );
        assert_eq!(
            reshape_target(&rule, &[3, 4, 2, 2], 2).unwrap(),
            vec![2, 24]
        );
        let fixed = ReshapeRule::Spec {
            dims: vec![SymInt::BATCH, SymInt::lit(5)],
            allowzero: false,
        };
        assert!(reshape_target(&fixed, &[3, 4, 2, 2], 3).is_err());
        let z = ReshapeRule::Spec {
            dims: vec![SymInt::lit(0), SymInt::lit(4), SymInt::lit(-1)],
            allowzero: false,
        };
        assert_eq!(reshape_target(&z, &[5, 8, 3], 5).unwrap(), vec![5, 4, 6]);
        assert_eq!(
            reshape_target(&ReshapeRule::Unsqueeze { axes: vec![0, 3] }, &[2, 3], 1).unwrap(),
            vec![1, 2, 3, 1]
        );
    }

    #[test]
    fn broadcast_and_matmul_shapes() {
        assert_eq!(broadcast(&[2, 1, 4], &[3, 1]).unwrap(), vec![2, 3, 4]);
        assert!(broadcast(&[2, 3], &[4]).is_err());
        assert_eq!(
            matmul_shape(&[5, 2, 3], &[3, 7], false, false).unwrap(),
            vec![5, 2, 7]
        );
        assert_eq!(
            matmul_shape(&[3, 2], &[7, 3], true, true).unwrap(),
            vec![2, 7]
        );
        let r = Op::Resize {
            mode: ResizeMode::Linear,
            coord: crate::runtime::backend::CoordTransform::HalfPixel,
            size: ResizeSize::Scales([2.0, 1.5]),
        };
        assert_eq!(infer(&r, &[&[1, 2, 4, 4]], 1).unwrap(), vec![1, 2, 8, 6]);
        let r = Op::Resize {
            mode: ResizeMode::Linear,
            coord: crate::runtime::backend::CoordTransform::HalfPixel,
            size: ResizeSize::Scales([1.3, 1.0]),
        };
        assert!(infer(&r, &[&[1, 2, 4, 4]], 1).is_err());
    }
}
