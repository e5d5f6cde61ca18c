# Sourced by the scripts that need a heavy tool from PyPI (MKL, the CUDA toolkit, vLLM,
# llama.cpp): one Python venv per tool and version, cached outside the repository so that a
# fresh clone (or CI on a machine that already ran once) reuses it, and a new version gets a
# venv of its own instead of upgrading a shared one.
#
#   llamavid_tool_venv NAME VERSION    sets llamavid_venv to the venv's directory, creating
#                                      it (empty) if needed; python3 with venv and pip needed,
#                                      PYTHON overrides the interpreter.
#   llamavid_venv_ready                true when the venv's install finished before
#   llamavid_venv_mark_ready           records that the install finished
#
# The cache root is $LLAMAVID_TOOL_CACHE, else $XDG_CACHE_HOME/gst-llamavid, else
# ~/.cache/gst-llamavid. Delete a tool's folder there to reinstall it.

llamavid_tool_cache="${LLAMAVID_TOOL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/gst-llamavid}"

llamavid_tool_venv() {
    llamavid_venv="$llamavid_tool_cache/$1-$2"
    if [ ! -x "$llamavid_venv/bin/python" ]; then
        mkdir -p "$llamavid_tool_cache"
        rm -rf "$llamavid_venv"
        "${PYTHON:-python3}" -m venv "$llamavid_venv"
    fi
}

llamavid_venv_ready() {
    [ -f "$llamavid_venv/.llamavid-installed" ]
}

llamavid_venv_mark_ready() {
    date -u +%FT%TZ >"$llamavid_venv/.llamavid-installed"
}
