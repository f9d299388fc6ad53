"""otelwater's Grafana dashboard, built as code with Grafana's foundation SDK.

    .venv/bin/python examples/grafana/dashboards.py     # rewrites dashboards/otelwater.json

The JSON beside it is this script's output, committed so provisioning needs no Python;
tests/unit/test_grafana.py fails when the two differ, and
tests/integration/test_prometheus.py runs every panel's query against a real Prometheus
scraping otelwater. Metric and label names are what Prometheus sees of otelwater's instruments
(otelwater/names.py): `otelwater.socket.water.volume` (By) is
`otelwater_socket_water_volume_bytes`, attribute `network.local.port` the label
`network_local_port`, and so on, the same from `--prometheus-port` and from the Collector's
prometheus exporter (collector-config.yaml).

Datasources are referenced by the uids that provisioning/datasources/otelwater.yaml creates.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import heatmap, prometheus, stat, statetimeline, timeseries
from grafana_foundation_sdk.builders.common import GraphThresholdsStyleConfig, StackingConfig
from grafana_foundation_sdk.builders.dashboard import (Dashboard, QueryVariable, Row,
                                                       ThresholdsConfig)
from grafana_foundation_sdk.builders.heatmap import (CellValues, HeatmapColorOptions,
                                                     RowsHeatmapOptions, YAxisConfig)
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import (BarAlignment, GraphDrawStyle,
                                                  GraphThresholdsStyleMode, HeatmapCellLayout,
                                                  StackingMode)
from grafana_foundation_sdk.models.dashboard import (DataSourceRef, Threshold, ThresholdsMode,
                                                     VariableRefresh, VariableSort)
from grafana_foundation_sdk.models.heatmap import HeatmapColorMode, HeatmapColorScale
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

HERE = Path(__file__).resolve().parent
OUT = HERE / "dashboards" / "otelwater.json"

PROMETHEUS_UID = "otelwater-prometheus"   # provisioning/datasources/otelwater.yaml
TRACES_UID = "otelwater-traces"           # Jaeger (or Tempo): where exemplars lead
PROM = DataSourceRef(type_val="prometheus", uid=PROMETHEUS_UID)

# every query takes the dashboard's variables: job (the scrape job; through the Collector it is
# the traced service's service.name) and pid (process.pid of the sockets)
JOB = 'job=~"$job"'
SOCKET = f'{JOB}, process_pid=~"$pid"'
SOCKET_LABELS = ("process_pid, network_local_port, network_peer_address, network_peer_port, "
                 "otelwater_socket_key")
SOCKET_LEGEND = ("{{process_pid}} :{{network_local_port}} <- "
                 "{{network_peer_address}}:{{network_peer_port}} {{otelwater_socket_key}}")
TOP_SOCKETS = 20


def query(expr: str, legend: str = "", *, ref: str = "A", fmt=PromQueryFormat.TIME_SERIES,
          exemplar: bool = False, instant: bool = False) -> prometheus.Dataquery:
    q = (prometheus.Dataquery().expr(expr).ref_id(ref).datasource(PROM).format(fmt)
         .exemplar(exemplar))
    q = q.instant() if instant else q.range()
    return q.legend_format(legend) if legend else q


def water_heatmap() -> heatmap.Panel:
    # one row per socket (the series), colour = bytes standing in its receive queue
    return (heatmap.Panel().title("Water volume per socket (top 20)")
            .description("sk_rmem_alloc of each socket's receive queue over time (ss -tm r): "
                         "bytes standing because the reader did not drain them.")
            .datasource(PROM)
            .with_target(query(f"topk({TOP_SOCKETS}, max by ({SOCKET_LABELS}) "
                               f"(otelwater_socket_water_volume_bytes{{{SOCKET}}}))",
                               SOCKET_LEGEND))
            .calculate(False)
            .rows_frame(RowsHeatmapOptions().layout(HeatmapCellLayout.UNKNOWN).value("bytes"))
            .cell_values(CellValues().unit("bytes"))
            .color(HeatmapColorOptions().mode(HeatmapColorMode.SCHEME).scheme("Blues")
                   .scale(HeatmapColorScale.EXPONENTIAL).exponent(0.5).steps(64))
            .y_axis(YAxisConfig().axis_label("socket"))
            .span(24).height(10))


def fill_ratio() -> timeseries.Panel:
    return (timeseries.Panel().title("Fill ratio (volume / capacity)")
            .description("sk_rmem_alloc / sk_rcvbuf. Above 0.8 the fill_ratio alert fires; "
                         "at 1 the kernel drops.")
            .datasource(PROM)
            .with_target(query(f"topk({TOP_SOCKETS}, max by ({SOCKET_LABELS}) "
                               f"(otelwater_socket_fill_ratio{{{SOCKET}}}))", SOCKET_LEGEND))
            .unit("percentunit").min(0).max(1)
            .thresholds(ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE).steps([
                Threshold(value=None, color="green"), Threshold(value=0.8, color="red")]))
            .thresholds_style(GraphThresholdsStyleConfig().mode(GraphThresholdsStyleMode.LINE))
            .span(12).height(8))


def drops() -> timeseries.Panel:
    return (timeseries.Panel().title("Drops (overflow)")
            .description("Packets each socket dropped (increase of sk_drops, ss -tm d).")
            .datasource(PROM)
            .with_target(query(f"sum by ({SOCKET_LABELS}) "
                               f"(increase(otelwater_socket_drops_total{{{SOCKET}}}"
                               "[$__rate_interval]))", SOCKET_LEGEND))
            .draw_style(GraphDrawStyle.BARS).fill_opacity(60).unit("short").min(0)
            .span(12).height(8))


def read_latency_heatmap() -> heatmap.Panel:
    return (heatmap.Panel().title("Slow read latency (exemplars: the read's span)")
            .description("Duration of slow Go reads (net.(*conn).Read). Each exemplar dot is "
                         "one slow read: click it for its span, with its verdict and the "
                         "kernel's water around it.")
            .datasource(PROM)
            .with_target(query("sum by (le) (increase(otelwater_read_duration_seconds_bucket"
                               f"{{{JOB}}}[$__rate_interval]))", "{{le}}",
                               fmt=PromQueryFormat.HEATMAP, exemplar=True))
            .calculate(False)
            .rows_frame(RowsHeatmapOptions().layout(HeatmapCellLayout.LE).value("reads"))
            .y_axis(YAxisConfig().unit("s"))
            .color(HeatmapColorOptions().mode(HeatmapColorMode.SCHEME).scheme("Oranges")
                   .scale(HeatmapColorScale.EXPONENTIAL).exponent(0.5).steps(64))
            .exemplars_color("rgba(255,0,255,0.7)")
            .span(24).height(10))


def verdicts_over_time() -> timeseries.Panel:
    return (timeseries.Panel().title("Slow reads by verdict")
            .description("peer-starved: the peer was slow; runtime-starved: the data came "
                         "but the goroutine did not run; consumer-lagging: the bytes stood in "
                         "the queue; unknown: evidence missing.")
            .datasource(PROM)
            .with_target(query("sum by (otelwater_verdict) (increase("
                               f"otelwater_read_verdicts_total{{{JOB}}}[$__rate_interval]))",
                               "{{otelwater_verdict}}"))
            .draw_style(GraphDrawStyle.BARS).fill_opacity(80).bar_alignment(BarAlignment.CENTER)
            .stacking(StackingConfig().mode(StackingMode.NORMAL))
            .unit("short").min(0)
            .span(16).height(8))


def verdict_totals() -> stat.Panel:
    return (stat.Panel().title("Verdicts in range")
            .datasource(PROM)
            .with_target(query("sum by (otelwater_verdict) (increase("
                               f"otelwater_read_verdicts_total{{{JOB}}}[$__range]))",
                               "{{otelwater_verdict}}", instant=True))
            .unit("short")
            .span(8).height(8))


def alerts() -> statetimeline.Panel:
    return (statetimeline.Panel().title("Alerts firing")
            .description("otelwater's alert rules (water_level, fill_ratio, surge, read_skew) "
                         "by severity: how many sockets or processes each has firing.")
            .datasource(PROM)
            .with_target(query("sum by (otelwater_alert_rule, otelwater_alert_severity) "
                               f"(otelwater_alerts_active{{{JOB}}})",
                               "{{otelwater_alert_rule}} {{otelwater_alert_severity}}"))
            .thresholds(ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE).steps([
                Threshold(value=None, color="transparent"), Threshold(value=1, color="red")]))
            .span(24).height(6))


def variables(d: Dashboard) -> Dashboard:
    for name, label, q in (
            ("job", "Job", "label_values(otelwater_socket_water_volume_bytes, job)"),
            ("pid", "Process", 'label_values(otelwater_socket_water_volume_bytes{job=~"$job"}, '
                               "process_pid)")):
        d = d.with_variable(QueryVariable(name).label(label).datasource(PROM).query(q)
                            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
                            .sort(VariableSort.NUMERICAL_ASC if name == "pid"
                                  else VariableSort.ALPHABETICAL_ASC)
                            .multi(True).include_all(True).all_value(".*"))
    return d


def build() -> Dashboard:
    d = (Dashboard("otelwater: TCP receive queues and slow Go reads")
         .uid("otelwater")
         .tags(["otelwater", "tcp", "ebpf", "go"])
         .description("Standing water in kernel receive queues and the verdicts of slow Go "
                      "reads, from otelwater (--prometheus-port or the Collector).")
         .refresh("10s")
         .time("now-30m", "now")
         .editable())
    d = variables(d)
    sections = (("Water", (water_heatmap(), fill_ratio(), drops())),
                ("Slow reads", (read_latency_heatmap(), verdicts_over_time(), verdict_totals())),
                ("Alerts", (alerts(),)))
    ids = iter(range(1, 100))
    for title, panels in sections:
        d = d.with_row(Row(title).id(next(ids)))
        for panel in panels:
            d = d.with_panel(panel.id(next(ids)))
    return d


def render() -> str:
    return JSONEncoder(sort_keys=True, indent=2).encode(build().build()) + "\n"


def main() -> int:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(render())
    print(f"wrote {OUT.relative_to(HERE.parent.parent)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
