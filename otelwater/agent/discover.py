"""Which processes the agent traces: a scan of /proc, cheap enough to repeat every half second.

    default        every Go program it can see (its executable has Go build info), once it has
                   run `min_age_s` (short-lived tools are left alone)
    --pid          these processes (whatever their age)
    --go-binary    the processes running these executables
    --cgroup       the Go processes of these cgroup v2 directories (and their sub-cgroups)
    --port         the Go processes holding a TCP socket on these ports (in their own network
                   namespace)

Given several, a process any of them names is traced. A Go binary once traced is trusted from
then on: a restart of it is taken at once, without the minimum age (the kernel has usually
entered it at its exec already, bpf/goread_tp.c).

Each scan costs a readlink and a stat per process (the executable's (dev, inode), the key of
every cache here), a read of /proc/PID/stat for the processes of Go binaries, and an ELF
section-table read per new executable. Caches are bounded (Scanner.MAX_EXES executables).
"""

from __future__ import annotations

import errno
import os
from collections import OrderedDict
from dataclasses import dataclass, field

from otelwater.hostsockets import exe_key, socket_inodes

CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Selection:
    pids: frozenset[int] = frozenset()
    go_binaries: tuple[str, ...] = ()
    cgroups: tuple[str, ...] = ()
    ports: frozenset[int] = frozenset()

    @property
    def everything(self) -> bool:
        return not (self.pids or self.go_binaries or self.cgroups or self.ports)

    @property
    def by_exe(self) -> bool:
        """Whole binaries are selected (every Go program, or --go-binary): every process of a
        binary traced is traced from its exec, before a scan names it."""
        return not (self.pids or self.cgroups or self.ports)

    def describe(self) -> str:
        parts = []
        if self.pids:
            parts.append("pid " + ",".join(map(str, sorted(self.pids))))
        if self.go_binaries:
            parts.append("binary " + ",".join(self.go_binaries))
        if self.cgroups:
            parts.append("cgroup " + ",".join(self.cgroups))
        if self.ports:
            parts.append("port " + ",".join(map(str, sorted(self.ports))))
        return " or ".join(parts) if parts else "every Go process"


def is_go_executable(path: str) -> bool:
    """Has the file Go build info (a .go.buildinfo section, or its magic in a binary without
    section headers)? Reads the ELF header and section table only, or at most the first 16 MiB
    when it has no sections. False for anything unreadable or not ELF."""
    import struct

    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if len(head) < 64 or head[:4] != b"\x7fELF" or head[4:6] != b"\x02\x01":
                return False
            shoff, = struct.unpack_from("<Q", head, 0x28)
            shentsize, shnum, shstrndx = struct.unpack_from("<HHH", head, 0x3A)
            if shoff and shnum and shentsize >= 64 and shstrndx < shnum:
                f.seek(shoff)
                table = f.read(shnum * shentsize)
                if len(table) < shnum * shentsize:
                    return False
                str_off, str_size = struct.unpack_from("<QQ", table,
                                                       shstrndx * shentsize + 0x18)
                f.seek(str_off)
                names = f.read(min(str_size, 1 << 20))
                return b".go.buildinfo\0" in names or b".gopclntab\0" in names
            f.seek(0)
            return b"\xff Go buildinf:" in f.read(16 << 20)
    except (OSError, struct.error):
        return False


def start_age_s(pid: int, now_s: float | None = None) -> float | None:
    """How long the process has run (from /proc/PID/stat's start time), None if gone."""
    uptime = _uptime() if now_s is None else now_s
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    if uptime is None:
        return None
    try:
        start = int(stat[stat.rindex(b")") + 2:].split()[19]) / CLK_TCK
    except (ValueError, IndexError):
        return None
    return uptime - start


def cgroup_pids(path: str) -> set[int]:
    """The processes of a cgroup v2 directory and of its descendants (none when it is gone)."""
    from otelwater.errors import UsageError
    from otelwater.sockdiag import cgroup_pids as pids_below

    try:
        return pids_below(path)
    except UsageError:
        return set()


def port_holder(pid: int, ports: frozenset[int]) -> bool:
    """Does the process hold a TCP socket with one of these local or remote ports? (Its own
    network namespace's table, /proc/PID/net/tcp{,6}, against its fds' socket inodes.)"""
    from otelwater.hostsockets import tcp_table

    try:
        table = tcp_table(pid)
    except OSError:
        return False
    return any(ino in table and (table[ino].lport in ports or table[ino].rport in ports)
               for ino in socket_inodes(pid).values())


@dataclass
class Scan:
    """One scan's outcome: the processes to trace (pid -> a path to its executable) and the
    ones left out this time with why (young: picked up once old enough)."""

    targets: dict[int, str] = field(default_factory=dict)
    young: int = 0
    denied: int = 0       # processes whose executable this process may not read


class Scanner:
    MAX_EXES = 4096     # executables remembered (Go or not), least recently seen dropped

    def __init__(self, selection: Selection, min_age_s: float = 2.0):
        self.selection = selection
        self.min_age_s = min_age_s
        self._go: OrderedDict[tuple[int, int], bool] = OrderedDict()   # exe -> is Go
        self._trusted: set[tuple[int, int]] = set()    # Go binaries traced before
        self._own = os.getpid()

    def _is_go(self, key: tuple[int, int], path: str) -> bool:
        known = self._go.get(key)
        if known is None:
            known = self._go[key] = is_go_executable(path)
            if len(self._go) > self.MAX_EXES:
                self._go.popitem(last=False)
        else:
            self._go.move_to_end(key)
        return known

    def trust(self, path_key: tuple[int, int]) -> None:
        self._trusted.add(path_key)
        if len(self._trusted) > self.MAX_EXES:
            self._trusted.pop()

    def scan(self) -> Scan:
        sel = self.selection
        out = Scan()
        # each scan, not once: a deploy writes a new file at a --go-binary path (another
        # inode), and the processes it starts are that binary's as much as the old ones were
        binaries = {k for k in (exe_key(p) for p in sel.go_binaries) if k}
        in_cgroups: set[int] | None = None
        if sel.cgroups:
            in_cgroups = set()
            for d in sel.cgroups:
                in_cgroups |= cgroup_pids(d)
        try:
            names = os.listdir("/proc")
        except OSError:
            return out
        uptime = None
        for name in names:
            if not name.isdigit():
                continue
            pid = int(name)
            if pid == self._own:
                continue
            exe = f"/proc/{pid}/exe"
            key, err = _exe_key_or_error(exe)
            if key is None:              # a kernel thread, gone, or not ours to read
                out.denied += err == errno.EACCES
                continue
            named = pid in sel.pids
            if not named:
                if sel.go_binaries and key in binaries:
                    pass
                elif sel.everything or (in_cgroups is not None and pid in in_cgroups):
                    if not self._is_go(key, exe):
                        continue
                elif sel.ports:
                    if not self._is_go(key, exe) or not port_holder(pid, sel.ports):
                        continue
                else:
                    continue
                if key not in self._trusted and self.min_age_s > 0:
                    if uptime is None:
                        uptime = _uptime()
                    age = start_age_s(pid, uptime)
                    if age is None:
                        continue
                    if age < self.min_age_s:
                        out.young += 1
                        continue
            out.targets[pid] = _exe_path(pid)
        return out


def _exe_key_or_error(path: str) -> tuple[tuple[int, int] | None, int]:
    try:
        st = os.stat(path)
    except OSError as e:
        return None, e.errno
    return (st.st_dev, st.st_ino), 0


def _uptime() -> float | None:
    try:
        with open("/proc/uptime", "rb") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _exe_path(pid: int) -> str:
    """The executable's real path when this mount namespace has it, else /proc/PID/exe (a
    process in another container: the kernel's link reaches its file all the same)."""
    try:
        real = os.path.realpath(f"/proc/{pid}/exe")
    except OSError:
        return f"/proc/{pid}/exe"
    same = exe_key(real)
    return real if same is not None and same == exe_key(f"/proc/{pid}/exe") else (
        f"/proc/{pid}/exe")
