"""CLOCK_MONOTONIC nanoseconds (every record's clock) to wall-clock time, once, at export.

The offset CLOCK_REALTIME - CLOCK_MONOTONIC is measured once when export starts: of 16
back-to-back (monotonic, realtime, monotonic) readings the one with the smallest gap, the
realtime reading taken at the midpoint of its two monotonic ones (error: half that gap, well
under a microsecond here). Every time is then `ts_ns + offset`, an exact integer addition, so
two records keep their exact distance. An offline export takes the offset its recording
measured (the header's clock.realtime_minus_monotonic_ns). NTP stepping the realtime clock
later is not followed: spans stay consistent with each other and with the offset of the start.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

SAMPLES = 16


@dataclass(frozen=True)
class WallClock:
    offset_ns: int          # CLOCK_REALTIME - CLOCK_MONOTONIC
    error_ns: int = 0

    def wall_ns(self, monotonic_ns: int) -> int:
        return monotonic_ns + self.offset_ns

    @classmethod
    def measure(cls, samples: int = SAMPLES) -> "WallClock":
        best_gap, best_off = None, 0
        for _ in range(samples):
            m0 = time.monotonic_ns()
            r = time.time_ns()
            m1 = time.monotonic_ns()
            gap = m1 - m0
            if best_gap is None or gap < best_gap:
                best_gap, best_off = gap, r - (m0 + gap // 2)
        return cls(best_off, (best_gap + 1) // 2 + 1)

    @classmethod
    def from_recording(cls, clock: dict) -> "WallClock":
        """The offset a recording's header kept (its `clock` object)."""
        return cls(int(clock["realtime_minus_monotonic_ns"]), int(clock.get("error_ns", 0)))
