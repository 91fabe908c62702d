//! 2x2 / stride-2 max pooling rows, forward and backward, eight windows per AVX2 register.
//!
//! Why: after the convolutions these were the largest items of a small CNN's forward and the
//! largest of its input gradient (a scalar compare-and-select per window). The semantics are the
//! scalar path's exactly: each window's taps in row-major order, the first strictly greater
//! value wins (`>` is false for NaN, so a leading NaN stays and a later one never wins), and
//! the backward sends the gradient to that tap only.

/// `out[o] = max of (top[2o], top[2o+1], bot[2o], bot[2o+1])` for `o < out.len()`.
pub(super) fn forward_row(top: &[f32], bot: &[f32], out: &mut [f32]) {
    let n = out.len();
    assert!(
        top.len() >= 2 * n && bot.len() >= 2 * n,
        "maxpool2: rows too short"
    );
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if n >= 8 && super::sgemm::available() {
        // SAFETY: AVX2 and FMA are present; the lengths are asserted above.
        done = unsafe { x86::forward(top, bot, out) };
    }
    for o in done..n {
        out[o] = [top[2 * o + 1], bot[2 * o], bot[2 * o + 1]]
            .into_iter()
            .fold(top[2 * o], |b, v| if v > b { v } else { b });
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
    let n = dy.len();
    assert!(
        top.len() >= 2 * n && bot.len() >= 2 * n && gtop.len() >= 2 * n && gbot.len() >= 2 * n,
        "maxpool2: rows too short"
    );
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if n >= 8 && super::sgemm::available() {
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
mod x86 {
    use std::arch::x86_64::*;

    /// Even and odd elements of `p[0..16]`, in order.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn split(p: *const f32) -> (__m256, __m256) {
        // SAFETY: the caller guarantees 16 readable floats at `p`.
        unsafe {
            let (a, b) = (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)));
            // Within each 128-bit half: a0 a2 b0 b2 | a4 a6 b4 b6; then fix the half order.
            let ev = _mm256_shuffle_ps::<0b10_00_10_00>(a, b);
            let od = _mm256_shuffle_ps::<0b11_01_11_01>(a, b);
            let fix = |v: __m256| {
                _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(v)))
            };
            (fix(ev), fix(od))
        }
    }

    /// `(lo, hi)` interleaved into `p[0..16]`: lo0 hi0 lo1 hi1 ...
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn merge(p: *mut f32, lo: __m256, hi: __m256, accumulate: bool) {
        let a = _mm256_unpacklo_ps(lo, hi);
        let b = _mm256_unpackhi_ps(lo, hi);
        let first = _mm256_permute2f128_ps::<0x20>(a, b);
        let second = _mm256_permute2f128_ps::<0x31>(a, b);
        // SAFETY: the caller guarantees 16 writable floats at `p`.
        unsafe {
            if accumulate {
                _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), first));
                _mm256_storeu_ps(p.add(8), _mm256_add_ps(_mm256_loadu_ps(p.add(8)), second));
            } else {
                _mm256_storeu_ps(p, first);
                _mm256_storeu_ps(p.add(8), second);
            }
        }
    }

    /// The four taps of eight windows, then the masks of "this tap beat the best so far".
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn taps(top: *const f32, bot: *const f32) -> ([__m256; 4], [__m256; 3], __m256) {
        // SAFETY: as in `split`, for both rows.
        let ((t0, t1), (b0, b1)) = unsafe { (split(top), split(bot)) };
        let is1 = _mm256_cmp_ps::<_CMP_GT_OQ>(t1, t0);
        let best = _mm256_blendv_ps(t0, t1, is1);
        let is2 = _mm256_cmp_ps::<_CMP_GT_OQ>(b0, best);
        let best = _mm256_blendv_ps(best, b0, is2);
        let is3 = _mm256_cmp_ps::<_CMP_GT_OQ>(b1, best);
        let best = _mm256_blendv_ps(best, b1, is3);
        ([t0, t1, b0, b1], [is1, is2, is3], best)
    }

    /// Whole groups of eight windows; returns how many windows it did.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn forward(top: &[f32], bot: &[f32], out: &mut [f32]) -> usize {
        let groups = out.len() / 8;
        for g in 0..groups {
            // SAFETY: window 8g + 7 reads taps below 16g + 16 <= 2 out.len() <= the rows.
            unsafe {
                let (_, _, best) = taps(top.as_ptr().add(16 * g), bot.as_ptr().add(16 * g));
                _mm256_storeu_ps(out.as_mut_ptr().add(8 * g), best);
            }
        }
        groups * 8
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
        let groups = dy.len() / 8;
        for g in 0..groups {
            // SAFETY: as in `forward`, for the inputs, `dy` and both gradient rows.
            unsafe {
                let (_, [is1, is2, is3], _) =
                    taps(top.as_ptr().add(16 * g), bot.as_ptr().add(16 * g));
                let d = _mm256_loadu_ps(dy.as_ptr().add(8 * g));
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
                    gtop.as_mut_ptr().add(16 * g),
                    g_of(w0),
                    g_of(w1),
                    accumulate,
                );
                merge(
                    gbot.as_mut_ptr().add(16 * g),
                    g_of(w2),
                    g_of(w3),
                    accumulate,
                );
            }
        }
        groups * 8
    }
}
