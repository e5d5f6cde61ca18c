#!/usr/bin/env bash
# The vLLM bench line (not a test): caption latency local vs through a local vLLM server, on
# the caption step of shared/bench/cpu-bench.json with the language model of
# gst-tests/vllm/vllm-bench-mid.json (the 1.26B cpu-bench model and its server do not fit in
# memory together on a 24 GiB machine), for 1, 2 and 4 streams at once.
#   gst-tests/vllm/bench.sh [--streams 1,2,4] [--repeats 3] [--threads 2]
# Builds the bench in release, writes the random model, exports its language model, starts the
# server under the benchmark lock and stops it by its process group, also on failure.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"
work=$(mktemp -d "${TMPDIR:-/tmp}/llamavid-vllm-bench.XXXXXX")
server_pid=
cleanup() {
    if [ -n "$server_pid" ]; then
        kill -TERM -- "-$server_pid" 2>/dev/null || true
        sleep 3
        kill -KILL -- "-$server_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# shellcheck source=vllm-env.sh
. gst-tests/vllm/vllm-env.sh
cargo build --quiet --release -p llamavid-examples --bin llamavid-random-model --bin llamavid-export-llm
cargo bench --quiet -p gst-plugin-llamavid --bench vllm_caption --no-run
bin="${CARGO_TARGET_DIR:-$repo/target}/release"
"$bin/llamavid-random-model" --shape gst-tests/vllm/vllm-bench-mid.json --out "$work/model" >/dev/null
model=$(find "$work/model" -name config.json -path '*video*' -printf '%h\n' | head -1)
[ -n "$model" ] || model=$(find "$work/model" -name config.json -printf '%h\n' | head -1)
"$bin/llamavid-export-llm" --model "$model" --out "$work/served" >/dev/null
port=$("$vllm_python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
url="http://127.0.0.1:$port"
exec 9>"${LLAMAVID_BENCH_LOCK:-/tmp/llamavid-bench.lock}"
flock 9
# As in check-vllm.sh: a small KV cache (the default reserves several GiB), and no hub lookups
# (without network they wait for a timeout).
setsid env VLLM_CPU_KVCACHE_SPACE=2 HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 \
    "$vllm_python" -m vllm.entrypoints.openai.api_server \
    --model "$work/served" --served-model-name llamavid-bench \
    --host 127.0.0.1 --port "$port" --enable-prompt-embeds --dtype float32 \
    --max-model-len 2048 --max-num-seqs 8 --enforce-eager >"$work/server.log" 2>&1 &
server_pid=$!
for _ in $(seq 1 300); do
    curl -fsS "$url/health" >/dev/null 2>&1 && break
    kill -0 "$server_pid" 2>/dev/null || { tail -30 "$work/server.log" >&2; exit 1; }
    sleep 1
done
curl -fsS "$url/health" >/dev/null || { echo "server not ready in 300 s" >&2; exit 1; }
cargo bench --quiet -p gst-plugin-llamavid --bench vllm_caption -- --model "$model" \
    --llm-server "$url" --llm-server-model llamavid-bench \
    "$@" || { echo "bench failed; the server's log ends:" >&2; tail -40 "$work/server.log" >&2; exit 1; }
