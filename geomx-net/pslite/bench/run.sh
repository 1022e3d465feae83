#!/usr/bin/env bash
# Builds bench/pslite_bench.cc against geomx-pslite (and against ps-lite when PSLITE_DIR points
# to a built ps-lite checkout: include/ and build/libps.a, linked with -lzmq -lprotobuf) and runs
# it as a 1-server, 1-worker job on loopback at 4 KiB, 1 MiB and 64 MiB. Prints each RESULT line
# and, with ps-lite, the geomx / ps-lite ratio of goodput. Usage: bench/run.sh (from anywhere).
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
for spec in 4096:2000 1048576:200 67108864:10; do
  for impl in "${impls[@]}"; do run "$impl" "${spec%%:*}" "${spec##*:}"; done
done | tee "$work/results"
if [ "${#impls[@]}" -eq 2 ]; then
  echo "ratio (geomx goodput / ps-lite goodput):"
  awk '/^RESULT/ { for (i = 2; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = kv[2] }
         g[f["impl"] " " f["op"] " " f["bytes"]] = f["goodput_GBps"]; k[f["op"] " " f["bytes"]] = 1 }
       END { for (x in k) if (g["pslite " x] > 0) printf "  %s: %.2fx\n", x, g["geomx " x] / g["pslite " x] }' \
    "$work/results" | sort
fi
