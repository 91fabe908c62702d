//! The host services table ([`AdvHost`]) over any backend, and plugin instances.
//!
//! Tensor handles index a per-call table of backend tensors, so a plugin never holds a pointer
//! into host memory: a stale or forged handle is an error status, not undefined behaviour. Every
//! shape is checked before a backend primitive sees it (primitives may panic on a mismatch), and
//! every service also runs under `catch_unwind`, so nothing unwinds into plugin code.
//!
//! Gaussian and median filters are not backend primitives: they run on the CPU over downloaded
//! data (`adverse_plugin_sdk::cpu`, shared with the SDK's test host) and the result is uploaded.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{c_char, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use adverse_plugin_sdk::abi::{
    self, AdvBatch, AdvFrameMeta, AdvHost, AdvShaderCall, AdvStatus, AdvTensor,
};
use adverse_plugin_sdk::{FrameMeta, cpu};
use serde_json::Value;

use super::PluginError;
use super::loader::PluginHandle;
use crate::runtime::backend::{Backend, Binary, Norm, Tensor, Unary};
use crate::runtime::cpu::CpuBackend;
use crate::runtime::gpu::GpuBackend;
use crate::runtime::loss::LossSpec;

/// Largest tensor a plugin may allocate through the services, in elements (1 GiB of f32).
const MAX_ELEMENTS: usize = 1 << 28;

/// A plugin-supplied kernel, resolved to backend tensors.
#[derive(Debug)]
pub struct ShaderRequest<'a, B: Backend> {
    pub wgsl: &'a str,
    pub entry: &'a str,
    pub inputs: Vec<Tensor<B>>,
    pub params: &'a [f32],
    pub out_shape: Vec<usize>,
    pub workgroups: [u32; 3],
}

/// What the host needs from a backend beyond the kernel contract.
pub trait PluginBackend: Backend + Sized + 'static {
    /// `ADV_BACKEND_CPU` or `ADV_BACKEND_GPU`.
    fn kind(&self) -> u32;
    /// Runs a plugin's WGSL; only called on GPU backends.
    fn run_wgsl(&self, req: &ShaderRequest<'_, Self>) -> Result<Tensor<Self>, String>;
}

impl PluginBackend for CpuBackend {
    fn kind(&self) -> u32 {
        abi::ADV_BACKEND_CPU
    }
    fn run_wgsl(&self, _req: &ShaderRequest<'_, Self>) -> Result<Tensor<Self>, String> {
        Err("the CPU backend runs a shader's CPU callback, not its WGSL".into())
    }
}

impl PluginBackend for GpuBackend {
    fn kind(&self) -> u32 {
        abi::ADV_BACKEND_GPU
    }
    fn run_wgsl(&self, req: &ShaderRequest<'_, Self>) -> Result<Tensor<Self>, String> {
        let inputs: Vec<&Tensor<Self>> = req.inputs.iter().collect();
        self.run_custom_wgsl(
            req.wgsl,
            req.entry,
            &inputs,
            req.params,
            &req.out_shape,
            req.workgroups,
        )
    }
}

/// The model as the services see it: stored values in, logits / objective gradients out, for
/// the frames of the current batch.
pub trait BatchModel<B: Backend> {
    fn forward(&self, b: &B, x: &Tensor<B>) -> Result<Tensor<B>, String>;
    fn loss_grad(
        &self,
        b: &B,
        x: &Tensor<B>,
        spec: LossSpec,
        targets: &[u32],
    ) -> Result<(Vec<f32>, Tensor<B>), String>;
    /// Vector-Jacobian product: the logits `[R, K]` at `x` and the gradient w.r.t. `x` of
    /// `sum(dz * logits)`, for objectives that are not one of the runtime's losses (the
    /// detector-score term of `Bpda`'s shadow ensemble). Host-side only: no ABI entry.
    fn vjp(
        &self,
        _b: &B,
        _x: &Tensor<B>,
        _dz: &Tensor<B>,
    ) -> Result<(Tensor<B>, Tensor<B>), String> {
        Err("this model service has no vector-Jacobian product".into())
    }
    /// The gradient w.r.t. `x` of `sum(df * features(x))`, `df` shaped like `features(x)`:
    /// how an adaptive attack descends a detector's score of the features.
    fn features_vjp(&self, _b: &B, _x: &Tensor<B>, _df: &Tensor<B>) -> Result<Tensor<B>, String> {
        Err("this model service has no feature gradient".into())
    }
    /// Per frame: model-input units per stored unit (ABI 1.1 `model_input_scale`).
    fn input_scale(&self, _b: &B) -> Result<Vec<f64>, String> {
        Err("this model service does not report its input scale".into())
    }
    /// Features `[R, D]` of the model for stored values (ABI 1.2 `model_features`; same row
    /// rule as `forward`).
    fn features(&self, _b: &B, _x: &Tensor<B>) -> Result<Tensor<B>, String> {
        Err("this model service does not expose features".into())
    }
    /// Logits `[R, K]` of the head for features `[R, D]` (ABI 1.2 `model_head`).
    fn head(&self, _b: &B, _f: &Tensor<B>) -> Result<Tensor<B>, String> {
        Err("this model service does not expose the model head".into())
    }
    /// The model's identity: sha256 (hex) of its imported graph (ABI 1.2 `model_id`).
    fn model_id(&self) -> Result<String, String> {
        Err("this model service does not report a model identity".into())
    }
}

/// Everything a `process` call may see.
pub struct BatchInput<'a, B: Backend> {
    pub backend: &'a B,
    /// One per frame, in batch order.
    pub frames: Vec<FrameMeta>,
    /// `[N, C, H, W]` stored values.
    pub input: Tensor<B>,
    pub model: Option<&'a dyn BatchModel<B>>,
    pub seed: u64,
}

/// What a `process` call produced.
#[derive(Debug)]
pub struct BatchOutput<B: Backend> {
    pub output: Option<Tensor<B>>,
    /// Per frame: the audit values the plugin wrote.
    pub audit: Vec<BTreeMap<String, Value>>,
}

struct State<'a, B: PluginBackend> {
    backend: &'a B,
    frames: Vec<FrameMeta>,
    model: Option<&'a dyn BatchModel<B>>,
    seed: u64,
    tensors: HashMap<AdvTensor, Tensor<B>>,
    next: AdvTensor,
    service_error: String,
    plugin_error: String,
    output: Option<AdvTensor>,
    audit: Vec<BTreeMap<String, Value>>,
    plugin: String,
}

impl<'a, B: PluginBackend> State<'a, B> {
    fn new(backend: &'a B, plugin: &str) -> Self {
        State {
            backend,
            frames: Vec::new(),
            model: None,
            seed: 0,
            tensors: HashMap::new(),
            next: 1,
            service_error: String::new(),
            plugin_error: String::new(),
            output: None,
            audit: Vec::new(),
            plugin: plugin.to_string(),
        }
    }

    fn put(&mut self, t: Tensor<B>) -> AdvTensor {
        let id = self.next;
        self.next += 1;
        self.tensors.insert(id, t);
        id
    }

    fn get(&self, t: AdvTensor) -> Result<Tensor<B>, String> {
        self.tensors
            .get(&t)
            .cloned()
            .ok_or_else(|| format!("unknown tensor handle {t}"))
    }

    fn table(&mut self) -> AdvHost {
        AdvHost {
            abi: super::host_abi(),
            size: std::mem::size_of::<AdvHost>() as u32,
            ctx: (self as *mut State<'a, B>).cast(),
            set_error: set_error::<B>,
            last_error: last_error::<B>,
            log: log::<B>,
            backend_kind: backend_kind::<B>,
            frame_meta: frame_meta::<B>,
            tensor_zeros: tensor_zeros::<B>,
            tensor_upload: tensor_upload::<B>,
            tensor_download: tensor_download::<B>,
            tensor_shape: tensor_shape::<B>,
            tensor_free: tensor_free::<B>,
            axpby: axpby::<B>,
            sign_step: sign_step::<B>,
            l2_step: l2_step::<B>,
            project: project::<B>,
            clip_to_range: clip_to_range::<B>,
            norm_per_sample: norm_per_sample::<B>,
            gaussian_filter: gaussian_filter::<B>,
            median_filter: median_filter::<B>,
            random_uniform: random_uniform::<B>,
            random_normal: random_normal::<B>,
            model_forward: model_forward::<B>,
            model_loss_grad: model_loss_grad::<B>,
            run_shader: run_shader::<B>,
            audit_number: audit_number::<B>,
            audit_flag: audit_flag::<B>,
            audit_text: audit_text::<B>,
            set_output: set_output::<B>,
            model_input_scale: model_input_scale::<B>,
            model_features: model_features::<B>,
            model_head: model_head::<B>,
            model_id: model_id::<B>,
        }
    }
}

/// A created plugin instance; destroyed (and its library reference released) on drop.
pub struct Instance {
    handle: Arc<PluginHandle>,
    ptr: *mut c_void,
}

impl std::fmt::Debug for Instance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instance")
            .field("plugin", &self.handle.name)
            .finish_non_exhaustive()
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        // SAFETY: ptr came from this handle's create and is destroyed exactly once; the library
        // is still loaded because `self.handle` holds it.
        unsafe { (self.handle.destroy)(self.ptr) }
    }
}

impl Instance {
    /// Validates `params` against the schema, then creates the plugin.
    pub fn create<B: PluginBackend>(
        handle: Arc<PluginHandle>,
        params: &Value,
        backend: &B,
    ) -> Result<Instance, PluginError> {
        handle.validate_params(params)?;
        let json = params.to_string();
        let mut st = State::new(backend, &handle.name);
        let table = st.table();
        let mut ptr: *mut c_void = std::ptr::null_mut();
        // SAFETY: per the ABI: a valid host table whose ctx (`st`) outlives the call, the
        // parameters as (ptr, len), and a writable out pointer.
        let status = unsafe { (handle.create)(&table, json.as_ptr().cast(), json.len(), &mut ptr) };
        if status != abi::ADV_OK {
            return Err(PluginError::Create {
                plugin: handle.name.clone(),
                status,
                message: message_or_status(&st.plugin_error, status),
            });
        }
        if ptr.is_null() {
            return Err(PluginError::Contract {
                plugin: handle.name.clone(),
                message: "create succeeded but returned no instance".into(),
            });
        }
        Ok(Instance { handle, ptr })
    }

    pub fn handle(&self) -> &Arc<PluginHandle> {
        &self.handle
    }

    /// The detector's score per row of features `[rows, dim]` and its gradient w.r.t. them
    /// (ABI 1.3 `score_grad`); an error naming the plugin when it has none or fails. `model`
    /// serves `model_head` (and the other model services) during the call.
    pub fn score_grad<B: PluginBackend>(
        &mut self,
        backend: &B,
        model: Option<&dyn BatchModel<B>>,
        features: &[f32],
        rows: usize,
        dim: usize,
    ) -> Result<(Vec<f32>, Vec<f32>), PluginError> {
        let name = self.handle.name.clone();
        let Some(f) = self.handle.score_grad else {
            return Err(PluginError::Contract {
                plugin: name,
                message: "its library has no score gradient (ABI 1.3 `score_grad`)".into(),
            });
        };
        let len = rows
            .checked_mul(dim)
            .filter(|&l| l == features.len())
            .ok_or_else(|| PluginError::Contract {
                plugin: name.clone(),
                message: format!("{} feature values for {rows} x {dim}", features.len()),
            })?;
        let mut scores = vec![0f32; rows];
        let mut grad = vec![0f32; len];
        let mut st = State::new(backend, &name);
        st.model = model;
        let table = st.table();
        // SAFETY: per the ABI: the instance from create, a host table whose ctx (`st`) outlives
        // the call, `rows * dim` readable features and writable buffers of `rows` and
        // `rows * dim` values. `&mut self` serialises calls on the instance.
        let status = unsafe {
            f(
                self.ptr,
                &table,
                features.as_ptr(),
                rows,
                dim,
                scores.as_mut_ptr(),
                grad.as_mut_ptr(),
            )
        };
        if status != abi::ADV_OK {
            return Err(PluginError::Process {
                plugin: name,
                status,
                message: message_or_status(&st.plugin_error, status),
            });
        }
        Ok((scores, grad))
    }

    /// Runs one batch. Every handle the plugin created is released when this returns.
    pub fn process<B: PluginBackend>(
        &mut self,
        batch: BatchInput<'_, B>,
    ) -> Result<BatchOutput<B>, PluginError> {
        let n = batch.frames.len();
        let mut st = State::new(batch.backend, &self.handle.name);
        st.frames = batch.frames;
        st.model = batch.model;
        st.seed = batch.seed;
        st.audit = vec![BTreeMap::new(); n];
        let in_shape = batch.input.shape.clone();
        let input = st.put(batch.input);
        let raw = AdvBatch {
            size: std::mem::size_of::<AdvBatch>() as u32,
            frames: n as u32,
            input,
            seed: batch.seed,
        };
        let table = st.table();
        // SAFETY: per the ABI: the instance from create, a host table whose ctx (`st`) outlives
        // the call, and a valid batch. `&mut self` serialises calls on the instance.
        let status = unsafe { (self.handle.process)(self.ptr, &table, &raw) };
        if status != abi::ADV_OK {
            return Err(PluginError::Process {
                plugin: self.handle.name.clone(),
                status,
                message: message_or_status(&st.plugin_error, status),
            });
        }
        let output = match st.output {
            Some(id) => {
                let t = st.get(id).map_err(|m| PluginError::Contract {
                    plugin: self.handle.name.clone(),
                    message: m,
                })?;
                if t.shape != in_shape {
                    return Err(PluginError::Contract {
                        plugin: self.handle.name.clone(),
                        message: format!(
                            "output shape {:?} differs from the input's {in_shape:?}",
                            t.shape
                        ),
                    });
                }
                Some(t)
            }
            None if matches!(
                self.handle.kind,
                adverse_plugin_sdk::Kind::Attack | adverse_plugin_sdk::Kind::Purifier
            ) =>
            {
                return Err(PluginError::Contract {
                    plugin: self.handle.name.clone(),
                    message: format!(
                        "a{} {} must set an output (set_output), none was set",
                        if self.handle.kind == adverse_plugin_sdk::Kind::Attack {
                            "n"
                        } else {
                            ""
                        },
                        self.handle.kind
                    ),
                });
            }
            None => None,
        };
        Ok(BatchOutput {
            output,
            audit: std::mem::take(&mut st.audit),
        })
    }
}

fn message_or_status(msg: &str, status: AdvStatus) -> String {
    if !msg.is_empty() {
        return msg.to_string();
    }
    match status {
        abi::ADV_ERR_PANIC => "the plugin panicked (no message)".into(),
        abi::ADV_ERR_INVALID => "invalid argument (no message)".into(),
        abi::ADV_ERR_UNSUPPORTED => "unsupported (no message)".into(),
        _ => "failed without a message".into(),
    }
}

// ---- services --------------------------------------------------------------------------------

/// Runs a service body on the state, mapping errors and panics to a status plus message.
fn svc<B: PluginBackend>(
    ctx: *mut c_void,
    f: impl FnOnce(&mut State<'_, B>) -> Result<(), String>,
) -> AdvStatus {
    if ctx.is_null() {
        return abi::ADV_ERR_INVALID;
    }
    // SAFETY: ctx is the `*mut State<B>` this module put in the table it passed to the plugin,
    // which lives for the whole create/process call; plugins call services from the calling
    // thread (the ABI forbids keeping ctx beyond the call), so this is the only live reference.
    let st = unsafe { &mut *ctx.cast::<State<'_, B>>() };
    match catch_unwind(AssertUnwindSafe(|| f(st))) {
        Ok(Ok(())) => abi::ADV_OK,
        Ok(Err(e)) => {
            st.service_error = e;
            abi::ADV_ERR_INVALID
        }
        Err(p) => {
            st.service_error = format!(
                "host service failed internally: {}",
                adverse_plugin_sdk::__private::panic_message(p.as_ref())
            );
            abi::ADV_ERR_FAILED
        }
    }
}

fn text(p: *const c_char, len: usize) -> Result<String, String> {
    if len > 1 << 20 {
        return Err("string argument longer than 1 MiB".into());
    }
    if p.is_null() {
        return if len == 0 {
            Ok(String::new())
        } else {
            Err("null string pointer".into())
        };
    }
    // SAFETY: the plugin passes (ptr, len) of a string it owns, per the ABI.
    let b = unsafe { std::slice::from_raw_parts(p.cast::<u8>(), len) };
    Ok(String::from_utf8_lossy(b).into_owned())
}

fn shape_arg(shape: *const u64, ndim: u32) -> Result<Vec<usize>, String> {
    if ndim > 8 {
        return Err(format!("rank {ndim} exceeds 8"));
    }
    if shape.is_null() && ndim > 0 {
        return Err("null shape pointer".into());
    }
    let dims: Vec<usize> = (0..ndim as usize)
        // SAFETY: the plugin passes `ndim` dims, non-null checked above.
        .map(|i| usize::try_from(unsafe { *shape.add(i) }).unwrap_or(usize::MAX))
        .collect();
    match dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d)) {
        Some(n) if n <= MAX_ELEMENTS => Ok(dims),
        _ => Err(format!(
            "shape {dims:?} exceeds the {MAX_ELEMENTS}-element limit"
        )),
    }
}

fn store(out: *mut AdvTensor, id: AdvTensor) -> Result<(), String> {
    if out.is_null() {
        return Err("null output pointer".into());
    }
    // SAFETY: non-null pointer to the plugin's handle slot.
    unsafe { *out = id };
    Ok(())
}

fn two<B: PluginBackend>(
    st: &State<'_, B>,
    a: AdvTensor,
    b: AdvTensor,
) -> Result<(Tensor<B>, Tensor<B>), String> {
    let (x, y) = (st.get(a)?, st.get(b)?);
    if x.shape != y.shape {
        return Err(format!("shapes differ: {:?} vs {:?}", x.shape, y.shape));
    }
    if x.shape.is_empty() || x.shape[0] == 0 {
        return Err(format!(
            "per-sample ops need a leading batch axis, got {:?}",
            x.shape
        ));
    }
    Ok((x, y))
}

fn put_out<B: PluginBackend>(
    st: &mut State<'_, B>,
    out: *mut AdvTensor,
    t: Tensor<B>,
) -> Result<(), String> {
    let id = st.put(t);
    store(out, id)
}

unsafe extern "C" fn set_error<B: PluginBackend>(ctx: *mut c_void, msg: *const c_char, len: usize) {
    svc::<B>(ctx, |st| {
        st.plugin_error = text(msg, len)?;
        Ok(())
    });
}

unsafe extern "C" fn last_error<B: PluginBackend>(
    ctx: *mut c_void,
    buf: *mut c_char,
    cap: usize,
) -> usize {
    let mut n = 0;
    svc::<B>(ctx, |st| {
        let b = st.service_error.as_bytes();
        n = b.len();
        if !buf.is_null() {
            // SAFETY: the plugin's buffer holds `cap` bytes.
            unsafe {
                std::ptr::copy_nonoverlapping(b.as_ptr(), buf.cast::<u8>(), b.len().min(cap))
            };
        }
        Ok(())
    });
    n
}

unsafe extern "C" fn log<B: PluginBackend>(
    ctx: *mut c_void,
    level: u32,
    msg: *const c_char,
    len: usize,
) {
    svc::<B>(ctx, |st| {
        let m = text(msg, len)?;
        let p = &st.plugin;
        match level {
            abi::ADV_LOG_ERROR => tracing::error!(plugin = %p, "{m}"),
            abi::ADV_LOG_WARN => tracing::warn!(plugin = %p, "{m}"),
            abi::ADV_LOG_INFO => tracing::info!(plugin = %p, "{m}"),
            _ => tracing::debug!(plugin = %p, "{m}"),
        }
        Ok(())
    });
}

unsafe extern "C" fn backend_kind<B: PluginBackend>(ctx: *mut c_void) -> u32 {
    let mut k = abi::ADV_BACKEND_CPU;
    svc::<B>(ctx, |st| {
        k = st.backend.kind();
        Ok(())
    });
    k
}

unsafe extern "C" fn frame_meta<B: PluginBackend>(
    ctx: *mut c_void,
    index: u32,
    out: *mut AdvFrameMeta,
) -> AdvStatus {
    svc::<B>(ctx, |st| {
        let m = st
            .frames
            .get(index as usize)
            .ok_or_else(|| format!("frame {index} out of range ({} frames)", st.frames.len()))?;
        // SAFETY: `out` comes from the plugin's frame_meta call, which the ABI requires to point
        // to an AdvFrameMeta with its `size` set.
        unsafe { adverse_plugin_sdk::write_frame_meta(out, &m.to_raw()) }
    })
}

unsafe extern "C" fn tensor_zeros<B: PluginBackend>(
    ctx: *mut c_void,
    shape: *const u64,
    ndim: u32,
    out: *mut AdvTensor,
) -> AdvStatus {
    svc::<B>(ctx, |st| {
        let s = shape_arg(shape, ndim)?;
        let t = st.backend.zeros(&s);
        put_out(st, out, t)
    })
}

unsafe extern "C" fn tensor_upload<B: PluginBackend>(
    ctx: *mut c_void,
    data: *const f32,
    len: usize,
    shape: *const u64,
    ndim: u32,
    out: *mut AdvTensor,
) -> AdvStatus {
    svc::<B>(ctx, |st| {
        let s = shape_arg(shape, ndim)?;
        if s.iter().product::<usize>() != len || (data.is_null() && len > 0) {
            return Err(format!("{len} values for shape {s:?}"));
        }
        let d: &[f32] = if len == 0 {
            &[]
        } else {
            // SAFETY: non-null, and the plugin passes `len` floats.
            unsafe { std::slice::from_raw_parts(data, len) }
        };
        let t = st.backend.upload(d, &s);
        put_out(st, out, t)
    })
}

unsafe extern "C" fn tensor_download<B: PluginBackend>(
    ctx: *mut c_void,
    t: AdvTensor,
    out: *mut f32,
    len: usize,
) -> AdvStatus {
    svc::<B>(ctx, |st| {
        let x = st.get(t)?;
        if x.len() != len || (out.is_null() && len > 0) {
            return Err(format!(
                "download of {} values into a buffer of {len}",
                x.len()
            ));
        }
        let d = st.backend.download(&x);
        // SAFETY: out holds `len` floats (checked equal to d.len()).
        unsafe { std::ptr::copy_nonoverlapping(d.as_ptr(), out, len) };
        Ok(())
    })
}

unsafe extern "C" fn tensor_shape<B: PluginBackend>(
    ctx: *mut c_void,
    t: AdvTensor,
    shape: *mut u64,
    cap: u32,
    ndim: *mut u32,
) -> AdvStatus {
    svc::<B>(ctx, |st| {
        let x = st.get(t)?;
        if ndim.is_null()
            || x.shape.len() > cap as usize
            || (shape.is_null() && !x.shape.is_empty())
        {
            return Err(format!("shape buffer of {cap} for rank {}", x.shape.len()));
        }
        // SAFETY: shape holds `cap` >= rank entries; ndim is non-null.
        unsafe {
            for (i, &d) in x.shape.iter().enumerate() {
                *shape.add(i) = d as u64;
            }
            *ndim = x.shape.len() as u32;
        }
        Ok(())
    })
}

unsafe extern "C" fn tensor_free<B: PluginBackend>(ctx: *mut c_void, t: AdvTensor) -> AdvStatus {
    svc::<B>(ctx, |st| {
        if st.output == Some(t) {
            return Err("cannot free the tensor set as output".into());
        }
        st.tensors
            .remove(&t)
            .map(|_| ())
            .ok_or_else(|| format!("unknown tensor handle {t}"))
    })
}

unsafe extern "C" fn axpby<B: PluginBackend>(
    ctx: *mut c_void,
    a: f32,
    x: AdvTensor,
    b: f32,
    y: AdvTensor,
    out: *mut AdvTensor,
) -> AdvStatus {
    svc::<B>(ctx, |st| {
        let (x, y) = (st.get(x)?, st.get(y)?);
        if x.shape != y.shape {
            return Err(format!("shapes differ: {:?} vs {:?}", x.shape, y.shape));
        }
        let be = st.backend;
        let ax = be.unary(Unary::Affine { a, b: 0.0 }, &x);
        let by = be.unary(Unary::Affine { a: b, b: 0.0 }, &y);
        let r = be.binary(Binary::Add, &ax, &by);
        put_out(st, out, r)
    })
}

unsafe extern "C" fn sign_step<B: PluginBackend>(
    ctx: *mut c_void,
    x: AdvTensor,
    g: AdvTensor,
    alpha: f32,
    out: *mut AdvTensor,
) -> AdvStatus {
    svc::<B>(ctx, |st| {
        let (x, g) = two(st, x, g)?;
        let r = st.backend.sign_step(&x, &g, alpha);
        put_out(st, out, r)
    })
}

unsafe extern "C" fn l2_step<B: PluginBackend>(
    ctx: *mut c_void,
    x: AdvTensor,
    g: AdvTensor,
    alpha: f32,
    out: *mut AdvTensor,
) -> AdvStatus {
    svc::<B>(ctx, |st| {
        let (x, g) = two(st, x, g)?;
        let r = st.backend.l2_step(&x, &g, alpha);
        put_out(st, out, r)
    })
}

fn norm_arg(n: u32, allow_l1: bool) -> Result<Norm, String> {
    match n {
        abi::ADV_NORM_L2 => Ok(Norm::L2),
        abi::ADV_NORM_LINF => Ok(Norm::Linf),
        abi::ADV_NORM_L1 if allow_l1 => Ok(Norm::L1),
        o => Err(format!("norm {o} is not supported here")),
    }
}

unsafe extern "C" fn project<B: PluginBackend>(
    ctx: *mut c_void,
    x: AdvTensor,
    x0: AdvTensor,
    eps: f32,
    norm: u32,
    out: *mut AdvTensor,
) -> AdvStatus {
    svc::<B>(ctx, |st| {
        let (x, x0) = two(st, x, x0)?;
        let n = norm_arg(norm, false)?;
        if !(eps.is_finite() && eps >= 0.0) {
            return Err(format!("eps must be finite and >= 0, got {eps}"));
        }
        let r = st.backend.project(&x, &x0, eps, n);
        put_out(st, out, r)
    })
}

unsafe extern "C" fn clip_to_range<B: PluginBackend>(
    ctx: *mut c_void,
    x: AdvTensor,
    out: *mut AdvTensor,
) -> AdvStatus {
    svc::<B>(ctx, |st| {
        let x = st.get(x)?;
        if x.shape.first() != Some(&st.frames.len()) {
            return Err(format!(
                "clip_to_range needs a tensor of the batch's {} frames, got {:?}",
                st.frames.len(),
                x.shape
            ));
        }
        let lo: Vec<f32> = st.frames.iter().map(|m| m.value_range.0 as f32).collect();
        let hi: Vec<f32> = st.frames.iter().map(|m| m.value_range.1 as f32).collect();
        let r = st.backend.clamp_per_sample(&x, &lo, &hi);
        put_out(st, out, r)
    })
}

unsafe extern "C" fn norm_per_sample<B: PluginBackend>(
    ctx: *mut c_void,
    x: AdvTensor,
    norm: u32,
    out: *mut f32,
    n: usize,
) -> AdvStatus {
    svc::<B>(ctx, |st| {
        let x = st.get(x)?;
        let nm = norm_arg(norm, true)?;
        if x.shape.first() != Some(&n) || out.is_null() || n == 0 {
            return Err(format!("a buffer of {n} norms for shape {:?}", x.shape));
        }
        let v = st.backend.download(&st.backend.norm_per_sample(&x, nm));
        // SAFETY: out holds n floats; v has n entries (one per sample).
        unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), out, n.min(v.len())) };
        Ok(())
    })
}

/// Runs a per-plane CPU filter on every `[H, W]` plane of an `[N, C, H, W]` tensor in parallel
/// (the compute stage is one thread; a batch has many planes). `None` when `f` refuses a plane
/// or the shape is not 4-D.
fn per_plane(
    data: &[f32],
    shape: &[usize],
    f: impl Fn(&[f32], &[usize]) -> Option<Vec<f32>> + Sync,
) -> Option<Vec<f32>> {
    use rayon::prelude::*;
    let [n, c, h, w] = *shape else { return None };
    let plane = h.checked_mul(w)?;
    if plane == 0 || data.len() != n.checked_mul(c)?.checked_mul(plane)? {
        return None;
    }
    let parts: Option<Vec<Vec<f32>>> = data
        .par_chunks(plane)
        .map(|p| f(p, &[1, 1, h, w]))
        .collect();
    Some(parts?.concat())
}

fn filter<B: PluginBackend>(
    st: &mut State<'_, B>,
    x: AdvTensor,
    out: *mut AdvTensor,
    f: impl Fn(&[f32], &[usize]) -> Option<Vec<f32>> + Sync,
    what: &str,
) -> Result<(), String> {
    let x = st.get(x)?;
    let d = st.backend.download(&x);
    let r = per_plane(&d, &x.shape, f).ok_or_else(|| {
        format!(
            "{what}: needs an [N, C, H, W] tensor and a valid size, got {:?}",
            x.shape
        )
    })?;
    let t = st.backend.upload(&r, &x.shape);
    put_out(st, out, t)
}

unsafe extern "C" fn gaussian_filter<B: PluginBackend>(
    ctx: *mut c_void,
    x: AdvTensor,
    sigma: f32,
    out: *mut AdvTensor,
) -> AdvStatus {
    svc::<B>(ctx, |st| {
        filter(
            st,
            x,
            out,
            |d, s| cpu::gaussian_filter(d, s, sigma),
            &format!("gaussian_filter (sigma {sigma})"),
        )
    })
}

unsafe extern "C" fn median_filter<B: PluginBackend>(
    ctx: *mut c_void,
    x: AdvTensor,
    radius: u32,
    out: *mut AdvTensor,
) -> AdvStatus {
    svc::<B>(ctx, |st| {
        filter(
            st,
            x,
            out,
            |d, s| cpu::median_filter(d, s, radius),
            &format!("median_filter (radius {radius})"),
        )
    })
}

unsafe extern "C" fn random_uniform<B: PluginBackend>(
    ctx: *mut c_void,
    shape: *const u64,
    ndim: u32,
    lo: f32,
    hi: f32,
    stream: u64,
    out: *mut AdvTensor,
) -> AdvStatus {
    svc::<B>(ctx, |st| {
        let s = shape_arg(shape, ndim)?;
        let t = st
            .backend
            .random_uniform(&s, cpu::stream_seed(st.seed, stream), lo, hi);
        put_out(st, out, t)
    })
}

unsafe extern "C" fn random_normal<B: PluginBackend>(
    ctx: *mut c_void,
    shape: *const u64,
    ndim: u32,
    std: f32,
    stream: u64,
    out: *mut AdvTensor,
) -> AdvStatus {
    svc::<B>(ctx, |st| {
        let s = shape_arg(shape, ndim)?;
        let t = st
            .backend
            .random_normal(&s, cpu::stream_seed(st.seed, stream), std);
        put_out(st, out, t)
    })
}

fn model_of<'m, B: PluginBackend>(st: &State<'m, B>) -> Result<&'m dyn BatchModel<B>, String> {
    st.model
        .ok_or_else(|| "no model in this run (give --model)".to_string())
}

unsafe extern "C" fn model_forward<B: PluginBackend>(
    ctx: *mut c_void,
    x: AdvTensor,
    out: *mut AdvTensor,
) -> AdvStatus {
    svc::<B>(ctx, |st| {
        let m = model_of(st)?;
        let x = st.get(x)?;
        let z = m.forward(st.backend, &x)?;
        put_out(st, out, z)
    })
}

unsafe extern "C" fn model_loss_grad<B: PluginBackend>(
    ctx: *mut c_void,
    x: AdvTensor,
    loss: u32,
    kappa: f32,
    targeted: u32,
    targets: *const u32,
    n_targets: usize,
    out_losses: *mut f32,
    out_grad: *mut AdvTensor,
) -> AdvStatus {
    svc::<B>(ctx, |st| {
        let m = model_of(st)?;
        let x = st.get(x)?;
        let n = x.shape.first().copied().unwrap_or(0);
        if n_targets != n || targets.is_null() || out_losses.is_null() {
            return Err(format!("{n_targets} targets for a batch of {n}"));
        }
        // SAFETY: the plugin passes n_targets labels (non-null checked).
        let t = unsafe { std::slice::from_raw_parts(targets, n_targets) };
        let t_on = targeted != 0;
        let spec = match loss {
            abi::ADV_LOSS_CROSS_ENTROPY => LossSpec::CrossEntropy { targeted: t_on },
            abi::ADV_LOSS_CW_MARGIN => LossSpec::CwMargin {
                kappa,
                targeted: t_on,
            },
            abi::ADV_LOSS_DLR if !t_on => LossSpec::Dlr,
            abi::ADV_LOSS_DLR => return Err("DLR is untargeted only".into()),
            o => return Err(format!("unknown loss kind {o}")),
        };
        let (losses, g) = m.loss_grad(st.backend, &x, spec, t)?;
        // SAFETY: out_losses holds n floats.
        unsafe { std::ptr::copy_nonoverlapping(losses.as_ptr(), out_losses, n.min(losses.len())) };
        put_out(st, out_grad, g)
    })
}

unsafe extern "C" fn run_shader<B: PluginBackend>(
    ctx: *mut c_void,
    call: *const AdvShaderCall,
    out: *mut AdvTensor,
) -> AdvStatus {
    svc::<B>(ctx, |st| {
        // SAFETY: the plugin passes a call description valid during this service.
        let call = unsafe { call.as_ref() }.ok_or("null shader call")?;
        if (call.size as usize) < std::mem::size_of::<AdvShaderCall>() {
            return Err(format!(
                "shader call struct of {} bytes is smaller than this ABI's",
                call.size
            ));
        }
        if call.n_inputs > 8 || call.n_params > 1 << 16 {
            return Err("a shader takes at most 8 inputs and 65536 params".into());
        }
        let ids: Vec<AdvTensor> = (0..call.n_inputs as usize)
            // SAFETY: the plugin passes n_inputs handles.
            .map(|i| unsafe { *call.inputs.add(i) })
            .collect();
        let inputs = ids
            .iter()
            .map(|&t| st.get(t))
            .collect::<Result<Vec<_>, _>>()?;
        let params: Vec<f32> = (0..call.n_params as usize)
            // SAFETY: the plugin passes n_params floats.
            .map(|i| unsafe { *call.params.add(i) })
            .collect();
        let out_shape = shape_arg(call.out_shape, call.out_ndim)?;
        let t = if st.backend.kind() == abi::ADV_BACKEND_GPU {
            let req = ShaderRequest {
                wgsl: &text(call.wgsl, call.wgsl_len)?,
                entry: &text(call.entry, call.entry_len)?,
                inputs,
                params: &params,
                out_shape,
                workgroups: call.workgroups,
            };
            st.backend.run_wgsl(&req)?
        } else {
            let cpu_fn = call
                .cpu
                .ok_or("this run uses the CPU backend and the shader has no CPU callback")?;
            let data: Vec<(Vec<f32>, Vec<u64>)> = inputs
                .iter()
                .map(|t| {
                    (
                        st.backend.download(t),
                        t.shape.iter().map(|&d| d as u64).collect(),
                    )
                })
                .collect();
            let slices: Vec<abi::AdvCpuSlice> = data
                .iter()
                .map(|(d, s)| abi::AdvCpuSlice {
                    data: d.as_ptr(),
                    len: d.len(),
                    shape: s.as_ptr(),
                    ndim: s.len() as u32,
                })
                .collect();
            let mut o = vec![0f32; out_shape.iter().product()];
            // SAFETY: every pointer refers to a live buffer of the stated length; cpu_user is the
            // plugin's own pointer, passed back unchanged.
            let status = unsafe {
                cpu_fn(
                    call.cpu_user,
                    slices.as_ptr(),
                    slices.len() as u32,
                    params.as_ptr(),
                    params.len() as u32,
                    o.as_mut_ptr(),
                    o.len(),
                )
            };
            if status != abi::ADV_OK {
                return Err(format!(
                    "the shader's CPU callback failed (status {status})"
                ));
            }
            st.backend.upload(&o, &out_shape)
        };
        put_out(st, out, t)
    })
}

fn audit_put<B: PluginBackend>(
    st: &mut State<'_, B>,
    frame: u32,
    key: *const c_char,
    key_len: usize,
    v: Value,
) -> Result<(), String> {
    let k = text(key, key_len)?;
    if k.is_empty()
        || k.len() > 64
        || !k
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
    {
        return Err(format!(
            "audit key {k:?}: use 1-64 characters of [A-Za-z0-9_.-]"
        ));
    }
    let n = st.audit.len();
    let row = st
        .audit
        .get_mut(frame as usize)
        .ok_or_else(|| format!("frame {frame} out of range ({n} frames)"))?;
    row.insert(k, v);
    Ok(())
}

unsafe extern "C" fn audit_number<B: PluginBackend>(
    ctx: *mut c_void,
    frame: u32,
    key: *const c_char,
    key_len: usize,
    value: f64,
) -> AdvStatus {
    svc::<B>(ctx, |st| {
        // JSON has no NaN/inf: they become null with the key kept.
        let v = serde_json::Number::from_f64(value).map_or(Value::Null, Value::Number);
        audit_put(st, frame, key, key_len, v)
    })
}

unsafe extern "C" fn audit_flag<B: PluginBackend>(
    ctx: *mut c_void,
    frame: u32,
    key: *const c_char,
    key_len: usize,
    value: u32,
) -> AdvStatus {
    svc::<B>(ctx, |st| {
        audit_put(st, frame, key, key_len, Value::Bool(value != 0))
    })
}

unsafe extern "C" fn audit_text<B: PluginBackend>(
    ctx: *mut c_void,
    frame: u32,
    key: *const c_char,
    key_len: usize,
    t: *const c_char,
    t_len: usize,
) -> AdvStatus {
    svc::<B>(ctx, |st| {
        let v = text(t, t_len)?;
        if v.len() > 4096 {
            return Err("audit text longer than 4096 bytes".into());
        }
        audit_put(st, frame, key, key_len, Value::String(v))
    })
}

unsafe extern "C" fn set_output<B: PluginBackend>(ctx: *mut c_void, t: AdvTensor) -> AdvStatus {
    svc::<B>(ctx, |st| {
        st.get(t)?;
        st.output = Some(t);
        Ok(())
    })
}

unsafe extern "C" fn model_input_scale<B: PluginBackend>(
    ctx: *mut c_void,
    out: *mut f64,
    n: usize,
) -> AdvStatus {
    svc::<B>(ctx, |st| {
        let m = model_of(st)?;
        if out.is_null() || n != st.frames.len() {
            return Err(format!(
                "a buffer of {n} scales for the batch's {} frames",
                st.frames.len()
            ));
        }
        let v = m.input_scale(st.backend)?;
        if v.len() != n {
            return Err(format!(
                "the model service gave {} scales for {n} frames",
                v.len()
            ));
        }
        // SAFETY: out holds n f64 (non-null and length checked above).
        unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), out, n) };
        Ok(())
    })
}

unsafe extern "C" fn model_features<B: PluginBackend>(
    ctx: *mut c_void,
    x: AdvTensor,
    out: *mut AdvTensor,
) -> AdvStatus {
    svc::<B>(ctx, |st| {
        let m = model_of(st)?;
        let x = st.get(x)?;
        let f = m.features(st.backend, &x)?;
        put_out(st, out, f)
    })
}

unsafe extern "C" fn model_head<B: PluginBackend>(
    ctx: *mut c_void,
    f: AdvTensor,
    out: *mut AdvTensor,
) -> AdvStatus {
    svc::<B>(ctx, |st| {
        let m = model_of(st)?;
        let f = st.get(f)?;
        let z = m.head(st.backend, &f)?;
        put_out(st, out, z)
    })
}

unsafe extern "C" fn model_id<B: PluginBackend>(
    ctx: *mut c_void,
    buf: *mut c_char,
    cap: usize,
    len: *mut usize,
) -> AdvStatus {
    svc::<B>(ctx, |st| {
        let m = model_of(st)?;
        let id = m.model_id()?;
        if len.is_null() {
            return Err("null length pointer".into());
        }
        let n = id.len().min(cap);
        if n > 0 {
            if buf.is_null() {
                return Err("null buffer with a non-zero capacity".into());
            }
            // SAFETY: the plugin passes a buffer writable for `cap` bytes (non-null checked).
            unsafe { std::ptr::copy_nonoverlapping(id.as_ptr(), buf.cast::<u8>(), n) };
        }
        // SAFETY: non-null checked above; the plugin passes a writable usize.
        unsafe { *len = id.len() };
        Ok(())
    })
}
