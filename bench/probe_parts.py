#!/usr/bin/env python3
"""Where the nanoseconds go: the cost per hit of each ingredient of otelwater's BPF programs.

    .venv/bin/python bench/probe_parts.py [--rounds N] [--count N] [--workload c|go]
        [--quick] [--json OUT] [--cpu N] [--no-water]

Method. bench/probe_parts.c holds one small program per ingredient of bpf/water.c and
bpf/goread_tp.c (a map lookup of each kind, each probe read, the clock, the ring buffer, the
socket key, the user registers and stack), each doing just that one thing. All of them, and the
real water probe's sock_recv_length program for reference, are attached at the same time to the
raw tracepoint sock:sock_recv_length, so every program sees exactly the same hits: each socket
read(2) of a 64-byte loopback TCP ping-pong, both ends pinned to one CPU and this process on
the other (--workload c: bench/pingpong.c, built here with frame pointers, blocking reads;
go: examples/bin/loadgen against slowreader, Go reads that park first). The kernel's BPF run-
time statistics, on for the run, give each program's run_time_ns and run_cnt (read from the
program's fd in /proc/self/fdinfo): run_time_ns / run_cnt is its cost per hit. The statistics
time each run with two sched_clock() reads, so the empty program's figure is that overhead
plus the call; it is inside every figure equally, and an ingredient's cost is its program's
figure minus the empty program's in the same round. The statistics do not see the dispatch
around the programs (the tracepoint call, RCU, the recursion guard): bench/water_overhead.py's
floor rows measure that.

Rounds: each attaches every program in a new order (the list rotated, its start spread evenly
over the rounds: programs on one tracepoint run in the order attached, and the first to touch
a cache line pays its miss), runs the workload, reads the statistics and detaches everything.
The table gives the median over rounds and the range of "minus empty". The water probe is
loaded watching every socket, its other tracepoints attached throughout (its sk_data_ready
figure is printed too); a thread polls its ring buffer every 0.1 s and sweeps its table every
1 s, as otelwater/pipeline.py does, and drains the part_rb_submit ring buffer every 10 ms.

The statistics are switched on with BPF_ENABLE_STATS (libbpf's bpf_enable_stats): on while this
process holds the fd it returns, off again when the fd is closed or the process dies however it
dies; the sysctl kernel.bpf_stats_enabled, which another benchmark may write meanwhile, is
neither read nor written. While they are on, every BPF program on the machine pays the two
clock reads. Nothing stays attached after exit: every program and attachment is an fd of this
process, closed on the way out (Ctrl-C and SIGTERM included).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from otelwater.probes.bpfinfo import enable_stats  # noqa: E402  (BPF_ENABLE_STATS)

TRACEPOINT = b"sock_recv_length"
SOURCE = HERE / "probe_parts.c"
RB_SUBMIT_PAGES = 4096          # 16 MiB: ~80k records, >1 s of the ping-pong's reads
EMPTY = "part_empty"
WATER = "water:sock_recv_length"
WATER_FN = b"raw_tracepoint__sock_recv_length"
WATER_ARRIVAL_FN = b"raw_tracepoint__sk_data_ready"
GO_SERVER = ROOT / "examples/bin/slowreader"
GO_LOADGEN = ROOT / "examples/bin/loadgen"

# program -> what it does (the table's first column), in the table's order
PARTS = {
    "part_empty": "empty program (stats overhead + call)",
    "part_args_pid": "ctx->args[0..2] + bpf_get_current_pid_tgid",
    "part_lru_lookup": "lru_hash lookup hit + write (water.c socks)",
    "part_lru_miss": "lru_hash lookup miss (a socket not in it)",
    "part_hash_lookup": "hash lookup hit + write",
    "part_array_lookup": "array lookup (small index) + write",
    "part_percpu_inc": "percpu_array lookup + increment",
    "part_task_hit": "task storage get, found (Go thread)",
    "part_task_miss": "task storage get, none (other threads)",
    "part_read4": "probe read 4 B (sk_rcvbuf)",
    "part_read_span": "probe read of water.c's struct sock span",
    "part_read_two": "2 probe reads of 4 B (rcv_nxt, copied_seq)",
    "part_read_wide": "1 probe read covering both",
    "part_ktime": "bpf_ktime_get_ns",
    "part_comm": "bpf_get_current_comm",
    "part_rb_discard": "ring buffer reserve + discard",
    "part_rb_submit": "ring buffer reserve + submit (no wakeup)",
    "part_sock_tuple": "socket tuple (otw_sock_tuple's reads)",
    "part_sock_key": "socket key (tuple + FNV-1a of 40 B)",
    "part_regs": "bpf_task_pt_regs + 3 registers",
    "part_stack1": "bpf_get_stack, user, 1 entry (no walk)",
    "part_stack": "bpf_get_stack, user, 32 frames max (+counter)",
}


# -- statistics and attachments (all fds of this process) -----------------------------------
def prog_stats(prog_fd: int) -> tuple[int, int, int]:
    """(run_time_ns, run_cnt, recursion_misses) of a loaded program, from its fd's fdinfo."""
    got = {}
    with open(f"/proc/self/fdinfo/{prog_fd}") as f:
        for line in f:
            k, _, v = line.partition(":")
            got[k.strip()] = v.strip()
    return (int(got.get("run_time_ns", 0)), int(got.get("run_cnt", 0)),
            int(got.get("recursion_misses", 0)))


def attach_raw(prog_fd: int) -> int:
    """Attach a loaded program to the raw tracepoint; the attachment lives as long as the fd.
    (BCC's attach_raw_tracepoint takes one program per tracepoint and object.)"""
    from bcc.libbcc import lib

    fd = lib.bpf_attach_raw_tracepoint(prog_fd, TRACEPOINT)
    if fd < 0:
        raise OSError(f"could not attach a program to raw tracepoint {TRACEPOINT.decode()}")
    return fd


def close_all(fds: list[int]) -> None:
    while fds:
        try:
            os.close(fds.pop())
        except OSError:
            pass


# -- loading ------------------------------------------------------------------------------
def part_cflags() -> list[str]:
    """The water probe's -D flags for this kernel (offsets, OTW_SPAN_START/LEN) and ours."""
    from otelwater.probes.btf import kernel_offsets
    from otelwater.probes.kernel import WaterOptions, build_cflags
    from otelwater.probes.loader import running_kernel_btf

    offsets = kernel_offsets(running_kernel_btf())
    flags = build_cflags(offsets, WaterOptions(), have_rx_sk=False)
    return flags + [f"-DPART_RB_SUBMIT_PAGES={RB_SUBMIT_PAGES}"]


def load_parts(cflags: list[str]):
    """The parts' BPF object and {program name: fd}; every program passes the verifier here."""
    from bcc import BPF
    from otelwater.probes.loader import captured_stderr_fd, first_error, one_line

    names = re.findall(r"^int (part_\w+)\(", SOURCE.read_text(), re.M)
    missing = set(PARTS) ^ set(names)
    if missing:
        raise RuntimeError(f"PARTS and {SOURCE.name} disagree on {sorted(missing)}")
    try:
        with captured_stderr_fd() as log:
            bpf = BPF(src_file=str(SOURCE).encode(), cflags=cflags)
            fds = {n: bpf.load_func(n.encode(), BPF.RAW_TRACEPOINT).fd for n in PARTS}
    except Exception as e:  # BCC raises bare Exception for compile, verifier and load errors
        raise RuntimeError(f"{SOURCE.name} did not load: "
                           f"{first_error(log.text) or one_line(e)}") from None
    return bpf, fds


def load_water():
    """The real water probe, watching every socket, its sock_recv_length detached (this
    benchmark attaches it in its place in each round's order)."""
    from otelwater.probes.kernel import WaterOptions, WaterProbe

    probe = WaterProbe(WaterOptions(seed=False))
    probe._bpf.detach_raw_tracepoint(TRACEPOINT)
    return probe


# -- workload -----------------------------------------------------------------------------
def build_pingpong(workdir: str) -> str:
    """bench/pingpong.c with frame pointers, so part_stack walks real frames."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler (cc) for bench/pingpong.c")
    exe = os.path.join(workdir, "pingpong")
    r = subprocess.run([cc, "-O2", "-fno-omit-frame-pointer", "-o", exe,
                        str(HERE / "pingpong.c")], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"cc failed on bench/pingpong.c: {r.stderr.strip()[:300]}")
    return exe


def _pinned(cpu: int):
    return lambda: os.sched_setaffinity(0, {cpu})


def run_c(exe: str, count: int, cpu: int) -> float:
    """COUNT timed 64-byte round trips (+COUNT/10 warm-up), both ends on `cpu`: µs per round
    trip (with every part attached: not a clean figure, printed as a check)."""
    out = subprocess.run([exe, "pp", "0", str(count), "64", str(cpu), str(cpu)], check=True,
                         capture_output=True, text=True, timeout=600).stdout
    for line in out.splitlines():
        if line.startswith("us_per_rt="):
            return float(line.split("=", 1)[1])
    raise RuntimeError(f"pingpong printed no us_per_rt: {out!r}")


def run_go(count: int, cpu: int) -> float:
    """COUNT 64-byte round trips of examples/bin/loadgen against a fresh slowreader -mode echo,
    both on `cpu`: Go readers (non-blocking reads that park, frame pointers): µs per round trip."""
    server = subprocess.Popen([str(GO_SERVER), "-mode", "echo"], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, preexec_fn=_pinned(cpu))
    try:
        addr = json.loads(server.stdout.readline())["listening"]
        r = subprocess.run([str(GO_LOADGEN), "-addr", addr, "-conns", "1", "-size", "64",
                            "-mode", "pingpong", "-count", str(count)], check=True,
                           capture_output=True, text=True, timeout=600, preexec_fn=_pinned(cpu))
        out = json.loads(r.stdout.strip().splitlines()[-1])
        return out["elapsed_s"] * 1e6 / out["messages"]
    finally:
        server.terminate()
        server.wait()


class Consumer(threading.Thread):
    """Drains part_rb_submit every 10 ms; polls and sweeps the water probe like the pipeline."""

    def __init__(self, parts, water):
        super().__init__(daemon=True)
        self.parts, self.water = parts, water
        self.stop = threading.Event()
        self.records = 0

        def on_record(_ctx, _data, _size):
            self.records += 1
            return 0

        self._cb = on_record
        parts["rb_submit"].open_ring_buffer(on_record)

    def run(self):
        next_poll = next_sweep = time.monotonic()
        while not self.stop.wait(0.01):
            self.parts.ring_buffer_consume()
            now = time.monotonic()
            if self.water is not None and now >= next_poll:
                next_poll = now + 0.1
                self.water.poll()
                if now >= next_sweep:
                    next_sweep = now + 1.0
                    self.water.sweep()


# -- the measurement ------------------------------------------------------------------------
def one_round(progs: dict[str, int], order: list[str],
              workload) -> tuple[dict[str, dict], float]:
    """Attach every program in `order`, run the ping-pong, detach: {name: ns, hits, misses}."""
    links: list[int] = []
    try:
        for name in order:
            links.append(attach_raw(progs[name]))
        before = {n: prog_stats(fd) for n, fd in progs.items()}
        us_rt = workload()
        after = {n: prog_stats(fd) for n, fd in progs.items()}
    finally:
        close_all(links)
    out = {}
    for n in progs:
        t = after[n][0] - before[n][0]
        c = after[n][1] - before[n][1]
        out[n] = {"run_time_ns": t, "hits": c, "recursion_misses": after[n][2] - before[n][2],
                  "ns_per_hit": t / c if c else None}
    return out, us_rt


def summarize(rounds: list[dict[str, dict]], names: list[str]) -> dict[str, dict]:
    """Per program: median ns/hit, and its excess over the same round's empty program
    (median, min, max over rounds), median hits a round."""
    out = {}
    for n in names:
        ns = [r[n]["ns_per_hit"] for r in rounds if r[n]["ns_per_hit"] is not None]
        minus = [r[n]["ns_per_hit"] - r[EMPTY]["ns_per_hit"] for r in rounds
                 if r[n]["ns_per_hit"] is not None and r[EMPTY]["ns_per_hit"] is not None]
        out[n] = {
            "ns_per_hit": statistics.median(ns) if ns else None,
            "minus_empty": statistics.median(minus) if minus else None,
            "minus_empty_min": min(minus) if minus else None,
            "minus_empty_max": max(minus) if minus else None,
            "hits": int(statistics.median(r[n]["hits"] for r in rounds)),
        }
    return out


def table(summary: dict[str, dict], labels: dict[str, str]) -> str:
    head = ("ingredient", "program", "ns/hit", "minus empty [range]", "hits/round")
    rows = []
    for n, label in labels.items():
        s = summary[n]
        if s["ns_per_hit"] is None:
            rows.append((label, n, "-", "-", str(s["hits"])))
            continue
        minus = "" if n == EMPTY else (
            f"{s['minus_empty']:+.1f} [{s['minus_empty_min']:+.1f}, {s['minus_empty_max']:+.1f}]")
        rows.append((label, n, f"{s['ns_per_hit']:.1f}", minus, str(s["hits"])))
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]
    fmt = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    lines = [fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    return "\n".join([*lines, *(fmt(r) for r in rows)])


def derived(summary: dict[str, dict], frames: float | None) -> list[str]:
    """The comparisons issue 11 asks about, from the medians."""
    def m(n):
        return summary[n]["minus_empty"] if n in summary else None

    out = []
    pairs = [
        ("lru_hash over hash", "part_lru_lookup", "part_hash_lookup"),
        ("hash over array", "part_hash_lookup", "part_array_lookup"),
        ("two 4-byte reads over one read covering both", "part_read_two", "part_read_wide"),
        ("the span read over one 4-byte read", "part_read_span", "part_read4"),
        ("FNV-1a hash of the tuple (key over tuple)", "part_sock_key", "part_sock_tuple"),
        ("ring buffer submit over discard", "part_rb_submit", "part_rb_discard"),
    ]
    for text, a, b in pairs:
        if m(a) is not None and m(b) is not None:
            out.append(f"{text}: {m(a) - m(b):+.1f} ns")
    if frames and None not in (m("part_stack"), m("part_stack1"), m("part_percpu_inc")):
        walk = m("part_stack") - m("part_percpu_inc")
        text = (f"user stack: {frames:.1f} entries a walk on average, {walk:.0f} ns a walk "
                f"(its counter taken off), {m('part_stack1'):.0f} ns of it without a frame walk")
        if frames > 1:
            text += f", {(walk - m('part_stack1')) / (frames - 1):.0f} ns a further frame"
        out.append(text)
    return out


# -- main -----------------------------------------------------------------------------------
def _sigterm(_signo, _frame):
    raise SystemExit(143)


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _cpu_model() -> str:
    for line in (_read("/proc/cpuinfo") or "").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def percpu_sum(table_, slot: int) -> int:
    """Sum over CPUs of n[slot] of part_counts' only entry."""
    return sum(v.n[slot] for v in table_.getvalue(table_.Key(0)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="The method is in this file's docstring and bench/README.md.")
    ap.add_argument("--rounds", type=int, default=None,
                    help="rounds, each attaching every program in a rotated order "
                         "(default 9; --quick: 2)")
    ap.add_argument("--count", type=int, default=None,
                    help="ping-pong round trips a round, 2 reads each (c: +10%% warm-up); "
                         "default 100000, --quick 10000")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 2 short rounds")
    ap.add_argument("--json", metavar="OUT", help="write every round's figures and the summary")
    ap.add_argument("--cpu", type=int, default=None,
                    help="CPU for both ping-pong ends (default: the last); this process and "
                         "its consumer thread run on the others")
    ap.add_argument("--workload", choices=("c", "go"), default="c",
                    help="c: bench/pingpong.c, blocking reads (default); go: examples/bin's "
                         "loadgen and slowreader, Go reads that park (deeper user stacks)")
    ap.add_argument("--no-water", action="store_true",
                    help="leave out the real water probe (its reference rows)")
    args = ap.parse_args(argv)
    if args.rounds is None:
        args.rounds = 2 if args.quick else 9
    if args.count is None:
        args.count = 10_000 if args.quick else 100_000
    if args.rounds < 1 or args.count < 1:
        ap.error("--rounds and --count must be at least 1")
    signal.signal(signal.SIGTERM, _sigterm)

    cpus = sorted(os.sched_getaffinity(0))
    cpu = args.cpu if args.cpu is not None else cpus[-1]
    rest = set(cpus) - {cpu}
    if rest:
        os.sched_setaffinity(0, rest)

    from otelwater.errors import OtelwaterError
    try:
        return measure(args, cpu, rest)
    except OtelwaterError as e:
        print(f"probe_parts: {e.one_line()}", file=sys.stderr)
        return e.exit_code
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        print(f"probe_parts: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("probe_parts: interrupted (everything detached)", file=sys.stderr)
        return 130


def measure(args, cpu: int, rest: set[int]) -> int:
    machine = {
        "command": " ".join([sys.executable, *sys.argv]),
        "kernel": platform.release(),
        "nproc": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "clocksource": _read("/sys/devices/system/clocksource/clocksource0/current_clocksource"),
        "bpf_jit_enable": _read("/proc/sys/net/core/bpf_jit_enable"),
        "workload_cpu": cpu,
        "bench_cpus": sorted(rest),
    }
    print(f"command: {machine['command']}")
    print(f"machine: Linux {machine['kernel']}, nproc {machine['nproc']}, "
          f"{machine['cpu_model']}, clocksource {machine['clocksource']}")

    cflags = part_cflags()
    parts = water = None
    consumer = None
    stats_fd = -1
    try:
        parts, progs = load_parts(cflags)
        labels = dict(PARTS)
        if not args.no_water:
            water = load_water()
            progs[WATER] = water._bpf.funcs[WATER_FN].fd
            labels[WATER] = "reference: water.c sock_recv_length (all watched)"
        arrival_fd = water._bpf.funcs[WATER_ARRIVAL_FN].fd if water else None
        consumer = Consumer(parts, water)
        consumer.start()
        with tempfile.TemporaryDirectory(prefix="otw-parts-") as tmp:
            if args.workload == "c":
                exe = build_pingpong(tmp)
                workload = lambda: run_c(exe, args.count, cpu)  # noqa: E731
                what = ("bench/pingpong.c (built with -fno-omit-frame-pointer), "
                        f"{args.count} round trips (+10% warm-up)")
            else:
                for path in (GO_SERVER, GO_LOADGEN):
                    if not path.exists():
                        raise RuntimeError(f"{path.relative_to(ROOT)} is missing: "
                                           "run scripts/setup.sh")
                workload = lambda: run_go(args.count, cpu)  # noqa: E731
                what = f"examples/bin/loadgen -> slowreader -mode echo, {args.count} round trips"
            names = list(progs)
            print(f"{len(names)} programs on raw tracepoint {TRACEPOINT.decode()}; "
                  f"{args.rounds} rounds of 64-byte ping-pong: {what}; both ends on CPU {cpu}",
                  flush=True)
            stats_fd = enable_stats()
            rounds, us_rt, arrivals = [], [], []
            t0 = time.monotonic()
            for r in range(args.rounds):
                k = r * len(names) // args.rounds   # first program: spread over the list
                a0 = prog_stats(arrival_fd) if arrival_fd is not None else None
                res, us = one_round(progs, names[k:] + names[:k], workload)
                if a0 is not None:
                    a1 = prog_stats(arrival_fd)
                    if a1[1] > a0[1]:
                        arrivals.append((a1[0] - a0[0]) / (a1[1] - a0[1]))
                rounds.append(res)
                us_rt.append(us)
                print(f"round {r + 1}/{args.rounds}: empty {res[EMPTY]['ns_per_hit']:.1f} ns, "
                      f"{res[EMPTY]['hits']} hits, {us:.2f} µs a round trip "
                      f"({time.monotonic() - t0:.0f} s)", flush=True)
        elapsed = time.monotonic() - t0
    finally:
        if stats_fd >= 0:
            os.close(stats_fd)
        if consumer is not None:
            consumer.stop.set()
            consumer.join()
            parts.ring_buffer_consume()   # what the last 10 ms left
        counts = parts["part_counts"] if parts is not None else None
        frames_calls = ((percpu_sum(counts, 1), percpu_sum(counts, 0), percpu_sum(counts, 2))
                        if counts is not None else (0, 0, 0))
        water_lost = water.lost_total() if water is not None else 0
        if water is not None:
            water.close()
        if parts is not None:
            parts.cleanup()

    frames, calls, rb_lost = frames_calls
    avg_frames = frames / calls if calls else None
    summary = summarize(rounds, names)
    expected = (f"the ping-pong makes {int(args.count * 1.1) * 2 + 1} a round"
                if args.workload == "c" else "Go's parking reads add their -EAGAIN ones")
    print(f"\n{args.rounds} rounds in {elapsed:.0f} s; medians over rounds; 'minus empty' = "
          f"the program's ns/hit minus part_empty's in the same round, median [min, max]. "
          f"Hits: every socket read on the machine ({expected}).\n")
    print(table(summary, labels))
    print()
    if arrivals:
        print(f"reference: water.c sk_data_ready {statistics.median(arrivals):.1f} ns/hit "
              f"(median over rounds; minus empty: "
              f"{statistics.median(arrivals) - summary[EMPTY]['ns_per_hit']:+.1f})")
    for line in derived(summary, avg_frames):
        print(line)
    misses = sum(r[n]["recursion_misses"] for r in rounds for n in names)
    print(f"ring buffer: {consumer.records} records drained, {rb_lost} reserve failures; "
          f"water probe records lost: {water_lost}; recursion misses: {misses}")
    print(f"ping-pong with everything attached: {statistics.median(us_rt):.2f} µs a round trip "
          f"(median)")

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "args": vars(args), "elapsed_s": elapsed,
                       "cflags": cflags, "labels": labels, "rounds": rounds,
                       "us_per_round_trip": us_rt, "summary": summary,
                       "water_sk_data_ready_ns_per_hit": arrivals,
                       "stack_frames_avg": avg_frames, "rb_records": consumer.records,
                       "rb_lost": rb_lost, "water_lost": water_lost}, f, indent=1)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
