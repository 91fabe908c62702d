//! Pipelines: YAML definitions (`config`), their validation, and the streaming engine behind
//! `adverse run` with its result files, previews and metrics.

pub mod config;
pub mod engine;
pub mod labels;
pub mod metrics;
pub mod preview;
pub mod results;
pub mod validate;
