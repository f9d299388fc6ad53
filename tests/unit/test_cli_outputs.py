"""Outputs that cannot be written are the user's to fix: one line, exit 1, never "internal
error" (a full disk behind stdout, stdout closed); and a cut recording re-exported to a
Collector that is down says both, exiting with the file's code (5), the first cause."""

from __future__ import annotations

import errno
import gzip
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from otelwater.errors import OutputFailed
from otelwater.events.model import WaterSnapshot
from otelwater.export.jsonl import JsonLinesSink
from otelwater.export.sink import RunInfo
from otelwater.pipeline import Pipeline

RECORDING = Path(__file__).resolve().parent.parent / "fixtures" / "recordings" / "mixed.otw.gz"
SNAPSHOT = WaterSnapshot(1, 1, 42, "svc", 42, 1, "127.0.0.1", 8080, "127.0.0.1", 50001, 3,
                         4096, 2000, 1 << 17, 0, 0, 0, "", 0, 0, "arrival", "ESTABLISHED", 9)


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
    what = "the JSON Lines output" if json else "the output"
    assert err == [f"otelwater: cannot write {what}: No space left on device (ENOSPC); free "
                   "space, or send the output elsewhere"], got.stderr
    assert "internal error" not in got.stderr and "Traceback" not in got.stderr


class Unwritable(io.StringIO):
    """A stream whose every write fails with `errno` (a full disk, a closed pipe, ...)."""

    def __init__(self, code: int):
        super().__init__()
        self.code = code

    def write(self, text):
        if self.code == errno.EPIPE:
            raise BrokenPipeError(self.code, os.strerror(self.code))
        raise OSError(self.code, os.strerror(self.code))


def live_view(stream):
    from rich.console import Console

    from otelwater.watch import LiveViewOutput

    return LiveViewOutput(console=Console(file=stream, width=80))


@pytest.mark.parametrize("make", [live_view, lambda stream: JsonLinesSink(stream)],
                         ids=["live view", "json"])
@pytest.mark.parametrize("code,fix", [
    (errno.ENOSPC, "free space, or send the output elsewhere"),
    (errno.EDQUOT, "free space, or send the output elsewhere"),
    (errno.EIO, "send the output elsewhere (another file or a pipe)")])
def test_the_commands_own_output_failing_ends_the_run_with_one_line(make, code, fix):
    # watch's output is essential (the live view as --json): the pipeline stops at its failure
    # (run_watch's with-block then detaches the probes) with one line for the CLI, exit 1
    sink = make(Unwritable(code))
    with pytest.raises(OutputFailed) as e:
        with Pipeline(sinks=[sink]) as pipeline:
            pipeline.start(RunInfo(0, what="all TCP sockets"))
            pipeline.feed([SNAPSHOT])
            pipeline.tick()
    what = "the live view" if make is live_view else "the JSON Lines output"
    name = errno.errorcode[code]
    assert e.value.exit_code == 1
    assert e.value.one_line() == f"cannot write {what}: {os.strerror(code)} ({name}); {fix}"


def test_a_closed_pipe_stays_a_broken_pipe_for_the_cli_to_end_quietly():
    # (the live view's console, rich, ends a closed pipe by itself: SystemExit(1))
    with pytest.raises(BrokenPipeError):
        with Pipeline(sinks=[JsonLinesSink(Unwritable(errno.EPIPE))]) as pipeline:
            pipeline.start(RunInfo(0, what="all TCP sockets"))
            pipeline.feed([SNAPSHOT])
            pipeline.tick()


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


def closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
@pytest.mark.parametrize("dead", ["closed port", "unresolvable name"])
def test_a_dead_endpoint_is_one_line_naming_its_cause(protocol, dead):
    port = closed_port()
    url = (f"http://127.0.0.1:{port}" if dead == "closed port"
           else "http://nonexistent.invalid:4317")
    got = otelwater("correlate", str(RECORDING), "--otlp-endpoint", url, "--otlp-protocol",
                    protocol, env={**os.environ, "OTEL_EXPORTER_OTLP_TIMEOUT": "1"})
    assert got.returncode == 6, got.stderr
    err = lines(got.stderr)
    assert len(err) == 1 and err[0].startswith(f"otelwater: OTLP export to {url} delivered 0 of")
    if dead == "closed port":
        assert f"metric points: connection refused (nothing listens on 127.0.0.1:{port}); " \
               "start the Collector" in err[0]
    else:
        assert "metric points: the host name nonexistent.invalid " in err[0]
        assert "resolve" in err[0] and "; check the host name" in err[0]
    assert err[0].endswith(", then run correlate again")
