"""The JSON Lines sink's fast encoder (msgspec) writes, byte for byte, what
json.dumps(record.to_json(), separators=(",", ":")) wrote: over every record the recorded
fixtures give (their snapshots, reads, lost records, and the verdicts, alerts and summaries the
analysis makes of them), over the unit tests' kinds of record, and over the hard cases:
non-ASCII and control characters and DEL in strings, fill ratios of every size, huge integers,
a verdict whose queue delay is not its read's, a record the fast path cannot encode."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest

from otelwater.events.model import LostEvents, Notice, ReadRecord, VerdictCounts, WaterSnapshot
from otelwater.events.recording import Reader
from otelwater.events.verdict import Verdict
from otelwater.export import jsonl
from otelwater.export.jsonl import JsonLinesSink, encode_line
from otelwater.pipeline import Analysis, Pipeline
from otelwater.export.sink import MemorySink

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "recordings"


def reference(record) -> bytes:
    return json.dumps(record.to_json(), separators=(",", ":")).encode()


def check(record) -> None:
    assert encode_line(record) == reference(record)


def recorded(name: str) -> list:
    """A fixture recording's records and everything the analysis makes of them."""
    out = MemorySink()
    with Pipeline(analysis=Analysis(), sinks=[out]) as p:
        raw = list(Reader(str(FIXTURES / f"{name}.otw.gz")))
        p.run_records(raw)
    return raw + out.records


@pytest.mark.parametrize("name", ["mixed", "lossy"])
def test_fixture_records_encode_byte_for_byte(name):
    records = recorded(name)
    kinds = {type(r).__name__ for r in records}
    assert {"WaterSnapshot", "ReadRecord", "Verdict"} <= kinds
    for r in records:
        check(r)
    # and the sink writes the same text as joining the reference lines did
    buf = io.StringIO()
    JsonLinesSink(buf).write(records)
    want = "\n".join(reference(r).decode() for r in records) + "\n"
    assert buf.getvalue() == want


def snap(**kw) -> WaterSnapshot:
    base = dict(ts_ns=1, sock_key=0xFFFFFFFFFFFFFFFF, pid=3, comm="slowreader", tid=0,
                netns=4026531833, laddr="127.0.0.1", lport=1, raddr="::1", rport=2, level=0,
                volume=0, unread_bytes=0, capacity=131072, backlog=0, drops=0, drop_events=0,
                drop_reason="", bytes_arrived=5, bytes_read=5, trigger="periodic",
                tcp_state="ESTABLISHED", ino=5, role="accepted")
    base.update(kw)
    return WaterSnapshot(**base)


def read(**kw) -> ReadRecord:
    base = dict(ts_start_ns=10, ts_end_ns=2_000_010, pid=7, tid=8, goid=None, fd=-1, sock_key=0,
                requested=4096, returned=-11, stack=("main.f", "0x4011"), source="tracepoint")
    base.update(kw)
    return ReadRecord(**base)


STRINGS = ["", "plain", "caf\u00e9", "\u6f22\u5b57", "\U0001f600", "del\x7f", "nul\x00",
           "ctl\x01\x1f", "q\"b\\s/", "nl\n\r\t\b\f", "\u2028\u2029", "<>&'"]


def test_strings_of_every_kind():
    for s in STRINGS:
        check(snap(comm=s, drop_reason=s, laddr=s))
        check(read(comm=s, stack=(s, s), peer_addr=s, role=s, kernel_verdict=s))
        check(Verdict(read(comm=s), "idle", s, None, None, None, (snap(comm=s),), 1, True))


def test_every_ascii_character():
    for c in range(128):
        check(read(comm=f"a{chr(c)}b"))


def test_fill_ratios_and_numbers():
    rng = random.Random(5)
    for _ in range(5000):
        cap = rng.choice([0, 1, 3, 7, 131072, rng.randrange(1, 1 << 32)])
        vol = rng.choice([0, 1, rng.randrange(1 << 32)])
        check(snap(volume=vol, capacity=cap, sock_key=rng.randrange(1 << 64),
                   ts_ns=rng.randrange(1 << 63)))
    check(snap(volume=1, capacity=10**6))        # 1e-06: repr's exponent form
    check(snap(volume=10**20, capacity=1))       # 1e+20
    check(read(goid=2**64 + 5, returned=-2**70, sock_key=0))
    check(read(sock_key=1, parked=True, queue_delay_exact=False))


def test_verdicts():
    r = read(sock_key=0x3358A956AF187A49, queue_delay_ns=5, parked=False)
    ev = (snap(level=3, volume=100, capacity=300), snap(ts_ns=9))
    for v in [Verdict(r, "consumer-lagging", "waited 5 ns", None, None, 5, ev, 7, False, None),
              Verdict(r, "peer-starved", "", 1, 2, 5, (), 0, True, 3),
              Verdict(r, "idle", "x", None, None, 6, ev),     # not the read's queue delay
              Verdict(read(), "unknown", "why", None, None, None)]:
        check(v)


def test_other_kinds_and_odd_values_take_the_reference_path():
    check(LostEvents(1, "water", 5, 2, 3, 4))
    check(Notice(1, "reads", "caf\u00e9"))
    check(VerdictCounts(1, 2, "dialed", "idle", 3, 4, 5, 6, 7, (1, 2), ()))
    check(read(stack=["a", "b"]))                # a list where a tuple is expected
    with pytest.raises(TypeError):               # json.dumps' errors stay its own
        encode_line(read(requested=object()))
    # the one difference left: a float where the record has an int (the decoders make ints,
    # and both file readers refuse anything else) is the same number in another form
    odd = read(requested=1.5e-5)
    assert encode_line(odd) != reference(odd)
    assert json.loads(encode_line(odd)) == json.loads(reference(odd))


def test_a_failing_fast_path_falls_back(monkeypatch):
    def broken(_obj):
        raise RuntimeError("no")

    monkeypatch.setattr(jsonl, "_encode_into", lambda *_a: broken(None))
    records = [read(comm="caf\u00e9"), snap(), Verdict(read(), "idle", "", 1, 2, None)]
    for r in records:
        assert encode_line(r) == reference(r)
    assert jsonl.LineEncoder().lines(records) == b"".join(reference(r) + b"\n"
                                                          for r in records)


def test_a_batch_with_one_odd_line_is_done_again_line_by_line():
    enc = jsonl.LineEncoder()
    plain = [read(goid=i, sock_key=i) for i in range(5)]
    odd = read(comm="\u6f22\u5b57")
    for batch in ([*plain, odd], [odd, *plain], [*plain, snap(comm="\x7f"), *plain],
                  [*plain, Verdict(odd, "idle", "", None, None, None)]):
        assert bytes(enc.lines(batch)) == b"".join(reference(r) + b"\n" for r in batch)
    with pytest.raises(TypeError):                     # json.dumps' own error, as before
        enc.lines([*plain, read(requested=object())])


def test_what_the_sink_remembers_is_the_same_bytes():
    """Reads and snapshots encoded once are used again for the verdicts that repeat them, by
    identity, within two generations of KEEP; equal but distinct records are encoded anew."""
    enc = jsonl.LineEncoder(reads=4, snapshots=4)
    rng = random.Random(9)
    reads = [read(ts_start_ns=i, sock_key=i, goid=i) for i in range(20)]
    snaps = [snap(ts_ns=i, level=i, volume=i * 100) for i in range(20)]
    for _ in range(2000):
        r = rng.choice(reads)
        ev = tuple(rng.sample(snaps, rng.randrange(0, 8)))
        for rec in (r, Verdict(r, "idle", "", None, None, r.queue_delay_ns, ev, len(ev)),
                    rng.choice(snaps)):
            assert enc.line(rec) == reference(rec)
    assert len(enc._heads.new) <= 4 and len(enc._snaps.old) <= 4
    twin = read(ts_start_ns=0, sock_key=0, goid=0, comm="other")   # == reads[0]'s id? never
    assert enc.line(twin) == reference(twin)
