//! A register-blocked f32 GEMM (AVX2 + FMA, or AVX-512 where the CPU has it: see [`avx512`])
//! for the shapes convolutions produce: a weight
//! matrix with tens to hundreds of rows, packed once per call and reused for every sample,
//! times an im2col matrix (or an input plane) read in place.
//!
//! Why not only the `gemm` crate: it packs both operands on every call, which for a small
//! CNN's per-sample products (32 x 144 times 144 x 196 in the demo model's second
//! convolution) costs about as much as the arithmetic. Here the left operand is packed once
//! (panels of [`MR`] rows, interleaved by reduction index, so each step broadcasts from one
//! contiguous line) and the right operand is read where it lies; a 6 x 16 block of the product
//! lives in twelve registers through the whole reduction (blocked by [`KC`] so that the right
//! operand's strip stays in L1); with AVX-512, a 12 x 32 block (two panels) in twenty-four,
//! and a strip that many panels read, from rows far apart, is first copied to a contiguous
//! buffer (see [`STRIP_COPY_PANELS`] and [`STRIP_NEAR_BYTES`]).
//!
//! Determinism: every output element is reduced in increasing `k` order (one fused
//! multiply-add per step, KC blocks in order), independent of threads and of the position of
//! the element in its block. Callers split work by output blocks only.

/// Rows per packed panel (the register block's height).
pub(crate) const MR: usize = 6;
/// Lanes of one AVX register.
const LANES: usize = 8;
/// Columns of the register block (two registers): 6 x 2 accumulators, two loads of the right
/// operand and one broadcast fill fifteen of the sixteen AVX registers.
const NR: usize = 2 * LANES;
/// Panels per row block: a KC x (MC_PANELS * MR) block of the weights (96 KiB) stays in L2.
const MC_PANELS: usize = 16;
/// Fewest panels in a row block for the AVX-512 kernel to copy each strip of `b` to a
/// contiguous buffer before the panels read it: the copy costs one load and store per
/// register of `b`, which 4 panel pairs amortise (measured: 6 panels, the demo CNN's 32 x 222
/// x 144 product, lost 8% to it; 11 panels, ResNet-18's 64 x 3136 x 576, gained 1.4x).
const STRIP_COPY_PANELS: usize = 8;
/// Widest span (bytes, from the first float of a reduction block's nearest row of `b` to the
/// end of its furthest) whose strips are read in place rather than copied: one L1's worth.
/// Rows that close together cannot crowd a few L1 sets the way rows a multiple of 1 KiB apart
/// in a large matrix do, so the copy only costs. Measured in a standalone copy of this kernel
/// (one thread, alternating runs): the Winograd products (16 products of c x c x 32 tiles, rows
/// of `b` 40 floats apart) rose from 90-96 to 95-105 GFLOP/s at 64 channels, 90-99 to 104-105
/// at 128, 94-102 to 108-111 at 256 and 80-84 to 86-92 at 512.
const STRIP_NEAR_BYTES: usize = 32 << 10;
/// Longest reduction block: a `KC x 32` strip of the right operand (the AVX-512 kernel's;
/// 16 KiB) stays in L1 beside the panels' lines. At 256 (a 32 KiB strip, all of L1) the
/// products with long reductions ran 10-20% slower (ResNet's 256 x 196 x 2304: 86 against 102
/// GFLOP/s; the demo CNN's Linear layer, 64 x 128 x 1568: 88 against 101).
const KC: usize = 128;
/// The reduction block the buffers are sized for: `KC`, or the longer blocks a timing A/B
/// run switches to (`LONG_K`).
const KC_ALLOC: usize = 2 * KC;

/// The longest reduction block: `KC` (`2 KC` in a timing run's B side).
fn kc_max() -> usize {
    #[cfg(test)]
    if LONG_K.load(std::sync::atomic::Ordering::Relaxed) {
        return KC_ALLOC;
    }
    KC
}

/// The reduction blocks `(t0, kc)` of a `k`-long reduction: as few as `KC` allows, of equal
/// lengths (144 is two blocks of 72, not 128 and 16, whose second block would spend as much on
/// loading and storing the accumulators as on multiply-adds). Both kernels block the same way,
/// so they add in the same order.
pub(super) fn k_blocks(k: usize) -> impl Iterator<Item = (usize, usize)> {
    let kc = kc_max();
    let nb = k.div_ceil(kc).max(1);
    #[cfg(test)]
    let unbalanced = UNBALANCED_K.load(std::sync::atomic::Ordering::Relaxed);
    #[cfg(not(test))]
    let unbalanced = false;
    (0..nb).map(move |i| {
        if unbalanced {
            (i * kc, kc.min(k - i * kc))
        } else {
            balanced_block(k, nb, i)
        }
    })
}

/// Block `i` `(t0, len)` of a `k`-long reduction cut into `nb` blocks whose lengths differ by at
/// most one (the first ones longer).
fn balanced_block(k: usize, nb: usize, i: usize) -> (usize, usize) {
    let (base, extra) = (k / nb, k % nb);
    (i * base + i.min(extra), base + usize::from(i < extra))
}

/// A `k`-long reduction in as few blocks of at most `kc` steps as there can be, balanced as
/// [`k_blocks`]'s (whose blocks are these with `kc` = `KC`).
pub(super) fn balanced_blocks(k: usize, kc: usize) -> impl Iterator<Item = (usize, usize)> {
    let nb = k.div_ceil(kc).max(1);
    (0..nb).map(move |i| balanced_block(k, nb, i))
}

/// Test-only switch to blocks of `2 KC`, for the timing tool's A/B runs.
#[cfg(test)]
pub(crate) static LONG_K: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Test-only switch to blocks of `KC` and a remainder, for the timing tool's A/B runs.
#[cfg(test)]
pub(crate) static UNBALANCED_K: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Whether this CPU runs the kernel (callers fall back to the `gemm` crate otherwise).
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Reduction steps a full panel is packed in at a time (6 KiB of panel).
const PACK_BLOCK: usize = 256;

/// The left operand (`m x k`), packed in panels of [`MR`] rows: element (i, t) of panel
/// `p = i / MR` is at `data[(p * k + t) * MR + i % MR]`; the rows past `m` in the last panel are
/// zero.
pub(crate) struct PackedA {
    data: Vec<f32>,
    m: usize,
    k: usize,
}

impl PackedA {
    /// Packs `a`, whose element (i, t) is `a[i * rs + t * cs]`.
    pub fn new(m: usize, k: usize, a: &[f32], rs: usize, cs: usize) -> PackedA {
        let panels = m.div_ceil(MR);
        // Contiguous rows (`cs == 1`, a layer's weights or a batch of activations) are read in
        // order and scattered into their panel's lanes without bounds checks, a block of
        // reduction steps at a time for all the panel's rows, so each block of the panel is
        // written while in L1. Packing the demo CNN's Linear input per call cost 4% of its
        // forward indexed element by element, 3.9% row by row over the whole panel (37 KiB,
        // through L1 six times), 2.7% in blocks.
        let mut data = vec![0.0f32; panels * k * MR];
        if k > 0 {
            for (p, panel) in data.chunks_exact_mut(k * MR).enumerate() {
                let rows = MR.min(m - p * MR);
                if cs == 1 {
                    let blocks = (0..k).step_by(PACK_BLOCK);
                    for (t0, block) in blocks.zip(panel.chunks_mut(PACK_BLOCK * MR)) {
                        for r in 0..rows {
                            let i = p * MR + r;
                            let row = &a[i * rs + t0..i * rs + k];
                            for (lane, &v) in block.chunks_exact_mut(MR).zip(row) {
                                lane[r] = v;
                            }
                        }
                    }
                } else {
                    for r in 0..rows {
                        let i = p * MR + r;
                        for (t, lane) in panel.chunks_exact_mut(MR).enumerate() {
                            lane[r] = a[i * rs + t * cs];
                        }
                    }
                }
            }
        }
        PackedA { data, m, k }
    }
}

/// `c (m x n, row stride ldc) = a * b`, with `b` (`k x n`) row-major with row stride `ldb`.
///
/// Panics when a view reaches outside its slice or the CPU lacks AVX2/FMA (check
/// [`available`] first); both make the kernel's raw-pointer loads sound.
pub(crate) fn gemm_packed(a: &PackedA, b: &[f32], ldb: usize, n: usize, c: &mut [f32], ldc: usize) {
    assert!(n <= ldb || a.k <= 1, "sgemm: rows of b overlap");
    let offs: Vec<usize> = (0..a.k).map(|t| t * ldb).collect();
    gemm_rows(a, b, &offs, n, c, ldc);
}

/// `c (m x n, row stride ldc) = a * b`, where row `t` of `b` is `b[offs[t]..offs[t] + n]`.
///
/// The rows may overlap: a stride-1 convolution reads its input plane in place, row
/// `(ci, ky, kx)` being the padded plane shifted by `ky * wp + kx` (see `conv::direct`), so
/// no im2col copy is made.
///
/// Panics when a row reaches outside `b`, `c` is too short, or the CPU lacks AVX2/FMA (check
/// [`available`] first); these make the kernel's raw-pointer accesses sound.
pub(crate) fn gemm_rows(
    a: &PackedA,
    b: &[f32],
    offs: &[usize],
    n: usize,
    c: &mut [f32],
    ldc: usize,
) {
    gemm_rows_isa(a, b, offs, n, c, ldc, avx512());
}

/// [`gemm_rows`] on the AVX-512 kernel when `wide` (and the CPU has it), else on the AVX2 one.
fn gemm_rows_isa(
    a: &PackedA,
    b: &[f32],
    offs: &[usize],
    n: usize,
    c: &mut [f32],
    ldc: usize,
    wide: bool,
) {
    let (m, k) = (a.m, a.k);
    assert_eq!(offs.len(), k, "sgemm: one offset per row of b");
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        n <= ldc && (m - 1) * ldc + n <= c.len(),
        "sgemm: c out of bounds"
    );
    if k == 0 {
        for i in 0..m {
            c[i * ldc..i * ldc + n].fill(0.0);
        }
        return;
    }
    assert!(
        offs.iter()
            .all(|&o| o.checked_add(n).is_some_and(|e| e <= b.len())),
        "sgemm: b out of bounds"
    );
    assert!(available(), "sgemm: the CPU lacks AVX2/FMA");
    #[cfg(target_arch = "x86_64")]
    if wide && avx512() {
        // SAFETY: AVX-512F is present (checked), and the asserts above bound every access, as
        // for the AVX2 kernel below; the last vector of a block is loaded and stored masked.
        unsafe { x86::gemm_rows_avx512(a, b, offs, n, c, ldc) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX2 and FMA are present (asserted), and the asserts above bound every access the
    // kernel makes: `n` elements from each `offs[t]` in `b`, rows `< m` of `c` at columns
    // `< n`, and the packed panels hold `panels * k * MR` elements by construction.
    unsafe {
        x86::gemm_rows_avx2(a, b, offs, n, c, ldc)
    }
}

/// Test-only switch to the AVX2 kernels on a CPU with AVX-512, so both are tested there.
#[cfg(test)]
pub(crate) static FORCE_AVX2: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Test-only switch off the AVX-512 kernel's strip copy, for the timing tool's A/B runs.
#[cfg(test)]
pub(crate) static NO_STRIP: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);
/// Test-only switch to copying strips however close their rows (the earlier rule), for the
/// timing tool's A/B runs.
#[cfg(test)]
pub(crate) static COPY_NEAR: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);
/// Whether a test switched [`COPY_NEAR`] on (always false outside tests).
fn copy_near() -> bool {
    #[cfg(test)]
    return COPY_NEAR.load(std::sync::atomic::Ordering::Relaxed);
    #[cfg(not(test))]
    false
}

/// Offsets of the rows of a copied strip `width` floats wide (`i * width`), one per reduction
/// step a block can have: what the kernels read a copied strip with.
const fn strip_offsets<const WIDTH: usize>() -> [usize; KC_ALLOC] {
    let mut o = [0; KC_ALLOC];
    let mut i = 0;
    while i < KC_ALLOC {
        o[i] = i * WIDTH;
        i += 1;
    }
    o
}

/// Whether a reduction block's rows of the right operand (`rows_off`, read `width` floats wide)
/// lie too far apart to be read in place (see [`STRIP_NEAR_BYTES`]).
fn strips_far(rows_off: &[usize], width: usize) -> bool {
    let lo = rows_off.iter().min().copied().unwrap_or(0);
    let hi = rows_off.iter().max().copied().unwrap_or(0);
    (hi - lo + width) * 4 > STRIP_NEAR_BYTES || copy_near()
}

/// A zeroed buffer for strips `width` floats wide of a `k`-long reduction, and the floats
/// from its start to the first 64-byte line, where the copied rows begin.
fn strip_buffer(k: usize, width: usize) -> (Vec<f32>, usize) {
    // A line's worth (16 floats) more: the lead is under 16.
    let buf = vec![0.0f32; KC_ALLOC.min(k) * width + 16];
    let lead = strip_lead(buf.as_ptr());
    (buf, lead)
}

/// Floats from `p` to the next 64-byte boundary (0 to 15), where a register's load or store
/// touches one cache line, not two. Measured in a standalone copy of this kernel, on
/// Winograd-shaped products with rows of `b` 48 floats apart: 121-128 GFLOP/s with the rows on
/// line boundaries, 90-103 with them 32 bytes off.
pub(super) fn line_lead(p: *const f32) -> usize {
    (16 - (p as usize / 4) % 16) % 16
}

/// Where the strip copy's rows start in a buffer at `p`: on a line ([`line_lead`]), unless a
/// timing A/B run switched that off.
fn strip_lead(p: *const f32) -> usize {
    #[cfg(test)]
    if UNALIGNED_STRIP.load(std::sync::atomic::Ordering::Relaxed) {
        return 0;
    }
    line_lead(p)
}

/// Test-only switch to strips wherever the allocator puts them, for the timing tool's A/B runs.
#[cfg(test)]
pub(crate) static UNALIGNED_STRIP: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Test-only switch off the AVX2 kernel's short-panel variants, for timing A/B runs.
#[cfg(test)]
pub(crate) static NO_SHORT_PANELS: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Whether the AVX2 kernel reduces a short last panel's rows only (always, outside timing A/B
/// runs).
fn short_panels() -> bool {
    #[cfg(test)]
    return !NO_SHORT_PANELS.load(std::sync::atomic::Ordering::Relaxed);
    #[cfg(not(test))]
    true
}

/// Test-only switch off the AVX2 kernel's one-row variant, for timing A/B runs.
#[cfg(test)]
pub(crate) static NO_ONE_ROW: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Whether the AVX2 kernel takes a one-row product on its one-row variant (always, outside
/// timing A/B runs).
fn one_row() -> bool {
    #[cfg(test)]
    return !NO_ONE_ROW.load(std::sync::atomic::Ordering::Relaxed);
    #[cfg(not(test))]
    true
}

/// Whether a test turned the strip copy off (always false outside tests).
pub(super) fn no_strip() -> bool {
    #[cfg(test)]
    return NO_STRIP.load(std::sync::atomic::Ordering::Relaxed);
    #[cfg(not(test))]
    false
}

/// Panels ahead of the one being computed whose block the AVX2 kernel prefetches. Measured on
/// ResNet-18 (a Zen 3 core; in-process A/B alternating call by call, best / median call): one
/// core at batch 2, 76.4 / 85.1 against 78.0 / 87.9 ms and 100.5 / 103.9 against 101.3 / 106.2;
/// two threads at batch 4, 98.3 / 111.7 against 102.1 / 113.0 and 100.3 / 105.6 against 98.3 /
/// 109.5. Four panels ahead measured no better; the small CNN is unchanged (1.94-1.97 ms either
/// way).
const PREFETCH_AHEAD: usize = 2;

/// Whether the AVX2 panel kernel prefetches panels (always, outside timing A/B runs).
fn prefetch_a() -> bool {
    #[cfg(test)]
    return !NO_PREFETCH_A.load(std::sync::atomic::Ordering::Relaxed);
    #[cfg(not(test))]
    true
}

/// Test-only switch off the AVX2 panel kernel's prefetch, for timing A/B runs.
#[cfg(test)]
pub(crate) static NO_PREFETCH_A: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Whether the AVX-512 kernels run: twice the lanes per instruction (and per FMA port on the
/// server cores that have them), and masked loads and stores for column tails. Both kernel
/// sets reduce every element in the same order, so they give identical results.
pub(crate) fn avx512() -> bool {
    #[cfg(test)]
    if FORCE_AVX2.load(std::sync::atomic::Ordering::Relaxed) {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `c (m x n, row stride ldc) = a * b^T` with both operands stored by rows of length `k`
/// (`a[i * lda + t]`, `b[j * ldb + t]`): PyTorch's `Linear` as ONNX exports it (`Gemm` with
/// `transB`). Dot products vectorised along `k`, a 4 x 3 block of them in twelve registers, so
/// neither operand is packed or transposed.
///
/// Each element is reduced in a fixed order (eight lane sums over `k` in steps of eight, then
/// the lanes, then the `k % 8` tail), whatever the block it falls in.
///
/// Panics when a view reaches outside its slice or the CPU lacks AVX2/FMA.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_nt(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
) {
    gemm_nt_isa(m, n, k, a, lda, b, ldb, c, ldc, avx512());
}

/// [`gemm_nt`] on the AVX-512 kernel when `wide` (and the CPU has it), else on the AVX2 one.
#[allow(clippy::too_many_arguments)]
fn gemm_nt_isa(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    wide: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        n <= ldc && (m - 1) * ldc + n <= c.len(),
        "sgemm_nt: c out of bounds"
    );
    assert!(
        k <= lda && (m - 1) * lda + k <= a.len(),
        "sgemm_nt: a out of bounds"
    );
    assert!(
        k <= ldb && (n - 1) * ldb + k <= b.len(),
        "sgemm_nt: b out of bounds"
    );
    assert!(available(), "sgemm_nt: the CPU lacks AVX2/FMA");
    #[cfg(target_arch = "x86_64")]
    if wide && avx512() {
        // SAFETY: AVX-512F is present (checked); the asserts above bound every access, as for
        // the AVX2 kernel below (the `k % 16` tail is loaded under a mask).
        unsafe {
            x86::gemm_nt_avx512(
                m,
                n,
                k,
                a.as_ptr(),
                lda,
                b.as_ptr(),
                ldb,
                c.as_mut_ptr(),
                ldc,
            )
        };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX2 and FMA are present and the asserts above bound every row the kernel reads
    // (k elements of rows < m of a and rows < n of b) and writes (columns < n of rows < m of c).
    unsafe {
        x86::gemm_nt_avx2(
            m,
            n,
            k,
            a.as_ptr(),
            lda,
            b.as_ptr(),
            ldb,
            c.as_mut_ptr(),
            ldc,
        )
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{KC_ALLOC, LANES, MC_PANELS, MR, NR, PREFETCH_AHEAD, PackedA};
    use std::arch::x86_64::*;

    /// See [`super::gemm_rows`], whose asserts are this function's preconditions.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn gemm_rows_avx2(
        a: &PackedA,
        b: &[f32],
        offs: &[usize],
        n: usize,
        c: &mut [f32],
        ldc: usize,
    ) {
        let (m, k) = (a.m, a.k);
        if m == 1 && n >= ROW_COLS && super::one_row() {
            // A single row (the input gradient of a one-channel image's first convolution, on
            // every attack step): the panel kernels keep two column registers, so two
            // accumulation chains, and spend their time waiting on the FMA's latency; eight
            // registers of columns keep the FMA units busy. Reduction order as below (each
            // block of k in sequence, its sum then added to the earlier blocks'), so the
            // result is the same to the bit.
            let wide = n / ROW_COLS * ROW_COLS;
            for (t0, kc) in super::k_blocks(k) {
                for j0 in (0..wide).step_by(ROW_COLS) {
                    // SAFETY: the panel holds k*MR floats (row 0 at every MR-th); b's rows
                    // hold n >= j0 + ROW_COLS floats from each offset and c's one row n
                    // floats (the caller's asserts).
                    unsafe {
                        micro_row(
                            a.data.as_ptr().add(t0 * MR),
                            b.as_ptr().add(j0),
                            &offs[t0..t0 + kc],
                            c.as_mut_ptr().add(j0),
                            t0 > 0,
                        )
                    };
                }
            }
            if wide < n {
                // SAFETY: as for this call; the offsets still reach `n - wide` floats of the
                // shifted rows, and c's row holds them. Fewer than ROW_COLS columns: the call
                // takes the panel path below.
                unsafe { gemm_rows_avx2(a, &b[wide..], offs, n - wide, &mut c[wide..], ldc) };
            }
            return;
        }
        let panels = m.div_ceil(MR);
        let (bp, cp, ap) = (b.as_ptr(), c.as_mut_ptr(), a.data.as_ptr());
        // The column tail's zero-padded strip and its row offsets, made once per call (not per
        // panel): lanes past `rem` only ever hold earlier columns' values, which no stored lane
        // depends on.
        let (mut strip, local) = if n.is_multiple_of(LANES) {
            (Vec::new(), Vec::new())
        } else {
            (
                vec![0.0f32; KC_ALLOC * LANES],
                (0..KC_ALLOC).map(|t| t * LANES).collect(),
            )
        };
        const STRIP_OFFS: [usize; KC_ALLOC] = super::strip_offsets::<NR>();
        // Whole strips read by many panels from rows far apart are copied first, as the
        // AVX-512 kernel does (see there): a Linear layer's transposed weights have rows 512
        // bytes apart (128 outputs), eight L1 sets for a strip's 121 rows, and the kernel's
        // loads of them stalled on L2 (the small CNN's 64 x 128 x 1568 product on a Zen 3
        // core: 0.39 against 0.29 ms).
        let mut bstrip: Vec<f32> = Vec::new();
        let mut lead = 0;
        let copy = panels.min(MC_PANELS) >= super::STRIP_COPY_PANELS && !super::no_strip();
        let prefetch = super::prefetch_a();
        // Goto's loop order: a KC x MC block of the packed weights stays in L2 while every NR
        // strip of the right operand (at most KC x 16, in L1) meets its MC/MR panels.
        for (t0, kc) in super::k_blocks(k) {
            let acc = t0 > 0;
            let rows_off = &offs[t0..t0 + kc];
            let far = copy && super::strips_far(rows_off, NR);
            for p0 in (0..panels).step_by(MC_PANELS) {
                let p1 = panels.min(p0 + MC_PANELS);
                for j0 in (0..n).step_by(NR) {
                    let nb = NR.min(n - j0);
                    let (nv, rem) = (nb / LANES, nb % LANES);
                    let (bsrc, boffs) = if far && nv == 2 && p1 - p0 >= super::STRIP_COPY_PANELS {
                        if bstrip.is_empty() {
                            (bstrip, lead) = super::strip_buffer(k, NR);
                        }
                        for (i, &o) in rows_off.iter().enumerate() {
                            // SAFETY: row `o` holds NR floats from `j0` (nv == 2: a whole
                            // strip; the caller's bounds); the buffer holds KC_ALLOC rows of NR
                            // after `lead < 16`.
                            unsafe {
                                let src = bp.add(o + j0);
                                let dst = bstrip.as_mut_ptr().add(lead + i * NR);
                                _mm256_storeu_ps(dst, _mm256_loadu_ps(src));
                                _mm256_storeu_ps(dst.add(LANES), _mm256_loadu_ps(src.add(LANES)));
                            }
                        }
                        (bstrip.as_ptr().wrapping_add(lead), &STRIP_OFFS[..kc])
                    } else {
                        (bp.wrapping_add(j0), rows_off)
                    };
                    for p in p0..p1 {
                        let rows = MR.min(m - p * MR);
                        if prefetch && j0 == 0 && p + PREFETCH_AHEAD < p1 {
                            // The first strip of a block brings its panels from memory: ask for
                            // a later panel's block ahead of its use. Each is kc * MR floats,
                            // far from the previous one (panels are k * MR apart), too short a
                            // run for the hardware prefetchers to start on.
                            let next = ap.wrapping_add(((p + PREFETCH_AHEAD) * k + t0) * MR);
                            // A prefetch only hints (it faults on no address); these are
                            // inside the packed panels (panel p + PREFETCH_AHEAD < panels).
                            for line in (0..kc * MR).step_by(16) {
                                _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(line).cast());
                            }
                        }
                        // SAFETY (all calls below): the panel slice starts at (p*k + t0)*MR and
                        // the kernel reads kc*MR elements of it; b's rows at columns j0..j0+nb
                        // (or the strip copy's kc rows of NR) and c's rows p*MR..p*MR+rows at
                        // the same columns are in bounds by the caller's asserts.
                        unsafe {
                            let a_blk = ap.add((p * k + t0) * MR);
                            let b_blk = bp.add(j0);
                            let c_blk = cp.add(p * MR * ldc + j0);
                            match nv {
                                // A short last panel (every power-of-two row count ends in
                                // one of two or four rows) reduces only the rows it has.
                                2 if rows <= 2 && super::short_panels() => {
                                    micro_short::<2>(a_blk, bsrc, boffs, c_blk, ldc, rows, acc)
                                }
                                2 if rows <= 4 && super::short_panels() => {
                                    micro_short::<4>(a_blk, bsrc, boffs, c_blk, ldc, rows, acc)
                                }
                                2 => micro::<2>(a_blk, bsrc, boffs, c_blk, ldc, rows, acc),
                                1 => micro::<1>(a_blk, b_blk, rows_off, c_blk, ldc, rows, acc),
                                _ => {}
                            }
                            if rem > 0 {
                                let off = nv * LANES;
                                tail(
                                    a_blk,
                                    b_blk.add(off),
                                    rows_off,
                                    &mut strip,
                                    &local,
                                    c_blk.add(off),
                                    ldc,
                                    rows,
                                    rem,
                                    acc,
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// See [`super::gemm_nt`], whose asserts are this function's preconditions.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn gemm_nt_avx2(
        m: usize,
        n: usize,
        k: usize,
        a: *const f32,
        lda: usize,
        b: *const f32,
        ldb: usize,
        c: *mut f32,
        ldc: usize,
    ) {
        const BM: usize = 4;
        const BN: usize = 3;
        let kv = k / LANES * LANES;
        // Blocks of `b`'s rows outermost: they stay in L1 while every row of `a` (a batch of
        // samples, L2-sized) meets them, so a weight matrix larger than L2 (a fully connected
        // layer's) is read from memory once per call, not once per block of samples.
        for j0 in (0..n).step_by(BN) {
            let jn = BN.min(n - j0);
            for i0 in (0..m).step_by(BM) {
                let im = BM.min(m - i0);
                // SAFETY: rows i0 + min(r, im - 1) < m of a and j0 + min(q, jn - 1) < n of b.
                let (ar, br) = unsafe {
                    (
                        block_rows::<BM>(a, i0, im, lda),
                        block_rows::<BN>(b, j0, jn, ldb),
                    )
                };
                // SAFETY: every load is at t + 8 <= kv <= k within a row the caller bounds.
                unsafe {
                    let mut acc = [[_mm256_setzero_ps(); BN]; BM];
                    for t in (0..kv).step_by(LANES) {
                        let bv: [__m256; BN] =
                            std::array::from_fn(|q| _mm256_loadu_ps(br[q].add(t)));
                        for r in 0..BM {
                            let av = _mm256_loadu_ps(ar[r].add(t));
                            for q in 0..BN {
                                acc[r][q] = _mm256_fmadd_ps(av, bv[q], acc[r][q]);
                            }
                        }
                    }
                    for r in 0..im {
                        for q in 0..jn {
                            let mut lanes = [0.0f32; LANES];
                            _mm256_storeu_ps(lanes.as_mut_ptr(), acc[r][q]);
                            let mut sum = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
                                + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
                            for t in kv..k {
                                sum = (*ar[r].add(t)).mul_add(*br[q].add(t), sum);
                            }
                            *c.add((i0 + r) * ldc + j0 + q) = sum;
                        }
                    }
                }
            }
        }
    }

    /// Pointers to rows `first .. first + N` of a matrix (row stride `stride`), where rows past
    /// the `valid` ones repeat the last valid one (computed, not stored).
    ///
    /// # Safety
    /// Rows `first .. first + valid` (`valid >= 1`) must lie within the allocation at `p`.
    #[inline(always)]
    unsafe fn block_rows<const N: usize>(
        p: *const f32,
        first: usize,
        valid: usize,
        stride: usize,
    ) -> [*const f32; N] {
        // SAFETY: row first + min(r, valid - 1) is one of the valid rows (the caller's bound).
        std::array::from_fn(|r| unsafe { p.add((first + r.min(valid - 1)) * stride) })
    }

    /// The AVX-512 twin of [`gemm_nt_avx2`]: sixteen lanes, a 4 x 4 block of dot products,
    /// the `k % 16` tail loaded under a mask (zeros past `k`), so each element is the sum of
    /// sixteen lane sums over `k` in steps of sixteen, added in a fixed tree.
    ///
    /// See [`super::gemm_nt`], whose asserts are this function's preconditions.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn gemm_nt_avx512(
        m: usize,
        n: usize,
        k: usize,
        a: *const f32,
        lda: usize,
        b: *const f32,
        ldb: usize,
        c: *mut f32,
        ldc: usize,
    ) {
        const W: usize = 16;
        const BM: usize = 4;
        const BN: usize = 4;
        let kv = k / W * W;
        let tail: __mmask16 = ((1u32 << (k - kv)) - 1) as __mmask16;
        // The loop order of `gemm_nt_avx2`: blocks of `b`'s rows outermost.
        for j0 in (0..n).step_by(BN) {
            let jn = BN.min(n - j0);
            for i0 in (0..m).step_by(BM) {
                let im = BM.min(m - i0);
                // SAFETY: rows i0 + min(r, im - 1) < m of a and j0 + min(q, jn - 1) < n of b.
                let (ar, br) = unsafe {
                    (
                        block_rows::<BM>(a, i0, im, lda),
                        block_rows::<BN>(b, j0, jn, ldb),
                    )
                };
                // SAFETY: full loads end at t + 16 <= kv <= k, the masked one reads lanes
                // below k only, within rows the caller bounds.
                unsafe {
                    let mut acc = [[_mm512_setzero_ps(); BN]; BM];
                    let mut step = |t: usize, mask: __mmask16| {
                        let bv: [__m512; BN] =
                            std::array::from_fn(|q| _mm512_maskz_loadu_ps(mask, br[q].add(t)));
                        for r in 0..BM {
                            let av = _mm512_maskz_loadu_ps(mask, ar[r].add(t));
                            for q in 0..BN {
                                acc[r][q] = _mm512_fmadd_ps(av, bv[q], acc[r][q]);
                            }
                        }
                    };
                    for t in (0..kv).step_by(W) {
                        step(t, !0);
                    }
                    if kv < k {
                        step(kv, tail);
                    }
                    for r in 0..im {
                        for q in 0..jn {
                            let mut l = [0.0f32; W];
                            _mm512_storeu_ps(l.as_mut_ptr(), acc[r][q]);
                            let h: [f32; 8] = std::array::from_fn(|i| l[i] + l[i + 8]);
                            let sum =
                                ((h[0] + h[4]) + (h[1] + h[5])) + ((h[2] + h[6]) + (h[3] + h[7]));
                            *c.add((i0 + r) * ldc + j0 + q) = sum;
                        }
                    }
                }
            }
        }
    }

    /// The AVX-512 twin of [`gemm_rows_avx2`]: the same loop nest and reduction order, blocks
    /// of up to 32 columns (two 16-lane registers) by two panels (24 accumulators), the last
    /// register of a block loaded and stored under a mask, so no column tail needs a padded
    /// copy. (Four registers by one panel measured slower: their `KC x 64` strip of `b`
    /// overflows L1.)
    ///
    /// See [`super::gemm_rows`], whose asserts are this function's preconditions.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn gemm_rows_avx512(
        a: &PackedA,
        b: &[f32],
        offs: &[usize],
        n: usize,
        c: &mut [f32],
        ldc: usize,
    ) {
        const W: usize = 16;
        const NR5: usize = 2 * W;
        let (m, k) = (a.m, a.k);
        let panels = m.div_ceil(MR);
        let (bp, cp, ap) = (b.as_ptr(), c.as_mut_ptr(), a.data.as_ptr());
        const STRIP_OFFS: [usize; KC_ALLOC] = super::strip_offsets::<NR5>();
        // Allocated (and zeroed) at the first strip copied: small products call this often.
        let mut strip = Vec::new();
        let mut lead = 0;
        let copy = panels.min(MC_PANELS) >= super::STRIP_COPY_PANELS && !super::no_strip();
        for (t0, kc) in super::k_blocks(k) {
            let acc = t0 > 0;
            let rows_off = &offs[t0..t0 + kc];
            // Only looked at where a strip may be copied: small products call this often.
            let far = copy && super::strips_far(rows_off, NR5);
            for p0 in (0..panels).step_by(MC_PANELS) {
                let p1 = panels.min(p0 + MC_PANELS);
                for j0 in (0..n).step_by(NR5) {
                    let nb = NR5.min(n - j0);
                    let nv = nb.div_ceil(W);
                    let rem = nb - (nv - 1) * W;
                    let mask: __mmask16 = if rem == W { !0 } else { (1 << rem) - 1 };
                    // The strip copied to a contiguous buffer when several panel pairs read
                    // it: rows of `b` whose distance is a multiple of 1 KiB or so (an im2col
                    // matrix of 3136 or 12544 columns) fall into a few L1 sets, and re-reading
                    // them from L2 stalled the kernel (31 against 60 GFLOP/s).
                    let (bsrc, boffs) = if far && p1 - p0 >= super::STRIP_COPY_PANELS {
                        if strip.is_empty() {
                            (strip, lead) = super::strip_buffer(k, NR5);
                        }
                        for (i, &o) in rows_off.iter().enumerate() {
                            // SAFETY: row `o` holds `nb` floats from `j0` (the caller's bounds);
                            // the strip buffer holds KC_ALLOC rows of NR5 after `lead < W`.
                            unsafe {
                                let src = bp.add(o + j0);
                                let dst = strip.as_mut_ptr().add(lead + i * NR5);
                                if nv == 2 {
                                    _mm512_storeu_ps(dst, _mm512_loadu_ps(src));
                                    _mm512_storeu_ps(
                                        dst.add(W),
                                        _mm512_maskz_loadu_ps(mask, src.add(W)),
                                    );
                                } else {
                                    _mm512_storeu_ps(dst, _mm512_maskz_loadu_ps(mask, src));
                                }
                            }
                        }
                        (strip.as_ptr().wrapping_add(lead), &STRIP_OFFS[..kc])
                    } else {
                        (bp.wrapping_add(j0), rows_off)
                    };
                    // Panels in pairs: twelve rows share each load of `b` (24 accumulators),
                    // which halves the loads per multiply-add that bound the six-row kernel.
                    let mut p = p0;
                    while p < p1 {
                        let pair = p + 1 < p1;
                        let rows =
                            MR.min(m - p * MR) + if pair { MR.min(m - (p + 1) * MR) } else { 0 };
                        // SAFETY (all calls): as in `gemm_rows_avx2`, for panel p (and p + 1 <
                        // panels when paired: its rows follow panel p's in `c`); the last
                        // register covers only the `rem` columns its mask enables.
                        unsafe {
                            let a0 = ap.add((p * k + t0) * MR);
                            let c_blk = cp.add(p * MR * ldc + j0);
                            let blk = Block512 {
                                b: bsrc,
                                offs: boffs,
                                c: c_blk,
                                ldc,
                                rows,
                                accumulate: acc,
                                mask,
                            };
                            if pair {
                                blk.run([a0, ap.add(((p + 1) * k + t0) * MR)], nv);
                            } else {
                                blk.run([a0], nv);
                            }
                        }
                        p += if pair { 2 } else { 1 };
                    }
                }
            }
        }
    }

    /// The operands of one [`micro512`] call but its panels and register count.
    struct Block512<'a> {
        b: *const f32,
        offs: &'a [usize],
        c: *mut f32,
        ldc: usize,
        rows: usize,
        accumulate: bool,
        mask: __mmask16,
    }

    impl Block512<'_> {
        /// [`micro512`] on panels `a` with `nv` (1 or 2) registers of columns.
        ///
        /// # Safety
        /// As [`micro512`]'s, for `nv` registers.
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn run<const P: usize>(&self, a: [*const f32; P], nv: usize) {
            let Block512 {
                b,
                offs,
                c,
                ldc,
                rows,
                accumulate,
                mask,
            } = *self;
            // The last panel's rows that are in the product: a partial panel (16 or 32 rows are
            // 2 2/3 and 5 1/3 panels of six) computes only those, which spares the demo CNN's
            // convolutions an eighth of their multiply-adds.
            let last = rows.saturating_sub((P - 1) * MR).clamp(1, MR);
            macro_rules! go {
                ($nv:literal) => {
                    match last {
                        1 => micro512::<P, $nv, 1>(a, b, offs, c, ldc, rows, accumulate, mask),
                        2 => micro512::<P, $nv, 2>(a, b, offs, c, ldc, rows, accumulate, mask),
                        3 => micro512::<P, $nv, 3>(a, b, offs, c, ldc, rows, accumulate, mask),
                        4 => micro512::<P, $nv, 4>(a, b, offs, c, ldc, rows, accumulate, mask),
                        5 => micro512::<P, $nv, 5>(a, b, offs, c, ldc, rows, accumulate, mask),
                        _ => micro512::<P, $nv, MR>(a, b, offs, c, ldc, rows, accumulate, mask),
                    }
                };
            }
            // SAFETY: the caller's guarantees are micro512's.
            unsafe { if nv == 2 { go!(2) } else { go!(1) } }
        }
    }

    /// One `P*MR x NV*16` block (`P` packed panels, whose rows follow each other in `c`)
    /// whose last register holds the columns of `mask`:
    /// `c[r][j] (+)= sum_t a[t*MR + r] * b[offs[t] + j]`, rows `< rows` stored; of the last
    /// panel only the first `LAST` rows are computed (`rows <= (P - 1) * MR + LAST`).
    #[inline]
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn micro512<const P: usize, const NV: usize, const LAST: usize>(
        a: [*const f32; P],
        b: *const f32,
        offs: &[usize],
        c: *mut f32,
        ldc: usize,
        rows: usize,
        accumulate: bool,
        mask: __mmask16,
    ) {
        const W: usize = 16;
        // SAFETY: the caller guarantees offs.len()*MR readable floats at each `a[i]`, (NV-1)*16
        // floats plus the masked lanes of the last register at `b + offs[t]` for every t, and
        // `rows` rows of as many floats at `c` (stride ldc); masked-off lanes are neither read
        // nor written.
        debug_assert!(rows <= (P - 1) * MR + LAST, "micro512: rows past LAST");
        // Rows computed in panel `pi`.
        let height = |pi: usize| if pi + 1 == P { LAST } else { MR };
        unsafe {
            let mut acc = [[[_mm512_setzero_ps(); NV]; MR]; P];
            for (t, &o) in offs.iter().enumerate() {
                let brow = b.add(o);
                let mut bv = [_mm512_setzero_ps(); NV];
                for (v, x) in bv.iter_mut().enumerate() {
                    *x = if v + 1 < NV {
                        _mm512_loadu_ps(brow.add(v * W))
                    } else {
                        _mm512_maskz_loadu_ps(mask, brow.add(v * W))
                    };
                }
                for (pi, (pa, accp)) in a.iter().zip(acc.iter_mut()).enumerate() {
                    let arow = pa.add(t * MR);
                    for (r, accr) in accp.iter_mut().enumerate().take(height(pi)) {
                        let av = _mm512_set1_ps(*arow.add(r));
                        for v in 0..NV {
                            accr[v] = _mm512_fmadd_ps(av, bv[v], accr[v]);
                        }
                    }
                }
            }
            for (pi, accp) in acc.iter().enumerate() {
                for (r, accr) in accp.iter().enumerate() {
                    let row = pi * MR + r;
                    if row >= rows {
                        break;
                    }
                    let crow = c.add(row * ldc);
                    for (v, &x) in accr.iter().enumerate() {
                        let dst = crow.add(v * W);
                        let m = if v + 1 < NV { !0 } else { mask };
                        let val = if accumulate {
                            _mm512_add_ps(_mm512_maskz_loadu_ps(m, dst), x)
                        } else {
                            x
                        };
                        _mm512_mask_storeu_ps(dst, m, val);
                    }
                }
            }
        }
    }

    /// One `MR x NV*8` block: `c[r][j] (+)= sum_t a[t*MR + r] * b[t*ldb + j]`, rows `< rows`
    /// stored.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn micro<const NV: usize>(
        a: *const f32,
        b: *const f32,
        offs: &[usize],
        c: *mut f32,
        ldc: usize,
        rows: usize,
        accumulate: bool,
    ) {
        // SAFETY: the caller guarantees offs.len()*MR readable floats at `a`, NV*8 floats at
        // `b + offs[t]` for every t, and `rows` rows of NV*8 floats at `c` (stride ldc).
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); NV]; MR];
            for (t, &o) in offs.iter().enumerate() {
                let brow = b.add(o);
                let mut bv = [_mm256_setzero_ps(); NV];
                for (v, x) in bv.iter_mut().enumerate() {
                    *x = _mm256_loadu_ps(brow.add(v * LANES));
                }
                let arow = a.add(t * MR);
                for (r, accr) in acc.iter_mut().enumerate() {
                    let av = _mm256_broadcast_ss(&*arow.add(r));
                    for v in 0..NV {
                        accr[v] = _mm256_fmadd_ps(av, bv[v], accr[v]);
                    }
                }
            }
            for (r, accr) in acc.iter().enumerate().take(rows) {
                let crow = c.add(r * ldc);
                for (v, &x) in accr.iter().enumerate() {
                    let dst = crow.add(v * LANES);
                    let val = if accumulate {
                        _mm256_add_ps(_mm256_loadu_ps(dst), x)
                    } else {
                        x
                    };
                    _mm256_storeu_ps(dst, val);
                }
            }
        }
    }

    /// Columns of one [`micro_row`] call.
    const ROW_COLS: usize = ROW_NV * LANES;
    /// Column registers of [`micro_row`]: eight chains of FMAs in flight, which covers the
    /// FMA's latency on both units.
    const ROW_NV: usize = 8;

    /// One row by [`ROW_COLS`] columns: `c[j] (+)= sum_t a[t*MR] * b[offs[t] + j]`.
    #[inline(never)]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn micro_row(
        a: *const f32,
        b: *const f32,
        offs: &[usize],
        c: *mut f32,
        accumulate: bool,
    ) {
        // SAFETY: the caller guarantees offs.len()*MR readable floats at `a`, ROW_COLS floats
        // at `b + offs[t]` for every t, and ROW_COLS floats at `c`.
        unsafe {
            let mut acc = [_mm256_setzero_ps(); ROW_NV];
            for (t, &o) in offs.iter().enumerate() {
                let brow = b.add(o);
                let av = _mm256_broadcast_ss(&*a.add(t * MR));
                for (v, x) in acc.iter_mut().enumerate() {
                    *x = _mm256_fmadd_ps(av, _mm256_loadu_ps(brow.add(v * LANES)), *x);
                }
            }
            for (v, &x) in acc.iter().enumerate() {
                let dst = c.add(v * LANES);
                let val = if accumulate {
                    _mm256_add_ps(_mm256_loadu_ps(dst), x)
                } else {
                    x
                };
                _mm256_storeu_ps(dst, val);
            }
        }
    }

    /// [`micro`] with two registers of columns, reducing the panel's first `R` rows only
    /// (`rows <= R < MR`). Why: a row count that is a power of two ends in a panel of two or
    /// four rows, which the full kernel reduced as six (the Winograd products of 32 channels:
    /// 36 rows for 32); with fewer accumulators the short panel is latency-bound, but takes 4
    /// cycles a step, not 6. Out of line: inlined beside the full kernel's loop, these
    /// variants made that loop slower than they saved (the small CNN's Winograd layer 1.82
    /// against 1.64 ms); out of line it went 1.39-1.52 to 1.32-1.44 ms (in-process A/B, Zen 3).
    #[inline(never)]
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn micro_short<const R: usize>(
        a: *const f32,
        b: *const f32,
        offs: &[usize],
        c: *mut f32,
        ldc: usize,
        rows: usize,
        accumulate: bool,
    ) {
        // SAFETY: as `micro`'s, for rows <= R < MR.
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); 2]; R];
            for (t, &o) in offs.iter().enumerate() {
                let brow = b.add(o);
                let b0 = _mm256_loadu_ps(brow);
                let b1 = _mm256_loadu_ps(brow.add(LANES));
                let arow = a.add(t * MR);
                for (r, accr) in acc.iter_mut().enumerate() {
                    let av = _mm256_broadcast_ss(&*arow.add(r));
                    accr[0] = _mm256_fmadd_ps(av, b0, accr[0]);
                    accr[1] = _mm256_fmadd_ps(av, b1, accr[1]);
                }
            }
            for (r, accr) in acc.iter().enumerate().take(rows) {
                let crow = c.add(r * ldc);
                for (v, &x) in accr.iter().enumerate() {
                    let dst = crow.add(v * LANES);
                    let val = if accumulate {
                        _mm256_add_ps(_mm256_loadu_ps(dst), x)
                    } else {
                        x
                    };
                    _mm256_storeu_ps(dst, val);
                }
            }
        }
    }

    /// The last `rem < 8` columns: the same reduction through a padded copy of the strip
    /// (`strip`: `KC_ALLOC` rows of 8, `local[t] = 8 t`).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tail(
        a: *const f32,
        b: *const f32,
        offs: &[usize],
        strip: &mut [f32],
        local: &[usize],
        c: *mut f32,
        ldc: usize,
        rows: usize,
        rem: usize,
        accumulate: bool,
    ) {
        let mut out = [0.0f32; MR * LANES];
        assert!(
            offs.len() <= KC_ALLOC && strip.len() >= KC_ALLOC * LANES && local.len() >= KC_ALLOC
        );
        // SAFETY: the caller guarantees `rem` floats at `b + offs[t]` (offs.len() <= KC_ALLOC
        // rows) and `rows` rows of `rem` floats at `c`; `strip` holds KC_ALLOC rows of 8
        // (asserted), `out` MR.
        unsafe {
            for (t, &o) in offs.iter().enumerate() {
                std::ptr::copy_nonoverlapping(b.add(o), strip.as_mut_ptr().add(t * LANES), rem);
            }
            micro::<1>(
                a,
                strip.as_ptr(),
                &local[..offs.len()],
                out.as_mut_ptr(),
                LANES,
                MR,
                false,
            );
            for r in 0..rows {
                let crow = c.add(r * ldc);
                for j in 0..rem {
                    let v = out[r * LANES + j];
                    *crow.add(j) = if accumulate { *crow.add(j) + v } else { v };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic operand values in about [-2, 2] (two different sequences by `seed`).
    fn operand(len: usize, seed: usize) -> Vec<f32> {
        let (mul, modulo) = [(37, 101), (53, 97)][seed];
        (0..len)
            .map(|i| ((i * mul % modulo) as f32 - modulo as f32 / 2.0) / 25.0)
            .collect()
    }

    /// `c` (m x n, row stride ldc, one padding column left NaN) against float64 `want(i, j)`.
    fn assert_product(
        c: &[f32],
        ldc: usize,
        (m, n, k): (usize, usize, usize),
        want: impl Fn(usize, usize) -> f64,
    ) {
        for i in 0..m {
            for j in 0..n {
                let (g, w) = (c[i * ldc + j] as f64, want(i, j));
                assert!(
                    (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                    "{m}x{n}x{k} at ({i},{j}): {g} vs {w}"
                );
            }
            assert!(c[i * ldc + n].is_nan(), "{m}x{n}x{k}: wrote past column n");
        }
    }

    #[test]
    fn matches_a_float64_product_on_every_edge_shape() {
        if !available() {
            eprintln!("no AVX2/FMA: the kernel is not used on this CPU");
            return;
        }
        // Row tails (m % MR), column tails (n % 8, n % NR), one and several KC blocks.
        for &(m, n, k) in &[
            (1, 1, 1),
            (4, 24, 9),
            (5, 7, 3),
            (32, 196, 144),
            (7, 50, 193),
            (13, 23, 400),
            (16, 8, 385),
            (6, 16, 256),
            (12, 33, 257),
            (6, 64, 20),
            (13, 129, 17),
            (7, 838, 9),
            // Eight panels and more: both kernels copy each whole strip of `b` first where
            // the rows are far apart (the second `ldb` below; full and masked registers, two
            // KC blocks; 100 rows: a second row block of 1 panel reads `b` in place).
            (50, 45, 300),
            (100, 17, 70),
            (48, 32, 5),
            // A partial last panel of every height, alone and paired (the AVX-512 kernel
            // computes only its rows).
            (2, 40, 7),
            (3, 17, 5),
            (9, 40, 7),
            (10, 17, 30),
            (11, 33, 12),
            (14, 16, 6),
            (15, 20, 11),
            // One row: whole blocks of 64 columns, then strips and a tail, over one and two
            // KC blocks.
            (1, 838, 144),
            (1, 64, 300),
            (1, 150, 257),
        ] {
            // Rows of `b` near each other (read in place) and far apart (copied strip by strip
            // where there are enough panels: see STRIP_NEAR_BYTES).
            for ldb in [n + 3, n + 300] {
                let ldc = n + 1;
                let (a, b) = (operand(m * k, 0), operand(k * ldb, 1));
                let pa = PackedA::new(m, k, &a, k, 1);
                let offs: Vec<usize> = (0..k).map(|t| t * ldb).collect();
                // Both instruction sets where the CPU has AVX-512 (the same code twice elsewhere);
                // they reduce in the same order, so their results are identical.
                let mut outs = Vec::new();
                for wide in [false, true] {
                    let mut c = vec![f32::NAN; m * ldc];
                    gemm_rows_isa(&pa, &b, &offs, n, &mut c, ldc, wide);
                    assert_product(&c, ldc, (m, n, k), |i, j| {
                        (0..k)
                            .map(|t| a[i * k + t] as f64 * b[t * ldb + j] as f64)
                            .sum()
                    });
                    outs.push(c);
                }
                let bits = |c: &[f32]| c.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&outs[0]),
                    bits(&outs[1]),
                    "{m}x{n}x{k}: AVX2 vs AVX-512"
                );
            }
        }
    }

    /// The one-row kernel reduces in the panel kernels' order: a one-row product equals the
    /// first row of a two-row one (on the short-panel kernel) to the bit.
    #[test]
    fn one_row_equals_the_first_row_of_a_panel() {
        if !available() {
            eprintln!("no AVX2/FMA: the kernel is not used on this CPU");
            return;
        }
        for &(n, k) in &[(838, 144), (200, 300), (64, 9), (70, 1)] {
            let ldb = n + 5;
            let (a, b) = (operand(2 * k, 0), operand(k * ldb, 1));
            let offs: Vec<usize> = (0..k).map(|t| t * ldb).collect();
            let mut one = vec![f32::NAN; n];
            gemm_rows_isa(
                &PackedA::new(1, k, &a, k, 1),
                &b,
                &offs,
                n,
                &mut one,
                n,
                false,
            );
            let mut two = vec![f32::NAN; 2 * n];
            gemm_rows_isa(
                &PackedA::new(2, k, &a, k, 1),
                &b,
                &offs,
                n,
                &mut two,
                n,
                false,
            );
            let bits = |c: &[f32]| c.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&one), bits(&two[..n]), "1 x {n} x {k}");
        }
    }

    #[test]
    fn nt_matches_a_float64_product() {
        if !available() {
            eprintln!("no AVX2/FMA: the kernel is not used on this CPU");
            return;
        }
        for &(m, n, k) in &[
            (1, 1, 1),
            (4, 3, 8),
            (5, 7, 9),
            (64, 64, 1568),
            (9, 10, 31),
            (16, 128, 1568),
            (3, 5, 16),
            (6, 9, 47),
        ] {
            let (lda, ldb, ldc) = (k + 2, k + 1, n + 1);
            let (a, b) = (operand(m * lda, 0), operand(n * ldb, 1));
            // Both instruction sets where the CPU has AVX-512 (their lane sums differ).
            for wide in [false, true] {
                let mut c = vec![f32::NAN; m * ldc];
                gemm_nt_isa(m, n, k, &a, lda, &b, ldb, &mut c, ldc, wide);
                assert_product(&c, ldc, (m, n, k), |i, j| {
                    (0..k)
                        .map(|t| a[i * lda + t] as f64 * b[j * ldb + t] as f64)
                        .sum()
                });
            }
        }
    }

    #[test]
    fn packing_reads_strided_and_transposed_operands() {
        // a^T given as a (k x m) row-major matrix: element (i, t) at i + t*m.
        let (m, k) = (MR + 2, 5);
        let at: Vec<f32> = (0..m * k).map(|i| i as f32).collect();
        let p = PackedA::new(m, k, &at, 1, m);
        for i in 0..m {
            for t in 0..k {
                assert_eq!(p.data[((i / MR) * k + t) * MR + i % MR], at[t * m + i]);
            }
        }
        // Rows past m in the last panel are zero.
        for i in m..m.div_ceil(MR) * MR {
            for t in 0..k {
                assert_eq!(p.data[((i / MR) * k + t) * MR + i % MR], 0.0);
            }
        }
    }
}

#[cfg(test)]
mod timing {
    use super::*;

    /// Best-of-N kernel speed on in-cache shapes and on ResNet-18's im2col products, with and
    /// without the strip copy, alternating (`cargo test --release -p adverse --lib
    /// sgemm::timing -- --ignored --nocapture`): a tuning tool, not a benchmark claim.
    #[test]
    #[ignore]
    fn kernel_speed() {
        for &(m, n, k) in &[
            (6usize, 16usize, 256usize),
            (6, 32, 64),
            (12, 32, 64),
            (6, 64, 256),
            (96, 256, 256),
            (36, 208, 144),
            (32, 222, 144),
            (256, 196, 2304),
            (512, 49, 4608),
            (512, 98, 4608),
            (512, 196, 4608),
            (64, 12544, 147),
            // the stem's product per im2col chunk (128K floats / 147 rows)
            (64, 891, 147),
            (128, 784, 576),
            (64, 3136, 576),
            // the demo CNN's first Linear layer (batch 64)
            (64, 128, 1568),
            // ResNet-18's Winograd products at batch 4, one per block (m x tiles x c)
            (64, 56, 64),
            (128, 48, 128),
            (256, 40, 256),
            (512, 32, 512),
        ] {
            // `ADVERSE_TIMING_M=64`: only the shapes of that height (for profiling).
            if std::env::var("ADVERSE_TIMING_M").is_ok_and(|v| v != m.to_string()) {
                continue;
            }
            let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32).collect();
            let b: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32).collect();
            let mut c = vec![0.0f32; m * n];
            let pa = PackedA::new(m, k, &a, k, 1);
            let mut best = [f64::INFINITY; 2];
            // `ADVERSE_TIMING_AB=kblocks`: alternate the balanced reduction blocks with blocks
            // of KC and a remainder; `=kc`: with blocks of 2 KC; otherwise the strip copy.
            let ab = std::env::var("ADVERSE_TIMING_AB").unwrap_or_default();
            let reps = (2_000_000_000 / (2 * m * n * k)).clamp(5, 2000);
            for i in 0..2 * reps {
                let flag = match ab.as_str() {
                    "kblocks" => &UNBALANCED_K,
                    "kc" => &LONG_K,
                    _ => &NO_STRIP,
                };
                flag.store(i % 2 == 1, std::sync::atomic::Ordering::Relaxed);
                let t = std::time::Instant::now();
                gemm_packed(&pa, &b, n, n, &mut c, n);
                best[i % 2] = best[i % 2].min(t.elapsed().as_secs_f64());
            }
            println!(
                "{m}x{n}x{k}: {:.1} GFLOP/s (B, {}: {:.1})",
                (2 * m * n * k) as f64 / best[0] / 1e9,
                match ab.as_str() {
                    "kblocks" => "unbalanced k blocks",
                    "kc" => "k blocks of 256",
                    _ => "no strip copy",
                },
                (2 * m * n * k) as f64 / best[1] / 1e9
            );
        }
    }
}
