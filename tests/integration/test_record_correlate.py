"""`watch --record`, `record` and `correlate` end to end: real probes, real Go, loopback.

examples/slowreader is watched (its sockets and its Go reads) while examples/loadgen sends it
64-byte ping-pong messages 5 ms apart, so every server Read parks ~5 ms: slow reads with
verdicts. The recording made beside the live `watch --json` must give, offline, the very same
verdict records, read for read (same records in the same order through the same analysis).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from otelwater.events.model import VerdictCounts

from .conftest import OTELWATER, ROOT
from .slowreader import SlowReader

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("bpf_ready")]

ENV = dict(os.environ, PYTHONPATH=str(ROOT))
BIN = ROOT / "examples" / "bin"


def Server() -> SlowReader:
    return SlowReader("-readsize", "64")


def loadgen(addr: str, conns: int, count: int, pause: str = "5ms") -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "loadgen"), "-addr", addr, "-conns", str(conns),
                             "-count", str(count), "-pause", pause, "-size", "64",
                             "-mode", "pingpong"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def start(*args) -> subprocess.Popen:
    """An otelwater command, once its probes are attached and the recording has begun."""
    p = subprocess.Popen(OTELWATER + list(args), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    first = p.stderr.readline()
    assert first.startswith("Tracing TCP receive queues"), first + p.stderr.read()
    second = p.stderr.readline()
    assert second.startswith("Recording to "), second + p.stderr.read()
    return p


def otelwater(*args) -> subprocess.CompletedProcess:
    return subprocess.run(OTELWATER + list(args), capture_output=True, text=True, env=ENV,
                          cwd=ROOT, timeout=120)


def of_type(text: str, kind: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        d = json.loads(line)
        if d["type"] == kind:
            out.append(d)
    return out


@pytest.fixture(scope="module")
def live_and_recorded(tmp_path_factory):
    """`watch --json --record F` over ~600 parking reads: (live stdout, F)."""
    path = tmp_path_factory.mktemp("rec") / "slow.otw"
    server = Server()
    try:
        # (the echo server's reads wait for the client's pauses: idle, recorded when asked)
        w = start("watch", "-p", str(server.pid), "--go-pid", str(server.pid), "--json",
                  "--record", str(path), "-d", "5", "-i", "0.5", "--include-idle")
        lg = loadgen(server.addr, conns=2, count=300)
        assert lg.wait(timeout=30) == 0, lg.stderr.read()
        out, err = w.communicate(timeout=60)
        assert w.returncode == 0, err
        assert f"to {path}; `otelwater correlate {path}`" in err
    finally:
        server.stop()
    return out, path


def test_offline_verdicts_equal_the_live_ones_read_for_read(live_and_recorded):
    # Given the live verdicts and the recording made beside them
    live, path = live_and_recorded
    # When the recording is correlated offline
    r = otelwater("correlate", str(path), "--json")
    # Then every verdict record is the same, in the same order, evidence and figures included
    assert r.returncode == 0, r.stderr
    live_v, off_v = of_type(live, "verdict"), of_type(r.stdout, "verdict")
    assert len(live_v) >= 500, f"only {len(live_v)} slow reads: the load did not run?"
    assert off_v == live_v
    # a client with think time: every Read parks after the answer went out, idle (some, on a
    # loaded machine, rightly runtime-starved), on the sockets the server accepted
    idle = sum(v["verdict"] == "idle" for v in off_v)
    parked = idle + sum(v["verdict"] == "runtime-starved" for v in off_v)
    assert parked >= 0.9 * len(off_v) and idle > len(off_v) / 2, \
        f"{idle} idle, {parked} parked of {len(off_v)}"
    assert {v["role"] for v in off_v} == {"accepted"}
    # and so are the alerts, and the summaries (in any order: a summary moves up when its
    # read is decided, and live the loop decides reads at each sweep, offline at the next
    # record)
    assert of_type(r.stdout, "alert") == of_type(live, "alert")
    for kind in ("socket_summary", "reader_summary"):
        def key(d):
            return json.dumps(d, sort_keys=True)

        assert sorted(of_type(r.stdout, kind), key=key) == sorted(of_type(live, kind),
                                                                   key=key), kind
    last = json.loads(r.stdout.splitlines()[-1])
    assert last["type"] == "correlation" and last["complete"] is True
    assert last["records"]["read"] == len(of_type(live, "read"))
    assert last["records"]["snapshot"] == len(of_type(live, "snapshot"))


def test_reexported_metric_points_carry_the_recordings_times(tmp_path):
    # Given a recording of a lagging consumer (slowreader sleeps 5 ms after each 4 KiB Read
    # while loadgen streams at it: standing water, consumer-lagging reads) ...
    from otelwater.events.recording import Reader

    from .otlp_receiver import GrpcReceiver, attrs

    path = tmp_path / "lag.otw"
    server = subprocess.Popen([str(BIN / "slowreader"), "-delay", "5ms", "-mode", "sink"],
                              stdout=subprocess.PIPE, text=True)
    try:
        hello = json.loads(server.stdout.readline())
        rec = start("record", "-o", str(path), "-p", str(hello["pid"]), "--go-pid",
                    str(hello["pid"]), "-d", "5", "-i", "0.5")
        lg = subprocess.Popen([str(BIN / "loadgen"), "-addr", hello["listening"], "-mode",
                               "stream", "-size", "4096", "-duration", "4s"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert lg.wait(timeout=30) == 0, lg.stderr.read()
        _, err = rec.communicate(timeout=60)
        assert rec.returncode == 0, err
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=10)
    reader = Reader(str(path))
    head, first = reader.header, reader.header.start_ns
    kernel: dict = {}       # the kernel's last counts of each (pid, role, verdict)
    for r in reader:
        first = min(first, getattr(r, "ts_start_ns", None) or getattr(r, "ts_ns", first))
        if type(r) is VerdictCounts:
            kernel[(r.pid, r.role, r.verdict)] = r
    lo, hi = head.wall_ns(first), head.wall_ns(reader.end["ts_ns"])
    # ... and an OTLP receiver
    receiver = GrpcReceiver().start()
    try:
        # When correlate re-exports the recording there
        before = time.time_ns()
        r = otelwater("correlate", str(path), "--otlp-endpoint", receiver.endpoint)
        assert r.returncode == 0, r.stderr
        got = receiver.got
        spans = got.spans()
        names = {m.name for req in got.metrics for rm in req.resource_metrics
                 for sm in rm.scope_metrics for m in sm.metrics}
    finally:
        receiver.stop()
    # Then every metric point lies within the recording, none at the export ...
    points = [(name, p) for name in names for _, _, p in got.metric(name)]
    times = sorted({p.time_unix_nano for _, p in points})
    assert lo <= times[0] and times[-1] <= hi < before, (times[0] - lo, hi - times[-1])
    print(f"{len(points)} points at {len(times)} times over the recording's "
          f"{(hi - lo) / 1e9:.1f} s, the last {(before - times[-1]) / 1e9:.1f} s before the "
          f"export began; {len(spans)} spans")
    # ... a time series of the water (a point a second at most while it changes), under the
    # traced service, as live
    vol = [(p.time_unix_nano, p.as_int)
           for res, _, p in got.metric("otelwater.socket.water.volume")
           if res["service.name"] == "slowreader" and p.as_int > 0]
    assert len({t for t, _ in vol}) >= 3, vol
    assert times[-1] - times[0] >= 3_000_000_000
    # counters from the recording's start: the verdicts are the kernel's exact counts (every
    # slow read, recorded in full or cut by the per-socket share), the recorded ones are the
    # spans, and the histogram's exemplars name received spans
    starts = {p.start_time_unix_nano for name, p in points
              if name in ("otelwater.read.verdicts", "otelwater.read.duration")}
    assert starts == {head.wall_ns(head.start_ns)}
    last: dict = {}
    for res, _, p in got.metric("otelwater.read.verdicts"):
        key = (res["service.name"], tuple(sorted(attrs(p.attributes).items())))
        last[key] = max(last.get(key, (0, 0)), (p.time_unix_nano, p.as_int))
    assert sum(v for _, v in last.values()) == sum(c.reads for c in kernel.values())
    assert sum(c.recorded for c in kernel.values()) == len(spans) >= 50
    ids = {(s.trace_id, s.span_id) for _, s in spans}
    ex = [(e.trace_id, e.span_id) for _, _, p in got.metric("otelwater.read.duration")
          for e in p.exemplars]
    assert ex and set(ex) <= ids


def test_the_report_and_the_plot(live_and_recorded, tmp_path):
    _, path = live_and_recorded
    png = tmp_path / "water.png"
    r = otelwater("correlate", str(path), "--plot", str(png))
    assert r.returncode == 0, r.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    lines = r.stdout.splitlines()
    assert max(map(len, lines)) <= 80
    assert any(x.startswith("Slow reads:") for x in lines)
    assert any(x.split()[:1] == ["peer-starved"] for x in lines)
    assert "main." in r.stdout           # the caller of net.(*conn).Read, from the stacks
    assert "slowreader" in r.stdout      # the process, from the header


def test_kill_9_while_recording_leaves_a_file_correlate_reads_up_to_the_cut(tmp_path):
    # Given `otelwater record` running over a steady stream of parking reads
    path = tmp_path / "killed.otw"
    server = Server()
    try:
        rec = start("record", "-o", str(path), "-p", str(server.pid), "--go-pid",
                    str(server.pid), "-i", "0.5", "--include-idle")
        lg = loadgen(server.addr, conns=2, count=2000)
        time.sleep(3)
        # When it is killed with SIGKILL (no chance to write its end)
        killed_ns = time.monotonic_ns()
        rec.send_signal(signal.SIGKILL)
        rec.wait(timeout=10)
        lg.kill()
        lg.wait()
    finally:
        server.stop()
    # Then correlate prints the results up to the cut, then one line naming the record, exit 5
    r = otelwater("correlate", str(path))
    assert r.returncode == 5, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"otelwater: {path}: record "), r.stderr
    assert "cut short" in err[0]
    assert "CUT SHORT at record" in r.stdout
    j = otelwater("correlate", str(path), "--json")
    assert j.returncode == 5
    verdicts = of_type(j.stdout, "verdict")
    assert len(verdicts) >= 200, len(verdicts)
    last = json.loads(j.stdout.splitlines()[-1])
    assert last["complete"] is False and last["broken_at_record"] > 200
    # and at most about a second was lost: the last read in the file ended shortly before
    last_read_ns = max(v["ts_end_ns"] for v in verdicts)
    print(f"kill -9: {len(verdicts)} verdicts; the last read in the file ended "
          f"{(killed_ns - last_read_ns) / 1e6:.0f} ms before the kill")
    assert killed_ns - last_read_ns < 1_200_000_000, (killed_ns - last_read_ns) / 1e9
