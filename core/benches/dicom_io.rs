//! DICOM decode + derived write throughput and peak memory, adverse against pydicom on the same
//! files in the same run (`cargo bench -p adverse --bench dicom_io`). Each side runs as its own
//! process so that its peak RSS is its own: this binary re-executes itself for the adverse side.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use adverse::dicom::{DecodeLimits, DerivedOptions, DicomFile, write_derived};

mod common;
use common::repo_root;

/// Little-endian native and lossless compressed files both sides decode.
const FILES: &[&str] = &[
    "MR2_UNCR.dcm",
    "693_UNCR.dcm",
    "emri_small.dcm",
    "US1_UNCR.dcm",
    "SC_rgb_16bit_2frame.dcm",
    "emri_small_RLE.dcm",
    "OBXXXX1A_rle_2frame.dcm",
    "MR2_J2KR.dcm",
    "US1_J2KR.dcm",
    "JPEG-LL.dcm",
    "emri_small_jpeg_ls_lossless.dcm",
    "JLSL_16_15_1_1F.dcm",
];
const ITERATIONS: usize = 5;
const CHILD_ENV: &str = "ADVERSE_DICOM_IO_BENCH_CHILD";

fn files() -> Vec<PathBuf> {
    let dir = repo_root().join("tests/data/dicom/pydicom-data");
    FILES.iter().map(|f| dir.join(f)).collect()
}

#[derive(Debug)]
struct Side {
    files: f64,
    bytes: f64,
    secs: f64,
    peak_rss_kib: f64,
}

fn parse(json: &str) -> Side {
    let v: serde_json::Value = serde_json::from_str(json.trim())
        .unwrap_or_else(|e| panic!("bad bench output {json:?}: {e}"));
    let f = |k: &str| {
        v[k].as_f64()
            .unwrap_or_else(|| panic!("missing {k} in {json}"))
    };
    Side {
        files: f("files"),
        bytes: f("bytes"),
        secs: f("secs"),
        peak_rss_kib: f("peak_rss_kib"),
    }
}

fn child(outdir: &Path) {
    let limits = DecodeLimits::default();
    let files = files();
    let nbytes: u64 = files.iter().map(|f| f.metadata().unwrap().len()).sum();
    let opts = DerivedOptions {
        pipeline_id: "bench".into(),
        derivation_description: "adverse dicom_io benchmark".into(),
    };
    let t0 = Instant::now();
    for _ in 0..ITERATIONS {
        for (i, f) in files.iter().enumerate() {
            let src = DicomFile::open(f, &limits).unwrap();
            let img = src.decode(&limits).unwrap();
            write_derived(&src, &img, &opts, &outdir.join(format!("{i}.dcm"))).unwrap();
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let peak: u64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    println!(
        "{{\"files\": {}, \"bytes\": {}, \"secs\": {secs}, \"peak_rss_kib\": {peak}}}",
        files.len() * ITERATIONS,
        nbytes * ITERATIONS as u64
    );
}

fn main() {
    if let Some(dir) = std::env::var_os(CHILD_ENV) {
        child(Path::new(&dir));
        return;
    }
    let python = std::env::var_os("ADVERSE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".venv/bin/python"));
    assert!(python.exists(), "no Python oracle at {}", python.display());
    let tmp = tempfile::tempdir().unwrap();

    let ours = Command::new(std::env::current_exe().unwrap())
        .env(CHILD_ENV, tmp.path())
        .output()
        .unwrap();
    assert!(
        ours.status.success(),
        "{}",
        String::from_utf8_lossy(&ours.stderr)
    );
    let ours = parse(&String::from_utf8_lossy(&ours.stdout));

    let mut cmd = Command::new(&python);
    cmd.arg(repo_root().join("scripts/oracle/pydicom_bench.py"))
        .arg(tmp.path())
        .arg(ITERATIONS.to_string())
        .args(files());
    let theirs = cmd.output().unwrap();
    assert!(
        theirs.status.success(),
        "{}",
        String::from_utf8_lossy(&theirs.stderr)
    );
    let theirs = parse(&String::from_utf8_lossy(&theirs.stdout));

    let fps = |s: &Side| s.files / s.secs;
    let mbps = |s: &Side| s.bytes / s.secs / 1e6;
    let mib = |s: &Side| s.peak_rss_kib / 1024.0;
    println!(
        "dicom_io: decode + write uncompressed, {} files x {ITERATIONS} iterations",
        FILES.len()
    );
    println!(
        "{:<10} {:>10} {:>10} {:>14}",
        "side", "files/s", "MB/s", "peak RSS MiB"
    );
    println!(
        "{:<10} {:>10.1} {:>10.1} {:>14.1}",
        "adverse",
        fps(&ours),
        mbps(&ours),
        mib(&ours)
    );
    println!(
        "{:<10} {:>10.1} {:>10.1} {:>14.1}",
        "pydicom",
        fps(&theirs),
        mbps(&theirs),
        mib(&theirs)
    );
    println!(
        "{:<10} {:>10.2} {:>10.2} {:>14.2}",
        "ratio",
        fps(&ours) / fps(&theirs),
        mbps(&ours) / mbps(&theirs),
        mib(&ours) / mib(&theirs)
    );
}
