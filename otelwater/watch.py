"""`otelwater watch`: the kernel probe (and optionally a Go read sampler) into the live view or
JSON Lines."""

from __future__ import annotations

import contextlib
import contextvars
import sys
import time

from otelwater.events.model import LostEvents, Notice, ReadRecord, WaterSnapshot
from otelwater.export.jsonl import JsonLinesSink
from otelwater.export.live import LiveView, WaterBoard
from otelwater.alerts.stage import AlertTransition
from otelwater.events.verdict import Verdict
from otelwater.pipeline import Analysis, Stopper, WatchLoop
from otelwater.probes.kernel import WaterOptions, WaterProbe


# `watch --record FILE` and `otelwater record` (otelwater/cli_record.py) run watch's own command
# with (recording Writer, headless) set here. Headless (`record`): no live view, no analysis.
RECORDING: contextvars.ContextVar = contextvars.ContextVar("otelwater_recording", default=None)


def describe(pids, ports, cgroups) -> str:
    parts = []
    if pids:
        parts.append("pid " + ",".join(map(str, pids)))
    if ports:
        parts.append("port " + ",".join(map(str, ports)))
    if cgroups:
        parts.append("cgroup " + ",".join(cgroups))
    return " and ".join(parts) if parts else "all TCP sockets"


def open_readers(go_binary, go_pids, probes, blocked_ns):
    if not go_binary and not go_pids:
        return contextlib.nullcontext(None)
    from otelwater.probes.goread import GoReadOptions, GoReadSampler

    # the sampler is compiled into the water probe's program, which hands it each read's
    # socket and queue evidence (the uprobe sampler only when one binary is traced)
    return GoReadSampler(GoReadOptions(binary=go_binary, pids=frozenset(go_pids),
                                       mechanism=probes, threshold_ns=blocked_ns, embed=True))


def run_watch(*, pids, ports, cgroups, duration, interval, as_json, follow, high_water,
              ringbuf_pages, rows, go_binary=None, go_pids=(), probes="tracepoint",
              blocked_ns=None, config=None, recorder=None, headless=False,
              otlp=None, prometheus=None) -> None:
    from otelwater.config import Config

    if recorder is None and RECORDING.get() is not None:
        recorder, headless = RECORDING.get()   # the caller closes it (the end record)

    config = config or Config()
    if blocked_ns is None:
        blocked_ns = config.correlate.threshold_ns
    opts = WaterOptions(ports=frozenset(ports), pids=frozenset(pids),
                        cgroups=frozenset(cgroups), follow=follow, high_water=high_water,
                        ringbuf_pages=ringbuf_pages)
    what = describe(pids, ports, cgroups)
    board = WaterBoard()
    exporter = None
    if (otlp is not None or prometheus is not None) and not headless:
        # OTLP and/or --prometheus-port: the records after analysis, in every mode
        from otelwater.export.prometheus import export_sink

        exporter = export_sink(otlp, prometheus, traced_pids=go_pids,
                               window_ns=config.correlate.window_ns,
                               span_rate=config.export.span_rate or None)
    with Stopper() as stopper, \
            open_readers(go_binary, go_pids, probes, blocked_ns) as readers, \
            WaterProbe(opts, readers=readers if readers and readers.embedded else None) \
            as water:
        # reads that began before this moment are "unknown": their start was not seen
        start_ns = time.monotonic_ns()
        analysis = Analysis(config, start_ns=start_ns)
        if exporter is not None:   # on its resources: the spans alone give the same verdicts
            exporter.started(start_ns, config)
        if recorder is not None:
            recorder.start(start_ns, config=config.to_dict(), pids=(*pids, *go_pids))

        def analyse(records):
            if recorder is not None:  # raw records, before analysis, so correlate can redo it
                recorder.write(records)
            return analysis.process(records)

        if readers is not None:
            target = go_binary or "pid " + ",".join(map(str, go_pids))
            what += f"; Go reads of {target} by {probes}"
        print(f"Tracing TCP receive queues ({what}) with eBPF tracepoints"
              + (f" for {duration:g}s" if duration else "") + ". Ctrl-C to stop.",
              file=sys.stderr, flush=True)
        if recorder is not None:
            print(f"Recording to {recorder.path}.", file=sys.stderr, flush=True)
        if exporter is not None and otlp is not None:
            print(f"Exporting over OTLP ({otlp.protocol}) to {otlp.target}.", file=sys.stderr,
                  flush=True)
        verdicts: dict[str, int] = {}

        def count(records):
            if exporter is not None:
                exporter.write(records)
            for r in records:
                if isinstance(r, WaterSnapshot):
                    board.add(r)
                elif isinstance(r, ReadRecord):
                    board.add_read(r)
                elif isinstance(r, Verdict):
                    board.add_verdict(r)
                    verdicts[r.verdict] = verdicts.get(r.verdict, 0) + 1
                elif isinstance(r, AlertTransition):
                    board.add_alert(r)
                elif isinstance(r, LostEvents):
                    board.lost_by_probe[r.probe] = r.lost_total
                elif isinstance(r, Notice):
                    print(f"otelwater: {r.text}", file=sys.stderr, flush=True)

        if headless:
            loop = WatchLoop(water, lambda rs: (recorder.write(rs), count(rs)),
                             interval_s=interval, duration_s=duration, readers=readers)
            loop.run(stopper)
        elif as_json:
            sink = JsonLinesSink()

            def on_records(records):
                records = analyse(records)
                count(records)
                sink.write(records)

            loop = WatchLoop(water, on_records, interval_s=interval, duration_s=duration,
                             readers=readers)
            loop.run(stopper)
            last = analysis.finish()
            count(last)
            sink.write(last)
            sink.write(_Summaries(analysis))
        else:
            with LiveView(f"otelwater watch: {what}", rows=rows) as view:
                loop = WatchLoop(water, lambda rs: count(analyse(rs)),
                                 lambda: view.show(board), interval_s=interval,
                                 duration_s=duration, readers=readers)
                loop.run(stopper)
                count(analysis.finish())
                view.show(board)
        if readers is not None:
            st = readers.stats()
            reads = (f", {st.reads} Go reads ({st.blocked} blocked, {st.queue_slow} found "
                     f"data that waited; mean wait {st.mean_latency_ns / 1e3:.0f} us a read)")
            if verdicts:
                reads += "; slow reads: " + ", ".join(
                    f"{n} {v}" for v, n in sorted(verdicts.items(), key=lambda x: -x[1]))
        else:
            reads = ""
    if exporter is not None:
        exporter.close()   # within its deadline, the probes already detached
    print(f"otelwater: {board.records} snapshots{reads}, {board.lost} lost records; "
          f"{own_cost()}", file=sys.stderr)


class _Summary:
    def __init__(self, d: dict):
        self.d = d

    def to_json(self) -> dict:
        return self.d


def _Summaries(analysis) -> list:
    """The per-socket and per-reader summaries, as records for the JSON Lines sink."""
    return [_Summary(d) for d in analysis.socket_summaries() + analysis.reader_summaries()]


def own_cost() -> str:
    """otelwater's own CPU time and memory, so users see what watching cost (user space)."""
    import psutil

    me = psutil.Process()
    cpu = me.cpu_times()
    return (f"otelwater used {cpu.user + cpu.system:.2f} s CPU, "
            f"{me.memory_info().rss / 2**20:.0f} MiB RSS")
