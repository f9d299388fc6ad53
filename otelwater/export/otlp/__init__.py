"""OTLP export: the records after Analysis (snapshots, reads, verdicts, alerts, lost records)
as OpenTelemetry traces and metrics, through opentelemetry-sdk. The parts, in the order the
data goes through them:

    options.py    where to export (flags > OTEL_EXPORTER_OTLP_* > defaults), the SDK exporters
    health.py     what could not be delivered, counted and said once; the counting exporters
    resources.py  the traced services' identities and resources; one provider set per service
    spans.py      a span per verdict (the kernel's story, snapshots and alerts as events; a child of
                  its request's span when the goroutine's labels name it), lost spans
    metrics.py    the live metrics (gauges, drops, alerts, lost) on the series rules of
                  otelwater.export.series, and the verdict counts (the kernel's, else the
                  verdicts') on those of otelwater.export.tally, which the offline points
                  share
    sink.py       OtlpSink, the live Sink: a bounded queue, a worker thread, dispatch by kind
    offline.py    offline_sink(), the Sink of `otelwater correlate --otlp-endpoint`: spans as
                  verdicts come, metric points at the recording's times
                  (otelwater.export.offline_metrics)

    sink = OtlpSink.for_options(resolve_options(flag_endpoint, flag_protocol))   # live
    sink = offline_sink(header, endpoint=..., protocol=..., out=..., config=...)  # offline

Each is a otelwater.export.sink.Sink: start(run), write(records), tick(), flush(timeout_s),
close(timeout_s). The names below are this package's public ones.
"""

from otelwater.export.otlp.health import (MAX_QUEUE, ExportHealth, _bounded_batch_processor,
                                          _count_points, _counting_metric_exporter,
                                          _counting_span_exporter)
from otelwater.export.otlp.offline import OfflineOtlpSink, offline_sink
from otelwater.export.otlp.options import (DEFAULT_ENDPOINTS, GRPC, HTTP, PROTOCOLS,
                                           ExportOptions, check_endpoint, quiet_sdk_logs,
                                           resolve_options)
from otelwater.export.otlp.resources import (Identity, Service, Services, endpoints_from_proc,
                                             identity_from_proc, resource_attributes)
from otelwater.export.otlp.sink import (CLOSE_TIMEOUT_S, MAX_RECORDS, SPAN_RATE, OtlpSink,
                                        SpanBudget)
from otelwater.export.otlp.spans import (WINDOW_NS, alert_event_attributes, caller,
                                         water_event_attributes)
from otelwater.export.series import (IDLE_NS, MAX_SOCKETS, OWN, TOP_N, endpoint_attributes,
                                     other_attributes, socket_attributes, top_sockets)

__all__ = [
    "CLOSE_TIMEOUT_S", "DEFAULT_ENDPOINTS", "GRPC", "HTTP", "IDLE_NS", "MAX_QUEUE",
    "MAX_RECORDS", "MAX_SOCKETS", "OWN", "PROTOCOLS", "SPAN_RATE", "TOP_N", "WINDOW_NS",
    "ExportHealth", "ExportOptions", "Identity", "OfflineOtlpSink", "OtlpSink", "Service",
    "Services", "SpanBudget", "_bounded_batch_processor", "_count_points",
    "_counting_metric_exporter", "_counting_span_exporter", "alert_event_attributes",
    "caller", "check_endpoint", "endpoint_attributes", "endpoints_from_proc",
    "identity_from_proc", "offline_sink", "other_attributes", "quiet_sdk_logs",
    "resolve_options", "resource_attributes", "socket_attributes", "top_sockets",
    "water_event_attributes",
]
