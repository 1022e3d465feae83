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

echo "== building the libtorch GPU training test (feature tch; needs torch 2.13.0, see docs/tch.md)" >&2
# Optional: without the torch venv (or with GEOMX_SKIP_TCH=1) the bundle has no test-tch_gpu and
# gpu-check.sh reports the tch check as skipped.
if [ "${GEOMX_SKIP_TCH:-0}" != 1 ] && tch_env=$(.ci/tch-setup.sh); then
  (
    eval "$tch_env"
    cargo test -p geomx-trainer --features tch --test tch_gpu --no-run --message-format=json
  ) | grep '"kind":\["test"\]' \
    | grep -o '"name":"tch_gpu".*"executable":"[^"]*"' \
    | sed 's/.*"executable":"\([^"]*\)"/\1/' \
    | while read -r exe; do cp "$exe" "$out/bin/test-tch_gpu"; done
  [ -x "$out/bin/test-tch_gpu" ] || { echo "tch_gpu test binary not found" >&2; exit 1; }
else
  echo "skipping the tch GPU test (no torch 2.13.0 venv or GEOMX_SKIP_TCH=1)" >&2
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
  echo "commit: $(git rev-parse HEAD)$(git diff --quiet -- cuda geomx-kernels || echo ' (+ uncommitted changes)')"
  echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -m), $(rustc --version)"
  echo "glibc: built against $(ldd --version 2>/dev/null | head -1 | awk '{print $NF}'), needs" \
    "$(objdump -T "$out"/bin/* 2>/dev/null | grep -o 'GLIBC_[0-9.]*' | sort -Vu | tail -1)"
  echo "files:"
  (cd "$out/bin" && sha256sum ./*)
} > "$out/MANIFEST"
cat "$out/MANIFEST"
du -sh "$out"
