"""The kernel water-level probe: builds bpf/water.c with offsets from the running kernel's BTF,
attaches it to tracepoints, and turns its ring buffer and socket table into WaterSnapshots.

    with WaterProbe(WaterOptions(ports={8080})) as probe:
        for snap in probe.poll(): ...        # ring-buffer records (rises, peaks, drops, closes)
        for snap in probe.sweep(): ...       # periodic: every socket whose state moved (but
                                             # one whose queue stays empty: Sweeper)
        probe.lost_total()                   # records the ring buffer could not take
        probe.lost_sweep(ts_ns)              # the sweep's LostEvents (or None), see LossLedger
        probe.stop()                         # at the end: detached, the rest, the exact loss

A record the ring buffer could not take travels in-band: the next record the same CPU delivers
carries how many were lost before it and when (first and last), and poll() puts a LostEvents
(located: since_ns, until_ns, count) just before that record.

Records and table entries are decoded by precompiled struct.Struct from the layouts of
bpf/water.h (unpacker), addresses and names formatted once per distinct raw bytes
(StateDecoder); the socket table is read in batches (BPF_MAP_LOOKUP_BATCH), one key at a time
where the kernel has no batch lookup.

stop() ends a run exactly: the programs are detached first (the maps stay), so what the ring
buffer still holds and the lost total are final, and every record the probe made is then
delivered or counted as lost. Everything attached is detached by close() (also on
SIGINT/SIGTERM through the caller's context manager, and by the kernel when the process dies:
BCC holds them as perf fds).
"""

from __future__ import annotations

import ctypes
import os
import time
from dataclasses import dataclass
from typing import Iterator

from otelwater.errors import ProbeLoadError, UsageError
from otelwater.events.layout import header
from otelwater.events.model import ROLES, TCP_STATES, TRIGGERS, LostEvents, WaterSnapshot
from otelwater.hostsockets import OwnerResolver, listening, socket_inodes
from otelwater.probes import host
from otelwater.probes.loader import (POLL_BUDGET, POLL_TIME_S, STOP_DRAIN_S, STOP_SETTLE_S,
                                     RingBuffer, detach_all, kernel_cflags, load_bpf,
                                     merge_cflags, running_kernel_btf)
from otelwater.sockdiag import cgroup_tree
from otelwater.sockkey import addr_text

WATER_H = header("water.h")
WaterEvent = WATER_H.structs["water_event"]
WaterCfg = WATER_H.structs["water_cfg"]
TRIGGER_PERIODIC = WATER_H.defines["OTW_TRIGGER_PERIODIC"]

# struct sock fields read in one span (see otw_refresh in bpf/water.c)
SPAN_FIELDS = ("OFF_SK_RCVQ_QLEN", "OFF_SK_RMEM_ALLOC", "OFF_SK_BACKLOG_LEN", "OFF_SK_RCVBUF",
               "OFF_SK_DROPS")
MAX_SPAN = 192
MAX_SEQ_SPAN = 256   # bytes one probe read may cover for the two sequence numbers (stack)
MAX_CGROUPS = 4096   # cgroup ids the kernel's --cgroup filter holds (bpf/water.c)
BATCH = 1024         # socket table entries one batch lookup reads (416 KiB of buffer)


@dataclass(frozen=True)
class WaterOptions:
    ports: frozenset[int] = frozenset()     # local or remote port; empty: all
    pids: frozenset[int] = frozenset()      # processes; empty: all
    cgroups: frozenset[str] = frozenset()   # cgroup v2 directories; empty: all
    follow: bool = False                    # a record for every arrival and read
    high_water: int = 65536                 # bytes of volume that count as standing water
    low_water: int | None = None            # default: half of high water
    ringbuf_pages: int = 64                 # ring buffer size in pages (power of two)
    max_sockets: int = 65536
    seed: bool = True                       # report standing water from sock_diag at start
    # the sweep's still sockets (Sweeper): a socket that moved but whose water is zero, as it
    # was at its last report, with nothing else to say, is reported `still_reports` times in a
    # row (and for at least `still_ns`), then no more until something changes (0: always).
    # 3 = the alerts' default surge_window (3 zero samples clear a surge); give
    # max(surge_window, ...) and hold_ns when those are configured higher
    still_reports: int = 3
    still_ns: int = 0


def build_cflags(offsets: dict[str, int], opts: WaterOptions, have_rx_sk: bool,
                 sock_done_bit: int = 1) -> list[str]:
    """The -D flags that specialise bpf/water.c for this kernel and these options (pure).
    sock_done_bit: SOCK_DONE's value in the kernel's enum sock_flags (BTF)."""
    span = [offsets[n] for n in SPAN_FIELDS]
    start, end = min(span), max(span) + 4
    start -= start % 8
    if end - start > MAX_SPAN:
        raise ProbeLoadError(
            f"struct sock fields lie {end - start} bytes apart (limit {MAX_SPAN}) on this kernel",
            "report this kernel version to otelwater")
    # tcp_sock's rcv_nxt and copied_seq: one probe read covering both when they lie within
    # MAX_SEQ_SPAN bytes (a probe read costs ~35 ns, its bytes almost nothing:
    # bench/probe_parts.py), else two
    seq = (offsets["OFF_TCP_RCV_NXT"], offsets["OFF_TCP_COPIED_SEQ"])
    seq_start, seq_end = min(seq), max(seq) + 4
    seq_len = seq_end - seq_start if seq_end - seq_start <= MAX_SEQ_SPAN else 0
    flags = kernel_cflags(offsets, opts.ringbuf_pages)
    flags += [
        f"-DOTW_SPAN_START={start}", f"-DOTW_SPAN_LEN={end - start}",
        f"-DOTW_SEQ_START={seq_start}", f"-DOTW_SEQ_LEN={seq_len}",
        f"-DOTW_FILTER_PORTS={int(bool(opts.ports))}",
        f"-DOTW_FILTER_PIDS={int(bool(opts.pids))}",
        f"-DOTW_FILTER_CGROUPS={int(bool(opts.cgroups))}",
        f"-DOTW_FOLLOW={int(opts.follow)}",
        f"-DOTW_MAX_SOCKETS={opts.max_sockets}",
        f"-DOTW_HIGH_WATER={opts.high_water}",
        f"-DOTW_LOW_WATER={opts.low_water if opts.low_water is not None else opts.high_water // 2}",
        f"-DOTW_HAVE_KFREE_SKB_RX_SK={int(have_rx_sk)}",
        f"-DOTW_SOCK_DONE_BIT={sock_done_bit}",
    ]
    return flags


# -- decoding: fixed layouts by precompiled struct.Struct ------------------------------------
# A record is unpacked in one C call (struct.Struct.unpack_from) and its fields taken in one
# more (operator.itemgetter), instead of a ctypes attribute access per field (~10x the cost).
# The layouts still come from bpf/*.h (otelwater.events.layout): the Struct is built from the
# ctypes type's own field offsets, so both agree by construction (tests/unit/test_decode.py).
_INT_CODES = {1: "B", 2: "H", 4: "I", 8: "Q"}
CACHE_MAX = 65536      # formatted addresses, names, stacks kept at most (each cache; then reset)


def flat_fields(ctype, prefix: str = "", base: int = 0) -> list[tuple[int, str, str]]:
    """(offset, name, struct code) of every field of a ctypes struct: nested structs flattened
    ("s.pid"), arrays as raw bytes ("16s"), integers little-endian with their signedness."""
    out = []
    for name, t in ctype._fields_:
        off = base + getattr(ctype, name).offset
        if issubclass(t, ctypes.Structure):
            out += flat_fields(t, f"{prefix}{name}.", off)
        elif issubclass(t, ctypes.Array) or t._type_ == "c":
            out.append((off, prefix + name, f"{ctypes.sizeof(t)}s"))
        else:
            code = _INT_CODES[ctypes.sizeof(t)]
            out.append((off, prefix + name, code.lower() if t._type_.islower() else code))
    return out


def unpacker(ctype, names: tuple[str, ...]):
    """(struct.Struct over all of `ctype`, a function of its unpacked tuple giving the values
    of `names` in that order). Fields not named are skipped (padding)."""
    import operator
    import struct

    fmt, pos, index = ["<"], 0, {}
    wanted = set(names)
    for off, name, code in sorted(flat_fields(ctype)):
        if name not in wanted:
            continue
        if off > pos:
            fmt.append(f"{off - pos}x")
        fmt.append(code)
        index[name] = len(index)
        pos = off + struct.calcsize("<" + code)
    size = ctypes.sizeof(ctype)
    if size > pos:
        fmt.append(f"{size - pos}x")
    s = struct.Struct("".join(fmt))
    if s.size != size:
        raise AssertionError(f"{ctype.__name__}: struct {s.format} is {s.size} bytes, "
                             f"ctypes says {size}")
    return s, operator.itemgetter(*(index[n] for n in names))


def record_maker(cls):
    """A positional constructor of a frozen slots dataclass, every field given: the object is
    made and its slots set directly, which is what the dataclass's __init__ does through
    object.__setattr__ field by field, at about half the cost. `cls` itself for any class it
    cannot stand in for (a __post_init__, a field outside __init__, no slots)."""
    import dataclasses

    fields = dataclasses.fields(cls) if dataclasses.is_dataclass(cls) else ()
    names = tuple(f.name for f in fields)
    if (not names or names != getattr(cls, "__slots__", None) or hasattr(cls, "__post_init__")
            or not all(f.init for f in fields)):
        return cls
    args = ", ".join(f"a{i}" for i in range(len(names)))
    body = "".join(f"    s{i}(o, a{i})\n" for i in range(len(names)))
    scope = {"new": object.__new__, "cls": cls}
    scope.update({f"s{i}": cls.__dict__[n].__set__ for i, n in enumerate(names)})
    exec(f"def make({args}):\n    o = new(cls)\n{body}    return o\n", scope)  # noqa: S102
    make = scope["make"]
    make.__doc__ = f"{cls.__name__}(*every field), without its __init__'s per-field setattr"
    return make


_Snapshot = record_maker(WaterSnapshot)


def cstr(raw: bytes) -> bytes:
    """A char[N] field as ctypes gives it: up to the first NUL."""
    return raw.split(b"\0", 1)[0]


def unread_bytes(rcv_nxt: int, copied_seq: int, fin: int) -> int:
    """Payload bytes not yet read, as SIOCINQ counts them: rcv_nxt - copied_seq (mod 2**32),
    less the one sequence number the peer's FIN takes once it arrived and is still unread."""
    n = (rcv_nxt - copied_seq) & 0xFFFFFFFF
    return n - 1 if n and fin else n


# struct water_state's fields, in the order StateDecoder takes them
STATE_FIELDS = ("sock_key", "pid", "comm", "netns", "laddr", "lport", "raddr", "rport",
                "level", "volume", "capacity", "backlog", "drops", "drop_events",
                "drop_reason", "rcv_nxt", "copied_seq", "fin", "tcp_state", "ino", "role",
                "changes", "watched", "last_emit_ns")
N_STATE = len(STATE_FIELDS)
WaterSock = WATER_H.structs["water_sock"]
EVENT_STRUCT, EVENT_FIELDS = unpacker(
    WaterEvent, tuple(f"s.{n}" for n in STATE_FIELDS)
    + ("ts_ns", "tid", "trigger", "lost_before", "lost_since_ns", "lost_until_ns"))
SOCK_STRUCT, SOCK_FIELDS = unpacker(WaterSock, tuple(f"s.{n}" for n in STATE_FIELDS))
EVENT_SIZE = EVENT_STRUCT.size


class StateDecoder:
    """struct water_state values (a ring-buffer record's, a socket table entry's) ->
    WaterSnapshot, with addresses and process names formatted once per distinct raw bytes."""

    def __init__(self, drop_names: dict[int, str]):
        self.drop_names = drop_names
        self._addrs: dict[bytes, str] = {}
        self._comms: dict[bytes, str] = {}

    def addr(self, raw: bytes) -> str:
        text = self._addrs.get(raw)
        if text is None:
            if len(self._addrs) >= CACHE_MAX:
                self._addrs.clear()
            text = self._addrs[raw] = addr_text(raw)
        return text

    def comm(self, raw: bytes) -> str:
        text = self._comms.get(raw)
        if text is None:
            if len(self._comms) >= CACHE_MAX:
                self._comms.clear()
            text = self._comms[raw] = cstr(raw).decode(errors="replace")
        return text

    def snapshot(self, v, ts_ns: int, tid: int, trigger: int, owner=None) -> WaterSnapshot:
        """v: STATE_FIELDS' values (at least), in that order."""
        (sock_key, pid, comm, netns, laddr, lport, raddr, rport, level, volume, capacity,
         backlog, drops, drop_events, drop_reason, rcv_nxt, copied_seq, fin, tcp_state, ino,
         role) = v[:21]
        if not pid and owner:
            pid, comm = owner
        else:
            comm = self.comm(comm)
        # positional, in WaterSnapshot's field order (tests/unit/test_decode.py holds it)
        return _Snapshot(
            ts_ns, sock_key, pid, comm, tid, netns, self.addr(laddr), lport, self.addr(raddr),
            rport, level, volume, unread_bytes(rcv_nxt, copied_seq, fin), capacity, backlog,
            drops, drop_events,
            self.drop_names.get(drop_reason, str(drop_reason)) if drop_events else "",
            rcv_nxt, copied_seq, TRIGGERS.get(trigger, str(trigger)),
            TCP_STATES.get(tcp_state, ""), ino, ROLES.get(role, ""))


def drain_at_stop(probe, rings: list, ts_offset: int, time_s: float | None = None) -> list:
    """A detached probe's last records: decoded for at most `time_s` (STOP_DRAIN_S), then what
    is left only counted (about 1 us a record instead of ~10), as lost records located where
    they were made, so a flood in a huge ring buffer does not hold Ctrl-C; then the sweep's
    lost record with the final, exact total. `probe`: a WaterProbe or GoReadSampler;
    `ts_offset`: where a record's time lies in it."""
    until = time.monotonic() + (STOP_DRAIN_S if time_s is None else time_s)
    out: list = []
    while True:
        out += probe.poll()
        if not probe.backlogged:
            break
        if time.monotonic() >= until:
            count, first, last = 0, 0, 0
            for ring in rings:
                n, f, t = ring.count_rest(ts_offset)
                if n:
                    first = min(first, f) if count else f
                    last = max(last, t)
                    count += n
            if count:
                out.append(probe._ledger.left_unread(time.monotonic_ns(), count, first, last,
                                                     probe.lost_total()))
            break
    lost = probe.lost_sweep(time.monotonic_ns())
    return out + [lost] if lost is not None else out


class LossLedger:
    """One probe's lost ring-buffer records as LostEvents, located in time (bpf/goread.h,
    otw_lost_take). Shared by the water probe and the Go read sampler.

    - in-band (carried): a delivered record said `count` records were lost on its CPU between
      `since_ns` and `until_ns`; the LostEvents has the record's time and goes just before it.
      Its lost_total is the probe's exact total read once per poll (settle()).
    - sweep: the exact total, and the losses still pending on a CPU (no delivered record has
      reported them yet: the CPU has not emitted since, or never will), each reported once: a
      CPU's pending losses first from their since_ns, later ones in the same run from the
      previous sweep (they came after it), until the last loss. When only the total moved (everything already reported in-band), the
      record has count 0 and locates nothing. None when nothing moved.
    lost_total never decreases from one record to the next."""

    def __init__(self, probe: str):
        self.probe = probe
        self.total = 0                   # the largest lost_total put in a record so far
        self.unread = 0                  # left in the ring buffer at the stop, not decoded
        self._swept: dict = {}           # (program, cpu) -> (since_ns, pending, seen at)

    def left_unread(self, ts_ns: int, count: int, first_ns: int, last_ns: int,
                    total: int) -> LostEvents:
        """Records still in the ring buffer when the stop's drain ran out of time, counted
        (not decoded) and lost from here on: `total` is the kernel's, without them."""
        self.unread += count
        self.total = max(self.total, total + self.unread)
        return LostEvents(ts_ns, self.probe, self.total, min(first_ns, last_ns), count, last_ns)

    def carried(self, ts_ns: int, count: int, since_ns: int, until_ns: int) -> LostEvents:
        """A placeholder until settle() knows the total (lost_total -1)."""
        until = min(max(until_ns, since_ns), ts_ns)
        return LostEvents(ts_ns, self.probe, -1, min(since_ns, until), count, until)

    def settle(self, records: list, at: list[int], total: int) -> None:
        """Give the placeholders at these indexes of `records` the probe's total (read after
        the ring buffer was consumed, so it counts every loss they carry)."""
        self.total = total = max(self.total, total + self.unread)
        for i in at:
            r = records[i]
            records[i] = LostEvents(r.ts_ns, r.probe, total, r.since_ns, r.count, r.until_ns)

    def sweep(self, ts_ns: int, total: int, pending: dict) -> LostEvents | None:
        """pending: (program, cpu) -> (records lost since its last delivered one, the time of
        the first, of the last)."""
        count, since, until = 0, ts_ns, 0
        swept = {}
        for where, (n, first, last) in pending.items():
            if not n:
                continue
            first = first or ts_ns       # read while the kernel was writing it: unknown
            last = min(max(last, first), ts_ns)
            prev = self._swept.get(where)
            if prev is not None and prev[0] == first:    # the same run, partly reported
                new, start = n - prev[1], prev[2]
            else:
                new, start = n, first
            if new > 0:
                count += new
                since = min(since, start)
                until = max(until, last)
            swept[where] = (first, n, ts_ns)   # seen up to now: later ones came after
        self._swept = swept
        total += self.unread
        if not count and total <= self.total:
            return None
        self.total = total = max(self.total, total)
        if not count:
            return LostEvents(ts_ns, self.probe, total, ts_ns, 0, ts_ns)
        return LostEvents(ts_ns, self.probe, total, min(since, until), count, until)


# a socket's facts besides its water and its sequence numbers: a change in any is news
FACT_FIELDS = ("sock_key", "pid", "comm", "netns", "laddr", "lport", "raddr", "rport",
               "capacity", "drops", "drop_events", "drop_reason", "fin", "tcp_state", "ino",
               "role")
_I = {n: i for i, n in enumerate(STATE_FIELDS)}


class Sweeper:
    """Which entries of the socket table a sweep reports, as periodic snapshots (pure: fed
    STATE_FIELDS tuples, so tests need no kernel).

    Reported: every watched socket whose `changes` moved since the last sweep (everything with
    all_sockets), except a *still* one: its water is zero now (level, volume, unread bytes and
    backlog), it was zero at its last report, no ring-buffer record was made for it since
    (`last_emit_ns`), and nothing else moved but its sequence numbers (FACT_FIELDS equal):
    such a report would say only that the queue is still empty. A socket that goes from water to
    zero is still reported at zero, `still_reports` times in a row and for at least `still_ns`
    (the alert stage clears a surge on `surge_window` zero samples, and a fired alert after
    `hold_ns`), so the last state of a queue that went still is reported exactly
    (docs/design.md). Sockets without a reader yet (pid 0, named from /proc) are always
    reported."""

    def __init__(self, decoder: StateDecoder, owners, still_reports: int = 3,
                 still_ns: int = 0):
        import operator

        self.decoder = decoder
        self.owners = owners
        self.still_reports = still_reports
        self.still_ns = still_ns
        self.still_skipped = 0        # snapshots not made, in total
        self._facts = operator.itemgetter(*(_I[n] for n in FACT_FIELDS))
        # map key -> (changes, report): report = (hash of the facts, last_emit_ns, zero reports
        # in a row, time of the first of them) of the socket's last periodic snapshot, or None
        self._seen: dict[int, tuple] = {}

    def sweep(self, entries, now: int, all_sockets: bool = False) -> tuple[list, set]:
        """entries: (map key, STATE_FIELDS values); -> (snapshots, sock_keys of every watched
        socket)."""
        out: list = []
        keys: set = set()
        seen: dict = {}
        prev = self._seen
        still, still_ns = self.still_reports, self.still_ns
        facts_of, snapshot, owners = self._facts, self.decoder.snapshot, self.owners
        skipped = 0
        for mk, v in entries:
            (sock_key, pid, _comm, _netns, _laddr, _lport, _raddr, _rport, level, volume,
             _capacity, backlog, _drops, _drop_events, _drop_reason, rcv_nxt, copied_seq, fin,
             _tcp_state, ino, _role, changes, watched, emit) = v
            if not watched:
                continue
            keys.add(sock_key)
            p = prev.get(mk)
            if p is not None and p[0] == changes and not all_sockets:
                seen[mk] = p
                continue
            rep = p[1] if p is not None else None
            n = (rcv_nxt - copied_seq) & 0xFFFFFFFF
            if level or volume or backlog or (n and not (n == 1 and fin)):
                rep = (None, emit, 0, 0)               # water: reported
            elif pid and still:
                facts = hash(facts_of(v))   # its hash, not the 16 fields: ~0.5 KiB a socket
                if rep is not None and rep[2] and rep[0] == facts and rep[1] == emit:
                    if rep[2] >= still and now - rep[3] >= still_ns and not all_sockets:
                        seen[mk] = (changes, rep)      # still: nothing new to say
                        skipped += 1
                        continue
                    rep = (facts, emit, rep[2] + 1, rep[3])
                else:
                    rep = (facts, emit, 1, now)        # the first report at zero
            else:
                rep = None
            seen[mk] = (changes, rep)
            owner = owners.owner(ino) if not pid and owners is not None else None
            out.append(snapshot(v, now, 0, TRIGGER_PERIODIC, owner))
        self._seen = seen
        self.still_skipped += skipped
        return out, keys


def check_tcp_states(btf) -> None:
    """bpf/water.h's OTW_TCP_* must equal the running kernel's enum (they have not moved in
    decades; a kernel where they did gets a clear refusal rather than wrong states)."""
    from otelwater.probes.btf import BtfError

    wrong = []
    for value, name in TCP_STATES.items():
        try:
            if btf.enumerator(f"TCP_{name}") != value:
                wrong.append(name)
        except BtfError:
            wrong.append(name)
    if wrong:
        raise ProbeLoadError(f"TCP states differ on this kernel ({', '.join(wrong)})",
                             "report this kernel version to otelwater")


def sock_done_bit(btf) -> int:
    from otelwater.probes.btf import BtfError

    try:
        return btf.enumerator("SOCK_DONE")
    except BtfError as e:
        raise ProbeLoadError(f"the kernel's BTF has no SOCK_DONE ({e})",
                             "report this kernel version to otelwater") from None


def cgroup_id(path: str) -> int:
    """A cgroup v2 directory's id (its inode number), as bpf_get_current_cgroup_id returns."""
    try:
        return os.stat(path).st_ino
    except OSError as e:
        raise UsageError(f"cgroup {path!r} not found ({e.strerror})",
                         "give a cgroup v2 directory, e.g. /sys/fs/cgroup/unified/my.slice")


class WaterProbe:
    def __init__(self, opts: WaterOptions = WaterOptions(), readers=None):
        """readers: a GoReadSampler made with embed=True (tracepoints): it is compiled into
        this program and bound to it, so each Go read carries its socket's evidence."""
        self.opts = opts
        self.readers = readers
        self._bpf = None
        self._events: RingBuffer | None = None
        self._stopped = False
        self._pending: list = []          # WaterSnapshot, LostEvents (in-band)
        self._carried: list[int] = []     # indexes of in-band LostEvents in _pending
        self._ledger = LossLedger("water")
        self._budget = POLL_BUDGET
        self._deadline = 0.0
        self.backlogged = False
        self._owners = OwnerResolver()
        self._batch: tuple | bool | None = None   # batch lookup buffers; False: unsupported
        self._inodes: set[int] = set()
        self._generation = 0
        self._netns_seen: set[int] = set()   # namespaces whose listeners the kernel was told
        self._cgroup_ids: set[int] = set()   # in the kernel's cgroup filter
        self._cgroups_full = False
        self._standing = None
        self._seeded = False
        from otelwater.probes.btf import drop_reasons, kernel_offsets
        btf = running_kernel_btf()
        self.offsets = kernel_offsets(btf)
        self.drop_names = drop_reasons(btf)
        self._decoder = StateDecoder(self.drop_names)
        self._sweeper = Sweeper(self._decoder, self._owners, opts.still_reports, opts.still_ns)
        self.socket_count = 0        # entries of the socket table at the last sweep
        check_tcp_states(btf)
        self.cflags = build_cflags(self.offsets, opts, host.kfree_skb_has_rx_sk(),
                                   sock_done_bit(btf))
        if readers is not None:
            self.cflags = merge_cflags(self.cflags, readers.embed_cflags())
        self._load()

    # -- lifecycle -------------------------------------------------------------------------
    def _load(self) -> None:
        self._bpf = load_bpf("water.c", self.cflags, "the kernel probe",
                             embed=(self.readers.embed_source, "goverdict.c")
                             if self.readers else ())
        try:
            self._configure()
            # a consumer of its own (loader.RingBuffer): a flooded `events` must not keep the
            # embedded sampler's read_events from being read
            self._events = RingBuffer(self._bpf, "events", self._on_event)
            if self.readers is not None:
                self.readers.bind(self._bpf)
        except BaseException:
            self.close()
            raise

    def _configure(self) -> None:
        if self.opts.seed:
            from otelwater.sockdiag import StandingWater

            self._standing = StandingWater(self.opts.ports, self.opts.pids, self.opts.cgroups)
        b = self._bpf
        # the listeners first: the kernel decides roles (dialed or accepted) as soon as the
        # generation moves from 0, which refresh_filters() below does; a socket decided before
        # its namespace's listeners were written would keep the wrong role
        go_pids = self.readers.opts.pids if self.readers is not None else ()
        self.learn_listeners(("self", *sorted(self.opts.pids | frozenset(go_pids))))
        if not self.opts.pids:
            # every namespace whose sockets may be watched (a pod's, another container's):
            # its connections accepted before the start are known as accepted
            from otelwater.hostsockets import namespaces

            if self.opts.cgroups:
                from otelwater.sockdiag import cgroup_pids

                members = set()
                for path in self.opts.cgroups:
                    members |= cgroup_pids(path)
                self.learn_listeners(namespaces(sorted(members)).values())
            else:
                self.learn_listeners(namespaces().values())
        if self.opts.ports:
            t = b["watch_ports"]
            for p in self.opts.ports:
                t[ctypes.c_int(p)] = ctypes.c_uint8(1)
        if self.opts.pids:
            t = b["watch_pids"]
            for p in self.opts.pids:
                t[ctypes.c_uint32(p)] = ctypes.c_uint8(1)
            self.refresh_filters()
        if self.opts.cgroups:
            self.refresh_cgroups()
        # the programs ran while the filters were being written: sockets they decided under
        # generation 0 are decided again on their next event
        self._bump_generation()

    def learn_listeners(self, pids) -> None:
        """Tell the kernel the listening ports of the network namespaces of these processes
        (once per namespace), so a socket accepted before otelwater attached is known as
        accepted: the kernel learns listeners from the connections it sees accepted."""
        if self._bpf is None:
            return
        t = self._bpf["listen_ports"]
        for pid in pids:
            # the sweep asks every second: a namespace already told costs a stat, not a parse
            # of its whole TCP table (/proc/PID/net/tcp: ~150 B a socket)
            try:
                if os.stat(f"/proc/{pid}/ns/net").st_ino in self._netns_seen:
                    continue
            except OSError:
                continue
            seen = listening(pid)
            if seen is None or seen[0] in self._netns_seen:
                continue
            netns, ports = seen
            self._netns_seen.add(netns)
            for port in ports:
                t[ctypes.c_uint64(netns << 16 | port)] = ctypes.c_uint8(1)

    def _bump_generation(self) -> None:
        self._generation += 1
        self._bpf["cfg"][ctypes.c_int(0)] = WaterCfg(self._generation)

    def close(self) -> None:
        if self._bpf is not None:
            try:
                if self.readers is not None:
                    self.readers.close()  # drains its ring buffer while the program lives
            finally:
                self._close_bpf()

    def _close_standing(self) -> None:
        if self._standing is not None:
            self._standing.close()
            self._standing = None

    def _close_bpf(self) -> None:
        self._close_standing()
        if self._events is not None:
            self._events.close()
            self._events = None
        if self._bpf is not None:
            try:
                self._bpf.cleanup()
            finally:
                self._bpf = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- filters ---------------------------------------------------------------------------
    def refresh_cgroups(self) -> int:
        """Put the ids of the cgroups below the --cgroup directories in the kernel's filter
        (the kernel matches a reader's own cgroup, exactly: a pod's processes are in its
        containers' cgroups, a slice's in its services'), those made since the last call too:
        the agent calls this every few seconds. Returns how many were added; a full table
        (MAX_CGROUPS) leaves the rest out, said once."""
        t = self._bpf["watch_cgroups"]
        added = 0
        for path in sorted(self.opts.cgroups):
            for sub in cgroup_tree(path):
                try:
                    cg = cgroup_id(sub)
                except UsageError:          # gone meanwhile
                    continue
                if cg in self._cgroup_ids:
                    continue
                try:
                    t[ctypes.c_uint64(cg)] = ctypes.c_uint8(1)
                except Exception:  # noqa: BLE001 - BCC: the table is full
                    if not self._cgroups_full:
                        self._cgroups_full = True
                        import logging

                        logging.getLogger(__name__).warning(
                            "more than %d cgroups below %s: the sockets of the others are not "
                            "watched", MAX_CGROUPS, ", ".join(sorted(self.opts.cgroups)))
                    break
                self._cgroup_ids.add(cg)
                added += 1
            else:
                continue
            break                           # the table is full
        if added:       # sockets decided before are decided again against the new ids
            self._bump_generation()
        return added

    def refresh_filters(self) -> None:
        """Keep the kernel's view of the watched pids' socket inodes current; bump the
        generation when it changed so filtered-out sockets are decided again."""
        if not self.opts.pids:
            return
        now = set()
        for pid in self.opts.pids:
            now.update(socket_inodes(pid).values())
        if now == self._inodes:
            return
        t = self._bpf["watch_inodes"]
        for ino in now - self._inodes:
            t[ctypes.c_uint64(ino)] = ctypes.c_uint8(1)
        for ino in self._inodes - now:
            try:
                del t[ctypes.c_uint64(ino)]
            except KeyError:
                pass
        self._inodes = now
        self._bump_generation()

    # -- data ------------------------------------------------------------------------------
    def _on_event(self, _ctx, data, _size) -> int:
        v = EVENT_FIELDS(EVENT_STRUCT.unpack_from(ctypes.string_at(data, EVENT_SIZE)))
        ts_ns, tid, trigger, lost_before, lost_since, lost_until = v[N_STATE:]
        if lost_before:     # records this CPU lost before this one: said just before it
            self._carried.append(len(self._pending))
            self._pending.append(self._ledger.carried(ts_ns, lost_before, lost_since,
                                                      lost_until))
        owner = self._owners.owner(v[_I["ino"]]) if not v[_I["pid"]] else None
        self._pending.append(self._decoder.snapshot(v, ts_ns, tid, trigger, owner))
        # a negative return stops libbpf's consume after this record (which is kept): a
        # producer faster than us cannot hold the loop inside one consume
        n = len(self._pending)
        if n >= self._budget or (n & 255 == 0 and time.monotonic() >= self._deadline):
            return -1
        return 0

    def poll(self, max_records: int = POLL_BUDGET) -> list:
        """What the ring buffer holds now, at most max_records (never blocks): WaterSnapshots,
        and a LostEvents just before each record that says records were lost before it.
        `backlogged` tells whether records were left for the next call."""
        self._budget = max_records
        self._deadline = time.monotonic() + POLL_TIME_S
        self._events.consume()
        out, self._pending = self._pending, []
        if self._carried:
            self._ledger.settle(out, self._carried, self.lost_total())
            self._carried = []
        self.backlogged = len(out) >= max_records or (
            len(out) >= 256 and time.monotonic() >= self._deadline)
        if self._standing is not None and not self._seeded:
            # sockets already holding water when we started make no event while their
            # reader is stuck: the kernel's socket table tells them at once
            self._seeded = True
            out = self._standing.scan(time.monotonic_ns()) + out
        return out

    def sweep(self, all_sockets: bool = False) -> list[WaterSnapshot]:
        """Periodic snapshots from the socket table: each watched socket whose state moved since
        the last sweep (or every watched socket with all_sockets), but for still ones (Sweeper)."""
        now = time.monotonic_ns()
        if self.readers is not None:     # traced processes found since (a namespace each)
            self.learn_listeners(self.readers.watched_pids())
        counted = [0]

        def rows():     # streamed: a batch's rows at a time, not the whole table's at once
            for row in self._table():
                counted[0] += 1
                yield row

        out, keys = self._sweeper.sweep(rows(), now, all_sockets)
        self.socket_count = counted[0]   # the kernel's table: sockets watched now
        if self._standing is not None and self._seeded:
            # standing water the probe has seen no event of: reported when its water changes,
            # and once a heartbeat (60 s) while it does not
            out += self._standing.sweep(now, self._standing.keys - keys)
        return out

    def _table(self) -> Iterator[tuple]:
        """(map key, STATE_FIELDS values) of every entry of the socket table: by batches of
        BATCH entries a syscall (BPF_MAP_LOOKUP_BATCH, Linux 5.6+), else one key at a time.
        Lazily: the rows of 10,000 sockets held at once were 15 MiB of tuples a sweep, and the
        memory they left behind stayed with the process."""
        table = self._bpf["socks"]
        if self._batch is not False:
            got = self._lookup_batch(table)
            if got is not None:
                return got
        unpack, fields = SOCK_STRUCT.unpack, SOCK_FIELDS
        return ((k.value, fields(unpack(bytes(ws)))) for k, ws in table.items())

    def _lookup_batch(self, table) -> Iterator[tuple] | None:
        """The rows, batch by batch (the first batch is read now); None when the kernel
        refused the first (then never again for EINVAL/ENOTSUPP). A later batch refused ends
        the rows there."""
        import errno as E

        from bcc.libbcc import lib

        if self._batch is None:
            if (ctypes.sizeof(table.Leaf) != SOCK_STRUCT.size
                    or ctypes.sizeof(table.Key) != 8):
                raise ProbeLoadError(f"the socket table's entries are {ctypes.sizeof(table.Leaf)} "
                                     f"bytes, bpf/water.h says {SOCK_STRUCT.size}",
                                     "report this to otelwater")
            self._batch = ((ctypes.c_uint64 * BATCH)(),
                           (ctypes.c_char * (BATCH * SOCK_STRUCT.size))(),
                           ctypes.c_uint32(), ctypes.c_uint32(), ctypes.c_uint32())
        keys, vals, token_in, token_out, count = self._batch
        size, unpack, fields = SOCK_STRUCT.size, SOCK_STRUCT.iter_unpack, SOCK_FIELDS
        fd = table.map_fd
        view = memoryview(vals)

        def batch(first: bool) -> tuple[list, bool] | None:
            """(this batch's rows, whether more follow); None when the kernel refused."""
            count.value = BATCH
            res = lib.bpf_lookup_batch(fd, None if first else ctypes.byref(token_in),
                                       ctypes.byref(token_out), keys, vals,
                                       ctypes.byref(count))
            n = count.value
            if res:
                err = ctypes.get_errno() or -res
                if err != E.ENOENT:      # ENOENT: the end of the table (n: the last ones)
                    if err in (E.EINVAL, E.ENOTSUP, E.EOPNOTSUPP, 524, E.EPERM):  # 524: ENOTSUPP
                        self._batch = False
                    return None
            rows = list(zip(keys[:n], map(fields, unpack(view[:n * size])))) if n else []
            token_in.value = token_out.value
            return rows, not res

        got = batch(True)
        if got is None:
            return None

        def rest(got):
            while got is not None:
                rows, more = got
                yield from rows
                got = batch(False) if more else None
        return rest(got)

    def stop(self) -> list:
        """The end of a run: detach every program of this probe (the embedded Go read
        sampler's too: it is the same program; its records are then its own stop()'s), keeping
        the maps; then every record the ring buffer still holds (all of them: nothing adds to
        it any more), and the sweep's lost record with the final, exact total. After it, every
        record the probe made was delivered or counted as lost. poll() and sweep() still work;
        close() detaches nothing more."""
        if self._bpf is None or self._stopped:
            return []
        if self.readers is not None:
            self.readers.detach_uprobes()   # its own (goread: _attach_uprobes)
        detach_all(self._bpf)
        self._stopped = True
        time.sleep(STOP_SETTLE_S)   # a program that was running as we detached ends
        return drain_at_stop(self, [self._events], WaterEvent.ts_ns.offset)

    def lost_total(self) -> int:
        if self._bpf is None:
            return self._ledger.total
        return sum(int(v.total) for v in self._bpf["lost"].getvalue(0))

    def lost_sweep(self, ts_ns: int) -> LostEvents | None:
        """The sweep's lost record (LossLedger.sweep): the exact total, and the losses no
        delivered record has reported yet; None when nothing moved."""
        if self._bpf is None:
            return None
        cpus = self._bpf["lost"].getvalue(0)
        pending = {(0, cpu): (int(v.pending), int(v.since_ns), int(v.until_ns))
                   for cpu, v in enumerate(cpus)}
        return self._ledger.sweep(ts_ns, sum(int(v.total) for v in cpus), pending)
