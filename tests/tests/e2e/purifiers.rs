//! The purifier plugins (`bit-depth`, `jpeg`, `tv`, `lgs`) in `adverse run` pipelines over demo
//! samples (8-bit PneumoniaMNIST, 8-bit RGB, a 14-bit windowed CT): every frame gets a derived
//! DICOM that pydicom reads, with new UIDs and changed pixels.

use std::path::{Path, PathBuf};
use std::process::Command;

use adverse_tests::{adverse_bin, plugin_dir, python, repo_root, run_oracle};
use serde_json::Value;

fn samples() -> PathBuf {
    repo_root().join("pipelines/samples/pneumoniamnist")
}

/// A folder of demo inputs: three PneumoniaMNIST frames, an RGB image and a 512x512 CT.
fn inputs(dir: &Path) -> Vec<&'static str> {
    std::fs::create_dir_all(dir).unwrap();
    for i in 0..3 {
        std::fs::copy(
            samples().join(format!("pneumoniamnist-test-{i:04}.dcm")),
            dir.join(format!("p{i}.dcm")),
        )
        .unwrap();
    }
    for name in ["SC_rgb.dcm", "693_UNCI.dcm"] {
        std::fs::copy(
            repo_root().join("pipelines/samples/corpus").join(name),
            dir.join(name),
        )
        .unwrap();
    }
    vec!["p0.dcm", "p1.dcm", "p2.dcm", "SC_rgb.dcm", "693_UNCI.dcm"]
}

fn jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

#[test]
fn each_purifier_writes_derived_dicoms_that_pydicom_reads() {
    let plugins = plugin_dir(
        &["adverse-plugins-purifiers"],
        &["adverse_plugins_purifiers"],
    );
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    let names = inputs(&input);
    let stages = [
        ("bit-depth", "{ bits: 3 }"),
        ("jpeg", "{ quality: 50 }"),
        ("tv", "{ weight: 0.1, iterations: 20 }"),
        (
            "lgs",
            "{ window: 15, overlap: 5, threshold: 0.1, smoothing: 2.3 }",
        ),
    ];
    for (name, params) in stages {
        let out = tmp.path().join(format!("out-{name}"));
        let p = tmp.path().join(format!("{name}.yaml"));
        std::fs::write(
            &p,
            format!(
                "name: e2e-{name}\ninput: {{ path: {} }}\nmodel: {{ onnx: {} }}\nlabels: {{ csv: {} }}\nstages:\n  - purifier: {name}\n    params: {params}\noutput: {{ dir: {} }}\nplugins: {{ dirs: [{}] }}\n",
                input.display(),
                repo_root()
                    .join("pipelines/models/pneumonia-cnn.onnx")
                    .display(),
                samples().join("labels.csv").display(),
                out.display(),
                plugins.path().display(),
            ),
        )
        .unwrap();
        let o = Command::new(adverse_bin())
            .args(["run", p.to_str().unwrap(), "-q"])
            .env("ADVERSE_BACKEND", "cpu")
            .output()
            .expect("run adverse");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert_eq!(o.status.code(), Some(0), "{name}: {text}");
        let rows = jsonl(&out.join("results.jsonl"));
        assert_eq!(
            rows.len(),
            names.len(),
            "{name}: one row per frame: {rows:?}"
        );
        for r in &rows {
            assert_eq!(r["status"], "ok", "{name}: {r}");
        }
        let pairs: Vec<String> = names
            .iter()
            .map(|n| format!("{}={}", input.join(n).display(), out.join(n).display()))
            .collect();
        let checked = run_oracle("run_outputs.py", &pairs);
        let lines: Vec<Value> = checked
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), names.len());
        for (c, n) in lines.iter().zip(&names) {
            let row = rows.iter().find(|r| r["input"] == *n).unwrap();
            assert_eq!(
                c["sop_instance_uid"], row["output_sop_instance_uid"],
                "{name} {n}"
            );
            assert_ne!(c["sop_instance_uid"], row["sop_instance_uid"], "{name} {n}");
            assert_eq!(c["image_type"][0], "DERIVED", "{name} {n}");
            // SC_rgb.dcm is flat colour bars: no block's mean normalised gradient reaches LGS's
            // threshold, so LGS rightly leaves it as it is.
            if !(name == "lgs" && *n == "SC_rgb.dcm") {
                assert!(
                    c["max_abs_diff"].as_i64().unwrap() > 0,
                    "{name} changed nothing in {n}: {c}"
                );
            }
        }
        if name == "bit-depth" {
            // 3 bits over 0..255: only the 8 levels round(k * 255 / 7) remain.
            let check = Command::new(python())
                .arg("-c")
                .arg(
                    "import sys, numpy as np, pydicom\n\
                     v = set(np.unique(np.concatenate([pydicom.dcmread(f).pixel_array.ravel() for f in sys.argv[1:]])).tolist())\n\
                     print(sorted(v))\n\
                     sys.exit(0 if v <= {0, 36, 73, 109, 146, 182, 219, 255} else 1)",
                )
                .args((0..3).map(|i| out.join(format!("p{i}.dcm"))))
                .output()
                .unwrap();
            assert!(
                check.status.success(),
                "levels: {}{}",
                String::from_utf8_lossy(&check.stdout),
                String::from_utf8_lossy(&check.stderr)
            );
        }
    }
}
