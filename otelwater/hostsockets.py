"""What /proc says about processes and their TCP sockets (no root needed for one's own).

Used to fill in what the kernel cannot say cheaply (which process holds a socket that was never
read), to keep the kernel's pid filter current (the pids' socket inodes), and to give a Go
read's fd its socket key in user space.
"""

from __future__ import annotations

import os
import struct
import time
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


def netns_inode(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


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



def _parse_addr(field: str) -> tuple[bytes, int]:
    hexaddr, hexport = field.split(":")
    if len(hexaddr) == 8:
        addr = b"\x00" * 10 + b"\xff\xff" + struct.pack("<I", int(hexaddr, 16))
    else:
        addr = b"".join(struct.pack("<I", int(hexaddr[i:i + 8], 16)) for i in range(0, 32, 8))
    return addr, int(hexport, 16)


def _tcp_rows(pid: int | str):
    """The fields of each row of /proc/PID/net/tcp and tcp6 (the process's network namespace)."""
    for name in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{name}") as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            yield line.split()


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
    `min_rescan_s` and only when asked about an inode it has not seen."""

    def __init__(self, min_rescan_s: float = 1.0):
        self._owners: dict[int, tuple[int, str]] = {}
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

    def _scan(self) -> None:
        self._last_scan = time.monotonic()
        owners = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            pid = int(entry)
            inodes = socket_inodes(pid)
            if inodes:
                comm = process_name(pid)
                for ino in inodes.values():
                    owners.setdefault(ino, (pid, comm))
        self._owners = owners


def ports_in_use(pid: int | str = "self") -> set[int]:
    """Local and remote ports of every TCP socket in a network namespace."""
    out = set()
    for parts in _tcp_rows(pid):
        out.add(int(parts[1].split(":")[1], 16))
        out.add(int(parts[2].split(":")[1], 16))
    out.discard(0)
    return out
