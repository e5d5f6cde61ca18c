# Sourced by the scripts: makes sure the system packages gst-llamavid builds and tests with are
# present, installing them when running as root, printing the exact command otherwise.

LLAMAVID_APT_PACKAGES="libgstreamer1.0-dev libgstreamer-plugins-base1.0-dev \
libgstreamer-plugins-bad1.0-dev gstreamer1.0-tools gstreamer1.0-plugins-base \
gstreamer1.0-plugins-good gstreamer1.0-plugins-bad gstreamer1.0-plugins-ugly \
gstreamer1.0-libav gstreamer1.0-x meson ninja-build pkg-config gcc g++ python3-venv \
python3-gi gir1.2-gstreamer-1.0"

llamavid_missing_deps() {
  command -v gst-launch-1.0 >/dev/null && command -v meson >/dev/null && command -v ninja >/dev/null \
    && command -v g++ >/dev/null \
    && pkg-config --exists gstreamer-1.0 gstreamer-video-1.0 gstreamer-check-1.0 gstreamer-app-1.0 \
    && gst-inspect-1.0 textoverlay >/dev/null 2>&1 && gst-inspect-1.0 x264enc >/dev/null 2>&1 \
    && gst-inspect-1.0 matroskamux >/dev/null 2>&1 && gst-inspect-1.0 avdec_h264 >/dev/null 2>&1 \
    && /usr/bin/python3 -c "import gi; gi.require_version('Gst', '1.0'); from gi.repository import Gst" \
      >/dev/null 2>&1 \
    && return 1
  return 0
}

ensure_system_deps() {
  if llamavid_missing_deps; then
    if [ "$(id -u)" = 0 ]; then
      apt-get update
      # shellcheck disable=SC2086
      DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $LLAMAVID_APT_PACKAGES
    else
      echo "Missing system packages. Run:" >&2
      echo "  sudo apt-get update && sudo apt-get install -y --no-install-recommends $LLAMAVID_APT_PACKAGES" >&2
      exit 1
    fi
  fi
  if ! command -v cargo >/dev/null; then
    echo "Rust is missing: install it with rustup (https://rustup.rs), Rust >= 1.92" >&2
    exit 1
  fi
}
