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
echo "== the fgsm plugin (eps = 4 stored units) on 6 pneumonia samples; derived DICOM + results in out/demo"
"$bin" plugins run fgsm --plugin-dir target/release --params '{"eps": 4}' --label 1 \
  --model pipelines/models/pneumonia-cnn.onnx --out out/demo \
  pipelines/samples/pneumoniamnist/pneumoniamnist-test-000{0..5}.dcm
echo "== the fgsm outputs, re-read: the model on the derived files"
"$bin" model run pipelines/models/pneumonia-cnn.onnx out/demo/*.dcm
