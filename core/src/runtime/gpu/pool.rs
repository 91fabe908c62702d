//! Twin of `shaders/pool.wgsl`: max / average pooling and the gather-form adjoint.
//!
//! Bindings: 0 params `{nc, h, w, oh, ow, kh, kw, sh, sw, pt, pl, pb, pr, dh, dw, kind}`;
//! `pool_fwd`: 1 x (read), 2 y (write); `pool_bwd`: 1 x, 2 dy (read), 3 dx (write).
//! One invocation per output (forward) or input (backward) element, 256 per workgroup.

use super::context::{Access, Buf, Ctx, Kernel, Params};
use super::elementwise::groups;
use crate::runtime::backend::{Pool2dParams, PoolKind};

const SRC: &str = include_str!("../../../../shaders/pool.wgsl");

const FWD: Kernel = Kernel {
    family: "pool",
    source: SRC,
    entry: "pool_fwd",
    storage: &[Access::Read, Access::ReadWrite],
};
const BWD: Kernel = Kernel {
    family: "pool",
    source: SRC,
    entry: "pool_bwd",
    storage: &[Access::Read, Access::Read, Access::ReadWrite],
};

fn params(x: [usize; 4], p: &Pool2dParams) -> Params {
    let kind = match p.kind {
        PoolKind::Max => 0,
        PoolKind::Avg {
            count_include_pad: true,
        } => 1,
        PoolKind::Avg {
            count_include_pad: false,
        } => 2,
    };
    assert!(
        p.stride.iter().chain(&p.dilation).all(|&v| v >= 1),
        "pool stride/dilation >= 1"
    );
    Params::new()
        .u(x[0] * x[1])
        .u(x[2])
        .u(x[3])
        .u(p.out_hw[0])
        .u(p.out_hw[1])
        .u(p.kernel[0])
        .u(p.kernel[1])
        .u(p.stride[0])
        .u(p.stride[1])
        .u(p.pad[0])
        .u(p.pad[1])
        .u(p.pad[2])
        .u(p.pad[3])
        .u(p.dilation[0])
        .u(p.dilation[1])
        .raw(kind)
}

pub(crate) fn dims4(shape: &[usize], what: &str) -> [usize; 4] {
    assert_eq!(shape.len(), 4, "{what} must be 4-D, got {shape:?}");
    [shape[0], shape[1], shape[2], shape[3]]
}

pub(crate) fn pool2d(ctx: &Ctx, x: &Buf, x_shape: &[usize], p: &Pool2dParams) -> (Buf, [usize; 4]) {
    let xs = dims4(x_shape, "pool2d x");
    let y_shape = [xs[0], xs[1], p.out_hw[0], p.out_hw[1]];
    let n: usize = y_shape.iter().product();
    let y = ctx.alloc(n);
    ctx.dispatch(&FWD, &[], params(xs, p), &[x, &y], groups(n));
    (y, y_shape)
}

pub(crate) fn pool2d_backward(
    ctx: &Ctx,
    dy: &Buf,
    dy_shape: &[usize],
    x: &Buf,
    x_shape: &[usize],
    p: &Pool2dParams,
) -> Buf {
    let xs = dims4(x_shape, "pool2d_backward x");
    assert_eq!(
        dy_shape,
        [xs[0], xs[1], p.out_hw[0], p.out_hw[1]],
        "pool2d_backward dy shape"
    );
    let n: usize = xs.iter().product();
    let dx = ctx.alloc(n);
    ctx.dispatch(&BWD, &[], params(xs, p), &[x, dy, &dx], groups(n));
    dx
}
