"""Command line: argument parsing and exit codes only; the work lives in the stage modules."""

from __future__ import annotations

import os
import sys

import click

from otelwater import __version__
from otelwater.errors import NoSuchProcess, OtelwaterError, UsageError

WATCH_EPILOG = """
\b
Examples:
  otelwater watch                      # every TCP socket on the host, live view
  otelwater watch -P 8080 -d 30        # sockets with local or remote port 8080, 30 s
  otelwater watch -p 1234 --json       # one process, JSON Lines on stdout
  otelwater watch -p 1234 --follow     # a record for every arrival and read
  otelwater watch --go-binary ./server # + Go reads of every process of that binary
  otelwater watch -p 1234 --go-pid 1234 --probes uprobe --blocked-ms 5

\b
Columns: LVL water level (skbs queued), VOL volume (sk_rmem_alloc, ss -tm "r"),
UNRD unread payload bytes (SIOCINQ, ss Recv-Q), CAP capacity (sk_rcvbuf, "rb"),
FILL volume/capacity, DROP the socket's drop counter (sk_drops), ! alerts firing.
Readers (with --go-binary/--go-pid): GOID goroutine, READS reads seen, BLK blocked ones,
LAST/MAX blocked read latency, CALLER the function that called net.(*conn).Read.
With --json, Go reads are objects of type "read" (ts_start_ns, ts_end_ns, pid, tid, goid,
fd, sock_key, requested, returned, stack, source).
"""


class Group(click.Group):
    """Turns every OtelwaterError into one line on stderr and its exit code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except OtelwaterError as e:
            click.echo(f"otelwater: {e.one_line()}", err=True)
            ctx.exit(e.exit_code)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"],
                                          "max_content_width": 100})
@click.version_option(__version__, prog_name="otelwater")
def main():
    """Why are a Go service's TCP reads slow? otelwater watches every TCP socket's kernel
    receive queue (its "water level") with eBPF and the Go reads that drain it.

    Start with `otelwater doctor`, then `otelwater watch`.
    """


@main.command()
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


def _check_pids(pids):
    for pid in pids:
        if not os.path.exists(f"/proc/{pid}"):
            raise NoSuchProcess(f"no process with pid {pid}", "check the pid with ps or pgrep")


@main.command(epilog=WATCH_EPILOG)
@click.option("-p", "--pid", "pids", type=int, multiple=True,
              help="Watch sockets of this process (repeatable).")
@click.option("-P", "--port", "ports", type=click.IntRange(1, 65535), multiple=True,
              help="Watch sockets whose local or remote port is this (repeatable).")
@click.option("--cgroup", "cgroups", multiple=True, metavar="DIR",
              help="Watch sockets read by processes of this cgroup v2 directory (repeatable).")
@click.option("-d", "--duration", type=click.FloatRange(min=0, min_open=True), default=None,
              metavar="SECONDS", help="Stop by itself after this long.  [default: run until "
              "Ctrl-C]")
@click.option("-i", "--interval", type=click.FloatRange(min=0.05), default=1.0,
              show_default=True, metavar="SECONDS",
              help="How often the socket table is swept and the view redrawn.")
@click.option("--json", "as_json", is_flag=True,
              help="JSON Lines on stdout: one object per snapshot (type, ts_ns, sock_key, pid, "
              "comm, laddr, lport, raddr, rport, level, volume, unread_bytes, capacity, backlog, "
              "drops, trigger, ...).")
@click.option("--follow", is_flag=True,
              help="A record for every arrival and read on the watched sockets (use with "
              "--pid/--port: costs a ring-buffer record per event).")
@click.option("--high-water", type=click.IntRange(min=1), default=65536, show_default=True,
              metavar="BYTES", help="Volume at which a socket's rise is recorded at once "
              "(below it, the periodic sweep reports it).")
@click.option("--ringbuf-pages", type=click.IntRange(min=1), default=64, show_default=True,
              help="Ring buffer size in 4 KiB pages (a power of two).")
@click.option("--rows", type=click.IntRange(min=1), default=15, show_default=True,
              help="Sockets shown in the live view.")
@click.option("--go-binary", type=click.Path(dir_okay=False), default=None, metavar="PATH",
              help="Also trace the Go reads of every process running this executable (now or "
              "later) and show the readers beside their sockets.")
@click.option("--go-pid", "go_pids", type=int, multiple=True, metavar="PID",
              help="Also trace the Go reads of this process (repeatable).")
@click.option("--probes", type=click.Choice(["tracepoint", "uprobe"]), default="tracepoint",
              show_default=True,
              help="How Go reads are traced: read-syscall tracepoints (cheap: ~1-2 us a "
              "parking read) or uprobes on net.(*conn).Read (exact Go-level latency of every "
              "Read, ~13 us a hit each way here).")
@click.option("--blocked-ms", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="A Go read lasting this long is a blocked read, recorded in full; shorter "
              "ones are counted.")
@click.option("--wait", is_flag=True,
              help="Accept --port values no socket uses yet (a service about to start).")
def watch(pids, ports, cgroups, duration, interval, as_json, follow, high_water, ringbuf_pages,
          rows, go_binary, go_pids, probes, blocked_ms, wait):
    """Watch TCP receive queues: the sockets holding the most water, live.

    Traces arrivals (rain), reads (drain), drops (overflow) and closes with eBPF tracepoints.
    Stop with Ctrl-C (or --duration); every probe is detached on exit.
    """
    from otelwater.hostsockets import ports_in_use

    _check_pids(pids)
    _check_pids(go_pids)
    if ports and not wait:
        used = ports_in_use()
        idle = [p for p in ports if p not in used]
        if idle:
            raise UsageError(f"no TCP socket uses port {', '.join(map(str, idle))}",
                             "start the service first, or pass --wait to watch for it")
    from otelwater.watch import run_watch

    run_watch(pids=pids, ports=ports, cgroups=cgroups, duration=duration, interval=interval,
              as_json=as_json, follow=follow, high_water=high_water,
              ringbuf_pages=ringbuf_pages, rows=rows, go_binary=go_binary,
              go_pids=go_pids, probes=probes, blocked_ns=int(blocked_ms * 1e6))


from otelwater.cli_locate import locate_command  # noqa: E402

main.add_command(locate_command)

if __name__ == "__main__":
    main()
