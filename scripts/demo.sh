#!/usr/bin/env bash
# The main job on a fresh machine: sets up, starts a Go service whose reader is too slow for
# its clients (examples/slowreader fed by examples/loadgen), and runs the live watch on it.
#   sudo scripts/demo.sh              # 30 s live view
#   sudo scripts/demo.sh --json -d 5  # any `otelwater watch` options replace the defaults
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh"
BIN="$ROOT/examples/bin"
work="$(mktemp -d)"
cleanup() { kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT INT TERM

start_server() {  # $1 = log name, rest = slowreader flags; prints "addr pid"
    local out="$work/$1.json"; shift
    "$BIN/slowreader" "$@" >"$out" 2>/dev/null &
    for _ in $(seq 50); do grep -q listening "$out" 2>/dev/null && break; sleep 0.1; done
    echo "$(sed -n 's/.*"listening": *"\([^"]*\)".*/\1/p' "$out" | head -n1)" \
         "$(sed -n 's/.*"pid": *\([0-9]*\).*/\1/p' "$out" | head -n1)"
}
# consumer-lagging: a service that sleeps 5 ms after every 4 KiB read, three clients streaming
read -r lag_addr lag_pid < <(start_server lagging -mode sink -delay 5ms -readsize 4096)
"$BIN/loadgen" -addr "$lag_addr" -conns 3 -size 16384 -mode stream -duration 600s >/dev/null 2>&1 &
# peer-starved: a fast echo service whose two clients pause 20 ms between requests
read -r starve_addr starve_pid < <(start_server starved -mode echo)
"$BIN/loadgen" -addr "$starve_addr" -conns 2 -size 64 -mode pingpong -pause 20ms \
    -duration 600s >/dev/null 2>&1 &

echo "demo: slowreader pid $lag_pid lags behind 3 streaming clients (water stands in its" \
     "queues); slowreader pid $starve_pid waits on 2 slow clients (its reads block)" >&2
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(-d 30)
"$ROOT/.venv/bin/otelwater" watch -p "$lag_pid" -p "$starve_pid" \
    --go-pid "$lag_pid" --go-pid "$starve_pid" "${args[@]}"
