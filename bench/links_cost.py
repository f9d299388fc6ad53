#!/usr/bin/env python3
"""What reading a slow read's request (its goroutine's pprof labels) adds, side by side in one run.

    .venv/bin/python bench/links_cost.py [--rounds N] [--seconds S] [--binary PATH]

Workload: examples/bin/tracedapi as api (every request's handler under pprof labels trace_id
and span_id, calling a tcp-downstream that answers after 2 ms on a pooled connection the
handler reads itself), driven by its own client (16 keep-alive connections, no think time).
Every downstream read is a slow read (>= 1 ms), and the sampler records all of them
(record_rate 0), so each recorded read pays for the labels.

Conditions, alternating within each round on the same processes: GoReadSampler (tracepoint)
on the api with links (the default keys) and without (LinkKeys None: no labels, no start
function read). With the kernel's BPF statistics on (BPF_ENABLE_STATS), the sampler's programs' run_time_ns summed
over the run, divided by the reads it recorded, is the kernel's cost per recorded read; the
difference of the two conditions is what the labels add in the kernel. The reads that are
not recorded run no new code (otw_read_links runs after the record is reserved), so their
cost is bench/goread_cost.py's, unchanged. Python's share: links.decode and the start
function's name per record, timed over the records of the last "links" run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from otelwater.events import links as L            # noqa: E402
from otelwater.events.model import ReadRecord       # noqa: E402
from otelwater.probes.goread import GoReadOptions, GoReadSampler   # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe_parts import enable_stats, prog_stats as probe_prog_stats   # noqa: E402


def start(binary: str, *args: str) -> tuple[subprocess.Popen, dict]:
    p = subprocess.Popen([binary, *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         text=True)
    return p, json.loads(p.stdout.readline())


def prog_stats() -> tuple[int, int]:
    """(run_time_ns, run_cnt) summed over this process's BPF programs (probe_parts.prog_stats
    of each program fd it holds)."""
    t = n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:bpf-prog":
                continue
            run_ns, runs, _misses = probe_prog_stats(int(fd))
        except OSError:
            continue
        t += run_ns
        n += runs
    return t, n


def run(pid: int, links, seconds: float) -> tuple[float, int, list]:
    """One traced run: (kernel ns per recorded read, recorded reads, the records)."""
    records: list = []
    stop = threading.Event()
    opts = GoReadOptions(pids=frozenset({pid}), record_rate=0.0, links=links)
    with GoReadSampler(opts) as s:
        def poll():
            while not stop.wait(0.1):
                records.extend(s.poll())
        th = threading.Thread(target=poll)
        t0, _ = prog_stats()
        th.start()
        time.sleep(seconds)
        t1, _ = prog_stats()
        stop.set()
        th.join()
        records.extend(s.stop())
        st = s.stats()
    reads = [r for r in records if type(r) is ReadRecord]
    recorded = len(reads) + st.lost
    return (t1 - t0) / max(1, recorded), recorded, reads


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=3.0, help="per condition and round")
    ap.add_argument("--binary", default=str(ROOT / "examples/bin/tracedapi"))
    ap.add_argument("--quick", action="store_true", help="3 rounds of 2 s")
    ap.add_argument("--json", metavar="OUT", help="write the figures here too")
    a = ap.parse_args()
    if a.quick:
        a.rounds, a.seconds = 3, 2.0
    if os.geteuid() != 0:
        print("links_cost: needs root (BPF)", file=sys.stderr)
        return 2
    procs = []
    stats_fd = enable_stats()   # the statistics stay on while this fd is open (even on kill)
    try:
        down, d = start(a.binary, "-mode", "tcp-downstream", "-delay", "2ms")
        procs.append(down)
        api, info = start(a.binary, "-mode", "api", "-downstream", f"tcp:{d['listening']}")
        procs.append(api)
        client = subprocess.Popen([a.binary, "-mode", "client", "-target",
                                   f"http://{info['listening']}/", "-conns", "16",
                                   "-think-max", "0", "-duration", "24h"],   # stopped below
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(client)
        time.sleep(1.0)
        rows: dict[str, list] = {"links": [], "no links": []}
        last_reads: list = []
        for i in range(a.rounds):
            order = [("links", L.LinkKeys()), ("no links", None)]
            for name, keys in (order if i % 2 == 0 else order[::-1]):
                ns, n, reads = run(api.pid, keys, a.seconds)
                rows[name].append((ns, n))
                if keys is not None:
                    last_reads = reads
        linked, delivered = sum(1 for r in last_reads if r.trace_id), len(last_reads)
        if not linked:
            print("links_cost: no read of the last run was linked: no figure", file=sys.stderr)
            return 1
        # Python's share: decode and name, as goread.py does per record (names cached)
        last_reads = [r for r in last_reads if r.trace_id]
        keys = L.LinkKeys()
        t0 = time.perf_counter_ns()
        for r in last_reads:
            L.decode(keys, L.LABELS | L.FOUND0 | L.FOUND1,
                     (r.trace_id.encode().ljust(64, b"\0"), r.parent_span_id.encode()
                      .ljust(64, b"\0")), (32, 16), r.go_start)
        py_us = (time.perf_counter_ns() - t0) / max(1, len(last_reads)) / 1000
    finally:
        for p in procs[::-1]:
            p.terminate()
        for p in procs:
            p.wait()
        os.close(stats_fd)
    on = statistics.median(ns for ns, _ in rows["links"])
    off = statistics.median(ns for ns, _ in rows["no links"])
    print(f"command: {' '.join(sys.argv)}")
    print(f"binary: {a.binary}; {a.rounds} rounds x {a.seconds:g} s a condition")
    print(f"{'condition':<10} {'recorded/run':>13} {'kernel ns per recorded read':>28}")
    for name, vals in rows.items():
        print(f"{name:<10} {statistics.median(n for _, n in vals):>13.0f} "
              f"{statistics.median(ns for ns, _ in vals):>28.0f}")
    print(f"labels add {on - off:.0f} ns of kernel time per recorded read ({on / off:.2f}x); "
          f"{linked} of {delivered} records of the last run linked (the others: the api's "
          f"reads of its clients' requests, before the handler sets its labels)")
    print(f"Python: links.decode {py_us:.1f} us a record")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"command": sys.argv, "rounds": rows, "kernel_ns_links": on,
                       "kernel_ns_no_links": off, "python_decode_us": py_us}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
