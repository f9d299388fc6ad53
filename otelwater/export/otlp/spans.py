"""The spans: one per slow read (its verdict), with its evidence and the alerts near it as
span events, and one per rise of a probe's lost records.

A verdict's span is "net.(*conn).Read", kind INTERNAL, from the read's start to its end in
wall-clock time (otelwater.clock: CLOCK_MONOTONIC + an offset measured once); its evidence
snapshots and the alert transitions of its socket (or its process) within `window_ns` of the
read are span events at their own times. The spans alone rebuild the records exactly
(otelwater.events.otlpjson, `otelwater correlate` of the Collector's OTLP JSON file): each
span also carries the read's CLOCK_MONOTONIC times and kernel stamps (its socket role, our last
send, the arrival before its park, the kernel's verdict), each water event the
whole snapshot; each rise of a probe's lost records is a zero-length span "otelwater.lost".
Names: otelwater.names.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from otelwater import names as N
from otelwater.events.model import LostEvents, WaterSnapshot
from otelwater.export.series import MAX_SOCKETS, endpoint_attributes
from otelwater.sockkey import format_key

WINDOW_NS = 5_000_000           # alert transitions this near a read are its span events
ALERTS_KEPT = 16                # the latest alert transitions kept per socket or process


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
    attrs[N.EVIDENCE_TOTAL] = v.evidence_total
    attrs[N.EVIDENCE_COMPLETE] = v.evidence_complete
    return attrs


def start_read_span(tracer, v, ends: tuple | None, alerts: list, wall):
    """The span of a verdict, started with its events (the caller ends it at
    wall(v.read.ts_end_ns), after recording what should carry its ids as exemplars)."""
    from opentelemetry.trace import SpanKind

    r = v.read
    span = tracer.start_span(N.READ_SPAN, kind=SpanKind.INTERNAL,
                             attributes=read_span_attributes(v, ends),
                             start_time=wall(r.ts_start_ns))
    events = [(s.ts_ns, 0, N.WATER_EVENT, water_event_attributes(s)) for s in v.evidence]
    events.extend((a.ts_ns, 1, N.ALERT_EVENT, alert_event_attributes(a)) for a in alerts)
    events.sort(key=lambda e: (e[0], e[1]))
    for ts, _, name, ev in events:
        span.add_event(name, ev, timestamp=wall(ts))
    return span


def lost_span(tracer, r: LostEvents, wall) -> None:
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
    tracer.start_span(N.LOST_SPAN, start_time=t, attributes=attrs).end(t)
