#!/usr/bin/env bash
# The main job on a fresh machine: sets up, starts a Go service whose reader is too slow for
# its clients (examples/slowreader fed by examples/loadgen), and runs the live watch on it.
#   sudo scripts/demo.sh              # 30 s live view
#   sudo scripts/demo.sh --json -d 5  # any `otelwater watch` options replace the defaults
# Everything it starts is stopped when it ends, however it ends (the end of the watch, Ctrl-C,
# SIGTERM, an error): every process is a job of this shell, killed and reaped on exit.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh"
BIN="$ROOT/examples/bin"
work="$(mktemp -d)"
watcher=""
cleanup() {
    trap - EXIT INT TERM HUP
    local pids
    if [ -n "$watcher" ]; then  # the watch first, so it does not see its targets vanish
        kill "$watcher" 2>/dev/null || true
        wait "$watcher" 2>/dev/null || true
    fi
    pids="$(jobs -p)"
    if [ -n "$pids" ]; then
        kill $pids 2>/dev/null || true
        wait $pids 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

# Starts a slowreader as a job of this shell (not in a subshell: cleanup must see it) and sets
# $addr and $pid from its first line. $1 = log name, rest = slowreader flags.
start_server() {
    local out="$work/$1.json"; shift
    "$BIN/slowreader" "$@" >"$out" 2>/dev/null &
    pid=$!
    addr=""
    for _ in $(seq 50); do
        addr="$(sed -n 's/.*"listening": *"\([^"]*\)".*/\1/p' "$out" | head -n1)"
        [ -n "$addr" ] && return 0
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    echo "demo: slowreader $* did not start (see $BIN/slowreader -h)" >&2
    exit 1
}
# consumer-lagging: a service that sleeps 5 ms after every 4 KiB read, three clients streaming
start_server lagging -mode sink -delay 5ms -readsize 4096
lag_addr=$addr lag_pid=$pid
"$BIN/loadgen" -addr "$lag_addr" -conns 3 -size 16384 -mode stream -duration 600s >/dev/null 2>&1 &
# peer-starved: a Go client (loadgen, two connections) whose server answers each request
# 20 ms late (an echo service sleeping after every read): the client's reads wait on its peer
start_server slow_server -mode echo -delay 20ms
"$BIN/loadgen" -addr "$addr" -conns 2 -size 64 -mode pingpong -duration 600s >/dev/null 2>&1 &
starve_pid=$!

echo "demo: slowreader pid $lag_pid lags behind 3 streaming clients (water stands in its" \
     "queues); loadgen pid $starve_pid waits on a slow server (its reads block on the peer)" >&2
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(-d 30)
# A job too, so that a SIGTERM to this script is handled at once (bash runs traps only between
# commands, and `wait` is interruptible where a foreground command is not). otelwater handles
# SIGINT itself (Ctrl-C reaches the whole process group) and stops cleanly on SIGTERM.
"$ROOT/.venv/bin/otelwater" watch -p "$lag_pid" -p "$starve_pid" \
    --go-pid "$lag_pid" --go-pid "$starve_pid" "${args[@]}" &
watcher=$!
status=0
wait "$watcher" || status=$?
exit "$status"
