"""`otelwater record -o FILE`, `otelwater watch --record FILE` and `otelwater correlate FILE`.

Options and exit codes only; the work lives in otelwater.watch and otelwater.report.

`record` is `watch` with no live view (and no analysis while it runs): the same selectors and
probe options, the very same click options, checked by watch's own command before anything is
attached. `watch --record` is `watch` as it is, its raw records (before analysis) also written to
FILE. Both call watch's own command with the recording Writer as an extra keyword argument
(`recorder`, and `headless` for `record`), so watch's command stays one piece. The file format
is `otelwater.events.recording` (docs/recording.md); a file that exists is refused before
anything is attached unless --force.

`correlate` reads a recording back through the same pipeline and analysis as `watch`: the file
is the source, the report (or JSON Lines) and the OTLP re-export are the sinks.
"""

from __future__ import annotations

import copy
import gc
import os
import sys

import click

from otelwater.cli_options import MAX_BLOCKED_MS, FiniteFloat
from otelwater.errors import UsageError

# watch's options that only shape its live output; `record` has none
LIVE_ONLY = {"as_json": False, "rows": 15, "otlp_endpoint": None, "otlp_protocol": None,
             "prometheus_port": None, "prometheus_address": "127.0.0.1"}

RECORD_EPILOG = """
\b
Examples:
  otelwater record -o day.otw.gz -P 8080 -d 600   # port 8080, ten minutes
  otelwater record -o svc.otw.gz --go-binary ./srv  # + the Go reads of ./srv
  otelwater watch -p 1234 --record svc.otw.gz     # the live view, and a file
  otelwater correlate svc.otw.gz                  # then: why were reads slow?

The file is gzip-compressed JSON Lines (zcat FILE | jq . reads it): a header (host, clock
offset to wall time, the options, each traced process's executable and OTEL_SERVICE_NAME /
OTEL_RESOURCE_ATTRIBUTES), the snapshots, reads, lost and notice records as `watch --json`
prints them, and an end record. Synced at least every second: a kill -9 loses at most ~1 s.
"""

CORRELATE_EPILOG = """
\b
Examples:
  otelwater correlate svc.otw.gz                   # worst sockets and reads
  otelwater correlate svc.otw.gz --plot water.png  # + a heat map of water
  otelwater correlate svc.otw.gz --json | jq 'select(.type=="verdict")'

--json prints every verdict and alert record as it is decided (the keys of `watch --json`),
then one socket_summary per socket, one reader_summary per goroutine, and a last record of
type "correlation" (the file, its counts, complete or where it broke). Exit 5 when the file
is malformed or cut short: the results up to that record are printed first.
"""


def _option(*decls, **attrs) -> click.Option:
    return click.Option(decls, **attrs)


def _jsonable(value):
    return list(value) if isinstance(value, tuple) else value


def _record_run(base: click.Command, path: str, force: bool, flag: str, headless: bool,
                kw: dict) -> None:
    from otelwater.events.recording import Writer

    writer = Writer(path, force=force, flag=flag,  # refuses an existing file here, at once
                    options={k: _jsonable(v) for k, v in kw.items()})
    with writer:  # the end record, also after Ctrl-C, SIGTERM or --duration
        click.get_current_context().invoke(base.callback, **kw, recorder=writer,
                                           headless=headless)
    if writer.header is not None:
        click.echo(f"otelwater: recorded {writer.records:,} records ({writer.size / 1024:.0f} "
                   f"KiB) to {path}; `otelwater correlate {path}` gives the verdicts", err=True)


def with_record_option(watch: click.Command) -> click.Command:
    """`watch` with --record FILE and --force: the same command otherwise."""
    cmd = copy.copy(watch)
    cmd.params = [*watch.params,
                  _option("--record", metavar="FILE", default=None,
                          type=click.Path(dir_okay=False),
                          help="Also write the raw records to FILE, a recording for "
                          "`otelwater correlate` (see `otelwater record --help`)."),
                  _option("--force", is_flag=True,
                          help="With --record: overwrite FILE if it exists.")]

    def callback(record, force, **kw):
        if force and record is None:
            raise UsageError("--force without --record", "--force lets --record overwrite "
                             "its FILE: give --record FILE, or leave --force out")
        if record is None:
            return click.get_current_context().invoke(watch.callback, **kw)
        _record_run(watch, record, force, "--force", headless=False, kw=kw)

    cmd.callback = callback
    return cmd


def record_command_from(watch: click.Command) -> click.Command:
    params = [_option("-o", "--output", "output", metavar="FILE", required=True,
                      type=click.Path(dir_okay=False),
                      help="The recording to write (refused if it exists, unless --force)."),
              _option("--force", is_flag=True, help="Overwrite FILE if it exists.")]
    params += [p for p in watch.params if p.name not in LIVE_ONLY]

    def callback(output, force, **kw):
        _record_run(watch, output, force, "--force", headless=True, kw={**kw, **LIVE_ONLY})

    return click.Command(
        "record", params=params, callback=callback, epilog=RECORD_EPILOG,
        context_settings=watch.context_settings,
        help="Record what `watch` sees to FILE, for `otelwater correlate` later.\n\n"
        "Takes watch's selectors (--pid, --port, --cgroup, --go-binary, --go-pid) and probe "
        "options; nothing is shown while it runs. Stop with Ctrl-C, SIGTERM or --duration: "
        "the file is then complete (a kill -9 leaves it readable up to the last second).",
        short_help="Record raw records to a file, for correlate.")


# -- correlate ------------------------------------------------------------------------------------

def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def offline_config(recorded: dict, config_file: str | None, flags: dict):
    """The configuration for correlating a recording: defaults < the recording's own (what the
    live run used) < --config / $OTELWATER_CONFIG < OTELWATER_* < flags."""
    import os

    from otelwater import config as cfgmod

    explicit = {k for k, v in flags.items() if v is not None}
    path = config_file or os.environ.get(cfgmod.CONFIG_ENV) or None
    if path:
        explicit |= set(cfgmod.read_file(path))
    explicit |= {cfgmod.ENV_NAMES[n] for n in os.environ if n in cfgmod.ENV_NAMES}
    inherited = {k: v for k, v in _flatten(recorded).items()
                 if k in cfgmod.KEYS and k not in explicit}
    user = cfgmod.load_config(config_file, flags=flags)   # the user's own errors, first
    try:
        return cfgmod.load_config(config_file, flags={
            **inherited, **{k: v for k, v in flags.items() if v is not None}})
    except Exception:  # noqa: BLE001 - a recording from another version: its values unusable
        click.echo("otelwater: the recording's analysis settings do not apply here; using "
                   "this otelwater's defaults", err=True)
        return user


@click.command("correlate", epilog=CORRELATE_EPILOG)
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True,
              help="JSON Lines on stdout: verdict and alert records, summaries, a last "
              "'correlation' record.")
@click.option("--plot", "plot_png", metavar="PNG", type=click.Path(dir_okay=False),
              help="Write a heat map of water (unread bytes) per socket over time, with the "
              "slow reads marked by verdict.")
@click.option("--window-ms", type=FiniteFloat(0, 60_000, fix="give milliseconds from 0 "
                                                  "to 60000, e.g. --window-ms 5"),
              default=None, help="A snapshot joins a read within this of its start or end.  "
              "[default: the recording's, else 5]")
@click.option("--blocked-ms", type=FiniteFloat(0, MAX_BLOCKED_MS, fix="give "
                                                   "milliseconds, e.g. --blocked-ms 1"),
              default=None, help="A read that lasted, or whose bytes waited, this long is "
              "slow and gets a verdict.  [default: the recording's, else 1]")
@click.option("--include-idle", is_flag=True, default=None,
              help="Idle reads (the peer owed nothing while they waited) are slow reads too, "
              "with verdict idle.  [default: off, or correlate.include_idle]")
@click.option("--config", "config_file", metavar="FILE", type=click.Path(dir_okay=False),
              default=None, help="YAML configuration (see examples/otelwater.yaml).")
@click.option("--top", type=click.IntRange(1, 1000), default=10, show_default=True,
              help="Sockets and reads listed in the report.")
@click.option("--otlp-endpoint", default=None, metavar="URL",
              help="Also re-export the verdicts as spans, and the water and read metrics, at "
              "their recorded times under each traced service's recorded identity, to this "
              "OTLP endpoint; a read recorded with its request's trace context (pprof labels) "
              "is again a child of the request's span.  [default: off, "
              "or OTEL_EXPORTER_OTLP_ENDPOINT]")
@click.option("--otlp-protocol", type=click.Choice(["grpc", "http/protobuf"]), default=None,
              help="OTLP transport.  [default: OTEL_EXPORTER_OTLP_PROTOCOL, else grpc]")
def correlate_command(file, as_json, plot_png, window_ms, blocked_ms, include_idle, config_file,
                      top, otlp_endpoint, otlp_protocol):
    """Why were the reads in a recording slow? A verdict with evidence for each slow read.

    Runs FILE (from `otelwater record` or `watch --record`) through the same analysis as
    `watch`: the ±window join of snapshots to reads, the verdict rules, alerts and
    per-socket summaries; then a report (worst sockets and reads, verdicts with their
    figures, what was lost or unknown and why), or --json, and --plot. FILE may also be
    the OTLP JSON a Collector's file exporter wrote of otelwater's spans (detected): the
    same verdicts, from the slow reads and their evidence the spans carry.
    """
    from otelwater.events.otlpjson import open_input
    from otelwater.export.jsonl import JsonLinesSink
    from otelwater import report

    flags = {"correlate.threshold_ms": blocked_ms, "correlate.window_ms": window_ms,
             "correlate.include_idle": include_idle}
    if plot_png:  # a PNG that cannot be written is said now, not after the whole analysis
        where = os.path.dirname(os.path.abspath(plot_png))
        if not os.path.isdir(where) or not os.access(where, os.W_OK):
            raise UsageError(f"--plot {plot_png}: cannot write in {where}",
                             "give a PNG path in a directory that exists and is writable")
    otlp = None
    if otlp_endpoint or otlp_protocol or any(k.startswith("OTEL_EXPORTER_OTLP_")
                                             and k.endswith("ENDPOINT") for k in os.environ):
        from otelwater.export.otlp import resolve_options

        otlp = resolve_options(otlp_endpoint, otlp_protocol)  # bad values: exit 2, now
    with open_input(file) as probe:       # the header (and its errors) before any work
        recorded = probe.header.config
    config = offline_config(recorded, config_file, flags)
    exporter = None

    def sinks(header) -> list:
        nonlocal exporter
        out = []
        if as_json:   # the analysis's records; the recording's own are not printed back
            out.append(JsonLinesSink(kinds=("verdict", "alert", "summary")))
        if otlp is not None:   # spans and metric points at the recording's times, as decided
            from otelwater.export.otlp import offline_sink

            exporter = offline_sink(header, endpoint=otlp_endpoint, protocol=otlp_protocol,
                                    out=sys.stderr, config=config, timeout_s=10.0)
            out.append(exporter)
        return out

    gc.set_threshold(100_000, 20, 100)  # millions of small records: ~20% less time in GC
    col = report.correlate(file, config, sinks=sinks, plot=bool(plot_png), top=top)
    if not as_json:
        click.echo(report.render(col))
    if plot_png:
        n = report.plot(col, plot_png)
        click.echo(f"otelwater: wrote {plot_png} ({n} sockets)", err=True)
    shortfall = exporter.shortfall() if exporter is not None else None
    if shortfall:
        from otelwater.errors import ExportFailed

        cause = exporter.cause()
        failed = ExportFailed(f"OTLP export to {otlp.target} {shortfall}",
                              (cause.fix if cause else "check that the Collector runs and "
                               "listens there (--otlp-endpoint, --otlp-protocol)")
                              + ", then run correlate again")
        if col.error is None:
            raise failed
        click.echo(f"otelwater: {failed.one_line()}", err=True)   # and the file's own error:
    if col.error is not None:                                      # the first cause, exit 5
        raise col.error
