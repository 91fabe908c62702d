#!/usr/bin/env bash
# Build adverse and run the main job on the bundled demo inputs.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cmake >/dev/null 2>&1 || { [ "$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake >/dev/null; }
cargo build --release -p adverse --bin adverse
./target/release/adverse inspect --include "*.dcm" pipelines/samples
