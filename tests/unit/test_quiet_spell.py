"""A quiet spell does not hold verdicts: the live loop tells the analysis how far its sources
were drained (Correlator.advance), and the reads that waited for a later record are decided,
as they would be by a record at that time. Before, the last reads before a pause on the watched
sockets waited for the next traffic (a long-running agent: indefinitely)."""

from otelwater.correlate import Correlator, CorrelatorConfig
from otelwater.pipeline import Analysis, Pipeline
from otelwater.export.sink import MemorySink

from tests.unit.test_correlate import MS, S, read, snap


def test_advance_decides_what_a_record_at_that_time_would():
    by_record = Correlator(CorrelatorConfig(lateness_ns=S, loss_span_ns=S))
    by_clock = Correlator(CorrelatorConfig(lateness_ns=S, loss_span_ns=S))
    r = read(0, 2 * MS, parked=True, arrival=MS)
    assert by_record.feed([r]) == [] and by_clock.feed([r]) == []
    assert by_clock.advance(S + 7 * MS) == []            # watermark 7 ms = end + window: not yet
    (v,) = by_clock.advance(S + 7 * MS + 1)
    (w,) = by_record.feed([snap(S + 7 * MS + 1)])
    assert v.read is r and v.verdict == w.verdict and v.evidence == w.evidence
    assert by_clock.advance(S) == []                     # never backwards
    assert by_clock.stats()["pending_reads"] == 0


def test_a_later_record_within_lateness_still_joins_after_an_advance():
    c = Correlator(CorrelatorConfig(lateness_ns=S, loss_span_ns=S))
    c.feed([read(10 * S, 10 * S + 2 * MS, parked=True, arrival=10 * S + MS)])
    c.advance(10 * S + 500 * MS)                         # watermark 9.5 s: the read still waits
    assert c.stats()["pending_reads"] == 1
    late = snap(10 * S + 3 * MS)                         # evidence within the read's window
    c.feed([late])
    (v,) = c.advance(11 * S + 10 * MS)
    assert late in v.evidence


def test_the_pipeline_emits_the_verdicts_an_advance_decides():
    sink = MemorySink(kinds=("verdict",))
    with Pipeline(analysis=Analysis(), sinks=[sink]) as p:
        p.feed([read(0, 2 * MS, parked=True, arrival=MS)])
        assert sink.records == []
        p.advance(10 * S)
        assert [v.read.ts_start_ns for v in sink.records] == [0]
