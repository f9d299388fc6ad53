"""JSON Lines on a stream: one object per record, flushed per batch, keys stable.

Every kind of record has a line (its `to_json()`); `kinds` narrows what is written (correlate
--json writes the analysis's verdicts, alerts and summaries, not the recording back).
"""

from __future__ import annotations

import json
import sys
from typing import IO, Iterable

from otelwater.errors import UsageError
from otelwater.events.records import KIND_NAMES, KINDS, kind_of
from otelwater.export.sink import Sink, writing


def _unwritten(record) -> bool:
    kind_of(record)            # an unknown type is an error, not a skipped line
    return False


def _dumps(record) -> str:
    return json.dumps(record.to_json(), separators=(",", ":"))


# -- the fast path: msgspec, the same bytes --------------------------------------------------
# The lines every slow read and every sweep make (read, verdict, snapshot) are encoded by
# msgspec straight from the records (dataclasses: no dict built) into one buffer per batch
# (LineEncoder; ~4x faster than json.dumps(to_json())), and are byte for byte what
# json.dumps(to_json()) writes:
#   - same keys in the same order: msgspec writes a dataclass's fields in order, as to_json's
#     dict has them; the keys to_json adds or rewrites are patched in at the same places
#     (sock_key as 16 hex digits; "type", "duration_ns", "fill_ratio" appended; a verdict's
#     keys after its read's);
#   - json.dumps escapes everything outside printable ASCII (ensure_ascii) and msgspec writes
#     UTF-8 and DEL as they are: a batch that is not all printable ASCII (a comm name in
#     another script) is encoded again line by line, and such a line by json.dumps; printable
#     ASCII and the control characters both escape alike (tests/unit/test_jsonl_fast.py);
#   - the one float, fill_ratio, is written by repr() as json.dumps does (msgspec's floats
#     differ in exponent form: 1e-05 is 0.00001). The other fields are ints by construction
#     (the decoders; the recording and OTLP JSON readers refuse a float there); a float put in
#     one would be the same number written another way.
# Any other record, or one the fast path cannot encode, goes through json.dumps(to_json()).
try:
    import msgspec
except ImportError:          # pragma: no cover - a dependency; the slow path still works
    msgspec = None


def _slow(record) -> bytes:
    return _dumps(record).encode()


class _Recent:
    """What was encoded for the last `keep` to 2*`keep` objects, by identity: an entry holds
    its object, so its id cannot be reused while the entry lives (two generations: O(1))."""

    __slots__ = ("new", "old", "keep")

    def __init__(self, keep: int):
        self.new: dict = {}
        self.old: dict = {}
        self.keep = keep

    def get(self, obj):
        hit = self.new.get(id(obj)) or self.old.get(id(obj))
        return hit[1] if hit is not None and hit[0] is obj else None

    def take(self, obj):
        """get(), and forget it."""
        hit = self.new.pop(id(obj), None) or self.old.pop(id(obj), None)
        return hit[1] if hit is not None and hit[0] is obj else None

    def put(self, obj, value) -> None:
        if len(self.new) >= self.keep:
            self.old, self.new = self.new, {}
        self.new[id(obj)] = (obj, value)


if msgspec is not None:
    from otelwater.events.model import ReadRecord, WaterSnapshot
    from otelwater.events.verdict import Verdict

    _encode = msgspec.json.Encoder().encode
    _Raw = msgspec.Raw

    class _VerdictTail(msgspec.Struct):
        """The keys Verdict.to_json adds after the read's, in its order."""

        verdict: str
        reason: str
        wait_peer_ns: object
        wait_run_ns: object
        wait_idle_ns: object
        evidence: list
        evidence_total: int
        evidence_complete: bool

    _encode_into = msgspec.json.Encoder().encode_into

    def _hex_key(buf: bytearray, start: int, key: int) -> None:
        """The record encoded from `start` on: its sock_key as to_json writes it (16 hex
        digits). The first "sock_key": there is the key itself (only numbers come before it
        in these records, and a quote inside a string is escaped); a field follows it."""
        i = buf.find(b'"sock_key":', start) + 11
        buf[i:buf.find(b",", i)] = b'"%016x"' % key

    class LineEncoder:
        """Lines as json.dumps(record.to_json(), separators=(",", ":")) writes them, byte for
        byte, fast: the read, verdict and snapshot lines are encoded by msgspec straight into
        one buffer (encode_into: no buffer grown per line, half the cost of encode) and patched
        in place; the rest by json.dumps. A verdict repeats its read's fields and its evidence
        snapshots' lines, written before as lines of their own (the read ~1.2 s before: the
        correlator decides a read once its watermark, 1.2 s behind the newest record, has
        passed it; a snapshot is evidence of up to 8 verdicts), so those are kept, by identity,
        and used again: a read's fields until its verdict takes them (at most 2 x READS
        reads), the last SNAPSHOTS to 2 x SNAPSHOTS snapshot lines."""

        READS = 8192          # 1.6-3.2 s of reads recorded at 5,000/s; ~700 B each
        SNAPSHOTS = 4096

        def __init__(self, reads: int = READS, snapshots: int = SNAPSHOTS):
            self._heads = _Recent(reads)
            self._snaps = _Recent(snapshots)
            self._into = {WaterSnapshot: self._snapshot_into, ReadRecord: self._read_into,
                          Verdict: self._verdict_into}

        # each _into appends one record's line, without its newline
        def _head_into(self, r, buf: bytearray) -> int:
            """A read's fields as to_json has them, without the closing brace; -> where."""
            start = len(buf)
            _encode_into(r, buf, -1)
            _hex_key(buf, start, r.sock_key)
            del buf[-1]
            return start

        def _read_into(self, r, buf: bytearray) -> None:
            start = self._head_into(r, buf)
            self._heads.put(r, buf[start:])      # for its verdict
            buf += b',"type":"read","duration_ns":%d}' % r.duration_ns

        def _snapshot_into(self, s, buf: bytearray) -> None:
            line = self._snaps.get(s)
            if line is not None:
                buf += line
                return
            start = len(buf)
            _encode_into(s, buf, -1)
            _hex_key(buf, start, s.sock_key)
            # the one float: repr, as json.dumps writes it (msgspec's exponents differ)
            buf[-1:] = b',"type":"snapshot","fill_ratio":%s}' % repr(
                round(s.fill_ratio, 4)).encode()
            self._snaps.put(s, buf[start:])

        def _snapshot_line(self, s) -> bytes | bytearray:
            if type(s) is not WaterSnapshot:
                return _slow(s)
            line = self._snaps.get(s)
            if line is None:
                line = bytearray()
                self._snapshot_into(s, line)
            return line

        def _verdict_into(self, v, buf: bytearray) -> None:
            r = v.read
            # to_json overwrites the read's queue delay with the verdict's
            if type(r) is not ReadRecord or v.queue_delay_ns != r.queue_delay_ns:
                buf += _slow(v)
                return
            evidence = [_Raw(self._snapshot_line(s)) for s in v.evidence]
            head = self._heads.take(r)
            if head is None:
                self._head_into(r, buf)
            else:
                buf += head
            buf += b',"type":"verdict","duration_ns":%d' % r.duration_ns
            brace = len(buf)
            _encode_into(_VerdictTail(v.verdict, v.reason, v.wait_peer_ns, v.wait_run_ns,
                                      v.wait_idle_ns, evidence, v.evidence_total,
                                      v.evidence_complete), buf, -1)
            buf[brace] = 44      # the tail's "{" is the "," after duration_ns

        def line(self, record) -> bytes:
            """One record's line, without its newline."""
            into = self._into.get(type(record))
            if into is not None:
                buf = bytearray()
                try:
                    into(record, buf)
                except Exception:  # noqa: BLE001 - whatever it is, the reference path decides
                    return _slow(record)
                # json.dumps escapes all but printable ASCII; msgspec writes UTF-8 and DEL
                if buf.isascii() and b"\x7f" not in buf:
                    return bytes(buf)
            return _slow(record)

        def lines(self, records) -> bytes | bytearray:
            """The records' lines, each with its newline, in one buffer. A batch with a line
            that is not printable ASCII (a comm name in another script) or that the fast path
            could not encode is done again line by line."""
            buf = bytearray()
            into_of = self._into.get
            try:
                for r in records:
                    into = into_of(type(r))
                    if into is None:
                        buf += _slow(r)
                    else:
                        into(r, buf)
                    buf += b"\n"
            except Exception:  # noqa: BLE001 - line() says which, and encodes it as before
                return b"".join(self.line(r) + b"\n" for r in records)
            if buf.isascii() and b"\x7f" not in buf:
                return buf
            return b"".join(self.line(r) + b"\n" for r in records)
else:                        # pragma: no cover
    class LineEncoder:
        def __init__(self, keep: int = 0):
            pass

        def line(self, record) -> bytes:
            return _slow(record)

        def lines(self, records) -> bytes:
            return b"".join(_slow(r) + b"\n" for r in records)


def encode_line(record) -> bytes:
    """One record's JSON line (without the newline), as json.dumps(record.to_json(),
    separators=(",", ":")) encodes it, byte for byte."""
    return LineEncoder(1, 1).line(record)


class JsonLinesSink(Sink):
    name = "JSON Lines"
    essential = True          # the command's output: a full disk or closed pipe ends the run

    def __init__(self, stream: IO[str] | None = None, kinds: Iterable[str] | None = None):
        self.stream = stream or sys.stdout
        if self.stream is None:      # started with stdout closed (>&-)
            raise UsageError("standard output is closed: nowhere to write the JSON Lines",
                             "redirect it to a file or a pipe (> out.jsonl)")
        chosen = frozenset(KIND_NAMES if kinds is None else kinds)
        if not chosen <= set(KIND_NAMES):
            raise ValueError(f"not record kinds: {sorted(chosen - set(KIND_NAMES))}")
        self._types = frozenset(t for t, k in KINDS.items() if k in chosen)
        self._lines = LineEncoder().lines

    def handles(self, kind: str) -> bool:
        return any(KINDS[t] == kind for t in self._types)

    def write(self, records: Iterable) -> None:
        types = self._types
        chosen = [r for r in records if type(r) in types or _unwritten(r)]
        if chosen:
            text = self._lines(chosen).decode("ascii")
            # a closed pipe ends the CLI quietly; a full disk, a quota, an I/O error: one line
            with writing("the JSON Lines output"):
                self.stream.write(text)
                self.stream.flush()

    # every kind has a line; write() batches them, these serve single records
    def _one(self, record) -> None:
        self.write([record])

    on_snapshot = on_read = on_lost = on_notice = on_process = on_counts = _one
    on_alert = on_verdict = on_summary = _one
