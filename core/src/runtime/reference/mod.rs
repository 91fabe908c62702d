//! Float64, naive, obviously-correct implementations of every [`Backend`] primitive.
//!
//! This is the yardstick the fast backends are tested against: the CPU backend and the WGSL
//! kernels must agree with it to a relative tolerance (see [`assert_close`]), and its own backward
//! functions are checked against central finite differences of its forwards. It is written for
//! readability, not speed: plain nested loops over output (forward) or input (adjoint) elements,
//! no blocking, no clever index arithmetic. Keep test tensors small.
//!
//! Every function is named like the trait method it mirrors and takes [`RefTensor`] where the
//! trait takes `&Tensor<B>`, with the same parameter types otherwise. Like the backends, these
//! panic on shape mismatches (a caller bug, never user input).
//!
//! [`Backend`]: crate::runtime::backend::Backend

use crate::runtime::backend::Binary;
use crate::runtime::backend::{
    Conv2dParams, CoordTransform, Loss, NearestMode, Norm, PadMode, Pool2dParams, PoolKind,
    ReduceOp, ResizeMode, ResizeParams, Unary, counter_normal, counter_uniform,
};

#[cfg(test)]
mod tests;

/// A dense row-major float64 tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct RefTensor {
    pub data: Vec<f64>,
    pub shape: Vec<usize>,
}

/// What a reference loss compares against (mirrors [`crate::runtime::backend::LossTargets`]).
#[derive(Clone, Copy, Debug)]
pub enum RefLossTargets<'a> {
    Classes(&'a [u32]),
    Dense(&'a RefTensor),
}

impl RefTensor {
    pub fn new(data: Vec<f64>, shape: &[usize]) -> Self {
        assert_eq!(
            data.len(),
            numel(shape),
            "data length does not match shape {shape:?}"
        );
        RefTensor {
            data,
            shape: shape.to_vec(),
        }
    }

    pub fn zeros(shape: &[usize]) -> Self {
        RefTensor {
            data: vec![0.0; numel(shape)],
            shape: shape.to_vec(),
        }
    }

    pub fn from_f32(data: &[f32], shape: &[usize]) -> Self {
        RefTensor::new(data.iter().map(|&v| v as f64).collect(), shape)
    }

    pub fn to_f32(&self) -> Vec<f32> {
        self.data.iter().map(|&v| v as f32).collect()
    }

    /// Uniform values in [-1, 1) from the counter-based generator. Every value is exactly
    /// representable in f32, so `from_f32(&t.to_f32(), ..)` round-trips bit-exactly and a fast
    /// backend fed `to_f32()` sees precisely the reference's inputs.
    pub fn random(shape: &[usize], seed: u64) -> Self {
        let data = (0..numel(shape))
            .map(|i| 2.0 * counter_uniform(seed, i as u32) as f64 - 1.0)
            .collect();
        RefTensor {
            data,
            shape: shape.to_vec(),
        }
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn reshape(&self, shape: &[usize]) -> Self {
        RefTensor::new(self.data.clone(), shape)
    }

    fn at(&self, idx: &[usize]) -> f64 {
        self.data[flat(&self.shape, idx)]
    }
}

/// Compares a fast backend's f32 output against the reference and panics with the worst element
/// when they disagree.
///
/// Relative error of element i is `|got_i - want_i| / max(|want_i|, floor)` with
/// `floor = max(1e-2 * max_j |want_j|, 1e-7)`. The floor exists because f32 sums of many terms
/// carry an absolute error proportional to the magnitude of the terms, not of the (possibly
/// cancelled, near-zero) result; measuring near-zero entries against 1% of the tensor's scale
/// keeps the check meaningful (a wrong index or weight produces O(1) errors) without flagging
/// rounding noise. NaN or infinity where the reference is finite always fails.
pub fn assert_close(got: &[f32], want: &RefTensor, rel: f64, what: &str) {
    assert_eq!(
        got.len(),
        want.data.len(),
        "{what}: got {} elements, want {} (shape {:?})",
        got.len(),
        want.data.len(),
        want.shape
    );
    let max_abs = want.data.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let floor = (1e-2 * max_abs).max(1e-7);
    let mut worst = (0.0f64, 0usize);
    for (i, (&g, &w)) in got.iter().zip(&want.data).enumerate() {
        let g = g as f64;
        let err = if w.is_finite() {
            if !g.is_finite() {
                f64::INFINITY
            } else {
                (g - w).abs() / w.abs().max(floor)
            }
        } else if g == w || (g.is_nan() && w.is_nan()) {
            0.0
        } else {
            f64::INFINITY
        };
        if err > worst.0 {
            worst = (err, i);
        }
    }
    if worst.0 > rel {
        let i = worst.1;
        panic!(
            "{what}: relative error {:.3e} > {rel:.1e} at flat index {i} of shape {:?} \
             (got {}, want {}, max|want| {max_abs:.4e})",
            worst.0, want.shape, got[i], want.data[i]
        );
    }
}

// ---- shape helpers (pub: the CPU backend and tests share the exact same geometry rules) -------

pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// Row-major strides.
pub fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

fn flat(shape: &[usize], idx: &[usize]) -> usize {
    debug_assert_eq!(shape.len(), idx.len());
    idx.iter().zip(strides(shape)).map(|(i, s)| i * s).sum()
}

fn unravel(shape: &[usize], mut i: usize) -> Vec<usize> {
    let mut idx = vec![0; shape.len()];
    for d in (0..shape.len()).rev() {
        idx[d] = i % shape[d];
        i /= shape[d];
    }
    idx
}

/// NumPy broadcast of two shapes (right-aligned; each pair equal or one of them 1).
pub fn broadcast_shape(a: &[usize], b: &[usize]) -> Vec<usize> {
    let r = a.len().max(b.len());
    (0..r)
        .map(|i| {
            let da = if i + a.len() >= r {
                a[i + a.len() - r]
            } else {
                1
            };
            let db = if i + b.len() >= r {
                b[i + b.len() - r]
            } else {
                1
            };
            assert!(
                da == db || da == 1 || db == 1,
                "shapes {a:?} and {b:?} do not broadcast"
            );
            da.max(db)
        })
        .collect()
}

/// Index into a tensor of `shape` that is broadcast to an output with multi-index `out_idx`.
fn broadcast_src(shape: &[usize], out_idx: &[usize]) -> usize {
    let off = out_idx.len() - shape.len();
    let idx: Vec<usize> = shape
        .iter()
        .enumerate()
        .map(|(d, &n)| if n == 1 { 0 } else { out_idx[d + off] })
        .collect();
    flat(shape, &idx)
}

fn dims4(t: &RefTensor, what: &str) -> [usize; 4] {
    assert_eq!(t.shape.len(), 4, "{what} must be 4-D, got {:?}", t.shape);
    [t.shape[0], t.shape[1], t.shape[2], t.shape[3]]
}

/// Output size of one spatial axis of a convolution (ONNX `Conv`, explicit pads, floor).
pub fn conv_out_len(
    input: usize,
    k: usize,
    stride: usize,
    pad0: usize,
    pad1: usize,
    dil: usize,
) -> usize {
    let span = dil * (k - 1) + 1;
    let padded = input + pad0 + pad1;
    assert!(
        padded >= span,
        "kernel span {span} exceeds padded input {padded}"
    );
    (padded - span) / stride + 1
}

/// Output `[oh, ow]` of [`conv2d`] for an input of `h x w` and a `kh x kw` kernel.
pub fn conv2d_out_hw(h: usize, w: usize, kh: usize, kw: usize, p: &Conv2dParams) -> [usize; 2] {
    [
        conv_out_len(h, kh, p.stride[0], p.pad[0], p.pad[2], p.dilation[0]),
        conv_out_len(w, kw, p.stride[1], p.pad[1], p.pad[3], p.dilation[1]),
    ]
}

// ---- data movement ---------------------------------------------------------------------------

pub fn upload(data: &[f32], shape: &[usize]) -> RefTensor {
    RefTensor::from_f32(data, shape)
}

pub fn download(t: &RefTensor) -> Vec<f32> {
    t.to_f32()
}

pub fn zeros(shape: &[usize]) -> RefTensor {
    RefTensor::zeros(shape)
}

pub fn fill(shape: &[usize], value: f32) -> RefTensor {
    RefTensor {
        data: vec![value as f64; numel(shape)],
        shape: shape.to_vec(),
    }
}

pub fn transpose(x: &RefTensor, perm: &[usize]) -> RefTensor {
    assert_eq!(perm.len(), x.shape.len(), "perm rank");
    let out_shape: Vec<usize> = perm.iter().map(|&p| x.shape[p]).collect();
    let mut out = RefTensor::zeros(&out_shape);
    for o in 0..out.len() {
        let oi = unravel(&out_shape, o);
        let mut xi = vec![0; perm.len()];
        for (d, &p) in perm.iter().enumerate() {
            xi[p] = oi[d];
        }
        out.data[o] = x.at(&xi);
    }
    out
}

pub fn concat(xs: &[&RefTensor], axis: usize) -> RefTensor {
    assert!(!xs.is_empty(), "concat of nothing");
    let mut out_shape = xs[0].shape.clone();
    out_shape[axis] = xs.iter().map(|t| t.shape[axis]).sum();
    let mut out = RefTensor::zeros(&out_shape);
    for o in 0..out.len() {
        let mut oi = unravel(&out_shape, o);
        let mut k = 0;
        while oi[axis] >= xs[k].shape[axis] {
            oi[axis] -= xs[k].shape[axis];
            k += 1;
        }
        out.data[o] = xs[k].at(&oi);
    }
    out
}

pub fn slice(x: &RefTensor, axis: usize, start: usize, end: usize) -> RefTensor {
    assert!(
        start <= end && end <= x.shape[axis],
        "slice {start}..{end} of axis {axis} of {:?}",
        x.shape
    );
    let mut out_shape = x.shape.clone();
    out_shape[axis] = end - start;
    let mut out = RefTensor::zeros(&out_shape);
    for o in 0..out.len() {
        let mut oi = unravel(&out_shape, o);
        oi[axis] += start;
        out.data[o] = x.at(&oi);
    }
    out
}

/// Source index along one axis for output position `o` (None = constant padding).
///
/// Reflect is NumPy/ONNX `reflect` (the edge is not repeated: [a b c] -> b [a b c] b); pads larger
/// than `n - 1` keep reflecting back and forth, and a length-1 axis reflects onto itself. Edge
/// repeats the border value.
pub fn pad_source(o: usize, before: usize, n: usize, mode: PadMode) -> Option<usize> {
    let i = o as isize - before as isize;
    if i >= 0 && (i as usize) < n {
        return Some(i as usize);
    }
    match mode {
        PadMode::Constant => None,
        PadMode::Edge => Some(if i < 0 { 0 } else { n - 1 }),
        PadMode::Reflect => {
            if n == 1 {
                return Some(0);
            }
            let period = 2 * (n as isize - 1);
            let mut r = i.rem_euclid(period);
            if r >= n as isize {
                r = period - r;
            }
            Some(r as usize)
        }
    }
}

fn pad_out_shape(x_shape: &[usize], pads: &[(usize, usize)]) -> Vec<usize> {
    assert_eq!(
        pads.len(),
        x_shape.len(),
        "one (before, after) pad per axis"
    );
    x_shape
        .iter()
        .zip(pads)
        .map(|(&n, &(b, a))| n + b + a)
        .collect()
}

/// Maps an output element of a pad to its input element (None = constant fill).
fn pad_map(
    x_shape: &[usize],
    pads: &[(usize, usize)],
    mode: PadMode,
    oi: &[usize],
) -> Option<usize> {
    let mut xi = vec![0; x_shape.len()];
    for d in 0..x_shape.len() {
        xi[d] = pad_source(oi[d], pads[d].0, x_shape[d], mode)?;
    }
    Some(flat(x_shape, &xi))
}

pub fn pad(x: &RefTensor, pads: &[(usize, usize)], mode: PadMode, value: f32) -> RefTensor {
    let out_shape = pad_out_shape(&x.shape, pads);
    let mut out = RefTensor::zeros(&out_shape);
    for o in 0..out.len() {
        let oi = unravel(&out_shape, o);
        out.data[o] = match pad_map(&x.shape, pads, mode, &oi) {
            Some(s) => x.data[s],
            None => value as f64,
        };
    }
    out
}

pub fn pad_backward(
    dy: &RefTensor,
    x_shape: &[usize],
    pads: &[(usize, usize)],
    mode: PadMode,
) -> RefTensor {
    assert_eq!(
        dy.shape,
        pad_out_shape(x_shape, pads),
        "pad_backward dy shape"
    );
    let mut dx = RefTensor::zeros(x_shape);
    for o in 0..dy.len() {
        let oi = unravel(&dy.shape, o);
        if let Some(s) = pad_map(x_shape, pads, mode, &oi) {
            dx.data[s] += dy.data[o];
        }
    }
    dx
}

pub fn broadcast_to(x: &RefTensor, shape: &[usize]) -> RefTensor {
    assert_eq!(
        broadcast_shape(&x.shape, shape),
        shape,
        "cannot broadcast {:?} to {shape:?}",
        x.shape
    );
    let mut out = RefTensor::zeros(shape);
    for o in 0..out.len() {
        out.data[o] = x.data[broadcast_src(&x.shape, &unravel(shape, o))];
    }
    out
}

// ---- conv family -----------------------------------------------------------------------------

/// Calls `f(x_flat, w_flat, y_flat)` for every (input, weight, output) triple that a convolution
/// multiplies together; forward and both adjoints are the same loop nest with a different
/// accumulation, which is what makes them obviously consistent.
fn conv_taps(
    x_shape: [usize; 4],
    w_shape: [usize; 4],
    p: &Conv2dParams,
    mut f: impl FnMut(usize, usize, usize),
) -> [usize; 4] {
    let [n, c, h, wd] = x_shape;
    let [m, cg, kh, kw] = w_shape;
    let g = p.groups;
    assert!(
        g >= 1 && c == cg * g && m % g == 0,
        "conv channels: x C={c}, w {w_shape:?}, groups {g}"
    );
    let mg = m / g;
    let [oh, ow] = conv2d_out_hw(h, wd, kh, kw, p);
    for ni in 0..n {
        for mi in 0..m {
            let gi = mi / mg;
            for oy in 0..oh {
                for ox in 0..ow {
                    let yf = ((ni * m + mi) * oh + oy) * ow + ox;
                    for ci in 0..cg {
                        for ky in 0..kh {
                            let iy = (oy * p.stride[0] + ky * p.dilation[0]) as isize
                                - p.pad[0] as isize;
                            if iy < 0 || iy >= h as isize {
                                continue;
                            }
                            for kx in 0..kw {
                                let ix = (ox * p.stride[1] + kx * p.dilation[1]) as isize
                                    - p.pad[1] as isize;
                                if ix < 0 || ix >= wd as isize {
                                    continue;
                                }
                                let xf =
                                    ((ni * c + gi * cg + ci) * h + iy as usize) * wd + ix as usize;
                                let wf = ((mi * cg + ci) * kh + ky) * kw + kx;
                                f(xf, wf, yf);
                            }
                        }
                    }
                }
            }
        }
    }
    [n, m, oh, ow]
}

pub fn conv2d(
    x: &RefTensor,
    w: &RefTensor,
    bias: Option<&RefTensor>,
    p: &Conv2dParams,
) -> RefTensor {
    let xs = dims4(x, "conv2d x");
    let ws = dims4(w, "conv2d w");
    let [_, m, kh, kw] = [xs[0], ws[0], ws[2], ws[3]];
    let [oh, ow] = conv2d_out_hw(xs[2], xs[3], kh, kw, p);
    let mut y = RefTensor::zeros(&[xs[0], m, oh, ow]);
    conv_taps(xs, ws, p, |xf, wf, yf| {
        y.data[yf] += x.data[xf] * w.data[wf]
    });
    if let Some(b) = bias {
        assert_eq!(b.shape, [m], "conv2d bias shape");
        for (i, v) in y.data.iter_mut().enumerate() {
            *v += b.data[(i / (oh * ow)) % m];
        }
    }
    y
}

pub fn conv2d_backward_input(
    dy: &RefTensor,
    w: &RefTensor,
    p: &Conv2dParams,
    x_shape: [usize; 4],
) -> RefTensor {
    let ws = dims4(w, "conv2d_backward_input w");
    let mut dx = RefTensor::zeros(&x_shape);
    let ys = conv_taps(x_shape, ws, p, |xf, wf, yf| {
        dx.data[xf] += dy.data[yf] * w.data[wf]
    });
    assert_eq!(dy.shape, ys, "conv2d_backward_input dy shape");
    dx
}

pub fn conv2d_backward_weight(
    dy: &RefTensor,
    x: &RefTensor,
    p: &Conv2dParams,
    w_shape: [usize; 4],
) -> RefTensor {
    let xs = dims4(x, "conv2d_backward_weight x");
    let mut dw = RefTensor::zeros(&w_shape);
    let ys = conv_taps(xs, w_shape, p, |xf, wf, yf| {
        dw.data[wf] += dy.data[yf] * x.data[xf]
    });
    assert_eq!(dy.shape, ys, "conv2d_backward_weight dy shape");
    dw
}

// ---- matmul family ---------------------------------------------------------------------------

/// Output shape of [`matmul`]: broadcast batch axes, then `[M, N]`.
pub fn matmul_out_shape(a: &[usize], b: &[usize], trans_a: bool, trans_b: bool) -> Vec<usize> {
    assert!(
        a.len() >= 2 && b.len() >= 2,
        "matmul operands must be at least 2-D: {a:?} x {b:?}"
    );
    let (m, ka) = if trans_a {
        (a[a.len() - 1], a[a.len() - 2])
    } else {
        (a[a.len() - 2], a[a.len() - 1])
    };
    let (kb, n) = if trans_b {
        (b[b.len() - 1], b[b.len() - 2])
    } else {
        (b[b.len() - 2], b[b.len() - 1])
    };
    assert_eq!(
        ka, kb,
        "matmul inner dims: {a:?} x {b:?} (trans {trans_a}, {trans_b})"
    );
    let mut out = broadcast_shape(&a[..a.len() - 2], &b[..b.len() - 2]);
    out.extend([m, n]);
    out
}

pub fn matmul(a: &RefTensor, b: &RefTensor, trans_a: bool, trans_b: bool) -> RefTensor {
    let out_shape = matmul_out_shape(&a.shape, &b.shape, trans_a, trans_b);
    let r = out_shape.len();
    let k = if trans_a {
        a.shape[a.shape.len() - 2]
    } else {
        a.shape[a.shape.len() - 1]
    };
    let mut out = RefTensor::zeros(&out_shape);
    for o in 0..out.len() {
        let oi = unravel(&out_shape, o);
        let (i, j) = (oi[r - 2], oi[r - 1]);
        let mut ai = oi[r - a.shape.len()..].to_vec();
        let mut bi = oi[r - b.shape.len()..].to_vec();
        // Broadcast batch axes of size 1.
        for (d, v) in ai.iter_mut().enumerate().take(a.shape.len() - 2) {
            if a.shape[d] == 1 {
                *v = 0;
            }
        }
        for (d, v) in bi.iter_mut().enumerate().take(b.shape.len() - 2) {
            if b.shape[d] == 1 {
                *v = 0;
            }
        }
        let (ra, rb) = (ai.len(), bi.len());
        let mut s = 0.0;
        for kk in 0..k {
            if trans_a {
                (ai[ra - 2], ai[ra - 1]) = (kk, i)
            } else {
                (ai[ra - 2], ai[ra - 1]) = (i, kk)
            }
            if trans_b {
                (bi[rb - 2], bi[rb - 1]) = (j, kk)
            } else {
                (bi[rb - 2], bi[rb - 1]) = (kk, j)
            }
            s += a.at(&ai) * b.at(&bi);
        }
        out.data[o] = s;
    }
    out
}

// ---- pool family -----------------------------------------------------------------------------

/// The taps of one pooling window along one axis: `(input index or None when outside the input,
/// counts toward count_include_pad)`.
///
/// Semantics (ONNX / PyTorch): tap t of output o sits at `o*stride + t*dilation - pad_begin`.
/// Taps inside the input are "valid". With `count_include_pad`, the divisor counts taps inside
/// the *padded* extent `[-pad_begin, n + pad_end)`; taps beyond it (which only `ceil_mode`'s extra
/// output windows reach) never count. Max ignores non-valid taps; a window with no valid tap
/// outputs 0 and receives no gradient (Avg likewise outputs 0 when its divisor would be 0).
pub fn pool_axis_taps(
    o: usize,
    k: usize,
    stride: usize,
    dil: usize,
    pad_begin: usize,
    pad_end: usize,
    n: usize,
) -> Vec<(Option<usize>, bool)> {
    (0..k)
        .map(|t| {
            let i = (o * stride + t * dil) as isize - pad_begin as isize;
            let valid = i >= 0 && i < n as isize;
            let counted = i >= -(pad_begin as isize) && i < (n + pad_end) as isize;
            (valid.then_some(i as usize), counted)
        })
        .collect()
}

/// For each output element: the list of (input flat index, weight) it reads for Avg, or the index
/// of the first maximal element for Max.
fn pool_windows(x: &RefTensor, p: &Pool2dParams) -> (Vec<usize>, Vec<Vec<(usize, f64)>>) {
    let [n, c, h, w] = dims4(x, "pool2d x");
    let [oh, ow] = p.out_hw;
    let out_shape = vec![n, c, oh, ow];
    let mut windows = Vec::with_capacity(numel(&out_shape));
    for nc in 0..n * c {
        for oy in 0..oh {
            let ty = pool_axis_taps(
                oy,
                p.kernel[0],
                p.stride[0],
                p.dilation[0],
                p.pad[0],
                p.pad[2],
                h,
            );
            for ox in 0..ow {
                let tx = pool_axis_taps(
                    ox,
                    p.kernel[1],
                    p.stride[1],
                    p.dilation[1],
                    p.pad[1],
                    p.pad[3],
                    w,
                );
                let mut valid = Vec::new();
                let mut counted = 0usize;
                for &(iy, cy) in &ty {
                    for &(ix, cx) in &tx {
                        if cy && cx {
                            counted += 1;
                        }
                        if let (Some(iy), Some(ix)) = (iy, ix) {
                            valid.push((nc * h + iy) * w + ix);
                        }
                    }
                }
                let win = match p.kind {
                    PoolKind::Max => {
                        let mut best: Option<usize> = None;
                        for &i in &valid {
                            if best.is_none_or(|b| x.data[i] > x.data[b]) {
                                best = Some(i);
                            }
                        }
                        best.map(|b| vec![(b, 1.0)]).unwrap_or_default()
                    }
                    PoolKind::Avg { count_include_pad } => {
                        let div = if count_include_pad {
                            counted
                        } else {
                            valid.len()
                        };
                        if div == 0 {
                            Vec::new()
                        } else {
                            valid.iter().map(|&i| (i, 1.0 / div as f64)).collect()
                        }
                    }
                };
                windows.push(win);
            }
        }
    }
    (out_shape, windows)
}

pub fn pool2d(x: &RefTensor, p: &Pool2dParams) -> RefTensor {
    let (shape, windows) = pool_windows(x, p);
    let data = windows
        .iter()
        .map(|win| win.iter().map(|&(i, wt)| x.data[i] * wt).sum())
        .collect();
    RefTensor::new(data, &shape)
}

pub fn pool2d_backward(dy: &RefTensor, x: &RefTensor, p: &Pool2dParams) -> RefTensor {
    let (shape, windows) = pool_windows(x, p);
    assert_eq!(dy.shape, shape, "pool2d_backward dy shape");
    let mut dx = RefTensor::zeros(&x.shape);
    for (o, win) in windows.iter().enumerate() {
        for &(i, wt) in win {
            dx.data[i] += dy.data[o] * wt;
        }
    }
    dx
}

// ---- elementwise family ----------------------------------------------------------------------

fn sign(v: f64) -> f64 {
    if v > 0.0 {
        1.0
    } else if v < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// Scalar forward of a unary op (sign(0) = 0, as the backends implement it).
pub fn unary_scalar(op: Unary, v: f64) -> f64 {
    match op {
        Unary::Relu => v.max(0.0),
        Unary::LeakyRelu { alpha } => {
            if v > 0.0 {
                v
            } else {
                alpha as f64 * v
            }
        }
        Unary::Sigmoid => 1.0 / (1.0 + (-v).exp()),
        Unary::Tanh => v.tanh(),
        Unary::Clip { min, max } => v.max(min as f64).min(max as f64),
        Unary::Neg => -v,
        Unary::Exp => v.exp(),
        Unary::Log => v.ln(),
        Unary::Sqrt => v.sqrt(),
        Unary::Abs => v.abs(),
        Unary::Affine { a, b } => a as f64 * v + b as f64,
        Unary::Powf { p } => v.powf(p as f64),
        Unary::Sign => sign(v),
    }
}

/// Scalar derivative dy/dx at input `x` with output `y`.
///
/// Kinks: Relu and LeakyRelu use the x > 0 branch only for x > 0 (derivative at 0 is 0 resp.
/// alpha); Abs has derivative sign(x) (0 at 0); Clip is 1 on the closed interval [min, max].
pub fn unary_derivative(op: Unary, x: f64, y: f64) -> f64 {
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
                alpha as f64
            }
        }
        Unary::Sigmoid => y * (1.0 - y),
        Unary::Tanh => 1.0 - y * y,
        Unary::Clip { min, max } => {
            if x >= min as f64 && x <= max as f64 {
                1.0
            } else {
                0.0
            }
        }
        Unary::Neg => -1.0,
        Unary::Exp => y,
        Unary::Log => 1.0 / x,
        Unary::Sqrt => 0.5 / y,
        Unary::Abs => sign(x),
        Unary::Affine { a, .. } => a as f64,
        Unary::Powf { p } => p as f64 * x.powf(p as f64 - 1.0),
        Unary::Sign => 0.0,
    }
}

pub fn unary(op: Unary, x: &RefTensor) -> RefTensor {
    RefTensor {
        data: x.data.iter().map(|&v| unary_scalar(op, v)).collect(),
        shape: x.shape.clone(),
    }
}

pub fn unary_backward(op: Unary, x: &RefTensor, y: &RefTensor, dy: &RefTensor) -> RefTensor {
    assert!(
        x.shape == dy.shape && y.shape == dy.shape,
        "unary_backward shapes"
    );
    let data = (0..x.len())
        .map(|i| dy.data[i] * unary_derivative(op, x.data[i], y.data[i]))
        .collect();
    RefTensor {
        data,
        shape: x.shape.clone(),
    }
}

pub fn binary_scalar(op: Binary, a: f64, b: f64) -> f64 {
    match op {
        Binary::Add => a + b,
        Binary::Sub => a - b,
        Binary::Mul => a * b,
        Binary::Div => a / b,
        Binary::Max => a.max(b),
        Binary::Min => a.min(b),
    }
}

pub fn binary(op: Binary, a: &RefTensor, b: &RefTensor) -> RefTensor {
    let shape = broadcast_shape(&a.shape, &b.shape);
    let mut out = RefTensor::zeros(&shape);
    for o in 0..out.len() {
        let oi = unravel(&shape, o);
        out.data[o] = binary_scalar(
            op,
            a.data[broadcast_src(&a.shape, &oi)],
            b.data[broadcast_src(&b.shape, &oi)],
        );
    }
    out
}

pub fn reduce_sum_to(x: &RefTensor, shape: &[usize]) -> RefTensor {
    assert_eq!(
        broadcast_shape(shape, &x.shape),
        x.shape,
        "cannot reduce {:?} to {shape:?}",
        x.shape
    );
    let mut out = RefTensor::zeros(shape);
    for i in 0..x.len() {
        out.data[broadcast_src(shape, &unravel(&x.shape, i))] += x.data[i];
    }
    out
}

// ---- reduce / softmax / loss -----------------------------------------------------------------

/// Empty `axes` reduce nothing (a copy): callers expand ONNX's "all axes" default themselves.
pub fn reduce(x: &RefTensor, axes: &[usize], op: ReduceOp, keepdims: bool) -> RefTensor {
    assert!(
        axes.windows(2).all(|w| w[0] < w[1]),
        "reduce axes must be sorted and unique"
    );
    assert!(
        axes.iter().all(|&a| a < x.shape.len()),
        "reduce axis out of range"
    );
    let kept: Vec<usize> = x
        .shape
        .iter()
        .enumerate()
        .map(|(d, &n)| if axes.contains(&d) { 1 } else { n })
        .collect();
    let mut out = RefTensor::zeros(&kept);
    for i in 0..x.len() {
        let mut xi = unravel(&x.shape, i);
        for &a in axes {
            xi[a] = 0;
        }
        out.data[flat(&kept, &xi)] += x.data[i];
    }
    if op == ReduceOp::Mean {
        let count: usize = axes.iter().map(|&a| x.shape[a]).product();
        for v in &mut out.data {
            *v /= count as f64;
        }
    }
    if !keepdims {
        out.shape = x
            .shape
            .iter()
            .enumerate()
            .filter(|(d, _)| !axes.contains(d))
            .map(|(_, &n)| n)
            .collect();
    }
    out
}

/// (outer, axis length, inner) of a tensor split at `axis`.
fn split_axis(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    assert!(axis < shape.len(), "axis {axis} out of range for {shape:?}");
    (
        numel(&shape[..axis]),
        shape[axis],
        numel(&shape[axis + 1..]),
    )
}

pub fn softmax(x: &RefTensor, axis: usize, log: bool) -> RefTensor {
    let (outer, n, inner) = split_axis(&x.shape, axis);
    let mut out = x.clone();
    for o in 0..outer {
        for i in 0..inner {
            let idx = |k: usize| (o * n + k) * inner + i;
            let mx = (0..n)
                .map(|k| x.data[idx(k)])
                .fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = (0..n).map(|k| (x.data[idx(k)] - mx).exp()).sum();
            for k in 0..n {
                let z = x.data[idx(k)] - mx;
                out.data[idx(k)] = if log { z - sum.ln() } else { z.exp() / sum };
            }
        }
    }
    out
}

/// Softmax: dx = y * (dy - sum(dy * y)); log-softmax: dx = dy - exp(y) * sum(dy).
pub fn softmax_backward(y: &RefTensor, dy: &RefTensor, axis: usize, log: bool) -> RefTensor {
    assert_eq!(y.shape, dy.shape, "softmax_backward shapes");
    let (outer, n, inner) = split_axis(&y.shape, axis);
    let mut dx = RefTensor::zeros(&y.shape);
    for o in 0..outer {
        for i in 0..inner {
            let idx = |k: usize| (o * n + k) * inner + i;
            if log {
                let s: f64 = (0..n).map(|k| dy.data[idx(k)]).sum();
                for k in 0..n {
                    dx.data[idx(k)] = dy.data[idx(k)] - y.data[idx(k)].exp() * s;
                }
            } else {
                let s: f64 = (0..n).map(|k| dy.data[idx(k)] * y.data[idx(k)]).sum();
                for k in 0..n {
                    dx.data[idx(k)] = y.data[idx(k)] * (dy.data[idx(k)] - s);
                }
            }
        }
    }
    dx
}

/// Index of the first maximal logit among `z` excluding `skip`.
fn argmax_except(z: &[f64], skip: usize) -> usize {
    let mut best = usize::MAX;
    for (i, &v) in z.iter().enumerate() {
        if i != skip && (best == usize::MAX || v > z[best]) {
            best = i;
        }
    }
    best
}

/// Per-sample loss and its gradient; see [`Loss`] for the formulas.
///
/// Resolutions of corner cases (the backends follow them): CrossEntropy, CwMargin and Dlr take
/// `Classes` targets and `[N, K]` logits; Mse takes a `Dense` target of the logits' shape (any
/// rank >= 1, mean over all non-batch elements). CwMargin's gradient is `e_t - e_j` (j = the first
/// maximal non-target logit) when the margin is strictly above `-kappa`, else 0. Dlr sorts logits
/// descending with ties broken by lower index (pi1, pi3 = first and third), and differentiates
/// through both the numerator and the denominator.
pub fn loss(
    kind: Loss,
    logits: &RefTensor,
    targets: &RefLossTargets<'_>,
) -> (RefTensor, RefTensor) {
    let nb = logits.shape[0];
    let per = logits.len() / nb.max(1);
    let mut l = RefTensor::zeros(&[nb]);
    let mut g = RefTensor::zeros(&logits.shape);
    for s in 0..nb {
        let z = &logits.data[s * per..(s + 1) * per];
        let gz = &mut g.data[s * per..(s + 1) * per];
        let class = |t: &RefLossTargets<'_>| match *t {
            RefLossTargets::Classes(c) => {
                let t = c[s] as usize;
                assert!(t < per, "class {t} out of range for {per} logits");
                t
            }
            RefLossTargets::Dense(_) => panic!("{kind:?} needs class targets"),
        };
        match kind {
            Loss::CrossEntropy => {
                let t = class(targets);
                let mx = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let lse = mx + z.iter().map(|v| (v - mx).exp()).sum::<f64>().ln();
                l.data[s] = lse - z[t];
                for k in 0..per {
                    gz[k] = (z[k] - lse).exp() - if k == t { 1.0 } else { 0.0 };
                }
            }
            Loss::CwMargin { kappa } => {
                let t = class(targets);
                let j = argmax_except(z, t);
                let margin = z[t] - z[j];
                let kappa = kappa as f64;
                if margin > -kappa {
                    l.data[s] = margin;
                    gz[t] = 1.0;
                    gz[j] = -1.0;
                } else {
                    l.data[s] = -kappa;
                }
            }
            Loss::Dlr => {
                let t = class(targets);
                assert!(per >= 3, "DLR needs at least 3 classes");
                let j = argmax_except(z, t);
                let mut order: Vec<usize> = (0..per).collect();
                order.sort_by(|&a, &b| z[b].total_cmp(&z[a]).then(a.cmp(&b)));
                let (p1, p3) = (order[0], order[2]);
                let num = z[t] - z[j];
                let den = z[p1] - z[p3] + 1e-12;
                l.data[s] = -num / den;
                gz[t] -= 1.0 / den;
                gz[j] += 1.0 / den;
                gz[p1] += num / (den * den);
                gz[p3] -= num / (den * den);
            }
            Loss::Mse => {
                let RefLossTargets::Dense(tt) = *targets else {
                    panic!("MSE needs a dense target")
                };
                assert_eq!(tt.shape, logits.shape, "MSE target shape");
                let tz = &tt.data[s * per..(s + 1) * per];
                l.data[s] = z
                    .iter()
                    .zip(tz)
                    .map(|(a, b)| (a - b) * (a - b))
                    .sum::<f64>()
                    / per as f64;
                for k in 0..per {
                    gz[k] = 2.0 * (z[k] - tz[k]) / per as f64;
                }
            }
        }
    }
    (l, g)
}

// ---- resize ----------------------------------------------------------------------------------

/// Input coordinate (continuous) of output index `o` along an axis of `n_in` -> `n_out`
/// (ONNX `coordinate_transformation_mode`, with scale = n_out / n_in).
pub fn resize_coord(o: usize, n_in: usize, n_out: usize, coord: CoordTransform) -> f64 {
    let (o, fi, fo) = (o as f64, n_in as f64, n_out as f64);
    match coord {
        CoordTransform::HalfPixel => (o + 0.5) * fi / fo - 0.5,
        CoordTransform::PytorchHalfPixel => {
            if n_out > 1 {
                (o + 0.5) * fi / fo - 0.5
            } else {
                0.0
            }
        }
        CoordTransform::AlignCorners => {
            if n_out == 1 {
                0.0
            } else {
                o * (fi - 1.0) / (fo - 1.0)
            }
        }
        CoordTransform::Asymmetric => o * fi / fo,
    }
}

/// The (input index, weight) pairs that output index `o` of one axis reads, for every resize
/// mode; a 2-D resize is the outer product of the row and column taps.
///
/// Semantics (ONNX Resize, 2-D): Nearest rounds the transformed coordinate with the nearest mode
/// (ties = exactly .5 for the two `RoundPrefer*` modes) and clamps to `[0, n_in - 1]`. Linear
/// clamps the coordinate to `[0, n_in - 1]` first, then interpolates between floor and floor + 1
/// (clamped), as onnxruntime does. Area averages input `floor(o*n_in/n_out) ..
/// ceil((o+1)*n_in/n_out)` with equal weights and ignores the coordinate transform. Coordinates are
/// computed in f64 as `(o + 0.5) * n_in / n_out - 0.5` (etc.), which backends must mirror for
/// Nearest so that ties round identically.
pub fn resize_taps(
    o: usize,
    n_in: usize,
    n_out: usize,
    mode: ResizeMode,
    coord: CoordTransform,
) -> Vec<(usize, f64)> {
    assert!(n_in > 0 && n_out > 0, "resize of an empty axis");
    match mode {
        ResizeMode::Nearest(nm) => {
            let x = resize_coord(o, n_in, n_out, coord);
            let fl = x.floor();
            let r = match nm {
                NearestMode::Floor => fl,
                NearestMode::Ceil => x.ceil(),
                NearestMode::RoundPreferFloor => {
                    if x - fl == 0.5 {
                        fl
                    } else {
                        x.round()
                    }
                }
                NearestMode::RoundPreferCeil => {
                    if x - fl == 0.5 {
                        fl + 1.0
                    } else {
                        x.round()
                    }
                }
            };
            vec![(r.clamp(0.0, (n_in - 1) as f64) as usize, 1.0)]
        }
        ResizeMode::Linear => {
            let x = resize_coord(o, n_in, n_out, coord).clamp(0.0, (n_in - 1) as f64);
            let x0 = x.floor() as usize;
            let x1 = (x0 + 1).min(n_in - 1);
            let l = x - x0 as f64;
            vec![(x0, 1.0 - l), (x1, l)]
        }
        ResizeMode::Area => {
            let start = o * n_in / n_out;
            let end = ((o + 1) * n_in).div_ceil(n_out);
            let wt = 1.0 / (end - start) as f64;
            (start..end).map(|i| (i, wt)).collect()
        }
    }
}

fn resize_all_taps(
    x_shape: [usize; 4],
    p: &ResizeParams,
) -> (Vec<Vec<(usize, f64)>>, Vec<Vec<(usize, f64)>>) {
    let [oh, ow] = p.out_hw;
    let rows = (0..oh)
        .map(|o| resize_taps(o, x_shape[2], oh, p.mode, p.coord))
        .collect();
    let cols = (0..ow)
        .map(|o| resize_taps(o, x_shape[3], ow, p.mode, p.coord))
        .collect();
    (rows, cols)
}

pub fn resize(x: &RefTensor, p: &ResizeParams) -> RefTensor {
    let xs = dims4(x, "resize x");
    let [n, c, h, w] = xs;
    let [oh, ow] = p.out_hw;
    let (rows, cols) = resize_all_taps(xs, p);
    let mut y = RefTensor::zeros(&[n, c, oh, ow]);
    for nc in 0..n * c {
        for oy in 0..oh {
            for ox in 0..ow {
                let mut s = 0.0;
                for &(iy, wy) in &rows[oy] {
                    for &(ix, wx) in &cols[ox] {
                        s += wy * wx * x.data[(nc * h + iy) * w + ix];
                    }
                }
                y.data[(nc * oh + oy) * ow + ox] = s;
            }
        }
    }
    y
}

pub fn resize_backward(dy: &RefTensor, x_shape: [usize; 4], p: &ResizeParams) -> RefTensor {
    let [n, c, h, w] = x_shape;
    let [oh, ow] = p.out_hw;
    assert_eq!(dy.shape, [n, c, oh, ow], "resize_backward dy shape");
    let (rows, cols) = resize_all_taps(x_shape, p);
    let mut dx = RefTensor::zeros(&x_shape);
    for nc in 0..n * c {
        for oy in 0..oh {
            for ox in 0..ow {
                let d = dy.data[(nc * oh + oy) * ow + ox];
                for &(iy, wy) in &rows[oy] {
                    for &(ix, wx) in &cols[ox] {
                        dx.data[(nc * h + iy) * w + ix] += wy * wx * d;
                    }
                }
            }
        }
    }
    dx
}

// ---- perturbation family ---------------------------------------------------------------------

fn per_sample(x: &RefTensor) -> (usize, usize) {
    let n = x.shape.first().copied().unwrap_or(1);
    (n, x.len().checked_div(n).unwrap_or(0))
}

pub fn sign_step(x: &RefTensor, g: &RefTensor, alpha: f32) -> RefTensor {
    assert_eq!(x.shape, g.shape, "sign_step shapes");
    let data = x
        .data
        .iter()
        .zip(&g.data)
        .map(|(&v, &gv)| v + alpha as f64 * sign(gv))
        .collect();
    RefTensor {
        data,
        shape: x.shape.clone(),
    }
}

fn norm_of(v: &[f64], norm: Norm) -> f64 {
    match norm {
        Norm::L1 => v.iter().map(|a| a.abs()).sum(),
        Norm::L2 => v.iter().map(|a| a * a).sum::<f64>().sqrt(),
        Norm::Linf => v.iter().fold(0.0, |m, a| m.max(a.abs())),
    }
}

pub fn l2_step(x: &RefTensor, g: &RefTensor, alpha: f32) -> RefTensor {
    assert_eq!(x.shape, g.shape, "l2_step shapes");
    let (n, per) = per_sample(x);
    let mut out = x.clone();
    for s in 0..n {
        let gs = &g.data[s * per..(s + 1) * per];
        let nrm = norm_of(gs, Norm::L2);
        if nrm > 0.0 {
            for k in 0..per {
                out.data[s * per + k] += alpha as f64 * gs[k] / nrm;
            }
        }
    }
    out
}

pub fn project(x: &RefTensor, x0: &RefTensor, eps: f32, norm: Norm) -> RefTensor {
    assert_eq!(x.shape, x0.shape, "project shapes");
    let eps = eps as f64;
    let (n, per) = per_sample(x);
    let mut out = x.clone();
    for s in 0..n {
        let r = s * per..(s + 1) * per;
        match norm {
            Norm::Linf => {
                for i in r {
                    out.data[i] = x.data[i].clamp(x0.data[i] - eps, x0.data[i] + eps);
                }
            }
            Norm::L2 => {
                let d: Vec<f64> = r.clone().map(|i| x.data[i] - x0.data[i]).collect();
                let nrm = norm_of(&d, Norm::L2);
                if nrm > eps {
                    for (k, i) in r.enumerate() {
                        out.data[i] = x0.data[i] + d[k] * eps / nrm;
                    }
                }
            }
            Norm::L1 => panic!("L1 projection is not supported"),
        }
    }
    out
}

pub fn clamp_per_sample(x: &RefTensor, lo: &[f32], hi: &[f32]) -> RefTensor {
    let (n, per) = per_sample(x);
    assert!(
        lo.len() == n && hi.len() == n,
        "clamp_per_sample needs one bound per sample"
    );
    let mut out = x.clone();
    for s in 0..n {
        for v in &mut out.data[s * per..(s + 1) * per] {
            *v = v.max(lo[s] as f64).min(hi[s] as f64);
        }
    }
    out
}

pub fn norm_per_sample(x: &RefTensor, norm: Norm) -> RefTensor {
    let (n, per) = per_sample(x);
    RefTensor::new(
        (0..n)
            .map(|s| norm_of(&x.data[s * per..(s + 1) * per], norm))
            .collect(),
        &[n],
    )
}

/// `lo + (hi - lo) * u` with u from [`counter_uniform`] (backends evaluate this in f32).
pub fn random_uniform(shape: &[usize], seed: u64, lo: f32, hi: f32) -> RefTensor {
    let data = (0..numel(shape))
        .map(|i| lo as f64 + (hi as f64 - lo as f64) * counter_uniform(seed, i as u32) as f64)
        .collect();
    RefTensor {
        data,
        shape: shape.to_vec(),
    }
}

/// `std * n` with n from [`counter_normal`].
pub fn random_normal(shape: &[usize], seed: u64, std: f32) -> RefTensor {
    let data = (0..numel(shape))
        .map(|i| std as f64 * counter_normal(seed, i as u32) as f64)
        .collect();
    RefTensor {
        data,
        shape: shape.to_vec(),
    }
}
