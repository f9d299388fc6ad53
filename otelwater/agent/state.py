"""What the agent knows about itself, shared by its loop (the only writer), its HTTP endpoint
(/healthz, /readyz) and its self-metrics (readers). Plain counters: one writer thread, readers
take a consistent-enough view without locks (ints are replaced atomically in CPython)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class AgentState:
    started_ns: int = field(default_factory=time.monotonic_ns)
    ready: bool = False                 # probes attached and the first sweep done
    stopping: bool = False              # SIGTERM seen: flushing and detaching
    last_loop_ns: int = 0               # monotonic ns of the loop's last round (liveness)
    # processes
    processes_traced: int = 0           # traced now (a gauge)
    processes_started: int = 0          # ever picked up (a counter)
    processes_exited: int = 0           # forgotten after they exited (a counter)
    processes_failed: int = 0           # could not be traced (a counter): unreadable binary...
    failures_by_reason: dict = field(default_factory=dict)   # reason -> count
    # records
    records_seen: int = 0               # delivered by the probes' ring buffers
    records_lost: int = 0               # counted lost by the kernel (ring buffer full)
    queue_drops: int = 0                # spans the export queues dropped (oldest first)
    export_failures: int = 0            # sink/exporter failures counted by the pipeline
    sockets_watched: int = 0            # sockets the kernel holds (a gauge)
    unknown_reads: int = 0              # reads of processes the maps do not hold yet

    def fail(self, reason: str) -> None:
        self.processes_failed += 1
        self.failures_by_reason[reason] = self.failures_by_reason.get(reason, 0) + 1

    def alive(self, stale_s: float = 10.0) -> bool:
        """The loop went round within stale_s (or has not started yet)."""
        if not self.last_loop_ns:
            return True
        return time.monotonic_ns() - self.last_loop_ns < stale_s * 1e9
