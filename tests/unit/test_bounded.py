"""What the long-running agent keeps stays bounded by what is alive: a stream of short
connections and restarted processes does not grow the analysis or the export's tables (the
soak, bench/agent_soak.py, shows the same on a real service). Each test feeds many more closed
sockets, goroutines or processes than the bound and checks the tables stay at it, and that what
is alive (and the worst of what is gone) is still there."""

import random
import time

from otelwater.analysis.rainwater import RainGauge, RainGauges, trapped
from otelwater.correlate import Correlator, CorrelatorConfig
from otelwater.correlate.summary import Summaries
from otelwater.events.model import ReadRecord, WaterSnapshot
from otelwater.export.otlp import OWN
from otelwater.export.tally import VerdictTally

from .test_otlp import Harness, verdict

MS = 1_000_000


def snap(ts, key, trigger="arrival", volume=0, pid=7):
    return WaterSnapshot(ts, key, pid, "svc", pid, 1, "::1", 80, "::1", 5000 + key % 60000, 0,
                         volume, 0, 1 << 20, 0, 0, 0, "", 0, 0, trigger, "ESTABLISHED", 9)


def read(start, end, key, goid, pid=7, qd=2 * MS):
    return ReadRecord(start, end, pid, pid, goid, 3, key, 4096, 64, ("main.handle",),
                      "tracepoint", "svc", False, None, qd, role="accepted")


def connections(n, *, slow_every=0, start=0, step=2 * MS):
    """n short connections one after the other, a goroutine each: an arrival, a read (a
    consumer-lagging slow read on every `slow_every`-th, else a fast one), the close."""
    out = []
    t = start
    for i in range(n):
        key, goid = 1000 + i, 100 + i
        slow = slow_every and i % slow_every == 0
        out += [snap(t, key, volume=64), read(t, t + 10_000, key, goid,
                                              qd=2 * MS if slow else 1_000),
                snap(t + 20_000, key, "close")]
        t += step
    return out


# -- rain water ----------------------------------------------------------------------------------

def test_a_rain_gauge_holds_what_it_was_given_up_to_its_size_then_the_last_size():
    # given a gauge of 8 samples: a few samples take a few slots, not 8
    g = RainGauge(8)
    for i in range(3):
        g.add(i * 10, [5, 0, 5][i])
    assert len(g.ts) == len(g.h) == 3
    assert g.figure().rain_water == trapped([5, 0, 5], [0, 10, 20])
    # when 20 more come, the ring holds 8 and its figure is the last 8's
    heights = [random.Random(1).randrange(0, 100) for _ in range(20)]
    for i, h in enumerate(heights):
        g.add(100 + i * 10, h)
    assert len(g.ts) == len(g.h) == 8 and len(g) == 8
    last_ts = [100 + i * 10 for i in range(12, 20)]
    f = g.figure()
    assert f.rain_water == trapped(heights[12:], last_ts)
    assert f.peak == max(heights[12:]) and f.span_ns == last_ts[-1] - last_ts[0]


def test_rain_gauges_of_closed_sockets_are_let_go():
    gauges = RainGauges(samples=1024)
    for i in range(5000):
        gauges.add(snap(i * 10, i, volume=64))
        assert gauges.add(snap(i * 10 + 5, i, "close")) is not None
    assert len(gauges) == 0


# -- summaries -----------------------------------------------------------------------------------

def test_closed_sockets_and_their_readers_are_kept_to_max_closed_the_worst_among_them():
    # given 20,000 short connections, every 100th with a slow read (consumer-lagging)
    c = Correlator(CorrelatorConfig(max_closed=512))
    recs = connections(20_000, slow_every=100)
    for i in range(0, len(recs), 300):
        c.feed(recs[i:i + 300])
    c.finish()
    s = c.summaries
    # then the summaries hold at most max_closed + a quarter of it, sockets and readers
    assert len(s.sockets) <= 512 + 128 and len(s.readers) <= 512 + 128
    assert s.closed_evicted > 19_000 and s.closed_readers_evicted > 19_000
    # and every socket that had a slow read is among them (the worst are kept), and the last
    # ones closed whatever their figures
    slow_keys = {1000 + i for i in range(0, 20_000, 100)}
    kept_slow = {k for k, v in s.sockets.items() if v.slow_reads}
    assert kept_slow == slow_keys & set(s.sockets) and len(kept_slow) == 200
    assert 1000 + 19_999 in s.sockets
    assert sum(r.slow_reads for r in s.readers.values()) == 200
    st = c.stats()
    assert st["closed_summaries_evicted"] == s.closed_evicted


def test_open_sockets_and_readers_are_never_evicted_as_closed():
    # given 300 connections that stay open, then 5,000 short ones
    c = Correlator(CorrelatorConfig(max_closed=64))
    t = 0
    recs = []
    for i in range(300):
        recs += [snap(t, 50 + i, volume=64), read(t, t + 10_000, 50 + i, 10**6 + i)]
        t += MS
    recs += connections(5000, start=t)
    c.feed(recs)
    c.finish()
    s = c.summaries
    # then every open socket and its reader keeps its summary
    assert all(50 + i in s.sockets for i in range(300))
    assert all((7, 10**6 + i) in s.readers for i in range(300))
    assert len(s.sockets) <= 300 + 80


def test_a_key_reused_or_a_reader_reading_again_is_alive_again():
    s = Summaries(max_entries=1000, max_closed=4)
    s.socket(1).add_snapshot(snap(0, 1))
    s.add_read(read(0, 10, 1, goid=5), None, None, None)
    s.closed(1)
    assert 1 in s._closed and (7, 5) in s._closed_readers
    # when the same goroutine reads another (open) socket, it is alive again
    s.socket(2).add_snapshot(snap(20, 2))
    s.add_read(read(20, 30, 2, goid=5), None, None, None)
    assert (7, 5) not in s._closed_readers
    # and a closed key seen again in a non-close snapshot is alive again
    c = Correlator(CorrelatorConfig(max_closed=4))
    c.feed([snap(0, 9), snap(10, 9, "close"), snap(20 * MS, 9)])
    assert 9 in c.summaries.sockets and 9 not in c.summaries._closed


def test_a_read_decided_after_its_sockets_close_closes_its_reader():
    s = Summaries(max_entries=1000, max_closed=4)
    s.socket(1).add_snapshot(snap(0, 1))
    s.closed(1)
    s.add_read(read(0, 10, 1, goid=5), "consumer-lagging", None, None)
    assert (7, 5) in s._closed_readers


def test_the_summaries_of_a_short_run_are_what_they_were():
    # fewer closed sockets than the bound: every socket and reader has its summary, as before
    recs = connections(500, slow_every=7)
    c = Correlator(CorrelatorConfig())
    c.feed(recs)
    c.finish()
    assert len(c.summaries.sockets) == 500 and len(c.summaries.readers) == 500
    assert "closed_summaries_evicted" not in c.stats()


# -- verdict rows of processes gone --------------------------------------------------------------

def test_verdict_rows_of_a_forgotten_process_go():
    t = VerdictTally()
    t.seen(1, "accepted")
    t.seen(2, "accepted")
    n2 = len(t.of(2))
    t.forget(1)
    assert t.of(1) == [] and 1 not in t.pids and 1 not in t.roles
    assert len(t.of(2)) == n2
    t.forget(1)     # again: nothing


def test_the_export_lets_go_of_the_verdict_rows_of_processes_whose_service_is_gone():
    # given a sink that saw verdicts of 50 processes, each forgotten once it exited
    h = Harness()
    for pid in range(100, 150):
        h.sink.write([verdict(10 * MS, 12 * MS, key=pid, pid=pid)])
    assert len(h.sink.metrics.tally.pids) == 50
    for pid in range(100, 149):
        h.sink.forget(pid)
    deadline = time.monotonic() + 10      # their services' last exports (threads of their own)
    while any(not s.done for s in h.sink.registry.retired) and time.monotonic() < deadline:
        time.sleep(0.01)
    # when otelwater's own service is collected
    h.sink.registry.get(OWN)
    h.metrics(key=OWN)
    # then only the process still traced keeps its rows
    assert set(h.sink.metrics.tally.pids) == {149}
    assert {k[0] for k in h.sink.metrics.drop_started} <= {149, OWN}
    assert h.metrics(key=149)["otelwater.read.verdicts"]


# -- per-socket state of what is watched -----------------------------------------------------------

def test_a_quiet_socket_holds_no_alert_state_and_one_that_cleared_holds_none_again():
    from otelwater.alerts.stage import AlertStage
    from otelwater.config import AlertConfig

    stage = AlertStage(AlertConfig())
    # given 1,000 sockets whose water stays low
    for i in range(1000):
        stage.feed([snap(i * MS, i, volume=64), snap(i * MS + 1, i, volume=0)])
    # then none holds a rule's state, and its last levels are a short list
    ws = list(stage._socks.values())
    assert len(ws) == 1000 and all(w.rules is None and w.values is None for w in ws)
    assert all(type(w.levels) is list and len(w.levels) <= stage.cfg.surge_window for w in ws)
    # when one fills, its rule fires; when it empties (after the hold), it clears and forgets
    full = WaterSnapshot(2 * 10**9, 5, 7, "svc", 7, 1, "::1", 80, "::1", 5005, 1, 1000, 0, 1000,
                         0, 0, 0, "", 0, 0, "arrival", "ESTABLISHED", 9)
    fired = [t for t in stage.feed([full]) if getattr(t, "rule", None) == "fill_ratio"]
    assert fired and fired[0].state == "fired"
    cleared = [t for t in stage.feed([snap(60 * 10**9, 5, volume=0)])
               if getattr(t, "rule", None) == "fill_ratio"]
    assert cleared and cleared[0].state == "cleared"
    assert not stage._socks[5].rules


def test_a_socket_summary_without_reads_shares_its_empty_figures_and_says_the_same():
    s = Summaries()
    quiet, read_one = s.socket(1), s.socket(2)
    quiet.add_snapshot(snap(0, 1))
    read_one.add_snapshot(snap(0, 2))
    s.add_read(read(0, 5 * MS, 2, goid=9), "consumer-lagging", None, None)
    assert quiet.queue_delay is s.socket(3).queue_delay      # one shared empty sketch
    assert read_one.queue_delay is not quiet.queue_delay and read_one.queue_delay.n == 1
    d = quiet.to_json()
    assert d["reads"] == 0 and d["verdict"] is None and d["queue_delay_ns"]["p50"] is None
    assert set(d["verdicts"].values()) == {0}
    assert s.socket(3).queue_delay.n == 0 and s.socket(3).verdicts == d["verdicts"]
