# Sourced by plugin/scripts/check-mkl-build.sh (bash, `set -euo pipefail`), or by hand before
# building the `mkl` feature: oneMKL's static libraries from PyPI in a private venv.
#
# * keeps an MKLROOT that already holds lib/libmkl_core.a (a oneAPI install or another venv);
# * else installs the pinned wheels into $LLAMAVID_MKL_VENV, by default a venv cached outside
#   the repository (examples/scripts/tool-venv.sh), and exports MKLROOT there.
#
# The plugin links MKL statically (see plugin/build.rs): nothing is needed at run time.
# Expects `repo` (the repository root) to be set.

mkl_env_wheels=(mkl-static==2026.2.0 mkl-include==2026.2.0)

if [ -n "${MKLROOT:-}" ] && { [ -f "$MKLROOT/lib/libmkl_core.a" ] || [ -f "$MKLROOT/lib/intel64/libmkl_core.a" ]; }; then
    echo "oneMKL from MKLROOT=$MKLROOT"
else
    if [ -n "${LLAMAVID_MKL_VENV:-}" ]; then
        mkl_env_venv="$LLAMAVID_MKL_VENV"
        [ -x "$mkl_env_venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$mkl_env_venv"
    else
        # shellcheck source=../../examples/scripts/tool-venv.sh
        . "$repo/examples/scripts/tool-venv.sh"
        llamavid_tool_venv mkl 2026.2.0
        mkl_env_venv="$llamavid_venv"
    fi
    "$mkl_env_venv/bin/python" -m pip install --quiet --disable-pip-version-check "${mkl_env_wheels[@]}"
    [ -f "$mkl_env_venv/lib/libmkl_core.a" ] || {
        echo "libmkl_core.a not found under $mkl_env_venv/lib" >&2
        exit 1
    }
    export MKLROOT="$mkl_env_venv"
    echo "oneMKL ${mkl_env_wheels[*]} in MKLROOT=$MKLROOT"
fi
