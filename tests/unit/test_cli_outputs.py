"""Outputs that cannot be written are the user's to fix: one line, exit 1, never "internal
error" (a full disk behind stdout, stdout closed); and a cut recording re-exported to a
Collector that is down says both, exiting with the file's code (5), the first cause."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import pytest

RECORDING = Path(__file__).resolve().parent.parent / "fixtures" / "recordings" / "mixed.otw.gz"


def otelwater(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "otelwater", *args], capture_output=True,
                          text=True, timeout=120, **kw)


def lines(text: str) -> list[str]:
    return [x for x in text.splitlines() if x.strip()]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full on this system")
@pytest.mark.parametrize("json", [True, False])
def test_a_full_disk_behind_stdout_is_one_line_and_exit_1(json):
    with open("/dev/full", "w") as full:
        got = subprocess.run([sys.executable, "-m", "otelwater", "correlate", str(RECORDING),
                              *(["--json"] if json else [])], stdout=full,
                             stderr=subprocess.PIPE, text=True, timeout=120)
    err = lines(got.stderr)
    assert got.returncode == 1, got.stderr
    assert len(err) == 1 and "No space left on device" in err[0], got.stderr
    assert "internal error" not in got.stderr and "Traceback" not in got.stderr


def test_stdout_closed_is_said_before_any_work():
    # the shell closes it (a preexec_fn could deadlock the fork: other tests leave threads)
    got = subprocess.run(["sh", "-c", 'exec "$0" -m otelwater correlate "$1" --json >&-',
                          sys.executable, str(RECORDING)], capture_output=True, text=True,
                         timeout=120)
    assert got.returncode == 2, got.stderr
    assert lines(got.stderr) == ["otelwater: standard output is closed: nowhere to write the "
                                 "JSON Lines; redirect it to a file or a pipe (> out.jsonl)"]


def test_a_cut_recording_and_a_collector_that_is_down_say_both(tmp_path):
    cut = tmp_path / "cut.otw.gz"
    text = gzip.open(RECORDING, "rt").read().splitlines()
    cut.write_bytes(gzip.compress("\n".join(text[:300]).encode() + b"\n"))
    # a port nothing listens on: the export fails at once (no collector in unit tests)
    got = otelwater("correlate", str(cut), "--otlp-endpoint", "http://127.0.0.1:1",
                    env={**os.environ, "OTEL_EXPORTER_OTLP_TIMEOUT": "1"})
    assert got.returncode == 5, got.stderr
    err = lines(got.stderr)
    assert "cut short" in err[-1]
    assert any("delivered 0 of" in x for x in err[:-1]), got.stderr
    assert "Traceback" not in got.stderr
