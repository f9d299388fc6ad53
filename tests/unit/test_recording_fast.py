"""The Reader's fast decoder (otelwater.events.recording.fast_record, msgspec) against the
per-field checks it stands in for: the same record for every line it takes, and no line taken
that the checks refuse, so a malformed file still breaks at the same record with the same
message; files of older versions (keys added since missing, spaced JSON) read the same."""

from __future__ import annotations

import dataclasses
import gzip
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otelwater.errors import RecordingError
from otelwater.events import recording
from otelwater.events.model import LostEvents, Notice, ReadRecord, WaterSnapshot
from otelwater.events.recording import FROM_JSON, ProcessInfo, Reader, fast_record

MS = 1_000_000
T0 = 5_000 * MS

pytestmark = pytest.mark.skipif(recording._FAST is None, reason="msgspec is not installed")


def snap(ts=T0, key=0xABC):
    return WaterSnapshot(ts, key, 42, "svc", 1, 4026531840, "127.0.0.1", 8080, "10.0.0.2",
                         5000, 3, 2800, 700, 1 << 20, 0, 2, 1, "TCP_RFC7323_PAWS", 123, 45,
                         "arrival", "ESTABLISHED", 99)


def read(start=T0, end=T0 + 2 * MS, key=0xABC):
    return ReadRecord(start, end, 42, 43, 7, 3, key, 4096, 64,
                      ("internal/poll.(*FD).Read", "net.(*conn).Read", "main.handle"),
                      "tracepoint", "svc", True, end - 100, None, None)


EXAMPLES = [snap(), read(), LostEvents(T0, "reads", 3), Notice(T0, "reads", "a notice"),
            ProcessInfo(42, T0, "/bin/svc", "svc", ("svc", "-p", "1"), "svc",
                        {"k": "v", "n": "1"}, 123)]


def line(d: dict, **dumps) -> bytes:
    return json.dumps(d, separators=(",", ":"), **dumps).encode()


def slow(text: bytes):
    """What the per-field checks make of a line: the record, or "bad"."""
    try:
        d = json.loads(text)
        kind = d.get("type") if type(d) is dict else None
        if type(kind) is not str or kind not in FROM_JSON:
            return "bad"
        return FROM_JSON[kind](d)
    except (ValueError, recording._Bad):
        return "bad"


def agrees(text: bytes):
    """The fast path gives the checks' record or leaves the line to them; never anything else."""
    got = fast_record(text)
    want = slow(text)
    if got is not None:
        assert want != "bad", f"the fast path took a line the checks refuse: {text[:200]!r}"
        assert type(got) is type(want) and got == want, text[:200]
    return got, want


# -- what it takes --------------------------------------------------------------------------------

@pytest.mark.parametrize("rec", EXAMPLES, ids=lambda r: type(r).__name__)
def test_every_record_type_is_decoded_fast_and_equal(rec):
    got, want = agrees(line(rec.to_json()))
    assert got is not None and got == rec and type(got) is type(rec)
    assert dataclasses.astuple(got) == dataclasses.astuple(rec)
    with pytest.raises(dataclasses.FrozenInstanceError):  # a record, frozen as any other
        setattr(got, dataclasses.fields(got)[0].name, 1)


def test_spaced_json_and_keys_in_any_order_decode_the_same():
    for rec in EXAMPLES:
        d = rec.to_json()
        agrees(json.dumps(d).encode())                             # `watch --json`'s spacing
        got, _ = agrees(line(dict(reversed(list(d.items())))))      # "type" first
        assert got == rec


def test_older_files_without_the_keys_added_since_read_as_the_defaults():
    d = read().to_json()
    for k in ("comm", "parked", "ts_arrival_ns", "queue_delay_ns", "queue_delay_exact"):
        del d[k]
    got, want = agrees(line(d))
    assert got == want == dataclasses.replace(read(), comm="", parked=None, ts_arrival_ns=None)
    old_lost = {"type": "lost", "ts_ns": T0, "probe": "water", "lost_total": 5}
    got, want = agrees(line(old_lost))
    assert got is not None and got == want and got.lost_total == 5


# -- what it leaves to the checks -----------------------------------------------------------------

S = snap().to_json()
R = read().to_json()


@pytest.mark.parametrize("text", [
    b"garbage {", b"[1, 2]", b'"snapshot"', b"", b'{"ts_ns": 1}', b'{"type": "bogus"}',
    b'{"type": 5}', b'{"type": "end", "ts_ns": 1}', line({**S, "type": "read"}),
    line({**S, "level": "3"}), line({**S, "level": True}), line({**S, "level": 3.0}),
    line({**S, "level": None}), line({**S, "comm": 5}), line({**S, "sock_key": "xyz"}),
    line({**S, "sock_key": ""}), line({**S, "sock_key": "1" * 17}), line({**S, "sock_key": 5}),
    line({k: v for k, v in S.items() if k != "ts_ns"}), line({**R, "stack": [1]}),
    line({**R, "stack": "a"}), line({**R, "stack": None}), line({**R, "parked": 1}),
    line({**R, "goid": False}), line({**R, "ts_arrival_ns": "1"}),
    b'{"type":"lost","ts_ns":1,"probe":"water","lost_total":1.5}',
    line({**EXAMPLES[4].to_json(), "resource_attributes": [1]}),
    line({**EXAMPLES[4].to_json(), "cmdline": [None]}),
])
def test_a_line_the_checks_refuse_is_not_taken(text):
    got, want = agrees(text)
    assert want == "bad" and got is None


@pytest.mark.parametrize("text", [
    line({**S, "level": 2**70}),                                  # beyond 64 bits
    line({**S, "comm": "\ud800x"}),                               # a lone surrogate
    json.dumps({**S, "fill_ratio": float("nan")}).encode(),       # NaN (json.dumps writes it)
    line({**S, "sock_key": "0x1f"}), line({**S, "sock_key": " 1f"}),
    line({**S, "sock_key": "-1"}), line({**S, "sock_key": "1_f"}),
    line({**S, "extra": {"type": "read", "x": [1, {"y": None}]}}),
    line(S)[:-1] + b',"level":7}',                                # a repeated key: the last wins
    line(S)[:-1] + b',"\\u0074ype":"read"}',                      # an escaped repeated key
    line(S).replace(b'"comm":"svc"', b'"comm":"s\\u00e9\\"c"'),   # escapes in a value
    b"  " + line(S) + b" \r",
])
def test_unusual_but_valid_lines_give_what_the_checks_give(text):
    agrees(text)


fields = st.sampled_from(sorted(set(S) | set(R) | {"type", "cmdline", "resource_attributes"}))
values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**65, 2**65) | st.floats(allow_nan=False)
    | st.text(max_size=20) | st.sampled_from(["snapshot", "read", "lost", "notice",
                                              "process", "end", "abc", "0" * 16]),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=5), children, max_size=3), max_leaves=6)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(EXAMPLES), st.dictionaries(fields, values, max_size=4),
       st.sets(fields, max_size=3), st.booleans())
def test_any_mangled_record_gives_what_the_checks_give(rec, changes, dropped, spaced):
    d = {k: v for k, v in rec.to_json().items() if k not in dropped}
    d.update(changes)
    agrees(json.dumps(d).encode() if spaced else line(d))


# -- the Reader -----------------------------------------------------------------------------------

def write_lines(path, lines):
    path.write_bytes(gzip.compress(b"\n".join(lines) + b"\n"))


HEADER = line({"type": "otelwater-recording", "version": 1, "start_ns": T0,
               "started_wall_ns": 1, "clock": {"realtime_minus_monotonic_ns": 10,
                                               "error_ns": 1},
               "host": {}, "otelwater_version": "0", "options": {}, "config": {},
               "processes": {}})
END = line({"type": "end", "ts_ns": T0, "records": 0})


def read_file(path):
    got, err = [], None
    try:
        for x in Reader(str(path)):
            got.append(x)
    except RecordingError as e:
        err = e
    return got, err


@pytest.mark.parametrize("bad", [
    line({**S, "level": "3"}), line({**R, "stack": [1]}), b"not json", b'{"type":"bogus"}',
    b'{"type":["snapshot"]}',
])
def test_a_file_breaks_at_the_same_record_with_the_same_message_either_way(
        tmp_path, monkeypatch, bad):
    path = tmp_path / "r.otw"
    lines = [HEADER, *(line(r.to_json()) for r in EXAMPLES), line({**S, "level": 2**70}),
             bad, line(S), END]
    write_lines(path, lines)
    fast_got, fast_err = read_file(path)
    monkeypatch.setattr(recording, "fast_record", lambda text: None)   # the checks alone
    slow_got, slow_err = read_file(path)
    assert fast_got == slow_got == [*EXAMPLES, dataclasses.replace(snap(), level=2**70)]
    assert [type(x) for x in fast_got] == [type(x) for x in slow_got]
    assert fast_err.message == slow_err.message and fast_err.record == slow_err.record == 8


def test_an_old_spaced_file_reads_the_same_either_way(tmp_path, monkeypatch):
    path = tmp_path / "old.otw"
    old_read = {k: v for k, v in R.items() if k != "queue_delay_exact"}
    old_lost = {"type": "lost", "ts_ns": T0, "probe": "reads", "lost_total": 2}
    write_lines(path, [json.dumps(json.loads(x)).encode() for x in
                       (HEADER, line(S), line(old_read), line(old_lost), END)])
    fast_got, fast_err = read_file(path)
    monkeypatch.setattr(recording, "fast_record", lambda text: None)
    slow_got, slow_err = read_file(path)
    assert fast_err is None and slow_err is None
    assert fast_got == slow_got and len(fast_got) == 3
    assert [type(x) for x in fast_got] == [WaterSnapshot, ReadRecord, LostEvents]


def test_a_record_class_with_a_type_not_taught_takes_the_checks():
    @dataclasses.dataclass(frozen=True, slots=True)
    class Odd:
        ts_ns: int
        ratio: float

    assert recording._twin(Odd) is None
    assert recording._twin(WaterSnapshot).__slots__ == WaterSnapshot.__slots__
