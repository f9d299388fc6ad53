"""The verdict record: why one slow read was slow, with its figures and evidence.

Made by the correlator (``otelwater.correlate``), one per slow read. The rules that choose
``verdict`` are in ``otelwater.correlate.rules``. Integer nanoseconds of CLOCK_MONOTONIC,
``None`` (JSON null) where a figure does not apply or is not known.
"""

from __future__ import annotations

from dataclasses import dataclass

from otelwater.events.model import ReadRecord, WaterSnapshot

PEER_STARVED = "peer-starved"
RUNTIME_STARVED = "runtime-starved"
CONSUMER_LAGGING = "consumer-lagging"
UNKNOWN = "unknown"
IDLE = "idle"               # the peer owed nothing while the read waited: not a slow read unless
                            # asked for (the correlator's include_idle)
VERDICTS = (PEER_STARVED, RUNTIME_STARVED, CONSUMER_LAGGING, UNKNOWN, IDLE)


@dataclass(frozen=True, slots=True)
class Verdict:
    """One slow read, the cause the evidence shows, and that evidence."""

    read: ReadRecord
    verdict: str                        # one of VERDICTS
    reason: str                         # one line: the figures behind the verdict, or why unknown
    wait_peer_ns: int | None            # parked: start -> first arrival (waiting for the peer)
    wait_run_ns: int | None             # parked: first arrival -> return (waiting to run)
    queue_delay_ns: int | None          # the read's own stamp: its oldest byte's time in the queue
    evidence: tuple[WaterSnapshot, ...] = ()  # joined snapshots, the nearest ones, in time order
    evidence_total: int = 0             # snapshots that joined (before keeping the nearest)
    evidence_complete: bool = True      # False: some joining snapshots may be missing (late,
                                        # lost or pruned records); the verdict does not use them
    wait_idle_ns: int | None = None     # parked: the part of the wait the peer owed nothing
                                        # (before our request went out, or after our response)

    @property
    def sock_key(self) -> int:
        return self.read.sock_key

    def to_json(self) -> dict:
        d = self.read.to_json()         # the read's own fields, flat, so export only translates
        d["type"] = "verdict"
        d["verdict"] = self.verdict
        d["reason"] = self.reason
        d["wait_peer_ns"] = self.wait_peer_ns
        d["wait_run_ns"] = self.wait_run_ns
        d["wait_idle_ns"] = self.wait_idle_ns
        d["queue_delay_ns"] = self.queue_delay_ns
        d["evidence"] = [s.to_json() for s in self.evidence]
        d["evidence_total"] = self.evidence_total
        d["evidence_complete"] = self.evidence_complete
        return d
