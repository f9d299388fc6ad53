#!/usr/bin/env python3
"""otelwater's CPU per 1,000 spans and per 1,000 metric points exported over OTLP, beside the
same work with export off, in one run; and, as root, what export costs the traced ping-pong.

    .venv/bin/python bench/export_cost.py [--protocol grpc|http/protobuf] [--spans N]
        [--seconds S] [--rounds N] [--span-rate R] [--no-pipeline] [--quick] [--json OUT]

Synthetic rows (no root): the records are shaped like `watch`'s (a slow read, its verdict with
2 evidence snapshots), and go through the real OtlpSink and the SDK's real OTLP exporter to a
local receiver (tests/integration/otlp_receiver.py) in another process, so only otelwater's
side is counted. CPU is this process's user+system time (time.process_time: every thread, so
the sink's worker and the SDK's batch and export threads are included).

  spans   off: build N (read, verdict) records and hand them to nothing.
          on:  the same, written to a sink with no span limit 500 at a time with 0.3 s
               between (so no queue overflows), then close(); every span delivered is checked
               against the receiver's count. Cost per 1,000 spans = (on - off) / N * 1,000;
               write() alone (the caller's side: queueing) is shown beside.
  points  off: S seconds of sleep with the sockets' snapshots held in a dict.
          on:  a sink holding 200 sockets (top 50 with their own series, the rest summed per
               process and port: 60 series a gauge), metrics collected and exported every
               100 ms for S seconds. Cost per 1,000 points = (on - off) / points * 1,000.

Pipeline rows (root; --no-pipeline skips them): bench/goread_cost.py's ping-pong (a fresh
examples/bin/slowreader echo server, examples/bin/loadgen, 8 connections of 64 B messages,
both pinned to the last CPU; its harness is imported, not copied) traced by what `watch -p PID
--go-pid PID` runs: the water probe with the read sampler compiled in, the watch loop and the
analysis in this process (on the other CPUs), with a blocked-read threshold of 0.02 ms so
nearly every Read is a slow read with a verdict. Two conditions, interleaved each round, the
order alternating:
  watch, export off   the records go through the analysis and stop there
  watch, export on    ... and into an OtlpSink exporting to a receiver in another process
                      (span limit --span-rate, default the sink's 500/s), closed at the end
Per run: the server's CPU per Read (schedstat, all threads: what the probes cost the traced
program), this process's CPU (the loop, the analysis and, when on, the sink's worker and the
SDK's threads), spans delivered / limited / dropped and the receiver's count. Ratios are per
round (on / off), medians over rounds; otelwater's CPU per 1,000 spans = the added CPU of the
"on" run over the spans it built.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from otelwater.events.model import ReadRecord, WaterSnapshot  # noqa: E402
from otelwater.events.verdict import Verdict  # noqa: E402
from otelwater.clock import WallClock  # noqa: E402
from otelwater.export.otlp import SPAN_RATE, ExportOptions, Identity, OtlpSink  # noqa: E402
from otelwater.export.sink import RunInfo  # noqa: E402

MS = 1_000_000
PID = 4242
PACE = 500


def snap(ts, key, volume=0, lport=8080):
    return WaterSnapshot(ts, key, PID, "svc", PID, 1, "127.0.0.1", lport, "127.0.0.1",
                         40000 + key % 20000, 1, volume, volume // 2, 1 << 17, 0, 0, 0, "",
                         0, 0, "arrival", "ESTABLISHED", 9)


def records(i: int) -> list:
    t = 1_000 * MS + i * 6 * MS
    key = 1 + i % 8
    ev = (snap(t - MS, key, 640), snap(t + 5 * MS, key, 0))
    r = ReadRecord(t, t + 5 * MS, PID, PID + 1, 17 + key, 3, key, 4096, 64,
                   ("internal/poll.(*FD).Read", "net.(*netFD).Read", "net.(*conn).Read",
                    "main.handle", "main.serve"), "tracepoint", "svc", True, t + 4 * MS)
    return [r, Verdict(r, "peer-starved", "waited 4.0ms for the peer", 4 * MS, MS, None, ev,
                       2, True)]


class Receiver:
    def __init__(self, protocol: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.integration.otlp_receiver",
                                      protocol], cwd=ROOT, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.endpoint = json.loads(self.proc.stdout.readline())["endpoint"]

    def counts(self) -> dict:
        self.proc.stdin.close()
        out = json.loads(self.proc.stdout.readline())
        self.proc.wait(10)
        return out


def sink_for(protocol: str, endpoint: str, interval_s: float = 60.0, **kw) -> OtlpSink:
    return OtlpSink.for_options(ExportOptions(protocol, endpoint, endpoint),
                                identity=lambda pid: Identity(pid, service_name="bench"),
                                clock=WallClock.measure(), endpoints=None,
                                metric_interval_s=interval_s, out=sys.stderr, **kw)


def cpu() -> float:
    return time.process_time()


def spans_cost(protocol: str, n: int) -> dict:
    t0 = cpu()
    for i in range(n):
        batch = records(i)
        del batch
    off = cpu() - t0
    rx = Receiver(protocol)
    sink = sink_for(protocol, rx.endpoint, span_rate=None)   # the cost of every span
    t0, w0 = cpu(), time.monotonic()
    write_s = 0.0
    for i in range(n):
        t = time.thread_time()      # this thread only: the worker's CPU is not write()'s
        sink.write(records(i))
        write_s += time.thread_time() - t
        if i % PACE == PACE - 1:   # ~1,600 spans a second: below what export keeps up with,
            time.sleep(0.3)        # so none is dropped at a queue (all are counted anyway)
    sink.close(timeout_s=60)
    on, wall = cpu() - t0, time.monotonic() - w0
    got = rx.counts()
    return {"spans": n, "received": got["spans"], "off_cpu_s": off, "on_cpu_s": on,
            "on_write_cpu_s": write_s, "on_wall_s": wall,
            "cpu_ms_per_1000_spans": (on - off) / n * 1e6,
            "write_path_ms_per_1000_spans": (write_s - off) / n * 1e6}


def points_cost(protocol: str, seconds: float) -> dict:
    socks = [snap(MS, k, volume=1000 * k, lport=8000 + k % 10) for k in range(1, 201)]
    t0 = cpu()
    held = {s.sock_key: s for s in socks}
    time.sleep(seconds)
    off = cpu() - t0
    del held
    rx = Receiver(protocol)
    sink = sink_for(protocol, rx.endpoint, interval_s=0.1)
    sink.write([records(0)[0]])         # PID is a traced service
    t0 = cpu()
    sink.write(socks)
    time.sleep(seconds)
    sink.close(timeout_s=30)
    on = cpu() - t0
    got = rx.counts()
    points = sink.health.points_exported
    return {"seconds": seconds, "points": points, "received": got["points"],
            "off_cpu_s": off, "on_cpu_s": on,
            "cpu_ms_per_1000_points": (on - off) / points * 1e6 if points else None}


# -- pipeline rows: what export costs the traced ping-pong (root) ------------------------------
CONDITIONS = ("off", "on")
CONDITION_TEXT = {"off": "watch, export off", "on": "watch, export on"}
BLOCKED_MS = 0.02       # the blocked-read threshold: nearly every ping-pong Read is slow


class _Stop:
    """What WatchLoop.run watches: a Stopper's event, without its signal handlers."""

    def __init__(self):
        self.event = threading.Event()


def pipeline_run(cond: str, wl: dict, args) -> dict:
    """One run: a fresh server, the watch pipeline on it (exporting when `cond` is "on"), the
    ping-pong, then everything closed; the server's and this process's CPU over it."""
    import goread_cost as G

    from otelwater.config import load_config
    from otelwater.pipeline import Analysis, WatchLoop
    from otelwater.probes.goread import GoReadOptions, GoReadSampler
    from otelwater.probes.kernel import WaterOptions, WaterProbe

    config = load_config(None, env={}, flags={"correlate.threshold_ms": BLOCKED_MS})
    # the last run's sink, closed, must be gone before this run forks: the SDK's metric reader
    # restarts its thread in a child forked with a preexec_fn (the servers are pinned so),
    # which then exports once more from the child
    gc.collect()
    server = G.Server(args.binary, wl["server"], args.cpu)
    rx = sink = None
    got = {"spans": None}
    seen = {"verdicts": 0}
    try:
        if cond == "on":
            rx = Receiver(args.protocol)
            sink = sink_for(args.protocol, rx.endpoint, interval_s=10.0,
                            traced_pids=[server.pid], span_rate=args.span_rate or None)
        pids = frozenset({server.pid})
        with GoReadSampler(GoReadOptions(pids=pids, embed=True,
                                         threshold_ns=config.correlate.threshold_ns)) as reads, \
                WaterProbe(WaterOptions(pids=pids, seed=False), readers=reads) as water:
            start_ns = time.monotonic_ns()
            analysis = Analysis(config, start_ns=start_ns)
            if sink is not None:
                sink.start(RunInfo(start_ns, config))

            def on_records(records):
                out = analysis.process(records)
                seen["verdicts"] += sum(type(r) is Verdict for r in out)
                if sink is not None:
                    sink.write(out)

            stop = _Stop()
            loop = threading.Thread(target=WatchLoop(water, on_records, readers=reads).run,
                                    args=(stop,), daemon=True)
            loop.start()
            time.sleep(0.05)
            ns0, c0, w0 = G.server_cpu(server.pid)[0], cpu(), time.monotonic()
            out = G.run_loadgen(args.loadgen, ["-addr", server.addr, *wl["loadgen"]], args.cpu)
            time.sleep(0.1)   # the EOF Reads after loadgen closes
            ns1, w_load = G.server_cpu(server.pid)[0], time.monotonic()
            stop.event.set()
            loop.join(60)
            last = analysis.finish()
            seen["verdicts"] += sum(type(r) is Verdict for r in last)
            if sink is not None:
                sink.write(last)
            stats = reads.stats()
            lost = water.lost_total() + reads.lost_total()
            w_stop = time.monotonic()
        w_detach = time.monotonic()
        if sink is not None:
            sink.close(timeout_s=60)
        c1, w1 = cpu(), time.monotonic()
        foreign = G.foreign_bpf()
        if rx is not None:
            got = rx.counts()
            rx = None
    finally:
        server.stop()
        if rx is not None:
            rx.proc.kill()
            rx.proc.wait(10)
    reads_n = wl["reads"](out)
    res = {"server_cpu_ns": ns1 - ns0, "reads": reads_n,
           "us_per_read": (ns1 - ns0) / 1e3 / reads_n, "otelwater_cpu_s": c1 - c0,
           "wall_s": w1 - w0, "load_s": w_load - w0, "stop_s": w_stop - w_load,
           "detach_s": w_detach - w_stop, "close_s": w1 - w_detach, "sampler_reads": stats.reads, "blocked": stats.blocked,
           "verdicts": seen["verdicts"], "records_lost": lost, "foreign_bpf": foreign}
    if sink is not None:
        h = sink.health
        res.update(spans_built=sink.spans, spans_delivered=h.spans_exported,
                   spans_limited=h.spans_limited,
                   spans_dropped=h.spans_dropped + max(0, sink.spans - h.spans_exported
                                                       - h.spans_dropped),
                   records_dropped=h.records_dropped + h.records_abandoned,
                   spans_received=got["spans"])
    return res


def pipeline_cost(args) -> dict:
    """The export on/off rows: `args.rounds` rounds, each running both conditions once."""
    import goread_cost as G

    from otelwater.probes import host

    host.require_can_trace()
    cpus = sorted(os.sched_getaffinity(0))
    args.cpu = cpus[-1]
    rest = set(cpus) - {args.cpu}
    if rest:
        os.sched_setaffinity(0, rest)   # this process (loop, analysis, export) off its CPU
    ns = argparse.Namespace(pp_count=args.pp_count, stream_count=1, readsize=256)
    wl = next(w for w in G.workloads(ns) if w["name"] == "pingpong")
    runs: dict[str, list] = {c: [] for c in CONDITIONS}
    t0 = time.monotonic()
    for r in range(args.rounds):
        order = CONDITIONS if r % 2 == 0 else CONDITIONS[::-1]
        for cond in order:
            runs[cond].append(pipeline_run(cond, wl, args))
        print(f"pipeline round {r + 1}/{args.rounds} ({time.monotonic() - t0:.0f} s)",
              file=sys.stderr, flush=True)
    med = statistics.median
    off, on = runs["off"], runs["on"]
    added = [a["otelwater_cpu_s"] - o["otelwater_cpu_s"] for a, o in zip(on, off)]
    per_span = [d / a["spans_built"] * 1e6 for d, a in zip(added, on) if a["spans_built"]]
    per_verdict = [d / a["verdicts"] * 1e6 for d, a in zip(added, on) if a["verdicts"]]
    return {
        "workload": wl["text"], "blocked_ms": BLOCKED_MS, "rounds": args.rounds,
        "span_rate": args.span_rate or None, "cpu": args.cpu, "bench_cpus": sorted(rest),
        "elapsed_s": time.monotonic() - t0, "runs": runs,
        "us_per_read": {c: med(r["us_per_read"] for r in runs[c]) for c in CONDITIONS},
        "ratio": med(a["us_per_read"] / o["us_per_read"] for a, o in zip(on, off)),
        "ratio_range": [min(a["us_per_read"] / o["us_per_read"] for a, o in zip(on, off)),
                        max(a["us_per_read"] / o["us_per_read"] for a, o in zip(on, off))],
        "otelwater_cpu_s": {c: med(r["otelwater_cpu_s"] for r in runs[c]) for c in CONDITIONS},
        "otelwater_cpu_ratio": med(a["otelwater_cpu_s"] / o["otelwater_cpu_s"]
                                   for a, o in zip(on, off)),
        "added_cpu_ms_per_1000_spans": med(per_span) if per_span else None,
        "added_cpu_us_per_verdict": med(per_verdict) if per_verdict else None,
        "verdicts": med(r["verdicts"] for r in on),
        "spans": {k: sum(r[k] or 0 for r in on)
                  for k in ("spans_built", "spans_delivered", "spans_limited", "spans_dropped",
                            "records_dropped", "spans_received")},
        "records_lost": {c: sum(r["records_lost"] for r in runs[c]) for c in CONDITIONS},
        "foreign_bpf": sorted({x for c in CONDITIONS for r in runs[c]
                               for x in (r["foreign_bpf"] or [])}),
    }


def print_pipeline(p: dict) -> None:
    print(f"\nTraced ping-pong, export off vs on ({p['rounds']} rounds in "
          f"{p['elapsed_s']:.0f} s; {p['workload']}; blocked-read threshold "
          f"{p['blocked_ms']:g} ms; span limit "
          f"{'none' if p['span_rate'] is None else format(p['span_rate'], 'g') + '/s'}; "
          f"server and loadgen on CPU {p['cpu']}, otelwater on {p['bench_cpus']})")
    print(f"{'':22}{'server us/Read':>16}{'otelwater CPU s':>17}")
    for c in CONDITIONS:
        print(f"{CONDITION_TEXT[c]:22}{p['us_per_read'][c]:>16.2f}"
              f"{p['otelwater_cpu_s'][c]:>17.3f}")
    lo, hi = p["ratio_range"]
    sp = p["spans"]
    per_span = p["added_cpu_ms_per_1000_spans"]
    print(f"server CPU per Read, on / off: {p['ratio']:.3f}x [{lo:.3f}..{hi:.3f}] (median of "
          f"per-round ratios [min..max]); otelwater CPU on / off: "
          f"{p['otelwater_cpu_ratio']:.2f}x")
    print(f"export added {per_span if per_span is not None else float('nan'):.1f} ms of "
          f"otelwater CPU per 1,000 spans built ({p['added_cpu_us_per_verdict'] or 0:.1f} us "
          f"per slow read, {p['verdicts']:,} slow reads a run)")
    print(f"spans over all 'on' runs: {sp['spans_built']:,} built, {sp['spans_delivered']:,} "
          f"delivered ({sp['spans_received']:,} received), {sp['spans_limited']:,} limited, "
          f"{sp['spans_dropped']:,} dropped; {sp['records_dropped']:,} records dropped at the "
          f"sink's queue; ring-buffer records lost: off {p['records_lost']['off']:,}, "
          f"on {p['records_lost']['on']:,}")
    if p["foreign_bpf"]:
        print(f"WARNING: other processes had BPF programs attached during some runs: "
              f"{', '.join(p['foreign_bpf'][:8])}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--protocol", choices=["grpc", "http/protobuf"], default="grpc")
    ap.add_argument("--spans", type=int, default=None,
                    help="synthetic spans (default 10,000; --quick: 2,000)")
    ap.add_argument("--seconds", type=float, default=None,
                    help="seconds of metric export (default 5; --quick: 2)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="pipeline rounds, each running export off and on (default 5; "
                         "--quick: 2)")
    ap.add_argument("--pp-count", type=int, default=None,
                    help="ping-pong messages per connection, 8 connections (default 6000; "
                         "--quick: 1500)")
    ap.add_argument("--span-rate", type=float, default=SPAN_RATE,
                    help=f"the sink's span limit in the pipeline rows (default {SPAN_RATE:g} "
                         "a second; 0: none)")
    ap.add_argument("--no-pipeline", action="store_true",
                    help="only the synthetic rows (no root needed)")
    ap.add_argument("--binary", default=str(ROOT / "examples/bin/slowreader"))
    ap.add_argument("--loadgen", default=str(ROOT / "examples/bin/loadgen"))
    ap.add_argument("--quick", action="store_true", help="fewer, shorter runs (a smoke run)")
    ap.add_argument("--json", metavar="OUT")
    a = ap.parse_args()
    a.spans = a.spans or (2_000 if a.quick else 10_000)
    a.seconds = a.seconds or (2.0 if a.quick else 5.0)
    a.rounds = a.rounds or (2 if a.quick else 5)
    a.pp_count = a.pp_count or (1500 if a.quick else 6000)
    a.binary, a.loadgen = os.path.realpath(a.binary), os.path.realpath(a.loadgen)
    pipeline = None
    if not a.no_pipeline:
        if os.geteuid() != 0:
            print("pipeline rows skipped: they load BPF programs (run as root, or pass "
                  "--no-pipeline)", file=sys.stderr)
        else:
            pipeline = pipeline_cost(a)
    s = spans_cost(a.protocol, a.spans)
    p = points_cost(a.protocol, a.seconds)
    print(f"OTLP export cost ({a.protocol}, local receiver in another process), "
          f"{os.cpu_count()} CPUs")
    print(f"{'':10}{'export off':>14}{'export on':>14}{'per 1,000':>14}")
    print(f"{'spans':10}{s['off_cpu_s']:>13.3f}s{s['on_cpu_s']:>13.3f}s"
          f"{s['cpu_ms_per_1000_spans']:>11.1f} ms   ({s['spans']:,} sent, "
          f"{s['received']:,} received; write() alone "
          f"{s['write_path_ms_per_1000_spans']:.1f} ms)")
    print(f"{'points':10}{p['off_cpu_s']:>13.3f}s{p['on_cpu_s']:>13.3f}s"
          f"{p['cpu_ms_per_1000_points'] or 0:>11.1f} ms   ({p['points']:,} exported, "
          f"{p['received']:,} received in {p['seconds']:g} s)")
    if pipeline is not None:
        print_pipeline(pipeline)
    if a.json:
        Path(a.json).write_text(json.dumps({"spans": s, "points": p, "pipeline": pipeline},
                                           indent=1))


if __name__ == "__main__":
    main()
