#!/usr/bin/env bash
# Creates (or reuses) the cached Python virtual environment with PyTorch 2.13.0 that the `tch`
# feature of geomx-trainer builds and runs against, and prints the environment exports for it.
#
#   eval "$(.ci/tch-setup.sh)"
#   cargo test -p geomx-trainer --features tch ...
#
# torch 2.13.0 is the libtorch that tch 0.26 binds; its Linux wheel (about 2.7 GB with its CUDA
# dependencies) is a CUDA 13 build that also runs on machines without a GPU. The venv lives in
# $GEOMX_TORCH_VENV (default $HOME/.cache/geomx/torch-2.13.0) and is installed only when absent
# or broken. Progress goes to stderr; stdout carries only the exports.
set -euo pipefail

want=2.13.0
venv=${GEOMX_TORCH_VENV:-$HOME/.cache/geomx/torch-$want}
py=$venv/bin/python

has_torch() {
  [ -x "$py" ] && "$py" - "$want" <<'PY' >/dev/null 2>&1
import sys, torch
sys.exit(0 if torch.__version__.split("+")[0] == sys.argv[1] else 1)
PY
}

if has_torch; then
  echo "tch-setup: reusing torch $want in $venv" >&2
else
  echo "tch-setup: installing torch==$want into $venv (about 2.7 GB)" >&2
  mkdir -p "$(dirname "$venv")"
  [ -x "$py" ] || python3 -m venv "$venv" >&2
  "$py" -m pip install --quiet --disable-pip-version-check --no-cache-dir "torch==$want" >&2
  if ! has_torch; then
    echo "tch-setup: torch $want is not importable from $venv after the install" >&2
    exit 1
  fi
fi

# torch-sys (LIBTORCH_USE_PYTORCH) asks `python` (with VIRTUAL_ENV set) for torch's headers and
# libraries; geomx-trainer's build.rs asks PYTHON_SYS_EXECUTABLE for the lib folder it writes
# into the binaries' rpath, so they run without LD_LIBRARY_PATH.
cat <<EXPORTS
export LIBTORCH_USE_PYTORCH=1
export VIRTUAL_ENV=$venv
export PYTHON_SYS_EXECUTABLE=$py
export PATH=$venv/bin:\$PATH
EXPORTS
