"""`otelwater agent`: options and their checks (everything is checked before anything attaches:
a bad value is one line naming it and the fix); the work is otelwater.agent.run."""

from __future__ import annotations

import os
import re

import click

from otelwater.cli_options import FiniteFloat, IntRangeFix, MAX_BLOCKED_MS
from otelwater.errors import UsageError

AGENT_EPILOG = """
\b
Examples:
  otelwater agent                                   # every Go process, /metrics on 127.0.0.1:9464
  otelwater agent --otlp-endpoint http://collector:4317
  otelwater agent --go-binary /srv/api --go-binary /srv/worker
  otelwater agent --cgroup /sys/fs/cgroup/kubepods.slice --listen 0.0.0.0:9464
  otelwater agent --config /etc/otelwater/agent.yaml --log-format text

\b
What it traces: by default every Go program it can see (Go build info in its executable)
once it has run --min-age seconds; with --pid/--go-binary/--cgroup/--port, the processes any
of them names. Processes that start later are picked up (a restart of a binary already traced
at its exec), those that exit are forgotten. One set of BPF programs serves every binary and Go
version. A process that cannot be traced is logged (event process.failed) and counted; the
others are served.

\b
What it serves at --listen: /metrics (the services' water, verdict and read-latency metrics,
and the agent's own otelwater_agent_* and process_* metrics), /healthz (200 while its loop
runs), /readyz (200 once the probes are attached, 503 when stopping). With --otlp-endpoint (or
OTEL_EXPORTER_OTLP_ENDPOINT), spans of slow reads and the metrics go to that Collector.

\b
Settings: defaults < the YAML file (--config, or $OTELWATER_CONFIG; section `agent` and the
watch's sections) < OTELWATER_* variables (e.g. OTELWATER_AGENT_MIN_AGE_S=5) < flags. The
standard OTEL_EXPORTER_OTLP_* variables set the export. Logs: one JSON object a line on stderr.
Stop: SIGTERM or SIGINT (flush and detach), or --duration. Privileges: docs/privileges.md.
"""


def parse_listen(text: str) -> tuple[str, int] | None:
    """ADDRESS:PORT ([v6]:PORT) -> (address, port); "off" -> None."""
    if text == "off":
        return None
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([0-9A-Za-z.\-]*):(\d{1,5})", text)
    if not m:
        raise UsageError(f"--listen {text!r} is not ADDRESS:PORT",
                         "e.g. --listen 127.0.0.1:9464, --listen [::]:9464, or --listen off")
    address = m.group(1) or m.group(3) or "0.0.0.0"
    port = int(m.group(2) or m.group(4))
    if not 0 <= port <= 65535:
        raise UsageError(f"--listen port {port} is out of range",
                         "give a port from 1 to 65535, or 0 for any free one (the "
                         "agent.started log line names it)")
    return address, port


@click.command("agent", epilog=AGENT_EPILOG)
@click.option("-p", "--pid", "pids", multiple=True, metavar="PID",
              type=IntRangeFix(min=1, fix="give a process id (from 1 up)"),
              help="Trace this process (repeatable); its sockets' water only.")
@click.option("-P", "--port", "ports", type=click.IntRange(1, 65535), multiple=True,
              help="Trace the Go processes holding a TCP socket on this port, in their own "
              "network namespace (repeatable); water of sockets on it only.")
@click.option("--cgroup", "cgroups", multiple=True, metavar="DIR",
              help="Trace the Go processes of this cgroup v2 directory and below (repeatable); "
              "water of their sockets only.")
@click.option("--go-binary", "go_binaries", multiple=True, metavar="PATH",
              type=click.Path(dir_okay=False),
              help="Trace every process running this Go executable (repeatable).")
@click.option("--min-age", default=None, metavar="SECONDS",
              type=FiniteFloat(0, 86_400, fix="give seconds, e.g. --min-age 2"),
              help="Trace a process once it has run this long (short-lived tools are left "
              "alone).  [default: 2, or agent.min_age_s]")
@click.option("--probes", type=click.Choice(["tracepoint", "uprobe"]), default=None,
              help="How Go reads are traced (as `watch --probes`).  [default: tracepoint, or "
              "agent.probes]")
@click.option("--listen", default=None, metavar="ADDRESS:PORT",
              help="Where /metrics, /healthz and /readyz are served; off: nowhere.  [default: "
              "127.0.0.1:9464, or agent.listen]")
@click.option("--log-format", type=click.Choice(["json", "text"]), default=None,
              help="Log lines on stderr.  [default: json, or agent.log_format]")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              default="info", show_default=True, help="The least severe log line written.")
@click.option("--otlp-endpoint", default=None, metavar="URL",
              help="Export spans and metrics over OTLP to this Collector. Precedence: this "
              "flag > OTEL_EXPORTER_OTLP_*ENDPOINT > off.")
@click.option("--otlp-protocol", type=click.Choice(["grpc", "http/protobuf"]), default=None,
              help="OTLP transport (> OTEL_EXPORTER_OTLP_PROTOCOL > grpc).")
@click.option("--otlp-span-rate", default=None, metavar="SPANS",
              type=FiniteFloat(0, 1_000_000, fix="give spans a second, e.g. 500 (0: no limit)"),
              help="Spans a second at most.  [default: 500, or export.span_rate]")
@click.option("--blocked-ms", default=None,
              type=FiniteFloat(0, MAX_BLOCKED_MS, fix="give milliseconds, e.g. --blocked-ms 5"),
              help="A read this slow is a slow read.  [default: 1, or correlate.threshold_ms]")
@click.option("--record-rate", default=None, metavar="READS",
              type=FiniteFloat(0, 10_000_000, fix="give slow reads a second, e.g. 1000"),
              help="Slow reads a second recorded in full.  [default: 1000, or "
              "correlate.record_rate]")
@click.option("--config", "config_file", default=None, metavar="FILE",
              help="YAML file of settings (examples/otelwater.yaml lists every key).")
@click.option("--ringbuf-pages", type=int, default=64, show_default=True,
              help="Each ring buffer's size in 4 KiB pages (a power of two).")
@click.option("-d", "--duration", default=None, metavar="SECONDS",
              type=FiniteFloat(min=0, min_open=True, fix="give seconds > 0, or leave -d out"),
              help="Stop by itself after this long.  [default: run until SIGTERM/SIGINT]")
def agent_command(pids, ports, cgroups, go_binaries, min_age, probes, listen, log_format,
                  log_level, otlp_endpoint, otlp_protocol, otlp_span_rate, blocked_ms,
                  record_rate, config_file, ringbuf_pages, duration):
    """Run beside Go services for weeks: trace their TCP reads, serve and export the verdicts.

    The long-running mode of `otelwater watch`: finds the Go processes to trace by itself, keeps
    up as they start and exit, and exports OTLP and Prometheus; health endpoints, self-metrics
    and JSON logs for operating it.
    """
    from otelwater.cli_checks import _check_cgroups, _check_pids
    from otelwater.config import load_config
    from otelwater.probes.loader import bound_malloc_arenas, check_ringbuf_pages

    bound_malloc_arenas()      # before any thread of ours starts
    config = load_config(config_file, flags={
        "agent.min_age_s": min_age, "agent.probes": probes, "agent.listen": listen,
        "agent.log_format": log_format, "correlate.threshold_ms": blocked_ms,
        "correlate.record_rate": record_rate, "export.span_rate": otlp_span_rate})
    otlp = None
    if otlp_endpoint or otlp_protocol or any(k.startswith("OTEL_EXPORTER_OTLP_")
                                             and k.endswith("ENDPOINT") for k in os.environ):
        from otelwater.export.otlp import resolve_options

        otlp = resolve_options(otlp_endpoint, otlp_protocol, live=True)
    check_ringbuf_pages(ringbuf_pages)
    _check_pids(pids)
    _check_cgroups(cgroups)
    binaries = tuple(_check_binary(p, config.agent.probes) for p in go_binaries)
    listen_at = parse_listen(config.agent.listen)

    from otelwater.agent.discover import Selection
    from otelwater.agent.health import health_routes
    from otelwater.agent.logs import AgentLog, capture_library_logs
    from otelwater.agent.run import run_agent
    from otelwater.agent.state import AgentState
    from otelwater.probes import host

    log = AgentLog(config.agent.log_format, level=log_level)
    host.require_can_trace()        # before the port is bound: one line naming what is missing
    if config.agent.probes == "uprobe" and host.uprobes_need_sys_admin():
        from otelwater.errors import EnvironmentProblem

        raise EnvironmentProblem(
            "uprobes need CAP_SYS_ADMIN on this kernel (Linux 6.16 and the stable kernels "
            "took them back from CAP_PERFMON), which this process lacks",
            "use --probes tracepoint (the default: no CAP_SYS_ADMIN), or run as root")
    state = AgentState()
    endpoint = None
    if listen_at is not None:       # bound now: a taken port fails before anything attaches
        from otelwater.export.prometheus import PrometheusEndpoint

        endpoint = PrometheusEndpoint(listen_at[1], listen_at[0], routes=health_routes(state),
                                      option="--listen")
    selection = Selection(pids=frozenset(pids), go_binaries=binaries,
                          cgroups=tuple(cgroups), ports=frozenset(ports))
    # Python logging, warnings and dying threads as log lines (the OpenTelemetry SDK's retries
    # stay quiet: the export's health says each outage once, with its cause, as a line)
    library_logs = capture_library_logs(log)
    try:
        run_agent(selection=selection, config=config, log=log, state=state, otlp=otlp,
                  endpoint=endpoint, duration=duration, ringbuf_pages=ringbuf_pages,
                  library_logs=library_logs)
    finally:
        if endpoint is not None:
            endpoint.close()


def _check_binary(path: str, probes: str) -> str:
    """A --go-binary: an existing Go executable (Go build info: the agent traces Go programs;
    uprobes need its Go facts too)."""
    from otelwater.agent.discover import is_go_executable
    from otelwater.errors import BinaryError
    from otelwater.probes import goelf

    if not os.path.isfile(path):
        raise BinaryError(f"{path}: no such file", "give the path of a Go executable")
    if not is_go_executable(path):
        raise BinaryError(f"{path} is not a Go program (no .go.buildinfo or .gopclntab)",
                          "give the path of a Go executable (the agent traces Go programs; "
                          "watch --go-pid traces any program's reads)")
    try:
        goelf.locate(path)
    except BinaryError:
        if probes == "uprobe":
            raise
        try:
            goelf.Symbolizer(path)
        except BinaryError:
            raise BinaryError(f"{path} is not a Go program (no .go.buildinfo or .gopclntab)",
                              "give the path of a Go executable") from None
    return os.path.realpath(path)
