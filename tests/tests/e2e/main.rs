//! End-to-end tests, one binary with a module per area (ripgrep style).

mod attacks;
mod audit;
mod detectors;
mod dicom_corpus;
mod dicom_malformed;
mod dicom_roundtrip;
mod evaluate;
mod inspect;
mod model;
mod plugins;
mod purifiers;
mod run;
mod train;
mod validate;
mod watch;
