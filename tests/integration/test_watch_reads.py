"""The watch's read sampler (the tracepoint sampler compiled into the water probe): each socket
read ends in the water probe's sock:sock_recv_length, with no read(2) tracepoint of its own.

- It attaches nothing to syscalls:sys_enter_read/sys_exit_read (what made a Read cost three
  program hits instead of one), and its reads still come with their socket key.
- A slow read on a socket the water probe's filters leave out still gets that socket's right
  key (taken from the probe's table, which keys every TCP socket it sees) and its park, with no
  queue evidence; the durations agree with the pause the client imposes.
Ground truth: the socket keys of the server's fds computed in user space from /proc
(otelwater.hostsockets.fd_sock_keys, the same hash over /proc/PID/fd and /proc/net/tcp), and
the client's pause between ping-pong messages.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time

import pytest

from otelwater.events.model import ReadRecord
from otelwater.hostsockets import fd_sock_keys
from otelwater.probes.goread import GoReadOptions, GoReadSampler
from otelwater.probes.kernel import WaterOptions, WaterProbe

from .slowreader import SlowReader
from .test_verdicts import LOADGEN

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("bpf_ready")]

MS = 1_000_000
PAUSE_MS = 5
COUNT = 40


def perf_points_of_self() -> set[str]:
    """The tracepoints this process has BPF programs attached to (bpftool perf list)."""
    import os

    out = subprocess.run(["bpftool", "perf", "list", "-j"], capture_output=True, text=True,
                         check=True).stdout
    return {i.get("tracepoint", "") for i in json.loads(out or "[]")
            if i.get("pid") == os.getpid()}


def run_pingpong(tmp_path, water_opts) -> tuple[list[ReadRecord], dict[int, int], set[str]]:
    """Slow-peer ping-pong (COUNT messages, PAUSE_MS apart) under the watch's probe: the read
    records, the server's fd -> socket key while the connection was open, what was attached."""
    server = SlowReader(log=tmp_path / "reads.jsonl")
    records: list[ReadRecord] = []
    keys: dict[int, int] = {}
    try:
        # the server waits for the client's pauses: idle reads, recorded here too
        sampler = GoReadSampler(GoReadOptions(pids=frozenset({server.pid}), embed=True,
                                              include_idle=True))
        with WaterProbe(water_opts(server), readers=sampler) as probe:
            points = perf_points_of_self()
            lg = subprocess.Popen([LOADGEN, "-addr", server.addr, "-size", "64",
                                   "-count", str(COUNT), "-pause", f"{PAUSE_MS}ms"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            stop = threading.Event()

            def learn_keys():
                while not stop.wait(0.05):
                    keys.update(fd_sock_keys(server.pid))

            t = threading.Thread(target=learn_keys, daemon=True)
            t.start()
            while lg.poll() is None:
                probe.poll()
                records += [r for r in sampler.poll() if isinstance(r, ReadRecord)]
                time.sleep(0.02)
            stop.set()
            t.join()
            _out, err = lg.communicate()
            assert lg.returncode == 0, err
            time.sleep(0.2)
            records += [r for r in sampler.poll() if isinstance(r, ReadRecord)]
    finally:
        server.stop()
    return records, keys, points


def _check_slow_reads(records, keys) -> list[ReadRecord]:
    """The parked reads with data, checked; every read with data has its socket's key.

    A Read that finds its message already queued (the server was descheduled longer than the
    client's pause, as on a loaded CI machine) returns without a park: it has the right key
    too. The parked ones waited for the client's pause."""
    got = [r for r in records if r.returned > 0]
    assert keys, "the server's socket was never seen in /proc"
    for r in got:
        assert r.fd in keys, (r.fd, keys)
        assert r.sock_key == keys[r.fd], f"fd {r.fd}: key {r.sock_key:#x} != {keys[r.fd]:#x}"
    slow = [r for r in got if r.parked]
    assert len(slow) >= COUNT * 0.8, f"{len(slow)} slow reads of {COUNT} paused messages"
    durations = sorted(r.ts_end_ns - r.ts_start_ns for r in slow)
    median = durations[len(durations) // 2]
    # each Read waits for the next message: the client's pause, plus loopback and wake-up
    assert PAUSE_MS * MS * 0.8 <= median <= PAUSE_MS * MS * 3, durations
    return slow


def test_no_read_syscall_tracepoints_and_keys_on_watched_sockets(tmp_path):
    records, keys, points = run_pingpong(
        tmp_path, lambda s: WaterOptions(ports=frozenset({s.port}), seed=False))
    assert not {"sys_enter_read", "sys_exit_read"} & points, points
    assert "sock_recv_length" in points, points
    slow = _check_slow_reads(records, keys)
    # the water probe saw each park's socket: the arrival that woke it is stamped
    assert sum(r.ts_arrival_ns is not None for r in slow) >= len(slow) * 0.9


def test_reads_on_a_socket_the_filters_leave_out_keep_their_key(tmp_path):
    # port 9 (discard) is not the server's: the water probe watches none of its sockets
    records, keys, _ = run_pingpong(
        tmp_path, lambda s: WaterOptions(ports=frozenset({9}), seed=False))
    slow = _check_slow_reads(records, keys)
    assert all(r.ts_arrival_ns is None and r.queue_delay_ns is None for r in slow)
