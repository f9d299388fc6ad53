"""/proc-side socket facts agree with the socket API (no root needed): keys, ports, and what
other network namespaces need: their /proc/PID/net/tcp{,6} rows and a socket's own figures read
on a copy of its holder's fd."""

import fcntl
import os
import socket
import struct
import termios
import time

import pytest

from otelwater.hostsockets import (
    SO_MEMINFO,
    Borrower,
    OwnerResolver,
    SocketFigures,
    fd_sock_keys,
    namespaces,
    netns_inode,
    netns_of,
    ports_in_use,
    queues_of,
    read_table,
    socket_inodes,
    tcp_queues,
)
from otelwater.sockkey import addr16, sock_key


def test_fd_sock_keys_match_getsockname():
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        srv = socket.socket(family)
        srv.bind((host, 0))
        srv.listen()
        cli = socket.create_connection(srv.getsockname()[:2])
        acc, _ = srv.accept()
        keys = fd_sock_keys(os.getpid())
        ns = netns_inode(os.getpid())
        for s in (cli, acc):
            la, lp = s.getsockname()[:2]
            ra, rp = s.getpeername()[:2]
            assert keys[s.fileno()] == sock_key(ns, la, lp, ra, rp)
        assert srv.getsockname()[1] in ports_in_use()
        assert acc.fileno() in socket_inodes(os.getpid())
        for s in (cli, acc, srv):
            s.close()


def test_gone_process_has_no_sockets():
    assert socket_inodes(2**22 + 7) == {}
    assert fd_sock_keys(2**22 + 7) == {}


# -- other network namespaces ------------------------------------------------------------
GONE = 2**22 + 7
HEAD4 = ("  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  "
         "timeout inode")
TCP4 = "\n".join([
    HEAD4,
    # a listener with 3 connections in its accept backlog (rx_queue), never water
    "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000003 00:00000000 00000000     0        0 "
    "111 1 0000000000000000 100 0 0 10 0",
    # 127.0.0.1:8080 <- 127.0.0.1:40000 holding 50,000 bytes
    "   1: 0100007F:1F90 0100007F:9C40 01 00000000:0000C350 00:00000000 00000000     0        0 "
    "4242 1 0000000000000000 20 4 30 10 -1",
    # its writer: nothing unread
    "   2: 0100007F:9C40 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 "
    "4243 1 0000000000000000 20 4 30 10 -1",
    # 10.0.0.10:8081 <- 10.0.0.11:40001 in CLOSE_WAIT: 50,000 bytes and the FIN
    "   3: 0A00000A:1F91 0B00000A:9C41 08 00000000:0000C351 00:00000000 00000000  1000        0 "
    "4244 1 0000000000000000 20 4 30 10 -1",
    # TIME_WAIT: another layout after the queues, never water
    "   4: 0100007F:B7E7 0100007F:8046 06 00000000:00000000 03:00000532 00000000     0        0 "
    "0 3 00000000d69c3a8c",
]) + "\n"
TCP6 = "\n".join([
    "  sl  local_address                         remote_address                        st "
    "tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode",
    # [::1]:8080 <- [::1]:40000, 7 bytes
    "   0: 00000000000000000000000001000000:1F90 00000000000000000000000001000000:9C40 01 "
    "00000000:00000007 00:00000000 00000000     0        0 5555 1 0000000000000000 20 4 30 10 -1",
    # an IPv6 socket speaking IPv4 (v4-mapped): the same key as an IPv4 socket's
    "   1: 0000000000000000FFFF00000100007F:1F92 0000000000000000FFFF00000100007F:9C42 01 "
    "00000000:00000010 00:00000000 00000000     0        0 5556 1 0000000000000000 20 4 30 10 -1",
]) + "\n"


def test_rows_holding_bytes_are_read_with_their_addresses_state_and_inode():
    rows = queues_of(TCP4)
    assert [(r.lport, r.rport, r.state, r.rx_queue, r.inode) for r in rows] == [
        (8080, 0, 0x0A, 3, 111), (8080, 40000, 1, 50_000, 4242), (8081, 40001, 8, 50_001, 4244)]
    assert (rows[1].laddr, rows[1].raddr) == (addr16("127.0.0.1"), addr16("127.0.0.1"))
    assert (rows[2].laddr, rows[2].raddr) == (addr16("10.0.0.10"), addr16("10.0.0.11"))
    six = queues_of(TCP6)
    assert [(r.laddr, r.lport, r.raddr, r.rport, r.rx_queue, r.inode) for r in six] == [
        (addr16("::1"), 8080, addr16("::1"), 40000, 7, 5555),
        (addr16("127.0.0.1"), 8082, addr16("127.0.0.1"), 40002, 16, 5556)]
    # a port filter (local or remote) keeps the others out before they are split
    assert [r.inode for r in queues_of(TCP4, frozenset({40001}))] == [4244]
    assert queues_of(TCP4, frozenset({1})) == [] and queues_of(HEAD4 + "\n") == []


def held_water(total: int = 3000):
    """A loopback connection of this process whose reader holds `total` unread bytes."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    cli = socket.create_connection(srv.getsockname())
    acc, _ = srv.accept()
    cli.sendall(b"x" * total)
    for _ in range(500):
        if inq(acc) == total:
            break
        time.sleep(0.01)
    return srv, cli, acc


def inq(s: socket.socket) -> int:
    return struct.unpack("i", fcntl.ioctl(s.fileno(), termios.FIONREAD, b"\0" * 4))[0]


def test_tcp_queues_of_a_real_socket_give_its_key():
    srv, cli, acc = held_water()
    try:
        ns = netns_inode(os.getpid())
        (row,) = [r for r in tcp_queues(os.getpid()) if r.inode == os.fstat(acc.fileno()).st_ino]
        assert row.rx_queue == inq(acc) == 3000 and row.state == 1
        want = fd_sock_keys(os.getpid())[acc.fileno()]
        assert sock_key(ns, row.laddr, row.lport, row.raddr, row.rport) == want
        assert tcp_queues(GONE) is None
    finally:
        for s in (cli, acc, srv):
            s.close()


def test_a_table_of_many_pages_is_read_to_its_end():
    # 70 connections: 140 rows of 150 bytes and more, read a page (4 KiB) at a time; stopping
    # at the first short read must not lose any
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(128)
    pairs = []
    try:
        for _ in range(70):
            c = socket.create_connection(srv.getsockname())
            pairs += [c, srv.accept()[0]]
        text = read_table(os.getpid(), "tcp")
        ports = {int(ln.split()[1].rsplit(":", 1)[1], 16) for ln in text.splitlines()[1:]}
        assert {s.getsockname()[1] for s in pairs} <= ports
        assert len(text) > 4 * 4096 and text.endswith("\n")
    finally:
        for s in pairs + [srv]:
            s.close()
    assert read_table(GONE, "tcp") is None


def test_namespaces_name_one_process_each():
    own = netns_inode(os.getpid())
    assert netns_of("self") == netns_of(os.getpid()) == own
    assert namespaces([os.getpid(), GONE, "self"]) == {own: os.getpid()}
    host = namespaces()
    assert host[own] == "self" and all(isinstance(ns, int) for ns in host)
    assert netns_of(GONE) is None and namespaces([GONE]) == {}


def test_ports_in_use_of_processes_or_of_every_namespace():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]
    try:
        assert port in ports_in_use() and port in ports_in_use([os.getpid()])
        assert ports_in_use([GONE]) == set()
    finally:
        srv.close()


def test_borrowed_figures_are_the_sockets_own():
    srv, cli, acc = held_water()
    before = socket.getdefaulttimeout()
    socket.setdefaulttimeout(5.0)    # a socket.socket made on the copy would turn it non-blocking
    try:
        ino = os.fstat(acc.fileno()).st_ino
        b = Borrower()
        got = b.figures(os.getpid(), acc.fileno(), ino)
        if got is None and b.unsupported:
            pytest.skip("this kernel has no pidfd_getfd (Linux 5.6)")
        mem = struct.unpack("=9I", acc.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, 36))
        assert got == SocketFigures(inq(acc), got.meminfo, got.last_data_recv_ms)
        assert got.unread_bytes == 3000 and got.meminfo[:2] == mem[:2] and got.meminfo[8] == 0
        # the holder's socket is as it was: still blocking
        assert fcntl.fcntl(acc.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK == 0
        # another file at that fd now, or a process gone: refused, counted
        assert b.figures(os.getpid(), acc.fileno(), ino + 1) is None
        assert b.figures(GONE, acc.fileno(), ino) is None and b.refused == 2
        b.release()
        assert OwnerResolver(min_rescan_s=0).holder(ino) == (os.getpid(), acc.fileno())
    finally:
        socket.setdefaulttimeout(before)
        for s in (cli, acc, srv):
            s.close()
