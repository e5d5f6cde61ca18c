# Sourced by kernels/check-cuda-build.sh and kernels/gpu-check.sh (bash, `set -euo pipefail`):
# a CUDA 13.4 toolkit from PyPI wheels in a private venv, usable for building the `cuda` feature
# without a system CUDA install.
#
# * installs the pinned wheels into $LLAMAVID_CUDA_VENV, by default a venv cached outside the
#   repository (examples/scripts/tool-venv.sh);
# * exports CUDA_HOME, PATH (nvcc, ptxas) and LD_LIBRARY_PATH (cuBLAS, cuRAND, NVRTC, cudart);
# * adds the unversioned .so names the linker looks for (the wheels ship only versioned ones);
# * builds lib/stubs/libcuda.so, a link-time stand-in for the driver library, exporting every
#   driver API function cudarc's bindings declare, with the real library's soname
#   (libcuda.so.1): binaries link against it and load the real driver at run time.
#
# Expects `repo` (the repository root) to be set. Sets `cuda_env_summary` (an array of lines).

# 13.4: the newest toolkit cudarc 0.19.10 accepts.
cuda_env_wheels=(
    nvidia-cuda-nvcc==13.4.92
    nvidia-cuda-crt==13.4.92
    nvidia-nvvm==13.4.92
    nvidia-cuda-runtime==13.4.92
    nvidia-cuda-nvrtc==13.4.92
    nvidia-cublas==13.4.3.11
    nvidia-curand==10.4.5.25
    nvidia-cuda-cccl==13.3.5.0.6
)
cuda_env_summary=()

if [ -n "${LLAMAVID_CUDA_VENV:-}" ]; then
    cuda_env_venv="$LLAMAVID_CUDA_VENV"
    [ -x "$cuda_env_venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$cuda_env_venv"
else
    # shellcheck source=../examples/scripts/tool-venv.sh
    . "$repo/examples/scripts/tool-venv.sh"
    llamavid_tool_venv cuda 13.4.92
    cuda_env_venv="$llamavid_venv"
fi
"$cuda_env_venv/bin/python" -m pip install --quiet --disable-pip-version-check "${cuda_env_wheels[@]}"
cuda_env_site="$("$cuda_env_venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
export CUDA_HOME="$cuda_env_site/nvidia/cu13"
[ -x "$CUDA_HOME/bin/nvcc" ] || { echo "nvcc not found under $CUDA_HOME" >&2; exit 1; }
export PATH="$CUDA_HOME/bin:$PATH"
export LD_LIBRARY_PATH="$CUDA_HOME/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
cuda_env_nvcc="$(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')"
echo "nvcc $cuda_env_nvcc at $CUDA_HOME/bin/nvcc, host compiler gcc $(gcc -dumpfullversion)"
cuda_env_summary+=("toolkit: nvcc $cuda_env_nvcc (PyPI wheels) in $cuda_env_venv")

for cuda_env_lib in cublas cublasLt cudart curand nvrtc; do
    cuda_env_versioned="$(ls "$CUDA_HOME/lib/lib$cuda_env_lib.so."* 2>/dev/null |
        awk '{ print length, $0 }' | sort -n | head -1 | cut -d' ' -f2- || true)"
    [ -n "$cuda_env_versioned" ] || { echo "lib$cuda_env_lib.so.* missing in $CUDA_HOME/lib" >&2; exit 1; }
    ln -sfn "$(basename "$cuda_env_versioned")" "$CUDA_HOME/lib/lib$cuda_env_lib.so"
done

cuda_env_cudarc="$(cd "$repo" && cargo metadata --format-version 1 --features gst-plugin-llamavid/cuda |
    "${PYTHON:-python3}" -c 'import json, os, sys
d = json.load(sys.stdin)
print(os.path.dirname(next(p["manifest_path"] for p in d["packages"] if p["name"] == "cudarc")))')"
cuda_env_stubs="$CUDA_HOME/lib/stubs"
mkdir -p "$cuda_env_stubs"
grep -ohE '^pub unsafe fn cu[A-Za-z0-9_]+' "$cuda_env_cudarc/src/driver/sys/mod.rs" |
    awk '{ print $4 }' | sort -u >"$cuda_env_stubs/libcuda-symbols.txt"
cuda_env_nsyms=$(wc -l <"$cuda_env_stubs/libcuda-symbols.txt")
[ "$cuda_env_nsyms" -gt 100 ] || { echo "found only $cuda_env_nsyms driver symbols in $cuda_env_cudarc" >&2; exit 1; }
awk '{ printf "void %s(void) {}\n", $1 }' "$cuda_env_stubs/libcuda-symbols.txt" >"$cuda_env_stubs/libcuda-stub.c"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$cuda_env_stubs/libcuda.so" "$cuda_env_stubs/libcuda-stub.c"
echo "link-time stub $cuda_env_stubs/libcuda.so: $cuda_env_nsyms symbols from $(basename "$cuda_env_cudarc")"
cuda_env_summary+=("libcuda stub: $cuda_env_nsyms driver symbols from $(basename "$cuda_env_cudarc")")
