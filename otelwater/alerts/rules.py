"""The default alert rules (DESIGN.md part 5) with hysteresis so they do not flap.

    water_level   level (skbs queued) > 100
    fill_ratio    volume / capacity > 0.8
    surge         variance of the level over the last 3 samples > 50

A rule fires when its value goes above `threshold` and clears only when the value falls to
`threshold * clear_fraction` or below (default 0.75): a value wobbling around the threshold
fires once. Note on water_level: TCP coalesces segments, so a loopback queue holding 60 kB may be
2 skbs; the level rule fires only when many small segments stand unread (a peer writing small
messages to a reader that stopped, with a large receive buffer), while volume and fill ratio
catch standing water of any shape.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from statistics import pvariance


@dataclass(frozen=True)
class Thresholds:
    water_level: float = 100
    fill_ratio: float = 0.8
    surge_variance: float = 50
    surge_window: int = 3
    clear_fraction: float = 0.75


@dataclass
class _SocketAlerts:
    levels: deque = field(default_factory=lambda: deque(maxlen=3))
    active: set = field(default_factory=set)


class AlertRules:
    """Feed snapshots per socket; `active(sock_key)` names the rules firing now, and
    `update` returns (rule, "fired"|"cleared", value) transitions for export."""

    def __init__(self, thresholds: Thresholds = Thresholds()):
        self.t = thresholds
        self._socks: dict[int, _SocketAlerts] = {}

    def values(self, st: _SocketAlerts, level: int, fill: float) -> dict[str, float]:
        v = {"water_level": float(level), "fill_ratio": fill}
        if len(st.levels) == st.levels.maxlen:
            v["surge"] = pvariance(st.levels)
        return v

    def update(self, sock_key: int, level: int, volume: int, capacity: int,
               closed: bool = False) -> list[tuple[str, str, float]]:
        st = self._socks.get(sock_key)
        if st is None:
            st = self._socks[sock_key] = _SocketAlerts(deque(maxlen=self.t.surge_window))
        st.levels.append(level)
        fill = volume / capacity if capacity else 0.0
        limits = {"water_level": self.t.water_level, "fill_ratio": self.t.fill_ratio,
                  "surge": self.t.surge_variance}
        changes = []
        for rule, value in self.values(st, level, fill).items():
            limit = limits[rule]
            if rule not in st.active and value > limit:
                st.active.add(rule)
                changes.append((rule, "fired", value))
            elif rule in st.active and value <= limit * self.t.clear_fraction:
                st.active.discard(rule)
                changes.append((rule, "cleared", value))
        if closed:
            for rule in sorted(st.active):
                changes.append((rule, "cleared", 0.0))
            del self._socks[sock_key]
        return changes

    def active(self, sock_key: int) -> frozenset[str]:
        st = self._socks.get(sock_key)
        return frozenset(st.active) if st else frozenset()
