"""The OTLP sink's worker and limits: write() only queues (a full queue drops and counts, never
waits), close() drains, spans are rate-limited by a token bucket (an injected clock here) while
the metrics still count every read, and counters start at 0."""

import io
import threading
import time

import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from otelwater.events.verdict import VERDICTS, Verdict
from otelwater import names as N
from otelwater.clock import WallClock
from otelwater.export.otlp import OWN, ExportHealth, Identity, OtlpSink, SpanBudget
from otelwater.export.sink import RunInfo

from .test_otlp import MS, OFFSET, PID, read, snap, verdict


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class SlowExporter(InMemorySpanExporter):
    """Takes `delay_s` per span: a worker this slow is what the watch loop must not wait for."""

    def __init__(self, delay_s: float):
        super().__init__()
        self.delay_s = delay_s

    def export(self, spans):
        time.sleep(self.delay_s * len(spans))
        return super().export(spans)


def make_sink(spans=None, out=None, **kw) -> OtlpSink:
    spans = spans if spans is not None else InMemorySpanExporter()
    return OtlpSink(make_pipeline=lambda: (SimpleSpanProcessor(spans), InMemoryMetricReader()),
                    identity=lambda pid: Identity(pid, exe="/srv/checkout"),
                    clock=WallClock(OFFSET), host="testhost", endpoints=None,
                    health=ExportHealth("http://c:4317", out or io.StringIO()), **kw)


def metrics(sink: OtlpSink, key=PID) -> dict:
    """metric name -> {frozenset(attributes): point} of one service's reader."""
    data = sink.services[key].metric_reader.get_metrics_data()
    return {m.name: {frozenset(p.attributes.items()): p for p in m.data.data_points}
            for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}


def verdicts(n: int, start: int = 0) -> list:
    return [verdict((start + i) * 10 * MS, (start + i) * 10 * MS + 2 * MS) for i in range(n)]


class Held:
    """The sink's lock held by another thread: the worker stops at its next batch."""

    def __init__(self, sink: OtlpSink):
        self.sink, self.taken, self.release = sink, threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._hold, daemon=True)

    def _hold(self):
        with self.sink.lock:
            self.taken.set()
            self.release.wait(30)

    def __enter__(self):
        self.thread.start()
        assert self.taken.wait(5)
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.thread.join(5)


# -- the queue ---------------------------------------------------------------------------------

def test_write_returns_at_once_while_the_worker_is_slow_and_close_drains_everything():
    # Given a sink whose span export takes 5 ms a span (the SDK's ~0.4 ms, ten times over)
    spans = SlowExporter(0.005)
    sink = make_sink(spans, span_rate=None)
    # When 200 slow reads are written in batches, as the watch loop does
    t0 = time.monotonic()
    for i in range(0, 200, 20):
        sink.write(verdicts(20, i))
    took = time.monotonic() - t0
    # Then write() did not wait for them (200 spans take 1 s on the worker)
    assert took < 0.5, f"write() took {took:.3f} s"
    assert len(spans.get_finished_spans()) < 200
    # and close() drains the queue: every span arrives
    sink.close(timeout_s=10)
    assert len(spans.get_finished_spans()) == 200
    assert sink.health.records_dropped == sink.health.records_abandoned == 0


def test_a_full_queue_drops_the_new_records_counts_them_and_says_it_once():
    out = io.StringIO()
    spans = InMemorySpanExporter()
    sink = make_sink(spans, out, queue_records=10, span_rate=None)
    with Held(sink):
        # Given a worker that cannot take anything, when 25 records arrive in 3 writes
        t0 = time.monotonic()
        sink.write(verdicts(6))
        sink.write(verdicts(6, 6))      # 4 fit
        sink.write(verdicts(13, 12))    # none fits
        # Then write() never waited, and the 15 that did not fit are counted
        assert time.monotonic() - t0 < 0.5
        assert sink.health.records_dropped == 15
    assert sink.flush(5)
    # and the 10 queued ones became spans; the drop was said once
    assert len(spans.get_finished_spans()) == 10
    lines = [line for line in out.getvalue().splitlines() if "queue" in line]
    assert lines == ["otelwater: OTLP export to http://c:4317 cannot keep up: its queue of 10 "
                     "records is full, new records are dropped (counted)"]
    sink.close(timeout_s=2)
    assert "15 records dropped before export" in out.getvalue().splitlines()[-1]


def test_close_gives_up_what_the_worker_cannot_reach_within_its_timeout():
    out = io.StringIO()
    sink = make_sink(out=out)
    with Held(sink):
        sink.write(verdicts(5))
        sink.write(verdicts(5, 5))
        # When the worker is stuck and close() has 1 s
        t0 = time.monotonic()
        closer = threading.Thread(target=sink.close, kwargs={"timeout_s": 1.0})
        closer.start()
        closer.join(3)
        # Then close() returned within about its timeout and counted what was left queued
        assert not closer.is_alive() and time.monotonic() - t0 < 2.5
    assert sink.health.records_abandoned >= 5        # the batch the worker held may be the 5th
    assert "records dropped before export" in out.getvalue()


def test_a_failing_batch_is_counted_said_once_and_the_worker_goes_on():
    out = io.StringIO()
    spans = InMemorySpanExporter()
    sink = make_sink(spans, out)
    broken = Verdict(None, "unknown", "", None, None, None)   # no read: processing raises
    sink.write([broken])
    sink.write([broken])
    sink.write(verdicts(3))
    assert sink.flush(5)
    assert len(spans.get_finished_spans()) == 3
    assert sink.health.errors == 2 and sink.health.records_dropped == 2
    assert out.getvalue().count("internal error") == 1
    sink.close(timeout_s=2)


def test_background_and_synchronous_sinks_build_the_same_spans():
    records = [read(0, 2 * MS), snap(MS, volume=640, level=1), *verdicts(30)]
    got = []
    for background in (True, False):
        spans = InMemorySpanExporter()
        sink = make_sink(spans, background=background, span_rate=None)
        sink.write(records)
        sink.close(timeout_s=5)
        got.append([(s.name, s.start_time, s.end_time, dict(s.attributes))
                    for s in spans.get_finished_spans()])
    assert len(got[0]) == 30 and got[0] == got[1]


# -- the span rate -----------------------------------------------------------------------------

def test_token_bucket_allows_its_rate_and_a_burst_of_one_second():
    clock = FakeClock()
    b = SpanBudget(10, now=clock)
    assert [b.take() for _ in range(11)] == [True] * 10 + [False]
    clock.t += 0.1                        # one token back
    assert [b.take(), b.take()] == [True, False]
    clock.t += 100                        # refilled to the burst, not beyond
    assert sum(b.take() for _ in range(50)) == 10
    clock.t -= 5                          # a clock going back gives nothing
    assert not b.take()
    with pytest.raises(ValueError):
        SpanBudget(0)


def test_spans_beyond_the_rate_are_counted_but_every_read_is_in_the_metrics():
    # Given a sink allowing 3 spans a second, on a clock this test steps
    clock, out = FakeClock(), io.StringIO()
    spans = InMemorySpanExporter()
    sink = make_sink(spans, out, background=False, span_rate=3, now=clock)
    # When 5 slow reads come within a second, then 2 more a second later
    sink.write(verdicts(5))
    clock.t += 1.0
    sink.write(verdicts(2, 5))
    # Then 3 + 2 got spans, 2 were limited, and said once
    assert len(spans.get_finished_spans()) == 5
    m = metrics(sink)
    label = frozenset({(N.VERDICT, "peer-starved")})
    assert m[N.SPANS_LIMITED.name][frozenset()].value == 2
    # and the verdict counter and the histogram have all 7 reads
    assert m[N.READ_VERDICTS.name][label].value == 7
    assert m[N.READ_DURATION.name][label].count == 7
    assert sink.health.spans_limited == 2
    assert out.getvalue().count("slow reads a second") == 1
    sink.close(timeout_s=2)


# -- counters from 0 ---------------------------------------------------------------------------

def test_a_new_services_verdict_and_limited_counters_start_at_0():
    sink = make_sink(background=False)
    sink.write([read(0, 2 * MS)])            # PID becomes a traced service; no verdict yet
    m = metrics(sink)
    assert {dict(k)[N.VERDICT]: p.value for k, p in m[N.READ_VERDICTS.name].items()} == \
        {v: 0 for v in VERDICTS}
    assert m[N.SPANS_LIMITED.name][frozenset()].value == 0
    sink.close(timeout_s=2)


def test_lost_records_of_each_probe_start_at_0_when_the_run_starts():
    sink = make_sink(background=False)
    sink.start(RunInfo(5 * MS))
    m = metrics(sink, OWN)
    assert {dict(k)[N.PROBE]: p.value for k, p in m[N.RECORDS_LOST.name].items()} == \
        {"water": 0, "reads": 0}
    sink.close(timeout_s=2)


def test_a_port_sums_drops_start_at_0_and_a_top_sockets_own_come_with_its_first_drops():
    sink = make_sink(background=False, top_n=1)
    sink.rank_every_s = 0
    sink.write([read(0, 2 * MS)])                             # PID is traced
    sink.write([snap(MS, key=1, volume=900, drops=3)])        # the top socket
    sink.write([snap(2 * MS, key=2, volume=10, drops=7, lport=9090)])   # summed per port
    drops = {dict(k)[N.SOCKET_KEY]: p.value
             for k, p in metrics(sink)[N.DROPS.name].items()}
    assert drops == {"other": 0}       # the top socket has dropped nothing while watched
    sink.write([snap(3 * MS, key=1, volume=900, drops=5)])
    drops = {dict(k)[N.SOCKET_KEY]: p.value
             for k, p in metrics(sink)[N.DROPS.name].items()}
    assert drops == {"0000000000000001": 2, "other": 0}
    sink.close(timeout_s=2)


def test_sockets_passing_through_the_top_n_leave_no_drops_series_behind():
    # Given 200 sockets on one port, each in turn the top socket (growing volume), none
    # dropping a packet
    sink = make_sink(background=False, top_n=1)
    sink.rank_every_s = 0
    sink.write([read(0, 2 * MS)])
    for k in range(1, 201):
        sink.write([snap(k * MS, key=k, volume=10 * k, drops=0, lport=9090)])
        metrics(sink)                  # a collection with socket k at the top
    sink.write([snap(300 * MS, key=1, volume=10, drops=0, lport=9090)])    # not the top now
    # Then the drops counter holds the port's sum alone (a series per socket that ever ranked
    # would stay in the SDK for the run's length)
    drops = {dict(k)[N.SOCKET_KEY] for k in metrics(sink)[N.DROPS.name]}
    assert drops == {"other"}
    sink.close(timeout_s=2)
