"""The example programs: a short loadgen ping-pong against slowreader, built by every toolchain,
leaves one ground-truth record per conn.Read with sane values. No root needed."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections import defaultdict
from pathlib import Path

import pytest

from tests.goexamples import NOT_BUILT
from tests.goexamples import toolchains as _toolchains


CONNS, COUNT, SIZE = 3, 200, 64


@pytest.mark.parametrize("version", sorted(_toolchains()) or ["examples-not-built"])
def test_pingpong_leaves_one_record_per_read(tmp_path, version):
    paths = _toolchains().get(version)
    if not paths or not all(Path(p).is_file() for p in paths.values()):
        pytest.fail(NOT_BUILT)
    log = tmp_path / "reads.jsonl"

    # given slowreader echoing with 64-byte reads and a 100 µs pause after each
    t_before = time.monotonic_ns()
    server = subprocess.Popen(
        [paths["slowreader"], "-readsize", str(SIZE), "-mode", "echo", "-delay", "100us", "-log", str(log)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        hello = json.loads(server.stdout.readline())
        assert hello["pid"] == server.pid and hello["listening"].startswith("127.0.0.1:")

        # when loadgen runs a ping-pong on 3 connections
        gen = subprocess.run(
            [paths["loadgen"], "-addr", hello["listening"], "-conns", str(CONNS), "-size", str(SIZE),
             "-mode", "pingpong", "-count", str(COUNT)],
            capture_output=True, text=True, timeout=60,
        )
        assert gen.returncode == 0, gen.stderr
        summary = json.loads(gen.stdout)
        assert summary["messages"] == CONNS * COUNT
        assert summary["bytes_sent"] == summary["bytes_received"] == CONNS * COUNT * SIZE
        time.sleep(0.2)  # let the server read the EOFs
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=10) == 0
    t_after = time.monotonic_ns()

    # then each connection has COUNT full reads and one EOF, on one goroutine and one fd
    records = [json.loads(line) for line in log.read_text().splitlines()]
    by_conn = defaultdict(list)
    for r in records:
        by_conn[r["remote"]].append(r)
        assert r["requested"] == SIZE and 0 <= r["returned"] <= SIZE
        assert t_before <= r["start_ns"] <= r["end_ns"] <= t_after  # CLOCK_MONOTONIC, as Python's
        assert r["duration_ns"] == r["end_ns"] - r["start_ns"]
        assert r["fd"] >= 3 and r["goid"] > 0
    assert len(by_conn) == CONNS
    for reads in by_conn.values():
        assert len(reads) == COUNT + 1
        assert [r["returned"] for r in reads] == [SIZE] * COUNT + [0]
        assert [r["err"] for r in reads] == [None] * COUNT + ["EOF"]
        assert len({r["goid"] for r in reads}) == len({r["fd"] for r in reads}) == 1
        assert all(a["end_ns"] <= b["start_ns"] for a, b in zip(reads, reads[1:]))
    assert len({reads[0]["goid"] for reads in by_conn.values()}) == CONNS
