//! Twin of `shaders/resize.wgsl`: separable resize (nearest, bilinear, area) and its adjoint.
//!
//! Bindings: 0 params `{planes, in_h, in_w, out_h, out_w, col_off, row_taps, col_taps}`,
//! 1 src (read), 2 tap table (u32, read), 3 dst (write); one invocation per destination element.
//!
//! The per-axis taps come from [`reference::resize_taps`], the single definition of the resize
//! semantics, so the GPU reads exactly the reference's input cells with its weights (rounded to
//! f32). The adjoint runs the same kernel with the tap lists transposed.

use super::context::{Access, Buf, Ctx, Kernel, Params};
use super::elementwise::groups;
use super::pool::dims4;
use crate::runtime::backend::ResizeParams;
use crate::runtime::reference::{self, resize_taps};

const SRC: &str = include_str!("../../../../shaders/resize.wgsl");

const SEPARABLE: Kernel = Kernel {
    family: "resize",
    source: SRC,
    entry: "resize_separable",
    storage: &[Access::Read, Access::Read, Access::ReadWrite],
};

/// Per destination index along one axis: its (source index, weight) taps.
type Taps = Vec<Vec<(usize, f64)>>;

fn axis_taps(n_in: usize, n_out: usize, p: &ResizeParams) -> Taps {
    (0..n_out)
        .map(|o| resize_taps(o, n_in, n_out, p.mode, p.coord))
        .collect()
}

/// The adjoint's taps: for each source index, the (destination, weight) pairs that read it.
fn transpose_taps(taps: &Taps, n_in: usize) -> Taps {
    let mut t = vec![Vec::new(); n_in];
    for (o, list) in taps.iter().enumerate() {
        for &(i, w) in list {
            t[i].push((o, w));
        }
    }
    t
}

/// Packs row and column tap lists into the shader's table layout; returns it with
/// (col_off, row_taps, col_taps).
fn pack(rows: &Taps, cols: &Taps) -> (Vec<u32>, [usize; 3]) {
    let mut words = Vec::new();
    let offsets = |lists: &Taps, words: &mut Vec<u32>| {
        let mut at = 0usize;
        words.push(0);
        for l in lists {
            at += l.len();
            words.push(u32::try_from(at).expect("resize table exceeds u32"));
        }
    };
    offsets(rows, &mut words);
    let col_off = words.len();
    offsets(cols, &mut words);
    let row_taps = words.len();
    let entries = |lists: &Taps, words: &mut Vec<u32>| {
        for &(i, w) in lists.iter().flatten() {
            words.push(u32::try_from(i).expect("resize index exceeds u32"));
            words.push((w as f32).to_bits());
        }
    };
    entries(rows, &mut words);
    let col_taps = words.len();
    entries(cols, &mut words);
    (words, [col_off, row_taps, col_taps])
}

fn run(ctx: &Ctx, src: &Buf, planes: usize, src_hw: [usize; 2], rows: &Taps, cols: &Taps) -> Buf {
    let (out_h, out_w) = (rows.len(), cols.len());
    let n = planes * out_h * out_w;
    let dst = ctx.alloc(n);
    let (words, [col_off, row_taps, col_taps]) = pack(rows, cols);
    let table = ctx.upload_words(&words);
    let params = Params::new()
        .u(planes)
        .u(src_hw[0])
        .u(src_hw[1])
        .u(out_h)
        .u(out_w)
        .u(col_off)
        .u(row_taps)
        .u(col_taps);
    ctx.dispatch(&SEPARABLE, &[], params, &[src, &table, &dst], groups(n));
    dst
}

pub(crate) fn resize(ctx: &Ctx, x: &Buf, x_shape: &[usize], p: &ResizeParams) -> (Buf, [usize; 4]) {
    let [n, c, h, w] = dims4(x_shape, "resize x");
    let [oh, ow] = p.out_hw;
    let y_shape = [n, c, oh, ow];
    if reference::numel(&y_shape) == 0 || h * w == 0 {
        let y = ctx.alloc(reference::numel(&y_shape));
        ctx.clear(&y);
        return (y, y_shape);
    }
    let rows = axis_taps(h, oh, p);
    let cols = axis_taps(w, ow, p);
    (run(ctx, x, n * c, [h, w], &rows, &cols), y_shape)
}

pub(crate) fn resize_backward(
    ctx: &Ctx,
    dy: &Buf,
    dy_shape: &[usize],
    x_shape: [usize; 4],
    p: &ResizeParams,
) -> Buf {
    let [n, c, h, w] = x_shape;
    let [oh, ow] = p.out_hw;
    assert_eq!(dy_shape, [n, c, oh, ow], "resize_backward dy shape");
    if reference::numel(&x_shape) == 0 || oh * ow == 0 {
        let dx = ctx.alloc(reference::numel(&x_shape));
        ctx.clear(&dx);
        return dx;
    }
    let rows = transpose_taps(&axis_taps(h, oh, p), h);
    let cols = transpose_taps(&axis_taps(w, ow, p), w);
    run(ctx, dy, n * c, [oh, ow], &rows, &cols)
}
