"""The verdict rules: which cause the evidence stamped on a slow read shows, or why none.

A read is **slow** when ``duration >= slow_ns`` or ``queue_delay_ns >= slow_ns`` (``slow_ns``
1 ms by default). Every slow read gets exactly one verdict. The rules are tried in this order;
the first that applies decides (``T`` = ``slow_ns``, ``R`` = ``run_ns``, default ``T``):

1. ``unknown``: the read ends before it starts (a broken record).
2. ``unknown``: it began before otelwater attached (``ts_start_ns < start_ns``, when the
   correlator knows ``start_ns``): its start, and so any park, was not seen.
3. ``unknown``: records of the read sampler were lost in a span that overlaps
   ``[ts_start_ns, ts_end_ns]`` (a ``lost`` record of probe ``reads``: located by the kernel on
   the next record it delivered, or for older recordings the 1.1 s before a rise of
   ``lost_total``; otelwater.correlate.join says how spans are kept). Which probes
   count is configurable (``unknown_on_lost``); losses on the other probes only mark the
   evidence incomplete.
4. The read parked (``parked is True``: it found the queue empty and waited):
   a. no arrival stamp (``ts_arrival_ns is None``): ``unknown`` (its data never came while it
      waited: a deadline, close or error ends such a park);
   b. arrival more than ``slack_ns`` (default 0) before the start or after the end: ``unknown``
      (the stamps contradict each other); within ``slack_ns`` the arrival is clamped into
      ``[start, end]`` and the reason says so;
   c. otherwise ``wait_peer_ns = arrival - start``, ``wait_run_ns = end - arrival`` (they add
      up to the duration) and the verdict is ``runtime-starved`` when ``wait_run_ns >= R``
      (data came, the goroutine did not run), else ``peer-starved``.
5. The read did not park (``parked is False``: data was waiting when it came):
   a. ``queue_delay_ns >= T``: ``consumer-lagging`` (its bytes stood in the queue);
   b. no queue-delay stamp: ``unknown``;
   c. a queue delay below ``T`` while the read itself took ``>= T``: ``unknown`` (the time went
      inside the read, e.g. copying or being descheduled in the syscall; the evidence cannot
      say which).
6. Whether it parked is unknown (``parked is None``): ``unknown``, also when a queue delay is
   stamped, because a parked read's bytes also stand in the queue (from arrival to return), so
   ``consumer-lagging`` and ``runtime-starved`` cannot be told apart without the park.

``queue_delay_ns`` is always the read's own stamp (``None`` when not stamped); ``wait_peer_ns``
and ``wait_run_ns`` are set only by rule 4c. Snapshots joined to the read are its evidence for a
person to look at; no rule uses them, so a missing snapshot never changes a verdict.
"""

from __future__ import annotations

from otelwater.events.model import ReadRecord
from otelwater.events.verdict import CONSUMER_LAGGING, PEER_STARVED, RUNTIME_STARVED, UNKNOWN

# (verdict, reason, wait_peer_ns, wait_run_ns)
Figures = tuple[str, str, "int | None", "int | None"]


def ms(ns: int) -> str:
    return f"{ns / 1e6:.3f} ms"


def is_slow(read: ReadRecord, slow_ns: int) -> bool:
    qd = read.queue_delay_ns
    return read.ts_end_ns - read.ts_start_ns >= slow_ns or (qd is not None and qd >= slow_ns)


def classify(read: ReadRecord, *, slow_ns: int, run_ns: int, slack_ns: int = 0,
             start_ns: int | None = None, lost: str | None = None) -> Figures:
    """The verdict of one read by the rules above; ``lost`` names an overlapping loss."""
    start, end = read.ts_start_ns, read.ts_end_ns
    if end < start:
        return UNKNOWN, f"broken record: ends {ms(start - end)} before it starts", None, None
    if start_ns is not None and start < start_ns:
        return (UNKNOWN, f"began {ms(start_ns - start)} before otelwater attached: its start "
                "was not seen", None, None)
    if lost is not None:
        return UNKNOWN, lost, None, None
    qd = read.queue_delay_ns
    if read.parked is True:
        arrival = read.ts_arrival_ns
        if arrival is None:
            return (UNKNOWN, f"parked {ms(end - start)} and no data arrived on its socket "
                    "while it waited (deadline, close or error?)", None, None)
        if arrival < start - slack_ns:
            return (UNKNOWN, f"arrival stamped {ms(start - arrival)} before the read began: "
                    "contradictory stamps", None, None)
        if arrival > end + slack_ns:
            return (UNKNOWN, f"arrival stamped {ms(arrival - end)} after the read returned: "
                    "contradictory stamps", None, None)
        note = ""
        if arrival < start or arrival > end:
            clamped = min(max(arrival, start), end)
            note = f" (arrival clamped by {abs(clamped - arrival)} ns)"
            arrival = clamped
        wait_peer, wait_run = arrival - start, end - arrival
        if wait_run >= run_ns:
            return (RUNTIME_STARVED, f"data arrived {ms(wait_peer)} into the park, the read "
                    f"returned {ms(wait_run)} later (>= {ms(run_ns)}){note}", wait_peer, wait_run)
        return (PEER_STARVED, f"parked {ms(wait_peer)} waiting for the peer's data, returned "
                f"{ms(wait_run)} after it arrived{note}", wait_peer, wait_run)
    if read.parked is False:
        if qd is not None and qd >= slow_ns:
            return (CONSUMER_LAGGING, f"its bytes stood {ms(qd)} in the kernel queue before "
                    "the read took them", None, None)
        if qd is None:
            return (UNKNOWN, f"took {ms(end - start)} without parking and carries no "
                    "queue-delay stamp", None, None)
        return (UNKNOWN, f"took {ms(end - start)} without parking while its bytes waited only "
                f"{ms(qd)}: the time went inside the read", None, None)
    if qd is None:
        return UNKNOWN, "no park or queue-delay stamp on the read", None, None
    return (UNKNOWN, f"its bytes stood {ms(qd)} in the queue but whether it parked is not "
            "stamped: consumer-lagging or runtime-starved cannot be told apart", None, None)
