#!/usr/bin/env bash
# Build adverse and run it on the bundled demo: the sample DICOMs (PneumoniaMNIST test images as
# Secondary Capture files + real corpus images) and the bundled pneumonia classifier.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cmake >/dev/null 2>&1 || { [ "$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake >/dev/null; }
cargo build --release -p adverse --bin adverse
cargo build --release -p adverse-plugins-basic -p adverse-plugins-attacks   # built-in purifiers (median, gaussian) and attacks (fgsm, pgd, ...)
bin=./target/release/adverse
echo "== inspect: every sample decodes (syntax, geometry, bits, rescale, window)"
"$bin" inspect --include '*.dcm' pipelines/samples
echo "== the bundled model on the PneumoniaMNIST samples (labels: pipelines/samples/pneumoniamnist/labels.csv)"
"$bin" model run pipelines/models/pneumonia-cnn.onnx pipelines/samples/pneumoniamnist/*.dcm
echo "== check the demo pipelines (every problem is reported with file:line:column)"
"$bin" validate pipelines/demo-pgd.yaml
"$bin" validate pipelines/demo-median.yaml
echo "== PGD-10 (eps = 4 stored units) on the 64 samples: derived DICOM, results, previews, audit log in out/demo-pgd"
"$bin" run pipelines/demo-pgd.yaml
echo "== the audit log's hash chain"
"$bin" audit verify out/demo-pgd/audit.jsonl
echo "== a purifier pipeline over every bundled sample (8/16-bit, RGB, multi-frame, compressed)"
"$bin" run pipelines/demo-median.yaml
