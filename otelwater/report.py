"""`otelwater correlate FILE`: a recording through the same pipeline as `watch`, then a report.

    correlate(path, config, sinks=...)
                              the file's records -> Pipeline(Analysis(config, start_ns=the
                              recording's start)) -> the Collection (a sink: what the report
                              and the plot need; bounded: the plot's water series only when
                              asked for) and the caller's sinks (JSON Lines, OTLP re-export)
    render(collection)        the report for a person, 80 columns: the recording, per process
                              where the slow time went (the answer first), verdict counts,
                              worst sockets, worst reads with their evidence, what was lost,
                              cut or unknown and why
    plot(collection, png)     a heat map of water (unread bytes) per socket over time, the slow
                              reads marked by verdict, sized by their wait (matplotlib, Agg)

A malformed or cut file stops the reading at the record where it broke: the analysis is
finished with what came before (so the results up to there are reported) and the
RecordingError is kept in `Collection.error` for the caller to raise after printing them.
"""

from __future__ import annotations

import heapq
import re
import time
from array import array
from dataclasses import dataclass, field
from typing import Callable

from otelwater.errors import OtelwaterError, RecordingError, UsageError
from otelwater.events.recording import Header, ProcessInfo
from otelwater.events.records import Summary
from otelwater.events.verdict import (CONSUMER_LAGGING, IDLE, PEER_STARVED, RUNTIME_STARVED,
                                      UNKNOWN, VERDICTS, Verdict)
from otelwater.export.live import (WaitBook, caller, endpoint, human_bytes, severity_ns,
                                   verdict_wait)
from otelwater.export.sink import Sink
from otelwater.sockkey import format_key

BATCH = 4096
WIDTH = 80
VERDICT_MEANING = {
    PEER_STARVED: "parked on an empty queue until its data came",
    RUNTIME_STARVED: "data came while it parked; the goroutine ran late",
    CONSUMER_LAGGING: "its bytes stood in the kernel queue",
    UNKNOWN: "evidence missing (see below)",
    IDLE: "the peer owed nothing (think time, keep-alive)",
}


severity = severity_ns     # how bad a slow read was: its duration (less its idle part) or its
                          # bytes' queue delay
MAX_IDLE_GROUPS = 256     # idle reads folded by (pid, role, caller): at most this many groups


@dataclass(eq=False)
class Collection(Sink):
    """What the report, the plot and `correlate --json`'s last record need, gathered as a sink
    of the pipeline (every record after analysis)."""

    path: str
    header: Header
    config: object
    analysis: object = None
    top: int = 10
    counts: dict = field(default_factory=lambda: dict.fromkeys(
        ("snapshot", "read", "lost", "notice", "process"), 0))
    verdicts: dict = field(default_factory=lambda: dict.fromkeys(VERDICTS, 0))
    alerts: dict = field(default_factory=dict)          # rule -> times fired
    unknown_why: dict = field(default_factory=dict)     # reason, figures blanked -> count
    lost: dict = field(default_factory=dict)            # probe -> lost_total (last)
    notices: list = field(default_factory=list)         # first texts, deduplicated
    processes: dict = field(default_factory=dict)       # pid -> ProcessInfo
    worst: list = field(default_factory=list)           # heap of (severity, seq, Verdict)
    last_ns: int = 0
    end: dict | None = None                             # the end record (None: cut short)
    error: RecordingError | None = None
    # the plot's data (with plot=True): sock_key -> (ts array, unread array); marks
    series: dict | None = None
    marks: list | None = None                           # (ts_end, sock_key, verdict, wait)
    book: WaitBook = field(default_factory=WaitBook)    # per process, where the time went
    idle_groups: dict = field(default_factory=dict)     # (pid, role, caller) -> [n, worst]
    roles: dict = field(default_factory=dict)           # the plot's: sock_key -> role
    _seq: int = 0

    name = "report"
    ignores = frozenset({"summary"})

    @property
    def slow_reads(self) -> int:
        return sum(self.verdicts.values())

    def on_snapshot(self, r) -> None:
        self.counts["snapshot"] += 1
        if r.ts_ns > self.last_ns:
            self.last_ns = r.ts_ns
        series = self.series
        if series is not None and r.sock_key:
            s = series.get(r.sock_key)
            if s is None:
                s = series[r.sock_key] = (array("q"), array("q"))
            s[0].append(r.ts_ns)
            s[1].append(r.unread_bytes)

    def on_read(self, r) -> None:
        self.counts["read"] += 1
        if r.ts_end_ns > self.last_ns:
            self.last_ns = r.ts_end_ns

    def on_lost(self, r) -> None:
        self.counts["lost"] += 1
        self.lost[r.probe] = max(self.lost.get(r.probe, 0), r.lost_total)

    def on_notice(self, r) -> None:
        self.counts["notice"] += 1
        if r.text not in self.notices and len(self.notices) < 20:
            self.notices.append(r.text)

    def on_process(self, r) -> None:
        self.counts["process"] += 1
        self.processes.setdefault(r.pid, r)

    def on_counts(self, r) -> None:
        self.book.add_counts(r)

    def on_verdict(self, r) -> None:
        self.verdicts[r.verdict] += 1
        if r.verdict == UNKNOWN:
            why = re.sub(r"-?\d[\d.,]*( ms| ns| us)?", "N", r.reason)
            self.unknown_why[why] = self.unknown_why.get(why, 0) + 1
        last = None
        if not r.read.peer_addr and not r.evidence and self.analysis is not None:
            s = self.analysis.correlator.summaries.sockets.get(r.sock_key)
            last = s.last if s is not None else None
        self.book.add_verdict(r, last)
        self._seq += 1
        item = (severity(r), -self._seq, r)
        if r.verdict == IDLE:
            # idle reads alike (one process, role and caller) are one row of the worst reads
            key = (r.read.pid, r.read.role, caller(r.read.stack))
            g = self.idle_groups.get(key)
            if g is None:
                if len(self.idle_groups) >= MAX_IDLE_GROUPS:
                    key = (r.read.pid, r.read.role, None)
                g = self.idle_groups.setdefault(key, [0, item])
            g[0] += 1
            if item > g[1]:
                g[1] = item
        elif len(self.worst) < self.top:
            heapq.heappush(self.worst, item)
        elif item > self.worst[0]:
            heapq.heapreplace(self.worst, item)
        if self.marks is not None:
            self.marks.append((r.read.ts_end_ns, r.sock_key, r.verdict, verdict_wait(r)))
            if r.read.role:
                self.roles[r.sock_key] = r.read.role

    def on_alert(self, r) -> None:
        if r.state == "fired":
            self.alerts[r.rule] = self.alerts.get(r.rule, 0) + 1


def correlate(path: str, config, *, sinks: Callable[[Header], list] | list = (),
              plot: bool = False, top: int = 10) -> Collection:
    """Run the recording (or OTLP JSON file, otelwater.events.otlpjson) at `path` through the
    pipeline; RecordingError for a file that has no valid header, otherwise a Collection (its
    `error` set when the file broke later). `sinks`: more sinks beside the Collection (or a
    function of the file's header that makes them), each given every record after analysis,
    then the summaries and, last, the "correlation" record (summary_json)."""
    from otelwater.events.otlpjson import open_input
    from otelwater.export.sink import RunInfo
    from otelwater.pipeline import Analysis, Pipeline

    reader = open_input(path)
    try:
        col = Collection(path, reader.header, config, top=top)
        col.processes.update(reader.header.processes)
        if plot:
            col.series, col.marks = {}, []
        extra = sinks(reader.header) if callable(sinks) else list(sinks)
        analysis = col.analysis = Analysis(config, start_ns=reader.header.start_ns)
        # OTLP JSON: the evidence counts as the live run decided them
        with Pipeline(analysis=analysis, sinks=[col, *extra],
                      post=getattr(reader, "amend", None), close_timeout_s=10.0) as pipeline:
            pipeline.start(RunInfo(reader.header.start_ns, config, header=reader.header))
            col.error = pipeline.run_records(reader)
            reader.close()
            col.end = reader.end
            pipeline.emit([Summary(summary_json(col))])
    finally:
        reader.close()
    return col


def summary_json(col: Collection) -> dict:
    """The last record of `correlate --json`: the file, its counts, and whether it was whole."""
    h = col.header
    return {"type": "correlation", "file": col.path, "complete": col.error is None,
            "error": col.error.one_line() if col.error else None,
            "broken_at_record": getattr(col.error, "record", None),
            "host": h.host, "start_ns": h.start_ns, "started_wall_ns": h.started_wall_ns,
            "realtime_minus_monotonic_ns": h.clock["realtime_minus_monotonic_ns"],
            "records": dict(col.counts), "slow_reads": col.slow_reads,
            "verdicts": dict(col.verdicts), "alerts_fired": dict(col.alerts),
            "lost_by_probe": dict(col.lost),
            "correlator": col.analysis.correlator.stats() if col.analysis else None,
            "processes": {str(pid): p.to_json() for pid, p in col.processes.items()}}


# -- the report ---------------------------------------------------------------------------------

def dur(ns: int | None) -> str:
    if ns is None:
        return "-"
    if ns < 1_000:
        return f"{ns}ns"
    if ns < 1_000_000:
        return f"{ns / 1e3:.0f}us"
    if ns < 1_000_000_000:
        return f"{ns / 1e6:.1f}ms"
    return f"{ns / 1e9:.2f}s"


def clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n - 1] + "~"


def _wall(h: Header, ts_ns: int) -> str:
    secs = h.wall_ns(ts_ns) / 1e9
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(secs))


def _process_line(p: ProcessInfo) -> str:
    name = p.exe or p.comm or "?"
    svc = f"  service {p.service_name}" if p.service_name else ""
    return clip(f"  pid {p.pid} {name}{svc}", WIDTH)


def _wrap(text: str, indent: str, width: int = WIDTH) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width, initial_indent=indent, subsequent_indent=indent + "  ")


def render(col: Collection) -> str:
    h = col.header
    c = col.config.correlate
    a = col.analysis
    name = col.path if len(col.path) <= WIDTH - 21 else "~" + col.path[-(WIDTH - 22):]
    out = [f"otelwater correlate: {name}"]
    span = max(0, (col.end["ts_ns"] if col.end else col.last_ns) - h.start_ns)
    host = h.host.get("name", "?")
    out.append(clip(f"recorded on {host} (Linux {h.host.get('kernel', '?')}) from "
                    f"{_wall(h, h.start_ns)} for {span / 1e9:.1f} s", WIDTH))
    opts = h.options
    sel = []
    for key, label in (("pids", "pid"), ("ports", "port"), ("cgroups", "cgroup"),
                       ("go_pids", "Go pid")):
        if opts.get(key):
            sel.append(f"{label} " + ",".join(map(str, opts[key])))
    if opts.get("go_binary"):
        sel.append(f"Go binary {opts['go_binary']}")
    out += _wrap("selectors: " + ("; ".join(sel) or "all TCP sockets"), "")
    n = col.counts
    lost = sum(col.lost.values())
    out.append(f"records: {n['snapshot']:,} snapshots, {n['read']:,} Go reads, "
               f"{lost:,} lost (ring buffer full), {n['notice']} notices")
    described = [p for p in col.processes.values() if p.exe or p.service_name]
    if described:
        out.append("processes:")
        out += [_process_line(p) for p in described[:5]]
        if len(described) > 5:
            out.append(f"  ... and {len(described) - 5} more (--json lists them)")
    if col.error is not None:
        out.append(clip(f"CUT SHORT at record {getattr(col.error, 'record', '?')}: the results "
                        "below cover the file up to there", WIDTH))

    # the answer first: per process, where the slow reads' time went
    procs = process_times(col)
    if procs:
        out += ["", "Where the slow time went (each slow read under its verdict, with its wait)"]
        for p in procs[:5]:
            out += p.lines(WIDTH)
        if len(procs) > 5:
            out.append(f"  ... and {len(procs) - 5} more processes (--json: reader_summary)")
        if any(p.exact for p in procs):
            out += _wrap("exact: the kernel counted every slow read (recorded in full or not)"
                         + ("" if all(p.exact for p in procs) else
                            " of the processes it traced"), "  ")

    # verdicts
    total = col.slow_reads
    out += ["", f"Slow reads: {total:,} (a read that lasted, or whose bytes waited, "
            f">= {c.threshold_ms:g} ms)"]
    for v in VERDICTS:
        k = col.verdicts[v]
        if v == IDLE and not k:
            continue    # listed only when asked for (--include-idle) and seen
        pct = f"{100 * k / total:3.0f}%" if total else "   -"
        out.append(f"  {v:<16} {k:>6,} {pct} {VERDICT_MEANING[v]}")
    if any(p.exact for p in procs):
        counted = sum(p.slow + (p.idle if col.verdicts[IDLE] else 0) for p in procs)
        if counted != total:
            out += _wrap(f"(the records; {counted:,} with the kernel's exact counts: the "
                         "figures at the top)", "  ")

    # worst sockets
    socks = a.socket_summaries() if a is not None else []
    socks.sort(key=lambda d: (d["slow_reads"], d["peak_volume"]), reverse=True)
    socks = [d for d in socks if d["slow_reads"] or d["peak_volume"]][:col.top]
    if socks:
        out += ["", "Worst sockets (most slow reads, then most water)",
                f"  {'LOCAL':<21} {'REMOTE':<21} {'PID':>7} {'SLOW':>5} {'VERDICT':<7} "
                f"{'QDLY90':>6} {'PEAK':>5}"]
        for d in socks:
            verdict = {PEER_STARVED: "peer", RUNTIME_STARVED: "runtime",
                       CONSUMER_LAGGING: "lagging", UNKNOWN: "unknown", IDLE: "idle"}.get(
                d["verdict"], d["verdict"] or "-")
            local = endpoint(d.get("laddr", "?"), d.get("lport", 0)) if "laddr" in d else \
                d["sock_key"]
            remote = endpoint(d.get("raddr", "?"), d.get("rport", 0)) if "raddr" in d else ""
            out.append(f"  {clip(local, 21):<21} {clip(remote, 21):<21} {d.get('pid', 0):>7} "
                       f"{d['slow_reads']:>5} {clip(verdict, 7):<7} "
                       f"{dur(d['queue_delay_ns']['p90']):>6} "
                       f"{human_bytes(d['peak_volume']):>5}")
            extra = []
            if d["wait_run_ns"]["count"]:
                extra.append(f"waiting to run p90 {dur(d['wait_run_ns']['p90'])}")
            if d["wait_peer_ns"]["count"]:
                extra.append(f"for the peer p90 {dur(d['wait_peer_ns']['p90'])}")
            if d["drops"]:
                extra.append(f"{d['drops']} drops")
            rain = d.get("rain_water")
            if rain and rain["envelope"]:
                extra.append(f"rain-water {100 * rain['drained_share']:.0f}% drained")
            if extra:
                out += _wrap("; ".join(extra), "    ")

    # worst reads (idle reads alike folded into one row: the longest, and how many)
    items = [(sev, seq, v, 1) for sev, seq, v in col.worst]
    items += [(sev, seq, v, n) for n, (sev, seq, v) in col.idle_groups.values()]
    items.sort(key=lambda x: (x[0], x[1]), reverse=True)
    worst = [(v, n) for _, _, v, n in items[:col.top]]
    if worst:
        sockets = a.correlator.summaries.sockets if a is not None else {}
        out += ["", "Worst reads (longest wait first; +s from the start, the peer's port)",
                f"  {'+S':>8} {'PID':>7} {'GOID':>6} {'RPORT':>5} {'DUR':>7} {'VERDICT':<16} "
                f"FIGURES"]
        for v, n in worst:
            r = v.read
            fig = figures(v)
            ev = v.evidence
            last = ev[-1] if ev else getattr(sockets.get(r.sock_key), "last", None)
            port = last.rport if last is not None else (r.peer_port or "")
            verdict = f"{v.verdict} ×{n:,}" if n > 1 else v.verdict
            out.append(clip(f"  {(r.ts_start_ns - h.start_ns) / 1e9:>+8.3f} {r.pid:>7} "
                            f"{'-' if r.goid is None else r.goid:>6} {port:>5} "
                            f"{dur(r.duration_ns):>7} {verdict:<16} {fig}", WIDTH))
            evid = f"{v.evidence_total} snapshot{'s' * (v.evidence_total != 1)} within " \
                   f"±{c.window_ms:g} ms"
            if n > 1:
                evid = (f"the longest of {n:,} idle reads alike (pid {r.pid}"
                        + (f", {r.role} sockets" if r.role else "") + ", one caller); " + evid)
            elif v.wait_idle_ns and v.verdict != IDLE:
                evid = f"idle {dur(v.wait_idle_ns)} while the peer owed nothing; " + evid
            if ev:
                evid += (f", unread up to {human_bytes(max(s.unread_bytes for s in ev))}, "
                         f"level up to {max(s.level for s in ev)}")
            if not v.evidence_complete:
                evid += " (incomplete: records late, lost or pruned)"
            out += _wrap(f"{evid}; called by {caller(r.stack)}", "           ")
            if v.verdict == UNKNOWN:
                out += _wrap(f"why: {v.reason}", "           ")

    # lost, unknown, late
    out += ["", "Lost or unknown"]
    if any(col.lost.values()):
        for probe, k in sorted((p, k) for p, k in col.lost.items() if k):
            out += _wrap(f"{k:,} records of the {probe} probe were lost (ring buffer full): "
                         + ("reads overlapping the loss are unknown" if probe == "reads" else
                            "the evidence of reads near the loss is incomplete"), "  ")
    else:
        out.append("  no records were lost")
    cut = sum(k.cut for k in col.book.kernel.values())
    if cut:
        out += _wrap(f"{cut:,} slow reads counted but not recorded in full (--record-rate): "
                     "in the counts and totals at the top, not in the rest", "  ")
    for why, k in sorted(col.unknown_why.items(), key=lambda x: -x[1])[:8]:
        out += _wrap(f"{k:,} unknown: {why}", "  ")
    if a is not None:
        st = a.correlator.stats()
        late = [f"{st[k]:,} {k.replace('_', ' ')}" for k in
                ("late_snapshots", "late_reads", "late_lost", "snapshots_capped",
                 "snapshots_evicted", "sockets_evicted") if st.get(k)]
        if late:
            out += _wrap("bounded memory and lateness: " + ", ".join(late), "  ")
    for text in col.notices[:5]:
        out += _wrap(f"notice: {text}", "  ")
    if col.alerts:
        out += ["", "Alerts fired: " + ", ".join(f"{r} {k}x" for r, k in
                                                 sorted(col.alerts.items()))]
    return "\n".join(out)


def figures(v: Verdict) -> str:
    """A slow read's waits, short: idle, peer and run for a parked read, else its queue
    delay."""
    parts = []
    if v.wait_idle_ns and v.verdict == IDLE:    # else on the line below (it is not the cause)
        parts.append(f"idle {dur(v.wait_idle_ns)}")
    if v.wait_peer_ns is not None and (v.wait_peer_ns or not v.wait_idle_ns):
        parts.append(f"peer {dur(v.wait_peer_ns)}")
    if v.wait_run_ns is not None:
        parts.append(f"run {dur(v.wait_run_ns)}")
    if not parts and v.queue_delay_ns is not None:
        parts.append(f"queued {dur(v.queue_delay_ns)}")
    return " ".join(parts) or "-"


def process_times(col: Collection) -> list:
    """Per process, where its slow reads' time went (otelwater.export.live.ProcessTime), named
    as the recording names it, most time first."""
    idle: dict[int, int] = {}
    if col.analysis is not None:        # idle reads that made no verdict record
        for (pid, _), r in col.analysis.correlator.summaries.readers.items():
            if r.idle_reads:
                idle[pid] = idle.get(pid, 0) + r.idle_reads
    procs = col.book.processes(idle)
    for p in procs:
        info = col.processes.get(p.pid)
        if info is not None:
            exe = (info.exe or "").rsplit("/", 1)[-1]
            p.name = info.service_name or exe or info.comm or p.name
    return procs


# -- the picture --------------------------------------------------------------------------------

MARKERS = {PEER_STARVED: ("o", "#17becf"), RUNTIME_STARVED: ("^", "#d62728"),
           CONSUMER_LAGGING: ("s", "#ff7f0e"), UNKNOWN: ("D", "#e377c2"),
           IDLE: ("o", "#bdbdbd")}
WATER_SCALE_MIN = 65536         # the heat map's colour scale reaches at least this many bytes
MARK_AREA = (6.0, 120.0)        # points^2: the shortest wait's mark, the longest's


class mark_sizes:
    """Area of a mark by its wait: log scale from `low` (the slow-read threshold, or the
    shortest wait if below) to the longest wait; `ticks`: a few round waits in between, for
    the legend."""

    def __init__(self, waits: list[int], low: int):
        import math

        pos = [w for w in waits if w > 0]
        self.low = max(1, min([low, *pos]) if pos else low)
        self.high = max([self.low * 10, *pos])
        self._span = math.log(self.high / self.low)
        self.ticks = [t for t in (10 ** e for e in range(3, 13)) if self.low <= t <= self.high]
        if len(self.ticks) > 4:
            self.ticks = self.ticks[::-(-len(self.ticks) // 4)]

    def __call__(self, wait: int) -> float:
        import math

        f = math.log(max(wait, self.low) / self.low) / self._span
        return MARK_AREA[0] + (MARK_AREA[1] - MARK_AREA[0]) * min(f, 1.0)


def plot(col: Collection, png: str, *, max_sockets: int = 30, bins: int = 600,
         max_marks: int = 20000) -> int:
    """Write the heat map to `png`; the number of sockets drawn."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
        from matplotlib.colors import LogNorm
    except ImportError:
        raise OtelwaterError("matplotlib is not installed (needed by --plot)",
                             "pip install matplotlib, or leave --plot out") from None
    h = col.header
    series = col.series or {}
    summaries = {int(d["sock_key"], 16): d for d in
                 (col.analysis.socket_summaries() if col.analysis else [])}

    def rank(key):
        d = summaries.get(key) or {}
        return (d.get("slow_reads", 0), d.get("peak_volume", 0))

    candidates = set(series) | {k for k, d in summaries.items() if d["slow_reads"]}
    keys = sorted(candidates, key=rank, reverse=True)[:max_sockets]
    t0 = h.start_ns
    t1 = max(col.end["ts_ns"] if col.end else col.last_ns, t0 + 1)
    edges = np.linspace(t0, t1, bins + 1)
    grid = np.full((max(len(keys), 1), bins), np.nan)
    for row, key in enumerate(keys):
        if key not in series:
            continue
        ts = np.frombuffer(series[key][0], dtype=np.int64)
        unread = np.frombuffer(series[key][1], dtype=np.int64).astype(float)
        order = np.argsort(ts, kind="stable")
        ts, unread = ts[order], unread[order]
        # the water stands between snapshots (one comes when it moves): each bin shows the
        # most water seen in it, or the last level before it
        idx = np.clip(np.searchsorted(edges, ts, side="right") - 1, 0, bins - 1)
        peak = np.full(bins, -1.0)
        np.maximum.at(peak, idx, unread)
        last = np.nan
        first_bin, last_bin = idx[0], idx[-1]
        for b in range(first_bin, last_bin + 1):
            if peak[b] >= 0:
                grid[row, b] = peak[b]
                # the level at the end of the bin carries into the next bins
                last = unread[np.searchsorted(idx, b, side="right") - 1]
            else:
                grid[row, b] = last
    height = max(3.0, 0.32 * len(keys) + 1.8)
    fig, ax = plt.subplots(figsize=(12, height), dpi=100)
    cmap = matplotlib.colormaps["viridis"].with_extremes(under="#e8edf2", bad="white")
    vmax = np.nanmax(grid) if keys and np.isfinite(np.nanmax(grid)) else 0.0
    shown = np.where(grid == 0, 0.5, grid)
    # a scale of at least 1 B .. 64 KiB: with little or no water (a service whose reads only
    # wait for their peers) the colours still mean what they mean on any other plot
    mesh = ax.pcolormesh((edges - t0) / 1e9, np.arange(len(keys) + 1) if keys else [0, 1],
                         np.ma.masked_invalid(shown), cmap=cmap,
                         norm=LogNorm(vmin=1, vmax=max(vmax, WATER_SCALE_MIN)), shading="flat")
    fig.colorbar(mesh, ax=ax, pad=0.01, label="unread bytes (log scale; grey: empty)"
                 + ("\nno water stood: every queue was empty" if vmax <= 0 else ""))
    row_of = {k: i for i, k in enumerate(keys)}
    marks = [m for m in (col.marks or []) if m[1] in row_of]
    if len(marks) > max_marks:
        step = len(marks) / max_marks
        marks = [marks[int(i * step)] for i in range(max_marks)]
    # each mark's area grows with its wait (the wait its verdict names: for the peer, to
    # run, its bytes' queue delay, idle), on a log scale from the slow-read threshold to
    # the longest wait
    size = mark_sizes([m[3] for m in marks], col.config.correlate.threshold_ns)
    for verdict in VERDICTS:
        pts = [(ts, row_of[k], size(w)) for ts, k, v, w in marks if v == verdict]
        if not pts:
            continue
        m, color = MARKERS[verdict]
        ax.scatter([(ts - t0) / 1e9 for ts, _, _ in pts], [r + 0.5 for _, r, _ in pts],
                   s=[a for _, _, a in pts], marker=m, color=color, edgecolors="black",
                   linewidths=0.4, alpha=0.8, label=f"{verdict} ({col.verdicts[verdict]:,})",
                   zorder=3)
    if marks:
        for w in size.ticks:        # what the sizes mean
            ax.scatter([], [], s=size(w), marker="o", color="white", edgecolors="black",
                       linewidths=0.4, label=dur(w))
    labels = []
    for k in keys:
        d = summaries.get(k, {})
        if "lport" in d:
            arrow = "->" if col.roles.get(k) == "dialed" else "<-"
            labels.append(f"{d['lport']}{arrow}{endpoint(d['raddr'], d['rport'])} "
                          f"pid {d.get('pid', 0)}")
        else:
            labels.append(format_key(k))
    ax.set_yticks([i + 0.5 for i in range(len(keys))], labels, fontsize=8)
    ax.set_ylim(len(keys) if keys else 1, 0)
    ax.set_xlim(0, (t1 - t0) / 1e9)
    ax.set_xlabel(f"seconds since {_wall(h, t0)}")
    fig.suptitle(f"Water per socket, slow reads marked by verdict, sized by wait: {col.path}"
                 + (" (CUT SHORT)" if col.error else ""), fontsize=10)
    if marks:
        ax.legend(loc="lower left", bbox_to_anchor=(0, 1.0), ncol=9, fontsize=8,
                  frameon=False, borderaxespad=0.2)
    fig.tight_layout()
    try:
        fig.savefig(png, format="png")
    except OSError as e:
        raise UsageError(f"cannot write {png}: {e.strerror or e}",
                         "give a writable path for --plot") from None
    finally:
        plt.close(fig)
    return len(keys)
