#!/usr/bin/env python3
"""otelwater's CPU per record on its user-space hot paths, without a traced service: decoding
a ring-buffer record, sweeping the socket table, writing the JSON lines. The same code paths
as `otelwater watch` (the probes' own _on_event and sweep, the JSON Lines sink), fed made-up
but realistic records, so two source trees can be compared side by side.

    .venv/bin/python bench/codec_cost.py [--tree NAME=DIR ...] [--rounds N] [--sockets N]
        [--json OUT]

Each tree (default: this checkout, "this") runs in a fresh process of its own with
PYTHONPATH=DIR, once per round, the trees alternating within each round; the figure is the
median over the rounds of CPU time (time.process_time: user + system, so a syscall counts)
per record. Rows:

  read decode       GoReadSampler._on_event on a goread_event in memory (a 10-frame stack
                    of examples/bin/slowreader, one of 4 stacks; a goid, a peer, queue delay),
                    20,000 distinct records
  water decode      WaterProbe._on_event on a water_event (a ring-buffer snapshot)
  read line         JsonLinesSink.write, the `read` line of each of those reads (~680 B)
  verdict line      the same, their `verdict` lines (~1,830 B: the read's fields again, the
                    figures, 2 evidence snapshots), the read and the snapshots written as
                    their own lines before, as the watch does
  verdict line, nothing written before  the same, cold: every part encoded
  snapshot line     JsonLinesSink.write, a `snapshot` line of each decoded snapshot (~456 B)
  = a recorded read read decode + read line + verdict line: what otelwater spends on each
                    slow read recorded in full, but for the analysis (the correlator's
                    verdict, the summaries) and the pipeline around it
  sweep, per socket WaterProbe.sweep over a real BPF socket table (an LRU hash as bpf/water.c
                    declares it, --sockets entries, all watched, every one moved since the last
                    sweep with no water: keep-alive connections between messages), its
                    snapshots' JSON lines included; steady state (after 5 sweeps). Needs root
                    (a BPF map); left out otherwise.
  sweep, every socket reported  the same, with still_reports=0 (every moved socket gets its
                    snapshot, as before the still-socket rule): the table read and the decode

Every tree must write the same bytes: the SHA-256 of every line written is compared across
the trees and printed (yes / NO). Nothing here runs the BPF programs or the analysis: the
figures are what these parts cost, not a whole run (bench/self_cost.py measures whole runs).
"""

from __future__ import annotations

import argparse
import ctypes
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
N_RECORDS = 20_000


def cpu() -> float:
    return time.process_time()


# -- the worker: one tree, in this process ------------------------------------------------------
def stacks_of_slowreader():
    """4 stacks of real addresses in examples/bin/slowreader (10 frames, as its reads have)."""
    from otelwater.probes import goread as G

    path = ROOT / "examples" / "bin" / "slowreader"
    binary = G._Binary(str(path), need_go=False)
    sym = binary.symbolizer
    addr = {n: a for a, n in zip(sym._starts, sym._names)}
    base = ["runtime/internal/syscall.Syscall6", "syscall.Syscall", "syscall.read",
            "internal/poll.(*FD).Read", "net.(*netFD).Read", "net.(*conn).Read"]
    tails = [["main.readOnce", "main.handleConn", "main.main.func4", "runtime.goexit.abi0"],
             ["main.handleConn", "main.main.func4", "runtime.goexit.abi0"],
             ["main.readOnce", "main.handleConn", "runtime.goexit.abi0"],
             ["main.main.func4", "runtime.goexit.abi0"]]
    out = []
    for tail in tails:
        names = [n for n in base + tail if n in addr]
        out.append([addr[n] + 1 for n in names])
    return binary, out


def read_events(stacks, n: int):
    from otelwater.probes import goread as G
    from otelwater.sockkey import addr16

    D = G._D
    bufs = []
    for i in range(n):
        e = G.GoReadEvent()
        e.ts_start_ns = 1_000_000_000 + i * 200_000
        e.ts_end_ns = e.ts_start_ns + 3_000_000
        e.pid, e.tid, e.goid, e.has_goid = 4242, 4250 + i % 4, 100 + i % 500, 1
        e.fd, e.sock_key = 7 + i % 100, (0x9E3779B97F4A7C15 * (i % 128 + 1)) & (2**64 - 1)
        e.requested, e.returned = 4096, 64
        st = stacks[i % len(stacks)]
        for j, ip in enumerate(st):
            e.ips[j] = ip
        e.stack_len = len(st)
        e.source = D["OTW_SOURCE_TRACEPOINT"]
        e.comm = b"slowreader"
        e.parked = 0
        e.evidence = D["OTW_EV_SOCKET"] | D["OTW_EV_QDELAY"] | D["OTW_EV_EXACT"]
        e.queue_delay_ns = 25_000_000
        e.role = 2
        ctypes.memmove(e.raddr, addr16("127.0.0.1"), 16)
        e.rport = 40000 + i % 128
        e.send_ns = e.ts_start_ns - 50_000
        e.kverdict = D["OTW_V_LAG"]
        bufs.append(ctypes.create_string_buffer(bytes(e), ctypes.sizeof(e)))
    return bufs


def bare_sampler(binary):
    from otelwater.probes import goread as G
    from otelwater.probes.kernel import LossLedger

    s = G.GoReadSampler.__new__(G.GoReadSampler)
    s.opts = G.GoReadOptions(pids=frozenset({4242}))
    s._pending, s._carried, s._ledger = [], [], LossLedger("reads")
    s._budget, s._deadline = 1 << 30, time.monotonic() + 3600
    s._pid_binary, s._bias, s._said, s._notices = {4242: binary}, {}, set(), []
    s._stacks, s._comms, s._addrs, s._comm = {}, {}, {}, {}      # this tree's or the old one's
    return s


def bare_water_probe(table=None, still_reports=None):
    from otelwater.hostsockets import OwnerResolver
    from otelwater.probes import kernel as K

    p = K.WaterProbe.__new__(K.WaterProbe)
    p._pending, p._carried, p._ledger = [], [], K.LossLedger("water")
    p._budget, p._deadline = 1 << 30, time.monotonic() + 3600
    p.drop_names, p._owners = {}, OwnerResolver()
    p.readers, p._standing, p._seeded = None, None, False
    p._bpf = {"socks": table}
    p._seen_changes = {}                                   # the old sweep's
    if hasattr(K, "Sweeper"):                              # this tree's
        opts = K.WaterOptions()
        p._decoder = K.StateDecoder({})
        p._sweeper = K.Sweeper(p._decoder, p._owners,
                               opts.still_reports if still_reports is None else still_reports,
                               opts.still_ns)
        p._batch = None
    return p


def water_events(n: int):
    from otelwater.probes import kernel as K

    bufs = []
    for i in range(n):
        e = K.WaterEvent()
        fill_state(e.s, i)
        e.s.level, e.s.volume, e.s.rcv_nxt = 40, 90_000, 5_000_000 + 65536
        e.ts_ns, e.tid, e.trigger = 1_000_000_000 + i, 4250, 1
        bufs.append(ctypes.create_string_buffer(bytes(e), ctypes.sizeof(e)))
    return bufs


def fill_state(st, i: int) -> None:
    from otelwater.sockkey import addr16

    st.sock_key = (0x9E3779B97F4A7C15 * (i + 1)) & (2**64 - 1)
    st.ino, st.pid, st.netns = 100_000 + i, 4242 if i % 2 else 4300, 4026531833
    ctypes.memmove(st.laddr, addr16("127.0.0.1"), 16)
    ctypes.memmove(st.raddr, addr16("127.0.0.1"), 16)
    st.lport, st.rport = (8080, 30000 + i) if i % 2 else (30000 + i, 8080)
    st.capacity, st.rcv_nxt, st.copied_seq = 131072, 5_000_000, 5_000_000
    st.tcp_state, st.role, st.watched, st.changes = 1, 2 - i % 2, 1, 1
    st.comm = b"slowreader" if i % 2 else b"loadgen"


def time_per(fn, items) -> float:
    """CPU µs per item of fn over items."""
    t0 = cpu()
    for x in items:
        fn(x)
    return (cpu() - t0) / len(items) * 1e6


def verdict_of(r, evidence):
    from otelwater.events.verdict import Verdict

    return Verdict(r, "consumer-lagging", "its oldest byte waited 25.0 ms in the queue "
                   "(>= 1.0 ms): the reader was late", None, None, r.queue_delay_ns, evidence,
                   len(evidence), True, None)


def json_cost(records, warm_of=None) -> tuple[float, int]:
    """CPU µs per record of JsonLinesSink.write over `records` (batches of 1,000) into a file,
    as `watch --json > FILE` writes, and the mean line length; warm_of(record): records
    written just before its batch (not timed), as the watch writes a read and its evidence
    snapshots before the verdict that repeats them."""
    import hashlib
    import tempfile

    from otelwater.export.jsonl import JsonLinesSink

    digest = hashlib.sha256()
    with tempfile.TemporaryFile("w+") as f:
        sink = JsonLinesSink(f)
        t, size = 0.0, 0
        for i in range(0, len(records), 1000):
            batch = records[i:i + 1000]
            if warm_of is not None:
                sink.write([x for r in batch for x in warm_of(r)])
            n0 = f.tell()
            t0 = cpu()
            sink.write(batch)
            t += cpu() - t0
            size += f.tell() - n0
        f.seek(0)
        digest.update(f.read().encode())
    json_cost.digests.append(digest.hexdigest())
    return t / len(records) * 1e6, (size - len(records)) // len(records)


json_cost.digests = []     # of everything each call wrote: the same in every tree


def sweep_cost(n_sockets: int, still_reports=None) -> dict:
    from bcc import BPF

    from otelwater.events.layout import BPF_DIR
    from otelwater.export.jsonl import JsonLinesSink

    text = ('#include "water.h"\n'
            'BPF_TABLE("lru_hash", u64, struct water_sock, socks, 65536);\n'
            'int unused(void *ctx) { return 0; }\n')
    b = BPF(text=text, cflags=[f"-I{BPF_DIR}", "-w"])
    try:
        t = b["socks"]
        leaves = []
        for i in range(n_sockets):
            leaf = t.Leaf()
            fill_state(leaf.s, i)
            leaves.append((ctypes.c_uint64(0xFFFF_8880_0000_0000 + i * 4096), leaf))
            t[leaves[-1][0]] = leaf
        p = bare_water_probe(t, still_reports)
        sink = JsonLinesSink(io.StringIO())
        per, reported = [], []
        for k in range(12):
            for key, leaf in leaves:           # every socket moved: a message came and went
                leaf.s.changes += 2
                leaf.s.rcv_nxt += 64
                leaf.s.copied_seq += 64
                t[key] = leaf
            t0 = cpu()
            out = p.sweep()
            sink.write(out)
            dt = cpu() - t0
            if k >= 5:
                per.append(dt / n_sockets * 1e6)
                reported.append(len(out))
        return {"us": statistics.median(per), "reported": statistics.median(reported)}
    finally:
        b.cleanup()


def worker(args) -> dict:
    import gc

    from otelwater.probes import goread as G

    binary, stacks = stacks_of_slowreader()
    out = {"tree": str(Path(G.__file__).resolve().parents[2])}
    # read decode
    bufs = read_events(stacks, N_RECORDS)
    addrs = [ctypes.addressof(b) for b in bufs]
    s = bare_sampler(binary)
    s._on_event(None, addrs[0], 0)                   # the first stack symbolized
    s._pending = []
    gc.collect()
    out["read decode"] = time_per(lambda a: s._on_event(None, a, 0), addrs)
    del bufs, addrs
    # water ring-buffer decode
    wbufs = water_events(N_RECORDS)
    p = bare_water_probe()
    waddrs = [ctypes.addressof(b) for b in wbufs]
    out["water decode"] = time_per(lambda a: p._on_event(None, a, 0), waddrs)
    del wbufs, waddrs
    # JSON lines: distinct records, as the decoders made them
    reads = s._pending
    snaps = p._pending
    verdicts = [verdict_of(x, (snaps[2 * i], snaps[2 * i + 1]))
                for i, x in enumerate(reads[:N_RECORDS // 2])]
    out["read line"], out["read line bytes"] = json_cost(reads)
    out["verdict line"], out["verdict line bytes"] = json_cost(
        verdicts, lambda v: (v.read, *v.evidence))
    out["verdict line, nothing written before"], _ = json_cost(verdicts)
    out["snapshot line"], out["snapshot line bytes"] = json_cost(snaps)
    out["= a recorded read"] = out["read decode"] + out["read line"] + out["verdict line"]
    if os.geteuid() == 0 and args.sockets:
        sw = sweep_cost(args.sockets)
        out["sweep, per socket"], out["sweep: snapshots a sweep"] = sw["us"], sw["reported"]
        sw = sweep_cost(args.sockets, still_reports=0)
        out["sweep, every socket reported"] = sw["us"]
    out["digest"] = "/".join(d[:12] for d in json_cost.digests)   # the same in every tree
    return out


# -- the driver ----------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", action="append", default=[],
                    help="NAME=DIR: a source tree to measure (repeatable; default this one)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--sockets", type=int, default=4000,
                    help="socket table entries for the sweep rows (0: none)")
    ap.add_argument("--json", metavar="OUT")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    trees = [t.split("=", 1) for t in args.tree] or [["this", str(ROOT)]]
    print(f"command: {' '.join([sys.executable, *sys.argv])}")
    print(f"machine: Linux {platform.release()}, nproc {os.cpu_count()}, Python "
          f"{platform.python_version()}; load average at start "
          f"{Path('/proc/loadavg').read_text().split()[:3]}", flush=True)
    results: dict[str, list[dict]] = {name: [] for name, _ in trees}
    for rnd in range(args.rounds):
        for name, tree in trees:
            env = dict(os.environ, PYTHONPATH=tree)
            got = subprocess.run([sys.executable, __file__, "--worker", "--sockets",
                                  str(args.sockets)], env=env, cwd=tree, capture_output=True,
                                 text=True, check=True)
            results[name].append(json.loads(got.stdout.strip().splitlines()[-1]))
        load = Path("/proc/loadavg").read_text().split()[0]
        print(f"round {rnd + 1}/{args.rounds} done; load {load}", flush=True)
    rows = [k for k in results[trees[0][0]][0] if k not in ("tree", "digest")]
    digests = {r["digest"] for rs in results.values() for r in rs}
    print(f"the lines written (reads, verdicts, snapshots) are byte for byte the same in every "
          f"tree: "
          f"{'yes' if len(digests) == 1 else 'NO: ' + ', '.join(sorted(digests))}")
    med = {name: {k: statistics.median(r[k] for r in rs) for k in rows}
           for name, rs in results.items()}
    names = [n for n, _ in trees]
    head = ["µs of CPU per record (median of rounds)"] + names
    if len(names) == 2:
        head.append(f"{names[0]}/{names[1]}")
    print("\n| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for k in rows:
        vals = [med[n][k] for n in names]
        cells = [f"{x:,.0f}" if "bytes" in k or "snapshots" in k else f"{x:.2f}" for x in vals]
        if len(names) == 2 and "bytes" not in k and "snapshots" not in k and vals[1]:
            cells.append(f"{vals[0] / vals[1]:.1f}x")
        elif len(names) == 2:
            cells.append("")
        print(f"| {k} | " + " | ".join(cells) + " |")
    print(f"\nload average at the end: {Path('/proc/loadavg').read_text().split()[:3]}")
    if args.json:
        Path(args.json).write_text(json.dumps({"trees": dict(trees), "results": results,
                                               "median": med}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
