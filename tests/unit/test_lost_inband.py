"""Losses located in-band: the record a CPU delivers after a ring-buffer loss says how many
were lost and when (the first and the last), so the correlator marks only the reads that
overlap the loss; the sweep adds the exact total and what no delivered record reported; older
recordings keep the 1.1 s rule."""

import json

from otelwater.correlate import Correlator, CorrelatorConfig
from otelwater.events.model import LostEvents, ReadRecord
from otelwater.events.recording import lost_from_json
from otelwater.probes.kernel import LossLedger

MS = 1_000_000
S = 1_000 * MS


def read(start, end, key=1, goid=1):
    """A slow read that parked and was woken just before it returned: peer-starved when
    nothing overlapping it was lost."""
    return ReadRecord(start, end, 7, 7, goid, 3, key, 4096, 10, ("main.handle",),
                      "tracepoint", "svc", True, end - 100_000, None)


# A delivered read keeps its verdict whatever was lost (test at the end). Where losses lie still
# matters to the reads' evidence, and to users who ask for the old rule (unknown_on_lost): the
# location tests below use that rule, which shows exactly which reads a span reaches.
VOIDING = CorrelatorConfig(unknown_on_lost=("reads",))


def verdicts(records, config=None):
    c = Correlator(config or VOIDING)
    out = c.feed(records) + c.finish()
    return {v.read.ts_start_ns: v.verdict for v in out}, {v.read.ts_start_ns: v for v in out}, c


# -- the correlator --------------------------------------------------------------------------

def test_a_located_loss_between_two_reads_voids_only_the_read_it_overlaps():
    # Given three reads 50 ms apart, and 3 read records lost between 140 and 145 ms, reported
    # by the record delivered at 160 ms
    a, b, c = read(100 * MS, 110 * MS, goid=1), read(130 * MS, 150 * MS, goid=2), \
        read(200 * MS, 210 * MS, goid=3)
    lost = LostEvents(160 * MS, "reads", 3, since_ns=140 * MS, count=3, until_ns=145 * MS)
    # When they are correlated
    got, full, _ = verdicts([a, b, lost, c])
    # Then only the read overlapping the loss is unknown, and it says why
    assert got == {a.ts_start_ns: "peer-starved", b.ts_start_ns: "unknown",
                   c.ts_start_ns: "peer-starved"}
    why = full[b.ts_start_ns].reason
    assert "3 Go read records were lost" in why and "overlapping this read" in why


def test_span_edges_are_inclusive_and_one_ns_outside_is_clear():
    since, until = 100 * MS, 120 * MS
    touching = [read(since - 10 * MS, since, goid=1), read(until, until + 10 * MS, goid=2)]
    clear = [read(since - 10 * MS - 1, since - 1, goid=3), read(until + 1, until + 10 * MS, goid=4)]
    got, _, _ = verdicts(sorted(touching + clear, key=lambda r: r.ts_end_ns)
                         + [LostEvents(until + 30 * MS, "reads", 1, since, 1, until)])
    assert [got[r.ts_start_ns] for r in touching] == ["unknown"] * 2
    assert [got[r.ts_start_ns] for r in clear] == ["peer-starved"] * 2


def test_without_until_the_span_ends_at_the_reporting_record():
    r = read(150 * MS, 158 * MS)
    got, _, _ = verdicts([r, LostEvents(160 * MS, "reads", 1, since_ns=140 * MS, count=1)])
    assert got[r.ts_start_ns] == "unknown"


def test_old_style_lost_records_keep_the_1_1_s_rule():
    # Given the same reads and a lost record without since_ns (an older recording: the sweep
    # noticed the total move at 160 ms)
    a, b, c = read(100 * MS, 110 * MS, goid=1), read(130 * MS, 150 * MS, goid=2), \
        read(200 * MS, 210 * MS, goid=3)
    got, full, _ = verdicts([a, b, LostEvents(160 * MS, "reads", 3), c])
    # Then every read overlapping the 1.1 s before it is unknown, later ones are not
    assert got == {a.ts_start_ns: "unknown", b.ts_start_ns: "unknown",
                   c.ts_start_ns: "peer-starved"}
    assert "within 1.10 s" in full[a.ts_start_ns].reason


def test_a_read_delivered_after_a_loss_keeps_its_verdict_unless_it_overlaps_it():
    # Given 2 records lost at 300-305 ms on a CPU, reported by the read that CPU delivered next
    # (it ran 290-320 ms, so it overlaps the loss), and reads that began after the last loss
    carrier = read(290 * MS, 320 * MS, goid=1)
    lost = LostEvents(carrier.ts_end_ns, "reads", 2, since_ns=300 * MS, count=2,
                      until_ns=305 * MS)
    after = [read(306 * MS, 318 * MS, goid=2), read(321 * MS, 330 * MS, goid=3),
             read(400 * MS, 450 * MS, goid=4)]
    got, _, c = verdicts([after[0], lost, carrier, *after[1:]])
    assert got[carrier.ts_start_ns] == "unknown"
    assert [got[r.ts_start_ns] for r in after] == ["peer-starved"] * 3
    assert c.stats()["lost_by_probe"] == {"reads": 2}


def test_a_sweep_that_only_moves_the_total_voids_nothing():
    # Given a loss already reported in-band, then the sweep's record: the total, count 0
    b, d = read(142 * MS, 170 * MS, goid=2), read(900 * MS, 990 * MS, goid=4)
    records = [LostEvents(160 * MS, "reads", 3, 140 * MS, 3, 145 * MS), b, d,
               LostEvents(1000 * MS, "reads", 3, 1000 * MS, 0, 1000 * MS)]
    got, _, c = verdicts(records)
    assert got == {b.ts_start_ns: "unknown", d.ts_start_ns: "peer-starved"}
    assert c.stats()["lost_by_probe"] == {"reads": 3}


def test_a_sweep_locates_losses_no_record_reported():
    # Given losses still pending on a CPU at the sweep (it never emitted again)
    early, inside, late = (read(100 * MS, 200 * MS, goid=1), read(600 * MS, 700 * MS, goid=2),
                           read(850 * MS, 950 * MS, goid=3))
    got, _, _ = verdicts([early, inside, late,
                          LostEvents(1000 * MS, "reads", 5, 650 * MS, 5, 800 * MS)])
    assert got == {early.ts_start_ns: "peer-starved", inside.ts_start_ns: "unknown",
                   late.ts_start_ns: "peer-starved"}


def test_a_located_span_wider_than_the_old_rule_still_reaches_its_reads():
    # Given a CPU that lost records from 0.5 s to 3.4 s and delivered its next one at 3.5 s
    r = read(1 * S, 1 * S + 10 * MS)
    got, _, _ = verdicts([r, LostEvents(3500 * MS, "reads", 9, 500 * MS, 9, 3400 * MS)],
                         CorrelatorConfig(lateness_ns=5 * S, unknown_on_lost=("reads",)))
    assert got[r.ts_start_ns] == "unknown"


def test_a_located_span_reaches_the_reads_its_own_record_decides():
    # The span is held before the watermark moves: with the default lateness (1.2 s) the
    # record at 3.5 s decides the read at 1 s, and that read already sees the loss
    r = read(1 * S, 1 * S + 10 * MS)
    c = Correlator(VOIDING)
    assert c.feed([r]) == []
    (v,) = c.feed([LostEvents(3500 * MS, "reads", 1, 500 * MS, 1, 1005 * MS)])
    assert v.verdict == "unknown"


def test_by_default_a_loss_voids_no_delivered_read():
    a, b = read(100 * MS, 110 * MS, goid=1), read(130 * MS, 150 * MS, goid=2)
    lost = LostEvents(160 * MS, "reads", 3, since_ns=140 * MS, count=3, until_ns=145 * MS)
    old = LostEvents(170 * MS, "reads", 9)          # an older recording's unlocated loss
    got, full, _ = verdicts([a, b, lost, old], CorrelatorConfig())
    assert got == {100 * MS: "peer-starved", 130 * MS: "peer-starved"}
    # lost Go read records held no snapshot: the evidence of the others is whole
    assert all(v.evidence_complete for v in full.values())


def test_located_water_losses_only_mark_evidence_incomplete():
    r, s = read(100 * MS, 110 * MS, goid=1), read(300 * MS, 310 * MS, goid=2)
    got, full, _ = verdicts([r, LostEvents(105 * MS, "water", 1, 104 * MS, 1, 104 * MS), s])
    assert got == {r.ts_start_ns: "peer-starved", s.ts_start_ns: "peer-starved"}
    assert not full[r.ts_start_ns].evidence_complete and full[s.ts_start_ns].evidence_complete


# -- the record ------------------------------------------------------------------------------

def test_lost_json_carries_the_location_and_old_files_still_read():
    new = LostEvents(5 * MS, "reads", 9, since_ns=3 * MS, count=2, until_ns=4 * MS)
    d = json.loads(json.dumps(new.to_json()))
    assert d == {"type": "lost", "ts_ns": 5 * MS, "probe": "reads", "lost_total": 9,
                 "since_ns": 3 * MS, "count": 2, "until_ns": 4 * MS}
    assert lost_from_json(d) == new
    old = lost_from_json({"type": "lost", "ts_ns": 5, "probe": "water", "lost_total": 4})
    assert old == LostEvents(5, "water", 4)
    assert (old.since_ns, old.count, old.until_ns) == (None, None, None)


# -- the probes' ledger ----------------------------------------------------------------------

def test_carried_losses_get_the_total_read_after_the_drain_never_decreasing():
    led = LossLedger("water")
    out = [led.carried(10 * MS, 2, 4 * MS, 6 * MS), "snapshot",
           led.carried(20 * MS, 1, 15 * MS, 15 * MS), "s2"]
    led.settle(out, [0, 2], 5)
    assert out[0] == LostEvents(10 * MS, "water", 5, 4 * MS, 2, 6 * MS)
    assert out[2] == LostEvents(20 * MS, "water", 5, 15 * MS, 1, 15 * MS)
    out = [led.carried(30 * MS, 1, 31 * MS, 31 * MS)]   # stamped after the record: clamped
    led.settle(out, [0], 3)                             # a total read lower: never goes back
    assert out[0] == LostEvents(30 * MS, "water", 5, 30 * MS, 1, 30 * MS)


def test_sweep_reports_pending_losses_once_and_only_new_ones_later():
    led = LossLedger("reads")
    # nothing lost: no record
    assert led.sweep(1 * S, 0, {(0, 0): (0, 0, 0), (0, 1): (0, 0, 0)}) is None
    # CPU 1 lost 3 records from 0.5 s to 0.6 s and has not delivered one since
    r = led.sweep(2 * S, 3, {(0, 0): (0, 0, 0), (0, 1): (3, 500 * MS, 600 * MS)})
    assert r == LostEvents(2 * S, "reads", 3, 500 * MS, 3, 600 * MS)
    # the same 3 still pending: said already, nothing moved
    assert led.sweep(3 * S, 3, {(0, 1): (3, 500 * MS, 600 * MS)}) is None
    # 2 more in the same run: located after the last sweep that saw the run
    r = led.sweep(4 * S, 5, {(0, 1): (5, 500 * MS, 3500 * MS)})
    assert r == LostEvents(4 * S, "reads", 5, 3 * S, 2, 3500 * MS)
    # carried in-band meanwhile (a poll settled a total of 7), then a new run on CPU 0
    led.settle([led.carried(4500 * MS, 5, 500 * MS, 3500 * MS)], [0], 7)
    r = led.sweep(5 * S, 9, {(0, 0): (2, 4800 * MS, 4900 * MS), (0, 1): (0, 500 * MS, 0)})
    assert r == LostEvents(5 * S, "reads", 9, 4800 * MS, 2, 4900 * MS)
    # everything carried in-band already, the total moved: the total only, located nowhere
    r = led.sweep(6 * S, 12, {(0, 0): (0, 0, 0)})
    assert r == LostEvents(6 * S, "reads", 12, 6 * S, 0, 6 * S)
    assert led.sweep(7 * S, 12, {}) is None


class _FloodedProbe:
    """A detached probe whose ring buffer still holds `left` records (1 ms apart from 1 s):
    poll() decodes 100 at a time; count_rest() empties the ring without decoding."""

    def __init__(self, left: int, kernel_lost: int = 7):
        self.left, self.next_ts = left, 1_000_000_000
        self.backlogged = False
        self._ledger = LossLedger("water")
        self.kernel_lost = kernel_lost
        self.ring = self

    def _take(self, n):
        ts = [self.next_ts + i * 1_000_000 for i in range(min(n, self.left))]
        self.left -= len(ts)
        self.next_ts += len(ts) * 1_000_000
        return ts

    def count_rest(self, ts_offset):     # the ring buffer, counted only
        ts = self._take(self.left)
        return (len(ts), ts[0], ts[-1]) if ts else (0, 0, 0)

    def poll(self):
        got = self._take(100)
        self.backlogged = self.left > 0
        return [("snapshot", t) for t in got]

    def lost_total(self):
        return self.kernel_lost

    def lost_sweep(self, ts_ns):
        return self._ledger.sweep(ts_ns, self.kernel_lost, {})


def test_the_stop_drain_decodes_what_it_has_time_for_and_counts_the_rest_as_lost():
    from otelwater.probes.kernel import drain_at_stop

    p = _FloodedProbe(left=250)
    out = drain_at_stop(p, [p.ring], 0)              # time enough: everything decoded
    assert len([r for r in out if type(r) is tuple]) == 250
    assert [r for r in out if type(r) is LostEvents] == [
        LostEvents(out[-1].ts_ns, "water", 7, out[-1].ts_ns, 0, out[-1].ts_ns)]

    p = _FloodedProbe(left=10_000)
    out = drain_at_stop(p, [p.ring], 0, time_s=0)    # no time: one poll, the rest counted
    decoded = [r for r in out if type(r) is tuple]
    lost = [r for r in out if type(r) is LostEvents]
    assert len(decoded) == 100 and p.left == 0
    unread = lost[0]
    assert unread.count == 9_900 and unread.lost_total == 7 + 9_900
    assert unread.since_ns == 1_000_000_000 + 100 * 1_000_000      # the first one not decoded
    assert unread.until_ns == 1_000_000_000 + 9_999 * 1_000_000    # the last
    # the probe's totals from now on include them: nothing decreases
    assert p.lost_sweep(5 * 10**9) is None
    assert p._ledger.sweep(6 * 10**9, 8, {}).lost_total == 8 + 9_900
