#!/usr/bin/env bash
# The PyTorch reference side of the CPU benchmark (plugin/benches/reference/torch_cpu_bench.py):
# the versions LLaMA-VID's reference code pins (torch 2.0.1, transformers 4.31.0, numpy < 2) in
# a venv cached outside the repository (examples/scripts/tool-venv.sh), keyed by torch's
# version, so that a machine installs them once (about 2.5 GB: PyPI's torch 2.0.1 is the CUDA
# 11.7 build, whose CPU code, MKL 2022.2 included, is the one measured; CUDA is never used).
#
#   plugin/scripts/torch-ref-env.sh [BENCH ARGS]   installs if needed, then runs the reference
#                                                   benchmark with BENCH ARGS (--help for them)
#   plugin/scripts/torch-ref-env.sh --check-fixture [DIR]
#                                                   checks the benchmark's model against a
#                                                   reference fixture (check_fixture.py)
#   . plugin/scripts/torch-ref-env.sh               (bash) installs if needed and sets
#                                                   torch_ref_python to the venv's interpreter
#
# Idempotent: a venv whose installed versions already match is used as it is (no network);
# otherwise pip installs the pins into it (pip's PIP_INDEX_URL etc. apply as usual).

# Run as a script: strict mode; sourced: the caller's shell options are left as they are.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    set -euo pipefail
fi

torch_ref_torch_version=2.0.1
torch_ref_pins=("torch==$torch_ref_torch_version" transformers==4.31.0 "numpy<2")

torch_ref_repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# shellcheck source=../../examples/scripts/tool-venv.sh
. "$torch_ref_repo/examples/scripts/tool-venv.sh"

# True when the venv holds exactly the pinned versions (read from the installed packages'
# metadata, without importing torch).
torch_ref_versions_match() {
    "$llamavid_venv/bin/python" - "$torch_ref_torch_version" <<'EOF' >/dev/null 2>&1
import sys
from importlib.metadata import version
torch = version("torch").split("+")[0]
sys.exit(not (torch == sys.argv[1] and version("transformers") == "4.31.0"
              and int(version("numpy").split(".")[0]) < 2))
EOF
}

llamavid_tool_venv torch-ref "$torch_ref_torch_version"
torch_ref_python="$llamavid_venv/bin/python"
if ! { llamavid_venv_ready && torch_ref_versions_match; }; then
    echo "torch-ref-env: installing ${torch_ref_pins[*]} into $llamavid_venv (once per machine)" >&2
    "$torch_ref_python" -m pip install --quiet --disable-pip-version-check "${torch_ref_pins[@]}"
    torch_ref_versions_match || {
        echo "torch-ref-env: $llamavid_venv does not hold ${torch_ref_pins[*]} after pip install" >&2
        exit 1
    }
    llamavid_venv_mark_ready
fi

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    torch_ref_dir="$torch_ref_repo/plugin/benches/reference"
    if [ "${1:-}" = --check-fixture ]; then
        shift
        exec "$torch_ref_python" "$torch_ref_dir/check_fixture.py" "$@"
    fi
    exec "$torch_ref_python" "$torch_ref_dir/torch_cpu_bench.py" "$@"
fi
