#!/usr/bin/env python3
"""otelwater's CPU per span (with its events) and per 1,000 metric points exported over OTLP,
the span path of issue 18 beside the SDK's own (the way spans were built before it) in one
run; and, as root, what export costs the traced ping-pong.

    .venv/bin/python bench/export_cost.py [--protocol grpc|http/protobuf] [--spans N]
        [--rounds N] [--seconds S] [--pipeline-rounds N] [--span-rate R] [--no-pipeline]
        [--quick] [--json OUT]

Synthetic rows (no root): records shaped like `watch`'s (a parked read on a dialed socket:
its send, the arrival that woke it, its verdict with 2 evidence snapshots, so its span has 6
events: the park, "request sent", "response arrives", the return, 2 water snapshots; every
other read is linked to a request's span) go through the real OtlpSink and the SDK's real
OTLP exporter to a local receiver (tests/integration/otlp_receiver.py) in another process, so
only otelwater's side is counted. CPU is this process's user+system time (time.process_time:
every thread, so the sink's worker and the export threads are included). Conditions, each
with a fresh receiver and sink, in an order rotating every round (--rounds, median of the
per-round figures):

  off        build the N (read, verdict) records and hand them to nothing.
  no spans   the same, written to a sink whose span limit lets none through (the metrics
             still count every read): the cost of a slow read without its span.
  new        written to a sink with no span limit: spans built by otlp.spans (SpanData, the
             request built with opentelemetry-proto, sent by the SDK exporter's transport).
  SDK        the same spans built the SDK's way, as before issue 18: Tracer.start_span with
             the attributes, add_event per event, a BatchSpanProcessor per service, the SDK
             exporter's own encoder (OldStyleSink below).
  Every write is 500 records at a time with 0.3 s between (~1,600 spans a second, below what
  export keeps up with: none is dropped), then close(); every span is checked against the
  receiver's count. A span's cost = (CPU of the condition - CPU of "no spans") / N: what a
  span and its events add, end to end to the receiver. A slow read's = (CPU - off) / N.
  points   off: S seconds of sleep with the sockets' snapshots held in a dict.
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
export threads), spans delivered / limited / dropped and the receiver's count. Ratios are per
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
SPAN_CONDITIONS = ("off", "no spans", "new", "SDK")


def snap(ts, key, volume=0, lport=8080, level=1):
    return WaterSnapshot(ts, key, PID, "svc", PID, 1, "127.0.0.1", lport, "10.0.0.5",
                         40000 + key % 20000, level, volume, volume // 2, 1 << 17, 0, 0, 0, "",
                         7 * ts % 2**32, 5 * ts % 2**32, "arrival", "ESTABLISHED", 9)


def records(i: int) -> list:
    """A parked read on a dialed socket and its verdict (figures varying from read to read, as
    live ones do): request sent 1 ms into the park, the response 3 ms later, the return 1 ms
    after; every other read names a request's span."""
    t = 1_000 * MS + i * 6 * MS
    key = 1 + i % 8
    peer, run = 3 * MS + i % 977, MS + i % 89
    send, arrival = t + MS, t + MS + peer
    end = arrival + run
    ev = (snap(t - MS, key, 640 + i % 61, level=1 + i % 3), snap(arrival, key, 96 + i % 7))
    linked = i % 2 == 0
    r = ReadRecord(t, end, PID, PID + 1, 17 + key, 3, key, 4096, 64 + i % 500,
                   ("internal/poll.(*FD).Read", "net.(*netFD).Read", "net.(*conn).Read",
                    "main.handle", "main.serve"), "tracepoint", "svc", True, arrival,
                   role="dialed", peer_addr="10.0.0.5", peer_port=5432, ts_send_ns=send,
                   ts_prev_arrival_ns=t - 2 * MS, kernel_verdict="peer-starved",
                   trace_id=f"{i + 1:032x}" if linked else "",
                   parent_span_id=f"{i + 7:016x}" if linked else "",
                   go_start="main.worker")
    return [r, Verdict(r, "peer-starved", f"waited {peer / 1e6:.3f} ms from our send for the "
                       "peer's data", peer, run, None, ev, 2, True, wait_idle_ns=MS)]


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


def sink_for(protocol: str, endpoint: str, interval_s: float = 60.0, old_style=False,
             **kw) -> OtlpSink:
    cls = OldStyleSink if old_style else OtlpSink
    return cls.for_options(ExportOptions(protocol, endpoint, endpoint),
                           identity=lambda pid: Identity(pid, service_name="bench"),
                           clock=WallClock.measure(), endpoints=None,
                           metric_interval_s=interval_s, out=sys.stderr, **kw)


class OldStyleSink(OtlpSink):
    """The sink building its spans the SDK's way, as otelwater did before issue 18 (for the
    side-by-side rows only): the same span (name, attributes, events, parent) started on a
    Tracer of a TracerProvider per service, its events added one by one, ended into a
    BatchSpanProcessor whose SDK exporter encodes it itself."""

    @classmethod
    def for_options(cls, opts, *, out=None, metric_interval_s=None, **kw):
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        from otelwater.export.otlp import ExportHealth
        from otelwater.export.otlp.health import (_bounded_batch_processor,
                                                  _counting_metric_exporter,
                                                  _counting_span_exporter)

        health = ExportHealth(opts.target, out)

        def pipeline():
            spans, metrics = opts.exporters()
            return (_bounded_batch_processor(_counting_span_exporter(spans, health), health),
                    PeriodicExportingMetricReader(_counting_metric_exporter(metrics, health),
                                                  export_interval_millis=metric_interval_s
                                                  * 1000))

        return cls(make_pipeline=pipeline, health=health, **kw)

    def on_verdict(self, v) -> None:
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.trace import SpanKind

        from otelwater import __version__
        from otelwater.export.otlp.spans import read_span

        r = v.read
        self.registry.trace(r.pid)
        svc = self.registry.get(r.pid)
        self.metrics.read(r)
        if self.budget is not None and not self.budget.take():
            self.metrics.verdict(svc, v)
            svc.limited.add(1)
            return
        tracer = getattr(svc, "old_tracer", None)
        if tracer is None:
            provider = TracerProvider(resource=svc.resource, shutdown_on_exit=False)
            provider.add_span_processor(svc.span_processor)
            tracer = svc.old_tracer = provider.get_tracer("otelwater", __version__)
        s = read_span(v, self._ends_of(v), self.alerts.near(r), self.clock.wall_ns)
        parent = None
        if s.parent_id:
            parent = trace.set_span_in_context(trace.NonRecordingSpan(trace.SpanContext(
                s.trace_id, s.parent_id, True, trace.TraceFlags(1))))
        span = tracer.start_span(s.name, context=parent, kind=SpanKind.INTERNAL,
                                 attributes=s.attributes, start_time=s.start_ns)
        for ts, name, attrs in s.events:
            span.add_event(name, attrs, timestamp=ts)
        with trace.use_span(span, end_on_exit=False):
            self.metrics.verdict(svc, v)
        span.end(end_time=s.end_ns)
        self.spans += 1


def cpu() -> float:
    return time.process_time()


def span_run(cond: str, protocol: str, n: int) -> dict:
    """One condition of the span rows: CPU of writing n (read, verdict) pairs and closing."""
    gc.collect()
    if cond == "off":
        t0 = cpu()
        for i in range(n):
            batch = records(i)
            del batch
        return {"cpu_s": cpu() - t0, "spans": 0, "received": 0}
    rx = Receiver(protocol)
    sink = sink_for(protocol, rx.endpoint, old_style=cond == "SDK",
                    span_rate=1e-9 if cond == "no spans" else None)
    t0 = cpu()
    for i in range(n):
        sink.write(records(i))
        if i % PACE == PACE - 1:   # ~1,600 spans a second: below what export keeps up with,
            time.sleep(0.3)        # so none is dropped at a queue (all are counted anyway)
    sink.close(timeout_s=60)
    used = cpu() - t0
    got = rx.counts()
    return {"cpu_s": used, "spans": sink.spans, "received": got["spans"],
            "delivered": sink.health.spans_exported, "dropped": sink.health.spans_dropped}


def spans_cost(protocol: str, n: int, rounds: int) -> dict:
    """The span rows (module docstring): `rounds` rounds of every condition, order rotating."""
    runs: dict[str, list] = {c: [] for c in SPAN_CONDITIONS}
    for k in range(rounds):
        order = SPAN_CONDITIONS[k % 4:] + SPAN_CONDITIONS[:k % 4]
        for cond in order:
            runs[cond].append(span_run(cond, protocol, n))
        print(f"span round {k + 1}/{rounds}", file=sys.stderr, flush=True)
    med = statistics.median
    per_span = {c: [(runs[c][k]["cpu_s"] - runs["no spans"][k]["cpu_s"]) / n * 1e6
                    for k in range(rounds)] for c in ("new", "SDK")}
    per_read = {c: [(runs[c][k]["cpu_s"] - runs["off"][k]["cpu_s"]) / n * 1e6
                    for k in range(rounds)] for c in ("no spans", "new", "SDK")}
    return {"n": n, "rounds": rounds, "runs": runs,
            "us_per_span": {c: med(v) for c, v in per_span.items()},
            "us_per_span_range": {c: [min(v), max(v)] for c, v in per_span.items()},
            "us_per_read": {c: med(v) for c, v in per_read.items()},
            "received": {c: sum(r["received"] for r in runs[c]) for c in ("new", "SDK")},
            "sent": {c: sum(r["spans"] for r in runs[c]) for c in ("new", "SDK")}}


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
    """The export on/off rows: `args.pipeline_rounds` rounds, each running both conditions
    once."""
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
    for r in range(args.pipeline_rounds):
        order = CONDITIONS if r % 2 == 0 else CONDITIONS[::-1]
        for cond in order:
            runs[cond].append(pipeline_run(cond, wl, args))
        print(f"pipeline round {r + 1}/{args.pipeline_rounds} ({time.monotonic() - t0:.0f} s)",
              file=sys.stderr, flush=True)
    med = statistics.median
    off, on = runs["off"], runs["on"]
    added = [a["otelwater_cpu_s"] - o["otelwater_cpu_s"] for a, o in zip(on, off)]
    per_span = [d / a["spans_built"] * 1e6 for d, a in zip(added, on) if a["spans_built"]]
    per_verdict = [d / a["verdicts"] * 1e6 for d, a in zip(added, on) if a["verdicts"]]
    return {
        "workload": wl["text"], "blocked_ms": BLOCKED_MS,
        "span_rate": args.span_rate or None, "cpu": args.cpu, "bench_cpus": sorted(rest),
        "elapsed_s": time.monotonic() - t0, "runs": runs, "rounds": args.pipeline_rounds,
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


def print_spans(s: dict, protocol: str) -> None:
    us, rng, rd = s["us_per_span"], s["us_per_span_range"], s["us_per_read"]
    print(f"Spans with 6 events each ({protocol}, local receiver in another process), "
          f"{s['n']:,} slow reads a run, {s['rounds']} rounds, {os.cpu_count()} CPUs")
    print(f"{'':34}{'CPU a span':>12}{'[min..max]':>20}{'a slow read':>14}")
    print(f"{'metrics only (no spans)':34}{'':>12}{'':>20}{rd['no spans']:>11.1f} us")
    for c, text in (("new", "new path (otlp.spans)"), ("SDK", "SDK path (before issue 18)")):
        lo, hi = rng[c]
        print(f"{text:34}{us[c]:>9.1f} us{f'[{lo:.1f}..{hi:.1f}]':>20}{rd[c]:>11.1f} us")
    print(f"spans sent / received: new {s['sent']['new']:,} / {s['received']['new']:,}, "
          f"SDK {s['sent']['SDK']:,} / {s['received']['SDK']:,}; SDK / new: "
          f"{us['SDK'] / us['new']:.1f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--protocol", choices=["grpc", "http/protobuf"], default="grpc")
    ap.add_argument("--spans", type=int, default=None,
                    help="slow reads a span run (default 10,000; --quick: 2,000)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="rounds of the span rows, each running every condition (default 5; "
                         "--quick: 2)")
    ap.add_argument("--seconds", type=float, default=None,
                    help="seconds of metric export (default 5; --quick: 2)")
    ap.add_argument("--pipeline-rounds", type=int, default=None,
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
    a.rounds = a.rounds or (2 if a.quick else 5)
    a.seconds = a.seconds or (2.0 if a.quick else 5.0)
    a.pipeline_rounds = a.pipeline_rounds or (2 if a.quick else 5)
    a.pp_count = a.pp_count or (1500 if a.quick else 6000)
    a.binary, a.loadgen = os.path.realpath(a.binary), os.path.realpath(a.loadgen)
    pipeline = None
    if not a.no_pipeline:
        if os.geteuid() != 0:
            print("pipeline rows skipped: they load BPF programs (run as root, or pass "
                  "--no-pipeline)", file=sys.stderr)
        else:
            pipeline = pipeline_cost(a)
    s = spans_cost(a.protocol, a.spans, a.rounds)
    p = points_cost(a.protocol, a.seconds)
    print_spans(s, a.protocol)
    print(f"metric points: {p['cpu_ms_per_1000_points'] or 0:.1f} ms per 1,000 "
          f"({p['points']:,} exported, {p['received']:,} received in {p['seconds']:g} s)")
    if pipeline is not None:
        print_pipeline(pipeline)
    if a.json:
        Path(a.json).write_text(json.dumps({"spans": s, "points": p, "pipeline": pipeline},
                                           indent=1))


if __name__ == "__main__":
    main()
