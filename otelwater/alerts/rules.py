"""The alert rules (docs/design.md, Alerts), their hysteresis and the streaming skewness: pure.

    water_level   level (skbs queued) > 100                                    severity warn
    fill_ratio    volume / capacity > 0.8                                      severity warn
    surge         population variance of the level over the last 3 samples > 50   warn
    read_skew     unbiased skewness G1 of read latency over a window of reads:
                  > 0.8 warn, > 1.2 high, > 2.0 avalanche (one rule, three bands)

Hysteresis: a rule fires when its value goes above `threshold` and clears only when the value
falls to `threshold * clear_fraction` or below (default 0.75), so a value wobbling around the
threshold fires once. A banded rule is the same thing per band: it moves up to the highest band
whose threshold the value exceeds, and down out of band k only at `clear_fraction * band_k` or
below (so with the defaults avalanche is left at <= 1.5, high at <= 0.9, warn at <= 0.6).
With `hold_ns` a rule stays at least that long in a band before it may move down or clear.

Note on water_level: TCP coalesces segments, so a loopback queue holding 60 kB may be 2 skbs;
the level rule fires only when many small segments stand unread (a peer writing small messages
to a reader that stopped, with a large receive buffer), while volume and fill ratio catch
standing water of any shape.

`AlertRules` is the per-snapshot interface the live view used before the alert stage
(otelwater.alerts.stage.AlertStage) existed; it runs the same `Hysteresis`.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from otelwater.config import AlertConfig

Thresholds = AlertConfig  # the old name: same fields (water_level, fill_ratio, ...)

SEVERITIES = ("warn", "high", "avalanche")


class Hysteresis:
    """One rule's state over ascending thresholds (a plain rule has one): band 0 is quiet,
    band k means the value went above thresholds[k-1] and has not fallen to
    clear_fraction * thresholds[k-1] since."""

    __slots__ = ("band", "since_ns")

    def __init__(self):
        self.band = 0
        self.since_ns = 0

    def step(self, value: float, ts_ns: int, thresholds: tuple[float, ...],
             clears: tuple[float, ...], hold_ns: int = 0) -> int | None:
        """Take one value; return the band it left when the band changed, else None.
        `clears` are the clear levels of the bands (see clear_levels)."""
        up = 0
        for i, limit in enumerate(thresholds):
            if value > limit:
                up = i + 1
        new = self.band
        if up > new:
            new = up
        elif new and ts_ns - self.since_ns >= hold_ns:
            while new and value <= clears[new - 1]:
                new -= 1
        if new == self.band:
            return None
        old, self.band, self.since_ns = self.band, new, ts_ns
        return old


def clear_levels(thresholds: tuple[float, ...], fraction: float) -> tuple[float, ...]:
    """fraction * threshold for each band, to 12 significant digits, so 0.75 * 1.2 clears at
    0.9 and not at the float product 0.8999999999999999."""
    return tuple(float(f"{fraction * t:.12g}") for t in thresholds)


def level_variance(levels) -> float:
    """Population variance of integer levels, from exact integer sums."""
    n = len(levels)
    s1 = sum(levels)
    return (n * sum(x * x for x in levels) - s1 * s1) / (n * n)


def skewness(values) -> float | None:
    """Unbiased sample skewness (adjusted Fisher-Pearson G1, scipy.stats.skew(bias=False)) of
    integers, exactly summed; None below 3 values, 0.0 when all are equal."""
    s = SlidingSkew(max(3, len(values)))
    for v in values:
        s.add(v)
    return s.skewness()


class SlidingSkew:
    """G1 of the last `window` integer samples, O(1) a sample.

    Keeps the exact integer sums S1, S2, S3 of the window (Python ints: no cancellation), so
    with A = n S2 - S1^2 and B = n^2 S3 - 3 n S1 S2 + 2 S1^3 the biased skewness is
    g1 = m3 / m2^1.5 = B / A^1.5, and G1 = g1 * sqrt(n (n - 1)) / (n - 2).
    """

    __slots__ = ("values", "s1", "s2", "s3")

    def __init__(self, window: int):
        self.values: deque[int] = deque(maxlen=window)
        self.s1 = self.s2 = self.s3 = 0

    def __len__(self) -> int:
        return len(self.values)

    def add(self, x: int) -> None:
        x = int(x)
        if len(self.values) == self.values.maxlen:
            old = self.values[0]
            self.s1 -= old
            self.s2 -= old * old
            self.s3 -= old * old * old
        self.values.append(x)
        self.s1 += x
        self.s2 += x * x
        self.s3 += x * x * x

    def skewness(self) -> float | None:
        n = len(self.values)
        if n < 3:
            return None
        a = n * self.s2 - self.s1 * self.s1
        if a == 0:
            return 0.0
        b = n * n * self.s3 - 3 * n * self.s1 * self.s2 + 2 * self.s1 ** 3
        fa = float(a)
        g1 = float(b) / (fa * math.sqrt(fa))
        return g1 * math.sqrt(n * (n - 1)) / (n - 2)


@dataclass
class _SocketAlerts:
    levels: deque
    rules: dict = field(default_factory=dict)


class AlertRules:
    """Feed snapshots per socket; `active(sock_key)` names the rules firing now, and
    `update` returns (rule, "fired"|"cleared", value) transitions."""

    def __init__(self, thresholds: AlertConfig = AlertConfig()):
        self.t = thresholds
        self._socks: dict[int, _SocketAlerts] = {}

    def update(self, sock_key: int, level: int, volume: int, capacity: int,
               closed: bool = False, ts_ns: int = 0) -> list[tuple[str, str, float]]:
        st = self._socks.get(sock_key)
        if st is None:
            st = self._socks[sock_key] = _SocketAlerts(deque(maxlen=self.t.surge_window))
        st.levels.append(level)
        values = {"water_level": float(level),
                  "fill_ratio": volume / capacity if capacity else 0.0}
        if len(st.levels) == st.levels.maxlen:
            values["surge"] = level_variance(st.levels)
        limits = {"water_level": self.t.water_level, "fill_ratio": self.t.fill_ratio,
                  "surge": self.t.surge_variance}
        changes = []
        for rule, value in values.items():
            h = st.rules.setdefault(rule, Hysteresis())
            limit = (limits[rule],)
            if h.step(value, ts_ns, limit, clear_levels(limit, self.t.clear_fraction),
                      self.t.hold_ns) is not None:
                changes.append((rule, "fired" if h.band else "cleared", value))
        if closed:
            for rule in sorted(r for r, h in st.rules.items() if h.band):
                changes.append((rule, "cleared", 0.0))
            del self._socks[sock_key]
        return changes

    def active(self, sock_key: int) -> frozenset[str]:
        st = self._socks.get(sock_key)
        return frozenset(r for r, h in st.rules.items() if h.band) if st else frozenset()
