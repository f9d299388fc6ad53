#!/usr/bin/env python3
"""Offline correlation, file to verdicts: `otelwater correlate`'s path against pandas and polars.

    .venv/bin/python bench/correlate_offline.py [--quick] [--rounds N] [--json OUT] [--before]
        [--snapshots N] [--reads N] [--sockets N] [--seed N]

Data (seeded, written once to a temporary directory): 1,000,000 snapshots and 100,000 reads
over 1,000 sockets spread over 100 s; reads last 0.05-50 ms (log-uniform) and carry the kernel's
stamps (parked, arrival, queue delay) in a mix of peer-starved, runtime-starved,
consumer-lagging and unstamped reads. It is written as a **recording**, the file `otelwater
record` writes and `otelwater correlate` reads: gzip'd JSON Lines (a header, a `process` record,
the records in time order as each record's to_json() gives them, compact, the end record),
compressed as the Writer does (level 6, a sync flush every 1,000 records, a new gzip member
every 10,000). The same records uncompressed (`zcat` of it) are written beside it.

Each contender runs in its own fresh process (so its peak RSS is its own: VmHWM, which
includes the interpreter and imported libraries), `--rounds` times (median time, max RSS):
  otelwater     the real path: recording.Reader(FILE) (gzip, each line decoded and checked
                into a WaterSnapshot/ReadRecord/...), Correlator.feed every 4,096 records,
                finish(): the whole job, streaming (every snapshot within +-5 ms of a read's
                start or end joined, 8 nearest kept, a verdict per slow read, summaries).
  otelwater-gc  the same, gc.set_threshold(100_000, 20, 100) first (what a `correlate`
                command can do: the records are acyclic).
  otelwater-0.1 (--before) the same with the Reader's fast decoder off: each line through
                json.loads and the per-field Python checks, as otelwater 0.1.0 read files.
  pandas        pandas.read_json(FILE, lines=True) (gzip), split by type, then merge_asof by
                sock_key, direction="nearest", tolerance 5 ms, once on read start and once on
                read end: the bare join (the nearest snapshot on each side only, no verdicts).
  polars        polars.read_ndjson(FILE) (explicit schema; polars decompresses the gzip
                itself), then join_asof, the same two joins.
  polars-jsonl  the same on the uncompressed copy: no decompression at all (polars' best case).
The ratios printed at the end are otelwater's time over polars' on the same file, and over
polars-jsonl's. Wall times move with other load on the machine; CPU time (all threads: polars
uses several; otelwater one) less so. Each also reports its join phase alone, to show where the
time goes (for otelwater, parse is the time spent in the Reader: inflating, splitting lines,
decoding; join the time in Correlator.feed/finish). pandas and polars are not dependencies of
otelwater: `pip install pandas polars` (the `bench` extra). pandas needs ~6.5 GB on the full
data.
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
import zlib
from itertools import islice
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MS = 1_000_000
WINDOW_NS = 5 * MS
BATCH = 4096          # records a Correlator.feed call, as Pipeline.run_records feeds a file
PID = 4242


def generate(path: Path, plain: Path, snapshots: int, reads: int, sockets: int,
             seed: int) -> None:
    """The recording at `path`, its text uncompressed at `plain`."""
    import random

    import msgspec

    encode = msgspec.json.encode      # compact, keys in the order given, like the Writer's
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
    header = {"type": "otelwater-recording", "version": 1,
              "host": {"name": "bench", "kernel": os.uname().release, "machine": "x86_64",
                       "boot_id": None},
              "start_ns": t0 - 1_000 * MS, "started_wall_ns": 1_700_000_000 * 10**9,
              "clock": {"realtime_minus_monotonic_ns": 1_700_000_000 * 10**9 - (t0 - 1_000 * MS),
                        "error_ns": 100, "method": "bench"},
              "otelwater_version": "bench", "options": {}, "config": {}, "processes": {}}
    process = {"pid": PID, "ts_ns": t0, "exe": "/srv/server", "comm": "server",
               "cmdline": ["/srv/server"], "service_name": "server",
               "resource_attributes": {}, "start_time": 1_000, "type": "process"}
    with open(path, "wb") as gz, open(plain, "wb") as txt:
        z = zlib.compressobj(6, zlib.DEFLATED, 31)
        lines = [encode(header), encode(process)]

        def put(end_member: bool) -> None:
            nonlocal z
            text = b"\n".join(lines) + b"\n"
            lines.clear()
            txt.write(text)
            gz.write(z.compress(text))
            if end_member:
                gz.write(z.flush(zlib.Z_FINISH))
                z = zlib.compressobj(6, zlib.DEFLATED, 31)
            else:
                gz.write(z.flush(zlib.Z_SYNC_FLUSH))

        for i, (ts, kind, k, x) in enumerate(rows, 1):
            key = f"{keys[k]:016x}"
            port = 20000 + k
            if kind == 0:
                vol = x
                lines.append(encode({
                    "ts_ns": ts, "sock_key": key, "pid": PID, "comm": "server", "tid": 4243,
                    "netns": 4026531840, "laddr": "127.0.0.1", "lport": 8080,
                    "raddr": "127.0.0.1", "rport": port, "level": vol // 16384,
                    "volume": vol, "unread_bytes": vol // 2, "capacity": 262144,
                    "backlog": 0, "drops": 0, "drop_events": 0, "drop_reason": "",
                    "bytes_arrived": ts % (1 << 32), "bytes_read": ts % (1 << 31),
                    "trigger": "arrival", "tcp_state": "ESTABLISHED", "ino": 100 + k,
                    "type": "snapshot", "fill_ratio": round(vol / 262144, 4)}))
            else:
                start, dur, u = x
                parked = arrival = qd = exact = None
                if u < 0.35:                     # parked; arrival late (peer) or early (runtime)
                    parked = True
                    arrival = start + int(dur * (0.9 if u < 0.2 else 0.1))
                elif u < 0.75:                   # found data that stood in the queue
                    parked, qd, exact = False, int(dur * 0.8), True
                elif u < 0.85:
                    parked = True                # parked, no arrival stamp
                lines.append(encode({
                    "ts_start_ns": start, "ts_end_ns": start + dur, "pid": PID,
                    "tid": 4243, "goid": 10 + k, "fd": 7, "sock_key": key,
                    "requested": 4096, "returned": 512,
                    "stack": ["net.(*conn).Read", "main.handle"], "source": "tracepoint",
                    "comm": "server", "parked": parked, "ts_arrival_ns": arrival,
                    "queue_delay_ns": qd, "queue_delay_exact": exact, "type": "read",
                    "duration_ns": dur}))
            if i % 1_000 == 0:                   # a batch: sync flush; a member every 10
                put(end_member=i % 10_000 == 0)
        lines.append(encode({"type": "end", "ts_ns": rows[-1][0] if rows else t0,
                             "wall_ns": 0, "records": len(rows) + 1, "clock": header["clock"],
                             "skipped": {}}))
        put(end_member=True)


# -- contenders: each runs in its own process, prints one JSON line -----------------------------

def run_otelwater(path: str, plain: str) -> dict:
    """The path of `otelwater correlate`: the Reader streams the recording, BATCH records a
    batch to the correlator (bounded memory)."""
    from otelwater.correlate import Correlator
    from otelwater.events.recording import Reader

    c = Correlator()
    verdicts = []
    parse_s = join_s = 0.0
    t0 = time.perf_counter()
    reader = Reader(path)
    records_in = iter(reader)
    while True:
        t = time.perf_counter()
        records = list(islice(records_in, BATCH))
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
            "records": reader.records, "verdicts": len(verdicts), "by_verdict": counts,
            "slow_reads_with_evidence": sum(1 for v in verdicts if v.evidence),
            "snapshots_held_at_end": st["snapshots_held"], "late": st["late_snapshots"]}


def run_otelwater_before(path: str, plain: str) -> dict:
    """The Reader as otelwater 0.1.0 had it: json.loads and a Python check per field."""
    from otelwater.events import recording
    recording.fast_record = lambda line: None
    return run_otelwater(path, plain)


def run_pandas(path: str, plain: str) -> dict:
    import pandas as pd

    t0 = time.perf_counter()
    df = pd.read_json(path, lines=True, dtype=False, compression="gzip")
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


def run_polars(path: str, plain: str) -> dict:
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


def run_polars_jsonl(path: str, plain: str) -> dict:
    return run_polars(plain, plain)


def run_otelwater_gc(path: str, plain: str) -> dict:
    """The same with the cyclic GC's first threshold raised (700 -> 100,000): the records are
    acyclic, and the default makes the collector rescan the held objects every few lines."""
    import gc
    gc.set_threshold(100_000, 20, 100)
    return run_otelwater(path, plain)


CONTENDERS = {"otelwater": run_otelwater, "otelwater-gc": run_otelwater_gc,
              "otelwater-0.1": run_otelwater_before, "pandas": run_pandas,
              "polars": run_polars, "polars-jsonl": run_polars_jsonl}


def peak_rss_mb() -> float:
    """This process's own peak RSS: VmHWM (ru_maxrss would carry the parent's over fork+exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(name: str, path: str, plain: str) -> None:
    cpu = time.process_time()
    out = CONTENDERS[name](path, plain)
    out["cpu_s"] = time.process_time() - cpu      # all threads (polars uses several)
    out["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(out))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a tenth of the data, one round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", metavar="OUT")
    ap.add_argument("--before", action="store_true",
                    help="also run otelwater-0.1 (the Reader without its fast decoder: slow)")
    ap.add_argument("--snapshots", type=int, default=1_000_000)
    ap.add_argument("--reads", type=int, default=100_000)
    ap.add_argument("--sockets", type=int, default=1_000)
    ap.add_argument("--seed", type=int, default=9)
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args, _unknown = ap.parse_known_args()    # scripts/bench.sh passes every bench the same args
    if args.child:
        child(*args.child)
        return 0
    if args.quick:
        args.snapshots, args.reads, args.rounds = args.snapshots // 10, args.reads // 10, 1
    names = [n for n in CONTENDERS if n != "otelwater-0.1" or args.before]
    with tempfile.TemporaryDirectory(prefix="otelwater-bench-") as tmp:
        path, plain = Path(tmp) / "recording.otw.gz", Path(tmp) / "recording.jsonl"
        t = time.perf_counter()
        generate(path, plain, args.snapshots, args.reads, args.sockets, args.seed)
        print(f"data: {args.snapshots:,} snapshots, {args.reads:,} reads, {args.sockets:,} "
              f"sockets, seed {args.seed}: a recording of {path.stat().st_size / 1e6:.0f} MB "
              f"({plain.stat().st_size / 1e6:.0f} MB of JSON Lines uncompressed; generated in "
              f"{time.perf_counter() - t:.1f} s)")
        runs: dict[str, list[dict]] = {n: [] for n in names}
        for _ in range(args.rounds):
            for name in names:                          # interleaved, one process each
                p = subprocess.run([sys.executable, __file__, "--child", name, str(path),
                                    str(plain)], capture_output=True, text=True)
                if p.returncode:
                    print(f"{name}: failed: {p.stderr.strip().splitlines()[-1:]}",
                          file=sys.stderr)
                    continue
                runs[name].append(json.loads(p.stdout.strip().splitlines()[-1]))
    result = {"snapshots": args.snapshots, "reads": args.reads, "sockets": args.sockets,
              "seed": args.seed, "rounds": args.rounds, "python": sys.version.split()[0],
              "cpus": os.cpu_count(), "contenders": {}}
    print(f"\n{'':14} {'total s':>8} {'cpu s':>8} {'parse s':>8} {'join s':>8} "
          f"{'peak RSS MB':>12}")
    for name, rs in runs.items():
        if not rs:
            continue
        med = {k: statistics.median(r[k] for r in rs)
               for k in ("total_s", "cpu_s", "parse_s", "join_s")}
        med["peak_rss_mb"] = max(r["peak_rss_mb"] for r in rs)
        extra = {k: v for k, v in rs[-1].items() if k not in med}
        result["contenders"][name] = {**med, **extra, "runs": rs}
        print(f"{name:14} {med['total_s']:8.2f} {med['cpu_s']:8.2f} {med['parse_s']:8.2f} "
              f"{med['join_s']:8.2f} "
              f"{med['peak_rss_mb']:12.0f}")
    for name, r in result["contenders"].items():
        extra = {k: v for k, v in r.items()
                 if k not in ("total_s", "cpu_s", "parse_s", "join_s", "peak_rss_mb", "runs")}
        print(f"  {name}: {json.dumps(extra)}")
    got = result["contenders"]
    ratios = {}
    for rival in ("polars", "polars-jsonl"):
        if "otelwater" in got and rival in got:
            o, p = got["otelwater"], got[rival]
            ratios[rival] = {"wall": o["total_s"] / p["total_s"], "cpu": o["cpu_s"] / p["cpu_s"]}
            print(f"otelwater / {rival}: wall {ratios[rival]['wall']:.2f}x, "
                  f"CPU {ratios[rival]['cpu']:.2f}x; otelwater peak RSS "
                  f"{o['peak_rss_mb']:.0f} MB")
    result["ratios"] = ratios
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
