#!/usr/bin/env bash
# Runs the benchmarks in bench/ after doing the one setup (scripts/setup.sh); root, like the
# probe itself. Each writes its figures to bench/results/<name>.json as well; every argument
# goes to each benchmark, e.g.
#   scripts/bench.sh                       # full run (~3 min each)
#   scripts/bench.sh --quick               # a smoke run
# Run nothing else meanwhile: the benchmarks measure CPU time and see every other BPF program.
# A benchmark is any bench/*.py with a main; see bench/README.md for what they measure.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh"
cd "$ROOT"
status=0
for b in bench/*.py; do
    grep -q '^def main' "$b" || continue
    printf '\n== %s\n' "$b"
    mkdir -p bench/results
    "$ROOT/.venv/bin/python" "$b" "$@" --json "bench/results/$(basename "$b" .py).json" || { status=$?; printf 'bench: %s failed (%s)\n' "$b" "$status" >&2; }
done
exit "$status"
