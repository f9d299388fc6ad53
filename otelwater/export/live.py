"""The live view: the sockets holding the most water, their readers, and alert marks.

Fits 80 columns. On a terminal it redraws in place (rich.live); piped, it prints one table
per interval.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from otelwater.alerts.rules import AlertRules
from otelwater.events.model import ReadRecord, WaterSnapshot

ALERT_MARKS = {"water_level": "L", "fill_ratio": "F", "surge": "S"}


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

    def add(self, rec: ReadRecord) -> None:
        self.blocked += 1
        self.fd, self.sock_key = rec.fd, rec.sock_key
        self.last_ns = rec.duration_ns
        self.max_ns = max(self.max_ns, rec.duration_ns)
        self.last_end_ns = rec.ts_end_ns
        if rec.stack:
            self.caller = caller(rec.stack)


@dataclass
class WaterBoard:
    """Latest state per socket, recent closes, alert marks and counters: what the view shows."""

    alerts: AlertRules = field(default_factory=AlertRules)
    sockets: dict[int, WaterSnapshot] = field(default_factory=dict)
    closes: deque = field(default_factory=lambda: deque(maxlen=5))
    records: int = 0
    started: float = field(default_factory=time.monotonic)
    readers: dict[tuple[int, int], "ReaderSummary"] = field(default_factory=dict)
    lost_by_probe: dict[str, int] = field(default_factory=dict)  # probe -> lost_total

    @property
    def lost(self) -> int:
        return sum(self.lost_by_probe.values())

    def add_read(self, rec: ReadRecord) -> None:
        key = (rec.pid, rec.goid if rec.goid is not None else -rec.fd)
        r = self.readers.get(key)
        if r is None:
            r = self.readers[key] = ReaderSummary(rec.pid, rec.goid, rec.fd, rec.sock_key)
        r.add(rec)

    def add(self, snap: WaterSnapshot) -> list[tuple[str, str, float]]:
        self.records += 1
        closed = snap.trigger == "close"
        changes = self.alerts.update(snap.sock_key, snap.level, snap.volume, snap.capacity,
                                     closed=closed)
        if closed:
            self.sockets.pop(snap.sock_key, None)
            if snap.unread_bytes:
                self.closes.append(snap)
        else:
            self.sockets[snap.sock_key] = snap
        return changes

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
        marks = "".join(ALERT_MARKS[a] for a in sorted(board.alerts.active(s.sock_key)))
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
                           ("PORT", "right"), ("BLK", "right"), ("LAST", "right"),
                           ("MAX", "right"), ("CALLER", "left")):
            r.add_column(name, justify=just, no_wrap=True)
        recent = sorted(board.readers.values(), key=lambda x: x.last_end_ns, reverse=True)
        for x in recent[:rows]:
            sock = board.sockets.get(x.sock_key)
            r.add_row(str(x.pid), str(x.goid) if x.goid is not None else "-", str(x.fd),
                      str(sock.lport) if sock else "-", str(x.blocked), ms(x.last_ns),
                      ms(x.max_ns), x.caller[:38])
        parts.append(Text("Go readers (blocked reads):", style="bold"))
        parts.append(r)
    if board.closes:
        parts.append(Text("water left at close:", style="bold"))
        for c in board.closes:
            parts.append(Text(f"  {c.pid or '-'} {c.comm[:12]} {endpoint(c.laddr, c.lport)} -> "
                              f"{endpoint(c.raddr, c.rport)}  {c.unread_bytes} bytes unread"))
    parts.append(Text("alerts: L level>100  F fill>80%  S level surge (var>50)", style="dim"))
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
