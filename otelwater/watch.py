"""`otelwater watch`: the kernel probe (and optionally a Go read sampler) into the live view or
JSON Lines."""

from __future__ import annotations

import sys

from otelwater.events.model import LostEvents, WaterSnapshot
from otelwater.export.jsonl import JsonLinesSink
from otelwater.export.live import LiveView, WaterBoard
from otelwater.pipeline import Stopper, WatchLoop
from otelwater.probes.kernel import WaterOptions, WaterProbe


def describe(pids, ports, cgroups) -> str:
    parts = []
    if pids:
        parts.append("pid " + ",".join(map(str, pids)))
    if ports:
        parts.append("port " + ",".join(map(str, ports)))
    if cgroups:
        parts.append("cgroup " + ",".join(cgroups))
    return " and ".join(parts) if parts else "all TCP sockets"


def run_watch(*, pids, ports, cgroups, duration, interval, as_json, follow, high_water,
              ringbuf_pages, rows) -> None:
    opts = WaterOptions(ports=frozenset(ports), pids=frozenset(pids),
                        cgroups=frozenset(cgroups), follow=follow, high_water=high_water,
                        ringbuf_pages=ringbuf_pages)
    what = describe(pids, ports, cgroups)
    board = WaterBoard()
    with Stopper() as stopper, WaterProbe(opts) as water:
        print(f"Tracing TCP receive queues ({what}) with eBPF tracepoints"
              + (f" for {duration:g}s" if duration else "") + ". Ctrl-C to stop.",
              file=sys.stderr, flush=True)

        def count(records):
            for r in records:
                if isinstance(r, WaterSnapshot):
                    board.add(r)
                elif isinstance(r, LostEvents):
                    board.lost = r.lost_total

        if as_json:
            sink = JsonLinesSink()

            def on_records(records):
                count(records)
                sink.write(records)

            loop = WatchLoop(water, on_records, interval_s=interval, duration_s=duration)
            loop.run(stopper)
        else:
            with LiveView(f"otelwater watch: {what}", rows=rows) as view:
                loop = WatchLoop(water, count, lambda: view.show(board), interval_s=interval,
                                 duration_s=duration)
                loop.run(stopper)
    print(f"otelwater: {board.records} snapshots, {board.lost} lost records", file=sys.stderr)
