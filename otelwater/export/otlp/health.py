"""Export failures, counted and said once: ExportHealth, and the wrappers around the SDK's
exporters and batch processor that count what they deliver and drop.

A slow or absent Collector never holds the sink: ending a span only appends to the bounded
queue of a BatchSpanProcessor (max_queue_size MAX_QUEUE; a full queue drops the span and
counts it), metrics are exported by a PeriodicExportingMetricReader on its own thread, and the
SDK's exporters retry by themselves. Failures are counted; the first is said once on stderr,
with its cause (diagnose_endpoint: the host name does not resolve, the connection is refused,
no answer), and again when export works again.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import IO, Callable

MAX_QUEUE = 2048                # spans waiting for export, per sink
PROBE_TIMEOUT_S = 2.0           # the cause of a failure: at most this long to find it


@dataclass(frozen=True)
class Cause:
    """Why an export failed, for a person: `text` ("connection refused (nothing listens on
    127.0.0.1:4317)") and what to do about it."""

    text: str
    fix: str


def diagnose_endpoint(host: str, port: int, *, took_s: float | None = None,
                      request_timeout_s: float | None = None,
                      timeout_s: float = PROBE_TIMEOUT_S) -> Cause:
    """Why an export to host:port failed, found as the exporters would meet it: resolve the
    name, then connect (the SDK's exporters surface no cause: gRPC and HTTP alike return
    FAILURE and log). Takes at most about `timeout_s` (a name lookup that hangs counts as a
    DNS timeout). `took_s`, `request_timeout_s`: how long the failed request took and its
    timeout, to tell a Collector that accepts connections but does not answer."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    fix_name = ("check the host name of the endpoint (--otlp-endpoint or "
                "OTEL_EXPORTER_OTLP_*ENDPOINT)")
    fix_up = ("start the Collector, or give the port it listens on (grpc 4317, "
              "http/protobuf 4318)")
    fix_path = "check that the host is up and that no firewall drops the port"
    fix_proto = ("check that it is an OTLP receiver of this protocol (--otlp-protocol: grpc "
                 "on 4317, http/protobuf on 4318) and http:// against https://")
    found: list = []

    def resolve() -> None:
        try:
            found.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except (socket.gaierror, UnicodeError) as e:
            found.append(e)

    deadline = time.monotonic() + timeout_s
    t = threading.Thread(target=resolve, name="otelwater-diagnose", daemon=True)
    t.start()
    t.join(timeout_s)
    if not found:
        return Cause(f"the host name {host} did not resolve within {timeout_s:g} s (DNS timed "
                     "out)", fix_name)
    if isinstance(found[0], Exception):
        e = found[0]
        why = getattr(e, "strerror", None) or str(e)
        if getattr(e, "errno", None) == socket.EAI_AGAIN:
            return Cause(f"the host name {host} cannot be resolved now ({why})", fix_name)
        return Cause(f"the host name {host} does not resolve ({why})", fix_name)
    refused = unreachable = None
    for family, kind, proto, _, addr in found[0]:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            with socket.socket(family, kind, proto) as s:
                s.settimeout(left)
                s.connect(addr)
        except ConnectionRefusedError:
            refused = True
            continue
        except (TimeoutError, socket.timeout):
            break
        except OSError as e:
            unreachable = e.strerror or str(e)
            continue
        # it accepts connections: the request itself failed
        if took_s is not None and request_timeout_s and took_s >= 0.9 * request_timeout_s:
            return Cause(f"{where} accepts connections but did not answer within the "
                         f"export's {request_timeout_s:g} s timeout",
                         "check that the Collector there is not overloaded or stuck, or raise "
                         "OTEL_EXPORTER_OTLP_TIMEOUT (seconds)")
        return Cause(f"{where} accepts connections, but the export request failed there",
                     fix_proto)
    if refused:
        return Cause(f"connection refused (nothing listens on {where})", fix_up)
    if unreachable:
        return Cause(f"{where} cannot be reached ({unreachable})", fix_path)
    return Cause(f"no answer from {where} within {timeout_s:g} s (the connection timed out)",
                 fix_path)


def diagnoser(opts, request_timeout_s: float | None = None
              ) -> Callable[..., Cause | None]:
    """ExportHealth's `diagnose` for an otlp.options.ExportOptions: the cause of a failure,
    found at its endpoint (`request_timeout_s`: the requests' timeout, when known)."""
    from otelwater.export.otlp.options import endpoint_address

    def diagnose(took_s: float | None, timeout_s: float = PROBE_TIMEOUT_S) -> Cause | None:
        host, port = endpoint_address(opts.target, opts.protocol)
        if not host:
            return None
        return diagnose_endpoint(host, port, took_s=took_s,
                                 request_timeout_s=request_timeout_s, timeout_s=timeout_s)

    return diagnose


class ExportHealth:
    """What export could not deliver, counted; the first failure of an outage is said once
    on `out` ("failing ... still retrying"), and the first success after it ("works again")."""

    def __init__(self, target: str | None, out: IO[str] | None = None, *,
                 outages_said: bool = True,
                 diagnose: Callable[..., Cause | None] | None = None):
        self.target = target        # None: a sink with no OTLP destination (Prometheus only)
        self.outages_said = outages_said   # False: the caller says the outcome once, at the end
        # why export fails: (took_s of the failed request, timeout_s) -> Cause; found once
        # per outage (when it is said, or at the end), forgotten when export works again
        self.diagnose = diagnose
        self.last_took_s: float | None = None
        self.found: Cause | None = None
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
            self.found = None
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

    def cause(self, timeout_s: float = PROBE_TIMEOUT_S) -> Cause | None:
        """Why export fails now (None: no way to tell), found once per outage; finding it
        takes up to about `timeout_s`."""
        if self.found is not None or self.diagnose is None:
            return self.found
        try:
            found = self.diagnose(self.last_took_s, timeout_s)
        except Exception:  # noqa: BLE001 - a cause is a help, never a failure of its own
            return None
        with self.lock:
            if self.failing:      # not an outage that ended meanwhile
                self.found = found
        return found

    def dropped(self, spans: int = 0, points: int = 0, took_s: float | None = None) -> None:
        """Spans or points not delivered; `took_s`: how long the failed request took."""
        with self.lock:
            self.spans_dropped += spans
            self.points_dropped += points
            if took_s is not None:
                self.last_took_s = took_s
            if self.failing:
                return
            self.failing = True
            self.outages += 1
            counts = (f"{self.spans_dropped} spans, {self.points_dropped} metric points "
                      "dropped so far")
        if self.outages_said:
            cause = self.cause()    # on the exporter's thread, never the watch loop's
            self._say(f"OTLP export to {self.target} failing: {cause.text}; {counts}; still "
                      "retrying" if cause else
                      f"OTLP export to {self.target} failing ({counts}); still retrying")


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
            t0 = time.monotonic()
            try:
                result = inner.export(spans)
            except Exception:  # noqa: BLE001 - an exporter bug must not stop the worker
                result = SpanExportResult.FAILURE
            if result == SpanExportResult.SUCCESS:
                health.exported(spans=len(spans))
            else:
                health.dropped(spans=len(spans), took_s=time.monotonic() - t0)
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
            t0 = time.monotonic()
            try:
                result = inner.export(metrics_data, timeout_millis=timeout_millis)
            except Exception:  # noqa: BLE001
                result = MetricExportResult.FAILURE
            if result == MetricExportResult.SUCCESS:
                health.exported(points=points)
            else:
                health.dropped(points=points, took_s=time.monotonic() - t0)
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


def say_delivery(health: ExportHealth, built: int, *, delivers: bool, also: str = "",
                 cause_timeout_s: float = 1.0) -> None:
    """The last line of an export that fell short: what was delivered and what was not (spans
    built but neither exported nor counted as dropped are not delivered either), and why when
    export was still failing at the end (found within `cause_timeout_s` if the outage's line
    had not found it yet); `also`, more to say ("; ..."). Nothing when everything went out."""
    h = health
    if delivers:
        unsent = built - h.spans_exported - h.spans_dropped
        if h.spans_dropped or h.points_dropped or unsent > 0 or also:
            cause = h.cause(cause_timeout_s) if h.failing else None
            h._say(f"OTLP export to {h.target}: {h.spans_exported} spans and "
                   f"{h.points_exported} metric points delivered; "
                   f"{h.spans_dropped + max(0, unsent)} spans and {h.points_dropped} "
                   f"metric points not delivered" + (f": {cause.text}" if cause else "")
                   + also)
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
