//! Twin of `shaders/reduce.wgsl`: strided sum/mean reductions, softmax and its adjoint, and the
//! per-sample losses.
//!
//! Bindings (0 = params):
//! - `reduce_small` / `reduce_large`: 1 x (read), 2 y (write); params `{n_out, n_red, rank_out,
//!   rank_red, scale, out_shape[8], out_strides[8], red_shape[8], red_strides[8]}`.
//!   `reduce_small` runs one invocation per output ([`WG`] per workgroup), `reduce_large` one
//!   workgroup per output with a fixed-order tree.
//! - `softmax_fwd`: 1 x (read), 2 y (write); `softmax_bwd`: 1 y, 2 dy (read), 3 dx (write);
//!   params `{rows, len, inner, log}`.
//! - `loss_class` (OP = 0 CE, 1 CW, 2 DLR; 64 per workgroup, one invocation per sample) and
//!   `loss_mse` (one workgroup per sample): 1 logits, 2 targets (u32 classes / f32 dense)
//!   (read), 3 loss [N], 4 dlogits (write); params `{n, k, kappa}`.

use super::context::{Access, Buf, Ctx, Kernel, Params, coalesce, strides};
use super::elementwise::groups;
use crate::runtime::backend::Loss;

const SRC: &str = include_str!("../../../../shaders/reduce.wgsl");

/// Invocations per workgroup (`WG` in the shader).
pub(crate) const WG: usize = 256;

/// Reductions at least this long use one workgroup per output.
const LARGE_REDUCTION: usize = 64;

/// Samples per workgroup of `loss_class`.
const LOSS_WG: usize = 64;

const REDUCE_SMALL: Kernel = Kernel {
    family: "reduce",
    source: SRC,
    entry: "reduce_small",
    storage: &[Access::Read, Access::ReadWrite],
};
const REDUCE_LARGE: Kernel = Kernel {
    family: "reduce",
    source: SRC,
    entry: "reduce_large",
    storage: &[Access::Read, Access::ReadWrite],
};
const SOFTMAX_FWD: Kernel = Kernel {
    family: "reduce",
    source: SRC,
    entry: "softmax_fwd",
    storage: &[Access::Read, Access::ReadWrite],
};
const SOFTMAX_BWD: Kernel = Kernel {
    family: "reduce",
    source: SRC,
    entry: "softmax_bwd",
    storage: &[Access::Read, Access::Read, Access::ReadWrite],
};
const LOSS_CLASS: Kernel = Kernel {
    family: "reduce",
    source: SRC,
    entry: "loss_class",
    storage: &[
        Access::Read,
        Access::Read,
        Access::ReadWrite,
        Access::ReadWrite,
    ],
};
const LOSS_MSE: Kernel = Kernel {
    family: "reduce",
    source: SRC,
    entry: "loss_mse",
    storage: &[
        Access::Read,
        Access::Read,
        Access::ReadWrite,
        Access::ReadWrite,
    ],
};

/// Sums `x` over the axes flagged in `reduced`, times `scale`. The output is laid out over the
/// kept axes in order (which is both the keepdims and the squeezed layout).
pub(crate) fn reduce_axes(
    ctx: &Ctx,
    x: &Buf,
    shape: &[usize],
    reduced: &[bool],
    scale: f32,
) -> Buf {
    let xs = strides(shape);
    let (mut os, mut ost, mut rs, mut rst) = (vec![], vec![], vec![], vec![]);
    for d in 0..shape.len() {
        if reduced[d] {
            rs.push(shape[d]);
            rst.push(xs[d]);
        } else {
            os.push(shape[d]);
            ost.push(xs[d]);
        }
    }
    let n_out: usize = os.iter().product();
    let n_red: usize = rs.iter().product();
    let (os, ost) = coalesce(&os, &[ost]);
    let (rs, rst) = coalesce(&rs, &[rst]);
    let y = ctx.alloc(n_out);
    if n_red == 0 {
        // Sum over nothing.
        ctx.clear(&y);
        return y;
    }
    let params = Params::new()
        .u(n_out)
        .u(n_red)
        .u(os.len())
        .u(rs.len())
        .f(scale)
        .arr8(&os)
        .arr8(&ost[0])
        .arr8(&rs)
        .arr8(&rst[0]);
    if n_red >= LARGE_REDUCTION {
        ctx.dispatch(&REDUCE_LARGE, &[], params, &[x, &y], n_out as u64);
    } else {
        ctx.dispatch(
            &REDUCE_SMALL,
            &[],
            params,
            &[x, &y],
            n_out.div_ceil(WG) as u64,
        );
    }
    y
}

fn split_axis(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    assert!(axis < shape.len(), "axis {axis} out of range for {shape:?}");
    (
        shape[..axis].iter().product(),
        shape[axis],
        shape[axis + 1..].iter().product(),
    )
}

pub(crate) fn softmax(ctx: &Ctx, x: &Buf, shape: &[usize], axis: usize, log: bool) -> Buf {
    let (outer, len, inner) = split_axis(shape, axis);
    let y = ctx.alloc(outer * len * inner);
    if len == 0 {
        return y;
    }
    let rows = outer * inner;
    let params = Params::new().u(rows).u(len).u(inner).raw(u32::from(log));
    ctx.dispatch(&SOFTMAX_FWD, &[], params, &[x, &y], groups(rows));
    y
}

pub(crate) fn softmax_backward(
    ctx: &Ctx,
    y: &Buf,
    dy: &Buf,
    shape: &[usize],
    axis: usize,
    log: bool,
) -> Buf {
    let (outer, len, inner) = split_axis(shape, axis);
    let dx = ctx.alloc(outer * len * inner);
    if len == 0 {
        return dx;
    }
    let rows = outer * inner;
    let params = Params::new().u(rows).u(len).u(inner).raw(u32::from(log));
    ctx.dispatch(&SOFTMAX_BWD, &[], params, &[y, dy, &dx], groups(rows));
    dx
}

/// What the loss kernel compares against, already on the device.
pub(crate) enum LossTarget<'a> {
    Classes(&'a [u32]),
    Dense(&'a Buf),
}

/// Returns (per-sample loss `[N]`, dlogits with the logits' layout).
pub(crate) fn loss(
    ctx: &Ctx,
    kind: Loss,
    logits: &Buf,
    shape: &[usize],
    target: LossTarget<'_>,
) -> (Buf, Buf) {
    assert!(!shape.is_empty(), "loss logits need a batch axis");
    let n = shape[0];
    let total: usize = shape.iter().product();
    let per = total.checked_div(n).unwrap_or(0);
    let loss = ctx.alloc(n);
    let grad = ctx.alloc(total);
    if n == 0 {
        return (loss, grad);
    }
    // (OP code, kappa) of the class-target kernel; None for MSE.
    let class_kernel = match kind {
        Loss::CrossEntropy => Some((0.0, 0.0)),
        Loss::CwMargin { kappa } => Some((1.0, kappa)),
        Loss::Dlr => Some((2.0, 0.0)),
        Loss::Mse => None,
    };
    match (class_kernel, target) {
        (None, LossTarget::Dense(t)) => {
            let params = Params::new().u(n).u(per).f(0.0);
            ctx.dispatch(&LOSS_MSE, &[], params, &[logits, t, &loss, &grad], n as u64);
        }
        (None, LossTarget::Classes(_)) => panic!("MSE needs a dense target"),
        (Some(_), LossTarget::Dense(_)) => panic!("{kind:?} needs class targets"),
        (Some((code, kappa)), LossTarget::Classes(classes)) => {
            assert_eq!(
                shape.len(),
                2,
                "{kind:?} takes [N, K] logits, got {shape:?}"
            );
            assert_eq!(classes.len(), n, "one class per sample");
            for &c in classes {
                assert!(
                    (c as usize) < per,
                    "class {c} out of range for {per} logits"
                );
            }
            assert!(
                kind != Loss::Dlr || per >= 3,
                "DLR needs at least 3 classes"
            );
            let t = ctx.upload_words(classes);
            let params = Params::new().u(n).u(per).f(kappa);
            let bufs = [logits, &t, &loss, &grad];
            ctx.dispatch(
                &LOSS_CLASS,
                &[("OP", code)],
                params,
                &bufs,
                n.div_ceil(LOSS_WG) as u64,
            );
        }
    }
    (loss, grad)
}
