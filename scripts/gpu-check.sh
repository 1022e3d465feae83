#!/usr/bin/env bash
# Runs on the GPU machine (no Rust, no registry; CUDA driver, nvcc and python3 with torch):
# locates libcuda / libnvrtc, runs the CUDA test binaries and the GPU benchmark built by
# scripts/gpu-prepare.sh (in .gpu-bundle/), trains the libtorch CNN with GPU-resident compression
# (test-tch_gpu, when built and libtorch 2.13.0 is there), times torch.topk and torch casts on the
# same sizes, and prints ONE JSON summary line on stdout (progress goes to stderr). Budget: < 8
# minutes on one H200. See docs/gpu.md and docs/tch.md.
set -uo pipefail
cd "$(dirname "$0")/.."

bundle=.gpu-bundle
# GEOMX_GPU_CHECK_LOGS keeps every log there (written as the check goes, so a run cut short still
# leaves them); otherwise they go to a temporary folder removed at exit.
if [ -n "${GEOMX_GPU_CHECK_LOGS:-}" ]; then
  work=$GEOMX_GPU_CHECK_LOGS
  mkdir -p "$work"
else
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
fi
log() { echo "[gpu-check] $*" >&2; }

if [ ! -x "$bundle/bin/gpu_bench" ]; then
  echo '{"error":"no .gpu-bundle/bin/gpu_bench: run scripts/gpu-prepare.sh first"}'
  exit 2
fi

# ---- 1. libraries -------------------------------------------------------------------------
# cudarc dlopens libcuda.so / libcuda.so.1 and libnvrtc.so / libnvrtc.so.{13,12,...}.
libdirs=()
torch_dir=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))' 2>/dev/null || true)
for d in /usr/local/cuda/lib64 /usr/local/cuda-*/lib64 /usr/local/cuda*/targets/x86_64-linux/lib; do
  [ -d "$d" ] && libdirs+=("$d")
done
if [ -n "$torch_dir" ]; then
  site=$(dirname "$torch_dir")
  for d in "$torch_dir/lib" "$site"/nvidia/*/lib; do
    [ -d "$d" ] && libdirs+=("$d")
  done
fi
nvrtc=""
for d in ${libdirs[@]+"${libdirs[@]}"}; do
  f=$(ls "$d"/libnvrtc.so* 2>/dev/null | grep -v builtins | grep -v '\.alt\.' | head -1)
  if [ -n "$f" ]; then nvrtc=$f; break; fi
done
if [ -z "$nvrtc" ]; then
  # torch may ship it under a hashed name (libnvrtc-<hash>.so.N): expose it as libnvrtc.so.
  for d in ${libdirs[@]+"${libdirs[@]}"}; do
    f=$(ls "$d"/libnvrtc-*.so* 2>/dev/null | grep -v builtins | head -1)
    if [ -n "$f" ]; then nvrtc=$f; ln -s "$f" "$work/libnvrtc.so"; break; fi
  done
fi
libcuda=$( (ldconfig -p 2>/dev/null | grep -o '/[^ ]*libcuda\.so\.1$' | head -1) || true)
if [ -z "$libcuda" ]; then
  libcuda=$(ls /usr/lib/x86_64-linux-gnu/libcuda.so* /usr/lib64/libcuda.so* 2>/dev/null | head -1)
fi
ldpath="$work"
[ -n "$nvrtc" ] && ldpath="$ldpath:$(dirname "$nvrtc")"
[ -n "$libcuda" ] && ldpath="$ldpath:$(dirname "$libcuda")"
export LD_LIBRARY_PATH="$ldpath${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
log "libcuda: ${libcuda:-not found}; libnvrtc: ${nvrtc:-not found}"
gpu_info=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)
log "gpu: ${gpu_info:-nvidia-smi unavailable}"

# ---- 2. test binaries -----------------------------------------------------------------------
tests_json="{"
first=1
# cuda_nvrtc runs twice: NVRTC (12.9+) caches compiled programs across processes, and the second
# run checks that ptxas still reports every kernel then (a cached program once came without one).
for exe in "$bundle"/bin/test-cuda_* "$bundle"/bin/test-cuda_nvrtc; do
  name=$(basename "$exe" | sed 's/^test-//')
  case ",$tests_json" in *"\"$name\":"*) name="${name}_again" ;; esac
  log "running $name"
  start=$(date +%s)
  timeout 240 "$exe" --test-threads=4 --nocapture >"$work/$name.out" 2>&1
  rc=$?
  secs=$(( $(date +%s) - start ))
  passed=$(grep -o '[0-9]* passed' "$work/$name.out" | awk '{s+=$1} END {print s+0}')
  failed=$(grep -o '[0-9]* failed' "$work/$name.out" | awk '{s+=$1} END {print s+0}')
  skipped=$(grep -c '^skipping' "$work/$name.out")
  failures=$(grep -E '^(---- |thread .* panicked)' "$work/$name.out" | head -5 | tr '"\\' "'/" | tr '\n' ';')
  tail -n 30 "$work/$name.out" >&2
  [ $first -eq 1 ] || tests_json+=","
  first=0
  tests_json+="\"$name\":{\"rc\":$rc,\"passed\":$passed,\"failed\":$failed,\"skipped\":$skipped,\"seconds\":$secs,\"failures\":\"$failures\"}"
done
tests_json+="}"

# ---- 3. our benchmark -------------------------------------------------------------------------
log "running gpu_bench"
bench_json=$(timeout 180 "$bundle/bin/gpu_bench" 2>"$work/bench.err" | tail -1)
brc=$?
[ -n "$bench_json" ] || bench_json="{\"error\":\"gpu_bench printed nothing (rc $brc)\"}"
tail -n 5 "$work/bench.err" >&2

# ---- 4. the libtorch CNN trained on the GPU with GPU-resident compression (feature tch) -------
# test-tch_gpu links the libtorch version in .gpu-bundle/TORCH_VERSION (GEOMX_GPU_TORCH of
# gpu-prepare.sh): take GEOMX_LIBTORCH_LIB, else python3's torch when it is that version; otherwise
# the check is reported as skipped with the reason.
want_torch=$(cat "$bundle/TORCH_VERSION" 2>/dev/null || echo 2.13.0)
tch_json='{"skipped":"no .gpu-bundle/bin/test-tch_gpu (gpu-prepare.sh ran without torch)"}'
if [ -x "$bundle/bin/test-tch_gpu" ]; then
  tlib=${GEOMX_LIBTORCH_LIB:-}
  if [ -z "$tlib" ]; then
    tver=$(python3 -c 'import torch;print(torch.__version__.split("+")[0])' 2>/dev/null || true)
    if [ "$tver" = "$want_torch" ] && [ -n "$torch_dir" ]; then
      tlib="$torch_dir/lib"
    else
      tch_json="{\"skipped\":\"needs libtorch $want_torch; python3 has torch ${tver:-none} (rebuild with GEOMX_GPU_TORCH=${tver:-...} scripts/gpu-prepare.sh, or set GEOMX_LIBTORCH_LIB)\"}"
    fi
  fi
  if [ -n "$tlib" ]; then
    log "running test-tch_gpu (libtorch in $tlib)"
    LD_LIBRARY_PATH="$tlib:$LD_LIBRARY_PATH" GEOMX_TCH_GPU_STEPS="${GEOMX_TCH_GPU_STEPS:-50}" \
      GEOMX_TCH_GPU_PRECISIONS="${GEOMX_TCH_GPU_PRECISIONS:-fp32,bf16,fp16-amp}" \
      timeout 240 "$bundle/bin/test-tch_gpu" --nocapture --test-threads=1 >"$work/tch.out" 2>&1
    trc=$?
    tail -n 20 "$work/tch.out" >&2
    # libtest may print a test's output on the line of its name: match anywhere in the line.
    runs=$(grep -o 'GPU_TRAIN {.*}' "$work/tch.out" | sed 's/^GPU_TRAIN //' | paste -sd, -)
    plain=$(grep -o 'GPU_PLAIN {.*}' "$work/tch.out" | sed 's/^GPU_PLAIN //' | paste -sd, -)
    tskip=$(grep -o -m1 'skipped: .*' "$work/tch.out" | tr '"\\' "'/" || true)
    tpass=$(grep -c 'test result: ok' "$work/tch.out")
    preload=$(grep -o -m1 'GPU_PRELOAD_CHECK .*' "$work/tch.out" | tr '"\\' "'/" || true)
    wsparse=$(grep -o -m1 'GPU_WORKER_SPARSE .*' "$work/tch.out" | tr '"\\' "'/" || true)
    staged=$(grep -o -m1 'GPU_STAGED_BATCH_CHECK .*' "$work/tch.out" | tr '"\\' "'/" || true)
    tch_json="{\"rc\":$trc,\"passed\":$tpass,\"skipped\":\"$tskip\",\"preload_check\":\"$preload\",\"worker_sparse_check\":\"$wsparse\",\"staged_batch_check\":\"$staged\",\"plain\":[${plain}],\"runs\":[${runs}]}"
  fi
fi

# ---- 5. torch on the same sizes, then the summary -----------------------------------------------
log "running torch comparison"
TCH_JSON="$tch_json" BENCH_JSON="$bench_json" TESTS_JSON="$tests_json" GPU_INFO="$gpu_info" LIBCUDA="$libcuda" NVRTC="$nvrtc" \
timeout 150 python3 - <<'PY'
import json, os

def load(name):
    try:
        return json.loads(os.environ[name])
    except Exception as e:
        return {"error": f"unparsable {name}: {e}", "raw": os.environ.get(name, "")[:500]}

summary = {
    "gpu": os.environ.get("GPU_INFO", ""),
    "libcuda": os.environ.get("LIBCUDA", ""),
    "libnvrtc": os.environ.get("NVRTC", ""),
    "tests": load("TESTS_JSON"),
    "geomx": load("BENCH_JSON"),
    "tch": load("TCH_JSON"),
}
torch_res = {}
try:
    import torch
    dev = torch.device("cuda")
    n_topk = summary["geomx"].get("topk", {}).get("n", 100_000_000)
    k = summary["geomx"].get("topk", {}).get("k", 1_000_000)
    iters = 20

    def time_ms(fn):
        fn()
        torch.cuda.synchronize()
        ts = []
        for _ in range(iters):
            a = torch.cuda.Event(enable_timing=True)
            b = torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            ts.append(a.elapsed_time(b))
        ts.sort()
        return {"ms_median": round(ts[len(ts) // 2], 4), "ms_min": round(ts[0], 4)}

    x = torch.rand(n_topk, device=dev) * 2 - 1
    ax = x.abs()
    torch_res["topk_abs_precomputed"] = time_ms(lambda: torch.topk(ax, k, sorted=False))
    torch_res["topk_including_abs"] = time_ms(lambda: torch.topk(x.abs(), k, sorted=False))
    del x, ax
    n_cast = 1 << 28  # 1 GiB of f32
    y = torch.rand(n_cast, device=dev)
    t = time_ms(lambda: y.half())
    t["gbs"] = round(n_cast * 6 / (t["ms_median"] * 1e-3) / 1e9, 1)
    torch_res["cast_f32_to_f16"] = t
    torch_res["version"] = torch.__version__
except Exception as e:  # torch missing or failing: still print the summary
    torch_res["error"] = str(e)
summary["torch"] = torch_res

g = summary["geomx"]
targets = {}
try:
    targets["cast_hbm_fraction"] = g["cast"]["f32_to_f16"]["hbm_fraction"]
    targets["cast_ge_70pct_hbm"] = targets["cast_hbm_fraction"] >= 0.70
except Exception:
    pass
try:
    ours = g["topk"]["ms_median"]
    theirs = torch_res["topk_abs_precomputed"]["ms_median"]
    targets["topk_ms_geomx"] = ours
    targets["topk_ms_torch"] = theirs
    targets["topk_faster_than_torch"] = ours < theirs
except Exception:
    pass
tests = summary["tests"]
targets["tests_all_passed"] = bool(tests) and all(
    isinstance(v, dict) and v.get("rc") == 0 and v.get("failed") == 0 and v.get("skipped") == 0
    for v in tests.values()
)
tch = summary["tch"]
try:
    if tch.get("runs"):
        targets["tch_gpu_trained"] = tch.get("rc") == 0 and tch.get("passed", 0) > 0
        per_arch = {}
        # One entry per architecture and precision ("ResNet18/bf16"); the worker's runs with
        # model.overlap off are suffixed "_nooverlap".
        key = lambda r: r["arch"] + "/" + r.get("precision", "fp32")
        for p in tch.get("plain", []):
            per_arch.setdefault(key(p), {}).setdefault("plain_ms", []).append(
                round(p["run"]["step_ms_median"], 3))
        for r in tch["runs"]:
            a = per_arch.setdefault(key(r), {})
            codec = r["run"]["options"]["codec"]["codec"]
            if not r.get("overlap", True):
                codec += "_nooverlap"
            run = r["run"]
            a[codec + "_ms"] = round(run["step_ms_median"], 3)
            a[codec + "_encode_copy_fraction"] = round(run["compress_fraction"], 4)
            for part in ("load", "compute", "encode", "copy", "update", "preload"):
                if part + "_ms_median" in run:
                    a[codec + "_" + part + "_ms"] = round(run[part + "_ms_median"], 3)
            if "encode_ms_median" in run:
                # Encoding on the device as a share of the same step (target for FP16: <= 5 %).
                a[codec + "_encode_fraction"] = round(
                    run["encode_ms_median"] / max(run["step_ms_median"], 1e-9), 4)
        for a in per_arch.values():
            if a.get("plain_ms") and a.get("dense_ms"):
                plain_ms = sum(a["plain_ms"]) / len(a["plain_ms"])
                # Throughput of the geomx worker's whole step relative to the plain loop (target
                # >= 0.9). Dense pushes run the stand-in server's update and the preloads inside
                # the backward pass, so the step includes them: nothing is subtracted.
                a["dense_throughput_vs_plain"] = round(plain_ms / a["dense_ms"], 3)
                if a.get("dense_nooverlap_ms"):
                    a["dense_nooverlap_throughput_vs_plain"] = round(
                        plain_ms / a["dense_nooverlap_ms"], 3)
        targets["tch"] = per_arch
except Exception as e:
    targets["tch_error"] = str(e)
summary["targets"] = targets
print(json.dumps(summary, separators=(",", ":")))
PY
