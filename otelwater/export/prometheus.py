"""`--prometheus-port`: the OTLP sink's metrics served for Prometheus to scrape, no Collector.

One HTTP endpoint (prometheus_client's server: /metrics, text or OpenMetrics as the scraper
asks) for any number of MeterProviders: the OTLP sink creates one provider per traced service
and asks `PrometheusEndpoint.reader()` for a fresh OpenTelemetry `PrometheusMetricReader` to
attach to each (a reader belongs to one provider). A scrape collects every provider through its
reader and merges same-named metric families, so each metric appears once (a Prometheus text
exposition may not repeat a family) with one series per service, socket and attribute set.
Names come from otelwater/export/names.py as the exporter derives them
(otelwater.socket.water.volume, unit By -> otelwater_socket_water_volume_bytes); the traced
service's `service.name` becomes the label `service_name` (job and instance are the scrape's);
target_info carries each service's whole resource.

The port is bound when the endpoint is opened, before any probe is attached, so a taken port
is one line and exit 2, not a failure minutes into a run.
"""

from __future__ import annotations

import copy
import errno
import socket
import threading
from collections.abc import Iterable

from otelwater.errors import UsageError
from otelwater.export.names import SERVICE_NAME

DEFAULT_ADDRESS = "127.0.0.1"
RESOURCE_LABELS = frozenset({SERVICE_NAME})


class PrometheusEndpoint:
    """An HTTP /metrics endpoint serving the metrics of every reader it handed out."""

    def __init__(self, port: int, address: str = DEFAULT_ADDRESS):
        from prometheus_client import CollectorRegistry, start_http_server

        self.port, self.address = port, address
        self._lock = threading.Lock()
        self._registries: list = []      # one per reader: the reader's own collector
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Merged(self))
        try:
            self._server, self._thread = start_http_server(port, addr=address,
                                                           registry=self.registry)
        except OSError as e:
            raise UsageError(*_bind_error(address, port, e)) from None
        self.port = self._server.server_address[1]   # the real one when port 0 was asked

    @property
    def url(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self.port}/metrics"

    def reader(self):
        """A new PrometheusMetricReader for one MeterProvider, served by this endpoint until
        the provider shuts it down."""
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import CollectorRegistry

        endpoint = self

        class Reader(PrometheusMetricReader):
            def shutdown(self, timeout_millis: float = 30_000, **kw) -> None:
                endpoint._forget(own)
                super().shutdown(timeout_millis, **kw)

        own = CollectorRegistry(auto_describe=False)
        reader = Reader(registry=own, resource_attribute_filter=RESOURCE_LABELS.__contains__)
        with self._lock:
            self._registries.append(own)
        return reader

    def _forget(self, registry) -> None:
        with self._lock:
            self._registries = [r for r in self._registries if r is not registry]

    def families(self) -> Iterable:
        with self._lock:
            registries = list(self._registries)
        return merge_families(m for r in registries for m in r.collect())

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> "PrometheusEndpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Merged:
    """The one collector of the endpoint's registry: every reader's families, merged."""

    def __init__(self, endpoint: PrometheusEndpoint):
        self.endpoint = endpoint

    def collect(self):
        return self.endpoint.families()


def export_sink(otlp=None, prometheus: PrometheusEndpoint | None = None, **kw):
    """The one OtlpSink `watch` writes its records to: OTLP (an ExportOptions from
    otlp.resolve_options) and/or this endpoint. None when both are off."""
    from otelwater.export.otlp import OtlpSink

    if prometheus is None:
        return OtlpSink.for_options(otlp, **kw) if otlp is not None else None
    if otlp is not None:
        return OtlpSink.for_options(otlp, extra_readers=lambda: [prometheus.reader()], **kw)
    from opentelemetry.sdk.trace import SpanProcessor

    # metrics only: spans still start and end (exemplars take their ids) but go nowhere
    return OtlpSink(make_pipeline=lambda: (SpanProcessor(), prometheus.reader()), **kw)


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


def _bind_error(address: str, port: int, e: OSError) -> tuple[str, str]:
    where = f"{address}:{port}"
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
