"""scripts/demo.sh shows what README.md says it shows: one Go service that lags behind its
clients (consumer-lagging) and one Go client that waits on its slow server (peer-starved). It
stops everything it starts (two slowreader servers, their loadgen clients, the watch), however
it ends: at the end of the watch, on SIGTERM, on Ctrl-C (SIGINT to the whole foreground
process group). The demo runs in a session of its own, so every process it starts, even one
orphaned to init, is found by its session id."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import pytest

from .conftest import ROOT

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("bpf_ready")]
DEMO = ROOT / "scripts" / "demo.sh"


def in_session(sid: int) -> dict[int, str]:
    """pid -> command line of every live (non-zombie) process of session `sid`."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
            fields = stat[stat.rindex(")") + 2:].split()
            state, session = fields[0], int(fields[3])
            if session != sid or state == "Z":
                continue
            with open(f"/proc/{name}/cmdline", "rb") as f:
                out[int(name)] = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, ValueError, IndexError):
            continue
    return out


def survivors(sid: int, settle_s: float = 2.0) -> dict[int, str]:
    """What the demo left running (given a moment to exit after their TERM)."""
    end = time.monotonic() + settle_s
    while True:
        left = in_session(sid)
        if not left or time.monotonic() > end:
            return left
        time.sleep(0.1)


@pytest.mark.parametrize("how", ["normal end", "SIGTERM", "Ctrl-C"])
def test_demo_leaves_nothing_running(how):
    if not (ROOT / "examples" / "bin" / "slowreader").is_file():
        pytest.skip("the Go examples are not built: run scripts/setup.sh")
    # Given the demo running with JSON output in a session of its own
    demo = subprocess.Popen([str(DEMO), "--json", "-d", "2" if how == "normal end" else "60"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    sid = demo.pid
    try:
        # When it ends (by itself after 2 s, or by a signal once the watch is running)
        if how != "normal end":
            seen = []
            for line in demo.stderr:
                seen.append(line)
                if line.startswith("Tracing TCP receive queues"):
                    break
            assert seen and seen[-1].startswith("Tracing"), "".join(seen)
            assert in_session(sid), "the demo started nothing?"
            if how == "SIGTERM":
                demo.send_signal(signal.SIGTERM)
            else:  # the terminal sends SIGINT to the whole foreground process group
                os.killpg(sid, signal.SIGINT)
        _, err = demo.communicate(timeout=90)
        # Then nothing it started is left
        left = survivors(sid)
        assert not left, f"still running after the demo ended ({how}): {left}"
        expected = {"normal end": 0, "SIGTERM": 128 + signal.SIGTERM, "Ctrl-C": 128 + signal.SIGINT}
        assert demo.returncode == expected[how], err
    finally:
        for pid in in_session(sid):  # whatever a failing run left (only the demo's own)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if demo.poll() is None:
            demo.kill()
            demo.wait()


def test_demo_shows_a_lagging_service_and_a_client_waiting_on_its_peer():
    if not (ROOT / "examples" / "bin" / "slowreader").is_file():
        pytest.skip("the Go examples are not built: run scripts/setup.sh")
    # When the demo runs for a few seconds with JSON output
    r = subprocess.run([str(DEMO), "--json", "-d", "6"], capture_output=True, text=True,
                       timeout=300, start_new_session=True)
    assert r.returncode == 0, r.stderr
    # Then the process it says lags has consumer-lagging verdicts, and the one it says waits on
    # its server has peer-starved ones: the two cases README.md promises
    said = re.search(r"slowreader pid (\d+) lags .* loadgen pid (\d+) waits on a slow server",
                     r.stderr)
    assert said, r.stderr
    lagging, waiting = int(said[1]), int(said[2])
    verdicts = {}
    for line in r.stdout.splitlines():
        d = json.loads(line)
        if d.get("type") == "verdict":
            verdicts.setdefault(d["pid"], []).append(d["verdict"])
    assert verdicts.get(lagging, []).count("consumer-lagging") > 100, {
        p: len(v) for p, v in verdicts.items()}
    waits = verdicts.get(waiting, [])
    assert waits.count("peer-starved") > 50 and waits.count("peer-starved") > len(waits) / 2, \
        sorted(set(waits))
