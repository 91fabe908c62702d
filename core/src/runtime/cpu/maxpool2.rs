//! 2x2 / stride-2 max pooling rows, forward and backward, eight windows per AVX2 register or
//! sixteen per AVX-512 one (where a row's last windows, or all of a short row's, are loaded and
//! stored under masks: the small CNN's second pooling has rows of seven).
//!
//! Why: after the convolutions these were the largest items of a small CNN's forward and the
//! largest of its input gradient (a scalar compare-and-select per window). The semantics are the
//! scalar path's exactly: each window's taps in row-major order, the first strictly greater
//! value wins (`>` is false for NaN, so a leading NaN stays and a later one never wins), and
//! the backward sends the gradient to that tap only.
//!
//! Also here: the row fold of 3-wide, stride-2 windows (ResNet's 3x3 / stride 2 pooling) and
//! the 2x2 pooling fused into a convolution's copy-out, both on the same de-interleaving
//! shuffles.

/// `out[o] = max of (top[2o], top[2o+1], bot[2o], bot[2o+1])` for `o < out.len()`.
pub(super) fn forward_row(top: &[f32], bot: &[f32], out: &mut [f32]) {
    forward_row_isa(top, bot, out, true);
}

/// [`forward_row`] on the AVX-512 kernel when `wide` (and the CPU has it), else AVX2.
fn forward_row_isa(top: &[f32], bot: &[f32], out: &mut [f32], wide: bool) {
    let n = out.len();
    assert!(
        top.len() >= 2 * n && bot.len() >= 2 * n,
        "maxpool2: rows too short"
    );
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if wide && super::sgemm::avx512() {
        // SAFETY: AVX-512F is present; the lengths are asserted above.
        done = unsafe { x86::forward512(top, bot, out) };
    } else if super::sgemm::available() {
        // SAFETY: AVX2 and FMA are present; the lengths are asserted above.
        done = unsafe { x86::forward(top, bot, out) };
    }
    for o in done..n {
        out[o] = [top[2 * o + 1], bot[2 * o], bot[2 * o + 1]]
            .into_iter()
            .fold(top[2 * o], |b, v| if v > b { v } else { b });
    }
}

/// [`forward_row`] over a plane's row pairs (input rows `w` apart, `out` rows of `ow`), the
/// instruction set chosen once per plane. Why: the small CNN's second pooling has rows of seven
/// windows, 14,336 a batch of 64, and dispatching each row cost more than pooling it.
pub(super) fn forward_plane(plane: &[f32], w: usize, out: &mut [f32], ow: usize) {
    if ow == 0 {
        return;
    }
    let oh = out.len() / ow;
    assert!(
        out.len() == oh * ow
            && 2 * ow <= w
            && (oh == 0 || (2 * oh - 1) * w + 2 * ow <= plane.len()),
        "maxpool2: plane bounds"
    );
    #[cfg(target_arch = "x86_64")]
    if !super::sgemm::avx512() && super::sgemm::available() {
        // SAFETY: AVX2 and FMA are present; the bounds are asserted above.
        unsafe { x86::forward_plane256(plane, w, out, ow) };
        return;
    }
    plane_rows(plane, w, out, ow, forward_row);
}

/// `row(top, bot, out_row)` for each output row of a plane and its input row pair (inlined
/// into each instruction set's build, so the per-row call costs nothing).
#[inline(always)]
fn plane_rows(
    plane: &[f32],
    w: usize,
    out: &mut [f32],
    ow: usize,
    mut row: impl FnMut(&[f32], &[f32], &mut [f32]),
) {
    for (oy, o) in out.chunks_exact_mut(ow).enumerate() {
        row(
            &plane[2 * oy * w..][..2 * ow],
            &plane[(2 * oy + 1) * w..][..2 * ow],
            o,
        );
    }
}

/// One row of taps of 3-wide, stride-2 windows folded into `out` (ResNet's 3x3 / stride 2
/// pooling, its full columns): `out[o] = row[2o]` when `first` (the window's first row), else
/// `row[2o]` folded in too, then `row[2o + 1]` and `row[2o + 2]`, each by the first-strict-
/// maximum rule (`if v > best { v } else { best }`). Folding the window's rows in order gives
/// the taps in row-major order, the scalar path's result exactly.
///
/// Why: the scalar loop reads its taps through the window table, which the compiler cannot
/// vectorise (4% of ResNet-18's forward, the largest item after the convolutions).
pub(super) fn fold_row3s2(row: &[f32], out: &mut [f32], first: bool) {
    fold_row3s2_isa(row, out, first, true);
}

/// [`fold_row3s2`] on the AVX-512 kernel when `wide` (and the CPU has it), else scalar.
fn fold_row3s2_isa(row: &[f32], out: &mut [f32], first: bool, wide: bool) {
    let n = out.len();
    assert!(row.len() > 2 * n, "maxpool2: row too short");
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if wide && super::sgemm::avx512() {
        // SAFETY: AVX-512F is present; the length is asserted above.
        done = unsafe { x86::fold_row3s2_512(row, out, first) };
    }
    let fold = |b: f32, v: f32| if v > b { v } else { b };
    for (o, best) in out.iter_mut().enumerate().skip(done) {
        let init = if first {
            row[2 * o]
        } else {
            fold(*best, row[2 * o])
        };
        *best = fold(fold(init, row[2 * o + 1]), row[2 * o + 2]);
    }
}

/// The 2x2 / stride-2 max pooling of `relu(v + bias)` over a plane whose rows lie `wp` apart
/// in `src` (`out`: rows of `pw`, as many as it holds), for a convolution whose ReLU and
/// pooling are fused into its copy-out. Equal to the ReLU written out and pooled by
/// [`forward_row`] (NaN to 0; the sign of a zero may differ, as the windows' zeros may come
/// in another order): after the ReLU there is no NaN, so the order of the comparisons does
/// not matter, and the vector kernel takes the two rows' maxima first and the pairs' after,
/// two shuffles per sixteen windows instead of four.
pub(super) fn relu_pool_plane(
    src: &[f32],
    wp: usize,
    out: &mut [f32],
    pw: usize,
    bias: Option<f32>,
) {
    relu_pool_plane_isa(src, wp, out, pw, bias, Isa::Best);
}

/// Which kernel a test runs: the best this CPU has, AVX2 at most, or the portable loop.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Isa {
    Best,
    #[cfg_attr(not(test), allow(dead_code))]
    Avx2,
    #[cfg_attr(not(test), allow(dead_code))]
    Portable,
}

fn relu_pool_plane_isa(
    src: &[f32],
    wp: usize,
    out: &mut [f32],
    pw: usize,
    bias: Option<f32>,
    isa: Isa,
) {
    if pw == 0 {
        return;
    }
    let ph = out.len() / pw;
    assert!(
        out.len() == ph * pw
            && 2 * pw <= wp
            && (ph == 0 || (2 * ph - 1) * wp + 2 * pw <= src.len()),
        "relu_pool_plane: bounds"
    );
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Best && super::sgemm::avx512() {
        // SAFETY: AVX-512F is present; the bounds are asserted above.
        unsafe { x86::relu_pool_plane512(src, wp, out, pw, bias) };
        return;
    } else if isa != Isa::Portable && super::sgemm::available() {
        // SAFETY: AVX2 and FMA are present; the bounds are asserted above.
        unsafe { x86::relu_pool_plane256(src, wp, out, pw, bias) };
        return;
    }
    // Elsewhere: each row pair's taps through the ReLU into a stack block, then the plain rows.
    let f = |v: f32| bias.map_or(v, |b| v + b).max(0.0);
    const B: usize = 64;
    let (mut t, mut b) = ([0.0f32; 2 * B], [0.0f32; 2 * B]);
    for (py, row) in out.chunks_exact_mut(pw).enumerate() {
        let (top, bot) = (&src[2 * py * wp..], &src[(2 * py + 1) * wp..]);
        for o0 in (0..pw).step_by(B) {
            let r = (pw - o0).min(B);
            for i in 0..2 * r {
                t[i] = f(top[2 * o0 + i]);
                b[i] = f(bot[2 * o0 + i]);
            }
            forward_row_isa(&t[..2 * r], &b[..2 * r], &mut row[o0..o0 + r], false);
        }
    }
}

/// The gradient of [`forward_row`]: `dy[o]` goes to the winning tap of window `o` and zero to
/// the other three (`gtop`, `gbot`: the two input rows' gradients, overwritten or, with
/// `accumulate`, added to).
pub(super) fn backward_row(
    top: &[f32],
    bot: &[f32],
    dy: &[f32],
    gtop: &mut [f32],
    gbot: &mut [f32],
    accumulate: bool,
) {
    backward_row_isa(top, bot, dy, gtop, gbot, accumulate, true);
}

/// [`backward_row`] on the AVX-512 kernel when `wide` (and the CPU has it), else AVX2.
fn backward_row_isa(
    top: &[f32],
    bot: &[f32],
    dy: &[f32],
    gtop: &mut [f32],
    gbot: &mut [f32],
    accumulate: bool,
    wide: bool,
) {
    let n = dy.len();
    assert!(
        top.len() >= 2 * n && bot.len() >= 2 * n && gtop.len() >= 2 * n && gbot.len() >= 2 * n,
        "maxpool2: rows too short"
    );
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if wide && super::sgemm::avx512() {
        // SAFETY: AVX-512F is present; the lengths are asserted above.
        done = unsafe { x86::backward512(top, bot, dy, gtop, gbot, accumulate) };
    } else if super::sgemm::available() {
        // SAFETY: AVX2 and FMA are present; the lengths are asserted above.
        done = unsafe { x86::backward(top, bot, dy, gtop, gbot, accumulate) };
    }
    for (o, &d) in dy.iter().enumerate().skip(done) {
        let v = [top[2 * o], top[2 * o + 1], bot[2 * o], bot[2 * o + 1]];
        let mut best = 0;
        for i in 1..4 {
            best = if v[i] > v[best] { i } else { best };
        }
        let g = |i: usize| if best == i { d } else { 0.0 };
        let (t, b) = (&mut gtop[2 * o..2 * o + 2], &mut gbot[2 * o..2 * o + 2]);
        if accumulate {
            t[0] += g(0);
            t[1] += g(1);
            b[0] += g(2);
            b[1] += g(3);
        } else {
            t.copy_from_slice(&[g(0), g(1)]);
            b.copy_from_slice(&[g(2), g(3)]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use std::arch::x86_64::*;

    /// Lane masks (sign bits, as MASKMOVPS reads them) of the first `len <= 16` floats of two
    /// consecutive registers.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(in crate::runtime::cpu) fn masks256(len: usize) -> (__m256i, __m256i) {
        let i = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let m = |l: usize| _mm256_cmpgt_epi32(_mm256_set1_epi32(l.min(8) as i32), i);
        (m(len), m(len.saturating_sub(8)))
    }

    /// The first `cnt <= 8` lanes of `v` stored at `p`: a 4-, a 2- and a 1-float store as `cnt`'s
    /// bits ask. Why not MASKMOVPS: its stores are microcoded on AMD's Zen cores (the small
    /// CNN's forward, whose second pooling ends every row with one, measured 3.1-3.6 ms with
    /// them against 2.7-2.8 without on a Zen 3 core).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(in crate::runtime::cpu) unsafe fn store_first(p: *mut f32, v: __m256, cnt: usize) {
        if cnt >= 8 {
            // SAFETY: the caller guarantees `cnt` writable floats at `p`.
            unsafe { _mm256_storeu_ps(p, v) };
            return;
        }
        let (mut q, mut part) = (p, _mm256_castps256_ps128(v));
        // SAFETY: as above: the stores below write `cnt` floats in all, from `p` on.
        unsafe {
            if cnt & 4 != 0 {
                _mm_storeu_ps(q, part);
                part = _mm256_extractf128_ps::<1>(v);
                q = q.add(4);
            }
            if cnt & 2 != 0 {
                _mm_storel_pd(q.cast(), _mm_castps_pd(part));
                part = _mm_movehl_ps(part, part);
                q = q.add(2);
            }
            if cnt & 1 != 0 {
                _mm_store_ss(q, part);
            }
        }
    }

    /// The first `len <= 16` floats at `p` in two registers (lanes past them zero): whole
    /// loads, or a short group's loads under masks. Why masks, not a padded copy of a row's
    /// short last group: the small CNN's second pooling has rows of seven windows, and the
    /// copies (library `memmove` calls) took longer than the pooling.
    ///
    /// # Safety
    /// AVX2 and FMA; `len` readable floats at `p`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(in crate::runtime::cpu) unsafe fn load16(p: *const f32, len: usize) -> (__m256, __m256) {
        // SAFETY: the caller guarantees `len` readable floats at `p`; the masks cover no more.
        unsafe {
            if len >= 16 {
                (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)))
            } else {
                let (ma, mb) = masks256(len);
                (_mm256_maskload_ps(p, ma), _mm256_maskload_ps(p.add(8), mb))
            }
        }
    }

    /// The even and the odd elements of the sixteen floats `a` then `b`, each in order.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(in crate::runtime::cpu) fn evens_odds(a: __m256, b: __m256) -> (__m256, __m256) {
        // Within each 128-bit half: a0 a2 b0 b2 | a4 a6 b4 b6; then fix the half order.
        let ev = _mm256_shuffle_ps::<0b10_00_10_00>(a, b);
        let od = _mm256_shuffle_ps::<0b11_01_11_01>(a, b);
        let fix = |v: __m256| {
            _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(v)))
        };
        (fix(ev), fix(od))
    }

    /// Even and odd elements of the first `2 cnt` floats at `p` (`cnt <= 8`; lanes past them
    /// are zero), in order.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn split(p: *const f32, cnt: usize) -> (__m256, __m256) {
        // SAFETY: the caller guarantees 2 cnt readable floats at `p`.
        let (a, b) = unsafe { load16(p, 2 * cnt) };
        evens_odds(a, b)
    }

    /// `lo` and `hi` interleaved, lo0 hi0 lo1 hi1 ..., as two registers (lanes 0-3 of each,
    /// then lanes 4-7).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(in crate::runtime::cpu) fn interleave(lo: __m256, hi: __m256) -> (__m256, __m256) {
        let a = _mm256_unpacklo_ps(lo, hi);
        let b = _mm256_unpackhi_ps(lo, hi);
        (
            _mm256_permute2f128_ps::<0x20>(a, b),
            _mm256_permute2f128_ps::<0x31>(a, b),
        )
    }

    /// `(lo, hi)` interleaved into the first `2 cnt` floats at `p` (`cnt <= 8`): lo0 hi0 lo1
    /// hi1 ...
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn merge(p: *mut f32, lo: __m256, hi: __m256, cnt: usize, accumulate: bool) {
        let (first, second) = interleave(lo, hi);
        // SAFETY: the caller guarantees 2 cnt writable floats at `p`; the masks cover no more.
        unsafe {
            if cnt < 8 {
                let (ma, mb) = masks256(2 * cnt);
                let (na, nb) = ((2 * cnt).min(8), (2 * cnt).saturating_sub(8));
                for (q, v, m, n) in [(p, first, ma, na), (p.add(8), second, mb, nb)] {
                    let v = if accumulate {
                        _mm256_add_ps(_mm256_maskload_ps(q, m), v)
                    } else {
                        v
                    };
                    store_first(q, v, n);
                }
            } else if accumulate {
                _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), first));
                _mm256_storeu_ps(p.add(8), _mm256_add_ps(_mm256_loadu_ps(p.add(8)), second));
            } else {
                _mm256_storeu_ps(p, first);
                _mm256_storeu_ps(p.add(8), second);
            }
        }
    }

    /// The four taps of `cnt <= 8` windows, then the masks of "this tap beat the best so far".
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn taps(
        top: *const f32,
        bot: *const f32,
        cnt: usize,
    ) -> ([__m256; 4], [__m256; 3], __m256) {
        // SAFETY: as in `split`, for both rows.
        let ((t0, t1), (b0, b1)) = unsafe { (split(top, cnt), split(bot, cnt)) };
        let is1 = _mm256_cmp_ps::<_CMP_GT_OQ>(t1, t0);
        let best = _mm256_blendv_ps(t0, t1, is1);
        let is2 = _mm256_cmp_ps::<_CMP_GT_OQ>(b0, best);
        let best = _mm256_blendv_ps(best, b0, is2);
        let is3 = _mm256_cmp_ps::<_CMP_GT_OQ>(b1, best);
        let best = _mm256_blendv_ps(best, b1, is3);
        ([t0, t1, b0, b1], [is1, is2, is3], best)
    }

    /// See `forward_plane` (which checks the bounds).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn forward_plane256(plane: &[f32], w: usize, out: &mut [f32], ow: usize) {
        super::plane_rows(plane, w, out, ow, |top, bot, row| {
            // SAFETY: AVX2 and FMA are present (this function's contract); the rows hold 2 ow
            // floats, twice the output row.
            unsafe { forward(top, bot, row) };
        });
    }

    /// Groups of eight windows, the last one shorter; returns how many windows it did (all).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn forward(top: &[f32], bot: &[f32], out: &mut [f32]) -> usize {
        let n = out.len();
        for o in (0..n).step_by(8) {
            let cnt = (n - o).min(8);
            // SAFETY: windows o .. o + cnt read taps below 2 (o + cnt) <= 2 n <= the rows' and
            // write outputs below o + cnt <= n (the caller's bounds); masked-off lanes are
            // neither read nor written.
            unsafe {
                let (_, _, best) = taps(top.as_ptr().add(2 * o), bot.as_ptr().add(2 * o), cnt);
                store_first(out.as_mut_ptr().add(o), best, cnt);
            }
        }
        n
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn backward(
        top: &[f32],
        bot: &[f32],
        dy: &[f32],
        gtop: &mut [f32],
        gbot: &mut [f32],
        accumulate: bool,
    ) -> usize {
        let n = dy.len();
        for o in (0..n).step_by(8) {
            let cnt = (n - o).min(8);
            // SAFETY: as in `forward`, for the inputs, `dy` and both gradient rows.
            unsafe {
                let (_, [is1, is2, is3], _) =
                    taps(top.as_ptr().add(2 * o), bot.as_ptr().add(2 * o), cnt);
                let d = if cnt == 8 {
                    _mm256_loadu_ps(dy.as_ptr().add(o))
                } else {
                    _mm256_maskload_ps(dy.as_ptr().add(o), masks256(cnt).0)
                };
                // The last tap that beat the best so far is the first strict maximum.
                let w3 = is3;
                let w2 = _mm256_andnot_ps(is3, is2);
                let later = _mm256_or_ps(is2, is3);
                let w1 = _mm256_andnot_ps(later, is1);
                let w0 = _mm256_andnot_ps(
                    _mm256_or_ps(later, is1),
                    _mm256_castsi256_ps(_mm256_set1_epi32(-1)),
                );
                let g_of = |w: __m256| _mm256_and_ps(w, d);
                merge(
                    gtop.as_mut_ptr().add(2 * o),
                    g_of(w0),
                    g_of(w1),
                    cnt,
                    accumulate,
                );
                merge(
                    gbot.as_mut_ptr().add(2 * o),
                    g_of(w2),
                    g_of(w3),
                    cnt,
                    accumulate,
                );
            }
        }
        n
    }

    /// Even and odd elements of the first `2 cnt` floats at `p` (`cnt <= 16`; lanes past them
    /// are zero), in order.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn split512(p: *const f32, cnt: usize) -> (__m512, __m512) {
        let (ma, mb) = masks(2 * cnt);
        // SAFETY: the caller guarantees 2 cnt readable floats at `p`; the masks cover no more.
        unsafe {
            let a = _mm512_maskz_loadu_ps(ma, p);
            let b = _mm512_maskz_loadu_ps(mb, p.add(16));
            let ev = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
            let od = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
            (
                _mm512_permutex2var_ps(a, ev, b),
                _mm512_permutex2var_ps(a, od, b),
            )
        }
    }

    /// Lane masks of the first `len <= 32` floats of two consecutive registers.
    #[inline]
    fn masks(len: usize) -> (__mmask16, __mmask16) {
        let bits = |l: usize| ((1u32 << l.min(16)) - 1) as __mmask16;
        (bits(len), bits(len.saturating_sub(16)))
    }

    /// The four taps of up to sixteen windows, the masks of "this tap beat the best so far",
    /// and the best.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn taps512(top: *const f32, bot: *const f32, cnt: usize) -> ([__mmask16; 3], __m512) {
        // SAFETY: as in `split512`, for both rows.
        let ((t0, t1), (b0, b1)) = unsafe { (split512(top, cnt), split512(bot, cnt)) };
        best4(t0, t1, b0, b1)
    }

    /// The first-strict-maximum fold of four taps: the masks of "this tap beat the best so
    /// far" and the best.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn best4(t0: __m512, t1: __m512, b0: __m512, b1: __m512) -> ([__mmask16; 3], __m512) {
        let is1 = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(t1, t0);
        let best = _mm512_mask_blend_ps(is1, t0, t1);
        let is2 = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(b0, best);
        let best = _mm512_mask_blend_ps(is2, best, b0);
        let is3 = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(b1, best);
        let best = _mm512_mask_blend_ps(is3, best, b1);
        ([is1, is2, is3], best)
    }

    /// Every window of the row, sixteen at a time, the last group masked; returns how many.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn forward512(top: &[f32], bot: &[f32], out: &mut [f32]) -> usize {
        let n = out.len();
        for o in (0..n).step_by(16) {
            let cnt = (n - o).min(16);
            // SAFETY: windows o .. o + cnt read taps below 2 (o + cnt) <= 2 n <= the rows'
            // lengths, and write outputs below o + cnt <= n.
            unsafe {
                let (_, best) = taps512(top.as_ptr().add(2 * o), bot.as_ptr().add(2 * o), cnt);
                _mm512_mask_storeu_ps(out.as_mut_ptr().add(o), masks(cnt).0, best);
            }
        }
        n
    }

    /// See `fold_row3s2` (which checks the bounds); does every window.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn fold_row3s2_512(row: &[f32], out: &mut [f32], first: bool) -> usize {
        let ev = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let od = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
        let n = out.len();
        for o in (0..n).step_by(16) {
            let cnt = (n - o).min(16);
            // SAFETY: windows o .. o + cnt read taps 2 o ..= 2 (o + cnt) <= 2 n < row.len()
            // and write outputs o .. o + cnt (the caller's bounds); masked-off lanes are
            // neither read nor written.
            unsafe {
                let p = row.as_ptr().add(2 * o);
                // Taps 0 and 1: floats 2 o .. 2 (o + cnt); tap 2: the evens from 2 o + 2.
                let (ma, mb) = masks(2 * cnt);
                let (lo, hi) = (
                    _mm512_maskz_loadu_ps(ma, p),
                    _mm512_maskz_loadu_ps(mb, p.add(16)),
                );
                let (mc, md) = masks(2 * cnt - 1);
                let (lo2, hi2) = (
                    _mm512_maskz_loadu_ps(mc, p.add(2)),
                    _mm512_maskz_loadu_ps(md, p.add(18)),
                );
                let t0 = _mm512_permutex2var_ps(lo, ev, hi);
                let t1 = _mm512_permutex2var_ps(lo, od, hi);
                let t2 = _mm512_permutex2var_ps(lo2, ev, hi2);
                let dst = out.as_mut_ptr().add(o);
                let m = masks(cnt).0;
                // MAXPS(v, best) is `if v > best { v } else { best }`, NaN and ties included.
                let mut best = if first {
                    t0
                } else {
                    _mm512_max_ps(t0, _mm512_maskz_loadu_ps(m, dst))
                };
                best = _mm512_max_ps(t1, best);
                best = _mm512_max_ps(t2, best);
                _mm512_mask_storeu_ps(dst, m, best);
            }
        }
        n
    }

    /// See `relu_pool_plane` (which checks the bounds). Eight windows per register, a row's
    /// last group loaded and stored under masks. Why: the portable loop (the ReLU into a stack
    /// block, then `forward_row`, whose short last group goes through a padded copy) took 55%
    /// of the small CNN's fused first layer on an AVX2-only CPU.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn relu_pool_plane256(
        src: &[f32],
        wp: usize,
        out: &mut [f32],
        pw: usize,
        bias: Option<f32>,
    ) {
        let (bv, z) = (_mm256_set1_ps(bias.unwrap_or(0.0)), _mm256_setzero_ps());
        let ph = out.len() / pw;
        // max(v + b, 0): MAXPS returns its second operand for a NaN (as the AVX-512 kernel).
        let f = |v: __m256| {
            let v = if bias.is_some() {
                _mm256_add_ps(v, bv)
            } else {
                v
            };
            _mm256_max_ps(v, z)
        };
        for py in 0..ph {
            for o in (0..pw).step_by(8) {
                let cnt = (pw - o).min(8);
                // SAFETY: the row pair's taps 2 o .. 2 (o + cnt) <= 2 pw lie inside `src` and
                // the outputs o .. o + cnt inside `out` (the caller's bounds); a short group's
                // masked-off lanes are neither read nor written.
                unsafe {
                    let top = src.as_ptr().add(2 * py * wp + 2 * o);
                    let (t0, t1) = load16(top, 2 * cnt);
                    let (b0, b1) = load16(top.add(wp), 2 * cnt);
                    let lo = _mm256_max_ps(f(t0), f(b0));
                    let hi = _mm256_max_ps(f(t1), f(b1));
                    let (ev, od) = evens_odds(lo, hi);
                    let best = _mm256_max_ps(ev, od);
                    store_first(out.as_mut_ptr().add(py * pw + o), best, cnt);
                }
            }
        }
    }

    /// See `relu_pool_plane` (which checks the bounds).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn relu_pool_plane512(
        src: &[f32],
        wp: usize,
        out: &mut [f32],
        pw: usize,
        bias: Option<f32>,
    ) {
        let (bv, z) = (_mm512_set1_ps(bias.unwrap_or(0.0)), _mm512_setzero_ps());
        let ev = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let od = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
        let ph = out.len() / pw;
        // max(v + b, 0): MAXPS returns its second operand for a NaN.
        let f = |p: *const f32, m: __mmask16| {
            // SAFETY: the callers below read only taps inside `src` (masked-off lanes are not
            // read).
            let v = unsafe { _mm512_maskz_loadu_ps(m, p) };
            let v = if bias.is_some() {
                _mm512_add_ps(v, bv)
            } else {
                v
            };
            _mm512_max_ps(v, z)
        };
        if pw <= 8 {
            // Rows of up to eight windows (the small CNN's second pooling has seven): two rows
            // per register, their windows compressed together, half the instructions per row.
            let m = masks(2 * pw).0;
            let row = |py: usize| {
                // SAFETY: output row py reads 2 pw floats from 2 py wp and as many one row (`wp`)
                // below, inside `src` (the caller's bounds).
                let top = unsafe { src.as_ptr().add(2 * py * wp) };
                _mm512_max_ps(f(top, m), f(top.wrapping_add(wp), m))
            };
            for py in (0..ph).step_by(2) {
                let two = py + 1 < ph;
                let a = row(py);
                let b = if two { row(py + 1) } else { z };
                // Lanes 0..8 the first row's windows, 8..16 the second's.
                let best = _mm512_max_ps(
                    _mm512_permutex2var_ps(a, ev, b),
                    _mm512_permutex2var_ps(a, od, b),
                );
                let keep = masks(pw).0 | if two { masks(pw).0 << 8 } else { 0 };
                let n = if two { 2 * pw } else { pw };
                // SAFETY: outputs py pw .. py pw + n lie inside `out` (the caller's bounds).
                unsafe {
                    _mm512_mask_storeu_ps(
                        out.as_mut_ptr().add(py * pw),
                        masks(n).0,
                        _mm512_maskz_compress_ps(keep, best),
                    );
                }
            }
            return;
        }
        for py in 0..ph {
            for o in (0..pw).step_by(16) {
                let cnt = (pw - o).min(16);
                let (ma, mb) = masks(2 * cnt);
                // SAFETY: the row pair's taps 2 o .. 2 (o + cnt) <= 2 pw lie inside `src` and
                // the outputs o .. o + cnt inside `out` (the caller's bounds); masked-off lanes
                // are neither read nor written.
                unsafe {
                    let top = src.as_ptr().add(2 * py * wp + 2 * o);
                    let bot = top.add(wp);
                    let lo = _mm512_max_ps(f(top, ma), f(bot, ma));
                    let hi = _mm512_max_ps(f(top.add(16), mb), f(bot.add(16), mb));
                    let best = _mm512_max_ps(
                        _mm512_permutex2var_ps(lo, ev, hi),
                        _mm512_permutex2var_ps(lo, od, hi),
                    );
                    _mm512_mask_storeu_ps(out.as_mut_ptr().add(py * pw + o), masks(cnt).0, best);
                }
            }
        }
    }

    /// `(lo, hi)` interleaved into the first `2 cnt` floats at `p`: lo0 hi0 lo1 hi1 ...
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn merge512(p: *mut f32, lo: __m512, hi: __m512, cnt: usize, accumulate: bool) {
        let i0 = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
        let i1 = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
        let first = _mm512_permutex2var_ps(lo, i0, hi);
        let second = _mm512_permutex2var_ps(lo, i1, hi);
        let (ma, mb) = masks(2 * cnt);
        // SAFETY: the caller guarantees 2 cnt writable floats at `p`; the masks cover no more.
        unsafe {
            for (q, v, m) in [(p, first, ma), (p.add(16), second, mb)] {
                let v = if accumulate {
                    _mm512_add_ps(_mm512_maskz_loadu_ps(m, q), v)
                } else {
                    v
                };
                _mm512_mask_storeu_ps(q, m, v);
            }
        }
    }

    /// The gradient of [`forward512`]; returns how many windows it did (all of them).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn backward512(
        top: &[f32],
        bot: &[f32],
        dy: &[f32],
        gtop: &mut [f32],
        gbot: &mut [f32],
        accumulate: bool,
    ) -> usize {
        let n = dy.len();
        for o in (0..n).step_by(16) {
            let cnt = (n - o).min(16);
            // SAFETY: as in `forward512`, for the inputs, `dy` and both gradient rows.
            unsafe {
                let ([is1, is2, is3], _) =
                    taps512(top.as_ptr().add(2 * o), bot.as_ptr().add(2 * o), cnt);
                let d = _mm512_maskz_loadu_ps(masks(cnt).0, dy.as_ptr().add(o));
                // The last tap that beat the best so far is the first strict maximum.
                let w3 = is3;
                let w2 = is2 & !is3;
                let w1 = is1 & !(is2 | is3);
                let w0 = !(is1 | is2 | is3);
                let g = |w: __mmask16| _mm512_maskz_mov_ps(w, d);
                let (gt, gb) = (gtop.as_mut_ptr().add(2 * o), gbot.as_mut_ptr().add(2 * o));
                merge512(gt, g(w0), g(w1), cnt, accumulate);
                merge512(gb, g(w2), g(w3), cnt, accumulate);
            }
        }
        n
    }
}

#[cfg(test)]
mod tests {
    /// The fused ReLU + pooling of a plane (rows `wp` apart, bias or none) against the ReLU
    /// written out and pooled by `forward_row`, on every kernel this CPU has: equal as floats, NaN
    /// taps (which the ReLU maps to 0) and signed zeros included, and nothing written past
    /// the plane.
    #[test]
    fn fused_relu_pooling_equals_relu_then_pooling() {
        for (pw, ph) in [1usize, 3, 7, 8, 9, 14, 16, 17, 40]
            .into_iter()
            .flat_map(|pw| [1usize, 2, 3, 4].map(|ph| (pw, ph)))
        {
            for extra in [0usize, 1, 5] {
                let wp = 2 * pw + extra;
                let len = (2 * ph - 1) * wp + 2 * pw;
                let src: Vec<f32> = (0..len)
                    .map(|i| match (i * 7 + pw) % 11 {
                        0 => f32::NAN,
                        1 => -0.0,
                        2 => 0.0,
                        r => (r as f32 - 6.0) * 0.25,
                    })
                    .collect();
                for bias in [None, Some(0.5f32), Some(-0.25)] {
                    let relu = |v: f32| bias.map_or(v, |b| v + b).max(0.0);
                    let mut want = vec![0.0f32; ph * pw];
                    for (py, row) in want.chunks_exact_mut(pw).enumerate() {
                        let top: Vec<f32> = src[2 * py * wp..][..2 * pw]
                            .iter()
                            .map(|&v| relu(v))
                            .collect();
                        let bot: Vec<f32> = src[(2 * py + 1) * wp..][..2 * pw]
                            .iter()
                            .map(|&v| relu(v))
                            .collect();
                        super::forward_row_isa(&top, &bot, row, false);
                    }
                    for isa in [super::Isa::Best, super::Isa::Avx2, super::Isa::Portable] {
                        let mut out = vec![-9.0f32; ph * pw + 1];
                        super::relu_pool_plane_isa(&src, wp, &mut out[..ph * pw], pw, bias, isa);
                        assert_eq!(
                            out[..ph * pw],
                            want[..],
                            "pw {pw} wp {wp} bias {bias:?} {isa:?}"
                        );
                        assert_eq!(out[ph * pw], -9.0, "wrote past the plane");
                    }
                }
            }
        }
    }

    /// `forward_plane` (one dispatch per plane) is `forward_row` on each row pair, bit for
    /// bit (NaNs included), for rows shorter and longer than a register, extra input columns
    /// and an odd input height; nothing is written past the output plane.
    #[test]
    fn plane_pooling_equals_row_pooling() {
        for (ow, oh, extra) in [
            (7usize, 7usize, 0usize),
            (7, 3, 1),
            (1, 2, 0),
            (8, 4, 3),
            (14, 5, 0),
            (19, 2, 2),
        ] {
            let w = 2 * ow + extra;
            let h = 2 * oh + extra % 2;
            let plane: Vec<f32> = (0..h * w)
                .map(|i| match (i * 13 + ow) % 9 {
                    0 => f32::NAN,
                    r => (r as f32 - 4.0) * 0.5,
                })
                .collect();
            let mut want = vec![0.0f32; oh * ow];
            for (oy, row) in want.chunks_exact_mut(ow).enumerate() {
                super::forward_row(
                    &plane[2 * oy * w..][..2 * ow],
                    &plane[(2 * oy + 1) * w..][..2 * ow],
                    row,
                );
            }
            let mut got = vec![-5.0f32; oh * ow + 1];
            super::forward_plane(&plane, w, &mut got[..oh * ow], ow);
            let same = got[..oh * ow]
                .iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{ow} x {oh}, {extra} extra: {got:?} against {want:?}");
            assert_eq!(got[oh * ow], -5.0, "wrote past the plane");
        }
    }

    /// `fold_row3s2` against the scalar rule, bit for bit (NaNs on every tap position, ties
    /// of zeros of both signs), every row length from 1 to 40, first row and later rows.
    #[test]
    fn three_wide_stride_two_rows_match_the_scalar_rule() {
        for n in 1..=40usize {
            let val = |i: usize, s: u64| -> f32 {
                let h = ((i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (s << 32) ^ n as u64)
                    .wrapping_mul(0xBF58_476D_1CE4_E5B9)
                    >> 33;
                match h % 13 {
                    0 => f32::NAN,
                    1 => -0.0,
                    2 => 0.0,
                    k => (k % 3) as f32 - 1.0,
                }
            };
            // One spare tap past the last window's, which must not be read into a window.
            let row: Vec<f32> = (0..2 * n + 2).map(|i| val(i, 1)).collect();
            let prior: Vec<f32> = (0..n).map(|i| val(i, 2)).collect();
            for first in [true, false] {
                let want: Vec<f32> = (0..n)
                    .map(|o| {
                        let taps = [row[2 * o], row[2 * o + 1], row[2 * o + 2]];
                        let (init, rest) = if first {
                            (taps[0], &taps[1..])
                        } else {
                            (prior[o], &taps[..])
                        };
                        rest.iter().fold(init, |b, &v| if v > b { v } else { b })
                    })
                    .collect();
                for wide in [true, false] {
                    // One spare output, which must stay untouched.
                    let mut out = prior.clone();
                    out.push(5.0);
                    super::fold_row3s2_isa(&row[..2 * n + 1], &mut out[..n], first, wide);
                    assert_eq!(out[n], 5.0, "wrote past the row ({n}, {first}, {wide})");
                    assert!(
                        out[..n]
                            .iter()
                            .zip(&want)
                            .all(|(a, b)| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())),
                        "{n} windows, first {first}, wide {wide}: {:?} against {want:?}",
                        &out[..n]
                    );
                }
            }
        }
    }

    /// Every row length from 1 to 40 windows (full groups, masked or padded tails, rows
    /// shorter than a group), values on a coarse grid (ties) with NaNs on every tap position:
    /// each vector kernel this CPU has against the first-strict-maximum rule, forward and
    /// backward (overwriting and accumulating).
    #[test]
    fn vector_kernels_match_the_scalar_rule() {
        for n in 1..=40usize {
            // Three values (many ties within a window) and about one NaN in seventeen, from a
            // hash of (position, row, length).
            let val = |i: usize, s: usize| -> f32 {
                let h = ((i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                    ^ ((s as u64 + 1) << 32)
                    ^ n as u64)
                    .wrapping_mul(0xBF58_476D_1CE4_E5B9)
                    >> 33;
                if h.is_multiple_of(17) {
                    f32::NAN
                } else {
                    (h % 3) as f32 * 0.5
                }
            };
            let top: Vec<f32> = (0..2 * n).map(|i| val(i, 0)).collect();
            let bot: Vec<f32> = (0..2 * n).map(|i| val(i, 1)).collect();
            let dy: Vec<f32> = (0..n).map(|o| o as f32 + 1.0).collect();
            let winner = |o: usize| {
                let v = [top[2 * o], top[2 * o + 1], bot[2 * o], bot[2 * o + 1]];
                (1..4).fold(0, |b, i| if v[i] > v[b] { i } else { b })
            };
            let want: Vec<f32> = (0..n)
                .map(|o| [top[2 * o], top[2 * o + 1], bot[2 * o], bot[2 * o + 1]][winner(o)])
                .collect();
            let same = |a: &[f32], b: &[f32]| {
                a.iter()
                    .zip(b)
                    .all(|(x, y)| x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()))
            };
            // The dispatched rows (AVX-512, or AVX2 with its masked tail, or scalar), and the
            // AVX2 rows on a CPU with AVX-512.
            for wide in [true, false] {
                let mut out = vec![-7.0f32; n];
                super::forward_row_isa(&top, &bot, &mut out, wide);
                assert!(same(&out, &want), "forward (wide {wide}), {n} windows");
                for accumulate in [false, true] {
                    // One spare element past each gradient row, which must stay untouched.
                    let (mut gt, mut gb) = (vec![1.0f32; 2 * n + 1], vec![1.0f32; 2 * n + 1]);
                    let (t, b) = (&mut gt[..2 * n], &mut gb[..2 * n]);
                    super::backward_row_isa(&top, &bot, &dy, t, b, accumulate, wide);
                    let base = if accumulate { 1.0 } else { 0.0 };
                    for o in 0..n {
                        let w = winner(o);
                        let got = [gt[2 * o], gt[2 * o + 1], gb[2 * o], gb[2 * o + 1]];
                        for (i, &g) in got.iter().enumerate() {
                            let e = base + if i == w { dy[o] } else { 0.0 };
                            assert_eq!(g, e, "backward {wide} {accumulate}, {n} windows, {o}/{i}");
                        }
                    }
                    assert_eq!((gt[2 * n], gb[2 * n]), (1.0, 1.0), "wrote past the row");
                }
            }
        }
    }
}
