"""The example Go server (examples/bin/slowreader) as the integration tests run it: started with
its flags, its address and pid from its first line, stopped with SIGTERM (it then flushes its
log of every Read and exits 0)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

from .conftest import ROOT

SLOWREADER = str(ROOT / "examples" / "bin" / "slowreader")


class SlowReader:
    """slowreader `args`; with `log`, each Read it makes is logged there (reads()); `env` is
    added to this process's environment (e.g. OTEL_SERVICE_NAME); `binary`, another build."""

    def __init__(self, *args: str, log: Path | None = None, env: dict | None = None,
                 binary: str = SLOWREADER):
        self.log = log
        self.proc = subprocess.Popen([binary, *(["-log", str(log)] if log else []), *args],
                                     stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})})
        hello = json.loads(self.proc.stdout.readline())
        self.addr, self.pid = hello["listening"], hello["pid"]
        self.port = int(self.addr.rsplit(":", 1)[1])
        assert self.pid == self.proc.pid

    def stop(self) -> int:
        """SIGTERM; its exit code (0: it stopped cleanly and flushed its log)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=10)

    def reads(self) -> list[dict]:
        return [json.loads(line) for line in self.log.read_text().splitlines()]
