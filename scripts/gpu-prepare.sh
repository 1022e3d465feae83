#!/usr/bin/env bash
# Builds the CUDA test binaries, the GPU benchmark and the libtorch GPU training test HERE (a
# machine with Rust but no GPU) and copies the x86-64 executables into .gpu-bundle/ (git-ignored) with a manifest, for
# scripts/gpu-check.sh to run on a GPU machine that has no Rust toolchain. See docs/gpu.md.
set -euo pipefail
cd "$(dirname "$0")/.."

out=.gpu-bundle
rm -rf "$out"
mkdir -p "$out/bin"

echo "== building CUDA test binaries (cargo test -p geomx-kernels --features cuda --no-run)" >&2
# The JSON messages name every test executable; keep the cuda_* integration tests.
cargo test -p geomx-kernels --features cuda --no-run --message-format=json \
  | grep '"kind":\["test"\]' \
  | grep -o '"name":"cuda_[a-z_]*".*"executable":"[^"]*"' \
  | sed 's/.*"executable":"\([^"]*\)"/\1/' \
  | while read -r exe; do
      name=$(basename "$exe" | sed 's/-[0-9a-f]*$//')
      cp "$exe" "$out/bin/test-$name"
    done

echo "== building the GPU benchmark (release)" >&2
cargo build --release -p geomx-kernels --features cuda --example gpu_bench
cp target/release/examples/gpu_bench "$out/bin/gpu_bench"

# The test must link the libtorch of the GPU machine's python3 torch. GEOMX_GPU_TORCH names that
# version (default 2.13.0, the one tch 0.26 binds, from .ci/tch-setup.sh). Another version is
# installed here from PyPI (with its CUDA dependencies, about 2.7 GB, cached in
# $HOME/.cache/geomx/torch-<version>) and the test is built against it in target/torch-<version>,
# with tch's version check bypassed and a copy of torch-sys whose wrappers of operators missing
# from that libtorch are stubbed (scripts/torch-sys-compat.py; 15 stubs for 2.11.0, none used by
# geomx). Cargo.lock is restored afterwards: the patch is only for this build.
gpu_torch=${GEOMX_GPU_TORCH:-2.13.0}
echo "== building the libtorch GPU training test (feature tch, libtorch $gpu_torch; docs/tch.md)" >&2
# Optional: without torch (or with GEOMX_SKIP_TCH=1) the bundle has no test-tch_gpu and
# gpu-check.sh reports the tch check as skipped.
tch_env=""
cargo_extra=()
if [ "${GEOMX_SKIP_TCH:-0}" = 1 ]; then
  :
elif [ "$gpu_torch" = 2.13.0 ]; then
  tch_env=$(.ci/tch-setup.sh) || tch_env=""
else
  venv=$HOME/.cache/geomx/torch-$gpu_torch
  if ! "$venv/bin/python" -c 'import sys,torch; sys.exit(torch.__version__.split("+")[0] != sys.argv[1])' "$gpu_torch" 2>/dev/null; then
    python3 -m venv "$venv" >&2
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-cache-dir "torch==$gpu_torch" >&2
  fi
  tch_env="export LIBTORCH_USE_PYTORCH=1 VIRTUAL_ENV=$venv PYTHON_SYS_EXECUTABLE=$venv/bin/python"
  tch_env+=" PATH=$venv/bin:\$PATH LIBTORCH_BYPASS_VERSION_CHECK=1 CARGO_TARGET_DIR=target/torch-$gpu_torch"
  tsys=$(cargo metadata --format-version 1 --all-features \
    | python3 -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"]=="torch-sys"))')
  compat=$PWD/target/torch-$gpu_torch/torch-sys-compat
  python3 scripts/torch-sys-compat.py "$(dirname "$tsys")" "$compat" "$venv/bin/python"
  cargo_extra=(--config "patch.crates-io.torch-sys.path=\"$compat\"")
  cp Cargo.lock "$out/Cargo.lock.orig"
fi
if [ -n "$tch_env" ]; then
  (
    eval "$tch_env"
    # Release: the worker's host work (the stand-in server's SGD, the copies into page-locked
    # memory) is timed against libtorch's optimised kernels, as a deployment builds it.
    cargo test ${cargo_extra[@]+"${cargo_extra[@]}"} -p geomx-trainer --features tch --test tch_gpu \
      --release --no-run --message-format=json
  ) | grep '"kind":\["test"\]' \
    | grep -o '"name":"tch_gpu".*"executable":"[^"]*"' \
    | sed 's/.*"executable":"\([^"]*\)"/\1/' \
    | while read -r exe; do cp "$exe" "$out/bin/test-tch_gpu"; done
  if [ -f "$out/Cargo.lock.orig" ]; then mv "$out/Cargo.lock.orig" Cargo.lock; fi
  [ -x "$out/bin/test-tch_gpu" ] || { echo "tch_gpu test binary not found" >&2; exit 1; }
  echo "$gpu_torch" > "$out/TORCH_VERSION"
else
  echo "skipping the tch GPU test (no torch $gpu_torch or GEOMX_SKIP_TCH=1)" >&2
fi

# Debug info is not needed on the GPU machine (symbols stay for backtraces); keeps the bundle small.
if command -v strip >/dev/null 2>&1; then
  strip --strip-debug "$out"/bin/*
fi

n_tests=$(find "$out/bin" -name 'test-cuda_*' | wc -l)
if [ "$n_tests" -eq 0 ]; then
  echo "no cuda_* test binaries found" >&2
  exit 1
fi

{
  echo "# geomx GPU bundle: run scripts/gpu-check.sh on the GPU machine"
  echo "libtorch: $(cat "$out/TORCH_VERSION" 2>/dev/null || echo none)"
  echo "commit: $(git rev-parse HEAD)$(git diff --quiet -- cuda geomx-kernels || echo ' (+ uncommitted changes)')"
  echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -m), $(rustc --version)"
  echo "glibc: built against $(ldd --version 2>/dev/null | head -1 | awk '{print $NF}'), needs" \
    "$(objdump -T "$out"/bin/* 2>/dev/null | grep -o 'GLIBC_[0-9.]*' | sort -Vu | tail -1)"
  echo "files:"
  (cd "$out/bin" && sha256sum ./*)
} > "$out/MANIFEST"
cat "$out/MANIFEST"
du -sh "$out"
