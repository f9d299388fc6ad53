"""The metric series of the sockets, one set of rules for the live export (otelwater.export.otlp)
and the offline points of a recording (otelwater.export.offline_metrics), so the two cannot
drift:

- Each open socket's latest snapshot is kept (at most MAX_SOCKETS, the least recently updated
  dropped first); a close ends it, and a socket with no snapshot for IDLE_NS of the records'
  time is forgotten.
- Drops are the increase of the kernel's sk_drops between a socket's snapshots (none at its
  first, none after it was forgotten).
- Cardinality is bounded: the top N sockets by water (volume, then unread bytes, then level;
  the socket key breaks ties) have series of their own (SOCKET series: every endpoint
  attribute), the rest are summed with otelwater.socket.key="other" (OTHER series): the
  sockets a process accepted (or whose side is unknown) per (process.pid, network.local.port),
  the ones it dialed per (process.pid, network.peer.port). A dialed socket's local port is
  ephemeral, so summing those by it would give a series per connection (a client of 5,000
  connections: 5,000 series); by the server's port they are one.
- Series ids say which: ("gs", sock_key, pid) and ("go", pid, port, dialed) for the gauges,
  ("ds", sock_key, pid) and ("do", pid, port, dialed) for the drops. A sum's drops series
  starts at 0 when it first appears, so rate() works from the first point; a socket's own
  drops series appears with its first drops while among the top N, at their count. (Starting
  every top socket's own at 0 gave a series to every socket that ever ranked: sockets pass
  through the top N all day, and a counter's series stay in the SDK for the run's length.)
- A series belongs to its process's resource when the process is traced (has Go reads), else
  to otelwater's own (OWN).

What differs between the two is only *when* the ranking is taken: live when the metric reader
collects (at most every RANK_EVERY_S), offline at the end of each second of the recording.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from typing import Iterable, NamedTuple

from otelwater import names as N
from otelwater.events.model import WaterSnapshot
from otelwater.sockkey import format_key

TOP_N = 50                      # sockets with their own series; the rest summed
IDLE_NS = 600 * 10**9           # a socket with no snapshot for this long is forgotten
MAX_SOCKETS = 65536             # sockets whose latest snapshot is kept
OWN = -1                        # the resource key of otelwater's own service


def network_type(addr: str) -> str:
    return "ipv6" if ":" in addr else "ipv4"


def top_sockets(sockets: Iterable[WaterSnapshot], n: int) -> list[WaterSnapshot]:
    """The n sockets holding the most water (volume, then unread bytes, then level; the key
    breaks ties so the choice is stable): those with series of their own, live and offline."""
    return heapq.nlargest(n, sockets,
                          key=lambda s: (s.volume, s.unread_bytes, s.level, s.sock_key))


def endpoint_attributes(pid: int, key: int, ends: tuple[str, int, str, int]) -> dict:
    laddr, lport, raddr, rport = ends
    return {N.PROCESS_PID: pid, N.NETWORK_TRANSPORT: "tcp", N.NETWORK_TYPE: network_type(laddr),
            N.NETWORK_LOCAL_ADDRESS: laddr, N.NETWORK_LOCAL_PORT: lport,
            N.NETWORK_PEER_ADDRESS: raddr, N.NETWORK_PEER_PORT: rport,
            N.SOCKET_KEY: format_key(key)}


def socket_attributes(s: WaterSnapshot) -> dict:
    return endpoint_attributes(s.pid, s.sock_key, (s.laddr, s.lport, s.raddr, s.rport))


def other_attributes(pid: int, port: int, dialed: bool = False) -> dict:
    """The attributes of the sum of a process's other sockets on one port: the peer's port
    for the sockets it dialed, its own for the rest."""
    return {N.PROCESS_PID: pid, N.NETWORK_TRANSPORT: "tcp",
            N.NETWORK_PEER_PORT if dialed else N.NETWORK_LOCAL_PORT: port,
            N.SOCKET_KEY: N.OTHER_SOCKETS}


def other_group(s: WaterSnapshot) -> tuple[int, int, bool]:
    """(pid, port, dialed): the OTHER series a socket beyond the top N is summed into."""
    if s.role == "dialed":
        return s.pid, s.rport, True
    return s.pid, s.lport, False


def gauge_values(values: tuple) -> tuple:
    """(level, volume, unread, capacity) -> the five gauges' values, fill ratio last."""
    level, volume, unread, capacity = values
    return level, volume, unread, capacity, (volume / capacity if capacity else 0.0)


class Series(NamedTuple):
    """One gauge series of a ranking: its id, its process, its water (level, volume, unread,
    capacity), and the snapshot that names it (SOCKET series) or None (OTHER series)."""

    sid: tuple
    pid: int
    values: tuple
    snapshot: WaterSnapshot | None

    def attributes(self) -> dict:
        if self.snapshot is not None:
            return socket_attributes(self.snapshot)
        return other_attributes(self.pid, self.sid[2], self.sid[3])


class Ranking(NamedTuple):
    top_keys: frozenset            # the sockets with series of their own
    series: list                   # [Series]: the top sockets', then the per-port sums


def drops_series(s: WaterSnapshot, own: bool) -> tuple[tuple, dict]:
    """(series id, attributes) of the drops of socket `s`: its own series, or its process and
    port's sum."""
    if own:
        return ("ds", s.sock_key, s.pid), socket_attributes(s)
    group = other_group(s)
    return ("do", *group), other_attributes(*group)


def gauge_to_drops(sid: tuple) -> tuple:
    """The drops series of a gauge series: ("gs", ...) -> ("ds", ...), ("go", ...) ->
    ("do", ...)."""
    return ("d" + sid[0][1],) + sid[1:]


class SocketSeries:
    """The sockets' state that every series is made from (module docstring): fold() each
    snapshot in record order, rank() when the series are wanted."""

    def __init__(self, top_n: int = TOP_N, idle_ns: int = IDLE_NS,
                 max_sockets: int = MAX_SOCKETS):
        self.top_n = top_n
        self.idle_ns = idle_ns
        self.max_sockets = max_sockets
        self.sockets: OrderedDict[int, WaterSnapshot] = OrderedDict()  # least recent first
        self.last_drops: dict[int, int] = {}
        self.newest_ns = 0
        self.changes = 0              # folds so far (a ranking older than this is stale)

    def fold(self, s: WaterSnapshot) -> int:
        """Take a snapshot; its socket's new drops (0 at its first snapshot)."""
        self.changes += 1
        key = s.sock_key
        if s.ts_ns > self.newest_ns:
            self.newest_ns = s.ts_ns
        prev = self.last_drops.get(key)
        more = s.drops - prev if prev is not None and s.drops > prev else 0
        if s.trigger == "close":
            self.sockets.pop(key, None)
            self.last_drops.pop(key, None)
            return more
        self.last_drops[key] = s.drops
        self.sockets[key] = s
        self.sockets.move_to_end(key)
        while len(self.sockets) > self.max_sockets:
            old, _ = self.sockets.popitem(last=False)
            self.last_drops.pop(old, None)
        self._forget_idle()
        return more

    def _forget_idle(self) -> None:
        oldest = next(iter(self.sockets.values()), None)
        if oldest is None or self.newest_ns - oldest.ts_ns <= self.idle_ns:
            return
        horizon = self.newest_ns - self.idle_ns
        for k in [k for k, v in self.sockets.items() if v.ts_ns < horizon]:
            del self.sockets[k]
            self.last_drops.pop(k, None)

    def get(self, key: int) -> WaterSnapshot | None:
        return self.sockets.get(key)

    def __contains__(self, key: int) -> bool:
        return key in self.sockets

    def rank(self) -> Ranking:
        """The series now: the top N sockets' own, then the rest summed per (pid, port,
        dialed)."""
        socks = list(self.sockets.values())
        top = top_sockets(socks, self.top_n)
        top_keys = frozenset(s.sock_key for s in top)
        series = [Series(("gs", s.sock_key, s.pid), s.pid,
                         (s.level, s.volume, s.unread_bytes, s.capacity), s) for s in top]
        sums: dict[tuple[int, int, bool], list[int]] = {}
        for s in socks:
            if s.sock_key in top_keys:
                continue
            group = other_group(s)
            t = sums.get(group)
            if t is None:
                t = sums[group] = [0, 0, 0, 0]
            t[0] += s.level
            t[1] += s.volume
            t[2] += s.unread_bytes
            t[3] += s.capacity
        series.extend(Series(("go", pid, port, dialed), pid, tuple(t), None)
                      for (pid, port, dialed), t in sums.items())
        return Ranking(top_keys, series)
