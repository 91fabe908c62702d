//! Backend selection: `--backend` / `ADVERSE_BACKEND` -> a concrete backend, and [`AnyBackend`]
//! plus [`with_backend!`](crate::with_backend) so CLI code written once against `B: Backend` runs
//! on whichever was picked.
//!
//! `auto` takes a hardware GPU when one exists and otherwise the CPU, never a software adapter:
//! lavapipe is 15-80x slower than the native CPU backend, so picking it silently would be a trap.

use std::str::FromStr;

use super::cpu::CpuBackend;
use super::gpu::{AdapterPolicy, GpuBackend, GpuError, GpuOptions};

/// Environment variable consulted when `--backend` is not given.
pub const ENV: &str = "ADVERSE_BACKEND";

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BackendChoice {
    #[default]
    Auto,
    Cpu,
    /// A hardware GPU (error if none).
    Gpu,
    /// The software adapter (lavapipe): CI and reproducibility checks.
    GpuSoftware,
}

#[derive(Debug, thiserror::Error)]
pub enum SelectError {
    #[error("unknown backend `{0}` (expected auto, cpu, gpu or gpu-software)")]
    Unknown(String),
    #[error("{ENV}={value}: {source}")]
    Env {
        value: String,
        #[source]
        source: Box<SelectError>,
    },
    #[error(transparent)]
    Gpu(#[from] GpuError),
}

impl FromStr for BackendChoice {
    type Err = SelectError;
    fn from_str(s: &str) -> Result<Self, SelectError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" | "" => Ok(BackendChoice::Auto),
            "cpu" => Ok(BackendChoice::Cpu),
            "gpu" => Ok(BackendChoice::Gpu),
            "gpu-software" | "gpu_software" | "software" => Ok(BackendChoice::GpuSoftware),
            o => Err(SelectError::Unknown(o.to_string())),
        }
    }
}

/// The command-line choice if given, else `ADVERSE_BACKEND`, else auto.
pub fn resolve_choice(cli: Option<BackendChoice>) -> Result<BackendChoice, SelectError> {
    if let Some(c) = cli {
        return Ok(c);
    }
    match std::env::var(ENV) {
        Ok(v) => v.parse().map_err(|e| SelectError::Env { value: v, source: Box::new(e) }),
        Err(_) => Ok(BackendChoice::Auto),
    }
}

/// One of the concrete backends.
pub enum AnyBackend {
    Cpu(CpuBackend),
    Gpu(GpuBackend),
}

impl AnyBackend {
    pub fn describe(&self) -> String {
        use super::backend::Backend;
        match self {
            AnyBackend::Cpu(b) => b.describe(),
            AnyBackend::Gpu(b) => b.describe(),
        }
    }
}

/// Run `$body` with `$b` bound to the concrete backend (a `&CpuBackend` or `&GpuBackend`), so
/// generic code is monomorphised for both.
#[macro_export]
macro_rules! with_backend {
    ($any:expr, |$b:ident| $body:expr) => {
        match $any {
            $crate::runtime::select::AnyBackend::Cpu($b) => $body,
            $crate::runtime::select::AnyBackend::Gpu($b) => $body,
        }
    };
}

/// Construct the chosen backend, logging which one and why.
pub fn select(choice: BackendChoice) -> Result<AnyBackend, SelectError> {
    let b = match choice {
        BackendChoice::Cpu => AnyBackend::Cpu(CpuBackend::new(None)),
        BackendChoice::Gpu => AnyBackend::Gpu(GpuBackend::new(GpuOptions { adapter: AdapterPolicy::HardwareOnly })?),
        BackendChoice::GpuSoftware => AnyBackend::Gpu(GpuBackend::new(GpuOptions { adapter: AdapterPolicy::SoftwareOnly })?),
        BackendChoice::Auto => match GpuBackend::new(GpuOptions { adapter: AdapterPolicy::HardwareOnly }) {
            Ok(g) => AnyBackend::Gpu(g),
            Err(e) => {
                tracing::info!("backend auto: no hardware GPU ({e}); using the CPU backend");
                AnyBackend::Cpu(CpuBackend::new(None))
            }
        },
    };
    tracing::info!("backend: {} (requested {choice:?})", b.describe());
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_choices_and_rejects_unknown() {
        assert_eq!("CPU".parse::<BackendChoice>().unwrap(), BackendChoice::Cpu);
        assert_eq!("gpu-software".parse::<BackendChoice>().unwrap(), BackendChoice::GpuSoftware);
        assert_eq!("auto".parse::<BackendChoice>().unwrap(), BackendChoice::Auto);
        assert!(matches!("tpu".parse::<BackendChoice>(), Err(SelectError::Unknown(_))));
        assert_eq!(resolve_choice(Some(BackendChoice::Cpu)).unwrap(), BackendChoice::Cpu);
    }

    #[test]
    fn auto_never_picks_a_software_adapter() {
        let b = select(BackendChoice::Auto).unwrap();
        if let AnyBackend::Gpu(g) = &b {
            assert!(!g.is_software(), "auto picked {}", crate::runtime::backend::Backend::describe(g));
        }
        let sw = select(BackendChoice::GpuSoftware).expect("lavapipe");
        assert!(matches!(sw, AnyBackend::Gpu(ref g) if g.is_software()));
        let d = with_backend!(&sw, |b| crate::runtime::backend::Backend::describe(b));
        assert!(d.starts_with("gpu"), "{d}");
    }
}
