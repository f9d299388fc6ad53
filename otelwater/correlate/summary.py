"""Per-socket and per-reader summaries of the correlated reads, in bounded memory.

Percentiles come from ``LogSketch``: log-linear buckets, 16 per power of two (values below 32
exact), so a reported percentile is the top of the bucket holding it: at most 1/16 (6.25%)
above the exact value, never below, and never above the largest value seen. At most ~1,000
buckets per sketch, whatever the number of values.

A socket's (or reader's) verdict is the cause of at least ``dominance`` (default 0.6) of its
slow reads, ``mixed`` when no cause reaches it, ``None`` with no slow reads.

Bounded twice. Each table holds at most ``max_entries`` (65,536), the least recently used
evicted beyond. And what is no longer alive goes sooner: a socket's summary once the socket
closed (its close snapshot: ``closed(key)``), a reader's once the socket it read last closed
(a Go server's goroutine per connection ends with its connection). Of those, the ``max_closed``
(4,096) with the most slow reads (then the most water, then the most reads) are kept, and the
``max_closed // 2`` closed most recently whatever their figures (their last reads may still be
being decided); the rest are dropped, ``max_closed // 4`` at a time (counted in
``closed_evicted`` and ``closed_readers_evicted``). A reader that reads an open socket again,
or a socket key seen again in a non-close snapshot (the 4-tuple reused), is alive again. So a
long run's summaries cover every socket and reader alive and the worst of those gone, in
memory that does not grow with the connections it has seen.
"""

from __future__ import annotations

import math
from collections import OrderedDict

from otelwater.events.model import ReadRecord, WaterSnapshot
from otelwater.events.verdict import VERDICTS
from otelwater.sockkey import format_key

MIXED = "mixed"
MAX_CLOSED = 4096            # summaries of closed sockets (and of their readers) kept
_SUB = 4                     # 2**4 sub-buckets per power of two
_EXACT = 1 << (_SUB + 1)     # values below this have their own bucket


def _bucket(v: int) -> int:
    if v < _EXACT:
        return v
    shift = v.bit_length() - _SUB - 1
    return _EXACT + (shift - 1) * (1 << _SUB) + ((v >> shift) - (1 << _SUB))


def _bucket_top(i: int) -> int:
    if i < _EXACT:
        return i
    shift, m = divmod(i - _EXACT, 1 << _SUB)
    shift += 1
    return (((1 << _SUB) + m + 1) << shift) - 1


class LogSketch:
    """Counts of non-negative integers in log-linear buckets; quantiles within +6.25%."""

    __slots__ = ("counts", "n", "max")

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.n = 0
        self.max = 0

    def add(self, v: int) -> None:
        if v < 0:
            v = 0
        b = _bucket(v)
        self.counts[b] = self.counts.get(b, 0) + 1
        self.n += 1
        if v > self.max:
            self.max = v

    def quantile(self, q: float) -> int | None:
        if not self.n:
            return None
        rank = max(1, math.ceil(round(q * self.n, 9)))    # nearest-rank, at least 1
        seen = 0
        for b in sorted(self.counts):
            seen += self.counts[b]
            if seen >= rank:
                return min(_bucket_top(b), self.max)
        return self.max

    def to_json(self) -> dict:
        return {"count": self.n, "p50": self.quantile(0.5), "p90": self.quantile(0.9),
                "p99": self.quantile(0.99), "max": self.max if self.n else None}


def dominant(counts: dict[str, int], dominance: float) -> str | None:
    total = sum(counts.values())
    if not total:
        return None
    cause, n = max(counts.items(), key=lambda kv: kv[1])
    return cause if n >= dominance * total else MIXED


_NO_VALUES = LogSketch()     # the sketch of a summary with no value yet (shared, never added to)
_NO_VERDICTS = dict.fromkeys(VERDICTS, 0)   # (shared, never written)


class _Figures:
    """What socket and reader summaries share: read counts, verdicts, delay sketches. A
    summary is held for every socket watched, most of which no traced process reads: its
    sketches and verdict counts are made at its first value (until then shared empty ones)."""

    __slots__ = ("reads", "slow_reads", "idle_reads", "verdicts", "queue_delay", "wait_run",
                 "wait_peer")

    def __init__(self) -> None:
        self.reads = 0
        self.slow_reads = 0
        self.idle_reads = 0       # idle long reads not counted as slow (the default)
        self.verdicts = _NO_VERDICTS
        self.queue_delay = self.wait_run = self.wait_peer = _NO_VALUES

    def add_read(self, read: ReadRecord, verdict: str | None, wait_peer: int | None,
                 wait_run: int | None, idle: bool = False) -> None:
        self.reads += 1
        if idle:
            self.idle_reads += 1
        elif verdict is not None:
            self.slow_reads += 1
            if self.verdicts is _NO_VERDICTS:
                self.verdicts = dict(_NO_VERDICTS)
            self.verdicts[verdict] += 1
        if read.queue_delay_ns is not None:
            if self.queue_delay is _NO_VALUES:
                self.queue_delay = LogSketch()
            self.queue_delay.add(read.queue_delay_ns)
        if wait_run is not None:
            if self.wait_run is _NO_VALUES:
                self.wait_run, self.wait_peer = LogSketch(), LogSketch()
            self.wait_run.add(wait_run)
            self.wait_peer.add(wait_peer)

    def figures_json(self, dominance: float) -> dict:
        return {"reads": self.reads, "slow_reads": self.slow_reads, "idle_reads": self.idle_reads,
                "verdicts": dict(self.verdicts),
                "verdict": dominant(self.verdicts, dominance),
                "queue_delay_ns": self.queue_delay.to_json(),
                "wait_run_ns": self.wait_run.to_json(),
                "wait_peer_ns": self.wait_peer.to_json()}


class SocketSummary(_Figures):
    __slots__ = ("sock_key", "last", "snapshots", "peak_volume", "peak_level",
                 "first_drops", "max_drops")

    def __init__(self, sock_key: int) -> None:
        super().__init__()
        self.sock_key = sock_key
        self.last: WaterSnapshot | None = None    # identity (ports, pid, comm) for display
        self.snapshots = 0
        self.peak_volume = 0
        self.peak_level = 0
        self.first_drops: int | None = None
        self.max_drops = 0

    def add_snapshot(self, s: WaterSnapshot) -> None:
        self.snapshots += 1
        self.last = s
        if s.volume > self.peak_volume:
            self.peak_volume = s.volume
        if s.level > self.peak_level:
            self.peak_level = s.level
        if self.first_drops is None:
            self.first_drops = self.max_drops = s.drops
        elif s.drops > self.max_drops:
            self.max_drops = s.drops

    @property
    def drops(self) -> int:
        """Drops while watched: the largest ``sk_drops`` seen minus the first."""
        return 0 if self.first_drops is None else self.max_drops - self.first_drops

    def to_json(self, dominance: float = 0.6) -> dict:
        d = {"type": "socket_summary", "sock_key": format_key(self.sock_key)}
        if self.last is not None:
            s = self.last
            d.update(pid=s.pid, comm=s.comm, laddr=s.laddr, lport=s.lport, raddr=s.raddr,
                     rport=s.rport)
        d.update(snapshots=self.snapshots, peak_volume=self.peak_volume,
                 peak_level=self.peak_level, drops=self.drops)
        d.update(self.figures_json(dominance))
        return d


class ReaderSummary(_Figures):
    __slots__ = ("pid", "goid", "comm", "last_sock_key")

    def __init__(self, pid: int, goid: int | None) -> None:
        super().__init__()
        self.pid = pid
        self.goid = goid
        self.comm = ""
        self.last_sock_key = 0

    def to_json(self, dominance: float = 0.6) -> dict:
        d = {"type": "reader_summary", "pid": self.pid, "goid": self.goid, "comm": self.comm,
             "last_sock_key": format_key(self.last_sock_key)}
        d.update(self.figures_json(dominance))
        return d


class Summaries:
    """Socket and reader summaries, each table capped at ``max_entries`` (LRU, counted), those
    of closed sockets and their readers at ``max_closed`` (module docstring)."""

    def __init__(self, max_entries: int = 65536, dominance: float = 0.6,
                 max_closed: int = MAX_CLOSED) -> None:
        self.max_entries = max_entries
        self.dominance = dominance
        self.max_closed = max(1, max_closed)
        self.sockets: OrderedDict[int, SocketSummary] = OrderedDict()
        self.readers: OrderedDict[tuple[int, int | None], ReaderSummary] = OrderedDict()
        self.sockets_evicted = 0
        self.readers_evicted = 0
        self.closed_evicted = 0
        self.closed_readers_evicted = 0
        # closed, the oldest close first: sock keys, and reader keys with the socket they
        # read last
        self._closed: OrderedDict[int, None] = OrderedDict()
        self._closed_readers: OrderedDict[tuple[int, int | None], int] = OrderedDict()
        self._reader_of: dict[int, tuple[int, int | None]] = {}   # sock key -> its last reader

    def _evicted(self, key: int) -> None:
        """A socket summary left the table: what refers to it goes too."""
        self._closed.pop(key, None)
        self._reader_of.pop(key, None)

    def socket(self, key: int) -> SocketSummary:
        s = self.sockets.get(key)
        if s is None:
            s = self.sockets[key] = SocketSummary(key)
            if len(self.sockets) > self.max_entries:
                old, _ = self.sockets.popitem(last=False)
                self._evicted(old)
                self.sockets_evicted += 1
        else:
            self.sockets.move_to_end(key)
        return s

    def keep_socket(self, s: SocketSummary) -> SocketSummary:
        """Mark ``s`` used; if it was evicted meanwhile, the socket's summary now in the table
        (``s`` put back, or the newer one a read made since)."""
        now = self.sockets.get(s.sock_key)
        if now is None:
            self.sockets[s.sock_key] = now = s
            if s.last is not None and s.last.trigger == "close":
                self.closed(s.sock_key)
            if len(self.sockets) > self.max_entries:
                old, _ = self.sockets.popitem(last=False)
                self._evicted(old)
                self.sockets_evicted += 1
        else:
            self.sockets.move_to_end(s.sock_key)
        return now

    def closed(self, key: int) -> None:
        """The socket closed (its close snapshot): its summary and its last reader's are no
        longer alive (module docstring)."""
        if key in self.sockets:
            self._closed[key] = None
            self._closed.move_to_end(key)
        rk = self._reader_of.pop(key, None)
        if rk is not None:
            r = self.readers.get(rk)
            if r is not None and r.last_sock_key == key:
                self._closed_readers[rk] = key
                self._closed_readers.move_to_end(rk)
        limit = self.max_closed + self.max_closed // 4
        if len(self._closed) > limit:
            self.closed_evicted += self._trim(self._closed, self.sockets, _socket_rank)
        if len(self._closed_readers) > limit:
            self.closed_readers_evicted += self._trim(self._closed_readers, self.readers,
                                                      _reader_rank)

    def reopened(self, key: int) -> None:
        """A socket key seen again in a non-close snapshot: alive again."""
        self._closed.pop(key, None)

    def _trim(self, closed: OrderedDict, table: OrderedDict, rank) -> int:
        """Down to max_closed: the newest max_closed // 2 closes kept, of the older ones those
        ranking highest; returns how many were dropped from `table`."""
        keep_newest = self.max_closed // 2
        older = list(closed)[:len(closed) - keep_newest]
        gone = [k for k in older if k not in table]
        for k in gone:                      # evicted from the table meanwhile
            del closed[k]
        over = len(closed) - self.max_closed
        if over <= 0:
            return 0
        older = [k for k in older if k in table]
        older.sort(key=lambda k: rank(table[k]))
        for k in older[:over]:
            del closed[k]
            del table[k]
            if table is self.sockets:
                self._reader_of.pop(k, None)
        return min(over, len(older))

    def reader(self, pid: int, goid: int | None) -> ReaderSummary:
        k = (pid, goid)
        r = self.readers.get(k)
        if r is None:
            r = self.readers[k] = ReaderSummary(pid, goid)
            if len(self.readers) > self.max_entries:
                old, _ = self.readers.popitem(last=False)
                self._closed_readers.pop(old, None)
                self.readers_evicted += 1
        else:
            self.readers.move_to_end(k)
        return r

    def add_read(self, read: ReadRecord, verdict: str | None, wait_peer: int | None,
                 wait_run: int | None, idle: bool = False) -> None:
        key = read.sock_key
        if key:
            self.socket(key).add_read(read, verdict, wait_peer, wait_run, idle)
        rk = (read.pid, read.goid)
        r = self.reader(read.pid, read.goid)
        r.comm = read.comm or r.comm
        r.last_sock_key = key
        r.add_read(read, verdict, wait_peer, wait_run, idle)
        if key:
            if key in self._closed:         # a read of a closed socket, decided after its close
                self._closed_readers[rk] = key
            else:
                self._reader_of[key] = rk
                if rk in self._closed_readers:      # reads an open socket: alive again
                    del self._closed_readers[rk]


def _socket_rank(s: SocketSummary) -> tuple:
    return s.slow_reads, s.peak_volume, s.reads


def _reader_rank(r: ReaderSummary) -> tuple:
    return r.slow_reads, r.reads


class _NoSummary:
    """Every socket's summary when none are kept: takes what a summary takes, keeps nothing."""

    __slots__ = ()
    sock_key = 0
    last = None

    def add_snapshot(self, s) -> None:
        pass

    def add_read(self, *a, **k) -> None:
        pass


_NO_SUMMARY = _NoSummary()


class NoSummaries(Summaries):
    """No summaries at all: for a run that never reports them (the agent, whose records go
    to metrics and spans). With 10,000 sockets the summaries and their readers' were ~17 MiB of
    the agent's heap, and the rain-water figures they carry another ~4 MiB."""

    def socket(self, key: int):
        return _NO_SUMMARY

    def keep_socket(self, s):
        return s

    def closed(self, key: int) -> None:
        pass

    def reopened(self, key: int) -> None:
        pass

    def reader(self, pid: int, goid: int | None):
        return _NO_SUMMARY

    def add_read(self, *a, **k) -> None:
        pass
