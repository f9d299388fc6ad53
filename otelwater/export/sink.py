"""The one interface every output implements: JSON Lines, the live view, the recording, the
report, OTLP, the Prometheus endpoint.

    sink.start(run)              once, when the source is open (run: RunInfo)
    sink.write(records)          a batch in time order; dispatched by kind (on_<kind>)
    sink.tick()                  once a sweep (about a second) while a live run goes on
    sink.flush(timeout_s) -> ok  push out what is buffered, within the time given
    sink.close(timeout_s)        the end: flush, then release; also after a failed start

Records reach a sink by kind (otelwater.events.records): each sink handles or ignores every
kind, checked when its class is defined. The pipeline calls sinks; a sink's failure is counted
and said once, and the run goes on (opentelemetry-python's exporters behave the same way),
except for an *essential* sink, the command's own output (JSON Lines on stdout, the recording
file): its failure (a full disk, a closed pipe) ends the run, as the user would expect.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import ClassVar

from otelwater.errors import OutputFailed
from otelwater.events.records import RecordHandler, kind_of


@contextlib.contextmanager
def writing(what: str):
    """Around an essential sink's writes: a closed pipe stays a BrokenPipeError (the command
    ends quietly), any other OSError (a full disk, a quota, an I/O error) becomes one line,
    OutputFailed naming `what` could not be written and why (exit 1)."""
    try:
        yield
    except BrokenPipeError:
        raise
    except OSError as e:
        raise OutputFailed.writing(what, e) from None


@dataclass(frozen=True)
class RunInfo:
    """What every sink may need to know of the run, at its start."""

    start_ns: int                 # CLOCK_MONOTONIC: reads that began before are not seen whole
    config: object = None         # otelwater.config.Config of the analysis
    pids: tuple[int, ...] = ()    # processes named by the user (to describe at once)
    what: str = ""                # what is watched, in words (the view's title)
    header: object = None         # offline: the input file's Header (host, clock, processes)
    options: dict = field(default_factory=dict)


class Sink(RecordHandler, abstract=True):
    """Base of the outputs. Subclasses define on_<kind> / ignores, and override what they need
    of start/tick/flush/close (all no-ops here)."""

    name: ClassVar[str] = "output"
    essential: ClassVar[bool] = False

    def start(self, run: RunInfo) -> None:
        return None

    def write(self, records: list) -> None:
        self.handle(records)

    def tick(self) -> None:
        return None

    def flush(self, timeout_s: float = 5.0) -> bool:
        return True

    def close(self, timeout_s: float = 5.0) -> None:
        return None


class MemorySink(Sink):
    """Keeps the records of the chosen kinds in a list, in order (for tests and for callers
    that want the records themselves, as opentelemetry-python's InMemorySpanExporter)."""

    name = "memory"

    def __init__(self, kinds=None):
        from otelwater.events.records import KIND_NAMES, KINDS

        chosen = frozenset(KIND_NAMES if kinds is None else kinds)
        self._types = frozenset(t for t, k in KINDS.items() if k in chosen)
        self.records: list = []

    def write(self, records: list) -> None:
        types = self._types
        for r in records:
            if type(r) in types:
                self.records.append(r)
            else:
                kind_of(r)       # an unknown type is an error, not a skipped record

    def _one(self, record) -> None:
        self.write([record])

    on_snapshot = on_read = on_lost = on_notice = on_process = on_counts = _one
    on_alert = on_verdict = on_summary = _one
