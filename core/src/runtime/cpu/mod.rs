//! The native CPU backend: f32 kernels on rayon, convolutions and matmuls on the `gemm` crate.
//!
//! It is both the speed path on machines without a GPU and the backend the GPU results are
//! compared with in whole-graph tests, so it favours exactness of semantics (same geometry code
//! as [`crate::runtime::reference`] for pools and resizes) and determinism: every op splits its
//! work by disjoint output blocks, each computed in a fixed order, and reductions that cross
//! blocks (norms, softmax sums, loss terms) accumulate in f64 sequentially.
//!
//! Small ops stay on the calling thread: below [`PAR_MIN_FLOPS`] of work, waking the pool costs
//! more than the op (the demo model is a small CNN on 28x28 images).

mod conv;
mod crew;
mod gemm;
mod lanes;
mod maxpool2;
mod ops;
mod pool;
mod sgemm;
mod wcache;
mod winograd;

#[cfg(test)]
mod tests;

use std::sync::Arc;

use pool::BufPool;
pub use pool::CpuBuf;

use crate::runtime::backend::{
    Backend, Binary, Conv2dParams, Loss, LossTargets, Norm, PadMode, Pool2dParams, ReduceOp,
    ResizeParams, Tensor, Unary,
};

/// Below this many multiply-adds (or element operations) an op runs single-threaded.
pub const PAR_MIN_FLOPS: usize = 1 << 16;

/// Elements per parallel chunk for elementwise ops (large enough to amortise task overhead).
const ELEM_CHUNK: usize = 1 << 14;

/// Test-only switch from the spinning slice helpers (`crew`) to the rayon pool, for timing A/B
/// runs.
#[cfg(test)]
pub(crate) static NO_CREW: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Test-only switch back to running every slice on the pool (the caller waiting), for timing
/// A/B runs.
#[cfg(test)]
pub(crate) static OLD_SLICES: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

thread_local! {
    /// Set while this thread runs one slice of a sliced batch (`Backend::run_slices`).
    static IN_SLICE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Native CPU backend. Construct once and share: it owns a rayon pool of its own, so its thread
/// count is what `describe()` says regardless of the global pool.
pub struct CpuBackend {
    pool: Option<rayon::ThreadPool>,
    threads: usize,
    /// Recycled output buffers (see `pool`).
    bufs: Arc<BufPool>,
    /// Weights in the forms the kernels read (see `wcache`).
    weights: wcache::WeightCache,
    /// Helper threads that take the slices of a sliced batch beside the caller, started at the
    /// first sliced call (see `crew`); `None` inside if they could not be started.
    crew: std::sync::OnceLock<Option<crew::Crew>>,
}

impl std::fmt::Debug for CpuBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuBackend")
            .field("threads", &self.threads)
            .finish()
    }
}

impl CpuBackend {
    /// `threads`: worker count (None = the machine's available parallelism). If the OS refuses
    /// to spawn the pool, the backend still works, single-threaded.
    pub fn new(threads: Option<usize>) -> CpuBackend {
        let want = threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
            .max(1);
        if want == 1 {
            return CpuBackend {
                pool: None,
                threads: 1,
                bufs: Arc::default(),
                weights: Default::default(),
                crew: Default::default(),
            };
        }
        match rayon::ThreadPoolBuilder::new()
            .num_threads(want)
            .thread_name(|i| format!("adverse-cpu-{i}"))
            .build()
        {
            Ok(pool) => CpuBackend {
                pool: Some(pool),
                threads: want,
                bufs: Arc::default(),
                weights: Default::default(),
                crew: Default::default(),
            },
            Err(e) => {
                tracing::warn!("cpu backend: could not start {want} threads ({e}); using 1");
                CpuBackend {
                    pool: None,
                    threads: 1,
                    bufs: Arc::default(),
                    weights: Default::default(),
                    crew: Default::default(),
                }
            }
        }
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `f` on this backend's pool (or inline when single-threaded).
    fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        match &self.pool {
            Some(p) => p.install(f),
            None => f(),
        }
    }

    /// Whether an op of `work` element operations should use the pool: never inside a batch
    /// slice (the other workers are running slices of their own).
    fn parallel(&self, work: usize) -> bool {
        self.threads > 1 && work >= PAR_MIN_FLOPS && !IN_SLICE.with(|s| s.get())
    }

    fn wrap(&self, data: Vec<f32>, shape: &[usize]) -> Tensor<Self> {
        debug_assert_eq!(data.len(), shape.iter().product::<usize>());
        Tensor {
            buf: CpuBuf::new(data, &self.bufs),
            shape: shape.to_vec(),
        }
    }

    /// An output buffer of `len` elements with unspecified contents, for kernels that write
    /// every element.
    pub(crate) fn out_dirty(&self, len: usize) -> Vec<f32> {
        self.bufs.take_dirty(len)
    }

    /// A zero-filled output buffer, for kernels that accumulate.
    pub(crate) fn out_zeroed(&self, len: usize) -> Vec<f32> {
        self.bufs.take_zeroed(len)
    }
}

fn dims4(shape: &[usize], what: &str) -> [usize; 4] {
    assert_eq!(shape.len(), 4, "{what} must be 4-D, got {shape:?}");
    [shape[0], shape[1], shape[2], shape[3]]
}

/// Largest batch slice (samples) when a batch is cut for the cache rather than for threads.
/// Measured on the small CNN, one thread, best of 5 rounds, alternating: forward the same at 64
/// (one slice), 16 and 8; forward + input gradient 3-5% faster at 16.
const SLICE_SAMPLES: usize = 16;
/// The same for a forward pass alone, which keeps no tape: larger slices read a fully
/// connected layer's weights (larger than L2 in the small CNN) fewer times. Measured on the
/// small CNN at batch 64, one thread of an AVX-512 Xeon: forward 3.36 ms in one slice against
/// 3.44 ms in four; forward + gradient 9.96 ms in four against 10.77 ms in one.
const FORWARD_SLICE_SAMPLES: usize = 64;

impl CpuBackend {
    /// [`Backend::pool2d_backward`], and with `relu` [`Backend::relu_pool2d_backward`] (`x` is
    /// then the ReLU's output).
    fn pool_backward(
        &self,
        dy: &Tensor<Self>,
        x: &Tensor<Self>,
        p: &Pool2dParams,
        relu: bool,
    ) -> Tensor<Self> {
        let xs = dims4(&x.shape, "pool2d x");
        assert_eq!(
            dy.shape,
            [xs[0], xs[1], p.out_hw[0], p.out_hw[1]],
            "pool2d_backward dy shape"
        );
        self.wrap(
            self.pool2d_backward_impl(&dy.buf, &x.buf, xs, p, relu),
            &x.shape,
        )
    }
}

impl Backend for CpuBackend {
    type Buf = CpuBuf;

    fn describe(&self) -> String {
        format!(
            "cpu ({} thread{})",
            self.threads,
            if self.threads == 1 { "" } else { "s" }
        )
    }

    fn batch_slices(&self, n: usize) -> usize {
        // At least one slice per worker, and slices of at most SLICE_SAMPLES so that a slice's
        // activations stay in cache from one op to the next.
        self.threads.max(n.div_ceil(SLICE_SAMPLES)).min(n).max(1)
    }

    fn batch_slices_forward(&self, n: usize) -> usize {
        self.threads
            .max(n.div_ceil(FORWARD_SLICE_SAMPLES))
            .min(n)
            .max(1)
    }

    fn run_slices(&self, parts: usize, f: &(dyn Fn(usize) + Sync)) {
        use rayon::prelude::*;
        // With a slice per worker, each slice's ops run on the worker that took it: no op waits
        // for another thread, which is the point of slicing. Fewer slices than workers (a batch
        // of 4 on 16 threads) leave the ops their own parallelism for the idle workers.
        let solo = parts >= self.threads;
        let run = |i: usize| {
            // Restores the thread's flag however `f` ends (a panic unwinds through here).
            struct Restore(bool);
            impl Drop for Restore {
                fn drop(&mut self) {
                    IN_SLICE.with(|s| s.set(self.0));
                }
            }
            let _restore = Restore(IN_SLICE.with(|s| s.replace(solo)));
            f(i);
        };
        #[cfg(test)]
        let old = OLD_SLICES.load(std::sync::atomic::Ordering::Relaxed);
        #[cfg(not(test))]
        let old = false;
        #[cfg(test)]
        let no_crew = NO_CREW.load(std::sync::atomic::Ordering::Relaxed);
        #[cfg(not(test))]
        let no_crew = false;
        // At least a slice per worker: the calling thread and the crew's helpers, which spin
        // between calls, take the slices (two threads, the small CNN, 3 runs of 1000 calls each
        // way, median call: 1.48-1.79 against 1.59-1.76 ms at batch 64 and 0.41-0.53 against
        // 0.48-0.54 ms at batch 16 on the rayon pool, whose sleeping workers a 2-core VM is
        // slow to wake).
        if solo && self.threads > 1 && !old && !no_crew {
            let crew = self.crew.get_or_init(|| crew::Crew::new(self.threads - 1));
            if crew.as_ref().is_some_and(|c| c.run(parts, &run)) {
                return;
            }
        }
        // No crew (another caller holds it, or its threads did not start), or fewer slices
        // than workers (a batch of 4 on 16 threads leaves the ops their own parallelism on the
        // pool). One slice per worker: the calling thread runs the first itself and the pool
        // the others, so a call wakes one thread fewer and the caller does not sleep through
        // its own work (1.01-1.36 against 1.05-1.41 ms a call in the case above).
        match &self.pool {
            Some(p) if parts == self.threads && !old => p.in_place_scope(|s| {
                for i in 1..parts {
                    s.spawn(move |_| run(i));
                }
                run(0);
            }),
            _ => self.install(|| (0..parts).into_par_iter().for_each(run)),
        }
    }

    fn upload(&self, data: &[f32], shape: &[usize]) -> Tensor<Self> {
        assert_eq!(
            data.len(),
            shape.iter().product::<usize>(),
            "upload: data does not match shape"
        );
        let mut v = self.out_dirty(data.len());
        v.copy_from_slice(data);
        self.wrap(v, shape)
    }

    fn download(&self, t: &Tensor<Self>) -> Vec<f32> {
        t.buf[..t.len()].to_vec()
    }

    fn zeros(&self, shape: &[usize]) -> Tensor<Self> {
        self.fill(shape, 0.0)
    }

    fn fill(&self, shape: &[usize], value: f32) -> Tensor<Self> {
        let mut v = self.out_dirty(shape.iter().product());
        v.fill(value);
        self.wrap(v, shape)
    }

    fn transpose(&self, x: &Tensor<Self>, perm: &[usize]) -> Tensor<Self> {
        let (data, shape) = self.transpose_impl(&x.buf, &x.shape, perm);
        self.wrap(data, &shape)
    }

    fn concat(&self, xs: &[&Tensor<Self>], axis: usize) -> Tensor<Self> {
        let parts: Vec<(&[f32], &[usize])> = xs
            .iter()
            .map(|t| (&t.buf[..], t.shape.as_slice()))
            .collect();
        let (data, shape) = ops::concat(&parts, axis);
        self.wrap(data, &shape)
    }

    fn slice(&self, x: &Tensor<Self>, axis: usize, start: usize, end: usize) -> Tensor<Self> {
        let (data, shape) = self.slice_impl(&x.buf, &x.shape, axis, start, end);
        self.wrap(data, &shape)
    }

    fn pad(
        &self,
        x: &Tensor<Self>,
        pads: &[(usize, usize)],
        mode: PadMode,
        value: f32,
    ) -> Tensor<Self> {
        let (data, shape) = ops::pad(&x.buf, &x.shape, pads, mode, value);
        self.wrap(data, &shape)
    }

    fn pad_backward(
        &self,
        dy: &Tensor<Self>,
        x_shape: &[usize],
        pads: &[(usize, usize)],
        mode: PadMode,
    ) -> Tensor<Self> {
        let data = ops::pad_backward(&dy.buf, &dy.shape, x_shape, pads, mode);
        self.wrap(data, x_shape)
    }

    fn broadcast_to(&self, x: &Tensor<Self>, shape: &[usize]) -> Tensor<Self> {
        if x.shape == shape {
            return x.clone();
        }
        self.wrap(self.broadcast_impl(&x.buf, &x.shape, shape), shape)
    }

    fn conv2d(
        &self,
        x: &Tensor<Self>,
        w: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
        p: &Conv2dParams,
    ) -> Tensor<Self> {
        let (data, shape) = self.conv2d_impl(
            &x.buf,
            dims4(&x.shape, "conv2d x"),
            wcache::Weights::of(&w.buf),
            dims4(&w.shape, "conv2d w"),
            bias.map(|b| &b.buf[..]),
            p,
            None,
        );
        self.wrap(data, &shape)
    }

    fn conv2d_act(
        &self,
        x: &Tensor<Self>,
        w: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
        p: &Conv2dParams,
        act: Unary,
    ) -> Tensor<Self> {
        let (data, shape) = self.conv2d_impl(
            &x.buf,
            dims4(&x.shape, "conv2d x"),
            wcache::Weights::of(&w.buf),
            dims4(&w.shape, "conv2d w"),
            bias.map(|b| &b.buf[..]),
            p,
            Some(act),
        );
        self.wrap(data, &shape)
    }

    fn conv2d_act_pool(
        &self,
        x: &Tensor<Self>,
        w: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
        p: &Conv2dParams,
        act: Unary,
        pool: &Pool2dParams,
    ) -> Tensor<Self> {
        if let Some((data, shape)) = self.conv2d_act_maxpool2(
            &x.buf,
            dims4(&x.shape, "conv2d x"),
            wcache::Weights::of(&w.buf),
            dims4(&w.shape, "conv2d w"),
            bias.map(|b| &b.buf[..]),
            p,
            act,
            pool,
        ) {
            return self.wrap(data, &shape);
        }
        self.pool2d(&self.conv2d_act(x, w, bias, p, act), pool)
    }

    fn conv2d_backward_input(
        &self,
        dy: &Tensor<Self>,
        w: &Tensor<Self>,
        p: &Conv2dParams,
        x_shape: [usize; 4],
    ) -> Tensor<Self> {
        let data = self.conv2d_backward_input_impl(
            &dy.buf,
            &dy.shape,
            wcache::Weights::of(&w.buf),
            dims4(&w.shape, "conv2d w"),
            p,
            x_shape,
        );
        self.wrap(data, &x_shape)
    }

    fn conv2d_backward_weight(
        &self,
        dy: &Tensor<Self>,
        x: &Tensor<Self>,
        p: &Conv2dParams,
        w_shape: [usize; 4],
    ) -> Tensor<Self> {
        let data = self.conv2d_backward_weight_impl(
            &dy.buf,
            &dy.shape,
            &x.buf,
            dims4(&x.shape, "conv2d x"),
            p,
            w_shape,
        );
        self.wrap(data, &w_shape)
    }

    fn matmul(
        &self,
        a: &Tensor<Self>,
        b: &Tensor<Self>,
        trans_a: bool,
        trans_b: bool,
    ) -> Tensor<Self> {
        let (data, shape) = self.matmul_impl(
            &a.buf,
            &a.shape,
            wcache::Weights::of(&b.buf),
            &b.shape,
            trans_a,
            trans_b,
        );
        self.wrap(data, &shape)
    }

    fn pool2d(&self, x: &Tensor<Self>, p: &Pool2dParams) -> Tensor<Self> {
        let xs = dims4(&x.shape, "pool2d x");
        let data = self.pool2d_impl(&x.buf, xs, p);
        self.wrap(data, &[xs[0], xs[1], p.out_hw[0], p.out_hw[1]])
    }

    fn pool2d_backward(
        &self,
        dy: &Tensor<Self>,
        x: &Tensor<Self>,
        p: &Pool2dParams,
    ) -> Tensor<Self> {
        self.pool_backward(dy, x, p, false)
    }

    fn relu_pool2d_backward(
        &self,
        dy: &Tensor<Self>,
        r: &Tensor<Self>,
        p: &Pool2dParams,
    ) -> Tensor<Self> {
        self.pool_backward(dy, r, p, true)
    }

    fn unary(&self, op: Unary, x: &Tensor<Self>) -> Tensor<Self> {
        self.wrap(self.unary_map(op, &x.buf[..x.len()]), &x.shape)
    }

    fn unary_backward(
        &self,
        op: Unary,
        x: &Tensor<Self>,
        y: &Tensor<Self>,
        dy: &Tensor<Self>,
    ) -> Tensor<Self> {
        assert!(
            x.shape == dy.shape && y.shape == dy.shape,
            "unary_backward shapes"
        );
        let data = self.unary_backward_map(op, &x.buf, &y.buf, &dy.buf);
        self.wrap(data, &x.shape)
    }

    fn binary(&self, op: Binary, a: &Tensor<Self>, b: &Tensor<Self>) -> Tensor<Self> {
        let (data, shape) = self.binary_impl(op, &a.buf, &a.shape, &b.buf, &b.shape);
        self.wrap(data, &shape)
    }

    fn binary_act(
        &self,
        op: Binary,
        a: &Tensor<Self>,
        b: &Tensor<Self>,
        act: Unary,
    ) -> Tensor<Self> {
        // Same shapes (a residual Add): one pass, each element as the two ops compute it.
        // Anything broadcast keeps the two passes.
        if a.shape != b.shape {
            return self.unary(act, &self.binary(op, a, b));
        }
        let (x, y) = (&a.buf[..a.len()], &b.buf[..b.len()]);
        let data = match (op, act) {
            // Monomorphised for the common pair, so the loop vectorises.
            (Binary::Add, Unary::Relu) => self.map2(x, y, |u, v| (u + v).max(0.0)),
            _ => self.map2(x, y, move |u, v| {
                ops::unary_f32(act, ops::binary_f32(op, u, v))
            }),
        };
        self.wrap(data, &a.shape)
    }

    fn reduce_sum_to(&self, x: &Tensor<Self>, shape: &[usize]) -> Tensor<Self> {
        if x.shape == shape {
            return x.clone();
        }
        self.wrap(self.reduce_sum_to_impl(&x.buf, &x.shape, shape), shape)
    }

    fn reduce(
        &self,
        x: &Tensor<Self>,
        axes: &[usize],
        op: ReduceOp,
        keepdims: bool,
    ) -> Tensor<Self> {
        let (data, shape) = self.reduce_impl(&x.buf, &x.shape, axes, op, keepdims);
        self.wrap(data, &shape)
    }

    fn softmax(&self, x: &Tensor<Self>, axis: usize, log: bool) -> Tensor<Self> {
        self.wrap(self.softmax_impl(&x.buf, &x.shape, axis, log), &x.shape)
    }

    fn softmax_backward(
        &self,
        y: &Tensor<Self>,
        dy: &Tensor<Self>,
        axis: usize,
        log: bool,
    ) -> Tensor<Self> {
        assert_eq!(y.shape, dy.shape, "softmax_backward shapes");
        self.wrap(
            self.softmax_backward_impl(&y.buf, &dy.buf, &y.shape, axis, log),
            &y.shape,
        )
    }

    fn loss(
        &self,
        kind: Loss,
        logits: &Tensor<Self>,
        targets: &LossTargets<'_, Self>,
    ) -> (Tensor<Self>, Tensor<Self>) {
        let t = match targets {
            LossTargets::Classes(c) => ops::Targets::Classes(c),
            LossTargets::Dense(t) => {
                assert_eq!(t.shape, logits.shape, "dense loss target shape");
                ops::Targets::Dense(&t.buf)
            }
        };
        let (l, g) = ops::loss(kind, &logits.buf, &logits.shape, t);
        let n = logits.shape[0];
        (self.wrap(l, &[n]), self.wrap(g, &logits.shape))
    }

    fn resize(&self, x: &Tensor<Self>, p: &ResizeParams) -> Tensor<Self> {
        let xs = dims4(&x.shape, "resize x");
        let data = self.resize_impl(&x.buf, xs, p);
        self.wrap(data, &[xs[0], xs[1], p.out_hw[0], p.out_hw[1]])
    }

    fn resize_backward(
        &self,
        dy: &Tensor<Self>,
        x_shape: [usize; 4],
        p: &ResizeParams,
    ) -> Tensor<Self> {
        assert_eq!(
            dy.shape,
            [x_shape[0], x_shape[1], p.out_hw[0], p.out_hw[1]],
            "resize_backward dy shape"
        );
        self.wrap(self.resize_backward_impl(&dy.buf, x_shape, p), &x_shape)
    }

    fn sign_step(&self, x: &Tensor<Self>, g: &Tensor<Self>, alpha: f32) -> Tensor<Self> {
        assert_eq!(x.shape, g.shape, "sign_step shapes");
        self.wrap(
            self.map2(&x.buf, &g.buf, |v, gv| v + alpha * ops::sign_f32(gv)),
            &x.shape,
        )
    }

    fn l2_step(&self, x: &Tensor<Self>, g: &Tensor<Self>, alpha: f32) -> Tensor<Self> {
        assert_eq!(x.shape, g.shape, "l2_step shapes");
        self.wrap(ops::l2_step(&x.buf, &g.buf, &x.shape, alpha), &x.shape)
    }

    fn project(&self, x: &Tensor<Self>, x0: &Tensor<Self>, eps: f32, norm: Norm) -> Tensor<Self> {
        assert_eq!(x.shape, x0.shape, "project shapes");
        self.wrap(ops::project(&x.buf, &x0.buf, &x.shape, eps, norm), &x.shape)
    }

    fn clamp_per_sample(&self, x: &Tensor<Self>, lo: &[f32], hi: &[f32]) -> Tensor<Self> {
        self.wrap(ops::clamp_per_sample(&x.buf, &x.shape, lo, hi), &x.shape)
    }

    fn norm_per_sample(&self, x: &Tensor<Self>, norm: Norm) -> Tensor<Self> {
        let data = ops::norm_per_sample(&x.buf, &x.shape, norm);
        let n = data.len();
        self.wrap(data, &[n])
    }

    fn random_uniform(&self, shape: &[usize], seed: u64, lo: f32, hi: f32) -> Tensor<Self> {
        let data = self.generate(shape.iter().product(), |i| {
            lo + (hi - lo) * crate::runtime::backend::counter_uniform(seed, i as u32)
        });
        self.wrap(data, shape)
    }

    fn random_normal(&self, shape: &[usize], seed: u64, std: f32) -> Tensor<Self> {
        let data = self.generate(shape.iter().product(), |i| {
            std * crate::runtime::backend::counter_normal(seed, i as u32)
        });
        self.wrap(data, shape)
    }
}
