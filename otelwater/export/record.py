"""The recording as a sink: the raw records (before analysis) into a file that
`otelwater correlate` runs through the same analysis later (format: otelwater.events.recording,
docs/recording.md). Essential: a recording that cannot be written ends the run."""

from __future__ import annotations

from otelwater.events.recording import Writer
from otelwater.export.sink import RunInfo, Sink


class RecordingSink(Sink):
    name = "recording"
    essential = True
    # the analysis's records are not kept: correlate decides them again from the raw ones
    ignores = frozenset({"alert", "verdict", "summary"})

    def __init__(self, writer: Writer):
        self.writer = writer

    @property
    def path(self) -> str:
        return self.writer.path

    def start(self, run: RunInfo) -> None:
        cfg = run.config.to_dict() if run.config is not None else None
        self.writer.start(run.start_ns, config=cfg, pids=run.pids)

    def write(self, records: list) -> None:
        self.writer.write(records)

    def _raw(self, record) -> None:
        self.writer.write([record])

    on_snapshot = on_read = on_lost = on_notice = on_process = on_counts = _raw

    def flush(self, timeout_s: float = 5.0) -> bool:
        if self.writer.header is not None:
            self.writer.flush()
        return True

    def close(self, timeout_s: float = 5.0) -> None:
        self.writer.close()        # the end record (nothing when start never ran)
