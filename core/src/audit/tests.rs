use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};

use super::format::encode;
use super::*;

fn body(i: u64) -> Map<String, Value> {
    match json!({
        "input": format!("in/{i:04}.dcm"),
        "input_sha256": format!("{i:064x}"),
        "outcome": "ok",
        "metrics": { "linf": 0.25 * i as f64, "psnr": 41.5, "note": "tab\there \"quoted\" é" },
    }) {
        Value::Object(m) => m,
        _ => unreachable!(),
    }
}

/// A log of `n` records: run_start, instances, run_end. Returns its path and the hashes.
fn build(dir: &Path, n: u64) -> (PathBuf, Vec<String>) {
    let path = dir.join("audit.jsonl");
    let (mut log, existing) = AuditLog::open(&path, GroupCommit::default()).unwrap();
    assert!(existing.is_empty());
    let mut hashes = Vec::new();
    for i in 0..n {
        let kind = match i {
            0 => "run_start",
            _ if i == n - 1 => "run_end",
            _ => "instance",
        };
        hashes.push(log.append(kind, body(i)).unwrap());
    }
    assert_eq!(log.head(), (n, hashes.last().cloned().unwrap()));
    (path, hashes)
}

/// The file's lines, newline kept.
fn lines(path: &Path) -> Vec<Vec<u8>> {
    let bytes = std::fs::read(path).unwrap();
    bytes
        .split_inclusive(|&b| b == b'\n')
        .map(<[u8]>::to_vec)
        .collect()
}

fn write_lines(path: &Path, lines: &[Vec<u8>]) {
    std::fs::write(path, lines.concat()).unwrap();
}

fn broken(path: &Path) -> Broken {
    let r = verify(path).unwrap();
    match r.broken {
        Some(b) => b,
        None => panic!("expected a break, got {r:?}"),
    }
}

#[test]
fn round_trip_verifies_and_reopens_with_every_record() {
    let dir = tempfile::tempdir().unwrap();
    let (path, hashes) = build(dir.path(), 5);
    let r = verify(&path).unwrap();
    assert_eq!(
        r,
        VerifyReport {
            records: 5,
            head: hashes[4].clone(),
            broken: None
        }
    );

    let (log, records) = AuditLog::open(&path, GroupCommit::default()).unwrap();
    assert_eq!(log.head(), (5, hashes[4].clone()));
    assert_eq!(records.len(), 5);
    for (i, rec) in records.iter().enumerate() {
        assert_eq!(rec.seq, i as u64);
        assert_eq!(rec.hash, hashes[i]);
        assert_eq!(rec.body, body(i as u64));
        // RFC 3339 UTC, milliseconds: 2025-01-31T09:08:07.123Z
        let t = rec.time.as_bytes();
        assert_eq!(t.len(), 24, "{}", rec.time);
        assert!(
            t[4] == b'-' && t[10] == b'T' && t[19] == b'.' && t[23] == b'Z',
            "{}",
            rec.time
        );
    }
    assert_eq!(records[0].kind, "run_start");
    assert_eq!(records[4].kind, "run_end");

    // The documented layout: envelope first, hash last, prev links, hash over the line without
    // its hash member (checked independently of the verifier).
    let ls = lines(&path);
    for (i, l) in ls.iter().enumerate() {
        let text = std::str::from_utf8(l).unwrap();
        assert!(
            text.starts_with(&format!("{{\"seq\":{i},\"prev\":\"")),
            "{text}"
        );
        let v: Value = serde_json::from_str(text).unwrap();
        let prev = if i == 0 { ZERO_HASH } else { &hashes[i - 1] };
        assert_eq!(v["prev"], prev);
        let cut = text.rfind(",\"hash\":\"").unwrap();
        assert_eq!(&text[cut..], format!(",\"hash\":\"{}\"}}\n", hashes[i]));
        let hashed = format!("{}}}", &text[..cut]);
        use sha2::Digest;
        assert_eq!(
            hex::encode(sha2::Sha256::digest(hashed.as_bytes())),
            hashes[i]
        );
    }
}

#[test]
fn reopen_continues_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let (path, hashes) = build(dir.path(), 3);
    {
        let (mut log, records) = AuditLog::open(&path, GroupCommit::default()).unwrap();
        assert_eq!(records.len(), 3);
        assert_eq!(log.head(), (3, hashes[2].clone()));
        log.append("run_start", body(3)).unwrap();
        log.append("run_end", body(4)).unwrap();
    }
    let r = verify(&path).unwrap();
    assert!(r.is_ok(), "{r:?}");
    assert_eq!(r.records, 5);
    let ls = lines(&path);
    let v: Value = serde_json::from_slice(&ls[3]).unwrap();
    assert_eq!(v["seq"], 3);
    assert_eq!(v["prev"], hashes[2].as_str());
}

#[test]
fn an_empty_log_verifies_with_the_zero_head() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.jsonl");
    let (log, records) = AuditLog::open(&path, GroupCommit::default()).unwrap();
    assert!(records.is_empty());
    assert_eq!(log.head(), (0, ZERO_HASH.to_string()));
    drop(log);
    assert_eq!(
        verify(&path).unwrap(),
        VerifyReport {
            records: 0,
            head: ZERO_HASH.into(),
            broken: None
        }
    );
}

#[test]
fn one_byte_edited_in_a_middle_record_is_a_hash_mismatch_there() {
    let dir = tempfile::tempdir().unwrap();
    let (path, hashes) = build(dir.path(), 5);
    let mut ls = lines(&path);
    // "in/0002.dcm" -> "in/0003.dcm": still valid JSON, only the hash can tell.
    let pos = ls[2].windows(4).position(|w| w == b"0002").unwrap();
    ls[2][pos + 3] = b'3';
    write_lines(&path, &ls);
    let r = verify(&path).unwrap();
    let b = r.broken.clone().unwrap();
    assert_eq!((b.line, b.seq, b.kind), (3, 2, BreakKind::HashMismatch));
    assert_eq!(
        b.to_string(),
        "record 2 (line 3): hash mismatch: content edited"
    );
    assert_eq!((r.records, r.head), (2, hashes[1].clone()));
}

#[test]
fn one_byte_edited_in_the_last_record_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = build(dir.path(), 4);
    let mut ls = lines(&path);
    let pos = ls[3].windows(2).position(|w| w == b"ok").unwrap();
    ls[3][pos] = b'O';
    write_lines(&path, &ls);
    let b = broken(&path);
    assert_eq!((b.line, b.seq, b.kind), (4, 3, BreakKind::HashMismatch));
}

/// Every single-byte change anywhere in the file is caught, at the line that holds the byte.
#[test]
fn every_single_byte_edit_is_detected_at_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = build(dir.path(), 3);
    let orig = std::fs::read(&path).unwrap();
    let line_of = |p: usize| orig[..p].iter().filter(|&&b| b == b'\n').count() as u64 + 1;
    for p in 0..orig.len() {
        for new in [orig[p] ^ 0x01, orig[p] ^ 0x20, b'\n'] {
            if new == orig[p] {
                continue;
            }
            let mut edited = orig.clone();
            edited[p] = new;
            // `verify` is `scan` over the file; scanning the bytes in memory keeps this fast.
            let r = super::scan::scan(&edited[..], |_| {}).unwrap().report;
            let b = r
                .broken
                .unwrap_or_else(|| panic!("byte {p} -> {new:#x} not detected"));
            assert_eq!(b.line, line_of(p), "byte {p} -> {new:#x}: {b}");
        }
    }
}

#[test]
fn a_deleted_record_is_a_seq_break_at_its_place() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = build(dir.path(), 5);
    let mut ls = lines(&path);
    ls.remove(2);
    write_lines(&path, &ls);
    let b = broken(&path);
    assert_eq!((b.line, b.seq, b.kind), (3, 2, BreakKind::SeqMismatch));
    assert_eq!(
        b.to_string(),
        "record 2 (line 3): seq is 3, expected 2: a record was deleted, inserted or reordered"
    );

    // The first record deleted.
    let (path, _) = build(&dir.path().join("x").tap_mkdir(), 3);
    let mut ls = lines(&path);
    ls.remove(0);
    write_lines(&path, &ls);
    let b = broken(&path);
    assert_eq!((b.line, b.seq, b.kind), (1, 0, BreakKind::SeqMismatch));
}

#[test]
fn two_swapped_records_break_at_the_first_of_them() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = build(dir.path(), 5);
    let mut ls = lines(&path);
    ls.swap(1, 2);
    write_lines(&path, &ls);
    let b = broken(&path);
    assert_eq!((b.line, b.seq, b.kind), (2, 1, BreakKind::SeqMismatch));
    assert!(b.reason.contains("seq is 2, expected 1"), "{b}");
}

#[test]
fn inserted_records_are_detected() {
    let dir = tempfile::tempdir().unwrap();
    let (path, hashes) = build(dir.path(), 4);
    let orig = lines(&path);

    // A copy of an existing record.
    let mut ls = orig.clone();
    ls.insert(2, orig[1].clone());
    write_lines(&path, &ls);
    let b = broken(&path);
    assert_eq!((b.line, b.seq, b.kind), (3, 2, BreakKind::SeqMismatch));

    // A forged record that links correctly into its place: the record it displaces cannot.
    let (forged, _) = encode(
        2,
        &hashes[1],
        "2025-01-01T00:00:00.000Z",
        "instance",
        &body(9),
    )
    .unwrap();
    let mut ls = orig.clone();
    ls.insert(2, forged);
    write_lines(&path, &ls);
    let b = broken(&path);
    assert_eq!((b.line, b.seq, b.kind), (4, 3, BreakKind::SeqMismatch));
}

/// A forger who renumbers after deleting still has to match `prev`.
#[test]
fn a_deletion_with_renumbered_seqs_is_a_prev_break() {
    let dir = tempfile::tempdir().unwrap();
    let (path, hashes) = build(dir.path(), 4);
    let mut ls = lines(&path);
    ls.remove(2);
    // Old record 3 re-encoded as seq 2 with its own (now wrong) prev.
    let (renum, _) = encode(
        2,
        &hashes[2],
        "2025-01-01T00:00:00.000Z",
        "run_end",
        &body(3),
    )
    .unwrap();
    ls[2] = renum;
    write_lines(&path, &ls);
    let b = broken(&path);
    assert_eq!((b.line, b.seq, b.kind), (3, 2, BreakKind::PrevMismatch));
    assert_eq!(
        b.to_string(),
        "record 2 (line 3): prev does not match record 1's hash: a record was deleted, inserted or reordered"
    );

    // A first record whose prev is not zero: records before it were cut.
    let (first, _) = encode(
        0,
        &hashes[0],
        "2025-01-01T00:00:00.000Z",
        "run_start",
        &body(0),
    )
    .unwrap();
    std::fs::write(&path, first).unwrap();
    let b = broken(&path);
    assert_eq!((b.line, b.seq, b.kind), (1, 0, BreakKind::PrevMismatch));
}

#[test]
fn a_truncated_last_record_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let (path, hashes) = build(dir.path(), 4);
    let full = std::fs::read(&path).unwrap();
    for cut in [1, 2, 30] {
        std::fs::write(&path, &full[..full.len() - cut]).unwrap();
        let r = verify(&path).unwrap();
        let b = r.broken.unwrap();
        assert_eq!(
            (b.line, b.seq, b.kind),
            (4, 3, BreakKind::Truncated),
            "cut {cut}"
        );
        assert!(b.reason.starts_with("truncated record"), "{b}");
        assert_eq!((r.records, r.head), (3, hashes[2].clone()));
    }
}

#[test]
fn open_recovers_a_torn_tail_and_records_the_cut() {
    let dir = tempfile::tempdir().unwrap();
    let (path, hashes) = build(dir.path(), 4);
    let full = std::fs::read(&path).unwrap();
    let line3 = full.len() - lines(&path)[3].len();
    // What a crash can leave: a prefix of the record being written; the same followed by the
    // zeros of a power loss (longer than the record that replaces it); a prefix with a newline
    // that is not JSON; a bare start.
    let mut zeros = full[..line3 + 40].to_vec();
    zeros.resize(full.len() + 5000, 0);
    let mut with_nl = full[..line3 + 40].to_vec();
    with_nl.push(b'\n');
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (full[..full.len() - 7].to_vec(), "no trailing newline"),
        (zeros, "no trailing newline"),
        (with_nl, "invalid JSON"),
        (full[..line3 + 3].to_vec(), "no trailing newline"),
    ];
    for (bytes, cause) in cases {
        std::fs::write(&path, &bytes).unwrap();
        let torn = &bytes[line3..];
        let (mut log, records) = AuditLog::open(&path, GroupCommit::default()).unwrap();
        assert_eq!(records.len(), 4);
        let rec = &records[3];
        assert_eq!((rec.seq, rec.kind.as_str()), (3, RECOVERED_KIND));
        use sha2::Digest;
        let expect = json!({
            "offset": line3,
            "discarded_bytes": torn.len(),
            "discarded_sha256": hex::encode(sha2::Sha256::digest(torn)),
            "cause": cause,
        });
        assert_eq!(Value::Object(rec.body.clone()), expect);
        assert_eq!(log.head(), (4, rec.hash.clone()));
        log.append("run_end", body(4)).unwrap();
        drop(log);
        let r = verify(&path).unwrap();
        assert!(r.is_ok(), "{cause}: {r:?}");
        assert_eq!(r.records, 5);
        let ls = lines(&path);
        let v: Value = serde_json::from_slice(&ls[3]).unwrap();
        assert_eq!(v["prev"], hashes[2].as_str());
        assert_eq!(v["kind"], RECOVERED_KIND);
    }
}

#[test]
fn open_refuses_a_tampered_log_and_leaves_it_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = build(dir.path(), 4);
    let mut ls = lines(&path);
    ls.swap(1, 2);
    write_lines(&path, &ls);
    let before = std::fs::read(&path).unwrap();
    match AuditLog::open(&path, GroupCommit::default()) {
        Err(AuditError::Broken { broken, .. }) => {
            assert_eq!((broken.line, broken.kind), (2, BreakKind::SeqMismatch))
        }
        other => panic!("expected Broken, got {:?}", other.map(|(_, r)| r.len())),
    }
    assert_eq!(std::fs::read(&path).unwrap(), before);

    // A final line edited (still JSON, bad hash) is tampering, not a torn write.
    let (path, _) = build(&dir.path().join("b").tap_mkdir(), 3);
    let mut ls = lines(&path);
    let pos = ls[2].windows(2).position(|w| w == b"ok").unwrap();
    ls[2][pos] = b'O';
    write_lines(&path, &ls);
    assert!(matches!(
        AuditLog::open(&path, GroupCommit::default()),
        Err(AuditError::Broken { .. })
    ));

    // A foreign file is not a torn record: never cut off.
    let foreign = dir.path().join("notes.txt");
    std::fs::write(&foreign, b"patient list, do not delete").unwrap();
    assert!(matches!(
        AuditLog::open(&foreign, GroupCommit::default()),
        Err(AuditError::Broken { .. })
    ));
    assert_eq!(
        std::fs::read(&foreign).unwrap(),
        b"patient list, do not delete"
    );
}

#[test]
fn garbage_never_panics_and_never_verifies() {
    use rand::{Rng, SeedableRng};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("g.jsonl");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(6);
    for i in 0..300 {
        let len = rng.random_range(1..2000);
        let mut bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        if i % 2 == 0 {
            bytes.push(b'\n');
        }
        std::fs::write(&path, &bytes).unwrap();
        let r = verify(&path).unwrap();
        assert!(!r.is_ok());
        assert_eq!(r.records, 0);
    }
    let deep = format!("{}\n", "[".repeat(100_000));
    for text in [
        "\n",
        "null\n",
        "[1,2]\n",
        "\"a string\"\n",
        "{}\n",
        "{\"seq\":0}\n",
        deep.as_str(),
        "{\"seq\":0,\"seq\":0}\n",
    ] {
        std::fs::write(&path, text).unwrap();
        let b = broken(&path);
        assert_eq!(b.line, 1);
        assert!(
            matches!(b.kind, BreakKind::InvalidJson | BreakKind::MissingHash),
            "{b}"
        );
    }
    // Record contents are never echoed in a reason.
    std::fs::write(&path, "\"SMITH^JOHN\"\n").unwrap();
    assert!(!broken(&path).reason.contains("SMITH"));

    // A line past the cap is refused without buffering it.
    let mut huge = vec![b'x'; MAX_RECORD_BYTES + 10];
    huge.push(b'\n');
    std::fs::write(&path, &huge).unwrap();
    assert_eq!(broken(&path).kind, BreakKind::TooLong);

    // Unreadable: an error naming the path, not a report.
    let missing = dir.path().join("missing.jsonl");
    let e = verify(&missing).unwrap_err();
    assert!(e.to_string().contains("missing.jsonl"), "{e}");
    assert!(verify(dir.path()).is_err());
}

#[test]
fn duplicate_members_are_rejected_even_with_a_valid_hash() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.jsonl");
    // A body key spliced in twice: the hash covers the bytes, but readers would disagree.
    let (line, _) = encode(0, ZERO_HASH, "2025-01-01T00:00:00.000Z", "x", &body(0)).unwrap();
    let text = String::from_utf8(line).unwrap();
    let dup = text.replacen("\"kind\":\"x\"", "\"kind\":\"x\",\"kind\":\"y\"", 1);
    let cut = dup.rfind(",\"hash\":\"").unwrap();
    use sha2::Digest;
    let h = hex::encode(sha2::Sha256::digest(
        format!("{}}}", &dup[..cut]).as_bytes(),
    ));
    std::fs::write(&path, format!("{},\"hash\":\"{h}\"}}\n", &dup[..cut])).unwrap();
    let b = broken(&path);
    assert_eq!(b.kind, BreakKind::InvalidJson, "{b}");
}

#[test]
fn body_keys_may_not_collide_with_the_envelope() {
    let dir = tempfile::tempdir().unwrap();
    let (path, hashes) = build(dir.path(), 2);
    let (mut log, _) = AuditLog::open(&path, GroupCommit::default()).unwrap();
    for key in ENVELOPE_KEYS {
        let mut b = body(2);
        b.insert(key.to_string(), json!(1));
        match log.append("instance", b) {
            Err(AuditError::ReservedKey { key: k }) => assert_eq!(k, key),
            other => panic!("{key}: {other:?}"),
        }
    }
    assert!(matches!(
        log.append("", body(2)),
        Err(AuditError::EmptyKind)
    ));
    // Nothing was written; the log still takes records.
    assert_eq!(log.head(), (2, hashes[1].clone()));
    log.append("instance", body(2)).unwrap();
    drop(log);
    assert_eq!(verify(&path).unwrap().records, 3);
}

#[test]
fn a_second_writer_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.jsonl");
    let (log, _) = AuditLog::open(&path, GroupCommit::default()).unwrap();
    assert!(matches!(
        AuditLog::open(&path, GroupCommit::default()),
        Err(AuditError::Locked { .. })
    ));
    drop(log);
    AuditLog::open(&path, GroupCommit::default()).unwrap();
}

#[test]
fn group_commit_syncs_by_count_and_by_delay() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.jsonl");
    let by_count = GroupCommit {
        max_records: 3,
        max_delay: Duration::from_secs(3600),
    };
    let (mut log, _) = AuditLog::open(&path, by_count).unwrap();
    log.append("a", body(0)).unwrap();
    log.append("a", body(1)).unwrap();
    assert_eq!(log.pending(), 2);
    log.append("a", body(2)).unwrap();
    assert_eq!(log.pending(), 0);
    log.append("a", body(3)).unwrap();
    log.sync().unwrap();
    assert_eq!(log.pending(), 0);
    drop(log);

    // By delay: the background thread syncs although no further record arrives.
    let by_delay = GroupCommit {
        max_records: 1000,
        max_delay: Duration::from_millis(30),
    };
    let (mut log, _) = AuditLog::open(&path, by_delay).unwrap();
    log.append("a", body(4)).unwrap();
    assert_eq!(log.pending(), 1);
    let t0 = Instant::now();
    while log.pending() != 0 {
        assert!(t0.elapsed() < Duration::from_secs(10), "no background sync");
        std::thread::sleep(Duration::from_millis(5));
    }

    // Every record: nothing ever pending.
    drop(log);
    let each = GroupCommit {
        max_records: 1,
        max_delay: Duration::from_secs(1),
    };
    let (mut log, _) = AuditLog::open(&path, each).unwrap();
    log.append("a", body(5)).unwrap();
    assert_eq!(log.pending(), 0);
    drop(log);
    assert_eq!(verify(&path).unwrap().records, 6);
}

#[test]
fn the_log_can_move_to_a_writer_thread() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.jsonl");
    let (mut log, _) = AuditLog::open(&path, GroupCommit::default()).unwrap();
    let h = std::thread::spawn(move || {
        for i in 0..10 {
            log.append("instance", body(i)).unwrap();
        }
        log.head()
    });
    let head = h.join().unwrap();
    let r = verify(&path).unwrap();
    assert_eq!((r.records, r.head), head);
}

/// SIGKILL at arbitrary points while appending large records (so some kills land inside a
/// write), five times over the same log: each restart opens (recovering a torn tail if there
/// is one) and continues, and the final log verifies. The test re-runs its own binary as the
/// writer; the environment variable selects that role.
#[cfg(unix)]
#[test]
fn sigkill_mid_append_leaves_a_log_that_opens_and_verifies() {
    const ROLE: &str = "ADVERSE_AUDIT_TEST_CHILD_LOG";
    const NAME: &str = "audit::tests::sigkill_mid_append_leaves_a_log_that_opens_and_verifies";
    if let Some(p) = std::env::var_os(ROLE) {
        let (mut log, _) = AuditLog::open(Path::new(&p), GroupCommit::default()).unwrap();
        let big = "x".repeat(256 << 10);
        loop {
            let mut b = body(log.head().0);
            b.insert("payload".into(), json!(big));
            log.append("instance", b).unwrap();
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let mut floor = 0;
    for round in 0..5 {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([NAME, "--exact", "--nocapture", "--test-threads=1"])
            .env(ROLE, &path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let t0 = Instant::now();
        // Kill at a size that is not a multiple of the record length.
        let target = (floor + 20 * (256 << 10) + 77_777 * (round + 1)) as u64;
        while std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0) < target {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "child wrote too little"
            );
            assert!(child.try_wait().unwrap().is_none(), "child exited");
            std::thread::sleep(Duration::from_millis(1));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        floor = std::fs::metadata(&path).unwrap().len() as usize;
    }
    let (log, records) = AuditLog::open(&path, GroupCommit::default()).unwrap();
    assert!(records.len() >= 100, "{}", records.len());
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r.seq, i as u64);
    }
    // Informational: how many kills landed inside a write (varies run to run).
    let torn = records.iter().filter(|r| r.kind == RECOVERED_KIND).count();
    eprintln!("{} records, {torn} torn tails recovered", records.len());
    drop(log);
    let r = verify(&path).unwrap();
    assert!(r.is_ok(), "{r:?}");
}

trait TapMkdir {
    fn tap_mkdir(self) -> Self;
}

impl TapMkdir for PathBuf {
    fn tap_mkdir(self) -> Self {
        std::fs::create_dir_all(&self).unwrap();
        self
    }
}
