//! How far a written frame moved from its original: the norms of the perturbation (stored
//! units, and Hounsfield units for CT), PSNR and SSIM, one [`FrameMetrics`] per frame.
//!
//! Both frames are compared as *stored* values (what the file holds, before the modality
//! rescale), because that is the unit attacks are bounded in and the unit the writer puts back
//! bit for bit. Everything is accumulated in f64 so that the metrics do not depend on the order
//! of the f32 inputs' rounding.
//!
//! Choices that a reader of the results needs to know:
//! - **Peak / dynamic range `L`** (PSNR peak and the SSIM constants) is the data range of the
//!   *original* frame, max - min over all its samples. A 12-bit CT whose values span 0..2000
//!   would look 6 dB better than it is if the 4095 of the stored range were used, and a display
//!   frame with 8-bit content stored in 16 bits would look 48 dB better. When the original is
//!   flat (max == min) there is no data range, and the representable stored range
//!   ([`ImageMeta::value_range`]) is used instead; when that is unbounded too (float pixel data),
//!   `L = 1`.
//! - **SSIM** follows Wang, Bovik, Sheikh & Simoncelli 2004: an 11x11 Gaussian window with
//!   sigma 1.5 (normalised), K1 = 0.01, K2 = 0.03, population (not sample) moments, and the mean
//!   of the SSIM map over the positions where the window lies entirely inside the frame (the
//!   reference MATLAB code's `filter2(..., 'valid')`, and scikit-image's border crop). Frames
//!   narrower or shorter than 11 samples have no such position: the window is then extended by
//!   mirror reflection (`d c b a | a b c d`, scipy's `reflect`) and the map is averaged over the
//!   whole frame. Multi-sample (RGB) frames: SSIM per channel, then the mean of the channels.

use serde::Serialize;
use thiserror::Error;

use crate::dicom::ImageMeta;

/// SSIM window radius: an 11x11 window.
const RADIUS: usize = 5;
const WIN: usize = 2 * RADIUS + 1;
const SIGMA: f64 = 1.5;
const K1: f64 = 0.01;
const K2: f64 = 0.03;

/// The comparison of one original frame with the frame that was written for it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct FrameMetrics {
    /// max |new - orig| in stored units.
    pub linf_stored: f64,
    /// Euclidean norm of (new - orig) over all samples of the frame, stored units.
    pub l2_stored: f64,
    /// `linf_stored` x |rescale slope| for CT (one stored unit is |slope| HU); None otherwise.
    pub linf_hu: Option<f64>,
    /// `l2_stored` x |rescale slope| for CT; None otherwise.
    pub l2_hu: Option<f64>,
    /// 10 log10(L^2 / MSE) in dB with `L` the original's data range (see the module docs);
    /// None when the frames are identical (infinite PSNR).
    pub psnr_db: Option<f64>,
    /// Mean structural similarity (1 for identical frames).
    pub ssim: f64,
}

/// Why two frames cannot be compared.
#[derive(Debug, Error, PartialEq)]
pub enum MetricsError {
    #[error(
        "frame size mismatch: {rows}x{cols}x{samples} = {expected} samples expected, original has {orig}, new has {new}"
    )]
    Shape {
        rows: u32,
        cols: u32,
        samples: u16,
        expected: usize,
        orig: usize,
        new: usize,
    },
    #[error("empty frame ({rows}x{cols}x{samples})")]
    Empty { rows: u32, cols: u32, samples: u16 },
}

/// Compare one frame (interleaved [rows, cols, samples] stored values, as
/// `DecodedImage::frame_f32` gives them).
///
/// The pipeline records metrics next to results rather than failing an instance over them, so
/// this never fails: frames that do not match `meta`'s geometry (a caller bug, see
/// [`try_frame_metrics`]) yield NaN metrics, which the result writers show as missing values.
pub fn frame_metrics(orig: &[f32], new: &[f32], meta: &ImageMeta) -> FrameMetrics {
    try_frame_metrics(orig, new, meta).unwrap_or(FrameMetrics {
        linf_stored: f64::NAN,
        l2_stored: f64::NAN,
        linf_hu: None,
        l2_hu: None,
        psnr_db: Some(f64::NAN),
        ssim: f64::NAN,
    })
}

/// [`frame_metrics`], with an error when the slices do not hold one frame of `meta`'s geometry.
pub fn try_frame_metrics(
    orig: &[f32],
    new: &[f32],
    meta: &ImageMeta,
) -> Result<FrameMetrics, MetricsError> {
    let (rows, cols, spp) = (
        meta.rows as usize,
        meta.cols as usize,
        meta.samples_per_pixel as usize,
    );
    let expected = rows.saturating_mul(cols).saturating_mul(spp);
    if orig.len() != expected || new.len() != expected {
        return Err(MetricsError::Shape {
            rows: meta.rows,
            cols: meta.cols,
            samples: meta.samples_per_pixel,
            expected,
            orig: orig.len(),
            new: new.len(),
        });
    }
    if expected == 0 {
        return Err(MetricsError::Empty {
            rows: meta.rows,
            cols: meta.cols,
            samples: meta.samples_per_pixel,
        });
    }

    let (mut linf, sum_sq) = diff_norms(orig, new);
    // f64::max ignores NaN; a NaN difference must not disappear from the L-inf norm.
    if sum_sq.is_nan() {
        linf = f64::NAN;
    }
    let l2 = sum_sq.sqrt();
    let range = data_range(orig, meta);
    let psnr_db = if sum_sq == 0.0 {
        None
    } else {
        let mse = sum_sq / expected as f64;
        Some(10.0 * (range * range / mse).log10())
    };
    let hu_scale = is_ct(meta).then(|| meta.rescale_slope.abs());
    let mut ssim_sum = 0.0;
    for c in 0..spp {
        ssim_sum += ssim_channel(orig, new, rows, cols, spp, c, range);
    }
    Ok(FrameMetrics {
        linf_stored: linf,
        l2_stored: l2,
        linf_hu: hu_scale.map(|s| linf * s),
        l2_hu: hu_scale.map(|s| l2 * s),
        psnr_db,
        ssim: ssim_sum / spp as f64,
    })
}

fn is_ct(meta: &ImageMeta) -> bool {
    meta.modality
        .as_deref()
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("CT"))
}

/// Lanes of the reductions below: independent running values the compiler keeps in vector
/// registers instead of one serial chain.
const LANES: usize = 8;

/// (max |new - orig|, sum of (new - orig)^2), in f64. The maximum skips NaN differences as
/// `f64::max` does (0 when empty); the sum sees them. Both run in [`LANES`] lanes: a maximum does
/// not depend on the order it is taken in, and the sum does only in its last bits, for samples
/// that are not integers (integer samples below 2^24, as every integer pixel type up to 24 bits
/// gives, have exact squares and exact sums).
fn diff_norms(orig: &[f32], new: &[f32]) -> (f64, f64) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above), the only requirement of a
            // `target_feature(enable = "avx2")` function.
            return unsafe { diff_norms_avx2(orig, new) };
        }
    }
    diff_norms_impl(orig, new)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn diff_norms_avx2(orig: &[f32], new: &[f32]) -> (f64, f64) {
    diff_norms_impl(orig, new)
}

#[inline(always)]
fn diff_norms_impl(orig: &[f32], new: &[f32]) -> (f64, f64) {
    let n = orig.len().min(new.len());
    let (orig, new) = (&orig[..n], &new[..n]);
    let (ca, cb) = (orig.chunks_exact(LANES), new.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    let mut m = [0f64; LANES];
    let mut sq = [0f64; LANES];
    for (a, b) in ca.zip(cb) {
        for l in 0..LANES {
            let d = b[l] as f64 - a[l] as f64;
            m[l] = m[l].max(d.abs());
            sq[l] += d * d;
        }
    }
    let mut linf = m.iter().fold(0f64, |x, &y| x.max(y));
    let mut sum_sq = sq.iter().sum::<f64>();
    for (&a, &b) in ra.iter().zip(rb) {
        let d = b as f64 - a as f64;
        linf = linf.max(d.abs());
        sum_sq += d * d;
    }
    (linf, sum_sq)
}

/// Minimum and maximum of the finite samples (+inf, -inf when there is none), in f32 (exact:
/// they are samples). Their order does not matter, so on x86-64 with AVX2 it runs 8 wide.
fn finite_min_max(v: &[f32]) -> (f32, f32) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above), the only requirement of a
            // `target_feature(enable = "avx2")` function.
            return unsafe { finite_min_max_avx2(v) };
        }
    }
    finite_min_max_scalar(v, f32::INFINITY, f32::NEG_INFINITY)
}

fn finite_min_max_scalar(v: &[f32], mut lo: f32, mut hi: f32) -> (f32, f32) {
    for &x in v {
        // NaN fails every comparison; infinities are skipped by the bounds.
        if x < lo && x > f32::NEG_INFINITY {
            lo = x;
        }
        if x > hi && x < f32::INFINITY {
            hi = x;
        }
    }
    (lo, hi)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn finite_min_max_avx2(v: &[f32]) -> (f32, f32) {
    use std::arch::x86_64::*;
    let chunks = v.chunks_exact(8);
    let rest = chunks.remainder();
    let inf = _mm256_set1_ps(f32::INFINITY);
    let ninf = _mm256_set1_ps(f32::NEG_INFINITY);
    let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let (mut lo, mut hi) = (inf, ninf);
    for c in chunks {
        // SAFETY: `c` holds 8 f32 (an unaligned load).
        let x = unsafe { _mm256_loadu_ps(c.as_ptr()) };
        // |x| < inf: false for infinities and NaN (ordered comparison), which then count as
        // the neutral +inf (minimum) and -inf (maximum).
        let finite = _mm256_cmp_ps::<_CMP_LT_OQ>(_mm256_and_ps(x, abs), inf);
        lo = _mm256_min_ps(lo, _mm256_blendv_ps(inf, x, finite));
        hi = _mm256_max_ps(hi, _mm256_blendv_ps(ninf, x, finite));
    }
    let (mut l8, mut h8) = ([0f32; 8], [0f32; 8]);
    // SAFETY: each array holds 8 f32 (unaligned stores).
    unsafe {
        _mm256_storeu_ps(l8.as_mut_ptr(), lo);
        _mm256_storeu_ps(h8.as_mut_ptr(), hi);
    }
    let lo = l8
        .iter()
        .fold(f32::INFINITY, |a, &b| if b < a { b } else { a });
    let hi = h8
        .iter()
        .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
    finite_min_max_scalar(rest, lo, hi)
}

/// The dynamic range `L` of the module docs.
pub fn data_range(orig: &[f32], meta: &ImageMeta) -> f64 {
    let (lo, hi) = finite_min_max(orig);
    let (lo, hi) = (lo as f64, hi as f64);
    // No finite sample leaves lo = +inf, hi = -inf: no data range either.
    if hi > lo {
        return hi - lo;
    }
    let (lo, hi) = meta.value_range();
    let r = hi - lo;
    if r.is_finite() && r > 0.0 { r } else { 1.0 }
}

/// The normalised 1-D Gaussian taps; the 2-D window is their outer product, which is then
/// normalised too (as MATLAB's `fspecial('gaussian', 11, 1.5)` and scipy's `gaussian_filter`).
fn gaussian_taps() -> [f64; WIN] {
    let mut w = [0f64; WIN];
    for (i, v) in w.iter_mut().enumerate() {
        let x = i as f64 - RADIUS as f64;
        *v = (-0.5 * x * x / (SIGMA * SIGMA)).exp();
    }
    let s: f64 = w.iter().sum();
    w.iter_mut().for_each(|v| *v /= s);
    w
}

/// scipy's `reflect` boundary: index `i` (possibly outside 0..n) folded back into the frame.
fn reflect(i: isize, n: usize) -> usize {
    let n = n as isize;
    let m = i.rem_euclid(2 * n);
    (if m >= n { 2 * n - 1 - m } else { m }) as usize
}

/// Mean SSIM of channel `c`. Streams over rows: each row is filtered horizontally into the four
/// local moments it needs (x, y, x^2 + y^2, xy: only the sum of the two variances enters the
/// formula) and kept in a ring of the last 11 rows, from which the vertical pass yields one
/// output row at a time, so memory stays at 11 rows whatever the frame size.
///
/// Speed (the pipeline computes this for every frame it writes): the output columns are done in
/// tiles of [`TILE`], so that the ring of one tile (4 moments x 11 rows x 64 f64) stays in the
/// L1 cache; the moments are separate planes and the symmetric taps are paired
/// (`w[k] (a[k] + a[10-k])`), so the filter loops are plain slice arithmetic; the per-position
/// SSIM terms go to a buffer in a loop without a carried dependency (so it vectorises, division
/// included), and only their sum runs in order. On x86-64 with AVX2 and FMA the same code is
/// compiled a second time for 4-wide f64 with fused multiply-adds in the filters, picked at run
/// time. The fused and the plain build round differently (in the last bits: the metric agrees
/// with the scipy oracle to ~1e-14 either way); each is deterministic.
fn ssim_channel(
    orig: &[f32],
    new: &[f32],
    rows: usize,
    cols: usize,
    spp: usize,
    c: usize,
    range: f64,
) -> f64 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above), the only requirement
            // of a `target_feature(enable = "avx2,fma")` function.
            return unsafe { ssim_channel_fma(orig, new, rows, cols, spp, c, range) };
        }
    }
    ssim_channel_impl::<false>(orig, new, rows, cols, spp, c, range)
}

/// [`ssim_channel_impl`] compiled for AVX2 with fused multiply-adds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn ssim_channel_fma(
    orig: &[f32],
    new: &[f32],
    rows: usize,
    cols: usize,
    spp: usize,
    c: usize,
    range: f64,
) -> f64 {
    ssim_channel_impl::<true>(orig, new, rows, cols, spp, c, range)
}

/// Output columns per tile of [`ssim_channel_impl`].
const TILE: usize = 64;

/// `a * b + c`, fused (one rounding) when `FMA`; only instantiated with `FMA` inside a function
/// compiled with the `fma` target feature, where `mul_add` is one instruction.
#[inline(always)]
fn madd<const FMA: bool>(a: f64, b: f64, c: f64) -> f64 {
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

#[inline(always)]
fn ssim_channel_impl<const FMA: bool>(
    orig: &[f32],
    new: &[f32],
    rows: usize,
    cols: usize,
    spp: usize,
    c: usize,
    range: f64,
) -> f64 {
    const MOMENTS: usize = 4;
    let w = gaussian_taps();
    let c1 = (K1 * range) * (K1 * range);
    let c2 = (K2 * range) * (K2 * range);
    // No reflected border when the window fits: only the 'valid' positions are averaged.
    let pad = if rows >= WIN && cols >= WIN {
        0
    } else {
        RADIUS
    };
    let padded_cols = cols + 2 * pad;
    let out_cols = padded_cols + 1 - WIN;
    let out_rows = rows + 2 * pad + 1 - WIN;

    let col_src: Vec<usize> = (0..padded_cols)
        .map(|j| reflect(j as isize - pad as isize, cols))
        .collect();
    let tile = TILE.min(out_cols);
    // One padded input line per moment (a tile's columns and the window's reach); the ring
    // holds WIN filtered rows per moment.
    let mut lines = vec![vec![0f64; tile + WIN - 1]; MOMENTS];
    let mut ring = vec![vec![vec![0f64; tile]; WIN]; MOMENTS];
    let mut acc = vec![vec![0f64; tile]; MOMENTS];
    let mut terms = vec![0f64; tile];
    let mut total = 0f64;

    for t0 in (0..out_cols).step_by(tile) {
        let tn = tile.min(out_cols - t0);
        let ln = tn + WIN - 1;
        for i in 0..rows + 2 * pad {
            let r = reflect(i as isize - pad as isize, rows);
            let base = r * cols;
            {
                let [lx, ly, lsq, lxy] = &mut lines[..] else {
                    unreachable!("MOMENTS lines")
                };
                let (lx, ly) = (&mut lx[..ln], &mut ly[..ln]);
                let (lsq, lxy) = (&mut lsq[..ln], &mut lxy[..ln]);
                if pad == 0 && spp == 1 {
                    // The common case: a contiguous row, no reflection.
                    let (xs, ys) = (
                        &orig[base + t0..base + t0 + ln],
                        &new[base + t0..base + t0 + ln],
                    );
                    for j in 0..ln {
                        let (x, y) = (xs[j] as f64, ys[j] as f64);
                        lx[j] = x;
                        ly[j] = y;
                        lsq[j] = madd::<FMA>(x, x, y * y);
                        lxy[j] = x * y;
                    }
                } else {
                    for (j, &src) in col_src[t0..t0 + ln].iter().enumerate() {
                        let x = orig[(base + src) * spp + c] as f64;
                        let y = new[(base + src) * spp + c] as f64;
                        lx[j] = x;
                        ly[j] = y;
                        lsq[j] = madd::<FMA>(x, x, y * y);
                        lxy[j] = x * y;
                    }
                }
            }
            // Each output in registers through all 11 taps (one store per output, not one per
            // tap pair).
            let slot = i % WIN;
            for (line, rows_q) in lines.iter().zip(ring.iter_mut()) {
                let dst = &mut rows_q[slot][..tn];
                let line = &line[..tn + WIN - 1];
                for (j, d) in dst.iter_mut().enumerate() {
                    let s = &line[j..j + WIN];
                    let mut v = w[RADIUS] * s[RADIUS];
                    for k in 0..RADIUS {
                        v = madd::<FMA>(w[k], s[k] + s[WIN - 1 - k], v);
                    }
                    *d = v;
                }
            }
            if i + 1 < WIN {
                continue;
            }
            // Rows i-10 ..= i are in the ring (row i-10+k in slot (i+1+k) % WIN); their
            // vertical combination is output row i-10.
            let at = |k: usize| (i + 1 + k) % WIN;
            for (a, rows_q) in acc.iter_mut().zip(&ring) {
                let a = &mut a[..tn];
                let r: [&[f64]; WIN] = std::array::from_fn(|k| &rows_q[at(k)][..tn]);
                for (j, d) in a.iter_mut().enumerate() {
                    let mut v = w[RADIUS] * r[RADIUS][j];
                    for k in 0..RADIUS {
                        v = madd::<FMA>(w[k], r[k][j] + r[WIN - 1 - k][j], v);
                    }
                    *d = v;
                }
            }
            let [mx, my, msq, mxy] = &acc[..] else {
                unreachable!("MOMENTS accumulators")
            };
            let terms = &mut terms[..tn];
            for ((((t, &mx), &my), &msq), &mxy) in
                terms.iter_mut().zip(mx).zip(my).zip(msq).zip(mxy)
            {
                // sigma_x^2 + sigma_y^2 = E[x^2 + y^2] - mu_x^2 - mu_y^2.
                let means_sq = mx * mx + my * my;
                let var_sum = msq - means_sq;
                let cov = mxy - mx * my;
                *t = ((2.0 * mx * my + c1) * (2.0 * cov + c2)) / ((means_sq + c1) * (var_sum + c2));
            }
            for &t in terms.iter() {
                total += t;
            }
        }
    }
    total / (out_rows * out_cols) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dicom::{DecodeLimits, DicomFile, PixelKind};
    use rand::{Rng, SeedableRng};
    use std::path::{Path, PathBuf};
    use std::process::Command;

    /// The plain row-by-row formulation the fast [`ssim_channel`] must equal to rounding (the
    /// implementation before it was restructured for speed). Streams over rows: each row is filtered horizontally into the four
    /// local moments it needs (x, y, x^2 + y^2, xy: only the sum of the two variances enters the
    /// formula) and kept in a ring of the last 11 rows, from which the
    /// vertical pass yields one output row at a time, so memory stays at 11 rows whatever the frame
    /// size. The moments are kept as separate planes and the symmetric taps are paired
    /// (`w[k] (a[k] + a[10-k])`) so the inner loops are plain slice arithmetic the compiler
    /// vectorises: the pipeline computes this for every frame it writes.
    fn ssim_channel_rows(
        orig: &[f32],
        new: &[f32],
        rows: usize,
        cols: usize,
        spp: usize,
        c: usize,
        range: f64,
    ) -> f64 {
        const MOMENTS: usize = 4;
        let w = gaussian_taps();
        let c1 = (K1 * range) * (K1 * range);
        let c2 = (K2 * range) * (K2 * range);
        // No reflected border when the window fits: only the 'valid' positions are averaged.
        let pad = if rows >= WIN && cols >= WIN {
            0
        } else {
            RADIUS
        };
        let padded_cols = cols + 2 * pad;
        let out_cols = padded_cols + 1 - WIN;
        let out_rows = rows + 2 * pad + 1 - WIN;

        let col_src: Vec<usize> = (0..padded_cols)
            .map(|j| reflect(j as isize - pad as isize, cols))
            .collect();
        // One padded input line per moment; the ring holds WIN filtered rows per moment.
        let mut lines = vec![vec![0f64; padded_cols]; MOMENTS];
        let mut ring = vec![vec![vec![0f64; out_cols]; WIN]; MOMENTS];
        let mut acc = vec![vec![0f64; out_cols]; MOMENTS];
        let mut total = 0f64;

        for i in 0..rows + 2 * pad {
            let r = reflect(i as isize - pad as isize, rows);
            let base = r * cols;
            {
                let [lx, ly, lsq, lxy] = &mut lines[..] else {
                    unreachable!("MOMENTS lines")
                };
                for (j, &src) in col_src.iter().enumerate() {
                    let x = orig[(base + src) * spp + c] as f64;
                    let y = new[(base + src) * spp + c] as f64;
                    lx[j] = x;
                    ly[j] = y;
                    lsq[j] = x * x + y * y;
                    lxy[j] = x * y;
                }
            }
            let slot = i % WIN;
            for (line, rows_q) in lines.iter().zip(ring.iter_mut()) {
                let dst = &mut rows_q[slot];
                for (d, &m) in dst.iter_mut().zip(&line[RADIUS..]) {
                    *d = w[RADIUS] * m;
                }
                for k in 0..RADIUS {
                    let wk = w[k];
                    let a = &line[k..k + out_cols];
                    let b = &line[WIN - 1 - k..WIN - 1 - k + out_cols];
                    for ((d, &a), &b) in dst.iter_mut().zip(a).zip(b) {
                        *d += wk * (a + b);
                    }
                }
            }
            if i + 1 < WIN {
                continue;
            }
            // Rows i-10 ..= i are in the ring (row i-10+k in slot (i+1+k) % WIN); their vertical
            // combination is output row i-10.
            let at = |k: usize| (i + 1 + k) % WIN;
            for (a, rows_q) in acc.iter_mut().zip(&ring) {
                for (d, &m) in a.iter_mut().zip(&rows_q[at(RADIUS)]) {
                    *d = w[RADIUS] * m;
                }
                for k in 0..RADIUS {
                    let wk = w[k];
                    let (p, q) = (&rows_q[at(k)], &rows_q[at(WIN - 1 - k)]);
                    for ((d, &p), &q) in a.iter_mut().zip(p).zip(q) {
                        *d += wk * (p + q);
                    }
                }
            }
            let [mx, my, msq, mxy] = &acc[..] else {
                unreachable!("MOMENTS accumulators")
            };
            for j in 0..out_cols {
                let (mx, my) = (mx[j], my[j]);
                // sigma_x^2 + sigma_y^2 = E[x^2 + y^2] - mu_x^2 - mu_y^2.
                let means_sq = mx * mx + my * my;
                let var_sum = msq[j] - means_sq;
                let cov = mxy[j] - mx * my;
                total +=
                    ((2.0 * mx * my + c1) * (2.0 * cov + c2)) / ((means_sq + c1) * (var_sum + c2));
            }
        }
        total / (out_rows * out_cols) as f64
    }

    fn meta(rows: u32, cols: u32, spp: u16, modality: &str) -> ImageMeta {
        ImageMeta {
            rows,
            cols,
            samples_per_pixel: spp,
            bits_allocated: 16,
            bits_stored: 12,
            high_bit: 11,
            pixel_representation: 0,
            photometric: if spp == 3 { "RGB" } else { "MONOCHROME2" }.into(),
            planar_configuration: 0,
            rescale_slope: -2.0,
            rescale_intercept: -1024.0,
            rescale_type: None,
            window_center: vec![],
            window_width: vec![],
            modality: Some(modality.into()),
            sop_class_uid: None,
            sop_instance_uid: None,
            series_instance_uid: None,
            study_instance_uid: None,
            transfer_syntax_uid: "1.2.840.10008.1.2.1".into(),
            transfer_syntax_name: "Explicit VR Little Endian".into(),
            frames: 1,
            kind: PixelKind::Integer,
            source_photometric: "MONOCHROME2".into(),
            source_planar_configuration: 0,
            source_lossy: false,
            compressed_bytes: None,
        }
    }

    fn random_frame(n: usize, hi: f32, seed: u64) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(0.0..hi).round()).collect()
    }

    /// Adds bounded integer noise, clamped to [0, hi] like a written frame would be.
    fn perturb(x: &[f32], eps: i32, hi: f32, seed: u64) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        x.iter()
            .map(|&v| (v + rng.random_range(-eps..=eps) as f32).clamp(0.0, hi))
            .collect()
    }

    #[test]
    fn lane_reductions_equal_the_plain_folds() {
        let m = meta(1, 1, 1, "CT");
        for n in [0usize, 1, 3, 4, 5, 7, 8, 9, 17, 1000] {
            let mut x = random_frame(n, 4095.0, 7 + n as u64);
            let mut y = perturb(&x, 30, 4095.0, 8 + n as u64);
            if n > 4 {
                // NaN and infinities are skipped by both; negative values count.
                x[1] = f32::NAN;
                x[2] = f32::INFINITY;
                x[n - 1] = -5.0;
                y[3] = f32::NAN;
            }
            let (mut linf, mut sum_sq) = (0f64, 0f64);
            for (&a, &b) in x.iter().zip(&y) {
                linf = linf.max((b as f64 - a as f64).abs());
                sum_sq += (b as f64 - a as f64).powi(2);
            }
            let (got_linf, got_sq) = diff_norms(&x, &y);
            assert_eq!(got_linf.to_bits(), linf.to_bits(), "{n}");
            // Integer samples: exact sums, in any order (NaN where a sample is NaN).
            assert_eq!(got_sq.is_nan(), sum_sq.is_nan(), "{n}");
            if !sum_sq.is_nan() {
                assert_eq!(got_sq, sum_sq, "{n}");
            }
            let mut it = x.iter().map(|&v| v as f64).filter(|v| v.is_finite());
            let want = it.next().and_then(|first| {
                let (lo, hi) = it.fold((first, first), |(lo, hi), v| (lo.min(v), hi.max(v)));
                (hi > lo).then_some(hi - lo)
            });
            assert_eq!(data_range(&x, &m), want.unwrap_or(4095.0), "{n}");
        }
        for n in [0usize, 3, 8, 13, 100] {
            let mut x = random_frame(n, 4095.0, 50 + n as u64);
            if n > 10 {
                x[0] = f32::NEG_INFINITY;
                x[9] = f32::NAN;
                x[n - 1] = -3.5;
            }
            let s = finite_min_max_scalar(&x, f32::INFINITY, f32::NEG_INFINITY);
            assert_eq!(finite_min_max(&x), s, "{n}");
        }
        let flat = vec![7.0f32; 9];
        assert_eq!(data_range(&flat, &m), 4095.0);
        assert_eq!(data_range(&[f32::NAN, f32::INFINITY], &m), 4095.0);
    }

    #[test]
    fn tiled_ssim_equals_the_row_by_row_formulation() {
        // Valid-only frames (with and without a vector tail, one and several column tiles),
        // reflected small ones, RGB. The tiled plain build sums the same terms in another order
        // (tile by tile) and the fused build rounds its filters once per tap instead of twice:
        // both agree with the plain row-by-row formulation to rounding (~1e-15), far inside the
        // oracle's 1e-9.
        for (i, &(rows, cols, spp)) in [
            (64usize, 64usize, 1usize),
            (80, 150, 1),
            (37, 29, 1),
            (11, 11, 1),
            (7, 9, 1),
            (3, 20, 1),
            (3, 90, 1),
            (14, 13, 3),
            (12, 100, 3),
            (5, 4, 3),
        ]
        .iter()
        .enumerate()
        {
            let n = rows * cols * spp;
            let x = random_frame(n, 4095.0, 100 + i as u64);
            let y = perturb(&x, 40, 4095.0, 200 + i as u64);
            for c in 0..spp {
                let fast = ssim_channel(&x, &y, rows, cols, spp, c, 4095.0);
                let plain = ssim_channel_impl::<false>(&x, &y, rows, cols, spp, c, 4095.0);
                let rows_ref = ssim_channel_rows(&x, &y, rows, cols, spp, c, 4095.0);
                for got in [fast, plain] {
                    assert!(
                        (got - rows_ref).abs() < 1e-13,
                        "{rows}x{cols}x{spp} c{c}: {got} vs {rows_ref}"
                    );
                }
                assert!(
                    fast < 1.0,
                    "{rows}x{cols}x{spp}: the perturbation must show"
                );
            }
        }
    }

    #[test]
    fn identical_frames() {
        let m = meta(20, 17, 1, "CT");
        let x = random_frame(20 * 17, 4000.0, 1);
        let r = frame_metrics(&x, &x, &m);
        assert_eq!(r.psnr_db, None);
        assert_eq!(r.linf_stored, 0.0);
        assert_eq!(r.l2_stored, 0.0);
        assert_eq!(r.linf_hu, Some(0.0));
        assert!((r.ssim - 1.0).abs() < 1e-12, "ssim {}", r.ssim);
    }

    #[test]
    fn constant_offset_has_known_norms_and_psnr() {
        // Original spans 0..=1000 (data range 1000); a +10 offset everywhere: MSE 100, so
        // PSNR = 10 log10(1000^2 / 100) = 40 dB; L-inf 10; L2 = 10 sqrt(n).
        let (rows, cols) = (16u32, 24u32);
        let n = (rows * cols) as usize;
        let mut x = random_frame(n, 1000.0, 2);
        x[0] = 0.0;
        x[1] = 1000.0;
        let y: Vec<f32> = x.iter().map(|v| v + 10.0).collect();
        let m = meta(rows, cols, 1, "CT");
        let r = frame_metrics(&x, &y, &m);
        assert!((r.psnr_db.unwrap() - 40.0).abs() < 1e-9, "{r:?}");
        assert_eq!(r.linf_stored, 10.0);
        assert!((r.l2_stored - 10.0 * (n as f64).sqrt()).abs() < 1e-9);
        // CT: |slope| = 2 HU per stored unit.
        assert_eq!(r.linf_hu, Some(20.0));
        assert!((r.l2_hu.unwrap() - 20.0 * (n as f64).sqrt()).abs() < 1e-9);
        // A pure luminance shift keeps the structure term at 1 and lowers only luminance.
        assert!(r.ssim < 1.0 && r.ssim > 0.99, "{}", r.ssim);
    }

    #[test]
    fn hu_only_for_ct_and_flat_frames_use_stored_range() {
        let m = meta(12, 12, 1, "MR");
        let x = vec![7.0f32; 144];
        let y: Vec<f32> = x.iter().map(|v| v + 1.0).collect();
        let r = frame_metrics(&x, &y, &m);
        assert_eq!(r.linf_hu, None);
        assert_eq!(r.l2_hu, None);
        // Flat original: L = stored range of 12 bits = 4095; MSE 1.
        let want = 10.0 * (4095f64 * 4095.0).log10();
        assert!((r.psnr_db.unwrap() - want).abs() < 1e-9, "{r:?}");
    }

    #[test]
    fn ssim_decreases_with_noise() {
        let m = meta(40, 40, 1, "OT");
        let x = random_frame(1600, 255.0, 3);
        let small = frame_metrics(&x, &perturb(&x, 2, 255.0, 4), &m);
        let big = frame_metrics(&x, &perturb(&x, 40, 255.0, 4), &m);
        assert!(small.ssim > big.ssim, "{} {}", small.ssim, big.ssim);
        assert!(small.psnr_db.unwrap() > big.psnr_db.unwrap());
    }

    #[test]
    fn wrong_lengths_are_an_error_not_a_panic() {
        let m = meta(4, 4, 1, "CT");
        let e = try_frame_metrics(&[0.0; 16], &[0.0; 15], &m).unwrap_err();
        assert!(matches!(e, MetricsError::Shape { new: 15, .. }), "{e}");
        assert!(frame_metrics(&[0.0; 16], &[0.0; 15], &m).ssim.is_nan());
        // A single sample is still a frame (reflected window): finite metrics.
        let r = try_frame_metrics(&[1.0], &[3.0], &meta(1, 1, 1, "CT")).unwrap();
        assert!(r.ssim.is_finite() && r.ssim < 1.0, "{r:?}");
        let m0 = meta(0, 4, 1, "CT");
        assert!(matches!(
            try_frame_metrics(&[], &[], &m0),
            Err(MetricsError::Empty { .. })
        ));
    }

    #[test]
    fn reflect_matches_scipy_convention() {
        // scipy 'reflect': d c b a | a b c d | d c b a
        let got: Vec<usize> = (-5..9).map(|i| reflect(i, 4)).collect();
        assert_eq!(got, [3, 3, 2, 1, 0, 0, 1, 2, 3, 3, 2, 1, 0, 0]);
        assert!((-7..7).all(|i| reflect(i, 1) == 0));
    }

    // ---- against the independent scipy implementation (scripts/oracle/ssim_ref.py) ----

    fn repo_root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default()
    }

    /// `ADVERSE_PYTHON`, else `<repo>/.venv/bin/python`; fails (never skips) when neither exists.
    fn python() -> PathBuf {
        if let Some(p) = std::env::var_os("ADVERSE_PYTHON") {
            return PathBuf::from(p);
        }
        let p = repo_root().join(".venv/bin/python");
        assert!(
            p.exists(),
            "no Python oracle: set ADVERSE_PYTHON or create {} (scripts/test.sh does)",
            p.display()
        );
        p
    }

    struct Case {
        name: String,
        orig: Vec<f32>,
        new: Vec<f32>,
        meta: ImageMeta,
    }

    /// Runs the oracle on every case at once (one interpreter start) and compares. SSIM must
    /// agree within 1e-9 (the brief asks 1e-6; both sum in f64 and agree to ~1e-14).
    fn check_against_oracle(cases: &[Case]) {
        let dir = tempfile::tempdir().unwrap();
        let mut args = vec![];
        for (i, c) in cases.iter().enumerate() {
            let a = dir.path().join(format!("{i}a.f32"));
            let b = dir.path().join(format!("{i}b.f32"));
            std::fs::write(&a, bytemuck::cast_slice::<f32, u8>(&c.orig)).unwrap();
            std::fs::write(&b, bytemuck::cast_slice::<f32, u8>(&c.new)).unwrap();
            args.push(format!(
                "{}:{}:{}:{}:{}:{}",
                a.display(),
                b.display(),
                c.meta.rows,
                c.meta.cols,
                c.meta.samples_per_pixel,
                data_range(&c.orig, &c.meta)
            ));
        }
        let out = Command::new(python())
            .arg(repo_root().join("scripts/oracle/ssim_ref.py"))
            .args(&args)
            .output()
            .expect("run the Python oracle");
        assert!(
            out.status.success(),
            "ssim_ref.py failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v.len(), cases.len());
        for (c, want) in cases.iter().zip(&v) {
            let got = frame_metrics(&c.orig, &c.new, &c.meta);
            let f = |k: &str| want[k].as_f64();
            let ssim = f("ssim").unwrap();
            assert!(
                (got.ssim - ssim).abs() < 1e-9,
                "{}: ssim {} vs oracle {ssim}",
                c.name,
                got.ssim
            );
            // A meaningful comparison: the perturbation must actually move SSIM off 1.
            assert!(ssim < 0.9999, "{}: degenerate case (ssim {ssim})", c.name);
            let psnr = f("psnr").unwrap();
            let p = got.psnr_db.unwrap();
            assert!((p - psnr).abs() < 1e-9, "{}: psnr {p} vs {psnr}", c.name);
            let linf = f("linf").unwrap();
            assert_eq!(got.linf_stored, linf, "{}", c.name);
            let l2 = f("l2").unwrap();
            assert!((got.l2_stored - l2).abs() <= 1e-9 * l2, "{}", c.name);
        }
    }

    fn decoded(rel: &str) -> (Vec<f32>, ImageMeta) {
        let path = repo_root().join(rel);
        let limits = DecodeLimits::default();
        let img = DicomFile::open(&path, &limits)
            .and_then(|f| f.decode(&limits))
            .unwrap_or_else(|e| panic!("{rel}: {e}"));
        (img.frame_f32(0).unwrap(), img.meta)
    }

    #[test]
    fn ssim_matches_scipy_oracle() {
        let mut cases = vec![];
        // Random: grey with the valid-window path, a frame narrower than the window (reflected
        // border path), and RGB.
        for (name, rows, cols, spp, hi) in [
            ("random 64x48", 64u32, 48u32, 1u16, 4095.0f32),
            ("random 7x30", 7, 30, 1, 255.0),
            ("random 1x40", 1, 40, 1, 1000.0),
            ("random rgb 23x19", 23, 19, 3, 255.0),
        ] {
            let n = (rows * cols) as usize * spp as usize;
            let orig = random_frame(n, hi, rows as u64);
            let new = perturb(&orig, (hi / 20.0) as i32, hi, 9);
            cases.push(Case {
                name: name.into(),
                orig,
                new,
                meta: meta(rows, cols, spp, "OT"),
            });
        }
        // Real: an 8-bit PneumoniaMNIST frame, a 16-bit CT and an 8-bit RGB frame from the
        // corpus, each perturbed.
        for (rel, eps) in [
            (
                "pipelines/samples/pneumoniamnist/pneumoniamnist-test-0000.dcm",
                6,
            ),
            ("pipelines/samples/corpus/693_UNCI.dcm", 30),
            ("pipelines/samples/corpus/SC_rgb.dcm", 8),
        ] {
            let (orig, m) = decoded(rel);
            let (lo, hi) = m.value_range();
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
            let new = orig
                .iter()
                .map(|&v| (v + rng.random_range(-eps..=eps) as f32).clamp(lo as f32, hi as f32))
                .collect();
            cases.push(Case {
                name: rel.into(),
                orig,
                new,
                meta: m,
            });
        }
        check_against_oracle(&cases);
    }
}
