//! Twin of `shaders/movement.wgsl`: transpose, concat, slice, broadcast_to (all one strided-copy
//! kernel) and pad / its adjoint (one axis per pass).
//!
//! Bindings (0 = params):
//! - `strided_copy`: 1 src (read), 2 dst (write); params
//!   `{n, rank, src_off, dst_off, shape[8], src_strides[8], dst_strides[8]}`.
//! - `pad_axis` / `pad_axis_bwd`: 1 src (read), 2 dst (write); params
//!   `{n, outer, len_in, len_out, inner, before, mode, value}`.

use super::context::{Access, Buf, Ctx, Kernel, Params, coalesce, strides};
use super::elementwise::{broadcast_strides, groups};
use crate::runtime::backend::PadMode;

const SRC: &str = include_str!("../../../../shaders/movement.wgsl");

const STRIDED_COPY: Kernel = Kernel {
    family: "movement",
    source: SRC,
    entry: "strided_copy",
    storage: &[Access::Read, Access::ReadWrite],
};
const PAD_AXIS: Kernel = Kernel {
    family: "movement",
    source: SRC,
    entry: "pad_axis",
    storage: &[Access::Read, Access::ReadWrite],
};
const PAD_AXIS_BWD: Kernel = Kernel {
    family: "movement",
    source: SRC,
    entry: "pad_axis_bwd",
    storage: &[Access::Read, Access::ReadWrite],
};

/// Copies the elements of `shape` from `src` (strides `ss`, offset `src_off`) into `dst`
/// (strides `ds`, offset `dst_off`).
fn strided_copy(
    ctx: &Ctx,
    src: &Buf,
    dst: &Buf,
    shape: &[usize],
    ss: Vec<usize>,
    src_off: usize,
    ds: Vec<usize>,
    dst_off: usize,
) {
    let n: usize = shape.iter().product();
    if n == 0 {
        return;
    }
    let (shape, st) = coalesce(shape, &[ss, ds]);
    let params = Params::new()
        .u(n)
        .u(shape.len())
        .u(src_off)
        .u(dst_off)
        .arr8(&shape)
        .arr8(&st[0])
        .arr8(&st[1]);
    ctx.dispatch(&STRIDED_COPY, &[], params, &[src, dst], groups(n));
}

pub(crate) fn transpose(ctx: &Ctx, x: &Buf, shape: &[usize], perm: &[usize]) -> (Buf, Vec<usize>) {
    assert_eq!(perm.len(), shape.len(), "transpose perm rank");
    let xs = strides(shape);
    let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
    let ss: Vec<usize> = perm.iter().map(|&p| xs[p]).collect();
    let out = ctx.alloc(out_shape.iter().product());
    strided_copy(ctx, x, &out, &out_shape, ss, 0, strides(&out_shape), 0);
    (out, out_shape)
}

pub(crate) fn concat(ctx: &Ctx, xs: &[(&Buf, &[usize])], axis: usize) -> (Buf, Vec<usize>) {
    assert!(!xs.is_empty(), "concat of nothing");
    let mut out_shape = xs[0].1.to_vec();
    out_shape[axis] = xs.iter().map(|(_, s)| s[axis]).sum();
    let out = ctx.alloc(out_shape.iter().product());
    let os = strides(&out_shape);
    let mut at = 0;
    for (buf, shape) in xs {
        assert_eq!(shape.len(), out_shape.len(), "concat ranks");
        strided_copy(
            ctx,
            buf,
            &out,
            shape,
            strides(shape),
            0,
            os.clone(),
            at * os[axis],
        );
        at += shape[axis];
    }
    (out, out_shape)
}

pub(crate) fn slice(
    ctx: &Ctx,
    x: &Buf,
    shape: &[usize],
    axis: usize,
    start: usize,
    end: usize,
) -> (Buf, Vec<usize>) {
    assert!(
        start <= end && end <= shape[axis],
        "slice {start}..{end} of {shape:?}"
    );
    let mut out_shape = shape.to_vec();
    out_shape[axis] = end - start;
    let xs = strides(shape);
    let out = ctx.alloc(out_shape.iter().product());
    let off = start * xs[axis];
    strided_copy(ctx, x, &out, &out_shape, xs, off, strides(&out_shape), 0);
    (out, out_shape)
}

pub(crate) fn broadcast_to(ctx: &Ctx, x: &Buf, shape: &[usize], to: &[usize]) -> Buf {
    assert!(
        shape.len() <= to.len(),
        "cannot broadcast {shape:?} to {to:?}"
    );
    let off = to.len() - shape.len();
    for (d, &n) in shape.iter().enumerate() {
        assert!(
            n == 1 || n == to[d + off],
            "cannot broadcast {shape:?} to {to:?}"
        );
    }
    let out = ctx.alloc(to.iter().product());
    strided_copy(
        ctx,
        x,
        &out,
        to,
        broadcast_strides(shape, to),
        0,
        strides(to),
        0,
    );
    out
}

fn mode_code(mode: PadMode) -> u32 {
    match mode {
        PadMode::Constant => 0,
        PadMode::Reflect => 1,
        PadMode::Edge => 2,
    }
}

fn pad_params(shape: &[usize], d: usize, before: usize, after: usize, n: usize) -> Params {
    let outer: usize = shape[..d].iter().product();
    let inner: usize = shape[d + 1..].iter().product();
    Params::new()
        .u(n)
        .u(outer)
        .u(shape[d])
        .u(shape[d] + before + after)
        .u(inner)
        .u(before)
}

/// Pads axis by axis (axis 0 first); returns the padded buffer and shape.
pub(crate) fn pad(
    ctx: &Ctx,
    x: &Buf,
    shape: &[usize],
    pads: &[(usize, usize)],
    mode: PadMode,
    value: f32,
) -> (Buf, Vec<usize>) {
    assert_eq!(pads.len(), shape.len(), "one (before, after) pad per axis");
    let mut cur = x.clone();
    let mut cur_shape = shape.to_vec();
    for (d, &(b, a)) in pads.iter().enumerate() {
        if b == 0 && a == 0 {
            continue;
        }
        assert!(
            cur_shape[d] > 0 || mode == PadMode::Constant,
            "{mode:?} padding of an empty axis"
        );
        let mut out_shape = cur_shape.clone();
        out_shape[d] += b + a;
        let n: usize = out_shape.iter().product();
        let out = ctx.alloc(n);
        let params = pad_params(&cur_shape, d, b, a, n)
            .raw(mode_code(mode))
            .f(value);
        ctx.dispatch(&PAD_AXIS, &[], params, &[&cur, &out], groups(n));
        cur = out;
        cur_shape = out_shape;
    }
    (cur, cur_shape)
}

/// Adjoint of [`pad`]: the per-axis adjoints in reverse axis order.
pub(crate) fn pad_backward(
    ctx: &Ctx,
    dy: &Buf,
    dy_shape: &[usize],
    x_shape: &[usize],
    pads: &[(usize, usize)],
    mode: PadMode,
) -> Buf {
    assert_eq!(
        pads.len(),
        x_shape.len(),
        "one (before, after) pad per axis"
    );
    let mut cur = dy.clone();
    let mut cur_shape = dy_shape.to_vec();
    for (d, &(b, a)) in pads.iter().enumerate().rev() {
        if b == 0 && a == 0 {
            continue;
        }
        assert_eq!(cur_shape[d], x_shape[d] + b + a, "pad_backward dy shape");
        let mut in_shape = cur_shape.clone();
        in_shape[d] = x_shape[d];
        let n: usize = in_shape.iter().product();
        let out = ctx.alloc(n);
        let params = pad_params(&in_shape, d, b, a, n)
            .raw(mode_code(mode))
            .f(0.0);
        ctx.dispatch(&PAD_AXIS_BWD, &[], params, &[&cur, &out], groups(n));
        cur = out;
        cur_shape = in_shape;
    }
    assert_eq!(cur_shape, x_shape, "pad_backward dy shape");
    cur
}
