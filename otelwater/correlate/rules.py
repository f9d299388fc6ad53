"""The verdict rules: which cause the evidence stamped on a slow read shows, or why none.

A read is **slow** when ``duration >= slow_ns`` or ``queue_delay_ns >= slow_ns`` (``slow_ns``
1 ms by default). Every slow read gets exactly one verdict. The rules are tried in this order;
the first that applies decides (``T`` = ``slow_ns``, ``R`` = ``run_ns``, default ``T``):

1. ``unknown``: the read ends before it starts (a broken record).
2. ``unknown``: it began before otelwater attached (``ts_start_ns < start_ns``, when the
   correlator knows ``start_ns``): its start, and so any park, was not seen.
3. ``unknown``: only when asked (``unknown_on_lost``, empty by default): records of a listed probe
   were lost in a span that overlaps ``[ts_start_ns, ts_end_ns]``. A verdict rests on the
   read's own stamps alone, so by default a loss voids nothing: a delivered read keeps its
   verdict, and a loss only marks the evidence (snapshots) that may have been among the lost
   records as incomplete.
4. The read parked (``parked is True``: it found the queue empty and waited). Its socket's role
   and our sends split the wait (request/response, without payload; ``send`` =
   ``ts_send_ns``, our last send before the arrival that woke it, ``prev`` =
   ``ts_prev_arrival_ns``, the newest arrival before the park; a missing stamp counts as 0):

   - *answered* (an ``accepted`` socket where ``send > start`` — we sent our response during the
     park, so what arrives next is a new request — or ``send >= prev`` — we had answered the
     last request before parking): the peer owed us nothing; the whole wait is idle (a
     client's think time, a server's background read while its handler runs);
   - a ``dialed`` socket with ``start < send <= arrival``: idle until our request went out,
     waiting for the peer from then on (``wait_peer_ns`` counts from the later of the read's
     start and our last send);
   - otherwise (unknown role, or mid-message) all of it is waiting for the peer.

   a. no arrival stamp (``ts_arrival_ns is None``): ``idle`` when answered (``wait_idle_ns`` the
      duration), else ``unknown`` (EOF, a deadline, close or error ended the park, or the arrival
      was not stamped);
   b. arrival more than ``slack_ns`` (default 0) before the start or after the end: ``unknown``
      (the stamps contradict each other); within ``slack_ns`` the arrival is clamped into
      ``[start, end]`` and the reason says so;
   c. otherwise ``wait_idle_ns + wait_peer_ns = arrival - start``, ``wait_run_ns = end -
      arrival`` (they add up to the duration) and the verdict is ``runtime-starved`` when
      ``wait_run_ns >= R`` (data came, the goroutine did not run), else ``peer-starved`` when
      ``wait_peer_ns >= T`` (the peer's own part is slow, however long the read sat idle
      before: a keep-alive client's request after its think time), else ``idle`` when
      ``wait_idle_ns > wait_peer_ns``, else ``peer-starved``.
5. The read did not park (``parked is False``: data was waiting when it came):
   a. ``queue_delay_ns >= T``: ``consumer-lagging`` (its bytes stood in the queue);
   b. no queue-delay stamp: ``unknown``;
   c. a queue delay below ``T`` while the read itself took ``>= T``: ``unknown`` (the time went
      inside the read, e.g. copying or being descheduled in the syscall; the evidence cannot
      say which).
6. Whether it parked is unknown (``parked is None``): ``unknown``, also when a queue delay is
   stamped, because a parked read's bytes also stand in the queue (from arrival to return), so
   ``consumer-lagging`` and ``runtime-starved`` cannot be told apart without the park.

``queue_delay_ns`` is always the read's own stamp (``None`` when not stamped); ``wait_peer_ns``,
``wait_run_ns`` and ``wait_idle_ns`` are set only by rule 4 (4a: ``wait_idle_ns`` alone).
The kernel decides by the same rules where the read ends (``otw_kverdict`` in bpf/goread.h,
without rules 2 and 3 and with ``slack_ns`` 0) and counts every slow read under its verdict, so
metrics stay exact whatever the ring buffer loses; each delivered read carries the kernel's
verdict (``kernel_verdict``) and tests hold the two equal. Snapshots joined to the read are its evidence for a
person to look at; no rule uses them, so a missing snapshot never changes a verdict.
"""

from __future__ import annotations

from otelwater.events.model import ReadRecord
from otelwater.events.verdict import (CONSUMER_LAGGING, IDLE, PEER_STARVED, RUNTIME_STARVED,
                                      UNKNOWN)

# (verdict, reason, wait_peer_ns, wait_run_ns, wait_idle_ns)
Figures = tuple[str, str, "int | None", "int | None", "int | None"]


def ms(ns: int) -> str:
    return f"{ns / 1e6:.3f} ms"


def is_slow(read: ReadRecord, slow_ns: int) -> bool:
    qd = read.queue_delay_ns
    return read.ts_end_ns - read.ts_start_ns >= slow_ns or (qd is not None and qd >= slow_ns)


def answered(read: ReadRecord) -> bool:
    """The peer owed nothing when the read parked: an accepted socket whose response went out
    during the park, or before it, after the last request bytes came."""
    if read.role != "accepted":
        return False
    send = read.ts_send_ns or 0
    return send > read.ts_start_ns or send >= (read.ts_prev_arrival_ns or 0)


def _no_arrival(read: ReadRecord) -> str:
    took = ms(read.ts_end_ns - read.ts_start_ns)
    if read.returned > 0:
        return (f"parked {took} and returned {read.returned} bytes, but the arrival that woke "
                "it was not stamped (its socket outside the water probe's filters?)")
    if read.returned == 0:
        return f"parked {took} until the peer closed the connection (EOF)"
    return (f"parked {took} and ended with error {read.returned} (a deadline or close?): no "
            "data arrived")


def classify(read: ReadRecord, *, slow_ns: int, run_ns: int, slack_ns: int = 0,
             start_ns: int | None = None, lost: str | None = None) -> Figures:
    """The verdict of one read by the rules above; ``lost`` names an overlapping loss that
    voids it (only for probes in ``unknown_on_lost``)."""
    start, end = read.ts_start_ns, read.ts_end_ns
    if end < start:
        return UNKNOWN, f"broken record: ends {ms(start - end)} before it starts", None, None, None
    if start_ns is not None and start < start_ns:
        return (UNKNOWN, f"began {ms(start_ns - start)} before otelwater attached: its start "
                "was not seen", None, None, None)
    if lost is not None:
        return UNKNOWN, lost, None, None, None
    qd = read.queue_delay_ns
    if read.parked is True:
        idle_all = answered(read)
        arrival = read.ts_arrival_ns
        if arrival is None:
            if idle_all:
                return (IDLE, f"parked {ms(end - start)} after answering the peer: it owed "
                        "nothing", None, None, end - start)
            return UNKNOWN, _no_arrival(read), None, None, None
        if arrival < start - slack_ns:
            return (UNKNOWN, f"arrival stamped {ms(start - arrival)} before the read began: "
                    "contradictory stamps", None, None, None)
        if arrival > end + slack_ns:
            return (UNKNOWN, f"arrival stamped {ms(arrival - end)} after the read returned: "
                    "contradictory stamps", None, None, None)
        note = ""
        if arrival < start or arrival > end:
            clamped = min(max(arrival, start), end)
            note = f" (arrival clamped by {abs(clamped - arrival)} ns)"
            arrival = clamped
        wait_run = end - arrival
        send = read.ts_send_ns or 0
        if idle_all:
            wait_idle, wait_peer, since = arrival - start, 0, ""
        elif read.role == "dialed" and start < send <= arrival:
            wait_idle, wait_peer, since = send - start, arrival - send, " from our send"
        else:
            wait_idle, wait_peer, since = 0, arrival - start, ""
        if wait_run >= run_ns:
            return (RUNTIME_STARVED, f"data arrived {ms(wait_idle + wait_peer)} into the park, "
                    f"the read returned {ms(wait_run)} later (>= {ms(run_ns)}){note}",
                    wait_peer, wait_run, wait_idle)
        if wait_peer < slow_ns and wait_idle > wait_peer:
            why = ("after answering the peer: it owed nothing" if idle_all else
                   f"before our request went out, then {ms(wait_peer)} for the peer")
            return (IDLE, f"parked {ms(wait_idle)} {why}{note}", wait_peer, wait_run, wait_idle)
        if since:
            return (PEER_STARVED, f"waited {ms(wait_peer)} from our send for the peer's data "
                    f"(idle {ms(wait_idle)} before it), returned {ms(wait_run)} after it "
                    f"arrived{note}", wait_peer, wait_run, wait_idle)
        return (PEER_STARVED, f"parked {ms(wait_peer)} waiting for the peer's data, returned "
                f"{ms(wait_run)} after it arrived{note}", wait_peer, wait_run, wait_idle)
    if read.parked is False:
        if qd is not None and qd >= slow_ns:
            return (CONSUMER_LAGGING, f"its bytes stood {ms(qd)} in the kernel queue before "
                    "the read took them", None, None, None)
        if qd is None:
            return (UNKNOWN, f"took {ms(end - start)} without parking and carries no "
                    "queue-delay stamp", None, None, None)
        return (UNKNOWN, f"took {ms(end - start)} without parking while its bytes waited only "
                f"{ms(qd)}: the time went inside the read", None, None, None)
    if qd is None:
        return UNKNOWN, "no park or queue-delay stamp on the read", None, None, None
    return (UNKNOWN, f"its bytes stood {ms(qd)} in the queue but whether it parked is not "
            "stamped: consumer-lagging or runtime-starved cannot be told apart", None, None, None)
