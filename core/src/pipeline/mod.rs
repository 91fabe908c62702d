//! Pipelines: YAML definitions (`config`), their validation, and the streaming engine behind
//! `adverse run`.

pub mod config;
pub mod validate;
