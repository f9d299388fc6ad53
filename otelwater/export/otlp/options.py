"""Where OTLP export goes (flags, then the standard OTEL_EXPORTER_OTLP_* variables, then the
defaults) and the SDK exporters that take it there.

Endpoint and protocol, highest precedence first: --otlp-endpoint / --otlp-protocol; the
standard variables (OTEL_EXPORTER_OTLP_TRACES_ENDPOINT / _METRICS_ENDPOINT, then
OTEL_EXPORTER_OTLP_ENDPOINT; OTEL_EXPORTER_OTLP_[TRACES_|METRICS_]PROTOCOL); then the
defaults: grpc to http://localhost:4317, http/protobuf to http://localhost:4318. Export is off
unless a flag or one of those endpoint variables is set. Headers and certificates come from the
OTEL_EXPORTER_OTLP_* variables, read by the SDK's exporters themselves; headers, compression
and timeout (OTEL_EXPORTER_OTLP_[TRACES_|METRICS_]HEADERS / _COMPRESSION / _TIMEOUT) are
checked here, before anything attaches (a bad value is a usage error naming the variable: the
SDK's gRPC exporter would raise at its first use, and drop a bad header), and compression is
handed to the exporters explicitly, so `none` works with gRPC too. An empty variable counts
as unset, as the OpenTelemetry specification says.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from urllib.parse import urlparse

from otelwater.errors import UsageError

GRPC, HTTP = "grpc", "http/protobuf"
PROTOCOLS = (GRPC, HTTP)
DEFAULT_ENDPOINTS = {GRPC: "http://localhost:4317", HTTP: "http://localhost:4318"}
ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
                 "OTEL_EXPORTER_OTLP_ENDPOINT")
PROTOCOL_VARS = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL",
                 "OTEL_EXPORTER_OTLP_PROTOCOL")
TIMEOUT_S = 10.0                # the SDK's default request timeout
SIGNALS = ("TRACES", "METRICS")
# what each transport's exporter takes (the SDK's gRPC exporter knows gzip; none is the default)
COMPRESSIONS = {GRPC: ("gzip", "none"), HTTP: ("gzip", "deflate", "none")}


def _vars(what: str) -> tuple[str, ...]:
    """The per-signal variables of a setting, then the general one (`what`: TIMEOUT, ...)."""
    return (*(f"OTEL_EXPORTER_OTLP_{s}_{what}" for s in SIGNALS), f"OTEL_EXPORTER_OTLP_{what}")


def _setting(signal: str, what: str, environ) -> tuple[str, str] | None:
    """(variable, value) of a signal's setting as the SDK picks it: the per-signal variable,
    else the general one; None when neither is set (an empty value is unset)."""
    for var in (f"OTEL_EXPORTER_OTLP_{signal}_{what}", f"OTEL_EXPORTER_OTLP_{what}"):
        value = (environ.get(var) or "").strip()
        if value:
            return var, value
    return None


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
        kw = {"compression": compression(self.protocol, "TRACES")}
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
        kw = {"compression": compression(self.protocol, "METRICS")}
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
    TRACES or METRICS), in seconds (opentelemetry-python's unit)."""
    for var in (f"OTEL_EXPORTER_OTLP_{signal}_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT"):
        try:
            return float(environ[var])
        except (KeyError, ValueError):
            continue
    return TIMEOUT_S


def compression(protocol: str, signal: str, environ=os.environ):
    """The SDK's compression value for a signal's exporter, from the environment (checked by
    check_environment): `signal`'s variable, else OTEL_EXPORTER_OTLP_COMPRESSION, else none."""
    got = _setting(signal, "COMPRESSION", environ)
    name = got[1].lower() if got else "none"
    if protocol == GRPC:
        from grpc import Compression

        return {"gzip": Compression.Gzip, "none": Compression.NoCompression}[name]
    from opentelemetry.exporter.otlp.proto.http import Compression

    return {"gzip": Compression.Gzip, "deflate": Compression.Deflate,
            "none": Compression.NoCompression}[name]


def check_environment(protocol: str, environ=os.environ) -> None:
    """The OTEL_EXPORTER_OTLP_* compression and timeout variables (general and per signal),
    refused now with one line when the exporters could not use them."""
    accepted = COMPRESSIONS[protocol]
    for var in _vars("COMPRESSION"):
        value = (environ.get(var) or "").strip()
        if value and value.lower() not in accepted:
            raise UsageError(f"{var}={value!r} is not a compression {protocol} export takes",
                             f"set it to {' or '.join(accepted)}, or unset it")
    for var in _vars("HEADERS"):
        check_headers(var, environ.get(var) or "")
    for var in _vars("TIMEOUT"):
        value = (environ.get(var) or "").strip()
        if not value:
            continue
        try:
            seconds = float(value)
        except ValueError:
            seconds = math.nan
        if not (math.isfinite(seconds) and seconds > 0):
            raise UsageError(f"{var}={value!r} is not a timeout in seconds",
                             f"set it to seconds > 0 (opentelemetry-python reads seconds), "
                             f"e.g. {var}=10, or unset it")


def check_headers(var: str, value: str) -> None:
    """OTEL_EXPORTER_OTLP_[TRACES_|METRICS_]HEADERS: comma-separated name=value pairs, as the
    SDK's exporters parse them (opentelemetry.util.re.parse_env_headers, liberal). They drop
    an entry they cannot parse, log it whole as a warning and send without it: an agent then
    fails its Collector's authentication with its token in the log. Each entry is put to that
    same parser here, its warning silenced, and one it drops is refused. The error never shows
    the value: headers carry credentials."""
    entries = [e for e in value.split(",") if e.strip()]
    if not entries:
        return
    from opentelemetry.util.re import parse_env_headers

    sdk_log = logging.getLogger("opentelemetry.util.re")
    was, sdk_log.disabled = sdk_log.disabled, True
    try:
        for i, entry in enumerate(entries, 1):
            if not parse_env_headers(entry, liberal=True):
                raise UsageError(f"{var}: entry {i} of {len(entries)} is not a name=value "
                                 "header the OpenTelemetry SDK takes (its text is not "
                                 "shown: headers carry credentials)",
                                 f"write name=value pairs separated by commas, values "
                                 f"URL-encoded, e.g. {var}=authorization=Bearer%20TOKEN")
    finally:
        sdk_log.disabled = was


def metric_interval_s(default: float, environ=os.environ) -> float:
    """OTEL_METRIC_EXPORT_INTERVAL (milliseconds) in seconds, or `default` when unset; a value
    that is not a positive number is a usage error."""
    value = (environ.get("OTEL_METRIC_EXPORT_INTERVAL") or "").strip()
    if not value:
        return default
    try:
        ms = float(value)
    except ValueError:
        ms = math.nan
    if not (math.isfinite(ms) and ms > 0):
        raise UsageError(f"OTEL_METRIC_EXPORT_INTERVAL={value!r} is not an interval in "
                         "milliseconds", "set it to milliseconds > 0, e.g. "
                         "OTEL_METRIC_EXPORT_INTERVAL=10000, or unset it")
    return ms / 1000


def check_endpoint(url: str, where: str) -> str:
    """`url` if export can go there; else a usage error naming `where` (the flag or the
    variable) and what is accepted."""
    fix = ("give the Collector's URL: http:// or https://, a host, and a port from 1 to 65535, "
           "e.g. http://localhost:4317 (grpc) or http://localhost:4318 (http/protobuf)")
    try:
        u = urlparse(url)
        port = u.port
    except ValueError as e:    # a port that is no number or beyond 65535, a broken [IPv6]
        what = "has a bad port" if "port" in str(e).lower() else f"is not a URL ({e})"
        raise UsageError(f"{where} {url!r} {what}", fix) from None
    if u.scheme not in ("http", "https"):
        raise UsageError(f"{where} {url!r} is not an http:// or https:// URL", fix)
    if any(c.isspace() for c in url):
        raise UsageError(f"{where} {url!r} is not a URL (it has a space)", fix)
    if not u.hostname:
        raise UsageError(f"{where} {url!r} names no host", fix)
    if port == 0 or (port is None and u.netloc.endswith(":")):
        raise UsageError(f"{where} {url!r} has a bad port", fix)
    return url


def endpoint_address(url: str, protocol: str) -> tuple[str, int]:
    """(host, port) an export to `url` connects to: the URL's port, else 443 for https and
    for gRPC (a gRPC target without a port is port 443), 80 for http/protobuf over http."""
    u = urlparse(url)
    port = u.port
    if port is None:
        port = 443 if u.scheme == "https" or protocol == GRPC else 80
    return u.hostname or "", port


def resolve_options(endpoint: str | None, protocol: str | None, environ=os.environ, *,
                    live: bool = False) -> ExportOptions | None:
    """Where to export, or None when export is off (precedence: module docstring). A bad
    endpoint, protocol, compression or timeout is a UsageError naming the flag or variable;
    `live` (watch: metrics read by the SDK's periodic reader), OTEL_METRIC_EXPORT_INTERVAL
    too."""
    if environ is os.environ:   # empty is unset (the SDK's gRPC exporter chokes on a "")
        for var in [v for v, x in environ.items()
                    if v.startswith("OTEL_EXPORTER_OTLP_") and not x.strip()]:
            del environ[var]
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
    check_environment(protocol, environ)
    if live:
        metric_interval_s(TIMEOUT_S, environ)
    if endpoint is not None:
        return ExportOptions(protocol, check_endpoint(endpoint, "--otlp-endpoint"), endpoint)
    for var in ENDPOINT_VARS:      # each the SDK may use (the per-signal ones, the general)
        if environ.get(var):
            check_endpoint(environ[var], var)
    return ExportOptions(protocol, None, env_endpoint)


def quiet_sdk_logs() -> None:
    """The SDK logs every retry and failure; otelwater counts them and says each outage once
    (OTELWATER_DEBUG=1 keeps the SDK's own log)."""
    if os.environ.get("OTELWATER_DEBUG", "") in ("", "0"):
        logging.getLogger("opentelemetry").setLevel(logging.CRITICAL)
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")  # gRPC core's own stderr lines
