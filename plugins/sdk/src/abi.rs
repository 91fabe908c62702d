//! The C ABI between the adverse host and plugin libraries. Everything here is `#[repr(C)]`, and
//! `include/adverse_plugin.h` is generated from this file by cbindgen (a test fails when the
//! checked-in header is stale).
//!
//! Compatibility rules, which every table below follows:
//! - The ABI has a major and a minor version. The host refuses a library whose major differs
//!   from its own, or whose minor is newer than its own (the plugin may call services this host
//!   lacks). Within one major, a host of minor M loads every plugin of minor <= M.
//! - Tables and structs are only ever *appended to*: fields are never removed, reordered or
//!   retyped within a major version. Each starts with a `size` field holding `sizeof` as the
//!   writer compiled it, so a reader knows which appended fields exist.
//! - Enumerations cross the boundary as `uint32_t` constants (never as C enums), so an unknown
//!   value from a newer peer is a checked error instead of undefined behaviour.
//! - Strings are UTF-8. Descriptor strings are NUL-terminated and static; argument strings are
//!   (pointer, length) pairs and need no terminator.
//! - Tensor handles ([`AdvTensor`]) are only valid during the call that produced them (one
//!   `process` call); the host frees every handle of a batch when `process` returns.

use std::ffi::{c_char, c_void};

/// Major ABI version: a change here means old plugins cannot run on this host.
pub const ADVERSE_ABI_MAJOR: u32 = 1;
/// Minor ABI version: bumped whenever a field or service is appended.
pub const ADVERSE_ABI_MINOR: u32 = 3;

/// Status codes returned by every plugin entry point and host service.
pub type AdvStatus = i32;
/// Success.
pub const ADV_OK: AdvStatus = 0;
/// The call failed; the message was set with `AdvHost::set_error` (plugin) or can be read with
/// `AdvHost::last_error` (host service).
pub const ADV_ERR_FAILED: AdvStatus = 1;
/// The plugin panicked; the panic message was set with `AdvHost::set_error`.
pub const ADV_ERR_PANIC: AdvStatus = 2;
/// An argument was invalid (unknown tensor handle, shape mismatch, null pointer...).
pub const ADV_ERR_INVALID: AdvStatus = 3;
/// The service exists but is not available here (e.g. no model was given to the run).
pub const ADV_ERR_UNSUPPORTED: AdvStatus = 4;

/// A tensor living on the host's active backend. 0 is never a valid handle.
pub type AdvTensor = u64;

/// Plugin kinds ([`AdvPluginDesc::kind`]).
pub const ADV_KIND_ATTACK: u32 = 1;
pub const ADV_KIND_PURIFIER: u32 = 2;
pub const ADV_KIND_DETECTOR: u32 = 3;
/// Any other pipeline stage.
pub const ADV_KIND_OTHER: u32 = 4;

/// Backends ([`AdvHost::backend_kind`]).
pub const ADV_BACKEND_CPU: u32 = 0;
pub const ADV_BACKEND_GPU: u32 = 1;

/// Norms ([`AdvHost::project`], [`AdvHost::norm_per_sample`]).
pub const ADV_NORM_L1: u32 = 1;
pub const ADV_NORM_L2: u32 = 2;
pub const ADV_NORM_LINF: u32 = 3;

/// Loss kinds ([`AdvHost::model_loss_grad`]); every loss is an objective to *ascend*.
/// Cross-entropy of the label (untargeted) or minus cross-entropy of the target (targeted).
pub const ADV_LOSS_CROSS_ENTROPY: u32 = 1;
/// Carlini-Wagner margin with confidence `kappa`.
pub const ADV_LOSS_CW_MARGIN: u32 = 2;
/// Croce & Hein's difference of logits ratio (untargeted only).
pub const ADV_LOSS_DLR: u32 = 3;

/// Log levels ([`AdvHost::log`]).
pub const ADV_LOG_ERROR: u32 = 1;
pub const ADV_LOG_WARN: u32 = 2;
pub const ADV_LOG_INFO: u32 = 3;
pub const ADV_LOG_DEBUG: u32 = 4;

/// Name of the one symbol a plugin library exports, of type [`AdvEntryFn`].
pub const ADVERSE_ENTRY_SYMBOL: &str = "adverse_plugin_entry";

/// An ABI version. Frozen layout: it opens [`AdvLibrary`] and [`AdvHost`] in every version, so
/// a host can read it from a library of any version before trusting anything else.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdvAbiVersion {
    pub major: u32,
    pub minor: u32,
}

/// What the entry symbol returns: the plugins one library contains. Static for the library's
/// lifetime. Fields are only ever appended.
#[repr(C)]
#[derive(Debug)]
pub struct AdvLibrary {
    /// The ABI this library was built against. Always the first field.
    pub abi: AdvAbiVersion,
    /// `sizeof(AdvLibrary)` as the library compiled it.
    pub size: u32,
    /// Number of entries in `plugins`.
    pub plugin_count: u32,
    /// `plugin_count` descriptors; each has its own `size`, but the array stride is the
    /// library's `sizeof(AdvPluginDesc)`, given here.
    pub plugins: *const AdvPluginDesc,
    /// `sizeof(AdvPluginDesc)` as the library compiled it (the array stride).
    pub plugin_desc_size: u32,
}

/// Creates an instance from parameters (JSON text, already validated against the schema by the
/// host). On success stores an opaque instance pointer in `*out_instance`.
pub type AdvCreateFn = unsafe extern "C" fn(
    host: *const AdvHost,
    params_json: *const c_char,
    params_len: usize,
    out_instance: *mut *mut c_void,
) -> AdvStatus;

/// Processes one batch of frames (see [`AdvBatch`]). Attacks and purifiers call
/// `AdvHost::set_output`; detectors write audit values.
pub type AdvProcessFn = unsafe extern "C" fn(
    instance: *mut c_void,
    host: *const AdvHost,
    batch: *const AdvBatch,
) -> AdvStatus;

/// Frees an instance. Called exactly once per successful create.
pub type AdvDestroyFn = unsafe extern "C" fn(instance: *mut c_void);

/// The type of the exported `adverse_plugin_entry` symbol.
pub type AdvEntryFn = unsafe extern "C" fn() -> *const AdvLibrary;

/// One plugin in a library. Fields are only ever appended.
#[repr(C)]
#[derive(Debug)]
pub struct AdvPluginDesc {
    /// `sizeof(AdvPluginDesc)` as the library compiled it.
    pub size: u32,
    /// One of `ADV_KIND_*`.
    pub kind: u32,
    /// Unique plugin name (NUL-terminated, `[a-z0-9_-]+` by convention).
    pub name: *const c_char,
    /// Plugin version (NUL-terminated, semver by convention).
    pub version: *const c_char,
    /// One-line description (NUL-terminated).
    pub description: *const c_char,
    /// JSON Schema of the parameters object (NUL-terminated JSON text).
    pub param_schema: *const c_char,
    // The function pointer types are spelled out (same types as the `Adv*Fn` aliases) so that
    // cbindgen emits them as nullable C function pointers.
    /// An [`AdvCreateFn`].
    pub create: Option<
        unsafe extern "C" fn(
            host: *const AdvHost,
            params_json: *const c_char,
            params_len: usize,
            out_instance: *mut *mut c_void,
        ) -> AdvStatus,
    >,
    /// An [`AdvProcessFn`].
    pub process: Option<
        unsafe extern "C" fn(
            instance: *mut c_void,
            host: *const AdvHost,
            batch: *const AdvBatch,
        ) -> AdvStatus,
    >,
    /// An [`AdvDestroyFn`].
    pub destroy: Option<unsafe extern "C" fn(instance: *mut c_void)>,

    // ---- appended in ABI 1.3 (read only when `size` covers it) ------------------------------
    /// Detectors whose score is a differentiable function of the model's features (the
    /// `model_features` value): writes each row's score to `out_scores[0..rows]` and the
    /// gradient of the score w.r.t. that row's features to `out_grad[0..rows * dim]`, for
    /// features `[rows, dim]` (row-major). An adaptive attack descends this score through the
    /// model (the score the detector thresholds, Carlini and Wagner 2017). The host table
    /// serves errors, logs, tensors and `model_head` here; there is no batch (no frames,
    /// input, `model_forward` or audit). Null, or `ADV_ERR_UNSUPPORTED`: the score has no such
    /// gradient.
    pub score_grad: Option<
        unsafe extern "C" fn(
            instance: *mut c_void,
            host: *const AdvHost,
            features: *const f32,
            rows: usize,
            dim: usize,
            out_scores: *mut f32,
            out_grad: *mut f32,
        ) -> AdvStatus,
    >,
}

/// One batch of frames handed to `process`. Fields are only ever appended.
#[repr(C)]
#[derive(Debug)]
pub struct AdvBatch {
    /// `sizeof(AdvBatch)` as the host compiled it.
    pub size: u32,
    /// Number of frames N.
    pub frames: u32,
    /// Stored values `[N, C, H, W]` (C = samples per pixel), f32, on the active backend.
    pub input: AdvTensor,
    /// The plugin's seed for this batch (derived from the run seed and the plugin name); the
    /// random services mix it with the stream number the plugin passes.
    pub seed: u64,
}

/// What a frame is, for the plugin. Filled by `AdvHost::frame_meta`; the caller sets `size` to
/// its `sizeof(AdvFrameMeta)` and the host writes only the fields that fit. Fields are only ever
/// appended.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct AdvFrameMeta {
    pub size: u32,
    pub rows: u32,
    pub cols: u32,
    pub samples_per_pixel: u32,
    pub bits_allocated: u32,
    pub bits_stored: u32,
    /// 1 when stored values are two's complement.
    pub is_signed: u32,
    /// 1 when the pixels are float or double pixel data.
    pub is_float: u32,
    /// 1 when `window_center` / `window_width` hold the frame's first VOI window.
    pub has_window: u32,
    /// Frame number within its file.
    pub frame_index: u32,
    pub rescale_slope: f64,
    pub rescale_intercept: f64,
    pub window_center: f64,
    pub window_width: f64,
    /// Representable stored-value range (BitsStored, signedness).
    pub value_min: f64,
    pub value_max: f64,
    /// True class label given for the run, or -1.
    pub label: i64,
    /// Target class given for the run, or -1.
    pub target: i64,
    /// Modality (0008,0060), NUL-terminated, empty when absent.
    pub modality: [c_char; 16],
}

/// One input of a CPU kernel callback: the downloaded data of a tensor.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct AdvCpuSlice {
    pub data: *const f32,
    pub len: usize,
    pub shape: *const u64,
    pub ndim: u32,
}

/// The CPU counterpart of a plugin shader: reads `inputs` and `params`, writes all of `out`.
pub type AdvCpuKernelFn = unsafe extern "C" fn(
    user: *mut c_void,
    inputs: *const AdvCpuSlice,
    n_inputs: u32,
    params: *const f32,
    n_params: u32,
    out: *mut f32,
    out_len: usize,
) -> AdvStatus;

/// A plugin-supplied compute kernel (`AdvHost::run_shader`). On the GPU backend the host runs
/// the WGSL: binding 0 is `var<storage, read> params: array<f32>` (the `params` values, at least
/// one element), bindings 1..=n are the inputs as `var<storage, read> array<f32>`, and binding
/// n+1 is the output `var<storage, read_write> array<f32>`, all in `@group(0)`; the output
/// starts zeroed, and bound arrays may be longer than their tensors (pass sizes in `params`).
/// On the CPU backend the host calls `cpu` instead. Fields are only ever appended.
#[repr(C)]
#[derive(Debug)]
pub struct AdvShaderCall {
    /// `sizeof(AdvShaderCall)` as the caller compiled it.
    pub size: u32,
    /// WGSL source (UTF-8, not necessarily NUL-terminated).
    pub wgsl: *const c_char,
    pub wgsl_len: usize,
    /// Entry point name (UTF-8).
    pub entry: *const c_char,
    pub entry_len: usize,
    pub inputs: *const AdvTensor,
    pub n_inputs: u32,
    /// Output shape.
    pub out_shape: *const u64,
    pub out_ndim: u32,
    pub params: *const f32,
    pub n_params: u32,
    /// Workgroups to dispatch (x, y, z).
    pub workgroups: [u32; 3],
    /// An [`AdvCpuKernelFn`]. Required for the CPU backend; may be null when the plugin only
    /// runs on the GPU.
    pub cpu: Option<
        unsafe extern "C" fn(
            user: *mut c_void,
            inputs: *const AdvCpuSlice,
            n_inputs: u32,
            params: *const f32,
            n_params: u32,
            out: *mut f32,
            out_len: usize,
        ) -> AdvStatus,
    >,
    pub cpu_user: *mut c_void,
}

/// The host services, passed to every plugin call. `ctx` is opaque and valid only during that
/// call. Fields are only ever appended: a plugin built against a newer minor must check `size`
/// before calling a service the host may lack.
///
/// Every service returns `ADV_OK` or an error status whose message `last_error` returns. Result
/// tensors are written to `*out`.
#[repr(C)]
#[derive(Debug)]
pub struct AdvHost {
    /// The host's ABI. Always the first field.
    pub abi: AdvAbiVersion,
    /// `sizeof(AdvHost)` as the host compiled it.
    pub size: u32,
    pub ctx: *mut c_void,

    /// Sets the message for the error status the plugin is about to return.
    pub set_error: unsafe extern "C" fn(ctx: *mut c_void, msg: *const c_char, len: usize),
    /// Copies the last host service error message into `buf` (truncated to `cap`), returns its
    /// full length in bytes.
    pub last_error: unsafe extern "C" fn(ctx: *mut c_void, buf: *mut c_char, cap: usize) -> usize,
    /// Logs through the host's logger (`ADV_LOG_*`).
    pub log: unsafe extern "C" fn(ctx: *mut c_void, level: u32, msg: *const c_char, len: usize),
    /// `ADV_BACKEND_CPU` or `ADV_BACKEND_GPU`.
    pub backend_kind: unsafe extern "C" fn(ctx: *mut c_void) -> u32,
    /// Metadata of frame `index` (0..N) of the current batch.
    pub frame_meta:
        unsafe extern "C" fn(ctx: *mut c_void, index: u32, out: *mut AdvFrameMeta) -> AdvStatus,

    // ---- tensors ------------------------------------------------------------------------------
    pub tensor_zeros: unsafe extern "C" fn(
        ctx: *mut c_void,
        shape: *const u64,
        ndim: u32,
        out: *mut AdvTensor,
    ) -> AdvStatus,
    /// Uploads `len` f32 (must equal the shape's element count).
    pub tensor_upload: unsafe extern "C" fn(
        ctx: *mut c_void,
        data: *const f32,
        len: usize,
        shape: *const u64,
        ndim: u32,
        out: *mut AdvTensor,
    ) -> AdvStatus,
    /// Downloads into `out` (`len` must equal the element count).
    pub tensor_download: unsafe extern "C" fn(
        ctx: *mut c_void,
        t: AdvTensor,
        out: *mut f32,
        len: usize,
    ) -> AdvStatus,
    /// Writes up to `cap` dims to `shape`, the rank to `*ndim`.
    pub tensor_shape: unsafe extern "C" fn(
        ctx: *mut c_void,
        t: AdvTensor,
        shape: *mut u64,
        cap: u32,
        ndim: *mut u32,
    ) -> AdvStatus,
    pub tensor_free: unsafe extern "C" fn(ctx: *mut c_void, t: AdvTensor) -> AdvStatus,
    /// `a * x + b * y` (same shapes).
    pub axpby: unsafe extern "C" fn(
        ctx: *mut c_void,
        a: f32,
        x: AdvTensor,
        b: f32,
        y: AdvTensor,
        out: *mut AdvTensor,
    ) -> AdvStatus,

    // ---- runtime primitives (per sample = over all axes but the first) --------------------------
    /// `x + alpha * sign(g)`.
    pub sign_step: unsafe extern "C" fn(
        ctx: *mut c_void,
        x: AdvTensor,
        g: AdvTensor,
        alpha: f32,
        out: *mut AdvTensor,
    ) -> AdvStatus,
    /// `x + alpha * g / ||g||_2` per sample.
    pub l2_step: unsafe extern "C" fn(
        ctx: *mut c_void,
        x: AdvTensor,
        g: AdvTensor,
        alpha: f32,
        out: *mut AdvTensor,
    ) -> AdvStatus,
    /// Projection of `x` onto the `norm` ball of radius `eps` around `x0` (L2 or L∞).
    pub project: unsafe extern "C" fn(
        ctx: *mut c_void,
        x: AdvTensor,
        x0: AdvTensor,
        eps: f32,
        norm: u32,
        out: *mut AdvTensor,
    ) -> AdvStatus,
    /// Clamp each frame of a batch-shaped tensor to its stored-value range.
    pub clip_to_range:
        unsafe extern "C" fn(ctx: *mut c_void, x: AdvTensor, out: *mut AdvTensor) -> AdvStatus,
    /// Per-sample norm, written to `out[0..n]` (`n` = the first dim).
    pub norm_per_sample: unsafe extern "C" fn(
        ctx: *mut c_void,
        x: AdvTensor,
        norm: u32,
        out: *mut f32,
        n: usize,
    ) -> AdvStatus,
    /// Gaussian blur of each `[H, W]` plane of an `[N, C, H, W]` tensor (reflect border).
    pub gaussian_filter: unsafe extern "C" fn(
        ctx: *mut c_void,
        x: AdvTensor,
        sigma: f32,
        out: *mut AdvTensor,
    ) -> AdvStatus,
    /// Median over a `(2r+1)^2` window of each `[H, W]` plane (reflect border).
    pub median_filter: unsafe extern "C" fn(
        ctx: *mut c_void,
        x: AdvTensor,
        radius: u32,
        out: *mut AdvTensor,
    ) -> AdvStatus,
    /// Uniform in `[lo, hi)` from the batch seed and `stream` (counter-based, backend-independent).
    pub random_uniform: unsafe extern "C" fn(
        ctx: *mut c_void,
        shape: *const u64,
        ndim: u32,
        lo: f32,
        hi: f32,
        stream: u64,
        out: *mut AdvTensor,
    ) -> AdvStatus,
    /// Normal with standard deviation `std` from the batch seed and `stream`.
    pub random_normal: unsafe extern "C" fn(
        ctx: *mut c_void,
        shape: *const u64,
        ndim: u32,
        std: f32,
        stream: u64,
        out: *mut AdvTensor,
    ) -> AdvStatus,

    // ---- model ----------------------------------------------------------------------------------
    /// Logits `[N, K]` of the run's model (with its preprocessing) for stored values `x`. Since
    /// ABI 1.1, `x` may also hold `m * N` rows (any whole multiple of the batch's frame count):
    /// row `r` is preprocessed as frame `r mod N`, so a plugin can evaluate many variants of every
    /// frame (noise samples) in one call.
    pub model_forward:
        unsafe extern "C" fn(ctx: *mut c_void, x: AdvTensor, out: *mut AdvTensor) -> AdvStatus,
    /// Per-sample objective (`ADV_LOSS_*`) written to `out_losses[0..N]` and its gradient w.r.t.
    /// the stored values `x` in `*out_grad`. `targets` holds N class indices: the true labels, or
    /// the targets when `targeted` is 1.
    pub model_loss_grad: unsafe extern "C" fn(
        ctx: *mut c_void,
        x: AdvTensor,
        loss: u32,
        kappa: f32,
        targeted: u32,
        targets: *const u32,
        n_targets: usize,
        out_losses: *mut f32,
        out_grad: *mut AdvTensor,
    ) -> AdvStatus,

    // ---- custom kernels ---------------------------------------------------------------------------
    pub run_shader: unsafe extern "C" fn(
        ctx: *mut c_void,
        call: *const AdvShaderCall,
        out: *mut AdvTensor,
    ) -> AdvStatus,

    // ---- audit and results --------------------------------------------------------------------------
    /// A named number for frame `frame` of the batch (a score, a norm...).
    pub audit_number: unsafe extern "C" fn(
        ctx: *mut c_void,
        frame: u32,
        key: *const c_char,
        key_len: usize,
        value: f64,
    ) -> AdvStatus,
    /// A named flag (0 or 1) for frame `frame`.
    pub audit_flag: unsafe extern "C" fn(
        ctx: *mut c_void,
        frame: u32,
        key: *const c_char,
        key_len: usize,
        value: u32,
    ) -> AdvStatus,
    /// A named text value for frame `frame`.
    pub audit_text: unsafe extern "C" fn(
        ctx: *mut c_void,
        frame: u32,
        key: *const c_char,
        key_len: usize,
        text: *const c_char,
        text_len: usize,
    ) -> AdvStatus,
    /// The batch's result: new stored values, the input's shape.
    pub set_output: unsafe extern "C" fn(ctx: *mut c_void, t: AdvTensor) -> AdvStatus,

    // ---- appended in ABI 1.1 ----------------------------------------------------------------------
    /// Per frame of the batch: model-input units per stored unit (the derivative of one model
    /// input pixel w.r.t. one stored value inside the window, before any resize), written to
    /// `out[0..n]` with `n` = the batch's frame count. Lets a plugin state a scale given in the
    /// model's input units (a smoothing sigma, a certified radius) in stored units.
    pub model_input_scale:
        unsafe extern "C" fn(ctx: *mut c_void, out: *mut f64, n: usize) -> AdvStatus,

    // ---- appended in ABI 1.2 ----------------------------------------------------------------------
    /// Features `[R, D]` of the run's model for stored values `x` (same preprocessing and row
    /// rule as `model_forward`): the value the model card names with `features:`, by default the
    /// input of the last Gemm/MatMul before the logits (the last hidden layer), flattened per row.
    pub model_features:
        unsafe extern "C" fn(ctx: *mut c_void, x: AdvTensor, out: *mut AdvTensor) -> AdvStatus,
    /// Logits `[R, K]` of the sub-graph from the feature value to the logits, for features
    /// `[R, D]` (any number of rows): `model_head(model_features(x)) == model_forward(x)`, and a
    /// plugin may perturb the features in between (MC dropout on the last hidden layer).
    pub model_head:
        unsafe extern "C" fn(ctx: *mut c_void, f: AdvTensor, out: *mut AdvTensor) -> AdvStatus,
    /// The model's identity (hex sha256 of the imported graph: ops, wiring, weights), copied to
    /// `buf` (truncated to `cap` bytes, no terminator); its full length in `*len`. A plugin
    /// storing fitted state records it to refuse a state fitted on another model.
    pub model_id: unsafe extern "C" fn(
        ctx: *mut c_void,
        buf: *mut c_char,
        cap: usize,
        len: *mut usize,
    ) -> AdvStatus,
}
