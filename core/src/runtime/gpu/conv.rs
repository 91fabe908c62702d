//! Twin of `shaders/conv.wgsl`: implicit-GEMM convolution and both adjoints.
//!
//! Bindings (0 = params `{n, c, h, w, m, oh, ow, groups, kh, kw, sh, sw, pt, pl, dh, dw,
//! has_bias, tiles_m, tiles_n, total}`, x = the forward input geometry in every entry):
//! - `conv_fwd`: 1 x, 2 w, 3 bias (read; w again when there is none), 4 y (write).
//! - `conv_bwd_input`: 1 dy, 2 w (read), 3 dx (write).
//! - `conv_bwd_weight`: 1 dy, 2 x (read), 3 dw partials `[splits, M, C/g, kh, kw]` (write);
//!   params additionally `{k_chunk, splits}`.
//!
//! Each workgroup (256 invocations, 16 x 16 owning 4 x 4 micro-tiles) computes a [`TILE`] x
//! [`TILE`] output tile of one group's GEMM; the linear workgroup index enumerates (split, group,
//! row tile, column tile).
//!
//! A GEMM with few output tiles and a long reduction would leave most of a large GPU idle: the
//! weight gradient always (M x C/g*kh*kw, reducing over N*oh*ow), and the forward and input
//! gradient of a deep layer at a small batch (ResNet's 512-channel 7x7 convolutions at batch 4
//! have 32 tiles over K = 4608). Every entry is therefore split along the reduction into a
//! shape-determined number of chunks whose partial planes are then summed in a fixed order by the
//! reduce kernel, so the result stays bit-reproducible.

use super::context::{Access, Buf, Ctx, Kernel, Params};
use super::reduce::reduce_axes;
use crate::runtime::backend::Conv2dParams;
use crate::runtime::reference::conv2d_out_hw;

const SRC: &str = include_str!("../../../../shaders/conv.wgsl");

/// Output tile edge (`BM` = `BN` in the shader).
pub(crate) const TILE: usize = 64;
/// Reduction slice staged per step (`BK`); split-K chunks are multiples of it.
const BK: usize = 16;
/// Split-K aims for at least this many workgroups in the weight gradient...
const TARGET_WORKGROUPS: usize = 256;
/// ...but never splits the reduction into chunks shorter than this.
const MIN_CHUNK: usize = 256;

const FWD: Kernel = Kernel {
    family: "conv",
    source: SRC,
    entry: "conv_fwd",
    storage: &[Access::Read, Access::Read, Access::Read, Access::ReadWrite],
};
const BWD_INPUT: Kernel = Kernel {
    family: "conv",
    source: SRC,
    entry: "conv_bwd_input",
    storage: &[Access::Read, Access::Read, Access::ReadWrite],
};
const BWD_WEIGHT: Kernel = Kernel {
    family: "conv",
    source: SRC,
    entry: "conv_bwd_weight",
    storage: &[Access::Read, Access::Read, Access::ReadWrite],
};

/// Params for a GEMM of `rows x cols` per group; returns them with the workgroup count.
fn params(
    x: [usize; 4],
    w: [usize; 4],
    ohw: [usize; 2],
    p: &Conv2dParams,
    has_bias: bool,
    rows: usize,
    cols: usize,
    split: (usize, usize),
) -> (Params, u64) {
    let tiles_m = rows.div_ceil(TILE);
    let tiles_n = cols.div_ceil(TILE);
    let (k_chunk, splits) = split;
    let total = tiles_m * tiles_n * p.groups * splits;
    let pr = Params::new()
        .u(x[0])
        .u(x[1])
        .u(x[2])
        .u(x[3])
        .u(w[0])
        .u(ohw[0])
        .u(ohw[1])
        .u(p.groups)
        .u(w[2])
        .u(w[3])
        .u(p.stride[0])
        .u(p.stride[1])
        .u(p.pad[0])
        .u(p.pad[1])
        .u(p.dilation[0])
        .u(p.dilation[1])
        .raw(u32::from(has_bias))
        .u(tiles_m)
        .u(tiles_n)
        .u(total)
        .u(k_chunk)
        .u(splits);
    (pr, total as u64)
}

/// (chunk length, chunk count) for a reduction of `k` over `tiles` output tiles.
pub(crate) fn split_k(k: usize, tiles: usize) -> (usize, usize) {
    let want = TARGET_WORKGROUPS.div_ceil(tiles.max(1));
    let splits = want.min(k.div_ceil(MIN_CHUNK)).max(1);
    let chunk = k.div_ceil(splits).next_multiple_of(BK).max(BK);
    (chunk, k.div_ceil(chunk).max(1))
}

fn check(x: [usize; 4], w: [usize; 4], p: &Conv2dParams) {
    let g = p.groups;
    assert!(
        g >= 1 && x[1] == w[1] * g && w[0].is_multiple_of(g),
        "conv channels: x {x:?}, w {w:?}, groups {g}"
    );
    assert!(p.stride.iter().all(|&s| s >= 1) && p.dilation.iter().all(|&d| d >= 1));
}

fn dims4(shape: &[usize], what: &str) -> [usize; 4] {
    assert_eq!(shape.len(), 4, "{what} must be 4-D, got {shape:?}");
    [shape[0], shape[1], shape[2], shape[3]]
}

/// Returns y and its shape `[N, M, oh, ow]`.
pub(crate) fn conv2d(
    ctx: &Ctx,
    x: &Buf,
    x_shape: &[usize],
    w: &Buf,
    w_shape: &[usize],
    bias: Option<&Buf>,
    p: &Conv2dParams,
) -> (Buf, [usize; 4]) {
    let xs = dims4(x_shape, "conv2d x");
    let ws = dims4(w_shape, "conv2d w");
    check(xs, ws, p);
    let [oh, ow] = conv2d_out_hw(xs[2], xs[3], ws[2], ws[3], p);
    let y_shape = [xs[0], ws[0], oh, ow];
    let rows = ws[0] / p.groups;
    let cols = xs[0] * oh * ow;
    let split = split_k(ws[1] * ws[2] * ws[3], tiles(rows, cols, p.groups));
    let (pr, groups) = params(xs, ws, [oh, ow], p, bias.is_some(), rows, cols, split);
    let y = split_output(ctx, split.1, y_shape.iter().product(), |out| {
        ctx.dispatch(&FWD, &[], pr, &[x, w, bias.unwrap_or(w), out], groups)
    });
    (y, y_shape)
}

/// Output tiles of a per-group GEMM of `rows x cols` over `groups` groups.
fn tiles(rows: usize, cols: usize, groups: usize) -> usize {
    rows.div_ceil(TILE) * cols.div_ceil(TILE) * groups
}

/// Runs `dispatch` into one plane of `len`, or into `splits` partial planes then summed in a
/// fixed order (bit-reproducible).
fn split_output(ctx: &Ctx, splits: usize, len: usize, dispatch: impl FnOnce(&Buf)) -> Buf {
    let out = ctx.alloc(splits * len);
    dispatch(&out);
    if splits == 1 {
        return out;
    }
    reduce_axes(ctx, &out, &[splits, len], &[true, false], 1.0)
}

pub(crate) fn conv2d_backward_input(
    ctx: &Ctx,
    dy: &Buf,
    dy_shape: &[usize],
    w: &Buf,
    w_shape: &[usize],
    p: &Conv2dParams,
    x_shape: [usize; 4],
) -> Buf {
    let ws = dims4(w_shape, "conv2d_backward_input w");
    check(x_shape, ws, p);
    let [oh, ow] = conv2d_out_hw(x_shape[2], x_shape[3], ws[2], ws[3], p);
    assert_eq!(
        dy_shape,
        [x_shape[0], ws[0], oh, ow],
        "conv2d_backward_input dy shape"
    );
    let rows = x_shape[1] / p.groups;
    let cols = x_shape[0] * x_shape[2] * x_shape[3];
    let split = split_k(
        ws[0] / p.groups * ws[2] * ws[3],
        tiles(rows, cols, p.groups),
    );
    let (pr, groups) = params(x_shape, ws, [oh, ow], p, false, rows, cols, split);
    split_output(ctx, split.1, x_shape.iter().product(), |out| {
        ctx.dispatch(&BWD_INPUT, &[], pr, &[dy, w, out], groups)
    })
}

pub(crate) fn conv2d_backward_weight(
    ctx: &Ctx,
    dy: &Buf,
    dy_shape: &[usize],
    x: &Buf,
    x_shape: &[usize],
    p: &Conv2dParams,
    w_shape: [usize; 4],
) -> Buf {
    let xs = dims4(x_shape, "conv2d_backward_weight x");
    check(xs, w_shape, p);
    let [oh, ow] = conv2d_out_hw(xs[2], xs[3], w_shape[2], w_shape[3], p);
    assert_eq!(
        dy_shape,
        [xs[0], w_shape[0], oh, ow],
        "conv2d_backward_weight dy shape"
    );
    let rows = w_shape[0] / p.groups;
    let cols = w_shape[1] * w_shape[2] * w_shape[3];
    let split = split_k(xs[0] * oh * ow, tiles(rows, cols, p.groups));
    let (pr, groups) = params(xs, w_shape, [oh, ow], p, false, rows, cols, split);
    split_output(ctx, split.1, w_shape.iter().product(), |out| {
        ctx.dispatch(&BWD_WEIGHT, &[], pr, &[dy, x, out], groups)
    })
}
