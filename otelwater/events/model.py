"""The records every stage passes along: kernel water snapshots and Go read records.

All times are integer nanoseconds of CLOCK_MONOTONIC (what bpf_ktime_get_ns returns); they are
turned into wall-clock time once, at export. Both records carry `sock_key` (otelwater.sockkey),
the value on which the correlator joins them.
"""

from __future__ import annotations

from dataclasses import dataclass

from otelwater.events.layout import header
from otelwater.sockkey import format_key

# names of the codes the kernel probe sends, from their one definition in bpf/water.h
TRIGGERS = {v: k.lower() for k, v in header("water.h").defines_with_prefix("OTW_TRIGGER_").items()}
TCP_STATES = {v: k for k, v in header("water.h").defines_with_prefix("OTW_TCP_").items()}
ROLES = {v: k.lower() for k, v in header("water.h").defines_with_prefix("OTW_ROLE_").items()
         if k != "UNKNOWN"}


def _plain(record) -> dict:
    """Field name -> value of a flat record (its values are ints, strs, tuples, None)."""
    return {name: getattr(record, name) for name in record.__slots__}


@dataclass(frozen=True, slots=True)
class WaterSnapshot:
    """One look at a socket's receive queue ("water"), from the kernel probe."""

    ts_ns: int
    sock_key: int
    pid: int              # last process that read the socket (0: none seen yet)
    comm: str
    tid: int              # thread in whose context the kernel event ran
    netns: int
    laddr: str
    lport: int
    raddr: str
    rport: int
    level: int            # skbs queued (sk_receive_queue.qlen)
    volume: int           # bytes charged (sk_rmem_alloc), ss -tm "r"
    unread_bytes: int     # payload not yet read (rcv_nxt - copied_seq), SIOCINQ / Recv-Q
    capacity: int         # sk_rcvbuf, ss -tm "rb"
    backlog: int          # sk_backlog.len
    drops: int            # sk_drops, the kernel's own counter
    drop_events: int      # overflow events otelwater saw on this socket
    drop_reason: str      # last drop's reason name ("" when none)
    bytes_arrived: int    # tcp rcv_nxt (mod 2**32)
    bytes_read: int       # tcp copied_seq (mod 2**32)
    trigger: str          # arrival, read, overflow, close, periodic
    tcp_state: str
    ino: int              # socket inode
    role: str = ""        # "dialed" (we connected), "accepted" (from a listener), "" unknown

    @property
    def fill_ratio(self) -> float:
        return self.volume / self.capacity if self.capacity else 0.0

    def to_json(self) -> dict:
        d = _plain(self)  # dataclasses.asdict deep-copies: 6x slower on a --follow stream
        d["type"] = "snapshot"
        d["sock_key"] = format_key(self.sock_key)
        d["fill_ratio"] = round(self.fill_ratio, 4)
        return d


@dataclass(frozen=True, slots=True)
class ReadRecord:
    """One Go read (a blocked one in full; others are only counted), from either sampler."""

    ts_start_ns: int
    ts_end_ns: int
    pid: int
    tid: int
    goid: int | None      # None when the process is not Go or the offset is unknown
    fd: int
    sock_key: int         # 0 when the fd was not a TCP socket
    requested: int
    returned: int         # bytes, or a negative errno
    stack: tuple[str, ...]  # function names, innermost first
    source: str           # "tracepoint" or "uprobe"
    comm: str = ""
    # Evidence the kernel stamps on the read itself (None where it does not apply or is unknown):
    parked: bool | None = None          # the read found the queue empty and waited (a park)
    ts_arrival_ns: int | None = None    # parked: first arrival (sk_data_ready) on its socket
                                        # after the park began
    queue_delay_ns: int | None = None   # how long the oldest byte it returned stood in the queue
    queue_delay_exact: bool | None = None  # False: a lower bound (the byte came before the
                                           # arrivals the kernel remembers per socket)
    # Request/response, without payload (the watch; "" / None where unknown):
    role: str = ""                      # its socket's: "dialed" (we connected) or "accepted"
    peer_addr: str = ""                 # the other end of its socket
    peer_port: int = 0
    ts_send_ns: int | None = None       # our last send on the socket before the arrival that
                                        # woke the read (before its return when none did)
    ts_prev_arrival_ns: int | None = None  # parked: the newest arrival before the park began
    kernel_verdict: str | None = None   # the verdict the kernel counted it under (the same rules)
    # The request the read served, from the reading goroutine's profiler labels (runtime/pprof),
    # read in the kernel for recorded slow reads only ("" where unknown):
    trace_id: str = ""                  # 32 lowercase hex digits: the request's trace
    parent_span_id: str = ""            # 16 lowercase hex digits: the request's span
    link_note: str = ""                 # why the read is not linked to the trace its goroutine's
                                        # labels name (a connection-owning goroutine, a label
                                        # that does not parse); "" when linked or no labels
    go_start: str = ""                  # the function the reading goroutine was started with

    @property
    def duration_ns(self) -> int:
        return self.ts_end_ns - self.ts_start_ns

    def to_json(self) -> dict:
        d = _plain(self)
        d["type"] = "read"
        d["sock_key"] = format_key(self.sock_key)
        d["stack"] = list(self.stack)
        d["duration_ns"] = self.duration_ns
        return d


@dataclass(frozen=True, slots=True)
class LostEvents:
    """Ring-buffer records the kernel could not deliver (buffer full): counted, never silent.

    Located (``since_ns`` set): ``count`` records of ``probe`` were lost within ``[since_ns,
    until_ns]`` (``until_ns`` None: ``ts_ns``). In-band: the record the kernel delivered next on
    that CPU carried them (``ts_ns`` is its time; this record comes just before it). At a sweep:
    losses no delivered record has reported yet (``count`` 0: only the total moved). Unlocated
    (``since_ns`` None: recordings made before losses travelled in-band): somewhere before
    ``ts_ns``, when a sweep noticed the total move. ``lost_total`` is the probe's exact total so
    far, never decreasing from one record to the next."""

    ts_ns: int
    probe: str            # "water", "reads"
    lost_total: int
    since_ns: int | None = None   # first loss of the span; None: unknown (older recordings)
    count: int | None = None      # records lost in [since_ns, until_ns]
    until_ns: int | None = None   # last loss of the span (None: ts_ns)

    def to_json(self) -> dict:
        return {"type": "lost", "ts_ns": self.ts_ns, "probe": self.probe,
                "lost_total": self.lost_total, "since_ns": self.since_ns, "count": self.count,
                "until_ns": self.until_ns}


@dataclass(frozen=True, slots=True)
class Notice:
    """Something the user must hear about once, while the watch goes on: a traced process
    exited, stacks that cannot be symbolized, goroutine ids that cannot be read."""

    ts_ns: int
    source: str           # "water", "reads"
    text: str

    def to_json(self) -> dict:
        return {"type": "notice", "ts_ns": self.ts_ns, "source": self.source, "text": self.text}


@dataclass(frozen=True, slots=True)
class VerdictCounts:
    """The kernel's count of the slow reads of one process, socket role and verdict since
    otelwater attached (bpf/goread.h ``verdicts``): exact whatever the ring buffer lost, the
    record token bucket cut, or Python decoded. Cumulative: a later record of the same (pid,
    role, verdict) replaces the earlier one. The watch sends the rows that moved at each sweep
    and all of them at the end. Histograms: log2 buckets, ``hist[i]`` counts values in
    ``[2**(i-1), 2**i)`` ns (``hist[0]``: 0 ns), trailing empty buckets left out."""

    ts_ns: int
    pid: int
    role: str             # "dialed", "accepted", "" unknown
    verdict: str          # otelwater.events.verdict.VERDICTS
    reads: int            # slow reads with this verdict
    recorded: int         # of those, put on the ring buffer (delivered or lost)
    cut: int              # of those, kept off it by the record token bucket
    dur_sum_ns: int       # their durations, summed
    wait_sum_ns: int      # the verdict's wait (peer, run, queue delay, idle; unknown: duration)
    dur_hist: tuple[int, ...] = ()
    wait_hist: tuple[int, ...] = ()

    def to_json(self) -> dict:
        d = _plain(self)
        d["type"] = "counts"
        d["dur_hist"] = list(self.dur_hist)
        d["wait_hist"] = list(self.wait_hist)
        return d


def hist_bounds(slot: int) -> tuple[int, int]:
    """[low, high) ns of a log2 bucket of VerdictCounts and goread's latency histogram."""
    return (0, 1) if slot == 0 else (1 << (slot - 1), 1 << slot)
