//! Winograd F(2x2, 3x3) for 3x3, stride-1, dilation-1, single-group convolutions (Lavin and
//! Gray 2016, "Fast Algorithms for Convolutional Neural Networks").
//!
//! Why: such a convolution spends 36 multiply-adds per 2x2 output tile and channel pair; in
//! the Winograd domain it spends 16, so the arithmetic that dominates a small CNN's forward
//! (and its input gradient, which is the same kind of convolution) shrinks by 2.25x. The
//! transforms are a few additions per tile and channel, vectorised along a row of tiles; the
//! 16 products per tile are 16 GEMMs (`U_e (m x c) * V_e (c x tiles)`) on the packed-panel
//! kernel of [`super::sgemm`], over blocks of tiles sized to stay in L2.
//!
//! Accuracy: F(2x2, 3x3)'s transforms have coefficients 0, +-1 and 1/2 (applied to the
//! weights, in f64), so the result differs from direct summation by a few rounding steps
//! (well inside the 1e-4 the backends are held to; the tests compare against the f64
//! reference). Larger tiles (F(4x4, 3x3)) would save more but amplify rounding.
//!
//! Non-finite inputs: a NaN or infinity in an input tile reaches all four outputs of the tiles
//! that read it (the transforms multiply it by zero coefficients too), where the direct path
//! confines it to the outputs whose 3x3 window holds it; finite inputs are unaffected.
//!
//! Determinism: every output is reduced in the same order (channels in increasing order
//! inside each of the 16 products, then the fixed output transform), whatever the block or
//! thread it falls in.

use super::sgemm::{self, PackedA};

/// Lanes of one AVX register: the transforms work on eight tiles of a row at once.
const L: usize = 8;
/// f32s of the transformed input and product blocks (`16 x tiles x (c + m)`): about 384 KiB,
/// which stays in a core's L2 between the transform that writes it and the GEMM that reads it.
const BLOCK_FLOATS: usize = 96 << 10;
/// Tiles in a block are a multiple of this: the AVX-512 GEMM's column block (two registers).
/// Why: a block's last, narrower column block runs the one-register kernel, which spends a
/// load per multiply-add row and ran at about half the speed; blocks of whole tile rows left one
/// in most blocks (35 tiles at 256 channels on 14x14, 42 at 128 on 28x28).
const BLOCK_ALIGN: usize = 32;
/// Fewest output tiles (all samples) a call needs for the Winograd path, plus one per 128
/// weight pairs. Measured (one thread): 16 -> 32 channels on 14x14 wins from 2 samples (98
/// tiles, 1.1x; 196 tiles, 1.2x); 256 -> 256 channels on 14x14 loses at 4 samples (196 tiles,
/// 0.87x: transforming and packing 65k weight pairs costs about a millisecond).
const MIN_TILES: usize = 96;
/// Fewest output tiles where the transformed weights are kept between calls (see
/// `wcache`): the transform is then paid once. Measured (one thread, AVX-512 Xeon, cached
/// weights, caches flushed before each call as a model's other layers do): ResNet-18's 512 ->
/// 512 channel 7x7 convolutions at batch 2 (32 tiles) 4.7 against 8.2 ms on im2col, at batch 1
/// (16 tiles) 3.7 against 4.1 ms; ResNet-18's forward at batch 2 73.5 against 85.6 ms with 64
/// tiles as the minimum (each of two threads runs a slice of two samples at batch 4).
const MIN_TILES_CACHED: usize = 16;
/// Fewest channel pairs (`c * m`) for the Winograd path where the AVX-512 GEMM runs: there
/// the direct path's product is fast enough that the transforms (AVX2, eight tiles a row)
/// cost more than they save on few channels. Measured (one thread, Xeon): 16 -> 32 channels
/// on 14x14 at batch 64, Winograd 1.97 ms against 1.63 ms direct; 64 -> 64 channels on
/// 28x28, 2.33 ms against 5.18 ms.
const MIN_PAIRS_WIDE: usize = 1024;
/// Input planes larger than this (f32s per sample, after padding and de-interleaving) are
/// left to the direct path: the staged copy of one sample must stay cache-sized.
const MAX_SAMPLE_FLOATS: usize = 4 << 20;

/// The geometry of one convolution the plan serves.
#[derive(Clone, Copy, Debug)]
pub(super) struct Shape {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub m: usize,
    pub oh: usize,
    pub ow: usize,
    /// Top and left padding (bottom and right follow from `oh = h + pt + pb - 2`).
    pub pt: usize,
    pub pl: usize,
}

impl Shape {
    fn th(&self) -> usize {
        self.oh.div_ceil(2)
    }
    fn tw(&self) -> usize {
        self.ow.div_ceil(2)
    }
    /// Rows of the padded input the tiles read (two past the last tile's origin, rounded so
    /// that a partial last tile reads zeros).
    fn hp(&self) -> usize {
        2 * self.th() + 2
    }
    /// Lanes of one de-interleaved padded row: every 8-lane group of tiles plus the one-column
    /// overlap of the next tile.
    fn lw(&self) -> usize {
        self.tw().div_ceil(L) * L + L
    }
    fn sample_floats(&self) -> usize {
        self.c * self.hp() * 2 * self.lw()
    }
}

/// The weights in the Winograd domain for one range of output channels: 16 packed `mr x c`
/// matrices (`U_e[co][ci] = (G g G^T)[e]`).
struct Range {
    co0: usize,
    mr: usize,
    u: Vec<PackedA>,
}

/// Weights in the Winograd domain, split into the output-channel ranges that tasks take
/// (made once per weight tensor: see `wcache`).
pub(super) struct Transformed {
    c: usize,
    ranges: Vec<Range>,
}

/// A convolution prepared for the Winograd path: its shape and transformed weights.
pub(super) struct Plan {
    s: Shape,
    u: std::sync::Arc<Transformed>,
}

/// The plan's unit of work: output samples `s0..s0 + ns` and the channels of range `range`.
pub(super) struct Task {
    pub s0: usize,
    pub ns: usize,
    pub range: usize,
}

/// Whether the Winograd path takes this convolution (its caller has checked kernel 3x3, stride
/// 1, dilation 1 and one group): enough channels on both sides that the transforms are cheap
/// next to the products, enough tiles in the call to pay for transforming the weights (16
/// products per weight pair, made once per call where not cached; measured: a 256-channel 14x14 convolution
/// of one sample ran 2.5x slower than the direct path), and AVX2/FMA.
///
/// `cached`: the transformed weights are kept between calls (the weights are a tensor), so
/// only the first call pays for the transform and the tile count need not cover it
/// ([`MIN_TILES_CACHED`]).
pub(super) fn applies(s: &Shape, cached: bool) -> bool {
    #[cfg(test)]
    let old_min = OLD_MIN_TILES.load(std::sync::atomic::Ordering::Relaxed);
    #[cfg(not(test))]
    let old_min = false;
    let min_tiles = if cached {
        if old_min { 64 } else { MIN_TILES_CACHED }
    } else {
        MIN_TILES + s.c * s.m / 128
    };
    s.c >= 4
        && s.m >= 4
        && (s.c * s.m >= MIN_PAIRS_WIDE || !sgemm::avx512() || few_pairs_forced())
        && s.n.saturating_mul(s.th()).saturating_mul(s.tw()) >= min_tiles
        && s.oh >= 2
        && s.ow >= 4
        && s.sample_floats() <= MAX_SAMPLE_FLOATS
        && sgemm::available()
}

/// Test-only switch back to 64 tiles as the cached weights' minimum, for timing A/B runs.
#[cfg(test)]
pub(super) static OLD_MIN_TILES: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

// Test-only: this thread's convolutions take the Winograd path below `MIN_PAIRS_WIDE` too,
// so its tests cover small channel counts on AVX-512 machines (thread-local: the decision is
// made on the calling thread, and other tests' threads keep the rule).
#[cfg(test)]
thread_local! {
    pub(super) static FEW_PAIRS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}
/// Whether this thread's tests asked for the path below [`MIN_PAIRS_WIDE`] (always false
/// outside tests).
fn few_pairs_forced() -> bool {
    #[cfg(test)]
    return FEW_PAIRS.with(|f| f.get());
    #[cfg(not(test))]
    false
}

impl Transformed {
    /// Transforms `w` (`m x c x 3 x 3`) and packs it for `splits` output-channel ranges.
    pub fn new(m: usize, c: usize, w: &[f32], splits: usize) -> Transformed {
        assert_eq!(w.len(), m * c * 9, "winograd: weight length");
        // U[e][co][ci] in f64 (the 1/2 factors are exact, the sums are not), rounded once, in
        // the thread's scratch (a fresh allocation per call cost more in page faults than the
        // arithmetic).
        super::conv::with_scratch(16 * m * c, |u| Transformed::packed(m, c, w, u, splits))
    }

    fn packed(m: usize, c: usize, w: &[f32], u: &mut [f32], splits: usize) -> Transformed {
        for co in 0..m {
            for ci in 0..c {
                let g = &w[(co * c + ci) * 9..][..9];
                let g = |r: usize, k: usize| f64::from(g[r * 3 + k]);
                // Gg (4 x 3), then (Gg) G^T (4 x 4).
                let mut gg = [[0.0f64; 3]; 4];
                for k in 0..3 {
                    gg[0][k] = g(0, k);
                    gg[1][k] = 0.5 * (g(0, k) + g(1, k) + g(2, k));
                    gg[2][k] = 0.5 * (g(0, k) - g(1, k) + g(2, k));
                    gg[3][k] = g(2, k);
                }
                for (p, row) in gg.iter().enumerate() {
                    let [g0, g1, g2] = *row;
                    let t = [g0, 0.5 * (g0 + g1 + g2), 0.5 * (g0 - g1 + g2), g2];
                    for (q, &v) in t.iter().enumerate() {
                        u[((p * 4 + q) * m + co) * c + ci] = v as f32;
                    }
                }
            }
        }
        let splits = splits.clamp(1, m);
        let per = m.div_ceil(splits);
        let ranges = (0..m)
            .step_by(per)
            .map(|co0| {
                let mr = per.min(m - co0);
                let u = (0..16)
                    .map(|e| PackedA::new(mr, c, &u[(e * m + co0) * c..], c, 1))
                    .collect();
                Range { co0, mr, u }
            })
            .collect();
        Transformed { c, ranges }
    }
}

impl Plan {
    pub fn new(s: Shape, u: std::sync::Arc<Transformed>) -> Plan {
        assert_eq!(u.c, s.c, "winograd: weights of another shape");
        assert_eq!(
            u.ranges.last().map(|r| r.co0 + r.mr),
            Some(s.m),
            "winograd: weights of another shape"
        );
        Plan { s, u }
    }

    pub fn ranges(&self) -> usize {
        self.u.ranges.len()
    }

    /// Output channels of range `r`: (first, count).
    pub fn range(&self, r: usize) -> (usize, usize) {
        (self.u.ranges[r].co0, self.u.ranges[r].mr)
    }

    /// Computes one task: `x` holds the whole input (`n x c x h x w`), `y` the task's output
    /// (`ns x mr x oh x ow`, the range's channels of its samples), to which `bias` (the range's
    /// entries) is added and, if `relu`, the ReLU applied. With `pool2` (and `relu`), `y` is
    /// the 2x2 / stride-2 max pooling of that instead (`ns x mr x oh/2 x ow/2`): each 2x2
    /// output tile is one pooling window, so the pooling is a maximum of the tile's four
    /// registers and the full-size output is never written.
    pub fn run(
        &self,
        t: &Task,
        x: &[f32],
        y: &mut [f32],
        bias: Option<&[f32]>,
        relu: bool,
        pool2: bool,
    ) {
        let s = &self.s;
        let rg = &self.u.ranges[t.range];
        let (mr, c) = (rg.mr, s.c);
        assert!(relu || !pool2, "winograd: pooling after a ReLU only");
        let (th, tw) = (s.th(), s.tw());
        let pw = if pool2 {
            (s.oh / 2) * (s.ow / 2)
        } else {
            s.oh * s.ow
        };
        let plane = s.h * s.w;
        assert!(
            x.len() >= (t.s0 + t.ns) * c * plane,
            "winograd: input too short"
        );
        assert_eq!(y.len(), t.ns * mr * pw, "winograd: output length");
        if let Some(b) = bias {
            assert_eq!(b.len(), mr, "winograd: bias length");
        }
        // A block is `nb` consecutive tiles of the group's tile rows (a block may start and end
        // inside a row); a group is the samples whose staged input the blocks read: whole
        // samples when they fit a block, else one sample.
        let per_tile = 16 * (c + mr);
        let spt = th * tw;
        // At least BLOCK_ALIGN tiles, even past the cache budget: narrower GEMMs lose more to
        // their edges than the cache misses cost (measured on 256 channels).
        let nb = wide_block(block_tiles(per_tile, tw), 16 * mr * c, t.ns * spt);
        let group = (nb / spt).max(1);
        // At least L spare columns (see `input_tiles`), and rows a whole number of 64-byte lines
        // apart, so no register the GEMM loads or stores straddles two lines.
        let ldb = nb + if aligned_rows() { 16 } else { L };
        let sample = s.sample_floats();
        // The 16 planes of V (and of the products) at a skewed stride: see `plane_stride`.
        let (vs, ps) = (plane_stride(c * ldb), plane_stride(mr * ldb));
        let need = group * sample + 16 * (vs + ps) + 16;
        // Row t of each V_e block starts at t * ldb: the same offsets for all 16 products of
        // every block, so they are made once here rather than per GEMM call.
        let offs: Vec<usize> = (0..c).map(|t| t * ldb).collect();
        super::conv::with_scratch(need, |buf| {
            let (xd, rest) = buf.split_at_mut(group * sample);
            // The padding is zeroed once: `stage` writes only the interior, the same positions
            // for every sample.
            xd.fill(0.0);
            // The planes start on a 64-byte line (their strides are whole lines).
            let lead = if aligned_rows() {
                sgemm::line_lead(rest.as_ptr())
            } else {
                0
            };
            let (v, prod) = rest[lead..].split_at_mut(16 * vs);
            let mut g0 = 0;
            while g0 < t.ns {
                let gn = group.min(t.ns - g0);
                for j in 0..gn {
                    let xs = &x[(t.s0 + g0 + j) * c * plane..][..c * plane];
                    stage(s, xs, &mut xd[j * sample..(j + 1) * sample]);
                }
                let total = gn * spt;
                let mut b0 = 0;
                while b0 < total {
                    let nbk = nb.min(total - b0);
                    // Whole 8-column strips: the columns past the tiles hold leftovers (GEMM
                    // columns are independent, and their products only reach output lanes that
                    // are never stored or are overwritten), and the GEMM needs no column tail.
                    let n8 = nbk.div_ceil(L) * L;
                    for r in row_spans(b0, nbk, tw) {
                        let (sl, ty) = (r.row / th, r.row % th);
                        let xdj = &xd[sl * sample..(sl + 1) * sample];
                        input_tiles(s, xdj, ty, r.tx, v, ldb, vs, r.col);
                    }
                    for (e, ue) in rg.u.iter().enumerate() {
                        let b = &v[e * vs..][..c * ldb];
                        let p = &mut prod[e * ps..][..mr * ldb];
                        sgemm::gemm_rows(ue, b, &offs, n8, p, ldb);
                    }
                    for r in row_spans(b0, nbk, tw) {
                        let (sl, ty) = (r.row / th, r.row % th);
                        let ys = &mut y[(g0 + sl) * mr * pw..][..mr * pw];
                        let act = (relu, pool2);
                        output_tiles(s, prod, mr, ldb, ps, r.col, ty, r.tx, ys, bias, act);
                    }
                    b0 += nbk;
                }
                g0 += gn;
            }
        });
    }
}

/// Whether the V and product planes' rows start on 64-byte lines (always, outside timing A/B
/// runs). Measured in a standalone copy of the GEMM kernel, 16 products of c x c x 32 tiles:
/// rows 40 floats apart ran at 100-110 GFLOP/s, rows 48 floats apart on line boundaries at
/// 107-112 (64 channels) to 121-128 (128 to 512 channels).
fn aligned_rows() -> bool {
    #[cfg(test)]
    return !UNALIGNED_ROWS.load(std::sync::atomic::Ordering::Relaxed);
    #[cfg(not(test))]
    true
}

/// Test-only switch to the earlier, unaligned rows (`nb + 8` floats apart), for timing A/B
/// runs.
#[cfg(test)]
pub(super) static UNALIGNED_ROWS: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Tiles per block for `per_tile` f32s of transformed inputs and products per tile: as many
/// as [`BLOCK_FLOATS`] holds, in whole [`BLOCK_ALIGN`]s, at least one.
fn block_tiles(per_tile: usize, tw: usize) -> usize {
    #[cfg(test)]
    if ROW_BLOCKS.load(std::sync::atomic::Ordering::Relaxed) {
        // The earlier rule, for timing A/B runs: whole tile rows, at least 32 tiles.
        return (BLOCK_FLOATS / per_tile / tw).max(32usize.div_ceil(tw)) * tw;
    }
    #[cfg(not(test))]
    let _ = tw;
    (BLOCK_FLOATS / per_tile / BLOCK_ALIGN).max(1) * BLOCK_ALIGN
}

/// The block width for a task of `total` tiles whose range's transformed weights are `u`
/// f32s, given the cache-sized width `nb`: where the weights outweigh [`WIDE_WEIGHT_FLOATS`],
/// the task's tiles in as few blocks as [`WIDE_BLOCK_TILES`] allows, of equal widths. Why: every
/// block reads all of the weights, which then cost more than the block's own transformed
/// inputs and products (ResNet-18's 256-channel 14x14 layers: 4 MiB of weights for each block
/// of 32 tiles, two blocks per sample); a wider block spills its inputs and products to L3
/// instead, which costs less than reading the weights again.
pub(super) fn wide_block(nb: usize, u: usize, total: usize) -> usize {
    #[cfg(test)]
    if NO_WIDE_BLOCKS.load(std::sync::atomic::Ordering::Relaxed) {
        return nb;
    }
    if u <= WIDE_WEIGHT_FLOATS || total <= nb {
        return nb;
    }
    let blocks = total.div_ceil(WIDE_BLOCK_TILES);
    total.div_ceil(blocks).next_multiple_of(2 * L).max(nb)
}

/// Transformed weights (f32s of one range, all 16 products) past which blocks widen: see
/// [`wide_block`].
const WIDE_WEIGHT_FLOATS: usize = 2 * BLOCK_FLOATS;
/// Widest block [`wide_block`] makes.
const WIDE_BLOCK_TILES: usize = 128;

/// Test-only switch back to cache-sized blocks whatever the weights, for timing A/B runs.
#[cfg(test)]
pub(super) static NO_WIDE_BLOCKS: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Test-only switch back to blocks of whole tile rows, for timing A/B runs.
#[cfg(test)]
pub(super) static ROW_BLOCKS: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// The part of one tile row that a block holds: tiles `tx` of row `row` (counted over the
/// group's samples), at block columns `col..`.
struct RowSpan {
    row: usize,
    tx: std::ops::Range<usize>,
    col: usize,
}

/// The tile rows (of `tw` tiles) that tiles `b0..b0 + nb` of a group fall in, in order.
fn row_spans(b0: usize, nb: usize, tw: usize) -> impl Iterator<Item = RowSpan> {
    let end = b0 + nb;
    (b0 / tw..end.div_ceil(tw)).map(move |row| {
        let start = row * tw;
        let tx = b0.max(start) - start..end.min(start + tw) - start;
        RowSpan {
            row,
            col: start + tx.start - b0,
            tx,
        }
    })
}

/// The distance (f32s) between two of the 16 planes of `len` f32s that the transforms write
/// or read together: an odd number of cache lines. Why: the input transform stores one row
/// to each of the 16 planes per channel, and the output transform loads one from each; at a
/// stride that is a multiple of 4 KiB (64 channels of 64 tiles, 512 of 40) all 16 fall in one
/// L1 set of 8 ways and evict each other. An odd line count spreads them over 16 sets.
fn plane_stride(len: usize) -> usize {
    #[cfg(test)]
    if NO_SKEW.load(std::sync::atomic::Ordering::Relaxed) {
        return len;
    }
    let lines = len.div_ceil(16);
    (lines | 1) * 16
}

/// Test-only switch back to unskewed planes, for timing A/B runs.
#[cfg(test)]
pub(super) static NO_SKEW: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Copies one sample (`c x h x w`) into its zero-padded, column-de-interleaved form: for
/// channel `ci` and padded row `r`, lanes `[0, lw)` hold the even padded columns and
/// `[lw, 2 lw)` the odd ones, so a row of tiles reads each of its four columns contiguously.
/// Leaves every other position as it was (zero, from the caller).
fn stage(s: &Shape, x: &[f32], xd: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if sgemm::available() {
        // SAFETY: AVX2 and FMA are present.
        unsafe { x86::stage_avx2(s, x, xd) };
        return;
    }
    stage_rows(s, x, xd, |src, ev, od| {
        let pairs = src.chunks_exact(2);
        let last = pairs.remainder().first().copied();
        let n = pairs.len();
        for ((e, o), p) in ev[..n].iter_mut().zip(&mut od[..n]).zip(pairs) {
            *e = p[0];
            *o = p[1];
        }
        if let Some(v) = last {
            ev[n] = v;
        }
    });
}

/// [`stage`]'s loop over rows, `row(src, ev, od)` splitting a row's elements after an odd first
/// column into the even (`ev[i] = src[2 i]`) and odd lanes (inlined into each instruction
/// set's build, so the per-row call costs nothing: rows of 14 cost more in calls than in
/// copies).
#[inline(always)]
fn stage_rows(
    s: &Shape,
    x: &[f32],
    xd: &mut [f32],
    mut row: impl FnMut(&[f32], &mut [f32], &mut [f32]),
) {
    let (hp, lw) = (s.hp(), s.lw());
    for ci in 0..s.c {
        for iy in 0..s.h {
            let r = iy + s.pt;
            if r >= hp {
                break;
            }
            let (ev, od) = xd[(ci * hp + r) * 2 * lw..][..2 * lw].split_at_mut(lw);
            let mut src = &x[(ci * s.h + iy) * s.w..][..s.w];
            // Padded column `ix + pl` goes to lane `(ix + pl) / 2` of the even or odd half;
            // after an odd first column, the rest come in (even, odd) pairs of one lane.
            let mut k = s.pl / 2;
            if s.pl % 2 == 1
                && let Some((&first, rest)) = src.split_first()
            {
                od[k] = first;
                src = rest;
                k += 1;
            }
            row(src, &mut ev[k..], &mut od[k..]);
        }
    }
}

/// `V_e[ci][t0 + j] = (B^T d B)[e]` for tiles `tx.start + j` of tile row `ty` of one staged
/// sample, every channel. Writes whole 8-lane groups: up to seven lanes past the span's last
/// tile, which the next span overwrites (spans are written in order) or the block's `L` spare
/// columns absorb.
#[allow(clippy::too_many_arguments)]
fn input_tiles(
    s: &Shape,
    xd: &[f32],
    ty: usize,
    tx: std::ops::Range<usize>,
    v: &mut [f32],
    ldb: usize,
    vs: usize,
    t0: usize,
) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `applies` admitted this plan only where AVX2 and FMA are present.
    unsafe {
        x86::input_tiles(s, xd, ty, tx, v, ldb, vs, t0)
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!(
        "winograd: applies() is false off x86_64 ({s:?}, {ty}, {tx:?}, {ldb}, {vs}, {t0}, {})",
        xd.len() + v.len()
    )
}

/// `y[co][2ty + a][2tx + b] = (A^T M A)[a][b] + bias[co]` (then ReLU) for tiles `tx` of one
/// row (product columns `t0..`), every channel of the range, cropped to the output. May also
/// write the outputs of up to seven tiles past the span, which a later span overwrites.
/// `(relu, pool2)`: the ReLU, and the 2x2 pooling (`y[co][ty][tx]`, the maximum of the tile's
/// four outputs after the ReLU, for the tiles wholly inside the output).
#[allow(clippy::too_many_arguments)]
fn output_tiles(
    s: &Shape,
    prod: &[f32],
    mr: usize,
    ldb: usize,
    ps: usize,
    t0: usize,
    ty: usize,
    tx: std::ops::Range<usize>,
    y: &mut [f32],
    bias: Option<&[f32]>,
    act: (bool, bool),
) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: as in `input_tiles`.
    unsafe {
        x86::output_tiles(s, prod, mr, ldb, ps, t0, ty, tx, y, bias, act)
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!(
        "winograd: applies() is false off x86_64 ({s:?}, {mr}, {ldb}, {ps}, {t0}, {ty}, {tx:?}, {}, {bias:?}, {act:?})",
        prod.len() + y.len()
    )
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{L, Shape};
    use std::arch::x86_64::*;

    /// The 1-D transform `B^T x` of four values: (x0 - x2, x1 + x2, x2 - x1, x1 - x3).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn bt(x: [__m256; 4]) -> [__m256; 4] {
        [
            _mm256_sub_ps(x[0], x[2]),
            _mm256_add_ps(x[1], x[2]),
            _mm256_sub_ps(x[2], x[1]),
            _mm256_sub_ps(x[1], x[3]),
        ]
    }

    /// The 1-D transform `A^T x` of four values: (x0 + x1 + x2, x1 - x2 - x3).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn at(x: [__m256; 4]) -> [__m256; 2] {
        [
            _mm256_add_ps(_mm256_add_ps(x[0], x[1]), x[2]),
            _mm256_sub_ps(_mm256_sub_ps(x[1], x[2]), x[3]),
        ]
    }

    /// [`super::stage`] with [`deinterleave`]'s rows. Why: the scalar loop staged the small
    /// CNN's second convolution's input (rows of 14) at 7% of its forward on a Zen 3 core.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn stage_avx2(s: &Shape, x: &[f32], xd: &mut [f32]) {
        if stage_short(s, x, xd) {
            return;
        }
        super::stage_rows(s, x, xd, |src, ev, od| deinterleave(src, ev, od));
    }

    /// [`super::stage`] for rows of at most sixteen elements after an odd first column, where
    /// whole registers fit the staged rows: the masks made once, and every row one pair of
    /// loads and one store to each half, whose lanes past the row (loaded as zeros) are its
    /// right padding. Why: rows of 14 (the small CNN's second convolution) spent most of
    /// their time on the general loop's per-row bookkeeping and partial stores. Returns false
    /// (staging nothing) where the rows do not qualify.
    #[target_feature(enable = "avx2,fma")]
    fn stage_short(s: &Shape, x: &[f32], xd: &mut [f32]) -> bool {
        use super::super::maxpool2::x86::{evens_odds, masks256};
        let (hp, lw) = (s.hp(), s.lw());
        let odd = s.pl % 2;
        let n = s.w.saturating_sub(odd);
        // The lanes a row's stores reach: from `k` (after the odd first column), eight.
        let k = s.pl / 2 + odd;
        if s.w == 0 || n > 2 * L || k + L > lw {
            return false;
        }
        let rows = s.h.min(hp.saturating_sub(s.pt));
        assert!(
            x.len() >= s.c * s.h * s.w && xd.len() >= s.c * hp * 2 * lw,
            "winograd: staging bounds"
        );
        let (ma, mb) = masks256(n);
        let (xp, dp) = (x.as_ptr(), xd.as_mut_ptr());
        for ci in 0..s.c {
            for iy in 0..rows {
                // SAFETY: row `iy < h` of channel `ci < c` is inside `x` (asserted), its `n`
                // elements after the first `odd` read under the masks; the staged row `(ci, iy +
                // pt)` (`iy + pt < hp`) is inside `xd` (asserted), written at lanes `k - odd ..
                // k + 8 <= lw` of each half.
                unsafe {
                    let src = xp.add((ci * s.h + iy) * s.w);
                    let ev = dp.add((ci * hp + iy + s.pt) * 2 * lw);
                    let od = ev.add(lw);
                    if odd == 1 {
                        *od.add(k - 1) = *src;
                    }
                    let a = _mm256_maskload_ps(src.add(odd), ma);
                    let b = _mm256_maskload_ps(src.add(odd + L), mb);
                    let (e, o) = evens_odds(a, b);
                    _mm256_storeu_ps(ev.add(k), e);
                    _mm256_storeu_ps(od.add(k), o);
                }
            }
        }
        true
    }

    /// `ev[i] = src[2 i]` and `od[i] = src[2 i + 1]` for every element of `src` (the last one
    /// alone where its length is odd): sixteen at a time, the last group loaded under masks
    /// and stored in part.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn deinterleave(src: &[f32], ev: &mut [f32], od: &mut [f32]) {
        use super::super::maxpool2::x86::{evens_odds, load16, store_first};
        let n = src.len();
        assert!(
            ev.len() >= n.div_ceil(2) && od.len() >= n / 2,
            "winograd: de-interleaved rows too short"
        );
        for i0 in (0..n).step_by(2 * L) {
            let len = (n - i0).min(2 * L);
            // SAFETY: elements i0 .. i0 + len of `src` are read (masked-off lanes are not), and
            // `ceil(len / 2)` and `len / 2` floats from i0 / 2 written, inside `ev` and `od`
            // (asserted above).
            unsafe {
                let (a, b) = load16(src.as_ptr().add(i0), len);
                let (e, o) = evens_odds(a, b);
                store_first(ev.as_mut_ptr().add(i0 / 2), e, len.div_ceil(2));
                store_first(od.as_mut_ptr().add(i0 / 2), o, len / 2);
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn input_tiles(
        s: &Shape,
        xd: &[f32],
        ty: usize,
        tx: std::ops::Range<usize>,
        v: &mut [f32],
        ldb: usize,
        vs: usize,
        t0: usize,
    ) {
        let (hp, lw, tw, c) = (s.hp(), s.lw(), s.tw(), s.c);
        let groups = tx.len().div_ceil(L);
        let x0 = tx.start;
        // Bounds of every access below: rows 2ty..2ty+3 of each channel's staged plane (each
        // 2 lw long; a load reads lanes up to lw + x0 + (groups - 1) L + 1 + 8 <= 2 lw, as
        // x0 + groups L <= tx.end + 7 <= tw + 7 < lw), and c rows of each of v's 16 planes (vs
        // apart) at columns t0 .. t0 + groups L.
        assert!(tx.end <= tw && x0 + groups * L < lw, "winograd: tile span");
        assert!(
            2 * ty + 4 <= hp && c * hp * 2 * lw <= xd.len(),
            "winograd: staged input"
        );
        assert!(
            t0 + groups * L <= ldb && c * ldb <= vs && 15 * vs + c * ldb <= v.len(),
            "winograd: V block"
        );
        let (xp, vp) = (xd.as_ptr(), v.as_mut_ptr());
        for ci in 0..c {
            let base = (ci * hp + 2 * ty) * 2 * lw;
            for l0 in (0..groups * L).step_by(L) {
                // SAFETY: within the bounds asserted above.
                unsafe {
                    // Row transform of the four input rows: d B, eight tiles per register.
                    let mut rt = [[_mm256_setzero_ps(); 4]; 4];
                    for (i, r) in rt.iter_mut().enumerate() {
                        let ev = xp.add(base + i * 2 * lw + x0 + l0);
                        let od = ev.add(lw);
                        *r = bt([
                            _mm256_loadu_ps(ev),
                            _mm256_loadu_ps(od),
                            _mm256_loadu_ps(ev.add(1)),
                            _mm256_loadu_ps(od.add(1)),
                        ]);
                    }
                    // Column transform: B^T (d B).
                    for q in 0..4 {
                        let col = bt([rt[0][q], rt[1][q], rt[2][q], rt[3][q]]);
                        for (p, &val) in col.iter().enumerate() {
                            _mm256_storeu_ps(vp.add((p * 4 + q) * vs + ci * ldb + t0 + l0), val);
                        }
                    }
                }
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn output_tiles(
        s: &Shape,
        prod: &[f32],
        mr: usize,
        ldb: usize,
        ps: usize,
        t0: usize,
        ty: usize,
        tx: std::ops::Range<usize>,
        y: &mut [f32],
        bias: Option<&[f32]>,
        (relu, pool2): (bool, bool),
    ) {
        let (ow, oh) = (s.ow, s.oh);
        if pool2 && 2 * ty + 1 >= oh {
            // A tile row cut by the output's end: no pooling window of its own.
            return;
        }
        let (pw, pool_w) = if pool2 {
            ((oh / 2) * (ow / 2), ow / 2)
        } else {
            (oh * ow, 0)
        };
        let groups = tx.len().div_ceil(L);
        let x0 = tx.start;
        assert!(tx.end <= s.tw(), "winograd: tile span");
        let rows = if 2 * ty + 1 < oh { 2 } else { 1 };
        assert!(2 * ty < oh && mr * pw <= y.len(), "winograd: output block");
        assert!(
            t0 + groups * L <= ldb && mr * ldb <= ps && 15 * ps + mr * ldb <= prod.len(),
            "winograd: product block"
        );
        if let Some(b) = bias {
            assert!(b.len() >= mr, "winograd: bias");
        }
        use super::super::maxpool2::x86::{interleave, store_first};
        let zero = _mm256_setzero_ps();
        let (pp, yp) = (prod.as_ptr(), y.as_mut_ptr());
        // Groups right to left: only the last group of a span can run past the span's end, and
        // unmasked, its spill lands on the row's later tiles or the next rows' first columns,
        // which are written after it (this span's group 0 for the next row, later spans for the
        // rest). A spill that would leave the plane, or reach columns that an earlier span
        // wrote, is cut off instead (`store_first`: masked stores are slow on some CPUs).
        for l0 in (0..groups * L).step_by(L).rev() {
            // Output columns 2 (x0 + l0) .. + 16, of which `cnt` exist.
            let cnt = (ow - 2 * (x0 + l0)).min(2 * L);
            // Pooled columns x0 + l0 .. + 8, of which `cnt_p` exist (tiles wholly inside).
            let cnt_p = pool_w.saturating_sub(x0 + l0).min(L);
            for co in 0..mr {
                let bv = _mm256_set1_ps(bias.map_or(0.0, |b| b[co]));
                // SAFETY: row co < mr of each of the 16 product planes (ps apart) at columns
                // below t0 + groups L <= ldb; output rows 2ty + a < oh, columns cut off at ow.
                unsafe {
                    let m = pp.add(co * ldb + t0 + l0);
                    let e = ps;
                    // Column transform A^T M (2 x 4), then the row transform of each row.
                    let mut cols = [[zero; 4]; 2];
                    for q in 0..4 {
                        let [a, b] = at([
                            _mm256_loadu_ps(m.add(q * e)),
                            _mm256_loadu_ps(m.add((4 + q) * e)),
                            _mm256_loadu_ps(m.add((8 + q) * e)),
                            _mm256_loadu_ps(m.add((12 + q) * e)),
                        ]);
                        cols[0][q] = a;
                        cols[1][q] = b;
                    }
                    if pool2 {
                        // The tile's four outputs (both rows: `2 ty + 1 < oh`, checked above)
                        // through the bias and ReLU, then their maximum: one pooled value per
                        // tile, eight tiles per register. MAXPS returns its second operand for a
                        // NaN, so a NaN output is the ReLU's 0, as `relu_pool_plane`'s.
                        let f = |v: __m256| _mm256_max_ps(_mm256_add_ps(v, bv), zero);
                        let [e0, o0] = at(cols[0]);
                        let [e1, o1] = at(cols[1]);
                        let best =
                            _mm256_max_ps(_mm256_max_ps(f(e0), f(o0)), _mm256_max_ps(f(e1), f(o1)));
                        let at_p = ty * pool_w + x0 + l0;
                        let out = yp.add(co * pw + at_p);
                        // The spill rule of the stores below, on the pooled rows.
                        if at_p + L <= pw && (x0 == 0 || cnt_p == L) {
                            _mm256_storeu_ps(out, best);
                        } else {
                            store_first(out, best, cnt_p);
                        }
                        continue;
                    }
                    for (a, col) in cols.iter().enumerate().take(rows) {
                        let [mut ev, mut od] = at(*col);
                        ev = _mm256_add_ps(ev, bv);
                        od = _mm256_add_ps(od, bv);
                        if relu {
                            ev = _mm256_max_ps(ev, zero);
                            od = _mm256_max_ps(od, zero);
                        }
                        let (first, second) = interleave(ev, od);
                        let row_at = (2 * ty + a) * ow + 2 * (x0 + l0);
                        let out = yp.add(co * pw + row_at);
                        // Past the row's end, the spill of a span that starts inside the row
                        // would land on the next output row's first columns, which an earlier
                        // span wrote: cut off.
                        if row_at + 2 * L <= pw && (x0 == 0 || cnt == 2 * L) {
                            _mm256_storeu_ps(out, first);
                            _mm256_storeu_ps(out.add(L), second);
                        } else {
                            store_first(out, first, cnt.min(L));
                            store_first(out.add(L), second, cnt.saturating_sub(L));
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::row_spans;

    /// The spans of a block are its tiles, in order, each inside one tile row, at consecutive
    /// block columns from 0: what the transforms' write order and spill rules rely on.
    #[test]
    fn row_spans_cover_the_block_in_order() {
        for tw in [1, 4, 7, 20, 28] {
            for b0 in [0, 1, 3, 7, 32, 45] {
                for nb in [1, 8, 32, 33, 64] {
                    let mut next = b0;
                    for r in row_spans(b0, nb, tw) {
                        assert!(!r.tx.is_empty() && r.tx.end <= tw, "{tw} {b0} {nb}");
                        assert_eq!(r.row * tw + r.tx.start, next, "{tw} {b0} {nb}");
                        assert_eq!(r.col, next - b0, "{tw} {b0} {nb}");
                        next += r.tx.len();
                    }
                    assert_eq!(next, b0 + nb, "{tw} {b0} {nb}");
                }
            }
        }
    }
}
