//! Twin of `shaders/matmul.wgsl`: batched, broadcasting, optionally transposed GEMM.
//!
//! Bindings: 0 params `{m, n, k, batch, a_rs, a_cs, b_rs, b_cs, tiles_m, tiles_n, total}`,
//! 1 a, 2 b (read), 3 batch offsets (u32 pairs `[a_off, b_off]` per output batch entry, read),
//! 4 c `[batch, m, n]` (write). Each 256-invocation workgroup computes a [`TILE`] x [`TILE`]
//! tile; the linear workgroup index enumerates (batch, row tile, column tile).
//!
//! Batch broadcasting is resolved on the host into the offsets table, so any number of batch
//! axes works without a rank limit.

use super::context::{Access, Buf, Ctx, Kernel, Params};
use super::elementwise::broadcast_strides;
use crate::runtime::reference::matmul_out_shape;

const SRC: &str = include_str!("../../../../shaders/matmul.wgsl");

/// Output tile edge (`BM` = `BN` in the shader).
pub(crate) const TILE: usize = 64;

const MATMUL: Kernel = Kernel {
    family: "matmul",
    source: SRC,
    entry: "matmul",
    storage: &[Access::Read, Access::Read, Access::Read, Access::ReadWrite],
};

/// Element offset of each output batch entry in one operand (0 along its broadcast axes).
fn batch_offsets(op_batch: &[usize], out_batch: &[usize], matrix: usize) -> Vec<usize> {
    let bs = broadcast_strides(op_batch, out_batch);
    let count: usize = out_batch.iter().product();
    (0..count)
        .map(|mut i| {
            let mut off = 0;
            for d in (0..out_batch.len()).rev() {
                off += (i % out_batch[d]) * bs[d];
                i /= out_batch[d];
            }
            off * matrix
        })
        .collect()
}

pub(crate) fn matmul(
    ctx: &Ctx,
    a: &Buf,
    a_shape: &[usize],
    b: &Buf,
    b_shape: &[usize],
    trans_a: bool,
    trans_b: bool,
) -> (Buf, Vec<usize>) {
    let out_shape = matmul_out_shape(a_shape, b_shape, trans_a, trans_b);
    let r = out_shape.len();
    let (m, n) = (out_shape[r - 2], out_shape[r - 1]);
    let (ra, rb) = (a_shape.len(), b_shape.len());
    let k = if trans_a {
        a_shape[ra - 2]
    } else {
        a_shape[ra - 1]
    };
    let out_batch = &out_shape[..r - 2];
    let batch: usize = out_batch.iter().product();
    let c = ctx.alloc(out_shape.iter().product());
    if batch * m * n == 0 {
        return (c, out_shape);
    }
    if k == 0 {
        ctx.clear(&c);
        return (c, out_shape);
    }
    // Batch offsets are in elements of each operand's own matrices.
    let a_mat = a_shape[ra - 2] * a_shape[ra - 1];
    let b_mat = b_shape[rb - 2] * b_shape[rb - 1];
    let a_offs = batch_offsets(&a_shape[..ra - 2], out_batch, a_mat);
    let b_offs = batch_offsets(&b_shape[..rb - 2], out_batch, b_mat);
    let words: Vec<u32> = a_offs
        .iter()
        .zip(&b_offs)
        .flat_map(|(&x, &y)| [x, y])
        .map(|v| u32::try_from(v).expect("matmul operand exceeds the GPU's u32 indexing"))
        .collect();
    let offs = ctx.upload_words(&words);
    let (a_rs, a_cs) = if trans_a { (1, m) } else { (k, 1) };
    let (b_rs, b_cs) = if trans_b { (1, k) } else { (n, 1) };
    let tiles_m = m.div_ceil(TILE);
    let tiles_n = n.div_ceil(TILE);
    let total = tiles_m * tiles_n * batch;
    let params = Params::new()
        .u(m)
        .u(n)
        .u(k)
        .u(batch)
        .u(a_rs)
        .u(a_cs)
        .u(b_rs)
        .u(b_cs)
        .u(tiles_m)
        .u(tiles_n)
        .u(total);
    ctx.dispatch(&MATMUL, &[], params, &[a, b, &offs, &c], total as u64);
    (c, out_shape)
}
