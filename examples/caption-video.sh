#!/usr/bin/env bash
# Builds gst-llamavid and captions a video file with a LLaMA-VID model directory.
#   examples/caption-video.sh MODEL_DIR VIDEO [PROMPT]
# MODEL_DIR is the checkpoint folder (e.g. llama-vid-7b-full-224-video-fps-1) with the EVA weights
# (model_zoo/LAVIS/eva_vit_g.pth) and bert-base-uncased/ beside it; see the README.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
if [ $# -lt 2 ]; then
  echo "usage: $0 MODEL_DIR VIDEO [PROMPT]" >&2
  exit 2
fi
model=$(realpath "$1")
video=$(realpath "$2")
prompt=${3:-"Describe what is happening in the video."}
# shellcheck source=scripts/system-deps.sh
. "$repo/examples/scripts/system-deps.sh"
ensure_system_deps

# The plugin, installed-style into builddir/ (meson install puts it into GStreamer's plugin dir).
[ -d "$repo/builddir" ] || meson setup "$repo/builddir" "$repo" --buildtype=release
meson compile -C "$repo/builddir"
export GST_PLUGIN_PATH="$repo/builddir${GST_PLUGIN_PATH:+:$GST_PLUGIN_PATH}"

# The pipeline: decode, caption, print each caption with its window; video goes to a fakesink
# as fast as the model allows (a file is not live: every sampled frame is encoded).
gst-launch-1.0 -m \
  uridecodebin uri="file://$video" ! videoconvert ! \
  llamavidcaption model="$model" prompt="$prompt" name=c ! fakesink sync=false \
  c.text_src ! queue ! fakesink sync=false 2>&1 |
  sed -n 's/.*(element): llamavid-caption, text=(string)\(.*\), start=(guint64)\([0-9]*\), end=(guint64)\([0-9]*\),.*/\2 \3 \1/p' |
  while read -r start end text; do
    # gst-launch prints strings escaped (\ for punctuation and spaces, octal for UTF-8 bytes).
    text=${text#\"}; text=${text%\"}
    text=$(printf '%s' "$text" | sed -e 's/\\\([^0-7]\)/\1/g' -e 's/\\\([0-7][0-7][0-7]\)/\\0\1/g')
    awk -v s="$start" -v e="$end" 'BEGIN { printf "[%8.2f s .. %8.2f s] ", s / 1e9, e / 1e9 }'
    printf '%b\n' "$text"
  done
