"""One record-handling interface: every record kind handled or ignored by every sink (checked
when a class is defined), an unknown record type an error, and one Pipeline that wires raw
sinks, the analysis and sinks, counting a sink's failures instead of stopping the run."""

from __future__ import annotations

import importlib
import io
import json
import pkgutil

import pytest

import otelwater
from otelwater.config import Config
from otelwater.errors import RecordingError
from otelwater.events.alert import AlertTransition
from otelwater.events.model import LostEvents, Notice, ReadRecord, VerdictCounts, WaterSnapshot
from otelwater.events.recording import ProcessInfo
from otelwater.events.records import (KIND_NAMES, KINDS, RecordHandler, Summary, UnknownRecord,
                                      kind_of, record_ts)
from otelwater.events.verdict import Verdict
from otelwater.export.jsonl import JsonLinesSink
from otelwater.export.sink import MemorySink, RunInfo, Sink
from otelwater.pipeline import Analysis, Pipeline

MS = 1_000_000


def snap(ts, key=7, unread=0, trigger="arrival"):
    return WaterSnapshot(ts, key, 10, "svc", 10, 1, "127.0.0.1", 80, "127.0.0.1", 5000, 1,
                         unread + 300, unread, 65536, 0, 0, 0, "", 0, 0, trigger, "ESTABLISHED",
                         99)


def read(start, end, key=7, parked=True, arrival=None):
    return ReadRecord(start, end, 10, 10, 1, 5, key, 4096, 64, ("main.handle",), "tracepoint",
                      "svc", parked=parked, ts_arrival_ns=arrival)


def one_of_each() -> list:
    r = read(1 * MS, 3 * MS, arrival=2 * MS)
    return [snap(1 * MS), r, LostEvents(2 * MS, "water", 1), Notice(2 * MS, "water", "hi"),
            ProcessInfo(10, 2 * MS, "/bin/svc", "svc", ("svc",), "svc", None, 1),
            AlertTransition(2 * MS, 7, 10, "fill_ratio", "fired", "warn", 0.9, 0.8),
            Verdict(r, "peer-starved", "why", 1 * MS, 1 * MS, None),
            VerdictCounts(3 * MS, 10, "dialed", "peer-starved", 1, 1, 0, 2 * MS, MS, (0, 1),
                          (1,)),
            Summary({"type": "socket_summary"})]


class NotARecord:
    ts_ns = 0

    def to_json(self):
        return {"type": "nope"}


def test_every_kind_is_listed_once_and_one_of_each_covers_them():
    assert sorted(KINDS.values()) == sorted(set(KIND_NAMES))
    assert sorted(kind_of(r) for r in one_of_each()) == sorted(KIND_NAMES)


def test_a_handler_that_forgets_a_kind_fails_when_it_is_defined():
    with pytest.raises(TypeError, match=r"neither handles .* nor ignores .*verdict"):
        class Forgetful(RecordHandler):   # noqa: F841 - defining it is the test
            ignores = frozenset(set(KIND_NAMES) - {"verdict"})

    with pytest.raises(TypeError, match="both handles and ignores"):
        class Both(RecordHandler):        # noqa: F841
            ignores = frozenset(KIND_NAMES)

            def on_verdict(self, r):
                pass

    with pytest.raises(TypeError, match="not record kinds"):
        class Typo(RecordHandler):        # noqa: F841
            ignores = frozenset(KIND_NAMES) | {"verdicts"}


def test_dispatch_reaches_on_kind_and_an_unknown_type_is_an_error():
    seen = []

    class Taker(RecordHandler):
        ignores = frozenset(set(KIND_NAMES) - {"snapshot", "verdict"})

        def on_snapshot(self, r):
            seen.append(("snapshot", r.ts_ns))

        def on_verdict(self, r):
            seen.append(("verdict", r.verdict))

    Taker().handle(one_of_each())
    assert seen == [("snapshot", MS), ("verdict", "peer-starved")]
    with pytest.raises(UnknownRecord, match="NotARecord is not a record kind"):
        Taker().handle([NotARecord()])


def _sink_classes() -> list[type]:
    for m in pkgutil.walk_packages(otelwater.__path__, "otelwater."):
        if m.name.split(".")[1] in ("probes", "__main__"):
            continue              # BCC (no sinks there); the entry point runs the CLI
        importlib.import_module(m.name)
    out, todo = [], [Sink]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            todo.append(sub)
            if sub.__module__.startswith("otelwater."):
                out.append(sub)
    return out


def test_every_sink_of_the_package_handles_or_ignores_every_kind():
    classes = _sink_classes()
    names = {c.__name__ for c in classes}
    # the outputs the commands use are all sinks
    assert {"JsonLinesSink", "ViewSink", "RunStats", "RecordingSink", "Collection",
            "MemorySink"} <= names, names
    for cls in classes:
        assert set(cls._dispatch) == set(KINDS), cls


@pytest.mark.parametrize("sink", [JsonLinesSink(io.StringIO()), MemorySink()])
def test_sinks_that_write_whole_batches_refuse_an_unknown_type_too(sink):
    with pytest.raises(UnknownRecord):
        sink.write([snap(1), NotARecord()])


def test_json_lines_writes_every_kind_or_the_chosen_ones():
    out = io.StringIO()
    JsonLinesSink(out).write(one_of_each())
    types = [json.loads(line)["type"] for line in out.getvalue().splitlines()]
    assert types == ["snapshot", "read", "lost", "notice", "process", "alert", "verdict",
                     "counts", "socket_summary"]
    out = io.StringIO()
    JsonLinesSink(out, kinds=("verdict", "summary")).write(one_of_each())
    assert [json.loads(x)["type"] for x in out.getvalue().splitlines()] == [
        "verdict", "socket_summary"]


def test_record_ts_orders_reads_and_verdicts_by_their_end():
    r = read(1 * MS, 9 * MS)
    assert record_ts(r) == 9 * MS
    assert record_ts(Verdict(r, "unknown", "", None, None, None)) == 9 * MS
    assert record_ts(snap(4 * MS)) == 4 * MS


class Broken(Sink):
    name = "broken"
    ignores = frozenset(KIND_NAMES)

    def __init__(self):
        self.calls = 0

    def write(self, records):
        self.calls += 1
        raise ConnectionError("collector down")


class BrokenEssential(Broken):
    essential = True


def slow_peer_batch() -> list:
    # a read parked 3 ms on an empty queue, its data came at +2.5 ms: peer-starved
    return [snap(1 * MS, unread=0), read(1 * MS, 4 * MS, arrival=3_500_000),
            snap(3_500_000, unread=64)]


def test_pipeline_feeds_raw_sinks_before_analysis_and_sinks_after():
    raw, after = MemorySink(), MemorySink()
    with Pipeline(analysis=Analysis(Config(), start_ns=0), sinks=[after],
                  raw_sinks=[raw]) as p:
        p.start(RunInfo(0, Config()))
        p.feed(slow_peer_batch())
        p.finish()
    assert {kind_of(r) for r in raw.records} == {"snapshot", "read"}
    kinds = [kind_of(r) for r in after.records]
    assert kinds.count("verdict") == 1 and kinds[-1] == "summary"
    v = next(r for r in after.records if type(r) is Verdict)
    assert v.verdict == "peer-starved"


def test_a_failing_sink_is_counted_and_said_once_and_the_others_still_get_everything():
    err = io.StringIO()
    broken, kept = Broken(), MemorySink(kinds=("snapshot",))
    with Pipeline(sinks=[broken, kept], out=err) as p:
        for i in range(3):
            p.feed([snap(i * MS)])
    assert broken.calls == 3 and p.failures() == {"broken": 3}
    assert len(kept.records) == 3
    lines = err.getvalue().splitlines()
    assert len(lines) == 1 and "broken output failed" in lines[0] and "collector down" in lines[0]


def test_an_essential_sinks_failure_ends_the_run():
    p = Pipeline(sinks=[BrokenEssential()], out=io.StringIO())
    with pytest.raises(ConnectionError):
        p.feed([snap(1)])


def test_a_file_that_breaks_midway_is_finished_with_what_came_before():
    def records():
        yield from slow_peer_batch()
        raise RecordingError("line 4: not JSON", "fix it")

    mem = MemorySink(kinds=("verdict",))
    p = Pipeline(analysis=Analysis(Config(), start_ns=0), sinks=[mem])
    error = p.run_records(records())
    assert isinstance(error, RecordingError)
    assert [v.verdict for v in mem.records] == ["peer-starved"]


def test_process_records_of_a_file_go_to_the_sinks_not_the_analysis():
    mem = MemorySink(kinds=("process",))
    a = Analysis(Config(), start_ns=0)
    p = Pipeline(analysis=a, sinks=[mem])
    proc = ProcessInfo(10, 2 * MS, "/bin/svc", "svc", ("svc",), "svc", None, 1)
    p.run_records([snap(1 * MS), proc])
    assert mem.records == [proc]
    assert a.correlator.stats()["other"] == 0
