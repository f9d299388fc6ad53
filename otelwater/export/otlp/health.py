"""Export failures, counted and said once: ExportHealth, and the wrappers around the SDK's
exporters and batch processor that count what they deliver and drop.

A slow or absent Collector never holds the sink: ending a span only appends to the bounded
queue of a BatchSpanProcessor (max_queue_size MAX_QUEUE; a full queue drops the span and
counts it), metrics are exported by a PeriodicExportingMetricReader on its own thread, and the
SDK's exporters retry by themselves. Failures are counted; the first is said once on stderr,
and again when export works again.
"""

from __future__ import annotations

import sys
import threading
from typing import IO

MAX_QUEUE = 2048                # spans waiting for export, per service


class ExportHealth:
    """What export could not deliver, counted; the first failure of an outage is said once
    on `out` ("failing ... still retrying"), and the first success after it ("works again")."""

    def __init__(self, target: str | None, out: IO[str] | None = None, *,
                 outages_said: bool = True):
        self.target = target        # None: a sink with no OTLP destination (Prometheus only)
        self.outages_said = outages_said   # False: the caller says the outcome once, at the end
        self.name = f"OTLP export to {target}" if target else "export"
        self.out = out if out is not None else sys.stderr
        self.lock = threading.Lock()
        self.spans_exported = 0
        self.spans_dropped = 0          # failed exports and a full queue
        self.points_exported = 0
        self.points_dropped = 0
        self.failing = False
        self.outages = 0
        self.overflowed = 0             # spans dropped because the queue was full
        self.records_dropped = 0        # records write() found no room for in the sink's queue
        self.records_abandoned = 0      # records still queued when close() ran out of time
        self.spans_limited = 0          # slow reads beyond the span rate: metrics, no span
        self.errors = 0                 # batches the worker failed on (a bug: said once)

    def _say(self, text: str) -> None:
        try:
            print(f"otelwater: {text}", file=self.out, flush=True)
        except (OSError, ValueError):
            pass

    def exported(self, spans: int = 0, points: int = 0) -> None:
        with self.lock:
            self.spans_exported += spans
            self.points_exported += points
            if not self.failing:
                return
            self.failing = False
            msg = (f"OTLP export to {self.target} works again ({self.spans_dropped} spans, "
                   f"{self.points_dropped} metric points dropped so far)")
        if self.outages_said:
            self._say(msg)

    def overflow(self, spans: int = 1) -> None:
        """Spans dropped at a full queue: more slow reads than export keeps up with (or a
        Collector that is down); counted, said the first time only."""
        with self.lock:
            self.spans_dropped += spans
            self.overflowed += spans
            first = self.overflowed == spans
        if first:
            self._say(f"OTLP export to {self.target} cannot keep up: its queue of "
                      f"{MAX_QUEUE} spans is full, the oldest are dropped (counted)")

    def queue_full(self, records: int, size: int) -> None:
        """Records write() had no room for: the worker is behind by a whole queue (more records
        than export keeps up with); counted, said the first time only."""
        with self.lock:
            self.records_dropped += records
            first = self.records_dropped == records
        if first:
            self._say(f"{self.name} cannot keep up: its queue of {size} records is full, "
                      "new records are dropped (counted)")

    def limited(self, spans: int, rate: float) -> None:
        """Slow reads beyond the span rate: counted, said the first time only."""
        with self.lock:
            self.spans_limited += spans
            first = self.spans_limited == spans
        if first:
            self._say(f"{self.name}: more than {rate:g} slow reads a second; those beyond get "
                      "no span (counted in otelwater.spans.limited; every read still counts in "
                      "the verdict and duration metrics)")

    def failed(self, records: int, error: BaseException) -> None:
        """A batch the worker could not finish (a bug, not the Collector): its records are
        counted as dropped (those before the error did go out), the first error said."""
        with self.lock:
            self.errors += 1
            self.records_dropped += records
            first = self.errors == 1
        if first:
            self._say(f"{self.name}: a batch of {records} records stopped at an internal "
                      f"error ({type(error).__name__}: {error}); please report it")

    def dropped(self, spans: int = 0, points: int = 0) -> None:
        with self.lock:
            self.spans_dropped += spans
            self.points_dropped += points
            if self.failing:
                return
            self.failing = True
            self.outages += 1
            msg = (f"OTLP export to {self.target} failing ({self.spans_dropped} spans, "
                   f"{self.points_dropped} metric points dropped so far); still retrying")
        if self.outages_said:
            self._say(msg)


def _count_points(metrics_data) -> int:
    n = 0
    for rm in metrics_data.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                n += len(m.data.data_points)
    return n


def _counting_span_exporter(inner, health: ExportHealth):
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    class CountingSpanExporter(SpanExporter):
        def __init__(self):
            self.inner = inner

        def export(self, spans):
            try:
                result = inner.export(spans)
            except Exception:  # noqa: BLE001 - an exporter bug must not stop the worker
                result = SpanExportResult.FAILURE
            if result == SpanExportResult.SUCCESS:
                health.exported(spans=len(spans))
            else:
                health.dropped(spans=len(spans))
            return result

        def shutdown(self, timeout_millis: float = 30_000):
            inner.shutdown()

        def force_flush(self, timeout_millis: int = 30_000) -> bool:
            return inner.force_flush(timeout_millis)

    return CountingSpanExporter()


def _counting_metric_exporter(inner, health: ExportHealth):
    from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult

    class CountingMetricExporter(MetricExporter):
        def __init__(self):
            super().__init__(preferred_temporality=inner._preferred_temporality,
                             preferred_aggregation=inner._preferred_aggregation)
            self.inner = inner

        def export(self, metrics_data, timeout_millis: float = 10_000, **kw):
            points = _count_points(metrics_data)
            try:
                result = inner.export(metrics_data, timeout_millis=timeout_millis)
            except Exception:  # noqa: BLE001
                result = MetricExportResult.FAILURE
            if result == MetricExportResult.SUCCESS:
                health.exported(points=points)
            else:
                health.dropped(points=points)
            return result

        def force_flush(self, timeout_millis: float = 10_000) -> bool:
            return inner.force_flush(timeout_millis)

        def shutdown(self, timeout_millis: float = 30_000, **kw) -> None:
            inner.shutdown(timeout_millis=timeout_millis)

    return CountingMetricExporter()


def _bounded_batch_processor(exporter, health: ExportHealth, max_queue: int = MAX_QUEUE):
    """A BatchSpanProcessor whose full-queue drops are counted (the SDK only logs them)."""
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    class Bounded(BatchSpanProcessor):
        def on_end(self, span):
            q = getattr(getattr(self, "_batch_processor", None), "_queue", None)
            if q is not None and q.maxlen is not None and len(q) >= q.maxlen:
                health.overflow(1)   # the SDK drops the oldest queued span
            super().on_end(span)

    return Bounded(exporter, max_queue_size=max_queue)


def say_delivery(health: ExportHealth, built: int, *, delivers: bool, also: str = "") -> None:
    """The last line of an export that fell short: what was delivered and what was not (spans
    built but neither exported nor counted as dropped are not delivered either); `also`, more
    to say ("; ..."). Nothing when everything went out."""
    h = health
    if delivers:
        unsent = built - h.spans_exported - h.spans_dropped
        if h.spans_dropped or h.points_dropped or unsent > 0 or also:
            h._say(f"OTLP export to {h.target}: {h.spans_exported} spans and "
                   f"{h.points_exported} metric points delivered; "
                   f"{h.spans_dropped + max(0, unsent)} spans and {h.points_dropped} "
                   f"metric points not delivered{also}")
    elif also:
        h._say(f"export: {also[2:]}")


def _inner_exporters(svc) -> list:
    """The SDK exporters behind a service's span processor and metric reader (to interrupt
    their retries when the deadline has passed)."""
    out = []
    bp = getattr(svc.span_processor, "_batch_processor", None)
    exp = getattr(bp, "_exporter", None)
    if exp is not None:
        out.append(getattr(exp, "inner", exp))
    exp = getattr(svc.metric_reader, "_exporter", None)
    if exp is not None:
        out.append(getattr(exp, "inner", exp))
    return out
