//! Every CPU primitive except convolution: data movement, matmul, pooling, elementwise,
//! reductions, losses, resize and the perturbation helpers.

use gemm::Parallelism;
use rayon::prelude::*;

use super::gemm::{MatRef, gemm_f32};
use super::lanes;
use super::sgemm::{self, PackedA};
use super::wcache::{Form, Weights};
use super::{CpuBackend, ELEM_CHUNK};
use crate::runtime::backend::{
    Binary, Loss, Norm, PadMode, Pool2dParams, PoolKind, ReduceOp, ResizeParams, Unary,
};
use crate::runtime::reference::{
    broadcast_shape, matmul_out_shape, pad_source, pool_axis_taps, resize_taps, strides,
};

// ---- generic helpers ---------------------------------------------------------------------------

impl CpuBackend {
    /// Runs `body(start, chunk)` over contiguous chunks of `out` (`start` = the chunk's offset),
    /// one chunk per thread-sized share when `work` is big enough, else in one call.
    ///
    /// Few large chunks (two per thread) rather than many small ones: elementwise ops are memory
    /// bound and every extra task is a pool round trip.
    pub(super) fn for_ranges(
        &self,
        out: &mut [f32],
        work: usize,
        body: impl Fn(usize, &mut [f32]) + Sync + Send,
    ) {
        let len = out.len();
        if !self.parallel(work) || len < 2 * ELEM_CHUNK {
            body(0, out);
            return;
        }
        let chunk = len
            .div_ceil(self.threads * 2)
            .max(ELEM_CHUNK)
            .next_multiple_of(16);
        self.install(|| {
            out.par_chunks_mut(chunk)
                .enumerate()
                .for_each(|(i, c)| body(i * chunk, c))
        });
    }

    /// Fills a fresh vector element-wise, in parallel chunks when large.
    pub(super) fn generate(&self, len: usize, f: impl Fn(usize) -> f32 + Sync + Send) -> Vec<f32> {
        let mut out = self.out_dirty(len);
        self.for_ranges(&mut out, len, |s, c| {
            for (j, v) in c.iter_mut().enumerate() {
                *v = f(s + j);
            }
        });
        out
    }

    // The map helpers zip slices (no per-element index arithmetic or bounds checks) so that
    // simple closures vectorise.
    pub(super) fn map1(&self, a: &[f32], f: impl Fn(f32) -> f32 + Sync + Send) -> Vec<f32> {
        let mut out = self.out_dirty(a.len());
        self.for_ranges(&mut out, a.len(), |s, c| {
            let a = &a[s..s + c.len()];
            for (o, &x) in c.iter_mut().zip(a) {
                *o = f(x);
            }
        });
        out
    }

    pub(super) fn map2(
        &self,
        a: &[f32],
        b: &[f32],
        f: impl Fn(f32, f32) -> f32 + Sync + Send,
    ) -> Vec<f32> {
        assert_eq!(a.len(), b.len());
        let mut out = self.out_dirty(a.len());
        self.for_ranges(&mut out, a.len(), |s, c| {
            let (a, b) = (&a[s..s + c.len()], &b[s..s + c.len()]);
            for ((o, &x), &y) in c.iter_mut().zip(a).zip(b) {
                *o = f(x, y);
            }
        });
        out
    }

    pub(super) fn map3(
        &self,
        a: &[f32],
        b: &[f32],
        c: &[f32],
        f: impl Fn(f32, f32, f32) -> f32 + Sync + Send,
    ) -> Vec<f32> {
        assert!(a.len() == b.len() && b.len() == c.len());
        let mut out = self.out_dirty(a.len());
        self.for_ranges(&mut out, a.len(), |s, o| {
            let n = o.len();
            let (a, b, c) = (&a[s..s + n], &b[s..s + n], &c[s..s + n]);
            for (((o, &x), &y), &z) in o.iter_mut().zip(a).zip(b).zip(c) {
                *o = f(x, y, z);
            }
        });
        out
    }

    /// `unary` with the op matched once outside the loop (the per-element `match` otherwise
    /// blocks vectorisation of the cheap ops).
    pub(super) fn unary_map(&self, op: Unary, a: &[f32]) -> Vec<f32> {
        match op {
            Unary::Relu => self.map1(a, |v| unary_f32(Unary::Relu, v)),
            Unary::Neg => self.map1(a, |v| -v),
            Unary::Abs => self.map1(a, f32::abs),
            Unary::Affine { a: k, b } => self.map1(a, move |v| k * v + b),
            Unary::Clip { min, max } => self.map1(a, move |v| v.max(min).min(max)),
            Unary::LeakyRelu { alpha } => {
                self.map1(a, move |v| unary_f32(Unary::LeakyRelu { alpha }, v))
            }
            op => self.map1(a, move |v| unary_f32(op, v)),
        }
    }

    /// `dy * unary'(x, y)`, specialised like [`CpuBackend::unary_map`].
    pub(super) fn unary_backward_map(
        &self,
        op: Unary,
        x: &[f32],
        y: &[f32],
        dy: &[f32],
    ) -> Vec<f32> {
        match op {
            Unary::Relu => self.map2(x, dy, |xv, d| {
                d * unary_derivative_f32(Unary::Relu, xv, 0.0)
            }),
            Unary::Affine { a, b } => self.map1(dy, move |d| {
                d * unary_derivative_f32(Unary::Affine { a, b }, 0.0, 0.0)
            }),
            Unary::Neg => self.map1(dy, |d| -d),
            op => self.map3(x, y, dy, move |xv, yv, d| {
                d * unary_derivative_f32(op, xv, yv)
            }),
        }
    }

    /// `out[i] = src[offset + sum_d idx_d(i) * src_strides[d]]` over the row-major multi-index of
    /// `shape`: transpose, slice and broadcast are all this gather with different strides.
    fn gather(
        &self,
        src: &[f32],
        shape: &[usize],
        src_strides: &[usize],
        offset: usize,
    ) -> Vec<f32> {
        let len: usize = shape.iter().product();
        let mut out = self.out_dirty(len);
        if len == 0 {
            return out;
        }
        if shape.is_empty() {
            out[0] = src[offset];
            return out;
        }
        let r = shape.len();
        let last = shape[r - 1];
        let ls = src_strides[r - 1];
        let body = |(row, dst): (usize, &mut [f32])| {
            let mut rem = row;
            let mut base = offset;
            for d in (0..r - 1).rev() {
                base += (rem % shape[d]) * src_strides[d];
                rem /= shape[d];
            }
            match ls {
                0 => dst.fill(src[base]),
                1 => dst.copy_from_slice(&src[base..base + last]),
                _ => dst
                    .iter_mut()
                    .enumerate()
                    .for_each(|(j, v)| *v = src[base + j * ls]),
            }
        };
        if self.parallel(len) {
            self.install(|| out.par_chunks_mut(last).enumerate().for_each(body));
        } else {
            out.chunks_mut(last).enumerate().for_each(body);
        }
        out
    }

    pub(super) fn transpose_impl(
        &self,
        x: &[f32],
        shape: &[usize],
        perm: &[usize],
    ) -> (Vec<f32>, Vec<usize>) {
        assert_eq!(perm.len(), shape.len(), "transpose perm rank");
        let mut seen = vec![false; perm.len()];
        for &p in perm {
            assert!(
                p < perm.len() && !seen[p],
                "transpose perm {perm:?} is not a permutation"
            );
            seen[p] = true;
        }
        let st = strides(shape);
        let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
        let out_strides: Vec<usize> = perm.iter().map(|&p| st[p]).collect();
        (self.gather(x, &out_shape, &out_strides, 0), out_shape)
    }

    pub(super) fn slice_impl(
        &self,
        x: &[f32],
        shape: &[usize],
        axis: usize,
        start: usize,
        end: usize,
    ) -> (Vec<f32>, Vec<usize>) {
        assert!(
            axis < shape.len() && start <= end && end <= shape[axis],
            "slice {start}..{end} of axis {axis} of {shape:?}"
        );
        let st = strides(shape);
        let mut out_shape = shape.to_vec();
        out_shape[axis] = end - start;
        (self.gather(x, &out_shape, &st, start * st[axis]), out_shape)
    }

    pub(super) fn broadcast_impl(&self, x: &[f32], shape: &[usize], to: &[usize]) -> Vec<f32> {
        assert_eq!(
            broadcast_shape(shape, to),
            to,
            "cannot broadcast {shape:?} to {to:?}"
        );
        self.gather(x, to, &broadcast_strides(shape, to), 0)
    }

    pub(super) fn binary_impl(
        &self,
        op: Binary,
        a: &[f32],
        ash: &[usize],
        b: &[f32],
        bsh: &[usize],
    ) -> (Vec<f32>, Vec<usize>) {
        // One monomorphised body per op, so the inner loops see a concrete operation.
        match op {
            Binary::Add => self.binary_with(a, ash, b, bsh, |x, y| binary_f32(Binary::Add, x, y)),
            Binary::Sub => self.binary_with(a, ash, b, bsh, |x, y| binary_f32(Binary::Sub, x, y)),
            Binary::Mul => self.binary_with(a, ash, b, bsh, |x, y| binary_f32(Binary::Mul, x, y)),
            Binary::Div => self.binary_with(a, ash, b, bsh, |x, y| binary_f32(Binary::Div, x, y)),
            Binary::Max => self.binary_with(a, ash, b, bsh, |x, y| binary_f32(Binary::Max, x, y)),
            Binary::Min => self.binary_with(a, ash, b, bsh, |x, y| binary_f32(Binary::Min, x, y)),
        }
    }

    fn binary_with(
        &self,
        a: &[f32],
        ash: &[usize],
        b: &[f32],
        bsh: &[usize],
        f: impl Fn(f32, f32) -> f32 + Copy + Sync + Send,
    ) -> (Vec<f32>, Vec<usize>) {
        if ash == bsh {
            return (self.map2(a, b, f), ash.to_vec());
        }
        let shape = broadcast_shape(ash, bsh);
        if b.len() == 1 {
            let s = b[0];
            return (self.map1(a, move |x| f(x, s)), shape);
        }
        if a.len() == 1 {
            let s = a[0];
            return (self.map1(b, move |y| f(s, y)), shape);
        }
        let (sa, sb) = (
            broadcast_strides(ash, &shape),
            broadcast_strides(bsh, &shape),
        );
        let len: usize = shape.iter().product();
        let mut out = self.out_dirty(len);
        if len == 0 {
            return (out, shape);
        }
        let r = shape.len();
        let last = shape[r - 1];
        let (la, lb) = (sa[r - 1], sb[r - 1]);
        let body = |(row, dst): (usize, &mut [f32])| {
            let (mut rem, mut ba, mut bb) = (row, 0usize, 0usize);
            for d in (0..r - 1).rev() {
                let i = rem % shape[d];
                rem /= shape[d];
                ba += i * sa[d];
                bb += i * sb[d];
            }
            // Contiguous / scalar rows (a bias over channels, a per-feature vector) as slice
            // loops; anything else strided.
            match (la, lb) {
                (1, 1) => {
                    for ((o, &x), &y) in
                        dst.iter_mut().zip(&a[ba..ba + last]).zip(&b[bb..bb + last])
                    {
                        *o = f(x, y);
                    }
                }
                (1, 0) => {
                    let y = b[bb];
                    for (o, &x) in dst.iter_mut().zip(&a[ba..ba + last]) {
                        *o = f(x, y);
                    }
                }
                (0, 1) => {
                    let x = a[ba];
                    for (o, &y) in dst.iter_mut().zip(&b[bb..bb + last]) {
                        *o = f(x, y);
                    }
                }
                _ => {
                    for (j, v) in dst.iter_mut().enumerate() {
                        *v = f(a[ba + j * la], b[bb + j * lb]);
                    }
                }
            }
        };
        if self.parallel(len) && len > last {
            let rows_per = (len / last).div_ceil(self.threads * 2).max(1);
            self.install(|| {
                out.par_chunks_mut(last * rows_per)
                    .enumerate()
                    .for_each(|(ci, c)| {
                        c.chunks_mut(last)
                            .enumerate()
                            .for_each(|(j, d)| body((ci * rows_per + j, d)))
                    })
            });
        } else {
            out.chunks_mut(last).enumerate().for_each(body);
        }
        (out, shape)
    }

    pub(super) fn reduce_sum_to_impl(&self, x: &[f32], xs: &[usize], to: &[usize]) -> Vec<f32> {
        assert_eq!(
            broadcast_shape(to, xs),
            xs,
            "cannot reduce {xs:?} to {to:?}"
        );
        let off = xs.len() - to.len();
        let axes: Vec<usize> = (0..xs.len())
            .filter(|&d| d < off || (to[d - off] == 1 && xs[d] != 1))
            .collect();
        self.reduce_impl(x, xs, &axes, ReduceOp::Sum, true).0
    }

    /// Sum/mean over `axes`, each output element accumulated in f64 in row-major order of the
    /// reduced sub-index (one task per output element: deterministic).
    pub(super) fn reduce_impl(
        &self,
        x: &[f32],
        xs: &[usize],
        axes: &[usize],
        op: ReduceOp,
        keepdims: bool,
    ) -> (Vec<f32>, Vec<usize>) {
        assert!(
            axes.windows(2).all(|w| w[0] < w[1]),
            "reduce axes must be sorted and unique"
        );
        assert!(
            axes.iter().all(|&a| a < xs.len()),
            "reduce axis out of range for {xs:?}"
        );
        let st = strides(xs);
        let kept: Vec<usize> = (0..xs.len()).filter(|d| !axes.contains(d)).collect();
        let kept_shape: Vec<usize> = kept.iter().map(|&d| xs[d]).collect();
        let kept_strides: Vec<usize> = kept.iter().map(|&d| st[d]).collect();
        let red_shape: Vec<usize> = axes.iter().map(|&d| xs[d]).collect();
        let red_strides: Vec<usize> = axes.iter().map(|&d| st[d]).collect();
        let count: usize = red_shape.iter().product();
        let out_len: usize = kept_shape.iter().product();
        let scale = if op == ReduceOp::Mean {
            1.0 / count as f64
        } else {
            1.0
        };
        let one = |o: usize| -> f32 {
            let mut base = 0;
            let mut rem = o;
            for d in (0..kept.len()).rev() {
                base += (rem % kept_shape[d]) * kept_strides[d];
                rem /= kept_shape[d];
            }
            let mut acc = 0.0f64;
            if red_shape.is_empty() {
                acc = x[base] as f64;
            } else if count > 0 {
                // Odometer over the reduced axes; the last reduced axis is the inner loop.
                let rr = red_shape.len();
                let (inner_n, inner_s) = (red_shape[rr - 1], red_strides[rr - 1]);
                let mut idx = vec![0usize; rr];
                loop {
                    let mut off = base;
                    for d in 0..rr - 1 {
                        off += idx[d] * red_strides[d];
                    }
                    for j in 0..inner_n {
                        acc += x[off + j * inner_s] as f64;
                    }
                    let mut d = rr - 1;
                    loop {
                        if d == 0 {
                            return (acc * scale) as f32;
                        }
                        d -= 1;
                        idx[d] += 1;
                        if idx[d] < red_shape[d] {
                            break;
                        }
                        idx[d] = 0;
                    }
                }
            }
            (acc * scale) as f32
        };
        let data = self.generate_work(out_len, x.len(), one);
        let shape = if keepdims {
            xs.iter()
                .enumerate()
                .map(|(d, &n)| if axes.contains(&d) { 1 } else { n })
                .collect()
        } else {
            kept_shape
        };
        (data, shape)
    }

    /// Like [`CpuBackend::generate`] but decides on parallelism by the total `work`, for outputs
    /// whose elements each cost more than one operation.
    fn generate_work(
        &self,
        len: usize,
        work: usize,
        f: impl Fn(usize) -> f32 + Sync + Send,
    ) -> Vec<f32> {
        let mut out = self.out_dirty(len);
        if self.parallel(work) && len > 1 {
            let chunk = len.div_ceil(self.threads * 4).max(1);
            self.install(|| {
                out.par_chunks_mut(chunk).enumerate().for_each(|(ci, c)| {
                    c.iter_mut()
                        .enumerate()
                        .for_each(|(j, v)| *v = f(ci * chunk + j))
                })
            });
        } else {
            out.iter_mut().enumerate().for_each(|(i, v)| *v = f(i));
        }
        out
    }

    /// Runs `f(index, block)` over `block`-sized chunks of `out`, in parallel when `work` is big.
    fn blocks(
        &self,
        out: &mut [f32],
        block: usize,
        work: usize,
        f: impl Fn(usize, &mut [f32]) + Sync + Send,
    ) {
        if block == 0 {
            return;
        }
        if self.parallel(work) && out.len() > block {
            self.install(|| {
                out.par_chunks_mut(block)
                    .enumerate()
                    .for_each(|(i, b)| f(i, b))
            });
        } else {
            out.chunks_mut(block).enumerate().for_each(|(i, b)| f(i, b));
        }
    }

    pub(super) fn softmax_impl(
        &self,
        x: &[f32],
        shape: &[usize],
        axis: usize,
        log: bool,
    ) -> Vec<f32> {
        let (_, n, inner) = split_axis(shape, axis);
        let mut out = self.out_dirty(x.len());
        self.blocks(&mut out, n * inner, x.len() * 8, |o, dst| {
            let src = &x[o * n * inner..(o + 1) * n * inner];
            for i in 0..inner {
                let mx = (0..n)
                    .map(|k| src[k * inner + i])
                    .fold(f32::NEG_INFINITY, f32::max);
                let sum: f64 = (0..n)
                    .map(|k| ((src[k * inner + i] - mx) as f64).exp())
                    .sum();
                let lse = sum.ln();
                for k in 0..n {
                    let z = (src[k * inner + i] - mx) as f64;
                    dst[k * inner + i] = if log {
                        (z - lse) as f32
                    } else {
                        (z.exp() / sum) as f32
                    };
                }
            }
        });
        out
    }

    pub(super) fn softmax_backward_impl(
        &self,
        y: &[f32],
        dy: &[f32],
        shape: &[usize],
        axis: usize,
        log: bool,
    ) -> Vec<f32> {
        let (_, n, inner) = split_axis(shape, axis);
        let mut out = self.out_dirty(y.len());
        self.blocks(&mut out, n * inner, y.len() * 4, |o, dst| {
            let ys = &y[o * n * inner..(o + 1) * n * inner];
            let ds = &dy[o * n * inner..(o + 1) * n * inner];
            for i in 0..inner {
                if log {
                    let s: f64 = (0..n).map(|k| ds[k * inner + i] as f64).sum();
                    for k in 0..n {
                        let j = k * inner + i;
                        dst[j] = (ds[j] as f64 - (ys[j] as f64).exp() * s) as f32;
                    }
                } else {
                    let s: f64 = (0..n)
                        .map(|k| (ds[k * inner + i] * ys[k * inner + i]) as f64)
                        .sum();
                    for k in 0..n {
                        let j = k * inner + i;
                        dst[j] = (ys[j] as f64 * (ds[j] as f64 - s)) as f32;
                    }
                }
            }
        });
        out
    }

    pub(super) fn matmul_impl(
        &self,
        a: &[f32],
        ash: &[usize],
        bw: Weights<'_>,
        bsh: &[usize],
        trans_a: bool,
        trans_b: bool,
    ) -> (Vec<f32>, Vec<usize>) {
        let b = bw.data;
        let out_shape = matmul_out_shape(ash, bsh, trans_a, trans_b);
        let r = out_shape.len();
        let (m, n) = (out_shape[r - 2], out_shape[r - 1]);
        let k = if trans_a {
            ash[ash.len() - 2]
        } else {
            ash[ash.len() - 1]
        };
        let batch_shape = &out_shape[..r - 2];
        let batches: usize = batch_shape.iter().product();
        let a_batch = broadcast_strides(&ash[..ash.len() - 2], batch_shape);
        let b_batch = broadcast_strides(&bsh[..bsh.len() - 2], batch_shape);
        let (amat, bmat) = (m * k, k * n);
        let av = |base: usize| {
            let s = &a[base * amat..(base + 1) * amat];
            if trans_a {
                MatRef::new(s, 1, m)
            } else {
                MatRef::new(s, k, 1)
            }
        };
        let bv = |base: usize| {
            let s = &b[base * bmat..(base + 1) * bmat];
            if trans_b {
                MatRef::new(s, 1, k)
            } else {
                MatRef::new(s, n, 1)
            }
        };
        // Batch strides above count elements; convert to matrix indices.
        let batch_base = |bi: usize, st: &[usize]| -> usize {
            let (mut rem, mut base) = (bi, 0);
            for d in (0..batch_shape.len()).rev() {
                base += (rem % batch_shape[d]) * st[d];
                rem /= batch_shape[d];
            }
            base
        };
        let mut out = self.out_dirty(batches * m * n);
        if out.is_empty() {
            return (out, out_shape);
        }
        let flops = batches * m * n * k;
        // A lone mid-size product (a classifier's hidden layer over a batch) on the register-
        // blocked kernel: packing both operands costs less than the `gemm` crate's per-call
        // setup and thread hand-off at this size.
        let mid = batches == 1 && (1 << 16..1 << 25).contains(&flops) && sgemm::available();
        if mid && trans_b && !trans_a {
            if m >= sgemm::MR && n >= 16 && bw.id.is_some() && bsh.len() == 2 {
                // A weight matrix (PyTorch's Linear): transposed once and kept, then the
                // panel kernel (rows of `a` packed per call, `b^T` read by rows of n).
                let bt = bw.derive(&self.weights, Form::Transposed { n, k }, || {
                    let mut t = vec![0.0f32; k * n];
                    for (j, row) in b.chunks_exact(k).take(n).enumerate() {
                        for (ti, &v) in row.iter().enumerate() {
                            t[ti * n + j] = v;
                        }
                    }
                    t
                });
                if lanes::applies_gemm() {
                    lanes::gemm(m, n, k, a, &bt, &mut out);
                } else {
                    let pa = PackedA::new(m, k, a, k, 1);
                    sgemm::gemm_packed(&pa, &bt, n, n, &mut out, n);
                }
                return (out, out_shape);
            }
            // Both operands by rows of k: dot products, nothing packed.
            sgemm::gemm_nt(m, n, k, a, k, b, k, &mut out, n);
            return (out, out_shape);
        }
        if mid && !trans_b && !trans_a && lanes::applies_gemm() && lanes::nn_applies() {
            // `b` is already `k x n` by rows, the lane kernel's right operand: the input
            // gradient of a Linear layer (`dy * W`), with nothing transposed or packed.
            lanes::gemm(m, n, k, a, &b[..k * n], &mut out);
            return (out, out_shape);
        }
        if mid && !trans_b && m >= sgemm::MR {
            let pa = if trans_a {
                PackedA::new(m, k, a, 1, m)
            } else {
                PackedA::new(m, k, a, k, 1)
            };
            sgemm::gemm_packed(&pa, &b[..k * n], n, n, &mut out, n);
            return (out, out_shape);
        }
        // A lone GEMM below a few hundred thousand multiply-adds (a classifier head) is over
        // before gemm's thread hand-off would pay for itself.
        let (par_tasks, par) = if !self.parallel(flops) || (batches == 1 && flops < 1 << 19) {
            (false, Parallelism::None)
        } else if batches >= self.threads {
            (true, Parallelism::None)
        } else {
            (false, Parallelism::Rayon(self.threads))
        };
        let task = |bi: usize, dst: &mut [f32]| {
            let (ab, bb) = (batch_base(bi, &a_batch), batch_base(bi, &b_batch));
            gemm_f32(m, n, k, dst, n, false, av(ab), bv(bb), par);
        };
        if par_tasks {
            self.install(|| {
                out.par_chunks_mut(m * n)
                    .enumerate()
                    .for_each(|(i, d)| task(i, d))
            });
        } else if matches!(par, Parallelism::None) {
            out.chunks_mut(m * n)
                .enumerate()
                .for_each(|(i, d)| task(i, d));
        } else {
            self.install(|| {
                out.chunks_mut(m * n)
                    .enumerate()
                    .for_each(|(i, d)| task(i, d))
            });
        }
        (out, out_shape)
    }

    pub(super) fn pool2d_impl(&self, x: &[f32], xs: [usize; 4], p: &Pool2dParams) -> Vec<f32> {
        let [n, c, h, w] = xs;
        let [oh, ow] = p.out_hw;
        let win = PoolWindows::new(h, w, p);
        let mut y = self.out_dirty(n * c * oh * ow);
        let work = y.len() * p.kernel[0] * p.kernel[1];
        let rows_of_taps = p.kind == PoolKind::Max && p.dilation == [1, 1];
        self.blocks(&mut y, oh * ow, work, |pl, dst| {
            let plane = &x[pl * h * w..(pl + 1) * h * w];
            if rows_of_taps {
                win.max_rows(plane, p, dst);
                return;
            }
            for oy in 0..oh {
                for ox in 0..ow {
                    dst[oy * ow + ox] = match p.kind {
                        PoolKind::Max => win.argmax(plane, oy, ox).map_or(0.0, |i| plane[i]),
                        PoolKind::Avg { count_include_pad } => {
                            let div = win.divisor(oy, ox, count_include_pad);
                            if div == 0 {
                                0.0
                            } else {
                                let mut s = 0.0f32;
                                win.for_valid(oy, ox, |i| s += plane[i]);
                                s / div as f32
                            }
                        }
                    };
                }
            }
        });
        y
    }

    pub(super) fn pool2d_backward_impl(
        &self,
        dy: &[f32],
        x: &[f32],
        xs: [usize; 4],
        p: &Pool2dParams,
        relu: bool,
    ) -> Vec<f32> {
        let [n, c, h, w] = xs;
        let [oh, ow] = p.out_hw;
        let win = PoolWindows::new(h, w, p);
        let work = n * c * oh * ow * p.kernel[0] * p.kernel[1];
        // With `relu`, `x` is a ReLU's output and the ReLU's backward follows each plane's,
        // while the plane is in cache: `d * (x > 0 ? 1 : 0)`, the ReLU backward's own
        // arithmetic (so the fused result equals the two passes' to the bit).
        let mask = |plane: &[f32], dst: &mut [f32]| {
            if relu {
                for (d, &r) in dst.iter_mut().zip(plane) {
                    *d *= unary_derivative_f32(Unary::Relu, r, 0.0);
                }
            }
        };
        let pairs = p.kind == PoolKind::Max && win.all_full(p) && win.is_2x2_stride_2(p);
        // Disjoint 2x2 windows that tile the plane write every element of dx themselves.
        let tiled = pairs && 2 * oh == h && 2 * ow == w;
        let mut dx = if tiled {
            self.out_dirty(n * c * h * w)
        } else {
            self.out_zeroed(n * c * h * w)
        };
        self.blocks(&mut dx, h * w, work, |pl, dst| {
            let plane = &x[pl * h * w..(pl + 1) * h * w];
            let dyp = &dy[pl * oh * ow..(pl + 1) * oh * ow];
            if pairs {
                // Disjoint 2x2 windows: the first strict maximum of each (same order as
                // `argmax`) gets the gradient, its three other taps zero (branch-free).
                for (oy, drow) in dyp.chunks_exact(ow).enumerate() {
                    let (r0, r1) = (2 * oy * w, (2 * oy + 1) * w);
                    let (top, rest) = dst.split_at_mut(r1);
                    let (top, bot) = (&mut top[r0..r0 + 2 * ow], &mut rest[..2 * ow]);
                    let (xt, xb) = (&plane[r0..r0 + 2 * ow], &plane[r1..r1 + 2 * ow]);
                    super::maxpool2::backward_row(xt, xb, drow, top, bot, !tiled);
                }
                mask(plane, dst);
                return;
            }
            for oy in 0..oh {
                for ox in 0..ow {
                    let d = dyp[oy * ow + ox];
                    match p.kind {
                        PoolKind::Max => {
                            if let Some(i) = win.argmax(plane, oy, ox) {
                                dst[i] += d;
                            }
                        }
                        PoolKind::Avg { count_include_pad } => {
                            let div = win.divisor(oy, ox, count_include_pad);
                            if div > 0 {
                                let g = d / div as f32;
                                win.for_valid(oy, ox, |i| dst[i] += g);
                            }
                        }
                    }
                }
            }
            mask(plane, dst);
        });
        dx
    }

    pub(super) fn resize_impl(&self, x: &[f32], xs: [usize; 4], p: &ResizeParams) -> Vec<f32> {
        let [n, c, h, w] = xs;
        let [oh, ow] = p.out_hw;
        let (rows, cols) = resize_taps_f32(h, w, p);
        let mut y = self.out_dirty(n * c * oh * ow);
        let taps = rows.iter().map(Vec::len).max().unwrap_or(0)
            * cols.iter().map(Vec::len).max().unwrap_or(0);
        let work = y.len() * taps;
        self.blocks(&mut y, oh * ow, work, |pl, dst| {
            let plane = &x[pl * h * w..(pl + 1) * h * w];
            for (oy, rt) in rows.iter().enumerate() {
                for (ox, ct) in cols.iter().enumerate() {
                    let mut s = 0.0f32;
                    for &(iy, wy) in rt {
                        let row = &plane[iy * w..(iy + 1) * w];
                        let mut r = 0.0f32;
                        for &(ix, wx) in ct {
                            r += wx * row[ix];
                        }
                        s += wy * r;
                    }
                    dst[oy * ow + ox] = s;
                }
            }
        });
        y
    }

    pub(super) fn resize_backward_impl(
        &self,
        dy: &[f32],
        xs: [usize; 4],
        p: &ResizeParams,
    ) -> Vec<f32> {
        let [n, c, h, w] = xs;
        let [oh, ow] = p.out_hw;
        let (rows, cols) = resize_taps_f32(h, w, p);
        let mut dx = self.out_zeroed(n * c * h * w);
        let taps = rows.iter().map(Vec::len).max().unwrap_or(0)
            * cols.iter().map(Vec::len).max().unwrap_or(0);
        self.blocks(&mut dx, h * w, n * c * oh * ow * taps, |pl, dst| {
            let dyp = &dy[pl * oh * ow..(pl + 1) * oh * ow];
            for (oy, rt) in rows.iter().enumerate() {
                for (ox, ct) in cols.iter().enumerate() {
                    let d = dyp[oy * ow + ox];
                    for &(iy, wy) in rt {
                        for &(ix, wx) in ct {
                            dst[iy * w + ix] += wy * wx * d;
                        }
                    }
                }
            }
        });
        dx
    }
}

/// Strides of `shape` read as broadcast into `to` (right-aligned; broadcast axes get stride 0).
fn broadcast_strides(shape: &[usize], to: &[usize]) -> Vec<usize> {
    let st = strides(shape);
    let off = to.len() - shape.len();
    (0..to.len())
        .map(|d| {
            if d < off || shape[d - off] == 1 {
                0
            } else {
                st[d - off]
            }
        })
        .collect()
}

fn split_axis(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    assert!(axis < shape.len(), "axis {axis} out of range for {shape:?}");
    (
        shape[..axis].iter().product(),
        shape[axis],
        shape[axis + 1..].iter().product(),
    )
}

fn resize_taps_f32(
    h: usize,
    w: usize,
    p: &ResizeParams,
) -> (Vec<Vec<(usize, f32)>>, Vec<Vec<(usize, f32)>>) {
    let axis = |n_in: usize, n_out: usize| -> Vec<Vec<(usize, f32)>> {
        (0..n_out)
            .map(|o| {
                resize_taps(o, n_in, n_out, p.mode, p.coord)
                    .into_iter()
                    .filter(|&(_, wt)| wt != 0.0)
                    .map(|(i, wt)| (i, wt as f32))
                    .collect()
            })
            .collect()
    };
    (axis(h, p.out_hw[0]), axis(w, p.out_hw[1]))
}

/// One output position's taps along one axis: the valid input indices are
/// `first, first + dilation, ...` (`count` of them, contiguous in tap order because the input
/// index grows with the tap), and `counted` taps fall inside the padded extent.
#[derive(Clone, Copy)]
struct AxisWindow {
    first: usize,
    count: usize,
    counted: usize,
}

/// Per-axis pooling taps, computed once per op (see [`pool_axis_taps`] for the semantics).
struct PoolWindows {
    w: usize,
    dil: [usize; 2],
    rows: Vec<AxisWindow>,
    cols: Vec<AxisWindow>,
}

/// Test-only switch back to the scalar loop for 3-wide, stride-2 max pooling windows, for
/// timing A/B runs.
#[cfg(test)]
pub(super) static SCALAR_FOLD: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

impl PoolWindows {
    fn new(h: usize, w: usize, p: &Pool2dParams) -> PoolWindows {
        let axis = |n_out: usize, k: usize, s: usize, d: usize, p0: usize, p1: usize, n: usize| {
            (0..n_out)
                .map(|o| {
                    let taps = pool_axis_taps(o, k, s, d, p0, p1, n);
                    let mut valid = taps.iter().filter_map(|t| t.0);
                    let first = valid.next();
                    AxisWindow {
                        first: first.unwrap_or(0),
                        count: first.map_or(0, |_| 1 + valid.count()),
                        counted: taps.iter().filter(|t| t.1).count(),
                    }
                })
                .collect()
        };
        PoolWindows {
            w,
            dil: p.dilation,
            rows: axis(
                p.out_hw[0],
                p.kernel[0],
                p.stride[0],
                p.dilation[0],
                p.pad[0],
                p.pad[2],
                h,
            ),
            cols: axis(
                p.out_hw[1],
                p.kernel[1],
                p.stride[1],
                p.dilation[1],
                p.pad[1],
                p.pad[3],
                w,
            ),
        }
    }

    fn divisor(&self, oy: usize, ox: usize, count_include_pad: bool) -> usize {
        if count_include_pad {
            self.rows[oy].counted * self.cols[ox].counted
        } else {
            self.rows[oy].count * self.cols[ox].count
        }
    }

    /// Calls `f(flat plane index)` for each valid tap, row-major.
    #[inline]
    fn for_valid(&self, oy: usize, ox: usize, mut f: impl FnMut(usize)) {
        let (r, c) = (self.rows[oy], self.cols[ox]);
        for ty in 0..r.count {
            let base = (r.first + ty * self.dil[0]) * self.w + c.first;
            for tx in 0..c.count {
                f(base + tx * self.dil[1]);
            }
        }
    }

    /// Whether every window has all its taps inside the input (no padding reached, no
    /// dilation).
    fn all_full(&self, p: &Pool2dParams) -> bool {
        self.dil == [1, 1]
            && self.rows.iter().all(|r| r.count == p.kernel[0])
            && self.cols.iter().all(|c| c.count == p.kernel[1])
    }

    /// Every window is the 2x2 block at (2 * oy, 2 * ox) (given [`PoolWindows::all_full`]).
    fn kernel_2x2_stride_2(&self, kernel: [usize; 2]) -> bool {
        kernel == [2, 2]
            && self.rows.iter().enumerate().all(|(o, r)| r.first == 2 * o)
            && self.cols.iter().enumerate().all(|(o, c)| c.first == 2 * o)
    }

    fn is_2x2_stride_2(&self, p: &Pool2dParams) -> bool {
        self.kernel_2x2_stride_2(p.kernel)
    }

    /// Max pooling of one plane without dilation: tap by tap over the output columns whose
    /// windows are full (branch-free selects the compiler can keep in registers) instead of
    /// window by window; the columns cut by padding (a few at each end: ResNet's 3x3 / stride 2
    /// / pad 1 pooling) window by window. Same result as [`PoolWindows::argmax`]: each output
    /// sees its valid taps in row-major order and keeps the first strictly greater value.
    fn max_rows(&self, plane: &[f32], p: &Pool2dParams, dst: &mut [f32]) {
        let kernel = p.kernel;
        let ow = self.cols.len();
        // The ubiquitous 2x2 / stride 2 case: fixed-size pairs, no index arithmetic.
        if self.all_full(p) && self.kernel_2x2_stride_2(kernel) {
            super::maxpool2::forward_plane(plane, self.w, dst, ow);
            return;
        }
        // The full columns: one range (windows move one way along the axis).
        let full = |c: &AxisWindow| c.count == kernel[1];
        let c0 = self.cols.iter().position(full).unwrap_or(ow);
        let c1 = self.cols.iter().rposition(full).map_or(c0, |i| i + 1);
        let (c0, c1) = if self.cols[c0..c1].iter().all(full) {
            (c0, c1)
        } else {
            (0, 0)
        };
        let cols = &self.cols[c0..c1];
        // 3-wide windows two apart (ResNet's 3x3 / stride 2): a vector row fold.
        let s2 = kernel[1] == 3
            && self.dil[1] == 1
            && cols.windows(2).all(|w| w[1].first == w[0].first + 2);
        #[cfg(test)]
        let s2 = s2 && !SCALAR_FOLD.load(std::sync::atomic::Ordering::Relaxed);
        for (oy, r) in self.rows.iter().enumerate() {
            let out = &mut dst[oy * ow..(oy + 1) * ow];
            for ox in (0..c0).chain(c1..ow) {
                out[ox] = self.argmax(plane, oy, ox).map_or(0.0, |i| plane[i]);
            }
            if r.count == 0 {
                // An empty window row (all padding): argmax's 0 for every column.
                out[c0..c1].fill(0.0);
                continue;
            }
            let out = &mut out[c0..c1];
            for ty in 0..r.count {
                let row = &plane[(r.first + ty) * self.w..(r.first + ty + 1) * self.w];
                if s2 && let Some(c) = cols.first() {
                    super::maxpool2::fold_row3s2(&row[c.first..], out, ty == 0);
                    continue;
                }
                for tx in 0..kernel[1] {
                    if ty == 0 && tx == 0 {
                        for (o, c) in out.iter_mut().zip(cols) {
                            *o = row[c.first];
                        }
                    } else {
                        for (o, c) in out.iter_mut().zip(cols) {
                            let v = row[c.first + tx];
                            *o = if v > *o { v } else { *o };
                        }
                    }
                }
            }
        }
    }

    /// First maximal valid element (row-major scan, strict `>`), None for an empty window.
    #[inline]
    fn argmax(&self, plane: &[f32], oy: usize, ox: usize) -> Option<usize> {
        let (r, c) = (self.rows[oy], self.cols[ox]);
        if r.count == 0 || c.count == 0 {
            return None;
        }
        let mut best = r.first * self.w + c.first;
        let mut bv = plane[best];
        self.for_valid(oy, ox, |i| {
            let v = plane[i];
            if v > bv {
                bv = v;
                best = i;
            }
        });
        Some(best)
    }
}

// ---- data movement (single pass, no parallelism needed) ----------------------------------------

pub(super) fn concat(parts: &[(&[f32], &[usize])], axis: usize) -> (Vec<f32>, Vec<usize>) {
    assert!(!parts.is_empty(), "concat of nothing");
    let first = parts[0].1;
    assert!(
        axis < first.len(),
        "concat axis {axis} out of range for {first:?}"
    );
    for (_, s) in parts {
        assert!(
            s.len() == first.len()
                && s.iter()
                    .zip(first)
                    .enumerate()
                    .all(|(d, (a, b))| d == axis || a == b),
            "concat shapes {s:?} vs {first:?} on axis {axis}"
        );
    }
    let outer: usize = first[..axis].iter().product();
    let inner: usize = first[axis + 1..].iter().product();
    let mut shape = first.to_vec();
    shape[axis] = parts.iter().map(|(_, s)| s[axis]).sum();
    let mut out = Vec::with_capacity(shape.iter().product());
    for o in 0..outer {
        for (data, s) in parts {
            let blk = s[axis] * inner;
            out.extend_from_slice(&data[o * blk..(o + 1) * blk]);
        }
    }
    (out, shape)
}

/// Per-axis source maps for pad (None = constant fill).
fn pad_maps(
    x_shape: &[usize],
    pads: &[(usize, usize)],
    mode: PadMode,
) -> (Vec<usize>, Vec<Vec<Option<usize>>>) {
    assert_eq!(
        pads.len(),
        x_shape.len(),
        "one (before, after) pad per axis"
    );
    let out_shape: Vec<usize> = x_shape
        .iter()
        .zip(pads)
        .map(|(&n, &(b, a))| n + b + a)
        .collect();
    let maps = (0..x_shape.len())
        .map(|d| {
            if mode != PadMode::Constant && x_shape[d] == 0 && out_shape[d] > 0 {
                panic!("{mode:?} pad of an empty axis {d}");
            }
            (0..out_shape[d])
                .map(|o| pad_source(o, pads[d].0, x_shape[d], mode))
                .collect()
        })
        .collect();
    (out_shape, maps)
}

/// Visits every output element of a pad with its source (flat input index or None).
fn for_each_pad(
    x_shape: &[usize],
    out_shape: &[usize],
    maps: &[Vec<Option<usize>>],
    mut f: impl FnMut(usize, Option<usize>),
) {
    let len: usize = out_shape.iter().product();
    if len == 0 {
        return;
    }
    let xst = strides(x_shape);
    let r = out_shape.len();
    if r == 0 {
        f(0, Some(0));
        return;
    }
    let last = out_shape[r - 1];
    for row in 0..len / last {
        let mut rem = row;
        let mut base = Some(0usize);
        for d in (0..r - 1).rev() {
            let i = rem % out_shape[d];
            rem /= out_shape[d];
            base = match (base, maps[d][i]) {
                (Some(b), Some(s)) => Some(b + s * xst[d]),
                _ => None,
            };
        }
        for j in 0..last {
            let src = match (base, maps[r - 1][j]) {
                (Some(b), Some(s)) => Some(b + s),
                _ => None,
            };
            f(row * last + j, src);
        }
    }
}

pub(super) fn pad(
    x: &[f32],
    xs: &[usize],
    pads: &[(usize, usize)],
    mode: PadMode,
    value: f32,
) -> (Vec<f32>, Vec<usize>) {
    let (out_shape, maps) = pad_maps(xs, pads, mode);
    let mut out = vec![0.0f32; out_shape.iter().product()];
    for_each_pad(xs, &out_shape, &maps, |o, s| {
        out[o] = s.map_or(value, |s| x[s])
    });
    (out, out_shape)
}

pub(super) fn pad_backward(
    dy: &[f32],
    dys: &[usize],
    xs: &[usize],
    pads: &[(usize, usize)],
    mode: PadMode,
) -> Vec<f32> {
    let (out_shape, maps) = pad_maps(xs, pads, mode);
    assert_eq!(dys, out_shape, "pad_backward dy shape");
    let mut dx = vec![0.0f32; xs.iter().product()];
    for_each_pad(xs, &out_shape, &maps, |o, s| {
        if let Some(s) = s {
            dx[s] += dy[o];
        }
    });
    dx
}

// ---- elementwise -------------------------------------------------------------------------------

pub(super) fn sign_f32(v: f32) -> f32 {
    if v > 0.0 {
        1.0
    } else if v < 0.0 {
        -1.0
    } else {
        0.0
    }
}

#[inline(always)]
pub(super) fn unary_f32(op: Unary, v: f32) -> f32 {
    match op {
        Unary::Relu => v.max(0.0),
        Unary::LeakyRelu { alpha } => {
            if v > 0.0 {
                v
            } else {
                alpha * v
            }
        }
        Unary::Sigmoid => {
            // Split by sign so exp never overflows.
            if v >= 0.0 {
                1.0 / (1.0 + (-v).exp())
            } else {
                let e = v.exp();
                e / (1.0 + e)
            }
        }
        Unary::Tanh => v.tanh(),
        Unary::Clip { min, max } => v.max(min).min(max),
        Unary::Neg => -v,
        Unary::Exp => v.exp(),
        Unary::Log => v.ln(),
        Unary::Sqrt => v.sqrt(),
        Unary::Abs => v.abs(),
        Unary::Affine { a, b } => a * v + b,
        Unary::Powf { p } => v.powf(p),
        Unary::Sign => sign_f32(v),
    }
}

/// Same rules as [`crate::runtime::reference::unary_derivative`].
#[inline(always)]
pub(super) fn unary_derivative_f32(op: Unary, x: f32, y: f32) -> f32 {
    match op {
        Unary::Relu => {
            if x > 0.0 {
                1.0
            } else {
                0.0
            }
        }
        Unary::LeakyRelu { alpha } => {
            if x > 0.0 {
                1.0
            } else {
                alpha
            }
        }
        Unary::Sigmoid => y * (1.0 - y),
        Unary::Tanh => 1.0 - y * y,
        Unary::Clip { min, max } => {
            if x >= min && x <= max {
                1.0
            } else {
                0.0
            }
        }
        Unary::Neg => -1.0,
        Unary::Exp => y,
        Unary::Log => 1.0 / x,
        Unary::Sqrt => 0.5 / y,
        Unary::Abs => sign_f32(x),
        Unary::Affine { a, .. } => a,
        Unary::Powf { p } => p * x.powf(p - 1.0),
        Unary::Sign => 0.0,
    }
}

#[inline(always)]
pub(super) fn binary_f32(op: Binary, a: f32, b: f32) -> f32 {
    match op {
        Binary::Add => a + b,
        Binary::Sub => a - b,
        Binary::Mul => a * b,
        Binary::Div => a / b,
        Binary::Max => a.max(b),
        Binary::Min => a.min(b),
    }
}

// ---- losses and perturbation (per sample, small) -----------------------------------------------

#[derive(Clone, Copy)]
pub(super) enum Targets<'a> {
    Classes(&'a [u32]),
    Dense(&'a [f32]),
}

fn first_argmax_except(z: &[f32], skip: usize) -> usize {
    let mut best = usize::MAX;
    for (i, &v) in z.iter().enumerate() {
        if i != skip && (best == usize::MAX || v > z[best]) {
            best = i;
        }
    }
    best
}

/// Semantics as [`crate::runtime::reference::loss`]; accumulated in f64.
pub(super) fn loss(kind: Loss, z: &[f32], shape: &[usize], t: Targets<'_>) -> (Vec<f32>, Vec<f32>) {
    let n = shape[0];
    let per = z.len().checked_div(n).unwrap_or(0);
    let mut l = vec![0.0f32; n];
    let mut g = vec![0.0f32; z.len()];
    let class = |s: usize| -> usize {
        match t {
            Targets::Classes(c) => {
                assert_eq!(c.len(), n, "one class per sample");
                let k = c[s] as usize;
                assert!(k < per, "class {k} out of range for {per} logits");
                k
            }
            Targets::Dense(_) => panic!("{kind:?} needs class targets"),
        }
    };
    for s in 0..n {
        let zs = &z[s * per..(s + 1) * per];
        let gs = &mut g[s * per..(s + 1) * per];
        match kind {
            Loss::CrossEntropy => {
                let t = class(s);
                let mx = zs.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
                let lse = mx + zs.iter().map(|&v| (v as f64 - mx).exp()).sum::<f64>().ln();
                l[s] = (lse - zs[t] as f64) as f32;
                for (k, gv) in gs.iter_mut().enumerate() {
                    *gv = ((zs[k] as f64 - lse).exp() - if k == t { 1.0 } else { 0.0 }) as f32;
                }
            }
            Loss::CwMargin { kappa } => {
                let t = class(s);
                let j = first_argmax_except(zs, t);
                let margin = zs[t] - zs[j];
                if margin > -kappa {
                    l[s] = margin;
                    gs[t] = 1.0;
                    gs[j] = -1.0;
                } else {
                    l[s] = -kappa;
                }
            }
            Loss::Dlr => {
                let t = class(s);
                assert!(per >= 3, "DLR needs at least 3 classes");
                let j = first_argmax_except(zs, t);
                let mut order: Vec<usize> = (0..per).collect();
                order.sort_by(|&a, &b| zs[b].total_cmp(&zs[a]).then(a.cmp(&b)));
                let (p1, p3) = (order[0], order[2]);
                let num = zs[t] as f64 - zs[j] as f64;
                let den = zs[p1] as f64 - zs[p3] as f64 + 1e-12;
                l[s] = (-num / den) as f32;
                let mut acc = vec![0.0f64; per];
                acc[t] -= 1.0 / den;
                acc[j] += 1.0 / den;
                acc[p1] += num / (den * den);
                acc[p3] -= num / (den * den);
                for (gv, a) in gs.iter_mut().zip(acc) {
                    *gv = a as f32;
                }
            }
            Loss::Mse => {
                let Targets::Dense(tt) = t else {
                    panic!("MSE needs a dense target")
                };
                let ts = &tt[s * per..(s + 1) * per];
                let sum: f64 = zs
                    .iter()
                    .zip(ts)
                    .map(|(&a, &b)| ((a - b) as f64).powi(2))
                    .sum();
                l[s] = (sum / per as f64) as f32;
                for k in 0..per {
                    gs[k] = (2.0 * (zs[k] as f64 - ts[k] as f64) / per as f64) as f32;
                }
            }
        }
    }
    (l, g)
}

fn per_sample(shape: &[usize], len: usize) -> (usize, usize) {
    let n = shape.first().copied().unwrap_or(1);
    (n, len.checked_div(n).unwrap_or(0))
}

fn norm_f64(v: impl Iterator<Item = f64>, norm: Norm) -> f64 {
    match norm {
        Norm::L1 => v.map(f64::abs).sum(),
        Norm::L2 => v.map(|a| a * a).sum::<f64>().sqrt(),
        Norm::Linf => v.fold(0.0, |m, a| m.max(a.abs())),
    }
}

pub(super) fn l2_step(x: &[f32], g: &[f32], shape: &[usize], alpha: f32) -> Vec<f32> {
    let (n, per) = per_sample(shape, x.len());
    let mut out = x.to_vec();
    for s in 0..n {
        let gs = &g[s * per..(s + 1) * per];
        let nrm = norm_f64(gs.iter().map(|&v| v as f64), Norm::L2);
        if nrm > 0.0 {
            let k = alpha as f64 / nrm;
            for (o, &gv) in out[s * per..(s + 1) * per].iter_mut().zip(gs) {
                *o = (*o as f64 + k * gv as f64) as f32;
            }
        }
    }
    out
}

pub(super) fn project(x: &[f32], x0: &[f32], shape: &[usize], eps: f32, norm: Norm) -> Vec<f32> {
    let (n, per) = per_sample(shape, x.len());
    let mut out = x.to_vec();
    for s in 0..n {
        let r = s * per..(s + 1) * per;
        match norm {
            Norm::Linf => {
                for i in r {
                    out[i] = x[i].max(x0[i] - eps).min(x0[i] + eps);
                }
            }
            Norm::L2 => {
                let nrm = norm_f64(r.clone().map(|i| x[i] as f64 - x0[i] as f64), Norm::L2);
                if nrm > eps as f64 {
                    let k = eps as f64 / nrm;
                    for i in r {
                        out[i] = (x0[i] as f64 + (x[i] as f64 - x0[i] as f64) * k) as f32;
                    }
                }
            }
            Norm::L1 => panic!("L1 projection is not supported"),
        }
    }
    out
}

pub(super) fn clamp_per_sample(x: &[f32], shape: &[usize], lo: &[f32], hi: &[f32]) -> Vec<f32> {
    let (n, per) = per_sample(shape, x.len());
    assert!(
        lo.len() == n && hi.len() == n,
        "clamp_per_sample needs one bound per sample"
    );
    let mut out = x.to_vec();
    for s in 0..n {
        for v in &mut out[s * per..(s + 1) * per] {
            *v = v.max(lo[s]).min(hi[s]);
        }
    }
    out
}

pub(super) fn norm_per_sample(x: &[f32], shape: &[usize], norm: Norm) -> Vec<f32> {
    let (n, per) = per_sample(shape, x.len());
    (0..n)
        .map(|s| norm_f64(x[s * per..(s + 1) * per].iter().map(|&v| v as f64), norm) as f32)
        .collect()
}
