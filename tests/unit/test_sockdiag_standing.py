"""Standing water is reported when it changes, and once a heartbeat while it does not: a
StandingWater whose sock_diag dump is a fixture (messages built byte for byte as the kernel
lays them out, tests/unit/test_sockdiag.py), no root, no netlink. And standing water in other
network namespaces (otelwater beside the service, not in its namespace): their
/proc/PID/net/tcp{,6} rows as fixtures, then this process's real sockets read that way."""

from __future__ import annotations

import os
import socket
import time

import pytest

from otelwater import sockdiag
from otelwater.hostsockets import SocketFigures, TcpQueue, fd_sock_keys, netns_inode
from otelwater.sockdiag import HEARTBEAT_S, NAMESPACES_S, StandingWater, water_of
from otelwater.sockkey import addr16, sock_key
from tests.unit.test_hostsockets import held_water
from tests.unit.test_sockdiag import diag_msg

S = 10**9
MEM = (51664, 131072, 0, 87040, 1584, 0, 0, 0, 0)   # skmem r51664 rb131072 ... d0


class Host:
    """The kernel's socket table, as a test sets it: (sport, dport) -> diag_msg arguments."""

    def __init__(self):
        self.socks: dict[tuple[int, int], dict] = {}
        self.dumps = 0

    def add(self, sport, dport=40000, **kw):
        kw.setdefault("rqueue", 50_000)
        kw.setdefault("mem", MEM)
        self.socks[(sport, dport)] = dict(sport=sport, dport=dport, inode=sport, **kw)

    def dump(self, family):
        if family != socket.AF_INET:
            return
        self.dumps += 1
        for seq, kw in enumerate(self.socks.values(), 1):
            raw = diag_msg(seq=seq, **kw)
            yield memoryview(raw), 0, len(raw)


def standing(host, **kw) -> StandingWater:
    sw = StandingWater(**kw)
    sw._dump = host.dump
    sw._owner = lambda ino, held: (1000 + ino, "svc")
    sw._host_namespaces = lambda: {sw._netns: "self"}   # ours alone
    sw._seq = 1
    return sw


def keys(snaps):
    return sorted(s.lport for s in snaps)


def test_steady_sockets_are_reported_once_then_once_a_heartbeat():
    # Given 200 sockets holding water that nothing moves
    host = Host()
    for port in range(10_000, 10_200):
        host.add(port)
    sw = standing(host)
    t0 = 5 * S
    first = sw.scan(t0)
    assert len(first) == 200 and {s.trigger for s in first} == {"standing"}
    quiet = sw.keys
    # When the probe sweeps every second for 130 s and sees no event on them
    lines = {}
    for i in range(1, 131):
        for s in sw.sweep(t0 + i * S, quiet):
            assert s.ts_ns == t0 + i * S
            lines.setdefault(i, []).append(s.lport)
    # Then each is reported again only at the heartbeat (60 s), not at every sweep
    assert HEARTBEAT_S == 60.0
    assert sorted(lines) == [60, 120] and all(len(v) == 200 for v in lines.values())
    assert host.dumps > 10         # the table is still read (every min_gap_s)
    # a 30 s run: 200 lines (the scan), where every sweep used to make 200 x 30 = 6,000


def test_a_change_is_reported_at_the_next_sweep_once():
    host = Host()
    host.add(10_000)
    host.add(10_001)
    sw = standing(host)
    t0 = 0
    sw.scan(t0)
    quiet = sw.keys
    assert sw.sweep(1 * S, quiet) == []
    # unread bytes grow on one (a peer writing into a stuck reader)
    host.add(10_000, rqueue=60_000, mem=(61664,) + MEM[1:])
    (snap,) = sw.sweep(2 * S, quiet)
    assert (snap.lport, snap.unread_bytes, snap.volume, snap.ts_ns) == (10_000, 60_000, 61664,
                                                                        2 * S)
    assert sw.sweep(3 * S, quiet) == []
    # drops, then the peer's FIN (state), then the capacity: each reported once, when it comes
    host.add(10_001, mem=MEM[:8] + (3,))
    assert [(s.lport, s.drops) for s in sw.sweep(4 * S, quiet)] == [(10_001, 3)]
    host.add(10_001, mem=MEM[:8] + (3,), state="CLOSE_WAIT", rqueue=50_001)
    assert [(s.lport, s.tcp_state, s.unread_bytes) for s in sw.sweep(5 * S, quiet)] == [
        (10_001, "CLOSE_WAIT", 50_000)]
    host.add(10_000, rqueue=60_000, mem=(61664, 262144) + MEM[2:])
    assert [(s.lport, s.capacity) for s in sw.sweep(6 * S, quiet)] == [(10_000, 262144)]
    assert sw.sweep(7 * S, quiet) == []
    # and the heartbeat counts from each socket's last report
    assert sw.sweep(64 * S, quiet) == []
    assert keys(sw.sweep(65 * S, quiet)) == [10_001]     # last reported at 5 s
    assert keys(sw.sweep(66 * S, quiet)) == [10_000]     # at 6 s


def test_a_change_between_dumps_waits_for_the_dump():
    host = Host()
    host.add(10_000)
    sw = standing(host, floor_s=10.0)   # a dump at most every 10 s
    sw.scan(0)
    quiet = sw.keys
    host.add(10_000, rqueue=70_000)
    assert sw.sweep(5 * S, quiet) == []                 # the last dump's figures: unchanged
    assert [s.unread_bytes for s in sw.sweep(10 * S, quiet)] == [70_000]


def test_sockets_the_probe_saw_are_its_own_and_quiet_again_are_reported_at_once():
    host = Host()
    host.add(10_000)
    host.add(10_001)
    sw = standing(host)
    sw.scan(0)
    a, b = sorted(sw.keys)
    by_key = {s.sock_key: s.lport for s in sw._standing.values()}
    assert sw.sweep(1 * S, {a}) == []              # b had an event: the probe reports it
    assert sw.sweep(2 * S, {a}) == []
    (again,) = sw.sweep(3 * S, {a, b})             # b quiet again (its entry was evicted)
    assert again.sock_key == b and by_key[b] in (10_000, 10_001)
    assert sw.sweep(4 * S, {a, b}) == []


def test_drained_sockets_are_forgotten_and_reported_at_once_when_water_stands_again():
    host = Host()
    host.add(10_000)
    sw = standing(host)
    sw.scan(0)
    (key,) = sw.keys
    host.add(10_000, rqueue=0)                     # drained: no longer standing
    assert sw.sweep(1 * S, {key}) == [] and sw.keys == frozenset()
    host.add(10_000)                               # the same bytes stand again
    assert keys(sw.sweep(2 * S, {key})) == [10_000]


@pytest.mark.parametrize("heartbeat_s", [5.0, 0.0])
def test_the_heartbeat_is_a_constructor_argument(heartbeat_s):
    host = Host()
    host.add(10_000)
    sw = standing(host, heartbeat_s=heartbeat_s)
    sw.scan(0)
    got = [i for i in range(1, 12) if sw.sweep(i * S, sw.keys)]
    assert got == ([5, 10] if heartbeat_s else list(range(1, 12)))   # 0: every sweep, as before


def test_water_of_names_what_can_change():
    host = Host()
    host.add(10_000)
    (s,) = standing(host).scan(0)
    assert water_of(s) == (0, 51664, 50_000, 131072, 0, 0, "ESTABLISHED")


# -- other network namespaces ----------------------------------------------------------------
POD_NS = 4026532999        # the service's namespace, not ours
ESTABLISHED, CLOSE_WAIT, LISTEN = 1, 8, 10


def row(lport, rport=40000, rx=50_000, state=ESTABLISHED, inode=None, laddr="10.1.0.5",
        raddr="10.1.0.1") -> TcpQueue:
    return TcpQueue(addr16(laddr), lport, addr16(raddr), rport, state, rx,
                    inode if inode is not None else lport)


class Pod:
    """Another namespace, as /proc/PID/net/tcp{,6} of a process in it shows it."""

    def __init__(self, pid=4321, netns=POD_NS):
        self.pid, self.netns = pid, netns
        self.rows: list[TcpQueue] = []
        self.reads = 0
        self.gone = False

    def tables(self, pid):
        assert pid == self.pid
        self.reads += 1
        return None if self.gone else list(self.rows)


class Figures:
    """Borrower stand-in: a socket's own figures, or refused (None)."""

    def __init__(self, refuse=False):
        self.refuse = refuse
        self.asked: list[tuple] = []

    def figures(self, pid, fd, ino):
        self.asked.append((pid, fd, ino))
        return None if self.refuse else SocketFigures(49_000, MEM, 120)

    def release(self):
        pass


def beside(pod: Pod, host=None, refuse=False, held=None, **kw) -> StandingWater:
    """A StandingWater in our namespace (host: its sock_diag dump) beside `pod`; held: inode ->
    pid the pid filter keeps (None: no filter)."""
    host = host or Host()
    sw = standing(host, **kw)
    sw._host_namespaces = lambda: {sw._netns: "self", pod.netns: pod.pid}
    sw._namespaces_of = lambda pids: {pod.netns: pod.pid} if pod.pid in pids else {}
    sw._tables = pod.tables
    sw._borrower = Figures(refuse)
    sw._owners.holder = lambda ino: (pod.pid, 100 + ino)
    if held is not None:
        sw._held_inodes = lambda: held
        sw._held_pids = set(held.values())
    return sw


def test_standing_water_in_another_namespace_has_that_namespaces_key():
    # Given a pod whose service holds water on one connection, a listener with a backlog, a
    # socket whose FIN is its only unread byte, and the same figures in our own namespace
    pod = Pod()
    pod.rows = [row(8080), row(8080, 0, rx=3, state=LISTEN), row(8081, rx=1, state=CLOSE_WAIT),
                row(8082, rx=50_001, state=CLOSE_WAIT)]
    host = Host()
    host.add(9090)
    # When the seed scans with no filter (every namespace)
    sw = beside(pod, host)
    snaps = {s.lport: s for s in sw.scan(7 * S)}
    # Then the pod's sockets holding data are reported with the pod's key, ours with ours
    assert sorted(snaps) == [8080, 8082, 9090]
    a = snaps[8080]
    assert a.sock_key == sock_key(POD_NS, "10.1.0.5", 8080, "10.1.0.1", 40000)
    assert (a.netns, a.laddr, a.raddr, a.trigger, a.tcp_state) == (
        POD_NS, "10.1.0.5", "10.1.0.1", "standing", "ESTABLISHED")
    # the socket's own figures (borrowed from its holder's fd), as sock_diag would say them
    assert (a.unread_bytes, a.volume, a.capacity, a.backlog, a.drops) == (49_000, 51664,
                                                                         131072, 0, 0)
    assert sw.last_arrival_ms[a.sock_key] == 120 and (4321, 100 + 8080, 8080) in \
        sw._borrower.asked
    assert snaps[9090].netns == sw._netns != POD_NS
    assert sw.last_namespaces == 2 and host.dumps == 1


def test_without_the_sockets_own_figures_unread_comes_from_rx_queue():
    pod = Pod()
    pod.rows = [row(8080), row(8082, rx=50_001, state=CLOSE_WAIT)]
    snaps = {s.lport: s for s in beside(pod, refuse=True).scan(0)}
    assert (snaps[8080].unread_bytes, snaps[8080].volume, snaps[8080].capacity) == (50_000, 0, 0)
    assert snaps[8082].unread_bytes == 50_000      # the FIN's sequence number is not data


def test_a_pid_filter_reads_only_the_namespaces_of_its_processes(monkeypatch):
    # Given a service in the pod holding two sockets, one with water, beside another process's
    pod = Pod()
    pod.rows = [row(8080, inode=501), row(8081, inode=502, rx=0), row(7070, inode=777)]
    host = Host()
    host.add(9090)
    fd_tables = []
    monkeypatch.setattr(sockdiag, "socket_inodes",
                        lambda pid: fd_tables.append(pid) or {11: 501, 12: 502})
    sw = beside(pod, host, held={501: 4321, 502: 4321})
    (snap,) = sw.scan(0)
    # Then only its socket is reported, with its fd's figures, and our own namespace, where
    # none of its processes is, is not dumped at all
    assert (snap.lport, snap.pid, snap.comm, snap.ino) == (8080, 1501, "svc", 501)
    assert sw._borrower.asked == [(4321, 11, 501)] and fd_tables == [4321]
    assert host.dumps == 0 and pod.reads == 1 and sw.last_namespaces == 1


def test_the_hosts_namespaces_are_looked_up_at_the_scan_then_now_and_then():
    pod = Pod()
    pod.rows = [row(8080)]
    sw = beside(pod)
    looked = []
    every = sw._host_namespaces
    sw._host_namespaces = lambda: looked.append(1) or every()
    sw.scan(0)
    quiet = sw.keys
    for i in range(1, 130):
        sw.sweep(i * S, quiet)
    assert NAMESPACES_S == 60.0 and len(looked) == 3       # 0, 60 and 120 s
    assert pod.reads == 130                                 # the pod's table: every dump
    # the process it was read through left: looked up again at the next dump
    pod.gone = True
    sw.sweep(130 * S, quiet)
    pod.gone = False
    sw.sweep(131 * S, quiet)
    assert len(looked) == 4 and sw.keys == quiet


def test_a_namespace_read_from_proc_says_what_sock_diag_says():
    # Given a real connection of this process holding 3,000 unread bytes
    srv, cli, acc = held_water()
    key = fd_sock_keys(os.getpid())[acc.fileno()]
    try:
        with StandingWater(pids=frozenset({os.getpid()})) as by_diag:
            (want,) = [s for s in by_diag.scan(time.monotonic_ns())
                       if s.lport == srv.getsockname()[1]]
        # When our namespace is read as another one is: /proc/PID/net/tcp and the fd's figures
        with StandingWater(pids=frozenset({os.getpid()})) as sw:
            sw._netns = 1                  # pretend this is not our namespace
            ours = netns_inode(os.getpid())
            (got,) = [s for s in sw.scan(time.monotonic_ns()) if s.lport == srv.getsockname()[1]]
            if sw._borrower.unsupported:
                pytest.skip("this kernel has no pidfd_getfd (Linux 5.6)")
    finally:
        for s in (cli, acc, srv):
            s.close()
    # Then both say the same of it: its key, its water, its holder
    assert got.sock_key == want.sock_key == key
    assert got.netns == ours
    assert water_of(got) == water_of(want) and got.unread_bytes == 3000
    assert (got.pid, got.comm, got.ino, got.laddr, got.raddr, got.rport) == (
        want.pid, want.comm, want.ino, want.laddr, want.raddr, want.rport)
