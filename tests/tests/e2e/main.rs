//! End-to-end tests, one binary with a module per area (ripgrep style).

mod dicom_corpus;
mod dicom_roundtrip;
mod dicom_malformed;
mod inspect;
mod model;
mod train;
