//! `adverse inspect`: exit codes, `--json`, and no patient identity in any output.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

fn inspect(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(adverse_tests::adverse_bin())
        .arg("inspect")
        .args(args)
        .output()
        .expect("run adverse")
}

fn copy(name: &str, to: &Path) {
    std::fs::copy(adverse_tests::pydicom_data().join(name), to.join(name)).unwrap();
}

#[test]
fn exit_0_when_every_file_decodes_recursively() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("series/a");
    std::fs::create_dir_all(&sub).unwrap();
    copy("emri_small_RLE.dcm", dir.path());
    copy("US1_J2KR.dcm", &sub);
    copy("liver_nonbyte_aligned.dcm", &sub);
    let out = inspect(&[dir.path().as_os_str()]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(lines.iter().all(|l| l.ends_with("status=ok")), "{text}");
    let rle = lines
        .iter()
        .find(|l| l.contains("emri_small_RLE.dcm"))
        .unwrap();
    assert!(
        rle.contains("ts=RLE_Lossless")
            && rle.contains("frames=10")
            && rle.contains("dims=64x64x1")
            && rle.contains("bits=12/16u"),
        "{rle}"
    );
    let j2k = lines.iter().find(|l| l.contains("US1_J2KR.dcm")).unwrap();
    assert!(
        j2k.contains("dims=480x640x3") && j2k.contains("pi=RGB"),
        "{j2k}"
    );
    assert!(out.stderr.is_empty());
}

#[test]
fn exit_1_when_some_fail_and_each_failure_is_named_on_stderr() {
    let dir = tempfile::tempdir().unwrap();
    copy("emri_small.dcm", dir.path());
    std::fs::write(dir.path().join("notes.txt"), "not dicom at all").unwrap();
    let bytes = std::fs::read(adverse_tests::pydicom_data().join("emri_small.dcm")).unwrap();
    std::fs::write(dir.path().join("cut.dcm"), &bytes[..bytes.len() / 2]).unwrap();
    let out = inspect(&[dir.path().as_os_str()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("notes.txt") && stderr.contains("not a DICOM file"),
        "{stderr}"
    );
    assert!(
        stderr.contains("cut.dcm") && stderr.contains("malformed"),
        "{stderr}"
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 3);
    assert_eq!(
        stdout
            .lines()
            .filter(|l| l.contains("status=error:"))
            .count(),
        2,
        "{stdout}"
    );
}

/// `--include` narrows what a folder search takes (the demo's `*.dcm`), but a file named on the
/// command line is always inspected, so nothing asked for is silently passed over.
#[test]
fn include_globs_filter_folder_search_only() {
    let dir = tempfile::tempdir().unwrap();
    copy("emri_small.dcm", dir.path());
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    copy("liver.dcm", &dir.path().join("sub"));
    let notes = dir.path().join("notes.txt");
    std::fs::write(&notes, "not dicom at all").unwrap();
    let out = inspect(&[
        "--include".as_ref(),
        "*.dcm".as_ref(),
        dir.path().as_os_str(),
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 2, "{stdout}");
    assert!(stdout.contains("emri_small.dcm") && stdout.contains("liver.dcm"));
    assert!(!stdout.contains("notes.txt"));

    let out = inspect(&[
        "--include".as_ref(),
        "*.dcm".as_ref(),
        dir.path().as_os_str(),
        notes.as_os_str(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("notes.txt"));

    let out = inspect(&["--include".as_ref(), "[".as_ref(), dir.path().as_os_str()]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a malformed glob is a usage error"
    );
}

#[test]
fn exit_2_on_usage_errors() {
    let out = inspect(&[]);
    assert_eq!(out.status.code(), Some(2));
    let out = inspect(&["/definitely/not/here.dcm".as_ref()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/definitely/not/here.dcm"));
    let out = inspect(&[
        "--no-such-flag".as_ref(),
        adverse_tests::pydicom_data().as_os_str(),
    ]);
    assert_eq!(out.status.code(), Some(2));
}

/// The whole corpus as JSON: one object per file, values matching the decoder, and no patient
/// name or ID (as pydicom reads them) anywhere in stdout or stderr, in either format.
#[test]
fn json_over_the_corpus_and_no_patient_identity() {
    let corpus = adverse_tests::pydicom_data();
    let out = inspect(&["--json".as_ref(), corpus.as_os_str()]);
    // LICENSE is in the folder: it is reported as not DICOM.
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8(out.stdout.clone()).unwrap();
    let objs: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let dcm = adverse_tests::pydicom_files();
    assert_eq!(objs.len(), dcm.len() + 1);
    for o in &objs {
        let path = o["path"].as_str().unwrap();
        if path.ends_with("LICENSE") {
            assert_eq!(o["status"], "error");
            assert_eq!(o["error_kind"], "not_dicom");
        } else {
            assert_eq!(o["status"], "ok", "{o}");
            assert!(o["rows"].as_u64().unwrap() > 0 && o["frames"].as_u64().unwrap() >= 1);
        }
    }
    let ct = objs
        .iter()
        .find(|o| o["path"].as_str().unwrap().ends_with("693_UNCR.dcm"))
        .unwrap();
    assert_eq!(ct["modality"], "CT");
    assert_eq!(ct["rescale_intercept"], -1024.0);
    assert_eq!(ct["pixel_representation"], 1);
    assert_eq!(ct["bits_stored"], 14);
    assert_eq!(ct["transfer_syntax_uid"], "1.2.840.10008.1.2.1");

    // Patient identity of the corpus, read by pydicom.
    let mut args: Vec<std::ffi::OsString> = vec!["elements".into()];
    args.extend(dcm.iter().map(|p| p.clone().into_os_string()));
    let elements = adverse_tests::run_oracle("pydicom_pixels.py", args);
    let mut secrets = std::collections::BTreeSet::new();
    for line in elements.lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        for tag in ["00100010", "00100020", "00100030"] {
            if let Some(s) = v["dataset"][tag].as_str() {
                let s = s.trim();
                // Very short values ("A", "0") would match unrelated text.
                if s.len() >= 4 {
                    secrets.insert(s.to_string());
                }
            }
        }
    }
    assert!(
        secrets.len() >= 10,
        "expected the corpus to carry patient names/IDs: {secrets:?}"
    );
    let text = inspect(&[corpus.as_os_str()]);
    for o in [&out, &text] {
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        for s in &secrets {
            assert!(!all.contains(s.as_str()), "patient identity {s:?} printed");
        }
    }
}
