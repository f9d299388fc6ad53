"""Standing water at start: real loopback sockets that hold data while nothing moves, seen through
sock_diag, against SIOCINQ and `ss -tm` (root: owners of other processes' sockets, cgroups)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid

import pytest

from otelwater.hostsockets import fd_sock_keys
from otelwater.sockdiag import StandingWater

from .loopback import Pair, siocinq, ss

pytestmark = [pytest.mark.root]

CGROUP2 = "/sys/fs/cgroup/unified"


def stuck(total: int = 50_000, family=socket.AF_INET) -> Pair:
    """A connection whose reader never reads: `total` bytes stand in its queue."""
    pair = Pair(family=family).connect()
    assert pair.fill(total) == total
    assert pair.wait_still() == total
    return pair


def only(snaps, pair: Pair):
    mine = [s for s in snaps if s.lport == pair.port and s.rport == pair.client_port]
    assert len(mine) == 1, f"{len(mine)} snapshots of {pair.port}<-{pair.client_port}"
    return mine[0]


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_stuck_socket_is_reported_at_start(family):
    # Given a socket holding 50 KB and no traffic, before otelwater starts
    pair = stuck(family=family)
    try:
        truth, inq = ss(pair.port, pair.client_port), siocinq(pair.server)
        key = fd_sock_keys(os.getpid())[pair.server.fileno()]
        ino = os.fstat(pair.server.fileno()).st_ino
        # When the seed scans
        with StandingWater() as sw:
            snaps = sw.scan(time.monotonic_ns())
        snap = only(snaps, pair)
    finally:
        pair.close()
    # Then it is reported, with what SIOCINQ and ss say (nothing moves: no tolerance)
    assert snap.unread_bytes == inq == 50_000
    assert (snap.volume, snap.capacity, snap.drops) == (truth.r, truth.rb, truth.d)
    assert snap.sock_key == key
    assert (snap.pid, snap.trigger, snap.tcp_state) == (os.getpid(), "standing", "ESTABLISHED")
    assert snap.ino == ino
    # the writer's side holds nothing unread: not reported
    assert pair.client_port not in {s.lport for s in snaps}


def test_peer_fin_after_data_reports_the_data_only():
    # Given 50 KB then the peer's FIN, unread
    pair = stuck()
    try:
        pair.client.shutdown(socket.SHUT_WR)
        time.sleep(0.1)
        truth, inq = ss(pair.port, pair.client_port), siocinq(pair.server)
        with StandingWater(ports=frozenset({pair.port})) as sw:
            snap = only(sw.scan(time.monotonic_ns()), pair)
    finally:
        pair.close()
    # Then the report is the data: SIOCINQ, one less than ss's Recv-Q (which counts the FIN)
    assert snap.tcp_state == "CLOSE_WAIT"
    assert snap.unread_bytes == inq == 50_000 == truth.recv_q - 1


def test_drained_socket_is_not_reported():
    # (a FIN alone, unread, cannot be made from user space here: it coalesces into the last
    # data skb and is read with it; tests/unit/test_sockdiag.py covers rqueue 1 in CLOSE_WAIT)
    pair = stuck(1000)
    try:
        pair.client.shutdown(socket.SHUT_WR)
        assert len(pair.server.recv(4096)) == 1000
        time.sleep(0.05)
        assert siocinq(pair.server) == 0 == ss(pair.port, pair.client_port).recv_q
        with StandingWater(ports=frozenset({pair.port})) as sw:
            snaps = sw.scan(time.monotonic_ns())
    finally:
        pair.close()
    assert snaps == []


def test_port_and_pid_filters():
    a, b = stuck(), stuck(20_000)
    child = holder()
    try:
        child_port = int(child.stdout.readline())
        now = time.monotonic_ns()
        with StandingWater(ports=frozenset({a.port})) as sw:
            assert {(s.lport, s.rport) for s in sw.scan(now)} == {(a.port, a.client_port)}
        # a remote port matches too: the writer's side holds nothing, so still only a's reader
        with StandingWater(ports=frozenset({a.client_port})) as sw:
            assert {s.lport for s in sw.scan(now)} == {a.port}
        with StandingWater(pids=frozenset({os.getpid()})) as sw:
            got = {s.lport for s in sw.scan(now)}
            assert {a.port, b.port} <= got and child_port not in got
            assert {s.pid for s in sw.scan(now)} == {os.getpid()}
        with StandingWater(pids=frozenset({child.pid})) as sw:
            snaps = sw.scan(now)
            assert [(s.lport, s.pid, s.unread_bytes) for s in snaps] == [(child_port, child.pid,
                                                                          30_000)]
        with StandingWater(ports=frozenset({a.port}), pids=frozenset({child.pid})) as sw:
            assert sw.scan(now) == []
    finally:
        child.kill()
        child.wait()
        a.close()
        b.close()


@pytest.mark.skipif(not os.path.exists(f"{CGROUP2}/cgroup.procs"),
                    reason=f"no cgroup v2 hierarchy at {CGROUP2}")
def test_cgroup_filter():
    # Given a process in its own cgroup holding 30 KB, and this process holding 50 KB elsewhere
    mine = stuck()
    cg = f"{CGROUP2}/otelwater-test-{uuid.uuid4().hex[:8]}"
    os.mkdir(cg)
    child = holder()
    try:
        child_port = int(child.stdout.readline())
        with open(f"{cg}/cgroup.procs", "w") as f:
            f.write(str(child.pid))
        with StandingWater(cgroups=frozenset({cg})) as sw:
            snaps = sw.scan(time.monotonic_ns())
        assert [(s.lport, s.pid) for s in snaps] == [(child_port, child.pid)]
    finally:
        child.kill()
        child.wait()
        mine.close()
        os.rmdir(cg)


def test_sweep_reports_quiet_sockets_and_redumps_by_its_gap():
    pair = stuck()
    try:
        with StandingWater(ports=frozenset({pair.port}), floor_s=0.5) as sw:
            t0 = time.monotonic_ns()
            (snap,) = sw.scan(t0)
            assert sw.keys == {snap.sock_key}
            assert sw.last_socket_count >= 2 and sw.last_cost_ns > 0
            assert sw.min_gap_s >= 0.5
            quiet = {snap.sock_key}
            # the probe saw it: not ours to report
            assert sw.sweep(t0 + 1, quiet_keys=set()) == []
            # quiet again: reported at once, stamped now, from the last dump (no re-dump
            # inside the gap); then not again while its water does not change
            (again,) = sw.sweep(t0 + 2, quiet_keys=quiet)
            assert again.ts_ns == t0 + 2 and again.unread_bytes == 50_000
            assert sw.sweep(t0 + 3, quiet_keys=quiet) == []
            # more bytes stand: after the gap the re-dump sees them, and they are reported
            pair.client.sendall(b"m" * 1000)
            pair.wait_still()
            gap = int(sw.min_gap_s * 1e9)
            assert sw.sweep(t0 + 4, quiet_keys=quiet) == []            # still inside the gap
            (more,) = sw.sweep(t0 + 4 + gap, quiet_keys=quiet)
            assert more.unread_bytes == 51_000
            t0 += 4 + gap
            # the reader drains: after the gap the re-dump finds no water
            pair.server.setblocking(False)
            while True:
                try:
                    if not pair.server.recv(65536):
                        break
                except BlockingIOError:
                    break
            assert sw.sweep(t0 + 1, quiet_keys=quiet) == []     # inside the gap: unchanged
            assert sw.keys == quiet
            later = t0 + int(sw.min_gap_s * 1e9)
            assert sw.sweep(later, quiet_keys=quiet) == [] and sw.keys == frozenset()
    finally:
        pair.close()


def test_dump_cost_is_measured_per_socket():
    # 200 idle loopback connections: the dump stays cheap (a few µs a socket; module docstring)
    lst = socket.create_server(("127.0.0.1", 0), backlog=512)
    socks = []
    try:
        for _ in range(200):
            socks.append(socket.create_connection(lst.getsockname()))
            socks.append(lst.accept()[0])
        with StandingWater() as sw:
            sw.scan(time.monotonic_ns())      # the first scan also walks /proc for owners
            sw.scan(time.monotonic_ns())
            assert sw.last_socket_count >= 400
            per_socket_us = sw.last_cost_ns / sw.last_socket_count / 1000
            assert per_socket_us < 50, f"{per_socket_us:.1f} µs a socket"
    finally:
        for s in socks + [lst]:
            s.close()


def holder() -> subprocess.Popen:
    """Another process holding a stuck socket with 30 KB; prints its reader's port."""
    code = (
        "import socket, sys, time\n"
        "l = socket.create_server(('127.0.0.1', 0))\n"
        "c = socket.create_connection(l.getsockname()); s, _ = l.accept()\n"
        "c.sendall(b'x' * 30000); time.sleep(0.2)\n"
        "print(l.getsockname()[1], flush=True)\n"
        "sys.stdin.read()\n"
    )
    return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
