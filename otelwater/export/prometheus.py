"""`--prometheus-port`: the OTLP sink's metrics served for Prometheus to scrape, no Collector,
with the read-duration histogram's exemplars (the trace and span id of a slow read's span).

One HTTP endpoint (prometheus_client's server: /metrics, the Prometheus text format or
OpenMetrics as the scraper asks; Prometheus asks for OpenMetrics, the only one of the two that
carries exemplars) for any number of MeterProviders: the OTLP sink creates one provider per
traced service and asks `PrometheusEndpoint.reader()` for a fresh reader to attach to each (a
reader belongs to one provider). A scrape collects every provider through its reader,
translates the OpenTelemetry data points into Prometheus metric families and merges
same-named families, so each metric appears once (an exposition may not repeat a family) with
one series per service, socket and attribute set.

The translation is otelwater's own because the OpenTelemetry Prometheus exporter
(opentelemetry-exporter-prometheus) drops exemplars; its names and labels are the exporter's,
sample for sample (tests/unit/test_prometheus.py scrapes both): names from
otelwater/names.py (otelwater.socket.water.volume, unit By ->
otelwater_socket_water_volume_bytes; counters end in _total), every attribute a label
(network.local.port -> network_local_port), the instrumentation scope as otel_scope_name,
otel_scope_version and otel_scope_schema_url, the traced service's `service.name` as the label
`service_name` (job and instance are the scrape's), and target_info carrying each service's
whole resource. Each bucket of the read-duration histogram carries the latest exemplar that fell
in it, as `trace_id` and `span_id` labels (the names Grafana's exemplar links and the
Collector's prometheus exporter use); the latest is kept until a newer one replaces it, so a
scrape does not use up what the next scraper would see.

The port is bound when the endpoint is opened, before any probe is attached, so a taken port
is one line and exit 2, not a failure minutes into a run.

Besides /metrics the endpoint serves the `routes` it is given (path -> a function returning a
status code and a plain-text body: the agent's /healthz and /readyz); any other path is 404.
The server is prometheus_client's own pieces (make_wsgi_app for /metrics, its
ThreadingWSGIServer: a thread per request, so a slow scrape does not hold a health probe), with
no request log, nothing when a client hangs up, and the traceback of a scrape that failed
logged (Python logging) rather than printed on stderr. More metrics: `reader()` for
another MeterProvider (the agent's own metrics), `register()` for a prometheus_client collector.
"""

from __future__ import annotations

import bisect
import copy
import errno
import json
import logging
import re
import socket
import sys
import threading
from collections.abc import Callable, Iterable
from http import HTTPStatus

from otelwater.errors import UsageError
from otelwater.names import SERVICE_INSTANCE_ID, SERVICE_NAME

DEFAULT_ADDRESS = "127.0.0.1"
# resource attributes that label every series: the service, and which process of it (two
# processes of one service, or a restart, must not give the same series twice)
RESOURCE_LABELS = frozenset({SERVICE_NAME, SERVICE_INSTANCE_ID})
TARGET_INFO = "target"                       # -> target_info, one sample per service
TARGET_INFO_HELP = "Target metadata"
TRACE_ID, SPAN_ID = "trace_id", "span_id"    # exemplar labels
METRICS_PATH = "/metrics"

# a route: () -> (HTTP status code, plain-text body)
Route = Callable[[], tuple[int, str]]


class PrometheusEndpoint:
    """An HTTP endpoint serving the metrics of every reader it handed out at /metrics, and
    `routes` (path -> () -> (status code, plain-text body)) beside them; 404 elsewhere."""

    def __init__(self, port: int, address: str = DEFAULT_ADDRESS,
                 routes: dict[str, Route] | None = None, option: str | None = None):
        from prometheus_client import CollectorRegistry, make_wsgi_app

        self.port, self.address = port, address
        self.routes: dict[str, Route] = dict(routes or {})
        self._lock = threading.Lock()
        self._readers: list = []
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Merged(self))
        app = _routed(make_wsgi_app(self.registry), self.routes)
        try:
            self._server = _server(address, port, app)
        except OSError as e:
            raise UsageError(*_bind_error(address, port, e, option)) from None
        self.port = self._server.server_address[1]   # the real one when port 0 was asked
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="otelwater-prometheus", daemon=True)
        self._thread.start()

    @property
    def base_url(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self.port}"

    @property
    def url(self) -> str:
        return self.base_url + METRICS_PATH

    def route(self, path: str, handler: Route) -> None:
        """Serve `path` (e.g. "/healthz") from now on: handler() -> (status code, body)."""
        if path == METRICS_PATH or not path.startswith("/"):
            raise ValueError(f"cannot route {path!r}")
        self.routes[path] = handler

    def register(self, collector) -> None:
        """A prometheus_client collector whose families every scrape adds (its names must not
        be those of the readers' metrics: an exposition may not repeat a family)."""
        self.registry.register(collector)

    def unregister(self, collector) -> None:
        self.registry.unregister(collector)

    def reader(self):
        """A new MetricReader for one MeterProvider, served by this endpoint until the provider
        shuts it down."""
        reader = scrape_reader(self._forget)
        with self._lock:
            self._readers.append(reader)
        return reader

    def _forget(self, reader) -> None:
        with self._lock:
            self._readers = [r for r in self._readers if r is not reader]

    def families(self) -> list:
        with self._lock:
            readers = list(self._readers)
        return merge_families(f for r in readers for f in r.families())

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> "PrometheusEndpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _routed(metrics_app, routes: dict[str, Route]):
    """The WSGI app: /metrics to prometheus_client's app, a route's path to its handler (GET
    and HEAD; its status and body as plain text, never cached), 404 elsewhere. A handler that
    raises is a 500 with one line, and logged."""
    def app(environ, start_response):
        path = environ.get("PATH_INFO") or "/"
        if path == METRICS_PATH:
            return metrics_app(environ, start_response)
        handler = routes.get(path)
        method = environ.get("REQUEST_METHOD", "GET")
        if handler is None:
            status, body = 404, f"not found: {path} (served: " + \
                ", ".join([METRICS_PATH, *sorted(routes)]) + ")"
        elif method not in ("GET", "HEAD"):
            status, body = 405, f"{method} not allowed: use GET"
        else:
            try:
                status, body = handler()
            except Exception as e:  # noqa: BLE001 - a probe's answer, never a dead server
                logging.getLogger(__name__).warning("%s failed: %s: %s", path,
                                                    type(e).__name__, e, exc_info=True)
                status, body = 500, f"{path} failed: {type(e).__name__}: {e}"
        data = (body if body.endswith("\n") else body + "\n").encode()
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = ""
        headers = [("Content-Type", "text/plain; charset=utf-8"),
                   ("Content-Length", str(len(data))), ("Cache-Control", "no-store")]
        if status == 405:
            headers.append(("Allow", "GET, HEAD"))
        start_response(f"{status} {phrase}".rstrip(), headers)
        return [b""] if method == "HEAD" else [data]

    return app


def _server(address: str, port: int, app):
    """prometheus_client's threading WSGI server bound to address:port (the address family the
    address asks for), without a request log; a client that hangs up is not a traceback."""
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from prometheus_client.exposition import ThreadingWSGIServer

    family, _, _, _, sockaddr = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM,
                                                   flags=socket.AI_PASSIVE)[0]

    class Quiet(WSGIRequestHandler):
        def log_message(self, format, *args):  # noqa: A002 - the base class's signature
            pass

        def get_stderr(self):   # where wsgiref prints the traceback of an app that raised
            return _LoggedTraceback()

    class Server(ThreadingWSGIServer):
        address_family = family

        def handle_error(self, request, client_address):
            e = sys.exc_info()[1]
            if isinstance(e, (ConnectionError, TimeoutError)):
                return
            logging.getLogger(__name__).warning("serving %s failed: %s: %s", client_address,
                                                type(e).__name__, e, exc_info=True)

    return make_server(sockaddr[0], port, app, Server, handler_class=Quiet)


class _LoggedTraceback:
    """A stderr for wsgiref: what it prints (the traceback of a scrape that raised, then
    flush()) as one logged warning, not raw lines on the process's stderr."""

    def __init__(self):
        self._parts: list[str] = []

    def write(self, text: str) -> int:
        self._parts.append(text)
        return len(text)

    def flush(self) -> None:
        text, self._parts = "".join(self._parts).strip(), []
        if text:
            logging.getLogger(__name__).warning("serving a request failed: %s", text)


class _Merged:
    """The one collector of the endpoint's registry: every reader's families, merged."""

    def __init__(self, endpoint: PrometheusEndpoint):
        self.endpoint = endpoint

    def collect(self):
        return self.endpoint.families()


def scrape_reader(on_shutdown: Callable[[object], None] = lambda reader: None):
    """A MetricReader collected when scraped (cumulative, the SDK's default for every
    instrument): `families()` is its provider's metrics now, as Prometheus metric families,
    the latest exemplar of each histogram bucket kept from one scrape to the next."""
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    class ScrapeReader(InMemoryMetricReader):
        def __init__(self):
            super().__init__()
            self._families_lock = threading.Lock()
            self._exemplars: dict = {}

        def families(self) -> list:
            if self._collect is None:   # its provider is still being made: nothing yet
                return []
            with self._families_lock:   # concurrent scrapes: one collection at a time
                data = self.get_metrics_data()
                if data is None:
                    return []
                families, self._exemplars = translate(data, self._exemplars)
                return families

        def shutdown(self, timeout_millis: float = 30_000, **kw) -> None:
            on_shutdown(self)
            super().shutdown(timeout_millis=timeout_millis, **kw)

    return ScrapeReader()


def export_sink(otlp=None, prometheus: PrometheusEndpoint | None = None, **kw):
    """The one Sink `watch` writes its records to (an otelwater.export.otlp.OtlpSink): OTLP
    (an ExportOptions from otlp.resolve_options) and/or this endpoint's readers, one per
    traced service. None when both are off. The endpoint itself is closed by its owner."""
    from otelwater.export.otlp import OtlpSink

    out = kw.pop("out", None)
    if prometheus is None:
        return OtlpSink.for_options(otlp, out=out, **kw) if otlp is not None else None
    if otlp is not None:
        sink = OtlpSink.for_options(otlp, extra_readers=lambda: [prometheus.reader()], out=out,
                                    **kw)
        sink.name = "OTLP export and Prometheus endpoint"
        return sink
    from opentelemetry.sdk.trace import SpanProcessor

    # metrics only: spans still start and end (exemplars take their ids) but go nowhere
    sink = OtlpSink(make_pipeline=lambda: (SpanProcessor(), prometheus.reader()), out=out, **kw)
    sink.name = "Prometheus endpoint"
    return sink


def merge_families(families: Iterable) -> list:
    """Same-named metric families (one per MeterProvider) as one family holding all samples."""
    merged: dict[tuple[str, str], object] = {}
    for family in families:
        key = (family.name, family.type)
        if key not in merged:
            first = copy.copy(family)
            first.samples = list(family.samples)
            merged[key] = first
        else:
            merged[key].samples.extend(family.samples)
    return list(merged.values())


# -- OpenTelemetry metrics -> Prometheus metric families ---------------------------------------
# The naming rules of the OpenTelemetry/Prometheus compatibility specification, as the
# OpenTelemetry Prometheus exporter applies them (so --prometheus-port keeps the names the
# dashboards query); tests/unit/test_prometheus.py checks them against that exporter.

_NAME_INVALID = re.compile(r"[^a-zA-Z0-9:]+")
_LABEL_INVALID = re.compile(r"[^a-zA-Z0-9]+")
_UNIT_ANNOTATION = re.compile(r"\{.*\}")        # UCUM's {skb}, {read}: a count, no suffix
UNIT_SUFFIXES = {
    "ns": "nanoseconds", "us": "microseconds", "ms": "milliseconds", "s": "seconds",
    "min": "minutes", "h": "hours", "d": "days",
    "By": "bytes", "KBy": "kilobytes", "MBy": "megabytes", "GBy": "gigabytes",
    "TBy": "terabytes", "KiBy": "kibibytes", "MiBy": "mebibytes", "GiBy": "gibibytes",
    "TiBy": "tibibytes",
    "m": "meters", "g": "grams", "V": "volts", "A": "amperes", "J": "joules", "W": "watts",
    "Hz": "hertz", "Cel": "celsius", "%": "percent", "1": "",
}
PER_SUFFIXES = {"s": "second", "m": "minute", "h": "hour", "d": "day", "w": "week",
                "mo": "month", "y": "year"}


def _sanitized(text: str, invalid: re.Pattern) -> str:
    """A leading digit, then every run of characters Prometheus does not allow, as "_"."""
    if text[:1].isdigit():
        text = "_" + text[1:]
    return invalid.sub("_", text)


def metric_name(name: str) -> str:
    """otelwater.socket.water.volume -> otelwater_socket_water_volume (the unit suffix and a
    counter's _total are prometheus_client's to add)."""
    return _sanitized(name, _NAME_INVALID)


def label_name(key: str) -> str:
    """network.local.port -> network_local_port."""
    return _sanitized(key, _LABEL_INVALID)


def label_value(value) -> str:
    """Strings as they are, anything else as JSON (4242 -> "4242", True -> "true")."""
    return value if isinstance(value, str) else json.dumps(value, default=str)


def unit_suffix(unit: str) -> str:
    """The Prometheus suffix of a UCUM unit: By -> bytes, s -> seconds, By/s ->
    bytes_per_second, 1 and annotations such as {skb} -> none."""
    unit = _UNIT_ANNOTATION.sub("", unit)
    if unit in UNIT_SUFFIXES:
        return UNIT_SUFFIXES[unit]
    top, _, bottom = unit.partition("/")
    bottom = _NAME_INVALID.sub("_", bottom)
    if bottom:
        top = _NAME_INVALID.sub("_", top)
        top = UNIT_SUFFIXES.get(top, top)
        per = f"per_{PER_SUFFIXES.get(bottom, bottom)}"
        return f"{top}_{per}" if top else per
    return _NAME_INVALID.sub("_", unit).strip("_")


def scope_labels(scope) -> dict:
    """The instrumentation scope of a metric as labels (otel_scope_name, _version,
    _schema_url, and otel_scope_<key> for each of its attributes)."""
    labels = {f"otel_scope_{k}": v for k, v in (scope.attributes or {}).items()}
    labels.update(otel_scope_name=scope.name or "", otel_scope_version=scope.version or "",
                  otel_scope_schema_url=scope.schema_url or "")
    return labels


def bucket_exemplars(point, kept: tuple | None = None) -> tuple:
    """The latest exemplar of each bucket of a histogram point (len(explicit_bounds) + 1 of
    them, None where none fell yet): the point's own exemplars, which are the measurements
    since the last collection, over those `kept` from earlier ones. An exemplar goes to the
    bucket that counted its value (le is inclusive); one without a span to point at is left
    out."""
    from prometheus_client.samples import Exemplar, Timestamp

    n = len(point.explicit_bounds) + 1
    latest = list(kept) if kept is not None and len(kept) == n else [None] * n
    for e in point.exemplars:
        if not e.trace_id or not e.span_id:
            continue
        i = bisect.bisect_left(point.explicit_bounds, e.value)
        latest[i] = Exemplar({TRACE_ID: f"{e.trace_id:032x}", SPAN_ID: f"{e.span_id:016x}"},
                             e.value, Timestamp(*divmod(e.time_unix_nano, 10**9)))
    return tuple(latest)


def cumulative_buckets(point, exemplars: tuple) -> list[tuple]:
    """(le, count of values <= le[, exemplar]) per bucket, +Inf last: Prometheus's buckets
    from the point's per-bucket counts."""
    out, total = [], 0
    for le, count, ex in zip((*point.explicit_bounds, "+Inf"), point.bucket_counts, exemplars):
        total += count
        out.append((f"{le}", total, ex) if ex is not None else (f"{le}", total))
    return out


def translate(data, kept: dict | None = None) -> tuple[list, dict]:
    """One collection of a MeterProvider (MetricsData) as Prometheus metric families:
    target_info first, then a family per metric in the SDK's order (same-named ones merged),
    each point a series labelled by its service, scope and attributes (the labels a metric's
    other points have and it does not are ""). Gauges and cumulative up-down counters are
    gauges, monotonic sums counters, explicit-bucket histograms histograms with exemplars;
    other kinds are not otelwater's and are left out. `kept` is the previous call's exemplars,
    returned updated (for the series still present)."""
    from opentelemetry.sdk.metrics.export import Gauge, Histogram, Sum
    from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                        HistogramMetricFamily, InfoMetricFamily)

    kept = kept or {}
    exemplars: dict = {}
    resource: dict = {}
    for rm in data.resource_metrics:
        resource.update(rm.resource.attributes)
    families = [InfoMetricFamily(TARGET_INFO, TARGET_INFO_HELP,
                                 value={label_name(k): label_value(v)
                                        for k, v in resource.items()})]
    for rm in data.resource_metrics:
        common = {k: v for k, v in rm.resource.attributes.items() if k in RESOURCE_LABELS}
        for sm in rm.scope_metrics:
            scope = scope_labels(sm.scope)
            for metric in sm.metrics:
                d = metric.data
                if isinstance(d, Histogram):
                    kind, cls = "histogram", HistogramMetricFamily
                elif isinstance(d, Sum) and d.is_monotonic:
                    kind, cls = "counter", CounterMetricFamily
                elif isinstance(d, (Sum, Gauge)):  # the reader asks cumulative sums only
                    kind, cls = "gauge", GaugeMetricFamily
                else:
                    continue
                rows = [({label_name(k): label_value(v)
                          for src in (common, scope, p.attributes) for k, v in src.items()}, p)
                        for p in d.data_points]
                keys = sorted({k for labels, _ in rows for k in labels})
                name, unit = metric_name(metric.name), unit_suffix(metric.unit or "")
                family = cls(name, metric.description or "", labels=keys, unit=unit)
                families.append(family)
                for labels, p in rows:
                    values = [labels.get(k, "") for k in keys]
                    if kind != "histogram":
                        family.add_metric(values, p.value)
                        continue
                    series = (family.name, tuple(sorted(labels.items())))
                    exemplars[series] = bucket_exemplars(p, kept.get(series))
                    family.add_metric(values, cumulative_buckets(p, exemplars[series]), p.sum)
    return merge_families(families), exemplars


def _bind_error(address: str, port: int, e: OSError,
                option: str | None = None) -> tuple[str, str]:
    """(problem, fix) of a bind that failed; `option`: the one option giving both address and
    port (the agent's --listen ADDRESS:PORT), else watch's --prometheus-port/-address."""
    where = f"{address}:{port}"
    if option is not None:
        why = ("is already in use" if e.errno == errno.EADDRINUSE else
               f"is not an address of this host ({e.strerror})"
               if e.errno == errno.EADDRNOTAVAIL or isinstance(e, socket.gaierror) else
               "is not allowed (use a port above 1023)" if e.errno == errno.EACCES else
               f"cannot be listened on ({e.strerror or e})")
        return (f"{option} {where}: {why}",
                f"give a free local ADDRESS:PORT (e.g. {option} 127.0.0.1:9464), or stop what "
                f"listens there (ss -ltnp 'sport = :{port}')")
    if e.errno == errno.EADDRINUSE:
        return (f"--prometheus-port {port}: {where} is already in use",
                "pick a free port (e.g. --prometheus-port 9464) or stop what listens there "
                f"(ss -ltnp 'sport = :{port}')")
    if e.errno == errno.EADDRNOTAVAIL or isinstance(e, socket.gaierror):
        return (f"--prometheus-address {address}: not an address of this host ({e.strerror})",
                "give a local address, e.g. --prometheus-address 127.0.0.1 or 0.0.0.0")
    if e.errno == errno.EACCES:
        return (f"--prometheus-port {port}: not allowed to listen on {where}",
                "use a port above 1023")
    return (f"--prometheus-port {port}: cannot listen on {where} ({e.strerror or e})",
            "pick another --prometheus-port or --prometheus-address")
