//! The WGSL GPU backend: [`GpuBackend`] implements [`Backend`] with hand-written compute kernels
//! (`shaders/*.wgsl`, one file per kernel family) on wgpu, so it runs on Vulkan, Metal and DX12
//! devices and on software Vulkan (lavapipe) alike.
//!
//! Portability choices: no push constants (parameters travel in a small uniform block), no f16,
//! no subgroup operations, no float atomics (every reduction is a fixed-order gather, so results
//! are bit-reproducible). Tensors stay on the device between ops; [`Backend::download`] is the
//! only readback and the only place the host waits for the device.
//!
//! Each family has a Rust twin module owning its bind-group signature and dispatch helper:
//! `conv`, `matmul`, `pool`, `elementwise`, `reduce`, `resize`, `perturbation`, `movement`;
//! `context` holds the device, pipeline cache, buffer pool and batched submission.

mod context;
mod conv;
mod custom;
mod elementwise;
mod matmul;
mod movement;
mod perturbation;
mod pool;
mod reduce;
mod resize;

#[cfg(test)]
mod tests;

use std::sync::Arc;

use context::Ctx;
pub use context::{Buf, GpuBuffer};

use crate::runtime::backend::{
    Backend, Binary, Conv2dParams, Loss, LossTargets, Norm, PadMode, Pool2dParams, ReduceOp,
    ResizeParams, Tensor, Unary,
};

/// Install hint shown whenever no usable adapter exists.
const DRIVER_HINT: &str = "install a Vulkan driver, e.g. `apt-get install mesa-vulkan-drivers`";

/// Which kinds of adapter [`GpuBackend::new`] may pick.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AdapterPolicy {
    /// A real GPU only (anything wgpu does not report as `DeviceType::Cpu`).
    HardwareOnly,
    /// A software rasteriser only (e.g. lavapipe): reproducible CI without a GPU.
    SoftwareOnly,
    /// Prefer a discrete, then integrated, then any other GPU, then software.
    #[default]
    Any,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct GpuOptions {
    pub adapter: AdapterPolicy,
}

#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("no GPU adapter with compute support was found; {DRIVER_HINT}")]
    NoAdapter,
    #[error(
        "only software adapters were found ({found}) but a hardware GPU is required; use a \
         machine with a GPU and its Vulkan/Metal/DX12 driver, or allow the software adapter"
    )]
    OnlySoftware { found: String },
    #[error("no software adapter was found (found: {found}); {DRIVER_HINT}")]
    NoSoftware { found: String },
    #[error("could not open GPU device on adapter `{adapter}`: {source}")]
    RequestDevice {
        adapter: String,
        #[source]
        source: wgpu::RequestDeviceError,
    },
}

/// The GPU backend. Cloning shares the device.
#[derive(Clone)]
pub struct GpuBackend {
    ctx: Arc<Ctx>,
}

impl std::fmt::Debug for GpuBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

fn api_name(b: wgpu::Backend) -> &'static str {
    match b {
        wgpu::Backend::Vulkan => "Vulkan",
        wgpu::Backend::Metal => "Metal",
        wgpu::Backend::Dx12 => "DX12",
        wgpu::Backend::Gl => "OpenGL",
        wgpu::Backend::BrowserWebGpu => "WebGPU",
        wgpu::Backend::Noop => "noop",
    }
}

/// Preference order under [`AdapterPolicy::Any`] (lower is better).
fn rank(t: wgpu::DeviceType) -> u8 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    }
}

impl GpuBackend {
    /// Opens a device according to `opts`, requesting the adapter's own limits so that large
    /// tensors fit in one storage binding on real GPUs.
    pub fn new(opts: GpuOptions) -> Result<GpuBackend, GpuError> {
        // GL lacks the compute guarantees the kernels rely on; the primary APIs all have them.
        let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
        desc.backends = wgpu::Backends::PRIMARY;
        let instance = wgpu::Instance::new(desc);
        let adapters: Vec<wgpu::Adapter> =
            pollster::block_on(instance.enumerate_adapters(wgpu::Backends::PRIMARY))
                .into_iter()
                .filter(|a| {
                    a.get_downlevel_capabilities()
                        .flags
                        .contains(wgpu::DownlevelFlags::COMPUTE_SHADERS)
                })
                .collect();
        if adapters.is_empty() {
            return Err(GpuError::NoAdapter);
        }
        let found = adapters
            .iter()
            .map(|a| {
                let i = a.get_info();
                format!("{} ({:?})", i.name, i.device_type)
            })
            .collect::<Vec<_>>()
            .join(", ");
        let is_sw = |a: &wgpu::Adapter| a.get_info().device_type == wgpu::DeviceType::Cpu;
        let mut candidates: Vec<wgpu::Adapter> = match opts.adapter {
            AdapterPolicy::HardwareOnly => adapters.into_iter().filter(|a| !is_sw(a)).collect(),
            AdapterPolicy::SoftwareOnly => adapters.into_iter().filter(is_sw).collect(),
            AdapterPolicy::Any => adapters,
        };
        candidates.sort_by_key(|a| rank(a.get_info().device_type));
        let Some(adapter) = candidates.into_iter().next() else {
            return Err(match opts.adapter {
                AdapterPolicy::HardwareOnly => GpuError::OnlySoftware { found },
                _ => GpuError::NoSoftware { found },
            });
        };
        let info = adapter.get_info();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("adverse"),
            required_features: wgpu::Features::empty(),
            required_limits: adapter.limits(),
            ..Default::default()
        }))
        .map_err(|source| GpuError::RequestDevice {
            adapter: info.name.clone(),
            source,
        })?;
        Ok(GpuBackend {
            ctx: Arc::new(Ctx::new(device, queue, info)),
        })
    }

    /// Whether the device is a software rasteriser.
    pub fn is_software(&self) -> bool {
        self.ctx.info.device_type == wgpu::DeviceType::Cpu
    }

    /// Submits all recorded work without waiting (e.g. before timing host-side work).
    pub fn flush(&self) {
        self.ctx.flush();
    }

    /// Submits all recorded work and waits for the device to finish it (per-op profiling).
    pub fn wait(&self) {
        self.ctx.wait();
    }

    fn wrap(&self, buf: Buf, shape: &[usize]) -> Tensor<Self> {
        Tensor {
            buf,
            shape: shape.to_vec(),
        }
    }
}

fn same_shape(a: &[usize], b: &[usize], what: &str) {
    assert_eq!(a, b, "{what}: shapes differ");
}

impl Backend for GpuBackend {
    type Buf = Buf;

    fn describe(&self) -> String {
        format!(
            "gpu ({}, {})",
            self.ctx.info.name,
            api_name(self.ctx.info.backend)
        )
    }

    // ---- data movement ----------------------------------------------------------------------
    fn upload(&self, data: &[f32], shape: &[usize]) -> Tensor<Self> {
        assert_eq!(
            data.len(),
            shape.iter().product::<usize>(),
            "upload: data vs shape {shape:?}"
        );
        self.wrap(self.ctx.upload_f32(data), shape)
    }

    fn download(&self, t: &Tensor<Self>) -> Vec<f32> {
        self.ctx.read(&t.buf, t.len())
    }

    fn zeros(&self, shape: &[usize]) -> Tensor<Self> {
        let buf = self.ctx.alloc(shape.iter().product());
        self.ctx.clear(&buf);
        self.wrap(buf, shape)
    }

    fn fill(&self, shape: &[usize], value: f32) -> Tensor<Self> {
        self.wrap(
            elementwise::fill(&self.ctx, shape.iter().product(), value),
            shape,
        )
    }

    fn transpose(&self, x: &Tensor<Self>, perm: &[usize]) -> Tensor<Self> {
        let (b, s) = movement::transpose(&self.ctx, &x.buf, &x.shape, perm);
        self.wrap(b, &s)
    }

    fn concat(&self, xs: &[&Tensor<Self>], axis: usize) -> Tensor<Self> {
        let parts: Vec<(&Buf, &[usize])> = xs.iter().map(|t| (&t.buf, &t.shape[..])).collect();
        let (b, s) = movement::concat(&self.ctx, &parts, axis);
        self.wrap(b, &s)
    }

    fn slice(&self, x: &Tensor<Self>, axis: usize, start: usize, end: usize) -> Tensor<Self> {
        let (b, s) = movement::slice(&self.ctx, &x.buf, &x.shape, axis, start, end);
        self.wrap(b, &s)
    }

    fn pad(
        &self,
        x: &Tensor<Self>,
        pads: &[(usize, usize)],
        mode: PadMode,
        value: f32,
    ) -> Tensor<Self> {
        let (b, s) = movement::pad(&self.ctx, &x.buf, &x.shape, pads, mode, value);
        self.wrap(b, &s)
    }

    fn pad_backward(
        &self,
        dy: &Tensor<Self>,
        x_shape: &[usize],
        pads: &[(usize, usize)],
        mode: PadMode,
    ) -> Tensor<Self> {
        let b = movement::pad_backward(&self.ctx, &dy.buf, &dy.shape, x_shape, pads, mode);
        self.wrap(b, x_shape)
    }

    fn broadcast_to(&self, x: &Tensor<Self>, shape: &[usize]) -> Tensor<Self> {
        self.wrap(
            movement::broadcast_to(&self.ctx, &x.buf, &x.shape, shape),
            shape,
        )
    }

    // ---- conv family -------------------------------------------------------------------------
    fn conv2d(
        &self,
        x: &Tensor<Self>,
        w: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
        p: &Conv2dParams,
    ) -> Tensor<Self> {
        if let Some(b) = bias {
            assert_eq!(b.shape, [w.shape[0]], "conv2d bias shape");
        }
        let (b, s) = conv::conv2d(
            &self.ctx,
            &x.buf,
            &x.shape,
            &w.buf,
            &w.shape,
            bias.map(|b| &b.buf),
            p,
        );
        self.wrap(b, &s)
    }

    fn conv2d_backward_input(
        &self,
        dy: &Tensor<Self>,
        w: &Tensor<Self>,
        p: &Conv2dParams,
        x_shape: [usize; 4],
    ) -> Tensor<Self> {
        let b = conv::conv2d_backward_input(
            &self.ctx, &dy.buf, &dy.shape, &w.buf, &w.shape, p, x_shape,
        );
        self.wrap(b, &x_shape)
    }

    fn conv2d_backward_weight(
        &self,
        dy: &Tensor<Self>,
        x: &Tensor<Self>,
        p: &Conv2dParams,
        w_shape: [usize; 4],
    ) -> Tensor<Self> {
        let b = conv::conv2d_backward_weight(
            &self.ctx, &dy.buf, &dy.shape, &x.buf, &x.shape, p, w_shape,
        );
        self.wrap(b, &w_shape)
    }

    // ---- matmul family -----------------------------------------------------------------------
    fn matmul(
        &self,
        a: &Tensor<Self>,
        b: &Tensor<Self>,
        trans_a: bool,
        trans_b: bool,
    ) -> Tensor<Self> {
        let (c, s) = matmul::matmul(
            &self.ctx, &a.buf, &a.shape, &b.buf, &b.shape, trans_a, trans_b,
        );
        self.wrap(c, &s)
    }

    // ---- pool family -------------------------------------------------------------------------
    fn pool2d(&self, x: &Tensor<Self>, p: &Pool2dParams) -> Tensor<Self> {
        let (b, s) = pool::pool2d(&self.ctx, &x.buf, &x.shape, p);
        self.wrap(b, &s)
    }

    fn pool2d_backward(
        &self,
        dy: &Tensor<Self>,
        x: &Tensor<Self>,
        p: &Pool2dParams,
    ) -> Tensor<Self> {
        let b = pool::pool2d_backward(&self.ctx, &dy.buf, &dy.shape, &x.buf, &x.shape, p);
        self.wrap(b, &x.shape)
    }

    // ---- elementwise family --------------------------------------------------------------------
    fn unary(&self, op: Unary, x: &Tensor<Self>) -> Tensor<Self> {
        self.wrap(elementwise::unary(&self.ctx, op, &x.buf, x.len()), &x.shape)
    }

    fn unary_backward(
        &self,
        op: Unary,
        x: &Tensor<Self>,
        y: &Tensor<Self>,
        dy: &Tensor<Self>,
    ) -> Tensor<Self> {
        same_shape(&x.shape, &dy.shape, "unary_backward");
        same_shape(&y.shape, &dy.shape, "unary_backward");
        let b = elementwise::unary_backward(&self.ctx, op, &x.buf, &y.buf, &dy.buf, x.len());
        self.wrap(b, &x.shape)
    }

    fn binary(&self, op: Binary, a: &Tensor<Self>, b: &Tensor<Self>) -> Tensor<Self> {
        let (o, s) = elementwise::binary(&self.ctx, op, &a.buf, &a.shape, &b.buf, &b.shape);
        self.wrap(o, &s)
    }

    fn reduce_sum_to(&self, x: &Tensor<Self>, shape: &[usize]) -> Tensor<Self> {
        assert!(
            shape.len() <= x.shape.len(),
            "cannot reduce {:?} to {shape:?}",
            x.shape
        );
        let off = x.shape.len() - shape.len();
        let reduced: Vec<bool> = (0..x.shape.len())
            .map(|d| {
                let target = if d < off { 1 } else { shape[d - off] };
                assert!(
                    target == x.shape[d] || target == 1,
                    "cannot reduce {:?} to {shape:?}",
                    x.shape
                );
                target == 1 && x.shape[d] != 1
            })
            .collect();
        self.wrap(
            reduce::reduce_axes(&self.ctx, &x.buf, &x.shape, &reduced, 1.0),
            shape,
        )
    }

    // ---- reduce / softmax / loss family ---------------------------------------------------------
    fn reduce(
        &self,
        x: &Tensor<Self>,
        axes: &[usize],
        op: ReduceOp,
        keepdims: bool,
    ) -> Tensor<Self> {
        assert!(
            axes.windows(2).all(|w| w[0] < w[1]),
            "reduce axes must be sorted and unique"
        );
        assert!(
            axes.iter().all(|&a| a < x.shape.len()),
            "reduce axis out of range"
        );
        let reduced: Vec<bool> = (0..x.shape.len()).map(|d| axes.contains(&d)).collect();
        let count: usize = axes.iter().map(|&a| x.shape[a]).product();
        let scale = match op {
            ReduceOp::Sum => 1.0,
            ReduceOp::Mean => 1.0 / count as f32,
        };
        let out_shape: Vec<usize> = x
            .shape
            .iter()
            .enumerate()
            .filter_map(|(d, &n)| match (reduced[d], keepdims) {
                (true, true) => Some(1),
                (true, false) => None,
                (false, _) => Some(n),
            })
            .collect();
        self.wrap(
            reduce::reduce_axes(&self.ctx, &x.buf, &x.shape, &reduced, scale),
            &out_shape,
        )
    }

    fn softmax(&self, x: &Tensor<Self>, axis: usize, log: bool) -> Tensor<Self> {
        self.wrap(
            reduce::softmax(&self.ctx, &x.buf, &x.shape, axis, log),
            &x.shape,
        )
    }

    fn softmax_backward(
        &self,
        y: &Tensor<Self>,
        dy: &Tensor<Self>,
        axis: usize,
        log: bool,
    ) -> Tensor<Self> {
        same_shape(&y.shape, &dy.shape, "softmax_backward");
        self.wrap(
            reduce::softmax_backward(&self.ctx, &y.buf, &dy.buf, &y.shape, axis, log),
            &y.shape,
        )
    }

    fn loss(
        &self,
        kind: Loss,
        logits: &Tensor<Self>,
        targets: &LossTargets<'_, Self>,
    ) -> (Tensor<Self>, Tensor<Self>) {
        let target = match targets {
            LossTargets::Classes(c) => reduce::LossTarget::Classes(c),
            LossTargets::Dense(t) => {
                same_shape(&t.shape, &logits.shape, "MSE target");
                reduce::LossTarget::Dense(&t.buf)
            }
        };
        let (l, g) = reduce::loss(&self.ctx, kind, &logits.buf, &logits.shape, target);
        (
            self.wrap(l, &logits.shape[..1]),
            self.wrap(g, &logits.shape),
        )
    }

    // ---- resize family -------------------------------------------------------------------------
    fn resize(&self, x: &Tensor<Self>, p: &ResizeParams) -> Tensor<Self> {
        let (b, s) = resize::resize(&self.ctx, &x.buf, &x.shape, p);
        self.wrap(b, &s)
    }

    fn resize_backward(
        &self,
        dy: &Tensor<Self>,
        x_shape: [usize; 4],
        p: &ResizeParams,
    ) -> Tensor<Self> {
        self.wrap(
            resize::resize_backward(&self.ctx, &dy.buf, &dy.shape, x_shape, p),
            &x_shape,
        )
    }

    // ---- perturbation family -------------------------------------------------------------------
    fn sign_step(&self, x: &Tensor<Self>, g: &Tensor<Self>, alpha: f32) -> Tensor<Self> {
        same_shape(&x.shape, &g.shape, "sign_step");
        self.wrap(
            perturbation::sign_step(&self.ctx, &x.buf, &g.buf, x.len(), alpha),
            &x.shape,
        )
    }

    fn l2_step(&self, x: &Tensor<Self>, g: &Tensor<Self>, alpha: f32) -> Tensor<Self> {
        same_shape(&x.shape, &g.shape, "l2_step");
        self.wrap(
            perturbation::l2_step(&self.ctx, &x.buf, &g.buf, &x.shape, alpha),
            &x.shape,
        )
    }

    fn project(&self, x: &Tensor<Self>, x0: &Tensor<Self>, eps: f32, norm: Norm) -> Tensor<Self> {
        same_shape(&x.shape, &x0.shape, "project");
        self.wrap(
            perturbation::project(&self.ctx, &x.buf, &x0.buf, &x.shape, eps, norm),
            &x.shape,
        )
    }

    fn clamp_per_sample(&self, x: &Tensor<Self>, lo: &[f32], hi: &[f32]) -> Tensor<Self> {
        self.wrap(
            perturbation::clamp_per_sample(&self.ctx, &x.buf, &x.shape, lo, hi),
            &x.shape,
        )
    }

    fn norm_per_sample(&self, x: &Tensor<Self>, norm: Norm) -> Tensor<Self> {
        let (n, _) = perturbation::per_sample(&x.shape);
        self.wrap(
            perturbation::norms(&self.ctx, &x.buf, None, &x.shape, norm),
            &[n],
        )
    }

    fn random_uniform(&self, shape: &[usize], seed: u64, lo: f32, hi: f32) -> Tensor<Self> {
        let len = shape.iter().product();
        self.wrap(
            perturbation::random_uniform(&self.ctx, len, seed, lo, hi),
            shape,
        )
    }

    fn random_normal(&self, shape: &[usize], seed: u64, std: f32) -> Tensor<Self> {
        let len = shape.iter().product();
        self.wrap(
            perturbation::random_normal(&self.ctx, len, seed, std),
            shape,
        )
    }
}
