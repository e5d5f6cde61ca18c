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
cleanup() {
    if declare -F vllm_server_stop >/dev/null; then vllm_server_stop; fi
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
# The server as check-vllm.sh starts it (vllm-env.sh), with room for the mid-size model.
vllm_server_start "$work/served" llamavid-bench "$port" "$work/server.log" 2048 2
vllm_server_wait_ready "$url" 300 || { tail -30 "$work/server.log" >&2; exit 1; }
cargo bench --quiet -p gst-plugin-llamavid --bench vllm_caption -- --model "$model" \
    --llm-server "$url" --llm-server-model llamavid-bench \
    "$@" || { echo "bench failed; the server's log ends:" >&2; tail -40 "$work/server.log" >&2; exit 1; }
