#!/usr/bin/env bash
# Runs the benchmarks in bench/ after doing the one setup (scripts/setup.sh); root, like the
# probe itself. Every argument goes to each benchmark, e.g.
#   scripts/bench.sh                       # full run (water_overhead: ~3 min)
#   scripts/bench.sh --quick               # a smoke run
#   scripts/bench.sh --json bench/results/run.json
# A benchmark is any bench/*.py with a main; see bench/README.md for what they measure.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh"
cd "$ROOT"
status=0
for b in bench/*.py; do
    grep -q '^def main' "$b" || continue
    printf '\n== %s\n' "$b"
    "$ROOT/.venv/bin/python" "$b" "$@" || { status=$?; printf 'bench: %s failed (%s)\n' "$b" "$status" >&2; }
done
exit "$status"
