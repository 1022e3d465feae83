#!/usr/bin/env bash
# Builds bench/pslite_bench.cc against geomx-pslite (and against ps-lite when PSLITE_DIR points
# to a built ps-lite checkout: include/ and build/libps.a, linked with -lzmq -lprotobuf) and runs
# it as a 1-server, 1-worker job on loopback at 4 KiB, 1 MiB and 64 MiB, ROUNDS times (default
# 5) with the implementations alternating. Prints each RESULT line, then the median latencies
# and, with ps-lite, the ratio ps-lite / geomx. Usage: [ROUNDS=N] bench/run.sh (from anywhere).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$root" && cargo build --release -q -p geomx-pslite)
g++ -std=c++11 -O2 -I "$here/../include" "$here/pslite_bench.cc" "$target/release/libgeomx_pslite.a" \
  -lpthread -ldl -lm -o "$work/geomx"
g++ -std=c++11 -O2 "$here/raw_tcp.cc" -o "$work/raw"
impls=(raw geomx)
if [ -n "${PSLITE_DIR:-}" ] && [ -f "$PSLITE_DIR/build/libps.a" ]; then
  g++ -std=c++11 -O2 -I "$PSLITE_DIR/include" "$here/pslite_bench.cc" "$PSLITE_DIR/build/libps.a" \
    -lzmq -lprotobuf -lpthread -o "$work/pslite"
  impls+=(pslite)
fi
run() { # impl bytes repeats
  if [ "$1" = raw ]; then
    timeout 600 "$work/raw" "$2" "$3" | sed "s/^RESULT /RESULT impl=raw /"
    return
  fi
  local port
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  export DMLC_NUM_SERVER=1 DMLC_NUM_WORKER=1 DMLC_PS_ROOT_URI=127.0.0.1 DMLC_PS_ROOT_PORT=$port
  DMLC_ROLE=scheduler "$work/$1" "$2" "$3" >/dev/null &
  DMLC_ROLE=server "$work/$1" "$2" "$3" >/dev/null &
  DMLC_ROLE=worker timeout 600 "$work/$1" "$2" "$3" | sed "s/^RESULT /RESULT impl=$1 /"
  wait
}
# ROUNDS rounds, the implementations alternating within each, so both see the same machine.
rounds=${ROUNDS:-5}
for spec in 4096:5000 1048576:1000 67108864:20; do
  for _ in $(seq "$rounds"); do
    for impl in "${impls[@]}"; do run "$impl" "${spec%%:*}" "${spec##*:}"; done
  done
done | tee "$work/results"
# Median latency per (implementation, operation, size) over the rounds. vs ps-lite: ps-lite's
# median latency over geomx's (> 1: geomx is faster); of raw: raw TCP's over geomx's (the share
# of the loopback floor that geomx reaches; the server's copy of pushed values and the worker's
# copy into its output are in geomx's and ps-lite's times, not in raw's).
python3 - "$work/results" <<'PY'
import collections, statistics, sys
lat = collections.defaultdict(list)
for line in open(sys.argv[1]):
    if line.startswith("RESULT "):
        f = dict(x.split("=", 1) for x in line.split()[1:])
        lat[(f["impl"], f["op"], int(f["bytes"]))].append(float(f["latency_us"]))
print("median over %d rounds:" % max(len(v) for v in lat.values()))
print("| size | op | raw TCP | geomx | ps-lite | geomx vs ps-lite | geomx of raw |")
print("|---|---|---|---|---|---|---|")
med = {k: statistics.median(v) for k, v in lat.items()}
ops = ["push", "pull", "pushpull"]
for size in sorted({k[2] for k in lat}):
    name = "%d KiB" % (size >> 10) if size < 1 << 20 else "%d MiB" % (size >> 20)
    for op in ops:
        g, r, p = (med.get((i, op, size)) for i in ("geomx", "raw", "pslite"))
        if g is None:
            continue
        cell = lambda v: "%.1f us" % v if v is not None else "-"
        ratio = lambda a, b: "%.2fx" % (a / b) if a is not None and b else "-"
        print("| %s | %s | %s | %s | %s | %s | %s |" % (name, op, cell(r), cell(g), cell(p), ratio(p, g), ratio(r, g)))
PY
