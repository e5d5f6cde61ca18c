#!/usr/bin/env bash
# From a fresh clone to timed captions: installs the system packages (as root; otherwise prints
# the apt-get line), builds the plugin, fetches the model from the Hugging Face hub with a
# progress bar (cached, resumed if interrupted), and prints each caption with the span of video
# it describes.
#
#   examples/caption-video.sh [OPTIONS] [VIDEO [PROMPT]]
#
# Without VIDEO it captions a generated 20 s test clip (a moving ball), to see it work at once.
#
# Options:
#   --model ID|DIR         hub id owner/name[@revision] or a local model directory
#                          (default YanweiLi/llama-vid-7b-full-224-video-fps-1)
#   --vision-tower X       EVA-ViT-G weights: a file, an https:// URL or a hub file
#                          owner/name/path (default for hub models: the LAVIS URL)
#   --dtype auto|f32|bf16|int8   default auto; on a CPU without the memory for f32, int8
#   --cuda                 build with CUDA and run on the GPU (needs nvcc and the NVIDIA driver)
#   --max-new-tokens N     longest caption (default 64)
#
# The default model is a download of about 17.9 GB: LLaMA-VID 7B as two bf16 shards (9.98 and
# 5.91 GB), EVA-ViT-G from LAVIS (about 2 GB) and bert-base-uncased's vocabulary. What to expect
# once it is there: see the README, "Speed to expect".
#
# Environment (where files come from and go to, the standard Hugging Face variables): HF_HOME,
# HF_HUB_CACHE, HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE. LLAMAVID_BUILD=debug builds without
# optimisation (tests), LLAMAVID_BUILDDIR the meson build directory (default builddir/),
# LLAMAVID_FETCH a prebuilt llamavid-fetch.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)

model=YanweiLi/llama-vid-7b-full-224-video-fps-1
vision_tower=
dtype=
cuda=false
max_new_tokens=64
positional=()
while [ $# -gt 0 ]; do
  case "$1" in
    --model) model=$2; shift 2 ;;
    --vision-tower) vision_tower=$2; shift 2 ;;
    --dtype) dtype=$2; shift 2 ;;
    --cuda) cuda=true; shift ;;
    --max-new-tokens) max_new_tokens=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --) shift; positional+=("$@"); break ;;
    -*) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
    *) positional+=("$1"); shift ;;
  esac
done
video=${positional[0]:-}
prompt=${positional[1]:-"Describe what is happening in the video."}
if [ -n "$video" ]; then
  [ -f "$video" ] || { echo "no such video file: $video" >&2; exit 2; }
  video=$(realpath "$video")
fi

# shellcheck source=scripts/system-deps.sh
. "$repo/examples/scripts/system-deps.sh"
ensure_system_deps

# The plugin, installed-style into the build directory (`meson install` puts it into
# GStreamer's plugin directory), and the fetch tool.
profile=${LLAMAVID_BUILD:-release}
builddir=${LLAMAVID_BUILDDIR:-$repo/builddir}
if [ -d "$builddir/meson-info" ]; then
  meson configure "$builddir" -Dbuildtype="$profile" -Dcuda="$cuda" >/dev/null
else
  meson setup "$builddir" "$repo" --buildtype="$profile" -Dcuda="$cuda" >/dev/null
fi
echo "==> building the plugin ($profile)" >&2
meson compile -C "$builddir" >&2
export GST_PLUGIN_PATH="$builddir${GST_PLUGIN_PATH:+:$GST_PLUGIN_PATH}"
fetch=${LLAMAVID_FETCH:-}
if [ -z "$fetch" ]; then
  cargo_profile=release
  [ "$profile" = debug ] && cargo_profile=dev
  cargo build --quiet --manifest-path "$repo/Cargo.toml" -p llamavid-examples --bin llamavid-fetch \
    --profile "$cargo_profile"
  fetch="$repo/target/$([ "$cargo_profile" = dev ] && echo debug || echo release)/llamavid-fetch"
fi

# The model: downloaded once into the Hugging Face cache, then read from there.
if [ "$model" = YanweiLi/llama-vid-7b-full-224-video-fps-1 ]; then
  echo "==> the default model is about 17.9 GB to download once (7B LLaMA-VID: 9.98 + 5.91 GB," \
    "EVA-ViT-G about 2 GB), cached in ${HF_HUB_CACHE:-${HF_HOME:-~/.cache/huggingface}}" >&2
fi
echo "==> fetching $model" >&2
fetched=$("$fetch" ${vision_tower:+--vision-tower "$vision_tower"} "$model")
value() { printf '%s\n' "$fetched" | sed -n "s/^$1=//p"; }
model_value=$(value model)
vision_value=$(value vision-tower)
weights_bytes=$(value weights-bytes)

device=auto
if $cuda; then
  device=cuda
elif [ -z "$dtype" ]; then
  # f32 holds every weight in 4 bytes: twice the 16-bit files. Without the memory for that,
  # int8 (about a quarter of f32) is the mode that fits and keeps up on a CPU.
  dtype=auto
  available_kb=$(awk '/^MemAvailable:/ { print $2 }' /proc/meminfo 2>/dev/null || echo 0)
  needed_kb=$(( weights_bytes / 1024 * 2 * 11 / 10 ))
  if [ "${available_kb:-0}" -gt 0 ] && [ "$needed_kb" -gt "$available_kb" ]; then
    dtype=int8
    echo "==> f32 would need about $(( needed_kb / 1048576 + 1 )) GiB of memory," \
      "$(( available_kb / 1048576 )) GiB are available: using dtype=int8 (pass --dtype to choose)" >&2
  fi
fi

if [ -n "$video" ]; then
  source_desc=(uridecodebin "uri=file://$video")
  echo "==> captioning $video" >&2
else
  source_desc=(videotestsrc num-buffers=600 pattern=ball ! "video/x-raw,width=640,height=480,framerate=30/1")
  echo "==> captioning a generated 20 s test clip (pass a video file to caption your own)" >&2
fi

# The pipeline: decode, caption, print each caption with its window. The video goes to a
# fakesink as fast as the model allows (a file is not live: every sampled frame is encoded).
caption=(llamavidcaption name=c "model=$model_value" "prompt=$prompt" "device=$device"
  "max-new-tokens=$max_new_tokens")
[ -n "$vision_value" ] && caption+=("vision-tower=$vision_value")
[ -n "$dtype" ] && caption+=("dtype=$dtype")
started=$(date +%s)
count=0
while read -r start end text; do
  # gst-launch prints strings escaped (\ for punctuation and spaces, octal for UTF-8 bytes).
  text=${text#\"}; text=${text%\"}
  text=$(printf '%s' "$text" | sed -e 's/\\\([^0-7]\)/\1/g' -e 's/\\\([0-7][0-7][0-7]\)/\\0\1/g')
  awk -v s="$start" -v e="$end" 'BEGIN { printf "[%8.2f s .. %8.2f s] ", s / 1e9, e / 1e9 }'
  printf '%b\n' "$text"
  count=$((count + 1))
done < <(gst-launch-1.0 -m "${source_desc[@]}" ! videoconvert ! "${caption[@]}" ! fakesink sync=false \
  c.text_src ! queue ! fakesink sync=false 2>&1 |
  tee >(grep -E '^(ERROR|WARNING)' -A3 >&2) |
  sed -n 's/.*(element): llamavid-caption, text=(string)\(.*\), start=(guint64)\([0-9]*\), end=(guint64)\([0-9]*\),.*/\2 \3 \1/p')
echo "==> $count caption(s) in $(( $(date +%s) - started )) s" >&2
[ "$count" -gt 0 ]
