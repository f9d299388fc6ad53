"""Wires source → decode → board/alerts → sinks for `otelwater watch`.

The loop never blocks in the kernel: every `poll_s` it drains the ring buffers (their records
are submitted without wakeups, so consuming on a timer is what keeps the traced programs cheap),
at most a bounded share per round (a producer faster than the loop fills the ring buffer, whose
overflow is counted as lost, instead of holding the loop: sweeps, output, signals and the
duration stay on schedule),
every `interval_s` it sweeps the socket table (trigger "periodic"), refreshes filters, reports
lost records and redraws. On stop (duration, SIGINT, SIGTERM, SIGHUP) it drains everything once
more, then the caller's context managers detach every probe.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass
from typing import Callable

from otelwater.events.model import LostEvents


class Stopper:
    """Turns SIGINT/SIGTERM/SIGHUP into a flag the loop checks, restoring handlers on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self):
        self.event = threading.Event()
        self.signal: int | None = None
        self._old = {}

    def __enter__(self):
        for s in self.SIGNALS:
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, _frame):
        self.signal = signum
        self.event.set()

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


@dataclass
class WatchLoop:
    water: object                      # WaterProbe (or anything with poll/sweep/lost_total)
    on_records: Callable[[list], None]  # receives snapshots/reads/lost records in time order
    on_tick: Callable[[], None] = lambda: None
    interval_s: float = 1.0
    poll_s: float = 0.1
    duration_s: float | None = None
    readers: object | None = None      # a Go read sampler with poll()/lost_total(), optional

    final_drain_s: float = 0.5

    def _poll(self) -> tuple[list, bool]:
        batch = list(self.water.poll())
        backlogged = getattr(self.water, "backlogged", False)
        if self.readers is not None:
            batch.extend(self.readers.poll())
            backlogged = backlogged or getattr(self.readers, "backlogged", False)
        return batch, backlogged

    def run(self, stopper: Stopper) -> None:
        t0 = time.monotonic()
        next_sweep = t0 + self.interval_s
        lost_seen = {"water": 0, "reads": 0}
        while True:
            now = time.monotonic()
            done = stopper.event.is_set() or (
                self.duration_s is not None and now - t0 >= self.duration_s)
            batch, backlogged = self._poll()
            if done:  # what the ring buffers still hold, within a bounded time
                until = time.monotonic() + self.final_drain_s
                while backlogged and time.monotonic() < until:
                    more, backlogged = self._poll()
                    batch.extend(more)
            sweep = done or now >= next_sweep
            if sweep:
                batch.extend(self.water.sweep())
                refresh = getattr(self.water, "refresh_filters", None)
                if refresh:
                    refresh()
                for name, src in (("water", self.water), ("reads", self.readers)):
                    if src is None:
                        continue
                    total = src.lost_total()
                    if total != lost_seen[name]:
                        lost_seen[name] = total
                        batch.append(LostEvents(time.monotonic_ns(), name, total))
                next_sweep = now + self.interval_s
            if batch:
                batch.sort(key=lambda r: getattr(r, "ts_ns", getattr(r, "ts_end_ns", 0)))
                self.on_records(batch)
            if sweep:
                self.on_tick()
            if done:
                return
            if backlogged:
                continue  # records are waiting: take the next share at once (sweeps,
                #           signals and the duration are still checked each round)
            wait = self.poll_s
            if self.duration_s is not None:
                wait = max(0.0, min(wait, t0 + self.duration_s - time.monotonic()))
            stopper.event.wait(wait)


class Analysis:
    """The pure stages between the probes and the sinks, in one place so every sink (live
    view, JSON Lines, recording, export) sees the same records:

        batch (snapshots, reads, lost, notices; time order)
          -> alert stage: the same records, each rule transition right after its cause
          -> rain-water gauges: a socket's figure when it closes
          -> correlator: a verdict for every slow read once the watermark has passed it

    process() takes each batch; finish() flushes the reads still pending at the end."""

    def __init__(self, config=None, start_ns: int | None = None):
        from otelwater.alerts.stage import AlertStage
        from otelwater.analysis.rainwater import RainGauges
        from otelwater.config import Config
        from otelwater.correlate import Correlator, CorrelatorConfig

        cfg = config or Config()
        self.config = cfg
        self.alerts = AlertStage(cfg.alerts)
        self.rain = RainGauges(cfg.rainwater.samples, cfg.rainwater.series)
        c = cfg.correlate
        self.correlator = Correlator(CorrelatorConfig(
            window_ns=c.window_ns, slow_ns=c.threshold_ns, run_ns=c.run_threshold_ns),
            start_ns=start_ns)
        self.closed_rain: dict = {}     # sock_key -> RainFigure taken at close (bounded)
        self.rain_kept = 65536

    def process(self, batch: list) -> list:
        from otelwater.events.model import WaterSnapshot

        out = self.alerts.feed(batch)
        for r in batch:
            if isinstance(r, WaterSnapshot):
                figure = self.rain.add(r)
                if figure is not None:
                    self.closed_rain[r.sock_key] = figure
                    if len(self.closed_rain) > self.rain_kept:
                        self.closed_rain.pop(next(iter(self.closed_rain)))
        out.extend(self.correlator.feed(batch))
        return out

    def socket_summaries(self) -> list[dict]:
        """Per socket: verdict counts, percentiles, peak water, drops (the correlator's), and
        the rain-water figure (live sockets', or the one taken at close)."""
        out = []
        for key, s in self.correlator.summaries.sockets.items():
            d = s.to_json(self.correlator.config.dominance)
            fig = self.rain.figure(key) or self.closed_rain.get(key)
            d["rain_water"] = fig.to_json() if fig is not None else None
            out.append(d)
        return out

    def reader_summaries(self) -> list[dict]:
        c = self.correlator
        return [r.to_json(c.config.dominance) for r in c.summaries.readers.values()]

    def expire(self, now_ns: int) -> list:
        return self.alerts.expire(now_ns)

    def finish(self) -> list:
        return self.correlator.finish()
