pub mod metrics;
pub mod preview;
