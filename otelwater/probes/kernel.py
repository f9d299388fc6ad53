"""The kernel water-level probe: builds bpf/water.c with offsets from the running kernel's BTF,
attaches it to tracepoints, and turns its ring buffer and socket table into WaterSnapshots.

    with WaterProbe(WaterOptions(ports={8080})) as probe:
        for snap in probe.poll(): ...        # ring-buffer records (rises, peaks, drops, closes)
        for snap in probe.sweep(): ...       # periodic: every socket whose state moved
        probe.lost_total()                   # records the ring buffer could not take
        probe.lost_sweep(ts_ns)              # the sweep's LostEvents (or None), see LossLedger
        probe.stop()                         # at the end: detached, the rest, the exact loss

A record the ring buffer could not take travels in-band: the next record the same CPU delivers
carries how many were lost before it and when (first and last), and poll() puts a LostEvents
(located: since_ns, until_ns, count) just before that record.

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

from otelwater.errors import ProbeLoadError, UsageError
from otelwater.events.layout import header
from otelwater.events.model import ROLES, TCP_STATES, TRIGGERS, LostEvents, WaterSnapshot
from otelwater.hostsockets import OwnerResolver, listening, socket_inodes
from otelwater.probes import host
from otelwater.probes.loader import (POLL_BUDGET, POLL_TIME_S, STOP_DRAIN_S, STOP_SETTLE_S,
                                     RingBuffer, detach_all, kernel_cflags, load_bpf,
                                     merge_cflags, running_kernel_btf)
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


def unread_bytes(rcv_nxt: int, copied_seq: int, fin: int) -> int:
    """Payload bytes not yet read, as SIOCINQ counts them: rcv_nxt - copied_seq (mod 2**32),
    less the one sequence number the peer's FIN takes once it arrived and is still unread."""
    n = (rcv_nxt - copied_seq) & 0xFFFFFFFF
    return n - 1 if n and fin else n


def snapshot_from_state(st, ts_ns: int, tid: int, trigger: int, drop_names: dict[int, str],
                        owner=None) -> WaterSnapshot:
    pid, comm = st.pid, st.comm.decode(errors="replace")
    if not pid and owner:
        pid, comm = owner
    return WaterSnapshot(
        ts_ns=ts_ns, sock_key=st.sock_key, pid=pid, comm=comm, tid=tid, netns=st.netns,
        laddr=addr_text(bytes(st.laddr)), lport=st.lport,
        raddr=addr_text(bytes(st.raddr)), rport=st.rport,
        level=st.level, volume=st.volume,
        unread_bytes=unread_bytes(st.rcv_nxt, st.copied_seq, st.fin),
        capacity=st.capacity, backlog=st.backlog, drops=st.drops,
        drop_events=st.drop_events,
        drop_reason=drop_names.get(st.drop_reason, str(st.drop_reason)) if st.drop_events else "",
        bytes_arrived=st.rcv_nxt, bytes_read=st.copied_seq,
        trigger=TRIGGERS.get(trigger, str(trigger)),
        tcp_state=TCP_STATES.get(st.tcp_state, ""), ino=st.ino, role=ROLES.get(st.role, ""),
    )


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
        self._seen_changes: dict[int, int] = {}
        self._owners = OwnerResolver()
        self._inodes: set[int] = set()
        self._generation = 0
        self._netns_seen: set[int] = set()   # namespaces whose listeners the kernel was told
        self._standing = None
        self._seeded = False
        from otelwater.probes.btf import drop_reasons, kernel_offsets
        btf = running_kernel_btf()
        self.offsets = kernel_offsets(btf)
        self.drop_names = drop_reasons(btf)
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
            t = b["watch_cgroups"]
            for path in self.opts.cgroups:
                t[ctypes.c_uint64(cgroup_id(path))] = ctypes.c_uint8(1)
        self.learn_listeners(("self", *sorted(self.opts.pids)))
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
        e = ctypes.cast(data, ctypes.POINTER(WaterEvent)).contents
        if e.lost_before:   # records this CPU lost before this one: said just before it
            self._carried.append(len(self._pending))
            self._pending.append(self._ledger.carried(e.ts_ns, e.lost_before, e.lost_since_ns,
                                                      e.lost_until_ns))
        owner = self._owners.owner(e.s.ino) if not e.s.pid else None
        self._pending.append(
            snapshot_from_state(e.s, e.ts_ns, e.tid, e.trigger, self.drop_names, owner))
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
        the last sweep (or every watched socket with all_sockets)."""
        now = time.monotonic_ns()
        out = []
        seen = {}
        keys = set()
        if self.readers is not None:     # traced processes found since (a namespace each)
            self.learn_listeners(self.readers.watched_pids())
        for k, ws in self._bpf["socks"].items():
            st = ws.s
            if not st.watched:
                continue
            seen[k.value] = st.changes
            keys.add(st.sock_key)
            if not all_sockets and self._seen_changes.get(k.value) == st.changes:
                continue
            owner = self._owners.owner(st.ino) if not st.pid else None
            out.append(snapshot_from_state(st, now, 0, TRIGGER_PERIODIC, self.drop_names, owner))
        self._seen_changes = seen
        if self._standing is not None and self._seeded:
            # standing water the probe has seen no event of: reported again on every sweep
            out += self._standing.sweep(now, self._standing.keys - keys)
        return out

    def stop(self) -> list:
        """The end of a run: detach every program of this probe (the embedded Go read
        sampler's too: it is the same program; its records are then its own stop()'s), keeping
        the maps; then every record the ring buffer still holds (all of them: nothing adds to
        it any more), and the sweep's lost record with the final, exact total. After it, every
        record the probe made was delivered or counted as lost. poll() and sweep() still work;
        close() detaches nothing more."""
        if self._bpf is None or self._stopped:
            return []
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
