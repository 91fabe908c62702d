#!/usr/bin/env bash
# The README's robustness tables: builds adverse and the built-in plugins (release), then runs
# pipelines/eval-demo.yaml (every attack at every budget on the 64 bundled samples, against no
# defense, a median purifier and the adversarially trained model; detectors; certification),
# eval-purifiers.yaml (every purifier under adaptive attack) and eval-eot.yaml (a randomised
# defense and EOT) into out/<name>: tables in evaluation.md, everything in evaluation.json, the
# HTML report in report.html.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cmake >/dev/null 2>&1 || { [ "$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake >/dev/null; }
cargo build --release -p adverse --bin adverse
cargo build --release -p adverse-plugins-basic -p adverse-plugins-attacks -p adverse-plugins-detectors -p adverse-plugins-purifiers
# Every table is written even when a sanity check fails (exit 1): that is a finding, not an error.
status=0
for f in eval-demo eval-purifiers eval-eot; do
  ./target/release/adverse evaluate "pipelines/$f.yaml" "$@" || status=$?
done
exit $status
