"""`otelwater correlate FILE --otlp-endpoint`: a recording's analysis re-exported over OTLP, as
a Sink the pipeline feeds (every record after analysis, in time order), in bounded memory.

    sink = offline_sink(header, endpoint=..., protocol=..., out=sys.stderr, config=config)
    ... the pipeline: sink.start(run), sink.write(batch) ..., sink.close(timeout_s)
    sink.shortfall()     # None, or "delivered X of Y spans and A of B metric points"

The resources are the recorded services (header.processes, then the process records of the
file) with the recording's clock offset, attach time and thresholds. Spans are the live sink's
(otlp.spans: one per verdict, the read's story, its evidence and the alerts near it as events,
the child of the request's span when the recorded read names it), built as the verdicts come
and sent in batches of SPAN_BATCH on the caller's thread, so a recording's
spans never wait in memory (a slow Collector slows the reading down instead of dropping). A
verdict's socket ends come from its evidence, and lost records are counted in the metrics but
get no span (as the re-export has always done).

Metric points keep the recording's times: the SDK would date them at the export, so no
MeterProvider exports here; the points are built from the records as they come
(otelwater.export.offline_metrics, the same series rules as live: otelwater.export.series)
and handed to the metric exporter at close().

The first request that fails ends its kind (spans, or points): the rest are counted as not
delivered, so a Collector that is down costs one request timeout for each, not one per batch,
and at most `timeout_s` in all. Nothing is said while it happens: shortfall() gives the one
line `correlate` exits 6 with.
"""

from __future__ import annotations

import socket as socketlib
import time
from typing import IO

from otelwater import names as N
from otelwater.clock import WallClock
from otelwater.export.offline_metrics import OfflineMetrics
from otelwater.export.otlp.health import (ExportHealth, _count_points,
                                          _counting_metric_exporter, diagnoser)
from otelwater.export.otlp.options import (ExportOptions, quiet_sdk_logs, request_timeout_s,
                                           resolve_options)
from otelwater.export.otlp.resources import Identity, Services
from otelwater.export.otlp.spans import WINDOW_NS, AlertWindow, SpanSender, read_span
from otelwater.export.series import OWN
from otelwater.export.sink import RunInfo, Sink

SPAN_BATCH = 512                # spans a request
TIMEOUT_S = 10.0                # close()'s deadline when none is given


class SpanBatches:
    """The span processor every service of the offline sink shares: the spans (otlp.spans
    SpanData) go out in batches of `size` on the caller's thread, through otlp.spans.SpanSender
    (built requests, the SDK exporter's transport); after a request fails, the rest are
    counted as dropped without trying."""

    def __init__(self, exporter, health: ExportHealth, size: int = SPAN_BATCH):
        self.sender = SpanSender(exporter, health)
        self.health = health
        self.size = size
        self.batch: list = []
        self.failed = False
        self.failed_since: float | None = None   # when the request that failed began
        self._shut = False

    def add_span(self, resource, span) -> None:
        self.batch.append((resource, span))
        if len(self.batch) >= self.size:
            self._send()

    def _send(self) -> None:
        batch, self.batch = self.batch, []
        if not batch:
            return
        if self.failed or self._shut:
            self.health.dropped(spans=len(batch))
            return
        started = time.monotonic()
        if not self.sender.send(batch):
            self.failed = True
            self.failed_since = started

    def force_flush(self) -> bool:
        self._send()
        return not self.failed

    def shutdown(self) -> None:
        if self._shut:
            return
        self._send()
        self._shut = True
        self.sender.shutdown()


class OfflineOtlpSink(Sink):
    """Records after Analysis in (every kind, in time order), spans and metric points at the
    recording's times out (module docstring)."""

    name = "OTLP export"
    ignores = frozenset({"notice", "summary"})

    def __init__(self, opts: ExportOptions, header, *, out: IO[str] | None = None,
                 config=None, timeout_s: float = TIMEOUT_S, span_exporter=None,
                 metric_exporter=None):
        quiet_sdk_logs()
        self.opts = opts
        self.header = header
        self.config = config
        self.timeout_s = timeout_s
        # what was not delivered is said once, by the caller (shortfall()), not as it happens,
        # with its cause (found once, at the end)
        self.spans_timeout_s = min(max(1.0, timeout_s / 2), request_timeout_s("TRACES"))
        injected = span_exporter is not None or metric_exporter is not None   # tests
        self.health = ExportHealth(opts.target, out, outages_said=False,
                                   diagnose=None if injected else
                                   diagnoser(opts, self.spans_timeout_s))
        self.recorded = dict(getattr(header, "processes", {}) or {})   # pid -> ProcessInfo
        host = (getattr(header, "host", None) or {}).get("name") or socketlib.gethostname()
        self.clock = WallClock.from_recording(header.clock)
        # a Collector that is down costs at most `timeout_s` in all, as before the export
        # streamed: the spans' requests half of it; the points what is left after a failure
        spans = (span_exporter if span_exporter is not None
                 else opts.span_exporter(timeout_s=self.spans_timeout_s))
        self.batches = SpanBatches(spans, self.health)
        self._metric_exporter = metric_exporter   # tests: instead of opts.metric_exporter()
        known = self.recorded
        self.registry = Services(make_pipeline=lambda: (self.batches, None),
                                 identity=lambda pid: known.get(pid) or Identity(pid),
                                 host=host, traced_pids=known.keys())
        self.registry.run[N.CLOCK_OFFSET_NS] = self.clock.offset_ns
        self.alerts = AlertWindow(WINDOW_NS)
        self.metrics = OfflineMetrics(header.start_ns, self.clock.offset_ns, traced=known)
        self.spans = 0
        self._started = False
        self._closed = False

    # -- the run -------------------------------------------------------------------------------

    def start(self, run: RunInfo | None = None) -> None:
        """The recording's attach time and the analysis's thresholds on every resource (the
        spans alone then give the same verdicts); the recorded services' resources now."""
        self._started = True
        start_ns = run.start_ns if run is not None else self.header.start_ns
        config = run.config if run is not None and run.config is not None else self.config
        self.registry.set_run(start_ns, config)
        self.registry.get(OWN)
        for pid in sorted(self.registry.traced):
            self.registry.get(pid)

    def write(self, records: list) -> None:
        if self._closed:
            return
        if not self._started:
            self.start()
        records = records if isinstance(records, list) else list(records)
        self.metrics.learn(records)
        self.handle(records)

    def on_snapshot(self, s) -> None:
        self.metrics.on_snapshot(s)

    def on_read(self, r) -> None:
        self.metrics.on_read(r)

    def on_lost(self, r) -> None:
        self.metrics.on_lost(r)

    def on_counts(self, c) -> None:
        self.metrics.on_counts(c)     # (its process's resource is made at close())

    def on_process(self, p) -> None:
        self.metrics.on_process(p)
        if p.pid not in self.recorded:   # the header's (or the first) description wins
            self.recorded[p.pid] = p
            self.registry.learn(p)

    def on_alert(self, a) -> None:
        self.alerts.add(a)
        self.metrics.on_alert(a)

    def on_verdict(self, v) -> None:
        r = v.read
        svc = self.registry.get(r.pid)
        ev = v.evidence[0] if v.evidence else None
        ends = (ev.laddr, ev.lport, ev.raddr, ev.rport) if ev is not None else None
        span = read_span(v, ends, self.alerts.near(r), self.clock.wall_ns)
        svc.emit(span)
        self.spans += 1
        self.metrics.verdict(v, (span.trace_id, span.span_id))

    # -- the end -------------------------------------------------------------------------------

    def flush(self, timeout_s: float = TIMEOUT_S) -> bool:
        """Send the spans waiting for a full batch (the points go at close())."""
        return self.batches.force_flush()

    def close(self, timeout_s: float | None = None) -> None:
        """The last spans, then every metric point (the first request that fails ends them),
        each request's timeout at most what is left of `timeout_s` (at least 1 s). What was
        not delivered is the caller's to say, once (shortfall())."""
        from opentelemetry.sdk.metrics.export import MetricExportResult

        if self._closed:
            return
        self._closed = True
        if not self._started:
            self.start()
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        self.batches.force_flush()
        if self.batches.failed_since is not None:   # the spans' failure used up part of it
            deadline = min(deadline, self.batches.failed_since + self.timeout_s)
        self.metrics.finish()
        resources = {key: self.registry.get(key).resource for key in self.metrics.owners()}
        left = max(1.0, deadline - time.monotonic())
        inner = (self._metric_exporter if self._metric_exporter is not None
                 else self.opts.metric_exporter(timeout_s=left))
        exporter = _counting_metric_exporter(inner, self.health)
        failed = False
        try:
            for data in self.metrics.batches(resources.__getitem__):
                if failed:
                    self.health.dropped(points=_count_points(data))
                else:
                    failed = exporter.export(data) != MetricExportResult.SUCCESS
        finally:
            exporter.shutdown()
            self.batches.shutdown()
            for svc in self.registry.all():
                svc.shutdown(0.0)

    def shortfall(self) -> str | None:
        """None when every span and metric point was delivered, else what was, and why when
        a request failed (the cause is found once, here: at most ~2 s more)."""
        h = self.health
        if h.spans_exported >= self.spans and not h.points_dropped:
            return None
        cause = self.cause()
        return (f"delivered {h.spans_exported} of {self.spans} spans and {h.points_exported} "
                f"of {h.points_exported + h.points_dropped} metric points"
                + (f": {cause.text}" if cause else ""))

    def cause(self):
        """Why the export failed (an otlp.health.Cause, its text and fix), or None: no
        request failed, or no way to tell."""
        h = self.health
        return h.cause() if h.spans_dropped or h.points_dropped else None


def offline_sink(header, *, endpoint: str | None = None, protocol: str | None = None,
                 out: IO[str] | None = None, config=None,
                 timeout_s: float = TIMEOUT_S) -> OfflineOtlpSink | None:
    """The Sink re-exporting a recording's analysis (module docstring); None when export is
    off (no endpoint given and no OTEL_EXPORTER_OTLP_*ENDPOINT). `header`: the input's
    otelwater.events.recording.Header (processes, clock, host, start_ns)."""
    opts = resolve_options(endpoint, protocol)
    if opts is None:
        return None
    return OfflineOtlpSink(opts, header, out=out, config=config, timeout_s=timeout_s)
