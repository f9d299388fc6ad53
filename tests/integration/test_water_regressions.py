"""Regressions found by trying otelwater as a new user (root, real BPF, real sockets):
socket keys under --pid, the peer's FIN taken for unread water, a second close record after a
reset, and a --follow consumer held forever by a producer faster than it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from otelwater.hostsockets import fd_sock_keys
from otelwater.probes.kernel import WaterOptions, WaterProbe

from .conftest import OTELWATER, ROOT
from .loopback import Pair, siocinq

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("bpf_ready")]

ECHO_SERVER = textwrap.dedent("""
    import socket, sys, threading
    ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen(64)
    print(ls.getsockname()[1], flush=True)
    def serve(c):
        while True:
            b = c.recv(4096)
            if not b:
                return
            c.sendall(b)
    while True:
        c, _ = ls.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()
""")


@pytest.fixture
def echo_server():
    p = subprocess.Popen([sys.executable, "-c", ECHO_SERVER], stdout=subprocess.PIPE, text=True)
    port = int(p.stdout.readline())
    yield p, port
    p.kill()
    p.wait()


def test_pid_filter_keys_connections_opened_after_start(echo_server):
    # Given a watch on one server process, started before any client connects
    server, port = echo_server
    with WaterProbe(WaterOptions(pids=frozenset({server.pid}), follow=True)) as probe:
        time.sleep(0.2)
        # When four clients connect afterwards and ping-pong 64 B messages
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
        for _ in range(20):
            for c in clients:
                c.sendall(b"x" * 64)
                assert len(c.recv(64)) > 0
        time.sleep(0.1)
        want = set(fd_sock_keys(server.pid).values())
        client_ports = {c.getsockname()[1] for c in clients}
        snaps = probe.poll() + probe.sweep(all_sockets=True)
        for c in clients:
            c.close()
        time.sleep(0.2)
        closes = [s for s in probe.poll() if s.trigger == "close"]
    # Then every snapshot carries the server socket's real key, as /proc computes it
    assert snaps
    keys = {s.sock_key for s in snaps}
    assert 0 not in keys
    assert keys <= want, f"keys {sorted(map(hex, keys - want))} are not the server's sockets"
    assert len(keys & want) == 4
    # and the clients' sockets (another process) are not reported, not even at their close
    assert not [s for s in snaps + closes if s.lport in client_ports]


def test_fin_is_not_unread_water_at_close():
    # Given a reader that read everything, then the peer closes first (its FIN arrives)
    pair = Pair().connect()
    with WaterProbe(WaterOptions(ports=frozenset({pair.port}), follow=True)) as probe:
        pair.client.sendall(b"ping")
        assert pair.server.recv(4) == b"ping"
        pair.client.close()
        time.sleep(0.1)
        assert siocinq(pair.server) == 0       # SIOCINQ does not count the FIN
        # When the owner closes without reading the EOF
        pair.server.close()
        time.sleep(0.1)
        snaps = probe.poll() + probe.sweep()
    closes = [s for s in snaps if s.trigger == "close" and s.lport == pair.port]
    # Then its close says nothing was left unread
    assert closes, "no close record for the server socket"
    assert all(s.unread_bytes == 0 for s in closes), closes
    pair.close()


def test_water_left_at_close_still_counts_payload_with_fin():
    # Given 1000 unread bytes and the peer's FIN behind them
    pair = Pair().connect()
    with WaterProbe(WaterOptions(ports=frozenset({pair.port}))) as probe:
        pair.client.sendall(b"d" * 1000)
        pair.client.close()
        time.sleep(0.1)
        assert siocinq(pair.server) == 1000
        pair.server.close()
        time.sleep(0.1)
        snaps = probe.poll()
    closes = [s for s in snaps if s.trigger == "close" and s.lport == pair.port]
    assert [s.unread_bytes for s in closes] == [1000]
    pair.close()


def test_one_close_record_after_a_reset():
    # Given a server holding unread data when its peer resets the connection
    pair = Pair().connect()
    with WaterProbe(WaterOptions(ports=frozenset({pair.port}))) as probe:
        pair.client.sendall(b"d" * 500)
        time.sleep(0.05)
        pair.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                               b"\x01\x00\x00\x00\x00\x00\x00\x00")  # l_onoff=1, l_linger=0
        pair.client.close()                    # RST
        time.sleep(0.1)
        # When the server closes its socket afterwards
        pair.server.close()
        time.sleep(0.1)
        snaps = probe.poll()
    closes = [s for s in snaps if s.trigger == "close" and pair.port in (s.lport, s.rport)]
    server_closes = [s for s in closes if s.rport != pair.port]
    # Then one close record for the server's socket, with its real ports
    assert len(server_closes) == 1, closes
    assert not [s for s in closes if s.lport == 0], closes
    pair.close()


def test_a_read_after_the_close_takes_no_ghost_socket_in():
    # Given a server holding unread data when its peer resets the connection: the reset
    # closes the server's socket and releases its port (a user found the ghost in a watch)
    pair = Pair().connect()
    with WaterProbe(WaterOptions(seed=False)) as probe:
        pair.client.sendall(b"d" * 500)
        time.sleep(0.05)
        pair.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                               b"\x01\x00\x00\x00\x00\x00\x00\x00")  # l_onoff=1, l_linger=0
        pair.client.close()                    # RST
        time.sleep(0.1)
        # When the server reads after the reset, then closes
        try:
            pair.server.recv(4096)
        except ConnectionResetError:
            pass
        pair.server.close()
        time.sleep(0.1)
        snaps = probe.poll() + probe.sweep()
    # Then no record names a socket with local port 0 (one that never was)
    assert not [s for s in snaps if s.lport == 0], [s for s in snaps if s.lport == 0]
    assert [s for s in snaps if s.trigger == "close" and s.lport == pair.port], snaps
    pair.close()


def test_poll_is_bounded_while_a_producer_outpaces_it():
    # Given a follow watch on a socket pair flooded with small writes from another thread
    pair = Pair().connect()
    stop = threading.Event()

    def flood():
        pair.client.setblocking(False)
        while not stop.is_set():
            try:
                pair.client.send(b"r" * 16)
            except BlockingIOError:
                pass
            try:
                pair.server.recv(65536, socket.MSG_DONTWAIT)
            except BlockingIOError:
                pass

    with WaterProbe(WaterOptions(ports=frozenset({pair.port}), follow=True, seed=False)) \
            as probe:
        t = threading.Thread(target=flood, daemon=True)
        t.start()
        try:
            time.sleep(0.3)
            # When one poll is asked for at most 100 records
            out = probe.poll(max_records=100)
            # Then it returns with 100 and says more are waiting
            assert len(out) == 100
            assert probe.backlogged
        finally:
            stop.set()
            t.join()
    pair.close()


def test_follow_under_load_keeps_output_signals_and_duration_on_schedule(tmp_path):
    # Given a flood of arrivals on one port (writer and reader in another process)
    flood = textwrap.dedent("""
        import socket, sys, time
        ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen(8)
        print(ls.getsockname()[1], flush=True)
        cs = [socket.create_connection(ls.getsockname()) for _ in range(8)]
        ss = [ls.accept()[0] for _ in cs]
        for s in cs + ss: s.setblocking(False)
        end = time.monotonic() + 60
        while time.monotonic() < end:
            for c, s in zip(cs, ss):
                try: c.send(b"x" * 16)
                except BlockingIOError: pass
                try: s.recv(65536)
                except BlockingIOError: pass
    """)
    load = subprocess.Popen([sys.executable, "-c", flood], stdout=subprocess.PIPE, text=True)
    try:
        port = int(load.stdout.readline())
        out = open(tmp_path / "out.jsonl", "w")
        # When watch --follow runs with -d 3
        w = subprocess.Popen(OTELWATER + ["watch", "-P", str(port), "--follow", "--json",
                                          "-d", "3", "-i", "0.5"],
                             stdout=out, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        assert w.stderr.readline().startswith("Tracing")   # attached: the 3 s start now
        t0 = time.monotonic()
        time.sleep(1.0)
        # Then records are already written while it runs
        assert os.path.getsize(tmp_path / "out.jsonl") > 0
        # and it ends on time, with the load still running
        w.wait(timeout=8)
        took = time.monotonic() - t0
        assert w.returncode == 0, w.stderr.read()
        assert took < 10, f"-d 3 took {took:.1f} s after attaching (the load lasts 60 s)"
        lines = (tmp_path / "out.jsonl").read_text().splitlines()
        types = {json.loads(ln)["type"] for ln in lines}
        assert "snapshot" in types
        # And SIGINT stops a run without -d promptly under the same load
        w2 = subprocess.Popen(OTELWATER + ["watch", "-P", str(port), "--follow", "--json"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              cwd=ROOT)
        assert w2.stderr.readline().startswith("Tracing")
        time.sleep(1.0)
        t1 = time.monotonic()
        w2.send_signal(signal.SIGINT)
        w2.wait(timeout=5)
        assert time.monotonic() - t1 < 6   # (the load lasts 60 s)
        assert w2.returncode == 0, w2.stderr.read()
    finally:
        load.kill()
        load.wait()


def test_watch_reports_a_stuck_socket_at_once_and_again_only_when_it_changes():
    # Given a socket holding 50 KB that nobody reads and nothing moves, before the watch
    pair = Pair().connect()
    pair.client.sendall(b"s" * 50_000)
    inq = pair.wait_still()
    assert inq == 50_000
    key = fd_sock_keys(os.getpid())[pair.server.fileno()]
    try:
        # When otelwater watches its port for 2.5 s with 0.5 s sweeps
        out = subprocess.run(OTELWATER + ["watch", "-P", str(pair.port), "--json", "-d", "2.5",
                                          "-i", "0.5"], capture_output=True, text=True,
                             cwd=ROOT, timeout=60)
        assert out.returncode == 0, out.stderr
        recs = [json.loads(ln) for ln in out.stdout.splitlines()]
        standing = [r for r in recs if r.get("trigger") == "standing"]
        # Then the first record says so, with SIOCINQ's bytes and the socket's real key
        first = next(r for r in recs if r["type"] == "snapshot")
        assert first["trigger"] == "standing"
        assert first["sock_key"] == f"{key:016x}" and first["unread_bytes"] == inq
        # and not again while nothing moves (a change, or the 60 s heartbeat, would say it
        # again: 2,000 idle sockets re-reported every sweep made 196 MB of JSON in 30 s)
        assert len([r for r in standing if r["sock_key"] == f"{key:016x}"]) == 1
    finally:
        pair.close()
