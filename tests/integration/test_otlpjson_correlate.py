"""`otelwater correlate` of the OTLP JSON a Collector's file exporter writes gives the same
verdicts as of the recording: real probes, real Go, a real OTLP/HTTP connection.

examples/slowreader (OTEL_SERVICE_NAME=checkout) is watched with `watch --record F
--otlp-endpoint ... --otlp-protocol http/protobuf` while examples/loadgen ping-pongs 64-byte
messages 5 ms apart (every server Read parks ~5 ms: slow reads). The test's HTTP receiver
writes every request it gets as the Collector's file exporter would: one line per request,
the OTLP/JSON of the ExportTraceServiceRequest (protobuf's JSON mapping, compact, ids as hex),
metrics requests too, in the order they arrived. Then `correlate OTLPFILE --json` and
`correlate F --json` must give the same verdict records for the same reads (matched by pid,
goroutine, fd and start).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import threading

import pytest
from google.protobuf import json_format

from .conftest import OTELWATER, ROOT
from .otlp_receiver import HttpReceiver, Received

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("bpf_ready")]

BIN = ROOT / "examples" / "bin"
FAST = {"OTEL_BSP_SCHEDULE_DELAY": "200", "OTEL_METRIC_EXPORT_INTERVAL": "500"}


def collector_line(request) -> str:
    """An Export*ServiceRequest as one line of the Collector's file exporter: OTLP/JSON
    (lowerCamelCase, int64 as strings, enums as integers), trace and span ids as hex."""
    d = json_format.MessageToDict(request, use_integers_for_enums=True)
    for rs in d.get("resourceSpans", []):
        for ss in rs.get("scopeSpans", []):
            for span in ss.get("spans", []):
                for k in ("traceId", "spanId", "parentSpanId"):
                    if k in span:
                        span[k] = base64.b64decode(span[k]).hex()
    return json.dumps(d, separators=(",", ":"))


class FileExporter(Received):
    """What the receiver gets, also written to a file as the Collector's file exporter does."""

    def __init__(self, path):
        super().__init__()
        self.f = open(path, "w")
        self.write_lock = threading.Lock()

    def _write(self, req):
        with self.write_lock:
            self.f.write(collector_line(req) + "\n")
            self.f.flush()

    def add_traces(self, req):
        self._write(req)
        super().add_traces(req)

    def add_metrics(self, req):
        self._write(req)
        super().add_metrics(req)


def otelwater(*args) -> subprocess.CompletedProcess:
    return subprocess.run(OTELWATER + list(args), capture_output=True, text=True, cwd=ROOT,
                          timeout=120)


def verdicts(stdout: str) -> dict[tuple, dict]:
    out = {}
    for line in stdout.splitlines():
        d = json.loads(line)
        if d["type"] == "verdict":
            key = (d["pid"], d["goid"], d["fd"], d["ts_start_ns"])
            assert key not in out, key
            out[key] = d
    return out


def test_correlate_of_the_collectors_otlp_json_equals_correlate_of_the_recording(tmp_path):
    # Given slowreader named "checkout", a receiver writing OTLP JSON lines, and watch
    # recording and exporting at once
    otlp_file, rec = tmp_path / "traces.jsonl", tmp_path / "run.otw"
    receiver = HttpReceiver()
    receiver.got = FileExporter(otlp_file)
    receiver.start()
    server = subprocess.Popen([str(BIN / "slowreader"), "-readsize", "64"],
                              stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "OTEL_SERVICE_NAME": "checkout"})
    try:
        hello = json.loads(server.stdout.readline())
        pid = hello["pid"]
        w = subprocess.Popen(
            [*OTELWATER, "watch", "-p", str(pid), "--go-pid", str(pid), "--json", "-d", "5",
             "--include-idle",   # its echo waits for the client's pauses: idle reads
             "-i", "0.5", "--record", str(rec), "--otlp-endpoint", receiver.endpoint,
             "--otlp-protocol", "http/protobuf"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
            env={**os.environ, **FAST})
        first = w.stderr.readline()
        assert first.startswith("Tracing TCP receive queues"), first + w.stderr.read()
        # When a client pauses 5 ms between 64-byte messages (every Read waits for the peer)
        lg = subprocess.Popen([str(BIN / "loadgen"), "-addr", hello["listening"], "-conns",
                               "2", "-count", "300", "-pause", "5ms", "-size", "64", "-mode",
                               "pingpong"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
        assert lg.wait(timeout=30) == 0, lg.stderr.read()
        live_out, err = w.communicate(timeout=60)
        assert w.returncode == 0, err
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=10)
        receiver.stop()
        receiver.got.f.close()
    lines = otlp_file.read_text().splitlines()
    kinds = {next(iter(json.loads(x))) for x in lines if x != "{}"}
    assert kinds == {"resourceSpans", "resourceMetrics"}, kinds   # metrics lines are skipped

    # Then correlate gives, from the OTLP JSON, the verdicts it gives from the recording
    from_rec = otelwater("correlate", str(rec), "--json")
    from_otlp = otelwater("correlate", str(otlp_file), "--json")
    assert from_rec.returncode == 0, from_rec.stderr
    assert from_otlp.returncode == 0, from_otlp.stderr
    a, b = verdicts(from_rec.stdout), verdicts(from_otlp.stdout)
    assert len(a) >= 500, f"only {len(a)} slow reads: the load did not run?"
    assert set(b) == set(a)
    differ = [k for k in a if a[k] != b[k]]
    assert not differ, (a[differ[0]], b[differ[0]])   # verdict, figures, evidence: all equal
    # a client with think time: the server's reads parked after its answer and the next
    # message came (idle: kept with --include-idle, in the spans' resources too); on a loaded
    # machine some rightly wait over 1 ms to run after it (runtime-starved), so the parked
    # verdicts together are the check, with idle the majority
    kinds = [v["verdict"] for v in b.values()]
    parked = kinds.count("idle") + kinds.count("runtime-starved")
    assert parked >= 0.9 * len(b) and kinds.count("idle") > len(b) / 2, kinds
    # the service identity came from the spans' resource
    last = json.loads(from_otlp.stdout.splitlines()[-1])
    assert last["type"] == "correlation" and last["complete"] is True
    assert last["processes"][str(pid)]["service_name"] == "checkout"
    assert last["verdicts"] == json.loads(from_rec.stdout.splitlines()[-1])["verdicts"]
    # and the report reads it too
    rep = otelwater("correlate", str(otlp_file))
    assert rep.returncode == 0, rep.stderr
    assert "Slow reads:" in rep.stdout and "checkout" in rep.stdout
    print(f"{len(b)} verdicts equal from {len(lines)} OTLP JSON lines and the recording")


def test_a_cut_otlp_json_file_gives_the_results_before_the_cut_then_exit_5(tmp_path):
    # Given an OTLP JSON file whose last line was cut (written by the unit tests' encoder)
    import sys

    sys.path.insert(0, str(ROOT / "tests" / "unit"))
    from test_otlpjson import hand_line

    p = tmp_path / "cut.jsonl"
    p.write_text(hand_line() + "\n" + hand_line(start_ns="5")[:-30])
    # When correlate reads it
    r = otelwater("correlate", str(p), "--json")
    # Then the verdict before the cut is printed, then one line naming the file and line
    assert r.returncode == 5, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    assert [json.loads(x)["type"] for x in r.stdout.splitlines()].count("verdict") == 1
    err = r.stderr.strip().splitlines()
    assert err == [f"otelwater: {p}: line 2: the file ends inside this line: cut short; "
                   "the results cover the lines before it (was the file still being "
                   "written?)"], r.stderr
