//! The attack catalogue (`plugins/attacks`) loaded by the host and run on the bundled
//! PneumoniaMNIST samples with the bundled classifier: the written DICOM stays within ε of the
//! source and the reported success holds for the written file (onnxruntime oracle).

use std::path::Path;

use adverse_tests::repo_root;
use dicom_dictionary_std::tags;
use serde_json::Value;

use crate::plugins::{adverse, dir_of, libs, py, rows, stderr};

/// Stored values of a native (uncompressed) single-frame file, read with dicom-object.
fn stored(path: &Path) -> Vec<i64> {
    let obj = dicom_object::open_file(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let bits: u16 = obj.element(tags::BITS_ALLOCATED).unwrap().to_int().unwrap();
    let bytes = obj.element(tags::PIXEL_DATA).unwrap().to_bytes().unwrap();
    match bits {
        8 => bytes.iter().map(|&b| i64::from(b)).collect(),
        16 => bytes
            .chunks_exact(2)
            .map(|c| i64::from(u16::from_le_bytes([c[0], c[1]])))
            .collect(),
        b => panic!("unexpected BitsAllocated {b}"),
    }
}

#[test]
fn pgd_through_the_host_stays_within_eps_and_its_success_holds_on_re_read() {
    let l = libs();
    let root = repo_root();
    let model = root.join("pipelines/models/pneumonia-cnn.onnx");
    let samples: Vec<String> = (0..3)
        .map(|i| {
            root.join(format!(
                "pipelines/samples/pneumoniamnist/pneumoniamnist-test-000{i}.dcm"
            ))
            .display()
            .to_string()
        })
        .collect();
    let out = tempfile::tempdir().unwrap();
    let eps = 4i64;
    let mut args = vec![
        "plugins",
        "run",
        "pgd",
        "--params",
        r#"{"eps": 4, "steps": 10}"#,
        "--plugin-dir",
        dir_of(&l.attacks),
        "--model",
        model.to_str().unwrap(),
        "--label",
        "1",
        "--out",
        out.path().to_str().unwrap(),
    ];
    args.extend(samples.iter().map(String::as_str));
    let run = adverse(&args);
    assert!(run.status.success(), "{}", stderr(&run));
    let r = rows(&run);
    assert_eq!(r.len(), 3);
    let mut successes = 0;
    for (row, src) in r.iter().zip(&samples) {
        assert_eq!(row["status"], "ok", "{row}");
        let v = &row["values"];
        let written = Path::new(row["output"].as_str().expect("a derived file"));
        let (a, b) = (stored(Path::new(src)), stored(written));
        assert_eq!(a.len(), b.len());
        let linf = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).max().unwrap();
        assert!(linf <= eps, "{src}: written L-inf {linf} > eps {eps}");
        assert_eq!(v["linf"].as_f64().unwrap(), linf as f64, "{src}");
        // The model on the written file (onnxruntime, the card's preprocessing: stored / 255).
        let pred: i64 = py(
            "import sys, numpy as np, pydicom, onnxruntime as ort\n\
             s = ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])\n\
             x = pydicom.dcmread(sys.argv[2]).pixel_array.astype(np.float32) / np.float32(255)\n\
             print(int(s.run(None, {'input': x[None, None]})[0].argmax(1)[0]))",
            &[model.to_str().unwrap(), written.to_str().unwrap()],
        )
        .trim()
        .parse()
        .unwrap();
        assert_eq!(v["pred_after"].as_f64().unwrap(), pred as f64, "{src}");
        assert_eq!(v["success"], Value::Bool(pred != 1), "{src}: {v}");
        successes += usize::from(pred != 1);
    }
    // PGD-10 at 4 stored units flips most pneumonia cases of the undefended demo model.
    assert!(successes >= 2, "{successes} of 3 flipped: {r:?}");
}

#[test]
fn a_binary_model_refuses_apgd_dlr_naming_the_class_count() {
    let l = libs();
    let root = repo_root();
    let out = tempfile::tempdir().unwrap();
    let src = root.join("pipelines/samples/pneumoniamnist/pneumoniamnist-test-0000.dcm");
    let run = adverse(&[
        "plugins",
        "run",
        "apgd-dlr",
        "--params",
        r#"{"eps": 4, "steps": 5}"#,
        "--plugin-dir",
        dir_of(&l.attacks),
        "--model",
        root.join("pipelines/models/pneumonia-cnn.onnx")
            .to_str()
            .unwrap(),
        "--out",
        out.path().to_str().unwrap(),
        src.to_str().unwrap(),
    ]);
    let r = rows(&run);
    assert_eq!(r.len(), 1, "{}", stderr(&run));
    assert_eq!(r[0]["status"], "failed");
    let msg = r[0]["error"].as_str().unwrap_or_default();
    assert!(
        msg.contains("2 classes") && msg.contains("apgd-ce"),
        "{msg}"
    );
}

/// ε = 10 HU on a real 16-bit CT (signed, rescale -1024) through a model whose preprocessing
/// is rescale -> soft-tissue window -> area resize: the derived file is valid DICOM for pydicom,
/// no pixel moved more than 10 HU, and the prediction of the file as written and re-read
/// differs from the original's.
#[test]
fn ct_attacked_at_10_hu_stays_within_10_hu_and_its_re_read_prediction_changes() {
    let l = libs();
    let root = repo_root();
    let dir = tempfile::tempdir().unwrap();
    let src = root.join("pipelines/samples/corpus/693_UNCI.dcm");
    let out = dir.path().join("out");
    let pipeline = dir.path().join("ct.yaml");
    std::fs::write(
        &pipeline,
        format!(
            "name: ct-hu\ninput: {{ path: {} }}\n\
             model: {{ onnx: {}, card: {} }}\n\
             stages:\n  - attack: pgd\n    params: {{ eps: 10, unit: hu, steps: 20 }}\n\
             output: {{ dir: {} }}\nplugins: {{ dirs: [{}] }}\nrun: {{ seed: 5 }}\n",
            src.display(),
            root.join("pipelines/models/pneumonia-cnn.onnx").display(),
            root.join("tests/data/ct/pneumonia-cnn-ct.card.yaml")
                .display(),
            out.display(),
            dir_of(&l.attacks),
        ),
    )
    .unwrap();
    let run = adverse(&["run", "-q", "--json", pipeline.to_str().unwrap()]);
    assert!(run.status.success(), "{}", stderr(&run));
    let rows: Vec<Value> = std::fs::read_to_string(out.join("results.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert_eq!(rows.len(), 1, "{rows:?}");
    let row = &rows[0];
    assert_eq!(row["status"], "ok", "{row}");
    assert_eq!(
        row["stages"]["pgd"]["eps_stored"], 10.0,
        "slope 1: 10 HU = 10 stored"
    );
    assert!(row["linf_hu"].as_f64().unwrap() <= 10.0, "{row}");
    assert_ne!(
        row["pred_written"], row["pred_before"],
        "the re-read prediction must change: {row}"
    );
    // pydicom reads the derived file; the HU difference is computed from its own rescale.
    let written = out.join(row["output"].as_str().unwrap());
    let got = py(
        "import sys, numpy as np, pydicom\n\
         a, b = pydicom.dcmread(sys.argv[1]), pydicom.dcmread(sys.argv[2])\n\
         hu = lambda d: d.pixel_array.astype(np.float64) * float(d.RescaleSlope) + float(d.RescaleIntercept)\n\
         print(np.abs(hu(a) - hu(b)).max(), b.pixel_array.dtype, b.Modality, (hu(a) != hu(b)).sum())",
        &[src.to_str().unwrap(), written.to_str().unwrap()],
    );
    let f: Vec<&str> = got.split_whitespace().collect();
    let max_hu: f64 = f[0].parse().unwrap();
    assert!(max_hu <= 10.0 && max_hu > 0.0, "max |dHU| {max_hu}: {got}");
    assert_eq!(&f[1..3], ["int16", "CT"], "{got}");
    assert!(f[3].parse::<usize>().unwrap() > 0);
}
