#!/usr/bin/env bash
# Compile-only check of the `cuda` feature, on a machine without a GPU or a CUDA install.
#
#   kernels/check-cuda-build.sh
#
# 1. Installs nvcc/ptxas and the CUDA 13.4 libraries from PyPI wheels into a private venv
#    (a venv cached outside the repository, examples/scripts/tool-venv.sh); CUDA 13.4 because cudarc 0.19 refuses newer ones.
# 2. Builds a link-time stub of the driver library (libcuda.so.1, which no wheel ships) from the
#    driver API names cudarc's bindings declare, and adds the unversioned .so names the linker
#    looks for. (Steps 1 and 2 are kernels/cuda-env.sh, shared with kernels/gpu-check.sh.)
# 3. Compiles every kernels/cuda/*.cu to PTX and assembles it with ptxas for sm_80 and sm_90
#    (${LLAMAVID_PTXAS_ARCHS:-80 90}), printing registers and spills.
# 4. cargo build of the workspace with the plugin's `cuda` feature (which turns on the kernels
#    crate's), libraries, binaries and the kernel test targets (kernel_twins holds the GPU
#    checks), in ${CARGO_TARGET_DIR:-<repo>/target-cuda}.
#
# Needs python3 (with venv and pip), gcc and cargo; network access to PyPI and crates.io on the
# first run. Nothing is run on a GPU: the built binaries need the NVIDIA driver to start.
# Environment: CUDA_COMPUTE_CAP (default 80) for the PTX the crates embed, CARGO_BUILD_JOBS,
# PYTHON (default python3), LLAMAVID_CUDA_VENV, LLAMAVID_PTXAS_ARCHS, CARGO_TARGET_DIR.
set -euo pipefail

start=$(date +%s)
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
archs="${LLAMAVID_PTXAS_ARCHS:-80 90}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target-cuda}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-80}"

elapsed() { echo $(($(date +%s) - start)); }
step() { printf '\n==> [%4ss] %s\n' "$(elapsed)" "$*"; }

step "CUDA toolkit wheels (cached venv), libcuda link-time stub"
# shellcheck source=kernels/cuda-env.sh
. "$repo/kernels/cuda-env.sh"
summary=("${cuda_env_summary[@]}")

step "Kernels: nvcc -ptx and ptxas for sm_${archs// /, sm_}"
ptx_dir="$CARGO_TARGET_DIR/kernel-check"
mkdir -p "$ptx_dir"
shopt -s nullglob
sources=("$repo"/kernels/cuda/*.cu)
[ ${#sources[@]} -gt 0 ] || { echo "no kernels/cuda/*.cu" >&2; exit 1; }
for src in "${sources[@]}"; do
    name="$(basename "$src" .cu)"
    for arch in $archs; do
        ptx="$ptx_dir/$name.sm_$arch.ptx"
        nvcc -ptx -O3 -std=c++17 --expt-relaxed-constexpr -arch="sm_$arch" -o "$ptx" "$src"
        report="$(ptxas -v -arch="sm_$arch" -o "$ptx_dir/$name.sm_$arch.cubin" "$ptx" 2>&1)"
        entries=$(grep -c "Compiling entry function" <<<"$report" || true)
        regs=$(grep -oE 'Used [0-9]+ registers' <<<"$report" | awk '{ print $2 }' | sort -n | tail -1)
        spills=$(grep -oE '[0-9]+ bytes spill stores' <<<"$report" | awk '{ s += $1 } END { print s + 0 }')
        line="$name.cu sm_$arch: $entries kernels, max $regs registers, $spills bytes spilled"
        echo "$line"
        summary+=("ptxas $line")
    done
done

step "cargo build --workspace --features gst-plugin-llamavid/cuda (CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP)"
cd "$repo"
# One invocation, so that every target shares one feature resolution and candle-core (with its
# nvcc-heavy candle-kernels) is built once: libraries and binaries of every member, the kernels
# crate's tests and the plugin's kernel_twins test (which holds the GPU checks).
# Compile-only, so dependencies are not optimised and nothing carries debug info (the workspace
# profile optimises dependencies for the test runs; that triples rustc's time here).
cargo build --workspace --features gst-plugin-llamavid/cuda \
    --config 'profile.dev.package."*".opt-level=0' --config profile.dev.debug=0 \
    --lib --bins --test kernel_twins --test cpu_twins
summary+=("cargo build --workspace --features gst-plugin-llamavid/cuda (libs, bins, kernel tests): ok")

plugin_so="$CARGO_TARGET_DIR/debug/libgstllamavid.so"
if [ -f "$plugin_so" ] && command -v readelf >/dev/null; then
    needed="$(readelf -d "$plugin_so" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p' | grep -E 'cuda|cublas|curand|nvrtc' | tr '\n' ' ')"
    summary+=("libgstllamavid.so needs at run time: $needed")
fi

printf '\n==> Summary (%ss)\n' "$(elapsed)"
printf '  %s\n' "${summary[@]}"
echo "  OK: the cuda feature compiles and every kernel assembles; GPU execution is checked by kernels/gpu-check.sh"
