"""The live view: the sockets holding the most water, their readers, and alert marks.

Fits 80 columns. On a terminal it redraws in place (rich.live); piped, it prints one table
per interval.

    WaterBoard   what the view shows: latest state per socket, readers, alert marks, counters
    ViewSink     the board and its view as a sink (redrawn at every tick and at the end)
    RunStats     what every live run says on stderr: notices as they come, the closing line's
                 counts (records, lost, verdicts)
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from otelwater.events.model import ReadRecord, WaterSnapshot
from otelwater.export.sink import RunInfo, Sink

ALERT_MARKS = {"water_level": "L", "fill_ratio": "F", "surge": "S", "read_skew": "K"}
VERDICT_CODES = {"peer-starved": "PEER", "runtime-starved": "RUN", "consumer-lagging": "LAG",
                 "unknown": "?"}


def human_bytes(n: int) -> str:
    for unit in ("B", "K", "M", "G"):
        if abs(n) < 1024 or unit == "G":
            return f"{n}{unit}" if unit == "B" else f"{n:.1f}{unit}" if n < 10 else f"{n:.0f}{unit}"
        n /= 1024
    return str(n)


def ms(ns: int) -> str:
    return f"{ns / 1e6:.1f}ms" if ns < 10e9 else f"{ns / 1e9:.0f}s"


def endpoint(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


PLUMBING = ("runtime", "syscall.", "internal/", "net.")


def caller(stack: tuple[str, ...]) -> str:
    """The first frame above the read machinery: who called net.(*conn).Read."""
    for name in stack:
        if name and not name.startswith(PLUMBING):
            return name
    return stack[-1] if stack else "?"


@dataclass
class ReaderSummary:
    """One goroutine reading one socket: its blocked reads so far."""

    pid: int
    goid: int | None
    fd: int
    sock_key: int
    blocked: int = 0
    last_ns: int = 0
    max_ns: int = 0
    caller: str = ""
    last_end_ns: int = 0
    verdicts: dict[str, int] = field(default_factory=dict)
    last_verdict: str = ""
    last_split: str = ""      # the last slow read's figures: peer/run waits, or queue delay

    def add_verdict(self, v) -> None:
        self.verdicts[v.verdict] = self.verdicts.get(v.verdict, 0) + 1
        self.last_verdict = v.verdict
        if v.wait_peer_ns is not None and v.wait_run_ns is not None:
            self.last_split = f"p{ms(v.wait_peer_ns)} r{ms(v.wait_run_ns)}"
        elif v.queue_delay_ns is not None:
            self.last_split = f"q{ms(v.queue_delay_ns)}"
        else:
            self.last_split = ""

    def add(self, rec: ReadRecord) -> None:
        self.blocked += 1
        self.fd, self.sock_key = rec.fd, rec.sock_key
        # how slow: the time it blocked, or, for a read that found its bytes waiting (it
        # returned at once), how long they had stood in the queue
        slow = max(rec.duration_ns, rec.queue_delay_ns or 0)
        self.last_ns = slow
        self.max_ns = max(self.max_ns, slow)
        self.last_end_ns = rec.ts_end_ns
        if rec.stack:
            self.caller = caller(rec.stack)


@dataclass
class WaterBoard:
    """Latest state per socket, recent closes, alert marks and counters: what the view shows."""

    alerts: dict[int, dict[str, str]] = field(default_factory=dict)  # sock_key -> rule -> sev
    process_alerts: dict[int, dict[str, str]] = field(default_factory=dict)  # pid -> ...
    sockets: dict[int, WaterSnapshot] = field(default_factory=dict)
    closes: deque = field(default_factory=lambda: deque(maxlen=5))
    records: int = 0
    started: float = field(default_factory=time.monotonic)
    readers: dict[tuple[int, int], "ReaderSummary"] = field(default_factory=dict)
    lost_by_probe: dict[str, int] = field(default_factory=dict)  # probe -> lost_total
    legend: str = "alerts: L level>100  F fill>80%  S level surge (var>50)  K read skew"

    @property
    def lost(self) -> int:
        return sum(self.lost_by_probe.values())

    def add_read(self, rec: ReadRecord) -> None:
        self._reader(rec).add(rec)

    def _reader(self, rec: ReadRecord) -> "ReaderSummary":
        key = (rec.pid, rec.goid if rec.goid is not None else -rec.fd)
        r = self.readers.get(key)
        if r is None:
            r = self.readers[key] = ReaderSummary(rec.pid, rec.goid, rec.fd, rec.sock_key)
        return r

    def add_verdict(self, v) -> None:
        self._reader(v.read).add_verdict(v)

    def add_alert(self, t) -> None:
        """An AlertTransition from the alert stage (the one place rules are evaluated)."""
        table = self.alerts if t.sock_key else self.process_alerts
        key = t.sock_key or t.pid
        active = table.setdefault(key, {})
        if t.state == "fired":
            active[t.rule] = t.severity
        else:
            active.pop(t.rule, None)
            if not active:
                table.pop(key, None)

    def add(self, snap: WaterSnapshot) -> None:
        self.records += 1
        closed = snap.trigger == "close"
        if closed:
            self.sockets.pop(snap.sock_key, None)
            if snap.unread_bytes:
                self.closes.append(snap)
        else:
            self.sockets[snap.sock_key] = snap

    def top(self, n: int) -> list[WaterSnapshot]:
        return sorted(self.sockets.values(), key=lambda s: (s.unread_bytes, s.volume),
                      reverse=True)[:n]


def render(board: WaterBoard, rows: int = 15, title: str = "") -> Group:
    t = Table(box=None, pad_edge=False, header_style="bold", expand=False, padding=(0, 1, 0, 0))
    for name, just in (("PID", "right"), ("COMM", "left"), ("PORT", "right"),
                       ("REMOTE", "left"), ("LVL", "right"), ("VOL", "right"),
                       ("UNRD", "right"), ("CAP", "right"), ("FILL", "right"),
                       ("DROP", "right"), ("!", "left")):
        t.add_column(name, justify=just, no_wrap=True)
    for s in board.top(rows):
        marks = "".join(ALERT_MARKS.get(a, "?") for a in sorted(board.alerts.get(s.sock_key, {})))
        t.add_row(str(s.pid or "-"), (s.comm or "?")[:8], str(s.lport),
                  endpoint(s.raddr, s.rport)[:21], str(s.level), human_bytes(s.volume),
                  human_bytes(s.unread_bytes), human_bytes(s.capacity),
                  f"{s.fill_ratio * 100:.0f}%", str(s.drops),
                  Text(marks, style="bold red") if marks else "")
    parts = []
    elapsed = time.monotonic() - board.started
    status = f"  {elapsed:.0f}s  sockets {len(board.sockets)}  records {board.records}  " \
             f"lost {board.lost}"
    room = 80 - len(status)
    title = title if len(title) <= room else title[:room - 1] + "…"
    parts.append(Text(title + status, style="dim"))
    parts.append(t)
    if board.readers:
        r = Table(box=None, pad_edge=False, header_style="bold", padding=(0, 1, 0, 0))
        for name, just in (("PID", "right"), ("GOID", "right"), ("FD", "right"),
                           ("PORT", "right"), ("SLOW", "right"), ("MAX", "right"),
                           ("WHY", "left"), ("WAIT", "left"), ("CALLER", "left")):
            r.add_column(name, justify=just, no_wrap=True)
        recent = sorted(board.readers.values(), key=lambda x: x.last_end_ns, reverse=True)
        for x in recent[:rows]:
            sock = board.sockets.get(x.sock_key)
            why = VERDICT_CODES.get(x.last_verdict, "")
            skew = board.process_alerts.get(x.pid, {}).get("read_skew")
            r.add_row(str(x.pid), str(x.goid) if x.goid is not None else "-", str(x.fd),
                      str(sock.lport) if sock else "-", str(x.blocked), ms(x.max_ns),
                      Text(why + ("!" if skew else ""), style="bold" if why else ""),
                      x.last_split[:15], x.caller[:24])
        parts.append(Text("Go readers (slow reads; WHY: PEER waited for the peer, RUN data "
                          "came but it did not run, LAG data stood in the queue, ? unknown)",
                          style="bold"))
        parts.append(r)
    if board.closes:
        parts.append(Text("water left at close:", style="bold"))
        for c in board.closes:
            parts.append(Text(f"  {c.pid or '-'} {c.comm[:12]} {endpoint(c.laddr, c.lport)} -> "
                              f"{endpoint(c.raddr, c.rport)}  {c.unread_bytes} bytes unread"))
    parts.append(Text(board.legend, style="dim"))
    return Group(*parts)


class LiveView:
    def __init__(self, title: str, rows: int = 15, console: Console | None = None):
        if console is None:
            console = Console()
            if not console.is_terminal:  # piped: keep the 80 columns the table is laid out for
                console = Console(width=80)
        self.console = console
        self.title = title
        self.rows = rows
        self._live = None

    def __enter__(self):
        if self.console.is_terminal:
            from rich.live import Live
            self._live = Live(console=self.console, auto_refresh=False, transient=False)
            self._live.__enter__()
        return self

    def show(self, board: WaterBoard) -> None:
        g = render(board, self.rows, self.title)
        if self._live is not None:
            self._live.update(g, refresh=True)
        else:
            self.console.print(g)
            self.console.print()

    def __exit__(self, *exc):
        if self._live is not None:
            self._live.__exit__(*exc)


class ViewSink(Sink):
    """The live view as a sink: the board takes the records, the view shows it each tick."""

    name = "live view"
    ignores = frozenset({"notice", "process", "summary"})   # notices: RunStats says them

    def __init__(self, title: str | None = None, rows: int = 15,
                 console: Console | None = None, board: WaterBoard | None = None):
        self.board = board or WaterBoard()
        self.view = LiveView(title or "otelwater watch", rows=rows, console=console)
        self._title = title
        self._started = self._open = False

    def start(self, run: RunInfo) -> None:
        if self._title is None:      # what is watched, Go reads included
            self.view.title = f"otelwater watch: {run.what}"
        self._started = True

    def on_snapshot(self, r) -> None:
        self.board.add(r)

    def on_read(self, r) -> None:
        self.board.add_read(r)

    def on_verdict(self, r) -> None:
        self.board.add_verdict(r)

    def on_alert(self, r) -> None:
        self.board.add_alert(r)

    def on_lost(self, r) -> None:
        self.board.lost_by_probe[r.probe] = r.lost_total

    def tick(self) -> None:
        if not self._started:
            return
        if not self._open:           # the terminal is taken at the first frame, not before
            self.view.__enter__()
            self._open = True
        self.view.show(self.board)

    def close(self, timeout_s: float = 5.0) -> None:
        if not self._started:
            return
        self._started = False
        if not self._open:
            self.view.__enter__()
            self._open = True
        try:
            self.view.show(self.board)
        finally:
            self._open = False
            self.view.__exit__(None, None, None)


class RunStats(Sink):
    """Counts for the closing line, and each notice said on stderr as it comes."""

    name = "run summary"
    ignores = frozenset({"read", "alert", "process", "summary"})

    def __init__(self, out=None):
        import sys

        self.out = out or sys.stderr
        self.snapshots = 0
        self.lost_by_probe: dict[str, int] = {}
        self.verdicts: dict[str, int] = {}

    @property
    def lost(self) -> int:
        return sum(self.lost_by_probe.values())

    def on_snapshot(self, r) -> None:
        self.snapshots += 1

    def on_lost(self, r) -> None:
        self.lost_by_probe[r.probe] = r.lost_total

    def on_verdict(self, r) -> None:
        self.verdicts[r.verdict] = self.verdicts.get(r.verdict, 0) + 1

    def on_notice(self, r) -> None:
        print(f"otelwater: {r.text}", file=self.out, flush=True)
