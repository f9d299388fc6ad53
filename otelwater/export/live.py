"""The live view: the sockets holding the most water, their readers, and alert marks.

Fits 80 columns. On a terminal it redraws in place (rich.live); piped, it prints one table
per interval.

    WaterBoard   what the view shows: latest state per socket, readers, alert marks, counters
    ViewSink     the board and its view as a sink (redrawn at every tick and at the end)
    RunStats     what every live run says on stderr: notices as they come, the closing line's
                 counts (records, lost, verdicts: the kernel's exact counts where it sent them)
    WaitBook     per process, where the slow time went (the kernel's VerdictCounts for exact
                 totals, the verdict records for the split by peer); the report uses it too
    caller       the first frame of the application's own code in a read's stack
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from otelwater.events.model import ReadRecord, VerdictCounts, WaterSnapshot
from otelwater.events.verdict import (CONSUMER_LAGGING, IDLE, PEER_STARVED, RUNTIME_STARVED,
                                      UNKNOWN, VERDICTS)
from otelwater.export.sink import RunInfo, Sink

ALERT_MARKS = {"water_level": "L", "fill_ratio": "F", "surge": "S", "read_skew": "K"}
VERDICT_CODES = {"peer-starved": "PEER", "runtime-starved": "RUN", "consumer-lagging": "LAG",
                 "unknown": "?", "idle": "IDLE"}


def human_bytes(n: int) -> str:
    for unit in ("B", "K", "M", "G"):
        if abs(n) < 1024 or unit == "G":
            return f"{n}{unit}" if unit == "B" else f"{n:.1f}{unit}" if n < 10 else f"{n:.0f}{unit}"
        n /= 1024
    return str(n)


def ms(ns: int) -> str:
    return f"{ns / 1e6:.1f}ms" if ns < 10e9 else f"{ns / 1e9:.0f}s"


def endpoint(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


PLUMBING = ("runtime", "syscall.", "internal/", "net.")
# the first element of every standard library package path (go list std, Go 1.19 to 1.24):
# a frame of one of these, of golang.org/x/..., or of a vendored copy is not the application's
STD_ROOTS = frozenset(
    "archive bufio builtin bytes cmp compress container context crypto database debug embed "
    "encoding errors expvar flag fmt go hash html image index internal io iter log maps math "
    "mime net os path plugin reflect regexp runtime slices sort strconv strings structs sync "
    "syscall testing text time unicode unique unsafe vendor weak".split())


def package_of(frame: str) -> str | None:
    """The import path of a Go function's package ("github.com/lib/pq.(*conn).recv" ->
    "github.com/lib/pq"; the linker escapes dots in the path's last element as %2e), None for
    what is not a Go function (an address, a C function of a cgo binary)."""
    name = frame.split("[", 1)[0]      # a generic's type arguments hold paths of their own
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot <= 0 or name.startswith("0x"):
        return None
    return name[:dot]


def is_app_frame(frame: str) -> bool:
    """A frame of the application: package main, or any package outside the standard library
    and golang.org/x (the user's own modules and the libraries they chose)."""
    pkg = package_of(frame) if frame else None
    if pkg is None:
        return False
    if pkg == "main":
        return True
    root = pkg.split("/", 1)[0]
    if root in STD_ROOTS or root.startswith(("type:", "go:", "go.")) or \
            pkg.startswith("golang.org/x/"):
        return False
    return True


def _entry(frame: str) -> bool:
    """main.main and the closures it starts goroutines with: where a goroutine came from, not
    what it was doing."""
    return frame == "main.main" or frame.startswith(("main.main.func", "main.main.gowrap"))


def caller(stack: tuple[str, ...]) -> str:
    """Who the read was for, the first frame of the application's own code: the innermost
    frame of package main (main.main and its goroutine closures only when nothing else of the
    application is in the stack), else the innermost frame outside the standard library (a
    module of the user's, or the client library it called, as github.com/lib/pq), else the
    first frame above the read machinery (net/http.(*persistConn).Read: a Transport's own
    goroutine has no application frame at all)."""
    first_app = None
    for name in stack:
        if is_app_frame(name):
            if name.startswith("main.") and not _entry(name):
                return name
            if first_app is None:
                first_app = name
    if first_app is not None:
        return first_app
    for name in stack:
        if name and not name.startswith(PLUMBING):
            return name
    return stack[-1] if stack else "?"


def short_func(name: str) -> str:
    """A function's name without its package's directory, for narrow columns
    ("github.com/lib/pq.(*conn).recv" -> "pq.(*conn).recv")."""
    pkg = package_of(name)
    if pkg is None or "/" not in pkg:
        return name
    return name[pkg.rfind("/") + 1:]


def secs(ns: int) -> str:
    """A total of waits, for a person: 41.2 s, 812 ms, 6.9 ms, 40 us."""
    if ns >= 1_000_000_000:
        return f"{ns / 1e9:.{0 if ns >= 100e9 else 1}f} s"
    if ns >= 1_000_000:
        return f"{ns / 1e6:.{0 if ns >= 10e6 else 1}f} ms"
    return f"{ns / 1e3:.0f} us"


# -- where the slow time went ---------------------------------------------------------------

def verdict_wait(v) -> int:
    """The wait a slow read's verdict names (what the kernel's VerdictCounts.wait_sum_ns adds
    up): waiting for the peer, waiting to run, its bytes' queue delay, idle; unknown: the
    read's duration."""
    w = {PEER_STARVED: v.wait_peer_ns, RUNTIME_STARVED: v.wait_run_ns,
         CONSUMER_LAGGING: v.queue_delay_ns, IDLE: v.wait_idle_ns}.get(v.verdict)
    return w if w is not None else max(v.read.duration_ns, 0)


def severity_ns(v) -> int:
    """How slow a slow read was: its duration or its bytes' time in the queue, the larger; the
    idle part of a wait (before our request went out) left out, but for an idle read."""
    d = v.read.duration_ns
    if v.wait_idle_ns and v.verdict != IDLE:
        d -= v.wait_idle_ns
    return max(d, v.queue_delay_ns or 0)


def peer_of(read: ReadRecord, last: WaterSnapshot | None = None) -> tuple[str, str] | None:
    """(who, role) of a read's peer: address:port for a dialed socket (the service it called),
    the address alone for an accepted one (a client's port is ephemeral). Recordings made
    before reads carried their peer: the remote end of a snapshot of its socket (`last`)."""
    addr, port, role = read.peer_addr, read.peer_port, read.role
    if not addr and last is not None:
        addr, port = last.raddr, last.rport
    if not addr:
        return None
    return (addr if role == "accepted" else endpoint(addr, port)), role


# what each verdict's wait is, in the report (long) and the view (short)
WAIT_WORDS = {PEER_STARVED: ("for peers", "peers"),
              RUNTIME_STARVED: ("waiting to run (run queue)", "run"),
              CONSUMER_LAGGING: ("own lag (bytes stood in its queue)", "lag"),
              UNKNOWN: ("unknown (evidence missing)", "?")}


@dataclass
class ProcessTime:
    """One process's slow reads and where their time went (WaitBook.processes)."""

    pid: int
    name: str
    exact: bool                  # the counts are the kernel's (VerdictCounts), not the records'
    reads: dict[str, int]        # slow reads by verdict (idle left out)
    waits: dict[str, int]        # their verdict's wait, summed, ns
    idle: int = 0                # idle reads (the peer owed nothing), not counted as slow
    idle_ns: int = 0
    cut: int = 0                 # counted by the kernel, kept off the record (--record-rate)
    recorded: int = 0            # slow reads with a verdict record (the split by peer)
    peers: list = field(default_factory=list)   # (who, role, reads, ns), most time first
    idle_counted: bool = False   # idle reads were slow reads of the run (--include-idle)

    @property
    def slow(self) -> int:
        return sum(self.reads.values())

    @property
    def total_ns(self) -> int:
        return sum(self.waits.values())

    @property
    def sampled(self) -> bool:
        """The split by peer comes from fewer reads than were counted."""
        return self.exact and self.recorded < self.slow

    def parts(self) -> list[tuple[str, int]]:
        """(verdict, ns) of the slow reads, most time first."""
        return sorted(((v, ns) for v, ns in self.waits.items() if self.reads.get(v)),
                      key=lambda x: (-x[1], VERDICTS.index(x[0])))

    def peer_text(self, n: int = 3, short: bool = False) -> str:
        """The peers that took the time: seconds when every slow read was recorded, their
        shares of the recorded reads' time when a part was not (sampled) and in the view
        (`short`: the kernel's counts come each sweep, the verdicts as they are decided)."""
        if not self.peers:
            return ""
        shown, rest = self.peers[:n], self.peers[n:]
        recorded_ns = sum(p[3] for p in self.peers) or 1

        def amount(ns: int) -> str:
            if self.sampled or short:
                return f"{100 * ns / recorded_ns:.0f}%"
            return secs(ns)

        items = [f"{who}{'' if short or not role else ' ' + role} {amount(ns)}"
                 for who, role, _, ns in shown]
        if rest:
            items.append(f"{len(rest)} more peer{'s' * (len(rest) != 1)} "
                         f"{amount(sum(p[3] for p in rest))}")
        return ", ".join(items)

    def lines(self, width: int = 80, indent: str = "  ") -> list[str]:
        """The report's block for this process."""
        import textwrap

        head = f"{indent}pid {self.pid} {self.name or '?'}: {self.slow:,} slow " \
               f"read{'s' * (self.slow != 1)}"
        if self.slow:
            head += f", {secs(self.total_ns)} waiting"
        out = [head]
        sub = indent + "  "
        for v, ns in self.parts():
            text = f"{secs(ns)} {WAIT_WORDS[v][0]}"
            if v == PEER_STARVED and self.peers:
                text += ": " + self.peer_text()
            out += textwrap.wrap(text, width, initial_indent=sub, subsequent_indent=sub + "  ")
        if self.idle:
            took = f"{secs(self.idle_ns)}: " if self.idle_ns else ""
            out += textwrap.wrap(
                f"{self.idle:,} idle read{'s' * (self.idle != 1)} "
                + ("left out of these" if self.idle_counted else "not counted as slow")
                + f" ({took}the peer owed nothing, as a client's think time or an idle "
                "keep-alive)", width, initial_indent=sub, subsequent_indent=sub + "  ")
        if self.sampled and self.reads.get(PEER_STARVED) and self.peers:
            why = f"; --record-rate kept {self.cut:,} off the record" if self.cut else ""
            out += textwrap.wrap(
                f"peers: shares of the {self.recorded:,} of {self.slow:,} slow reads recorded "
                f"in full{why}", width, initial_indent=sub, subsequent_indent=sub + "  ")
        return out

    def short(self) -> str:
        """The view's line for this process."""
        text = f"pid {self.pid} {(self.name or '?')[:15]}: {self.slow:,} slow"
        if self.slow:
            text += f", {secs(self.total_ns).replace(' ', '')}: "
            items = []
            for v, ns in self.parts():
                item = f"{WAIT_WORDS[v][1]} {secs(ns).replace(' ', '')}"
                if v == PEER_STARVED and self.peers:
                    item += f" ({self.peer_text(2, short=True)})"
                items.append(item)
            text += ", ".join(items)
        if self.idle:
            text += f"; {self.idle:,} idle"
        return text


class _Tally:
    __slots__ = ("reads", "waits", "peers", "idle", "idle_ns")

    def __init__(self) -> None:
        self.reads: dict[str, int] = {}
        self.waits: dict[str, int] = {}
        self.peers: dict[tuple[str, str], list[int]] = {}    # (who, role) -> [reads, ns]
        self.idle = 0
        self.idle_ns = 0


class WaitBook:
    """Per process, where the time of its slow reads went: each slow read under its verdict,
    with the wait that verdict names (verdict_wait). Totals are the kernel's exact counts
    (VerdictCounts: every slow read, whatever the ring buffer lost or --record-rate kept off
    the record) where it sent them for the process, else the verdict records'; the split of
    the peers' time by peer always comes from the verdict records. Bounded: at most
    MAX_PEERS peers a process (the rest are one "more"), MAX_PROCS processes."""

    MAX_PEERS = 64
    MAX_PROCS = 4096

    def __init__(self) -> None:
        self.kernel: dict[tuple[int, str, str], VerdictCounts] = {}
        self.tallies: dict[int, _Tally] = {}
        self.names: dict[int, str] = {}
        self.idle_records = 0           # idle verdict records seen (--include-idle)

    def add_counts(self, c: VerdictCounts) -> None:
        if (c.pid, c.role, c.verdict) in self.kernel or len(self.kernel) < 8 * self.MAX_PROCS:
            self.kernel[(c.pid, c.role, c.verdict)] = c     # cumulative: the later replaces

    def name(self, pid: int, name: str | None) -> None:
        if name and pid not in self.names and len(self.names) < self.MAX_PROCS:
            self.names[pid] = name

    def _tally(self, pid: int) -> _Tally | None:
        t = self.tallies.get(pid)
        if t is None and len(self.tallies) < self.MAX_PROCS:
            t = self.tallies[pid] = _Tally()
        return t

    def add_verdict(self, v, last: WaterSnapshot | None = None) -> None:
        """A verdict record; `last`: a snapshot of its socket, for the peer of recordings
        whose reads did not carry it."""
        r = v.read
        self.name(r.pid, r.comm)
        t = self._tally(r.pid)
        if t is None:
            return
        wait = verdict_wait(v)
        if v.verdict == IDLE:
            self.idle_records += 1
            t.idle += 1
            t.idle_ns += wait
            return
        t.reads[v.verdict] = t.reads.get(v.verdict, 0) + 1
        t.waits[v.verdict] = t.waits.get(v.verdict, 0) + wait
        if v.verdict == PEER_STARVED:
            who = peer_of(r, last or (v.evidence[-1] if v.evidence else None))
            if who is None:
                return
            p = t.peers.get(who)
            if p is None:
                if len(t.peers) >= self.MAX_PEERS:
                    who = ("others", "")
                p = t.peers.setdefault(who, [0, 0])
            p[0] += 1
            p[1] += wait

    def processes(self, idle: dict[int, int] | None = None) -> list[ProcessTime]:
        """Every process with slow or idle reads, most time waited first. `idle`: pid -> idle
        reads that made no verdict record (the correlator's summaries), for the processes the
        kernel did not count."""
        kernel: dict[int, list[VerdictCounts]] = {}
        for (pid, _, _), c in self.kernel.items():
            kernel.setdefault(pid, []).append(c)
        idle = idle or {}
        out = []
        for pid in set(kernel) | set(self.tallies) | {p for p, n in idle.items() if n}:
            t = self.tallies.get(pid) or _Tally()
            peers = sorted(((who, role, n, ns) for (who, role), (n, ns) in t.peers.items()),
                           key=lambda p: (-p[3], p[0], p[1]))
            recorded = sum(t.reads.values())
            rows = kernel.get(pid)
            if rows:
                reads: dict[str, int] = {}
                waits: dict[str, int] = {}
                idle = idle_ns = cut = 0
                for c in rows:
                    cut += c.cut
                    if c.verdict == IDLE:
                        idle += c.reads
                        idle_ns += c.wait_sum_ns
                    elif c.reads:
                        reads[c.verdict] = reads.get(c.verdict, 0) + c.reads
                        waits[c.verdict] = waits.get(c.verdict, 0) + c.wait_sum_ns
                p = ProcessTime(pid, self.names.get(pid, ""), True, reads, waits, idle,
                                idle_ns, cut, recorded, peers)
            else:
                p = ProcessTime(pid, self.names.get(pid, ""), False, dict(t.reads),
                                dict(t.waits), t.idle + idle.get(pid, 0), t.idle_ns, 0,
                                recorded, peers)
            p.idle_counted = self.idle_records > 0
            if p.slow or p.idle:
                out.append(p)
        out.sort(key=lambda p: (-p.total_ns, -p.slow, -p.idle, p.pid))
        return out

    def verdict_counts(self) -> dict[str, int]:
        """Slow reads by verdict, idle left out: the kernel's for the processes it counted,
        the records' for the others."""
        out: dict[str, int] = {}
        for p in self.processes():
            for v, n in p.reads.items():
                out[v] = out.get(v, 0) + n
        return out


@dataclass
class ReaderSummary:
    """One goroutine reading one socket: its slow reads so far (idle ones counted apart)."""

    pid: int
    goid: int | None
    fd: int
    sock_key: int
    blocked: int = 0          # slow reads, idle ones left out
    last_ns: int = 0
    max_ns: int = 0
    caller: str = ""
    last_end_ns: int = 0
    verdicts: dict[str, int] = field(default_factory=dict)
    last_verdict: str = ""
    last_split: str = ""      # the last slow read's figures: peer/run waits, or queue delay
    role: str = ""            # its socket's: dialed, accepted
    idle: int = 0             # idle reads (the peer owed nothing): not slow
    idle_max_ns: int = 0
    raw_max_ns: int = 0       # the slowest before verdicts split off the idle part
    _shown_end_ns: int = -1   # the end of the read whose verdict WHY shows

    def add_verdict(self, v) -> None:
        self.verdicts[v.verdict] = self.verdicts.get(v.verdict, 0) + 1
        # add() counted the read by the kernel's verdict (as slow without one): the
        # correlator's decides
        counted_idle, idle = v.read.kernel_verdict == IDLE, v.verdict == IDLE
        if idle and not counted_idle and self.blocked:
            self.blocked -= 1
            self.idle += 1
            self.idle_max_ns = max(self.idle_max_ns, v.read.duration_ns)
        elif counted_idle and not idle and self.idle:
            self.idle -= 1
            self.blocked += 1
        if not idle:        # without the idle part of its wait (add() could not tell it)
            self.max_ns = max(self.max_ns, severity_ns(v))
        if v.read.ts_end_ns < self._shown_end_ns:
            return          # a newer read's verdict (the kernel's) is shown already
        self._shown_end_ns = v.read.ts_end_ns
        self.last_verdict = v.verdict
        if v.wait_peer_ns is not None and v.wait_run_ns is not None:
            idle = f"i{ms(v.wait_idle_ns)} " if v.wait_idle_ns else ""
            self.last_split = f"{idle}p{ms(v.wait_peer_ns)} r{ms(v.wait_run_ns)}"
            if v.verdict == IDLE and v.wait_peer_ns == 0:
                self.last_split = f"i{ms(v.wait_idle_ns or 0)} r{ms(v.wait_run_ns)}"
        elif v.wait_idle_ns is not None:
            self.last_split = f"i{ms(v.wait_idle_ns)}"
        elif v.queue_delay_ns is not None:
            self.last_split = f"q{ms(v.queue_delay_ns)}"
        else:
            self.last_split = ""

    def add(self, rec: ReadRecord) -> None:
        self.fd, self.sock_key = rec.fd, rec.sock_key
        self.role = rec.role or self.role
        # how slow: the time it blocked, or, for a read that found its bytes waiting (it
        # returned at once), how long they had stood in the queue
        slow = max(rec.duration_ns, rec.queue_delay_ns or 0)
        if rec.kernel_verdict == IDLE:
            self.idle += 1
            self.idle_max_ns = max(self.idle_max_ns, slow)
        else:
            self.blocked += 1
            self.last_ns = slow
            self.raw_max_ns = max(self.raw_max_ns, slow)
            if not rec.role:    # else its verdict says how much of the wait was idle
                self.max_ns = max(self.max_ns, slow)
        self.last_end_ns = rec.ts_end_ns
        if rec.kernel_verdict and rec.ts_end_ns >= self._shown_end_ns:
            # the kernel's verdict until the correlator's comes (the same rules)
            self._shown_end_ns = rec.ts_end_ns
            self.last_verdict, self.last_split = rec.kernel_verdict, ""
        if rec.stack:
            self.caller = caller(rec.stack)

    @property
    def idle_only(self) -> bool:
        return not self.blocked and self.idle > 0


@dataclass
class WaterBoard:
    """Latest state per socket, recent closes, alert marks and counters: what the view shows."""

    alerts: dict[int, dict[str, str]] = field(default_factory=dict)  # sock_key -> rule -> sev
    process_alerts: dict[int, dict[str, str]] = field(default_factory=dict)  # pid -> ...
    sockets: dict[int, WaterSnapshot] = field(default_factory=dict)
    closes: deque = field(default_factory=lambda: deque(maxlen=5))
    records: int = 0
    started: float = field(default_factory=time.monotonic)
    readers: dict[tuple[int, int], "ReaderSummary"] = field(default_factory=dict)
    lost_by_probe: dict[str, int] = field(default_factory=dict)  # probe -> lost_total
    legend: str = "alerts: L level>100  F fill>80%  S level surge (var>50)  K read skew"
    book: WaitBook = field(default_factory=WaitBook)   # per process, where the time went

    @property
    def lost(self) -> int:
        return sum(self.lost_by_probe.values())

    def add_read(self, rec: ReadRecord) -> None:
        self._reader(rec).add(rec)
        self.book.name(rec.pid, rec.comm)

    def _reader(self, rec: ReadRecord) -> "ReaderSummary":
        key = (rec.pid, rec.goid if rec.goid is not None else -rec.fd)
        r = self.readers.get(key)
        if r is None:
            r = self.readers[key] = ReaderSummary(rec.pid, rec.goid, rec.fd, rec.sock_key)
        return r

    def add_verdict(self, v) -> None:
        self._reader(v.read).add_verdict(v)
        self.book.add_verdict(v, self.sockets.get(v.sock_key))

    def add_counts(self, c: VerdictCounts) -> None:
        self.book.add_counts(c)

    def add_alert(self, t) -> None:
        """An AlertTransition from the alert stage (the one place rules are evaluated)."""
        table = self.alerts if t.sock_key else self.process_alerts
        key = t.sock_key or t.pid
        active = table.setdefault(key, {})
        if t.state == "fired":
            active[t.rule] = t.severity
        else:
            active.pop(t.rule, None)
            if not active:
                table.pop(key, None)

    def add(self, snap: WaterSnapshot) -> None:
        self.records += 1
        closed = snap.trigger == "close"
        if closed:
            self.sockets.pop(snap.sock_key, None)
            if snap.unread_bytes:
                self.closes.append(snap)
        else:
            self.sockets[snap.sock_key] = snap

    def top(self, n: int) -> list[WaterSnapshot]:
        return sorted(self.sockets.values(), key=lambda s: (s.unread_bytes, s.volume),
                      reverse=True)[:n]

    def reader_rows(self) -> list[tuple[ReaderSummary, int]]:
        """(reader, goroutines folded into it): the goroutines of a process whose slow reads
        were all idle fold into one row per (role, caller), with the number folded, the idle
        reads summed and the longest. Readers with slow reads first, most recent first."""
        rows: list[tuple[ReaderSummary, int]] = []
        folds: dict[tuple, list] = {}
        for x in self.readers.values():
            if not x.idle_only:
                rows.append((x, 1))
                continue
            f = folds.get((x.pid, x.role, x.caller))
            if f is None:
                folds[(x.pid, x.role, x.caller)] = [x, 1, [x]]
            else:
                f[1] += 1
                f[2].append(x)
        for first, n, members in folds.values():
            if n == 1:
                rows.append((first, 1))
                continue
            ports = {getattr(self.sockets.get(m.sock_key), "lport", None) for m in members}
            newest = max(members, key=lambda m: m.last_end_ns)
            folded = ReaderSummary(first.pid, None, -1, newest.sock_key if len(ports) == 1
                                   else 0, caller=first.caller, role=first.role,
                                   last_end_ns=newest.last_end_ns, last_verdict=IDLE,
                                   last_split=newest.last_split,
                                   idle=sum(m.idle for m in members),
                                   idle_max_ns=max(m.idle_max_ns for m in members))
            rows.append((folded, n))
        # slow readers first, then the idle ones: each group most recent first
        rows.sort(key=lambda r: (not r[0].idle_only, r[0].last_end_ns), reverse=True)
        return rows


def _wrap_text(text: str, width: int = 80, lines: int = 2) -> list[str]:
    import textwrap

    out = textwrap.wrap(text, width, subsequent_indent="    ")
    if len(out) > lines:
        out = out[:lines]
        out[-1] = out[-1][:width - 1] + "…"
    return out


def render(board: WaterBoard, rows: int = 15, title: str = "") -> Group:
    t = Table(box=None, pad_edge=False, header_style="bold", expand=False, padding=(0, 1, 0, 0))
    for name, just in (("PID", "right"), ("COMM", "left"), ("PORT", "right"),
                       ("REMOTE", "left"), ("LVL", "right"), ("VOL", "right"),
                       ("UNRD", "right"), ("CAP", "right"), ("FILL", "right"),
                       ("DROP", "right"), ("!", "left")):
        t.add_column(name, justify=just, no_wrap=True)
    for s in board.top(rows):
        marks = "".join(ALERT_MARKS.get(a, "?") for a in sorted(board.alerts.get(s.sock_key, {})))
        t.add_row(str(s.pid or "-"), (s.comm or "?")[:8], str(s.lport),
                  endpoint(s.raddr, s.rport)[:21], str(s.level), human_bytes(s.volume),
                  human_bytes(s.unread_bytes), human_bytes(s.capacity),
                  f"{s.fill_ratio * 100:.0f}%", str(s.drops),
                  Text(marks, style="bold red") if marks else "")
    parts = []
    elapsed = time.monotonic() - board.started
    status = f"  {elapsed:.0f}s  sockets {len(board.sockets)}  records {board.records}  " \
             f"lost {board.lost}"
    room = 80 - len(status)
    title = title if len(title) <= room else title[:room - 1] + "…"
    parts.append(Text(title + status, style="dim"))
    # the answer first: per process, where the slow reads' time went
    procs = board.book.processes()
    for p in procs[:3]:
        for line in _wrap_text(p.short()):
            parts.append(Text(line, style="bold"))
    if len(procs) > 3:
        parts.append(Text(f"... and {len(procs) - 3} more processes", style="dim"))
    parts.append(t)
    if board.readers:
        r = Table(box=None, pad_edge=False, header_style="bold", padding=(0, 1, 0, 0))
        for name, just in (("PID", "right"), ("GOID", "right"), ("FD", "right"),
                           ("PORT", "right"), ("SLOW", "right"), ("MAX", "right"),
                           ("WHY", "left"), ("WAIT", "left"), ("CALLER", "left")):
            r.add_column(name, justify=just, no_wrap=True)
        for x, n in board.reader_rows()[:rows]:
            sock = board.sockets.get(x.sock_key)
            why = VERDICT_CODES.get(x.last_verdict, "")
            skew = board.process_alerts.get(x.pid, {}).get("read_skew")
            if x.idle_only:      # SLOW and MAX: its idle reads (WHY says IDLE)
                count, most = x.idle, x.idle_max_ns
            else:               # until a verdict came: the whole wait
                count, most = x.blocked, x.max_ns or x.raw_max_ns
            goid = f"×{n}" if n > 1 else str(x.goid) if x.goid is not None else "-"
            r.add_row(str(x.pid), goid, str(x.fd) if x.fd >= 0 else "-",
                      str(sock.lport) if sock else "-", str(count), ms(most),
                      Text(why + ("!" if skew else ""), style="bold" if why else ""),
                      x.last_split[:15], short_func(x.caller)[:24])
        parts.append(Text("Go readers (slow reads; WHY: PEER waited for the peer, RUN data "
                          "came but it did not run, LAG data stood in the queue, ? unknown, "
                          "IDLE the peer owed nothing: ×N goroutines alike)", style="bold"))
        parts.append(r)
    if board.closes:
        parts.append(Text("water left at close:", style="bold"))
        for c in board.closes:
            parts.append(Text(f"  {c.pid or '-'} {c.comm[:12]} {endpoint(c.laddr, c.lport)} -> "
                              f"{endpoint(c.raddr, c.rport)}  {c.unread_bytes} bytes unread"))
    parts.append(Text(board.legend, style="dim"))
    return Group(*parts)


class LiveView:
    def __init__(self, title: str, rows: int = 15, console: Console | None = None):
        if console is None:
            console = Console()
            if not console.is_terminal:  # piped: keep the 80 columns the table is laid out for
                console = Console(width=80)
        self.console = console
        self.title = title
        self.rows = rows
        self._live = None

    def __enter__(self):
        if self.console.is_terminal:
            from rich.live import Live
            self._live = Live(console=self.console, auto_refresh=False, transient=False)
            self._live.__enter__()
        return self

    def show(self, board: WaterBoard) -> None:
        g = render(board, self.rows, self.title)
        if self._live is not None:
            self._live.update(g, refresh=True)
        else:
            self.console.print(g)
            self.console.print()

    def __exit__(self, *exc):
        if self._live is not None:
            self._live.__exit__(*exc)


class ViewSink(Sink):
    """The live view as a sink: the board takes the records, the view shows it each tick."""

    name = "live view"
    ignores = frozenset({"notice", "process", "summary"})   # notices: RunStats says them

    def __init__(self, title: str | None = None, rows: int = 15,
                 console: Console | None = None, board: WaterBoard | None = None):
        self.board = board or WaterBoard()
        self.view = LiveView(title or "otelwater watch", rows=rows, console=console)
        self._title = title
        self._started = self._open = False

    def start(self, run: RunInfo) -> None:
        if self._title is None:      # what is watched, Go reads included
            self.view.title = f"otelwater watch: {run.what}"
        self._started = True

    def on_snapshot(self, r) -> None:
        self.board.add(r)

    def on_read(self, r) -> None:
        self.board.add_read(r)

    def on_verdict(self, r) -> None:
        self.board.add_verdict(r)

    def on_alert(self, r) -> None:
        self.board.add_alert(r)

    def on_counts(self, r) -> None:
        self.board.add_counts(r)

    def on_lost(self, r) -> None:
        self.board.lost_by_probe[r.probe] = r.lost_total

    def tick(self) -> None:
        if not self._started:
            return
        if not self._open:           # the terminal is taken at the first frame, not before
            self.view.__enter__()
            self._open = True
        self.view.show(self.board)

    def close(self, timeout_s: float = 5.0) -> None:
        if not self._started:
            return
        self._started = False
        if not self._open:
            self.view.__enter__()
            self._open = True
        try:
            self.view.show(self.board)
        finally:
            self._open = False
            self.view.__exit__(None, None, None)


class RunStats(Sink):
    """Counts for the closing line, and each notice said on stderr as it comes. Slow reads by
    verdict are the kernel's exact counts (VerdictCounts) for the processes it counted, the
    verdict records' for the others; `closing_text()` is the closing line's part on them."""

    name = "run summary"
    ignores = frozenset({"read", "alert", "process", "summary"})

    def __init__(self, out=None):
        import sys

        self.out = out or sys.stderr
        self.snapshots = 0
        self.lost_by_probe: dict[str, int] = {}
        self.book = WaitBook()

    @property
    def lost(self) -> int:
        return sum(self.lost_by_probe.values())

    @property
    def verdicts(self) -> dict[str, int]:
        """Slow reads by verdict (exact where the kernel counted them); idle ones only when
        they were slow reads of the run (--include-idle: verdict records)."""
        out = self.book.verdict_counts()
        if self.book.idle_records:
            out[IDLE] = self.idle
        return out

    @property
    def idle(self) -> int:
        return sum(p.idle for p in self.book.processes())

    @property
    def cut(self) -> int:
        """Slow reads the kernel counted but kept off the record (--record-rate)."""
        return sum(c.cut for c in self.book.kernel.values())

    @property
    def exact(self) -> bool:
        return bool(self.book.kernel)

    def closing_text(self) -> str:
        """"slow reads: 192 peer-starved, 3 runtime-starved (exact, the kernel's count); 15,020
        idle reads not counted as slow; 40 slow reads counted but not recorded in full
        (--record-rate)", or "" when there were none."""
        procs = self.book.processes()
        counts: dict[str, int] = {}
        for p in procs:
            for v, n in p.reads.items():
                counts[v] = counts.get(v, 0) + n
        idle = sum(p.idle for p in procs)
        parts = []
        if counts:
            parts.append("slow reads: " + ", ".join(
                f"{n:,} {v}" for v, n in sorted(counts.items(), key=lambda x: (-x[1], x[0])))
                + (" (exact, the kernel's count)" if all(p.exact for p in procs) else ""))
        if idle:
            parts.append(f"{idle:,} idle read{'s' * (idle != 1)} "
                         + ("(the peer owed nothing)" if self.book.idle_records else
                            "not counted as slow (the peer owed nothing)"))
        if self.cut:
            parts.append(f"{self.cut:,} slow reads counted but not recorded in full "
                         "(--record-rate)")
        return "; ".join(parts)

    def on_snapshot(self, r) -> None:
        self.snapshots += 1

    def on_lost(self, r) -> None:
        self.lost_by_probe[r.probe] = r.lost_total

    def on_verdict(self, r) -> None:
        self.book.add_verdict(r)

    def on_counts(self, r) -> None:
        self.book.add_counts(r)

    def on_notice(self, r) -> None:
        print(f"otelwater: {r.text}", file=self.out, flush=True)
