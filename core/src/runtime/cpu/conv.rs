//! Convolution forward and both adjoints: im2col + GEMM (1x1 convolutions skip im2col; depthwise
//! convolutions use a direct loop, where GEMM with one output row would waste its blocking;
//! stride-1 convolutions read their padded input in place, on the panel GEMM or, for 16 or 32
//! output channels, on the lane kernel of [`super::lanes`]; stride-2 ones with chunks of 48 or
//! 64 output channels run on that kernel too, their inputs broadcast from wherever they lie,
//! and others on even/odd phase planes).
//!
//! Work is split by disjoint output blocks ((sample, group) for the forward and the input
//! gradient, group for the weight gradient; (samples, group, channel chunk) on the stride-2
//! lane path), so every output element is produced by exactly one task in a fixed reduction
//! order: results do not depend on thread scheduling.

use gemm::Parallelism;
use rayon::prelude::*;

use super::CpuBackend;
use super::gemm::{MatRef, gemm_f32};
use super::lanes;
use super::ops::unary_f32;
use super::sgemm::{self, PackedA};
use super::wcache::{Form, Weights};
use super::winograd;
use crate::runtime::backend::{Conv2dParams, Pool2dParams, PoolKind, Unary};
use crate::runtime::reference::conv2d_out_hw;

/// Everything derived from the shapes that the three kernels share.
#[derive(Clone, Copy, Debug)]
struct Geom {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    m: usize,
    cg: usize,
    mg: usize,
    g: usize,
    kh: usize,
    kw: usize,
    oh: usize,
    ow: usize,
    p: Conv2dParams,
}

impl Geom {
    fn new(x: [usize; 4], wt: [usize; 4], p: &Conv2dParams) -> Geom {
        let [n, c, h, w] = x;
        let [m, cg, kh, kw] = wt;
        let g = p.groups;
        assert!(
            g >= 1 && cg * g == c && m % g == 0,
            "conv channels: x {x:?}, w {wt:?}, groups {g}"
        );
        let [oh, ow] = conv2d_out_hw(h, w, kh, kw, p);
        Geom {
            n,
            c,
            h,
            w,
            m,
            cg,
            mg: m / g,
            g,
            kh,
            kw,
            oh,
            ow,
            p: *p,
        }
    }
    /// Each group's weights (of `w`) in a kernel's form.
    fn per_group<T>(&self, w: &[f32], f: impl Fn(&[f32]) -> T) -> Vec<T> {
        let len = self.mg * self.k();
        (0..self.g)
            .map(|gi| f(&w[gi * len..(gi + 1) * len]))
            .collect()
    }
    /// The input plane's size with all its padding.
    fn padded_hw(&self) -> (usize, usize) {
        let [pt, pl, pb, pr] = self.p.pad;
        (self.h + pt + pb, self.w + pl + pr)
    }
    /// Rows of the im2col matrix (the GEMM reduction length).
    fn k(&self) -> usize {
        self.cg * self.kh * self.kw
    }
    fn p_out(&self) -> usize {
        self.oh * self.ow
    }
    fn is_pointwise(&self) -> bool {
        self.kh == 1
            && self.kw == 1
            && self.p.stride == [1, 1]
            && self.p.pad == [0; 4]
            && self.oh == self.h
            && self.ow == self.w
    }
    fn is_depthwise(&self) -> bool {
        self.cg == 1 && self.mg == 1
    }
    fn flops(&self) -> usize {
        self.n * self.m * self.p_out() * self.k()
    }
    /// Range of output columns `o` whose input column `o * stride + off` lies in `[0, len)`.
    fn valid_range(out: usize, stride: usize, off: isize, len: usize) -> (usize, usize) {
        // o * stride + off >= 0  <=>  o >= ceil(-off / stride)
        let lo = if off >= 0 {
            0
        } else {
            ((-off) as usize).div_ceil(stride)
        };
        // o * stride + off < len  <=>  o < ceil((len - off) / stride)
        let hi_num = len as isize - off;
        let hi = if hi_num <= 0 {
            0
        } else {
            (hi_num as usize).div_ceil(stride)
        };
        (lo.min(out), hi.min(out).max(lo.min(out)))
    }
    fn row_off(&self, ky: usize) -> isize {
        (ky * self.p.dilation[0]) as isize - self.p.pad[0] as isize
    }
    fn col_off(&self, kx: usize) -> isize {
        (kx * self.p.dilation[1]) as isize - self.p.pad[1] as isize
    }
}

/// Fills `col` (`k x oh*ow`) with the receptive fields of one (sample, group) input block `xg`
/// (`cg x h x w`).
fn im2col(gm: &Geom, xg: &[f32], col: &mut [f32]) {
    im2col_rows(gm, xg, col, 0, gm.oh);
}

/// [`im2col`] of output rows `r0..r1` only: `col` is `k x (r1 - r0)*ow`.
fn im2col_rows(gm: &Geom, xg: &[f32], col: &mut [f32], r0: usize, r1: usize) {
    let (sh, sw) = (gm.p.stride[0], gm.p.stride[1]);
    let pw = (r1 - r0) * gm.ow;
    for ci in 0..gm.cg {
        let plane = &xg[ci * gm.h * gm.w..(ci + 1) * gm.h * gm.w];
        for ky in 0..gm.kh {
            let (oy0, oy1) = Geom::valid_range(gm.oh, sh, gm.row_off(ky), gm.h);
            for kx in 0..gm.kw {
                let row = &mut col[((ci * gm.kh + ky) * gm.kw + kx) * pw..][..pw];
                let (ox0, ox1) = Geom::valid_range(gm.ow, sw, gm.col_off(kx), gm.w);
                for oy in r0..r1 {
                    let dst = &mut row[(oy - r0) * gm.ow..(oy - r0 + 1) * gm.ow];
                    if oy < oy0 || oy >= oy1 {
                        dst.fill(0.0);
                        continue;
                    }
                    let iy = (oy * sh) as isize + gm.row_off(ky);
                    let src = &plane[iy as usize * gm.w..(iy as usize + 1) * gm.w];
                    dst[..ox0].fill(0.0);
                    dst[ox1..].fill(0.0);
                    let ix0 = (ox0 * sw) as isize + gm.col_off(kx);
                    let ix0u = ix0 as usize;
                    if ox0 == ox1 {
                        continue;
                    } else if sw == 1 {
                        dst[ox0..ox1].copy_from_slice(&src[ix0u..ix0u + (ox1 - ox0)]);
                    } else if sw == 2 {
                        // Pairs of which the first is kept (a form the compiler vectorises
                        // with shuffles; indexing by 2j kept a bounds check per element).
                        // The last tap may have no pair inside the row.
                        let n = ox1 - ox0;
                        let whole = if ix0u + 2 * n <= gm.w { n } else { n - 1 };
                        let pairs = src[ix0u..ix0u + 2 * whole].chunks_exact(2);
                        for (d, p) in dst[ox0..ox0 + whole].iter_mut().zip(pairs) {
                            *d = p[0];
                        }
                        if whole < n {
                            dst[ox1 - 1] = src[ix0u + 2 * (n - 1)];
                        }
                    } else {
                        for (j, d) in dst[ox0..ox1].iter_mut().enumerate() {
                            *d = src[ix0u + j * sw];
                        }
                    }
                }
            }
        }
    }
}

/// Adjoint of [`im2col`]: accumulates `col` into one (sample, group) input-gradient block.
fn col2im(gm: &Geom, col: &[f32], dxg: &mut [f32]) {
    let (sh, sw) = (gm.p.stride[0], gm.p.stride[1]);
    let pw = gm.p_out();
    for ci in 0..gm.cg {
        let plane = &mut dxg[ci * gm.h * gm.w..(ci + 1) * gm.h * gm.w];
        for ky in 0..gm.kh {
            let (oy0, oy1) = Geom::valid_range(gm.oh, sh, gm.row_off(ky), gm.h);
            for kx in 0..gm.kw {
                let row = &col[((ci * gm.kh + ky) * gm.kw + kx) * pw..][..pw];
                let (ox0, ox1) = Geom::valid_range(gm.ow, sw, gm.col_off(kx), gm.w);
                for oy in oy0..oy1 {
                    let iy = ((oy * sh) as isize + gm.row_off(ky)) as usize;
                    let dst = &mut plane[iy * gm.w..(iy + 1) * gm.w];
                    let src = &row[oy * gm.ow..(oy + 1) * gm.ow];
                    let ix0 = ((ox0 * sw) as isize + gm.col_off(kx)) as usize;
                    if sw == 1 {
                        let d = &mut dst[ix0..ix0 + (ox1 - ox0)];
                        for (d, &v) in d.iter_mut().zip(&src[ox0..ox1]) {
                            *d += v;
                        }
                    } else {
                        for ox in ox0..ox1 {
                            dst[ix0 + (ox - ox0) * sw] += src[ox];
                        }
                    }
                }
            }
        }
    }
}

/// Reductions up to this length (`cg * kh * kw`) use [`small_k_gemm`] instead of the GEMM crate.
const DIRECT_MAX_K: usize = 16;

/// `y (m x pw) = w (m x k) * col (k x pw)` for a short reduction (`k <= DIRECT_MAX_K`), such as
/// a single-channel 3x3 first layer, where GEMM's packing costs more than the arithmetic. Eight
/// output pixels at a time: their `k` input vectors are loaded once and reused for every output
/// channel; each output is `sum_t w[t] * col[t]` accumulated in `t` order from 0.
fn small_k_gemm(m: usize, k: usize, pw: usize, w: &[f32], col: &[f32], y: &mut [f32]) {
    assert!(k <= DIRECT_MAX_K && w.len() >= m * k && col.len() >= k * pw && y.len() >= m * pw);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above), the only requirement of
        // a `target_feature` function; the body is safe code.
        unsafe { small_k_gemm_avx2(m, k, pw, w, col, y) };
        return;
    }
    small_k_gemm_body::<false>(m, k, pw, w, col, y);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn small_k_gemm_avx2(m: usize, k: usize, pw: usize, w: &[f32], col: &[f32], y: &mut [f32]) {
    small_k_gemm_body::<true>(m, k, pw, w, col, y);
}

/// The kernel, compiled once per instruction set (`FMA`: fused multiply-add, which also selects
/// the AVX2 build).
#[inline(always)]
fn small_k_gemm_body<const FMA: bool>(
    m: usize,
    k: usize,
    pw: usize,
    w: &[f32],
    col: &[f32],
    y: &mut [f32],
) {
    const L: usize = 8;
    let madd = |a: f32, b: f32, c: f32| if FMA { a.mul_add(b, c) } else { c + a * b };
    let full = pw / L * L;
    let mut xs = [[0.0f32; L]; DIRECT_MAX_K];
    for p0 in (0..full).step_by(L) {
        for (t, xv) in xs.iter_mut().enumerate().take(k) {
            xv.copy_from_slice(&col[t * pw + p0..t * pw + p0 + L]);
        }
        for mi in 0..m {
            let wr = &w[mi * k..(mi + 1) * k];
            let mut acc = [0.0f32; L];
            for (&wv, xv) in wr.iter().zip(&xs) {
                for l in 0..L {
                    acc[l] = madd(wv, xv[l], acc[l]);
                }
            }
            y[mi * pw + p0..mi * pw + p0 + L].copy_from_slice(&acc);
        }
    }
    for p in full..pw {
        for mi in 0..m {
            let wr = &w[mi * k..(mi + 1) * k];
            let mut acc = 0.0f32;
            for (t, &wv) in wr.iter().enumerate() {
                acc = madd(wv, col[t * pw + p], acc);
            }
            y[mi * pw + p] = acc;
        }
    }
}

/// Largest padded input block (f32s per (sample, group)) the direct path takes: 64 KiB, the
/// small CNNs it wins on (the demo model's blocks are 3.5 and 16 KiB). Above that (ResNet-18's
/// 56 x 56 x 64 blocks) the `gemm` crate's packed im2col product measured faster on the
/// benchmark's ResNet-18, forward and backward.
const DIRECT_MAX_PLANE: usize = 16 << 10;

/// A stride-1 convolution computed without im2col: the (sample, group) input block is copied
/// once into a zero-padded buffer (`cg` planes of `hp x wp`), and the product runs over "wide"
/// output rows of `wp` columns, so that the reduction row `(ci, ky, kx)` is that buffer shifted
/// by `ci * hp * wp + ky * dh * wp + kx * dw`, read in place by [`sgemm::gemm_rows`]. The
/// `wp - ow` extra columns per output row are dropped when the block is copied out. This reads
/// a few KiB per sample where im2col would write `k` copies of it.
///
/// Neighbouring rows share their padding columns: a row is `pl` zeros, its `w` values and
/// `wp - w - pl` zeros, with `wp = w + max(pl, pr)` (more where the padding exceeds the
/// kernel's reach), so a window reaching past a row's right end reads the next row's leading
/// zeros (and past the last plane, `slack` zeros).
/// With `pl = pr = 1` that is one computed-and-dropped column per output row instead of two:
/// the demo CNN's 14-wide second convolution computes 209 columns per plane, not 222.
struct Direct {
    wp: usize,
    plane: usize,
    /// Zeros after the last plane (`pl + pr - (wp - w)`): what a window of its last row
    /// reads past it.
    slack: usize,
    /// Wide output columns: `(oh - 1) * wp + ow` (the last row needs no padding columns), which
    /// keeps the last reduction row's reads inside the buffer.
    wide: usize,
    offs: Vec<usize>,
    /// Whether the lane kernel ([`lanes`]) computes the product, not the panel kernel.
    lanes: bool,
    /// Stride 2: each padded plane is stored as its four phase planes (even and odd rows by
    /// even and odd columns, `plane / 4` floats each, rows `wp` apart; see [`phase_planes`]), in
    /// which the taps of consecutive outputs are consecutive, as at stride 1.
    phases: bool,
}

/// Largest input block (f32s, `cg` channels of four phase planes) a stride-2 convolution takes
/// the direct path with: 512 KiB, half of a core's L2, where the product's reads stay. Past
/// it, im2col. Measured (one thread, batch 4, ResNet-18's stride-2 3x3 layers): 128 -> 256
/// channels on 28x28 (460 KiB) 5.70 against 6.26 ms on im2col, 256 -> 512 on 14x14 5.83
/// against 6.77 ms, but 64 -> 128 on 56x56 (861 KiB) 6.45 against 6.15 ms. (With AVX-512
/// those layers take the strided lane path instead: [`strided_chunk`].)
const PHASES_MAX_FLOATS: usize = 128 << 10;

/// Test-only switch off the stride-2 direct path, for timing A/B runs.
#[cfg(test)]
pub(super) static NO_PHASES: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Test-only switch back to two Winograd chunks when sequential, for timing A/B runs.
#[cfg(test)]
pub(super) static TWO_CHUNKS: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);
/// Whether a test asked for two sequential Winograd chunks (always false outside tests).
fn two_chunks() -> bool {
    #[cfg(test)]
    return TWO_CHUNKS.load(std::sync::atomic::Ordering::Relaxed);
    #[cfg(not(test))]
    false
}

/// Test-only switch off the Winograd path, so timings reach the direct path too.
#[cfg(test)]
pub(super) static FORCE_NO_WINOGRAD: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// The Winograd path's view of a convolution it takes: 3x3, stride 1, dilation 1, one group,
/// and the sizes `winograd::applies` accepts.
fn winograd_shape(gm: &Geom, cached: bool) -> Option<winograd::Shape> {
    #[cfg(test)]
    if FORCE_NO_WINOGRAD.load(std::sync::atomic::Ordering::Relaxed)
        || FORCE_IM2COL.load(std::sync::atomic::Ordering::Relaxed)
    {
        return None;
    }
    if (gm.kh, gm.kw) != (3, 3) || gm.p.stride != [1, 1] || gm.p.dilation != [1, 1] || gm.g != 1 {
        return None;
    }
    let s = winograd::Shape {
        n: gm.n,
        c: gm.c,
        h: gm.h,
        w: gm.w,
        m: gm.m,
        oh: gm.oh,
        ow: gm.ow,
        pt: gm.p.pad[0],
        pl: gm.p.pad[1],
    };
    winograd::applies(&s, cached).then_some(s)
}

/// Whether the Winograd path takes a convolution of these shapes whose weights are a tensor
/// (as `Backend::conv2d` passes them; for tests that must reach the path).
#[cfg(test)]
pub(super) fn winograd_probe(x: [usize; 4], w: [usize; 4], p: &Conv2dParams) -> bool {
    winograd_shape(&Geom::new(x, w, p), true).is_some()
}

/// Largest im2col block (f32s) made in one piece; larger ones are made and multiplied a few
/// output rows at a time, in blocks of about this size (512 KiB, half of L2).
const IM2COL_CHUNK_FLOATS: usize = 128 << 10;

/// Test-only switch off the row-chunked im2col, for timing A/B runs.
#[cfg(test)]
pub(super) static NO_IM2COL_CHUNK: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Test-only switch off the pooled copy-out, so timings compare it with the separate steps.
#[cfg(test)]
pub(super) static NO_FUSED_POOL: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Test-only switch to the im2col path, so timing tests can compare the two in one process.
#[cfg(test)]
pub(super) static FORCE_IM2COL: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

impl Direct {
    /// `pooled`: where the copy-out takes the 2x2 pooling (it decides the kernel).
    fn plan(gm: &Geom, pooled: bool) -> Option<Direct> {
        #[cfg(test)]
        if FORCE_IM2COL.load(std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        if gm.is_depthwise() || gm.is_pointwise() || gm.oh == 0 || gm.ow == 0 || !sgemm::available()
        {
            return None;
        }
        if gm.p.stride != [1, 1] {
            return Direct::plan_phases(gm, pooled);
        }
        let [pt, pl, pb, pr] = gm.p.pad;
        // Zero columns between rows: at least each side's padding, and enough that an output
        // row (`ow = w + pl + pr - (kw - 1) dw`) fits in `wp` where the padding exceeds the
        // kernel's reach.
        let zc = pl
            .max(pr)
            .max((pl + pr).saturating_sub((gm.kw - 1) * gm.p.dilation[1]));
        let (hp, wp) = (gm.h + pt + pb, gm.w + zc);
        let plane = hp * wp;
        if gm.cg.checked_mul(plane)? > DIRECT_MAX_PLANE {
            return None;
        }
        Some(Direct {
            wp,
            plane,
            slack: pl + pr - zc,
            wide: (gm.oh - 1) * wp + gm.ow,
            offs: tap_offsets(gm, plane, wp),
            lanes: lanes::applies(gm.mg, pooled),
            phases: false,
        })
    }

    /// The stride-2 plan: the padded input as phase planes of `ceil(hp / 2) x ceil(wp / 2)`,
    /// where output `(oy, ox)`'s tap `(ky, kx)` is phase `(ky % 2, kx % 2)`'s element
    /// `(oy + ky / 2, ox + kx / 2)`; the product is as wide as a phase plane's rows. Why: the
    /// im2col path spent a quarter of ResNet-18's stride-2 3x3 convolutions gathering every
    /// other element into a matrix larger than L2, which its product then read back. Not
    /// pooled; not where the stem's lane path takes the convolution.
    fn plan_phases(gm: &Geom, pooled: bool) -> Option<Direct> {
        #[cfg(test)]
        if NO_PHASES.load(std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        // A 1-wide kernel reads one phase of four: its im2col is a plain subsampling, which
        // measured faster (ResNet-18's 1x1 / stride-2 layers, 256 -> 512 channels on 14x14 at
        // batch 4: 0.91 against 1.25 ms on phase planes).
        if gm.p.stride != [2, 2]
            || gm.p.dilation != [1, 1]
            || gm.kh < 2
            || gm.kw < 2
            || pooled
            || strided_chunk(gm).is_some()
        {
            return None;
        }
        let (hp, wp) = gm.padded_hw();
        let (hq, wq) = (hp.div_ceil(2), wp.div_ceil(2));
        let plane = 4 * hq * wq;
        let mut offs = Vec::with_capacity(gm.k());
        for ci in 0..gm.cg {
            for ky in 0..gm.kh {
                for kx in 0..gm.kw {
                    let phase = (ky % 2) * 2 + kx % 2;
                    offs.push(ci * plane + phase * hq * wq + (ky / 2) * wq + kx / 2);
                }
            }
        }
        let wide = (gm.oh - 1) * wq + gm.ow;
        // Every tap's reads stay inside its phase plane (rows `oy + ky / 2 < hq`, columns
        // `ox + kx / 2 < wq`); the furthest read (the offsets are not in increasing order: the
        // phase varies fastest) bounds the buffer all the same, so `gemm_rows`'s bounds hold
        // whatever the geometry.
        let end = offs.iter().max().copied().unwrap_or(0) + wide;
        let total = (gm.cg * plane).max(end);
        if total > PHASES_MAX_FLOATS {
            return None;
        }
        Some(Direct {
            wp: wq,
            plane,
            slack: total - gm.cg * plane,
            wide,
            offs,
            lanes: false,
            phases: true,
        })
    }

    /// `yb (mg x oh*ow) = act(w_g * x_g + bias)` for one (sample, group) block `xg`
    /// (`cg x h x w`); the bias (the group's entries) and activation are applied to each output
    /// plane as it is copied out, while it is in L1. With `pool2` (act ReLU), `yb`
    /// (`mg x (oh/2)*(ow/2)`) is the 2x2 / stride-2 max pooling of that instead, so the
    /// full-size activation is never written (see [`CpuBackend::conv2d_act_maxpool2`]).
    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        gm: &Geom,
        a: &PackedA,
        xg: &[f32],
        yb: &mut [f32],
        bias: Option<&[f32]>,
        act: Option<Unary>,
        pool2: bool,
    ) {
        let xlen = gm.cg * self.plane + self.slack;
        with_scratch(xlen + gm.mg * self.wide, |buf| {
            let (xpad, ywide) = buf.split_at_mut(xlen);
            self.pad_input(gm, xg, xpad);
            sgemm::gemm_rows(a, xpad, &self.offs, self.wide, ywide, self.wide);
            if pool2 {
                debug_assert_eq!(act, Some(Unary::Relu), "pooled copy-out: ReLU only");
                let (ph, pw) = (gm.oh / 2, gm.ow / 2);
                for (mo, plane) in yb.chunks_exact_mut(ph * pw).take(gm.mg).enumerate() {
                    let src = &ywide[mo * self.wide..(mo + 1) * self.wide];
                    super::maxpool2::relu_pool_plane(src, self.wp, plane, pw, bias.map(|b| b[mo]));
                }
                return;
            }
            let pw = gm.p_out();
            #[cfg(target_arch = "x86_64")]
            if sgemm::avx512() && matches!(act, None | Some(Unary::Relu)) {
                for (mo, plane) in yb.chunks_exact_mut(pw).take(gm.mg).enumerate() {
                    let src = &ywide[mo * self.wide..(mo + 1) * self.wide];
                    let b = bias.map(|b| b[mo]);
                    // SAFETY: AVX-512F is present (checked); the function asserts its bounds.
                    unsafe { copy_plane_avx512(plane, src, self.wp, gm.ow, b, act.is_some()) };
                }
                return;
            }
            for (mo, plane) in yb.chunks_exact_mut(pw).take(gm.mg).enumerate() {
                for (oy, row) in plane.chunks_exact_mut(gm.ow).enumerate() {
                    row.copy_from_slice(&ywide[mo * self.wide + oy * self.wp..][..gm.ow]);
                }
                epilogue(plane, pw, bias.map(|b| &b[mo..mo + 1]), act);
            }
        });
    }

    /// [`Direct::run`] on the lane kernel: the product position-major, a few output rows at a
    /// time, transposed into the planes by [`lanes::copy_out`] with the bias and a ReLU (other
    /// activations after); pooled, see [`Direct::run_lanes_pooled`].
    #[allow(clippy::too_many_arguments)]
    fn run_lanes(
        &self,
        gm: &Geom,
        a: &lanes::LanePacked,
        xg: &[f32],
        yb: &mut [f32],
        bias: Option<&[f32]>,
        act: Option<Unary>,
        pool2: bool,
    ) {
        if pool2 {
            debug_assert_eq!(act, Some(Unary::Relu), "pooled copy-out: ReLU only");
            self.run_lanes_pooled(gm, a, xg, yb, bias);
            return;
        }
        // Output rows a few at a time, the product's block (at most LANE_CHUNK_FLOATS) in L1
        // between its writing and the copy-out's reading.
        let ld = a.ld();
        let rows = (LANE_CHUNK_FLOATS / (ld * self.wp)).clamp(1, gm.oh.max(1));
        let chunk = a.padded((rows - 1) * self.wp + gm.ow);
        // The last chunk's whole blocks read up to a block past the last window: zeros.
        let xlen = gm.cg * self.plane + self.slack + a.padded(1);
        let relu = act == Some(Unary::Relu);
        let pw = gm.p_out();
        with_scratch(xlen + chunk * ld, |buf| {
            let (xpad, ywide) = buf.split_at_mut(xlen);
            self.pad_input(gm, xg, xpad);
            for r0 in (0..gm.oh).step_by(rows) {
                let r1 = (r0 + rows).min(gm.oh);
                let npos = (r1 - r0 - 1) * self.wp + gm.ow;
                lanes::product(a, &xpad[r0 * self.wp..], &self.offs, npos, ywide);
                let out = &mut yb[r0 * gm.ow..];
                lanes::copy_out(a, ywide, self.wp, r1 - r0, gm.ow, pw, bias, relu, out);
            }
            if !(relu || act.is_none()) {
                epilogue(&mut yb[..gm.mg * pw], pw, None, act);
            }
        });
    }

    /// [`Direct::run_lanes`] with the ReLU and the 2x2 pooling: pooled in the kernel's
    /// registers ([`lanes::pooled_product`]), then transposed into the planes.
    fn run_lanes_pooled(
        &self,
        gm: &Geom,
        a: &lanes::LanePacked,
        xg: &[f32],
        yb: &mut [f32],
        bias: Option<&[f32]>,
    ) {
        let xlen = gm.cg * self.plane + self.slack;
        let (ph, pw) = (gm.oh / 2, gm.ow / 2);
        with_scratch(xlen + ph * pw * a.ld(), |buf| {
            let (xpad, pooled) = buf.split_at_mut(xlen);
            self.pad_input(gm, xg, xpad);
            lanes::pooled_product(a, xpad, &self.offs, self.wp, ph, pw, bias, pooled);
            lanes::copy_out(a, pooled, pw, ph, pw, ph * pw, None, false, yb);
        });
    }

    /// `xpad`: the block `xg` in the padded planes (or their phase planes), zeros around.
    fn pad_input(&self, gm: &Geom, xg: &[f32], xpad: &mut [f32]) {
        if self.phases {
            phase_planes(gm, xg, xpad, self.plane / 4, self.wp);
        } else {
            pad_planes(gm, xg, xpad, self.plane, self.wp);
        }
    }
}

/// `xpad`: the (sample, group) block `xg` in padded planes of `plane` floats with rows `wp`
/// apart (the top and left padding before each plane's first row and column), zeros around.
fn pad_planes(gm: &Geom, xg: &[f32], xpad: &mut [f32], plane: usize, wp: usize) {
    xpad.fill(0.0);
    let [pt, pl, _, _] = gm.p.pad;
    for ci in 0..gm.cg {
        for iy in 0..gm.h {
            let src = &xg[(ci * gm.h + iy) * gm.w..][..gm.w];
            xpad[ci * plane + (iy + pt) * wp + pl..][..gm.w].copy_from_slice(src);
        }
    }
}

/// `xpad`: the block `xg` zero-padded and split into phase planes of `pq` floats with rows
/// `wq` apart: padded element `(r, c)` of channel `ci` at `(4 ci + 2 (r % 2) + c % 2) pq +
/// (r / 2) wq + c / 2`; zeros elsewhere.
fn phase_planes(gm: &Geom, xg: &[f32], xpad: &mut [f32], pq: usize, wq: usize) {
    xpad.fill(0.0);
    let [pt, pl, _, _] = gm.p.pad;
    for ci in 0..gm.cg {
        for iy in 0..gm.h {
            let r = iy + pt;
            let base = (4 * ci + 2 * (r % 2)) * pq + (r / 2) * wq;
            let src = &xg[(ci * gm.h + iy) * gm.w..][..gm.w];
            // Padded column `ix + pl` goes to phase `(ix + pl) % 2`, column `(ix + pl) / 2`.
            let (even, odd) = xpad[base..base + pq + wq].split_at_mut(pq);
            for (ix, &v) in src.iter().enumerate() {
                let c = ix + pl;
                if c % 2 == 0 {
                    even[c / 2] = v;
                } else {
                    odd[c / 2] = v;
                }
            }
        }
    }
}

/// Where each reduction step `(ci, ky, kx)` reads, from an output position's first tap, in
/// padded planes of `plane` floats with rows `wp` apart: the direct paths' `offs`.
fn tap_offsets(gm: &Geom, plane: usize, wp: usize) -> Vec<usize> {
    let (dh, dw) = (gm.p.dilation[0], gm.p.dilation[1]);
    let mut offs = Vec::with_capacity(gm.k());
    for ci in 0..gm.cg {
        for ky in 0..gm.kh {
            for kx in 0..gm.kw {
                offs.push(ci * plane + ky * dh * wp + kx * dw);
            }
        }
    }
    offs
}

/// Largest padded input (f32s, all samples) of a stride-2 convolution on the lane kernel
/// (64 MiB); larger ones take the im2col path.
const STRIDED_MAX_FLOATS: usize = 16 << 20;

/// Most output positions [`CpuBackend::strided_forward`] passes through the product at once:
/// 1020 positions of 64 channels (255 KiB) stay in L2, which holds the partial sums between
/// reduction blocks, beside the input. Smaller planes stack several samples (ResNet-18's
/// 256 -> 512 layer: four samples of 7 x 7, 4.1 against 4.6 ms at batch 4 one sample at a time,
/// whose 49 positions each pass every block of weights); larger ones go a few rows at a time
/// (its stem: 9 rows of 112).
const STRIDED_POSITIONS: usize = 1020;

/// The output channels per chunk with which [`CpuBackend::strided_forward`] takes a
/// convolution (see [`lanes::strided_chunk`]), if it does: every stride-2 convolution of 48 or
/// 64 channels a chunk (any padding, dilation or groups) whose padded input fits
/// [`STRIDED_MAX_FLOATS`], except 1x1 kernels. Those read one input value in four, each step
/// from another plane: with the input out of cache (as in a model), ResNet-18's 1x1 /
/// stride-2 layers took 1.76 / 1.49 / 0.81 ms here against 1.41 / 0.86 / 0.93 ms subsampled
/// into a matrix for the panel kernel (batch 4, one core).
fn strided_chunk(gm: &Geom) -> Option<usize> {
    let (hp, wp) = gm.padded_hw();
    lanes::strided_chunk(gm.mg, gm.p.stride).filter(|_| {
        gm.kh * gm.kw > 1
            && gm
                .n
                .saturating_mul(gm.c)
                .saturating_mul(hp)
                .saturating_mul(wp)
                <= STRIDED_MAX_FLOATS
    })
}

/// `pos`: the first-tap offsets of output rows `r0..r1` of each padded input block starting at
/// one of `bases` (rows `wp` apart), block after block, then the last repeated to a whole
/// number of the lane kernel's `block`s ([`lanes::product_at`]'s positions).
fn row_positions(
    pos: &mut Vec<usize>,
    gm: &Geom,
    bases: impl Iterator<Item = usize>,
    [r0, r1]: [usize; 2],
    wp: usize,
    block: usize,
) {
    let [sh, sw] = gm.p.stride;
    pos.clear();
    for base in bases {
        for oy in r0..r1 {
            let row = base + oy * sh * wp;
            pos.extend((0..gm.ow).map(|ox| row + ox * sw));
        }
    }
    if let Some(&last) = pos.last() {
        pos.resize(pos.len().next_multiple_of(block), last);
    }
}

/// `out` (`mg` planes of `ceil(oh / 2) x ceil(ow / 2)`) = the 3x3 / stride-2 / pad-1 max
/// pooling of `relu(w * x + bias)` for padded input block `blk` (of `pblock` floats, rows `wp`
/// apart) of `xin`, on the lane kernel: an even number of output rows at a time, each piece's
/// pooled rows taken from the product rows while they are in L2 (the row before the piece
/// kept from the last), then transposed into the planes with the bias and ReLU. ResNet's
/// stem: its 112 x 112 x 64 activation (3.2 MB a sample) is never written and read back.
#[allow(clippy::too_many_arguments)]
fn strided_pooled(
    gm: &Geom,
    a: &lanes::LanePacked,
    xin: &[f32],
    offs: &[usize],
    blk: usize,
    [pblock, wp]: [usize; 2],
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    let (oh, ow, ld) = (gm.oh, gm.ow, a.ld());
    let [poh, pow] = [oh.div_ceil(2), ow.div_ceil(2)];
    // Output rows per piece: even, so a piece's pooled rows need only the row before it.
    let rows = ((STRIDED_POSITIONS / ow) & !1).max(2);
    let block = a.padded(1);
    let cap = (rows * ow).next_multiple_of(block);
    // Slot 0 holds the row before the piece; the product's rows follow.
    let prod_len = (ow + cap) * ld;
    let mut pos = Vec::with_capacity(cap);
    let base = blk * pblock;
    with_scratch(prod_len + rows / 2 * pow * ld, |buf| {
        let (prod, pooled) = buf.split_at_mut(prod_len);
        for r0 in (0..oh).step_by(rows) {
            let r1 = (r0 + rows).min(oh);
            row_positions(&mut pos, gm, std::iter::once(base), [r0, r1], wp, block);
            lanes::product_at(a, xin, offs, &pos, &mut prod[ow * ld..]);
            let (py0, py1) = (r0 / 2, if r1 == oh { poh } else { r1 / 2 });
            let first = r0 as isize - 1;
            let lo = r0.saturating_sub(1);
            lanes::max3s2_rows(ld, prod, ow, first, [lo, r1], [py0, py1], pow, pooled);
            let out = &mut out[py0 * pow..];
            lanes::copy_out(a, pooled, pow, py1 - py0, pow, poh * pow, bias, true, out);
            // The piece's last row, which the next piece's first pooled row reads.
            let s = (r1 - r0) * ow * ld;
            prod.copy_within(s..s + ow * ld, 0);
        }
    });
}

/// Largest block of the lane kernel's product (f32s) made at once: 16 KiB, half of L1.
const LANE_CHUNK_FLOATS: usize = 4 << 10;

/// One output plane (`dst`: rows of `ow`) from the direct path's wide product (`src`: rows of
/// `wp`), plus `bias` and, with `relu`, ReLU, in one pass of masked 16-lane loads and stores:
/// per row copies of a few dozen bytes cost more in `memcpy` calls than in data (the demo CNN's
/// 14-wide rows), and the separate epilogue pass read the plane again. The ReLU is computed as
/// the scalar `unary_f32(Relu, v)` (`v.max(0.0)`) compiles (`max(0, v)`, NaN to 0), so the
/// result is the same as the epilogue's (the fused-vs-unfused tests compare them bit for bit).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn copy_plane_avx512(
    dst: &mut [f32],
    src: &[f32],
    wp: usize,
    ow: usize,
    bias: Option<f32>,
    relu: bool,
) {
    use std::arch::x86_64::*;
    let oh = dst.len() / ow;
    assert!(
        ow > 0 && dst.len() == oh * ow && ow <= wp && (oh == 0 || (oh - 1) * wp + ow <= src.len()),
        "copy_plane: bounds"
    );
    let z = _mm512_setzero_ps();
    let bv = _mm512_set1_ps(bias.unwrap_or(0.0));
    for oy in 0..oh {
        for x0 in (0..ow).step_by(16) {
            let m = ((1u32 << (ow - x0).min(16)) - 1) as __mmask16;
            // SAFETY: the masked lanes are columns x0.. < ow of row oy, inside both planes by the
            // assert above; masked-off lanes are neither read nor written.
            unsafe {
                let mut v = _mm512_maskz_loadu_ps(m, src.as_ptr().add(oy * wp + x0));
                if bias.is_some() {
                    v = _mm512_add_ps(v, bv);
                }
                if relu {
                    let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
                    v = _mm512_mask_blend_ps(nan, _mm512_max_ps(z, v), z);
                }
                _mm512_mask_storeu_ps(dst.as_mut_ptr().add(oy * ow + x0), m, v);
            }
        }
    }
}

/// The input gradient of a stride-1, non-depthwise convolution as a forward convolution:
/// `dx[ci][iy][ix] = sum dy[mo][iy + pt - ky*dh][ix + pl - kx*dw] * w[mo][ci][ky][kx]`, i.e.
/// `dy` padded by `(kh-1)*dh - pt` (top; likewise each side) convolved with `w'[ci][mo][ky][kx]
/// = w[mo][ci][kh-1-ky][kw-1-kx]` (per group; made by [`flip_weights`]). Returns the weight shape
/// and parameters of that convolution; None where the direct path would not take it or a
/// padding exceeds the kernel's reach (the adjoint would need cropping).
fn transposed_as_conv(gm: &Geom) -> Option<([usize; 4], Conv2dParams)> {
    if gm.p.stride != [1, 1] {
        return None;
    }
    let (dh, dw) = (gm.p.dilation[0], gm.p.dilation[1]);
    let (rh, rw) = ((gm.kh - 1) * dh, (gm.kw - 1) * dw);
    let [pt, pl, pb, pr] = gm.p.pad;
    let pad = [
        rh.checked_sub(pt)?,
        rw.checked_sub(pl)?,
        rh.checked_sub(pb)?,
        rw.checked_sub(pr)?,
    ];
    let p = Conv2dParams {
        stride: [1, 1],
        pad,
        dilation: gm.p.dilation,
        groups: gm.g,
    };
    let ws = [gm.c, gm.mg, gm.kh, gm.kw];
    // The flipped convolution has the same kernel and groups, so the direct path's own test
    // (depthwise, pointwise, block size, CPU features) decides, before any weight is copied.
    Direct::plan(&Geom::new([gm.n, gm.m, gm.oh, gm.ow], ws, &p), false)?;
    Some((ws, p))
}

/// The weights of [`transposed_as_conv`]: flipped in space, input and output channels swapped
/// within each group.
fn flip_weights(gm: &Geom, w: &[f32]) -> Vec<f32> {
    let (kk, k) = (gm.kh * gm.kw, gm.k());
    let mut wt = vec![0.0f32; gm.c * gm.mg * kk];
    for gi in 0..gm.g {
        for mo in 0..gm.mg {
            for ci in 0..gm.cg {
                let src = &w[(gi * gm.mg + mo) * k + ci * kk..][..kk];
                let dst = &mut wt[((gi * gm.cg + ci) * gm.mg + mo) * kk..][..kk];
                for (d, &v) in dst.iter_mut().zip(src.iter().rev()) {
                    *d = v;
                }
            }
        }
    }
    wt
}

/// Bias then activation over one (sample, group) output block (`mg` planes of `pw`), while it
/// is still in cache.
///
/// One pass (bias and activation per element, the unfused order), compiled for the widest
/// vectors the CPU has: the crate's baseline is SSE2, and at four lanes this pass over a first
/// layer's large output cost a quarter of the demo CNN's forward on an AVX-512 Xeon.
fn epilogue(yb: &mut [f32], pw: usize, bias: Option<&[f32]>, act: Option<Unary>) {
    #[cfg(target_arch = "x86_64")]
    {
        if sgemm::avx512() {
            // SAFETY: AVX-512F is present (checked); the body is safe code.
            return unsafe { epilogue_avx512(yb, pw, bias, act) };
        }
        if sgemm::available() {
            // SAFETY: AVX2 and FMA are present (checked); the body is safe code.
            return unsafe { epilogue_avx2(yb, pw, bias, act) };
        }
    }
    epilogue_body(yb, pw, bias, act);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn epilogue_avx512(yb: &mut [f32], pw: usize, bias: Option<&[f32]>, act: Option<Unary>) {
    epilogue_body(yb, pw, bias, act);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn epilogue_avx2(yb: &mut [f32], pw: usize, bias: Option<&[f32]>, act: Option<Unary>) {
    epilogue_body(yb, pw, bias, act);
}

#[inline(always)]
fn epilogue_body(yb: &mut [f32], pw: usize, bias: Option<&[f32]>, act: Option<Unary>) {
    // ReLU has its own arms so that the operator match leaves the loop and the loop vectorises.
    match (bias, act) {
        (None, None) => {}
        (None, Some(Unary::Relu)) => yb.iter_mut().for_each(|v| *v = unary_f32(Unary::Relu, *v)),
        (None, Some(op)) => yb.iter_mut().for_each(|v| *v = unary_f32(op, *v)),
        (Some(b), act) => {
            for (plane, &bv) in yb.chunks_mut(pw).zip(b) {
                match act {
                    None => plane.iter_mut().for_each(|v| *v += bv),
                    Some(Unary::Relu) => plane
                        .iter_mut()
                        .for_each(|v| *v = unary_f32(Unary::Relu, *v + bv)),
                    Some(op) => plane.iter_mut().for_each(|v| *v = unary_f32(op, *v + bv)),
                }
            }
        }
    }
}

/// Largest im2col scratch (in f32s) a thread keeps between calls; bigger ones are freed after use.
const SCRATCH_KEEP: usize = 8 << 20;

/// Scratch buffers a thread keeps between calls.
const SCRATCH_BUFFERS: usize = 4;

thread_local! {
    static SCRATCH: std::cell::RefCell<Vec<Vec<f32>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` with a per-thread scratch buffer of `len` f32s whose contents are unspecified (every
/// user overwrites all of it). Reusing it avoids an allocation plus page faults per (sample,
/// group) in im2col convolutions. The buffers are a stack: a nested call (the strided path's
/// product inside its padded input, or gemm's own parallelism running another task here)
/// takes the next one, and each goes back where it came from, so nested calls reuse theirs too.
pub(super) fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    let mut buf = SCRATCH.with(|c| c.borrow_mut().pop()).unwrap_or_default();
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    let r = f(&mut buf[..len]);
    if buf.len() <= SCRATCH_KEEP {
        SCRATCH.with(|c| {
            let mut c = c.borrow_mut();
            if c.len() < SCRATCH_BUFFERS {
                c.push(buf);
            }
        });
    }
    r
}

impl CpuBackend {
    /// How to run `tasks` independent GEMM-sized jobs of `flops` total: (parallel over tasks,
    /// parallelism inside each GEMM).
    fn conv_plan(&self, tasks: usize, flops: usize) -> (bool, Parallelism) {
        if !self.parallel(flops) {
            (false, Parallelism::None)
        } else if tasks >= self.threads {
            (true, Parallelism::None)
        } else {
            (false, Parallelism::Rayon(self.threads))
        }
    }

    /// `act(conv(x, w) + bias)` (the output and its shape), through the cheapest of the
    /// depthwise, Winograd, direct, pointwise and im2col paths.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn conv2d_impl(
        &self,
        x: &[f32],
        xs: [usize; 4],
        wts: Weights<'_>,
        ws: [usize; 4],
        bias: Option<&[f32]>,
        p: &Conv2dParams,
        act: Option<Unary>,
    ) -> (Vec<f32>, [usize; 4]) {
        self.conv2d_core(x, Geom::new(xs, ws, p), wts, bias, act, false)
            .expect("conv2d_core declines only a pooled copy-out")
    }

    /// `pool(act(conv(x, w) + bias))` where `act` is ReLU and `pool` the 2x2 / stride-2 max
    /// pooling without padding (the small CNNs' pattern), computed from each sample's output
    /// planes while they are in cache, so the full-size activation is never written and read
    /// back: on the small CNN the first convolution's output is 3.2 MB a batch of 64, three
    /// times this core's L2. `None` for other activations and poolings, and where neither the
    /// direct nor the Winograd path takes the convolution (the caller then runs the steps one
    /// by one).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn conv2d_act_maxpool2(
        &self,
        x: &[f32],
        xs: [usize; 4],
        wts: Weights<'_>,
        ws: [usize; 4],
        bias: Option<&[f32]>,
        p: &Conv2dParams,
        act: Unary,
        pool: &Pool2dParams,
    ) -> Option<(Vec<f32>, [usize; 4])> {
        let gm = Geom::new(xs, ws, p);
        // A square max pooling of kernel `k`, stride 2 and padding `pad` on every side, with
        // floor-mode output sizes `out`.
        let max_pool = |k: usize, pad: usize, out: [usize; 2]| {
            act == Unary::Relu
                && pool.kind == PoolKind::Max
                && pool.kernel == [k, k]
                && pool.stride == [2, 2]
                && pool.pad == [pad; 4]
                && pool.dilation == [1, 1]
                && pool.out_hw == out
        };
        let pooled = max_pool(2, 0, [gm.oh / 2, gm.ow / 2]);
        #[cfg(test)]
        if NO_FUSED_POOL.load(std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        // ResNet's stem pattern: a 3x3 / stride-2 / pad-1 max pooling after a stride-2
        // convolution on the lane kernel, pooled from its product rows.
        // (`Direct::plan` refuses every convolution `strided_chunk` takes, so this is the path
        // the unfused convolution runs too.)
        let pooled3 = max_pool(3, 1, [gm.oh.div_ceil(2), gm.ow.div_ceil(2)]);
        if pooled3 {
            let chunk = strided_chunk(&gm)?;
            let ys = [gm.n, gm.m, gm.oh.div_ceil(2), gm.ow.div_ceil(2)];
            let mut y = self.out_dirty(ys.iter().product());
            if !y.is_empty() {
                self.strided_forward(&gm, chunk, x, wts, bias, Some(act), true, &mut y);
            }
            return Some((y, ys));
        }
        if !pooled {
            return None;
        }
        self.conv2d_core(x, gm, wts, bias, Some(Unary::Relu), true)
    }

    /// The two above. With `pool2`, `None` where the path chosen for `gm` is neither the
    /// direct one (which pools in its copy-out) nor Winograd (which pools each output tile);
    /// without, always `Some`.
    fn conv2d_core(
        &self,
        x: &[f32],
        gm: Geom,
        wts: Weights<'_>,
        bias: Option<&[f32]>,
        act: Option<Unary>,
        pool2: bool,
    ) -> Option<(Vec<f32>, [usize; 4])> {
        // The path: depthwise, Winograd, or a GEMM path (the direct one where it applies;
        // `Direct::plan` refuses depthwise convolutions).
        let winograd = if gm.is_depthwise() {
            None
        } else {
            winograd_shape(&gm, wts.id.is_some())
        };
        let direct = if winograd.is_some() {
            None
        } else {
            Direct::plan(&gm, pool2)
        };
        if pool2 && direct.is_none() && winograd.is_none() {
            return None;
        }
        let ws = [gm.m, gm.cg, gm.kh, gm.kw];
        let pw = gm.p_out();
        // Each output plane's size (pooled or not).
        let (ys, out_pw) = if pool2 {
            (
                [gm.n, gm.m, gm.oh / 2, gm.ow / 2],
                (gm.oh / 2) * (gm.ow / 2),
            )
        } else {
            ([gm.n, gm.m, gm.oh, gm.ow], pw)
        };
        let w = wts.data;
        // The depthwise loop accumulates; the GEMM path writes every element.
        let mut y = if gm.is_depthwise() {
            self.out_zeroed(gm.n * gm.m * pw)
        } else {
            self.out_dirty(gm.n * gm.m * out_pw)
        };
        if y.is_empty() {
            return Some((y, ys));
        }
        if gm.is_depthwise() {
            self.depthwise_forward(&gm, x, w, &mut y);
        } else if let Some(shape) = winograd {
            self.winograd_forward(shape, &gm, x, wts, bias, act, pool2, &mut y);
            return Some((y, ys));
        } else if let Some(chunk) = direct.is_none().then(|| strided_chunk(&gm)).flatten() {
            self.strided_forward(&gm, chunk, x, wts, bias, act, false, &mut y);
            return Some((y, ys));
        } else {
            let (par_tasks, par) = self.conv_plan(gm.n * gm.g, gm.flops());
            let k = gm.k();
            let xblock = gm.cg * gm.h * gm.w;
            // The weights of each group packed once for every sample, for the packed-panel
            // kernel (the direct path, and the im2col and pointwise products run in one task).
            let small_k = !gm.is_pointwise() && k <= DIRECT_MAX_K;
            let lane_direct = direct.as_ref().is_some_and(|d| d.lanes);
            let lane_w = lane_direct.then(|| {
                let form = Form::ConvLanes {
                    flipped: wts.flipped,
                    ws,
                    groups: gm.g,
                    chunk: gm.mg,
                };
                wts.derive(&self.weights, form, || {
                    gm.per_group(w, |wg| lanes::LanePacked::new(gm.mg, k, wg))
                })
            });
            let packed = (sgemm::available()
                && !lane_direct
                && (direct.is_some() || (matches!(par, Parallelism::None) && !small_k)))
                .then(|| {
                    let form = Form::ConvPacked {
                        flipped: wts.flipped,
                        ws,
                        groups: gm.g,
                    };
                    wts.derive(&self.weights, form, || {
                        gm.per_group(w, |wg| PackedA::new(gm.mg, k, wg, k, 1))
                    })
                });
            let chunked = k * pw > IM2COL_CHUNK_FLOATS;
            #[cfg(test)]
            let chunked = chunked && !NO_IM2COL_CHUNK.load(std::sync::atomic::Ordering::Relaxed);
            let task = |t: usize, yb: &mut [f32]| {
                let (ni, gi) = (t / gm.g, t % gm.g);
                let xg = &x[(ni * gm.c + gi * gm.cg) * gm.h * gm.w..][..xblock];
                let wg = &w[gi * gm.mg * k..(gi + 1) * gm.mg * k];
                let run = |col: &[f32], yb: &mut [f32]| {
                    if let Some(packed) = &packed {
                        sgemm::gemm_packed(&packed[gi], col, pw, pw, yb, pw);
                        return;
                    }
                    gemm_f32(
                        gm.mg,
                        pw,
                        k,
                        yb,
                        pw,
                        false,
                        MatRef::new(wg, k, 1),
                        MatRef::new(col, pw, 1),
                        par,
                    )
                };
                let bias_g = bias.map(|b| &b[gi * gm.mg..(gi + 1) * gm.mg]);
                // With `pool2` one of the first two branches is taken: `direct` is some
                // (checked above), and so is `lane_w` (where `d.lanes`) or `packed` (else:
                // `Direct::plan` requires the packed kernel).
                if let (Some(d), Some(lw)) = (&direct, &lane_w) {
                    d.run_lanes(&gm, &lw[gi], xg, yb, bias_g, act, pool2);
                    return;
                } else if let (Some(d), Some(packed)) = (&direct, &packed) {
                    d.run(&gm, &packed[gi], xg, yb, bias_g, act, pool2);
                    return;
                } else if gm.is_pointwise() {
                    run(xg, yb);
                } else if k <= DIRECT_MAX_K {
                    with_scratch(k * pw, |col| {
                        im2col(&gm, xg, col);
                        small_k_gemm(gm.mg, k, pw, wg, col, yb);
                    });
                } else if let Some(packed) = packed.as_ref().filter(|_| chunked) {
                    // Output rows a few at a time, so that the im2col block stays in L2 between
                    // its writing and the product's reading (ResNet's stem writes 7.4 MB per
                    // sample in one piece).
                    let rows = (IM2COL_CHUNK_FLOATS / (k * gm.ow)).max(1);
                    with_scratch(k * rows * gm.ow, |col| {
                        for r0 in (0..gm.oh).step_by(rows) {
                            let r1 = (r0 + rows).min(gm.oh);
                            let n = (r1 - r0) * gm.ow;
                            let col = &mut col[..k * n];
                            im2col_rows(&gm, xg, col, r0, r1);
                            sgemm::gemm_packed(&packed[gi], col, n, n, &mut yb[r0 * gm.ow..], pw);
                        }
                    });
                } else {
                    with_scratch(k * pw, |col| {
                        im2col(&gm, xg, col);
                        run(col, yb);
                    });
                }
                epilogue(yb, pw, bias_g, act);
            };
            if let Some(b) = bias {
                assert_eq!(b.len(), gm.m, "conv2d bias length");
            }
            self.run_blocks(&mut y, gm.mg * out_pw, par_tasks, par, task);
            return Some((y, ys));
        }
        if let Some(b) = bias {
            assert_eq!(b.len(), gm.m, "conv2d bias length");
        }
        for (i, plane) in y.chunks_mut(pw).enumerate() {
            epilogue(plane, pw, bias.map(|b| &b[i % gm.m..i % gm.m + 1]), act);
        }
        Some((y, ys))
    }

    /// The Winograd forward: tasks are chunks of samples, or, with fewer samples than
    /// threads, (sample, output-channel range) pairs, each writing its own block of `y`. With
    /// `pool2` (act ReLU), `y` is the 2x2 / stride-2 max pooling of the output, taken from
    /// each output tile's registers (see `winograd::Plan::run`).
    #[allow(clippy::too_many_arguments)]
    fn winograd_forward(
        &self,
        shape: winograd::Shape,
        gm: &Geom,
        x: &[f32],
        wts: Weights<'_>,
        bias: Option<&[f32]>,
        act: Option<Unary>,
        pool2: bool,
        y: &mut [f32],
    ) {
        if let Some(b) = bias {
            assert_eq!(b.len(), gm.m, "conv2d bias length");
        }
        // Each output plane's size (pooled or not).
        let pw = if pool2 {
            debug_assert_eq!(act, Some(Unary::Relu), "pooled Winograd output: ReLU only");
            (gm.oh / 2) * (gm.ow / 2)
        } else {
            gm.p_out()
        };
        let par = self.parallel(gm.flops());
        let threads = if par { self.threads } else { 1 };
        // Ranges of at least 8 channels, so each GEMM keeps a useful height.
        let splits = if gm.n >= threads {
            1
        } else {
            threads.div_ceil(gm.n).min(gm.m / 8).max(1)
        };
        let form = Form::Winograd {
            flipped: wts.flipped,
            ws: [gm.m, gm.c, 3, 3],
            splits,
        };
        let u = wts.derive(&self.weights, form, || {
            winograd::Transformed::new(gm.m, gm.c, wts.data, splits)
        });
        let plan = winograd::Plan::new(shape, u);
        let relu = act == Some(Unary::Relu);
        let run = |t: winograd::Task, yb: &mut [f32]| {
            let (co0, mr) = plan.range(t.range);
            plan.run(&t, x, yb, bias.map(|b| &b[co0..co0 + mr]), relu, pool2);
            if !relu {
                epilogue(yb, pw, None, act);
            }
        };
        if plan.ranges() == 1 {
            // Two chunks per thread, for balance; one chunk when sequential.
            let chunk = if !par && !two_chunks() {
                gm.n
            } else {
                gm.n.div_ceil(2 * threads).max(1)
            };
            let task = |i: usize, yb: &mut [f32]| {
                let ns = yb.len() / (gm.m * pw);
                run(
                    winograd::Task {
                        s0: i * chunk,
                        ns,
                        range: 0,
                    },
                    yb,
                )
            };
            if par {
                self.install(|| {
                    y.par_chunks_mut(chunk * gm.m * pw)
                        .enumerate()
                        .for_each(|(i, yb)| task(i, yb))
                });
            } else {
                task(0, y);
            }
            return;
        }
        let mut tasks = Vec::with_capacity(gm.n * plan.ranges());
        for (ni, mut ys) in y.chunks_mut(gm.m * pw).enumerate() {
            for r in 0..plan.ranges() {
                let (head, rest) = ys.split_at_mut(plan.range(r).1 * pw);
                tasks.push((
                    winograd::Task {
                        s0: ni,
                        ns: 1,
                        range: r,
                    },
                    head,
                ));
                ys = rest;
            }
        }
        self.install(|| tasks.into_par_iter().for_each(|(t, yb)| run(t, yb)));
    }

    /// A stride-2 convolution on the lane kernel ([`lanes::product_at`]): the input padded once
    /// (all samples; read in place where there is no padding), then tasks of (samples, group,
    /// chunk of `chunk` output channels), each passing up to [`STRIDED_POSITIONS`] output
    /// positions at a time (several samples' planes, or a few rows of one) through the
    /// product and transposing them into the output planes with the bias and a ReLU (other
    /// activations after). No im2col matrix (ResNet's stem made 7.4 MB of it per sample) and
    /// no phase planes: the broadcast inputs may lie anywhere.
    #[allow(clippy::too_many_arguments)]
    fn strided_forward(
        &self,
        gm: &Geom,
        chunk: usize,
        x: &[f32],
        wts: Weights<'_>,
        bias: Option<&[f32]>,
        act: Option<Unary>,
        pool3: bool,
        y: &mut [f32],
    ) {
        if let Some(b) = bias {
            assert_eq!(b.len(), gm.m, "conv2d bias length");
        }
        let (k, pw) = (gm.k(), gm.p_out());
        let nc = gm.mg / chunk;
        let form = Form::ConvLanes {
            flipped: wts.flipped,
            ws: [gm.m, gm.cg, gm.kh, gm.kw],
            groups: gm.g,
            chunk,
        };
        // Chunk `c` of group `gi` at `gi * nc + c`.
        let lw = wts.derive(&self.weights, form, || {
            let len = chunk * k;
            wts.data
                .chunks_exact(len)
                .take(gm.g * nc)
                .map(|wc| lanes::LanePacked::new(chunk, k, wc))
                .collect::<Vec<_>>()
        });
        let (hp, wp) = gm.padded_hw();
        let plane = hp * wp;
        let offs = tap_offsets(gm, plane, wp);
        let relu = act == Some(Unary::Relu);
        assert!(!pool3 || relu, "strided_forward: pooling after a ReLU only");
        // The pooled planes' shape (with `pool3`) and size, which `y` holds per channel.
        let [poh, pow] = [gm.oh.div_ceil(2), gm.ow.div_ceil(2)];
        let ypw = if pool3 { poh * pow } else { pw };
        // Samples per task: as many whole planes as fit the product's positions (one where
        // pooling, which goes a few rows at a time).
        let per = if pool3 {
            1
        } else {
            (STRIDED_POSITIONS / pw.max(1)).clamp(1, gm.n)
        };
        let (xblock, pblock) = (gm.h * gm.w, gm.cg * plane);
        let block = lw[0].padded(1);
        let mut body = |xin: &[f32]| {
            // Each task's output: one slice of `chunk` planes per sample.
            let mut tasks: Vec<(usize, usize, Vec<&mut [f32]>)> = Vec::new();
            let mut samples: Vec<_> = y.chunks_mut(gm.m * ypw).map(Some).collect();
            for s0 in (0..gm.n).step_by(per) {
                let s1 = (s0 + per).min(gm.n);
                let mut outs: Vec<Vec<&mut [f32]>> = (0..gm.g * nc).map(|_| Vec::new()).collect();
                for ys in samples[s0..s1].iter_mut() {
                    let ys = ys.take().expect("each sample once");
                    for (o, yc) in outs.iter_mut().zip(ys.chunks_mut(chunk * ypw)) {
                        o.push(yc);
                    }
                }
                for (gc, o) in outs.into_iter().enumerate() {
                    tasks.push((s0, gc, o));
                }
            }
            let task = |(s0, gc, mut outs): (usize, usize, Vec<&mut [f32]>)| {
                let (gi, c) = (gc / nc, gc % nc);
                let a = &lw[gc];
                let bias_c = bias.map(|b| &b[gi * gm.mg + c * chunk..][..chunk]);
                if pool3 {
                    let [out] = &mut outs[..] else {
                        unreachable!("one sample per task where pooling")
                    };
                    strided_pooled(gm, a, xin, &offs, s0 * gm.g + gi, [pblock, wp], bias_c, out);
                    return;
                }
                // Pieces: the samples' whole planes (several, or one that fits), or rows
                // `r0..r1` of one sample's.
                let rows = if outs.len() > 1 {
                    gm.oh
                } else {
                    (STRIDED_POSITIONS / gm.ow).clamp(1, gm.oh)
                };
                let cap = (outs.len() * rows * gm.ow).next_multiple_of(block);
                let mut pos = Vec::with_capacity(cap);
                with_scratch(cap * a.ld(), |prod| {
                    for r0 in (0..gm.oh).step_by(rows) {
                        let r1 = (r0 + rows).min(gm.oh);
                        let bases = (s0..s0 + outs.len()).map(|s| (s * gm.g + gi) * pblock);
                        row_positions(&mut pos, gm, bases, [r0, r1], wp, block);
                        lanes::product_at(a, xin, &offs, &pos, prod);
                        let per_piece = (r1 - r0) * gm.ow;
                        for (j, out) in outs.iter_mut().enumerate() {
                            lanes::copy_out(
                                a,
                                &prod[j * per_piece * a.ld()..],
                                gm.ow,
                                r1 - r0,
                                gm.ow,
                                pw,
                                bias_c,
                                relu,
                                &mut out[r0 * gm.ow..],
                            );
                        }
                    }
                });
                if !(relu || act.is_none()) {
                    for out in outs {
                        epilogue(out, pw, None, act);
                    }
                }
            };
            if self.parallel(gm.flops()) && tasks.len() > 1 {
                self.install(|| tasks.into_par_iter().for_each(task));
            } else {
                tasks.into_iter().for_each(task);
            }
        };
        if gm.p.pad == [0; 4] {
            // The planes are the input's own (`hp x wp` = `h x w`).
            body(x);
        } else {
            with_scratch(gm.n * gm.g * pblock, |xpad| {
                for (xb, pb) in x
                    .chunks_exact(gm.cg * xblock)
                    .zip(xpad.chunks_exact_mut(pblock))
                {
                    pad_planes(gm, xb, pb, plane, wp);
                }
                body(xpad);
            });
        }
    }

    /// Runs `task(i, block_i)` over the `block`-sized chunks of `out`, on the pool when asked.
    fn run_blocks(
        &self,
        out: &mut [f32],
        block: usize,
        par_tasks: bool,
        par: Parallelism,
        task: impl Fn(usize, &mut [f32]) + Sync + Send,
    ) {
        if par_tasks {
            self.install(|| {
                out.par_chunks_mut(block)
                    .enumerate()
                    .for_each(|(t, b)| task(t, b))
            });
        } else if matches!(par, Parallelism::None) {
            out.chunks_mut(block)
                .enumerate()
                .for_each(|(t, b)| task(t, b));
        } else {
            // gemm's own rayon parallelism must run on this backend's pool.
            self.install(|| {
                out.chunks_mut(block)
                    .enumerate()
                    .for_each(|(t, b)| task(t, b))
            });
        }
    }

    fn depthwise_forward(&self, gm: &Geom, x: &[f32], w: &[f32], y: &mut [f32]) {
        let pw = gm.p_out();
        let (sh, sw) = (gm.p.stride[0], gm.p.stride[1]);
        let (dh, dw) = (gm.p.dilation[0], gm.p.dilation[1]);
        let task = |t: usize, yp: &mut [f32]| {
            let (ni, mi) = (t / gm.m, t % gm.m);
            let plane = &x[(ni * gm.c + mi) * gm.h * gm.w..][..gm.h * gm.w];
            let wk = &w[mi * gm.kh * gm.kw..(mi + 1) * gm.kh * gm.kw];
            for ky in 0..gm.kh {
                let (oy0, oy1) = Geom::valid_range(gm.oh, sh, gm.row_off(ky), gm.h);
                for kx in 0..gm.kw {
                    let (ox0, ox1) = Geom::valid_range(gm.ow, sw, gm.col_off(kx), gm.w);
                    let wv = wk[ky * gm.kw + kx];
                    for oy in oy0..oy1 {
                        let iy = (oy * sh + ky * dh) - gm.p.pad[0];
                        let src = &plane[iy * gm.w..(iy + 1) * gm.w];
                        let dst = &mut yp[oy * gm.ow..(oy + 1) * gm.ow];
                        for ox in ox0..ox1 {
                            dst[ox] += wv * src[ox * sw + kx * dw - gm.p.pad[1]];
                        }
                    }
                }
            }
        };
        let par = self.parallel(gm.flops());
        self.run_blocks(y, pw, par, Parallelism::None, task);
    }

    pub(super) fn conv2d_backward_input_impl(
        &self,
        dy: &[f32],
        dys: &[usize],
        wts: Weights<'_>,
        ws: [usize; 4],
        p: &Conv2dParams,
        xs: [usize; 4],
    ) -> Vec<f32> {
        let w = wts.data;
        let gm = Geom::new(xs, ws, p);
        assert_eq!(
            dys,
            [gm.n, gm.m, gm.oh, gm.ow],
            "conv2d_backward_input dy shape"
        );
        if let Some((wst, pt)) = transposed_as_conv(&gm) {
            // A stride-1 convolution's input gradient is itself a stride-1 convolution (of dy,
            // with the weights flipped and their channel axes swapped), which the direct path
            // computes without col2im.
            let form = Form::Flipped { ws, groups: gm.g };
            let wt = wts.derive(&self.weights, form, || flip_weights(&gm, w));
            let flipped = Weights {
                data: &wt,
                id: wts.id,
                flipped: true,
            };
            let dys4 = [gm.n, gm.m, gm.oh, gm.ow];
            let (dx, dxs) = self.conv2d_impl(dy, dys4, flipped, wst, None, &pt, None);
            debug_assert_eq!(dxs, xs);
            return dx;
        }
        let mut dx = self.out_zeroed(xs.iter().product());
        if dx.is_empty() || gm.p_out() == 0 {
            return dx;
        }
        let pw = gm.p_out();
        let k = gm.k();
        let xblock = gm.cg * gm.h * gm.w;
        if gm.is_depthwise() {
            let (sh, sw) = (gm.p.stride[0], gm.p.stride[1]);
            let (dh, dw) = (gm.p.dilation[0], gm.p.dilation[1]);
            let task = |t: usize, dxp: &mut [f32]| {
                let (ni, ci) = (t / gm.c, t % gm.c);
                let dyp = &dy[(ni * gm.m + ci) * pw..][..pw];
                let wk = &w[ci * gm.kh * gm.kw..(ci + 1) * gm.kh * gm.kw];
                for ky in 0..gm.kh {
                    let (oy0, oy1) = Geom::valid_range(gm.oh, sh, gm.row_off(ky), gm.h);
                    for kx in 0..gm.kw {
                        let (ox0, ox1) = Geom::valid_range(gm.ow, sw, gm.col_off(kx), gm.w);
                        let wv = wk[ky * gm.kw + kx];
                        for oy in oy0..oy1 {
                            let iy = (oy * sh + ky * dh) - gm.p.pad[0];
                            let dst = &mut dxp[iy * gm.w..(iy + 1) * gm.w];
                            let src = &dyp[oy * gm.ow..(oy + 1) * gm.ow];
                            for ox in ox0..ox1 {
                                dst[ox * sw + kx * dw - gm.p.pad[1]] += wv * src[ox];
                            }
                        }
                    }
                }
            };
            let par = self.parallel(gm.flops());
            self.run_blocks(&mut dx, gm.h * gm.w, par, Parallelism::None, task);
            return dx;
        }
        let (par_tasks, par) = self.conv_plan(gm.n * gm.g, gm.flops());
        // Few output channels per group: the reduction of dcol = W^T dY is short, so the
        // small-k kernel takes it, with W^T materialised once (k x mg per group).
        let small = gm.mg <= DIRECT_MAX_K && !gm.is_pointwise();
        let wt_all: Vec<f32> = if small {
            let mut t = vec![0.0f32; gm.g * k * gm.mg];
            for gi in 0..gm.g {
                for mo in 0..gm.mg {
                    for r in 0..k {
                        t[(gi * k + r) * gm.mg + mo] = w[(gi * gm.mg + mo) * k + r];
                    }
                }
            }
            t
        } else {
            Vec::new()
        };
        let task = |t: usize, dxb: &mut [f32]| {
            let (ni, gi) = (t / gm.g, t % gm.g);
            let wg = &w[gi * gm.mg * k..(gi + 1) * gm.mg * k];
            let dyg = &dy[(ni * gm.m + gi * gm.mg) * pw..][..gm.mg * pw];
            // dcol (k x pw) = W_g^T (k x mg) * dY_g (mg x pw)
            let wt = MatRef::new(wg, 1, k);
            let dyv = MatRef::new(dyg, pw, 1);
            if small {
                let wtg = &wt_all[gi * k * gm.mg..(gi + 1) * k * gm.mg];
                with_scratch(k * pw, |col| {
                    small_k_gemm(k, gm.mg, pw, wtg, dyg, col);
                    col2im(&gm, col, dxb);
                });
            } else if gm.is_pointwise() {
                gemm_f32(k, pw, gm.mg, dxb, pw, false, wt, dyv, par);
            } else {
                with_scratch(k * pw, |col| {
                    gemm_f32(k, pw, gm.mg, col, pw, false, wt, dyv, par);
                    col2im(&gm, col, dxb);
                });
            }
        };
        self.run_blocks(&mut dx, xblock, par_tasks, par, task);
        dx
    }

    pub(super) fn conv2d_backward_weight_impl(
        &self,
        dy: &[f32],
        dys: &[usize],
        x: &[f32],
        xs: [usize; 4],
        p: &Conv2dParams,
        ws: [usize; 4],
    ) -> Vec<f32> {
        let gm = Geom::new(xs, ws, p);
        assert_eq!(
            dys,
            [gm.n, gm.m, gm.oh, gm.ow],
            "conv2d_backward_weight dy shape"
        );
        let k = gm.k();
        let pw = gm.p_out();
        let mut dw = self.out_zeroed(ws.iter().product());
        if dw.is_empty() || pw == 0 || gm.n == 0 {
            return dw;
        }
        let xblock = gm.cg * gm.h * gm.w;
        if gm.is_depthwise() {
            let (sh, sw) = (gm.p.stride[0], gm.p.stride[1]);
            let (dh, dwl) = (gm.p.dilation[0], gm.p.dilation[1]);
            let task = |ci: usize, dwk: &mut [f32]| {
                for ky in 0..gm.kh {
                    let (oy0, oy1) = Geom::valid_range(gm.oh, sh, gm.row_off(ky), gm.h);
                    for kx in 0..gm.kw {
                        let (ox0, ox1) = Geom::valid_range(gm.ow, sw, gm.col_off(kx), gm.w);
                        let mut acc = 0.0f64;
                        for ni in 0..gm.n {
                            let plane = &x[(ni * gm.c + ci) * gm.h * gm.w..][..gm.h * gm.w];
                            let dyp = &dy[(ni * gm.m + ci) * pw..][..pw];
                            let mut s = 0.0f32;
                            for oy in oy0..oy1 {
                                let iy = (oy * sh + ky * dh) - gm.p.pad[0];
                                let src = &plane[iy * gm.w..(iy + 1) * gm.w];
                                let d = &dyp[oy * gm.ow..(oy + 1) * gm.ow];
                                for ox in ox0..ox1 {
                                    s += d[ox] * src[ox * sw + kx * dwl - gm.p.pad[1]];
                                }
                            }
                            acc += s as f64;
                        }
                        dwk[ky * gm.kw + kx] = acc as f32;
                    }
                }
            };
            let par = self.parallel(gm.flops());
            self.run_blocks(&mut dw, gm.kh * gm.kw, par, Parallelism::None, task);
            return dw;
        }
        let (par_groups, par) = self.conv_plan(gm.g, gm.flops());
        let task = |gi: usize, dwg: &mut [f32]| {
            let mut col = if gm.is_pointwise() {
                Vec::new()
            } else {
                vec![0.0f32; k * pw]
            };
            for ni in 0..gm.n {
                let xg = &x[(ni * gm.c + gi * gm.cg) * gm.h * gm.w..][..xblock];
                let colv: &[f32] = if gm.is_pointwise() {
                    xg
                } else {
                    im2col(&gm, xg, &mut col);
                    &col
                };
                let dyg = &dy[(ni * gm.m + gi * gm.mg) * pw..][..gm.mg * pw];
                // dW_g (mg x k) += dY_g (mg x pw) * col^T (pw x k)
                gemm_f32(
                    gm.mg,
                    k,
                    pw,
                    dwg,
                    k,
                    ni > 0,
                    MatRef::new(dyg, pw, 1),
                    MatRef::new(colv, 1, pw),
                    par,
                );
            }
        };
        self.run_blocks(&mut dw, gm.mg * k, par_groups, par, task);
        dw
    }
}

#[cfg(test)]
mod tests {
    use super::Geom;

    #[test]
    fn valid_range_matches_brute_force() {
        for out in 0..6 {
            for stride in 1..4 {
                for off in -5isize..5 {
                    for len in 0..7 {
                        let (lo, hi) = Geom::valid_range(out, stride, off, len);
                        let want: Vec<usize> = (0..out)
                            .filter(|&o| {
                                let i = (o * stride) as isize + off;
                                i >= 0 && i < len as isize
                            })
                            .collect();
                        let got: Vec<usize> = (lo..hi).collect();
                        assert_eq!(got, want, "out {out} stride {stride} off {off} len {len}");
                    }
                }
            }
        }
    }
}
