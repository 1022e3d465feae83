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
impls=(geomx)
if [ -n "${PSLITE_DIR:-}" ] && [ -f "$PSLITE_DIR/build/libps.a" ]; then
  g++ -std=c++11 -O2 -I "$PSLITE_DIR/include" "$here/pslite_bench.cc" "$PSLITE_DIR/build/libps.a" \
    -lzmq -lprotobuf -lpthread -o "$work/pslite"
  impls+=(pslite)
fi
run() { # impl bytes repeats
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
for spec in 4096:2000 1048576:200 67108864:10; do
  for _ in $(seq "$rounds"); do
    for impl in "${impls[@]}"; do run "$impl" "${spec%%:*}" "${spec##*:}"; done
  done
done | tee "$work/results"
# Median latency per (implementation, operation, size) over the rounds; the ratio is ps-lite's
# median latency over geomx's (> 1: geomx is faster).
python3 - "$work/results" <<'PY'
import collections, statistics, sys
lat = collections.defaultdict(list)
for line in open(sys.argv[1]):
    if line.startswith("RESULT "):
        f = dict(x.split("=", 1) for x in line.split()[1:])
        lat[(f["impl"], f["op"], int(f["bytes"]))].append(float(f["latency_us"]))
print("median over %d rounds:" % max(len(v) for v in lat.values()))
print("| size | op | geomx latency | ps-lite latency | ratio |")
print("|---|---|---|---|---|")
for (impl, op, size) in sorted(k for k in lat if k[0] == "geomx"):
    g = statistics.median(lat[(impl, op, size)])
    p = lat.get(("pslite", op, size))
    name = "%d KiB" % (size >> 10) if size < 1 << 20 else "%d MiB" % (size >> 20)
    if p:
        p = statistics.median(p)
        print("| %s | %s | %.1f us | %.1f us | %.2fx |" % (name, op, g, p, p / g))
    else:
        print("| %s | %s | %.1f us | - | - |" % (name, op, g))
PY
