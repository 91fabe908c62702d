//! The direct convolution with output channels in the vector lanes (AVX-512): for the narrow
//! layers (16 or 32 output channels per group) of the small CNNs. With AVX2 alone, the pooled
//! product and the copy-out (the small CNNs' first convolution, whose one input channel keeps
//! it off the Winograd path), the GEMM, and the strided product with its 3x3 pooling (ResNet's
//! stem and downsampling convolutions).
//!
//! Why: the panel kernel ([`super::sgemm`]) puts output channels in rows of six and output
//! positions in registers of sixteen, so the demo CNN's second convolution (32 channels, 14 x
//! 14) computed 36 rows for 32 and 224 columns for the 209 of its wide plane: 1.29 products per
//! useful one. Here a block is `R` output positions by one or two registers of channels: each
//! reduction step loads the step's weights for all the channels (one or two registers, packed
//! once per layer) and broadcasts `R` consecutive input values, read in place from the padded
//! plane (`offs` as in `conv::Direct`). 16 and 32 channels fill their registers exactly, and the
//! positions waste at most `R - 1` per plane.
//!
//! The product comes out position-major (`y[p * ld + channel]`). The copy-out transposes it,
//! sixteen positions by sixteen channels at a time, into the channel planes the executor uses,
//! adding the bias and the ReLU on the way, or taking the 2x2 / stride-2 max pooling of the
//! ReLU first (positions in registers make the pooling a maximum of four loads).
//!
//! Determinism: each output element is reduced in increasing `k` order, in the same reduction
//! blocks as the panel kernels ([`super::sgemm::k_blocks`]; one fused multiply-add per step from
//! zero, the blocks' sums added in order), so the results equal theirs bit for bit.

/// Channels per register.
const W: usize = 16;
/// Positions per block with one register of channels (24 accumulators).
const R1: usize = 24;
/// Positions per block with two registers of channels (24 accumulators).
const R2: usize = 12;
/// Positions per block with three or four registers (24 accumulators at four).
const R3: usize = 8;
const R4: usize = 6;

/// Whether the lane kernel takes a convolution with `mg` output channels per group, `pooled`
/// where its copy-out takes the 2x2 pooling: AVX-512, registers of channels at least 7/8 full
/// (15, 16, 29-32 channels), and one register only where pooled. With one register each
/// broadcast feeds one multiply-add, and the plain copy-out transposes four times the data
/// the pooled one does: the demo CNN's first convolution took 0.67 ms a batch against the
/// panel kernel's 0.42 ms unpooled, and 16 x 288 x 196 products 1.65 against 1.40 ms; pooled,
/// the first convolution is faster here.
///
/// With AVX2 alone, pooled only ([`pooled_product`]'s one-window kernel): the panel kernel
/// computed the small CNNs' 16-channel first convolution in 18 rows and stored the full-size
/// product for a separate pooling, which took 27% of that layer on a Zen 3 core.
pub(super) fn applies(mg: usize, pooled: bool) -> bool {
    #[cfg(test)]
    if NO_LANES.load(std::sync::atomic::Ordering::Relaxed) {
        return false;
    }
    let full = (1..=2 * W).contains(&mg) && 8 * (mg.div_ceil(W) * W - mg) <= mg;
    full && if super::sgemm::avx512() {
        pooled || mg > W
    } else {
        pooled && super::sgemm::available()
    }
}

/// Which kernels a call runs: the best this CPU has, or (for tests on AVX-512 machines) the
/// AVX2 ones.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Isa {
    Best,
    #[cfg_attr(not(test), allow(dead_code))]
    Avx2,
}

impl Isa {
    fn avx512(self) -> bool {
        self == Isa::Best && super::sgemm::avx512()
    }
}

/// The output channels per chunk with which the lane kernel takes a stride-2 convolution with
/// `mg` output channels per group ([`product_at`]), if it does: AVX2 and FMA (or AVX-512), and
/// chunks of four or three full registers of sixteen (64 or 48 channels) dividing `mg`. ResNet's
/// stem and its 3x3 downsampling convolutions (128 to 512 channels): at batch 4 on one AVX-512
/// core, with the caches flushed before each call, the three 3x3 ones took 4.6 / 4.3 / 4.6 ms
/// here against 6.3 / 5.6 / 6.0 ms on phase planes or im2col, and the stem 10.0 ms against 16.6
/// on im2col; at batch 2 on one Zen 3 core (AVX2), in a model, 3.3 / 3.3 / 4.3 against 3.5 /
/// 4.0 / 5.6 ms, and the stem with its pooling 7.3 against 9.4 ms.
pub(super) fn strided_chunk(mg: usize, stride: [usize; 2]) -> Option<usize> {
    #[cfg(test)]
    if NO_LANES.load(std::sync::atomic::Ordering::Relaxed) {
        return None;
    }
    if stride != [2, 2] || mg == 0 || !super::sgemm::available() {
        return None;
    }
    #[cfg(test)]
    if NO_STRIDED_AVX2.load(std::sync::atomic::Ordering::Relaxed) && !super::sgemm::avx512() {
        return None;
    }
    #[cfg(test)]
    if NO_STRIDED.load(std::sync::atomic::Ordering::Relaxed) && mg != 48 && mg != 64 {
        return None;
    }
    [4 * W, 3 * W].into_iter().find(|&c| mg.is_multiple_of(c))
}

/// Test-only switch: stride-2 convolutions off the lane kernel where it would run on AVX2 (back
/// on phase planes or im2col), for timing A/B runs.
#[cfg(test)]
pub(super) static NO_STRIDED_AVX2: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Test-only switch back to the strided lane kernel's old reach (48 or 64 channels, the stem
/// of a ResNet), so timings compare the others' panel-kernel paths with it.
#[cfg(test)]
pub(super) static NO_STRIDED: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Whether [`gemm`] runs: AVX2 and FMA, or AVX-512 (and not switched off by a test).
pub(super) fn applies_gemm() -> bool {
    #[cfg(test)]
    if NO_LANES.load(std::sync::atomic::Ordering::Relaxed)
        || NO_LANE_GEMM.load(std::sync::atomic::Ordering::Relaxed)
    {
        return false;
    }
    super::sgemm::available()
}

/// Whether untransposed products (`a * b`, both by rows) take the lane GEMM (always, outside
/// timing runs).
pub(super) fn nn_applies() -> bool {
    #[cfg(test)]
    if NO_LANE_NN.load(std::sync::atomic::Ordering::Relaxed) {
        return false;
    }
    true
}

/// Test-only switch: untransposed products back on the panel kernel, for timing A/B runs.
#[cfg(test)]
pub(super) static NO_LANE_NN: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Test-only switch off the lane GEMM alone, for timing A/B runs.
#[cfg(test)]
pub(super) static NO_LANE_GEMM: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Test-only switch off the lane kernel, so tests and timings reach the panel kernel too.
#[cfg(test)]
pub(super) static NO_LANES: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Weights `mg x k` packed by reduction step: `data[(t * mv + v) * 16 + l]` is channel
/// `v * 16 + l` at step `t` (zero past `mg`).
pub(super) struct LanePacked {
    data: Vec<f32>,
    mg: usize,
    k: usize,
    mv: usize,
}

impl LanePacked {
    /// Packs `w` (`mg` rows of `k`).
    pub fn new(mg: usize, k: usize, w: &[f32]) -> LanePacked {
        assert!(
            mg <= 4 * W && w.len() >= mg * k,
            "lanes: at most 64 channels, and the weights too short"
        );
        let mv = mg.div_ceil(W).max(1);
        let mut data = vec![0.0f32; k * mv * W];
        for (i, row) in w.chunks_exact(k.max(1)).take(mg).enumerate() {
            for (t, &v) in row.iter().enumerate().take(k) {
                data[t * mv * W + i] = v;
            }
        }
        LanePacked { data, mg, k, mv }
    }

    /// Floats per position in the product (`ld` of [`product`]).
    pub fn ld(&self) -> usize {
        self.mv * W
    }

    /// Positions a product of `npos` computes (whole blocks): the input must hold that many
    /// from each offset, and the output that many rows.
    pub fn padded(&self, npos: usize) -> usize {
        npos.next_multiple_of(self.block())
    }

    /// At four registers, two of the AVX-512 kernels' blocks (`R4`): three of the AVX2
    /// [`product_at`]'s ([`AT_R256`] positions).
    fn block(&self) -> usize {
        [R1, R2, R3, 2 * R4][self.mv - 1]
    }
}

/// `y[p * ld + c] = sum_t w[c][t] * x[offs[t] + p]` for positions `p < a.padded(npos)` and all
/// `ld` lanes (the lanes past `mg` are zero).
///
/// Panics where a read or write would leave its slice, or the CPU lacks AVX-512.
pub(super) fn product(a: &LanePacked, x: &[f32], offs: &[usize], npos: usize, y: &mut [f32]) {
    assert_eq!(offs.len(), a.k, "lanes: one offset per reduction step");
    let np = a.padded(npos);
    if np == 0 {
        return;
    }
    assert!(
        offs.iter()
            .all(|&o| o.checked_add(np - 1).is_some_and(|e| e < x.len()))
            && y.len() >= np * a.ld(),
        "lanes: product out of bounds"
    );
    assert!(super::sgemm::avx512(), "lanes: the CPU lacks AVX-512");
    if a.k == 0 {
        y[..np * a.ld()].fill(0.0);
        return;
    }
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX-512F is present (asserted); the asserts above bound every read (`np`
    // positions from each offset) and write (`np` rows of `ld`), and the packed weights hold
    // `k * ld` floats by construction.
    unsafe {
        x86::product512(a, x, offs, np, y)
    }
}

/// Positions per block of the AVX2 [`product_at`]: four positions by two registers of
/// channels, eight accumulators, which keep Zen 3's two FMA pipes busy (latency 4); with six
/// positions the compiler loaded all six inputs before the products and spilled accumulators
/// to the stack (ResNet-18's first 3x3 / stride-2 layer took 7.3 ms against 3.9 on phase
/// planes).
const AT_R256: usize = 4;

/// Reduction steps per block of [`product_at`], at most: 72 steps of four registers of
/// weights (18 KiB) stay in L1 beside the inputs they meet while every position of a chunk
/// passes them. Measured on ResNet-18's 3x3 / stride-2 layers (batch 4, one core): 3.5 / 3.5 /
/// 4.0 ms at 64 and 72, 3.7-3.8 / 3.8 / 4.6 at 48 and 96, 4.6 / 4.7 / 5.6 at the panel
/// kernels' 128, whose 32 KiB of weights fill L1.
const AT_KC: usize = 72;

/// `y[j * ld + c] = sum_t w[c][t] * x[pos[j] + offs[t]]` for every listed position `j` and all
/// `ld` lanes: a strided convolution's product, each output position `pos[j]` the input offset
/// of its first tap (any layout: rows, stride, samples). Three or four registers of channels
/// (`a.mv >= 3`), `pos.len()` a multiple of the block (`a.padded`; the caller repeats a
/// position to fill the last).
///
/// Blocks of six (or eight) positions by the chunk's channels, each step loading the step's
/// weights and broadcasting one input value per position; all positions pass a reduction
/// block of weights before the next block (the output, position-major, takes the partial sums:
/// a few hundred KiB, in L2). The per-row [`product`] order read every block of weights from L2
/// once per output row, which held ResNet's 3x3 / stride-2 layers at 70-80 GFLOP/s; this runs
/// them at 110-130.
///
/// On AVX2 (eight lanes a register), blocks of [`AT_R256`] positions by sixteen channels, the
/// chunk's channels sixteen at a time inside each position block (the block's inputs stay in
/// L1 between them): one FMA per step from zero, the reduction blocks' sums added in order, so
/// the result equals the AVX-512 kernel's bit for bit.
///
/// Panics where a read or write would leave its slice, the shape is not one above, or the CPU
/// lacks AVX2.
pub(super) fn product_at(a: &LanePacked, x: &[f32], offs: &[usize], pos: &[usize], y: &mut [f32]) {
    product_at_isa(a, x, offs, pos, y, Isa::Best);
}

fn product_at_isa(
    a: &LanePacked,
    x: &[f32],
    offs: &[usize],
    pos: &[usize],
    y: &mut [f32],
    isa: Isa,
) {
    assert_eq!(offs.len(), a.k, "lanes: one offset per reduction step");
    assert!(
        a.mv >= 3 && pos.len().is_multiple_of(a.block()),
        "lanes: product_at takes 3 or 4 registers and whole blocks"
    );
    if pos.is_empty() {
        return;
    }
    let (omax, pmax) = (
        offs.iter().copied().max().unwrap_or(0),
        pos.iter().copied().max().unwrap_or(0),
    );
    assert!(
        omax.checked_add(pmax).is_some_and(|e| e < x.len()) && y.len() >= pos.len() * a.ld(),
        "lanes: product_at out of bounds"
    );
    assert!(super::sgemm::available(), "lanes: the CPU lacks AVX2");
    if a.k == 0 {
        y[..pos.len() * a.ld()].fill(0.0);
        return;
    }
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX-512F (where the first runs) or AVX2 and FMA are present (asserted); every
    // read is `x[pos[j] + offs[t]]`, at most `pmax + omax` (asserted inside `x`), every write
    // one of `pos.len()` rows of `ld` (asserted inside `y`), and the packed weights hold `k *
    // ld` floats by construction.
    unsafe {
        if isa.avx512() {
            x86::product_at512(a, x, offs, pos, y)
        } else {
            x86::product_at256(a, x, offs, pos, y)
        }
    }
}

/// The 3x3 / stride-2 / pad-1 max pooling (ResNet's, after its stem) of position-major
/// product rows (`ld` floats per position, `ow` positions per row): `rows` holds conv rows
/// `first, first + 1, ...` (`first` may be -1: the padding row, never read), of which rows
/// `lo..hi` are read; `out` (rows of `pw` pooled positions) gets pooled rows `py0..py1`. Taps
/// outside `lo..hi` or the row's `ow` columns are padding, skipped. A NaN tap is skipped too
/// (`max(x, m)` returns `m`), as the ReLU the caller applies after would have made it a 0
/// before pooling: with the bias and ReLU applied to the maximum (both monotone), the
/// result is the ReLU's pooling exactly.
///
/// Panics where a read or write would leave its slice, or the CPU lacks AVX2.
#[allow(clippy::too_many_arguments)]
pub(super) fn max3s2_rows(
    ld: usize,
    rows: &[f32],
    ow: usize,
    first: isize,
    lohi: [usize; 2],
    py: [usize; 2],
    pw: usize,
    out: &mut [f32],
) {
    max3s2_rows_isa(ld, rows, ow, first, lohi, py, pw, out, Isa::Best);
}

#[allow(clippy::too_many_arguments)]
fn max3s2_rows_isa(
    ld: usize,
    rows: &[f32],
    ow: usize,
    first: isize,
    [lo, hi]: [usize; 2],
    [py0, py1]: [usize; 2],
    pw: usize,
    out: &mut [f32],
    isa: Isa,
) {
    if py1 <= py0 || pw == 0 {
        return;
    }
    assert!(
        ld.is_multiple_of(W)
            && lo < hi
            && first <= lo as isize
            && (hi as isize - first) as usize * ow * ld <= rows.len()
            && (py1 - py0) * pw * ld <= out.len()
            && 2 * (pw - 1) < ow + 1,
        "lanes: max3s2_rows out of bounds"
    );
    assert!(super::sgemm::available(), "lanes: the CPU lacks AVX2");
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX-512F (where the first runs) or AVX2 and FMA are present (asserted); every
    // row read is in `lo..hi`, inside `rows` (asserted), every column in `0..ow`, and every
    // write one of `(py1 - py0) * pw` positions of `out` (asserted).
    unsafe {
        if isa.avx512() {
            x86::max3s2_rows512(ld, rows, ow, first, [lo, hi], [py0, py1], pw, out)
        } else {
            x86::max3s2_rows256(ld, rows, ow, first, [lo, hi], [py0, py1], pw, out)
        }
    }
}

/// Most pooled outputs per block with one register of channels (28 accumulators), and with two
/// (24).
const G1: usize = 7;
const G2: usize = 3;

/// The 2x2 / stride-2 max pooling of `relu(w * x + bias)` over the `ph x pw` windows of a
/// plane of rows `wp` apart, position-major (`p[(py * pw + px) * ld + c]`): the product of each
/// window row pair is pooled from the registers it is reduced in, so the full-size product is
/// never stored (the small CNNs' first convolution: 784 positions of 16 channels each for 196
/// pooled outputs). Blocks of up to 7 (one register of channels) or 3 (two) windows side by
/// side, the row's last block shorter, so no window is computed twice or past the row.
///
/// The ReLU and pooling are [`copy_out`]'s pooled ones, on the same sums: the results are its
/// results bit for bit.
#[allow(clippy::too_many_arguments)]
pub(super) fn pooled_product(
    a: &LanePacked,
    x: &[f32],
    offs: &[usize],
    wp: usize,
    ph: usize,
    pw: usize,
    bias: Option<&[f32]>,
    p: &mut [f32],
) {
    pooled_product_isa(a, x, offs, wp, ph, pw, bias, p, Isa::Best);
}

#[allow(clippy::too_many_arguments)]
fn pooled_product_isa(
    a: &LanePacked,
    x: &[f32],
    offs: &[usize],
    wp: usize,
    ph: usize,
    pw: usize,
    bias: Option<&[f32]>,
    p: &mut [f32],
    isa: Isa,
) {
    assert_eq!(offs.len(), a.k, "lanes: one offset per reduction step");
    if ph == 0 || pw == 0 {
        return;
    }
    // The last window's bottom-right tap, from each offset.
    let last = (2 * ph - 1) * wp + 2 * pw - 1;
    assert!(
        2 * pw <= wp
            && offs
                .iter()
                .all(|&o| o.checked_add(last).is_some_and(|e| e < x.len()))
            && p.len() >= ph * pw * a.ld()
            && bias.is_none_or(|b| b.len() >= a.mg),
        "lanes: pooled product out of bounds"
    );
    assert!(super::sgemm::available(), "lanes: the CPU lacks AVX2");
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX-512F (where the first runs) or AVX2 and FMA are present (asserted); every
    // read is of a window tap (at most `last` from an offset, asserted inside `x`), every
    // write inside the `ph * pw` rows of `p`.
    unsafe {
        if isa.avx512() {
            x86::pooled_product512(a, x, offs, wp, ph, pw, bias, p)
        } else {
            x86::pooled_product256(a, x, offs, wp, ph, pw, bias, p)
        }
    }
}

/// Rows of `a` per block of [`gemm`], and registers of columns (24 accumulators).
const GR: usize = 6;
const GV: usize = 4;

/// `c (m x n) = a (m x k) * bt (k x n)`, all row-major and contiguous, with the columns of `c`
/// in the lanes: each step loads four registers of a row of `bt` (64 columns) and broadcasts
/// the step's element of six rows of `a`, read in place. For a Linear layer over a batch
/// (`bt` its transposed weights, kept): the panel kernel packed `a` per call (the demo CNN's
/// 64 x 1568 activations: 3% of its forward) and computed 66 rows for 64.
///
/// The reduction is in the panel kernels' blocks and order: the same results bit for bit.
///
/// Panics where a view is too short or the CPU lacks AVX-512.
pub(super) fn gemm(m: usize, n: usize, k: usize, a: &[f32], bt: &[f32], c: &mut [f32]) {
    gemm_isa(m, n, k, a, bt, c, Isa::Best);
}

/// [`gemm`] on the kernels `isa` names. With AVX2 alone: six rows by two registers (16
/// columns), the panel kernel's block, without its per-call packing of `a` (the demo CNN's
/// Linear layer on a Zen 3 core: 11% of the layer) or its sixth row past 64.
fn gemm_isa(m: usize, n: usize, k: usize, a: &[f32], bt: &[f32], c: &mut [f32], isa: Isa) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        a.len() >= m * k && bt.len() >= k * n && c.len() >= m * n,
        "lanes: gemm operands too short"
    );
    assert!(super::sgemm::available(), "lanes: the CPU lacks AVX2");
    if k == 0 {
        c[..m * n].fill(0.0);
        return;
    }
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX-512F (where the first runs) or AVX2 and FMA are present (asserted), and the
    // lengths asserted above bound every access: rows `< m` of `a` and `c`, rows `< k` of
    // `bt`, columns `< n` (masked).
    unsafe {
        if isa.avx512() {
            x86::gemm512(m, n, k, a, bt, c)
        } else {
            x86::gemm256(m, n, k, a, bt, c)
        }
    }
}

/// Rows of the planes of one (sample, group) block from the position-major product `y` (rows
/// of `ld` = 16 `mv`, position `oy * wp + ox` for output `(oy, ox)`, `oh` rows): `out[c *
/// stride + oy * ow + ox] = act(y + bias[c])`, where `act` is a ReLU or nothing.
///
/// The ReLU is the copy-out's (`conv::copy_plane_avx512`): NaN to 0, the sign of a zero kept.
#[allow(clippy::too_many_arguments)]
pub(super) fn copy_out(
    a: &LanePacked,
    y: &[f32],
    wp: usize,
    oh: usize,
    ow: usize,
    stride: usize,
    bias: Option<&[f32]>,
    relu: bool,
    out: &mut [f32],
) {
    copy_out_isa(a, y, wp, oh, ow, stride, bias, relu, out, Isa::Best);
}

#[allow(clippy::too_many_arguments)]
fn copy_out_isa(
    a: &LanePacked,
    y: &[f32],
    wp: usize,
    oh: usize,
    ow: usize,
    stride: usize,
    bias: Option<&[f32]>,
    relu: bool,
    out: &mut [f32],
    isa: Isa,
) {
    let plane = oh * ow;
    if plane == 0 || a.mg == 0 {
        return;
    }
    // The last position read.
    let last = (oh - 1) * wp + ow - 1;
    assert!(
        ow <= wp
            && (last + 1) * a.ld() <= y.len()
            && plane <= stride
            && out.len() >= (a.mg - 1) * stride + plane
            && bias.is_none_or(|b| b.len() >= a.mg),
        "lanes: copy-out out of bounds"
    );
    assert!(super::sgemm::available(), "lanes: the CPU lacks AVX2");
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX-512F (where the first runs) or AVX2 and FMA are present (asserted); every
    // position read is at most `last` (asserted inside `y`), every write is inside one of the
    // `mg` planes.
    unsafe {
        if isa.avx512() {
            x86::copy_out512(a, y, wp, ow, plane, stride, bias, relu, out)
        } else {
            x86::copy_out256(a, y, wp, ow, plane, stride, bias, relu, out)
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{AT_R256, G1, G2, GR, GV, LanePacked, R1, R2, R3, R4, W};
    use std::arch::x86_64::*;

    /// # Safety
    /// AVX-512F; the bounds [`super::product`] asserts, with `np` a multiple of the block.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn product512(
        a: &LanePacked,
        x: &[f32],
        offs: &[usize],
        np: usize,
        y: &mut [f32],
    ) {
        let (xp, yp, wp) = (x.as_ptr(), y.as_mut_ptr(), a.data.as_ptr());
        let ld = a.ld();
        for (t0, kc) in super::super::sgemm::k_blocks(a.k) {
            let offs = &offs[t0..t0 + kc];
            let w = wp.wrapping_add(t0 * ld);
            macro_rules! run {
                ($r:expr, $mv:literal) => {
                    for p0 in (0..np).step_by($r) {
                        // SAFETY: block `p0` reads positions `p0 .. p0 + R` from each offset
                        // and writes rows `p0 .. p0 + R` of `y`, all `< np` (the caller's
                        // bounds); the weights of steps `t0 .. t0 + kc` are inside the packed
                        // data.
                        unsafe { block::<$r, $mv>(w, xp.add(p0), offs, yp.add(p0 * ld), t0 > 0) };
                    }
                };
            }
            match a.mv {
                1 => run!(R1, 1),
                2 => run!(R2, 2),
                3 => run!(R3, 3),
                _ => run!(R4, 4),
            }
        }
    }

    /// # Safety
    /// AVX-512F; the bounds [`super::product_at`] asserts (`pos.len()` a multiple of the
    /// block, `a.mv` 3 or 4).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn product_at512(
        a: &LanePacked,
        x: &[f32],
        offs: &[usize],
        pos: &[usize],
        y: &mut [f32],
    ) {
        let xp = x.as_ptr();
        // SAFETY (both): each block reads `x[p[r] + offs[i]]` and writes its `R` rows of `y`,
        // inside both (the caller's bounds); the weights of the reduction block's steps are
        // inside the packed data.
        unsafe {
            match a.mv {
                3 => at_blocks::<R3>(a, offs, pos, y, |w, p, offs, yr, acc| {
                    block_at::<R3, 3>(w, xp, p, offs, yr, acc)
                }),
                _ => at_blocks::<R4>(a, offs, pos, y, |w, p, offs, yr, acc| {
                    block_at::<R4, 4>(w, xp, p, offs, yr, acc)
                }),
            }
        }
    }

    /// The loops of both `product_at` kernels: `block(w, p, offs, y, accumulate)` for each
    /// reduction block (`offs` its steps' offsets, `w` their packed weights) and each `R`
    /// positions `p` (`y` their first row), all positions passing a block of weights before
    /// the next block.
    ///
    /// # Safety
    /// `pos.len()` a multiple of `R`, `y` holding `pos.len()` rows of `a.ld()`.
    #[inline(always)]
    unsafe fn at_blocks<const R: usize>(
        a: &LanePacked,
        offs: &[usize],
        pos: &[usize],
        y: &mut [f32],
        mut block: impl FnMut(*const f32, &[usize; R], &[usize], *mut f32, bool),
    ) {
        let (yp, wp, ld) = (y.as_mut_ptr(), a.data.as_ptr(), a.ld());
        for (t0, kc) in super::super::sgemm::balanced_blocks(a.k, super::AT_KC) {
            let offs = &offs[t0..t0 + kc];
            let w = wp.wrapping_add(t0 * ld);
            for (j, p) in pos.chunks_exact(R).enumerate() {
                let p: &[usize; R] = p.try_into().expect("whole blocks");
                block(w, p, offs, yp.wrapping_add(j * R * ld), t0 > 0);
            }
        }
    }

    /// One `max3s2_rows` kernel: [`max3s2_windows`] on one instruction set's registers.
    macro_rules! max3s2_kernel {
        ($(#[$doc:meta])* $name:ident, $feature:literal, $lanes:expr,
         $set1:ident, $load:ident, $max:ident, $store:ident) => {
            $(#[$doc])*
            #[target_feature(enable = $feature)]
            #[allow(clippy::too_many_arguments)]
            pub(super) unsafe fn $name(
                ld: usize,
                rows: &[f32],
                ow: usize,
                first: isize,
                lohi: [usize; 2],
                py: [usize; 2],
                pw: usize,
                out: &mut [f32],
            ) {
                let ninf = $set1(f32::NEG_INFINITY);
                // SAFETY: the caller's bounds; each load and store is one of
                // `max3s2_windows`'s.
                unsafe {
                    max3s2_windows(
                        (ld, rows, ow, first, lohi, py, pw, out),
                        $lanes,
                        ninf,
                        |p| $load(p),
                        |x, m| $max(x, m),
                        |p, m| $store(p, m),
                    )
                }
            }
        };
    }

    max3s2_kernel!(
        /// # Safety
        /// AVX-512F and the bounds [`super::max3s2_rows`] asserts.
        max3s2_rows512, "avx512f", W,
        _mm512_set1_ps, _mm512_loadu_ps, _mm512_max_ps, _mm512_storeu_ps
    );

    max3s2_kernel!(
        /// [`super::max3s2_rows`] on AVX2.
        ///
        /// # Safety
        /// AVX2 and the bounds `max3s2_rows` asserts.
        max3s2_rows256, "avx2,fma", 8,
        _mm256_set1_ps, _mm256_loadu_ps, _mm256_max_ps, _mm256_storeu_ps
    );

    /// The loops of both `max3s2_rows` kernels, over registers of `lanes` channels: each
    /// pooled position's window of conv rows `2 py - 1 ..= 2 py + 1` inside `lo..hi` and
    /// columns `2 px - 1 ..= 2 px + 1` inside `0..ow`. `max(x, m)` returns `m` for a NaN `x`
    /// (MAXPS does), so NaN taps are skipped.
    ///
    /// # Safety
    /// The bounds `max3s2_rows` asserts; `lanes` divides `ld`.
    #[inline(always)]
    #[allow(clippy::type_complexity)]
    unsafe fn max3s2_windows<V: Copy>(
        (ld, rows, ow, first, [lo, hi], [py0, py1], pw, out): (
            usize,
            &[f32],
            usize,
            isize,
            [usize; 2],
            [usize; 2],
            usize,
            &mut [f32],
        ),
        lanes: usize,
        ninf: V,
        load: impl Fn(*const f32) -> V,
        max: impl Fn(V, V) -> V,
        store: impl Fn(*mut f32, V),
    ) {
        let (rp, op) = (rows.as_ptr(), out.as_mut_ptr());
        for py in py0..py1 {
            let r0 = (2 * py).saturating_sub(1).max(lo);
            let r1 = (2 * py + 2).min(hi);
            for px in 0..pw {
                let c0 = (2 * px).saturating_sub(1);
                let c1 = (2 * px + 2).min(ow);
                let o = op.wrapping_add(((py - py0) * pw + px) * ld);
                for v in (0..ld).step_by(lanes) {
                    let mut m = ninf;
                    for r in r0..r1 {
                        let row = (r as isize - first) as usize * ow;
                        for c in c0..c1 {
                            // Row `r` in `lo..hi` and column `c < ow`: inside `rows` (the
                            // caller's bounds).
                            m = max(load(rp.wrapping_add((row + c) * ld + v)), m);
                        }
                    }
                    // Pooled position `(py, px)` of the `py0..py1` rows: inside `out`.
                    store(o.wrapping_add(v), m);
                }
            }
        }
    }

    /// [`super::product_at`] on AVX2: see there.
    ///
    /// # Safety
    /// AVX2 and FMA; the bounds `product_at` asserts (`pos.len()` a multiple of the block,
    /// `a.mv` 3 or 4).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn product_at256(
        a: &LanePacked,
        x: &[f32],
        offs: &[usize],
        pos: &[usize],
        y: &mut [f32],
    ) {
        let (xp, ld) = (x.as_ptr(), a.ld());
        // SAFETY: `a.block()` (12 or 8 positions) is a multiple of AT_R256. Each block reads
        // `x[p[r] + offs[i]]` and writes channels `c0 .. c0 + 16` of its rows of `y`, inside
        // both (the caller's bounds); the weights of the reduction block's steps are inside
        // the packed data (`c0 + 16 <= ld`).
        unsafe {
            at_blocks::<AT_R256>(a, offs, pos, y, |w, p, offs, yr, acc| {
                for c0 in (0..ld).step_by(2 * 8) {
                    block_at256::<AT_R256>(w.add(c0), ld, xp, p, offs, yr.add(c0), acc);
                }
            })
        }
    }

    /// `y[r * ld + c] (+)= sum_i w[i * ld + c] * x[pos[r] + offs[i]]` for `c < 16`.
    ///
    /// # Safety
    /// AVX2 and FMA; `x + pos[r] + offs[i]` readable, `w` for `(offs.len() - 1) * ld + 16`
    /// floats, `y` for `(R - 1) * ld + 16`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn block_at256<const R: usize>(
        w: *const f32,
        ld: usize,
        x: *const f32,
        pos: &[usize; R],
        offs: &[usize],
        y: *mut f32,
        accumulate: bool,
    ) {
        // SAFETY: the caller's bounds.
        unsafe {
            let xr: [*const f32; R] = std::array::from_fn(|r| x.add(pos[r]));
            let mut acc = [[_mm256_setzero_ps(); 2]; R];
            for (i, &o) in offs.iter().enumerate() {
                let w0 = _mm256_loadu_ps(w.add(i * ld));
                let w1 = _mm256_loadu_ps(w.add(i * ld + 8));
                for (r, accr) in acc.iter_mut().enumerate() {
                    let b = _mm256_set1_ps(*xr[r].add(o));
                    accr[0] = _mm256_fmadd_ps(b, w0, accr[0]);
                    accr[1] = _mm256_fmadd_ps(b, w1, accr[1]);
                }
            }
            for (r, accr) in acc.iter().enumerate() {
                for (v, &s) in accr.iter().enumerate() {
                    let d = y.add(r * ld + v * 8);
                    let val = if accumulate {
                        _mm256_add_ps(_mm256_loadu_ps(d), s)
                    } else {
                        s
                    };
                    _mm256_storeu_ps(d, val);
                }
            }
        }
    }

    /// # Safety
    /// AVX-512F and the bounds [`super::gemm`] asserts.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn gemm512(
        m: usize,
        n: usize,
        k: usize,
        a: &[f32],
        bt: &[f32],
        c: &mut [f32],
    ) {
        let (ap, bp, cp) = (a.as_ptr(), bt.as_ptr(), c.as_mut_ptr());
        for (t0, kc) in super::super::sgemm::k_blocks(k) {
            for j0 in (0..n).step_by(GV * W) {
                let mut masks = [0 as __mmask16; GV];
                for (v, mk) in masks.iter_mut().enumerate() {
                    let cols = n.saturating_sub(j0 + v * W).min(W);
                    *mk = ((1u32 << cols) - 1) as __mmask16;
                }
                for i0 in (0..m).step_by(GR) {
                    let g = GemmArgs {
                        a: ap.wrapping_add(i0 * k + t0),
                        lda: k,
                        b: bp.wrapping_add(t0 * n + j0),
                        ldb: n,
                        kc,
                        c: cp.wrapping_add(i0 * n + j0),
                        ldc: n,
                        accumulate: t0 > 0,
                        masks,
                    };
                    // SAFETY: rows `i0 ..` (at most `m`) of `a` and `c`, steps `t0 .. t0 + kc`
                    // of `bt`, the columns the masks enable (`< n`): inside the operands.
                    unsafe {
                        match m - i0 {
                            1 => gemm_block::<1>(&g),
                            2 => gemm_block::<2>(&g),
                            3 => gemm_block::<3>(&g),
                            4 => gemm_block::<4>(&g),
                            5 => gemm_block::<5>(&g),
                            _ => gemm_block::<GR>(&g),
                        }
                    }
                }
            }
        }
    }

    /// The operands of one [`gemm_block`].
    struct GemmArgs {
        a: *const f32,
        lda: usize,
        b: *const f32,
        ldb: usize,
        kc: usize,
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
        masks: [__mmask16; GV],
    }

    /// `R` rows by four registers of columns: `c[r][j] (+)= sum_t a[r][t] * b[t][j]` over `kc`
    /// steps, the columns of `masks` only (masked-off lanes are neither read nor written).
    ///
    /// # Safety
    /// AVX-512F; `R` rows of `kc` at `a` (stride `lda`), `kc` rows at `b` (stride `ldb`) and `R`
    /// rows at `c` (stride `ldc`) for the enabled columns.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn gemm_block<const R: usize>(g: &GemmArgs) {
        let z = _mm512_setzero_ps();
        // SAFETY: the caller's bounds.
        unsafe {
            let mut acc = [[z; GV]; R];
            for t in 0..g.kc {
                let brow = g.b.add(t * g.ldb);
                let mut bv = [z; GV];
                for (v, r) in bv.iter_mut().enumerate() {
                    *r = _mm512_maskz_loadu_ps(g.masks[v], brow.add(v * W));
                }
                for (r, accr) in acc.iter_mut().enumerate() {
                    let x = _mm512_set1_ps(*g.a.add(r * g.lda + t));
                    for v in 0..GV {
                        accr[v] = _mm512_fmadd_ps(x, bv[v], accr[v]);
                    }
                }
            }
            for (r, accr) in acc.iter().enumerate() {
                for (v, &sv) in accr.iter().enumerate() {
                    let d = g.c.add(r * g.ldc + v * W);
                    let val = if g.accumulate {
                        _mm512_add_ps(_mm512_maskz_loadu_ps(g.masks[v], d), sv)
                    } else {
                        sv
                    };
                    _mm512_mask_storeu_ps(d, g.masks[v], val);
                }
            }
        }
    }

    /// # Safety
    /// AVX-512F and the bounds [`super::pooled_product`] asserts.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn pooled_product512(
        a: &LanePacked,
        x: &[f32],
        offs: &[usize],
        wp: usize,
        ph: usize,
        pw: usize,
        bias: Option<&[f32]>,
        p: &mut [f32],
    ) {
        let ld = a.ld();
        let mut bv = [_mm512_setzero_ps(); 2];
        if let Some(b) = bias {
            for (v, r) in bv.iter_mut().enumerate().take(a.mv) {
                let nch = W.min(a.mg - v * W);
                // SAFETY: the bias holds `mg` values (asserted); lanes past them are not read.
                *r = unsafe {
                    _mm512_maskz_loadu_ps(((1u32 << nch) - 1) as __mmask16, b.as_ptr().add(v * W))
                };
            }
        }
        let blocks: Vec<(usize, usize)> = super::super::sgemm::k_blocks(a.k).collect();
        // The partial sums of the earlier reduction blocks (at most 28 positions of 16).
        let mut tmp = [0.0f32; 4 * G1 * W];
        let g_max = if a.mv == 1 { G1 } else { G2 };
        let (xp, pp, wt) = (x.as_ptr(), p.as_mut_ptr(), a.data.as_ptr());
        let bias_on = bias.is_some();
        for py in 0..ph {
            let mut px = 0;
            while px < pw {
                let g = g_max.min(pw - px);
                // SAFETY: the block's taps are windows `px .. px + g` of pooled row `py` (inside
                // `x` from every offset, asserted by the caller); it writes rows `py * pw + px
                // ..` + g of `p`; the partial sums fit `tmp` (4 g <= 28 positions of `ld`
                // floats, 4 g ld <= 448).
                unsafe {
                    let xb = xp.add(2 * py * wp + 2 * px);
                    let pb = pp.add((py * pw + px) * ld);
                    let args = PoolArgs {
                        w: wt,
                        x: xb,
                        wp,
                        offs,
                        blocks: &blocks,
                        bias: bv,
                        bias_on,
                        tmp: tmp.as_mut_ptr(),
                        p: pb,
                    };
                    match (a.mv, g) {
                        (1, 7) => pool_block::<28, 1>(&args),
                        (1, 6) => pool_block::<24, 1>(&args),
                        (1, 5) => pool_block::<20, 1>(&args),
                        (1, 4) => pool_block::<16, 1>(&args),
                        (1, 3) => pool_block::<12, 1>(&args),
                        (1, 2) => pool_block::<8, 1>(&args),
                        (1, _) => pool_block::<4, 1>(&args),
                        (_, 3) => pool_block::<12, 2>(&args),
                        (_, 2) => pool_block::<8, 2>(&args),
                        (_, _) => pool_block::<4, 2>(&args),
                    }
                }
                px += g;
            }
        }
    }

    /// The operands of one [`pool_block`].
    struct PoolArgs<'a> {
        /// Packed weights.
        w: *const f32,
        /// The block's first window's top-left tap (before the offsets).
        x: *const f32,
        wp: usize,
        offs: &'a [usize],
        blocks: &'a [(usize, usize)],
        bias: [__m512; 2],
        bias_on: bool,
        tmp: *mut f32,
        /// The block's first pooled output.
        p: *mut f32,
    }

    /// `R / 4` windows side by side: positions `0 .. R/2` of the top row and `R/2 .. R` of the
    /// bottom row reduced over each block of steps (the blocks' sums added in order through
    /// `tmp`, as the panel kernels add theirs), then pooled from the registers:
    /// `p[j * 16 MV + c] = max over the window's four taps of max(sum + bias, 0)`.
    ///
    /// # Safety
    /// AVX-512F; `x + offs[t] + {0 .. R/2} + {0, wp}` readable, `w` for all the steps' weights,
    /// `tmp` for `R * 16 MV` floats, `p` writable for `R / 4` rows of `16 MV`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn pool_block<const R: usize, const MV: usize>(a: &PoolArgs<'_>) {
        let h = R / 2;
        let z = _mm512_setzero_ps();
        let nb = a.blocks.len();
        // SAFETY: the caller's bounds.
        unsafe {
            let mut acc = [[z; MV]; R];
            for (bi, &(t0, kc)) in a.blocks.iter().enumerate() {
                acc = [[z; MV]; R];
                for t in t0..t0 + kc {
                    let mut wv = [z; MV];
                    for (v, r) in wv.iter_mut().enumerate() {
                        *r = _mm512_loadu_ps(a.w.add((t * MV + v) * W));
                    }
                    let xr = a.x.add(a.offs[t]);
                    for (r, accr) in acc.iter_mut().enumerate() {
                        let at = if r < h { r } else { a.wp + r - h };
                        let b = _mm512_set1_ps(*xr.add(at));
                        for v in 0..MV {
                            accr[v] = _mm512_fmadd_ps(b, wv[v], accr[v]);
                        }
                    }
                }
                if bi + 1 < nb {
                    for (r, accr) in acc.iter().enumerate() {
                        for (v, &sv) in accr.iter().enumerate() {
                            let d = a.tmp.add((r * MV + v) * W);
                            let val = if bi > 0 {
                                _mm512_add_ps(_mm512_loadu_ps(d), sv)
                            } else {
                                sv
                            };
                            _mm512_storeu_ps(d, val);
                        }
                    }
                } else if bi > 0 {
                    for (r, accr) in acc.iter_mut().enumerate() {
                        for (v, sv) in accr.iter_mut().enumerate() {
                            *sv = _mm512_add_ps(_mm512_loadu_ps(a.tmp.add((r * MV + v) * W)), *sv);
                        }
                    }
                }
            }
            for j in 0..R / 4 {
                for v in 0..MV {
                    let f = |s: __m512| {
                        let s = if a.bias_on {
                            _mm512_add_ps(s, a.bias[v])
                        } else {
                            s
                        };
                        _mm512_max_ps(s, z)
                    };
                    let m = _mm512_max_ps(
                        _mm512_max_ps(f(acc[2 * j][v]), f(acc[2 * j + 1][v])),
                        _mm512_max_ps(f(acc[h + 2 * j][v]), f(acc[h + 2 * j + 1][v])),
                    );
                    _mm512_storeu_ps(a.p.add((j * MV + v) * W), m);
                }
            }
        }
    }

    /// `R` positions by `MV` registers of channels, for the reduction steps of `offs`:
    /// `y[r * 16 MV + c] (+)= sum_i w[i * 16 MV + c] * x[offs[i] + r]`.
    ///
    /// # Safety
    /// AVX-512F; `x + offs[i]` readable for `R` floats, `w` for `offs.len() * 16 MV`, `y` for
    /// `R * 16 MV`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn block<const R: usize, const MV: usize>(
        w: *const f32,
        x: *const f32,
        offs: &[usize],
        y: *mut f32,
        accumulate: bool,
    ) {
        let pos: [usize; R] = std::array::from_fn(|r| r);
        // SAFETY: the caller's bounds are `block_at`'s for these positions.
        unsafe { block_at::<R, MV>(w, x, &pos, offs, y, accumulate) }
    }

    /// `y[r * 16 MV + c] (+)= sum_i w[i * 16 MV + c] * x[pos[r] + offs[i]]`.
    ///
    /// # Safety
    /// AVX-512F; `x + pos[r] + offs[i]` readable, `w` for `offs.len() * 16 MV` floats, `y` for
    /// `R * 16 MV`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn block_at<const R: usize, const MV: usize>(
        w: *const f32,
        x: *const f32,
        pos: &[usize; R],
        offs: &[usize],
        y: *mut f32,
        accumulate: bool,
    ) {
        // SAFETY: the caller's bounds.
        unsafe {
            let xr: [*const f32; R] = std::array::from_fn(|r| x.add(pos[r]));
            let mut acc = [[_mm512_setzero_ps(); MV]; R];
            for (i, &o) in offs.iter().enumerate() {
                let mut wv = [_mm512_setzero_ps(); MV];
                for (v, r) in wv.iter_mut().enumerate() {
                    *r = _mm512_loadu_ps(w.add((i * MV + v) * W));
                }
                for (r, accr) in acc.iter_mut().enumerate() {
                    let b = _mm512_set1_ps(*xr[r].add(o));
                    for v in 0..MV {
                        accr[v] = _mm512_fmadd_ps(b, wv[v], accr[v]);
                    }
                }
            }
            for (r, accr) in acc.iter().enumerate() {
                for (v, &s) in accr.iter().enumerate() {
                    let d = y.add((r * MV + v) * W);
                    let val = if accumulate {
                        _mm512_add_ps(_mm512_loadu_ps(d), s)
                    } else {
                        s
                    };
                    _mm512_storeu_ps(d, val);
                }
            }
        }
    }

    /// `r[j][i]` becomes `r[i][j]`: unpacks of floats and of pairs transpose each 4 x 4 block
    /// of 128-bit lanes, two rounds of lane shuffles move the blocks.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) fn transpose16(r: &mut [__m512; 16]) {
        let mut t = [_mm512_setzero_ps(); 16];
        for g in 0..4 {
            let i = 4 * g;
            t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
            t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
            t[i + 2] = _mm512_unpacklo_ps(r[i + 2], r[i + 3]);
            t[i + 3] = _mm512_unpackhi_ps(r[i + 2], r[i + 3]);
        }
        // u[4g + c], 128-bit lane l: rows 4g .. 4g+4 of column 4l + c.
        let mut u = [_mm512_setzero_ps(); 16];
        for g in 0..4 {
            let i = 4 * g;
            let (a0, a1) = (_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2]));
            let (b0, b1) = (_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3]));
            u[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a0, a1));
            u[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a0, a1));
            u[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b0, b1));
            u[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b0, b1));
        }
        // Output row 4l + c takes lane l of u[4g + c] into its lane g.
        for c in 0..4 {
            let a = _mm512_shuffle_f32x4::<0x88>(u[c], u[4 + c]);
            let b = _mm512_shuffle_f32x4::<0xdd>(u[c], u[4 + c]);
            let a2 = _mm512_shuffle_f32x4::<0x88>(u[8 + c], u[12 + c]);
            let b2 = _mm512_shuffle_f32x4::<0xdd>(u[8 + c], u[12 + c]);
            r[c] = _mm512_shuffle_f32x4::<0x88>(a, a2);
            r[8 + c] = _mm512_shuffle_f32x4::<0xdd>(a, a2);
            r[4 + c] = _mm512_shuffle_f32x4::<0x88>(b, b2);
            r[12 + c] = _mm512_shuffle_f32x4::<0xdd>(b, b2);
        }
    }

    /// See [`super::copy_out`]; `w` and `plane` are the output planes' width and size (of the
    /// rows written).
    ///
    /// # Safety
    /// AVX-512F and the bounds `copy_out` asserts.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn copy_out512(
        a: &LanePacked,
        y: &[f32],
        wp: usize,
        w: usize,
        plane: usize,
        stride: usize,
        bias: Option<&[f32]>,
        relu: bool,
        out: &mut [f32],
    ) {
        // SAFETY (all): the caller's guarantees.
        unsafe {
            match (relu, bias.is_some()) {
                (true, true) => copy_out_t::<true, true>(a, y, wp, w, plane, stride, bias, out),
                (true, false) => copy_out_t::<true, false>(a, y, wp, w, plane, stride, bias, out),
                (false, true) => copy_out_t::<false, true>(a, y, wp, w, plane, stride, bias, out),
                (false, false) => copy_out_t::<false, false>(a, y, wp, w, plane, stride, bias, out),
            }
        }
    }

    /// [`copy_out512`] for one combination of ReLU and bias. Sixteen outputs at a
    /// time: their positions first (the plane's first past its end, so every register is
    /// computed without branches and the stores' masks drop the extras), then
    /// each output's channels as one register, then the transpose into the planes.
    ///
    /// # Safety
    /// As [`copy_out512`]'s.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn copy_out_t<const RELU: bool, const BIAS: bool>(
        a: &LanePacked,
        y: &[f32],
        wp: usize,
        w: usize,
        plane: usize,
        stride: usize,
        bias: Option<&[f32]>,
        out: &mut [f32],
    ) {
        let ld = a.ld();
        let z = _mm512_setzero_ps();
        let (yp, op) = (y.as_ptr(), out.as_mut_ptr());
        // Where output q's (first) tap is, in floats from `y`, for the next sixteen outputs.
        let mut at = [0usize; W];
        for v in 0..a.mv {
            let nch = W.min(a.mg - v * W);
            let cmask = ((1u32 << nch) - 1) as __mmask16;
            let bv = match bias {
                // SAFETY: the bias holds `mg` values (asserted by the caller); lanes past them
                // are not read.
                Some(b) if BIAS => unsafe { _mm512_maskz_loadu_ps(cmask, b.as_ptr().add(v * W)) },
                _ => z,
            };
            let yv = yp.wrapping_add(v * W);
            // The output at float offset `o` (a position times `ld`) with the bias and the
            // copy-out's ReLU, which keeps the sign of a zero.
            let f = |o: usize| {
                // SAFETY: the caller's bounds: every position read is at most `last`.
                let mut s = unsafe { _mm512_loadu_ps(yv.add(o)) };
                if BIAS {
                    s = _mm512_add_ps(s, bv);
                }
                if RELU {
                    let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(s, s);
                    _mm512_mask_blend_ps(nan, _mm512_max_ps(z, s), z)
                } else {
                    s
                }
            };
            let (mut qy, mut qx) = (0, 0);
            let row = wp * ld;
            let mut rowbase = 0;
            for q0 in (0..plane).step_by(W) {
                let n = W.min(plane - q0);
                for (j, o) in at.iter_mut().enumerate() {
                    if j < n {
                        *o = rowbase + qx * ld;
                        qx += 1;
                        if qx == w {
                            (qx, qy) = (0, qy + 1);
                            rowbase = qy * row;
                        }
                    } else {
                        // The first output: inside `y`, and never stored.
                        *o = 0;
                    }
                }
                let mut r = [z; W];
                for (rj, &o) in r.iter_mut().zip(at.iter()) {
                    *rj = f(o);
                }
                transpose16(&mut r);
                let m = ((1u32 << n) - 1) as __mmask16;
                for (c, &rc) in r.iter().enumerate().take(nch) {
                    // SAFETY: plane `v * 16 + c < mg`, positions `q0 .. q0 + n <= plane <=
                    // stride`.
                    unsafe {
                        let d = op.add((v * W + c) * stride + q0);
                        if n == W {
                            _mm512_storeu_ps(d, rc);
                        } else {
                            _mm512_mask_storeu_ps(d, m, rc);
                        }
                    };
                }
            }
        }
    }

    /// [`super::gemm`] on AVX2: blocks of six rows by sixteen columns (two registers), the
    /// reduction in `k_blocks` order; a short last column block read under masks and stored in
    /// part.
    ///
    /// # Safety
    /// AVX2 and FMA, and the bounds `gemm` asserts.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn gemm256(
        m: usize,
        n: usize,
        k: usize,
        a: &[f32],
        bt: &[f32],
        c: &mut [f32],
    ) {
        use super::super::maxpool2::x86::{load16, masks256};
        const R: usize = 6;
        let (ap, bp, cp) = (a.as_ptr(), bt.as_ptr(), c.as_mut_ptr());
        // With more than one block of rows, each reduction block's rows of `bt` are copied
        // first, strip by strip (16 columns each, the strip's rows consecutive), reading `bt`
        // row by row. Why: a Linear layer's transposed weights have rows `n` floats apart (512
        // bytes at 128 outputs); read in place, a strip's 121 rows fell into 8 of L1's 64 sets,
        // and each strip's pass over rows that far apart missed the prefetchers (the small
        // CNN's Linear layer inside its forward, on a Zen 3 core: the kernel's loads of `bt`
        // were 37% of its time).
        let copy = m > R && !super::super::sgemm::no_strip();
        let strips = n.div_ceil(16);
        let kmax = super::super::sgemm::k_blocks(k)
            .map(|b| b.1)
            .max()
            .unwrap_or(0);
        let body = |buf: &mut [f32]| {
            let lead = super::super::sgemm::line_lead(buf.as_ptr());
            let sp = buf.as_mut_ptr().wrapping_add(lead);
            for (t0, kc) in super::super::sgemm::k_blocks(k) {
                if copy {
                    for t in 0..kc {
                        for (si, j0) in (0..n).step_by(16).enumerate() {
                            // SAFETY: row `t0 + t < k` of `bt` holds `min(16, n - j0)` floats
                            // from `j0`; the buffer holds `strips * kmax` rows of 16 after
                            // `lead < 16` (`kc <= kmax`).
                            unsafe {
                                let (x0, x1) = load16(bp.add((t0 + t) * n + j0), (n - j0).min(16));
                                let d = sp.add((si * kc + t) * 16);
                                _mm256_storeu_ps(d, x0);
                                _mm256_storeu_ps(d.add(8), x1);
                            }
                        }
                    }
                }
                for (si, j0) in (0..n).step_by(16).enumerate() {
                    let cols = (n - j0).min(16);
                    let masks = masks256(cols);
                    let (b, ldb) = if copy {
                        (sp.wrapping_add(si * kc * 16).cast_const(), 16)
                    } else {
                        (bp.wrapping_add(t0 * n + j0), n)
                    };
                    for i0 in (0..m).step_by(R) {
                        let g = Gemm256 {
                            a: ap.wrapping_add(i0 * k + t0),
                            lda: k,
                            b,
                            ldb,
                            copied: copy,
                            kc,
                            c: cp.wrapping_add(i0 * n + j0),
                            ldc: n,
                            accumulate: t0 > 0,
                            cols,
                            masks,
                        };
                        // SAFETY: rows `i0 ..` (at most `m`) of `a` and `c`, steps `t0 .. t0 +
                        // kc` of `bt` (or the strip's copy), columns `j0 .. j0 + cols <= n`:
                        // inside the operands.
                        unsafe {
                            match m - i0 {
                                1 => gemm_block256::<1>(&g),
                                2 => gemm_block256::<2>(&g),
                                3 => gemm_block256::<3>(&g),
                                4 => gemm_block256::<4>(&g),
                                5 => gemm_block256::<5>(&g),
                                _ => gemm_block256::<R>(&g),
                            }
                        }
                    }
                }
            }
        };
        if copy {
            super::super::conv::with_scratch(strips * kmax * 16 + 16, body);
        } else {
            body(&mut []);
        }
    }

    /// The operands of one [`gemm_block256`].
    struct Gemm256 {
        a: *const f32,
        lda: usize,
        b: *const f32,
        ldb: usize,
        kc: usize,
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
        /// Whether `b` is the strip copy (whole registers, zeros past `cols`).
        copied: bool,
        /// Columns of the block (at most 16), and their masks.
        cols: usize,
        masks: (__m256i, __m256i),
    }

    /// `R` rows by two registers of columns: `c[r][j] (+)= sum_t a[r][t] * b[t][j]` over `kc`
    /// steps, columns `< cols` only (the others neither read nor written).
    ///
    /// # Safety
    /// AVX2 and FMA; `R` rows of `kc` at `a` (stride `lda`), `kc` rows of `cols` at `b`
    /// (stride `ldb`; of 16 where `copied`) and `R` rows of `cols` at `c` (stride `ldc`).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn gemm_block256<const R: usize>(g: &Gemm256) {
        use super::super::maxpool2::x86::{load16, store_first};
        let z = _mm256_setzero_ps();
        let full = g.cols == 16;
        // SAFETY: the caller's bounds.
        unsafe {
            let mut acc = [[z; 2]; R];
            for t in 0..g.kc {
                let brow = g.b.add(t * g.ldb);
                let (b0, b1) = if full || g.copied {
                    (_mm256_loadu_ps(brow), _mm256_loadu_ps(brow.add(8)))
                } else {
                    (
                        _mm256_maskload_ps(brow, g.masks.0),
                        _mm256_maskload_ps(brow.add(8), g.masks.1),
                    )
                };
                for (r, accr) in acc.iter_mut().enumerate() {
                    let x = _mm256_broadcast_ss(&*g.a.add(r * g.lda + t));
                    accr[0] = _mm256_fmadd_ps(x, b0, accr[0]);
                    accr[1] = _mm256_fmadd_ps(x, b1, accr[1]);
                }
            }
            for (r, accr) in acc.iter().enumerate() {
                let d = g.c.add(r * g.ldc);
                let (mut v0, mut v1) = (accr[0], accr[1]);
                if g.accumulate {
                    let (s0, s1) = load16(d, g.cols);
                    v0 = _mm256_add_ps(s0, v0);
                    v1 = _mm256_add_ps(s1, v1);
                }
                if full {
                    _mm256_storeu_ps(d, v0);
                    _mm256_storeu_ps(d.add(8), v1);
                } else {
                    store_first(d, v0, g.cols.min(8));
                    store_first(d.add(8), v1, g.cols.saturating_sub(8));
                }
            }
        }
    }

    /// The operands of one [`pool_window256`].
    struct Window256<'a> {
        /// Packed weights of the channel group's first lane, at step 0 (step `t` at `t ld`).
        w: *const f32,
        ld: usize,
        /// The window's top-left tap (before the offsets).
        x: *const f32,
        wp: usize,
        offs: &'a [usize],
        blocks: &'a [(usize, usize)],
        bias: [__m256; 2],
        tmp: *mut f32,
        /// The window's pooled output, channels of the group.
        p: *mut f32,
    }

    /// [`super::pooled_product`] on AVX2: one window (four positions) by sixteen channels
    /// (two registers) at a time, eight accumulators, each channel group of `ld` in turn.
    /// Why one window: two registers of weights, four broadcasts and eight multiply-adds per
    /// step keep the two FMA pipes busy with the sixteen registers AVX2 has; two windows
    /// would need sixteen accumulators.
    ///
    /// # Safety
    /// AVX2 and FMA, and the bounds `pooled_product` asserts.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn pooled_product256(
        a: &LanePacked,
        x: &[f32],
        offs: &[usize],
        wp: usize,
        ph: usize,
        pw: usize,
        bias: Option<&[f32]>,
        p: &mut [f32],
    ) {
        use super::super::maxpool2::x86::load16;
        let ld = a.ld();
        let blocks: Vec<(usize, usize)> = super::super::sgemm::k_blocks(a.k).collect();
        // The partial sums of the earlier reduction blocks: four positions of 16 channels.
        let mut tmp = [0.0f32; 4 * W];
        let (xp, pp, wt) = (x.as_ptr(), p.as_mut_ptr(), a.data.as_ptr());
        for v in 0..a.mv {
            let nch = W.min(a.mg - v * W);
            let bias = match bias {
                // SAFETY: the bias holds `mg` values (asserted by the caller); the lanes past
                // them are not read.
                Some(b) => unsafe { load16(b.as_ptr().add(v * W), nch) },
                None => (_mm256_setzero_ps(), _mm256_setzero_ps()),
            };
            for py in 0..ph {
                for px in 0..pw {
                    // SAFETY: the window's taps are inside `x` from every offset and its pooled
                    // output one of the `ph * pw` rows of `p` (the caller's bounds); the
                    // weights of every step of group `v` are inside the packed data.
                    unsafe {
                        pool_window256(&Window256 {
                            w: wt.add(v * W),
                            ld,
                            x: xp.add(2 * py * wp + 2 * px),
                            wp,
                            offs,
                            blocks: &blocks,
                            bias: [bias.0, bias.1],
                            tmp: tmp.as_mut_ptr(),
                            p: pp.add((py * pw + px) * ld + v * W),
                        })
                    };
                }
            }
        }
    }

    /// One window's four positions reduced over each block of steps (the blocks' sums added in
    /// order through `tmp`, as the panel kernels add theirs), then
    /// `p[c] = max over the four of max(sum + bias, 0)` for the group's 16 channels.
    ///
    /// # Safety
    /// AVX2 and FMA; `x + offs[t] + {0, 1, wp, wp + 1}` readable for every step, `w + t ld`
    /// for 16 floats, `tmp` for 64 floats, `p` writable for 16.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn pool_window256(a: &Window256<'_>) {
        let z = _mm256_setzero_ps();
        let taps = [0, 1, a.wp, a.wp + 1];
        let nb = a.blocks.len();
        let op = a.offs.as_ptr();
        // SAFETY: the caller's bounds.
        unsafe {
            let mut acc = [[z; 2]; 4];
            for (bi, &(t0, kc)) in a.blocks.iter().enumerate() {
                acc = [[z; 2]; 4];
                for t in t0..t0 + kc {
                    let wv = a.w.add(t * a.ld);
                    let (w0, w1) = (_mm256_loadu_ps(wv), _mm256_loadu_ps(wv.add(8)));
                    let xr = a.x.add(*op.add(t));
                    for (accr, &tap) in acc.iter_mut().zip(&taps) {
                        let b = _mm256_broadcast_ss(&*xr.add(tap));
                        accr[0] = _mm256_fmadd_ps(b, w0, accr[0]);
                        accr[1] = _mm256_fmadd_ps(b, w1, accr[1]);
                    }
                }
                if bi + 1 < nb {
                    for (r, accr) in acc.iter().enumerate() {
                        for (h, &sv) in accr.iter().enumerate() {
                            let d = a.tmp.add(r * W + h * 8);
                            let val = if bi > 0 {
                                _mm256_add_ps(_mm256_loadu_ps(d), sv)
                            } else {
                                sv
                            };
                            _mm256_storeu_ps(d, val);
                        }
                    }
                } else if bi > 0 {
                    for (r, accr) in acc.iter_mut().enumerate() {
                        for (h, sv) in accr.iter_mut().enumerate() {
                            *sv = _mm256_add_ps(_mm256_loadu_ps(a.tmp.add(r * W + h * 8)), *sv);
                        }
                    }
                }
            }
            for h in 0..2 {
                let f = |s: __m256| _mm256_max_ps(_mm256_add_ps(s, a.bias[h]), z);
                let m = _mm256_max_ps(
                    _mm256_max_ps(f(acc[0][h]), f(acc[1][h])),
                    _mm256_max_ps(f(acc[2][h]), f(acc[3][h])),
                );
                _mm256_storeu_ps(a.p.add(h * 8), m);
            }
        }
    }

    /// Transposes the 8 x 8 block `r` (row `i` = register `i`) in place.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn transpose8(r: &mut [__m256; 8]) {
        let t: [__m256; 8] = std::array::from_fn(|i| {
            let (a, b) = (r[2 * (i / 2)], r[2 * (i / 2) + 1]);
            if i % 2 == 0 {
                _mm256_unpacklo_ps(a, b)
            } else {
                _mm256_unpackhi_ps(a, b)
            }
        });
        // t0 = r0/r1 lo, t1 = r0/r1 hi, t2 = r2/r3 lo, t3 = r2/r3 hi, ...
        let u: [__m256; 8] = std::array::from_fn(|i| {
            let q = 4 * (i / 4);
            let (a, b) = (t[q + (i % 4) / 2], t[q + 2 + (i % 4) / 2]);
            if i % 2 == 0 {
                _mm256_shuffle_ps::<0x44>(a, b)
            } else {
                _mm256_shuffle_ps::<0xee>(a, b)
            }
        });
        // u[0..4]: columns 0, 1, 2, 3 of rows 0-3 (each 128-bit half one row group); u[4..8]
        // the same of rows 4-7.
        for c in 0..4 {
            r[c] = _mm256_permute2f128_ps::<0x20>(u[c], u[4 + c]);
            r[4 + c] = _mm256_permute2f128_ps::<0x31>(u[c], u[4 + c]);
        }
    }

    /// [`super::copy_out`] on AVX2 (see [`copy_out512`]).
    ///
    /// # Safety
    /// AVX2 and FMA, and the bounds `copy_out` asserts.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn copy_out256(
        a: &LanePacked,
        y: &[f32],
        wp: usize,
        w: usize,
        plane: usize,
        stride: usize,
        bias: Option<&[f32]>,
        relu: bool,
        out: &mut [f32],
    ) {
        // SAFETY (all): the caller's guarantees.
        unsafe {
            match (relu, bias.is_some()) {
                (true, true) => copy_out_t256::<true, true>(a, y, wp, w, plane, stride, bias, out),
                (true, false) => {
                    copy_out_t256::<true, false>(a, y, wp, w, plane, stride, bias, out)
                }
                (false, true) => {
                    copy_out_t256::<false, true>(a, y, wp, w, plane, stride, bias, out)
                }
                (false, false) => {
                    copy_out_t256::<false, false>(a, y, wp, w, plane, stride, bias, out)
                }
            }
        }
    }

    /// [`copy_out_t`] with eight outputs and eight channels at a time.
    ///
    /// # Safety
    /// As [`copy_out256`]'s.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn copy_out_t256<const RELU: bool, const BIAS: bool>(
        a: &LanePacked,
        y: &[f32],
        wp: usize,
        w: usize,
        plane: usize,
        stride: usize,
        bias: Option<&[f32]>,
        out: &mut [f32],
    ) {
        use super::super::maxpool2::x86::{load16, store_first};
        const H: usize = 8;
        let ld = a.ld();
        let z = _mm256_setzero_ps();
        let (yp, op) = (y.as_ptr(), out.as_mut_ptr());
        let mut at = [0usize; H];
        for g in 0..a.mg.div_ceil(H) {
            let nch = H.min(a.mg - g * H);
            let bv = match bias {
                // SAFETY: the bias holds `mg` values (asserted by the caller); lanes past them
                // are not read.
                Some(b) if BIAS => unsafe { load16(b.as_ptr().add(g * H), nch).0 },
                _ => z,
            };
            let yv = yp.wrapping_add(g * H);
            // The output at float offset `o` with the bias and the copy-out's ReLU (NaN to 0,
            // the sign of a zero kept).
            let f = |o: usize| {
                // SAFETY: the caller's bounds: every position read is at most `last`.
                let mut s = unsafe { _mm256_loadu_ps(yv.add(o)) };
                if BIAS {
                    s = _mm256_add_ps(s, bv);
                }
                if RELU {
                    let nan = _mm256_cmp_ps::<_CMP_UNORD_Q>(s, s);
                    _mm256_blendv_ps(_mm256_max_ps(z, s), z, nan)
                } else {
                    s
                }
            };
            let (mut qy, mut qx) = (0, 0);
            let row = wp * ld;
            let mut rowbase = 0;
            for q0 in (0..plane).step_by(H) {
                let n = H.min(plane - q0);
                if wp == w {
                    // Consecutive positions (the pooled product's rows): no row ends to find.
                    for (j, o) in at.iter_mut().enumerate() {
                        *o = if j < n { (q0 + j) * ld } else { 0 };
                    }
                } else {
                    for (j, o) in at.iter_mut().enumerate() {
                        if j < n {
                            *o = rowbase + qx * ld;
                            qx += 1;
                            if qx == w {
                                (qx, qy) = (0, qy + 1);
                                rowbase = qy * row;
                            }
                        } else {
                            // The first output: inside `y`, and never stored.
                            *o = 0;
                        }
                    }
                }
                let mut r = [z; H];
                for (rj, &o) in r.iter_mut().zip(at.iter()) {
                    *rj = f(o);
                }
                transpose8(&mut r);
                for (c, &rc) in r.iter().enumerate().take(nch) {
                    // SAFETY: plane `g * 8 + c < mg`, positions `q0 .. q0 + n <= plane <=
                    // stride`.
                    unsafe { store_first(op.add((g * H + c) * stride + q0), rc, n) };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether the lane kernels run on this CPU (they are used only with AVX-512; the tests
    /// say so where they cannot run).
    fn avx512_here() -> bool {
        let here = crate::runtime::cpu::sgemm::avx512();
        if !here {
            eprintln!("no AVX-512 on this CPU: the lane kernels are not used here");
        }
        here
    }

    /// The kernels this CPU runs: AVX2, and the AVX-512 ones where present.
    fn isas() -> Vec<Isa> {
        let mut v = vec![Isa::Avx2];
        if crate::runtime::cpu::sgemm::avx512() {
            v.push(Isa::Best);
        }
        v
    }

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        crate::runtime::reference::RefTensor::random(&[n], seed).to_f32()
    }

    /// `got` within `tol` (relative) of the float64 `want`, and equal to the panel kernel's
    /// `panel` bit for bit (the same reduction order).
    fn check(got: f32, want: f64, panel: f32, tol: f64, what: &dyn Fn() -> String) {
        assert!(
            (got as f64 - want).abs() <= tol * (1.0 + want.abs()),
            "{}: {got} vs {want}",
            what()
        );
        assert_eq!(
            got.to_bits(),
            panel.to_bits(),
            "{}: differs from the panel kernel",
            what()
        );
    }

    #[test]
    fn transpose16_transposes() {
        if !avx512_here() {
            return;
        }
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::*;
            let m: Vec<f32> = (0..256).map(|i| i as f32).collect();
            // SAFETY: AVX-512F is present (checked); every load and store is of 16 floats
            // inside the 256.
            unsafe {
                let mut r = [_mm512_setzero_ps(); 16];
                for (i, ri) in r.iter_mut().enumerate() {
                    *ri = _mm512_loadu_ps(m.as_ptr().add(16 * i));
                }
                x86::transpose16(&mut r);
                let mut t = vec![0.0f32; 256];
                for (i, ri) in r.iter().enumerate() {
                    _mm512_storeu_ps(t.as_mut_ptr().add(16 * i), *ri);
                }
                for i in 0..16 {
                    for j in 0..16 {
                        assert_eq!(t[16 * i + j], m[16 * j + i], "({i}, {j})");
                    }
                }
            }
        }
    }

    /// The product against a float64 sum over the same taps, and bit for bit against the panel
    /// kernel (same reduction order), at channel counts that fill one or two registers or
    /// part of them, reductions shorter and longer than a block, and positions not a multiple
    /// of the block.
    #[test]
    fn product_matches_reference_and_panel_kernel() {
        if !avx512_here() {
            return;
        }
        for &(mg, k, npos) in &[
            (16, 9, 811),
            (32, 144, 209),
            (32, 300, 50),
            (15, 20, 7),
            (30, 1, 25),
            (5, 33, 40),
        ] {
            let w = rand(mg * k, mg as u64 * 7 + k as u64);
            let a = LanePacked::new(mg, k, &w);
            let np = a.padded(npos);
            // Row t of the right operand starts at 3 t (overlapping rows, as in the direct path).
            let offs: Vec<usize> = (0..k).map(|t| 3 * t).collect();
            let x = rand(3 * k + np, npos as u64);
            let mut y = vec![f32::NAN; np * a.ld()];
            product(&a, &x, &offs, npos, &mut y);
            let panel = crate::runtime::cpu::sgemm::PackedA::new(mg, k, &w, k, 1);
            let mut c = vec![0.0f32; mg * npos];
            crate::runtime::cpu::sgemm::gemm_rows(&panel, &x, &offs, npos, &mut c, npos);
            for p in 0..npos {
                for ch in 0..a.ld() {
                    let got = y[p * a.ld() + ch];
                    if ch >= mg {
                        assert_eq!(got, 0.0, "lane past mg");
                        continue;
                    }
                    let want: f64 = (0..k)
                        .map(|t| w[ch * k + t] as f64 * x[offs[t] + p] as f64)
                        .sum();
                    let what = || format!("mg {mg} k {k}: ({p}, {ch})");
                    check(got, want, c[ch * npos + p], 1e-5, &what);
                }
            }
        }
    }

    /// `product_at` against a float64 sum over the same taps: four and three registers of
    /// channels (64, 48, and 40 with lanes past it), one to three reduction blocks (k 9, 144,
    /// 150 = 3 x 50), and positions in any order and repeated (as the caller fills a block).
    #[test]
    fn product_at_matches_reference() {
        if !crate::runtime::cpu::sgemm::available() {
            eprintln!("no AVX2 on this CPU: the lane kernels are not used here");
            return;
        }
        // Each kernel's results, bit for bit equal between the kernels.
        let mut first: Vec<Vec<f32>> = Vec::new();
        for isa in isas() {
            for (case, &(mg, k, npos)) in [(64, 9, 30), (64, 144, 13), (48, 150, 40), (40, 73, 8)]
                .iter()
                .enumerate()
            {
                let w = rand(mg * k, mg as u64 * 5 + k as u64);
                let a = LanePacked::new(mg, k, &w);
                let offs: Vec<usize> = (0..k).map(|t| 5 * t + t % 3).collect();
                let xlen = 6 * k + 4 * npos + 7;
                let x = rand(xlen, k as u64 + 11);
                // Positions two apart, descending, then the last repeated to a whole block.
                let mut pos: Vec<usize> = (0..npos).map(|j| 2 * (npos - 1 - j) + j % 2).collect();
                let last = *pos.last().unwrap();
                pos.resize(a.padded(npos), last);
                let mut y = vec![f32::NAN; pos.len() * a.ld()];
                product_at_isa(&a, &x, &offs, &pos, &mut y, isa);
                if let Some(f) = first.get(case) {
                    let same = f.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits());
                    assert!(same, "{isa:?} differs from the other kernel: mg {mg} k {k}");
                } else {
                    first.push(y.clone());
                }
                for (j, &p) in pos.iter().enumerate() {
                    for ch in 0..a.ld() {
                        let got = y[j * a.ld() + ch];
                        if ch >= mg {
                            assert_eq!(got, 0.0, "lane past mg");
                            continue;
                        }
                        let want: f64 = (0..k)
                            .map(|t| w[ch * k + t] as f64 * x[p + offs[t]] as f64)
                            .sum();
                        assert!(
                            (got as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()),
                            "mg {mg} k {k}: ({j}, {ch}): {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    /// `max3s2_rows` against plain loops over the same windows: rows with a carried row
    /// before them (`first` = lo - 1 read) and without (`first` = -1, the padding row), odd
    /// and even widths and row counts, two and four registers of channels, and NaN taps
    /// (skipped).
    #[test]
    fn max3s2_rows_matches_plain_loops() {
        if !crate::runtime::cpu::sgemm::available() {
            eprintln!("no AVX2 on this CPU: the lane kernels are not used here");
            return;
        }
        for isa in isas() {
            for &(ld, ow, first, lo, hi, py0, py1) in &[
                (64usize, 9usize, -1isize, 0usize, 6usize, 0usize, 3usize),
                (32, 8, 3, 3, 8, 2, 4),
                (64, 7, 3, 3, 9, 2, 5),
                (32, 1, -1, 0, 1, 0, 1),
            ] {
                let nrows = (hi as isize - first) as usize;
                let mut rows = rand(nrows * ow * ld, ow as u64 * 3 + hi as u64);
                for i in (0..rows.len()).step_by(37) {
                    rows[i] = f32::NAN;
                }
                let pw = ow.div_ceil(2);
                let mut out = vec![0.0f32; (py1 - py0) * pw * ld];
                max3s2_rows_isa(
                    ld,
                    &rows,
                    ow,
                    first,
                    [lo, hi],
                    [py0, py1],
                    pw,
                    &mut out,
                    isa,
                );
                for py in py0..py1 {
                    for px in 0..pw {
                        for ch in 0..ld {
                            let mut want = f32::NEG_INFINITY;
                            for r in (2 * py).saturating_sub(1)..(2 * py + 2) {
                                for c in (2 * px).saturating_sub(1)..(2 * px + 2) {
                                    if r < lo || r >= hi || c >= ow {
                                        continue;
                                    }
                                    let v =
                                        rows[((r as isize - first) as usize * ow + c) * ld + ch];
                                    if v > want {
                                        want = v;
                                    }
                                }
                            }
                            let got = out[((py - py0) * pw + px) * ld + ch];
                            assert_eq!(
                                got.to_bits(),
                                want.to_bits(),
                                "{isa:?} ld {ld} ow {ow}: ({py}, {px}, {ch})"
                            );
                        }
                    }
                }
            }
        }
    }

    /// The pooled product (each kernel this CPU runs) against the panel kernel's product, bit
    /// for bit (the same reduction order), then the bias, ReLU and pooling, and against a
    /// float64 sum: one or two registers of channels (15, 16, 30, 32), one to three reduction
    /// blocks, and pooled row widths that end in every shorter block (1-7 windows against
    /// blocks of 7 or 3).
    #[test]
    fn pooled_product_equals_panel_product_then_pooling() {
        if !crate::runtime::cpu::sgemm::available() {
            eprintln!("no AVX2 on this CPU: the lane kernels are not used here");
            return;
        }
        for &(mg, k) in &[(16, 9), (15, 40), (32, 144), (30, 300), (32, 1), (16, 27)] {
            for pw in 1..=9 {
                let (ph, wp) = (3, 2 * pw + 2);
                let (oh, ow) = (2 * ph + 1, 2 * pw + 1);
                let w = rand(mg * k, (mg * 31 + k) as u64);
                let a = LanePacked::new(mg, k, &w);
                // The rows of the steps overlap, as in the direct path.
                let offs: Vec<usize> = (0..k).map(|t| (t % 7) * wp + t / 7).collect();
                let npos = (oh - 1) * wp + ow;
                let x = rand(offs.iter().max().unwrap() + npos + 16, (pw * 13 + k) as u64);
                let panel = crate::runtime::cpu::sgemm::PackedA::new(mg, k, &w, k, 1);
                let mut y = vec![0.0f32; mg * npos];
                crate::runtime::cpu::sgemm::gemm_rows(&panel, &x, &offs, npos, &mut y, npos);
                let bias = rand(mg, 3);
                for b in [Some(&bias[..]), None] {
                    let f = |p: usize, c: usize| {
                        let v = b.map_or(y[c * npos + p], |b| y[c * npos + p] + b[c]);
                        if v.is_nan() || v < 0.0 { 0.0 } else { v }
                    };
                    let f64_sum = |p: usize, c: usize| {
                        let s: f64 = (0..k)
                            .map(|t| w[c * k + t] as f64 * x[offs[t] + p] as f64)
                            .sum();
                        (s + b.map_or(0.0, |b| b[c] as f64)).max(0.0)
                    };
                    for isa in isas() {
                        let ld = a.ld();
                        let mut pooled = vec![f32::NAN; ph * pw * ld];
                        pooled_product_isa(&a, &x, &offs, wp, ph, pw, b, &mut pooled, isa);
                        for (q, got) in pooled.chunks_exact(ld).enumerate() {
                            let p = 2 * (q / pw) * wp + 2 * (q % pw);
                            let win = [p, p + 1, p + wp, p + wp + 1];
                            for (c, &g) in got.iter().enumerate() {
                                let what = format!(
                                    "{isa:?} mg {mg} k {k} pw {pw} bias {}: ({q}, {c})",
                                    b.is_some()
                                );
                                if c >= mg {
                                    assert_eq!(g, 0.0, "{what}: lane past mg");
                                    continue;
                                }
                                let want = win.iter().map(|&p| f(p, c)).fold(0.0f32, f32::max);
                                // Equal as numbers: the sums are the panel kernel's bit for
                                // bit, and only the sign of a zero may differ.
                                assert!(g == want, "{what}: {g} vs {want}");
                                let exact = win.iter().map(|&p| f64_sum(p, c)).fold(0.0, f64::max);
                                assert!(
                                    (g as f64 - exact).abs() <= 1e-5 * (1.0 + exact.abs()),
                                    "{what}: {g} vs {exact} (float64)"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// The lane GEMM against a float64 sum and bit for bit against the panel kernel, at row
    /// counts that end in every shorter block, column counts that end in a partial register
    /// or a partial group of four, and reductions of one to three blocks.
    #[test]
    fn gemm_matches_reference_and_panel_kernel() {
        if !crate::runtime::cpu::sgemm::available() {
            eprintln!("no AVX2 on this CPU: the lane kernels are not used here");
            return;
        }
        for (&(m, n, k), isa) in [
            (64, 128, 1568),
            (7, 10, 3),
            (5, 70, 300),
            (13, 64, 129),
            (1, 1, 1),
            (4, 16, 2),
            (11, 23, 40),
            (3, 9, 257),
        ]
        .iter()
        .flat_map(|c| isas().into_iter().map(move |i| (c, i)))
        {
            let a = rand(m * k, (m * 7 + k) as u64);
            let bt = rand(k * n, (n * 5 + k) as u64);
            // One guard element past `c`: a store past the last column would change it.
            let mut c = vec![f32::NAN; m * n + 1];
            gemm_isa(m, n, k, &a, &bt, &mut c[..m * n], isa);
            assert!(
                c[m * n].is_nan(),
                "{isa:?} {m}x{n}x{k}: wrote past the product"
            );
            let pa = crate::runtime::cpu::sgemm::PackedA::new(m, k, &a, k, 1);
            let mut c2 = vec![0.0f32; m * n];
            crate::runtime::cpu::sgemm::gemm_packed(&pa, &bt, n, n, &mut c2, n);
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k)
                        .map(|t| a[i * k + t] as f64 * bt[t * n + j] as f64)
                        .sum();
                    let got = c[i * n + j];
                    check(got, want, c2[i * n + j], 1e-4, &|| {
                        format!("{isa:?} {m}x{n}x{k}: ({i}, {j})")
                    });
                }
            }
        }
    }

    /// The copy-out against the plain loops: bias and ReLU (NaN to 0), for
    /// planes whose size is not a multiple of 16 and channel counts past one register.
    #[test]
    fn copy_out_matches_plain_loops() {
        if !crate::runtime::cpu::sgemm::available() {
            eprintln!("no AVX2 on this CPU: the lane kernels are not used here");
            return;
        }
        for (&(mg, oh, ow, wp), isa) in [
            (16, 28, 28, 29),
            (32, 14, 14, 15),
            (30, 5, 7, 9),
            (15, 1, 3, 3),
            (5, 3, 5, 5),
            (44, 2, 9, 11),
        ]
        .iter()
        .flat_map(|c| isas().into_iter().map(move |i| (c, i)))
        {
            let a = LanePacked::new(mg, 1, &vec![0.0; mg]);
            let ld = a.ld();
            let npos = (oh - 1) * wp + ow;
            let mut y = rand(npos * ld, mg as u64 + 99);
            y[ld + 1] = f32::NAN;
            let bias = rand(mg, 5);
            for (relu, with_bias) in [(false, true), (true, true), (true, false), (false, false)] {
                let (h, w) = (oh, ow);
                let mut out = vec![f32::NAN; mg * h * w];
                let b = with_bias.then_some(&bias[..]);
                copy_out_isa(&a, &y, wp, oh, ow, h * w, b, relu, &mut out, isa);
                let f = |p: usize, c: usize| {
                    let v = b.map_or(y[p * ld + c], |b| y[p * ld + c] + b[c]);
                    if relu && (v.is_nan() || v < 0.0) {
                        0.0
                    } else {
                        v
                    }
                };
                for c in 0..mg {
                    for i in 0..h {
                        for j in 0..w {
                            let want = f(i * wp + j, c);
                            let got = out[(c * h + i) * w + j];
                            assert!(
                                got == want || (got.is_nan() && want.is_nan()),
                                "{isa:?} mg {mg} {oh}x{ow} relu {relu}: ({c}, {i}, {j}) {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}
