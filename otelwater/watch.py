"""`otelwater watch`: the kernel probe (and optionally a Go read sampler) into the live view or
JSON Lines."""

from __future__ import annotations

import contextlib
import sys

from otelwater.events.model import LostEvents, Notice, ReadRecord, WaterSnapshot
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


def open_readers(go_binary, go_pids, probes, blocked_ns):
    if not go_binary and not go_pids:
        return contextlib.nullcontext(None)
    from otelwater.probes.goread import GoReadOptions, GoReadSampler

    # the tracepoint sampler is compiled into the water probe's program, which hands it each
    # read's socket and queue evidence; the uprobe sampler runs as its own program
    return GoReadSampler(GoReadOptions(binary=go_binary, pids=frozenset(go_pids),
                                       mechanism=probes, threshold_ns=blocked_ns,
                                       embed=probes == "tracepoint"))


def run_watch(*, pids, ports, cgroups, duration, interval, as_json, follow, high_water,
              ringbuf_pages, rows, go_binary=None, go_pids=(), probes="tracepoint",
              blocked_ns=1_000_000) -> None:
    opts = WaterOptions(ports=frozenset(ports), pids=frozenset(pids),
                        cgroups=frozenset(cgroups), follow=follow, high_water=high_water,
                        ringbuf_pages=ringbuf_pages)
    what = describe(pids, ports, cgroups)
    board = WaterBoard()
    with Stopper() as stopper, \
            open_readers(go_binary, go_pids, probes, blocked_ns) as readers, \
            WaterProbe(opts, readers=readers if probes == "tracepoint" else None) as water:
        if readers is not None:
            target = go_binary or "pid " + ",".join(map(str, go_pids))
            what += f"; Go reads of {target} by {probes}"
        print(f"Tracing TCP receive queues ({what}) with eBPF tracepoints"
              + (f" for {duration:g}s" if duration else "") + ". Ctrl-C to stop.",
              file=sys.stderr, flush=True)

        def count(records):
            for r in records:
                if isinstance(r, WaterSnapshot):
                    board.add(r)
                elif isinstance(r, ReadRecord):
                    board.add_read(r)
                elif isinstance(r, LostEvents):
                    board.lost_by_probe[r.probe] = r.lost_total
                elif isinstance(r, Notice):
                    print(f"otelwater: {r.text}", file=sys.stderr, flush=True)

        if as_json:
            sink = JsonLinesSink()

            def on_records(records):
                count(records)
                sink.write(records)

            loop = WatchLoop(water, on_records, interval_s=interval, duration_s=duration,
                             readers=readers)
            loop.run(stopper)
        else:
            with LiveView(f"otelwater watch: {what}", rows=rows) as view:
                loop = WatchLoop(water, count, lambda: view.show(board), interval_s=interval,
                                 duration_s=duration, readers=readers)
                loop.run(stopper)
        if readers is not None:
            st = readers.stats()
            reads = (f", {st.reads} Go reads ({st.blocked} blocked, mean "
                     f"{st.mean_latency_ns / 1e3:.0f} us)")
        else:
            reads = ""
    print(f"otelwater: {board.records} snapshots{reads}, {board.lost} lost records; "
          f"{own_cost()}", file=sys.stderr)


def own_cost() -> str:
    """otelwater's own CPU time and memory, so users see what watching cost (user space)."""
    import psutil

    me = psutil.Process()
    cpu = me.cpu_times()
    return (f"otelwater used {cpu.user + cpu.system:.2f} s CPU, "
            f"{me.memory_info().rss / 2**20:.0f} MiB RSS")
