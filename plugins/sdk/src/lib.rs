//! The adverse plugin SDK.
//!
//! A plugin library exports one C symbol, `adverse_plugin_entry`, returning the plugins it holds
//! ([`abi::AdvLibrary`]). Everything that crosses the boundary is in [`abi`] (`#[repr(C)]`,
//! versioned, append-only; `include/adverse_plugin.h` is its C header). Rust plugins never touch
//! it directly: they implement [`Attack`], [`Purifier`], [`Detector`] or [`Stage`] with typed
//! (serde) parameters and list themselves in [`export_plugins!`], which builds the C tables and
//! turns every error and panic into a status code plus message, so no panic crosses
//! `extern "C"`. The host's services (tensors on the active backend, the model, the runtime's
//! primitives, custom kernels, frame metadata, audit values) are reached through [`Host`].
//!
//! This crate does not depend on the adverse host: a plugin sees only the C ABI. The `testing`
//! feature adds an in-process host ([`testing`]) to run a plugin in unit tests.

pub mod abi;
pub mod cpu;
mod host;
#[cfg(feature = "testing")]
pub mod testing;

#[doc(hidden)]
pub mod __private;

pub use host::{
    BackendKind, Batch, CpuInput, CpuKernel, FrameMeta, Host, LogLevel, LossKind, Norm, Shader,
    Tensor, write_frame_meta,
};
pub use serde;
pub use serde_json;

use std::fmt;

/// A plugin error: a message for the user (it ends up in the failed files' result rows).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    message: String,
}

impl Error {
    pub fn new(message: impl Into<String>) -> Self {
        Error {
            message: message.into(),
        }
    }
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

impl From<String> for Error {
    fn from(s: String) -> Self {
        Error::new(s)
    }
}

impl From<&str> for Error {
    fn from(s: &str) -> Self {
        Error::new(s)
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error::new(format!("invalid parameters: {e}"))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What a plugin is, which decides where a pipeline may put it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Attack,
    Purifier,
    Detector,
    Other,
}

impl Kind {
    pub fn to_raw(self) -> u32 {
        match self {
            Kind::Attack => abi::ADV_KIND_ATTACK,
            Kind::Purifier => abi::ADV_KIND_PURIFIER,
            Kind::Detector => abi::ADV_KIND_DETECTOR,
            Kind::Other => abi::ADV_KIND_OTHER,
        }
    }
    pub fn from_raw(v: u32) -> Option<Kind> {
        Some(match v {
            abi::ADV_KIND_ATTACK => Kind::Attack,
            abi::ADV_KIND_PURIFIER => Kind::Purifier,
            abi::ADV_KIND_DETECTOR => Kind::Detector,
            abi::ADV_KIND_OTHER => Kind::Other,
            _ => return None,
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            Kind::Attack => "attack",
            Kind::Purifier => "purifier",
            Kind::Detector => "detector",
            Kind::Other => "other",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Identity and construction, common to every plugin kind.
pub trait PluginInfo: Sized + Send + 'static {
    /// Unique name, `[a-z0-9_-]+`.
    const NAME: &'static str;
    const VERSION: &'static str;
    const DESCRIPTION: &'static str;
    /// The parameters object, deserialised from the JSON the host validated against
    /// [`PluginInfo::param_schema`].
    type Params: serde::de::DeserializeOwned;
    /// JSON Schema (draft 2020-12 subset the host validates: see the SDK README) of `Params`.
    fn param_schema() -> &'static str;
    /// Builds an instance; called once per run, before any file is processed.
    fn create(params: Self::Params, host: &Host<'_>) -> Result<Self>;
}

/// Perturbs stored values to change the model's decision. Returns the adversarial stored values
/// (the input's shape); the host rounds and clamps them when writing DICOM.
pub trait Attack: PluginInfo {
    fn attack(&mut self, batch: &Batch<'_>) -> Result<Tensor>;
}

/// Removes (suspected) perturbations. Returns the purified stored values (the input's shape).
pub trait Purifier: PluginInfo {
    fn purify(&mut self, batch: &Batch<'_>) -> Result<Tensor>;
}

/// Scores frames without changing them: writes its verdicts with [`Batch::audit_number`] /
/// [`Batch::audit_flag`].
pub trait Detector: PluginInfo {
    fn detect(&mut self, batch: &Batch<'_>) -> Result<()>;
    /// The score of each row of model features `[rows, dim]` and its gradient w.r.t. them
    /// (`(scores, grad)`, `grad` row-major like `features`), for detectors whose score is a
    /// differentiable function of the features (ABI 1.3 `score_grad`). Lets the host evaluate
    /// the detector against an attack that descends its score; `None` (the default): not
    /// differentiable in the features.
    ///
    /// `host` serves tensors and `model_head` (the run's model from the features on, e.g. for
    /// the predicted class or MC-dropout passes); there is no batch (no frames, input or
    /// `model_forward`).
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

/// Any other stage: may return new stored values or only write audit values.
pub trait Stage: PluginInfo {
    fn run(&mut self, batch: &Batch<'_>) -> Result<Option<Tensor>>;
}

/// Exports plugins from a library: `export_plugins!(attack: MyAttack, purifier: MyFilter);`
/// with one `kind: Type` pair per plugin (kinds: `attack`, `purifier`, `detector`, `stage`).
///
/// Generates the `adverse_plugin_entry` C symbol the host loads, and a Rust function
/// `adverse_plugin_library()` returning the same table for in-process use (tests). Use it once
/// per library crate.
#[macro_export]
macro_rules! export_plugins {
    ($($kind:ident : $ty:ty),+ $(,)?) => {
        /// This library's plugin table (what `adverse_plugin_entry` returns), for in-process use.
        pub fn adverse_plugin_library() -> &'static $crate::abi::AdvLibrary {
            static LIB: ::std::sync::OnceLock<$crate::__private::LibraryHolder> =
                ::std::sync::OnceLock::new();
            LIB.get_or_init(|| {
                $crate::__private::LibraryHolder::new(::std::vec![
                    $($crate::__private::descriptor::<$crate::__adapter!($kind, $ty)>()),+
                ])
            })
            .library()
        }

        /// The entry point the adverse host looks up. Never unwinds: a panic while building the
        /// table returns null, which the host reports as a broken library.
        #[unsafe(no_mangle)]
        pub extern "C" fn adverse_plugin_entry() -> *const $crate::abi::AdvLibrary {
            match ::std::panic::catch_unwind(adverse_plugin_library) {
                ::std::result::Result::Ok(lib) => lib as *const $crate::abi::AdvLibrary,
                ::std::result::Result::Err(_) => ::std::ptr::null(),
            }
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __adapter {
    (attack, $ty:ty) => { $crate::__private::AsAttack<$ty> };
    (purifier, $ty:ty) => { $crate::__private::AsPurifier<$ty> };
    (detector, $ty:ty) => { $crate::__private::AsDetector<$ty> };
    (stage, $ty:ty) => { $crate::__private::AsStage<$ty> };
}
