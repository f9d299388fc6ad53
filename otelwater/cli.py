"""Command line: argument parsing and exit codes only; the work lives in the stage modules.

Every value is checked here, before anything is attached: a bad one is one line
``otelwater: <problem>; <fix>`` and exit 2 (usage) or 4 (bad target), click's own usage
errors included. Anything else escaping a command is a bug: one line naming it and where to
report it, exit 1; OTELWATER_DEBUG=1 or --verbose shows the traceback instead.
"""

from __future__ import annotations

import errno
import os
import sys

import click

from otelwater import __version__
from otelwater.cli_options import (MAX_BLOCKED_MS, MAX_HIGH_WATER, FiniteFloat, IntRangeFix,
                                   debugging, verbose_option)
from otelwater.cli_checks import _check_cgroups, _check_pids, cgroup2_mounts  # noqa: F401
from otelwater.errors import (BinaryError, OtelwaterError, OutputFailed, UsageError)


def issues_url() -> str:
    """Where bugs go: the package's Issues/Source URL when its metadata has one."""
    try:
        from importlib.metadata import metadata

        urls = metadata("otelwater").get_all("Project-URL") or []
    except Exception:  # noqa: BLE001 - not installed: no URL to name
        urls = []
    for label in ("issues", "bug", "source", "repository", "homepage"):
        for entry in urls:
            name, _, url = entry.partition(",")
            if label in name.lower() and url.strip():
                return url.strip()
    return "the otelwater issue tracker"


class _OneLine(click.ClickException):
    """An error already worded for the user: shown as `otelwater: <line>`."""

    def __init__(self, line: str, exit_code: int):
        super().__init__(line)
        self.exit_code = exit_code

    def show(self, file=None) -> None:
        click.echo(f"otelwater: {self.message}", err=True)


def _usage_line(e: click.UsageError) -> _OneLine:
    msg = " ".join(e.format_message().split()).rstrip(".")
    msg = msg[:1].lower() + msg[1:]
    path = e.ctx.command_path if e.ctx is not None else "otelwater"
    fix = getattr(e, "fix", None) or f"see '{path} --help'"
    return _OneLine(f"{msg}; {fix}", e.exit_code)


WATCH_EPILOG = """
\b
Examples:
  otelwater watch                     # every TCP socket, live view
  otelwater watch -P 8080 -d 30       # local or remote port 8080, 30 s
  otelwater watch -p 1234 --json      # one process, JSON Lines on stdout
  otelwater watch -p 1234 --follow    # a record for every arrival and read
  otelwater watch --go-binary ./srv   # + the Go reads of every ./srv process
  otelwater watch -p 1234 --go-pid 1234 --probes uprobe --blocked-ms 5

Columns: LVL water level (skbs queued), VOL volume (sk_rmem_alloc, ss -tm "r"), UNRD unread
payload bytes (SIOCINQ, ss Recv-Q), CAP capacity (sk_rcvbuf, "rb"), FILL volume/capacity, DROP
the socket's drop counter (sk_drops), ! alerts firing.

Go readers (with --go-binary/--go-pid), one row per goroutine and fd: PID, GOID, FD, PORT, SLOW
its slow reads, MAX the slowest (blocked time, or how long the bytes it found had waited), WHY
the last one's verdict (PEER waited for the peer, RUN data came but it did not run, LAG data
stood in the queue, ? unknown; ! the process's read-skew alert), WAIT its split (p waiting for
the peer, r waiting to run, q queue delay), CALLER the function that called net.(*conn).Read.

With --json: "snapshot" records, Go slow reads as "read" (ts_start_ns, ts_end_ns, pid, tid,
goid, fd, sock_key, requested, returned, stack, source, parked, queue_delay_ns, role, peer,
trace_id, parent_span_id, link_note, go_start), their "verdict"s, "alert" transitions, "lost"
and "notice" records, and summaries at the end.

Spans inside your traces: when the goroutine that reads carries its request's trace context as
runtime/pprof labels (trace_id, span_id in hex by default), a slow read's span (--otlp-endpoint)
is a child of the request's span; other keys and encodings: the `links` section of --config
(or OTELWATER_LINKS_TRACE_KEY, _SPAN_KEY, _ENCODING). README: "Spans inside your service's
traces".
"""


class Group(click.Group):
    """Turns every OtelwaterError and click usage error into one line on stderr and its exit
    code, and any other exception into one line naming it (exit 1) unless debugging."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as e:  # the group's own options
            raise _usage_line(e) from None

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except OtelwaterError as e:
            if e.details and debugging(ctx):
                click.echo(e.details, err=True)
            raise _OneLine(e.one_line(), e.exit_code) from None
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as e:  # a command's options and arguments
            raise _usage_line(e) from None
        except (click.ClickException, click.exceptions.Exit, click.Abort, BrokenPipeError):
            raise
        except OSError as e:
            if e.errno not in OUTPUT_FULL:
                raise _internal(ctx, e) from None
            # an output (stdout, a report) that cannot be written: the user's to fix
            raise _OneLine(OutputFailed.writing("the output", e).one_line(), 1) from None
        except Exception as e:
            raise _internal(ctx, e) from None


OUTPUT_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _internal(ctx, e: BaseException) -> BaseException:
    """A bug: one line naming it and where to report it, or the traceback when debugging."""
    if debugging(ctx):
        return e
    text = " ".join(str(e).split())
    return _OneLine(f"internal error: {type(e).__name__}" + (f": {text}" if text else "")
                    + f"; report this at {issues_url()} with the traceback "
                    "(rerun with --verbose)", 1)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"],
                                          "max_content_width": 100})
@click.version_option(__version__, prog_name="otelwater")
@verbose_option
def main():
    """Why are a Go service's TCP reads slow? otelwater watches every TCP socket's kernel
    receive queue (its "water level") with eBPF and the Go reads that drain it.

    Start with `otelwater doctor`, then `otelwater watch`. Errors are one line with the fix;
    add --verbose (here or after a command) for the details.
    """


@main.command()
@verbose_option
def doctor():
    """Check that this host can run otelwater's probes, and say how to fix what is missing.

    Exits 0 when the kernel probe can run, 3 when it cannot.
    """
    from otelwater.probes.host import checks

    problems = 0
    for c in checks():
        mark = "ok  " if c.ok else ("FAIL" if c.required else "warn")
        click.echo(f"{mark}  {c.name}: {c.found}")
        if not c.ok and c.fix:
            click.echo(f"      fix: {c.fix}")
        problems += (not c.ok) and c.required
    if problems:
        click.echo(f"otelwater cannot run here: {problems} problem(s) above", err=True)
        sys.exit(3)
    click.echo("otelwater can run here")


def _check_go_targets(go_binary, go_pids, probes) -> list[str]:
    """What the Go read sampler will refuse, refused now (before the water probe attaches).
    Returns what is to be said once when the run starts: a Go program that never reads a
    network connection through net.(*conn).Read (tracepoints still trace it: the run goes on,
    but no Go reads will come of it)."""
    if not go_binary and not go_pids:
        return []
    from otelwater.probes import goelf
    from otelwater.probes.goread import pid_exe

    if go_binary and go_pids:
        raise UsageError("give --go-binary or --go-pid, not both",
                         "to trace several processes of one binary, --go-binary is enough")
    if go_binary:
        if not os.path.isfile(go_binary):
            raise BinaryError(f"{go_binary}: no such file", "give the path of a Go executable")
        def has_symbols(path):
            try:
                return goelf.Symbolizer(path) is not None
            except BinaryError:
                return False

        try:
            goelf.locate(go_binary)
        except BinaryError:  # uprobes need Go; read-syscall tracepoints, any ELF with symbols
            if probes == "uprobe" or not has_symbols(go_binary):
                raise
    notices = []
    if go_binary:
        notices.append(goelf.no_conn_read(go_binary))
    for pid in go_pids:
        exe = pid_exe(pid)
        if probes == "uprobe":
            goelf.locate(exe)
        notices.append(goelf.no_conn_read(exe, shown=f"process {pid} ({exe})"))
    going_on = ("; the watch goes on with the sockets alone (for Go reads, give the program "
                "that serves the connections)")
    return [n + going_on for n in notices if n]


@main.command(epilog=WATCH_EPILOG)
@click.option("-p", "--pid", "pids", multiple=True, metavar="PID",
              type=IntRangeFix(min=1, fix="give a process id (from 1 up), e.g. "
                               "-p $(pgrep -n myservice)"),
              help="Watch sockets of this process (repeatable).")
@click.option("-P", "--port", "ports", type=click.IntRange(1, 65535), multiple=True,
              help="Watch sockets whose local or remote port is this (repeatable).")
@click.option("--cgroup", "cgroups", multiple=True, metavar="DIR",
              help="Watch sockets read by processes of this cgroup v2 directory and the "
              "cgroups below it (repeatable).")
@click.option("-d", "--duration", default=None, metavar="SECONDS",
              type=FiniteFloat(min=0, min_open=True, fix="give seconds > 0, e.g. -d 30, or "
                               "leave -d out to run until Ctrl-C"),
              help="Stop by itself after this long.  [default: run until Ctrl-C]")
@click.option("-i", "--interval", default=1.0,
              type=FiniteFloat(min=0.05, fix="give seconds >= 0.05, e.g. -i 1"),
              show_default=True, metavar="SECONDS",
              help="How often the socket table is swept (and the live view redrawn).")
@click.option("--json", "as_json", is_flag=True,
              help="JSON Lines on stdout: one object per snapshot (type, ts_ns, sock_key, pid, "
              "comm, laddr, lport, raddr, rport, level, volume, unread_bytes, capacity, backlog, "
              "drops, trigger, ...).")
@click.option("--follow", is_flag=True,
              help="A record for every arrival and read on the watched sockets (use with "
              "--pid/--port: costs a ring-buffer record per event).")
@click.option("--high-water", default=65536, show_default=True,
              type=IntRangeFix(1, MAX_HIGH_WATER, fix=f"give bytes from 1 to {MAX_HIGH_WATER} "
                               "(a u32 in the kernel), e.g. 65536"),
              metavar="BYTES", help="Volume at which a socket's rise is recorded at once "
              "(below it, the periodic sweep reports it).")
@click.option("--ringbuf-pages", type=int, default=64, show_default=True,
              help="Each ring buffer's size (the water probe's, and the Go read sampler's) "
              "in 4 KiB pages: a power of two, at most 524288 (2 GiB).")
@click.option("--rows", type=click.IntRange(min=1), default=15, show_default=True,
              help="Sockets shown in the live view.")
@click.option("--go-binary", type=click.Path(dir_okay=False), default=None, metavar="PATH",
              help="Also trace the Go reads of every process running this executable (now or "
              "later) and show the readers beside their sockets.")
@click.option("--go-pid", "go_pids", multiple=True, metavar="PID",
              type=IntRangeFix(min=1, fix="give a process id (from 1 up), e.g. "
                               "--go-pid $(pgrep -n myservice)"),
              help="Also trace the Go reads of this process (repeatable).")
@click.option("--probes", type=click.Choice(["tracepoint", "uprobe"]), default="tracepoint",
              show_default=True,
              help="How Go reads are traced: tracepoints (cheap: in the watch, one program "
              "hit at the end of each socket read, well under 1 us) or uprobes on "
              "net.(*conn).Read (exact Go-level latency of every Read, ~13 us a hit each way "
              "here).")
@click.option("--blocked-ms", default=None,
              type=FiniteFloat(0, MAX_BLOCKED_MS, fix=f"give milliseconds from 0 to "
                               f"{MAX_BLOCKED_MS} (a day), e.g. --blocked-ms 5"),
              help="A Go read that blocked this long, or whose bytes waited this long in the "
              "queue, is a slow read: recorded in full and given a verdict; shorter ones are "
              "counted.  [default: 1, or correlate.threshold_ms of the config]")
@click.option("--window-ms", default=None,
              type=FiniteFloat(0, 60_000, fix="give milliseconds, e.g. --window-ms 5"),
              help="Snapshots of a read's socket within this of its start or end are its "
              "evidence.  [default: 5, or correlate.window_ms of the config]")
@click.option("--include-idle", is_flag=True, default=None,
              help="Idle reads are slow reads too (verdict idle, a span each): reads that "
              "waited while the peer owed nothing (a server waiting for a keep-alive client's "
              "next request, a client's connection before its request went out). By default "
              "they are only counted.  [default: off, or correlate.include_idle]")
@click.option("--record-rate", default=None, metavar="READS",
              type=FiniteFloat(0, 10_000_000, fix="give slow reads a second, e.g. "
                               "--record-rate 1000 (0: all)"),
              help="Slow reads a second recorded in full (stack, stamps: the JSON lines and "
              "spans), spread evenly by a token bucket in the kernel; every slow read is "
              "counted there by verdict all the same, so the metrics stay exact. 0: all "
              "(each costs otelwater ~50-75 us of CPU here).  [default: 1000, or "
              "correlate.record_rate]")
@click.option("--config", "config_file", default=None, metavar="FILE",
              help="YAML file of settings (alerts, correlation, export, and `links`: the "
              "pprof label keys that put a slow read's span inside its request's trace; "
              "examples/otelwater.yaml lists every key). "
              "Precedence: defaults < this file (or $OTELWATER_CONFIG) < OTELWATER_* "
              "variables < flags.")
@click.option("--wait", is_flag=True,
              help="Accept --port values no socket uses yet (a service about to start).")
@click.option("--otlp-endpoint", default=None, metavar="URL",
              help="Export slow reads as spans and the water as metrics over OTLP to this "
              "Collector, e.g. http://localhost:4317. Precedence: this flag > the "
              "OTEL_EXPORTER_OTLP_*ENDPOINT variables > off.  [default: off]")
@click.option("--otlp-protocol", type=click.Choice(["grpc", "http/protobuf"]), default=None,
              help="OTLP transport. Precedence: this flag > OTEL_EXPORTER_OTLP_PROTOCOL > "
              "grpc (port 4317; http/protobuf: 4318). Headers, certificates, compression and "
              "timeout: the standard OTEL_EXPORTER_OTLP_* variables.")
@click.option("--otlp-span-rate", default=None, metavar="SPANS",
              type=FiniteFloat(0, 1_000_000, fix="give spans a second from 0 (no limit) to "
                               "1000000, e.g. --otlp-span-rate 500"),
              help="Spans a second at most; slow reads beyond it still count in the metrics "
              "(otelwater.spans.limited counts them). 0: no limit.  [default: 500, or "
              "export.span_rate of the config]")
@click.option("--prometheus-port", type=IntRangeFix(1, 65535, fix="give a port from 1 to "
                                                    "65535, e.g. --prometheus-port 9464"),
              default=None, metavar="PORT",
              help="Serve the metrics for Prometheus to scrape at "
              "http://ADDRESS:PORT/metrics (no Collector needed).  [default: off]")
@click.option("--prometheus-address", default="127.0.0.1", show_default=True,
              metavar="ADDRESS",
              help="Address --prometheus-port listens on (0.0.0.0: every interface).")
@verbose_option
def watch(pids, ports, cgroups, duration, interval, as_json, follow, high_water, ringbuf_pages,
          rows, go_binary, go_pids, probes, blocked_ms, window_ms, config_file, wait,
          include_idle=None, record_rate=None, otlp_endpoint=None, otlp_protocol=None, otlp_span_rate=None, prometheus_port=None,
          prometheus_address="127.0.0.1", recorder=None, headless=False):
    """Watch TCP receive queues: the sockets holding the most water, live.

    Traces arrivals (rain), reads (drain), drops (overflow) and closes with eBPF tracepoints.
    Stop with Ctrl-C (or --duration); every probe is detached on exit.
    """
    # (recorder, headless: not options; `watch --record` and `record` pass their Writer)
    from otelwater.hostsockets import ports_in_use
    from otelwater.probes.loader import check_ringbuf_pages

    otlp = None
    if otlp_endpoint or otlp_protocol or any(k.startswith("OTEL_EXPORTER_OTLP_")
                                             and k.endswith("ENDPOINT") for k in os.environ):
        from otelwater.export.otlp import resolve_options

        otlp = resolve_options(otlp_endpoint, otlp_protocol, live=True)  # bad: exit 2, now
    check_ringbuf_pages(ringbuf_pages)
    _check_pids(pids)
    _check_pids(go_pids)
    _check_cgroups(cgroups)
    notices = _check_go_targets(go_binary, go_pids, probes)
    if probes == "uprobe" and (go_binary or go_pids):
        from otelwater.probes import host

        if host.uprobes_need_sys_admin():
            from otelwater.errors import EnvironmentProblem

            raise EnvironmentProblem(
                "uprobes need CAP_SYS_ADMIN on this kernel (Linux 6.16 and the stable kernels "
                "took them back from CAP_PERFMON), which this process lacks",
                "use --probes tracepoint (the default: no CAP_SYS_ADMIN), or run as root")
    if ports and not wait:
        used = ports_in_use()
        idle = [p for p in ports if p not in used]
        if idle:
            raise UsageError(f"no TCP socket uses port {', '.join(map(str, idle))}",
                             "start the service first, or pass --wait to watch for it")
    from otelwater.watch import run_watch

    from otelwater.config import load_config

    config = load_config(config_file, flags={"correlate.threshold_ms": blocked_ms,
                                             "correlate.window_ms": window_ms,
                                             "correlate.include_idle": include_idle,
                                             "correlate.record_rate": record_rate,
                                             "export.span_rate": otlp_span_rate})
    endpoint = None
    if prometheus_port is not None:  # bound now: a taken port fails before anything attaches
        from otelwater.export.prometheus import PrometheusEndpoint

        endpoint = PrometheusEndpoint(prometheus_port, prometheus_address)
        click.echo(f"Serving metrics for Prometheus at {endpoint.url}.", err=True)
    try:
        run_watch(pids=pids, ports=ports, cgroups=cgroups, duration=duration,
                  interval=interval, as_json=as_json, follow=follow, high_water=high_water,
                  ringbuf_pages=ringbuf_pages, rows=rows, go_binary=go_binary,
                  go_pids=go_pids, probes=probes, config=config, otlp=otlp,
                  prometheus=endpoint, recorder=recorder, headless=headless,
                  notices=notices)
    finally:
        if endpoint is not None:
            endpoint.close()


from otelwater.cli_locate import locate_command  # noqa: E402

main.add_command(verbose_option(locate_command))

from otelwater.cli_record import correlate_command, record_command_from, with_record_option  # noqa: E402,E501

main.add_command(with_record_option(watch))            # watch --record FILE [--force]
main.add_command(record_command_from(watch))
main.add_command(verbose_option(correlate_command))

from otelwater.cli_agent import agent_command  # noqa: E402

main.add_command(verbose_option(agent_command))

if __name__ == "__main__":
    main()
