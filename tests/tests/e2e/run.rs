//! `adverse run` end to end: real DICOM files (good, corrupted, foreign, unsupported) through a
//! pipeline with the bundled model and built plugins; outputs checked with pydicom and
//! onnxruntime, the audit log with `adverse audit verify`; a SIGKILLed run resumed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use adverse_tests::{adverse_bin, plugin_dir, repo_root, run_oracle};
use serde_json::Value;

fn samples() -> PathBuf {
    repo_root().join("pipelines/samples/pneumoniamnist")
}

fn sample(i: usize) -> PathBuf {
    samples().join(format!("pneumoniamnist-test-{i:04}.dcm"))
}

fn model() -> PathBuf {
    repo_root().join("pipelines/models/pneumonia-cnn.onnx")
}

fn basic_plugins() -> tempfile::TempDir {
    plugin_dir(
        &["adverse-plugins-basic", "adverse-plugins-attacks"],
        &["adverse_plugins_basic", "adverse_plugins_attacks"],
    )
}

/// A pipeline file in `dir` running `stages` (YAML list items) on `input` into `out`.
fn pipeline(
    dir: &Path,
    input: &Path,
    out: &Path,
    plugins: &Path,
    stages: &str,
    extra: &str,
) -> PathBuf {
    let p = dir.join("pipeline.yaml");
    let text = format!(
        "name: e2e\ninput: {{ path: {} }}\nmodel: {{ onnx: {} }}\nlabels: {{ csv: {} }}\nstages:\n{stages}\noutput: {{ dir: {} }}\nplugins: {{ dirs: [{}] }}\n{extra}",
        input.display(),
        model().display(),
        samples().join("labels.csv").display(),
        out.display(),
        plugins.display(),
    );
    std::fs::write(&p, text).unwrap();
    p
}

fn adverse(args: &[&str]) -> Output {
    Command::new(adverse_bin())
        .args(args)
        .env("ADVERSE_BACKEND", "cpu")
        .output()
        .expect("run adverse")
}

fn jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A JPEG 2000 corpus file relabelled as MPEG-2 video: a real, known transfer syntax that
/// adverse does not decode.
fn unsupported_syntax(dir: &Path) -> PathBuf {
    let src = repo_root().join("pipelines/samples/corpus/MR2_J2KR.dcm");
    let mut obj = dicom_object::open_file(&src).unwrap();
    obj.meta_mut().set_transfer_syntax(
        &dicom_transfer_syntax_registry::entries::MPEG2_MAIN_PROFILE_MAIN_LEVEL,
    );
    let out = dir.join("video.dcm");
    obj.write_to_file(&out).unwrap();
    out
}

#[test]
fn a_mixed_folder_gives_every_good_file_its_output_and_every_bad_one_a_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    let sub = input.join("sub");
    std::fs::create_dir_all(&sub).unwrap();
    for i in 0..3 {
        std::fs::copy(sample(i), input.join(format!("s{i}.dcm"))).unwrap();
    }
    std::fs::copy(
        repo_root().join("pipelines/samples/corpus/emri_small.dcm"),
        sub.join("mr.dcm"),
    )
    .unwrap();
    std::fs::copy(
        repo_root().join("pipelines/samples/corpus/MR2_J2KR.dcm"),
        sub.join("j2k.dcm"),
    )
    .unwrap();
    let bytes = std::fs::read(sample(3)).unwrap();
    std::fs::write(input.join("truncated.dcm"), &bytes[..bytes.len() / 2]).unwrap();
    std::fs::write(input.join("notes.txt"), "not an image\n").unwrap();
    std::fs::write(input.join("empty.dcm"), b"").unwrap();
    unsupported_syntax(&sub);
    let good = ["s0.dcm", "s1.dcm", "s2.dcm", "sub/mr.dcm", "sub/j2k.dcm"];
    let bad = ["truncated.dcm", "notes.txt", "empty.dcm", "sub/video.dcm"];

    let plugins = basic_plugins();
    let out = tmp.path().join("out");
    let p = pipeline(
        tmp.path(),
        &input,
        &out,
        plugins.path(),
        "  - purifier: median\n    params: { radius: 1 }",
        "",
    );
    let o = adverse(&["run", p.to_str().unwrap(), "-q"]);
    let all = text(&o);
    assert_eq!(o.status.code(), Some(1), "{all}");

    let rows = jsonl(&out.join("results.jsonl"));
    let by_input =
        |name: &str| -> Vec<&Value> { rows.iter().filter(|r| r["input"] == name).collect() };
    for g in good {
        let rs = by_input(g);
        assert!(!rs.is_empty(), "no row for {g}: {rows:?}");
        for r in &rs {
            assert_eq!(r["status"], "ok", "{r}");
            assert_eq!(r["output"], g, "{r}");
            assert!(out.join(g).is_file(), "{g} not written");
        }
    }
    assert_eq!(
        by_input("sub/mr.dcm").len(),
        10,
        "one row per frame of the multi-frame MR"
    );
    for b in bad {
        let rs = by_input(b);
        assert_eq!(rs.len(), 1, "{b}: {rs:?}");
        assert_eq!(rs[0]["status"], "failed");
        let err = rs[0]["error"].as_str().unwrap();
        assert!(!err.is_empty() && !out.join(b).exists(), "{b}: {err}");
        assert!(all.contains(b), "console does not name {b}: {all}");
    }
    assert!(
        by_input("sub/video.dcm")[0]["error"]
            .as_str()
            .unwrap()
            .contains("MPEG"),
        "{:?}",
        by_input("sub/video.dcm")
    );
    assert_eq!(rows.len(), 3 + 10 + 1 + bad.len());

    // The audit log: one record per instance, good or bad, and it verifies.
    let audit = jsonl(&out.join("audit.jsonl"));
    let kinds: Vec<&str> = audit.iter().map(|r| r["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds.first(), Some(&"run_start"));
    assert_eq!(kinds.last(), Some(&"run_end"));
    for name in good.iter().chain(&bad) {
        let recs: Vec<&Value> = audit.iter().filter(|r| r["input"] == *name).collect();
        assert_eq!(recs.len(), 1, "{name}");
        let ok = good.contains(name);
        assert_eq!(recs[0]["outcome"], if ok { "ok" } else { "failed" });
        assert!(
            recs[0]["run"]["stages"][0]["library_sha256"]
                .as_str()
                .unwrap()
                .len()
                == 64
        );
        if ok {
            let sha = recs[0]["output_sha256"].as_str().unwrap();
            let actual = sha256_file(&out.join(name));
            assert_eq!(sha, actual, "{name}");
        } else {
            assert!(recs[0]["error"].as_str().is_some_and(|e| !e.is_empty()));
        }
    }
    let v = adverse(&["audit", "verify", out.join("audit.jsonl").to_str().unwrap()]);
    assert_eq!(v.status.code(), Some(0), "{}", text(&v));

    // Written files read back with pydicom: derived UIDs, DERIVED image type, pixels changed.
    let pairs: Vec<String> = good
        .iter()
        .map(|g| {
            let orig = match g.strip_prefix("sub/") {
                Some(rest) => sub.join(rest),
                None => input.join(g),
            };
            format!("{}={}", orig.display(), out.join(g).display())
        })
        .collect();
    let checked = run_oracle("run_outputs.py", &pairs);
    for (line, g) in checked.lines().zip(good) {
        let c: Value = serde_json::from_str(line).unwrap();
        let row = by_input(g)[0];
        assert_eq!(c["sop_instance_uid"], row["output_sop_instance_uid"], "{g}");
        assert_ne!(c["sop_instance_uid"], row["sop_instance_uid"], "{g}");
        assert_eq!(c["image_type"][0], "DERIVED", "{g}");
        assert!(
            c["max_abs_diff"].as_i64().unwrap() > 0,
            "{g}: median changed nothing"
        );
    }

    // Summary and CSV.
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["processed"], good.len());
    assert_eq!(summary["failed"], bad.len());
    assert_eq!(summary["totals"]["instances_ok"], good.len());
    let csv = std::fs::read_to_string(out.join("results.csv")).unwrap();
    assert_eq!(csv.lines().count(), rows.len() + 1);

    // No patient names or IDs anywhere we write or print.
    for g in good {
        let obj = dicom_object::open_file(out.join(g)).unwrap();
        for tag in [
            dicom_dictionary_std::tags::PATIENT_NAME,
            dicom_dictionary_std::tags::PATIENT_ID,
            dicom_dictionary_std::tags::PATIENT_BIRTH_DATE,
        ] {
            let Ok(e) = obj.element(tag) else { continue };
            let v = e.to_str().map(|s| s.trim().to_string()).unwrap_or_default();
            if v.len() < 3 {
                continue;
            }
            for f in [
                "audit.jsonl",
                "results.jsonl",
                "results.csv",
                "summary.json",
            ] {
                let t = std::fs::read_to_string(out.join(f)).unwrap();
                assert!(!t.contains(&v), "{f} contains patient data of {g}");
            }
            assert!(!all.contains(&v), "console shows patient data of {g}");
        }
    }
}

fn sha256_file(p: &Path) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(std::fs::read(p).unwrap()))
}

/// Every output file's bytes, by relative path (results and logs excluded).
fn outputs(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut m = BTreeMap::new();
    for e in walk(dir) {
        let rel = e.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
        if rel.ends_with(".dcm") {
            m.insert(rel, std::fs::read(&e).unwrap());
        }
    }
    m
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            v.extend(walk(&p));
        } else {
            v.push(p);
        }
    }
    v
}

/// Floats to 3 decimals: batch composition changes the last bits of f32 sums.
fn rounded(v: Value) -> Value {
    match v {
        Value::Number(n) if n.is_f64() => {
            serde_json::json!((n.as_f64().unwrap() * 1e3).round() / 1e3)
        }
        Value::Array(a) => Value::Array(a.into_iter().map(rounded).collect()),
        Value::Object(m) => Value::Object(m.into_iter().map(|(k, v)| (k, rounded(v))).collect()),
        other => other,
    }
}

/// Rows without timings, sorted: what must be equal between two runs.
fn stable_rows(path: &Path) -> Vec<String> {
    let mut v: Vec<String> = jsonl(path)
        .into_iter()
        .map(|mut r| {
            for k in ["decode_ms", "compute_ms", "write_ms"] {
                r.as_object_mut().unwrap().remove(k);
            }
            rounded(r).to_string()
        })
        .collect();
    v.sort();
    v
}

fn assert_same_rows(a: &Path, b: &Path) {
    let (ra, rb) = (stable_rows(a), stable_rows(b));
    assert_eq!(ra.len(), rb.len(), "row counts differ");
    for (x, y) in ra.iter().zip(&rb) {
        assert_eq!(x, y);
    }
}

#[test]
fn a_run_killed_midway_resumes_to_the_same_outputs_with_a_valid_audit_log() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    // 4 x 64 instances (copies in sub-folders), so the run lasts long enough to be killed.
    for d in 0..4 {
        let sub = input.join(format!("d{d}"));
        std::fs::create_dir_all(&sub).unwrap();
        for i in 0..64 {
            std::fs::copy(sample(i), sub.join(format!("{i:02}.dcm"))).unwrap();
        }
    }
    let plugins = basic_plugins();
    let stages = "  - attack: fgsm\n    params: { eps: 4 }";
    let ref_out = tmp.path().join("ref");
    let p = pipeline(
        tmp.path(),
        &input,
        &ref_out,
        plugins.path(),
        stages,
        "run: { jobs: 2 }\n",
    );
    let o = adverse(&["run", p.to_str().unwrap(), "-q"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));

    let out = tmp.path().join("out");
    let p = pipeline(
        tmp.path(),
        &input,
        &out,
        plugins.path(),
        stages,
        "run: { jobs: 2 }\n",
    );
    let mut child = Command::new(adverse_bin())
        .args(["run", p.to_str().unwrap(), "-q"])
        .env("ADVERSE_BACKEND", "cpu")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let results = out.join("results.jsonl");
    let t0 = Instant::now();
    loop {
        let n = std::fs::read_to_string(&results)
            .map(|t| t.lines().count())
            .unwrap_or(0);
        if n >= 40 {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before it could be killed"
        );
        assert!(t0.elapsed() < Duration::from_secs(120), "no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let partial = outputs(&out).len();
    assert!(partial < 256, "the kill came after the run finished");

    let o = adverse(&["run", p.to_str().unwrap(), "-q", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let s: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(s["skipped"].as_u64().unwrap() >= 30, "{s}");
    assert_eq!(
        s["skipped"].as_u64().unwrap() + s["processed"].as_u64().unwrap(),
        256,
        "{s}"
    );

    assert_eq!(
        outputs(&out),
        outputs(&ref_out),
        "outputs differ from the uninterrupted run"
    );
    assert_same_rows(&out.join("results.jsonl"), &ref_out.join("results.jsonl"));
    assert!(
        walk(&out)
            .iter()
            .all(|p| !p.file_name().unwrap().to_string_lossy().ends_with(".tmp"))
    );
    let v = adverse(&["audit", "verify", out.join("audit.jsonl").to_str().unwrap()]);
    assert_eq!(v.status.code(), Some(0), "{}", text(&v));
    // Every instance has exactly one successful record across both runs.
    let audit = jsonl(&out.join("audit.jsonl"));
    let mut ok: BTreeMap<String, usize> = BTreeMap::new();
    for r in audit
        .iter()
        .filter(|r| r["kind"] == "instance" && r["outcome"] == "ok")
    {
        *ok.entry(r["input"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    assert_eq!(ok.len(), 256);
    assert!(
        ok.values().all(|&n| n == 1),
        "an instance was processed twice"
    );

    // A third run has nothing to do; --force redoes everything to the same bytes.
    let o = adverse(&["run", p.to_str().unwrap(), "-q", "--json"]);
    let s: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (s["skipped"].as_u64(), s["processed"].as_u64()),
        (Some(256), Some(0)),
        "{s}"
    );
    let o = adverse(&["run", p.to_str().unwrap(), "-q", "--json", "--force"]);
    let s: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(s["processed"].as_u64(), Some(256), "{s}");
    assert_eq!(outputs(&out), outputs(&ref_out));
}

/// Random draws (here PGD's random start) come from the batch seed, so a run is reproducible
/// only if batches form the same way every time: in input order, whatever order the decode
/// workers finish in. Two runs with two workers and batches of 4 write the same bytes.
#[test]
fn a_randomised_attack_writes_the_same_files_on_every_run() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    std::fs::create_dir_all(&input).unwrap();
    for i in 0..24 {
        std::fs::copy(sample(i), input.join(format!("{i:02}.dcm"))).unwrap();
    }
    let plugins = basic_plugins();
    let stages = "  - attack: pgd\n    params: { eps: 4, steps: 3, random_start: true }";
    let run = |name: &str| {
        let out = tmp.path().join(name);
        let dir = tmp.path().join(format!("p-{name}"));
        std::fs::create_dir_all(&dir).unwrap();
        let p = pipeline(
            &dir,
            &input,
            &out,
            plugins.path(),
            stages,
            "run: { jobs: 2, batch_size: 4, seed: 11 }\n",
        );
        let o = adverse(&["run", p.to_str().unwrap(), "-q"]);
        assert_eq!(o.status.code(), Some(0), "{}", text(&o));
        outputs(&out)
    };
    let (a, b) = (run("a"), run("b"));
    assert_eq!(a.len(), 24);
    let differ: Vec<&String> = a.keys().filter(|k| a.get(*k) != b.get(*k)).collect();
    assert!(differ.is_empty(), "outputs differ between runs: {differ:?}");
}

#[test]
fn attack_rows_report_the_prediction_of_the_file_as_written() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    std::fs::create_dir_all(&input).unwrap();
    for i in 0..12 {
        std::fs::copy(sample(i), input.join(format!("{i:02}.dcm"))).unwrap();
    }
    let plugins = basic_plugins();
    let out = tmp.path().join("out");
    let p = pipeline(
        tmp.path(),
        &input,
        &out,
        plugins.path(),
        "  - attack: fgsm\n    params: { eps: 4 }",
        "",
    );
    let o = adverse(&["run", p.to_str().unwrap(), "-q"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let rows = jsonl(&out.join("results.jsonl"));
    assert_eq!(rows.len(), 12);
    let pairs: Vec<String> = rows
        .iter()
        .map(|r| {
            let name = r["input"].as_str().unwrap();
            format!(
                "{}={}",
                input.join(name).display(),
                out.join(name).display()
            )
        })
        .collect();
    let mut args = vec!["--model".to_string(), model().display().to_string()];
    args.extend(pairs);
    let checked = run_oracle("run_outputs.py", &args);
    let mut successes = 0;
    for (line, r) in checked.lines().zip(&rows) {
        let c: Value = serde_json::from_str(line).unwrap();
        assert_eq!(c["ort_pred"], r["pred_written"], "{r}");
        assert!(c["max_abs_diff"].as_i64().unwrap() <= 4, "{r}");
        assert_eq!(c["max_abs_diff"], r["linf_stored"].as_f64().unwrap() as i64);
        let success = r["pred_written"] != r["label"];
        assert_eq!(r["attack_success"], success, "{r}");
        successes += usize::from(success);
    }
    assert!(successes > 0, "FGSM at eps 4 fooled nothing");
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(
        summary["totals"]["attack_success_rate"].as_f64().unwrap(),
        successes as f64 / 12.0
    );
    // Other parameters into the same folder: nothing counts as done.
    let p = pipeline(
        tmp.path(),
        &input,
        &out,
        plugins.path(),
        "  - attack: fgsm\n    params: { eps: 2 }",
        "",
    );
    let o = adverse(&["run", p.to_str().unwrap(), "-q", "--json"]);
    let s: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (s["processed"].as_u64(), s["skipped"].as_u64()),
        (Some(12), Some(0)),
        "{s}"
    );
}

#[test]
fn pipeline_errors_exit_2_before_anything_is_read() {
    let tmp = tempfile::tempdir().unwrap();
    let plugins = basic_plugins();
    let out = tmp.path().join("out");
    let p = pipeline(
        tmp.path(),
        &samples(),
        &out,
        plugins.path(),
        "  - attack: no-such-plugin",
        "",
    );
    let o = adverse(&["run", p.to_str().unwrap(), "-q"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("no-such-plugin"), "{}", text(&o));
    assert!(!out.join("results.jsonl").exists());
}
