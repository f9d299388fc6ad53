"""The wiring, in one place: source -> raw sinks -> analysis -> sinks, for live runs and files.

    source      WatchLoop (the kernel probe and the Go read sampler, live) or a file's
                records (Pipeline.run_records: a recording, or OTLP JSON)
    raw sinks   take the records as they came (the recording: correlate redoes the analysis)
    analysis    Analysis: the alert stage, the rain-water gauges, the correlator (verdicts);
                pure, the same for live runs and files
    post        optional, after the analysis (OTLP JSON input restores the recorded
                evidence counts)
    sinks       JSON Lines, the live view, the run's stderr summary, OTLP, Prometheus, the
                report: every one a otelwater.export.sink.Sink, each taking every record kind
                or ignoring it explicitly

Commands only choose the source and the sinks (otelwater.watch, otelwater.report).

The live loop never blocks in the kernel: every `poll_s` it drains the ring buffers (their
records are submitted without wakeups, so consuming on a timer is what keeps the traced programs
cheap), at most a bounded share per round (a producer faster than the loop fills the ring
buffer, whose overflow is counted as lost, instead of holding the loop: sweeps, output, signals
and the duration stay on schedule), every `interval_s` it sweeps the socket table (trigger
"periodic"), refreshes filters, reports lost records and ticks the sinks (the view redraws). On
stop (duration, SIGINT, SIGTERM, SIGHUP) each probe detaches and hands over everything its ring
buffer still holds with its final lost totals (so every record counted is delivered or counted
lost), the reads still pending get their verdicts, and the pipeline closes its sinks within a
deadline.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable

from otelwater.errors import RecordingError
from otelwater.events.model import LostEvents
from otelwater.events.recording import ProcessInfo
from otelwater.events.records import Summary, record_ts


class Stopper:
    """Turns SIGINT/SIGTERM/SIGHUP into a flag the loop checks, restoring handlers on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self, on_signal: Callable[[int], None] | None = None):
        self.event = threading.Event()
        self.signal: int | None = None
        self.on_signal = on_signal      # told at once (the agent's readiness), in the handler
        self._old = {}

    def __enter__(self):
        for s in self.SIGNALS:
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, _frame):
        first = self.signal is None
        self.signal = signum
        self.event.set()
        if first and self.on_signal is not None:
            self.on_signal(signum)

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
    # each round, before the probes are polled (the agent: which processes to trace); returns
    # records to deliver with the round's (notices)
    chores: Callable[[], list] | None = None
    # at each sweep when nothing is backlogged: every record made before this CLOCK_MONOTONIC
    # time was delivered (the analysis decides the reads a quiet spell would hold)
    on_clock: Callable[[int], None] | None = None

    final_drain_s: float = 0.5

    def _poll(self) -> tuple[list, bool]:
        batch = list(self.water.poll())
        backlogged = getattr(self.water, "backlogged", False)
        if self.readers is not None:
            batch.extend(self.readers.poll())
            backlogged = backlogged or getattr(self.readers, "backlogged", False)
        return batch, backlogged

    def _stop(self, backlogged: bool) -> list:
        """The end: each probe detaches (the water probe's program first: an embedded sampler
        is in it), then hands over all its ring buffer still holds and its exact lost totals,
        so every record counted was delivered or counted as lost. A source without stop()
        is drained for a bounded time instead."""
        out: list = []
        stops = [getattr(src, "stop", None) for src in (self.water, self.readers)
                 if src is not None]
        if stops and all(stops):
            for stop in stops:
                out.extend(stop())
            return out
        until = time.monotonic() + self.final_drain_s
        while backlogged and time.monotonic() < until:
            more, backlogged = self._poll()
            out.extend(more)
        return out

    def run(self, stopper: Stopper) -> None:
        t0 = time.monotonic()
        next_sweep = t0 + self.interval_s
        lost_seen = {"water": 0, "reads": 0}
        while True:
            now = time.monotonic()
            drained_ns = time.monotonic_ns()
            done = stopper.event.is_set() or (
                self.duration_s is not None and now - t0 >= self.duration_s)
            batch, backlogged = self._poll()
            if self.chores is not None and not done:
                batch.extend(self.chores())
            if done:
                batch.extend(self._stop(backlogged))
            sweep = done or now >= next_sweep
            if sweep:
                batch.extend(self.water.sweep())
                refresh = getattr(self.water, "refresh_filters", None)
                if refresh:
                    refresh()
                counts = getattr(self.readers, "counts_sweep", None)
                if counts is not None:      # the kernel's exact verdict counts that moved
                    batch.extend(counts(time.monotonic_ns()))
                for name, src in (("water", self.water), ("reads", self.readers)):
                    if src is None:
                        continue
                    # the probes locate losses in-band (each LostEvents just before the
                    # record that carried it); the sweep adds the exact total and what no
                    # delivered record has reported yet (LossLedger, probes/kernel.py)
                    located = getattr(src, "lost_sweep", None)
                    if located is not None:
                        rec = located(time.monotonic_ns())
                        if rec is not None:
                            batch.append(rec)
                        continue
                    total = src.lost_total()
                    if total != lost_seen[name]:
                        lost_seen[name] = total
                        batch.append(LostEvents(time.monotonic_ns(), name, total))
                next_sweep = now + self.interval_s
            if batch:
                batch.sort(key=record_ts)
                self.on_records(batch)
            if sweep and not backlogged and not done and self.on_clock is not None:
                self.on_clock(drained_ns)
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

    def __init__(self, config=None, start_ns: int | None = None, summaries: bool = True):
        """summaries=False: no socket or reader summaries (nor the rain-water figures they
        carry) for a run that never reports them (the agent)."""
        from otelwater.alerts.stage import AlertStage
        from otelwater.analysis.rainwater import RainGauges
        from otelwater.config import Config
        from otelwater.correlate import Correlator, CorrelatorConfig

        cfg = config or Config()
        self.config = cfg
        self.alerts = AlertStage(cfg.alerts)
        self.rain = RainGauges(cfg.rainwater.samples, cfg.rainwater.series) if summaries else None
        c = cfg.correlate
        self.correlator = Correlator(CorrelatorConfig(
            window_ns=c.window_ns, slow_ns=c.threshold_ns, run_ns=c.run_threshold_ns,
            include_idle=c.include_idle, summaries=summaries),
            start_ns=start_ns)
        self.closed_rain: dict = {}     # sock_key -> RainFigure taken at close (bounded)
        # the figures of closed sockets whose summaries are kept (correlate.summary)
        self.rain_kept = self.correlator.config.max_closed * 5 // 4

    def process(self, batch: list) -> list:
        from otelwater.events.model import WaterSnapshot

        out = self.alerts.feed(batch)
        for r in batch if self.rain is not None else ():
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


class _Guarded:
    """One sink as the pipeline calls it: a failure is counted and said once, and the run goes
    on; an essential sink's failure (the command's own output) ends the run."""

    __slots__ = ("sink", "failures", "out", "started")

    def __init__(self, sink, out):
        self.sink = sink
        self.failures = 0
        self.out = out
        self.started = False

    def call(self, method: str, *args):
        try:
            return getattr(self.sink, method)(*args)
        except Exception as e:  # noqa: BLE001 - an output must not stop the others
            if self.sink.essential:
                raise
            self.failures += 1
            if self.failures == 1:
                print(f"otelwater: the {self.sink.name} output failed ({method}: "
                      f"{type(e).__name__}: {e}); the run goes on without what it lost, "
                      f"and further failures are counted", file=self.out, flush=True)
            return None


class Pipeline:
    """source -> raw sinks -> analysis (-> post) -> sinks; see the module docstring.

    Use as a context manager around the run: on exit (normal, error or signal) every sink is
    closed within `close_timeout_s`, the essential ones last."""

    def __init__(self, *, analysis: "Analysis | None" = None, sinks: Iterable = (),
                 raw_sinks: Iterable = (), post: Callable[[list], list] | None = None,
                 out=None, close_timeout_s: float = 5.0):
        self.analysis = analysis
        self.post = post
        self.out = out or sys.stderr
        self.raw = [_Guarded(s, self.out) for s in raw_sinks]
        self.sinks = [_Guarded(s, self.out) for s in sinks]
        self.close_timeout_s = close_timeout_s
        self.run: "RunInfo | None" = None
        self._closed = False

    @property
    def all(self) -> list:
        return self.raw + self.sinks

    def failures(self) -> dict[str, int]:
        return {g.sink.name: g.failures for g in self.all if g.failures}

    def start(self, run) -> None:
        self.run = run
        for g in self.all:
            g.call("start", run)
            g.started = True

    def feed(self, batch: list) -> None:
        """One batch of raw records in time order, through everything."""
        for g in self.raw:
            g.call("write", batch)
        if self.analysis is not None:
            batch = self.analysis.process(batch)
            if self.post is not None:
                batch = self.post(batch)
        if batch:
            for g in self.sinks:
                g.call("write", batch)

    def emit(self, records: list) -> None:
        """Records made outside the analysis (a summary at the end) to the sinks."""
        if records:
            for g in self.sinks:
                g.call("write", records)

    def advance(self, now_ns: int) -> None:
        """The sources were drained up to now_ns: the reads that waited for a later record
        get their verdicts."""
        a = self.analysis
        if a is None:
            return
        out = a.correlator.advance(now_ns)
        if out and self.post is not None:
            out = self.post(out)
        self.emit(out)

    def tick(self) -> None:
        for g in self.all:
            g.call("tick")

    def finish(self) -> None:
        """The reads still pending get their verdicts; then the summaries."""
        a = self.analysis
        if a is None:
            return
        last = a.finish()
        if self.post is not None:
            last = self.post(last)
        self.emit(last)
        self.emit([Summary(d) for d in a.socket_summaries() + a.reader_summaries()])

    def flush(self, timeout_s: float) -> bool:
        ok = True
        for g in self.all:
            ok = bool(g.call("flush", timeout_s)) and ok
        return ok

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + self.close_timeout_s
        first_error = None
        # non-essential sinks first (an exporter's deadline), then the command's own output
        for g in sorted(self.all, key=lambda g: g.sink.essential):
            try:
                g.call("close", max(0.0, deadline - time.monotonic()))
            except Exception as e:  # noqa: BLE001 - close them all, raise the first
                first_error = first_error or e
        if first_error is not None:
            raise first_error

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
            return
        try:
            self.close()
        except Exception:  # noqa: BLE001 - the error already under way is the one to see
            pass

    # -- sources ------------------------------------------------------------------------------

    def run_live(self, loop: "WatchLoop", stopper: "Stopper") -> None:
        """The live source until it stops, then the reads still pending."""
        loop.on_records = self.feed
        loop.on_tick = self.tick
        loop.on_clock = self.advance
        loop.run(stopper)
        self.finish()

    def run_records(self, records: Iterable, batch_size: int = 4096) -> RecordingError | None:
        """A file's records (in time order), in batches, then the reads still pending. A file
        that breaks midway stops there: what came before is analysed and finished all the
        same, and the RecordingError is returned for the caller to raise after its output.
        Process descriptions go straight to the sinks (the analysis has no use for them)."""
        batch: list = []
        error = None
        try:
            for rec in records:
                if type(rec) is ProcessInfo:
                    self.emit([rec])
                    continue
                batch.append(rec)
                if len(batch) >= batch_size:
                    self.feed(batch)
                    batch = []
        except RecordingError as e:
            error = e
        if batch:
            self.feed(batch)
        self.finish()
        return error
