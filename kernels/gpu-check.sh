#!/usr/bin/env bash
# GPU check of the `cuda` feature, for a machine with an NVIDIA GPU and its driver. The CUDA
# toolkit is taken from the PATH or CUDA_HOME (CUDA <= 13.4 for cudarc 0.19); without one, the
# CUDA 13.4 PyPI wheels are installed into a private venv (kernels/cuda-env.sh).
#
#   kernels/gpu-check.sh
#
# Builds the plugin's tests with `--features cuda` in release and runs the ignored `gpu_*`
# tests of plugin/tests/kernel_twins.rs, which
#   * hold the preprocessing kernel to its CPU twin and to the model's ClipPreprocess::pixels:
#     uint8 stage byte-identical, f32 output bit-identical, f16/bf16 equal to the twin's f32
#     rounded (fixture frames in every format; random frames of odd sizes, padded strides,
#     every format, 1080p and portrait; batches equal single frames);
#   * hold the compression kernels to their twin: attention weights and pooled vectors within
#     1e-5 relative (f32), the candle-op path on the GPU within 1e-5, f16 within 1e-3 and bf16
#     within 8e-3 of the twin on the same rounded inputs (fixture tensors and random shapes up
#     to the real model's B=4 Q=32 N=256/576 W=1408);
#   * run the whole model on the GPU in f32 against the CPU: video tokens within 1e-3, greedy ids
#     equal (and equal to the reference's), the frame tokens through the fused kernel within 1e-5
#     of the candle ops, the kernel's pixels within 1e-5 of the reference pixel_values;
#   * run 8 sequences of different lengths together (LlamaVid::step, one forward per step) on
#     the GPU: greedy ids equal to each sequence alone;
#   * time the preprocessing kernel at 1920x1080 NV12 -> 224 (fps, upload included), the fused
#     compression vs the candle ops, per-frame encode, prefill and decode per token, encode per
#     frame and one decode step at batch sizes 1, 8, 32 and 64 (issue 10), and print a table.
#
# Environment: CUDA_COMPUTE_CAP (default: detected with nvidia-smi, else 80), LLAMAVID_FIXTURE
# (model fixture; default ../shared/fixtures/llamavid-tiny-a beside the repository),
# LLAMAVID_BENCH_MODEL (a real checkpoint directory to time instead of the fixture's tiny
# model; its EVA weights and bert-base-uncased resolved as the loader does), LLAMAVID_BENCH_FRAMES
# (frames encoded and prefilled, default 8), CARGO_TARGET_DIR (default <repo>/target-cuda).
# Extra arguments go to the test binary.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target-cuda}"
if [ -z "${CUDA_COMPUTE_CAP:-}" ]; then
    cap="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d '. ' || true)"
    export CUDA_COMPUTE_CAP="${cap:-80}"
fi
if ! command -v nvcc >/dev/null && [ -z "${CUDA_HOME:-}" ]; then
    # No toolkit: the CUDA 13.4 wheels, as kernels/check-cuda-build.sh uses (needs a driver
    # recent enough for CUDA 13.4; with an older driver install the matching toolkit instead).
    echo "nvcc not found: installing the CUDA 13.4 toolkit wheels (kernels/cuda-env.sh)"
    # shellcheck source=kernels/cuda-env.sh
    . "$repo/kernels/cuda-env.sh"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
echo "CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP, target dir $CARGO_TARGET_DIR"

start=$(date +%s)
cargo test --release -p gst-plugin-llamavid --features cuda --test kernel_twins -- \
    --ignored --nocapture --test-threads=1 gpu_ "$@"
# The CPU twins against the model, in the same build.
cargo test --release -p gst-plugin-llamavid --features cuda --test kernel_twins -- --test-threads=2
echo "gpu-check: all passed in $(($(date +%s) - start)) s"
