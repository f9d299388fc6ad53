"""Every name otelwater exports: metric instruments (name, kind, unit, description), attribute
keys and span and event names, in one place. The OTLP sink and the Prometheus endpoint use
these and nothing else, and the OTLP JSON reader (events/otlpjson.py) reads spans back by them:
so they sit below both the records and the sinks.

OpenTelemetry semantic-convention names where one exists (network.*, process.*, thread.id,
code.*, service.*, host.name); everything else under `otelwater.`. Units are UCUM as the
conventions use them: "By" bytes, "s" seconds, "1" a ratio, "{skb}" a count of things.
The Prometheus names are what the OpenTelemetry Prometheus exporter derives from these
(otelwater_socket_water_volume_bytes, otelwater_read_duration_seconds_bucket,
otelwater_read_verdicts_total, otelwater_records_cut_total,
otelwater_read_verdict_duration_seconds_bucket, otelwater_read_verdict_wait_seconds_bucket, ...).

The verdict counts (READ_VERDICTS, RECORDS_CUT, VERDICT_DURATION, VERDICT_WAIT) are the
kernel's exact counts by process (resource), VERDICT and SOCKET_ROLE where it counts the slow
reads, else the verdicts' (otelwater.export.tally). RECORDS_CUT counts what the record token
bucket (--record-rate) kept off the ring buffer: those reads are in READ_VERDICTS and the
verdict histograms, and in nothing else (no read record, verdict or span; READ_DURATION, the
histogram whose exemplars name spans, holds the slow reads that got a verdict record).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Instrument:
    name: str
    kind: str          # gauge, counter, histogram, updowncounter
    unit: str
    description: str


# -- metrics ---------------------------------------------------------------------------------
WATER_LEVEL = Instrument("otelwater.socket.water.level", "gauge", "{skb}",
                         "Water level: skbs queued in the socket's receive queue "
                         "(sk_receive_queue.qlen).")
WATER_VOLUME = Instrument("otelwater.socket.water.volume", "gauge", "By",
                          "Water volume: bytes charged to the receive queue (sk_rmem_alloc, "
                          "ss -tm r).")
WATER_UNREAD = Instrument("otelwater.socket.water.unread", "gauge", "By",
                          "Unread payload bytes (rcv_nxt - copied_seq: SIOCINQ, ss Recv-Q).")
CAPACITY = Instrument("otelwater.socket.capacity", "gauge", "By",
                      "Receive buffer capacity (sk_rcvbuf, ss -tm rb).")
FILL_RATIO = Instrument("otelwater.socket.fill_ratio", "gauge", "1",
                        "Fill ratio: water volume / capacity.")
DROPS = Instrument("otelwater.socket.drops", "counter", "{packet}",
                   "Packets the socket dropped (increase of the kernel's sk_drops).")
READ_DURATION = Instrument("otelwater.read.duration", "histogram", "s",
                           "Duration of slow Go reads (net.(*conn).Read); exemplars point at "
                           "each read's span.")
READ_VERDICTS = Instrument("otelwater.read.verdicts", "counter", "{read}",
                           "Slow Go reads by verdict and socket role: the kernel's exact "
                           "count where it counts them (idle reads included, whatever the "
                           "ring buffer lost or --record-rate cut), else the verdicts given.")
RECORDS_CUT = Instrument("otelwater.records.cut", "counter", "{record}",
                         "Slow reads the kernel counted but did not record (beyond "
                         "--record-rate), by verdict and socket role: in "
                         "otelwater.read.verdicts and the verdict histograms, with no read "
                         "record, verdict or span.")
VERDICT_DURATION = Instrument("otelwater.read.verdict.duration", "histogram", "s",
                              "Duration of slow Go reads by verdict and socket role, every one "
                              "counted (the kernel's log2 buckets: powers of two of ns).")
VERDICT_WAIT = Instrument("otelwater.read.verdict.wait", "histogram", "s",
                          "The wait a slow read's verdict rests on, by verdict and socket "
                          "role: for the peer (peer-starved), to run (runtime-starved), in "
                          "the queue (consumer-lagging), idle (idle), the whole read "
                          "(unknown); the kernel's log2 buckets.")
ALERTS_ACTIVE = Instrument("otelwater.alerts.active", "updowncounter", "{alert}",
                           "Alert rules firing now, by rule and severity.")
RECORDS_LOST = Instrument("otelwater.records.lost", "counter", "{record}",
                          "Records the kernel's ring buffer could not take, by probe.")

SPANS_LIMITED = Instrument("otelwater.spans.limited", "counter", "{span}",
                           "Slow reads exported without their span: beyond the span rate "
                           "limit (otelwater.read.verdicts and otelwater.read.duration still "
                           "count them).")

INSTRUMENTS = (WATER_LEVEL, WATER_VOLUME, WATER_UNREAD, CAPACITY, FILL_RATIO, DROPS,
               READ_DURATION, READ_VERDICTS, RECORDS_CUT, VERDICT_DURATION, VERDICT_WAIT,
               ALERTS_ACTIVE, RECORDS_LOST, SPANS_LIMITED)

# read.duration bucket boundaries, seconds: 1 ms (the slow-read threshold) to 10 s
READ_DURATION_BOUNDS_S = (0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                          2.5, 5.0, 10.0)
# read.verdict.duration and .wait bucket boundaries, seconds: the kernel's log2 buckets
# (VerdictCounts: slot i counts [2**(i-1), 2**i) ns, the last slot, 39, everything from 2**38
# ns) as 2**i ns, i = 10 .. 38: the slots below 2**10 ns (1.024 us) are the first bucket, slot
# 39 the +Inf one, slot i the bucket whose upper bound is 2**i ns. The kernel's buckets hold
# their lower bound, OpenTelemetry's their upper one: a read of exactly 2**i ns is counted in
# the bucket above le=2**i ns (1 ns apart; every other value is where `le` says).
VERDICT_HIST_FIRST_SLOT = 10
VERDICT_HIST_LAST_SLOT = 39                     # bpf/goread.h OTW_HIST_SLOTS - 1
VERDICT_HIST_BOUNDS_S = tuple((1 << i) / 1e9
                              for i in range(VERDICT_HIST_FIRST_SLOT, VERDICT_HIST_LAST_SLOT))

# -- attributes ------------------------------------------------------------------------------
# resource (the traced service)
SERVICE_NAME = "service.name"
SERVICE_INSTANCE_ID = "service.instance.id"
HOST_NAME = "host.name"
CONTAINER_ID = "container.id"          # from /proc/PID/cgroup: the k8sattributes processor's key
PROCESS_PID = "process.pid"
PROCESS_EXECUTABLE_NAME = "process.executable.name"
PROCESS_EXECUTABLE_PATH = "process.executable.path"

# per socket (semantic conventions + the socket key)
NETWORK_TRANSPORT = "network.transport"        # "tcp"
NETWORK_TYPE = "network.type"                  # "ipv4" | "ipv6"
NETWORK_LOCAL_ADDRESS = "network.local.address"
NETWORK_LOCAL_PORT = "network.local.port"
NETWORK_PEER_ADDRESS = "network.peer.address"
NETWORK_PEER_PORT = "network.peer.port"
SOCKET_KEY = "otelwater.socket.key"            # 16 hex digits, or OTHER_SOCKETS
SOCKET_ROLE = "otelwater.socket.role"          # "dialed" (we connected) | "accepted" (from a
                                               # listener); absent: unknown. Spans, and the
                                               # verdict metrics' series
OTHER_SOCKETS = "other"                        # sockets beyond the top N, per (pid, port)

# per read (span attributes)
THREAD_ID = "thread.id"
CODE_FUNCTION = "code.function"                # the caller of net.(*conn).Read
CODE_STACKTRACE = "code.stacktrace"            # the stack, innermost first, newline-joined
GOROUTINE_ID = "otelwater.goroutine.id"
FD = "otelwater.fd"
VERDICT = "otelwater.verdict"
VERDICT_REASON = "otelwater.verdict.reason"
WAIT_PEER_NS = "otelwater.wait.peer_ns"
WAIT_RUN_NS = "otelwater.wait.run_ns"
WAIT_IDLE_NS = "otelwater.wait.idle_ns"
QUEUE_DELAY_NS = "otelwater.queue.delay_ns"
READ_REQUESTED = "otelwater.read.requested"
READ_RETURNED = "otelwater.read.returned"
# the peer by the semantic conventions' role: network.peer.* always, and the same address as
# server.* on a dialed socket (we are its client), client.* on an accepted one
SERVER_ADDRESS = "server.address"
SERVER_PORT = "server.port"
CLIENT_ADDRESS = "client.address"
CLIENT_PORT = "client.port"
# what rebuilds the read exactly (otelwater.events.otlpjson): CLOCK_MONOTONIC times and the
# kernel's stamps, each left out where it is None
THREAD_NAME = "thread.name"                    # the reader's comm
READ_SOURCE = "otelwater.read.source"          # "tracepoint" | "uprobe"
READ_START_NS = "otelwater.read.start_ns"      # CLOCK_MONOTONIC
READ_END_NS = "otelwater.read.end_ns"          # CLOCK_MONOTONIC
READ_PARKED = "otelwater.read.parked"          # bool
READ_ARRIVAL_NS = "otelwater.read.arrival_ns"  # CLOCK_MONOTONIC
READ_QUEUE_DELAY_EXACT = "otelwater.read.queue_delay_exact"  # bool
READ_SEND_NS = "otelwater.read.send_ns"        # CLOCK_MONOTONIC: our last send (ts_send_ns)
READ_PREV_ARRIVAL_NS = "otelwater.read.prev_arrival_ns"  # CLOCK_MONOTONIC: ts_prev_arrival_ns
READ_KERNEL_VERDICT = "otelwater.verdict.kernel"  # the verdict the kernel counted it under
# the request the read served (ReadRecord.trace_id, parent_span_id, link_note, go_start): a
# linked read's span is a child of the request's span (its trace and parent ids say so); these
# say what a read that is not linked knew
LINK_SKIPPED = "otelwater.link.skipped"        # why a read with labels is not linked
LINK_TRACE_ID = "otelwater.link.trace_id"      # its labels' ids when they do not make a link
LINK_PARENT_SPAN_ID = "otelwater.link.parent_span_id"
GOROUTINE_START = "otelwater.goroutine.start"  # the reading goroutine's start function
# (and SOCKET_ROLE: the read's role; network.peer.address/port: its peer_addr/peer_port)
EVIDENCE_TOTAL = "otelwater.evidence.total"    # snapshots that joined the read
EVIDENCE_COMPLETE = "otelwater.evidence.complete"  # bool

# water span events
WATER_LEVEL_ATTR = "otelwater.water.level"
WATER_VOLUME_ATTR = "otelwater.water.volume"
WATER_UNREAD_ATTR = "otelwater.water.unread"
WATER_CAPACITY_ATTR = "otelwater.water.capacity"
WATER_FILL_RATIO_ATTR = "otelwater.water.fill_ratio"
WATER_DROPS_ATTR = "otelwater.water.drops"
TRIGGER = "otelwater.trigger"
# ... and the rest of the snapshot, so the evidence is rebuilt exactly
WATER_PID_ATTR = "otelwater.water.pid"          # the socket's last reader
WATER_TID_ATTR = "otelwater.water.tid"
WATER_COMM_ATTR = "otelwater.water.comm"
WATER_NETNS_ATTR = "otelwater.water.netns"
WATER_INODE_ATTR = "otelwater.water.inode"
WATER_BACKLOG_ATTR = "otelwater.water.backlog"
WATER_DROP_EVENTS_ATTR = "otelwater.water.drop_events"
WATER_DROP_REASON_ATTR = "otelwater.water.drop_reason"
WATER_BYTES_ARRIVED_ATTR = "otelwater.water.bytes_arrived"
WATER_BYTES_READ_ATTR = "otelwater.water.bytes_read"
WATER_TCP_STATE_ATTR = "otelwater.water.tcp_state"

# alerts (metric attributes and span events)
ALERT_RULE = "otelwater.alert.rule"
ALERT_SEVERITY = "otelwater.alert.severity"
ALERT_STATE = "otelwater.alert.state"
ALERT_VALUE = "otelwater.alert.value"
ALERT_THRESHOLD = "otelwater.alert.threshold"
ALERT_PREVIOUS = "otelwater.alert.previous"
ALERT_REASON = "otelwater.alert.reason"

# lost records
PROBE = "otelwater.probe"                      # "water" | "reads"
LOST_TOTAL = "otelwater.lost.total"            # the probe's lost_total (a LOST_SPAN's)
LOST_NS = "otelwater.lost.ts_ns"               # CLOCK_MONOTONIC of the lost record
LOST_COUNT = "otelwater.lost.count"            # located losses: how many records, and the
LOST_SINCE_NS = "otelwater.lost.since_ns"      # CLOCK_MONOTONIC of the first and the last
LOST_UNTIL_NS = "otelwater.lost.until_ns"      # (absent: an unlocated rise of the total)

# the run, on every resource otelwater exports: what turns the spans back into the records
CLOCK_OFFSET_NS = "otelwater.clock.offset_ns"  # CLOCK_REALTIME - CLOCK_MONOTONIC used
START_NS = "otelwater.start_ns"                # CLOCK_MONOTONIC when the probes attached
THRESHOLD_MS = "otelwater.correlate.threshold_ms"
RUN_THRESHOLD_MS = "otelwater.correlate.run_threshold_ms"
WINDOW_MS = "otelwater.correlate.window_ms"
INCLUDE_IDLE = "otelwater.correlate.include_idle"   # idle reads were slow reads (spans) too

# -- spans and events ------------------------------------------------------------------------
READ_SPAN = "net.(*conn).Read"                 # the Go function; the read spans' name before
                                               # they said their verdict and peer
READ_SPAN_PREFIX = "tcp read"                  # a read's span: "tcp read VERDICT PEER", kind
                                               # INTERNAL (docs/spans.md)
WATER_EVENT = "otelwater.water"
STORY_STEP = "otelwater.step"                  # the kernel's story of a read, one span event a
                                               # step (park, send, arrival, oldest_byte, read,
                                               # return), named for a person: this says which
ALERT_EVENT = "otelwater.alert"
LOST_SPAN = "otelwater.lost"                   # a zero-length span per located loss or rise
                                               # of a probe's lost_total, under otelwater's
                                               # own resource
SCOPE = "otelwater"                            # instrumentation scope of tracers and meters
OWN_SERVICE = "otelwater"                      # service.name of what belongs to no traced
                                               # process (lost records, untraced sockets)
