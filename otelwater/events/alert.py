"""The alert record: one rule's transition on a socket or a process (made by the alert stage,
otelwater.alerts.stage, where every rule is evaluated). It sits with the other records so that
sinks need nothing above the records to take it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from otelwater.sockkey import format_key


@dataclass(frozen=True, slots=True)
class AlertTransition:
    """A rule changed state on one socket (or, for process-scope read_skew, one process).

    state "fired": the rule is firing now at `severity` (newly, or moved between bands: then
    `previous` names the band it left). state "cleared": it stopped; `severity` is the band it
    left. `threshold` is that band's firing threshold (it clears at clear_fraction times it).
    `reason` is "" when the value crossed, else "close", "idle", "evicted" or "exited".
    """

    ts_ns: int
    sock_key: int         # 0 for a process-scope rule
    pid: int              # 0 when no reader is known yet
    rule: str             # water_level, fill_ratio, surge, read_skew
    state: str            # fired, cleared
    severity: str         # warn, high, avalanche
    value: float
    threshold: float
    previous: str = ""    # band moves: the severity it left
    reason: str = ""      # "", close, idle, evicted
    # read_skew: what it saw (the tail, the baseline, the reads behind it); not compared
    detail: dict | None = dataclasses.field(default=None, compare=False)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["type"] = "alert"
        d["sock_key"] = format_key(self.sock_key)
        if self.detail is None:
            del d["detail"]
        return d
