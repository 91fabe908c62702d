//! The plugin host: finding and loading plugin libraries (C ABI of `adverse-plugin-sdk`),
//! checking them (ABI version, SHA-256 pins, parameter schemas), the host services plugins call,
//! and a minimal runner (decode files, one `process` call per batch of frames, derived DICOM and
//! one result row per frame) that the pipeline engine reuses.

pub mod bpda;
pub mod host;
pub mod loader;
pub mod runner;
pub mod schema;

use std::path::PathBuf;

pub use adverse_plugin_sdk::Kind;
pub use adverse_plugin_sdk::abi::AdvAbiVersion;
pub use loader::{PluginHandle, PluginLibrary, Registry, SearchPath};

/// `major.minor` of an ABI version, for messages.
pub fn abi_string(v: AdvAbiVersion) -> String {
    format!("{}.{}", v.major, v.minor)
}

/// The host's own ABI version.
pub fn host_abi() -> AdvAbiVersion {
    AdvAbiVersion {
        major: adverse_plugin_sdk::abi::ADVERSE_ABI_MAJOR,
        minor: adverse_plugin_sdk::abi::ADVERSE_ABI_MINOR,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("plugin search path entry {0} does not exist")]
    MissingPath(PathBuf),
    #[error("{path}: cannot load the library: {reason}")]
    Load { path: PathBuf, reason: String },
    #[error("{path}: not an adverse plugin library (no `adverse_plugin_entry` symbol: {reason})")]
    NoEntry { path: PathBuf, reason: String },
    #[error("{path}: the plugin entry returned no table")]
    NullEntry { path: PathBuf },
    #[error(
        "{path}: plugin ABI mismatch: the library was built for ABI {}, this host speaks ABI {} (rebuild the plugin against a matching adverse-plugin-sdk)",
        abi_string(*library),
        abi_string(*host)
    )]
    AbiMismatch {
        path: PathBuf,
        library: AdvAbiVersion,
        host: AdvAbiVersion,
    },
    #[error("{path}: plugin descriptor {index}: {reason}")]
    BadDescriptor {
        path: PathBuf,
        index: usize,
        reason: String,
    },
    #[error(
        "plugin `{name}` in {second} is shadowed by the one in {first} (earlier in the search path)"
    )]
    Duplicate {
        name: String,
        first: PathBuf,
        second: PathBuf,
    },
    #[error("no plugin named `{name}` in the search path ({searched}){refused}")]
    NotFound {
        name: String,
        searched: String,
        refused: String,
    },
    #[error(
        "plugin `{name}`: library {path} has SHA-256 {actual}, but the pin requires {expected}; refusing to run it"
    )]
    HashMismatch {
        name: String,
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("bad pin `{0}`: expected NAME=SHA256 (64 hex digits)")]
    BadPin(String),
    #[error("plugin `{plugin}`: its parameter schema is not usable: {reason}")]
    BadSchema { plugin: String, reason: String },
    #[error("plugin `{plugin}`: parameters are not valid JSON: {reason}")]
    ParamsJson { plugin: String, reason: String },
    #[error("plugin `{plugin}`: parameter `{param}` {reason}")]
    InvalidParam {
        plugin: String,
        param: String,
        reason: String,
    },
    #[error("plugin `{plugin}`: create failed (status {status}): {message}")]
    Create {
        plugin: String,
        status: i32,
        message: String,
    },
    #[error("plugin `{plugin}` failed (status {status}): {message}")]
    Process {
        plugin: String,
        status: i32,
        message: String,
    },
    #[error("plugin `{plugin}`: {message}")]
    Contract { plugin: String, message: String },
}

#[cfg(test)]
mod tests;
