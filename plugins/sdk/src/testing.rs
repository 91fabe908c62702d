//! An in-process host for plugin unit tests (feature `testing`): runs a plugin through its
//! exported C entry points (so the adapters, error and panic handling are exercised exactly as
//! when the adverse host loads the library) against a pure-Rust CPU implementation of every host
//! service, without building or loading a library.
//!
//! The model service uses a linear classifier ([`TestModel`]) with exact gradients for
//! cross-entropy, the CW margin and DLR; everything else follows the adverse host's semantics (the
//! filters and random streams are the very same code, [`crate::cpu`]).
//!
//! ```text
//! let mut host = TestHost::new(vec![TestHost::frame(8, 8)]);
//! let out = testing::run(adverse_plugin_library(), "median", &json!({"radius": 1}), &mut host, &img, [1, 1, 8, 8])?;
//! ```

use std::collections::{BTreeMap, HashMap};
use std::ffi::{c_char, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};

use crate::abi::{self, AdvFrameMeta, AdvHost, AdvLibrary, AdvPluginDesc, AdvStatus, AdvTensor};
use crate::cpu;
use crate::host::slice_or_empty;
use crate::{FrameMeta, Kind};

/// A linear classifier `logits = W x + b` over the flattened stored values of a frame.
#[derive(Debug, Clone, PartialEq)]
pub struct TestModel {
    /// `[K, D]`, row-major.
    pub weights: Vec<f32>,
    /// `[K]`.
    pub bias: Vec<f32>,
}

impl TestModel {
    fn classes(&self) -> usize {
        self.bias.len()
    }
    fn logits(&self, x: &[f32], n: usize) -> Option<Vec<f32>> {
        let k = self.classes();
        let d = x.len().checked_div(n)?;
        if k == 0 || self.weights.len() != k * d {
            return None;
        }
        let mut z = vec![0f32; n * k];
        for s in 0..n {
            for c in 0..k {
                let w = &self.weights[c * d..(c + 1) * d];
                z[s * k + c] = self.bias[c]
                    + w.iter()
                        .zip(&x[s * d..(s + 1) * d])
                        .map(|(a, b)| a * b)
                        .sum::<f32>();
            }
        }
        Some(z)
    }
}

/// What one batch produced.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Outcome {
    /// The stored values the plugin set as output, if any.
    pub output: Option<Vec<f32>>,
    /// Audit values per frame.
    pub audit: Vec<BTreeMap<String, serde_json::Value>>,
    /// Messages the plugin logged.
    pub logs: Vec<String>,
}

/// A failed create or process: the status and the plugin's message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub status: AdvStatus,
    pub message: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "status {}: {}", self.status, self.message)
    }
}

/// The host's state during a run.
#[derive(Debug, Default)]
pub struct TestHost {
    frames: Vec<FrameMeta>,
    model: Option<TestModel>,
    /// Model-input units per stored unit: the model sees `input_scale * x` (1 unless set).
    input_scale: Option<f64>,
    seed: u64,
    tensors: HashMap<AdvTensor, (Vec<f32>, Vec<usize>)>,
    next: AdvTensor,
    service_error: String,
    plugin_error: String,
    output: Option<AdvTensor>,
    audit: Vec<BTreeMap<String, serde_json::Value>>,
    logs: Vec<String>,
    /// The `size` the host table declares (None: this SDK's full table).
    table_size: Option<u32>,
}

impl TestHost {
    pub fn new(frames: Vec<FrameMeta>) -> Self {
        TestHost {
            frames,
            seed: 0,
            next: 1,
            ..Default::default()
        }
    }
    pub fn with_model(mut self, model: TestModel) -> Self {
        self.model = Some(model);
        self
    }
    /// Makes the model see `scale * x` for stored values `x` (a preprocessing scale such as
    /// 1/255), reported by the `model_input_scale` service for every frame.
    pub fn with_input_scale(mut self, scale: f64) -> Self {
        self.input_scale = Some(scale);
        self
    }
    fn scale(&self) -> f64 {
        self.input_scale.unwrap_or(1.0)
    }
    /// Makes the host table declare `size` bytes, as a host of an older minor ABI would: the
    /// services appended after it are absent for the plugin (the SDK's wrappers refuse them).
    /// E.g. `std::mem::offset_of!(AdvHost, model_features)` for an ABI 1.1 host.
    pub fn with_table_size(mut self, size: u32) -> Self {
        self.table_size = Some(size);
        self
    }

    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }
    /// A 12-bit unsigned single-sample frame of `rows` x `cols`, no label.
    pub fn frame(rows: u32, cols: u32) -> FrameMeta {
        FrameMeta {
            rows,
            cols,
            samples_per_pixel: 1,
            bits_allocated: 16,
            bits_stored: 12,
            signed: false,
            float: false,
            frame_index: 0,
            rescale_slope: 1.0,
            rescale_intercept: 0.0,
            window: None,
            value_range: (0.0, 4095.0),
            label: None,
            target: None,
            modality: "OT".into(),
        }
    }

    fn put(&mut self, data: Vec<f32>, shape: Vec<usize>) -> AdvTensor {
        let id = self.next;
        self.next += 1;
        self.tensors.insert(id, (data, shape));
        id
    }

    fn get(&self, t: AdvTensor) -> Result<&(Vec<f32>, Vec<usize>), String> {
        self.tensors
            .get(&t)
            .ok_or_else(|| format!("unknown tensor handle {t}"))
    }

    fn table(&mut self) -> AdvHost {
        AdvHost {
            abi: abi::AdvAbiVersion {
                major: abi::ADVERSE_ABI_MAJOR,
                minor: abi::ADVERSE_ABI_MINOR,
            },
            size: self
                .table_size
                .unwrap_or(std::mem::size_of::<AdvHost>() as u32),
            ctx: (self as *mut TestHost).cast(),
            set_error,
            last_error,
            log,
            backend_kind,
            frame_meta,
            tensor_zeros,
            tensor_upload,
            tensor_download,
            tensor_shape,
            tensor_free,
            axpby,
            sign_step,
            l2_step,
            project,
            clip_to_range,
            norm_per_sample,
            gaussian_filter,
            median_filter,
            random_uniform,
            random_normal,
            model_forward,
            model_loss_grad,
            run_shader,
            audit_number,
            audit_flag,
            audit_text,
            set_output,
            model_input_scale,
            model_features,
            model_head,
            model_id,
        }
    }
}

/// The plugin named `name` in `lib`.
pub fn find<'l>(lib: &'l AdvLibrary, name: &str) -> Option<&'l AdvPluginDesc> {
    (0..lib.plugin_count as usize).find_map(|i| {
        // SAFETY: an in-process library table (from `export_plugins!`) holds `plugin_count`
        // descriptors with this crate's layout.
        let d = unsafe { &*lib.plugins.add(i) };
        // SAFETY: descriptor names are NUL-terminated static strings.
        let n = unsafe { std::ffi::CStr::from_ptr(d.name) };
        (n.to_str().ok() == Some(name)).then_some(d)
    })
}

/// The kind a descriptor declares.
pub fn kind(desc: &AdvPluginDesc) -> Option<Kind> {
    Kind::from_raw(desc.kind)
}

/// Creates plugin `name` from `lib` with `params`, runs one batch of `input` (`[N, C, H, W]`
/// stored values, one [`FrameMeta`] per frame in `host`), destroys it and returns what it
/// produced.
pub fn run(
    lib: &AdvLibrary,
    name: &str,
    params: &serde_json::Value,
    host: &mut TestHost,
    input: &[f32],
    shape: [usize; 4],
) -> Result<Outcome, Failure> {
    let mut out = run_batches(lib, name, params, host, &[(input, shape)])?;
    Ok(out.pop().unwrap_or_default())
}

/// Like [`run`], with several batches through one plugin instance (state a plugin keeps across
/// batches, e.g. a universal perturbation, is exercised). Every batch uses the frame
/// descriptions in `host`; the first failing batch ends the run.
pub fn run_batches(
    lib: &AdvLibrary,
    name: &str,
    params: &serde_json::Value,
    host: &mut TestHost,
    batches: &[(&[f32], [usize; 4])],
) -> Result<Vec<Outcome>, Failure> {
    let fail = |status, message: String| Failure { status, message };
    let desc = find(lib, name)
        .ok_or_else(|| fail(abi::ADV_ERR_INVALID, format!("no plugin named {name}")))?;
    let (Some(create), Some(process), Some(destroy)) = (desc.create, desc.process, desc.destroy)
    else {
        return Err(fail(
            abi::ADV_ERR_INVALID,
            "descriptor lacks create/process/destroy".into(),
        ));
    };
    for (input, shape) in batches {
        if shape[0] != host.frames.len() || input.len() != shape.iter().product::<usize>() {
            return Err(fail(
                abi::ADV_ERR_INVALID,
                format!(
                    "{} frame descriptions and {} values for shape {shape:?}",
                    host.frames.len(),
                    input.len()
                ),
            ));
        }
    }
    host.logs.clear();
    let json = params.to_string();
    let table = host.table();
    let mut inst: *mut c_void = std::ptr::null_mut();
    // SAFETY: table and its ctx (host) outlive the call; json is passed with its length.
    let st = unsafe { create(&table, json.as_ptr().cast(), json.len(), &mut inst) };
    if st != abi::ADV_OK {
        return Err(fail(st, std::mem::take(&mut host.plugin_error)));
    }
    let mut outcomes = Vec::new();
    for (input, shape) in batches {
        host.audit = vec![BTreeMap::new(); shape[0]];
        host.output = None;
        let x = host.put(input.to_vec(), shape.to_vec());
        let table = host.table();
        let batch = abi::AdvBatch {
            size: std::mem::size_of::<abi::AdvBatch>() as u32,
            frames: shape[0] as u32,
            input: x,
            seed: host.seed,
        };
        // SAFETY: inst came from create; table and batch are valid for the call.
        let st = unsafe { process(inst, &table, &batch) };
        if st != abi::ADV_OK {
            // SAFETY: inst came from create and is destroyed once.
            unsafe { destroy(inst) };
            host.tensors.clear();
            return Err(fail(st, std::mem::take(&mut host.plugin_error)));
        }
        let output = host
            .output
            .and_then(|t| host.tensors.get(&t).map(|(d, _)| d.clone()));
        host.tensors.clear();
        outcomes.push(Outcome {
            output,
            audit: std::mem::take(&mut host.audit),
            logs: std::mem::take(&mut host.logs),
        });
    }
    // SAFETY: inst came from create and is destroyed once.
    unsafe { destroy(inst) };
    Ok(outcomes)
}

/// Creates plugin `name` from `lib` with `params`, calls its ABI 1.3 `score_grad` on features
/// `[rows, dim]`, destroys it and returns `(scores, gradient)`.
pub fn score_grad(
    lib: &AdvLibrary,
    name: &str,
    params: &serde_json::Value,
    host: &mut TestHost,
    features: &[f32],
    rows: usize,
    dim: usize,
) -> Result<(Vec<f32>, Vec<f32>), Failure> {
    let fail = |status, message: String| Failure { status, message };
    let desc = find(lib, name)
        .ok_or_else(|| fail(abi::ADV_ERR_INVALID, format!("no plugin named {name}")))?;
    let (Some(create), Some(destroy)) = (desc.create, desc.destroy) else {
        return Err(fail(
            abi::ADV_ERR_INVALID,
            "descriptor lacks create/destroy".into(),
        ));
    };
    let Some(f) = desc.score_grad else {
        return Err(fail(abi::ADV_ERR_UNSUPPORTED, "no score_grad".into()));
    };
    if features.len() != rows * dim {
        return Err(fail(
            abi::ADV_ERR_INVALID,
            format!("{} values for {rows} x {dim} features", features.len()),
        ));
    }
    let json = params.to_string();
    let table = host.table();
    let mut inst: *mut c_void = std::ptr::null_mut();
    // SAFETY: table and its ctx (host) outlive the call; json is passed with its length.
    let st = unsafe { create(&table, json.as_ptr().cast(), json.len(), &mut inst) };
    if st != abi::ADV_OK {
        return Err(fail(st, std::mem::take(&mut host.plugin_error)));
    }
    let (mut scores, mut grad) = (vec![0f32; rows], vec![0f32; rows * dim]);
    let table = host.table();
    // SAFETY: inst came from create; the features and both output buffers have the lengths
    // the ABI requires for `rows` x `dim`.
    let st = unsafe {
        f(
            inst,
            &table,
            features.as_ptr(),
            rows,
            dim,
            scores.as_mut_ptr(),
            grad.as_mut_ptr(),
        )
    };
    // SAFETY: inst came from create and is destroyed once.
    unsafe { destroy(inst) };
    if st != abi::ADV_OK {
        return Err(fail(st, std::mem::take(&mut host.plugin_error)));
    }
    Ok((scores, grad))
}

// ---- the services ---------------------------------------------------------------------------

/// Runs a service body on the host state, turning errors and panics into a status plus message.
fn svc(ctx: *mut c_void, f: impl FnOnce(&mut TestHost) -> Result<(), String>) -> AdvStatus {
    // SAFETY: ctx is the `*mut TestHost` this module put in the table; the plugin calls services
    // sequentially from the thread running `run`, which holds the only other reference unused.
    let h = unsafe { &mut *ctx.cast::<TestHost>() };
    match catch_unwind(AssertUnwindSafe(|| f(h))) {
        Ok(Ok(())) => abi::ADV_OK,
        Ok(Err(e)) => {
            h.service_error = e;
            abi::ADV_ERR_INVALID
        }
        Err(_) => {
            h.service_error = "test host service panicked".into();
            abi::ADV_ERR_FAILED
        }
    }
}

fn text(p: *const c_char, len: usize) -> String {
    // SAFETY: services receive (ptr, len) pairs from the plugin per the ABI.
    let b: &[u8] = unsafe { slice_or_empty(p.cast::<u8>(), len) };
    String::from_utf8_lossy(b).into_owned()
}

fn shape_arg(shape: *const u64, ndim: u32) -> Result<Vec<usize>, String> {
    if ndim > 8 {
        return Err(format!("rank {ndim} exceeds 8"));
    }
    // SAFETY: the plugin passes `ndim` dims.
    let s = unsafe { slice_or_empty(shape, ndim as usize) };
    let v: Vec<usize> = s.iter().map(|&d| d as usize).collect();
    if v.iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .is_none_or(|n| n > 1 << 28)
    {
        return Err(format!("shape {v:?} too large"));
    }
    Ok(v)
}

fn store(out: *mut AdvTensor, id: AdvTensor) -> Result<(), String> {
    if out.is_null() {
        return Err("null output pointer".into());
    }
    // SAFETY: non-null pointer to the plugin's output handle.
    unsafe { *out = id };
    Ok(())
}

fn same_shape(
    h: &TestHost,
    a: AdvTensor,
    b: AdvTensor,
) -> Result<(Vec<f32>, Vec<f32>, Vec<usize>), String> {
    let (x, sx) = h.get(a)?.clone();
    let (y, sy) = h.get(b)?;
    if &sx != sy {
        return Err(format!("shapes differ: {sx:?} vs {sy:?}"));
    }
    Ok((x, y.clone(), sx))
}

fn per_sample(len: usize, shape: &[usize]) -> usize {
    len / shape.first().copied().unwrap_or(1).max(1)
}

unsafe extern "C" fn set_error(ctx: *mut c_void, msg: *const c_char, len: usize) {
    let m = text(msg, len);
    svc(ctx, |h| {
        h.plugin_error = m;
        Ok(())
    });
}

unsafe extern "C" fn last_error(ctx: *mut c_void, buf: *mut c_char, cap: usize) -> usize {
    // SAFETY: ctx is this module's TestHost (see `svc`).
    let h = unsafe { &*ctx.cast::<TestHost>() };
    let b = h.service_error.as_bytes();
    if !buf.is_null() {
        // SAFETY: the caller's buffer holds `cap` bytes.
        unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), buf.cast::<u8>(), b.len().min(cap)) };
    }
    b.len()
}

unsafe extern "C" fn log(ctx: *mut c_void, _level: u32, msg: *const c_char, len: usize) {
    let m = text(msg, len);
    svc(ctx, |h| {
        h.logs.push(m);
        Ok(())
    });
}

unsafe extern "C" fn backend_kind(_ctx: *mut c_void) -> u32 {
    abi::ADV_BACKEND_CPU
}

unsafe extern "C" fn frame_meta(ctx: *mut c_void, index: u32, out: *mut AdvFrameMeta) -> AdvStatus {
    svc(ctx, |h| {
        let m = h
            .frames
            .get(index as usize)
            .ok_or_else(|| format!("frame {index} out of range"))?
            .to_raw();
        // SAFETY: `out` comes from the plugin's frame_meta call, which the ABI requires to point to
        // an AdvFrameMeta with its `size` set.
        unsafe { crate::host::write_frame_meta(out, &m) }
    })
}

unsafe extern "C" fn tensor_zeros(
    ctx: *mut c_void,
    shape: *const u64,
    ndim: u32,
    out: *mut AdvTensor,
) -> AdvStatus {
    svc(ctx, |h| {
        let s = shape_arg(shape, ndim)?;
        let id = h.put(vec![0.0; s.iter().product()], s);
        store(out, id)
    })
}

unsafe extern "C" fn tensor_upload(
    ctx: *mut c_void,
    data: *const f32,
    len: usize,
    shape: *const u64,
    ndim: u32,
    out: *mut AdvTensor,
) -> AdvStatus {
    svc(ctx, |h| {
        let s = shape_arg(shape, ndim)?;
        if s.iter().product::<usize>() != len {
            return Err(format!("{len} values for shape {s:?}"));
        }
        // SAFETY: the plugin passes `len` floats.
        let d = unsafe { slice_or_empty(data, len) }.to_vec();
        let id = h.put(d, s);
        store(out, id)
    })
}

unsafe extern "C" fn tensor_download(
    ctx: *mut c_void,
    t: AdvTensor,
    out: *mut f32,
    len: usize,
) -> AdvStatus {
    svc(ctx, |h| {
        let (d, _) = h.get(t)?;
        if d.len() != len || out.is_null() {
            return Err(format!(
                "download of {} values into a buffer of {len}",
                d.len()
            ));
        }
        // SAFETY: out holds `len` floats.
        unsafe { std::ptr::copy_nonoverlapping(d.as_ptr(), out, len) };
        Ok(())
    })
}

unsafe extern "C" fn tensor_shape(
    ctx: *mut c_void,
    t: AdvTensor,
    shape: *mut u64,
    cap: u32,
    ndim: *mut u32,
) -> AdvStatus {
    svc(ctx, |h| {
        let (_, s) = h.get(t)?;
        if ndim.is_null() || (s.len() > cap as usize) || (shape.is_null() && !s.is_empty()) {
            return Err("shape buffer too small".into());
        }
        // SAFETY: shape holds `cap` >= rank entries; ndim is non-null.
        unsafe {
            for (i, &d) in s.iter().enumerate() {
                *shape.add(i) = d as u64;
            }
            *ndim = s.len() as u32;
        }
        Ok(())
    })
}

unsafe extern "C" fn tensor_free(ctx: *mut c_void, t: AdvTensor) -> AdvStatus {
    svc(ctx, |h| {
        h.tensors
            .remove(&t)
            .map(|_| ())
            .ok_or_else(|| format!("unknown tensor handle {t}"))
    })
}

unsafe extern "C" fn axpby(
    ctx: *mut c_void,
    a: f32,
    x: AdvTensor,
    b: f32,
    y: AdvTensor,
    out: *mut AdvTensor,
) -> AdvStatus {
    svc(ctx, |h| {
        let (x, y, s) = same_shape(h, x, y)?;
        let id = h.put(x.iter().zip(&y).map(|(p, q)| a * p + b * q).collect(), s);
        store(out, id)
    })
}

unsafe extern "C" fn sign_step(
    ctx: *mut c_void,
    x: AdvTensor,
    g: AdvTensor,
    alpha: f32,
    out: *mut AdvTensor,
) -> AdvStatus {
    svc(ctx, |h| {
        let (x, g, s) = same_shape(h, x, g)?;
        let sign = |v: f32| {
            if v > 0.0 {
                1.0
            } else if v < 0.0 {
                -1.0
            } else {
                0.0
            }
        };
        let id = h.put(
            x.iter()
                .zip(&g)
                .map(|(p, q)| p + alpha * sign(*q))
                .collect(),
            s,
        );
        store(out, id)
    })
}

unsafe extern "C" fn l2_step(
    ctx: *mut c_void,
    x: AdvTensor,
    g: AdvTensor,
    alpha: f32,
    out: *mut AdvTensor,
) -> AdvStatus {
    svc(ctx, |h| {
        let (mut x, g, s) = same_shape(h, x, g)?;
        let d = per_sample(x.len(), &s).max(1);
        for (xs, gs) in x.chunks_mut(d).zip(g.chunks(d)) {
            let n = gs.iter().map(|v| v * v).sum::<f32>().sqrt();
            if n > 0.0 {
                for (p, q) in xs.iter_mut().zip(gs) {
                    *p += alpha * q / n;
                }
            }
        }
        let id = h.put(x, s);
        store(out, id)
    })
}

unsafe extern "C" fn project(
    ctx: *mut c_void,
    x: AdvTensor,
    x0: AdvTensor,
    eps: f32,
    norm: u32,
    out: *mut AdvTensor,
) -> AdvStatus {
    svc(ctx, |h| {
        let (mut x, x0, s) = same_shape(h, x, x0)?;
        let d = per_sample(x.len(), &s).max(1);
        match norm {
            abi::ADV_NORM_LINF => x
                .iter_mut()
                .zip(&x0)
                .for_each(|(p, q)| *p = p.clamp(q - eps, q + eps)),
            abi::ADV_NORM_L2 => {
                for (xs, os) in x.chunks_mut(d).zip(x0.chunks(d)) {
                    let n = xs
                        .iter()
                        .zip(os)
                        .map(|(p, q)| (p - q) * (p - q))
                        .sum::<f32>()
                        .sqrt();
                    if n > eps {
                        xs.iter_mut()
                            .zip(os)
                            .for_each(|(p, q)| *p = q + (*p - q) * eps / n);
                    }
                }
            }
            o => return Err(format!("projection norm {o} is not supported (L2 or Linf)")),
        }
        let id = h.put(x, s);
        store(out, id)
    })
}

unsafe extern "C" fn clip_to_range(
    ctx: *mut c_void,
    x: AdvTensor,
    out: *mut AdvTensor,
) -> AdvStatus {
    svc(ctx, |h| {
        let (mut d, s) = h.get(x)?.clone();
        if s.first() != Some(&h.frames.len()) {
            return Err(format!(
                "clip_to_range needs a batch-shaped tensor, got {s:?}"
            ));
        }
        let per = per_sample(d.len(), &s).max(1);
        for (xs, m) in d.chunks_mut(per).zip(&h.frames) {
            let (lo, hi) = (m.value_range.0 as f32, m.value_range.1 as f32);
            xs.iter_mut().for_each(|v| *v = v.clamp(lo, hi));
        }
        let id = h.put(d, s);
        store(out, id)
    })
}

unsafe extern "C" fn norm_per_sample(
    ctx: *mut c_void,
    x: AdvTensor,
    norm: u32,
    out: *mut f32,
    n: usize,
) -> AdvStatus {
    svc(ctx, |h| {
        let (d, s) = h.get(x)?;
        if s.first() != Some(&n) || out.is_null() {
            return Err(format!("norm buffer of {n} for shape {s:?}"));
        }
        let per = per_sample(d.len(), s).max(1);
        for (i, c) in d.chunks(per).enumerate() {
            let v = match norm {
                abi::ADV_NORM_L1 => c.iter().map(|v| v.abs()).sum(),
                abi::ADV_NORM_L2 => c.iter().map(|v| v * v).sum::<f32>().sqrt(),
                abi::ADV_NORM_LINF => c.iter().fold(0f32, |m, v| m.max(v.abs())),
                o => return Err(format!("unknown norm {o}")),
            };
            // SAFETY: out holds n floats and i < n.
            unsafe { *out.add(i) = v };
        }
        Ok(())
    })
}

unsafe extern "C" fn gaussian_filter(
    ctx: *mut c_void,
    x: AdvTensor,
    sigma: f32,
    out: *mut AdvTensor,
) -> AdvStatus {
    svc(ctx, |h| {
        let (d, s) = h.get(x)?.clone();
        let r = cpu::gaussian_filter(&d, &s, sigma)
            .ok_or_else(|| format!("gaussian_filter: bad shape {s:?} or sigma {sigma}"))?;
        let id = h.put(r, s);
        store(out, id)
    })
}

unsafe extern "C" fn median_filter(
    ctx: *mut c_void,
    x: AdvTensor,
    radius: u32,
    out: *mut AdvTensor,
) -> AdvStatus {
    svc(ctx, |h| {
        let (d, s) = h.get(x)?.clone();
        let r = cpu::median_filter(&d, &s, radius)
            .ok_or_else(|| format!("median_filter: bad shape {s:?} or radius {radius}"))?;
        let id = h.put(r, s);
        store(out, id)
    })
}

unsafe extern "C" fn random_uniform(
    ctx: *mut c_void,
    shape: *const u64,
    ndim: u32,
    lo: f32,
    hi: f32,
    stream: u64,
    out: *mut AdvTensor,
) -> AdvStatus {
    svc(ctx, |h| {
        let s = shape_arg(shape, ndim)?;
        let seed = cpu::stream_seed(h.seed, stream);
        let d = (0..s.iter().product::<usize>())
            .map(|i| lo + (hi - lo) * cpu::counter_uniform(seed, i as u32))
            .collect();
        let id = h.put(d, s);
        store(out, id)
    })
}

unsafe extern "C" fn random_normal(
    ctx: *mut c_void,
    shape: *const u64,
    ndim: u32,
    std: f32,
    stream: u64,
    out: *mut AdvTensor,
) -> AdvStatus {
    svc(ctx, |h| {
        let s = shape_arg(shape, ndim)?;
        let seed = cpu::stream_seed(h.seed, stream);
        let d = (0..s.iter().product::<usize>())
            .map(|i| std * cpu::counter_normal(seed, i as u32))
            .collect();
        let id = h.put(d, s);
        store(out, id)
    })
}

unsafe extern "C" fn model_forward(
    ctx: *mut c_void,
    x: AdvTensor,
    out: *mut AdvTensor,
) -> AdvStatus {
    svc(ctx, |h| {
        let m = h.model.clone().ok_or("no model in this test host")?;
        let sc = h.scale() as f32;
        let (d, s) = h.get(x)?;
        let n = s.first().copied().unwrap_or(0);
        let d: Vec<f32> = d.iter().map(|v| v * sc).collect();
        let z = m
            .logits(&d, n)
            .ok_or("input does not match the test model")?;
        let id = h.put(z, vec![n, m.classes()]);
        store(out, id)
    })
}

#[allow(clippy::too_many_arguments)]
unsafe extern "C" fn model_loss_grad(
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
    svc(ctx, |h| {
        let m = h.model.clone().ok_or("no model in this test host")?;
        let sc = h.scale() as f32;
        let (d, s) = h.get(x)?.clone();
        let d: Vec<f32> = d.iter().map(|v| v * sc).collect();
        let n = s.first().copied().unwrap_or(0);
        // SAFETY: the plugin passes n_targets labels.
        let t = unsafe { slice_or_empty(targets, n_targets) };
        if t.len() != n || out_losses.is_null() {
            return Err(format!("{} targets for a batch of {n}", t.len()));
        }
        let k = m.classes();
        let z = m
            .logits(&d, n)
            .ok_or("input does not match the test model")?;
        let dim = d.len() / n.max(1);
        let mut grad = vec![0f32; d.len()];
        for i in 0..n {
            let zi = &z[i * k..(i + 1) * k];
            let ti = t[i] as usize;
            if ti >= k {
                return Err(format!("class {ti} out of range for {k} classes"));
            }
            // dObjective/dlogits, and the objective.
            let (val, dz): (f32, Vec<f32>) = match loss {
                abi::ADV_LOSS_CROSS_ENTROPY => {
                    let mx = zi.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                    let e: Vec<f32> = zi.iter().map(|v| (v - mx).exp()).collect();
                    let sum: f32 = e.iter().sum();
                    let ce = -(e[ti] / sum).ln();
                    let mut g: Vec<f32> = e.iter().map(|v| v / sum).collect();
                    g[ti] -= 1.0;
                    if targeted != 0 {
                        (-ce, g.iter().map(|v| -v).collect())
                    } else {
                        (ce, g)
                    }
                }
                abi::ADV_LOSS_CW_MARGIN => {
                    let (j, zj) = zi.iter().enumerate().filter(|(c, _)| *c != ti).fold(
                        (0, f32::NEG_INFINITY),
                        |a, (c, &v)| if v > a.1 { (c, v) } else { a },
                    );
                    // Untargeted: -max(z_t - z_j, -kappa); targeted: -max(z_j - z_t, -kappa).
                    let margin = if targeted != 0 {
                        zj - zi[ti]
                    } else {
                        zi[ti] - zj
                    };
                    let mut g = vec![0f32; k];
                    if margin > -kappa {
                        let sgn = if targeted != 0 { -1.0 } else { 1.0 };
                        g[ti] = -sgn;
                        g[j] = sgn;
                    }
                    (-margin.max(-kappa), g)
                }
                abi::ADV_LOSS_DLR => {
                    // -(z_y - max_{i!=y} z_i) / (z_pi1 - z_pi3), as the adverse host ascends it.
                    if targeted != 0 {
                        return Err("DLR is untargeted only".into());
                    }
                    if k < 3 {
                        return Err("DLR needs at least 3 classes".into());
                    }
                    let (j, zj) = zi.iter().enumerate().filter(|(c, _)| *c != ti).fold(
                        (0, f32::NEG_INFINITY),
                        |a, (c, &v)| if v > a.1 { (c, v) } else { a },
                    );
                    let mut order: Vec<usize> = (0..k).collect();
                    order.sort_by(|&a, &b| zi[b].total_cmp(&zi[a]).then(a.cmp(&b)));
                    let (p1, p3) = (order[0], order[2]);
                    let num = zi[ti] - zj;
                    let den = zi[p1] - zi[p3] + 1e-12;
                    let mut g = vec![0f32; k];
                    g[ti] -= 1.0 / den;
                    g[j] += 1.0 / den;
                    g[p1] += num / (den * den);
                    g[p3] -= num / (den * den);
                    (-num / den, g)
                }
                o => return Err(format!("loss {o} is not supported by the test host")),
            };
            // SAFETY: out_losses holds n floats.
            unsafe { *out_losses.add(i) = val };
            for c in 0..k {
                let w = &m.weights[c * dim..(c + 1) * dim];
                for (gx, wv) in grad[i * dim..(i + 1) * dim].iter_mut().zip(w) {
                    *gx += dz[c] * wv;
                }
            }
        }
        // The chain rule through the input scale.
        grad.iter_mut().for_each(|g| *g *= sc);
        let id = h.put(grad, s);
        store(out_grad, id)
    })
}

unsafe extern "C" fn run_shader(
    ctx: *mut c_void,
    call: *const abi::AdvShaderCall,
    out: *mut AdvTensor,
) -> AdvStatus {
    svc(ctx, |h| {
        // SAFETY: the plugin passes a valid call description for the duration of this service.
        let call = unsafe { call.as_ref() }.ok_or("null shader call")?;
        let cpu_fn = call
            .cpu
            .ok_or("the test host runs on the CPU and the shader has no CPU callback")?;
        // SAFETY: (ptr, len) pairs from the plugin.
        let (inputs, params) = unsafe {
            (
                slice_or_empty(call.inputs, call.n_inputs as usize),
                slice_or_empty(call.params, call.n_params as usize),
            )
        };
        let out_shape = shape_arg(call.out_shape, call.out_ndim)?;
        let mut held = Vec::new();
        for &t in inputs {
            let (d, s) = h.get(t)?;
            held.push((d.clone(), s.iter().map(|&v| v as u64).collect::<Vec<u64>>()));
        }
        let slices: Vec<abi::AdvCpuSlice> = held
            .iter()
            .map(|(d, s)| abi::AdvCpuSlice {
                data: d.as_ptr(),
                len: d.len(),
                shape: s.as_ptr(),
                ndim: s.len() as u32,
            })
            .collect();
        let mut o = vec![0f32; out_shape.iter().product()];
        // SAFETY: every pointer refers to live buffers of the stated lengths.
        let st = unsafe {
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
        if st != abi::ADV_OK {
            return Err(format!("the shader's CPU callback failed with status {st}"));
        }
        let id = h.put(o, out_shape);
        store(out, id)
    })
}

fn audit_put(
    h: &mut TestHost,
    frame: u32,
    key: String,
    v: serde_json::Value,
) -> Result<(), String> {
    let row = h
        .audit
        .get_mut(frame as usize)
        .ok_or_else(|| format!("frame {frame} out of range"))?;
    row.insert(key, v);
    Ok(())
}

unsafe extern "C" fn audit_number(
    ctx: *mut c_void,
    frame: u32,
    key: *const c_char,
    key_len: usize,
    value: f64,
) -> AdvStatus {
    let k = text(key, key_len);
    svc(ctx, |h| audit_put(h, frame, k, serde_json::json!(value)))
}

unsafe extern "C" fn audit_flag(
    ctx: *mut c_void,
    frame: u32,
    key: *const c_char,
    key_len: usize,
    value: u32,
) -> AdvStatus {
    let k = text(key, key_len);
    svc(ctx, |h| {
        audit_put(h, frame, k, serde_json::json!(value != 0))
    })
}

unsafe extern "C" fn audit_text(
    ctx: *mut c_void,
    frame: u32,
    key: *const c_char,
    key_len: usize,
    t: *const c_char,
    t_len: usize,
) -> AdvStatus {
    let (k, v) = (text(key, key_len), text(t, t_len));
    svc(ctx, |h| audit_put(h, frame, k, serde_json::json!(v)))
}

unsafe extern "C" fn set_output(ctx: *mut c_void, t: AdvTensor) -> AdvStatus {
    svc(ctx, |h| {
        h.get(t)?;
        h.output = Some(t);
        Ok(())
    })
}

unsafe extern "C" fn model_input_scale(ctx: *mut c_void, out: *mut f64, n: usize) -> AdvStatus {
    svc(ctx, |h| {
        if h.model.is_none() {
            return Err("no model in this test host".into());
        }
        if out.is_null() || n != h.frames.len() {
            return Err(format!(
                "a buffer of {n} scales for {} frames",
                h.frames.len()
            ));
        }
        let sc = h.scale();
        for i in 0..n {
            // SAFETY: out holds n f64 (checked non-null above).
            unsafe { *out.add(i) = sc };
        }
        Ok(())
    })
}

/// The test model's features: the input of its one linear layer (the scaled stored values,
/// flattened per row), so `model_head(model_features(x)) == model_forward(x)`.
unsafe extern "C" fn model_features(
    ctx: *mut c_void,
    x: AdvTensor,
    out: *mut AdvTensor,
) -> AdvStatus {
    svc(ctx, |h| {
        let m = h.model.clone().ok_or("no model in this test host")?;
        let sc = h.scale() as f32;
        let (d, s) = h.get(x)?;
        let n = s.first().copied().unwrap_or(0);
        let dim = d.len().checked_div(n).unwrap_or(0);
        if m.classes() == 0 || m.weights.len() != m.classes() * dim {
            return Err("input does not match the test model".into());
        }
        let f: Vec<f32> = d.iter().map(|v| v * sc).collect();
        let id = h.put(f, vec![n, dim]);
        store(out, id)
    })
}

unsafe extern "C" fn model_head(ctx: *mut c_void, f: AdvTensor, out: *mut AdvTensor) -> AdvStatus {
    svc(ctx, |h| {
        let m = h.model.clone().ok_or("no model in this test host")?;
        let (d, s) = h.get(f)?;
        if s.len() != 2 {
            return Err(format!("features of shape {s:?}, expected [R, D]"));
        }
        let n = s[0];
        let z = m
            .logits(d, n)
            .ok_or("features do not match the test model")?;
        let id = h.put(z, vec![n, m.classes()]);
        store(out, id)
    })
}

/// The test model's identity: an FNV-1a hash of its weights and bias (hex).
unsafe extern "C" fn model_id(
    ctx: *mut c_void,
    buf: *mut c_char,
    cap: usize,
    len: *mut usize,
) -> AdvStatus {
    svc(ctx, |h| {
        let m = h.model.clone().ok_or("no model in this test host")?;
        let hash = m
            .weights
            .iter()
            .chain(&m.bias)
            .flat_map(|v| v.to_le_bytes())
            .fold(0xcbf2_9ce4_8422_2325u64, |a, b| {
                (a ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            });
        let id = format!("test-model-{hash:016x}");
        if len.is_null() || (buf.is_null() && cap > 0) {
            return Err("null output pointer".into());
        }
        let n = id.len().min(cap);
        // SAFETY: buf is writable for cap >= n bytes (non-null when cap > 0); len is writable.
        unsafe {
            if n > 0 {
                std::ptr::copy_nonoverlapping(id.as_ptr(), buf.cast::<u8>(), n);
            }
            *len = id.len();
        }
        Ok(())
    })
}
