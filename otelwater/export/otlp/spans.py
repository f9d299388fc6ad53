"""The spans: one per slow read (its verdict) telling the kernel's story of the read as span
events, one per rise of a probe's lost records; and how they reach an OTLP receiver cheaply.

A verdict's span is "tcp read VERDICT PEER" (e.g. "tcp read peer-starved 10.0.0.5:5432"), kind
INTERNAL, from the read's start to its end in wall-clock time (otelwater.clock: CLOCK_MONOTONIC
+ an offset measured once); a consumer-lagging read's span starts earlier, when its oldest byte
arrived, so the bar holds the lag. Its events, in time order, are the read's story as the kernel
stamped it (story(): "queue empty, read parks", "request sent", "response arrives (N bytes
queued)", "goroutine runs, read returns N bytes", ...; each says its step in otelwater.step and
carries the wait that ends there, equal to the verdict's figure), its evidence snapshots
("otelwater.water") and the alert transitions of its socket (or its process) within `window_ns`
of the read ("otelwater.alert"). A read whose goroutine's labels name the request it served
(ReadRecord.trace_id and parent_span_id) is a child of that request's span (a remote parent);
else it is the root of its own trace. The spans alone rebuild the records exactly
(otelwater.events.otlpjson): each span also carries the read's CLOCK_MONOTONIC times and kernel
stamps, each water event the whole snapshot. Each rise of a probe's lost records is a
zero-length span "otelwater.lost". Names: otelwater.names; the reasons: docs/spans.md.

Cost. The SDK's way (Tracer.start_span, add_event, a BatchSpanProcessor, the exporter's
encoder) cost 0.45-0.8 ms of CPU a span with two events, mostly in cleaning every attribute
value (BoundedAttributes) and in encoding each attribute through generic Python; the story's
events would cost more. So a span here is a SpanData (plain values, made once); SpanSender
writes a batch of them in protobuf's wire format itself (WireEncoder: the same bytes as the
SDK's encoder, an attribute value that repeats encoded once, each resource once) and hands
the request to the SDK's own OTLPSpanExporter, which sends it with its retries, timeouts,
headers, compression and TLS (prebuilt_sender()). An exporter that is not one of those (the
in-memory one of the tests) gets the same spans as ReadableSpans (to_readable()).
tests/unit/test_span_story.py holds the two encodings equal; docs/spans.md says why.
"""

from __future__ import annotations

import os
import random
import re
import struct
import threading
import time
from collections import OrderedDict, deque

from otelwater import names as N
from otelwater.events.model import LostEvents, WaterSnapshot
from otelwater.events.verdict import CONSUMER_LAGGING
from otelwater.export.otlp.health import MAX_QUEUE, ExportHealth
from otelwater.export.series import MAX_SOCKETS, endpoint_attributes
from otelwater.sockkey import format_key

WINDOW_NS = 5_000_000           # alert transitions this near a read are its span events
ALERTS_KEPT = 16                # the latest alert transitions kept per socket or process
BATCH = 512                     # spans a request (OTEL_BSP_MAX_EXPORT_BATCH_SIZE)
DELAY_S = 5.0                   # the most a span waits for a full batch (OTEL_BSP_SCHEDULE_DELAY)
KIND_INTERNAL = 1               # opentelemetry.proto Span.SpanKind.SPAN_KIND_INTERNAL
FLAGS_HAS_IS_REMOTE = 0x100     # Span.flags: the parent's is_remote is known ...
FLAGS_IS_REMOTE = 0x200         # ... and it is remote
_HEX_TRACE = re.compile(r"[0-9a-f]{32}")
_HEX_SPAN = re.compile(r"[0-9a-f]{16}")

# the story's words by the socket's role: what we send, what arrives
_SENT = {"dialed": "request sent", "accepted": "response sent"}
_ARRIVES = {"dialed": "response arrives", "accepted": "request arrives"}


def caller(stack) -> str | None:
    """The function that called net.(*conn).Read (the frame above it), else the first frame
    above the read machinery."""
    for i, name in enumerate(stack):
        if name == N.READ_SPAN and i + 1 < len(stack):
            return stack[i + 1]
    from otelwater.export.live import caller as live_caller

    return live_caller(tuple(stack)) if stack else None


def water_event_attributes(s: WaterSnapshot) -> dict:
    return {N.WATER_LEVEL_ATTR: s.level, N.WATER_VOLUME_ATTR: s.volume,
            N.WATER_UNREAD_ATTR: s.unread_bytes, N.WATER_CAPACITY_ATTR: s.capacity,
            N.WATER_FILL_RATIO_ATTR: round(s.fill_ratio, 6), N.WATER_DROPS_ATTR: s.drops,
            N.TRIGGER: s.trigger,
            # the rest of the snapshot, so otelwater.events.otlpjson rebuilds it exactly
            N.WATER_PID_ATTR: s.pid, N.WATER_TID_ATTR: s.tid, N.WATER_COMM_ATTR: s.comm,
            N.WATER_NETNS_ATTR: s.netns, N.WATER_INODE_ATTR: s.ino,
            N.WATER_BACKLOG_ATTR: s.backlog, N.WATER_DROP_EVENTS_ATTR: s.drop_events,
            N.WATER_DROP_REASON_ATTR: s.drop_reason, N.WATER_BYTES_ARRIVED_ATTR: s.bytes_arrived,
            N.WATER_BYTES_READ_ATTR: s.bytes_read, N.WATER_TCP_STATE_ATTR: s.tcp_state}


def alert_event_attributes(a) -> dict:
    d = {N.ALERT_RULE: a.rule, N.ALERT_STATE: a.state, N.ALERT_SEVERITY: a.severity,
         N.ALERT_VALUE: float(a.value), N.ALERT_THRESHOLD: float(a.threshold)}
    if a.previous:
        d[N.ALERT_PREVIOUS] = a.previous
    if a.reason:
        d[N.ALERT_REASON] = a.reason
    return d


def alert_key(a) -> tuple:
    """What an alert transition is about: its socket, or (process scope) its process."""
    return (a.sock_key,) if a.sock_key else ("pid", a.pid)


class AlertWindow:
    """The latest alert transitions of each socket and process (ALERTS_KEPT each, MAX_SOCKETS
    sockets and processes, the least recently alerted forgotten first): a read's span takes
    those within its window as events."""

    def __init__(self, window_ns: int = WINDOW_NS):
        self.window_ns = window_ns
        self.recent: OrderedDict[tuple, deque] = OrderedDict()

    def add(self, a) -> None:
        key = alert_key(a)
        q = self.recent.get(key)
        if q is None:
            q = self.recent[key] = deque(maxlen=ALERTS_KEPT)
            if len(self.recent) > MAX_SOCKETS:
                self.recent.popitem(last=False)
        else:
            self.recent.move_to_end(key)
        q.append(a)

    def near(self, r) -> list:
        """The transitions of the read's socket and of its process within the window."""
        lo, hi = r.ts_start_ns - self.window_ns, r.ts_end_ns + self.window_ns
        return [a for key in ((r.sock_key,), ("pid", r.pid))
                for a in self.recent.get(key, ()) if lo <= a.ts_ns <= hi]


# -- what a read's span says -------------------------------------------------------------------

def read_span_attributes(v, ends: tuple | None) -> dict:
    """The attributes of a verdict's span; `ends` (laddr, lport, raddr, rport) of its socket
    when known. The peer (the read's own, else its socket's) is network.peer.address/port, and
    by the semantic conventions also server.address/port on a dialed socket (the peer serves
    us) or client.address/port on an accepted one (the peer is our client)."""
    r = v.read
    attrs = {N.SOCKET_KEY: format_key(r.sock_key)}
    if ends is not None:
        attrs.update(endpoint_attributes(r.pid, r.sock_key, ends))
    else:
        attrs[N.PROCESS_PID] = r.pid
    if r.peer_addr:
        attrs[N.NETWORK_PEER_ADDRESS] = r.peer_addr
        attrs[N.NETWORK_PEER_PORT] = r.peer_port
    if r.role:
        attrs[N.SOCKET_ROLE] = r.role
        if N.NETWORK_PEER_ADDRESS in attrs and r.role in ("dialed", "accepted"):
            addr, port = ((N.SERVER_ADDRESS, N.SERVER_PORT) if r.role == "dialed"
                          else (N.CLIENT_ADDRESS, N.CLIENT_PORT))
            attrs[addr] = attrs[N.NETWORK_PEER_ADDRESS]
            attrs[port] = attrs[N.NETWORK_PEER_PORT]
    attrs[N.THREAD_ID] = r.tid
    fn = caller(r.stack)
    if fn:
        attrs[N.CODE_FUNCTION] = fn
    if r.stack:
        attrs[N.CODE_STACKTRACE] = "\n".join(r.stack)
    if r.goid is not None:
        attrs[N.GOROUTINE_ID] = r.goid
    if r.go_start:
        attrs[N.GOROUTINE_START] = r.go_start
    attrs[N.FD] = r.fd
    attrs[N.VERDICT] = v.verdict
    attrs[N.VERDICT_REASON] = v.reason
    for k, val in ((N.WAIT_PEER_NS, v.wait_peer_ns), (N.WAIT_RUN_NS, v.wait_run_ns),
                   (N.WAIT_IDLE_NS, v.wait_idle_ns), (N.QUEUE_DELAY_NS, v.queue_delay_ns)):
        if val is not None:
            attrs[k] = val
    attrs[N.READ_REQUESTED] = r.requested
    attrs[N.READ_RETURNED] = r.returned
    # the rest of the read, exact (otelwater.events.otlpjson rebuilds it from these)
    if r.comm:
        attrs[N.THREAD_NAME] = r.comm
    attrs[N.READ_SOURCE] = r.source
    attrs[N.READ_START_NS] = r.ts_start_ns
    attrs[N.READ_END_NS] = r.ts_end_ns
    for k, val in ((N.READ_PARKED, r.parked), (N.READ_ARRIVAL_NS, r.ts_arrival_ns),
                   (N.READ_QUEUE_DELAY_EXACT, r.queue_delay_exact),
                   (N.READ_SEND_NS, r.ts_send_ns), (N.READ_PREV_ARRIVAL_NS, r.ts_prev_arrival_ns),
                   (N.READ_KERNEL_VERDICT, r.kernel_verdict)):
        if val is not None:
            attrs[k] = val
    if r.link_note:
        attrs[N.LINK_SKIPPED] = r.link_note
    if not linked(r):     # ids that make no link are kept, so nothing the kernel read is lost
        if r.trace_id:
            attrs[N.LINK_TRACE_ID] = r.trace_id
        if r.parent_span_id:
            attrs[N.LINK_PARENT_SPAN_ID] = r.parent_span_id
    attrs[N.EVIDENCE_TOTAL] = v.evidence_total
    attrs[N.EVIDENCE_COMPLETE] = v.evidence_complete
    return attrs


def linked(r) -> bool:
    """The read names the request it served: a valid trace id and parent span id (lowercase
    hex, not all zeros), so its span is that span's child."""
    t, p = r.trace_id, r.parent_span_id
    return bool(t and p and _HEX_TRACE.fullmatch(t) and _HEX_SPAN.fullmatch(p)
                and t.strip("0") and p.strip("0"))


def span_name(verdict: str, role: str, attrs: dict) -> str:
    """"tcp read VERDICT PEER": the peer a dialed socket's server (address:port), an accepted
    socket's client address (its port is a new one per connection: left out, so a name stays
    one per client), an unknown role's address."""
    addr = attrs.get(N.NETWORK_PEER_ADDRESS)
    if not addr:
        return f"{N.READ_SPAN_PREFIX} {verdict}"
    if role == "dialed":
        host = f"[{addr}]" if ":" in addr else addr
        return f"{N.READ_SPAN_PREFIX} {verdict} {host}:{attrs[N.NETWORK_PEER_PORT]}"
    return f"{N.READ_SPAN_PREFIX} {verdict} {addr}"


def _bytes(n: int) -> str:
    return "1 byte" if n == 1 else f"{n} bytes"


def _returns(r) -> str:
    n = r.returned
    if n > 0:
        return f"read returns {_bytes(n)}"
    if n == 0:
        return "read returns EOF (the peer closed)"
    try:
        why = os.strerror(-n)
    except ValueError:
        why = f"errno {-n}"
    return f"read returns an error: {why} ({n})"


def story(v) -> list[tuple[int, int, str, dict]]:
    """The read's story as (CLOCK_MONOTONIC ns, order, name, attributes) events, from the
    stamps the kernel put on it; each event carries the wait that ends at it (the verdict's own
    figure: the events' times differ by exactly those where the stamps are consistent).

    Parked (it found the queue empty): "queue empty, read parks" at its start; our last send
    ("request sent" on a dialed socket, "response sent" on an accepted one; it ends the idle
    part when it went out during the park); the arrival that woke it ("response arrives (N
    bytes queued)": the queue then, when a snapshot was taken at that arrival; it ends the wait
    for the peer, or the idle wait); the return ("goroutine runs, read returns N bytes": the
    wait to run). Not parked: the arrival of its oldest byte (its end less its queue delay),
    the read coming with bytes queued (the latest snapshot at or before it), its return (the
    queue delay). Whether it parked unknown: its start and its return."""
    r = v.read
    start, end, role = r.ts_start_ns, r.ts_end_ns, r.role
    S = N.STORY_STEP
    out: list[tuple[int, int, str, dict]] = []
    if r.parked is True:
        out.append((start, 0, "queue empty, read parks", {S: "park"}))
        send, arrival = r.ts_send_ns, r.ts_arrival_ns
        idle_ends_at_send = (role == "dialed" and send is not None and arrival is not None
                             and start < send <= arrival)
        if send:
            attrs = {S: "send"}
            if idle_ends_at_send and v.wait_idle_ns is not None:
                attrs[N.WAIT_IDLE_NS] = v.wait_idle_ns
            out.append((send, 1, _SENT.get(role, "data sent"), attrs))
        if arrival is not None:
            attrs = {S: "arrival"}
            if v.wait_peer_ns is not None:
                attrs[N.WAIT_PEER_NS] = v.wait_peer_ns
            if v.wait_idle_ns and not idle_ends_at_send:
                attrs[N.WAIT_IDLE_NS] = v.wait_idle_ns
            name = _ARRIVES.get(role, "data arrives")
            queued = next((s.unread_bytes for s in v.evidence
                           if s.ts_ns == arrival and s.trigger == "arrival"), None)
            if queued is not None:
                attrs[N.WATER_UNREAD_ATTR] = queued
                name = f"{name} ({_bytes(queued)} queued)"
            out.append((arrival, 2, name, attrs))
        attrs = {S: "return", N.READ_RETURNED: r.returned}
        if v.wait_run_ns is not None:
            attrs[N.WAIT_RUN_NS] = v.wait_run_ns
        if v.wait_idle_ns is not None and arrival is None:
            attrs[N.WAIT_IDLE_NS] = v.wait_idle_ns
        ran = "goroutine runs, " if arrival is not None and r.returned > 0 else ""
        out.append((end, 3, ran + _returns(r), attrs))
        return out
    qd = r.queue_delay_ns
    if r.parked is False:
        if qd is not None:
            out.append((end - qd, 0, "oldest byte arrives", {S: "oldest_byte"}))
        attrs = {S: "read"}
        before = [s for s in v.evidence if s.ts_ns <= start]
        if before:
            s = before[-1]
            attrs[N.WATER_UNREAD_ATTR] = s.unread_bytes
            attrs[N.WATER_LEVEL_ATTR] = s.level
            name = f"read comes, {_bytes(s.unread_bytes)} queued"
        else:
            name = "read comes, data waiting"
        out.append((start, 1, name, attrs))
    else:
        out.append((start, 1, "read begins", {S: "read"}))
    attrs = {S: "return", N.READ_RETURNED: r.returned}
    if qd is not None:
        attrs[N.QUEUE_DELAY_NS] = qd
    out.append((end, 3, _returns(r), attrs))
    return out


class SpanData:
    """One span as plain values, made once, encoded by to_proto() or to_readable(): ids as
    ints (parent_id 0: a root), times in wall-clock ns, attributes a dict of str, int, float
    and bool, events (wall ns, name, attributes) in time order. `remote`: the parent is
    another process's span."""

    __slots__ = ("name", "trace_id", "span_id", "parent_id", "remote", "start_ns", "end_ns",
                 "attributes", "events")

    def __init__(self, name, trace_id, span_id, parent_id, remote, start_ns, end_ns,
                 attributes, events):
        self.name = name
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent_id = parent_id
        self.remote = remote
        self.start_ns = start_ns
        self.end_ns = end_ns
        self.attributes = attributes
        self.events = events


def _span_id() -> int:
    """A random span id, never 0 (the SDK's RandomIdGenerator's way)."""
    while True:
        i = random.getrandbits(64)
        if i:
            return i


def _trace_id() -> int:
    while True:
        i = random.getrandbits(128)
        if i:
            return i


def read_span(v, ends: tuple | None, alerts: list, wall) -> SpanData:
    """The span of a verdict (module docstring); `wall` turns CLOCK_MONOTONIC ns into
    wall-clock ns."""
    r = v.read
    attrs = read_span_attributes(v, ends)
    events = [(ts, order, name, ev) for ts, order, name, ev in story(v)]
    events.extend((s.ts_ns, 4, N.WATER_EVENT, water_event_attributes(s)) for s in v.evidence)
    events.extend((a.ts_ns, 5, N.ALERT_EVENT, alert_event_attributes(a)) for a in alerts)
    events.sort(key=lambda e: (e[0], e[1]))
    start = r.ts_start_ns
    if v.verdict == CONSUMER_LAGGING and r.queue_delay_ns is not None:
        start = min(start, r.ts_end_ns - r.queue_delay_ns)   # the bar holds the lag
    if linked(r):
        trace_id, parent_id = int(r.trace_id, 16), int(r.parent_span_id, 16)
    else:
        trace_id, parent_id = _trace_id(), 0
    return SpanData(span_name(v.verdict, r.role, attrs), trace_id, _span_id(), parent_id,
                    parent_id != 0, wall(start), wall(r.ts_end_ns), attrs,
                    [(wall(ts), name, ev) for ts, _, name, ev in events])


def lost_span(r: LostEvents, wall) -> SpanData:
    """A located loss, or a rise of a probe's lost records, as a zero-length span at the
    record's time, so the spans alone say which reads a loss makes unknown (located: the
    count and the first and last loss's times, as the kernel put them on the next record)."""
    t = wall(r.ts_ns)
    attrs = {N.PROBE: r.probe, N.LOST_TOTAL: r.lost_total, N.LOST_NS: r.ts_ns}
    if r.since_ns is not None:
        attrs[N.LOST_SINCE_NS] = r.since_ns
        attrs[N.LOST_COUNT] = r.count or 0
        if r.until_ns is not None:
            attrs[N.LOST_UNTIL_NS] = r.until_ns
    return SpanData(N.LOST_SPAN, _trace_id(), _span_id(), 0, False, t, t, attrs, [])


class ExemplarContext:
    """`with ExemplarContext(span):` the span's ids are the current span context, so the
    metrics recorded inside take them as exemplars (sampled, as the span is)."""

    __slots__ = ("span", "token")

    def __init__(self, span: SpanData):
        self.span = span

    def __enter__(self):
        from opentelemetry import context, trace

        ctx = trace.SpanContext(self.span.trace_id, self.span.span_id, False,
                                trace.TraceFlags(trace.TraceFlags.SAMPLED))
        self.token = context.attach(trace.set_span_in_context(trace.NonRecordingSpan(ctx)))
        return self

    def __exit__(self, *exc):
        from opentelemetry import context

        context.detach(self.token)


# -- encodings -------------------------------------------------------------------------------

def scope():
    """otelwater's InstrumentationScope (of its spans and meters)."""
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    from otelwater import __version__

    return InstrumentationScope(N.SCOPE, __version__)


def to_readable(s: SpanData, resource, instrumentation_scope=None):
    """The span as the SDK's ReadableSpan (what any SpanExporter or SpanProcessor takes)."""
    from opentelemetry.sdk.trace import Event, ReadableSpan
    from opentelemetry.trace import SpanContext, SpanKind, TraceFlags

    sampled = TraceFlags(TraceFlags.SAMPLED)
    parent = (SpanContext(s.trace_id, s.parent_id, s.remote, sampled) if s.parent_id
              else None)
    return ReadableSpan(
        s.name, SpanContext(s.trace_id, s.span_id, False, sampled), parent, resource,
        s.attributes, tuple(Event(name, a, ts) for ts, name, a in s.events),
        kind=SpanKind.INTERNAL, start_time=s.start_ns, end_time=s.end_ns,
        instrumentation_scope=instrumentation_scope or scope())


# OTLP's protobuf wire format, written directly (opentelemetry/proto/trace/v1/trace.proto;
# tests/unit/test_span_story.py parses what this writes and compares it with the SDK's
# encoding of the same spans). A field is a tag (number << 3 | wire type) then its value:
# varint, fixed64 (8 bytes little-endian), or length-prefixed bytes (strings, messages).
_SMALL = [bytes((i,)) for i in range(128)]
_SPAN_ATTR = b"\x4a"            # Span.attributes = 9, length-prefixed
_EVENT = b"\x5a"                # Span.events = 11
_EVENT_ATTR = b"\x1a"           # Span.Event.attributes = 3
_CACHE_MAX = 1 << 16            # encoded attributes kept for reuse (cleared when full)


def _varint(n: int) -> bytes:
    if n < 0x80:
        return _SMALL[n]
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: bytes, body: bytes) -> bytes:
    """A length-prefixed field: its tag, its length, its bytes."""
    return tag + _varint(len(body)) + body


def _any_value(k: str, v) -> bytes:
    """An AnyValue (string 1, bool 2, int64 3, double 4) of a span's attribute value."""
    t = type(v)
    if t is str:
        return _field(b"\x0a", v.encode())
    if t is bool:
        return b"\x10\x01" if v else b"\x10\x00"
    if t is int:
        return b"\x18" + _varint(v if v >= 0 else v + (1 << 64))
    if t is float:
        return b"\x21" + struct.pack("<d", v)
    raise TypeError(f"attribute {k} is a {t.__name__}: spans take str, int, float, bool")


class WireEncoder:
    """Spans into OTLP protobuf bytes, the attributes' encodings kept for reuse: most values
    repeat from span to span (the process, the socket, the stack, the verdict, a snapshot's
    capacity and state), and a repeated one costs a dictionary look-up instead of its
    encoding. Large integers (times, byte counters) are not kept: they seldom repeat. An
    attribute key always has values of one type (otelwater.names), so a value is looked up by
    (key, value). One per sending thread (not thread-safe)."""

    def __init__(self):
        self._kv: dict[bytes, dict[tuple, bytes]] = {}   # tag -> (key, value) -> the field
        self._keys: dict[str, bytes] = {}                 # key -> KeyValue.key, encoded
        self._resources: dict[int, tuple] = {}   # id(resource) -> (resource, its fields)

    def _attrs(self, out: list, tag: bytes, attrs: dict) -> None:
        cache = self._kv.get(tag)
        if cache is None:
            cache = self._kv[tag] = {}
        for kv in attrs.items():
            b = cache.get(kv)
            if b is None:
                k, v = kv
                kb = self._keys.get(k)
                if kb is None:
                    kb = self._keys[k] = _field(b"\x0a", k.encode())
                b = _field(tag, kb + _field(b"\x12", _any_value(k, v)))
                if type(v) is not int or -(1 << 20) < v < 1 << 20:
                    if len(cache) >= _CACHE_MAX:
                        cache.clear()
                    cache[kv] = b
            out.append(b)

    def span(self, s: SpanData) -> bytes:
        """One Span message (as the SDK's encoder would have it), its fields in number
        order."""
        out = [b"\x0a\x10", s.trace_id.to_bytes(16, "big"), b"\x12\x08",
               s.span_id.to_bytes(8, "big")]
        flags = FLAGS_HAS_IS_REMOTE
        if s.parent_id:
            out += (b"\x22\x08", s.parent_id.to_bytes(8, "big"))
            if s.remote:
                flags |= FLAGS_IS_REMOTE
        out += (_field(b"\x2a", s.name.encode()), b"\x30", _SMALL[KIND_INTERNAL],
                b"\x39", struct.pack("<Q", s.start_ns), b"\x41", struct.pack("<Q", s.end_ns))
        self._attrs(out, _SPAN_ATTR, s.attributes)
        for ts, name, attrs in s.events:
            ev = [b"\x09", struct.pack("<Q", ts), _field(b"\x12", name.encode())]
            self._attrs(ev, _EVENT_ATTR, attrs)
            out.append(_field(_EVENT, b"".join(ev)))
        out += (b"\x7a\x00",                       # status: unset
                b"\x85\x01", struct.pack("<I", flags))   # flags = 16, fixed32
        return b"".join(out)

    def _resource(self, resource, instrumentation_scope) -> tuple[bytes, bytes]:
        """(ResourceSpans.resource, ScopeSpans.scope) fields of a resource, encoded once."""
        got = self._resources.get(id(resource))
        if got is None or got[0] is not resource:
            if len(self._resources) > 4096:   # retired services' resources: start again
                self._resources.clear()
            attrs: list = []
            self._attrs(attrs, b"\x0a", dict(resource.attributes))   # Resource.attributes = 1
            sc = _field(b"\x0a", instrumentation_scope.name.encode())
            if instrumentation_scope.version:
                sc += _field(b"\x12", instrumentation_scope.version.encode())
            got = self._resources[id(resource)] = (
                resource, _field(b"\x0a", b"".join(attrs)), _field(b"\x0a", sc))
        return got[1], got[2]

    def request(self, batch: list) -> bytes:
        """An ExportTraceServiceRequest of (resource, SpanData) pairs: a ResourceSpans per
        resource (in the order they first come) with one ScopeSpans, otelwater's."""
        groups: dict[int, list] = {}
        for resource, s in batch:
            g = groups.get(id(resource))
            if g is None:
                g = groups[id(resource)] = [resource]
            g.append(s)
        sc = scope()
        out = []
        for resource, *spans in groups.values():
            res, scope_field = self._resource(resource, sc)
            ss = [scope_field]
            ss.extend(_field(b"\x12", self.span(s)) for s in spans)   # ScopeSpans.spans = 2
            rs = res + _field(b"\x12", b"".join(ss))                    # .scope_spans = 2
            if resource.schema_url:
                rs += _field(b"\x1a", resource.schema_url.encode())
            out.append(_field(b"\x0a", rs))           # ExportTraceServiceRequest.resource_spans
        return b"".join(out)


def prebuilt_sender(exporter):
    """A function sending a built ExportTraceServiceRequest (bytes, and how many spans it
    holds) through the SDK's own OTLP span exporter (its transport, retries, deadline,
    headers, compression, TLS; True when delivered), or None when `exporter` is not one whose
    transport takes a built request (then it gets ReadableSpans).

    gRPC: OTLPSpanExporter's export() runs its retry loop around
    `self._client.Export(request=self._translate_data(spans))`, `_client` made by
    `self._stub(channel)`: this exporter's stub takes the built bytes as they are (a method on
    the same channel whose serializer passes bytes through) and `_translate_data` returns them;
    where the exporter has no such stub or channel, the bytes are parsed back (in C). HTTP: OTLPSpanExporter's export() encodes, then gives the bytes to
    its client (`_client.export`, in the SDK's recent HTTP exporters), which sends and retries;
    the bytes go there. Both are checked here, so another SDK layout falls back to the standard
    way instead of failing."""
    from opentelemetry.sdk.trace.export import SpanExportResult

    Grpc = None     # gRPC's exporter is imported only for a gRPC exporter: grpcio's module
    if type(exporter).__module__.startswith("opentelemetry.exporter.otlp.proto.grpc"):
        try:        # alone is ~18 MB of a process's memory
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import \
                OTLPSpanExporter as Grpc
        except ImportError:   # grpcio missing: HTTP only
            pass
    if (Grpc is not None and type(exporter) is Grpc and hasattr(Grpc, "_translate_data")
            and hasattr(Grpc, "_count_data") and hasattr(exporter, "_export")):
        exporter._count_data = _counted
        channel = getattr(exporter, "_channel", None)
        if (callable(getattr(exporter, "_stub", None)) and channel is not None
                and callable(getattr(channel, "unary_unary", None))):
            # the bytes as they are: a stub whose Export takes a built request (its
            # serializer passes bytes through), made again with each channel the exporter
            # reconnects with (_initialize_channel_and_stub calls self._stub(channel))
            exporter._stub = _RawTraceStub
            exporter._client = _RawTraceStub(channel)
            exporter._translate_data = _body
        else:   # parsed back into the message (in C), for the SDK's own stub
            exporter._translate_data = _parsed
        return lambda body, n: exporter._export((body, n)) == SpanExportResult.SUCCESS
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as Http

    client = getattr(exporter, "_client", None)
    if type(exporter) is Http and callable(getattr(client, "export", None)):
        def send(body: bytes, n: int) -> bool:
            if getattr(exporter, "_shutdown", False):
                return False
            return bool(client.export(body).success)

        return send
    return None


class _RawTraceStub:
    """TraceService's Export on a gRPC channel, taking the request as serialized bytes."""

    def __init__(self, channel):
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import \
            ExportTraceServiceResponse

        self.Export = channel.unary_unary(
            "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
            request_serializer=None, response_deserializer=ExportTraceServiceResponse.FromString)


def _body(built: tuple) -> bytes:
    return built[0]


def _parsed(built: tuple):
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import \
        ExportTraceServiceRequest

    return ExportTraceServiceRequest.FromString(built[0])


def _counted(built: tuple) -> int:
    return built[1]


# -- out -------------------------------------------------------------------------------------

class SpanSender:
    """Batches of (resource, SpanData) out through one SDK span exporter, counted in `health`:
    built into a request and sent by the exporter's own transport (prebuilt_sender()), or as
    ReadableSpans to its export() when it is another kind of exporter."""

    def __init__(self, exporter, health: ExportHealth):
        self.exporter = exporter
        self.health = health
        self._send = prebuilt_sender(exporter)
        self._encoder = WireEncoder()

    @property
    def prebuilt(self) -> bool:
        """The fast way: requests built here (False: ReadableSpans to the exporter)."""
        return self._send is not None

    def send(self, batch: list) -> bool:
        """Export one batch; True when delivered (a failure is counted, never raised)."""
        from opentelemetry.sdk.trace.export import SpanExportResult

        if not batch:
            return True
        t0 = time.monotonic()
        try:
            if self._send is not None:
                ok = self._send(self._encoder.request(batch), len(batch))
            else:
                sc = scope()
                ok = self.exporter.export([to_readable(s, res, sc) for res, s in batch]) \
                    == SpanExportResult.SUCCESS
        except Exception:  # noqa: BLE001 - an exporter bug must not stop export
            ok = False
        if ok:
            self.health.exported(spans=len(batch))
        else:
            self.health.dropped(spans=len(batch), took_s=time.monotonic() - t0)
        return ok

    def shutdown(self) -> None:
        try:
            self.exporter.shutdown()
        except Exception:  # noqa: BLE001
            pass


def bsp_setting(var: str, default: float) -> float:
    """A positive OTEL_BSP_* value, else `default` (as the SDK's BatchSpanProcessor reads it)."""
    try:
        value = float(os.environ.get(var, ""))
    except ValueError:
        return default
    return value if value > 0 else default


class SpanExport:
    """The live sink's span processor, in place of the SDK's BatchSpanProcessor: add_span()
    appends to a bounded queue (`max_queue`; when full the oldest span is dropped and counted,
    as the SDK does) and returns; a thread of its own sends a batch when `batch` spans wait or
    `delay_s` has passed, so a slow or absent Collector never holds the caller. One per sink,
    shared by its services: a request carries the spans of every service."""

    def __init__(self, exporter, health: ExportHealth, *, max_queue: int = MAX_QUEUE,
                 batch: int | None = None, delay_s: float | None = None):
        self.sender = SpanSender(exporter, health)
        self.health = health
        self.max_queue = max_queue
        self.batch = int(batch or bsp_setting("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", BATCH))
        self.delay_s = delay_s or bsp_setting("OTEL_BSP_SCHEDULE_DELAY", DELAY_S * 1000) / 1000
        self._queue: deque = deque()
        self._sending = 0                 # spans taken by the thread, not yet sent
        self._flushes = 0                 # force_flush() calls waiting
        self._stopping = False
        self._cv = threading.Condition(threading.Lock())
        self._thread = threading.Thread(target=self._run, name="otelwater-spans", daemon=True)
        self._thread.start()

    def add_span(self, resource, span: SpanData) -> None:
        with self._cv:
            if self._stopping:
                return
            full = len(self._queue) >= self.max_queue
            if full:
                self._queue.popleft()
            self._queue.append((resource, span))
            if len(self._queue) >= self.batch:
                self._cv.notify_all()
        if full:
            self.health.overflow(1)

    def _run(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: len(self._queue) >= self.batch or self._stopping
                                  or (self._flushes and self._queue), self.delay_s)
                if not self._queue:
                    if self._stopping:
                        return
                    continue
                n = min(self.batch, len(self._queue))
                batch = [self._queue.popleft() for _ in range(n)]
                self._sending = n
            try:
                self.sender.send(batch)
            finally:
                with self._cv:
                    self._sending = 0
                    self._cv.notify_all()

    def force_flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until every span added so far has been sent (or failed); False at the
        timeout."""
        with self._cv:
            self._flushes += 1
            self._cv.notify_all()
            try:
                return self._cv.wait_for(lambda: not self._queue and not self._sending,
                                         timeout_s)
            finally:
                self._flushes -= 1

    def shutdown(self, timeout_s: float) -> None:
        """Send what is queued within `timeout_s`, then close the exporter (which interrupts
        its retries when the thread is still sending: the rest fails fast)."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._thread.join(max(0.0, timeout_s))
        self.interrupt()
        self._thread.join(0.5)

    def interrupt(self) -> None:
        self.sender.shutdown()
