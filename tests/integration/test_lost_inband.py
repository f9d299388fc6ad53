"""Losses located in-band, under real ring-buffer loss: real kernel, real Go, loopback.

The water probe alone, one record per event into a one-page ring buffer consumed late: the
snapshots that follow a loss carry it, and with what is still pending the counts are exact.

The watch's probes (the water probe with the tracepoint read sampler compiled into it) run in
the real WatchLoop with one-page ring buffers (about ten read records). examples/slowreader
serves BURST_CONNS idle connections and one busy one: every TRICKLE_MS the busy connection
gets a message (a steady flow of ~20 ms parked reads, which a poll every 100 ms drains without
loss), and every BURST_EVERY_S all idle connections get one at once (BURST_CONNS blocked reads
end within a millisecond or two: the ring buffer overflows).

Then:
- the records that follow a loss carry it: the in-band counts plus what is still pending on a
  CPU at the end add up to the kernel's exact total, and the last lost record's lost_total is
  that total;
- by default no delivered read loses its verdict to a loss (its verdict rests on its own
  stamps; the kernel counted the lost ones);
- where the losses lie still matters (evidence, and users who ask for the old rule,
  unknown_on_lost): the same records correlated twice with that rule, as recorded (located
  losses) and with the losses only as the sweep used to report them (the total at each sweep,
  the 1.1 s rule). Located, far fewer reads are unknown: only those overlapping a burst's
  losses.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from otelwater.correlate import Correlator, CorrelatorConfig
from otelwater.events.model import LostEvents, ReadRecord, WaterSnapshot
from otelwater.pipeline import Stopper, WatchLoop
from otelwater.probes.goread import GoReadOptions, GoReadSampler
from otelwater.probes.kernel import WaterOptions, WaterProbe

from .loopback import Pair
from .slowreader import SlowReader

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("bpf_ready")]

BURST_CONNS = 48
BURST_EVERY_S = 1.0
BURSTS = 4
TRICKLE_MS = 20


def traffic(server: SlowReader, stop: threading.Event) -> None:
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(BURST_CONNS)]
    busy = socket.create_connection(("127.0.0.1", server.port))
    try:
        time.sleep(0.3)
        next_burst = time.monotonic() + 0.5
        bursts = 0
        while not stop.is_set() and bursts < BURSTS:
            busy.sendall(b"t" * 64)
            if time.monotonic() >= next_burst:
                for s in idle:
                    s.sendall(b"b" * 64)
                bursts += 1
                next_burst += BURST_EVERY_S
            time.sleep(TRICKLE_MS / 1000)
        time.sleep(0.3)
    finally:
        for s in idle + [busy]:
            s.close()


def correlate(records: list, start_ns: int, voiding: bool = True) -> dict[str, int]:
    c = Correlator(CorrelatorConfig(unknown_on_lost=("reads",) if voiding else ()),
                   start_ns=start_ns)
    out = c.feed(sorted(records, key=lambda r: getattr(r, "ts_ns", None) or r.ts_end_ns))
    out += c.finish()
    counts: dict[str, int] = {}
    for v in out:
        counts[v.verdict] = counts.get(v.verdict, 0) + 1
    return counts


def test_losses_travel_in_band_and_void_only_the_reads_they_overlap():
    server = SlowReader("-mode", "sink")
    records: list = []
    totals: list[LostEvents] = []     # what the sweep used to say: the totals, at each sweep
    try:
        sampler = GoReadSampler(GoReadOptions(pids=frozenset({server.pid}), embed=True,
                                              ringbuf_pages=1))
        with WaterProbe(WaterOptions(ports=frozenset({server.port}), ringbuf_pages=1),
                        readers=sampler) as probe:
            start_ns = time.monotonic_ns()

            def tick():
                totals.append(LostEvents(time.monotonic_ns(), "reads", sampler.lost_total()))

            stopper = Stopper()
            loop = WatchLoop(probe, records.extend, on_tick=tick, readers=sampler,
                             duration_s=BURSTS * BURST_EVERY_S + 3)
            stop = threading.Event()
            client = threading.Thread(target=traffic, args=(server, stop))
            client.start()
            try:
                waiter = threading.Thread(target=lambda: (client.join(), time.sleep(0.3),
                                                          stopper.event.set()))
                waiter.start()
                loop.run(stopper)     # returns once the traffic is over (or the duration)
            finally:
                stop.set()
                client.join()
                waiter.join()
            total = sampler.lost_total()
            counts = probe._bpf["counts"].getvalue(0)
            pending = sum(int(v.lost_pending) for v in counts)
    finally:
        server.stop()

    reads = [r for r in records if type(r) is ReadRecord]
    lost = [r for r in records if type(r) is LostEvents and r.probe == "reads"]
    # the in-band ones sit just before the read that carried them, at its end
    inband = [r for i, r in enumerate(records) if type(r) is LostEvents and r.probe == "reads"
              and i + 1 < len(records) and type(records[i + 1]) is ReadRecord
              and records[i + 1].ts_end_ns == r.ts_ns]
    print(f"\nreads {len(reads)}  lost {total}  in-band records {len(inband)} carrying "
          f"{sum(r.count for r in inband)}  pending at the end {pending}")
    # Then the ring buffer did overflow, and every loss travelled in-band or is still pending
    assert total >= BURSTS * 10, f"too little loss to test: {total}"
    assert inband and all(r.since_ns <= r.until_ns <= r.ts_ns and r.count for r in inband)
    assert sum(r.count for r in inband) + pending == total
    # lost_total is exact and never goes back
    assert lost[-1].lost_total == total
    assert all(a.lost_total <= b.lost_total for a, b in zip(lost, lost[1:]))
    # located, the spans are short: the burst, and what the full ring buffer turned away
    # until the next poll drained it
    assert max(r.until_ns - r.since_ns for r in inband) < 300_000_000

    # When the same records are correlated with located losses, and with the 1.1 s rule
    located = correlate(records, start_ns)
    others = [r for r in records if type(r) is not LostEvents]
    old_rule = correlate(others + [t for t in totals if t.lost_total], start_ns)
    print(f"verdicts located {located}\nverdicts 1.1 s rule {old_rule}")
    slow = sum(located.values())
    assert slow == sum(old_rule.values()) and slow >= 100
    # Then far fewer reads are unknown: the 1.1 s rule voids nearly all of them
    unknown_located, unknown_old = located.get("unknown", 0), old_rule.get("unknown", 0)
    assert unknown_old >= 0.7 * slow
    assert unknown_located <= 0.4 * unknown_old
    # and by default the losses turn no read unknown at all
    assert correlate(records, start_ns, voiding=False).get("unknown", 0) == 0


def test_water_snapshots_after_a_loss_carry_it():
    # Given a one-page ring buffer, a record for every event, consumed only at the end
    pair = Pair()
    with WaterProbe(WaterOptions(ports=frozenset({pair.port}), follow=True,
                                 ringbuf_pages=1)) as probe:
        pair.connect()
        for i in range(2000):
            pair.client.sendall(b"p" * 64)
            pair.server.recv(64)
            if i == 1000:
                got = probe.poll()      # make room once: later records carry the losses
        got += probe.poll()
        total = probe.lost_total()
        pending = sum(int(v.pending) for v in probe._bpf["lost"].getvalue(0))
        swept = probe.lost_sweep(time.monotonic_ns())
    pair.close()
    # Then each in-band lost record sits just before the snapshot that carried it
    inband = [(r, got[i + 1]) for i, r in enumerate(got) if type(r) is LostEvents]
    assert inband and total > 0
    for lost, snap in inband:
        assert type(snap) is WaterSnapshot and snap.ts_ns == lost.ts_ns
        assert lost.probe == "water" and lost.since_ns <= lost.until_ns <= lost.ts_ns
    # and the counts are exact: carried plus still pending (which the sweep reports) is the
    # kernel's total, and the sweep's record has that total
    assert sum(r.count for r, _ in inband) + pending == total
    assert pending > 0     # the ring buffer filled again after the last poll made room
    assert swept.lost_total == total and swept.count == pending
    assert sum(type(r) is WaterSnapshot for r in got) + total >= 4000
