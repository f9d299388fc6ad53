"""The kernel water probe against ground truth on real loopback sockets (root, real BPF)."""

from __future__ import annotations

import os
import socket
import time

import pytest

from otelwater.hostsockets import fd_sock_keys
from otelwater.probes.kernel import WaterOptions, WaterProbe

from .conftest import gone, prog_ids_of
from .loopback import Pair, ss

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("bpf_ready")]


def server_key(pair: Pair) -> int:
    return fd_sock_keys(os.getpid())[pair.server.fileno()]


def latest(snaps, key):
    mine = [s for s in snaps if s.sock_key == key]
    assert mine, f"no snapshot for socket {key:016x} among {len(snaps)}"
    return mine[-1]


def test_still_queue_equals_ss_and_siocinq():
    # Given a reader that read once and then stopped, while the peer kept writing
    pair = Pair()
    with WaterProbe(WaterOptions(ports=frozenset({pair.port}))) as probe:
        pair.connect()
        pair.client.sendall(b"hello")
        assert pair.server.recv(5) == b"hello"
        pair.fill(300_000, chunk=7000)
        # When the queue is still
        inq = pair.wait_still()
        truth = ss(pair.port, pair.client_port)
        snaps = probe.poll() + probe.sweep(all_sockets=True)
    pair.close()
    # Then the last snapshot equals what the kernel reports through two other interfaces.
    # No tolerance: nothing moves once the queue is still, and all three read the same fields.
    key = next(s.sock_key for s in snaps if s.lport == pair.port and s.rport == pair.client_port)
    snap = latest(snaps, key)
    assert inq > 0
    assert snap.unread_bytes == inq == truth.recv_q
    assert snap.volume == truth.r
    assert snap.capacity == truth.rb
    assert snap.drops == truth.d
    assert snap.pid == os.getpid()
    assert snap.level >= 1


def test_socket_key_matches_user_space_definition():
    pair = Pair()
    with WaterProbe(WaterOptions(ports=frozenset({pair.port}))) as probe:
        pair.connect()
        pair.fill(100_000)
        pair.wait_still()
        keys = {s.sock_key for s in probe.sweep(all_sockets=True) if s.lport == pair.port}
        expected = server_key(pair)
    pair.close()
    assert keys == {expected}


def test_ipv6_socket_is_keyed_like_proc():
    pair = Pair(family=socket.AF_INET6)
    with WaterProbe(WaterOptions(ports=frozenset({pair.port}))) as probe:
        pair.connect()
        pair.fill(50_000)
        pair.wait_still()
        snaps = [s for s in probe.sweep(all_sockets=True) if s.lport == pair.port]
        expected = server_key(pair)
    pair.close()
    assert [s.sock_key for s in snaps] == [expected]
    assert snaps[0].laddr == "::1"


def test_overflow_drops_match_kernel_counter():
    # Given a reader with a tiny receive buffer, shrunk after the handshake so the peer still
    # sends into the window it was promised
    pair = Pair()
    with WaterProbe(WaterOptions(ports=frozenset({pair.port}))) as probe:
        pair.connect()
        pair.server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        # When the peer floods it
        pair.fill(2_000_000, chunk=16384)
        time.sleep(1.0)
        pair.wait_still()
        truth = ss(pair.port, pair.client_port)
        snaps = probe.poll() + probe.sweep(all_sockets=True)
    pair.close()
    mine = [s for s in snaps if s.lport == pair.port]
    snap = mine[-1]
    # Then the drops otelwater reports are the kernel's own counter, and it saw them happen
    assert truth.d > 0, "the kernel dropped nothing: the scenario did not overflow"
    assert snap.drops == truth.d
    overflow = [s for s in mine if s.trigger == "overflow"]
    assert overflow and overflow[0].drop_reason
    assert snap.drop_events >= 1
    assert snap.fill_ratio >= 0.9


def test_water_left_at_close():
    pair = Pair()
    with WaterProbe(WaterOptions(ports=frozenset({pair.port}))) as probe:
        pair.connect()
        pair.fill(40_000, chunk=4000)
        inq = pair.wait_still()
        key = server_key(pair)
        pair.server.close()
        time.sleep(0.2)
        closes = [s for s in probe.poll() if s.trigger == "close" and s.sock_key == key]
    pair.close()
    assert inq == 40_000
    assert len(closes) == 1
    assert closes[0].unread_bytes == inq


def test_port_filter_excludes_other_sockets():
    watched, other = Pair(), Pair()
    with WaterProbe(WaterOptions(ports=frozenset({watched.port}))) as probe:
        watched.connect(), other.connect()
        watched.fill(80_000), other.fill(80_000)
        watched.wait_still(), other.wait_still()
        snaps = probe.poll() + probe.sweep(all_sockets=True)
    ports = {s.lport for s in snaps} | {s.rport for s in snaps}
    assert watched.port in ports
    assert other.port not in ports
    watched.close(), other.close()


def test_pid_filter_excludes_other_processes():
    import multiprocessing as mp

    # Given a child process that holds a connection with standing water, and one of ours
    ready, done = mp.Event(), mp.Event()
    q = mp.Queue()

    def child():
        p = Pair().connect()
        p.fill(60_000)
        q.put((os.getpid(), p.port))
        ready.set()
        done.wait(20)

    proc = mp.get_context("fork").Process(target=child)
    proc.start()
    ready.wait(10)
    child_pid, child_port = q.get(timeout=5)
    mine = Pair()
    try:
        with WaterProbe(WaterOptions(pids=frozenset({child_pid}))) as probe:
            mine.connect()
            mine.fill(60_000)
            mine.wait_still()
            # the child's socket has no event after start: one more write makes one
            time.sleep(0.3)
            probe.refresh_filters()
            snaps = probe.poll() + probe.sweep(all_sockets=True)
    finally:
        done.set()
        proc.join(5)
        mine.close()
    ports = {s.lport for s in snaps}
    assert mine.port not in ports
    assert all(s.pid in (0, child_pid) for s in snaps)


def test_tiny_ring_buffer_counts_lost_records():
    # Given a one-page ring buffer and a record for every event, consumed late
    pair = Pair()
    with WaterProbe(WaterOptions(ports=frozenset({pair.port}), follow=True,
                                 ringbuf_pages=1)) as probe:
        pair.connect()
        for _ in range(2000):
            pair.client.sendall(b"p" * 64)
            pair.server.recv(64)
        lost = probe.lost_total()
        got = probe.poll()
    pair.close()
    # Then what did not fit is counted, and what fit was delivered
    assert lost > 0
    assert len(got) > 0
    assert len(got) + lost >= 4000  # one arrival and one read per message


def test_close_detaches_every_program():
    before = prog_ids_of()
    probe = WaterProbe()
    ours = prog_ids_of() - before
    assert len(ours) >= 6
    probe.close()
    assert prog_ids_of() == before
    assert gone(ours)


def test_water_level_rule_fires_for_trickled_messages():
    """When can `level > 100` fire, given TCP coalescing (docs/design.md)? Small messages spaced
    a couple of milliseconds apart stay one skb each (see README, alert rules)."""
    from otelwater.alerts.rules import AlertRules

    pair = Pair(rcvbuf=4 * 1024 * 1024)
    rules = AlertRules()
    with WaterProbe(WaterOptions(ports=frozenset({pair.port}))) as probe:
        pair.connect()
        pair.client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(400):
            pair.client.send(b"m" * 10)
            time.sleep(0.002)
        pair.wait_still()
        snap = [s for s in probe.sweep(all_sockets=True) if s.lport == pair.port][-1]
    pair.close()
    assert snap.level > 100
    fired = rules.update(snap.sock_key, snap.level, snap.volume, snap.capacity)
    assert ("water_level", "fired") in [(r, w) for r, w, _ in fired]


def test_a_sweep_read_batch_by_batch_equals_one_key_at_a_time(monkeypatch):
    # Given 12 connections whose servers' ends hold water, and batches of 5 entries: the sweep
    # reads the socket table in several syscalls, streaming each batch's rows into the sweep
    import otelwater.probes.kernel as K

    monkeypatch.setattr(K, "BATCH", 5)
    pairs = [Pair() for _ in range(12)]
    with WaterProbe(WaterOptions(ports=frozenset(p.port for p in pairs))) as probe:
        for p in pairs:
            p.connect()
            p.client.sendall(b"x" * 100)
        for p in pairs:
            p.wait_still()
        batched = {s.sock_key: s for s in probe.sweep(all_sockets=True)}
        count = probe.socket_count
        # When the same table is read one key at a time (the path for kernels without batch
        # lookups)
        probe._batch = False
        one_by_one = {s.sock_key: s for s in probe.sweep(all_sockets=True)}
        ours = {server_key(p) for p in pairs}
    for p in pairs:
        p.close()
    # Then both give every socket, with the same water (other processes' sockets on these
    # ports may come and go between the two sweeps: only ours are compared)
    assert ours <= batched.keys() and ours <= one_by_one.keys()
    assert count >= 12 and probe.socket_count >= 12     # more than two batches
    assert all(batched[k].unread_bytes == one_by_one[k].unread_bytes == 100 for k in ours)


CGROUP2 = "/sys/fs/cgroup/unified"

READER_IN_CGROUP = """
import socket, sys
l = socket.create_server(("127.0.0.1", 0))
print(l.getsockname()[1], flush=True)
sys.stdin.readline()                  # moved into its cgroup by now
s, _ = l.accept()
s.recv(10)                            # one read, then never again: the rest stands
print("read", flush=True)
sys.stdin.read()
"""


@pytest.mark.skipif(not os.path.exists(f"{CGROUP2}/cgroup.procs"),
                    reason=f"no cgroup v2 hierarchy at {CGROUP2}")
def test_a_cgroup_filter_takes_the_cgroups_below_it():
    # Given a process in a cgroup two levels below the one given (as a pod's container is
    # below its pod), reading a socket once and then no more
    import subprocess
    import sys
    import uuid

    top = f"{CGROUP2}/otelwater-test-{uuid.uuid4().hex[:8]}"
    leaf = f"{top}/container"
    os.mkdir(top)
    os.mkdir(leaf)
    child = subprocess.Popen([sys.executable, "-c", READER_IN_CGROUP], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    mine = Pair()
    try:
        port = int(child.stdout.readline())
        with open(f"{leaf}/cgroup.procs", "w") as f:
            f.write(str(child.pid))
        # When the probe watches the top cgroup's sockets and the reader reads, then stands
        with WaterProbe(WaterOptions(cgroups=frozenset({top}))) as probe:
            child.stdin.write("go\n")
            child.stdin.flush()
            with socket.create_connection(("127.0.0.1", port)) as c:
                c.sendall(b"x" * 10)
                assert child.stdout.readline().strip() == "read"
                c.sendall(b"y" * 40_000)
                mine.connect()                      # this process's own water: not in it
                mine.client.sendall(b"z" * 500)
                mine.server.recv(100)
                mine.client.sendall(b"z" * 30_000)
                mine.wait_still()
                time.sleep(0.3)
                snaps = probe.poll() + probe.sweep(all_sockets=True)
    finally:
        child.kill()
        child.wait()
        mine.close()
        os.rmdir(leaf)
        os.rmdir(top)
    # Then the reader's socket is watched, with its water, and this process's is not
    theirs = [s for s in snaps if s.lport == port and s.pid == child.pid]
    assert theirs and theirs[-1].unread_bytes == 40_000
    assert not [s for s in snaps if s.lport == mine.port]
