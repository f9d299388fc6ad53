#!/usr/bin/env python3
"""Offline correlation, file to verdicts: otelwater's correlator against pandas and polars.

    .venv/bin/python bench/correlate_offline.py [--quick] [--rounds N] [--json OUT]
        [--snapshots N] [--reads N] [--sockets N] [--seed N]

Data (seeded, written once to a temporary JSON Lines file in the `watch --json` shape, in time
order like a recording): 1,000,000 snapshots and 100,000 reads over 1,000 sockets spread over
100 s; reads last 0.05-50 ms (log-uniform) and carry the kernel's stamps (parked, arrival,
queue delay) in a mix of peer-starved, runtime-starved, consumer-lagging and unstamped reads.

Each contender runs in its own fresh process (so its peak RSS is its own: VmHWM, which
includes the interpreter and imported libraries), `--rounds` times (median time, max RSS):
  otelwater  read 10,000 lines, json.loads, build WaterSnapshot/ReadRecord, Correlator.feed,
             repeat; finish(): the whole job, streaming (every snapshot within ±5 ms of a
             read's start or end joined, 8 nearest kept, a verdict per slow read, summaries).
  otelwater-gc  the same, gc.set_threshold(100_000, 20, 100) first (what a `correlate`
             command can do: the records are acyclic).
  pandas     pandas.read_json(lines=True), split by type, then merge_asof by sock_key,
             direction="nearest", tolerance 5 ms, once on read start and once on read end:
             the bare join (the nearest snapshot on each side only, no verdicts).
  polars     polars.read_ndjson (explicit schema), then join_asof, same two joins.
Wall times move with other load on the machine; CPU time (all threads) less so. Each also
reports its join phase alone (data already in memory in its own form), to show where
the time goes. pandas and polars are not dependencies of otelwater: `pip install pandas polars`
(the `bench` extra).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MS = 1_000_000
WINDOW_NS = 5 * MS


def generate(path: Path, snapshots: int, reads: int, sockets: int, seed: int) -> None:
    import random
    rng = random.Random(seed)
    span = 100_000 * MS
    t0 = 1_000_000 * MS
    keys = [rng.getrandbits(64) for _ in range(sockets)]
    rows = []
    for _ in range(snapshots):
        k = rng.randrange(sockets)
        ts = t0 + rng.randrange(span)
        vol = rng.randrange(0, 200_000)
        rows.append((ts, 0, k, vol))
    for _ in range(reads):
        k = rng.randrange(sockets)
        start = t0 + rng.randrange(span)
        dur = int(10 ** rng.uniform(4.7, 7.7))          # 0.05 ms .. 50 ms
        rows.append((start + dur, 1, k, (start, dur, rng.random())))
    rows.sort(key=lambda r: (r[0], r[1]))
    with open(path, "w") as f:
        for ts, kind, k, x in rows:
            key = f"{keys[k]:016x}"
            port = 20000 + k
            if kind == 0:
                vol = x
                f.write(json.dumps({
                    "ts_ns": ts, "sock_key": key, "pid": 4242, "comm": "server", "tid": 4243,
                    "netns": 4026531840, "laddr": "127.0.0.1", "lport": 8080,
                    "raddr": "127.0.0.1", "rport": port, "level": vol // 16384,
                    "volume": vol, "unread_bytes": vol // 2, "capacity": 262144,
                    "backlog": 0, "drops": 0, "drop_events": 0, "drop_reason": "",
                    "bytes_arrived": ts % (1 << 32), "bytes_read": ts % (1 << 31),
                    "trigger": "arrival", "tcp_state": "ESTABLISHED", "ino": 100 + k,
                    "type": "snapshot", "fill_ratio": round(vol / 262144, 4)}) + "\n")
            else:
                start, dur, u = x
                parked = arrival = qd = None
                if u < 0.35:                     # parked; arrival late (peer) or early (runtime)
                    parked = True
                    arrival = start + int(dur * (0.9 if u < 0.2 else 0.1))
                elif u < 0.75:                   # found data that stood in the queue
                    parked, qd = False, int(dur * 0.8)
                elif u < 0.85:
                    parked = True                # parked, no arrival stamp
                f.write(json.dumps({
                    "ts_start_ns": start, "ts_end_ns": start + dur, "pid": 4242,
                    "tid": 4243, "goid": 10 + k, "fd": 7, "sock_key": key,
                    "requested": 4096, "returned": 512,
                    "stack": ["net.(*conn).Read", "main.handle"], "source": "tracepoint",
                    "comm": "server", "parked": parked, "ts_arrival_ns": arrival,
                    "queue_delay_ns": qd, "type": "read", "duration_ns": dur}) + "\n")


# -- contenders: each runs in its own process, prints one JSON line -----------------------------

def run_otelwater(path: str) -> dict:
    """Streams the file: parse 10,000 lines, feed them, repeat (bounded memory)."""
    from otelwater.correlate import Correlator
    from otelwater.events.model import ReadRecord, WaterSnapshot

    loads = json.loads
    c = Correlator()
    verdicts = []
    parse_s = join_s = 0.0
    t0 = time.perf_counter()
    with open(path) as f:
        while True:
            t = time.perf_counter()
            records = []
            for line in islice(f, 10_000):
                d = loads(line)
                if d["type"] == "snapshot":
                    records.append(WaterSnapshot(
                        d["ts_ns"], int(d["sock_key"], 16), d["pid"], d["comm"], d["tid"],
                        d["netns"], d["laddr"], d["lport"], d["raddr"], d["rport"],
                        d["level"], d["volume"], d["unread_bytes"], d["capacity"],
                        d["backlog"], d["drops"], d["drop_events"], d["drop_reason"],
                        d["bytes_arrived"], d["bytes_read"], d["trigger"], d["tcp_state"],
                        d["ino"]))
                elif d["type"] == "read":
                    records.append(ReadRecord(
                        d["ts_start_ns"], d["ts_end_ns"], d["pid"], d["tid"], d["goid"],
                        d["fd"], int(d["sock_key"], 16), d["requested"], d["returned"],
                        tuple(d["stack"]), d["source"], d["comm"], d["parked"],
                        d["ts_arrival_ns"], d["queue_delay_ns"]))
            t1 = time.perf_counter()
            parse_s += t1 - t
            if not records:
                break
            verdicts += c.feed(records)
            join_s += time.perf_counter() - t1
    t = time.perf_counter()
    verdicts += c.finish()
    t2 = time.perf_counter()
    join_s += t2 - t
    counts: dict[str, int] = {}
    for v in verdicts:
        counts[v.verdict] = counts.get(v.verdict, 0) + 1
    st = c.stats()
    return {"total_s": t2 - t0, "parse_s": parse_s, "join_s": join_s,
            "verdicts": len(verdicts), "by_verdict": counts,
            "slow_reads_with_evidence": sum(1 for v in verdicts if v.evidence),
            "snapshots_held_at_end": st["snapshots_held"], "late": st["late_snapshots"]}


def run_pandas(path: str) -> dict:
    import pandas as pd

    t0 = time.perf_counter()
    df = pd.read_json(path, lines=True, dtype=False)
    snaps = df.loc[df["type"] == "snapshot", ["ts_ns", "sock_key", "volume", "level"]]
    reads = df.loc[df["type"] == "read", ["ts_start_ns", "ts_end_ns", "sock_key"]]
    snaps = snaps.astype({"ts_ns": "int64"})
    reads = reads.astype({"ts_start_ns": "int64", "ts_end_ns": "int64"})
    del df
    t1 = time.perf_counter()
    n = _pandas_join(pd, snaps, reads)
    t2 = time.perf_counter()
    return {"total_s": t2 - t0, "parse_s": t1 - t0, "join_s": t2 - t1, "reads_with_match": n}


def _pandas_join(pd, snaps, reads) -> int:
    snaps = snaps.sort_values("ts_ns")
    matched = None
    for side in ("ts_start_ns", "ts_end_ns"):
        r = reads.sort_values(side)
        j = pd.merge_asof(r, snaps, left_on=side, right_on="ts_ns", by="sock_key",
                          direction="nearest", tolerance=WINDOW_NS)
        m = j.set_index(["ts_start_ns", "ts_end_ns", "sock_key"])["ts_ns"].notna()
        matched = m if matched is None else (matched | m.reindex(matched.index))
    return int(matched.sum())


def run_polars(path: str) -> dict:
    import polars as pl

    schema = {"type": pl.Utf8, "sock_key": pl.Utf8, "ts_ns": pl.Int64, "volume": pl.Int64,
              "level": pl.Int64, "ts_start_ns": pl.Int64, "ts_end_ns": pl.Int64}
    t0 = time.perf_counter()
    df = pl.read_ndjson(path, schema=schema)
    snaps = df.filter(pl.col("type") == "snapshot").select("ts_ns", "sock_key", "volume",
                                                           "level")
    reads = df.filter(pl.col("type") == "read").select("ts_start_ns", "ts_end_ns", "sock_key")
    del df
    t1 = time.perf_counter()
    n = _polars_join(pl, snaps, reads)
    t2 = time.perf_counter()
    return {"total_s": t2 - t0, "parse_s": t1 - t0, "join_s": t2 - t1, "reads_with_match": n}


def _polars_join(pl, snaps, reads) -> int:
    snaps = snaps.sort("ts_ns")
    reads = reads.with_row_index("i")
    hit = None
    for side in ("ts_start_ns", "ts_end_ns"):
        j = reads.sort(side).join_asof(snaps, left_on=side, right_on="ts_ns", by="sock_key",
                                       strategy="nearest", tolerance=WINDOW_NS)
        m = j.select("i", pl.col("ts_ns").is_not_null().alias(side)).sort("i")[side]
        hit = m if hit is None else (hit | m)
    return int(hit.sum())


def run_otelwater_gc(path: str) -> dict:
    """The same with the cyclic GC's first threshold raised (700 -> 100,000): the records are
    acyclic, and the default makes the collector rescan the held objects every few lines."""
    import gc
    gc.set_threshold(100_000, 20, 100)
    return run_otelwater(path)


CONTENDERS = {"otelwater": run_otelwater, "otelwater-gc": run_otelwater_gc,
              "pandas": run_pandas, "polars": run_polars}


def peak_rss_mb() -> float:
    """This process's own peak RSS: VmHWM (ru_maxrss would carry the parent's over fork+exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(name: str, path: str) -> None:
    cpu = time.process_time()
    out = CONTENDERS[name](path)
    out["cpu_s"] = time.process_time() - cpu      # all threads (polars uses several)
    out["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(out))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a tenth of the data, one round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", metavar="OUT")
    ap.add_argument("--snapshots", type=int, default=1_000_000)
    ap.add_argument("--reads", type=int, default=100_000)
    ap.add_argument("--sockets", type=int, default=1_000)
    ap.add_argument("--seed", type=int, default=9)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args, _unknown = ap.parse_known_args()    # scripts/bench.sh passes every bench the same args
    if args.child:
        child(*args.child)
        return 0
    if args.quick:
        args.snapshots, args.reads, args.rounds = args.snapshots // 10, args.reads // 10, 1
    with tempfile.TemporaryDirectory(prefix="otelwater-bench-") as tmp:
        path = Path(tmp) / "recording.jsonl"
        t = time.perf_counter()
        generate(path, args.snapshots, args.reads, args.sockets, args.seed)
        print(f"data: {args.snapshots:,} snapshots, {args.reads:,} reads, {args.sockets:,} "
              f"sockets, seed {args.seed}: {path.stat().st_size / 1e6:.0f} MB JSON Lines "
              f"(generated in {time.perf_counter() - t:.1f} s)")
        runs: dict[str, list[dict]] = {n: [] for n in CONTENDERS}
        for _ in range(args.rounds):
            for name in CONTENDERS:                     # interleaved, one process each
                p = subprocess.run([sys.executable, __file__, "--child", name, str(path)],
                                   capture_output=True, text=True)
                if p.returncode:
                    print(f"{name}: failed: {p.stderr.strip().splitlines()[-1:]}",
                          file=sys.stderr)
                    continue
                runs[name].append(json.loads(p.stdout.strip().splitlines()[-1]))
    result = {"snapshots": args.snapshots, "reads": args.reads, "sockets": args.sockets,
              "seed": args.seed, "rounds": args.rounds, "python": sys.version.split()[0],
              "cpus": os.cpu_count(), "contenders": {}}
    print(f"\n{'':12} {'total s':>8} {'cpu s':>8} {'parse s':>8} {'join s':>8} "
          f"{'peak RSS MB':>12}")
    for name, rs in runs.items():
        if not rs:
            continue
        med = {k: statistics.median(r[k] for r in rs)
               for k in ("total_s", "cpu_s", "parse_s", "join_s")}
        med["peak_rss_mb"] = max(r["peak_rss_mb"] for r in rs)
        extra = {k: v for k, v in rs[-1].items() if k not in med}
        result["contenders"][name] = {**med, **extra, "runs": rs}
        print(f"{name:12} {med['total_s']:8.2f} {med['cpu_s']:8.2f} {med['parse_s']:8.2f} "
              f"{med['join_s']:8.2f} "
              f"{med['peak_rss_mb']:12.0f}")
    for name, r in result["contenders"].items():
        extra = {k: v for k, v in r.items()
                 if k not in ("total_s", "cpu_s", "parse_s", "join_s", "peak_rss_mb", "runs")}
        print(f"  {name}: {json.dumps(extra)}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
