"""`otelwater correlate FILE`: a recording through the same pipeline as `watch`, then a report.

    correlate(path, config, sinks=...)
                              the file's records -> Pipeline(Analysis(config, start_ns=the
                              recording's start)) -> the Collection (a sink: what the report
                              and the plot need; bounded: the plot's water series only when
                              asked for) and the caller's sinks (JSON Lines, OTLP re-export)
    render(collection)        the report for a person, 80 columns: the recording, verdict
                              counts, worst sockets, worst reads with their evidence, what was
                              lost or unknown and why
    plot(collection, png)     a heat map of water (unread bytes) per socket over time, the slow
                              reads marked by verdict (matplotlib, Agg)

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
from otelwater.events.verdict import (CONSUMER_LAGGING, PEER_STARVED, RUNTIME_STARVED,
                                      UNKNOWN, VERDICTS, Verdict)
from otelwater.export.live import caller, endpoint, human_bytes
from otelwater.export.sink import Sink
from otelwater.sockkey import format_key

BATCH = 4096
WIDTH = 80
VERDICT_MEANING = {
    PEER_STARVED: "parked on an empty queue until its data came",
    RUNTIME_STARVED: "data came while it parked; the goroutine ran late",
    CONSUMER_LAGGING: "its bytes stood in the kernel queue",
    UNKNOWN: "evidence missing (see below)",
}


def severity(v: Verdict) -> int:
    """How bad a slow read was: its duration or its bytes' time in the queue, the larger."""
    return max(v.read.duration_ns, v.queue_delay_ns or 0)


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
    marks: list | None = None                           # (ts_end, sock_key, verdict)
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

    def on_verdict(self, r) -> None:
        self.verdicts[r.verdict] += 1
        if r.verdict == UNKNOWN:
            why = re.sub(r"-?\d[\d.,]*( ms| ns| us)?", "N", r.reason)
            self.unknown_why[why] = self.unknown_why.get(why, 0) + 1
        self._seq += 1
        item = (severity(r), -self._seq, r)
        if len(self.worst) < self.top:
            heapq.heappush(self.worst, item)
        elif item > self.worst[0]:
            heapq.heapreplace(self.worst, item)
        if self.marks is not None:
            self.marks.append((r.read.ts_end_ns, r.sock_key, r.verdict))

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

    # verdicts
    total = col.slow_reads
    out += ["", f"Slow reads: {total:,} (a read that lasted, or whose bytes waited, "
            f">= {c.threshold_ms:g} ms)"]
    for v in VERDICTS:
        k = col.verdicts[v]
        pct = f"{100 * k / total:3.0f}%" if total else "   -"
        out.append(f"  {v:<16} {k:>6,} {pct} {VERDICT_MEANING[v]}")

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
                       CONSUMER_LAGGING: "lagging", UNKNOWN: "unknown"}.get(
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

    # worst reads
    worst = [v for _, _, v in sorted(col.worst, reverse=True)]
    if worst:
        sockets = a.correlator.summaries.sockets if a is not None else {}
        out += ["", "Worst reads (longest wait first; +s from the start, the peer's port)",
                f"  {'+S':>8} {'PID':>7} {'GOID':>6} {'RPORT':>5} {'DUR':>7} {'VERDICT':<16} "
                f"FIGURES"]
        for v in worst:
            r = v.read
            if v.wait_peer_ns is not None:
                fig = f"peer {dur(v.wait_peer_ns)} run {dur(v.wait_run_ns)}"
            elif v.queue_delay_ns is not None:
                fig = f"queued {dur(v.queue_delay_ns)}"
            else:
                fig = "-"
            ev = v.evidence
            last = ev[-1] if ev else getattr(sockets.get(r.sock_key), "last", None)
            port = last.rport if last is not None else ""
            out.append(clip(f"  {(r.ts_start_ns - h.start_ns) / 1e9:>+8.3f} {r.pid:>7} "
                            f"{'-' if r.goid is None else r.goid:>6} {port:>5} "
                            f"{dur(r.duration_ns):>7} {v.verdict:<16} {fig}", WIDTH))
            evid = f"{v.evidence_total} snapshot{'s' * (v.evidence_total != 1)} within " \
                   f"±{c.window_ms:g} ms"
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


# -- the picture --------------------------------------------------------------------------------

MARKERS = {PEER_STARVED: ("o", "#17becf"), RUNTIME_STARVED: ("^", "#d62728"),
           CONSUMER_LAGGING: ("s", "#ff7f0e"), UNKNOWN: ("D", "#e377c2")}


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
    vmax = np.nanmax(grid) if keys and np.isfinite(np.nanmax(grid)) else 1.0
    shown = np.where(grid == 0, 0.5, grid)
    mesh = ax.pcolormesh((edges - t0) / 1e9, np.arange(len(keys) + 1) if keys else [0, 1],
                         np.ma.masked_invalid(shown), cmap=cmap,
                         norm=LogNorm(vmin=1, vmax=max(vmax, 2)), shading="flat")
    fig.colorbar(mesh, ax=ax, label="unread bytes (log scale; grey: empty)", pad=0.01)
    row_of = {k: i for i, k in enumerate(keys)}
    marks = [m for m in (col.marks or []) if m[1] in row_of]
    if len(marks) > max_marks:
        step = len(marks) / max_marks
        marks = [marks[int(i * step)] for i in range(max_marks)]
    for verdict in VERDICTS:
        pts = [(ts, row_of[k]) for ts, k, v in marks if v == verdict]
        if not pts:
            continue
        m, color = MARKERS[verdict]
        x = [(ts - t0) / 1e9 for ts, _ in pts]
        y = [r + 0.5 for _, r in pts]
        ax.scatter(x, y, marker=m, s=22, color=color, edgecolors="black", linewidths=0.5,
                   label=f"{verdict} ({col.verdicts[verdict]:,})", zorder=3)
    labels = []
    for k in keys:
        d = summaries.get(k, {})
        if "lport" in d:
            labels.append(f"{d['lport']}<-{endpoint(d['raddr'], d['rport'])} "
                          f"pid {d.get('pid', 0)}")
        else:
            labels.append(format_key(k))
    ax.set_yticks([i + 0.5 for i in range(len(keys))], labels, fontsize=8)
    ax.set_ylim(len(keys) if keys else 1, 0)
    ax.set_xlim(0, (t1 - t0) / 1e9)
    ax.set_xlabel(f"seconds since {_wall(h, t0)}")
    fig.suptitle(f"Water per socket, slow reads marked by verdict: {col.path}"
                 + (" (CUT SHORT)" if col.error else ""), fontsize=10)
    if marks:
        ax.legend(loc="lower left", bbox_to_anchor=(0, 1.0), ncol=4, fontsize=8,
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
