"""Real backlog on loopback, and the ground truth the tests measure independently of otelwater:
SIOCINQ on the socket itself and `ss -tmn` (sock_diag) for the kernel's counters."""

from __future__ import annotations

import fcntl
import re
import socket
import struct
import subprocess
import termios
import time
from dataclasses import dataclass


def siocinq(sock: socket.socket) -> int:
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0]


@dataclass
class SsLine:
    recv_q: int
    r: int       # sk_rmem_alloc
    rb: int      # sk_rcvbuf
    d: int       # sk_drops


def ss(lport: int, rport: int) -> SsLine:
    out = subprocess.run(["ss", "-tmnH", "state", "all", f"( sport = :{lport} and dport = :{rport} )"],
                         capture_output=True, text=True, check=True).stdout
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert lines, f"ss shows no socket {lport}->{rport}"
    first = lines[0].split()
    # ss -H prints: State Recv-Q Send-Q Local Peer, then the skmem line
    recv_q = int(first[1])
    m = re.search(r"skmem:\(r(\d+),rb(\d+),.*?d(\d+)\)", out)
    assert m, out
    return SsLine(recv_q, int(m[1]), int(m[2]), int(m[3]))


class Pair:
    """A loopback TCP connection: `client` writes, `server` is the (slow) reader."""

    def __init__(self, rcvbuf: int | None = None, family=socket.AF_INET):
        host = "127.0.0.1" if family == socket.AF_INET else "::1"
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        if rcvbuf:
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.listener.bind((host, 0))
        self.listener.listen()
        self.port = self.listener.getsockname()[1]
        self.host = host
        self.client = self.server = None

    def connect(self) -> "Pair":
        self.client = socket.create_connection((self.host, self.port))
        self.server, _ = self.listener.accept()
        self.client_port = self.client.getsockname()[1]
        return self

    def fill(self, total: int, chunk: int = 4096, pause_s: float = 0.0) -> int:
        """Write up to `total` bytes without blocking forever; returns bytes written."""
        self.client.setblocking(False)
        sent = 0
        deadline = time.monotonic() + 5
        while sent < total and time.monotonic() < deadline:
            try:
                sent += self.client.send(b"w" * min(chunk, total - sent))
            except BlockingIOError:
                time.sleep(0.005)
            if pause_s:
                time.sleep(pause_s)
        self.client.setblocking(True)
        return sent

    def wait_still(self, settle_s: float = 0.3, timeout_s: float = 5.0) -> int:
        """Wait until the reader's queue stops changing; returns SIOCINQ then."""
        last, since = siocinq(self.server), time.monotonic()
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            time.sleep(0.05)
            now = siocinq(self.server)
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= settle_s:
                return now
        return last

    def close(self):
        for s in (self.client, self.server, self.listener):
            if s is None:
                continue
            try:
                s.close()
            except OSError:
                pass
