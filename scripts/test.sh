#!/usr/bin/env bash
# The whole test suite, from a fresh Debian 12 machine: installs what is missing (apt packages when
# root, the Python oracle venv), then checks formatting and lints and runs every test.
# Usage: scripts/test.sh            (CI calls exactly this through .ci/run)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

# --- system packages: cmake (JPEG-LS codec build), lavapipe (the Vulkan adapter GPU tests use),
# chromium (the report test) ---
need=()
command -v cmake >/dev/null 2>&1 || need+=(cmake)
command -v c++ >/dev/null 2>&1 || need+=(g++)
ls /usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1 || need+=(mesa-vulkan-drivers)
ldconfig -p 2>/dev/null | grep 'libvulkan.so.1' >/dev/null || need+=(libvulkan1)  # no -q: with pipefail an early-exiting grep fails the pipe
# headless Chromium: the HTML report test opens the page in a real browser
[ -x /usr/bin/chromium ] || [ -n "${ADVERSE_CHROMIUM:-}" ] || need+=(chromium)
if ((${#need[@]})); then
  if [ "$(id -u)" = 0 ]; then
    echo "test.sh: installing ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    apt-get clean  # the downloaded .deb files (Chromium's are large) are not needed again
  else
    echo "test.sh: missing system packages: ${need[*]} (run as root or install them)" >&2
    exit 2
  fi
fi

# --- Python oracles (pydicom, onnxruntime, onnx): test-only, in a venv ---
if ! .venv/bin/python -c 'import pydicom, numpy, onnx, onnxruntime, scipy, skimage, PIL' >/dev/null 2>&1; then
  echo "test.sh: creating the oracle venv (.venv)"
  python3 -m venv .venv
  .venv/bin/pip install -q --no-cache-dir --upgrade pip
  .venv/bin/pip install -q --no-cache-dir -r scripts/requirements-oracle.txt
fi
export ADVERSE_PYTHON="$root/.venv/bin/python"

# --- Rust checks and tests ---
# Disk: CI machines may have little free space. Incremental caches (1.4 GB for this workspace) only
# pay off on rebuilds, which a one-shot run never does, so they are off here; the free space is
# printed before and after so a failure for lack of it is easy to recognise.
export CARGO_INCREMENTAL=0
free_disk() { df -h . | awk -v when="$1" 'NR==2 {print "test.sh: disk " when ": " $4 " free"}'; }
free_disk "before the build"
trap 'free_disk "at the end"; du -sh target 2>/dev/null | sed "s/^/test.sh: build output: /"' EXIT
cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
# --all-targets: the same feature resolution as `cargo test` (dev-dependencies on), so the test
# run below reuses these artifacts instead of rebuilding half the dependency tree.
cargo build --workspace --all-targets
cargo test --workspace --no-fail-fast
