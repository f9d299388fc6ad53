"""The correlator: the streaming ±window join, the verdict rules, summaries, bounds."""

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otelwater.correlate import Correlator, CorrelatorConfig, LogSketch, classify
from otelwater.errors import UsageError
from otelwater.events.model import LostEvents, ReadRecord, WaterSnapshot

MS = 1_000_000
S = 1_000 * MS


def snap(ts, key=1, volume=0, level=0, drops=0):
    return WaterSnapshot(ts, key, 1, "svc", 1, 1, "::1", 80, "::1", 5000, level, volume, 0,
                         1 << 20, 0, drops, 0, "", 0, 0, "arrival", "ESTABLISHED", 9)


def read(start, end, key=1, *, parked=None, arrival=None, qd=None, pid=7, goid=1, role="",
         send=None, prev=None, returned=10):
    return ReadRecord(start, end, pid, pid, goid, 3, key, 4096, returned, ("main.handle",),
                      "tracepoint", "svc", parked, arrival, qd, role=role, ts_send_ns=send,
                      ts_prev_arrival_ns=prev)


def run(records, config=None, batch=None, **kw):
    c = Correlator(config or CorrelatorConfig(), **kw)
    out = []
    records = list(records)
    step = batch or len(records) or 1
    for i in range(0, len(records), step):
        out += c.feed(records[i:i + step])
    out += c.finish()
    return out, c


def cfg(**kw):
    return CorrelatorConfig(**kw)


# -- the join ---------------------------------------------------------------------------------

def test_window_edges_are_inclusive_and_one_ns_beyond_is_out():
    start, end, w = 100 * MS, 200 * MS, 5 * MS
    inside = [start - w, start + w, end - w, end + w]
    outside = [start - w - 1, start + w + 1, end - w - 1, end + w + 1]
    recs = sorted([snap(t) for t in inside + outside], key=lambda s: s.ts_ns)
    recs.append(read(start, end, parked=True, arrival=start + MS))
    (v,), _ = run(recs, cfg(max_evidence=100))
    assert [s.ts_ns for s in v.evidence] == inside
    assert v.evidence_total == 4 and v.evidence_complete


def test_other_sockets_never_join():
    (v,), _ = run([snap(10 * MS, key=2), snap(10 * MS, key=1),
                   read(9 * MS, 11 * MS, key=1, parked=True, arrival=10 * MS)])
    assert [s.sock_key for s in v.evidence] == [1]


def test_evidence_keeps_the_nearest_in_time_order():
    recs = [snap(t * MS) for t in range(90, 111)] + [read(100 * MS, 101 * MS, parked=True,
                                                          arrival=100 * MS)]
    (v,), _ = run(recs, cfg(max_evidence=3))
    assert [s.ts_ns // MS for s in v.evidence] == [99, 100, 101]
    assert v.evidence_total == 12      # 95..106 lie within 5 ms of 100 or 101


def test_out_of_order_within_lateness_gives_the_same_verdicts():
    rng = random.Random(3)
    recs = [snap(t * MS // 3, key=1 + t % 3) for t in range(3000)]
    recs += [read(s * MS, s * MS + 2 * MS, key=1 + s % 3, parked=True, arrival=s * MS + MS)
             for s in range(0, 990, 7)]
    recs.sort(key=lambda r: getattr(r, "ts_ns", getattr(r, "ts_end_ns", 0)))
    ordered, _ = run(recs)
    shuffled = recs[:]
    # reorder inside blocks of 50 records (far less than the 1.2 s lateness)
    for i in range(0, len(shuffled), 50):
        block = shuffled[i:i + 50]
        rng.shuffle(block)
        shuffled[i:i + 50] = block
    jumbled, c = run(shuffled, batch=37)
    assert sorted(map(_sig, ordered), key=str) == sorted(map(_sig, jumbled), key=str)
    assert len(ordered) == 142 and c.stats()["late_snapshots"] == 0
    assert all(v.evidence_complete and v.evidence for v in jumbled)


def _sig(v):
    return (v.read, v.verdict, tuple(s.ts_ns for s in v.evidence), v.evidence_total)


def test_late_records_are_counted_and_a_late_slow_read_still_gets_a_verdict():
    c = Correlator(cfg(lateness_ns=S, loss_span_ns=S))
    assert c.feed([snap(10 * S)]) == []
    assert c.feed([snap(5 * S)]) == []                   # older than the 9 s watermark
    (v,) = c.feed([read(5 * S, 5 * S + 2 * MS, parked=True, arrival=5 * S + MS)])
    c.feed([LostEvents(4 * S, "water", 3)])
    st_ = c.stats()
    assert (st_["late_snapshots"], st_["late_reads"], st_["late_lost"]) == (1, 1, 1)
    assert v.verdict == "runtime-starved" and not v.evidence_complete and v.evidence == ()
    assert c.finish() == []
    assert c.summaries.sockets[1].snapshots == 2        # peak water still counts it


def test_reads_are_decided_once_the_watermark_passes_end_plus_window():
    c = Correlator(cfg(lateness_ns=S, loss_span_ns=S))
    r = read(0, 2 * MS, parked=True, arrival=MS)
    assert c.feed([r]) == []
    assert c.feed([snap(S + 7 * MS)]) == []              # watermark 7 ms = end + window
    (v,) = c.feed([snap(S + 7 * MS + 1)])
    assert v.read is r and c.stats()["pending_reads"] == 0


def test_fast_reads_get_no_verdict_but_count_in_summaries():
    out, c = run([read(0, MS - 1, parked=True, arrival=10), read(0, 10, parked=False, qd=5)])
    assert out == []
    assert c.summaries.readers[(7, 1)].reads == 2 and c.summaries.readers[(7, 1)].slow_reads == 0


# -- bounds ----------------------------------------------------------------------------------

def test_socket_count_is_capped_least_recently_used_first():
    c = Correlator(cfg(max_sockets=10))
    c.feed([snap(MS * i, key=100 + i) for i in range(100)])
    st_ = c.stats()
    assert st_["sockets_held"] == 10 and st_["sockets_evicted"] == 90
    assert st_["snapshots_evicted"] == 90 and st_["snapshots_held"] == 10
    assert set(c._sockets) == set(range(190, 200))
    # a read on an evicted socket: verdict stands, its evidence is marked incomplete
    (v,) = c.feed([read(5 * MS, 7 * MS, key=105, parked=True, arrival=6 * MS)]) + c.finish()
    assert v.verdict == "runtime-starved" and not v.evidence_complete


def test_summaries_are_capped_too():
    _, c = run([read(i * MS, i * MS + 2 * MS, key=100 + i, pid=i, parked=True, arrival=i * MS)
                for i in range(20)], cfg(max_sockets=5, max_summaries=5))
    st_ = c.stats()
    assert set(c.summaries.sockets) == set(range(115, 120)) and st_["summaries_evicted"] >= 15
    assert len(c.summaries.readers) == 5 and st_["readers_evicted"] == 15


def test_snapshots_are_capped_per_socket_and_overall():
    c = Correlator(cfg(max_snapshots_per_socket=50, max_snapshots=120))
    c.feed([snap(i * 1000, key=1 + i % 4) for i in range(1000)])
    st_ = c.stats()
    assert st_["snapshots_held"] <= 120
    assert st_["snapshots_capped"] > 0 and st_["sockets_evicted"] > 0
    assert all(len(s.ts) - s.head <= 50 for s in c._sockets.values())


def test_a_long_stream_holds_only_the_recent_window():
    c = Correlator(cfg(lateness_ns=100 * MS, history_ns=20 * MS, loss_span_ns=100 * MS))
    held = []
    for second in range(20):
        c.feed([snap(second * S + i * MS, key=1 + i % 50) for i in range(1000)])
        held.append(c.stats()["snapshots_held"])
    # what the window needs (~120 ms of 1,000/s) plus what 50 sockets drop lazily (32 each)
    assert max(held) <= 120 + 50 * 32 and c.stats()["snapshots_pruned"] > 18_000
    assert c.stats()["sockets_held"] <= 50


def test_bad_config_is_one_usage_error():
    with pytest.raises(UsageError, match="window_ns is negative"):
        CorrelatorConfig(window_ns=-1)
    with pytest.raises(UsageError, match="max_summaries"):
        CorrelatorConfig(max_summaries=10, max_sockets=11)
    with pytest.raises(UsageError, match="loss_span_ns"):
        CorrelatorConfig(lateness_ns=0)


# -- verdict rules ---------------------------------------------------------------------------

def figures_of(r, **kw):
    args = dict(slow_ns=MS, run_ns=MS, slack_ns=0)
    args.update(kw)
    return classify(r, **args)


def verdict_of(r, **kw):
    """(verdict, reason, wait_peer, wait_run): the figures that do not depend on the role."""
    return figures_of(r, **kw)[:4]


def test_parked_and_arrival_soon_before_return_is_peer_starved():
    v, why, peer, run_ = verdict_of(read(0, 10 * MS, parked=True, arrival=9_500_000))
    assert (v, peer, run_) == ("peer-starved", 9_500_000, 500_000)
    assert "waiting for the peer" in why


def test_parked_and_arrival_long_before_return_is_runtime_starved():
    assert verdict_of(read(0, 10 * MS, parked=True, arrival=2 * MS))[0::2] == (
        "runtime-starved", 2 * MS)
    # exactly the run threshold counts
    assert verdict_of(read(0, 10 * MS, parked=True, arrival=9 * MS))[0] == "runtime-starved"
    assert verdict_of(read(0, 10 * MS, parked=True, arrival=2 * MS), run_ns=9 * MS)[0] == (
        "peer-starved")


def test_arrival_at_the_edges():
    assert verdict_of(read(0, 10 * MS, parked=True, arrival=0))[0::2] == ("runtime-starved", 0)
    assert verdict_of(read(0, 10 * MS, parked=True, arrival=10 * MS))[0:4:2] == (
        "peer-starved", 10 * MS)


def test_arrival_outside_the_read_is_unknown_unless_within_the_slack():
    before = read(1000, 10 * MS, parked=True, arrival=999)
    after = read(0, 10 * MS, parked=True, arrival=10 * MS + 1)
    assert verdict_of(before)[0] == "unknown" and "before the read began" in verdict_of(before)[1]
    assert verdict_of(after)[0] == "unknown" and "after the read returned" in verdict_of(after)[1]
    v, why, peer, run_ = verdict_of(before, slack_ns=1)
    assert (v, peer, run_) == ("runtime-starved", 0, 10 * MS - 1000) and "clamped by 1 ns" in why
    v, why, peer, run_ = verdict_of(after, slack_ns=1)
    assert (v, peer, run_) == ("peer-starved", 10 * MS, 0)


def test_bytes_that_stood_in_the_queue_are_consumer_lagging():
    v, why, peer, run_ = verdict_of(read(0, 50_000, parked=False, qd=3 * MS))
    assert (v, peer, run_) == ("consumer-lagging", None, None) and "3.000 ms" in why


@pytest.mark.parametrize("r, words", [
    (read(0, 5 * MS, parked=True, returned=-11), "no data arrived"),
    (read(0, 5 * MS, parked=True), "returned 10 bytes, but the arrival that woke it was not "
                                   "stamped"),
    (read(0, 5 * MS, parked=True, returned=0), "until the peer closed the connection"),
    (read(0, 5 * MS, parked=False), "no queue-delay stamp"),
    (read(0, 5 * MS, parked=False, qd=10), "inside the read"),
    (read(0, 5 * MS), "no park or queue-delay stamp"),
    (read(0, 5, qd=5 * MS), "cannot be told apart"),
    (read(5 * MS, 0, parked=True, arrival=MS), "broken record"),
])
def test_missing_or_contradictory_evidence_is_unknown_with_why(r, words):
    v, why, peer, run_ = verdict_of(r)
    assert v == "unknown" and words in why and peer is None and run_ is None


def test_a_read_that_began_before_attach_is_unknown():
    (v,), _ = run([read(0, 10 * MS, parked=True, arrival=5 * MS)], start_ns=1)
    assert v.verdict == "unknown" and "before otelwater attached" in v.reason


def test_a_delivered_read_keeps_its_verdict_whatever_was_lost_around_it():
    lost_at = 3 * S
    r = read(lost_at - 500 * MS, lost_at - 400 * MS, parked=True, arrival=lost_at - 450 * MS)
    (v,), _ = run([r, LostEvents(lost_at, "reads", 4)])
    assert v.verdict == "runtime-starved" and v.evidence_complete   # a lost read held no
    #                                                                 evidence of this one
    (v,), _ = run([r, LostEvents(lost_at - 450 * MS, "reads", 4, lost_at - 460 * MS, 4)])
    assert v.verdict == "runtime-starved"


def test_lost_read_records_make_it_unknown_when_asked():
    lost_at = 3 * S
    overlapping = read(lost_at - 500 * MS, lost_at - 400 * MS, parked=True,
                       arrival=lost_at - 450 * MS)
    earlier = read(lost_at - 2 * S, lost_at - 2 * S + 5 * MS, parked=True, arrival=lost_at - 2 * S)
    voiding = cfg(unknown_on_lost=("reads",))
    out, c = run([earlier, overlapping, LostEvents(lost_at, "reads", 4)], voiding)
    by_start = {v.read.ts_start_ns: v for v in out}
    v = by_start[overlapping.ts_start_ns]
    assert v.verdict == "unknown" and "4 Go read records were lost" in v.reason
    assert by_start[earlier.ts_start_ns].verdict == "runtime-starved"
    # a report covers only the time since the previous report of that probe
    after = read(lost_at + 10 * MS, lost_at + 20 * MS, parked=True, arrival=lost_at + 19_500_000)
    out, _ = run([overlapping, LostEvents(lost_at, "reads", 4), after,
                  LostEvents(lost_at + 300 * MS, "reads", 4),
                  LostEvents(lost_at + 600 * MS, "reads", 9)], voiding)
    assert [v.verdict for v in out] == ["unknown", "peer-starved"]


def test_lost_water_records_only_mark_evidence_incomplete():
    r = read(S, S + 10 * MS, parked=True, arrival=S + 9_500_000)
    (v,), _ = run([r, LostEvents(S + 500 * MS, "water", 1)])
    assert v.verdict == "peer-starved" and not v.evidence_complete


def test_verdict_json():
    (v,), _ = run([snap(MS, volume=900), read(0, 2 * MS, parked=False, qd=2 * MS)])
    d = json.loads(json.dumps(v.to_json()))
    assert d["type"] == "verdict" and d["verdict"] == "consumer-lagging"
    assert (d["wait_peer_ns"], d["wait_run_ns"], d["queue_delay_ns"]) == (None, None, 2 * MS)
    assert d["sock_key"] == "0000000000000001" and d["evidence"][0]["volume"] == 900
    assert d["duration_ns"] == 2 * MS and d["evidence_complete"] is True


# -- summaries -------------------------------------------------------------------------------

def test_socket_summary_peak_water_drops_and_dominant_verdict():
    recs = [snap(0, volume=10, level=1, drops=5), snap(MS, volume=900, level=4, drops=7),
            snap(2 * MS, volume=30, level=1, drops=9)]
    recs += [read(i * 10 * MS, i * 10 * MS + 5 * MS, parked=False, qd=2 * MS) for i in range(3)]
    recs += [read(100 * MS, 105 * MS, parked=True, arrival=104_500_000)]
    out, c = run(recs)
    d = c.summaries.sockets[1].to_json()
    assert (d["peak_volume"], d["peak_level"], d["drops"]) == (900, 4, 4)
    assert d["verdicts"]["consumer-lagging"] == 3 and d["verdict"] == "consumer-lagging"
    assert d["queue_delay_ns"]["p50"] == 2 * MS and d["wait_run_ns"]["count"] == 1
    out, c = run(recs[3:5] + recs[-1:] + [read(200 * MS, 205 * MS, parked=True,
                                                arrival=201 * MS)])
    assert c.summaries.sockets[1].to_json()["verdict"] == "mixed"   # 2 of 4 is under 60%
    assert c.summaries.readers[(7, 1)].to_json()["slow_reads"] == 4


@given(st.lists(st.integers(0, 1 << 40), min_size=1, max_size=300),
       st.sampled_from([0.5, 0.9, 0.99, 1.0]))
def test_sketch_percentiles_are_within_one_sixteenth_above(values, q):
    sk = LogSketch()
    for v in values:
        sk.add(v)
    exact = sorted(values)[max(1, -(-len(values) * int(q * 100) // 100)) - 1]
    got = sk.quantile(q)
    assert exact <= got <= max(exact + exact / 16, exact)


# -- the streaming join equals the brute-force join ------------------------------------------

W, LATE, HIST = 5, 40, 60     # tiny units: window, lateness, history


def brute_force(snaps, reads):
    return {r: sorted(s.ts_ns for s in snaps if s.sock_key == r.sock_key and (
        abs(s.ts_ns - r.ts_start_ns) <= W or abs(s.ts_ns - r.ts_end_ns) <= W)) for r in reads}


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_streaming_join_equals_brute_force(data):
    snaps = [snap(t, key=k) for t, k in data.draw(st.lists(
        st.tuples(st.integers(0, 400), st.integers(1, 3)), max_size=120))]
    reads = []
    for i, (start, dur, k) in enumerate(data.draw(st.lists(st.tuples(
            st.integers(0, 400), st.integers(0, HIST - W), st.integers(1, 3)), max_size=30))):
        # pid makes each read distinct; duration >= slow_ns (0) so every read gets a verdict
        reads.append(read(start, start + dur, key=k, pid=i, parked=True, arrival=start))
    # each record arrives somewhere within the lateness after its own time
    delays = data.draw(st.lists(st.integers(0, LATE - 1), min_size=len(snaps) + len(reads),
                                max_size=len(snaps) + len(reads)))
    when = [(getattr(r, "ts_ns", None) if isinstance(r, WaterSnapshot) else r.ts_end_ns) + d
            for r, d in zip(snaps + reads, delays)]
    order = [r for _, _, r in sorted(zip(when, range(len(when)), snaps + reads))]
    batch = data.draw(st.integers(1, 20))
    config = CorrelatorConfig(window_ns=W, slow_ns=0, lateness_ns=LATE, history_ns=HIST,
                              loss_span_ns=LATE, max_evidence=1000)
    out, c = run(order, config, batch=batch)
    got = {v.read: [s.ts_ns for s in v.evidence] for v in out}
    assert got == brute_force(snaps, reads)
    assert all(v.evidence_complete for v in out)
    st_ = c.stats()
    assert st_["late_snapshots"] == st_["late_reads"] == 0 and st_["pending_reads"] == 0


# -- request/response: idle waits -------------------------------------------------------------

def test_a_server_waiting_for_the_next_request_after_its_response_is_idle():
    # accepted: request arrived at 1 ms, our response went out at 3 ms, the read parked at 4 ms
    r = read(4 * MS, 104 * MS, parked=True, arrival=103_900_000, role="accepted", send=3 * MS,
             prev=MS)
    v, why, peer, run_, idle = figures_of(r)
    assert (v, peer, run_, idle) == ("idle", 0, 100_000, 99_900_000) and "owed nothing" in why


def test_a_background_read_across_the_handler_and_the_client_think_time_is_idle():
    # net/http's background read: parked right after the request (prev arrival 1 ms), the
    # handler answered during the park (send 60 ms), the next request came at 160 ms
    r = read(2 * MS, 160_100_000, parked=True, arrival=160 * MS, role="accepted", send=60 * MS,
             prev=MS)
    assert figures_of(r)[0] == "idle"


def test_a_server_waiting_for_the_rest_of_a_request_waits_for_the_peer():
    # accepted, mid-request: the last arrival (part of the request) came after our last send
    r = read(10 * MS, 60 * MS, parked=True, arrival=59_900_000, role="accepted", send=2 * MS,
             prev=9 * MS)
    v, _, peer, run_, idle = figures_of(r)
    assert (v, peer, idle) == ("peer-starved", 49_900_000, 0)


def test_a_fresh_accepted_connection_waiting_for_its_first_request_is_idle():
    r = read(0, 30 * MS, parked=True, arrival=29_900_000, role="accepted")
    assert figures_of(r)[0] == "idle"


def test_a_client_read_counts_the_peer_wait_from_its_request():
    # dialed: readLoop parked at 0, the request went out at 100 ms, the answer came 50 ms later
    r = read(0, 150_200_000, parked=True, arrival=150 * MS, role="dialed", send=100 * MS, prev=0)
    v, why, peer, run_, idle = figures_of(r)
    assert (v, peer, run_, idle) == ("peer-starved", 50 * MS, 200_000, 100 * MS)
    assert "from our send" in why
    # a request sent before the read began: all of it is the peer's
    r = read(10 * MS, 60 * MS, parked=True, arrival=59_900_000, role="dialed", send=5 * MS)
    assert figures_of(r)[:3] == ("peer-starved", figures_of(r)[1], 49_900_000)
    # the pool's idle connection, its request sent late and answered at once
    r = read(0, 100_400_000, parked=True, arrival=100_300_000, role="dialed", send=100 * MS)
    assert figures_of(r)[0] == "idle"


def test_an_idle_eof_is_idle_on_an_accepted_socket_and_unknown_on_a_dialed_one():
    eof = dict(parked=True, returned=0, send=5 * MS, prev=MS)
    assert figures_of(read(10 * MS, 90 * MS, role="accepted", **eof))[::4] == ("idle", 80 * MS)
    assert figures_of(read(10 * MS, 90 * MS, role="dialed", **eof))[0] == "unknown"


def test_runtime_starvation_wins_over_idle():
    r = read(4 * MS, 104 * MS, parked=True, arrival=50 * MS, role="accepted", send=3 * MS,
             prev=MS)
    assert figures_of(r)[0] == "runtime-starved"


@settings(max_examples=400, deadline=None)
@given(start=st.integers(0, 10**9), dur=st.integers(0, 10**9), arr=st.integers(-10, 10**9 + 10),
       send=st.one_of(st.none(), st.integers(0, 2 * 10**9)),
       prev=st.one_of(st.none(), st.integers(0, 2 * 10**9)),
       role=st.sampled_from(["", "dialed", "accepted"]))
def test_the_waits_add_up_and_match_a_plain_reading_of_the_rule(start, dur, arr, send, prev, role):
    end = start + dur
    arrival = start + arr if 0 <= arr <= dur else None
    if arrival is not None and send is not None and role == "dialed" and send > arrival:
        send = arrival      # the stamp is our last send *before* the arrival: never after it
    r = read(start, end, parked=True, arrival=arrival, role=role, send=send, prev=prev)
    v, _, peer, run_, idle = figures_of(r)
    s, p = send or 0, prev or 0
    owed_nothing = role == "accepted" and (s > start or s >= p)
    if arrival is None:
        assert v == ("idle" if owed_nothing else "unknown")
        return
    assert idle + peer + run_ == dur
    if owed_nothing:
        assert peer == 0 and idle == arrival - start
    elif role == "dialed" and s > start:
        assert idle == s - start and peer == arrival - s
    else:
        assert idle == 0 and peer == arrival - start
    want = ("runtime-starved" if run_ >= MS else "peer-starved" if peer >= MS else
            "idle" if idle > peer else "peer-starved")
    assert v == want


def test_without_summaries_the_verdicts_are_the_same_and_nothing_is_kept():
    # Given the same records through a correlator that keeps summaries and one that does not
    import dataclasses as dc

    recs = ([snap(0, key=k, volume=500) for k in (1, 2, 3)]
            + [read(1 * MS, 12 * MS, key=k, parked=True, arrival=2 * MS, goid=k)
               for k in (1, 2, 3)]
            + [dc.replace(snap(20 * MS, key=k), trigger="close") for k in (1, 2, 3)])
    kept_v, kept = run(recs)
    bare_v, bare = run(recs, cfg(summaries=False))
    # Then the verdicts are equal, and only the first holds summaries
    assert kept_v == bare_v and len(kept_v) == 3
    assert len(kept.summaries.sockets) == 3 and len(kept.summaries.readers) == 3
    assert not bare.summaries.sockets and not bare.summaries.readers
