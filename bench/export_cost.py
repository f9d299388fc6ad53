#!/usr/bin/env python3
"""otelwater's CPU per 1,000 spans and per 1,000 metric points exported over OTLP, beside the
same work with export off, in one run.

    .venv/bin/python bench/export_cost.py [--protocol grpc|http/protobuf] [--spans N]
                                          [--seconds S] [--json OUT]

No root: the records are synthetic but shaped like `watch`'s (a slow read, its verdict with 2
evidence snapshots), and go through the real OtlpSink and the SDK's real OTLP exporter to a
local receiver (tests/integration/otlp_receiver.py) in another process, so only otelwater's
side is counted. CPU is this process's user+system time (time.process_time: every thread, so
the SDK's batch and export threads are included).

  spans   off: build N (read, verdict) records and hand them to nothing.
          on:  the same, written to the sink 500 at a time with 0.3 s between (so the
               queue never overflows), then close(); every span delivered is checked against
               the receiver's count. Cost per 1,000 spans = (on - off) / N * 1,000; the
               write path alone (span, events, histogram with exemplar) is shown beside.
  points  off: S seconds of sleep with the sockets' snapshots held in a dict.
          on:  a sink holding 200 sockets (top 50 with their own series, the rest summed per
               process and port: 60 series a gauge), metrics collected and exported every
               100 ms for S seconds. Cost per 1,000 points = (on - off) / points * 1,000.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from otelwater.events.model import ReadRecord, WaterSnapshot  # noqa: E402
from otelwater.events.verdict import Verdict  # noqa: E402
from otelwater.export.clock import WallClock  # noqa: E402
from otelwater.export.otlp import ExportOptions, Identity, OtlpSink  # noqa: E402

MS = 1_000_000
PID = 4242
PACE = 500


def snap(ts, key, volume=0, lport=8080):
    return WaterSnapshot(ts, key, PID, "svc", PID, 1, "127.0.0.1", lport, "127.0.0.1",
                         40000 + key % 20000, 1, volume, volume // 2, 1 << 17, 0, 0, 0, "",
                         0, 0, "arrival", "ESTABLISHED", 9)


def records(i: int) -> list:
    t = 1_000 * MS + i * 6 * MS
    key = 1 + i % 8
    ev = (snap(t - MS, key, 640), snap(t + 5 * MS, key, 0))
    r = ReadRecord(t, t + 5 * MS, PID, PID + 1, 17 + key, 3, key, 4096, 64,
                   ("internal/poll.(*FD).Read", "net.(*netFD).Read", "net.(*conn).Read",
                    "main.handle", "main.serve"), "tracepoint", "svc", True, t + 4 * MS)
    return [r, Verdict(r, "peer-starved", "waited 4.0ms for the peer", 4 * MS, MS, None, ev,
                       2, True)]


class Receiver:
    def __init__(self, protocol: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.integration.otlp_receiver",
                                      protocol], cwd=ROOT, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.endpoint = json.loads(self.proc.stdout.readline())["endpoint"]

    def counts(self) -> dict:
        self.proc.stdin.close()
        out = json.loads(self.proc.stdout.readline())
        self.proc.wait(10)
        return out


def sink_for(protocol: str, endpoint: str, interval_s: float = 60.0) -> OtlpSink:
    return OtlpSink.for_options(ExportOptions(protocol, endpoint, endpoint),
                                identity=lambda pid: Identity(pid, service_name="bench"),
                                clock=WallClock.measure(), endpoints=None,
                                metric_interval_s=interval_s, out=sys.stderr)


def cpu() -> float:
    return time.process_time()


def spans_cost(protocol: str, n: int) -> dict:
    t0 = cpu()
    for i in range(n):
        batch = records(i)
        del batch
    off = cpu() - t0
    rx = Receiver(protocol)
    sink = sink_for(protocol, rx.endpoint)
    t0, w0 = cpu(), time.monotonic()
    write_s = 0.0
    for i in range(n):
        t = cpu()
        sink.write(records(i))
        write_s += cpu() - t
        if i % PACE == PACE - 1:   # ~1,600 spans a second: below what export keeps up with,
            time.sleep(0.3)        # so none is dropped at the queue (all are counted anyway)
    sink.close(timeout_s=60)
    on, wall = cpu() - t0, time.monotonic() - w0
    got = rx.counts()
    return {"spans": n, "received": got["spans"], "off_cpu_s": off, "on_cpu_s": on,
            "on_write_cpu_s": write_s, "on_wall_s": wall,
            "cpu_ms_per_1000_spans": (on - off) / n * 1e6,
            "write_path_ms_per_1000_spans": (write_s - off) / n * 1e6}


def points_cost(protocol: str, seconds: float) -> dict:
    socks = [snap(MS, k, volume=1000 * k, lport=8000 + k % 10) for k in range(1, 201)]
    t0 = cpu()
    held = {s.sock_key: s for s in socks}
    time.sleep(seconds)
    off = cpu() - t0
    del held
    rx = Receiver(protocol)
    sink = sink_for(protocol, rx.endpoint, interval_s=0.1)
    sink.write([records(0)[0]])         # PID is a traced service
    t0 = cpu()
    sink.write(socks)
    time.sleep(seconds)
    sink.close(timeout_s=30)
    on = cpu() - t0
    got = rx.counts()
    points = sink.health.points_exported
    return {"seconds": seconds, "points": points, "received": got["points"],
            "off_cpu_s": off, "on_cpu_s": on,
            "cpu_ms_per_1000_points": (on - off) / points * 1e6 if points else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--protocol", choices=["grpc", "http/protobuf"], default="grpc")
    ap.add_argument("--spans", type=int, default=10_000)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--json", metavar="OUT")
    a = ap.parse_args()
    s = spans_cost(a.protocol, a.spans)
    p = points_cost(a.protocol, a.seconds)
    print(f"OTLP export cost ({a.protocol}, local receiver in another process), "
          f"{os.cpu_count()} CPUs")
    print(f"{'':10}{'export off':>14}{'export on':>14}{'per 1,000':>14}")
    print(f"{'spans':10}{s['off_cpu_s']:>13.3f}s{s['on_cpu_s']:>13.3f}s"
          f"{s['cpu_ms_per_1000_spans']:>11.1f} ms   ({s['spans']:,} sent, "
          f"{s['received']:,} received; write path alone "
          f"{s['write_path_ms_per_1000_spans']:.1f} ms)")
    print(f"{'points':10}{p['off_cpu_s']:>13.3f}s{p['on_cpu_s']:>13.3f}s"
          f"{p['cpu_ms_per_1000_points'] or 0:>11.1f} ms   ({p['points']:,} exported, "
          f"{p['received']:,} received in {p['seconds']:g} s)")
    if a.json:
        Path(a.json).write_text(json.dumps({"spans": s, "points": p}, indent=1))


if __name__ == "__main__":
    main()
