"""JSON Lines on a stream: one object per record, flushed per batch, keys stable.

Every kind of record has a line (its `to_json()`); `kinds` narrows what is written (correlate
--json writes the analysis's verdicts, alerts and summaries, not the recording back).
"""

from __future__ import annotations

import json
import sys
from typing import IO, Iterable

from otelwater.errors import UsageError
from otelwater.events.records import KIND_NAMES, KINDS, kind_of
from otelwater.export.sink import Sink, writing


def _unwritten(record) -> bool:
    kind_of(record)            # an unknown type is an error, not a skipped line
    return False


def _dumps(record) -> str:
    return json.dumps(record.to_json(), separators=(",", ":"))


class JsonLinesSink(Sink):
    name = "JSON Lines"
    essential = True          # the command's output: a full disk or closed pipe ends the run

    def __init__(self, stream: IO[str] | None = None, kinds: Iterable[str] | None = None):
        self.stream = stream or sys.stdout
        if self.stream is None:      # started with stdout closed (>&-)
            raise UsageError("standard output is closed: nowhere to write the JSON Lines",
                             "redirect it to a file or a pipe (> out.jsonl)")
        chosen = frozenset(KIND_NAMES if kinds is None else kinds)
        if not chosen <= set(KIND_NAMES):
            raise ValueError(f"not record kinds: {sorted(chosen - set(KIND_NAMES))}")
        self._types = frozenset(t for t, k in KINDS.items() if k in chosen)

    def handles(self, kind: str) -> bool:
        return any(KINDS[t] == kind for t in self._types)

    def write(self, records: Iterable) -> None:
        types = self._types
        lines = [_dumps(r) for r in records if type(r) in types or _unwritten(r)]
        if lines:
            lines.append("")
            # a closed pipe ends the CLI quietly; a full disk, a quota, an I/O error: one line
            with writing("the JSON Lines output"):
                self.stream.write("\n".join(lines))
                self.stream.flush()

    # every kind has a line; write() batches them, these serve single records
    def _one(self, record) -> None:
        self.write([record])

    on_snapshot = on_read = on_lost = on_notice = on_process = on_counts = _one
    on_alert = on_verdict = on_summary = _one
