//! End-to-end tests, one binary with a module per area (ripgrep style).

mod attacks;
mod dicom_corpus;
mod dicom_malformed;
mod dicom_roundtrip;
mod inspect;
mod model;
mod plugins;
mod train;
