"""otelwater's own spans back from OTLP JSON files, as the Collector's file exporter writes them,
so `otelwater correlate FILE` gives the same verdicts from them as from the recording.

The file: one JSON object per line, each an export request in the OTLP/JSON encoding
(lowerCamelCase keys, snake_case accepted too; 64-bit integers as decimal strings, numbers
accepted too; trace and span ids as hex): {"resourceSpans": [...]} lines are read, lines of
{"resourceMetrics": ...}, {"resourceLogs": ...} (and {}) are skipped. Of the spans, only
otelwater's are taken: "tcp read ..." (named "net.(*conn).Read" by otelwater before its spans
said their verdict and peer) with an otelwater.verdict attribute (one per slow read), and
"otelwater.lost" (a rise of a probe's lost records); the service's own spans, and everything
else, are passed over.

What the spans carry rebuilds the records exactly (names: otelwater.names):
- ReadRecord: the read's CLOCK_MONOTONIC start and end and the kernel's stamps (parked, arrival,
  queue delay and whether it is exact), the goroutine, thread, fd, socket key, bytes, stack;
  the request it served (trace_id, parent_span_id: the span's own trace id and parent span id
  when it is a child, else otelwater.link.trace_id and .parent_span_id), link_note and
  go_start;
- WaterSnapshot: each "otelwater.water" span event, at its own time (timeUnixNano minus the
  resource's otelwater.clock.offset_ns: an exact integer subtraction), of the span's socket;
  a snapshot that is evidence of several reads appears once;
- LostEvents: each "otelwater.lost" span;
- ProcessInfo: each traced service's resource (service.name, process.*, the rest of its
  attributes), yielded before the first read of its pid;
- the Header (recording.Header): the run's clock offset, attach time (otelwater.start_ns) and
  verdict thresholds (otelwater.correlate.*) from the first otelwater resource in the file.

Those records go through the same analysis as a recording's (otelwater.report.correlate): the
verdict rules see the same reads with the same stamps, attach time and losses, so they give the
same verdicts. `amend()` puts back each verdict's evidence_total and evidence_complete as the
run decided them (the file holds only the snapshots that were evidence, not every snapshot).

Order: a batch of spans leaves each traced service when its exporter's timer fires, so the
lines are only roughly in time order; records are held and handed out in time order (a read at
its end, as `watch` hands them to its analysis) once the file is `HORIZON_NS` past them, or
when more than `MAX_HELD` are held.

A line that is not JSON, not an export request, cut short, or an otelwater span with a missing
or mistyped field raises RecordingError("FILE: line N: what", fix) after every record of the
lines before it (`record` and `line` hold N).
"""

from __future__ import annotations

import base64
import dataclasses
import heapq
import json
import re
from collections import OrderedDict
from typing import Iterator

from otelwater.errors import RecordingError
from otelwater.events.model import LostEvents, Notice, ReadRecord, WaterSnapshot
from otelwater.events.recording import VERSION, Header, ProcessInfo, Reader
from otelwater import names as N

HORIZON_NS = 30 * 10**9     # records are handed out once the file is this far past them
MAX_HELD = 1_000_000        # ... or when more than this many are held
MAX_AMEND = 1 << 17         # reads whose recorded evidence counts wait for their verdict
SNIFF_BYTES = 8192
FIX_BAD = ("give the OTLP JSON file the Collector's file exporter wrote (one export request "
           "per line), or an otelwater recording")
FIX_CUT = "the results cover the lines before it (was the file still being written?)"
FIX_NONE = ("send otelwater's OTLP (otelwater watch --otlp-endpoint URL) to a Collector whose "
            "traces pipeline has the file exporter (collector-config.yaml)")
REQUEST_KEYS = ("resourceSpans", "resourceMetrics", "resourceLogs", "resourceProfiles")
_OTLP_START = re.compile(
    rb'^\s*\{\s*"(resource(Spans|Metrics|Logs)|resource_(spans|metrics|logs))"')
# resource attributes otelwater itself sets; the rest is the service's own
_DERIVED = {N.SERVICE_NAME, N.SERVICE_INSTANCE_ID, N.PROCESS_PID, N.PROCESS_EXECUTABLE_NAME,
            N.PROCESS_EXECUTABLE_PATH, N.HOST_NAME}


# -- which format ---------------------------------------------------------------------------

def sniff(path: str) -> str | None:
    """"recording" (gzip), "otlp-json" (the first line an export request), else None."""
    try:
        with open(path, "rb") as f:
            head = f.read(SNIFF_BYTES)
    except OSError:
        return None
    if head[:2] == b"\x1f\x8b":
        return "recording"
    if _OTLP_START.match(head.lstrip(b"\xef\xbb\xbf")):
        return "otlp-json"
    return None


def open_input(path: str):
    """A reader for `correlate`: OtlpJsonReader for OTLP JSON, else the recording Reader
    (whose errors name a missing, empty or damaged file)."""
    kind = sniff(path)
    if kind == "otlp-json":
        return OtlpJsonReader(path)
    if kind is None:
        try:
            with open(path, "rb") as f:
                head = f.read(SNIFF_BYTES).lstrip()
        except OSError:
            head = b""
        if head[:1] in (b"{", b"["):
            err = RecordingError(f"{path}: record 1: neither an otelwater recording (gzip) nor "
                                 "OTLP JSON (its first line is not an export request with "
                                 "resourceSpans, resourceMetrics or resourceLogs)", FIX_BAD)
            err.record = err.line = 1
            raise err
        if head:    # something else altogether (a text file, another binary)
            err = RecordingError(f"{path}: neither an otelwater recording (gzip) nor OTLP "
                                 "JSON", FIX_BAD)
            err.record = err.line = 1
            raise err
    return Reader(path)


# -- OTLP/JSON values -----------------------------------------------------------------------

class _Bad(Exception):
    """What is wrong with a line (the reader adds the file and the line number)."""


def _snake(name: str) -> str:
    return re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), name)


def _get(d: dict, key: str, default=None):
    """A field by its lowerCamelCase name, or its proto (snake_case) name."""
    if key in d:
        return d[key]
    return d.get(_snake(key), default)


def _u64(v, what: str) -> int:
    """An int64/uint64/fixed64: a decimal string (OTLP/JSON), or a JSON integer."""
    if type(v) is int:
        return v
    if type(v) is str and re.fullmatch(r"-?\d+", v):
        return int(v)
    raise _Bad(f"{what} is {json.dumps(v)[:40]}, expected an integer (a decimal string)")


def _double(v, what: str) -> float:
    if type(v) in (int, float):
        return float(v)
    if v in ("NaN", "Infinity", "-Infinity"):
        return float(v.replace("Infinity", "inf"))
    raise _Bad(f"{what} is {json.dumps(v)[:40]}, expected a number")


def any_value(v, what: str):
    """An AnyValue as a Python value: str, bool, int, float, bytes, tuple, dict or None."""
    if type(v) is not dict:
        raise _Bad(f"{what} is not an AnyValue object")
    for key, val in v.items():
        k = key if key.endswith("Value") else re.sub(r"_(\w)", lambda m: m.group(1).upper(), key)
        if k == "stringValue":
            if type(val) is not str:
                raise _Bad(f"{what} stringValue is not a string")
            return val
        if k == "boolValue":
            if type(val) is not bool:
                raise _Bad(f"{what} boolValue is not true or false")
            return val
        if k == "intValue":
            return _u64(val, what)
        if k == "doubleValue":
            return _double(val, what)
        if k == "bytesValue":
            try:
                return base64.b64decode(val, validate=True)
            except (TypeError, ValueError):
                raise _Bad(f"{what} bytesValue is not base64") from None
        if k == "arrayValue":
            vals = _get(val, "values", []) if type(val) is dict else None
            if type(vals) is not list:
                raise _Bad(f"{what} arrayValue has no values list")
            return tuple(any_value(x, what) for x in vals)
        if k == "kvlistValue":
            vals = _get(val, "values", []) if type(val) is dict else None
            if type(vals) is not list:
                raise _Bad(f"{what} kvlistValue has no values list")
            return attributes(vals, what)
    return None     # an empty AnyValue


def attributes(kvs, what: str) -> dict:
    """A list of KeyValue as a dict."""
    if kvs is None:
        return {}
    if type(kvs) is not list:
        raise _Bad(f"{what} attributes are not a list")
    out = {}
    for kv in kvs:
        if type(kv) is not dict or type(kv.get("key")) is not str:
            raise _Bad(f"{what} has an attribute without a key")
        out[kv["key"]] = any_value(kv.get("value", {}), f"{what} attribute {kv['key']}")
    return out


def _list(d: dict, key: str, what: str) -> list:
    v = _get(d, key, [])
    if v is None:
        return []
    if type(v) is not list:
        raise _Bad(f"{what} {key} is not a list")
    return v


def _obj(v, what: str) -> dict:
    if type(v) is not dict:
        raise _Bad(f"{what} is not an object")
    return v


# -- spans to records -----------------------------------------------------------------------

class _Attrs:
    """A span's (or event's) attributes, read with type checks."""

    def __init__(self, attrs: dict, what: str):
        self.a = attrs
        self.what = what

    def get(self, key: str, kind, default=None, required: bool = False):
        v = self.a.get(key)
        if v is None:
            if required:
                raise _Bad(f"{self.what} lacks {key}")
            return default
        if kind is int:
            ok = type(v) is int
        elif kind is float:
            ok = type(v) in (int, float) and not isinstance(v, bool)
        else:
            ok = type(v) is kind
        if not ok:
            raise _Bad(f"{self.what} {key} is {json.dumps(v, default=str)[:40]}, expected "
                       f"{_KIND_NAMES[kind]}")
        return v


_KIND_NAMES = {int: "an integer", str: "a string", bool: "true or false", float: "a number"}


@dataclasses.dataclass
class _Run:
    """What a resource says of the run that exported it."""

    offset_ns: int | None
    start_ns: int | None
    config: dict
    host: str | None
    version: str


def _run_of(res: dict, version: str) -> _Run:
    a = _Attrs(res, "resource")
    config = {}
    for key, name in ((N.THRESHOLD_MS, "threshold_ms"), (N.RUN_THRESHOLD_MS, "run_threshold_ms"),
                      (N.WINDOW_MS, "window_ms")):
        v = a.get(key, float)
        if v is not None:
            config[name] = float(v)
    idle = a.get(N.INCLUDE_IDLE, bool)
    if idle is not None:            # the spans hold idle reads too: correlate keeps them
        config["include_idle"] = idle
    return _Run(a.get(N.CLOCK_OFFSET_NS, int), a.get(N.START_NS, int),
                {"correlate": config} if config else {}, a.get(N.HOST_NAME, str), version)


def _process_of(res: dict, pid: int, ts_ns: int) -> ProcessInfo:
    a = _Attrs(res, "resource")
    exe = a.get(N.PROCESS_EXECUTABLE_PATH, str)
    given = {k: v for k, v in res.items() if k not in _DERIVED and not k.startswith("otelwater.")}
    return ProcessInfo(pid=pid, ts_ns=ts_ns, exe=exe,
                       comm=None if exe else a.get(N.PROCESS_EXECUTABLE_NAME, str),
                       cmdline=(), service_name=a.get(N.SERVICE_NAME, str),
                       resource_attributes={k: v if isinstance(v, (str, bool, int, float))
                                            else str(v) for k, v in given.items()},
                       start_time=None)


def _key(text, what: str) -> int:
    if type(text) is not str or not re.fullmatch(r"[0-9a-fA-F]{1,16}", text):
        raise _Bad(f"{what} {N.SOCKET_KEY} is {json.dumps(text)[:40]}, expected 16 hex digits")
    return int(text, 16)


def _hex_id(v, digits: int, what: str) -> str:
    """A trace or span id as lowercase hex: OTLP/JSON's hex, or protobuf's base64 mapping."""
    if type(v) is str and re.fullmatch(r"[0-9a-fA-F]{%d}" % digits, v):
        return v.lower()
    if type(v) is str:
        try:
            raw = base64.b64decode(v, validate=True)
        except ValueError:
            raw = b""
        if len(raw) * 2 == digits:
            return raw.hex()
    raise _Bad(f"{what} is {json.dumps(v)[:40]}, expected {digits} hex digits")


def read_of(span: dict, res: dict, run: _Run, what: str):
    """(ReadRecord, [WaterSnapshot], evidence_total, evidence_complete) of a read's span."""
    a = _Attrs(attributes(_get(span, "attributes"), what), what)
    r = _Attrs(res, "resource")
    offset = run.offset_ns
    if offset is None:
        raise _Bad(f"{what}: its resource lacks {N.CLOCK_OFFSET_NS} (exported by an otelwater "
                   "that did not put the run on its resources)")
    start = a.get(N.READ_START_NS, int, required=True)
    end = a.get(N.READ_END_NS, int, required=True)
    pid = a.get(N.PROCESS_PID, int) or r.get(N.PROCESS_PID, int, required=True)
    key = _key(a.get(N.SOCKET_KEY, str, required=True), what)
    stack = a.get(N.CODE_STACKTRACE, str)
    qd = a.get(N.QUEUE_DELAY_NS, int)
    role = a.get(N.SOCKET_ROLE, str, "")
    parent = _get(span, "parentSpanId") or ""
    if parent:      # a child of the request's span: the read named them
        trace_id = _hex_id(_get(span, "traceId"), 32, f"{what} traceId")
        parent_span_id = _hex_id(parent, 16, f"{what} parentSpanId")
    else:
        trace_id = a.get(N.LINK_TRACE_ID, str, "")
        parent_span_id = a.get(N.LINK_PARENT_SPAN_ID, str, "")
    read = ReadRecord(
        ts_start_ns=start, ts_end_ns=end, pid=pid, tid=a.get(N.THREAD_ID, int, required=True),
        goid=a.get(N.GOROUTINE_ID, int), fd=a.get(N.FD, int, required=True), sock_key=key,
        requested=a.get(N.READ_REQUESTED, int, required=True),
        returned=a.get(N.READ_RETURNED, int, required=True),
        stack=tuple(stack.split("\n")) if stack else (),
        source=a.get(N.READ_SOURCE, str, "tracepoint"), comm=a.get(N.THREAD_NAME, str, ""),
        parked=a.get(N.READ_PARKED, bool), ts_arrival_ns=a.get(N.READ_ARRIVAL_NS, int),
        queue_delay_ns=qd, queue_delay_exact=a.get(N.READ_QUEUE_DELAY_EXACT, bool),
        # the read's own peer is the span's when it has a role (the kernel stamps the two
        # together); a span without one took its peer from the socket's snapshots
        role=role, peer_addr=a.get(N.NETWORK_PEER_ADDRESS, str, "") if role else "",
        peer_port=a.get(N.NETWORK_PEER_PORT, int, 0) if role else 0,
        ts_send_ns=a.get(N.READ_SEND_NS, int),
        ts_prev_arrival_ns=a.get(N.READ_PREV_ARRIVAL_NS, int),
        kernel_verdict=a.get(N.READ_KERNEL_VERDICT, str),
        trace_id=trace_id, parent_span_id=parent_span_id,
        link_note=a.get(N.LINK_SKIPPED, str, ""), go_start=a.get(N.GOROUTINE_START, str, ""))
    laddr = a.get(N.NETWORK_LOCAL_ADDRESS, str, "")
    lport = a.get(N.NETWORK_LOCAL_PORT, int, 0)
    raddr = a.get(N.NETWORK_PEER_ADDRESS, str, "")
    rport = a.get(N.NETWORK_PEER_PORT, int, 0)
    snaps = []
    for i, ev in enumerate(_list(span, "events", what)):
        ev = _obj(ev, f"{what} event {i}")
        if _get(ev, "name") != N.WATER_EVENT:
            continue            # alert transitions: the analysis decides them again
        ew = f"{what} event {i} ({N.WATER_EVENT})"
        e = _Attrs(attributes(_get(ev, "attributes"), ew), ew)
        ts = _u64(_get(ev, "timeUnixNano", "0"), f"{ew} timeUnixNano") - offset
        snaps.append(WaterSnapshot(
            ts_ns=ts, sock_key=key, pid=e.get(N.WATER_PID_ATTR, int, pid),
            comm=e.get(N.WATER_COMM_ATTR, str, read.comm), tid=e.get(N.WATER_TID_ATTR, int, 0),
            netns=e.get(N.WATER_NETNS_ATTR, int, 0), laddr=laddr, lport=lport, raddr=raddr,
            rport=rport, level=e.get(N.WATER_LEVEL_ATTR, int, required=True),
            volume=e.get(N.WATER_VOLUME_ATTR, int, required=True),
            unread_bytes=e.get(N.WATER_UNREAD_ATTR, int, required=True),
            capacity=e.get(N.WATER_CAPACITY_ATTR, int, required=True),
            backlog=e.get(N.WATER_BACKLOG_ATTR, int, 0),
            drops=e.get(N.WATER_DROPS_ATTR, int, required=True),
            drop_events=e.get(N.WATER_DROP_EVENTS_ATTR, int, 0),
            drop_reason=e.get(N.WATER_DROP_REASON_ATTR, str, ""),
            bytes_arrived=e.get(N.WATER_BYTES_ARRIVED_ATTR, int, 0),
            bytes_read=e.get(N.WATER_BYTES_READ_ATTR, int, 0),
            trigger=e.get(N.TRIGGER, str, required=True),
            tcp_state=e.get(N.WATER_TCP_STATE_ATTR, str, ""),
            ino=e.get(N.WATER_INODE_ATTR, int, 0), role=read.role))
    return (read, snaps, a.get(N.EVIDENCE_TOTAL, int),
            a.get(N.EVIDENCE_COMPLETE, bool))


def lost_of(span: dict, run: _Run, what: str) -> LostEvents:
    a = _Attrs(attributes(_get(span, "attributes"), what), what)
    ts = a.get(N.LOST_NS, int)
    if ts is None:
        if run.offset_ns is None:
            raise _Bad(f"{what} lacks {N.LOST_NS}")
        ts = _u64(_get(span, "startTimeUnixNano", "0"), f"{what} startTimeUnixNano") \
            - run.offset_ns
    return LostEvents(ts, a.get(N.PROBE, str, required=True),
                      a.get(N.LOST_TOTAL, int, required=True),
                      since_ns=a.get(N.LOST_SINCE_NS, int), count=a.get(N.LOST_COUNT, int),
                      until_ns=a.get(N.LOST_UNTIL_NS, int))


def spans_of(request: dict, what: str) -> Iterator[tuple[dict, dict, str, dict, str]]:
    """(resource attributes, scope, span kind: "read" | "lost", span, where) of otelwater's
    spans in one ExportTraceServiceRequest."""
    for i, rs in enumerate(_list(request, "resourceSpans", what)):
        rw = f"resourceSpans[{i}]"
        rs = _obj(rs, rw)
        res = attributes(_get(_obj(_get(rs, "resource", {}) or {}, f"{rw} resource"),
                              "attributes"), f"{rw} resource")
        scopes = _get(rs, "scopeSpans")
        key = "scopeSpans" if scopes is not None else "instrumentationLibrarySpans"
        for j, ss in enumerate(_list(rs, key, rw)):
            sw = f"{rw} {key}[{j}]"
            ss = _obj(ss, sw)
            scope = _get(ss, "scope") or _get(ss, "instrumentationLibrary") or {}
            for k, span in enumerate(_list(ss, "spans", sw)):
                where = f"{sw} span {k}"
                span = _obj(span, where)
                name = _get(span, "name")
                if name == N.READ_SPAN or (type(name) is str
                                           and name.startswith(N.READ_SPAN_PREFIX + " ")):
                    kvs = _get(span, "attributes") or []
                    if type(kvs) is list and any(type(kv) is dict and kv.get("key") == N.VERDICT
                                                 for kv in kvs):
                        yield res, scope, "read", span, f"{where} ({name})"
                elif name == N.LOST_SPAN and type(scope) is dict \
                        and scope.get("name") == N.SCOPE:
                    yield res, scope, "lost", span, f"{where} ({name})"


# -- the reader -----------------------------------------------------------------------------

class OtlpJsonReader:
    """Like recording.Reader: `header` on opening (RecordingError when the file holds no
    otelwater span, or breaks before the first), then iteration yields WaterSnapshot,
    ReadRecord, LostEvents, Notice and ProcessInfo records in time order; `amend(verdicts)`
    puts back the recorded evidence counts. `records` counts the lines read; `end` is None."""

    def __init__(self, path: str):
        self.path = path
        self.records = 0
        self.end = None
        self._amend: OrderedDict[tuple, tuple] = OrderedDict()
        self._file = None
        run = None
        for n, request in self._requests():
            try:
                for res, scope, kind, _span, _where in spans_of(request, f"line {n}"):
                    if kind == "read":
                        run = _run_of(res, str(_obj(scope, "scope").get("version", "")))
                        break
            except _Bad as e:
                self._raise(n, str(e), FIX_BAD)
            if run is not None:
                break
        self._close_file()
        if run is None:
            err = RecordingError(f"{path}: no otelwater spans in its {self.records} lines "
                                 f"(none named {N.READ_SPAN_PREFIX} ... with {N.VERDICT})",
                                 FIX_NONE)
            err.record = err.line = self.records
            raise err
        self.records = 0
        self.run = run
        offset = run.offset_ns or 0
        start = run.start_ns if run.start_ns is not None else 0
        self.header = Header(
            version=VERSION, start_ns=start, started_wall_ns=start + offset,
            clock={"realtime_minus_monotonic_ns": offset, "error_ns": 0,
                   "method": f"the spans' resource attribute {N.CLOCK_OFFSET_NS}"},
            host={"name": run.host} if run.host else {}, otelwater_version=run.version,
            options={}, config=run.config, processes={})

    def _raise(self, n: int, what: str, fix: str):
        err = RecordingError(f"{self.path}: line {n}: {what}", fix)
        err.record = err.line = n
        self._close_file()
        raise err

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _requests(self) -> Iterator[tuple[int, dict]]:
        """(line number, export request) of each trace line; other lines skipped."""
        try:
            self._file = open(self.path, "rb")
        except FileNotFoundError:
            raise RecordingError(f"{self.path}: no such file", FIX_BAD) from None
        except OSError as e:
            raise RecordingError(f"{self.path}: cannot read it: {e.strerror}",
                                 "check the path and its permissions") from None
        for raw in self._file:
            self.records += 1
            n = self.records
            if not raw.strip():
                continue
            try:
                d = json.loads(raw)
            except ValueError:
                if not raw.endswith(b"\n"):
                    self._raise(n, "the file ends inside this line: cut short", FIX_CUT)
                self._raise(n, f"not JSON: {raw[:40].decode(errors='replace')!r}", FIX_BAD)
            except RecursionError:
                self._raise(n, "JSON nested too deeply", FIX_BAD)
            if type(d) is not dict:
                self._raise(n, "not a JSON object", FIX_BAD)
            if _get(d, "resourceSpans") is not None:
                yield n, d
            elif d and not any(_get(d, k) is not None for k in REQUEST_KEYS):
                self._raise(n, "not an OTLP export request (no resourceSpans, "
                            "resourceMetrics or resourceLogs)", FIX_BAD)

    def _records_of(self, n: int, request: dict, seen_pids: set) -> list:
        """Every record of one line, or _Bad: a line is taken whole or not at all."""
        out = []
        for res, scope, kind, span, where in spans_of(request, f"line {n}"):
            run = _run_of(res, "")
            if kind == "lost":
                out.append((0, lost_of(span, run, where)))
                continue
            read, snaps, total, complete = read_of(span, res, run, where)
            if read.pid not in seen_pids:
                out.append((-1, _process_of(res, read.pid, read.ts_start_ns)))
            if (run.start_ns, run.offset_ns) != (self.run.start_ns, self.run.offset_ns):
                out.append((0, Notice(read.ts_start_ns, "otlp", "the file holds spans of "
                                      f"another otelwater run (started at {run.start_ns}): "
                                      "the verdict rules use the first run's attach time")))
            out.append((0, read))
            out.extend((0, s) for s in snaps)
            if total is not None and complete is not None:
                out.append((1, (read, total, complete)))
        return out

    def __iter__(self) -> Iterator:
        heap: list = []
        seq = 0
        newest = None
        seen: dict[tuple, int] = {}         # snapshots held or handed out lately
        seen_pids: set[int] = set()
        noticed = False
        pruned_at = 1 << 16
        amend = self._amend

        def release(until):
            while heap and (until is None or heap[0][0] < until or len(heap) > MAX_HELD):
                yield heapq.heappop(heap)[2]

        lines = self._requests()
        while True:
            try:
                item = next(lines, None)
                if item is None:
                    break
                n, request = item
                recs = self._records_of(n, request, seen_pids)
            except _Bad as e:
                yield from release(None)
                self._raise(n, str(e), FIX_BAD)
            except RecordingError:
                yield from release(None)
                raise
            for kind, rec in recs:
                if kind == -1:
                    seen_pids.add(rec.pid)
                    yield rec
                    continue
                if kind == 1:
                    read, total, complete = rec
                    amend[(read.pid, read.tid, read.fd, read.ts_start_ns, read.ts_end_ns)] = \
                        (total, complete)
                    if len(amend) > MAX_AMEND:
                        amend.popitem(last=False)
                    continue
                t = type(rec)
                if t is WaterSnapshot:
                    ts = rec.ts_ns
                    k = (rec.sock_key, ts, rec.trigger)
                    if k in seen:
                        continue
                    seen[k] = ts
                elif t is ReadRecord:
                    ts = rec.ts_end_ns
                elif t is Notice:
                    if noticed:
                        continue
                    noticed = True
                    ts = rec.ts_ns
                else:
                    ts = rec.ts_ns
                seq += 1
                heapq.heappush(heap, (ts, seq, rec))
                if newest is None or ts > newest:
                    newest = ts
            if newest is not None:
                yield from release(newest - HORIZON_NS)
                if len(seen) > pruned_at:      # forget what is long handed out
                    old = newest - 2 * HORIZON_NS
                    for k in [k for k, ts in seen.items() if ts < old]:
                        del seen[k]
                    pruned_at = max(1 << 16, 2 * len(seen))
        self._close_file()
        yield from release(None)

    def amend(self, records: list) -> list:
        """Verdicts with evidence_total and evidence_complete as the run decided them (the
        analysis here sees only the snapshots that were some read's evidence)."""
        from otelwater.events.verdict import Verdict

        out = []
        for r in records:
            if type(r) is Verdict:
                got = self._amend.pop((r.read.pid, r.read.tid, r.read.fd, r.read.ts_start_ns,
                                       r.read.ts_end_ns), None)
                if got is not None:
                    r = dataclasses.replace(r, evidence_total=got[0],
                                            evidence_complete=got[1])
            out.append(r)
        return out

    def close(self) -> None:
        self._close_file()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
