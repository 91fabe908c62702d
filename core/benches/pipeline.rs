//! The archive benchmark of issue 6: a synthetic archive of uncompressed 16-bit MONOCHROME2
//! files through decode -> median-filter purifier -> derived DICOM write, `adverse run --jobs 2`
//! against a pydicom + numpy + scipy script doing that work (scripts/oracle/pipeline_bench.py,
//! a single process), in the same run, for a large and a small archive so that the peak RSS of
//! the two sizes can be compared (bounded memory means roughly equal). Before its outputs are
//! deleted, a few derived files of every side are decoded and must hold identical pixels, so the
//! sides provably did the same filtering.
//!
//! `cargo bench -p adverse --bench pipeline`; `ADVERSE_BENCH_FILES=200` (or a comma list such as
//! `2000,200`) for a quick check instead of the default 10000,1000. Archives are generated once
//! and cached under `target/bench-data/n<N>/`; outputs are deleted after each measurement.
//!
//! The plain script only decodes, filters and writes, while `adverse run` also hashes every input
//! and output (SHA-256), reads every written file back and compares its pixels, computes L-inf,
//! L2, PSNR and SSIM per frame, and writes results.jsonl/csv and a hash-chained audit log. So a
//! second Python row, `python --full` (the same script with `--full`), does that per-file work
//! too, the usual Python way; both rows are measured against the same adverse run, and the SSIM
//! and PSNR both sides recorded for the checked files must agree.
//!
//! Each side runs as a child process, reaped with `wait4`, so that wall time includes everything
//! a user waits for (interpreter start and imports included) and `ru_maxrss` is the child's own
//! peak resident set.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use adverse::dicom::{DecodeLimits, DicomFile, derived_uid};
use dicom_core::value::PrimitiveValue;
use dicom_core::{DataElement, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::{FileMetaTableBuilder, InMemDicomObject};
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

mod common;
use common::{bin_dir, ensure_plugins, python, repo_root, target_dir};

const ROWS: usize = 256;
const COLS: usize = 256;
/// Files per sub-folder, so the walk is recursive like an archive's.
const PER_DIR: usize = 1000;
/// Bumped whenever the generated content changes, so stale caches are regenerated.
const DATA_VERSION: &str = "pipeline-bench v1 256x256 u16/12 MONOCHROME2 CT";
const CT_IMAGE_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.2";
const EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1";

fn sizes() -> Vec<usize> {
    match std::env::var("ADVERSE_BENCH_FILES") {
        Ok(s) => {
            let v: Vec<usize> = s
                .split(',')
                .map(|x| {
                    x.trim()
                        .parse()
                        .unwrap_or_else(|_| panic!("ADVERSE_BENCH_FILES: bad count {x:?}"))
                })
                .collect();
            assert!(
                v.iter().all(|&n| n > 0),
                "ADVERSE_BENCH_FILES: counts must be positive"
            );
            v
        }
        Err(_) => vec![10_000, 1_000],
    }
}

/// Which sides to run: `ADVERSE_BENCH_SIDES`, a comma list of `adverse`, `python` (the plain
/// script) and `full` (the script with `--full`), or `all` (the default), to re-measure some
/// sides without waiting for the others.
fn sides() -> (bool, bool, bool) {
    let Ok(v) = std::env::var("ADVERSE_BENCH_SIDES") else {
        return (true, true, true);
    };
    let (mut a, mut p, mut f) = (false, false, false);
    for side in v.split(',').map(str::trim) {
        match side {
            "adverse" => a = true,
            "python" => p = true,
            "full" => f = true,
            "all" | "both" => (a, p, f) = (true, true, true),
            other => panic!("ADVERSE_BENCH_SIDES: {other:?} is not adverse, python, full or all"),
        }
    }
    (a, p, f)
}

fn put_str(o: &mut InMemDicomObject, tag: Tag, vr: VR, v: &str) {
    o.put(DataElement::new(tag, vr, PrimitiveValue::from(v)));
}

fn put_u16(o: &mut InMemDicomObject, tag: Tag, v: u16) {
    o.put(DataElement::new(tag, VR::US, PrimitiveValue::from(v)));
}

/// Smooth random content in 0..4096: a few random separable waves (precomputed per row and per
/// column, so a file costs a few multiply-adds per pixel) plus a little noise, so the median
/// filter has real work on every pixel.
fn pixels(seed: u64) -> Vec<u16> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    const WAVES: usize = 4;
    let mut rows = [[0f32; ROWS]; WAVES];
    let mut cols = [[0f32; COLS]; WAVES];
    for k in 0..WAVES {
        let amp: f32 = rng.random_range(200.0..700.0);
        let (fy, fx): (f32, f32) = (rng.random_range(0.005..0.08), rng.random_range(0.005..0.08));
        let (py, px): (f32, f32) = (rng.random_range(0.0..6.3), rng.random_range(0.0..6.3));
        for (y, v) in rows[k].iter_mut().enumerate() {
            *v = amp * (fy * y as f32 + py).sin();
        }
        for (x, v) in cols[k].iter_mut().enumerate() {
            *v = (fx * x as f32 + px).sin();
        }
    }
    let base: f32 = rng.random_range(1200.0..2800.0);
    let mut out = Vec::with_capacity(ROWS * COLS);
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for y in 0..ROWS {
        for x in 0..COLS {
            // xorshift64: cheap per-pixel noise in -32..32.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let noise = (state >> 58) as f32 - 32.0;
            let v: f32 = base + noise + (0..WAVES).map(|k| rows[k][y] * cols[k][x]).sum::<f32>();
            out.push(v.round().clamp(0.0, 4095.0) as u16);
        }
    }
    out
}

fn file_path(dir: &Path, i: usize) -> PathBuf {
    dir.join(format!("s{:03}", i / PER_DIR))
        .join(format!("f{i:06}.dcm"))
}

fn write_file(dir: &Path, n: usize, i: usize, study: &str, series: &str) {
    let tag = "adverse pipeline bench";
    let sop = derived_uid("instance", &format!("bench/{n}/{i}"), tag);
    let mut o = InMemDicomObject::new_empty();
    put_str(&mut o, tags::SPECIFIC_CHARACTER_SET, VR::CS, "ISO_IR 100");
    o.put(DataElement::new(
        tags::IMAGE_TYPE,
        VR::CS,
        PrimitiveValue::Strs(["ORIGINAL".to_string(), "PRIMARY".to_string()].into()),
    ));
    put_str(&mut o, tags::SOP_CLASS_UID, VR::UI, CT_IMAGE_STORAGE);
    put_str(&mut o, tags::SOP_INSTANCE_UID, VR::UI, &sop);
    put_str(&mut o, tags::MODALITY, VR::CS, "CT");
    put_str(&mut o, tags::PATIENT_NAME, VR::PN, "SYNTHETIC^BENCH");
    put_str(&mut o, tags::PATIENT_ID, VR::LO, "BENCH");
    put_str(&mut o, tags::STUDY_INSTANCE_UID, VR::UI, study);
    put_str(&mut o, tags::SERIES_INSTANCE_UID, VR::UI, series);
    put_str(&mut o, tags::SERIES_NUMBER, VR::IS, "1");
    put_str(&mut o, tags::INSTANCE_NUMBER, VR::IS, &(i + 1).to_string());
    put_u16(&mut o, tags::SAMPLES_PER_PIXEL, 1);
    put_str(
        &mut o,
        tags::PHOTOMETRIC_INTERPRETATION,
        VR::CS,
        "MONOCHROME2",
    );
    put_u16(&mut o, tags::ROWS, ROWS as u16);
    put_u16(&mut o, tags::COLUMNS, COLS as u16);
    put_u16(&mut o, tags::BITS_ALLOCATED, 16);
    put_u16(&mut o, tags::BITS_STORED, 12);
    put_u16(&mut o, tags::HIGH_BIT, 11);
    put_u16(&mut o, tags::PIXEL_REPRESENTATION, 0);
    put_str(&mut o, tags::WINDOW_CENTER, VR::DS, "40");
    put_str(&mut o, tags::WINDOW_WIDTH, VR::DS, "400");
    put_str(&mut o, tags::RESCALE_INTERCEPT, VR::DS, "-1024");
    put_str(&mut o, tags::RESCALE_SLOPE, VR::DS, "1");
    o.put(DataElement::new(
        tags::PIXEL_DATA,
        VR::OW,
        PrimitiveValue::U16(pixels(i as u64 + 1).into()),
    ));
    let meta = FileMetaTableBuilder::new()
        .transfer_syntax(EXPLICIT_VR_LE)
        .media_storage_sop_class_uid(CT_IMAGE_STORAGE)
        .media_storage_sop_instance_uid(sop)
        .implementation_class_uid(derived_uid("implementation", "adverse", ""))
        .implementation_version_name("ADVERSE_BENCH")
        .build()
        .expect("file meta");
    let path = file_path(dir, i);
    let mut bytes = Vec::with_capacity(ROWS * COLS * 2 + 1024);
    o.with_exact_meta(meta)
        .write_all(&mut bytes)
        .expect("serialise a bench file");
    std::fs::write(&path, bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// The cached archive of `n` files, generated (in parallel) if missing or stale.
fn archive(n: usize) -> PathBuf {
    let dir = target_dir().join("bench-data").join(format!("n{n}"));
    let marker = dir.join(".complete");
    if std::fs::read_to_string(&marker).is_ok_and(|s| s == DATA_VERSION) {
        return dir;
    }
    if dir.exists() {
        std::fs::remove_dir_all(&dir).expect("remove a stale bench archive");
    }
    for d in 0..n.div_ceil(PER_DIR) {
        std::fs::create_dir_all(dir.join(format!("s{d:03}"))).expect("create bench-data");
    }
    let t0 = Instant::now();
    let study = derived_uid("study", &format!("bench/{n}"), "adverse pipeline bench");
    let series = derived_uid("series", &format!("bench/{n}"), "adverse pipeline bench");
    (0..n)
        .into_par_iter()
        .for_each(|i| write_file(&dir, n, i, &study, &series));
    std::fs::write(&marker, DATA_VERSION).expect("write the archive marker");
    eprintln!(
        "generated {n} files in {} ({:.1} s)",
        dir.display(),
        t0.elapsed().as_secs_f64()
    );
    dir
}

struct Measured {
    secs: f64,
    peak_rss_kib: u64,
}

/// Run `cmd` to completion with stdout and stderr in `log_prefix.{out,err}`; wall time and the
/// child's peak RSS. Panics (with the log tail) if it fails: a failed side has no throughput.
fn measure(mut cmd: Command, log_prefix: &Path) -> (Measured, String) {
    let out_path = log_prefix.with_extension("out");
    let err_path = log_prefix.with_extension("err");
    cmd.stdin(Stdio::null())
        .stdout(File::create(&out_path).expect("create log"))
        .stderr(File::create(&err_path).expect("create log"));
    let t0 = Instant::now();
    let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let pid = child.id() as libc::pid_t;
    let mut status: libc::c_int = 0;
    // SAFETY: all-zero bytes are a valid `rusage` (plain integers and timevals).
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let r = loop {
        // SAFETY: `pid` is our own child, not yet reaped (`child` is never waited on through
        // std); `status` and `ru` are valid, exclusive out-pointers for the call's duration.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
        if r != -1 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            break r;
        }
    };
    let secs = t0.elapsed().as_secs_f64();
    assert_eq!(r, pid, "wait4 failed: {}", std::io::Error::last_os_error());
    drop(child);
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    if !ok {
        let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
        let tail: String = stderr
            .chars()
            .rev()
            .take(4000)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        let how = if libc::WIFEXITED(status) {
            format!("exit code {}", libc::WEXITSTATUS(status))
        } else {
            format!("wait status {status}")
        };
        panic!("{cmd:?} failed ({how}):\n{stdout}\n{tail}");
    }
    (
        Measured {
            secs,
            // Linux reports ru_maxrss in KiB.
            peak_rss_kib: ru.ru_maxrss as u64,
        },
        stdout,
    )
}

fn count_dcm(dir: &Path) -> usize {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_file() && e.path().extension().is_some_and(|x| x == "dcm"))
        .count()
}

struct Row {
    n: usize,
    /// The whole process, and its mean per-file stage times (see [`stage_means`]).
    adverse: Option<(Measured, [f64; 3])>,
    /// The whole process, and the loop alone as the script reports it.
    python: Option<(Measured, f64)>,
    /// The same for the script with `--full` (adverse's whole per-file work).
    full: Option<(Measured, f64)>,
}

/// Mean per-file milliseconds of the engine's stages, from the run's `results.jsonl`
/// (`decode_ms`: read, hash, parse, decode; `compute_ms`: the file's share of its batch through
/// the stages; `write_ms`: derived write, read-back verification and metrics). Each is the
/// stage's elapsed time, so with more threads than cores it includes waiting for a core.
fn stage_means(results: &Path) -> [f64; 3] {
    let text = std::fs::read_to_string(results).unwrap_or_default();
    let (mut sum, mut rows) = ([0f64; 3], 0usize);
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        for (s, key) in sum.iter_mut().zip(["decode_ms", "compute_ms", "write_ms"]) {
            *s += v[key].as_f64().unwrap_or(0.0);
        }
        rows += 1;
    }
    sum.map(|s| s / rows.max(1) as f64)
}

fn run_adverse(n: usize, input: &Path, work: &Path) -> (Measured, [f64; 3]) {
    let out = work.join(format!("adverse-n{n}"));
    if out.exists() {
        std::fs::remove_dir_all(&out).expect("clear an old bench output");
    }
    let yaml = work.join(format!("bench-median-n{n}.yaml"));
    // JSON strings are valid YAML flow scalars: any path is quoted correctly.
    let q = |p: &Path| serde_json::to_string(&p.display().to_string()).expect("a string");
    std::fs::write(
        &yaml,
        format!(
            "name: bench-median\n\
             input: {{ path: {}, recursive: true }}\n\
             stages:\n  - purifier: median\n    params: {{ radius: 1 }}\n\
             output: {{ dir: {}, dicom: true, fsync: false }}\n\
             plugins: {{ dirs: [{}] }}\n",
            q(input),
            q(&out),
            q(&bin_dir())
        ),
    )
    .expect("write the bench pipeline");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_adverse"));
    cmd.arg("run")
        .arg(&yaml)
        .arg("--input")
        .arg(input)
        .arg("--output")
        .arg(&out)
        .args(["--jobs", "2"]);
    let (m, _) = measure(cmd, &work.join(format!("adverse-n{n}")));
    let got = count_dcm(&out);
    assert_eq!(got, n, "adverse wrote {got} DICOM files for {n} inputs");
    (m, stage_means(&out.join("results.jsonl")))
}

/// Output folder (and log prefix) of a Python side.
fn python_dir(n: usize, full: bool) -> String {
    if full {
        format!("python-full-n{n}")
    } else {
        format!("python-n{n}")
    }
}

fn run_python(n: usize, input: &Path, work: &Path, full: bool) -> (Measured, f64) {
    let out = work.join(python_dir(n, full));
    if out.exists() {
        std::fs::remove_dir_all(&out).expect("clear an old bench output");
    }
    let mut cmd = Command::new(python());
    cmd.arg(repo_root().join("scripts/oracle/pipeline_bench.py"));
    if full {
        cmd.arg("--full");
    }
    cmd.arg(input).arg(&out);
    let (m, stdout) = measure(cmd, &work.join(python_dir(n, full)));
    let v: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("bad pipeline_bench.py output {stdout:?}: {e}"));
    assert_eq!(v["files"].as_u64(), Some(n as u64), "python files: {v}");
    let got = count_dcm(&out);
    assert_eq!(got, n, "python wrote {got} DICOM files for {n} inputs");
    (m, v["seconds"].as_f64().unwrap_or(f64::NAN))
}

/// The `results.jsonl` rows of `dir` by input path.
fn rows_by_input(dir: &Path) -> std::collections::HashMap<String, serde_json::Value> {
    std::fs::read_to_string(dir.join("results.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| Some((v["input"].as_str()?.to_string(), v)))
        .collect()
}

/// Both sides must have done the same work: for a few files, the derived instances of all sides
/// hold identical pixels, which differ from the input's (the median changed them), under a new
/// SOP Instance UID; with the full script, both recorded the same SSIM and PSNR (to the 4
/// decimals both round to).
fn check_same_work(n: usize, input: &Path, work: &Path, plain: bool, full: bool) {
    let limits = DecodeLimits::default();
    let open = |p: &Path| {
        DicomFile::open(p, &limits)
            .and_then(|f| f.decode(&limits))
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    };
    let (a_rows, f_rows) = if full {
        (
            rows_by_input(&work.join(format!("adverse-n{n}"))),
            rows_by_input(&work.join(python_dir(n, true))),
        )
    } else {
        Default::default()
    };
    for i in [0, n / 2, n - 1] {
        let rel = file_path(Path::new(""), i);
        let src = open(&input.join(&rel));
        let a = open(&work.join(format!("adverse-n{n}")).join(&rel));
        for dir in plain
            .then(|| python_dir(n, false))
            .into_iter()
            .chain(full.then(|| python_dir(n, true)))
        {
            let p = open(&work.join(&dir).join(&rel));
            assert_eq!(
                a.pixels,
                p.pixels,
                "{}: adverse and {dir} outputs differ",
                rel.display()
            );
        }
        if full {
            let key = rel.display().to_string();
            let (ar, fr) = (&a_rows[&key], &f_rows[&key]);
            for m in ["ssim", "psnr_db", "linf_stored", "l2_stored"] {
                let (x, y) = (ar[m].as_f64().unwrap(), fr[m].as_f64().unwrap());
                assert!(
                    (x - y).abs() <= 1.5e-4 * x.abs().max(1.0),
                    "{key}: {m} adverse {x} vs python {y}"
                );
            }
        }
        assert_ne!(
            a.pixels,
            src.pixels,
            "{}: median changed nothing",
            rel.display()
        );
        assert_ne!(
            a.meta.sop_instance_uid,
            src.meta.sop_instance_uid,
            "{}: adverse kept the SOP Instance UID",
            rel.display()
        );
    }
}

fn main() {
    // `cargo bench` passes `--bench`; nothing here takes arguments.
    let sizes = sizes();
    let (do_adverse, do_python, do_full) = sides();
    if do_adverse {
        ensure_plugins("adverse-plugins-basic", "adverse_plugins_basic");
    }
    if do_python || do_full {
        python();
    }
    let work = target_dir().join("bench-data").join("work");
    std::fs::create_dir_all(&work).expect("create bench work folder");

    let mut rows = Vec::new();
    for &n in &sizes {
        let input = archive(n);
        let row = Row {
            n,
            adverse: do_adverse.then(|| run_adverse(n, &input, &work)),
            python: do_python.then(|| run_python(n, &input, &work, false)),
            full: do_full.then(|| run_python(n, &input, &work, true)),
        };
        if do_adverse && (do_python || do_full) {
            check_same_work(n, &input, &work, do_python, do_full);
        }
        for side in ["adverse", "python", "python-full"] {
            let out = work.join(format!("{side}-n{n}"));
            if out.exists() {
                std::fs::remove_dir_all(&out).expect("remove bench output");
            }
        }
        rows.push(row);
    }

    let mib = |m: &Measured| m.peak_rss_kib as f64 / 1024.0;
    println!(
        "pipeline: decode -> median 3x3 purifier -> write derived DICOM, {ROWS}x{COLS} 16-bit \
         MONOCHROME2 (uncompressed); adverse run --jobs 2 vs pydicom+numpy+scipy (one process)"
    );
    println!(
        "(python --full: the script doing adverse's whole per-file work too: input and output \
         SHA-256, read-back and pixel comparison, L-inf/L2/PSNR/SSIM, results rows, chained audit)"
    );
    println!(
        "{:>7} {:<13} {:>9} {:>9} {:>13} {:>9}",
        "files", "side", "wall s", "files/s", "peak RSS MiB", "loop s"
    );
    for r in &rows {
        if let Some((a, _)) = &r.adverse {
            println!(
                "{:>7} {:<13} {:>9.2} {:>9.1} {:>13.1} {:>9}",
                r.n,
                "adverse",
                a.secs,
                r.n as f64 / a.secs,
                mib(a),
                "-"
            );
        }
        for (side, py) in [("python", &r.python), ("python --full", &r.full)] {
            if let Some((p, loop_secs)) = py {
                println!(
                    "{:>7} {:<13} {:>9.2} {:>9.1} {:>13.1} {:>9.2}",
                    r.n,
                    side,
                    p.secs,
                    r.n as f64 / p.secs,
                    mib(p),
                    loop_secs
                );
            }
        }
    }
    for r in &rows {
        if let Some((_, [d, c, w])) = &r.adverse {
            println!(
                "{:>7} files: adverse mean stage ms per file (elapsed in the stage): decode {d:.2}, \
                 compute {c:.2}, write+verify+metrics {w:.2}",
                r.n
            );
        }
    }
    for (what, full) in [
        (
            "the plain script (decode, filter, write: adverse does more per file)",
            false,
        ),
        ("python --full (the same per-file work)", true),
    ] {
        let both: Vec<_> = rows
            .iter()
            .filter_map(|r| {
                let py = if full { &r.full } else { &r.python };
                Some((r.n, &r.adverse.as_ref()?.0, py.as_ref()?))
            })
            .collect();
        if !both.is_empty() {
            println!(
                "files/s ratio adverse / {what} (wall time of each whole process; goal >= 10x):"
            );
        }
        for (n, a, (p, loop_secs)) in both {
            println!(
                "{n:>7} files: {:.2}x (python loop alone, without its start-up: {:.2}x)",
                p.secs / a.secs,
                loop_secs / a.secs
            );
        }
    }
    let measured: Vec<_> = rows
        .iter()
        .filter_map(|r| Some((r.n, &r.adverse.as_ref()?.0)))
        .collect();
    let big = measured.iter().max_by_key(|(n, _)| *n);
    let small = measured.iter().min_by_key(|(n, _)| *n);
    if let (Some((bn, b)), Some((sn, s))) = (big, small)
        && bn != sn
    {
        println!(
            "adverse peak RSS {bn} files vs {sn} files: {:.1} MiB vs {:.1} MiB = {:.2}x (goal: ~1)",
            mib(b),
            mib(s),
            mib(b) / mib(s)
        );
    }
    println!(
        "(cores: {}; archives cached in {})",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        target_dir().join("bench-data").display()
    );
}
