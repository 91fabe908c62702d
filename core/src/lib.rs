//! adverse: red-team and protect medical-imaging AI.
//!
//! The library behind the `adverse` binary. DICOM in ([`dicom`]), a tensor runtime with gradients
//! on a CPU or WGSL GPU backend ([`runtime`]), derived DICOM out.

pub mod audit;
pub mod cli;
pub mod dicom;
pub mod evaluate;
pub mod pipeline;
pub mod plugin;
pub mod report;
pub mod runtime;
pub mod train;
pub mod watch;
