"""What /proc says about processes and their TCP sockets (no root needed for one's own).

Used to fill in what the kernel cannot say cheaply (which process holds a socket that was never
read), to keep the kernel's pid filter current (the pids' socket inodes), and to give a Go
read's fd its socket key in user space.

Network namespaces. otelwater may run in another network namespace than the processes it
watches (a sidecar, a DaemonSet agent), without CAP_SYS_ADMIN, so it cannot setns(2) into
theirs. It does not need to: /proc/PID/net/tcp{,6} is the TCP table of PID's namespace (its
addresses, states, receive queues and socket inodes), and /proc/PID/ns/net names that namespace
(its inode is the `netns` of the socket key, as the kernel's sk->sk_net). Socket inodes are
unique on the host, so /proc/*/fd finds a socket's holder whatever its namespace. Every function
here that reads a TCP table reads the one of the process it is given:

    namespaces(pids)       network namespace -> one process in it (None: every process's)
    ports_in_use(pids)     ports used in those namespaces (None: in every namespace)
    tcp_queues(pid)        the sockets of PID's namespace holding unread bytes
    Borrower().figures(pid, fd, ino)   what sock_diag says of one socket another process
                           holds (SocketFigures), read on a copy of its fd (pidfd_getfd:
                           CAP_SYS_PTRACE, not CAP_SYS_ADMIN)
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import socket
import struct
import termios
import time
from collections.abc import Iterable
from dataclasses import dataclass

from otelwater.sockkey import sock_key


def socket_inodes(pid: int) -> dict[int, int]:
    """fd -> socket inode for one process ({} if it is gone or unreadable)."""
    out = {}
    base = f"/proc/{pid}/fd"
    try:
        names = os.listdir(base)
    except OSError:
        return out
    for name in names:
        try:
            target = os.readlink(f"{base}/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            out[int(name)] = int(target[8:-1])
    return out


def netns_inode(pid: int | str) -> int:
    """The inode of a process's network namespace (raises OSError when it is gone)."""
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def netns_of(pid: int | str) -> int | None:
    """netns_inode from the link's text ("net:[4026531840]", half the cost of a stat), or None
    when the process is gone, a zombie, or not ours to look at."""
    try:
        link = os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return None
    return int(link[5:-1])


def namespaces(pids: Iterable[int | str] | None = None) -> dict[int, int | str]:
    """Network namespace inode -> one process in it (the first given), for these processes, or
    for every process on the host (None; this process first, as "self"). Processes that are
    gone or not ours to look at are left out."""
    out: dict[int, int | str] = {}
    if pids is None:
        pids = ["self", *(int(e) for e in os.listdir("/proc") if e.isdigit())]
    for pid in pids:
        ns = netns_of(pid)
        if ns is not None and ns not in out:
            out[ns] = pid
    return out


def exe_key(path: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of a file (an executable: /proc/PID/exe follows to it); None when it
    cannot be read. Two processes with the same key run the same binary."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def process_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


@dataclass(frozen=True, slots=True)
class TcpEntry:
    laddr: bytes  # 16 bytes, IPv4 mapped
    lport: int
    raddr: bytes
    rport: int
    state: int
    inode: int



@dataclass(frozen=True, slots=True)
class TcpQueue:
    """A row of /proc/PID/net/tcp{,6} whose receive queue is not empty."""

    laddr: bytes    # 16 bytes, IPv4 mapped
    lport: int
    raddr: bytes
    rport: int
    state: int      # TCP_* (otelwater.events.model.TCP_STATES)
    rx_queue: int   # rcv_nxt - copied_seq (sock_diag's idiag_rqueue); a listener's accept backlog
    inode: int


def _parse_addr(field: str) -> tuple[bytes, int]:
    """"0100007F:1F90" -> (16 bytes, port): the kernel prints each 32-bit word of the address
    as it lies in memory (network order) read as a host-order integer."""
    hexaddr, hexport = field.split(":")
    if len(hexaddr) == 8:
        addr = b"\x00" * 10 + b"\xff\xff" + struct.pack("=I", int(hexaddr, 16))
    else:
        addr = b"".join(struct.pack("=I", int(hexaddr[i:i + 8], 16)) for i in range(0, 32, 8))
    return addr, int(hexport, 16)


READ_BYTES = 1 << 16
# The kernel's seq_file hands out at most one buffer (a page, 4 KiB or more) a read, filled with
# whole rows; a row of these tables is under 200 bytes. So a read shorter than 4 KiB less the
# longest row can only be the table's end, and we stop there: the read that would say "end"
# walks the whole TCP hash table again (tcp_seq_start cannot resume past the end), which is half
# of what reading a table costs (2.5 ms with 262,144 buckets and 2,400 sockets here).
_LAST_READ = 4096 - 512


def read_table(pid: int | str, name: str) -> str | None:
    """/proc/PID/net/NAME (tcp, tcp6) as text, header included; None when unreadable."""
    try:
        fd = os.open(f"/proc/{pid}/net/{name}", os.O_RDONLY)
    except OSError:
        return None
    try:
        chunks = []
        while True:
            data = os.read(fd, READ_BYTES)
            chunks.append(data)
            if len(data) < _LAST_READ:
                break
    except OSError:
        return None
    finally:
        os.close(fd)
    return b"".join(chunks).decode("ascii", "replace")


def _tcp_rows(pid: int | str):
    """The fields of each row of /proc/PID/net/tcp and tcp6 (the process's network namespace)."""
    for name in ("tcp", "tcp6"):
        text = read_table(pid, name)
        if text is None:
            continue
        for line in text.splitlines()[1:]:
            yield line.split()


def queues_of(text: str, ports: frozenset[int] = frozenset()) -> list[TcpQueue]:
    """The rows of one /proc/net/tcp{,6} text whose rx_queue is not 0 and that have one of
    `ports` as local or remote port (empty: any). Only those rows are split whole."""
    out = []
    for line in text.splitlines()[1:]:
        # sl local rem st tx_queue:rx_queue (the rest: tr:when retrnsmt uid timeout inode ...)
        parts = line.split(None, 5)
        if len(parts) < 6 or parts[4].endswith(":00000000"):
            continue
        local, rem = parts[1], parts[2]
        if ports and int(local[-4:], 16) not in ports and int(rem[-4:], 16) not in ports:
            continue
        laddr, lport = _parse_addr(local)
        raddr, rport = _parse_addr(rem)
        out.append(TcpQueue(laddr, lport, raddr, rport, int(parts[3], 16),
                            int(parts[4].rsplit(":", 1)[1], 16), int(parts[5].split()[4])))
    return out


def tcp_queues(pid: int | str, ports: frozenset[int] = frozenset()) -> list[TcpQueue] | None:
    """The TCP sockets of the process's network namespace holding bytes in their receive queue
    (queues_of), IPv4 and IPv6; None when its tables cannot be read (the process is gone)."""
    out = None
    for name in ("tcp", "tcp6"):
        text = read_table(pid, name)
        if text is not None:
            out = (out or []) + queues_of(text, ports)
    return out


LISTEN = 0x0A   # TCP_LISTEN in /proc/net/tcp's st column


def listening(pid: int | str = "self") -> tuple[int, set[int]] | None:
    """(network namespace inode, local ports of its listening TCP sockets) as the process sees
    them, or None when the process is gone or not ours to look at."""
    try:
        netns = os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None
    return netns, {int(p[1].split(":")[1], 16) for p in _tcp_rows(pid)
                   if len(p) > 3 and int(p[3], 16) == LISTEN}


def tcp_table(pid: int) -> dict[int, TcpEntry]:
    """inode -> TCP socket, from the process's own network namespace view."""
    out = {}
    for parts in _tcp_rows(pid):
        laddr, lport = _parse_addr(parts[1])
        raddr, rport = _parse_addr(parts[2])
        ino = int(parts[9])
        if ino:
            out[ino] = TcpEntry(laddr, lport, raddr, rport, int(parts[3], 16), ino)
    return out


def fd_sock_keys(pid: int) -> dict[int, int]:
    """fd -> socket key for each TCP socket a process holds (the user-space twin of the BPF
    fd-table walk)."""
    inodes = socket_inodes(pid)
    if not inodes:
        return {}
    table = tcp_table(pid)
    ns = netns_inode(pid)
    out = {}
    for fd, ino in inodes.items():
        e = table.get(ino)
        if e:
            out[fd] = sock_key(ns, e.laddr, e.lport, e.raddr, e.rport)
    return out


class OwnerResolver:
    """socket inode -> (pid, comm), by scanning /proc/*/fd as `ss -p` does, at most once per
    `min_rescan_s` and only when asked about an inode it has not seen. Socket inodes are unique
    on the host: a socket of any network namespace is found. holder(ino): (pid, fd) as the
    last scan saw it."""

    def __init__(self, min_rescan_s: float = 1.0):
        self._owners: dict[int, tuple[int, str]] = {}
        self._fds: dict[int, int] = {}
        self._last_scan = 0.0
        self._min_rescan_s = min_rescan_s

    def owner(self, ino: int) -> tuple[int, str] | None:
        if not ino:
            return None
        hit = self._owners.get(ino)
        if hit is None and time.monotonic() - self._last_scan >= self._min_rescan_s:
            self._scan()
            hit = self._owners.get(ino)
        return hit

    def holder(self, ino: int) -> tuple[int, int] | None:
        """(pid, fd) of the socket's owner (owner() first); the fd may be stale."""
        hit = self.owner(ino)
        return (hit[0], self._fds[ino]) if hit is not None and ino in self._fds else None

    def _scan(self) -> None:
        self._last_scan = time.monotonic()
        owners, fds = {}, {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            pid = int(entry)
            inodes = socket_inodes(pid)
            if inodes:
                comm = process_name(pid)
                for fd, ino in inodes.items():
                    if ino not in owners:
                        owners[ino] = (pid, comm)
                        fds[ino] = fd
        self._owners, self._fds = owners, fds


def ports_in_use(pids: Iterable[int | str] | None = None) -> set[int]:
    """Local and remote ports of every TCP socket in the network namespaces of these processes,
    or in every network namespace on the host (None): a service's port is used in its own
    namespace, which need not be ours."""
    out = set()
    for pid in namespaces(pids).values():
        for parts in _tcp_rows(pid):
            out.add(int(parts[1].split(":")[1], 16))
            out.add(int(parts[2].split(":")[1], 16))
    out.discard(0)
    return out


# -- another process's socket, read on a copy of its fd ------------------------------------------
SYS_PIDFD_GETFD = 438      # the same number on every architecture (Linux 5.6)
SO_MEMINFO = 55            # asm-generic/socket.h (x86, arm64): sk_get_meminfo's u32 array
TCPI_LAST_DATA_RECV_AT = 52  # struct tcp_info: 8 bytes of u8 fields, then 11 u32 before it
_libc = None


def _c():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _raise_errno():
    err = ctypes.get_errno()
    raise OSError(err, os.strerror(err))


def pidfd_getfd(pidfd: int, fd: int) -> int:
    """A copy of another process's fd (pidfd_getfd(2)); raises OSError."""
    got = _c().syscall(ctypes.c_long(SYS_PIDFD_GETFD), ctypes.c_int(pidfd), ctypes.c_int(fd),
                       ctypes.c_uint(0))
    if got < 0:
        _raise_errno()
    return got


def getsockopt(fd: int, level: int, name: int, size: int) -> bytes:
    """getsockopt(2) on a bare fd. Not through a socket.socket: making one may set O_NONBLOCK
    (socket.setdefaulttimeout), and on a copied fd that flag is the holder's too."""
    buf = ctypes.create_string_buffer(size)
    length = ctypes.c_uint32(size)
    if _c().getsockopt(fd, level, name, buf, ctypes.byref(length)) < 0:
        _raise_errno()
    return buf.raw[:length.value]


@dataclass(frozen=True, slots=True)
class SocketFigures:
    """What sock_diag says of a socket, read from the socket itself: SIOCINQ, SO_MEMINFO (the
    same sk_get_meminfo array as INET_DIAG_SKMEMINFO) and tcp_info's last_data_recv."""

    unread_bytes: int
    meminfo: tuple[int, ...]
    last_data_recv_ms: int

    @classmethod
    def of_fd(cls, fd: int) -> SocketFigures:
        """Of a TCP socket's fd (not a listener's: SIOCINQ refuses those); raises OSError."""
        (inq,) = struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))
        raw = getsockopt(fd, socket.SOL_SOCKET, SO_MEMINFO, 64)
        info = getsockopt(fd, socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        mem = struct.unpack(f"={len(raw) // 4}I", raw[:len(raw) // 4 * 4])
        (last,) = struct.unpack_from("=I", info, TCPI_LAST_DATA_RECV_AT)
        return cls(inq, mem, last)


class Borrower:
    """SocketFigures of sockets other processes hold, each read on a copy of the holder's fd
    (pidfd_getfd), closed at once: the socket's own figures, in its own network namespace,
    without setns(2). Needs ptrace access to the holder (CAP_SYS_PTRACE, or the same user under
    Yama's default scope), not CAP_SYS_ADMIN; Linux 5.6. The copy only holds a reference for the
    few microseconds of the reads (a close by the holder meanwhile takes effect at ours).

    figures(pid, fd, ino): None when refused (no such syscall, no access, the fd gone or now
    another file: its inode is checked). release(): close the pidfds (after each dump)."""

    def __init__(self):
        self.unsupported = False      # the kernel has no pidfd_getfd: not tried again
        self.refused = 0              # reads refused so far (access, gone)
        self._pidfds: dict[int, int | None] = {}

    def figures(self, pid: int, fd: int, ino: int) -> SocketFigures | None:
        if self.unsupported:
            return None
        pidfd = self._pidfds.get(pid, -1)
        if pidfd == -1:
            try:
                pidfd = self._pidfds[pid] = os.pidfd_open(pid)
            except OSError as e:
                self.unsupported = e.errno == errno.ENOSYS     # Linux before 5.3
                pidfd = self._pidfds[pid] = None
        if pidfd is None:
            self.refused += 1
            return None
        try:
            copy = pidfd_getfd(pidfd, fd)
        except OSError as e:
            self.unsupported = e.errno == errno.ENOSYS         # Linux before 5.6
            self.refused += 1
            return None
        try:
            if os.fstat(copy).st_ino != ino:
                self.refused += 1
                return None
            return SocketFigures.of_fd(copy)
        except OSError:
            self.refused += 1
            return None
        finally:
            os.close(copy)

    def release(self) -> None:
        for pidfd in self._pidfds.values():
            if pidfd is not None:
                os.close(pidfd)
        self._pidfds = {}
