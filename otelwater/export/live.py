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
from otelwater.events.model import WaterSnapshot

ALERT_MARKS = {"water_level": "L", "fill_ratio": "F", "surge": "S"}


def human_bytes(n: int) -> str:
    for unit in ("B", "K", "M", "G"):
        if abs(n) < 1024 or unit == "G":
            return f"{n}{unit}" if unit == "B" else f"{n:.1f}{unit}" if n < 10 else f"{n:.0f}{unit}"
        n /= 1024
    return str(n)


def endpoint(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


@dataclass
class WaterBoard:
    """Latest state per socket, recent closes, alert marks and counters: what the view shows."""

    alerts: AlertRules = field(default_factory=AlertRules)
    sockets: dict[int, WaterSnapshot] = field(default_factory=dict)
    closes: deque = field(default_factory=lambda: deque(maxlen=5))
    lost: int = 0
    records: int = 0
    started: float = field(default_factory=time.monotonic)
    readers: dict[int, object] = field(default_factory=dict)  # sock_key -> reader summary

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
    parts.append(Text(f"{title}  {elapsed:.0f}s  sockets {len(board.sockets)}  "
                      f"records {board.records}  lost {board.lost}", style="dim"))
    parts.append(t)
    if board.closes:
        parts.append(Text("water left at close:", style="bold"))
        for c in board.closes:
            parts.append(Text(f"  {c.pid or '-'} {c.comm[:12]} {endpoint(c.laddr, c.lport)} -> "
                              f"{endpoint(c.raddr, c.rport)}  {c.unread_bytes} bytes unread"))
    parts.append(Text("alerts: L level>100  F fill>80%  S level surge (var>50)", style="dim"))
    return Group(*parts)


class LiveView:
    def __init__(self, title: str, rows: int = 15, console: Console | None = None):
        self.console = console or Console(width=80 if not Console().is_terminal else None)
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
