#!/usr/bin/env bash
# Builds and tests the `mkl` feature (oneMKL's AMX bf16/int8 and f32 products, linked
# statically): lints, the CPU kernels against their f64 references (every epilogue, packed
# weights, row blocks), and the model against the reference fixtures through those kernels
# (f32 stages on every path, bf16/int8 within the README's bounds).
#   plugin/scripts/check-mkl-build.sh
# Installs MKL from PyPI into a cached venv unless MKLROOT points at one (plugin/scripts/mkl-env.sh).
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
cd "$repo"
# shellcheck source=mkl-env.sh
. plugin/scripts/mkl-env.sh

cargo clippy -p llamavid-kernels -p gst-plugin-llamavid --all-targets --features mkl -- -D warnings
cargo test -p llamavid-kernels --features mkl --no-fail-fast --lib
cargo test -p gst-plugin-llamavid --features mkl --no-fail-fast \
    --lib --test model_stages --test model_precision --test model_errors --test kernel_twins \
    --test batching
