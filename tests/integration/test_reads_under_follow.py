"""Go reads under ring-buffer overload with --follow: real kernel, real Go, loopback.

With --follow the water probe writes a record for every arrival and read; a fast sink keeps
its ring buffer full. The Go read sampler is compiled into the same program with a ring buffer
of its own, which must still be read and sized as asked: every read the sampler counts as
recorded (stats(): blocked + queue_slow) is a ReadRecord delivered, a loss in the reads
probe's lost_total, or not_socket; no read stays in a ring buffer nobody reads.

The load is the tester's: examples/slowreader -mode sink -delay 5ms fed by 3 streaming
examples/loadgen (its reads find data that waited), slowreader -mode echo with 2 ping-pong
loadgens pausing 20 ms (its reads park), and a fast sink fed by a streaming loadgen (the flood
of --follow records).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time

import pytest

from otelwater.events.model import LostEvents, ReadRecord, VerdictCounts
from otelwater.events.recording import Reader
from otelwater.pipeline import Stopper, WatchLoop
from otelwater.probes.goread import GoReadOptions, GoReadSampler
from otelwater.probes.kernel import WaterOptions, WaterProbe

from .conftest import OTELWATER, ROOT
from .slowreader import SlowReader

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("bpf_ready")]

LOADGEN = str(ROOT / "examples" / "bin" / "loadgen")
PAGE = os.sysconf("SC_PAGE_SIZE")
BPF_MAP_TYPE_RINGBUF = 27
RUN_S = 4


@contextlib.contextmanager
def overload():
    """(fast sink, lagging sink, echo server), each fed by its loadgens; all stopped after."""
    servers, clients = [], []
    try:
        fast = SlowReader("-mode", "sink")
        servers.append(fast)
        lag = SlowReader("-mode", "sink", "-delay", "5ms", "-readsize", "4096")
        servers.append(lag)
        echo = SlowReader("-mode", "echo")
        servers.append(echo)
        for addr, args in ((fast.addr, ["-conns", "1", "-size", "16384", "-mode", "stream"]),
                           (lag.addr, ["-conns", "3", "-size", "16384", "-mode", "stream"]),
                           (echo.addr, ["-conns", "2", "-size", "64", "-mode", "pingpong",
                                        "-pause", "20ms"])):
            clients.append(subprocess.Popen([LOADGEN, "-addr", addr, "-duration", "60s", *args],
                                            stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL))
        time.sleep(0.5)   # connected and streaming
        yield fast, lag, echo
    finally:
        for c in clients:
            c.kill()
            c.wait()
        for s in servers:
            s.stop()


def kernel_recorded(records: list) -> int:
    """Slow reads the kernel put on the ring buffer, from its last counts of each key."""
    last = {(c.pid, c.role, c.verdict): c.recorded for c in records
            if type(c) is VerdictCounts}
    return sum(last.values())


def ringbuf_sizes(pid: int) -> list[int]:
    """max_entries (bytes) of every BPF ring buffer process `pid` holds open."""
    sizes = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:bpf-map":
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                info = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        if int(info.get("map_type", -1)) == BPF_MAP_TYPE_RINGBUF:
            sizes.append(int(info["max_entries"]))
    return sorted(sizes)


def test_reads_are_delivered_or_counted_lost_beside_a_flooded_water_ring_buffer():
    # Given the overload, watched with --follow: the water probe's ring buffer two pages, the
    # read sampler's (compiled into the same program) one page, each sized as asked
    with overload() as (fast, lag, echo):
        sampler = GoReadSampler(GoReadOptions(pids=frozenset({lag.pid, echo.pid}), embed=True,
                                              ringbuf_pages=1))
        records: list = []
        with WaterProbe(WaterOptions(pids=frozenset({fast.pid, lag.pid, echo.pid}),
                                     follow=True, ringbuf_pages=2), readers=sampler) as probe:
            assert probe._bpf["events"].max_entries == 2 * PAGE
            assert probe._bpf["read_events"].max_entries == PAGE
            # When the real WatchLoop runs, then both probes stop as `watch` stops them
            stopper = Stopper()
            threading.Timer(RUN_S, stopper.event.set).start()
            WatchLoop(probe, records.extend, readers=sampler).run(stopper)
            water_end = probe.stop()
            reads_end = sampler.stop()
            records += water_end + reads_end
            st = sampler.stats()
            time.sleep(0.2)
            assert sampler.stats() == st, "the sampler still counts after stop()"
            water_lost = probe.lost_total()

    reads = [r for r in records if type(r) is ReadRecord]
    lost = [r for r in records if type(r) is LostEvents and r.probe == "reads"]
    # what the kernel put on the ring buffer: its counts (idle reads and what the token
    # buckets cut are counted, not recorded)
    recorded = kernel_recorded(records)
    print(f"\nreads recorded {recorded} (blocked {st.blocked}, queue-slow {st.queue_slow}), "
          f"delivered {len(reads)}, lost {st.lost}, not a socket {st.not_socket}; "
          f"water records lost {water_lost}")
    # Then the water probe's ring buffer did overflow, and reads still came through
    assert water_lost > 1000, "too little water loss to test"
    assert recorded >= 100 and len(reads) >= 100
    # both kinds were made (parked echo reads, lagging reads with queue delay); which of them
    # win the one-page ring is a race, so only the lagging reads, by far the most, must show
    assert st.blocked > 0 and st.queue_slow > 0
    assert any(r.queue_delay_ns for r in reads)
    # and every read counted was delivered or counted as lost, in the exact total
    assert len(reads) + st.lost + st.not_socket == recorded
    assert (lost[-1].lost_total if lost else 0) == st.lost


def test_record_follow_tiny_ring_buffers_keeps_every_read(tmp_path):
    # Given the overload, recorded as the tester did: --follow, one-page ring buffers
    out = tmp_path / "run.otw"
    with overload() as (fast, lag, echo):
        proc = subprocess.Popen(
            OTELWATER + ["record", "-o", str(out), "-p", str(fast.pid), "-p", str(lag.pid),
                         "-p", str(echo.pid), "--go-pid", str(lag.pid), "--go-pid", str(echo.pid),
                         "--follow", "--ringbuf-pages", "1", "-d", str(RUN_S)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT)
        line = proc.stderr.readline()
        assert line.startswith("Tracing TCP receive queues"), line + proc.stderr.read()
        # Then --ringbuf-pages sizes both ring buffers (the water probe's, the reads')
        sizes = ringbuf_sizes(proc.pid)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert sizes == [PAGE, PAGE], sizes
    with Reader(str(out)) as r:
        records = list(r)
    recorded = kernel_recorded(records)
    reads = [r for r in records if type(r) is ReadRecord]
    lost = [r for r in records if type(r) is LostEvents and r.probe == "reads"]
    water_lost = [r for r in records if type(r) is LostEvents and r.probe == "water"]
    print(f"\nreads counted {recorded}, recorded {len(reads)}, "
          f"lost {lost[-1].lost_total if lost else 0}; "
          f"water lost {water_lost[-1].lost_total if water_lost else 0}")
    # and with the water ring buffer overflowing, the reads are in the recording, and every
    # read the sampler counted is recorded or in the lost total (slowreader reads sockets
    # only: none is not_socket)
    assert water_lost and water_lost[-1].lost_total > 1000
    assert recorded >= 100 and len(reads) >= 100
    assert len(reads) + (lost[-1].lost_total if lost else 0) == recorded
