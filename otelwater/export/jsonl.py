"""JSON Lines on a stream: one object per record, flushed per batch, keys stable."""

from __future__ import annotations

import json
import sys
from typing import IO, Iterable


class JsonLinesSink:
    def __init__(self, stream: IO[str] | None = None):
        self.stream = stream or sys.stdout

    def write(self, records: Iterable) -> None:
        w = self.stream.write
        for r in records:
            w(json.dumps(r.to_json(), separators=(",", ":")))
            w("\n")
        self.stream.flush()
