//! The kernel contract shared by the CPU and GPU backends.
//!
//! The graph executor and the autodiff (`runtime::graph`) are written once against this trait; the
//! `cpu` backend (native Rust, rayon, GEMM) and the `gpu` backend (wgpu + hand-written WGSL) each
//! implement it. Every operator of the IR lowers to a handful of these primitives, and every
//! backward rule is expressed with them too, so a backend that passes the per-primitive tests
//! against the float64 reference (`runtime::reference`) gives correct gradients for whole graphs.
//!
//! Conventions (all primitives):
//! - Tensors are `f32`, dense, row-major (C order); images are NCHW.
//! - Primitives never mutate their inputs; they return fresh tensors. Handles are cheap to clone
//!   (reference counted), so a reshape is a new [`Tensor`] sharing the same buffer.
//! - Results are deterministic: the same inputs on the same backend give bit-identical outputs
//!   (no atomics-ordered float reductions), which training's reproducibility relies on.
//! - Shapes are validated by the caller (the executor's shape inference); a primitive may panic on
//!   a shape mismatch, which is a bug in the caller, never the user's input.

use std::fmt;

/// A tensor living on a backend: a shared buffer handle plus its shape.
pub struct Tensor<B: Backend + ?Sized> {
    pub buf: B::Buf,
    pub shape: Vec<usize>,
}

impl<B: Backend + ?Sized> Clone for Tensor<B> {
    fn clone(&self) -> Self {
        Tensor {
            buf: self.buf.clone(),
            shape: self.shape.clone(),
        }
    }
}

impl<B: Backend + ?Sized> fmt::Debug for Tensor<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tensor")
            .field("shape", &self.shape)
            .finish_non_exhaustive()
    }
}

impl<B: Backend + ?Sized> Tensor<B> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Same buffer, new shape (element count must match).
    pub fn reshape(&self, shape: &[usize]) -> Self {
        assert_eq!(
            shape.iter().product::<usize>(),
            self.len(),
            "reshape changes element count"
        );
        Tensor {
            buf: self.buf.clone(),
            shape: shape.to_vec(),
        }
    }
}

/// 2-D convolution geometry (ONNX `Conv` semantics, explicit pads).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Conv2dParams {
    /// [stride_h, stride_w]
    pub stride: [usize; 2],
    /// [top, left, bottom, right]
    pub pad: [usize; 4],
    /// [dilation_h, dilation_w]
    pub dilation: [usize; 2],
    pub groups: usize,
}

impl Default for Conv2dParams {
    fn default() -> Self {
        Conv2dParams {
            stride: [1, 1],
            pad: [0; 4],
            dilation: [1, 1],
            groups: 1,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PoolKind {
    Max,
    /// `count_include_pad`: ONNX AveragePool attribute (padding cells count in the divisor).
    Avg {
        count_include_pad: bool,
    },
}

/// 2-D pooling geometry (ONNX `MaxPool` / `AveragePool`; output size already decided by the
/// caller, which handles `ceil_mode` by passing `out_hw`).
///
/// Window semantics (as `runtime::reference::pool_axis_taps`): tap t of output o reads input
/// `o*stride + t*dilation - pad_begin`. Max ignores taps outside the input. Avg divides by the
/// number of taps inside the input, or with `count_include_pad` by the taps inside the *padded*
/// extent `[-pad_begin, len + pad_end)` (taps past it, reachable only through `ceil_mode`'s
/// extra windows, never count: ONNX Runtime / PyTorch behaviour). A window with no tap inside the
/// input outputs 0 and gets no gradient.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Pool2dParams {
    pub kind: PoolKind,
    /// [kh, kw]
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    /// [top, left, bottom, right]
    pub pad: [usize; 4],
    pub dilation: [usize; 2],
    /// Output spatial size [oh, ow].
    pub out_hw: [usize; 2],
}

/// Gradients at kinks: Relu 0 and LeakyRelu `alpha` at x = 0 (the x > 0 branch is strict); Abs
/// sign(x) (0 at 0); Sqrt `0.5 / y` (from the output).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Unary {
    Relu,
    LeakyRelu {
        alpha: f32,
    },
    Sigmoid,
    Tanh,
    /// Clamp to [min, max]; gradient 1 strictly inside, 0 outside (at the bounds: 1, the
    /// subgradient PyTorch uses for `clamp`).
    Clip {
        min: f32,
        max: f32,
    },
    Neg,
    Exp,
    /// Natural log (inputs > 0).
    Log,
    Sqrt,
    Abs,
    /// y = a * x + b
    Affine {
        a: f32,
        b: f32,
    },
    /// y = x^p for a constant exponent
    Powf {
        p: f32,
    },
    /// Forward is sign(x) (sign(0) = 0); its gradient is 0 everywhere.
    Sign,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Binary {
    Add,
    Sub,
    Mul,
    Div,
    Max,
    Min,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PadMode {
    Constant,
    Reflect,
    Edge,
}

/// How output coordinates map to input coordinates (ONNX Resize `coordinate_transformation_mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CoordTransform {
    HalfPixel,
    PytorchHalfPixel,
    AlignCorners,
    Asymmetric,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NearestMode {
    RoundPreferFloor,
    RoundPreferCeil,
    Floor,
    Ceil,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ResizeMode {
    Nearest(NearestMode),
    /// Bilinear on the last two axes.
    Linear,
    /// Adaptive average pooling (PyTorch `adaptive_avg_pool2d` / `interpolate(mode="area")`):
    /// output cell i averages input rows floor(i*H/oh) .. ceil((i+1)*H/oh). Used by the
    /// preprocessing when shrinking an image to the model input. Ignores the coordinate transform.
    Area,
}

/// Coordinates (ONNX Resize, scale = out/in per axis): HalfPixel `(o + 0.5) * in / out - 0.5`,
/// PytorchHalfPixel the same but 0 when `out == 1`, AlignCorners `o * (in - 1) / (out - 1)` (0
/// when `out == 1`), Asymmetric `o * in / out`, evaluated in f64 in that form so Nearest's ties
/// (`RoundPrefer*`: fraction exactly 0.5) round identically on every backend. Nearest then clamps
/// the index to `[0, in - 1]`; Linear clamps the coordinate to `[0, in - 1]` before interpolating
/// between floor and floor + 1 (as onnxruntime). See `runtime::reference::resize_taps`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ResizeParams {
    pub mode: ResizeMode,
    pub coord: CoordTransform,
    /// Output spatial size [oh, ow] (input is NCHW; N and C are kept).
    pub out_hw: [usize; 2],
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    Sum,
    Mean,
}

/// Per-sample losses on logits `[N, K]`. All return the loss per sample and the gradient of each
/// sample's loss with respect to its own logits (so the gradient of the batch *sum*).
///
/// CrossEntropy, CwMargin and Dlr take `LossTargets::Classes`; Mse takes `LossTargets::Dense`
/// (logits of any rank >= 1, mean over each sample's elements); the other pairings are caller
/// bugs (panic). "max_{i!=t}" picks the first (lowest-index) maximal logit. CwMargin's gradient is
/// `e_t - e_j` while the margin is strictly above `-kappa`, else 0. Dlr's pi1/pi3 come from a sort
/// by descending logit with ties broken by lower index, and its gradient includes the
/// denominator's.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Loss {
    /// -log softmax(z)[t]
    CrossEntropy,
    /// Carlini-Wagner margin for class t: max(z_t - max_{i!=t} z_i, -kappa).
    /// (An untargeted attack maximises -margin of the true class; a targeted one minimises the
    /// margin of max_{i!=t} over the target... the executor composes signs; this is the raw term.)
    CwMargin { kappa: f32 },
    /// Croce & Hein DLR: -(z_t - max_{i!=t} z_i) / (z_pi1 - z_pi3 + 1e-12), needs K >= 3.
    Dlr,
    /// Mean squared error against a target tensor of the same shape, mean over each sample's
    /// elements.
    Mse,
}

/// What a loss compares against.
#[derive(Clone, Debug)]
pub enum LossTargets<'a, B: Backend + ?Sized> {
    /// One class index per sample.
    Classes(&'a [u32]),
    /// A dense target of the logits' shape (MSE, per-pixel losses).
    Dense(&'a Tensor<B>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Norm {
    L1,
    L2,
    Linf,
}

/// The primitive kernels. See the module docs for conventions.
///
/// Groups mirror the WGSL kernel families in `shaders/`: conv, matmul, pool, elementwise,
/// reduce/softmax/loss, resize, perturbation (plus data movement: transpose, concat, slice, pad).
pub trait Backend: Send + Sync {
    /// Device storage handle; `clone` is cheap (shared).
    type Buf: Clone + Send + Sync;

    /// Human-readable identity, e.g. `cpu (2 threads)` or `gpu (NVIDIA H100, Vulkan)`.
    fn describe(&self) -> String;

    /// Into how many contiguous slices the executor should cut a batch of `n` samples, to run
    /// the whole graph once per slice concurrently through [`Backend::run_slices`]. 1 (the
    /// default) runs one pass over the whole batch. A multi-core CPU gains from slices: each
    /// thread then runs every op on its own samples, instead of all threads meeting at a
    /// fork-join inside every op, which on a small model costs more than the op.
    fn batch_slices(&self, n: usize) -> usize {
        let _ = n;
        1
    }

    /// [`Backend::batch_slices`] for a forward pass alone (no tape kept for a backward pass),
    /// whose slices can be larger: the default is the same count.
    fn batch_slices_forward(&self, n: usize) -> usize {
        self.batch_slices(n)
    }

    /// Calls `f(i)` for every `i < parts`, concurrently where the backend can.
    fn run_slices(&self, parts: usize, f: &(dyn Fn(usize) + Sync)) {
        (0..parts).for_each(f);
    }

    // ---- data movement ----------------------------------------------------------------------
    fn upload(&self, data: &[f32], shape: &[usize]) -> Tensor<Self>;
    fn download(&self, t: &Tensor<Self>) -> Vec<f32>;
    fn zeros(&self, shape: &[usize]) -> Tensor<Self>;
    fn fill(&self, shape: &[usize], value: f32) -> Tensor<Self>;
    /// Permute axes (`perm[i]` = which input axis becomes output axis i).
    fn transpose(&self, x: &Tensor<Self>, perm: &[usize]) -> Tensor<Self>;
    /// Concatenate along `axis`; all other dims equal.
    fn concat(&self, xs: &[&Tensor<Self>], axis: usize) -> Tensor<Self>;
    /// Elements `start..end` along `axis` (contiguous range).
    fn slice(&self, x: &Tensor<Self>, axis: usize, start: usize, end: usize) -> Tensor<Self>;
    /// Pad every axis by `pads[i] = (before, after)`; `value` is used by `PadMode::Constant`.
    /// Reflect is NumPy's `reflect` (edge not repeated); pads wider than `len - 1` keep reflecting
    /// back and forth, and a length-1 axis reflects onto itself.
    fn pad(
        &self,
        x: &Tensor<Self>,
        pads: &[(usize, usize)],
        mode: PadMode,
        value: f32,
    ) -> Tensor<Self>;
    /// Adjoint of [`Backend::pad`]: gradient w.r.t. the unpadded input (reflect/edge accumulate).
    fn pad_backward(
        &self,
        dy: &Tensor<Self>,
        x_shape: &[usize],
        pads: &[(usize, usize)],
        mode: PadMode,
    ) -> Tensor<Self>;
    /// NumPy-style broadcast of `x` to `shape`.
    fn broadcast_to(&self, x: &Tensor<Self>, shape: &[usize]) -> Tensor<Self>;

    // ---- conv family -------------------------------------------------------------------------
    /// x `[N, C, H, W]`, w `[M, C/groups, kh, kw]`, bias `[M]` -> y `[N, M, oh, ow]`.
    fn conv2d(
        &self,
        x: &Tensor<Self>,
        w: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
        p: &Conv2dParams,
    ) -> Tensor<Self>;
    /// `act(conv2d(x, w, bias))`: the executor's inference-only fusion of a Conv and the
    /// activation that is its only consumer, so a backend can apply the activation while the
    /// convolution's output is still in cache. The default runs the two primitives.
    fn conv2d_act(
        &self,
        x: &Tensor<Self>,
        w: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
        p: &Conv2dParams,
        act: Unary,
    ) -> Tensor<Self> {
        self.unary(act, &self.conv2d(x, w, bias, p))
    }
    /// `pool2d(act(conv2d(x, w, bias)))`: the executor's inference-only fusion of a Conv, its
    /// activation and a pooling that is the activation's only consumer, so a backend can pool
    /// the activation while it is in cache instead of writing it out and reading it back. The
    /// default runs the primitives.
    fn conv2d_act_pool(
        &self,
        x: &Tensor<Self>,
        w: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
        p: &Conv2dParams,
        act: Unary,
        pool: &Pool2dParams,
    ) -> Tensor<Self> {
        self.pool2d(&self.conv2d_act(x, w, bias, p, act), pool)
    }
    /// Gradient w.r.t. x (this is also ConvTranspose's forward, with `x_shape` its output shape).
    fn conv2d_backward_input(
        &self,
        dy: &Tensor<Self>,
        w: &Tensor<Self>,
        p: &Conv2dParams,
        x_shape: [usize; 4],
    ) -> Tensor<Self>;
    /// Gradient w.r.t. w.
    fn conv2d_backward_weight(
        &self,
        dy: &Tensor<Self>,
        x: &Tensor<Self>,
        p: &Conv2dParams,
        w_shape: [usize; 4],
    ) -> Tensor<Self>;

    // ---- matmul family -----------------------------------------------------------------------
    /// Batched matrix product over the last two axes: a `[..., M, K]` (or `[..., K, M]` when
    /// `trans_a`), b `[..., K, N]` (or `[..., N, K]` when `trans_b`). Leading (batch) axes
    /// broadcast NumPy-style; 2-D inputs are plain GEMM.
    fn matmul(
        &self,
        a: &Tensor<Self>,
        b: &Tensor<Self>,
        trans_a: bool,
        trans_b: bool,
    ) -> Tensor<Self>;

    // ---- pool family -------------------------------------------------------------------------
    fn pool2d(&self, x: &Tensor<Self>, p: &Pool2dParams) -> Tensor<Self>;
    /// Max: routes dy to the first maximal element of each window (recomputed from x).
    /// Avg: spreads dy evenly over each window's counted cells.
    fn pool2d_backward(
        &self,
        dy: &Tensor<Self>,
        x: &Tensor<Self>,
        p: &Pool2dParams,
    ) -> Tensor<Self>;
    /// The gradient of `pool2d(relu(x))` with respect to `x`, from `r = relu(x)` (the pooling's
    /// input, which the tape keeps): [`Backend::pool2d_backward`], then the ReLU's backward
    /// with `r` for `x` (`r > 0` exactly where `x > 0`). Autodiff's fusion of the two backward
    /// passes, so a backend can mask each plane while it is in cache instead of writing the
    /// pooling's gradient out and reading it back. The default runs the primitives.
    fn relu_pool2d_backward(
        &self,
        dy: &Tensor<Self>,
        r: &Tensor<Self>,
        p: &Pool2dParams,
    ) -> Tensor<Self> {
        self.unary_backward(Unary::Relu, r, r, &self.pool2d_backward(dy, r, p))
    }

    // ---- elementwise family --------------------------------------------------------------------
    fn unary(&self, op: Unary, x: &Tensor<Self>) -> Tensor<Self>;
    /// dx from dy; `x` is the op's input, `y` its output (each rule uses whichever is cheaper).
    fn unary_backward(
        &self,
        op: Unary,
        x: &Tensor<Self>,
        y: &Tensor<Self>,
        dy: &Tensor<Self>,
    ) -> Tensor<Self>;
    /// NumPy broadcasting; output shape is the broadcast of both.
    fn binary(&self, op: Binary, a: &Tensor<Self>, b: &Tensor<Self>) -> Tensor<Self>;
    /// `act(binary(a, b))`: the executor's inference-only fusion of an elementwise Binary and
    /// the activation that is its only consumer (a residual block's Add and ReLU), so a backend
    /// can make one pass over the data instead of two, with one output instead of two.
    fn binary_act(
        &self,
        op: Binary,
        a: &Tensor<Self>,
        b: &Tensor<Self>,
        act: Unary,
    ) -> Tensor<Self> {
        self.unary(act, &self.binary(op, a, b))
    }
    /// Sum `x` down to `shape` over broadcast axes (adjoint of [`Backend::broadcast_to`]).
    fn reduce_sum_to(&self, x: &Tensor<Self>, shape: &[usize]) -> Tensor<Self>;

    // ---- reduce / softmax / loss family ---------------------------------------------------------
    /// Sum or mean over `axes` (sorted, unique); kept axes have size 1 when `keepdims`.
    /// Empty `axes` reduce nothing (a copy): the caller expands ONNX's "all axes" default.
    fn reduce(
        &self,
        x: &Tensor<Self>,
        axes: &[usize],
        op: ReduceOp,
        keepdims: bool,
    ) -> Tensor<Self>;
    /// Softmax (or log-softmax) along `axis`, numerically stable.
    fn softmax(&self, x: &Tensor<Self>, axis: usize, log: bool) -> Tensor<Self>;
    /// dx given the forward output `y` and dy.
    fn softmax_backward(
        &self,
        y: &Tensor<Self>,
        dy: &Tensor<Self>,
        axis: usize,
        log: bool,
    ) -> Tensor<Self>;
    /// Returns (per-sample loss `[N]`, d loss_i / d logits_i with the logits' shape).
    fn loss(
        &self,
        kind: Loss,
        logits: &Tensor<Self>,
        targets: &LossTargets<'_, Self>,
    ) -> (Tensor<Self>, Tensor<Self>);

    // ---- resize family -------------------------------------------------------------------------
    fn resize(&self, x: &Tensor<Self>, p: &ResizeParams) -> Tensor<Self>;
    fn resize_backward(
        &self,
        dy: &Tensor<Self>,
        x_shape: [usize; 4],
        p: &ResizeParams,
    ) -> Tensor<Self>;

    // ---- perturbation family (attacks, adversarial training) -------------------------------------
    // "Per sample" = over all axes but the first.
    /// x + alpha * sign(g)
    fn sign_step(&self, x: &Tensor<Self>, g: &Tensor<Self>, alpha: f32) -> Tensor<Self>;
    /// x + alpha * g / ||g||_2 per sample (a zero gradient gives no step).
    fn l2_step(&self, x: &Tensor<Self>, g: &Tensor<Self>, alpha: f32) -> Tensor<Self>;
    /// Project x onto the norm ball of radius `eps` around x0, per sample (L∞: clamp each
    /// element; L2: rescale the difference when its norm exceeds eps). L1 is not supported.
    fn project(&self, x: &Tensor<Self>, x0: &Tensor<Self>, eps: f32, norm: Norm) -> Tensor<Self>;
    /// Per-sample clamp to [lo, hi] (the stored-value range of each frame); `lo`/`hi` have one
    /// entry per sample.
    fn clamp_per_sample(&self, x: &Tensor<Self>, lo: &[f32], hi: &[f32]) -> Tensor<Self>;
    /// Per-sample norm of x, shape `[N]`.
    fn norm_per_sample(&self, x: &Tensor<Self>, norm: Norm) -> Tensor<Self>;
    /// Counter-based (seed, element index) uniform in [lo, hi): identical on every backend,
    /// computed in f32 as `lo + (hi - lo) * counter_uniform(seed, i)`.
    fn random_uniform(&self, shape: &[usize], seed: u64, lo: f32, hi: f32) -> Tensor<Self>;
    /// Counter-based standard normal times `std` (Box-Muller on the same counter stream).
    fn random_normal(&self, shape: &[usize], seed: u64, std: f32) -> Tensor<Self>;
}

/// The counter-based generator every backend implements bit-for-bit for uniforms, so a seeded
/// attack gives the same random start on the CPU and on the GPU.
///
/// Element `i` of a tensor drawn with `seed` is `hash(i, seed)`, with the PCG output hash below
/// applied in u32 arithmetic only (WGSL has no u64): `k = pcg(seed_lo ^ pcg(seed_hi))`,
/// `h = pcg(i ^ k)`, `u = (h >> 8) * 2^-24` in [0, 1).
pub fn pcg_hash(v: u32) -> u32 {
    let state = v.wrapping_mul(747_796_405).wrapping_add(2_891_336_453);
    let word = ((state >> ((state >> 28).wrapping_add(4))) ^ state).wrapping_mul(277_803_737);
    (word >> 22) ^ word
}

/// Uniform in [0, 1) for element `i` of the stream `seed` (see [`pcg_hash`]).
pub fn counter_uniform(seed: u64, i: u32) -> f32 {
    let k = pcg_hash((seed as u32) ^ pcg_hash((seed >> 32) as u32));
    let h = pcg_hash(i ^ k);
    (h >> 8) as f32 * (1.0 / 16_777_216.0)
}

/// Standard normal for element `i`: Box-Muller on uniforms `2i` and `2i + 1` of the same stream
/// (`u1` floored at 2^-24 so the log is finite). Backends agree up to the rounding of ln/cos.
pub fn counter_normal(seed: u64, i: u32) -> f32 {
    let u1 = counter_uniform(seed, i.wrapping_mul(2)).max(1.0 / 16_777_216.0);
    let u2 = counter_uniform(seed, i.wrapping_mul(2).wrapping_add(1));
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}
