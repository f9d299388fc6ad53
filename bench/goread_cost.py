#!/usr/bin/env python3
"""Per-read cost of the Go read sampler (otelwater/probes/goread.py), side by side in one run.

    .venv/bin/python bench/goread_cost.py [--rounds N] [--quick] [--json OUT]

What is measured: CPU time of the traced Go program (examples/bin/slowreader) per Read, i.e.
per call of net.(*conn).Read, summed over all its threads from /proc/PID/task/*/schedstat
(nanoseconds; /proc/PID/stat clock ticks are recorded as a cross-check). The program's CPU
includes what the probes add: BPF programs run, and uprobes trap, in its own threads.

Workloads (examples/bin/loadgen driving a fresh slowreader each run; both pinned to one CPU,
this process and the sampler's poll thread on the others):
  pingpong  8 connections, 64-byte echo, every Read parks (read(2) -> EAGAIN, netpoll, read
            again): the worst case. Reads = messages + one EOF Read per connection.
  stream    1 connection, 64 KiB writes, slowreader -mode sink -readsize 256: the data is
            already waiting, so nearly every Read is one read(2) that returns 256 bytes.
            Reads = bytes / 256 (+1 EOF); the sampler rows count Reads exactly, and the ratio
            of their count to this estimate is printed as a check.
Conditions, interleaved round-robin within each round (the order rotates every round):
  off       nothing attached
  tp-empty  empty programs on syscalls:sys_enter_read + sys_exit_read (bench/empty_read_tp.c)
  tp        GoReadSampler(mechanism="tracepoint") on the server's pid
  up-empty  empty uprobes at the entry and every `ret` of net.(*conn).Read (bench/empty_uprobe.c)
  up        GoReadSampler(mechanism="uprobe") on the server's pid
  water-empty  empty programs on the water probe's raw tracepoints (bench/empty_water_raw.c,
            with sock_send_length as the watch attaches it for Go readers): the floor of the
            watch row
  watch     what `otelwater watch -p PID --go-pid PID` loads: the water probe filtered to the
            pid with the tracepoint sampler compiled into it. The sampler attaches nothing of
            its own there: the water probe's sock_recv_length ends each socket read
During the sampler and watch rows a thread calls poll() every 0.1 s, as the real tool does.
Added cost and ratios are per round against that round's "off" run (and floor run); the table
gives the median over rounds. The timed runs have the kernel's BPF statistics off (they cost
two clock reads a program run); a profile pass after the rounds runs each probe row once more
per workload with bpf_stats_enabled on, and each program's run_time_ns / run_cnt gives its
cost per hit (`bpf_ns_per_hit`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

CONDITIONS = ("off", "tp-empty", "tp", "water-empty", "watch", "up-empty", "up")
PROFILED = ("tp", "watch", "up")
CONDITION_TEXT = {
    "off": "probes off",
    "tp-empty": "empty read tracepoints (floor)",
    "tp": "tracepoint sampler",
    "water-empty": "empty water tracepoints (floor)",
    "watch": "watch --go-pid (water probe + sampler)",
    "up-empty": "empty entry+ret uprobes (floor)",
    "up": "uprobe sampler",
}
FLOOR = {"tp": "tp-empty", "up": "up-empty", "watch": "water-empty"}
READ_FUNCTION = "net.(*conn).Read"
POLL_S = 0.1
# Targets (issue): `watch --go-pid` (and the tracepoint sampler alone) add <= 2 us per parking
# Read, <= 0.5 us per Read that finds data waiting; uprobe sampler <= 1.2x its floor.
TP_TARGET_US = {"pingpong": 2.0, "stream": 0.5}
UP_TARGET_RATIO = 1.2


# -- the traced program's CPU ------------------------------------------------------------
def server_cpu(pid: int) -> tuple[int, int, int]:
    """(ns on CPU summed over live threads, utime+stime clock ticks, thread count)."""
    ns = 0
    tids = os.listdir(f"/proc/{pid}/task")
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                ns += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])   # utime, stime (fields 14, 15)
    return ns, ticks, len(tids)


def foreign_bpf() -> list[str] | None:
    """Tracepoints and probes other processes have BPF programs on now (bpftool perf list):
    anything on sys_enter_read/sys_exit_read or the socket tracepoints makes 'off' not off."""
    try:
        r = subprocess.run(["bpftool", "perf", "list", "-j"], capture_output=True, text=True,
                           timeout=10)
        items = json.loads(r.stdout or "[]")
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None
    me = os.getpid()
    return sorted({f"{i.get('tracepoint') or i.get('filename') or i.get('fd_type')}"
                   f"(pid {i.get('pid')})" for i in items if i.get("pid") != me})


def proc_io(pid: int) -> dict[str, int]:
    try:
        with open(f"/proc/{pid}/io") as f:
            return {k: int(v) for k, v in (line.split(":") for line in f)}
    except OSError:
        return {}


# -- the example programs ------------------------------------------------------------------
def _pinned(cpu: int):
    return (lambda: os.sched_setaffinity(0, {cpu})) if cpu >= 0 else None


class Server:
    """A fresh slowreader; .pid from its first stdout line."""

    def __init__(self, binary: str, args: list[str], cpu: int):
        self.proc = subprocess.Popen([binary, *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True,
                                     preexec_fn=_pinned(cpu))
        line = self.proc.stdout.readline()
        try:
            hello = json.loads(line)
        except ValueError:
            self.stop()
            raise RuntimeError(f"slowreader printed {line!r}, not its address line")
        self.addr, self.pid = hello["listening"], int(hello["pid"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def run_loadgen(loadgen: str, args: list[str], cpu: int) -> dict:
    r = subprocess.run([loadgen, *args], capture_output=True, text=True, timeout=300,
                       preexec_fn=_pinned(cpu))
    if r.returncode:
        raise RuntimeError(f"loadgen {' '.join(args)} failed: {r.stderr.strip()[:300]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# -- conditions ---------------------------------------------------------------------------
class Poller(threading.Thread):
    def __init__(self, sampler, water=None):
        super().__init__(daemon=True)
        self.sampler, self.stop, self.records = sampler, threading.Event(), 0
        self.water = water

    def run(self):
        sweep = time.monotonic() + 1.0
        while not self.stop.wait(POLL_S):
            self.records += len(self.sampler.poll())
            if self.water is not None:
                self.water.poll()
                if time.monotonic() >= sweep:
                    sweep += 1.0
                    self.water.sweep()
                    self.water.refresh_filters()


BPF_STATS = "/proc/sys/kernel/bpf_stats_enabled"
_STATS_BEFORE: str | None = None


def bpf_stats(enable: bool) -> None:
    """Statistics on for a profile run; off again means as they were before this benchmark
    (someone else may have them on: they are never switched off under them)."""
    global _STATS_BEFORE
    try:
        if _STATS_BEFORE is None:
            with open(BPF_STATS) as f:
                _STATS_BEFORE = f.read().strip()
        with open(BPF_STATS, "w") as f:
            f.write("1" if enable else _STATS_BEFORE)
    except OSError:
        pass


def prog_stats(ids: set[int]) -> dict[str, list[int]]:
    """name -> [run_time_ns, run_cnt] of these BPF programs (bpftool, with stats on)."""
    out = subprocess.run(["bpftool", "prog", "show", "--json"], capture_output=True, text=True)
    res: dict[str, list[int]] = {}
    try:
        for p in json.loads(out.stdout):
            if p.get("id") in ids:
                r = res.setdefault(p.get("name", str(p["id"])), [0, 0])
                r[0] += p.get("run_time_ns", 0)
                r[1] += p.get("run_cnt", 0)
    except ValueError:
        pass
    return res


def own_prog_ids() -> set[int]:
    """IDs of the BPF programs this process holds (what the sampler and probe loaded)."""
    from tests.integration.conftest import prog_ids_of

    return prog_ids_of()


class Floors:
    """The two empty-program floors, each compiled once and attached only while its condition
    runs (a fresh compile takes seconds)."""

    def __init__(self, binary: str):
        from bcc import BPF

        from otelwater.probes import goelf, host
        self.tp = BPF(src_file=str(HERE / "empty_read_tp.c"))
        for tp in list(self.tp.tracepoint_fds):
            self.tp.detach_tracepoint(tp)
        self.water = BPF(src_file=str(HERE / "empty_water_raw.c"),
                         cflags=[f"-DOTW_HAVE_KFREE_SKB_RX_SK={int(host.kfree_skb_has_rx_sk())}",
                                 "-DOTW_SEND_FLOOR=1"])   # the watch's Go rows attach it too
        self.water_points = list(self.water.raw_tracepoint_fds)
        self.detach_water()
        self.up = BPF(src_file=str(HERE / "empty_uprobe.c"))
        fn = goelf.locate(binary).functions[READ_FUNCTION]
        self.binary = binary
        self.sites = [(fn.address, "otw_empty_entry")]
        self.sites += [(fn.address + r, "otw_empty_return") for r in fn.return_offsets]

    def attach_tp(self) -> None:
        for tp in ("sys_enter_read", "sys_exit_read"):
            self.tp.attach_tracepoint(tp=f"syscalls:{tp}", fn_name=f"tracepoint__syscalls__{tp}")

    def detach_tp(self) -> None:
        for tp in ("sys_enter_read", "sys_exit_read"):
            self.tp.detach_tracepoint(f"syscalls:{tp}")

    def attach_water(self) -> None:
        for tp in self.water_points:
            self.water.attach_raw_tracepoint(tp=tp, fn_name=b"raw_tracepoint__" + tp)

    def detach_water(self) -> None:
        for tp in self.water_points:
            self.water.detach_raw_tracepoint(tp)

    def attach_up(self, pid: int) -> None:
        for addr, fn in self.sites:
            self.up.attach_uprobe(name=self.binary, addr=addr, fn_name=fn, pid=pid)

    def detach_up(self, pid: int) -> None:
        for addr, _fn in self.sites:
            self.up.detach_uprobe(name=self.binary, addr=addr, pid=pid)

    def close(self) -> None:
        self.tp.cleanup()
        self.water.cleanup()
        self.up.cleanup()


def run_one(cond: str, wl: dict, floors: Floors, args, profile: bool = False) -> dict:
    """One run of a workload under a condition; with profile, BPF statistics on (the per-hit
    cost of each program; the CPU figures of such a run are not used)."""
    from otelwater.probes.goread import GoReadOptions, GoReadSampler

    server = Server(args.binary, wl["server"], args.cpu)
    sampler = poller = water = None
    stats0: dict = {}
    try:
        if cond == "tp-empty":
            floors.attach_tp()
        elif cond == "water-empty":
            floors.attach_water()
        elif cond == "up-empty":
            floors.attach_up(server.pid)
        elif cond in ("tp", "up"):
            mech = "tracepoint" if cond == "tp" else "uprobe"
            sampler = GoReadSampler(GoReadOptions(pids=frozenset({server.pid}), mechanism=mech))
            poller = Poller(sampler)
            poller.start()
        elif cond == "watch":
            from otelwater.probes.kernel import WaterOptions, WaterProbe

            sampler = GoReadSampler(GoReadOptions(pids=frozenset({server.pid}), embed=True))
            water = WaterProbe(WaterOptions(pids=frozenset({server.pid}), seed=False),
                               readers=sampler)
            poller = Poller(sampler, water)
            poller.start()
        if sampler is not None and profile:
            bpf_stats(True)
            stats0 = prog_stats(own_prog_ids())
        time.sleep(0.05)
        ns0, t0, n0 = server_cpu(server.pid)
        io0 = proc_io(server.pid)
        w0 = time.monotonic()
        out = run_loadgen(args.loadgen, ["-addr", server.addr, *wl["loadgen"]], args.cpu)
        time.sleep(0.1)   # the EOF Reads after loadgen closes
        wall = time.monotonic() - w0
        ns1, t1, n1 = server_cpu(server.pid)
        io1 = proc_io(server.pid)
        foreign = foreign_bpf()
        stats = None
        per_hit = {}
        if sampler is not None:
            stats1 = prog_stats(own_prog_ids()) if profile else {}
            bpf_stats(False)
            for name, (t1, c1) in stats1.items():
                t0_, c0_ = stats0.get(name, [0, 0])
                if c1 > c0_:
                    per_hit[name] = {"ns_per_hit": round((t1 - t0_) / (c1 - c0_), 1),
                                     "hits": c1 - c0_}
            poller.stop.set()
            poller.join()
            if water is not None:
                water.close()   # closes the sampler compiled into it too
            sampler.close()
            stats = sampler.stats()
    finally:
        if cond == "tp-empty":
            floors.detach_tp()
        elif cond == "water-empty":
            floors.detach_water()
        elif cond == "up-empty":
            floors.detach_up(server.pid)
        if poller is not None:
            poller.stop.set()
        if water is not None:
            water.close()
        if sampler is not None:
            sampler.close()
        bpf_stats(False)
        server.stop()
    reads = wl["reads"](out)
    res = {
        "cpu_ns": ns1 - ns0, "ticks": t1 - t0, "threads": [n0, n1], "wall_s": wall,
        "reads": reads, "us_per_read": (ns1 - ns0) / 1e3 / reads,
        "syscr": io1.get("syscr", 0) - io0.get("syscr", 0),
        "rchar": io1.get("rchar", 0) - io0.get("rchar", 0),
        "messages": out["messages"], "bytes_sent": out["bytes_sent"],
        "foreign_bpf": foreign,
    }
    if per_hit:
        res["bpf_ns_per_hit"] = per_hit
    if stats is not None:
        res.update(sampler_reads=stats.reads, sampler_parks=stats.parks,
                   sampler_orphans=stats.orphans, sampler_lost=stats.lost,
                   sampler_blocked=stats.blocked, records=poller.records)
    return res


def workloads(args) -> list[dict]:
    pp_conns = 8
    pp = {
        "name": "pingpong",
        "text": f"ping-pong, {pp_conns} conns x {args.pp_count} x 64 B echo (every Read parks)",
        "server": ["-mode", "echo"],
        "loadgen": ["-conns", str(pp_conns), "-size", "64", "-mode", "pingpong",
                    "-count", str(args.pp_count)],
        "reads": lambda out: out["messages"] + pp_conns,
    }
    rs = args.readsize
    st = {
        "name": "stream",
        "text": (f"stream, 1 conn x {args.stream_count} x 64 KiB, server -mode sink "
                 f"-readsize {rs} (Reads find data waiting)"),
        "server": ["-mode", "sink", "-readsize", str(rs)],
        "loadgen": ["-conns", "1", "-size", "65536", "-mode", "stream",
                    "-count", str(args.stream_count)],
        "reads": lambda out: -(-out["bytes_sent"] // rs) + 1,
    }
    return [pp, st]


# -- report -------------------------------------------------------------------------------
def summarize(results: dict, wls: list[dict], profiles: dict) -> dict:
    """results[wl][cond] = per-round run dicts (rounds aligned across conditions);
    profiles[wl][cond] = the profile run's dict (BPF statistics on)."""
    med = statistics.median
    summary = {}
    for wl in wls:
        name = wl["name"]
        per = {c: [r["us_per_read"] for r in results[name][c]] for c in CONDITIONS}
        off = per["off"]
        s = {}
        for c in CONDITIONS:
            v = per[c]
            row = {
                "us_per_read": med(v), "values": v,
                "added_us": med([a - o for a, o in zip(v, off)]),
                "added_range": [min(a - o for a, o in zip(v, off)),
                                max(a - o for a, o in zip(v, off))],
                "ratio_off": med([a / o for a, o in zip(v, off)]),
            }
            if c in FLOOR:
                fl = per[FLOOR[c]]
                row["ratio_floor"] = med([a / f for a, f in zip(v, fl)])
                added_ratio = [(a - o) / (f - o) for a, f, o in zip(v, fl, off) if f - o > 0]
                row["added_ratio_floor"] = med(added_ratio) if added_ratio else None
                sr = [r["sampler_reads"] / r["reads"] for r in results[name][c]]
                row["sampler_reads_vs_estimate"] = med(sr)
                row["parks_per_read"] = med([r["sampler_parks"] / max(1, r["sampler_reads"])
                                             for r in results[name][c]])
                row["lost"] = sum(r["sampler_lost"] for r in results[name][c])
                prof = profiles.get(name, {}).get(c, {})
                row["bpf_ns_per_hit"] = dict(sorted(prof.get("bpf_ns_per_hit", {}).items()))
                row["bpf_hits_per_read"] = {
                    p: round(h["hits"] / prof["reads"], 3)
                    for p, h in row["bpf_ns_per_hit"].items()} if prof else {}
            row["syscalls_per_read"] = med([r["syscr"] / r["reads"] for r in results[name][c]])
            s[c] = row
        summary[name] = s
    return summary


def table(summary: dict, wl_name: str) -> str:
    head = ["row", "us CPU/Read", "added us", "x off", "x floor", "added/floor's"]
    rows = [head]
    for c in CONDITIONS:
        s = summary[wl_name][c]
        rows.append([
            CONDITION_TEXT[c], f"{s['us_per_read']:.2f}",
            "-" if c == "off" else
            f"{s['added_us']:+.2f} [{s['added_range'][0]:+.2f}..{s['added_range'][1]:+.2f}]",
            "1" if c == "off" else f"{s['ratio_off']:.3f}",
            f"{s['ratio_floor']:.3f}" if "ratio_floor" in s else "",
            (f"{s['added_ratio_floor']:.2f}" if s.get("added_ratio_floor") is not None
             else "") if c in FLOOR else "",
        ])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["| " + " | ".join(x.ljust(w) for x, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def verdicts(summary: dict) -> list[str]:
    out = []
    for row, text in (("watch", "watch --go-pid"), ("tp", "tracepoint sampler alone")):
        for wl, target in TP_TARGET_US.items():
            a = summary[wl][row]["added_us"]
            out.append(f"{text}, {wl}: {a:+.2f} us/Read (target <= {target} us): "
                       f"{'met' if a <= target else 'NOT met'}")
    for wl in TP_TARGET_US:
        s = summary[wl]["up"]
        r, ar = s["ratio_floor"], s["added_ratio_floor"]
        ok = r <= UP_TARGET_RATIO
        ok_added = ar is not None and ar <= UP_TARGET_RATIO
        ar_text = f"{ar:.2f}x" if ar is not None else "n/a"
        out.append(f"uprobe sampler, {wl}: {r:.3f}x its floor in CPU per Read "
                   f"({'met' if ok else 'NOT met'}); its added cost is {ar_text} the floor's "
                   f"added cost ({'met' if ok_added else 'NOT met'}) (target <= "
                   f"{UP_TARGET_RATIO}x)")
    return out


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=None,
                    help="rounds, each running every condition once per workload "
                         "(default 5; --quick: 3)")
    ap.add_argument("--quick", action="store_true", help="3 rounds of shorter runs")
    ap.add_argument("--json", metavar="OUT", help="write every value and the summary here")
    ap.add_argument("--pp-count", type=int, default=None,
                    help="ping-pong messages per connection, 8 connections (default 6000; "
                         "--quick: 1500)")
    ap.add_argument("--stream-count", type=int, default=None,
                    help="64 KiB messages a stream run sends (default 600; --quick: 150)")
    ap.add_argument("--readsize", type=int, default=256,
                    help="slowreader -readsize in the stream workload (default 256)")
    ap.add_argument("--binary", default=str(ROOT / "examples/bin/slowreader"),
                    help="the traced server (default examples/bin/slowreader)")
    ap.add_argument("--loadgen", default=str(ROOT / "examples/bin/loadgen"))
    ap.add_argument("--cpu", type=int, default=None,
                    help="CPU for the server and loadgen (default: the last one); this "
                         "process and the poll thread run on the others")
    args = ap.parse_args(argv)
    if args.rounds is None:
        args.rounds = 3 if args.quick else 5
    if args.pp_count is None:
        args.pp_count = 1500 if args.quick else 6000
    if args.stream_count is None:
        args.stream_count = 150 if args.quick else 600
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    args.binary = os.path.realpath(args.binary)
    args.loadgen = os.path.realpath(args.loadgen)

    cpus = sorted(os.sched_getaffinity(0))
    args.cpu = args.cpu if args.cpu is not None else cpus[-1]
    rest = set(cpus) - {args.cpu}
    if rest:
        os.sched_setaffinity(0, rest)

    from otelwater.probes import goelf, host
    host.require_can_trace()
    info = goelf.locate(args.binary)
    machine = {
        "command": " ".join([sys.executable, *sys.argv]),
        "kernel": platform.release(),
        "nproc": os.cpu_count(),
        "go_version": info.go_version,
        "binary": args.binary,
        "workload_cpu": args.cpu,
        "bench_cpus": sorted(rest),
        "bpf_jit_enable": _read("/proc/sys/net/core/bpf_jit_enable"),
        "bpf_stats_enabled": _read("/proc/sys/kernel/bpf_stats_enabled"),
        "rounds": args.rounds,
    }
    print(f"command: {machine['command']}")
    print(f"machine: Linux {machine['kernel']}, nproc {machine['nproc']}, traced program "
          f"{os.path.relpath(args.binary, ROOT)} ({info.go_version})")
    print(f"pinning: server and loadgen on CPU {args.cpu}; this process and the poll thread on "
          f"{sorted(rest) or 'the same CPU'}; bpf_jit_enable={machine['bpf_jit_enable']} "
          f"bpf_stats_enabled={machine['bpf_stats_enabled']}")
    wls = workloads(args)
    for wl in wls:
        print(f"workload {wl['name']}: {wl['text']}")
    print(f"rounds: {args.rounds}; each runs every condition once per workload, a fresh server "
          f"each run, in an order that rotates from round to round\n", flush=True)

    floors = Floors(args.binary)
    results = {wl["name"]: {c: [] for c in CONDITIONS} for wl in wls}
    profiles: dict = {wl["name"]: {} for wl in wls}
    t_start = time.monotonic()
    try:
        for r in range(args.rounds):
            k = r % len(CONDITIONS)
            order = CONDITIONS[k:] + CONDITIONS[:k]
            for cond in order:
                for wl in wls:
                    results[wl["name"]][cond].append(run_one(cond, wl, floors, args))
            print(f"round {r + 1}/{args.rounds} ({time.monotonic() - t_start:.0f} s)",
                  flush=True)
        for cond in PROFILED:
            for wl in wls:
                profiles[wl["name"]][cond] = run_one(cond, wl, floors, args, profile=True)
        print(f"profile pass ({time.monotonic() - t_start:.0f} s)", flush=True)
    finally:
        floors.close()
    elapsed = time.monotonic() - t_start

    summary = summarize(results, wls, profiles)
    print(f"\n{args.rounds} rounds in {elapsed:.0f} s. Server CPU per Read (schedstat ns, all "
          f"threads); 'added' and ratios are medians over rounds of per-round differences and "
          f"ratios [min..max]. x floor: CPU/Read over the floor row's; added/floor's: the "
          f"sampler's added cost over its floor's added cost.")
    for wl in wls:
        name = wl["name"]
        print(f"\n{name}: {wl['text']}")
        print(table(summary, name))
        s = summary[name]
        print("read(2) per Read: " + ", ".join(f"{c} {s[c]['syscalls_per_read']:.2f}"
                                                for c in CONDITIONS))
        for c in FLOOR:
            parks = f", parks/Read {s[c]['parks_per_read']:.2f}" if c == "tp" else ""
            print(f"{c}: the sampler counted {s[c]['sampler_reads_vs_estimate']:.3f}x the "
                  f"Reads used as denominator{parks}, {s[c]['lost']} records lost")
            hits = s[c]["bpf_ns_per_hit"]
            if hits:
                per = s[c]["bpf_hits_per_read"]
                print(f"  per hit (profile run): " + ", ".join(
                    f"{p} {h['ns_per_hit']:.0f} ns x {per.get(p, 0):.2f}/Read"
                    for p, h in hits.items()))
    foreign = sorted({x for wl in results.values() for runs in wl.values() for r in runs
                      for x in (r["foreign_bpf"] or [])})
    if foreign:
        print(f"\nWARNING: other processes had BPF programs attached during some runs (their "
              f"work lands in every row, 'off' included): {', '.join(foreign[:12])}"
              f"{' ...' if len(foreign) > 12 else ''}")
    print()
    for line in verdicts(summary):
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "elapsed_s": elapsed,
                       "workloads": {w["name"]: w["text"] for w in wls},
                       "results": results, "profiles": profiles, "summary": summary},
                      f, indent=1)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
