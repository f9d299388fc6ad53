"""Where OTLP export goes (flags, then the standard OTEL_EXPORTER_OTLP_* variables, then the
defaults) and the SDK exporters that take it there.

Endpoint and protocol, highest precedence first: --otlp-endpoint / --otlp-protocol; the
standard variables (OTEL_EXPORTER_OTLP_TRACES_ENDPOINT / _METRICS_ENDPOINT, then
OTEL_EXPORTER_OTLP_ENDPOINT; OTEL_EXPORTER_OTLP_[TRACES_|METRICS_]PROTOCOL); then the
defaults: grpc to http://localhost:4317, http/protobuf to http://localhost:4318. Export is off
unless a flag or one of those endpoint variables is set. Headers, certificates, compression and
timeout come from the OTEL_EXPORTER_OTLP_* variables, read by the SDK's exporters themselves.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from otelwater.errors import UsageError

GRPC, HTTP = "grpc", "http/protobuf"
PROTOCOLS = (GRPC, HTTP)
DEFAULT_ENDPOINTS = {GRPC: "http://localhost:4317", HTTP: "http://localhost:4318"}
ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
                 "OTEL_EXPORTER_OTLP_ENDPOINT")
PROTOCOL_VARS = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL",
                 "OTEL_EXPORTER_OTLP_PROTOCOL")
TIMEOUT_S = 10.0                # the SDK's default request timeout


@dataclass(frozen=True)
class ExportOptions:
    protocol: str                   # grpc | http/protobuf
    endpoint: str | None            # from the flag; None: the SDK reads OTEL_EXPORTER_OTLP_*
    target: str                     # what messages call it

    def exporters(self):
        """A new (span exporter, metric exporter) pair for this destination."""
        return self.span_exporter(), self.metric_exporter()

    def span_exporter(self, timeout_s: float | None = None):
        """`timeout_s`: each request's timeout, at most (None: the SDK's, from the
        environment)."""
        kw = {}
        if timeout_s is not None:
            kw["timeout"] = min(float(timeout_s), request_timeout_s("TRACES"))
        if self.protocol == GRPC:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            return OTLPSpanExporter(endpoint=self.endpoint, **kw)
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        if self.endpoint is None:   # the SDK appends /v1/traces to OTEL_EXPORTER_OTLP_ENDPOINT
            return OTLPSpanExporter(**kw)
        # an explicit endpoint is taken as-is by the SDK
        return OTLPSpanExporter(endpoint=self.endpoint.rstrip("/") + "/v1/traces", **kw)

    def metric_exporter(self, timeout_s: float | None = None):
        """`timeout_s`: each request's timeout, at most (None: the SDK's, from the
        environment)."""
        kw = {}
        if timeout_s is not None:
            kw["timeout"] = min(float(timeout_s), metric_timeout_s())
        if self.protocol == GRPC:
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import \
                OTLPMetricExporter

            return OTLPMetricExporter(endpoint=self.endpoint, **kw)
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        if self.endpoint is None:
            return OTLPMetricExporter(**kw)
        return OTLPMetricExporter(endpoint=self.endpoint.rstrip("/") + "/v1/metrics", **kw)


def metric_timeout_s(environ=os.environ) -> float:
    """The metric exporter's request timeout as the SDK reads it from the environment."""
    return request_timeout_s("METRICS", environ)


def request_timeout_s(signal: str, environ=os.environ) -> float:
    """An exporter's request timeout as the SDK reads it from the environment (`signal`:
    TRACES or METRICS)."""
    for var in (f"OTEL_EXPORTER_OTLP_{signal}_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT"):
        try:
            return float(environ[var])
        except (KeyError, ValueError):
            continue
    return TIMEOUT_S


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


def quiet_sdk_logs() -> None:
    """The SDK logs every retry and failure; otelwater counts them and says each outage once
    (OTELWATER_DEBUG=1 keeps the SDK's own log)."""
    if os.environ.get("OTELWATER_DEBUG", "") in ("", "0"):
        logging.getLogger("opentelemetry").setLevel(logging.CRITICAL)
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")  # gRPC core's own stderr lines
