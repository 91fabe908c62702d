//! Regenerates `pipelines/samples/pneumoniamnist/`: the first 64 PneumoniaMNIST test images as
//! Secondary Capture DICOM files plus `labels.csv`.
//!
//! Run from anywhere: `cargo run -p adverse --example make_demo_samples`. The output is
//! byte-identical on every run (deterministic UIDs, no timestamps); the e2e tests check the
//! shipped files against a regeneration.

use std::path::Path;
use std::process::ExitCode;

fn main() -> ExitCode {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."));
    let npz = root.join("tests/data/pneumoniamnist/pneumoniamnist.npz");
    let out = root.join("pipelines/samples/pneumoniamnist");
    match adverse::train::samples::write_samples(&npz, "test", 64, &["normal", "pneumonia"], &out) {
        Ok(s) => {
            println!("wrote {} samples to {}", s.len(), out.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("make_demo_samples: {e}");
            ExitCode::FAILURE
        }
    }
}
