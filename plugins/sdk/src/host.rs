//! Safe wrappers over the host services table ([`abi::AdvHost`]).

use std::ffi::{c_char, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};

use crate::abi::{self, AdvHost, AdvStatus, AdvTensor};
use crate::{Error, Result};

/// A tensor handle on the host's active backend, valid during the current call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tensor(pub AdvTensor);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    Cpu,
    Gpu,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Norm {
    L1,
    L2,
    Linf,
}

impl Norm {
    fn raw(self) -> u32 {
        match self {
            Norm::L1 => abi::ADV_NORM_L1,
            Norm::L2 => abi::ADV_NORM_L2,
            Norm::Linf => abi::ADV_NORM_LINF,
        }
    }
}

/// The objective the model service differentiates (always one to ascend).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LossKind {
    CrossEntropy,
    CwMargin { kappa: f32 },
    Dlr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
}

/// A frame's description ([`abi::AdvFrameMeta`] in Rust types).
#[derive(Debug, Clone, PartialEq)]
pub struct FrameMeta {
    pub rows: u32,
    pub cols: u32,
    pub samples_per_pixel: u32,
    pub bits_allocated: u32,
    pub bits_stored: u32,
    pub signed: bool,
    pub float: bool,
    pub frame_index: u32,
    pub rescale_slope: f64,
    pub rescale_intercept: f64,
    /// (center, width) of the first VOI window.
    pub window: Option<(f64, f64)>,
    /// Representable stored-value range.
    pub value_range: (f64, f64),
    pub label: Option<u32>,
    pub target: Option<u32>,
    pub modality: String,
}

impl FrameMeta {
    /// Converts the C struct (as filled by a host).
    pub fn from_raw(m: &abi::AdvFrameMeta) -> FrameMeta {
        let bytes: Vec<u8> = m
            .modality
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        let opt = |v: i64| u32::try_from(v).ok();
        FrameMeta {
            rows: m.rows,
            cols: m.cols,
            samples_per_pixel: m.samples_per_pixel,
            bits_allocated: m.bits_allocated,
            bits_stored: m.bits_stored,
            signed: m.is_signed != 0,
            float: m.is_float != 0,
            frame_index: m.frame_index,
            rescale_slope: m.rescale_slope,
            rescale_intercept: m.rescale_intercept,
            window: (m.has_window != 0).then_some((m.window_center, m.window_width)),
            value_range: (m.value_min, m.value_max),
            label: opt(m.label),
            target: opt(m.target),
            modality: String::from_utf8_lossy(&bytes).into_owned(),
        }
    }

    /// The C struct for this metadata (hosts use it to answer `frame_meta`).
    pub fn to_raw(&self) -> abi::AdvFrameMeta {
        let mut modality = [0 as c_char; 16];
        for (d, s) in modality.iter_mut().zip(self.modality.bytes().take(15)) {
            *d = s as c_char;
        }
        abi::AdvFrameMeta {
            size: std::mem::size_of::<abi::AdvFrameMeta>() as u32,
            rows: self.rows,
            cols: self.cols,
            samples_per_pixel: self.samples_per_pixel,
            bits_allocated: self.bits_allocated,
            bits_stored: self.bits_stored,
            is_signed: self.signed as u32,
            is_float: self.float as u32,
            has_window: self.window.is_some() as u32,
            frame_index: self.frame_index,
            rescale_slope: self.rescale_slope,
            rescale_intercept: self.rescale_intercept,
            window_center: self.window.map_or(0.0, |w| w.0),
            window_width: self.window.map_or(0.0, |w| w.1),
            value_min: self.value_range.0,
            value_max: self.value_range.1,
            label: self.label.map_or(-1, i64::from),
            target: self.target.map_or(-1, i64::from),
            modality,
        }
    }
}

/// One input of a CPU kernel: a tensor's downloaded data and shape.
#[derive(Debug, Clone, Copy)]
pub struct CpuInput<'a> {
    pub data: &'a [f32],
    pub shape: &'a [u64],
}

/// The CPU counterpart of a shader: `(inputs, params, out)`.
pub type CpuKernel<'s> = &'s (dyn Fn(&[CpuInput<'_>], &[f32], &mut [f32]) -> Result<()> + Sync);

/// A plugin-supplied compute kernel with its CPU fallback (see [`abi::AdvShaderCall`] for the
/// WGSL binding layout).
pub struct Shader<'s> {
    pub wgsl: &'s str,
    pub entry: &'s str,
    pub inputs: &'s [Tensor],
    pub out_shape: &'s [usize],
    pub params: &'s [f32],
    pub workgroups: [u32; 3],
    pub cpu: Option<CpuKernel<'s>>,
}

impl std::fmt::Debug for Shader<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shader")
            .field("entry", &self.entry)
            .field("out_shape", &self.out_shape)
            .finish_non_exhaustive()
    }
}

/// The host services, valid during one plugin call.
#[derive(Clone, Copy)]
pub struct Host<'a> {
    raw: &'a AdvHost,
}

impl std::fmt::Debug for Host<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("abi", &self.raw.abi)
            .finish_non_exhaustive()
    }
}

fn shape_u64(shape: &[usize]) -> Vec<u64> {
    shape.iter().map(|&d| d as u64).collect()
}

impl<'a> Host<'a> {
    /// # Safety
    /// `raw` must point to a host table valid for `'a` (what the host passes to a plugin call).
    pub unsafe fn from_raw(raw: *const AdvHost) -> Option<Host<'a>> {
        // SAFETY: the caller guarantees validity for 'a; null is checked by `as_ref`.
        let raw = unsafe { raw.as_ref()? };
        Some(Host { raw })
    }

    pub fn raw(&self) -> &'a AdvHost {
        self.raw
    }

    fn ctx(&self) -> *mut c_void {
        self.raw.ctx
    }

    /// The host's message for the last failed service.
    pub fn last_error(&self) -> String {
        let mut buf = vec![0u8; 512];
        // SAFETY: buf is writable for its length; the host writes at most `cap` bytes.
        let n = unsafe { (self.raw.last_error)(self.ctx(), buf.as_mut_ptr().cast(), buf.len()) };
        if n > buf.len() {
            buf = vec![0u8; n];
            // SAFETY: as above, with a buffer of the full length.
            unsafe { (self.raw.last_error)(self.ctx(), buf.as_mut_ptr().cast(), buf.len()) };
        }
        buf.truncate(n.min(buf.len()));
        String::from_utf8_lossy(&buf).into_owned()
    }

    fn check(&self, status: AdvStatus, what: &str) -> Result<()> {
        if status == abi::ADV_OK {
            Ok(())
        } else {
            Err(Error::new(format!(
                "host service {what} failed: {}",
                self.last_error()
            )))
        }
    }

    fn tensor_out(
        &self,
        what: &str,
        f: impl FnOnce(*mut AdvTensor) -> AdvStatus,
    ) -> Result<Tensor> {
        let mut out: AdvTensor = 0;
        let st = f(&mut out);
        self.check(st, what)?;
        Ok(Tensor(out))
    }

    /// Records the message for the error status about to be returned (used by the adapters).
    pub fn set_error(&self, msg: &str) {
        // SAFETY: (ptr, len) of a live str.
        unsafe { (self.raw.set_error)(self.ctx(), msg.as_ptr().cast(), msg.len()) }
    }

    pub fn log(&self, level: LogLevel, msg: &str) {
        let l = match level {
            LogLevel::Error => abi::ADV_LOG_ERROR,
            LogLevel::Warn => abi::ADV_LOG_WARN,
            LogLevel::Info => abi::ADV_LOG_INFO,
            LogLevel::Debug => abi::ADV_LOG_DEBUG,
        };
        // SAFETY: (ptr, len) of a live str.
        unsafe { (self.raw.log)(self.ctx(), l, msg.as_ptr().cast(), msg.len()) }
    }

    pub fn backend(&self) -> BackendKind {
        // SAFETY: plain call with the host's own context.
        match unsafe { (self.raw.backend_kind)(self.ctx()) } {
            abi::ADV_BACKEND_GPU => BackendKind::Gpu,
            _ => BackendKind::Cpu,
        }
    }

    pub fn zeros(&self, shape: &[usize]) -> Result<Tensor> {
        let s = shape_u64(shape);
        // SAFETY: shape points to `ndim` u64; out is a valid local.
        self.tensor_out("tensor_zeros", |o| unsafe {
            (self.raw.tensor_zeros)(self.ctx(), s.as_ptr(), s.len() as u32, o)
        })
    }

    pub fn upload(&self, data: &[f32], shape: &[usize]) -> Result<Tensor> {
        let s = shape_u64(shape);
        // SAFETY: data and shape are live slices passed with their lengths.
        self.tensor_out("tensor_upload", |o| unsafe {
            (self.raw.tensor_upload)(
                self.ctx(),
                data.as_ptr(),
                data.len(),
                s.as_ptr(),
                s.len() as u32,
                o,
            )
        })
    }

    pub fn shape(&self, t: Tensor) -> Result<Vec<usize>> {
        let mut dims = [0u64; 16];
        let mut nd = 0u32;
        // SAFETY: dims has room for `cap` entries; nd is a valid local.
        let st = unsafe {
            (self.raw.tensor_shape)(
                self.ctx(),
                t.0,
                dims.as_mut_ptr(),
                dims.len() as u32,
                &mut nd,
            )
        };
        self.check(st, "tensor_shape")?;
        Ok(dims[..(nd as usize).min(16)]
            .iter()
            .map(|&d| d as usize)
            .collect())
    }

    pub fn download(&self, t: Tensor) -> Result<Vec<f32>> {
        let n: usize = self.shape(t)?.iter().product();
        let mut v = vec![0f32; n];
        // SAFETY: v is writable for n f32.
        let st = unsafe { (self.raw.tensor_download)(self.ctx(), t.0, v.as_mut_ptr(), v.len()) };
        self.check(st, "tensor_download")?;
        Ok(v)
    }

    pub fn free(&self, t: Tensor) -> Result<()> {
        // SAFETY: plain call.
        let st = unsafe { (self.raw.tensor_free)(self.ctx(), t.0) };
        self.check(st, "tensor_free")
    }

    /// `a * x + b * y`.
    pub fn axpby(&self, a: f32, x: Tensor, b: f32, y: Tensor) -> Result<Tensor> {
        // SAFETY: out is a valid local.
        self.tensor_out("axpby", |o| unsafe {
            (self.raw.axpby)(self.ctx(), a, x.0, b, y.0, o)
        })
    }

    pub fn sign_step(&self, x: Tensor, g: Tensor, alpha: f32) -> Result<Tensor> {
        // SAFETY: out is a valid local.
        self.tensor_out("sign_step", |o| unsafe {
            (self.raw.sign_step)(self.ctx(), x.0, g.0, alpha, o)
        })
    }

    pub fn l2_step(&self, x: Tensor, g: Tensor, alpha: f32) -> Result<Tensor> {
        // SAFETY: out is a valid local.
        self.tensor_out("l2_step", |o| unsafe {
            (self.raw.l2_step)(self.ctx(), x.0, g.0, alpha, o)
        })
    }

    pub fn project(&self, x: Tensor, x0: Tensor, eps: f32, norm: Norm) -> Result<Tensor> {
        // SAFETY: out is a valid local.
        self.tensor_out("project", |o| unsafe {
            (self.raw.project)(self.ctx(), x.0, x0.0, eps, norm.raw(), o)
        })
    }

    /// Clamps each frame to its stored-value range.
    pub fn clip_to_range(&self, x: Tensor) -> Result<Tensor> {
        // SAFETY: out is a valid local.
        self.tensor_out("clip_to_range", |o| unsafe {
            (self.raw.clip_to_range)(self.ctx(), x.0, o)
        })
    }

    pub fn norm_per_sample(&self, x: Tensor, norm: Norm) -> Result<Vec<f32>> {
        let n = self.shape(x)?.first().copied().unwrap_or(0);
        let mut v = vec![0f32; n];
        // SAFETY: v is writable for n f32.
        let st =
            unsafe { (self.raw.norm_per_sample)(self.ctx(), x.0, norm.raw(), v.as_mut_ptr(), n) };
        self.check(st, "norm_per_sample")?;
        Ok(v)
    }

    pub fn gaussian_filter(&self, x: Tensor, sigma: f32) -> Result<Tensor> {
        // SAFETY: out is a valid local.
        self.tensor_out("gaussian_filter", |o| unsafe {
            (self.raw.gaussian_filter)(self.ctx(), x.0, sigma, o)
        })
    }

    pub fn median_filter(&self, x: Tensor, radius: u32) -> Result<Tensor> {
        // SAFETY: out is a valid local.
        self.tensor_out("median_filter", |o| unsafe {
            (self.raw.median_filter)(self.ctx(), x.0, radius, o)
        })
    }

    pub fn random_uniform(&self, shape: &[usize], lo: f32, hi: f32, stream: u64) -> Result<Tensor> {
        let s = shape_u64(shape);
        // SAFETY: shape slice with its length; out is a valid local.
        self.tensor_out("random_uniform", |o| unsafe {
            (self.raw.random_uniform)(self.ctx(), s.as_ptr(), s.len() as u32, lo, hi, stream, o)
        })
    }

    pub fn random_normal(&self, shape: &[usize], std: f32, stream: u64) -> Result<Tensor> {
        let s = shape_u64(shape);
        // SAFETY: shape slice with its length; out is a valid local.
        self.tensor_out("random_normal", |o| unsafe {
            (self.raw.random_normal)(self.ctx(), s.as_ptr(), s.len() as u32, std, stream, o)
        })
    }

    /// Logits `[N, K]` for stored values `x`.
    pub fn model_forward(&self, x: Tensor) -> Result<Tensor> {
        // SAFETY: out is a valid local.
        self.tensor_out("model_forward", |o| unsafe {
            (self.raw.model_forward)(self.ctx(), x.0, o)
        })
    }

    /// Per-sample objective and its gradient w.r.t. the stored values `x`. `targets`: the true
    /// labels, or the target classes when `targeted`.
    pub fn model_loss_grad(
        &self,
        x: Tensor,
        loss: LossKind,
        targeted: bool,
        targets: &[u32],
    ) -> Result<(Vec<f32>, Tensor)> {
        let (kind, kappa) = match loss {
            LossKind::CrossEntropy => (abi::ADV_LOSS_CROSS_ENTROPY, 0.0),
            LossKind::CwMargin { kappa } => (abi::ADV_LOSS_CW_MARGIN, kappa),
            LossKind::Dlr => (abi::ADV_LOSS_DLR, 0.0),
        };
        let mut losses = vec![0f32; targets.len()];
        let mut g: AdvTensor = 0;
        // SAFETY: targets and losses are live slices of equal length; g is a valid local.
        let st = unsafe {
            (self.raw.model_loss_grad)(
                self.ctx(),
                x.0,
                kind,
                kappa,
                targeted as u32,
                targets.as_ptr(),
                targets.len(),
                losses.as_mut_ptr(),
                &mut g,
            )
        };
        self.check(st, "model_loss_grad")?;
        Ok((losses, Tensor(g)))
    }

    /// Runs a custom kernel: the WGSL on the GPU backend, `shader.cpu` on the CPU backend.
    pub fn run_shader(&self, shader: &Shader<'_>) -> Result<Tensor> {
        let inputs: Vec<AdvTensor> = shader.inputs.iter().map(|t| t.0).collect();
        let out_shape = shape_u64(shader.out_shape);
        // The closure travels as a thin pointer to a fat `&dyn Fn` living on this stack frame.
        let cpu_ref: Option<CpuKernel<'_>> = shader.cpu;
        let call = abi::AdvShaderCall {
            size: std::mem::size_of::<abi::AdvShaderCall>() as u32,
            wgsl: shader.wgsl.as_ptr().cast(),
            wgsl_len: shader.wgsl.len(),
            entry: shader.entry.as_ptr().cast(),
            entry_len: shader.entry.len(),
            inputs: inputs.as_ptr(),
            n_inputs: inputs.len() as u32,
            out_shape: out_shape.as_ptr(),
            out_ndim: out_shape.len() as u32,
            params: shader.params.as_ptr(),
            n_params: shader.params.len() as u32,
            workgroups: shader.workgroups,
            cpu: cpu_ref
                .is_some()
                .then_some(cpu_trampoline as abi::AdvCpuKernelFn),
            cpu_user: match &cpu_ref {
                Some(f) => (f as *const CpuKernel<'_>).cast_mut().cast(),
                None => std::ptr::null_mut(),
            },
        };
        // SAFETY: every pointer in `call` refers to data alive until this call returns.
        self.tensor_out("run_shader", |o| unsafe {
            (self.raw.run_shader)(self.ctx(), &call, o)
        })
    }
}

impl Host<'_> {
    fn require(&self, offset: usize, what: &str) -> Result<()> {
        if has_field(self.raw, offset) {
            Ok(())
        } else {
            Err(Error::new(format!(
                "the host predates ABI 1.2 and has no {what} service"
            )))
        }
    }

    /// Features `[R, D]` of the model for stored values `x` (ABI 1.2; see
    /// [`abi::AdvHost::model_features`]).
    pub fn model_features(&self, x: Tensor) -> Result<Tensor> {
        self.require(
            std::mem::offset_of!(AdvHost, model_features),
            "model_features",
        )?;
        // SAFETY: the field exists in the host's table (size checked); out is a valid local.
        self.tensor_out("model_features", |o| unsafe {
            (self.raw.model_features)(self.ctx(), x.0, o)
        })
    }

    /// Logits `[R, K]` of the model's head for features `[R, D]` (ABI 1.2).
    pub fn model_head(&self, features: Tensor) -> Result<Tensor> {
        self.require(std::mem::offset_of!(AdvHost, model_head), "model_head")?;
        // SAFETY: the field exists in the host's table (size checked); out is a valid local.
        self.tensor_out("model_head", |o| unsafe {
            (self.raw.model_head)(self.ctx(), features.0, o)
        })
    }

    /// The model's identity (hex sha256 of its imported graph; ABI 1.2).
    pub fn model_id(&self) -> Result<String> {
        self.require(std::mem::offset_of!(AdvHost, model_id), "model_id")?;
        let mut buf = vec![0u8; 128];
        let mut len = 0usize;
        // SAFETY: the field exists (size checked); buf is writable for its length.
        let st = unsafe {
            (self.raw.model_id)(self.ctx(), buf.as_mut_ptr().cast(), buf.len(), &mut len)
        };
        self.check(st, "model_id")?;
        if len > buf.len() {
            buf = vec![0u8; len];
            // SAFETY: as above, with a buffer of the full length.
            let st = unsafe {
                (self.raw.model_id)(self.ctx(), buf.as_mut_ptr().cast(), buf.len(), &mut len)
            };
            self.check(st, "model_id")?;
        }
        buf.truncate(len.min(buf.len()));
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }
}

/// Whether a host table of `raw.size` bytes holds the function-pointer field at `offset`
/// (fields appended in a later minor version are absent from an older host's table).
fn has_field(raw: &AdvHost, offset: usize) -> bool {
    raw.size as usize >= offset + std::mem::size_of::<usize>()
}

/// Calls the Rust closure behind `user` (a `*const CpuKernel`), catching panics.
unsafe extern "C" fn cpu_trampoline(
    user: *mut c_void,
    inputs: *const abi::AdvCpuSlice,
    n_inputs: u32,
    params: *const f32,
    n_params: u32,
    out: *mut f32,
    out_len: usize,
) -> AdvStatus {
    let r = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: `user` is the `*const CpuKernel` set by `Host::run_shader`, alive during the
        // host call that invokes this trampoline; the host passes valid (ptr, len) pairs.
        unsafe {
            let f: &CpuKernel<'_> = &*(user as *const CpuKernel<'_>);
            let raw_inputs = slice_or_empty(inputs, n_inputs as usize);
            let ins: Vec<CpuInput<'_>> = raw_inputs
                .iter()
                .map(|s| CpuInput {
                    data: slice_or_empty(s.data, s.len),
                    shape: slice_or_empty(s.shape, s.ndim as usize),
                })
                .collect();
            let params = slice_or_empty(params, n_params as usize);
            let out: &mut [f32] = if out.is_null() {
                &mut []
            } else {
                std::slice::from_raw_parts_mut(out, out_len)
            };
            f(&ins, params, out)
        }
    }));
    match r {
        Ok(Ok(())) => abi::ADV_OK,
        Ok(Err(_)) => abi::ADV_ERR_FAILED,
        Err(_) => abi::ADV_ERR_PANIC,
    }
}

/// # Safety
/// `p` must be null or valid for `n` reads for the returned lifetime.
pub(crate) unsafe fn slice_or_empty<'x, T>(p: *const T, n: usize) -> &'x [T] {
    if p.is_null() || n == 0 {
        &[]
    } else {
        // SAFETY: non-null and valid for n elements per the caller's contract.
        unsafe { std::slice::from_raw_parts(p, n) }
    }
}

/// The batch a `process` call works on, with the host services.
#[derive(Clone, Copy)]
pub struct Batch<'a> {
    host: Host<'a>,
    raw: &'a abi::AdvBatch,
}

impl std::fmt::Debug for Batch<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch")
            .field("frames", &self.raw.frames)
            .finish_non_exhaustive()
    }
}

impl<'a> Batch<'a> {
    pub fn new(host: Host<'a>, raw: &'a abi::AdvBatch) -> Self {
        Batch { host, raw }
    }
    pub fn host(&self) -> &Host<'a> {
        &self.host
    }
    /// Number of frames N.
    pub fn len(&self) -> usize {
        self.raw.frames as usize
    }
    pub fn is_empty(&self) -> bool {
        self.raw.frames == 0
    }
    /// Stored values `[N, C, H, W]`.
    pub fn input(&self) -> Tensor {
        Tensor(self.raw.input)
    }
    pub fn seed(&self) -> u64 {
        self.raw.seed
    }
    pub fn meta(&self, frame: usize) -> Result<FrameMeta> {
        let mut m = FrameMeta {
            rows: 0,
            cols: 0,
            samples_per_pixel: 0,
            bits_allocated: 0,
            bits_stored: 0,
            signed: false,
            float: false,
            frame_index: 0,
            rescale_slope: 1.0,
            rescale_intercept: 0.0,
            window: None,
            value_range: (0.0, 0.0),
            label: None,
            target: None,
            modality: String::new(),
        }
        .to_raw();
        let idx = u32::try_from(frame).map_err(|_| Error::new("frame index out of range"))?;
        // SAFETY: m is a valid AdvFrameMeta whose `size` says how much the host may write.
        let st = unsafe { (self.host.raw.frame_meta)(self.host.ctx(), idx, &mut m) };
        self.host.check(st, "frame_meta")?;
        Ok(FrameMeta::from_raw(&m))
    }
    /// The true labels of the batch, or an error naming the first frame without one.
    pub fn labels(&self) -> Result<Vec<u32>> {
        (0..self.len())
            .map(|i| {
                self.meta(i)?
                    .label
                    .ok_or_else(|| Error::new(format!("frame {i} has no label (give --label)")))
            })
            .collect()
    }
    pub fn audit_number(&self, frame: usize, key: &str, value: f64) -> Result<()> {
        // SAFETY: (ptr, len) of a live str.
        let st = unsafe {
            (self.host.raw.audit_number)(
                self.host.ctx(),
                frame as u32,
                key.as_ptr().cast(),
                key.len(),
                value,
            )
        };
        self.host.check(st, "audit_number")
    }
    pub fn audit_flag(&self, frame: usize, key: &str, value: bool) -> Result<()> {
        // SAFETY: (ptr, len) of a live str.
        let st = unsafe {
            (self.host.raw.audit_flag)(
                self.host.ctx(),
                frame as u32,
                key.as_ptr().cast(),
                key.len(),
                value as u32,
            )
        };
        self.host.check(st, "audit_flag")
    }
    pub fn audit_text(&self, frame: usize, key: &str, text: &str) -> Result<()> {
        // SAFETY: (ptr, len) pairs of live strs.
        let st = unsafe {
            (self.host.raw.audit_text)(
                self.host.ctx(),
                frame as u32,
                key.as_ptr().cast(),
                key.len(),
                text.as_ptr().cast(),
                text.len(),
            )
        };
        self.host.check(st, "audit_text")
    }
    /// Per frame: model-input units per stored unit (ABI 1.1; see
    /// [`abi::AdvHost::model_input_scale`]). An error on a host whose table predates the service.
    pub fn model_input_scale(&self) -> Result<Vec<f64>> {
        let raw = self.host.raw;
        if !has_field(raw, std::mem::offset_of!(AdvHost, model_input_scale)) {
            return Err(Error::new(
                "the host predates ABI 1.1 and has no model_input_scale service",
            ));
        }
        let mut v = vec![0f64; self.len()];
        // SAFETY: the field exists in the host's table (size checked); v holds n f64.
        let st = unsafe { (raw.model_input_scale)(self.host.ctx(), v.as_mut_ptr(), v.len()) };
        self.host.check(st, "model_input_scale")?;
        Ok(v)
    }
    /// Sets the batch's resulting stored values.
    pub fn set_output(&self, t: Tensor) -> Result<()> {
        // SAFETY: plain call.
        let st = unsafe { (self.host.raw.set_output)(self.host.ctx(), t.0) };
        self.host.check(st, "set_output")
    }
}

/// Writes `m` into a caller's `AdvFrameMeta`, no more than the `size` it declares (hosts answer
/// `frame_meta` with this, so an older plugin's smaller struct is never overrun).
///
/// # Safety
/// `out` must be null or point to writable memory of at least `(*out).size` bytes whose `size`
/// field is initialised (what the ABI requires of a `frame_meta` caller).
pub unsafe fn write_frame_meta(
    out: *mut abi::AdvFrameMeta,
    m: &abi::AdvFrameMeta,
) -> std::result::Result<(), String> {
    if out.is_null() {
        return Err("null output pointer".into());
    }
    // SAFETY: out is non-null and, per this function's contract, owns `size` bytes.
    unsafe {
        let size = (*out).size;
        let cap = (size as usize).min(std::mem::size_of::<abi::AdvFrameMeta>());
        std::ptr::copy_nonoverlapping(
            (m as *const abi::AdvFrameMeta).cast::<u8>(),
            out.cast::<u8>(),
            cap,
        );
        (*out).size = size;
    }
    Ok(())
}
