//! `adverse audit verify`: one test per tamper kind of the acceptance list (one byte edited, a
//! record deleted, two records swapped, the last record truncated), plus the intact case, the
//! JSON output and the exit code for an unreadable file. Logs are written with the library's
//! own writer, then edited here as an attacker would.

use std::path::{Path, PathBuf};
use std::process::Output;

use adverse::audit::{AuditLog, GroupCommit};
use serde_json::{Map, Value, json};

/// A five-record log as a run writes it; returns its path and the record hashes.
fn write_log(dir: &Path) -> (PathBuf, Vec<String>) {
    let path = dir.join("audit.jsonl");
    let (mut log, _) = AuditLog::open(&path, GroupCommit::default()).unwrap();
    let mut hashes = Vec::new();
    for (i, kind) in ["run_start", "instance", "instance", "instance", "run_end"]
        .iter()
        .enumerate()
    {
        let Value::Object(body) = json!({
            "tool_version": "0.1.0",
            "input": format!("in/{i}.dcm"),
            "input_sha256": format!("{i:064x}"),
            "outcome": "ok",
        }) else {
            unreachable!()
        };
        hashes.push(log.append(kind, body).unwrap());
    }
    (path, hashes)
}

fn lines(path: &Path) -> Vec<Vec<u8>> {
    std::fs::read(path)
        .unwrap()
        .split_inclusive(|&b| b == b'\n')
        .map(<[u8]>::to_vec)
        .collect()
}

fn verify(args: &[&std::ffi::OsStr]) -> Output {
    std::process::Command::new(adverse_tests::adverse_bin())
        .args(["audit", "verify"])
        .args(args)
        .output()
        .expect("run adverse")
}

/// Asserts exit 1 and that stdout names `record (line)` as the first break, with `why`.
fn assert_broken_at(path: &Path, seq: u64, why: &str) {
    let out = verify(&[path.as_os_str()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let first = stdout.lines().next().unwrap_or_default();
    let expect = format!("BROKEN: record {seq} (line {}): ", seq + 1);
    assert!(first.starts_with(&expect), "{stdout}");
    assert!(first.contains(why), "{stdout}");
}

#[test]
fn an_intact_log_verifies_with_exit_0_and_its_head() {
    let dir = tempfile::tempdir().unwrap();
    let (path, hashes) = write_log(dir.path());
    let out = verify(&[path.as_os_str()]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("OK: 5 records, head {}\n", hashes[4])
    );
}

#[test]
fn one_byte_edited_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = write_log(dir.path());
    let mut bytes = std::fs::read(&path).unwrap();
    // "in/2.dcm" -> "in/7.dcm" in record 2.
    let pos = bytes.windows(8).position(|w| w == b"in/2.dcm").unwrap();
    bytes[pos + 3] = b'7';
    std::fs::write(&path, &bytes).unwrap();
    assert_broken_at(&path, 2, "hash mismatch: content edited");
}

#[test]
fn a_deleted_record_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = write_log(dir.path());
    let mut ls = lines(&path);
    ls.remove(3);
    std::fs::write(&path, ls.concat()).unwrap();
    assert_broken_at(&path, 3, "seq is 4, expected 3: a record was deleted");
}

#[test]
fn two_swapped_records_are_detected() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = write_log(dir.path());
    let mut ls = lines(&path);
    ls.swap(1, 2);
    std::fs::write(&path, ls.concat()).unwrap();
    assert_broken_at(&path, 1, "seq is 2, expected 1");
}

#[test]
fn the_last_record_truncated_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let (path, hashes) = write_log(dir.path());
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 20]).unwrap();
    assert_broken_at(&path, 4, "truncated record");
    // The second line says how much still verifies.
    let out = verify(&[path.as_os_str()]);
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        stdout.contains(&format!("4 records verify before it, head {}", hashes[3])),
        "{stdout}"
    );
}

#[test]
fn json_output_describes_the_break() {
    let dir = tempfile::tempdir().unwrap();
    let (path, hashes) = write_log(dir.path());
    let out = verify(&["--json".as_ref(), path.as_os_str()]);
    assert_eq!(out.status.code(), Some(0));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], true);
    assert_eq!(v["records"], 5);
    assert_eq!(v["head"], hashes[4].as_str());
    assert!(v["broken"].is_null());

    let mut ls = lines(&path);
    ls.swap(3, 4);
    std::fs::write(&path, ls.concat()).unwrap();
    let out = verify(&[path.as_os_str(), "--json".as_ref()]);
    assert_eq!(out.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], false);
    assert_eq!(v["records"], 3);
    let b: &Map<String, Value> = v["broken"].as_object().unwrap();
    assert_eq!(b["line"], 4);
    assert_eq!(b["seq"], 3);
    assert_eq!(b["kind"], "seq_mismatch");
}

#[test]
fn unreadable_file_or_bad_usage_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.jsonl");
    let out = verify(&[missing.as_os_str()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope.jsonl"));
    assert!(out.stdout.is_empty());
    let out = verify(&[]);
    assert_eq!(out.status.code(), Some(2));
}
