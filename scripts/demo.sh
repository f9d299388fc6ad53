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

# a consumer that sleeps 5 ms after every 4 KiB read: ~0.8 MB/s per connection
"$BIN/slowreader" -mode sink -delay 5ms -readsize 4096 >"$work/server.json" 2>/dev/null &
for _ in $(seq 50); do grep -q listening "$work/server.json" 2>/dev/null && break; sleep 0.1; done
addr="$(sed -n 's/.*"listening": *"\([^"]*\)".*/\1/p' "$work/server.json" | head -n1)"
pid="$(sed -n 's/.*"pid": *\([0-9]*\).*/\1/p' "$work/server.json" | head -n1)"
# three clients streaming 16 KiB messages as fast as the server lets them
"$BIN/loadgen" -addr "$addr" -conns 3 -size 16384 -mode stream -duration 600s >/dev/null 2>&1 &

echo "demo: slowreader pid $pid on $addr, 3 clients streaming into it" >&2
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(-d 30)
exec_args=(watch -p "$pid" "${args[@]}")
if "$ROOT/.venv/bin/otelwater" watch --help | grep -q -- "--go-pid"; then
    exec_args+=(--go-pid "$pid")
fi
"$ROOT/.venv/bin/otelwater" "${exec_args[@]}"
