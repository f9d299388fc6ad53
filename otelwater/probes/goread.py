"""The Go read sampler: goroutine, socket and stack of every slow read, from one of two BPF
mechanisms that produce the same ReadRecord.

    opts = GoReadOptions(binary="/usr/bin/mysvc")             # or pids=frozenset({1234})
    with GoReadSampler(opts) as s:                            # mechanism="tracepoint" default
        for rec in s.poll(): ...      # blocked reads (>= threshold_ns), never blocks
        s.stats()                     # counts and log2 latency histogram of every read seen
        s.lost_total()                # records the ring buffer could not take
        s.lost_sweep(ts_ns)           # the sweep's LostEvents (or None): kernel.LossLedger
        s.stop()                      # at the end: detached, the rest, the exact loss

A record the ring buffer could not take travels in-band: the next record the same CPU delivers
carries how many were lost before it and when (first and last), and poll() puts a LostEvents
(located: since_ns, until_ns, count) just before that ReadRecord.

- "tracepoint" (bpf/goread_tp.c): syscalls:sys_enter_read/sys_exit_read for the watched
  processes (the `procs` map; with a binary, /proc is re-scanned every RESCAN_S on poll() so
  processes started later are added). Works for any process; goid needs a Go binary. With
  embed=True (the watch) it attaches nothing of its own: the water probe's
  sock:sock_recv_length ends each socket read, so a read that did not park counts as 0 ns.
- "uprobe" (bpf/goread_uprobe.c): uprobes at the entry and at every `ret` of
  net.(*conn).Read (never a uretprobe). With a binary: pid -1, so every process of it, now and
  later; with pids: one set of probes per pid. Exact Go-level latency of every Read. One BPF
  program for every binary traced (pids of several Go versions, say): each binary's Go facts
  (struct goread_gofacts) are written into its maps before its uprobes are attached, under
  each known pid (`up_procs`; with a binary, /proc is re-scanned every RESCAN_S on poll())
  and under the executable's (dev, inode) (`up_exes`: a process started since the last scan).
  Compiled into the water probe with embed=True, whatever the number of binaries.

User stacks are symbolized here from .symtab or .gopclntab (goelf.Symbolizer), PIE binaries
through their load bias in /proc/PID/maps, once per distinct stack of a process (the names of
a stack are kept by its raw addresses). A record is decoded by a precompiled struct.Struct
(kernel.unpacker, from bpf/goread.h), its comm and peer address formatted once per distinct
raw bytes. The read ring buffer has a consumer of its own
(loader.RingBuffer), also when compiled into the water probe's program. stop() ends a run
exactly: detached (embedded: by the water probe's stop(), called first), what the ring buffer
still holds and the final lost total; every read stats() counts as recorded (blocked +
queue_slow) is then a ReadRecord delivered, a loss counted, not_socket or unknown. close()
detaches, drains the ring buffer (poll() still returns what was drained) and frees everything;
when the process dies the kernel detaches them anyway (BCC holds them as perf fds).
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import time
from dataclasses import dataclass, field
from typing import Mapping

from otelwater.errors import BinaryError, NoSuchProcess, OtelwaterError, ProbeLoadError, UsageError
from otelwater.events import links as trace_links
from otelwater.events.layout import header
from otelwater.events.model import ROLES, LostEvents, Notice, ReadRecord, VerdictCounts
from otelwater.events.verdict import (CONSUMER_LAGGING, IDLE, PEER_STARVED, RUNTIME_STARVED,
                                      UNKNOWN)
from otelwater.hostsockets import exe_key
from otelwater.sockkey import addr_text
from otelwater.probes import host
from otelwater.probes.kernel import (CACHE_MAX, LossLedger, cstr, drain_at_stop,
                                      record_maker, unpacker)
from otelwater.probes.loader import (POLL_BUDGET, POLL_TIME_S, STOP_SETTLE_S, RingBuffer,
                                     check_ringbuf_pages, detach_all, kernel_cflags, load_bpf,
                                     one_line, running_kernel_btf)

GOREAD_H = header("goread.h")
GoReadEvent = GOREAD_H.structs["goread_event"]
GoReadProc = GOREAD_H.structs["goread_proc"]
GoFacts = GOREAD_H.structs["goread_gofacts"]
GoExe = GOREAD_H.structs["goread_exe"]
LinkKeysValue = GOREAD_H.structs["otw_link_keys"]
GoReadCounts = GOREAD_H.structs["goread_counts"]
_D = GOREAD_H.defines
# the kernel's verdict codes (OTW_V_*) by name
KERNEL_VERDICTS = {_D["OTW_V_PEER"]: PEER_STARVED, _D["OTW_V_RUN"]: RUNTIME_STARVED,
                   _D["OTW_V_LAG"]: CONSUMER_LAGGING, _D["OTW_V_UNKNOWN"]: UNKNOWN,
                   _D["OTW_V_IDLE"]: IDLE}
SOURCES = {_D["OTW_SOURCE_TRACEPOINT"]: "tracepoint", _D["OTW_SOURCE_UPROBE"]: "uprobe"}
# a record decoded in two C calls (kernel.unpacker): its fields in this order
EVENT_FIELDS = ("ts_start_ns", "ts_end_ns", "pid", "tid", "goid", "has_goid", "fd", "sock_key",
                "requested", "returned", "ips", "stack_len", "caller_ip", "source", "comm",
                "parked", "evidence", "arrival_ns", "queue_delay_ns", "role", "raddr", "rport",
                "send_ns", "prev_arrival_ns", "kverdict", "lost_before", "lost_since_ns",
                "lost_until_ns", "links", "lbl_len", "go_start", "lbl")
EVENT_STRUCT, EVENT_VALUES = unpacker(GoReadEvent, EVENT_FIELDS)
EVENT_SIZE = EVENT_STRUCT.size
STACK_DEPTH = _D["OTW_STACK_DEPTH"]
_LOST = EVENT_FIELDS.index("lost_before")    # then lost_since_ns, lost_until_ns
_Read = record_maker(ReadRecord)
_TP = _D["OTW_SOURCE_TRACEPOINT"]
_EV_SOCKET, _EV_QDELAY, _EV_EXACT = _D["OTW_EV_SOCKET"], _D["OTW_EV_QDELAY"], _D["OTW_EV_EXACT"]
MECHANISMS = ("tracepoint", "uprobe")
LABELS_SLICE_MINOR = 24   # runtime/pprof keeps a goroutine's labels in a slice from Go 1.24
READ_FUNCTION = "net.(*conn).Read"
RESCAN_S = 0.5
NO_SLOT = 0xFFFFFFFF
DRAIN_TIME_S = 0.3    # what close() still drains, at most this long


@dataclass(frozen=True)
class GoReadOptions:
    binary: str | None = None               # all processes of this executable (now and later)
    pids: frozenset[int] = frozenset()      # or these processes
    mechanism: str = "tracepoint"           # "tracepoint" | "uprobe"
    threshold_ns: int = 1_000_000           # a read lasting this long is a blocked read
    run_ns: int | None = None               # runtime-starved at this wait to run (None: threshold)
    record_rate: float = 0.0                # slow reads a second on the ring buffer (0: all);
                                            # the kernel counts all of them (`verdicts`)
    include_idle: bool = False              # idle slow reads go on the ring buffer too
    ringbuf_pages: int = 64                 # ring buffer size in pages (power of two)
    max_procs: int = 64                     # tracepoint: processes with an array row of parks
    max_fds: int = 4096                     # tracepoint: fds per row (larger fds: LRU hash)
    embed: bool = False                     # tracepoint: compiled into the water probe's
                                            # program (WaterProbe(readers=...)), for evidence
    # the label keys that name a recorded read's request (events/links.py); None: read no
    # labels (nor the goroutine's start function)
    links: trace_links.LinkKeys | None = trace_links.LinkKeys()
    # the agent: the processes are given at run time (set_targets), any number of binaries;
    # with by_exe, every process of a binary given is traced from its exec (tracepoints) or
    # its first read (uprobes), before the next set_targets names it
    dynamic: bool = False
    by_exe: bool = False


@dataclass(frozen=True)
class GoReadStats:
    """Totals over every read the sampler saw (not only blocked ones)."""

    enters: int           # read(2) enters / fresh uprobe entries
    exits: int            # read(2) exits / uprobe returns
    reads: int            # completed reads (a park and its data read count once)
    blocked: int          # of those, lasting >= threshold (records emitted unless not a socket)
    parks: int            # tracepoint: -EAGAIN reads
    orphans: int          # returns without an entry (began before attach)
    reentries: int        # uprobe: entry seen again before the return (stack growth)
    lost: int             # records the ring buffer could not take
    not_socket: int       # blocked reads on an fd that is not a TCP socket (no record)
    latency_sum_ns: int
    unknown: int = 0             # uprobe: blocked reads of a process whose Go facts the
                                 # kernel did not find (no record)
    queue_slow: int = 0          # reads that found data which had waited >= threshold: recorded
    queue_slow_limited: int = 0  # ...beyond the per-socket rate: counted only
    cut: int = 0                 # slow reads the record token bucket kept off the ring buffer
    idle: int = 0                # slow reads whose verdict is idle
    histogram: tuple[tuple[int, int], ...] = field(default=())  # (upper bound ns, count), log2

    @property
    def mean_latency_ns(self) -> float:
        return self.latency_sum_ns / self.reads if self.reads else 0.0


def pid_exe(pid: int) -> str:
    """A path to the executable of a live process (its real path, or /proc/PID/exe)."""
    if not os.path.isdir(f"/proc/{pid}"):
        raise NoSuchProcess(f"no process with pid {pid}", "give the pid of a running process")
    try:
        real = os.path.realpath(f"/proc/{pid}/exe")
    except OSError as e:  # realpath's readlink: ENOENT (kernel thread, zombie), EACCES
        if e.errno == errno.ENOENT:
            raise NoSuchProcess(f"process {pid} has no executable (a kernel thread, or exiting)",
                                "give the pid of a running user process") from None
        fix = ("it may belong to another container or user namespace; give --go-binary PATH"
               if os.geteuid() == 0 else
               "run as root (or with CAP_SYS_PTRACE), or give --go-binary PATH")
        raise NoSuchProcess(f"cannot read the executable of process {pid} ({e.strerror})",
                            fix) from None
    if os.path.exists(real):
        return real
    if exe_key(f"/proc/{pid}/exe") is None:
        raise NoSuchProcess(f"process {pid} has no readable executable (gone, or a kernel thread)",
                            "give the pid of a running user process")
    return f"/proc/{pid}/exe"


def _alive(pid: int) -> bool:
    """A process that is running (a zombie, exited but not yet reaped, is not)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _load_bias(pid: int, path: str) -> int:
    """Where a PIE binary's vaddr 0 sits in pid's address space (0 when unknown)."""
    from elftools.elf.elffile import ELFFile

    try:
        with open(path, "rb") as f:
            loads = [s for s in ELFFile(f).iter_segments() if s["p_type"] == "PT_LOAD"]
            first = min(loads, key=lambda s: s["p_offset"]) if loads else None
        key = exe_key(path)
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 6 or int(parts[2], 16) != (first["p_offset"] if first else 0):
                    continue
                dev_ino = parts[4]
                if key and int(dev_ino) != key[1]:
                    continue
                start = int(parts[0].split("-")[0], 16)
                return start - ((first["p_vaddr"] if first else 0) & ~0xFFF)
    except (OSError, ValueError, StopIteration):
        pass
    return 0


EXEC_FIELDS = {  # what the exec hook reads: bprm->file->f_inode->{i_ino, i_sb->s_dev}
    "OFF_BPRM_FILE": ("linux_binprm", "file"),
    "OFF_INODE_SB": ("inode", "i_sb"),
    "OFF_SB_DEV": ("super_block", "s_dev"),
}


def exec_offsets(btf) -> dict[str, int]:
    from otelwater.probes.btf import BtfError

    try:
        return {k: btf.member(s, m).offset for k, (s, m) in EXEC_FIELDS.items()}
    except BtfError as e:
        raise ProbeLoadError(f"the kernel's BTF lacks what the exec hook reads ({e})",
                             "use --go-pid PID, or --probes uprobe") from None


UPROBE_EXE_FIELDS = {  # what the uprobe sampler reads to name a process's executable:
    "OFF_TASK_MM": ("task_struct", "mm"),    # task->mm->exe_file->f_inode->{i_ino, i_sb->s_dev}
    "OFF_MM_EXE_FILE": ("mm_struct", "exe_file"),
    "OFF_INODE_SB": ("inode", "i_sb"),
    "OFF_SB_DEV": ("super_block", "s_dev"),
}


def uprobe_exe_offsets(btf) -> dict[str, int]:
    from otelwater.probes.btf import BtfError

    try:
        return {k: btf.member(s, m).offset for k, (s, m) in UPROBE_EXE_FIELDS.items()}
    except BtfError as e:
        raise ProbeLoadError(f"the kernel's BTF lacks what the uprobe sampler reads ({e})",
                             "use --probes tracepoint") from None


# An executable known only by /proc/PID/exe (a container's: another mount namespace) whose
# processes are all gone: how long its uprobes and rows stay for its next process
RETIRE_IDLE_S = 600.0


def retire_due(key: tuple[int, int], path: str, in_use: bool,
               idle_since: dict[tuple[int, int], float], now: float,
               on_disk=None) -> bool:
    """Should what is held for executable `key` (found at `path`) go now? Not while a traced
    process runs it, nor while `path` still names it; at once when `path` names another file
    (a deploy) or nothing; a path under /proc (/proc/PID/exe: that process is gone, or the
    pid is another's) says nothing of the file, so then after RETIRE_IDLE_S without a traced
    process. `idle_since` holds those waits (updated here); `on_disk` stands in for
    kernel_exe (tests)."""
    if in_use:
        idle_since.pop(key, None)
        return False
    where = (on_disk or kernel_exe)(path)
    if where == key:
        idle_since.pop(key, None)
        return False
    if path.startswith("/proc/"):   # gone, or the pid is another process's now
        if now - idle_since.setdefault(key, now) < RETIRE_IDLE_S:
            return False
    idle_since.pop(key, None)
    return True


def kernel_exe(path: str) -> tuple[int, int] | None:
    """(dev, inode) of an executable as the kernel keeps them (struct goread_exe: s_dev is
    MKDEV, major << 20 | minor), from stat; None when it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return os.major(st.st_dev) << 20 | os.minor(st.st_dev), st.st_ino


def _pids_running(key: tuple[int, int] | None) -> set[int]:
    """The live processes whose executable has this (st_dev, st_ino) (exe_key)."""
    out = set()
    if key is None:
        return out
    for name in os.listdir("/proc"):
        if name.isdigit() and exe_key(f"/proc/{name}/exe") == key:
            out.add(int(name))
    return out


def _tp_ret_offset() -> int:
    """Offset of sys_exit_read's `ret` in the tracepoint record (tracefs format)."""
    root = host.tracefs()
    try:
        with open(f"{root}/events/syscalls/sys_exit_read/format") as f:
            for line in f:
                if "ret;" in line and "offset:" in line:
                    return int(line.split("offset:")[1].split(";")[0])
    except (OSError, TypeError, ValueError):
        pass
    raise ProbeLoadError("tracepoint syscalls:sys_exit_read is missing or unreadable",
                         "run 'otelwater doctor' (needs tracefs and CONFIG_FTRACE_SYSCALLS)")


class _Binary:
    """One executable: its Go facts (None when not Go) and its symbolizer (None when it has no
    symbols at all)."""

    def __init__(self, path: str, need_go: bool):
        from otelwater.probes import goelf

        self.path = path
        self.kexe = kernel_exe(path)   # (dev, inode) as the kernel names it, while it exists
        self.info = None
        self.why_no_goid = self.why_no_names = ""   # one line each, for a notice said once
        try:
            self.info = goelf.locate(path)
        except BinaryError as e:
            if need_go:
                raise
            self.why_no_goid = e.one_line()
        self.symbolizer = None
        try:
            self.symbolizer = goelf.Symbolizer(path)
        except BinaryError as e:
            self.why_no_names = e.one_line()
        self.names: dict[int, str] = {}

    @property
    def goid_off(self) -> int:
        return self.info.offsets["runtime.g.goid"] if self.info else 0

    @property
    def links(self) -> int:
        """struct goread_proc.links: where its goroutines' labels and start function are
        (runtime.g.labels | OTW_LABELS_SLICE from Go 1.24, runtime.g.startpc << 16)."""
        from otelwater.probes.goelf import go_minor

        if not self.info:
            return 0
        off = self.info.offsets
        labels = off.get("runtime.g.labels", 0)
        if labels and (go_minor(self.info.go_version) or 0) >= LABELS_SLICE_MINOR:
            labels |= _D["OTW_LABELS_SLICE"]
        return labels | off.get("runtime.g.startpc", 0) << 16

    def gofacts(self, links: bool):
        """struct goread_gofacts: what the uprobe sampler reads in this binary's processes."""
        off = self.info.offsets
        return GoFacts(off["runtime.g.goid"], self.links if links else 0, off["net.conn.fd"],
                       off["net.netFD.pfd"] + off["internal/poll.FD.Sysfd"])

    @property
    def pie(self) -> bool:
        return bool(self.info and self.info.pie)

    def name(self, vaddr: int) -> str:
        n = self.names.get(vaddr)
        if n is None:
            n = (self.symbolizer.lookup(vaddr) if self.symbolizer else None) or f"0x{vaddr:x}"
            self.names[vaddr] = n
        return n


def _trimmed(hist: list[int]) -> tuple[int, ...]:
    n = len(hist)
    while n and not hist[n - 1]:
        n -= 1
    return tuple(hist[:n])


def verdict_cflags(opts: GoReadOptions) -> list[str]:
    """The kernel's verdict rules' knobs (bpf/goread.h otw_kverdict, bpf/goverdict.c
    otw_record_token: one bucket for all CPUs, bursts of 64)."""
    run_ns = opts.threshold_ns if opts.run_ns is None else opts.run_ns
    flags = [f"-DOTW_RUN_NS={run_ns}ULL", f"-DOTW_IDLE_RECORDS={int(opts.include_idle)}"]
    if opts.record_rate > 0:
        flags.append(f"-DOTW_RECORD_INTERVAL_NS={max(1, int(1e9 / opts.record_rate))}ULL")
    return flags


class GoReadSampler:
    def __init__(self, opts: GoReadOptions):
        self.opts = opts
        self._bpfs: list = []                 # one BPF object, whatever the binaries
        self._rings: list[RingBuffer] = []    # the read_events of each, consumed on its own
        self._stopped = False                 # detached (or, embedded, closed)
        self._owned = True                    # False when bound into the water probe's
        self._pending: list = []              # ReadRecord, LostEvents (in-band)
        self._carried: list[int] = []         # indexes of in-band LostEvents in _pending
        self._ledger = LossLedger("reads")
        self._notices: list[Notice] = []
        self._said: set[tuple] = set()
        self._exited: set[int] = set()
        self._budget = POLL_BUDGET
        self._deadline = 0.0
        self.backlogged = False
        self._binaries: dict[tuple[int, int], _Binary] = {}
        self._pid_binary: dict[int, _Binary] = {}
        self._bias: dict[int, int] = {}
        self._comms: dict[bytes, str] = {}            # raw comm -> text
        self._addrs: dict[bytes, str] = {}            # raw peer address -> text
        self._stacks: dict[tuple, tuple[str, ...]] = {}   # (pid, caller, raw ips) -> names
        self._starts: dict[tuple[int, int], str] = {}      # (pid, startpc) -> function name
        self._slots: dict[int, tuple[int, int]] = {}   # tracepoint: pid -> (slot, gen)
        self._up_pids: dict[int, _Binary] = {}         # uprobe: the pids in up_procs
        self._gens = [0] * opts.max_procs
        self._free = list(range(opts.max_procs - 1, -1, -1))
        self._next_scan = 0.0
        self._next_exit_check = 0.0
        self._closed = False
        self._final_stats: GoReadStats | None = None
        self._counts_sent: dict[tuple[int, int, int], int] = {}   # counts_sweep: reads sent
        # tracepoints: the kernel enters the processes of these executables at their exec
        self._exec_watch = opts.mechanism == "tracepoint" and bool(
            opts.binary or (opts.dynamic and opts.by_exe))
        self._exec_keys: dict[tuple[int, int], _Binary] = {}   # exe -> binary, in exec_targets
        self._gone: set[int] = set()                   # untraced since the last counts sweep
        self._up_bpf = None                            # uprobe: the program (attach later)
        self._up_attached: dict[tuple[int, int], _Binary] = {}   # exe -> binary with uprobes
        self._up_fds: dict[tuple[int, int] | None, list[int]] = {}   # exe -> its uprobes' fds
        self._idle_since: dict[tuple[int, int], float] = {}   # exe known by /proc/PID/exe only
        self._validate()
        btf = running_kernel_btf()   # not kept: its parse holds ~17 MiB for the run's length
        self._exec_offsets = exec_offsets(btf) if self._exec_watch else {}
        self._uprobe_offsets = uprobe_exe_offsets(btf) if opts.mechanism == "uprobe" else {}
        self._targets = self._resolve_targets()
        for pid, binary in self._targets.items():   # tracepoints trace any process: say so
            if binary.info is None and binary.why_no_goid and (
                    "not a Go program" not in binary.why_no_goid):
                # a Go program otelwater cannot read (an unknown version, stripped): why
                self._say_once(("notgo", pid), f"pid {pid}: its socket reads are traced "
                               f"without goroutine ids or trace links: {binary.why_no_goid}")
            elif binary.info is None:
                self._say_once(("notgo", pid), f"pid {pid} ({binary.path}) is not a Go "
                               "program: its socket reads are traced without goroutine ids "
                               "or Go stacks (a wrapper script? give the Go service's own pid)")
        from otelwater.probes.btf import kernel_offsets

        self.offsets = kernel_offsets(btf)
        # compiled into the water probe's program (for each read's evidence): either sampler,
        # whatever the binaries (the uprobe sampler's Go facts are in its maps)
        self.embedded = opts.embed
        try:
            if opts.mechanism == "tracepoint":
                if not self.embedded:
                    self._bind_tracepoint(self._load("goread_tp.c", self.embed_cflags()))
            elif not self.embedded:
                self._start_uprobe()
        except BaseException:
            self._cleanup()
            raise

    # -- set-up ----------------------------------------------------------------------------
    def _validate(self) -> None:
        o = self.opts
        if o.mechanism not in MECHANISMS:
            raise UsageError(f"unknown read probe mechanism {o.mechanism!r}",
                             "use --probes tracepoint or --probes uprobe")
        if o.dynamic and (o.binary or o.pids):
            raise UsageError("a dynamic read sampler takes its processes from set_targets()")
        if not o.binary and not o.pids and not o.dynamic:
            raise UsageError("the Go read sampler needs a binary path or pids",
                             "give --go-binary PATH or --go-pid PID")
        if o.binary and o.pids:
            raise UsageError("give a binary path or pids, not both")
        check_ringbuf_pages(o.ringbuf_pages)
        if o.threshold_ns < 0:
            raise UsageError(f"the blocked-read threshold must be >= 0, got {o.threshold_ns} ns")

    def _binary(self, path: str, need_go: bool) -> _Binary:
        key = exe_key(path)
        if key is None:
            raise BinaryError(f"cannot read {path}: no such file",
                              "give the path of a readable Go executable")
        b = self._binaries.get(key)
        if b is None or (need_go and b.info is None):
            b = _Binary(path, need_go)
            self._binaries[key] = b
        elif b.path != path and kernel_exe(b.path) != b.kexe:
            b.path = path   # it was found by a path that is gone (/proc/PID/exe of a process
            #                 that exited): this one names the same file
        return b

    def _resolve_targets(self) -> dict[int, _Binary]:
        """pid -> binary for the pids given; with a binary path: {} (processes found later)."""
        need_go = self.opts.mechanism == "uprobe"
        if self.opts.binary:
            path = os.path.realpath(self.opts.binary)
            if not os.path.isfile(path):
                raise BinaryError(f"{self.opts.binary}: no such file",
                                  "give the path of a Go executable")
            self._main_binary = self._binary(path, need_go=need_go)
            if self._main_binary.info is None and self._main_binary.symbolizer is None:
                # tracepoints trace any program, but a path that is not even an ELF is a mistake
                from otelwater.probes import goelf

                goelf.locate(path)  # raises the one-line BinaryError
            return {}
        out = {}
        for pid in sorted(self.opts.pids):
            out[pid] = self._binary(pid_exe(pid), need_go=need_go)
        return out

    def _cflags(self) -> list[str]:
        return kernel_cflags(self.offsets, self.opts.ringbuf_pages,
                             ring="OTW_READ_RINGBUF_PAGES") + [
            f"-DOTW_THRESHOLD_NS={self.opts.threshold_ns}ULL"] + verdict_cflags(self.opts)

    def _set_link_keys(self, b) -> None:
        """Tell program `b` which label keys name a read's request (link_keys)."""
        keys = self.opts.links
        if keys is None:
            return
        k0, k1 = keys.kernel_keys()
        n = trace_links.KEY_MAX
        raw = bytes([len(k0), len(k1)]) + bytes(6) + k0.ljust(n, b"\0") + k1.ljust(n, b"\0")
        # our own layout of the value (BCC's Leaf type flattens the 2-D array wrongly)
        b["link_keys"][ctypes.c_int(0)] = LinkKeysValue.from_buffer_copy(raw)

    def _load(self, src: str, cflags: list[str]):
        b = load_bpf(src, cflags, f"the Go read sampler ({src})", embed=("goverdict.c",))
        self._bpfs.append(b)
        self._set_link_keys(b)
        self._rings.append(RingBuffer(b, "read_events", self._on_event))
        return b

    @property
    def embed_source(self) -> str:
        return "goread_tp.c" if self.opts.mechanism == "tracepoint" else "goread_uprobe.c"

    def embed_cflags(self) -> list[str]:
        """The -D flags of bpf/goread_tp.c or goread_uprobe.c (alone, or compiled into
        bpf/water.c, which then defines OTW_GO_TP or OTW_GO_UPROBE)."""
        o = self.opts
        if o.mechanism == "uprobe":
            return self._uprobe_cflags() + ["-DOTW_GO_UPROBE=1"]
        flags = self._cflags() + [f"-DOTW_MAX_PROCS={o.max_procs}", f"-DOTW_MAX_FDS={o.max_fds}",
                                  f"-DOTW_TP_RET_OFF={_tp_ret_offset()}", "-DOTW_GO_TP=1"]
        if self._exec_watch:
            flags += ["-DOTW_EXEC_WATCH=1"]
            flags += [f"-D{k}={v}" for k, v in self._exec_offsets.items()]
        return flags

    def bind(self, b) -> None:
        """Embedded: take the read sampler's maps in the water probe's program `b` (which the
        water probe owns and detaches) and set them up. The tracepoint sampler attaches
        nothing of its own there (the water probe's sock_recv_length ends each read); the
        uprobe sampler attaches its uprobes."""
        if not self.embedded or self._bpfs:
            raise ProbeLoadError("bind() is for a sampler made with embed=True, once")
        self._bpfs.append(b)
        self._owned = False
        self._set_link_keys(b)
        # not BCC's consumer, which it shares with the water probe's `events`: a flooded
        # `events` would end every consume before this one was read (loader.RingBuffer)
        self._rings.append(RingBuffer(b, "read_events", self._on_event))
        if self.opts.mechanism == "tracepoint":
            self._bind_tracepoint(b)
        else:
            self._bind_uprobe(b)

    def _bind_tracepoint(self, b) -> None:
        o = self.opts
        self._procs = b["procs"]
        self._procs_gen = b["procs_gen"]
        if self._exec_watch:
            self._exec_targets = b["exec_targets"]
        if o.binary:
            self._exec_enter(self._main_binary)
        for pid, binary in self._targets.items():
            self._watch(pid, binary)
        if o.binary:
            self._rescan()
        if self.embedded:
            return   # the water probe's sock_recv_length ends each read: nothing to attach
        for tp, fn in (("syscalls:sys_enter_read", "otw_tp_read_enter"),
                       ("syscalls:sys_exit_read", "otw_tp_read_exit")):
            try:
                b.attach_tracepoint(tp=tp, fn_name=fn)
            except Exception as e:
                raise ProbeLoadError(f"cannot attach to {tp}: {one_line(e)}",
                                     "run 'otelwater doctor'") from e

    def _uprobe_groups(self) -> dict[int, tuple[_Binary, list[int]]]:
        """The uprobes to attach, per distinct binary: id -> (binary, pids to attach to, -1
        for every process of it). One program serves them all."""
        if self.opts.mechanism != "uprobe":
            return {}
        groups: dict[int, tuple[_Binary, list[int]]] = {}
        if self.opts.binary:
            groups[id(self._main_binary)] = (self._main_binary, [-1])
        else:
            for pid, binary in self._targets.items():
                groups.setdefault(id(binary), (binary, []))[1].append(pid)
                self._pid_binary[pid] = binary
        return groups

    def _uprobe_cflags(self) -> list[str]:
        """The same for every binary: its Go facts are in the maps (bind_uprobe)."""
        return self._cflags() + [f"-D{k}={v}" for k, v in self._uprobe_offsets.items()]

    def _start_uprobe(self) -> None:
        self._bind_uprobe(self._load("goread_uprobe.c", self._uprobe_cflags()))

    def _bind_uprobe(self, b) -> None:
        """Each binary's Go facts into the maps (its executable; its pids, or the processes
        running it now), then its uprobes: a hit finds them from its first read."""
        self._up_procs = b["up_procs"]
        self._up_bpf = b
        exes = self._up_exes = b["up_exes"]
        groups = self._uprobe_groups()
        for binary, pids in groups.values():
            key = kernel_exe(binary.path)   # (pids too: a pid the full up_procs cannot take)
            if key is not None:
                exes[GoExe(*key)] = binary.gofacts(bool(self.opts.links))
            for pid in pids:
                if pid != -1:
                    self._up_enter(pid, binary)
        if self.opts.binary:
            self._up_rescan()
        for binary, pids in groups.values():
            self._up_fds.setdefault(binary.kexe, []).extend(
                self._attach_uprobes(b, binary, pids))

    def _up_enter(self, pid: int, binary: _Binary) -> None:
        self._pid_binary[pid] = binary
        try:
            self._up_procs[ctypes.c_uint32(pid)] = binary.gofacts(bool(self.opts.links))
        except Exception:  # BCC: full (OTW_UP_MAX_PROCS): its binary's entry serves it
            return
        self._up_pids[pid] = binary

    def _up_rescan(self) -> None:
        """With a binary path: enter every process running it by pid (one lookup a blocked
        read, where the executable's entry costs the walk to its inode), forget the ones gone."""
        alive = _pids_running(exe_key(self._main_binary.path))
        for pid in alive - self._up_pids.keys():
            self._up_enter(pid, self._main_binary)
        for pid in self._up_pids.keys() - alive:
            del self._up_pids[pid]
            try:
                del self._up_procs[ctypes.c_uint32(pid)]
            except KeyError:
                pass

    def _attach_uprobes(self, b, binary: _Binary, pids: list[int]) -> list[int]:
        """Uprobes at the entry and the returns of the binary's Read; their perf fds, taken
        out of BCC's table: this sampler closes them (_detach_uprobes), at a retirement or at
        the end. BCC names a uprobe by path and address, so a new build at the same path with
        Read at the same address would overwrite the old one's entry there: the old uprobe
        would stay attached with nothing left to detach it."""
        fn = binary.info.functions[READ_FUNCTION]
        fds: list[int] = []
        for pid in pids:
            sites = [(fn.address, "otw_up_read_entry")]
            sites += [(fn.address + r, "otw_up_read_return") for r in fn.return_offsets]
            for addr, fname in sites:
                before = dict(b.uprobe_fds)
                try:
                    b.attach_uprobe(name=binary.path, addr=addr, fn_name=fname, pid=pid)
                except Exception as e:
                    self._detach_uprobes(fds)   # no half-attached binary
                    who = "every process of it" if pid == -1 else f"pid {pid}"
                    raise ProbeLoadError(
                        f"cannot attach a uprobe at {addr:#x} in {binary.path} "
                        f"({who}): {one_line(e)}", "run 'otelwater doctor'") from e
                for name, fd in list(b.uprobe_fds.items()):
                    if before.get(name) != fd:
                        b._del_uprobe_fd(name)   # (BCC's own bookkeeping: its probe count)
                        fds.append(fd)
        return fds

    def detach_uprobes(self) -> None:
        """Detach every uprobe this sampler attached: their fds are its own, not BCC's
        (_attach_uprobes), embedded or not; the water probe's stop() calls this first."""
        fds, self._up_fds = self._up_fds, {}
        for group in fds.values():
            self._detach_uprobes(group)

    @staticmethod
    def _detach_uprobes(fds: list[int]) -> None:
        from bcc.libbcc import lib

        for fd in fds:
            lib.bpf_close_perf_event_fd(fd)   # disable, then close: the uprobe is gone

    # -- tracepoint process set ------------------------------------------------------------
    def _watch(self, pid: int, binary: _Binary) -> None:
        if pid in self._slots:
            return
        if self._exec_watch:
            try:
                self._procs[ctypes.c_uint32(pid)]
            except KeyError:
                pass
            else:  # the kernel added it at its exec: its parks stay in the LRU hash
                self._slots[pid] = (NO_SLOT, 0)
                self._pid_binary[pid] = binary
                return
        if self._free:
            slot = self._free.pop()
            self._gens[slot] += 1
            gen = self._gens[slot]
        else:
            slot, gen = NO_SLOT, 0   # parks of this process go to the LRU hash
        self._procs[ctypes.c_uint32(pid)] = GoReadProc(
            slot, gen, binary.goid_off, binary.links if self.opts.links else 0)
        self._procs_changed()
        self._slots[pid] = (slot, gen)
        self._pid_binary[pid] = binary

    def _exec_enter(self, binary: _Binary) -> None:
        """Tracepoints: processes that exec this binary from now on are traced from their
        first instruction (the kernel gives them its row: bpf/goread_tp.c exec_targets)."""
        key = binary.kexe
        if key is None or key in self._exec_keys:
            return
        try:
            self._exec_targets[GoExe(*key)] = GoReadProc(
                NO_SLOT, 0, binary.goid_off, binary.links if self.opts.links else 0)
        except Exception:  # BCC: full (OTW_MAX_EXES): its processes wait for the next scan
            return
        self._exec_keys[key] = binary

    def _procs_changed(self) -> None:
        """Bump the table's generation: the water probe keeps, per socket, whether its
        reader is traced, and asks the table again when this moves (bpf/water.c)."""
        k = ctypes.c_int(0)
        self._procs_gen[k] = ctypes.c_uint32(self._procs_gen[k].value + 1)

    def _unwatch(self, pid: int) -> None:
        self._gone.add(pid)
        slot, _ = self._slots.pop(pid)
        try:
            del self._procs[ctypes.c_uint32(pid)]
        except KeyError:
            pass
        self._procs_changed()
        if slot != NO_SLOT:
            self._free.append(slot)

    def _rescan(self) -> None:
        """With a binary path: watch every process running it, forget the ones gone."""
        key = exe_key(self._main_binary.path)
        alive = set()
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            pid = int(name)
            if exe_key(f"/proc/{pid}/exe") == key:
                alive.add(pid)
                self._watch(pid, self._main_binary)
        for pid in list(self._slots):
            if pid not in alive:
                self._unwatch(pid)
        for k in list(self._procs.keys()):  # added at exec by the kernel, gone before we saw it
            if k.value not in alive:
                try:
                    del self._procs[k]
                except KeyError:
                    pass
                self._procs_changed()

    # -- the agent: processes given at run time ---------------------------------------------
    def set_targets(self, targets: Mapping[int, str]) -> dict[int, str]:
        """A dynamic sampler: trace exactly these processes (pid -> a path to its executable)
        from now on; the ones no longer named are forgotten. Returns pid -> one line for each
        that cannot be traced (an unreadable binary, not Go for uprobes, a uprobe the kernel
        refused): the others are traced all the same."""
        if not self.opts.dynamic:
            raise UsageError("set_targets() is for a dynamic read sampler")
        failed: dict[int, str] = {}
        if self._closed or not self._bpfs:
            return failed
        now = self.watched_pids()
        for pid in now - targets.keys():
            self._forget(pid)
        uprobe = self.opts.mechanism == "uprobe"
        for pid, path in targets.items():
            if pid in now:
                continue
            try:
                binary = self._binary(path, need_go=uprobe)
                if uprobe:
                    self._up_binary(binary)
                    self._up_enter(pid, binary)
                else:
                    if self.opts.by_exe and binary.info is not None:
                        self._exec_enter(binary)
                    self._watch(pid, binary)
            except OtelwaterError as e:
                failed[pid] = e.one_line()
            except Exception as e:  # noqa: BLE001 - one process must not stop the others
                failed[pid] = f"{type(e).__name__}: {one_line(e)}"
        if not uprobe:
            self._drop_exited()
        self._retire_replaced()
        if len(self._binaries) > CACHE_MAX:   # executables no traced process runs any more
            used = {id(b) for b in self._pid_binary.values()}
            self._binaries = {k: b for k, b in self._binaries.items() if id(b) in used}
        return failed

    def _up_binary(self, binary: _Binary) -> None:
        """Uprobes on this binary (once, for every process of it: the maps decide which are
        traced), and with by_exe its Go facts by executable."""
        key = binary.kexe
        if key is None:
            raise BinaryError(f"cannot read {binary.path}", "it may have exited")
        if key in self._up_attached:
            return
        self._up_fds[key] = self._attach_uprobes(self._up_bpf, binary, [-1])
        self._up_attached[key] = binary
        if self.opts.by_exe:
            self._up_exes[GoExe(*key)] = binary.gofacts(bool(self.opts.links))

    def _retire_replaced(self) -> None:
        """Executables that no traced process runs and that can start no process again: the
        file at their path is another one now (a deploy wrote a new build there) or none.
        Their uprobes are detached and their rows (exec_targets, up_exes) deleted, so a run
        that sees a deploy a day for weeks holds the uprobes and rows of the builds in use,
        not of every build it ever saw (the kernel's uprobes also keep the old file's inode,
        and its disk space, alive). A restart of an unchanged binary keeps them: its next
        process is traced from its first read. A binary known only by /proc/PID/exe (a
        process of another mount namespace: a container's) cannot be looked at once that
        process is gone: it goes after RETIRE_IDLE_S without a traced process instead."""
        in_use = {b.kexe for b in self._pid_binary.values()}
        now = time.monotonic()
        for table, keys in ((getattr(self, "_exec_targets", None), self._exec_keys),
                            (getattr(self, "_up_exes", None) if self.opts.by_exe else None,
                             self._up_attached)):
            for key, binary in list(keys.items()):
                if not retire_due(key, binary.path, key in in_use, self._idle_since, now):
                    continue
                del keys[key]
                self._detach_uprobes(self._up_fds.pop(key, []))
                if table is not None:
                    try:
                        del table[GoExe(*key)]
                    except KeyError:
                        pass

    def _forget(self, pid: int) -> None:
        if pid in self._slots:
            self._unwatch(pid)
        if self._up_pids.pop(pid, None) is not None:
            try:
                del self._up_procs[ctypes.c_uint32(pid)]
            except KeyError:
                pass
        self._gone.add(pid)
        self._pid_binary.pop(pid, None)
        self._bias.pop(pid, None)
        # what was said of it (a pid used again is another process, told of anew)
        self._said = {k for k in self._said if k[1] != pid}

    def _drop_exited(self) -> None:
        """Rows the kernel gave at exec to processes that have exited since (before a scan
        named them)."""
        for k in list(self._procs.keys()):
            if k.value not in self._slots and not os.path.exists(f"/proc/{k.value}"):
                try:
                    del self._procs[k]
                except KeyError:
                    pass
                self._procs_changed()

    def watched_pids(self) -> frozenset[int]:
        if self.opts.mechanism == "tracepoint":
            return frozenset(self._slots)
        return frozenset(self._up_pids)

    # -- records ---------------------------------------------------------------------------
    def _on_event(self, _ctx, data, _size) -> int:
        v = EVENT_VALUES(EVENT_STRUCT.unpack_from(ctypes.string_at(data, EVENT_SIZE)))
        if v[_LOST]:        # records this CPU lost before this one: said just before it
            self._carried.append(len(self._pending))
            self._pending.append(self._ledger.carried(v[1], v[_LOST], v[_LOST + 1],
                                                      v[_LOST + 2]))
        self._pending.append(self._record(v))
        # negative: libbpf stops this consume after the record (kept), so a fast producer
        # cannot hold the caller's loop
        n = len(self._pending)
        if n >= self._budget or (n & 255 == 0 and time.monotonic() >= self._deadline):
            return -1
        return 0

    def _say_once(self, key: tuple, text: str) -> None:
        if key not in self._said:
            self._said.add(key)
            self._notices.append(Notice(time.monotonic_ns(), "reads", text))

    def _check_exits(self) -> None:
        """--go-pid processes that ended: said once (the watch goes on for the others)."""
        for pid in self.opts.pids:
            if pid not in self._exited and not _alive(pid):
                self._exited.add(pid)
                if self._up_pids.pop(pid, None) is not None:
                    try:
                        del self._up_procs[ctypes.c_uint32(pid)]
                    except KeyError:
                        pass
                left = len(self.opts.pids) - len(self._exited)
                self._say_once(("exit", pid), f"traced process {pid} exited; "
                               + (f"{left} traced process(es) left" if left else
                                  "no traced process is left (the kernel probe goes on)"))

    def binary_of(self, pid: int) -> _Binary | None:
        """The executable a traced process runs (its Go facts: .info; None: unknown)."""
        return self._binary_of(pid)

    def _binary_of(self, pid: int) -> _Binary | None:
        b = self._pid_binary.get(pid)
        if b is None and self.opts.binary:
            b = self._main_binary
            self._pid_binary[pid] = b
        return b

    def _stack(self, pid: int, ips_raw: bytes, caller_ip: int) -> tuple[str, ...]:
        """The names of a user stack (innermost first), made once per distinct stack of a
        process (cached by its raw addresses: the same code paths block again and again)."""
        key = (pid, caller_ip, ips_raw)
        stack = self._stacks.get(key)
        if stack is not None:
            return stack
        n = len(ips_raw) // 8
        ips = list(struct.unpack(f"<{n}Q", ips_raw))
        if caller_ip and ips:
            ips.insert(1, caller_ip)
        binary = self._binary_of(pid)
        stack = ()
        if binary is not None and ips:
            bias = self._load_bias(pid, binary)
            stack = tuple(binary.name(ip - bias) for ip in ips)
            if binary.symbolizer is None:
                self._say_once(("nosyms", binary.path), "stacks stay as raw addresses: "
                               + binary.why_no_names)
            elif all(n.startswith("0x") for n in stack):
                self._say_once(("unresolved", binary.path), f"stack addresses of pid {pid} "
                               f"do not resolve in {binary.path}: otelwater misread its "
                               "symbol table; please report the Go version and build flags")
        elif ips:
            stack = tuple(f"0x{ip:x}" for ip in ips)
        if len(self._stacks) >= CACHE_MAX:
            self._stacks.clear()
        self._stacks[key] = stack
        return stack

    def _load_bias(self, pid: int, binary: _Binary) -> int:
        """What to subtract from process `pid`'s code addresses to get `binary`'s (PIE: its
        load bias from /proc/PID/maps, read once per process; else 0)."""
        if not binary.pie:
            return 0
        bias = self._bias.get(pid)
        if bias is None:
            bias = self._bias[pid] = _load_bias(pid, binary.path)
        return bias

    def _go_start(self, pid: int, pc: int) -> str:
        """The name of a goroutine's start function (runtime.g.startpc), '' unknown."""
        key = (pid, pc)
        name = self._starts.get(key)
        if name is None:
            binary = self._binary_of(pid)
            name = ""
            if binary is not None and binary.symbolizer is not None:
                name = binary.name(pc - self._load_bias(pid, binary))
                if name.startswith("0x"):
                    name = ""
            if len(self._starts) >= CACHE_MAX:
                self._starts.clear()
            self._starts[key] = name
        return name

    def _link(self, pid: int, v) -> tuple[str, str, str, str]:
        """(trace_id, parent_span_id, link_note, go_start) of a record (events/links.py)."""
        flags, lens, start_pc, values = v[_LOST + 3:]
        go_start = self._go_start(pid, start_pc) if start_pc else ""
        keys = self.opts.links
        if keys is None or not flags:
            return "", "", "", go_start
        n = trace_links.VALUE_MAX
        trace, span, note = trace_links.decode(keys, flags, (values[:n], values[n:]),
                                               (lens[0], lens[1]), go_start)
        if note.startswith("no label") and ("links", pid) not in self._said:
            self._say_once(("links", pid), (
                f"pid {pid}: its goroutines carry pprof labels, but not the keys looked for "
                f"({note}): their spans stay out of the requests' traces (other keys: "
                f"links.trace_key, links.span_key, "
                f"links.encoding in --config, or OTELWATER_LINKS_*; off: "
                f"OTELWATER_LINKS_ENABLED=false)"))
        return trace, span, note, go_start

    def _record(self, v) -> ReadRecord:
        """v: EVENT_FIELDS' values of one goread_event."""
        (ts_start, ts_end, pid, tid, goid, has_goid, fd, sock_key, requested, returned,
         ips_raw, stack_len, caller_ip, source, comm_raw, parked, evidence, arrival_ns,
         qdelay, role, raddr, rport, send_ns, prev_arrival_ns, kverdict) = v[:25]
        n = stack_len if stack_len < STACK_DEPTH else STACK_DEPTH
        stack = self._stack(pid, ips_raw[:8 * n], caller_ip) if n else ()
        if not has_goid:
            binary = self._binary_of(pid)
            if binary is None or binary.info is None:
                why = binary.why_no_goid if binary is not None else "its executable is unknown"
                self._say_once(("nogoid", pid), f"goroutine ids of pid {pid} are null (its reads "
                               f"are still traced): {why}")
            goid = None
        comm = self._comms.get(comm_raw)
        if comm is None:
            if len(self._comms) >= CACHE_MAX:
                self._comms.clear()
            comm = self._comms[comm_raw] = cstr(comm_raw).decode(errors="replace")
        if rport:
            peer = self._addrs.get(raddr)
            if peer is None:
                if len(self._addrs) >= CACHE_MAX:
                    self._addrs.clear()
                peer = self._addrs[raddr] = addr_text(raddr)
        else:
            peer = ""
        has_qdelay = evidence & _EV_QDELAY
        # positional, in ReadRecord's field order (tests/unit/test_decode.py holds it)
        return _Read(
            ts_start, ts_end, pid, tid, goid, fd, sock_key, requested, returned, stack,
            SOURCES.get(source) or str(source), comm,
            bool(parked) if source == _TP or evidence & _EV_SOCKET else None,
            arrival_ns or None,
            qdelay if has_qdelay else None,
            bool(evidence & _EV_EXACT) if has_qdelay else None,
            ROLES.get(role, ""), peer, rport, send_ns or None,
            (prev_arrival_ns or None) if parked else None,
            KERNEL_VERDICTS.get(kverdict), *self._link(pid, v))

    def poll(self, max_records: int = POLL_BUDGET) -> list[ReadRecord]:
        """Blocked reads recorded since the last call, at most about max_records (never
        blocks); `backlogged` tells whether records were left for the next call."""
        self._budget = len(self._pending) + max_records
        self._deadline = time.monotonic() + POLL_TIME_S
        if not self._closed:
            if self.opts.binary and self._bpfs and time.monotonic() >= self._next_scan:
                self._next_scan = time.monotonic() + RESCAN_S
                if self.opts.mechanism == "tracepoint":
                    self._rescan()
                else:
                    self._up_rescan()
            if self.opts.pids and time.monotonic() >= self._next_exit_check:
                self._next_exit_check = time.monotonic() + RESCAN_S
                self._check_exits()
            for r in self._rings:
                r.consume()
        out, self._pending = self._pending, []
        if self._carried:
            self._ledger.settle(out, self._carried, self.lost_total())
            self._carried = []
        self.backlogged = len(out) >= max_records or (
            len(out) >= 256 and time.monotonic() >= self._deadline)
        if self._notices:
            out += self._notices
            self._notices = []
        return out

    def _sum_counts(self) -> tuple[list[int], list[int]]:
        n = [0] * _D["OTW_CNT_SLOTS"]
        hist = [0] * _D["OTW_HIST_SLOTS"]
        for b in self._bpfs:
            for v in b["counts"].getvalue(ctypes.c_int(0)):
                for i in range(len(n)):
                    n[i] += int(v.n[i])
                for i in range(len(hist)):
                    hist[i] += int(v.hist[i])
        return n, hist

    def stats(self) -> GoReadStats:
        if self._closed and self._final_stats is not None:
            return self._final_stats
        n, hist = self._sum_counts()
        return GoReadStats(
            enters=n[_D["OTW_CNT_ENTER"]], exits=n[_D["OTW_CNT_EXIT"]],
            reads=n[_D["OTW_CNT_READS"]], blocked=n[_D["OTW_CNT_BLOCKED"]],
            parks=n[_D["OTW_CNT_PARKS"]], orphans=n[_D["OTW_CNT_ORPHAN"]],
            reentries=n[_D["OTW_CNT_REENTER"]], lost=n[_D["OTW_CNT_LOST"]],
            not_socket=n[_D["OTW_CNT_NOT_SOCKET"]], latency_sum_ns=n[_D["OTW_CNT_SUM_NS"]],
            unknown=n[_D["OTW_CNT_UNKNOWN"]],
            queue_slow=n[_D["OTW_CNT_QSLOW"]], queue_slow_limited=n[_D["OTW_CNT_QSLOW_LIMITED"]],
            cut=n[_D["OTW_CNT_CUT"]], idle=n[_D["OTW_CNT_IDLE"]],
            histogram=tuple((1 << i, c) for i, c in enumerate(hist) if c),
        )

    def lost_total(self) -> int:
        return self.stats().lost

    def lost_sweep(self, ts_ns: int) -> LostEvents | None:
        """The sweep's lost record (kernel.LossLedger.sweep): the exact total, and the losses
        no delivered record has reported yet; None when nothing moved."""
        if self._closed:
            return self._ledger.sweep(ts_ns, self.lost_total(), {})
        total, pending = 0, {}
        for i, b in enumerate(self._bpfs):
            for cpu, v in enumerate(b["counts"].getvalue(ctypes.c_int(0))):
                total += int(v.n[_D["OTW_CNT_LOST"]])
                pending[(i, cpu)] = (int(v.lost_pending), int(v.lost_since_ns),
                                     int(v.lost_until_ns))
        return self._ledger.sweep(ts_ns, total, pending)

    def kernel_verdicts(self) -> dict[tuple[int, int, int], list]:
        """The `verdicts` map summed over CPUs: (pid, role code, verdict code) -> [reads,
        recorded, cut, dur_sum_ns, wait_sum_ns, dur_hist, wait_hist]."""
        out: dict[tuple[int, int, int], list] = {}
        for b in self._bpfs:
            try:
                table = b["verdicts"]
            except KeyError:
                continue
            for k, per_cpu in table.items():
                key = (int(k.tgid), int(k.role), int(k.verdict))
                row = out.get(key)
                if row is None:
                    row = out[key] = [0, 0, 0, 0, 0, [0] * _D["OTW_HIST_SLOTS"],
                                      [0] * _D["OTW_HIST_SLOTS"]]
                for v in per_cpu:
                    row[0] += int(v.reads)
                    row[1] += int(v.recorded)
                    row[2] += int(v.cut)
                    row[3] += int(v.dur_sum_ns)
                    row[4] += int(v.wait_sum_ns)
                    for i in range(_D["OTW_HIST_SLOTS"]):
                        row[5][i] += int(v.dur_hist[i])
                        row[6][i] += int(v.wait_hist[i])
        return out

    def counts_sweep(self, ts_ns: int) -> list[VerdictCounts]:
        """The kernel's verdict counts that moved since the last sweep (all of them are
        cumulative), one VerdictCounts per (process, role, verdict)."""
        if self._closed:
            return []
        out = []
        for (pid, role, verdict), row in sorted(self.kernel_verdicts().items()):
            if self._counts_sent.get((pid, role, verdict)) == row[0]:
                continue
            self._counts_sent[(pid, role, verdict)] = row[0]
            out.append(VerdictCounts(
                ts_ns=ts_ns, pid=pid, role=ROLES.get(role, ""),
                verdict=KERNEL_VERDICTS.get(verdict, str(verdict)), reads=row[0],
                recorded=row[1], cut=row[2], dur_sum_ns=row[3], wait_sum_ns=row[4],
                dur_hist=_trimmed(row[5]), wait_hist=_trimmed(row[6])))
        if self._gone:
            self._drop_counts()
        return out

    def _drop_counts(self) -> None:
        """The verdict rows of processes no longer traced, once their last counts went out
        above: the kernel's table (4,096 rows) stays room for the living through restarts."""
        gone, self._gone = self._gone, set()
        # a pid used again (pid wrap) and traced since, from a scan or by the exec hook: its
        # rows are the new process's now (deleting them would restart its counts from 0)
        gone = {pid for pid in gone if not self._traced_now(pid)}
        if not gone:
            return
        for b in self._bpfs:
            try:
                table = b["verdicts"]
            except KeyError:
                continue
            for k in list(table.keys()):
                if int(k.tgid) in gone:
                    try:
                        del table[k]
                    except KeyError:
                        pass
        self._counts_sent = {k: n for k, n in self._counts_sent.items() if k[0] not in gone}

    def _traced_now(self, pid: int) -> bool:
        """The pid is traced (again) now: ours by a scan, or entered by the exec hook."""
        if pid in self._slots or pid in self._up_pids:
            return True
        for table in (getattr(self, "_procs", None), getattr(self, "_up_procs", None)):
            if table is None:
                continue
            try:
                table[ctypes.c_uint32(pid)]
                return True
            except (KeyError, TypeError):
                pass
        return False

    # -- lifecycle -------------------------------------------------------------------------
    def _detach(self) -> None:
        """Stop the programs adding records and counts (keeping the maps). Embedded, the
        program is the water probe's: its stop() or close() detaches it."""
        if self._stopped:
            return
        self._stopped = True
        self.detach_uprobes()
        if self._owned and self._bpfs:
            for b in self._bpfs:
                detach_all(b)
            time.sleep(STOP_SETTLE_S)   # a program that was running as we detached ends

    def stop(self) -> list:
        """The end of a run: detached (embedded: call the water probe's stop() first), every
        record the ring buffer still holds (all of them: nothing adds to it any more), and the
        sweep's lost record with the final, exact total. After it, every read stats() counts
        as recorded was delivered or counted as lost (or is not_socket or unknown)."""
        if self._closed or not self._bpfs:
            return []
        self._detach()
        return drain_at_stop(self, self._rings, GoReadEvent.ts_end_ns.offset)

    def _cleanup(self) -> None:
        rings, self._rings = self._rings, []
        for r in rings:
            r.close()
        self.detach_uprobes()
        bpfs, self._bpfs = self._bpfs, []
        if not self._owned:
            return  # embedded: the water probe detaches its program
        for b in bpfs:
            try:
                b.cleanup()
            except Exception:
                pass

    def close(self) -> None:
        """Drain the ring buffer, keep the final counts, detach everything."""
        if self._closed:
            return
        try:
            if self._bpfs:
                self._detach()   # owned: nothing adds to the counts after the final ones
                self._budget = len(self._pending) + (1 << 30)
                self._deadline = time.monotonic() + DRAIN_TIME_S
                for r in self._rings:
                    r.consume()
                self._final_stats = self.stats()
        finally:
            self._closed = True
            self._cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self._cleanup()
        except Exception:
            pass
