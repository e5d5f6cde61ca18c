#!/usr/bin/env bash
# Regenerates the table of `resize_matches_pillow_bit_for_bit` (plugin/tests/preprocess.rs):
# the FNV-1a hashes of Pillow's bicubic resize of the test's deterministic images.
#   plugin/scripts/pillow-resize-hashes.sh            prints the table (Rust tuples)
#   plugin/scripts/pillow-resize-hashes.sh --check    compares it with the test's, exit 1 if not
# Pillow comes from PyPI into a venv cached outside the repository (examples/scripts/tool-venv.sh),
# at the version the table was made with: 12.2 and later change the 3x1000 case (they filter
# images much taller than wide vertically first).
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
PILLOW_VERSION=10.4.0
# shellcheck source=../../examples/scripts/tool-venv.sh
. "$repo/examples/scripts/tool-venv.sh"
llamavid_tool_venv pillow "$PILLOW_VERSION"
if ! llamavid_venv_ready; then
  "$llamavid_venv/bin/python" -m pip install --quiet "pillow==$PILLOW_VERSION"
  llamavid_venv_mark_ready
fi
table=$("$llamavid_venv/bin/python" "$repo/plugin/tests/scripts/pillow_resize_hashes.py")
if [ "${1:-}" = --check ]; then
  # The test's table: the tuples between `let cases` and the closing `];`.
  ours=$(sed -n '/let cases: \[(usize, usize, usize, usize, u32, u64); [0-9]*\] = \[/,/^    \];/p' \
    "$repo/plugin/tests/preprocess.rs" | grep '^        (')
  if [ "$table" = "$ours" ]; then
    echo "the test's Pillow hashes match Pillow $PILLOW_VERSION"
  else
    echo "the test's Pillow hashes differ from Pillow $PILLOW_VERSION:" >&2
    diff <(echo "$ours") <(echo "$table") >&2 || true
    exit 1
  fi
else
  echo "$table"
fi
