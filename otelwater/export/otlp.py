"""OTLP export: the records after Analysis (snapshots, reads, verdicts, alerts, lost records)
as OpenTelemetry traces and metrics, through opentelemetry-sdk.

    sink = OtlpSink.for_options(resolve_options(flag_endpoint, flag_protocol))  # live
    sink.write(records)            # each batch, the same records the JSON Lines sink gets
    sink.close()                   # flush, within a deadline, and say what was not delivered

    export_offline(records, header, endpoint=..., protocol=...)   # `otelwater correlate`

Resource = the traced service. One TracerProvider and one MeterProvider per traced process
(a pid seen in a Go read or verdict, or named by the recording), created when it first
appears: service.name from its own OTEL_SERVICE_NAME, else service.name of its
OTEL_RESOURCE_ATTRIBUTES (all of which are kept), else its executable's basename; plus
process.pid, process.executable.name/path, host.name and service.instance.id. Sockets of
processes that are not traced, and lost records, go under otelwater's own resource
(service.name "otelwater").

Traces: one span per Verdict, "net.(*conn).Read", kind INTERNAL, from the read's start to its
end in wall-clock time (otelwater.export.clock: CLOCK_MONOTONIC + an offset measured once);
its evidence snapshots and the alert transitions of its socket within the evidence window are
span events at their own times. Names: otelwater.export.names. The spans alone rebuild the
records exactly (otelwater.events.otlpjson, `otelwater correlate` of the Collector's OTLP JSON
file): each span also carries the read's CLOCK_MONOTONIC times and kernel stamps, each water
event the whole snapshot, every resource the run (clock offset, attach time, the verdict
thresholds: started()), and each rise of a probe's lost records is a zero-length span
"otelwater.lost" under otelwater's own resource.

Metrics: water gauges are observable: each collection reads the latest snapshot of every
socket. Cardinality is bounded: the top N sockets by water volume (default 50) get their own
series, the rest are summed per (process.pid, network.local.port) with
otelwater.socket.key="other". Drops (increase of sk_drops), verdicts, lost records are
counters, alerts firing an up-down counter, and slow-read durations a histogram in seconds
recorded inside the read's span context, so its exemplars carry that span's trace and span id.

Endpoint and protocol, highest precedence first: --otlp-endpoint / --otlp-protocol; the
standard variables (OTEL_EXPORTER_OTLP_TRACES_ENDPOINT / _METRICS_ENDPOINT, then
OTEL_EXPORTER_OTLP_ENDPOINT; OTEL_EXPORTER_OTLP_[TRACES_|METRICS_]PROTOCOL); then the
defaults: grpc to http://localhost:4317, http/protobuf to http://localhost:4318. Export is off
unless a flag or one of those endpoint variables is set. Headers, certificates, compression and
timeout come from the OTEL_EXPORTER_OTLP_* variables, read by the SDK's exporters themselves.

Export never holds the probes. write() only appends the records to a bounded queue (16,384
records; what does not fit is dropped, counted and said once) and returns: a span costs
0.4-0.6 ms of CPU in the SDK (bench/export_cost.py), which the watch loop that drains the
kernel's ring buffers cannot spare at 1,000 slow reads a second. One worker thread per sink
turns the records into spans, events and metric points; close() lets it drain the queue
within its deadline. The worker still shares the interpreter (its lock) with the loop, so
spans are also limited to 500 a second per sink (a token bucket holding one second's worth,
about a third of a CPU at most): beyond that
a slow read still counts in the verdict counter and the duration histogram, but gets no span
(otelwater.spans.limited counts them; the first is said once). The offline export delivers
everything: write() builds on the caller's thread (background=False), with no limit
(span_rate=None).
Counters start at 0: every verdict of a service (and its limited spans) when the service
appears, the lost records of each probe when the run starts (started()), a drops series when
its socket or its per-port sum first appears, so rate() works from the first scrape.

A slow or absent Collector never holds the worker either: ending a span only appends to the
bounded queue of a BatchSpanProcessor (max_queue_size 2048; a full queue drops the span and
counts it), metrics are exported by a PeriodicExportingMetricReader on its own thread, and the
SDK's exporters retry by themselves. Failures are counted; the first is said once on stderr,
and again when export works again.
"""

from __future__ import annotations

import heapq
import logging
import os
import socket as socketlib
import sys
import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import IO, Callable, Iterable

from otelwater.errors import UsageError
from otelwater.events.model import LostEvents, ReadRecord, WaterSnapshot
from otelwater.export import names as N
from otelwater.export.clock import WallClock
from otelwater.sockkey import format_key

GRPC, HTTP = "grpc", "http/protobuf"
PROTOCOLS = (GRPC, HTTP)
DEFAULT_ENDPOINTS = {GRPC: "http://localhost:4317", HTTP: "http://localhost:4318"}
TOP_N = 50                      # sockets with their own series; the rest summed
MAX_QUEUE = 2048                # spans waiting for export, per service
MAX_RECORDS = 16384             # records waiting for the sink's worker (write() never blocks)
SPAN_RATE = 500.0               # spans a second per sink, at most; None: every slow read
PROBES = ("water", "reads")     # whose lost records are counted from 0 (started())
WINDOW_NS = 5_000_000           # alert transitions this near a read are its span events
METRIC_INTERVAL_S = 10.0        # unless OTEL_METRIC_EXPORT_INTERVAL says otherwise
CLOSE_TIMEOUT_S = 5.0           # the most close() waits for the last export
IDLE_NS = 600 * 10**9           # a socket with no snapshot for this long is forgotten
MAX_SOCKETS = 65536             # sockets whose latest snapshot is kept
RANK_EVERY_S = 0.5              # the top-N ranking is recomputed at most this often
MAX_SERVICES = 256              # providers kept; the least recently used is shut down beyond
INSTANCE_NS = uuid.UUID("6f74656c-7761-7465-7200-000000000001")  # uuid5 namespace


# -- where to export -------------------------------------------------------------------------

@dataclass(frozen=True)
class ExportOptions:
    protocol: str                   # grpc | http/protobuf
    endpoint: str | None            # from the flag; None: the SDK reads OTEL_EXPORTER_OTLP_*
    target: str                     # what messages call it

    def exporters(self):
        """A new (span exporter, metric exporter) pair for this destination."""
        if self.protocol == GRPC:
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import \
                OTLPMetricExporter
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            return (OTLPSpanExporter(endpoint=self.endpoint),
                    OTLPMetricExporter(endpoint=self.endpoint))
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        if self.endpoint is None:   # the SDK appends /v1/traces to OTEL_EXPORTER_OTLP_ENDPOINT
            return OTLPSpanExporter(), OTLPMetricExporter()
        base = self.endpoint.rstrip("/")  # an explicit endpoint is taken as-is by the SDK
        return (OTLPSpanExporter(endpoint=base + "/v1/traces"),
                OTLPMetricExporter(endpoint=base + "/v1/metrics"))


ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
                 "OTEL_EXPORTER_OTLP_ENDPOINT")
PROTOCOL_VARS = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL",
                 "OTEL_EXPORTER_OTLP_PROTOCOL")


def check_endpoint(url: str, where: str) -> str:
    from urllib.parse import urlparse

    u = urlparse(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise UsageError(f"{where} {url!r} is not an http:// or https:// URL",
                         "give the Collector's URL, e.g. http://localhost:4317 (grpc) or "
                         "http://localhost:4318 (http/protobuf)")
    try:
        u.port
    except ValueError:
        raise UsageError(f"{where} {url!r} has a bad port",
                         "give a port from 1 to 65535, e.g. http://localhost:4317") from None
    return url


def resolve_options(endpoint: str | None, protocol: str | None,
                    environ=os.environ) -> ExportOptions | None:
    """Where to export, or None when export is off (precedence: module docstring)."""
    env_endpoint = next((environ[v] for v in ENDPOINT_VARS if environ.get(v)), None)
    if endpoint is None and env_endpoint is None:
        if protocol is not None:
            raise UsageError("--otlp-protocol without an endpoint",
                             "add --otlp-endpoint URL or set OTEL_EXPORTER_OTLP_ENDPOINT")
        return None
    where = "--otlp-protocol"
    if protocol is None:
        var = next((v for v in PROTOCOL_VARS if environ.get(v)), None)
        protocol, where = (environ[var].strip(), var) if var else (GRPC, "")
    if protocol not in PROTOCOLS:
        raise UsageError(f"{where} {protocol!r} is not supported",
                         "give grpc or http/protobuf")
    if endpoint is not None:
        return ExportOptions(protocol, check_endpoint(endpoint, "--otlp-endpoint"), endpoint)
    var = next(v for v in ENDPOINT_VARS if environ.get(v))
    check_endpoint(env_endpoint, var)
    return ExportOptions(protocol, None, env_endpoint)


# -- failures, counted and said once ---------------------------------------------------------

class ExportHealth:
    """What export could not deliver, counted; the first failure of an outage is said once
    on `out` ("failing ... still retrying"), and the first success after it ("works again")."""

    def __init__(self, target: str | None, out: IO[str] | None = None):
        self.target = target        # None: a sink with no OTLP destination (Prometheus only)
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


class SpanBudget:
    """A token bucket: at most `rate` spans a second, in bursts of up to `burst` (one second's
    worth by default, so a watch loop's batch of 0.1 s passes whole). `now` is injectable
    (seconds, monotonic) so tests can step time."""

    def __init__(self, rate: float, burst: float | None = None,
                 now: Callable[[], float] = time.monotonic):
        if rate <= 0:
            raise ValueError(f"span rate {rate!r} must be positive")
        self.rate = float(rate)
        self.burst = float(burst) if burst is not None else max(1.0, self.rate)
        self.now = now
        self.tokens = self.burst
        self.last = now()

    def take(self) -> bool:
        """True if one more span fits now (and counts it)."""
        t = self.now()
        if t > self.last:
            self.tokens = min(self.burst, self.tokens + (t - self.last) * self.rate)
            self.last = t
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


# -- identities ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Identity:
    """What names a traced process: the fields of recording.ProcessInfo that export uses."""

    pid: int
    exe: str | None = None
    comm: str | None = None
    service_name: str | None = None
    resource_attributes: dict | None = None
    start_time: int | None = None


def identity_from_proc(pid: int):
    """The process's identity from /proc/PID (exe, environ's OTEL_* variables, start time)."""
    from otelwater.events.recording import process_info

    return process_info(pid)


def resource_attributes(ident, pid: int, host: str) -> dict:
    """The resource of a traced process: its own OTEL_RESOURCE_ATTRIBUTES, its service name
    (OTEL_SERVICE_NAME > service.name of those attributes > the executable's basename), and
    what otelwater knows of it."""
    attrs: dict = {}
    given = dict(getattr(ident, "resource_attributes", None) or {})
    attrs.update(given)
    exe = getattr(ident, "exe", None)
    comm = getattr(ident, "comm", None)
    attrs[N.SERVICE_NAME] = (getattr(ident, "service_name", None) or given.get(N.SERVICE_NAME)
                             or (os.path.basename(exe) if exe else None) or comm
                             or f"pid-{pid}")
    attrs[N.PROCESS_PID] = pid
    if exe:
        attrs[N.PROCESS_EXECUTABLE_PATH] = exe
        attrs[N.PROCESS_EXECUTABLE_NAME] = os.path.basename(exe)
    elif comm:
        attrs[N.PROCESS_EXECUTABLE_NAME] = comm
    attrs[N.HOST_NAME] = host
    if N.SERVICE_INSTANCE_ID not in given:  # the same process gives the same id, live or offline
        start = getattr(ident, "start_time", None)
        attrs[N.SERVICE_INSTANCE_ID] = str(uuid.uuid5(INSTANCE_NS, f"{host}/{pid}/{start}"))
    return attrs


def endpoints_from_proc(pid: int, key: int) -> tuple[str, int, str, int] | None:
    """(laddr, lport, raddr, rport) of the process's TCP socket with this key, from its
    network namespace's /proc/PID/net/tcp{,6}; None when it is gone. Live only: a slow-peer
    socket may have no snapshot at all (its queue never rises), yet its span needs its ends."""
    from otelwater.hostsockets import netns_inode, tcp_table
    from otelwater.sockkey import addr_text, sock_key

    try:
        ns = netns_inode(pid)
    except OSError:
        return None
    for e in tcp_table(pid).values():
        if sock_key(ns, e.laddr, e.lport, e.raddr, e.rport) == key:
            return addr_text(e.laddr), e.lport, addr_text(e.raddr), e.rport
    return None


# -- the sink --------------------------------------------------------------------------------

def network_type(addr: str) -> str:
    return "ipv6" if ":" in addr else "ipv4"


def top_sockets(sockets: Iterable[WaterSnapshot], n: int) -> list[WaterSnapshot]:
    """The n sockets holding the most water (volume, then unread bytes, then level; the key
    breaks ties so the choice is stable): those with series of their own, live and offline."""
    return heapq.nlargest(n, sockets,
                          key=lambda s: (s.volume, s.unread_bytes, s.level, s.sock_key))


def socket_attributes(s: WaterSnapshot) -> dict:
    return endpoint_attributes(s.pid, s.sock_key, (s.laddr, s.lport, s.raddr, s.rport))


def endpoint_attributes(pid: int, key: int, ends: tuple[str, int, str, int]) -> dict:
    laddr, lport, raddr, rport = ends
    return {N.PROCESS_PID: pid, N.NETWORK_TRANSPORT: "tcp", N.NETWORK_TYPE: network_type(laddr),
            N.NETWORK_LOCAL_ADDRESS: laddr, N.NETWORK_LOCAL_PORT: lport,
            N.NETWORK_PEER_ADDRESS: raddr, N.NETWORK_PEER_PORT: rport,
            N.SOCKET_KEY: format_key(key)}


def other_attributes(pid: int, lport: int) -> dict:
    return {N.PROCESS_PID: pid, N.NETWORK_TRANSPORT: "tcp", N.NETWORK_LOCAL_PORT: lport,
            N.SOCKET_KEY: N.OTHER_SOCKETS}


def caller(stack) -> str | None:
    """The function that called net.(*conn).Read (the frame above it), else the first frame
    above the read machinery."""
    for i, name in enumerate(stack):
        if name == N.READ_SPAN and i + 1 < len(stack):
            return stack[i + 1]
    from otelwater.export.live import caller as live_caller

    return live_caller(tuple(stack)) if stack else None


def water_event_attributes(s: WaterSnapshot) -> dict:
    return {N.WATER_LEVEL_ATTR: s.level, N.WATER_VOLUME_ATTR: s.volume,
            N.WATER_UNREAD_ATTR: s.unread_bytes, N.WATER_CAPACITY_ATTR: s.capacity,
            N.WATER_FILL_RATIO_ATTR: round(s.fill_ratio, 6), N.WATER_DROPS_ATTR: s.drops,
            N.TRIGGER: s.trigger,
            # the rest of the snapshot, so otelwater.events.otlpjson rebuilds it exactly
            N.WATER_PID_ATTR: s.pid, N.WATER_TID_ATTR: s.tid, N.WATER_COMM_ATTR: s.comm,
            N.WATER_NETNS_ATTR: s.netns, N.WATER_INODE_ATTR: s.ino,
            N.WATER_BACKLOG_ATTR: s.backlog, N.WATER_DROP_EVENTS_ATTR: s.drop_events,
            N.WATER_DROP_REASON_ATTR: s.drop_reason, N.WATER_BYTES_ARRIVED_ATTR: s.bytes_arrived,
            N.WATER_BYTES_READ_ATTR: s.bytes_read, N.WATER_TCP_STATE_ATTR: s.tcp_state}


def alert_event_attributes(a) -> dict:
    d = {N.ALERT_RULE: a.rule, N.ALERT_STATE: a.state, N.ALERT_SEVERITY: a.severity,
         N.ALERT_VALUE: float(a.value), N.ALERT_THRESHOLD: float(a.threshold)}
    if a.previous:
        d[N.ALERT_PREVIOUS] = a.previous
    if a.reason:
        d[N.ALERT_REASON] = a.reason
    return d


OWN = -1   # the key of otelwater's own service


class _Service:
    """One resource: a TracerProvider and a MeterProvider with otelwater's instruments."""

    def __init__(self, key: int, attrs: dict, sink: "OtlpSink"):
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider

        self.key = key
        self.resource = Resource(attrs)
        self.span_processor, self.metric_reader = sink.make_pipeline()
        self.tracer_provider = TracerProvider(resource=self.resource, shutdown_on_exit=False)
        self.tracer_provider.add_span_processor(self.span_processor)
        self.meter_provider = MeterProvider(resource=self.resource,
                                            metric_readers=[self.metric_reader,
                                                            *sink.extra_readers()],
                                            shutdown_on_exit=False)
        from otelwater import __version__

        self.tracer = self.tracer_provider.get_tracer(N.SCOPE, __version__)
        meter = self.meter_provider.get_meter(N.SCOPE, __version__)

        def gauge(inst, field):
            meter.create_observable_gauge(inst.name, [lambda _o: sink._observe(key, field)],
                                          unit=inst.unit, description=inst.description)

        gauge(N.WATER_LEVEL, 0)
        gauge(N.WATER_VOLUME, 1)
        gauge(N.WATER_UNREAD, 2)
        gauge(N.CAPACITY, 3)
        gauge(N.FILL_RATIO, 4)
        i = N.DROPS
        self.drops = meter.create_counter(i.name, unit=i.unit, description=i.description)
        i = N.READ_DURATION
        self.read_duration = meter.create_histogram(
            i.name, unit=i.unit, description=i.description,
            explicit_bucket_boundaries_advisory=list(N.READ_DURATION_BOUNDS_S))
        i = N.READ_VERDICTS
        self.verdicts = meter.create_counter(i.name, unit=i.unit, description=i.description)
        i = N.ALERTS_ACTIVE
        self.alerts = meter.create_up_down_counter(i.name, unit=i.unit,
                                                   description=i.description)
        i = N.RECORDS_LOST
        self.lost = meter.create_counter(i.name, unit=i.unit, description=i.description)
        i = N.SPANS_LIMITED
        self.limited = meter.create_counter(i.name, unit=i.unit, description=i.description)
        # counters start at 0, so rate() and increase() work from the first point
        if key == OWN:
            for probe in PROBES:
                self.lost.add(0, {N.PROBE: probe})
        else:
            from otelwater.events.verdict import VERDICTS

            for v in VERDICTS:
                self.verdicts.add(0, {N.VERDICT: v})
            self.limited.add(0)

    def shutdown(self, timeout_s: float) -> None:
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown(timeout_millis=max(1.0, timeout_s * 1000))


class OtlpSink:
    """Records after Analysis in, OTLP out (module docstring). Not thread-safe for writers:
    one thread calls write(); the sink's worker builds the telemetry (with `background`, the
    default; without it, write() does, as the offline export wants); the SDK's reader threads
    call the gauges' callbacks.

    span_rate: spans a second at most (None: no limit); `now` is its clock (tests step it).
    queue_records: records write() may leave waiting for the worker; beyond, dropped."""

    def __init__(self, *, make_pipeline: Callable[[], tuple],
                 identity: Callable[[int], object] = identity_from_proc,
                 clock: WallClock | None = None, host: str | None = None,
                 traced_pids: Iterable[int] = (), top_n: int = TOP_N,
                 window_ns: int = WINDOW_NS, health: ExportHealth | None = None,
                 extra_readers: Callable[[], list] = list,
                 endpoints: Callable[[int, int], tuple | None] | None = endpoints_from_proc,
                 background: bool = True, queue_records: int = MAX_RECORDS,
                 span_rate: float | None = SPAN_RATE, now: Callable[[], float] = time.monotonic):
        self.make_pipeline = make_pipeline   # -> (SpanProcessor, MetricReader), per service
        self.extra_readers = extra_readers   # -> more MetricReaders per service (Prometheus)
        self.identity = identity
        self.clock = clock or WallClock.measure()
        self.host = host or socketlib.gethostname()
        self.top_n = top_n
        self.window_ns = window_ns
        self.delivers = health is not None  # an OTLP destination: close() sums up delivery
        self.health = health if health is not None else ExportHealth(None)
        self.span_rate = span_rate
        self.budget = SpanBudget(span_rate, now=now) if span_rate is not None else None
        self.lock = threading.RLock()
        self.services: OrderedDict[int, _Service] = OrderedDict()
        self.traced: set[int] = set(traced_pids)
        self.identities: dict[int, object] = {}
        self.endpoints = endpoints          # (pid, sock_key) -> (laddr, lport, raddr, rport)
        self.ends: OrderedDict[int, tuple | None] = OrderedDict()  # sock_key -> that, bounded
        self.sockets: OrderedDict[int, WaterSnapshot] = OrderedDict()  # least recent first
        self.last_drops: dict[int, int] = {}
        self.recent_alerts: OrderedDict[tuple, deque] = OrderedDict()
        self.active_alerts: dict[tuple, tuple[_Service, str]] = {}
        self.lost_seen: dict[str, int] = {}
        self.spans = 0
        self.newest_ns = 0
        self._rank = None
        self._rank_at = 0.0
        self._rank_gen = None
        self.rank_every_s = RANK_EVERY_S
        self._gen = 0
        self._closed = False
        self._retired: list[_Service] = []
        self.run: dict = {N.CLOCK_OFFSET_NS: self.clock.offset_ns}  # on every resource
        self.drop_series: OrderedDict[tuple, None] = OrderedDict()  # started at 0, bounded
        for pid in self.traced:
            self._identity_of(pid)
        # the worker's queue: batches of records; `queued` counts records not yet processed
        self.background = background
        self.queue_records = queue_records
        self._batches: deque[list] = deque()
        self._queued = 0
        self._stopping = False
        self._cv = threading.Condition(threading.Lock())
        self._worker: threading.Thread | None = None
        if background:
            self._worker = threading.Thread(target=self._work, name="otelwater-export",
                                            daemon=True)
            self._worker.start()

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def for_options(cls, opts: ExportOptions, *, out: IO[str] | None = None,
                    metric_interval_s: float | None = None, **kw) -> "OtlpSink":
        """A sink exporting to `opts`, each service with its own exporters, counted."""
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        quiet_sdk_logs()
        health = ExportHealth(opts.target, out)
        if metric_interval_s is None:
            env = os.environ.get("OTEL_METRIC_EXPORT_INTERVAL")
            metric_interval_s = float(env) / 1000 if env else METRIC_INTERVAL_S

        def pipeline():
            spans, metrics = opts.exporters()
            return (_bounded_batch_processor(_counting_span_exporter(spans, health), health),
                    PeriodicExportingMetricReader(
                        _counting_metric_exporter(metrics, health),
                        export_interval_millis=metric_interval_s * 1000))

        return cls(make_pipeline=pipeline, health=health, **kw)

    def started(self, start_ns: int, config=None) -> None:
        """The run's attach time and analysis settings, put on every resource created after
        this (call it before the first write), so the spans alone give the same verdicts."""
        self.run[N.START_NS] = int(start_ns)
        c = getattr(config, "correlate", None)
        if c is not None:
            self.run.update({N.THRESHOLD_MS: float(c.threshold_ms),
                             N.RUN_THRESHOLD_MS: float(c.run_threshold_ms),
                             N.WINDOW_MS: float(c.window_ms)})
        with self.lock:   # the resources known now, so their counters start at 0 from here
            self._service(OWN)
            for pid in sorted(self.traced):
                self._service(pid)

    def _identity_of(self, pid: int):
        if pid in self.identities:
            return self.identities[pid]
        try:
            ident = self.identity(pid)
        except Exception:  # noqa: BLE001 - an unreadable process is named by its pid
            ident = None
        self.identities[pid] = ident
        return ident

    def _service(self, key: int) -> _Service:
        svc = self.services.get(key)
        if svc is not None:
            self.services.move_to_end(key)
            return svc
        if key == OWN:
            attrs = resource_attributes(Identity(os.getpid(), exe=sys.executable,
                                                 service_name=N.OWN_SERVICE), os.getpid(),
                                        self.host)
        else:
            attrs = resource_attributes(self._identity_of(key), key, self.host)
        attrs.update(self.run)
        svc = self.services[key] = _Service(key, attrs, self)
        if len(self.services) > MAX_SERVICES:
            _, old = self.services.popitem(last=False)
            self._retired.append(old)
            threading.Thread(target=old.shutdown, args=(CLOSE_TIMEOUT_S,), daemon=True).start()
        return svc

    def _trace(self, pid: int) -> None:
        """A pid with Go reads is a traced service: its resource now (its counters at 0 before
        its first verdict)."""
        if pid not in self.traced:
            self.traced.add(pid)
            self._service(pid)

    def _learn_ends(self, r: ReadRecord) -> None:
        """The ends of a read's socket, looked up once per socket while it is open."""
        if (self.endpoints is None or not r.sock_key or r.sock_key in self.ends
                or r.sock_key in self.sockets):
            return
        try:
            self.ends[r.sock_key] = self.endpoints(r.pid, r.sock_key)
        except Exception:  # noqa: BLE001 - the span goes out with its socket key only
            self.ends[r.sock_key] = None
        if len(self.ends) > MAX_SOCKETS:
            self.ends.popitem(last=False)

    def _owner(self, pid: int) -> int:
        return pid if pid in self.traced else OWN

    # -- records in ------------------------------------------------------------------------

    def write(self, records: Iterable) -> None:
        """Hand the records over: queued for the worker (what does not fit in the queue is
        dropped and counted, never waited for), or processed now without `background`."""
        if self._closed:
            return
        if not self.background:
            self._process(records)
            return
        batch = list(records)
        if not batch:
            return
        for r in batch:   # a traced process is named now, while it runs (once per pid)
            read = getattr(r, "read", r)
            if isinstance(read, ReadRecord) and read.pid not in self.identities:
                self._identity_of(read.pid)
        with self._cv:
            room = max(0, self.queue_records - self._queued)
            over = len(batch) - room
            if over > 0:
                batch = batch[:room]
            if batch:
                self._batches.append(batch)
                self._queued += len(batch)
                self._cv.notify()
        if over > 0:
            self.health.queue_full(over, self.queue_records)

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until the worker has processed every record written so far; False if
        `timeout_s` passed first (the spans may still sit in the SDK's batch queues)."""
        with self._cv:
            return self._cv.wait_for(lambda: self._queued == 0, timeout_s)

    def _work(self) -> None:
        """The worker: one batch at a time, until close() and an empty queue. A batch that
        fails (a bug) is counted and said, and the worker goes on."""
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._batches or self._stopping)
                if not self._batches:
                    return
                batch = self._batches.popleft()
            try:
                self._process(batch)
            except Exception as e:  # noqa: BLE001 - one bad batch must not stop export
                self.health.failed(len(batch), e)
            finally:
                with self._cv:
                    self._queued -= len(batch)
                    self._cv.notify_all()

    def _process(self, records: Iterable) -> None:
        from otelwater.alerts.stage import AlertTransition
        from otelwater.events.verdict import Verdict

        with self.lock:
            for r in records:
                if isinstance(r, WaterSnapshot):
                    self._snapshot(r)
                elif isinstance(r, Verdict):
                    self._verdict(r)
                elif isinstance(r, ReadRecord):
                    self._trace(r.pid)
                    self._learn_ends(r)
                elif isinstance(r, AlertTransition):
                    self._alert(r)
                elif isinstance(r, LostEvents):
                    self._lost(r)
                elif hasattr(r, "service_name") and hasattr(r, "pid"):  # a ProcessInfo
                    self.identities[r.pid] = r
                    self.traced.add(r.pid)

    def _snapshot(self, s: WaterSnapshot) -> None:
        self._gen += 1
        key = s.sock_key
        self.newest_ns = max(self.newest_ns, s.ts_ns)
        prev = self.last_drops.get(key)
        more = s.drops - prev if prev is not None and s.drops > prev else 0
        if s.trigger == "close":
            if more:
                self._drops(s, more)
            self.sockets.pop(key, None)
            self.last_drops.pop(key, None)
            return
        self.last_drops[key] = s.drops
        self.sockets[key] = s
        self.sockets.move_to_end(key)
        self._drops(s, more)   # and the socket's gauges are observed in its owner's service
        while len(self.sockets) > MAX_SOCKETS:
            old, _ = self.sockets.popitem(last=False)
            self.last_drops.pop(old, None)
        oldest = next(iter(self.sockets.values()))
        if self.newest_ns - oldest.ts_ns > IDLE_NS:
            for k in [k for k, v in self.sockets.items() if self.newest_ns - v.ts_ns > IDLE_NS]:
                del self.sockets[k]
                self.last_drops.pop(k, None)

    def _drops(self, s: WaterSnapshot, more: int) -> None:
        """Add a socket's new drops to its series (its own among the top N, else its
        process and port's sum); a series seen for the first time starts at 0."""
        owner = self._owner(s.pid)
        svc = self._service(owner)
        _, _, top = self._ranking()
        mine = s.sock_key in top
        series = (owner, s.sock_key) if mine else (owner, N.OTHER_SOCKETS, s.pid, s.lport)
        attrs = None
        if series not in self.drop_series:
            attrs = socket_attributes(s) if mine else other_attributes(s.pid, s.lport)
            svc.drops.add(0, attrs)
            self.drop_series[series] = None
            if len(self.drop_series) > MAX_SOCKETS:
                self.drop_series.popitem(last=False)
        if more:
            if attrs is None:
                attrs = socket_attributes(s) if mine else other_attributes(s.pid, s.lport)
            svc.drops.add(more, attrs)

    def _verdict(self, v) -> None:
        from opentelemetry import trace
        from opentelemetry.trace import SpanKind

        r = v.read
        self._trace(r.pid)
        svc = self._service(r.pid)
        if self.budget is not None and not self.budget.take():
            label = {N.VERDICT: v.verdict}   # counted as every read is, with no span
            svc.read_duration.record(r.duration_ns / 1e9, label)
            svc.verdicts.add(1, label)
            svc.limited.add(1)
            self.health.limited(1, self.span_rate)
            return
        attrs = {N.SOCKET_KEY: format_key(r.sock_key)}
        known = v.evidence[0] if v.evidence else self.sockets.get(r.sock_key)
        if known is not None:
            attrs.update(endpoint_attributes(r.pid, r.sock_key, (known.laddr, known.lport,
                                                                 known.raddr, known.rport)))
        elif self.ends.get(r.sock_key):
            attrs.update(endpoint_attributes(r.pid, r.sock_key, self.ends[r.sock_key]))
        else:
            attrs[N.PROCESS_PID] = r.pid
        attrs[N.THREAD_ID] = r.tid
        fn = caller(r.stack)
        if fn:
            attrs[N.CODE_FUNCTION] = fn
        if r.stack:
            attrs[N.CODE_STACKTRACE] = "\n".join(r.stack)
        if r.goid is not None:
            attrs[N.GOROUTINE_ID] = r.goid
        attrs[N.FD] = r.fd
        attrs[N.VERDICT] = v.verdict
        attrs[N.VERDICT_REASON] = v.reason
        for k, val in ((N.WAIT_PEER_NS, v.wait_peer_ns), (N.WAIT_RUN_NS, v.wait_run_ns),
                       (N.QUEUE_DELAY_NS, v.queue_delay_ns)):
            if val is not None:
                attrs[k] = val
        attrs[N.READ_REQUESTED] = r.requested
        attrs[N.READ_RETURNED] = r.returned
        # the rest of the read, exact (otelwater.events.otlpjson rebuilds it from these)
        if r.comm:
            attrs[N.THREAD_NAME] = r.comm
        attrs[N.READ_SOURCE] = r.source
        attrs[N.READ_START_NS] = r.ts_start_ns
        attrs[N.READ_END_NS] = r.ts_end_ns
        for k, val in ((N.READ_PARKED, r.parked), (N.READ_ARRIVAL_NS, r.ts_arrival_ns),
                       (N.READ_QUEUE_DELAY_EXACT, r.queue_delay_exact)):
            if val is not None:
                attrs[k] = val
        attrs[N.EVIDENCE_TOTAL] = v.evidence_total
        attrs[N.EVIDENCE_COMPLETE] = v.evidence_complete
        wall = self.clock.wall_ns
        span = svc.tracer.start_span(N.READ_SPAN, kind=SpanKind.INTERNAL, attributes=attrs,
                                     start_time=wall(r.ts_start_ns))
        lo, hi = r.ts_start_ns - self.window_ns, r.ts_end_ns + self.window_ns
        events = [(s.ts_ns, 0, N.WATER_EVENT, water_event_attributes(s)) for s in v.evidence]
        for key in ((r.sock_key,), ("pid", r.pid)):
            for a in self.recent_alerts.get(key, ()):
                if lo <= a.ts_ns <= hi:
                    events.append((a.ts_ns, 1, N.ALERT_EVENT, alert_event_attributes(a)))
        events.sort(key=lambda e: (e[0], e[1]))
        for ts, _, name, ev in events:
            span.add_event(name, ev, timestamp=wall(ts))
        with trace.use_span(span, end_on_exit=False):  # exemplars take this span's ids
            label = {N.VERDICT: v.verdict}
            svc.read_duration.record(r.duration_ns / 1e9, label)
            svc.verdicts.add(1, label)
        span.end(end_time=wall(r.ts_end_ns))
        self.spans += 1

    def _alert(self, a) -> None:
        key = (a.sock_key,) if a.sock_key else ("pid", a.pid)
        q = self.recent_alerts.get(key)
        if q is None:
            q = self.recent_alerts[key] = deque(maxlen=16)
            if len(self.recent_alerts) > MAX_SOCKETS:
                self.recent_alerts.popitem(last=False)
        else:
            self.recent_alerts.move_to_end(key)
        q.append(a)
        active = (key, a.rule)
        if a.state == "fired":
            old = self.active_alerts.pop(active, None)
            if old is not None:
                old[0].alerts.add(-1, {N.ALERT_RULE: a.rule, N.ALERT_SEVERITY: old[1]})
            svc = self._service(self._owner(a.pid))
            svc.alerts.add(1, {N.ALERT_RULE: a.rule, N.ALERT_SEVERITY: a.severity})
            self.active_alerts[active] = (svc, a.severity)
        else:
            old = self.active_alerts.pop(active, None)
            if old is not None:
                old[0].alerts.add(-1, {N.ALERT_RULE: a.rule, N.ALERT_SEVERITY: old[1]})

    def _lost(self, r: LostEvents) -> None:
        prev = self.lost_seen.get(r.probe, 0)
        if r.lost_total > prev:
            svc = self._service(OWN)
            svc.lost.add(r.lost_total - prev, {N.PROBE: r.probe})
            # and as a span, so the spans alone say which reads a loss makes unknown
            t = self.clock.wall_ns(r.ts_ns)
            svc.tracer.start_span(N.LOST_SPAN, start_time=t, attributes={
                N.PROBE: r.probe, N.LOST_TOTAL: r.lost_total, N.LOST_NS: r.ts_ns}).end(t)
        self.lost_seen[r.probe] = max(prev, r.lost_total)

    # -- gauges (called on the metric readers' threads) --------------------------------------

    def _ranking(self):
        """(per-owner series, per-owner "other" sums, set of top keys), cached briefly."""
        now = time.monotonic()
        gen = (self._gen, len(self.traced))
        if self._rank is not None and (self._rank_gen == gen
                                       or now - self._rank_at < self.rank_every_s):
            return self._rank
        socks = list(self.sockets.values())
        top = top_sockets(socks, self.top_n)
        top_keys = {s.sock_key for s in top}
        series: dict[int, list] = {}
        for s in top:
            series.setdefault(self._owner(s.pid), []).append(
                (socket_attributes(s), (s.level, s.volume, s.unread_bytes, s.capacity)))
        sums: dict[tuple[int, int], list[int]] = {}
        for s in socks:
            if s.sock_key in top_keys:
                continue
            t = sums.setdefault((s.pid, s.lport), [0, 0, 0, 0])
            t[0] += s.level
            t[1] += s.volume
            t[2] += s.unread_bytes
            t[3] += s.capacity
        for (pid, lport), t in sums.items():
            series.setdefault(self._owner(pid), []).append(
                (other_attributes(pid, lport), tuple(t)))
        self._rank = (series, sums, top_keys)
        self._rank_at, self._rank_gen = now, gen
        return self._rank

    def _observe(self, key: int, field: int):
        from opentelemetry.metrics import Observation

        with self.lock:
            series, _, _ = self._ranking()
            out = []
            for attrs, values in series.get(key, ()):
                if field == 4:
                    v = values[1] / values[3] if values[3] else 0.0
                else:
                    v = values[field]
                out.append(Observation(v, attrs))
            return out

    # -- the end ---------------------------------------------------------------------------

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S, out: IO[str] | None = None) -> None:
        """Export what is left within `timeout_s` (a Collector that is down does not hold the
        exit: what is still queued then is given up and said), then stop every provider.
        The worker gets the deadline less a reserve for the providers' last export."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + timeout_s
        if self._worker is not None:
            with self._cv:
                self._stopping = True
                self._cv.notify_all()
            self._worker.join(max(0.0, timeout_s - min(1.0, timeout_s / 2)))
            if self._worker.is_alive():   # give up what is still queued, and count it
                with self._cv:
                    left = sum(len(b) for b in self._batches)
                    self._batches.clear()
                    self._queued -= left
                with self.health.lock:
                    self.health.records_abandoned += left
        services = self._all_services(deadline)
        threads = [threading.Thread(target=s.shutdown,
                                    args=(max(0.0, deadline - time.monotonic()),), daemon=True)
                   for s in services]
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in threads):  # interrupt the exporters' retries
            for s in services:
                for exp in _inner_exporters(s):
                    try:
                        exp.shutdown()
                    except Exception:  # noqa: BLE001
                        pass
            for t in threads:
                t.join(0.5)
        h = self.health
        lost = h.records_dropped + h.records_abandoned
        also = (f"; {lost} records dropped before export (queue full or given up at exit)"
                if lost else "")
        if h.spans_limited:
            also += (f"; {h.spans_limited} slow reads over {self.span_rate:g} a second got no "
                     "span (still counted in the metrics)")
        if self.delivers:
            unsent = self.spans - h.spans_exported - h.spans_dropped
            if h.spans_dropped or h.points_dropped or unsent > 0 or also:
                h._say(f"OTLP export to {h.target}: {h.spans_exported} spans and "
                       f"{h.points_exported} metric points delivered; "
                       f"{h.spans_dropped + max(0, unsent)} spans and {h.points_dropped} "
                       f"metric points not delivered{also}")
        elif also:
            h._say(f"export: {also[2:]}")

    def _all_services(self, deadline: float) -> list:
        """Every provider, also while a worker given up on may still be adding one."""
        got = self.lock.acquire(timeout=min(0.5, max(0.0, deadline - time.monotonic())))
        try:
            while True:
                try:
                    return list(self.services.values()) + list(self._retired)
                except RuntimeError:   # changed during the copy (the lock was not ours)
                    continue
        finally:
            if got:
                self.lock.release()


def _inner_exporters(svc: _Service) -> list:
    out = []
    bp = getattr(svc.span_processor, "_batch_processor", None)
    exp = getattr(bp, "_exporter", None)
    if exp is not None:
        out.append(getattr(exp, "inner", exp))
    exp = getattr(svc.metric_reader, "_exporter", None)
    if exp is not None:
        out.append(getattr(exp, "inner", exp))
    return out


def quiet_sdk_logs() -> None:
    """The SDK logs every retry and failure; otelwater counts them and says each outage once
    (OTELWATER_DEBUG=1 keeps the SDK's own log)."""
    if os.environ.get("OTELWATER_DEBUG", "") in ("", "0"):
        logging.getLogger("opentelemetry").setLevel(logging.CRITICAL)
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")  # gRPC core's own stderr lines


# -- offline ---------------------------------------------------------------------------------

def export_offline(records: Iterable, header, *, endpoint: str | None = None,
                   protocol: str | None = None, out: IO[str] | None = None,
                   timeout_s: float = 30.0, config=None, metrics=None) -> OtlpSink | None:
    """Re-export a recording's records after Analysis (verdicts, alerts, snapshots, lost)
    over OTLP with the service identities and clock offset the recording kept. None when
    export is off (no --otlp-endpoint and no OTEL_EXPORTER_OTLP_*ENDPOINT).

    `header` is an otelwater.events.recording.Header (processes, clock, host, start_ns).
    Spans and metric points both keep the recording's times. The SDK would date points at
    the export, so no MeterProvider exports here: the points are built from the records
    (otelwater.export.offline_metrics, a point per series per second at most) and handed to
    the metric exporter directly. `metrics`: an OfflineMetrics the caller already fed the raw
    records it read (snapshots, reads, lost); `records` are added to it. The points go first
    (the first request that fails ends them, the rest are counted as not delivered), then the
    spans within `timeout_s`, or what is left of it (at least 1 s) when the points failed."""
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader, MetricExportResult

    from otelwater.export.offline_metrics import OfflineMetrics, SpanIds

    opts = resolve_options(endpoint, protocol)
    if opts is None:
        return None
    processes = dict(getattr(header, "processes", {}) or {})
    host = (getattr(header, "host", None) or {}).get("name") or socketlib.gethostname()
    clock = WallClock.from_recording(header.clock)
    quiet_sdk_logs()
    health = ExportHealth(opts.target, out)
    span_ids: dict = {}   # (pid, tid, read start) -> (trace_id, span_id): the exemplars

    def identity(pid):
        return processes.get(pid) or Identity(pid)

    records = records if isinstance(records, list) else list(records)
    queue = max(MAX_QUEUE, len(records))   # a span per record at most: none dropped for room

    def pipeline():   # the SDK's metric reader is never collected: it would date points now
        spans, points = opts.exporters()
        points.shutdown()
        return (SpanIds(_bounded_batch_processor(_counting_span_exporter(spans, health),
                                                 health, queue), span_ids),
                InMemoryMetricReader())

    sink = OtlpSink(make_pipeline=pipeline, health=health, identity=identity, endpoints=None,
                    clock=clock, host=host, traced_pids=processes.keys(), background=False,
                    span_rate=None)
    sink.started(header.start_ns, config)
    sink.write(records)
    if metrics is None:
        metrics = OfflineMetrics(header.start_ns, clock.offset_ns)
    metrics.traced.update(processes)
    metrics.add(records)
    metrics.finish(span_ids.get)
    resources = {key: sink._service(key).resource for key in metrics.owners()}
    spans, points = opts.exporters()
    spans.shutdown()
    exporter = _counting_metric_exporter(points, health)
    began, failed = time.monotonic(), False
    try:
        for data in metrics.batches(resources.__getitem__):
            if failed:
                health.dropped(points=_count_points(data))
            else:
                failed = exporter.export(data) != MetricExportResult.SUCCESS
    finally:
        exporter.shutdown()
    if failed:   # the Collector may be down: the spans get what is left of the timeout
        timeout_s = max(1.0, timeout_s - (time.monotonic() - began))
    sink.close(timeout_s=timeout_s, out=out)
    return sink
