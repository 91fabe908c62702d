//! What `export_plugins!` expands to: C entry points generic over an adapter, and the owned
//! descriptor table. Not a public API.

use std::any::Any;
use std::ffi::{CString, c_char, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};

use crate::abi::{self, AdvBatch, AdvHost, AdvLibrary, AdvPluginDesc, AdvStatus};
use crate::host::slice_or_empty;
use crate::{Attack, Batch, Detector, Host, PluginInfo, Purifier, Result, Stage, Tensor};

/// One plugin kind's view of a plugin type.
pub trait Adapter: Send + 'static {
    type P: PluginInfo;
    const KIND: u32;
    fn wrap(p: Self::P) -> Self;
    fn process(&mut self, batch: &Batch<'_>) -> Result<Option<Tensor>>;
    /// [`Detector::score_grad`] for detectors; `None` for every other kind.
    fn score_grad(
        &mut self,
        _host: &Host<'_>,
        _features: &[f32],
        _rows: usize,
        _dim: usize,
    ) -> Option<Result<(Vec<f32>, Vec<f32>)>> {
        None
    }
}

pub struct AsAttack<T>(T);
pub struct AsPurifier<T>(T);
pub struct AsDetector<T>(T);
pub struct AsStage<T>(T);

impl<T: Attack> Adapter for AsAttack<T> {
    type P = T;
    const KIND: u32 = abi::ADV_KIND_ATTACK;
    fn wrap(p: T) -> Self {
        AsAttack(p)
    }
    fn process(&mut self, batch: &Batch<'_>) -> Result<Option<Tensor>> {
        self.0.attack(batch).map(Some)
    }
}

impl<T: Purifier> Adapter for AsPurifier<T> {
    type P = T;
    const KIND: u32 = abi::ADV_KIND_PURIFIER;
    fn wrap(p: T) -> Self {
        AsPurifier(p)
    }
    fn process(&mut self, batch: &Batch<'_>) -> Result<Option<Tensor>> {
        self.0.purify(batch).map(Some)
    }
}

impl<T: Detector> Adapter for AsDetector<T> {
    type P = T;
    const KIND: u32 = abi::ADV_KIND_DETECTOR;
    fn wrap(p: T) -> Self {
        AsDetector(p)
    }
    fn process(&mut self, batch: &Batch<'_>) -> Result<Option<Tensor>> {
        self.0.detect(batch).map(|()| None)
    }
    fn score_grad(
        &mut self,
        host: &Host<'_>,
        features: &[f32],
        rows: usize,
        dim: usize,
    ) -> Option<Result<(Vec<f32>, Vec<f32>)>> {
        self.0.score_grad(host, features, rows, dim)
    }
}

impl<T: Stage> Adapter for AsStage<T> {
    type P = T;
    const KIND: u32 = abi::ADV_KIND_OTHER;
    fn wrap(p: T) -> Self {
        AsStage(p)
    }
    fn process(&mut self, batch: &Batch<'_>) -> Result<Option<Tensor>> {
        self.0.run(batch)
    }
}

/// The text of a panic payload.
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_string()
    }
}

/// Runs `f`, reporting an error or panic through `host.set_error`.
fn guarded(host: *const AdvHost, f: impl FnOnce(&Host<'_>) -> Result<()>) -> AdvStatus {
    // SAFETY: the host passes a table valid for the duration of this call.
    let Some(h) = (unsafe { Host::from_raw(host) }) else {
        return abi::ADV_ERR_INVALID;
    };
    match catch_unwind(AssertUnwindSafe(|| f(&h))) {
        Ok(Ok(())) => abi::ADV_OK,
        Ok(Err(e)) => {
            h.set_error(e.message());
            abi::ADV_ERR_FAILED
        }
        Err(payload) => {
            h.set_error(&format!(
                "plugin panicked: {}",
                panic_message(payload.as_ref())
            ));
            abi::ADV_ERR_PANIC
        }
    }
}

/// # Safety
/// Called by the host per the ABI: valid host table, `params_json` valid for `params_len` bytes,
/// `out_instance` writable.
pub unsafe extern "C" fn create<A: Adapter>(
    host: *const AdvHost,
    params_json: *const c_char,
    params_len: usize,
    out_instance: *mut *mut c_void,
) -> AdvStatus {
    if out_instance.is_null() {
        return abi::ADV_ERR_INVALID;
    }
    guarded(host, |h| {
        // SAFETY: the host passes (ptr, len) of the parameters text.
        let bytes = unsafe { slice_or_empty(params_json.cast::<u8>(), params_len) };
        let text = if bytes.is_empty() {
            b"{}".as_slice()
        } else {
            bytes
        };
        let params: <A::P as PluginInfo>::Params = serde_json::from_slice(text)?;
        let plugin = A::P::create(params, h)?;
        let boxed: Box<A> = Box::new(A::wrap(plugin));
        // SAFETY: checked non-null above; the host owns the pointer until `destroy`.
        unsafe { *out_instance = Box::into_raw(boxed).cast() };
        Ok(())
    })
}

/// # Safety
/// `instance` must come from `create::<A>` and not be destroyed; `batch` must be valid.
pub unsafe extern "C" fn process<A: Adapter>(
    instance: *mut c_void,
    host: *const AdvHost,
    batch: *const AdvBatch,
) -> AdvStatus {
    if instance.is_null() || batch.is_null() {
        return abi::ADV_ERR_INVALID;
    }
    guarded(host, |h| {
        // SAFETY: instance was produced by create::<A> (a Box<A>) and the host serialises calls
        // on one instance; batch is valid for this call.
        let (inst, raw_batch) = unsafe { (&mut *instance.cast::<A>(), &*batch) };
        let b = Batch::new(*h, raw_batch);
        if let Some(out) = inst.process(&b)? {
            b.set_output(out)?;
        }
        Ok(())
    })
}

/// # Safety
/// `instance` must come from `create::<A>`, destroyed at most once.
pub unsafe extern "C" fn score_grad<A: Adapter>(
    instance: *mut c_void,
    host: *const AdvHost,
    features: *const f32,
    rows: usize,
    dim: usize,
    out_scores: *mut f32,
    out_grad: *mut f32,
) -> AdvStatus {
    let Some(len) = rows.checked_mul(dim) else {
        return abi::ADV_ERR_INVALID;
    };
    if instance.is_null()
        || (len > 0 && (features.is_null() || out_grad.is_null()))
        || (rows > 0 && out_scores.is_null())
    {
        return abi::ADV_ERR_INVALID;
    }
    let mut unsupported = false;
    let status = guarded(host, |h| {
        // SAFETY: the host passes the instance from create, `rows * dim` readable features and
        // writable `rows` scores and `rows * dim` gradient values (the ABI contract above).
        let (inst, f) = unsafe { (&mut *instance.cast::<A>(), slice_or_empty(features, len)) };
        let Some(res) = inst.score_grad(h, f, rows, dim) else {
            unsupported = true;
            return Err(
                "this detector's score is not a differentiable function of the model's features"
                    .into(),
            );
        };
        let (scores, grad) = res?;
        if scores.len() != rows || grad.len() != len {
            return Err(format!(
                "score_grad returned {} scores and {} gradient values for {rows} x {dim} features",
                scores.len(),
                grad.len()
            )
            .into());
        }
        // SAFETY: lengths checked above against what the host provided.
        unsafe {
            std::ptr::copy_nonoverlapping(scores.as_ptr(), out_scores, rows);
            std::ptr::copy_nonoverlapping(grad.as_ptr(), out_grad, len);
        }
        Ok(())
    });
    if unsupported {
        abi::ADV_ERR_UNSUPPORTED
    } else {
        status
    }
}

pub unsafe extern "C" fn destroy<A: Adapter>(instance: *mut c_void) {
    if instance.is_null() {
        return;
    }
    // A panicking Drop must not unwind into the host.
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: the pointer came from Box::into_raw in create::<A>.
        drop(unsafe { Box::from_raw(instance.cast::<A>()) });
    }));
}

/// A descriptor plus the strings it points to.
pub struct OwnedDesc {
    desc: AdvPluginDesc,
    strings: Vec<CString>,
}

fn cstring(s: &str) -> CString {
    // Interior NULs would truncate the C view; replace them rather than fail.
    CString::new(s.replace('\0', " ")).unwrap_or_default()
}

pub fn descriptor<A: Adapter>() -> OwnedDesc {
    let strings = vec![
        cstring(A::P::NAME),
        cstring(A::P::VERSION),
        cstring(A::P::DESCRIPTION),
        cstring(A::P::param_schema()),
    ];
    let desc = AdvPluginDesc {
        size: std::mem::size_of::<AdvPluginDesc>() as u32,
        kind: A::KIND,
        // CString's heap buffer does not move when the CString is moved into the Vec.
        name: strings[0].as_ptr(),
        version: strings[1].as_ptr(),
        description: strings[2].as_ptr(),
        param_schema: strings[3].as_ptr(),
        create: Some(create::<A>),
        process: Some(process::<A>),
        destroy: Some(destroy::<A>),
        score_grad: Some(score_grad::<A>),
    };
    OwnedDesc { desc, strings }
}

/// The library table and everything it points to; lives in a static for the library's lifetime.
pub struct LibraryHolder {
    lib: AdvLibrary,
    _descs: Vec<AdvPluginDesc>,
    _strings: Vec<CString>,
}

// SAFETY: the holder is immutable after construction and its raw pointers only point into its
// own heap allocations (descriptor vector, C strings), which are never freed while it lives.
unsafe impl Sync for LibraryHolder {}
// SAFETY: as above; nothing in it is tied to a thread.
unsafe impl Send for LibraryHolder {}

impl LibraryHolder {
    pub fn new(descs: Vec<OwnedDesc>) -> Self {
        let mut strings = Vec::new();
        let mut table = Vec::with_capacity(descs.len());
        for d in descs {
            table.push(d.desc);
            strings.extend(d.strings);
        }
        let lib = AdvLibrary {
            abi: abi::AdvAbiVersion {
                major: abi::ADVERSE_ABI_MAJOR,
                minor: abi::ADVERSE_ABI_MINOR,
            },
            size: std::mem::size_of::<AdvLibrary>() as u32,
            plugin_count: table.len() as u32,
            plugins: table.as_ptr(),
            plugin_desc_size: std::mem::size_of::<AdvPluginDesc>() as u32,
        };
        LibraryHolder {
            lib,
            _descs: table,
            _strings: strings,
        }
    }

    pub fn library(&self) -> &AdvLibrary {
        &self.lib
    }
}
