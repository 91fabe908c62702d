//! Twin of `shaders/elementwise.wgsl`: unary ops and their derivatives, broadcasting binary ops,
//! fill.
//!
//! Bindings (0 is always the uniform params block):
//! - `unary_fwd`: 1 x (read), 2 y (write); params `{n, a, b}` (op constants).
//! - `unary_bwd`: 1 x, 2 y, 3 dy (read), 4 dx (write).
//! - `binary`: 1 a, 2 b (read), 3 out (write); params `{n, rank, shape[8], sa[8], sb[8]}`.
//! - `fill`: 1 out (write); params `{n, value}`.
//!
//! The op is the `OP` override constant, so each op gets its own specialised pipeline.

use super::context::{Access, Buf, Ctx, Kernel, Params, coalesce, strides};
use crate::runtime::backend::{Binary, Unary};
use crate::runtime::reference::broadcast_shape;

const SRC: &str = include_str!("../../../../shaders/elementwise.wgsl");

/// Invocations per workgroup of every entry point here (`WG` in the shader).
pub(crate) const WG: usize = 256;

const UNARY_FWD: Kernel = Kernel {
    family: "elementwise",
    source: SRC,
    entry: "unary_fwd",
    storage: &[Access::Read, Access::ReadWrite],
};
const UNARY_BWD: Kernel = Kernel {
    family: "elementwise",
    source: SRC,
    entry: "unary_bwd",
    storage: &[Access::Read, Access::Read, Access::Read, Access::ReadWrite],
};
const BINARY: Kernel = Kernel {
    family: "elementwise",
    source: SRC,
    entry: "binary",
    storage: &[Access::Read, Access::Read, Access::ReadWrite],
};
const FILL: Kernel = Kernel {
    family: "elementwise",
    source: SRC,
    entry: "fill",
    storage: &[Access::ReadWrite],
};

/// Workgroups for one invocation per element.
pub(crate) fn groups(n: usize) -> u64 {
    n.div_ceil(WG) as u64
}

/// (op code, a, b) for the shader's `unary_op` switch.
fn unary_code(op: Unary) -> (u32, f32, f32) {
    match op {
        Unary::Relu => (0, 0.0, 0.0),
        Unary::LeakyRelu { alpha } => (1, alpha, 0.0),
        Unary::Sigmoid => (2, 0.0, 0.0),
        Unary::Tanh => (3, 0.0, 0.0),
        Unary::Clip { min, max } => (4, min, max),
        Unary::Neg => (5, 0.0, 0.0),
        Unary::Exp => (6, 0.0, 0.0),
        Unary::Log => (7, 0.0, 0.0),
        Unary::Sqrt => (8, 0.0, 0.0),
        Unary::Abs => (9, 0.0, 0.0),
        Unary::Affine { a, b } => (10, a, b),
        Unary::Powf { p } => (11, p, 0.0),
        Unary::Sign => (12, 0.0, 0.0),
    }
}

fn binary_code(op: Binary) -> u32 {
    match op {
        Binary::Add => 0,
        Binary::Sub => 1,
        Binary::Mul => 2,
        Binary::Div => 3,
        Binary::Max => 4,
        Binary::Min => 5,
    }
}

pub(crate) fn unary(ctx: &Ctx, op: Unary, x: &Buf, n: usize) -> Buf {
    let (code, a, b) = unary_code(op);
    let y = ctx.alloc(n);
    let params = Params::new().u(n).f(a).f(b);
    ctx.dispatch(
        &UNARY_FWD,
        &[("OP", f64::from(code))],
        params,
        &[x, &y],
        groups(n),
    );
    y
}

pub(crate) fn unary_backward(ctx: &Ctx, op: Unary, x: &Buf, y: &Buf, dy: &Buf, n: usize) -> Buf {
    let (code, a, b) = unary_code(op);
    let dx = ctx.alloc(n);
    let params = Params::new().u(n).f(a).f(b);
    ctx.dispatch(
        &UNARY_BWD,
        &[("OP", f64::from(code))],
        params,
        &[x, y, dy, &dx],
        groups(n),
    );
    dx
}

/// Strides of a tensor of `shape` broadcast (right-aligned) to `out`: 0 along broadcast axes.
pub(crate) fn broadcast_strides(shape: &[usize], out: &[usize]) -> Vec<usize> {
    let st = strides(shape);
    let off = out.len() - shape.len();
    (0..out.len())
        .map(|d| {
            if d < off || shape[d - off] == 1 {
                0
            } else {
                st[d - off]
            }
        })
        .collect()
}

/// Returns the output and its (broadcast) shape.
pub(crate) fn binary(
    ctx: &Ctx,
    op: Binary,
    a: &Buf,
    a_shape: &[usize],
    b: &Buf,
    b_shape: &[usize],
) -> (Buf, Vec<usize>) {
    let out_shape = broadcast_shape(a_shape, b_shape);
    let n: usize = out_shape.iter().product();
    let sa = broadcast_strides(a_shape, &out_shape);
    let sb = broadcast_strides(b_shape, &out_shape);
    let (shape, st) = coalesce(&out_shape, &[sa, sb]);
    let out = ctx.alloc(n);
    let params = Params::new()
        .u(n)
        .u(shape.len())
        .arr8(&shape)
        .arr8(&st[0])
        .arr8(&st[1]);
    let spec = [("OP", f64::from(binary_code(op)))];
    ctx.dispatch(&BINARY, &spec, params, &[a, b, &out], groups(n));
    (out, out_shape)
}

pub(crate) fn fill(ctx: &Ctx, n: usize, value: f32) -> Buf {
    let out = ctx.alloc(n);
    ctx.dispatch(&FILL, &[], Params::new().u(n).f(value), &[&out], groups(n));
    out
}
