"""Rain water: how much water a socket's queue held between its surges.

Definition. Take a socket's water series in time order: h_0 .. h_{n-1}, by default its unread
bytes (Recv-Q: the standing water a reader has not drained) at each snapshot, t_0 .. t_{n-1}
the snapshots' ts_ns. The *skyline* at sample i is the lower of the highest surge up to it and
the highest surge from it on:

    sky_i = min(max(h_0 .. h_i), max(h_i .. h_{n-1}))

and the rain water trapped at i is sky_i - h_i >= 0: how far the queue stood below the surges
on both sides of it. The figure is, as in the classic "trapping rain water" problem with
bars of width d_i,

    rain_water = sum_i (sky_i - h_i) * d_i          d_i = t_{i+1} - t_i   (byte·ns)

It is zero for a queue that only rises (a reader falling ever further behind), only falls (a
backlog draining) or stands still (a stuck reader: look at the standing water instead); it is
large for a queue that surges, is drained, and surges again: rain the reader catches up with
between bursts, and the depth and length of those valleys. Beside it, `standing` =
sum h_i * d_i is the backlog itself (byte·ns), and `envelope` = standing + rain_water is the
area under the skyline; rain_water / envelope is the share of the surges' skyline the reader
kept drained (1: drains to empty between bursts, 0: never below the surges).

Time-weighted, not per sample, because snapshots are event-driven: the probe reports a socket
when its water moves (high water crossed, 1/8 growth, a drop, a sweep that saw a change, every
event with --follow), so samples crowd where the queue is busy. Counted per sample, a second of
bursts would outweigh a still minute, and the same queue would score differently with and
without --follow. Each snapshot stands for the queue until the next one (the kernel reports the
state that holds until it reports again), so weighting by that time gives an area that more
samples refine rather than inflate. The first and last samples never trap water (one side of
each has no surge), so the unknown hold time of the last sample does not matter.
`trapped(heights)` without times is the same figure per sample (byte-samples).

Algorithm: two pointers, O(n) time, O(1) space: the side with the lower bar is bounded by its
own running maximum (the other side holds a bar at least as high), so each bar is settled once.
`RainGauge` keeps the last N samples of one socket in a ring and computes the figure over them
on demand; `RainGauges` does that per socket with a bounded number of sockets.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

SERIES = ("unread_bytes", "volume", "level")


def _trap(h: Sequence[int], t: Sequence[int] | None, start: int, n: int,
          size: int) -> tuple[int, int]:
    """(rain water, standing) of n samples stored from `start` in buffers of `size` (a ring:
    index (start + i) % size). Weight of sample i: t[i+1] - t[i] (0 for the last), or 1."""
    if n == 0:
        return 0, 0
    rain = standing = 0
    lo, hi = 0, n - 1
    lmax = h[start % size]
    rmax = h[(start + hi) % size]
    while lo <= hi:
        if h[(start + lo) % size] <= h[(start + hi) % size]:
            i, v = lo, h[(start + lo) % size]
            if v > lmax:
                lmax = v
            water = lmax - v
            lo += 1
        else:
            i, v = hi, h[(start + hi) % size]
            if v > rmax:
                rmax = v
            water = rmax - v
            hi -= 1
        if t is None:
            d = 1
        elif i + 1 < n:
            d = t[(start + i + 1) % size] - t[(start + i) % size]
        else:
            d = 0
        rain += water * d
        standing += v * d
    return rain, standing


def trapped(heights: Sequence[int], ts_ns: Sequence[int] | None = None) -> int:
    """The rain water of a series: byte·ns with `ts_ns` (non-decreasing, one per height),
    else byte-samples."""
    if ts_ns is not None and len(ts_ns) != len(heights):
        raise ValueError("heights and ts_ns differ in length")
    n = len(heights)
    return _trap(heights, ts_ns, 0, n, max(n, 1))[0]


@dataclass(frozen=True, slots=True)
class RainFigure:
    """Rain water over a socket's last `samples` snapshots (byte·ns, or level·ns for the
    "level" series)."""

    sock_key: int
    series: str
    samples: int
    span_ns: int          # last ts - first ts
    peak: int             # highest sample
    rain_water: int       # area between the series and its skyline
    standing: int         # area under the series
    envelope: int         # area under the skyline = rain_water + standing

    @property
    def drained_share(self) -> float:
        """rain_water / envelope: 1 when the queue drains to empty between surges."""
        return self.rain_water / self.envelope if self.envelope else 0.0

    def to_json(self) -> dict:
        return {"series": self.series, "samples": self.samples, "span_ns": self.span_ns,
                "peak": self.peak, "rain_water": self.rain_water, "standing": self.standing,
                "envelope": self.envelope, "drained_share": round(self.drained_share, 4)}


class RainGauge:
    """The last `size` (ts_ns, height) samples of one socket, in a ring of two arrays of 64-bit
    integers; memory grows with the samples taken, up to 16 bytes a sample (a socket with a
    few snapshots holds a few: the ring was two lists of `size` slots, 16 KiB a socket at the
    default 1,024 before its first sample, and full ~50 KiB with its integer objects)."""

    __slots__ = ("size", "ts", "h", "start", "n", "late")

    def __init__(self, size: int = 1024):
        if size < 1:
            raise ValueError("size must be at least 1")
        self.size = size
        self.ts = array("q")            # the ring: appended to until it holds `size`
        self.h = array("q")
        self.start = 0
        self.n = 0
        self.late = 0

    def add(self, ts_ns: int, height: int) -> None:
        """Append a sample; one older than the last is dropped and counted in `late`."""
        n = self.n
        if n and ts_ns < self.ts[(self.start + n - 1) % self.size]:
            self.late += 1
            return
        if n < self.size:               # not full yet: start is 0, the ring is the list
            self.ts.append(ts_ns)
            self.h.append(height)
            self.n = n + 1
            return
        j = self.start
        self.ts[j], self.h[j] = ts_ns, height
        self.start = (j + 1) % self.size

    def __len__(self) -> int:
        return self.n

    def figure(self, sock_key: int = 0, series: str = "unread_bytes") -> RainFigure:
        rain, standing = _trap(self.h, self.ts, self.start, self.n, self.size)
        peak = max((self.h[(self.start + i) % self.size] for i in range(self.n)), default=0)
        span = (self.ts[(self.start + self.n - 1) % self.size] - self.ts[self.start]
                if self.n else 0)
        return RainFigure(sock_key, series, self.n, span, peak, rain, standing, rain + standing)


class RainGauges:
    """A RainGauge per socket, fed with WaterSnapshots in time order; at most `max_sockets`
    (the least recently fed is forgotten). A close snapshot returns the socket's final figure
    and forgets it."""

    def __init__(self, samples: int = 1024, series: str = "unread_bytes",
                 max_sockets: int = 65536):
        if series not in SERIES:
            raise ValueError(f"series must be one of {', '.join(SERIES)}")
        self.samples, self.series, self.max_sockets = samples, series, max_sockets
        self._gauges: OrderedDict[int, RainGauge] = OrderedDict()
        self.evicted = 0

    def add(self, snap) -> RainFigure | None:
        key = snap.sock_key
        g = self._gauges.get(key)
        if g is None:
            if len(self._gauges) >= self.max_sockets:
                self._gauges.popitem(last=False)
                self.evicted += 1
            g = self._gauges[key] = RainGauge(self.samples)
        else:
            self._gauges.move_to_end(key)
        g.add(snap.ts_ns, getattr(snap, self.series))
        if snap.trigger == "close":
            del self._gauges[key]
            return g.figure(key, self.series)
        return None

    def figure(self, sock_key: int) -> RainFigure | None:
        g = self._gauges.get(sock_key)
        return g.figure(sock_key, self.series) if g is not None else None

    def figures(self) -> list[RainFigure]:
        return [g.figure(k, self.series) for k, g in self._gauges.items()]

    def __len__(self) -> int:
        return len(self._gauges)
