"""`otelwater watch` and `otelwater record`: the kernel probe (and optionally a Go read sampler)
as the source, the sinks the options ask for, one Pipeline between them (otelwater.pipeline).

    watch            live view, or JSON Lines (--json); + OTLP / Prometheus; + --record FILE
    record           the recording only (headless): raw records, no analysis while it runs
"""

from __future__ import annotations

import contextlib
import sys
import time

from otelwater.events.model import Notice
from otelwater.export.jsonl import JsonLinesSink
from otelwater.export.live import RunStats, ViewSink
from otelwater.export.record import RecordingSink
from otelwater.export.sink import RunInfo, writing
from otelwater.pipeline import Analysis, Pipeline, Stopper, WatchLoop
from otelwater.probes.kernel import WaterOptions, WaterProbe


class LiveViewOutput(ViewSink):
    """The live view as the command's own output: essential, as --json is, so stdout on a full
    disk (or any error writing it) ends the run with one line and exit 1, the probes detached
    first; a closed pipe ends it quietly."""

    essential = True

    def tick(self) -> None:
        with writing("the live view"):
            super().tick()

    def close(self, timeout_s: float = 5.0) -> None:
        with writing("the live view"):
            super().close(timeout_s)


def describe(pids, ports, cgroups) -> str:
    parts = []
    if pids:
        parts.append("pid " + ",".join(map(str, pids)))
    if ports:
        parts.append("port " + ",".join(map(str, ports)))
    if cgroups:
        parts.append("cgroup " + ",".join(cgroups))
    return " and ".join(parts) if parts else "all TCP sockets"


def open_readers(go_binary, go_pids, probes, blocked_ns, ringbuf_pages=64, config=None):
    if not go_binary and not go_pids:
        return contextlib.nullcontext(None)
    from otelwater.probes.goread import GoReadOptions, GoReadSampler

    # the sampler is compiled into the water probe's program, which hands it each read's
    # socket and queue evidence (either mechanism, any number of binaries)
    from otelwater.config import Config

    from otelwater.events.links import LinkKeys

    config = config or Config()
    c, ln = config.correlate, config.links
    links = LinkKeys(ln.trace_key, ln.span_key, ln.encoding) if ln.enabled else None
    return GoReadSampler(GoReadOptions(binary=go_binary, pids=frozenset(go_pids),
                                       mechanism=probes, threshold_ns=blocked_ns, embed=True,
                                       ringbuf_pages=ringbuf_pages,
                                       run_ns=c.run_threshold_ns, record_rate=c.record_rate,
                                       include_idle=c.include_idle, links=links))


def run_watch(*, pids, ports, cgroups, duration, interval, as_json, follow, high_water,
              ringbuf_pages, rows, go_binary=None, go_pids=(), probes="tracepoint",
              blocked_ns=None, config=None, recorder=None, headless=False,
              otlp=None, prometheus=None, notices=()) -> None:
    """Watch until the duration, SIGINT or SIGTERM. `recorder`: a recording Writer for the raw
    records (started here, closed with the pipeline); `headless` (`record`): no analysis, no
    view, no export. `notices`: lines to say once at the start, as notice records (on stderr,
    in --json and in the recording), e.g. a Go binary that never reads a connection."""
    from otelwater.config import Config

    config = config or Config()
    if blocked_ns is None:
        blocked_ns = config.correlate.threshold_ns
    opts = WaterOptions(ports=frozenset(ports), pids=frozenset(pids),
                        cgroups=frozenset(cgroups), follow=follow, high_water=high_water,
                        ringbuf_pages=ringbuf_pages,
                        # a queue gone still is reported until the alerts can clear on it
                        still_reports=max(3, config.alerts.surge_window),
                        still_ns=config.alerts.hold_ns)
    what = describe(pids, ports, cgroups)
    stats = RunStats()
    raw_sinks = [RecordingSink(recorder)] if recorder is not None else []
    sinks: list = []
    exporter = None
    if headless:
        raw_sinks.append(stats)
    else:
        sinks.append(stats)
        sinks.append(JsonLinesSink() if as_json else LiveViewOutput(rows=rows))
        if otlp is not None or prometheus is not None:
            from otelwater.export.prometheus import export_sink

            exporter = export_sink(otlp, prometheus, traced_pids=go_pids,
                                   window_ns=config.correlate.window_ns,
                                   span_rate=config.export.span_rate or None)
            if exporter is not None:
                sinks.append(exporter)
    # the pipeline closes last: the exporter's deadline runs after the probes are detached
    with Pipeline(sinks=sinks, raw_sinks=raw_sinks) as pipeline, Stopper() as stopper, \
            open_readers(go_binary, go_pids, probes, blocked_ns, ringbuf_pages, config) \
            as readers, \
            WaterProbe(opts, readers=readers if readers and readers.embedded else None) \
            as water:
        # reads that began before this moment are "unknown": their start was not seen
        start_ns = time.monotonic_ns()
        if not headless:
            pipeline.analysis = Analysis(config, start_ns=start_ns)
        if readers is not None:
            target = go_binary or "pid " + ",".join(map(str, go_pids))
            what += f"; Go reads of {target} by {probes}"
        pipeline.start(RunInfo(start_ns, config, pids=(*pids, *go_pids), what=what))
        print(f"Tracing TCP receive queues ({what}) with eBPF tracepoints"
              + (f" for {duration:g}s" if duration else "") + ". Ctrl-C to stop.",
              file=sys.stderr, flush=True)
        if recorder is not None:
            print(f"Recording to {recorder.path}.", file=sys.stderr, flush=True)
        if exporter is not None and otlp is not None:
            print(f"Exporting over OTLP ({otlp.protocol}) to {otlp.target}.", file=sys.stderr,
                  flush=True)
        if notices:
            pipeline.feed([Notice(time.monotonic_ns(), "reads", text) for text in notices])
        # at the end each probe detaches and hands over what its ring buffer still holds
        # (WatchLoop: every record counted is delivered or counted as lost)
        pipeline.run_live(WatchLoop(water, pipeline.feed, interval_s=interval,
                                    duration_s=duration, readers=readers), stopper)
        if readers is not None:
            st = readers.stats()
            reads = (f", {st.reads} Go reads ({st.blocked} blocked, {st.queue_slow} found "
                     f"data that waited; mean wait {st.mean_latency_ns / 1e3:.0f} us a read)")
            text = stats.closing_text()   # the kernel's exact counts, idle and cut reads
            if text:
                reads += "; " + text
        else:
            reads = ""
    print(f"otelwater: {stats.snapshots} snapshots{reads}, {stats.lost} lost records; "
          f"{own_cost()}", file=sys.stderr)


def own_cost() -> str:
    """otelwater's own CPU time and memory, so users see what watching cost (user space)."""
    import psutil

    me = psutil.Process()
    cpu = me.cpu_times()
    return (f"otelwater used {cpu.user + cpu.system:.2f} s CPU, "
            f"{me.memory_info().rss / 2**20:.0f} MiB RSS")
