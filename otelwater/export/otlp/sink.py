"""The live OTLP sink: records after Analysis in (a otelwater.export.sink.Sink), spans and
metric points out through opentelemetry-sdk, on a worker thread of its own.

    sink = OtlpSink.for_options(resolve_options(flag_endpoint, flag_protocol))
    sink.start(run)                # the run's attach time and thresholds, on every resource
    sink.write(records)            # each batch, the same records the JSON Lines sink gets
    sink.flush(timeout_s)          # wait until the worker has taken everything written
    sink.close(timeout_s)          # flush within a deadline, and say what was not delivered

Records are taken by kind (on_snapshot, on_read, on_verdict, on_alert, on_lost, on_process,
on_counts; notices and summaries are ignored). What is built: otlp.spans (a span per verdict, a
span per rise of the lost records), otlp.metrics (gauges, drops, alerts, lost; the read-duration
histogram recorded inside the read's span context, so its exemplars carry that span's trace and
span id; the verdict counts and their log2 histograms from the kernel's counts, else from the
verdicts: otelwater.export.tally), each under its service's resource (otlp.resources).

Export never holds the probes. write() only appends the records to a bounded queue
(MAX_RECORDS; what does not fit is dropped, counted and said once) and returns: the watch loop
that drains the kernel's ring buffers cannot spare the CPU of export at 1,000 slow reads a
second. One worker thread per sink turns the records into spans and metric points; close()
lets it drain the queue within its deadline. The spans go to one otlp.spans.SpanExport per
sink (its own thread, a bounded queue, batches encoded by otelwater and sent by the SDK's
exporter: tens of microseconds of CPU a span with its events, where the SDK's Tracer and
BatchSpanProcessor took 0.5-0.8 ms; bench/export_cost.py). The worker still shares the
interpreter (its lock) with the loop, so spans are also limited to SPAN_RATE a second per sink
(a token bucket holding one second's worth): beyond that a slow read still counts in the verdict
counter and the duration histogram, but gets no span (otelwater.spans.limited counts them; the
first is said once), and the kernel's counts (VerdictCounts) hold every slow read whatever
its record became. With background=False write() builds on the caller's thread, and
span_rate=None puts no limit (tests, and the offline export's spans: otlp.offline).
Counters start at 0: a service's limited spans when the service appears, every verdict of a
socket role when the service's first read of that role comes, the lost records of each probe
when the run starts (start()), a drops series when its socket or its per-port sum first
appears, so rate() works from the first scrape.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from typing import IO, Callable, Iterable

from otelwater import names as N
from otelwater.clock import WallClock
from otelwater.events.model import ReadRecord, VerdictCounts
from otelwater.events.verdict import Verdict
from otelwater.export.otlp.health import (ExportHealth, _counting_metric_exporter,
                                          _inner_exporters, diagnoser, say_delivery)
from otelwater.export.otlp.metrics import LiveMetrics
from otelwater.export.otlp.options import ExportOptions, quiet_sdk_logs, request_timeout_s
from otelwater.export.otlp.options import metric_interval_s as metric_interval_from_env
from otelwater.export.otlp.resources import (Services, endpoints_from_proc, identity_from_proc,
                                           own_host_name)
from otelwater.export.otlp.spans import (WINDOW_NS, AlertWindow, ExemplarContext, SpanExport,
                                         lost_span, read_span)
from otelwater.export.series import MAX_SOCKETS, OWN, TOP_N
from otelwater.export.sink import RunInfo, Sink

MAX_RECORDS = 16384             # records waiting for the sink's worker (write() never blocks)
SPAN_RATE = 500.0               # spans a second per sink, at most; None: every slow read
METRIC_INTERVAL_S = 10.0        # unless OTEL_METRIC_EXPORT_INTERVAL says otherwise
CLOSE_TIMEOUT_S = 5.0           # the most close() waits for the last export
MAX_CLOSED_ENDS = 4096          # closed sockets whose ends are kept for their last verdicts
TABLE_S = 1.0                   # a process's socket table read for spans serves this long
REREAD_S = 0.01                 # ...and is read again for a socket it misses after this


class SpanBudget:
    """A token bucket: at most `rate` spans a second, in bursts of up to `burst` (one second's
    worth by default, so a watch loop's batch of 0.1 s passes whole). `now` is injectable
    (seconds, monotonic) so tests can step time."""

    def __init__(self, rate: float, burst: float | None = None,
                 now: Callable[[], float] = time.monotonic):
        if rate <= 0:
            raise ValueError(f"span rate {rate!r} must be positive")
        self.rate = float(rate)
        self.burst = float(burst) if burst is not None else max(1.0, self.rate)
        self.now = now
        self.tokens = self.burst
        self.last = now()

    def take(self) -> bool:
        """True if one more span fits now (and counts it)."""
        t = self.now()
        if t > self.last:
            self.tokens = min(self.burst, self.tokens + (t - self.last) * self.rate)
            self.last = t
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class OtlpSink(Sink):
    """Records after Analysis in, OTLP out (module docstring). Not thread-safe for writers:
    one thread calls write(); the sink's worker builds the telemetry (with `background`, the
    default; without it, write() does); the SDK's reader threads call the gauges' callbacks.

    make_pipeline: -> (span processor, MetricReader), a new pair per service (the span
    processor: otlp.resources.Service). span_export: the SpanExport the pipelines share, which
    close() shuts down.
    span_rate: spans a second at most (None: no limit); `now` is its clock (tests step it).
    queue_records: records write() may leave waiting for the worker; beyond, dropped."""

    name = "OTLP export"
    ignores = frozenset({"notice", "summary"})

    def __init__(self, *, make_pipeline: Callable[[], tuple],
                 identity: Callable[[int], object] = identity_from_proc,
                 clock: WallClock | None = None, host: str | None = None,
                 traced_pids: Iterable[int] = (), top_n: int = TOP_N,
                 window_ns: int = WINDOW_NS, health: ExportHealth | None = None,
                 extra_readers: Callable[[], list] = list,
                 endpoints: Callable[[int], dict] | None = endpoints_from_proc,
                 background: bool = True, queue_records: int = MAX_RECORDS,
                 span_rate: float | None = SPAN_RATE, now: Callable[[], float] = time.monotonic,
                 span_export: SpanExport | None = None, out: IO[str] | None = None):
        self.span_export = span_export
        self.clock = clock or WallClock.measure()
        self.lock = threading.RLock()
        self.registry = Services(make_pipeline=make_pipeline, identity=identity,
                                 host=host or own_host_name(), traced_pids=traced_pids,
                                 extra_readers=extra_readers, observe=self._observe,
                                 produce=self._produce)
        self.registry.run[N.CLOCK_OFFSET_NS] = self.clock.offset_ns   # on every resource
        self.services = self.registry.by_key          # key -> otlp.resources.Service
        self.metrics = LiveMetrics(self.registry, top_n)
        self.alerts = AlertWindow(window_ns)
        self.delivers = health is not None  # an OTLP destination: close() sums up delivery
        # no OTLP destination (Prometheus only): its notices (a full queue) still go to `out`
        self.health = health if health is not None else ExportHealth(None, out)
        self.span_rate = span_rate
        self.budget = SpanBudget(span_rate, now=now) if span_rate is not None else None
        self.endpoints = endpoints          # pid -> {sock_key: (laddr, lport, raddr, rport)}
        self.ends: OrderedDict[int, tuple | None] = OrderedDict()  # sock_key -> that, bounded
        self._tables: dict[int, tuple] = {}   # pid -> (when, its endpoints), for TABLE_S
        self.closed_ends: OrderedDict[int, tuple] = OrderedDict()   # closed sockets', bounded
        self.spans = 0
        self._closed = False
        # the worker's queue: batches of records; `queued` counts records not yet processed
        self.background = background
        self.queue_records = queue_records
        self._batches: deque[list] = deque()
        self._queued = 0
        self._stopping = False
        self._cv = threading.Condition(threading.Lock())
        self._worker: threading.Thread | None = None
        if background:
            self._worker = threading.Thread(target=self._work, name="otelwater-export",
                                            daemon=True)
            self._worker.start()

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def for_options(cls, opts: ExportOptions, *, out: IO[str] | None = None,
                    metric_interval_s: float | None = None, **kw) -> "OtlpSink":
        """A sink exporting to `opts`, each service with its own exporters, counted."""
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        quiet_sdk_logs()
        health = ExportHealth(opts.target, out, diagnose=diagnoser(
            opts, request_timeout_s("TRACES")))   # a failure is said with its cause
        if metric_interval_s is None:   # a bad OTEL_METRIC_EXPORT_INTERVAL: a usage error
            metric_interval_s = metric_interval_from_env(METRIC_INTERVAL_S)

        spans = SpanExport(opts.span_exporter(), health)   # one for every service

        def pipeline():
            return (spans, PeriodicExportingMetricReader(
                _counting_metric_exporter(opts.metric_exporter(), health),
                export_interval_millis=metric_interval_s * 1000))

        return cls(make_pipeline=pipeline, health=health, span_export=spans, **kw)

    @property
    def traced(self) -> set[int]:
        return self.registry.traced

    @property
    def rank_every_s(self) -> float:
        """How often the top-N ranking of the gauges may be recomputed (tests set 0)."""
        return self.metrics.rank_every_s

    @rank_every_s.setter
    def rank_every_s(self, value: float) -> None:
        self.metrics.rank_every_s = value

    def start(self, run: RunInfo) -> None:
        """The run's attach time and analysis settings, put on every resource created after
        this (before the first write), so the spans alone give the same verdicts."""
        self.registry.set_run(run.start_ns, run.config)
        # the verdict counts are cumulative from the attach
        self.metrics.start_wall_ns = self.clock.wall_ns(run.start_ns)
        with self.lock:   # the resources known now, so their counters start at 0 from here
            self.registry.get(OWN)
            for pid in sorted(self.registry.traced):
                self.registry.get(pid)

    # -- records in ------------------------------------------------------------------------

    def write(self, records: Iterable) -> None:
        """Hand the records over: queued for the worker (what does not fit in the queue is
        dropped and counted, never waited for), or processed now without `background`."""
        if self._closed:
            return
        if not self.background:
            with self.lock:
                self.handle(records)
            return
        batch = list(records)
        if not batch:
            return
        known = self.registry.identities
        for r in batch:   # a traced process is named now, while it runs (once per pid)
            t = type(r)
            read = r.read if t is Verdict else r if t in (ReadRecord, VerdictCounts) else None
            if read is not None and read.pid not in known:
                self.registry.identity_of(read.pid)
        with self._cv:
            room = max(0, self.queue_records - self._queued)
            over = len(batch) - room
            if over > 0:
                batch = batch[:room]
            if batch:
                self._batches.append(batch)
                self._queued += len(batch)
                self._cv.notify()
        if over > 0:
            self.health.queue_full(over, self.queue_records)

    def flush(self, timeout_s: float | None = CLOSE_TIMEOUT_S) -> bool:
        """Wait until the worker has processed every record written so far; False if
        `timeout_s` passed first (the spans may still sit in the SDK's batch queues)."""
        with self._cv:
            return self._cv.wait_for(lambda: self._queued == 0, timeout_s)

    def _work(self) -> None:
        """The worker: one batch at a time, until close() and an empty queue. A batch that
        fails (a bug) is counted and said, and the worker goes on."""
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._batches or self._stopping)
                if not self._batches:
                    return
                batch = self._batches.popleft()
            try:
                with self.lock:
                    self.handle(batch)
            except Exception as e:  # noqa: BLE001 - one bad batch must not stop export
                self.health.failed(len(batch), e)
            finally:
                with self._cv:
                    self._queued -= len(batch)
                    self._cv.notify_all()

    # -- by kind (called under the lock) ----------------------------------------------------

    def forget(self, pid: int) -> None:
        """A process that exited (the agent, a while after): its service is shut down after
        a last export, and a new process with its pid is named afresh."""
        with self.lock:
            self.registry.forget(pid)

    def on_snapshot(self, s) -> None:
        self.metrics.snapshot(s)
        if s.trigger == "close":
            # its reads' verdicts come up to a window and the lateness after the close: the
            # ends are kept for them (the /proc table no longer has the socket)
            self.ends.pop(s.sock_key, None)
            self.closed_ends[s.sock_key] = (s.laddr, s.lport, s.raddr, s.rport)
            if len(self.closed_ends) > MAX_CLOSED_ENDS:
                self.closed_ends.popitem(last=False)

    def on_read(self, r) -> None:
        self.registry.trace(r.pid, r.comm)
        self.metrics.read(r)

    def on_counts(self, c) -> None:
        self.registry.trace(c.pid)   # its reads may all have been cut, lost or idle
        self.metrics.counts(c)

    def on_process(self, p) -> None:
        self.registry.learn(p)

    def on_alert(self, a) -> None:
        self.alerts.add(a)
        self.metrics.alert(a)

    def on_lost(self, r) -> None:
        rose = self.metrics.lost(r)
        if rose or (r.since_ns is not None and r.count):   # a located loss voids reads too
            self.registry.get(OWN).emit(lost_span(r, self.clock.wall_ns))

    def on_verdict(self, v) -> None:
        r = v.read
        self.registry.trace(r.pid, r.comm)
        svc = self.registry.get(r.pid)
        self.metrics.read(r)
        if self.budget is not None and not self.budget.take():
            self.metrics.verdict(svc, v)   # counted as every read is, with no span
            svc.limited.add(1)
            self.health.limited(1, self.span_rate)
            return
        span = read_span(v, self._ends_of(v), self.alerts.near(r), self.clock.wall_ns)
        with ExemplarContext(span):     # exemplars take this span's ids
            self.metrics.verdict(svc, v)
        svc.emit(span)
        self.spans += 1

    def _ends_of(self, v) -> tuple | None:
        """A verdict's socket ends: from its evidence, the socket's latest snapshot, or /proc."""
        r = v.read
        known = v.evidence[0] if v.evidence else self.metrics.sockets.get(r.sock_key)
        if known is not None:
            return known.laddr, known.lport, known.raddr, known.rport
        closed = self.closed_ends.get(r.sock_key)
        if closed is not None:
            return closed
        if r.sock_key not in self.ends:
            self._learn_ends(r)
        return self.ends.get(r.sock_key) or None

    def _learn_ends(self, r: ReadRecord) -> None:
        """The ends of a read's socket, looked up once per socket while it is open, and only
        for a span that needs them (no snapshot named them). A read of the process's socket
        table serves the lookups of the next TABLE_S: a server's new connections' first spans
        each read the whole table before (the agent's main cost with many sockets). A socket
        the table misses was opened after it was read (or is gone): read again, at most every
        REREAD_S a process; a miss within that is not kept, so the next span asks again."""
        if self.endpoints is None or not r.sock_key:   # (_ends_of asked the rest)
            return
        now = time.monotonic()
        for pid in [p for p, (t, _) in self._tables.items() if now - t >= TABLE_S]:
            del self._tables[pid]
        got = self._tables.get(r.pid)
        ends = got[1].get(r.sock_key) if got is not None else None
        if ends is None:
            if got is not None and now - got[0] < REREAD_S:
                return
            try:
                table = self.endpoints(r.pid) or {}
            except Exception:  # noqa: BLE001 - the span goes out with its socket key only
                table = {}
            self._tables[r.pid] = (now, table)
            ends = table.get(r.sock_key)     # None now: the socket is gone
        self.ends[r.sock_key] = ends
        if len(self.ends) > MAX_SOCKETS:
            self.ends.popitem(last=False)

    def _observe(self, key: int, field: int) -> list:
        """A gauge's callback (on the metric readers' threads)."""
        with self.lock:
            return self.metrics.observe(key, field)

    def _produce(self, key: int) -> list:
        """The verdict counts of a service, for a collection (on the readers' threads)."""
        with self.lock:
            return self.metrics.produced(key)

    # -- the end ---------------------------------------------------------------------------

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Export what is left within `timeout_s` (a Collector that is down does not hold the
        exit: what is still queued then is given up and said), then stop every provider.
        The worker gets the deadline less a reserve for the providers' last export."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + timeout_s
        if self._worker is not None:
            with self._cv:
                self._stopping = True
                self._cv.notify_all()
            self._worker.join(max(0.0, timeout_s - min(1.0, timeout_s / 2)))
            if self._worker.is_alive():   # give up what is still queued, and count it
                with self._cv:
                    left = sum(len(b) for b in self._batches)
                    self._batches.clear()
                    self._queued -= left
                with self.health.lock:
                    self.health.records_abandoned += left
        outs = [self.span_export] if self.span_export is not None else []
        shutdown_all(self._all_services(deadline) + outs, deadline)
        h = self.health
        lost = h.records_dropped + h.records_abandoned
        also = (f"; {lost} records dropped before export (queue full or given up at exit)"
                if lost else "")
        if h.spans_limited:
            also += (f"; {h.spans_limited} slow reads over {self.span_rate:g} a second got no "
                     "span (still counted in the metrics)")
        say_delivery(h, self.spans, delivers=self.delivers, also=also)

    def _all_services(self, deadline: float) -> list:
        """Every provider, also while a worker given up on may still be adding one."""
        got = self.lock.acquire(timeout=min(0.5, max(0.0, deadline - time.monotonic())))
        try:
            while True:
                try:
                    return self.registry.all()
                except RuntimeError:   # changed during the copy (the lock was not ours)
                    continue
        finally:
            if got:
                self.lock.release()


def shutdown_all(services: list, deadline: float) -> None:
    """Shut every provider (and the SpanExport) down in parallel by `deadline`; past it,
    interrupt the exporters' retries."""
    threads = [threading.Thread(target=s.shutdown,
                                args=(max(0.0, deadline - time.monotonic()),), daemon=True)
               for s in services]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    if any(t.is_alive() for t in threads):  # interrupt the exporters' retries
        for s in services:
            if isinstance(s, SpanExport):
                s.interrupt()
                continue
            for exp in _inner_exporters(s):
                try:
                    exp.shutdown()
                except Exception:  # noqa: BLE001
                    pass
        for t in threads:
            t.join(0.5)
