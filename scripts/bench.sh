#!/usr/bin/env bash
# Runs the benchmarks in bench/ after doing the one setup (scripts/setup.sh); root, like the
# probe itself. Each writes its figures to bench/results/<name>.json as well; every argument
# goes to each benchmark, e.g.
#   scripts/bench.sh                       # full run (~3 min each; agent_cost.py ~25 min,
#                                          #   agent_soak.py's soak of the agent ~21 min)
#   scripts/bench.sh --quick               # a smoke run
# Run nothing else meanwhile: the benchmarks measure CPU time and see every other BPF program.
# A benchmark is any bench/*.py with a main; see bench/README.md for what they measure.
# Each benchmark runs in a process group of its own, so whatever it starts (servers, load
# generators, forked workers) is stopped with it when this script ends, however it ends.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh"
cd "$ROOT"
# what only the benchmarks need (the rivals of the offline correlation: pandas, polars)
"$ROOT/.venv/bin/python" -m pip install -q --disable-pip-version-check -e ".[test,bench]"

group=""   # the process group (= pid) of the benchmark running now
stop_group() {
    [ -n "$group" ] || return 0
    kill -TERM -- "-$group" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 -- "-$group" 2>/dev/null || break; sleep 0.1; done
    kill -KILL -- "-$group" 2>/dev/null || true
    wait 2>/dev/null || true
    group=""
}
cleanup() { trap - EXIT INT TERM HUP; stop_group; }
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

status=0
for b in bench/*.py; do
    grep -q '^def main' "$b" || continue
    printf '\n== %s\n' "$b"
    mkdir -p bench/results
    # setsid: a job of a shell without job control is no group leader, so setsid does not
    # fork and $! is the new group's id. A job, so that signals reach this shell at once.
    setsid "$ROOT/.venv/bin/python" "$b" "$@" --json "bench/results/$(basename "$b" .py).json" &
    group=$!
    rc=0
    wait "$group" || rc=$?
    stop_group   # anything the benchmark left behind
    if [ "$rc" != 0 ]; then
        status=$rc
        printf 'bench: %s failed (%s)\n' "$b" "$rc" >&2
    fi
done
exit "$status"
