#!/usr/bin/env python3
"""Kernel-side overhead of the water probe (bpf/water.c), side by side in one run.

    .venv/bin/python bench/water_overhead.py [--rounds N] [--quick] [--json OUT]
        [--toggle SECONDS] [--profile-rounds N] [--profile-only] [--variant NAME[@DIR][:-D..]]

Workloads (separate processes, both ends pinned to one CPU, this process on another):
  c-pp    64-byte TCP ping-pong on loopback, C driver (bench/pingpong.c, built with cc)
  c-pp-cpu  the same runs' CPU time of both ends (/proc/PID/schedstat), not wall time: the time
          other tasks held the CPU is not in it
  py-pp   the same ping-pong written in Python (docs/kernel.md's first floor figures used it)
  bulk    one loopback connection streaming 1 GiB in 64 KiB writes (C driver; --bulk-bytes 0:
          none)
Conditions, interleaved round-robin within each round (the order rotates every round):
  off     nothing attached
  empty   empty programs on the same six attach points (bench/empty_water.c): the floor
  empty-raw  the same as raw tracepoints (bench/empty_water_raw.c), as bpf/water.c attaches
  all     WaterProbe watching every socket
  other   WaterProbe watching one other port (every benchmark socket is filtered out)
  all:NAME  (--variant) WaterProbe watching every socket, built from DIR's BPF sources (another
          commit's: git archive HEAD bpf | tar -x -C /tmp/head) and/or with other -D flags
During the water conditions a consumer thread polls the ring buffer every 0.1 s and sweeps the
socket table every 1 s, as otelwater/pipeline.py does. Ratios are per round against that
round's "off" run; the table gives their median and range. Other processes' BPF programs on
these tracepoints (bpftool perf list) run in every condition, "off" included, and shrink the
floor to the cost of one more program: before each round the benchmark waits for them (up to
--wait-foreign s) and leaves out the rounds they overlap.

Toggled pass (after the timed rounds; --toggle SECONDS, 0: none): one long-lived C ping-pong
connection (pingpong.c loop) runs throughout while each round switches every condition on in
turn under it for --toggle-slot-ms; t-pp is its wall time a round trip, t-pp-cpu both ends' CPU
time. Slots a few hundred ms apart see the same machine, so on a shared machine these per-round
ratios are tighter than those of separate runs.

Profile pass (last; --profile-rounds N, 0: none; --profile-only: nothing else): the kernel's
BPF run-time statistics on (BPF_ENABLE_STATS: on while this process holds the fd, the sysctl is
never touched), each condition's programs attached in turn for one c-pp run, interleaved and
rotated like the timed rounds; each program's run_time_ns / run_cnt (its fd's fdinfo) is its ns
per hit. The statistics add their own two clock reads (~70 ns) to every figure, empty programs
included, and do not see the dispatch around a program (what the empty rows add in the timed
rounds): "own" = a water program's ns per hit minus the empty raw program's on the same
tracepoint in the same round.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import socket
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

CONDITIONS = ["off", "empty", "empty-raw", "all", "other"]   # + "all:NAME" per --variant
CONDITION_TEXT = {
    "off": "probes off",
    "empty": "empty tracepoint programs (floor)",
    "empty-raw": "empty raw tracepoint programs (floor)",
    "all": "water, everything watched",
    "other": "water, one other port",
}
OTHER_PORT = 9  # "discard": nothing in the benchmark uses it, so all its sockets are filtered out
TARGETS = {"all": 1.05, "other": 1.01}


# -- Python ping-pong worker (runs in its own process: `water_overhead.py _pyping ...`) ------
def _pin(cpu: int) -> None:
    if cpu >= 0:
        os.sched_setaffinity(0, {cpu})


def _recv_exact(s: socket.socket, view: memoryview, n: int) -> bool:
    got = 0
    while got < n:
        r = s.recv_into(view[got:], n - got)
        if not r:
            return False
        got += r
    return True


def pyping(count: int, size: int, ccpu: int, scpu: int) -> int:
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    port = lsock.getsockname()[1]
    buf = bytearray(size)
    view = memoryview(buf)
    pid = os.fork()
    if pid == 0:
        try:
            _pin(scpu)
            s, _ = lsock.accept()
            lsock.close()
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while _recv_exact(s, view, size):
                s.sendall(view)
        finally:
            os._exit(0)
    lsock.close()
    _pin(ccpu)
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    send, recv = s.sendall, _recv_exact
    for _ in range(count // 10):
        send(view)
        recv(s, view, size)
    t0 = time.perf_counter()
    for _ in range(count):
        send(view)
        if not recv(s, view, size):
            raise SystemExit("short read")
    t1 = time.perf_counter()
    s.close()
    os.waitpid(pid, 0)
    print(f"us_per_rt={(t1 - t0) * 1e6 / count:.4f}")
    return 0


# -- conditions ---------------------------------------------------------------------------
class Consumer(threading.Thread):
    """What the real tool does with the probe: poll every 0.1 s, sweep every 1 s. It serves
    whichever WaterProbe is attached now (`target`), and idles while none is."""

    def __init__(self, poll_s=0.1, sweep_s=1.0):
        super().__init__(daemon=True)
        self.poll_s, self.sweep_s = poll_s, sweep_s
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.target = None          # (condition name, WaterProbe) or None
        self.records: dict[str, int] = {}
        self.cpu_s: dict[str, float] = {}
        self.wall_s: dict[str, float] = {}

    def switch(self, target) -> None:
        with self.lock:
            if self.target is not None:   # drain what the last block left, as on stop
                self._serve(self.target, sweep=True)
            self.target = target

    def _serve(self, target, sweep: bool) -> None:
        name, probe = target
        c0 = time.thread_time()
        n = len(probe.poll())
        if sweep:
            n += len(probe.sweep())
        self.records[name] = self.records.get(name, 0) + n
        self.cpu_s[name] = self.cpu_s.get(name, 0.0) + time.thread_time() - c0

    def run(self):
        next_sweep = time.monotonic() + self.sweep_s
        last = time.monotonic()
        while not self.stop.is_set():
            with self.lock:
                now = time.monotonic()
                if self.target is not None:
                    name = self.target[0]
                    self.wall_s[name] = self.wall_s.get(name, 0.0) + now - last
                    sweep = now >= next_sweep
                    self._serve(self.target, sweep)
                    if sweep:
                        next_sweep = now + self.sweep_s
                last = now
            self.stop.wait(self.poll_s)


class Programs:
    """One loaded BPF object whose tracepoint programs are attached only while its condition
    runs: every condition is loaded once, so conditions can alternate every few hundred
    milliseconds (a reload compiles with clang for seconds)."""

    def __init__(self, bpf, probe=None):
        self.bpf, self.probe = bpf, probe
        self.points = [(False, tp) for tp in list(bpf.tracepoint_fds)]
        self.points += [(True, tp) for tp in list(bpf.raw_tracepoint_fds)]
        self.attached = True
        self.detach()

    def attach(self) -> None:
        for raw, tp in self.points:
            if raw:
                self.bpf.attach_raw_tracepoint(tp=tp, fn_name=b"raw_tracepoint__" + tp)
            else:
                self.bpf.attach_tracepoint(
                    tp=tp, fn_name=b"tracepoint__" + tp.replace(b":", b"__"))
        self.attached = True

    def detach(self) -> None:
        for raw, tp in self.points:
            if raw:
                self.bpf.detach_raw_tracepoint(tp)
            else:
                self.bpf.detach_tracepoint(tp)
        self.attached = False

    def names(self) -> list[str]:
        return [("raw " if raw else "") + tp.decode() for raw, tp in self.points]

    def prog_fds(self) -> dict[str, int]:
        """tracepoint name (without its category) -> the fd of the program attached there."""
        out = {}
        for raw, tp in self.points:
            fn = (b"raw_tracepoint__" + tp if raw
                  else b"tracepoint__" + tp.replace(b":", b"__"))
            name = tp.decode().split(":")[-1]
            out[name] = self.bpf.load_func(fn, self.bpf.RAW_TRACEPOINT if raw
                                           else self.bpf.TRACEPOINT).fd
        return out


def water_probe(opts, extra: list[str] = (), bpf_dir: str | None = None):
    """A WaterProbe (a variant): `extra` -D flags replace the loader's for the same macros;
    `bpf_dir`: the BPF sources from there instead of bpf/ (e.g. another commit's:
    git archive HEAD bpf | tar -x -C /tmp/old)."""
    from otelwater.probes import kernel, loader

    if not extra and not bpf_dir:
        return kernel.WaterProbe(opts)
    names = {f.split("=", 1)[0] for f in extra}
    orig_flags, orig_dir = kernel.build_cflags, loader.BPF_DIR

    def patched(*a, **k):
        flags = [f for f in orig_flags(*a, **k) if f.split("=", 1)[0] not in names]
        if bpf_dir:
            flags = [f"-I{bpf_dir}" if f == f"-I{orig_dir}" else f for f in flags]
        return flags + list(extra)

    kernel.build_cflags = patched
    if bpf_dir:
        loader.BPF_DIR = Path(bpf_dir)
    try:
        return kernel.WaterProbe(opts)
    finally:
        kernel.build_cflags, loader.BPF_DIR = orig_flags, orig_dir


def load_conditions(have_rx_sk: bool, variants: dict[str, tuple]) -> tuple[dict, list]:
    """{condition: Programs or None}, and what to close at the end."""
    from bcc import BPF
    from otelwater.probes.kernel import WaterOptions, WaterProbe
    empty = BPF(src_file=str(HERE / "empty_water.c"),
                cflags=[f"-DOTW_HAVE_KFREE_SKB_RX_SK={int(have_rx_sk)}"])
    empty_raw = BPF(src_file=str(HERE / "empty_water_raw.c"),
                    cflags=[f"-DOTW_HAVE_KFREE_SKB_RX_SK={int(have_rx_sk)}"])
    water_all = WaterProbe(WaterOptions(follow=False))
    water_other = WaterProbe(WaterOptions(ports=frozenset({OTHER_PORT}), follow=False))
    progs = {
        "off": None,
        "empty": Programs(empty),
        "empty-raw": Programs(empty_raw),
        "all": Programs(water_all._bpf, water_all),
        "other": Programs(water_other._bpf, water_other),
    }
    closers = [empty.cleanup, empty_raw.cleanup, water_all.close, water_other.close]
    for name, (flags, bpf_dir) in variants.items():
        probe = water_probe(WaterOptions(follow=False), flags, bpf_dir)
        progs[f"all:{name}"] = Programs(probe._bpf, probe)
        closers.append(probe.close)
    return progs, closers


# -- profile pass: ns per hit of each program (BPF run-time statistics) ----------------------
PROFILE_CONDITIONS = ["empty", "empty-raw", "all", "other"]  # + "all:NAME" per --variant


def prog_stats(prog_fd: int) -> tuple[int, int]:
    """(run_time_ns, run_cnt) of a loaded program, from its fd's fdinfo."""
    got = {}
    with open(f"/proc/self/fdinfo/{prog_fd}") as f:
        for line in f:
            k, _, v = line.partition(":")
            got[k.strip()] = v.strip()
    return int(got.get("run_time_ns", 0)), int(got.get("run_cnt", 0))


def profile_pass(progs: dict, consumer, cmd: list[str], round_trips: int,
                 rounds: int, foreign: "Foreign") -> dict:
    """{condition: {tracepoint: {"ns": [per round], "hits": [per round]}}} and per-round
    round trips; every condition's programs attached in turn for one C ping-pong run. A round
    that overlapped another process's programs on these tracepoints (their traffic runs these
    programs too, on other paths) is run again, up to 3x the rounds in all."""
    fd = enable_stats()
    out = {c: {} for c in PROFILE_CONDITIONS}
    done = dropped = 0
    try:
        while done < rounds and done + dropped < 3 * rounds:
            k = (done + dropped) % len(PROFILE_CONDITIONS)
            was = foreign.before()
            got = {}
            for cond in PROFILE_CONDITIONS[k:] + PROFILE_CONDITIONS[:k]:
                p = progs[cond]
                p.attach()
                if p.probe is not None:
                    consumer.switch((cond, p.probe))
                try:
                    fds = p.prog_fds()
                    time.sleep(0.05)
                    before = {n: prog_stats(f) for n, f in fds.items()}
                    run_worker(cmd, "us_per_rt")
                    after = {n: prog_stats(f) for n, f in fds.items()}
                finally:
                    consumer.switch(None)
                    p.detach()
                got[cond] = {n: (after[n][0] - before[n][0], after[n][1] - before[n][1])
                             for n in fds}
            if foreign.after() or was:
                dropped += 1
                continue
            done += 1
            for cond, progs_got in got.items():
                for n, (t, c) in progs_got.items():
                    d = out[cond].setdefault(n, {"ns": [], "hits": []})
                    d["ns"].append(t / c if c else None)
                    d["hits"].append(c)
    finally:
        os.close(fd)
    return {"conditions": out, "round_trips": round_trips, "rounds": done, "dropped": dropped}


def profile_report(prof: dict) -> list[str]:
    """One line per tracepoint: each condition's median ns per hit and hits per round trip;
    then each water condition's own ns (minus empty-raw, per round, median) and the time its
    programs run per round trip against the empty raw programs'."""
    conds, rt = prof["conditions"], prof["round_trips"]
    if not prof["rounds"]:
        return [f"profile pass: no round without other processes' programs "
                f"({prof.get('dropped', 0)} tried)"]
    names = sorted(set().union(*(conds[c].keys() for c in conds)),
                   key=lambda n: -statistics.median(conds["all"].get(n, {"hits": [0]})["hits"]))

    def med(xs):
        xs = [x for x in xs if x is not None]
        return statistics.median(xs) if xs else None

    def fmt(x, spec=".0f"):
        return "-" if x is None else format(x, spec)

    lines = [f"profile pass ({prof['rounds']} rounds, {prof.get('dropped', 0)} more left out: "
             f"other processes' programs; BPF statistics on, c-pp {rt} round trips a run): ns "
             "per hit [hits per round trip]; own = minus empty-raw, same round"]
    watched = [c for c in PROFILE_CONDITIONS if c.startswith("all") or c == "other"]
    head = ["tracepoint"] + list(PROFILE_CONDITIONS) + [f"{c} own" for c in watched]
    rows = [head]
    for n in names:
        row = [n]
        for c in PROFILE_CONDITIONS:
            d = conds[c].get(n)
            if d is None:
                row.append("-")
                continue
            row.append(f"{fmt(med(d['ns']))} [{statistics.median(d['hits']) / rt:.2f}]")
        base = conds["empty-raw"].get(n)
        for c in watched:
            d = conds[c].get(n)
            if d is None or base is None:
                row.append("-")
                continue
            own = [a - b for a, b in zip(d["ns"], base["ns"]) if a is not None and b is not None]
            row.append(fmt(med(own), "+.0f"))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(2, "|" + "|".join("-" * (w + 2) for w in widths) + "|")

    def per_rt(c, i):
        tot = 0.0
        for d in conds[c].values():
            if d["ns"][i] is not None:
                tot += d["ns"][i] * d["hits"][i]
        return tot / rt

    n_rounds = len(next(iter(conds["empty-raw"].values()))["ns"]) if conds["empty-raw"] else 0
    floor = [per_rt("empty-raw", i) for i in range(n_rounds)]
    for c in watched:
        mine = [per_rt(c, i) for i in range(n_rounds)]
        if not mine:
            continue
        own = [a - b for a, b in zip(mine, floor)]
        lines.append(f"  {c}: programs run {statistics.median(mine):.0f} ns a round trip "
                     f"(empty-raw {statistics.median(floor):.0f}), own work "
                     f"{statistics.median(own):+.0f} ns a round trip")
    return lines


# -- other processes' programs on the same tracepoints ------------------------------------
WATER_POINTS = frozenset({"sk_data_ready", "sock_recv_length", "sock_send_length",
                          "inet_sock_set_state", "tcp_destroy_sock", "kfree_skb",
                          "sock_rcvqueue_full"})


def foreign_programs() -> set[str]:
    """The pids of other processes with a BPF program on a tracepoint measured here (bpftool
    perf list). Such a program runs in every condition, "off" included, and the
    floor then measures only one more program on an already enabled tracepoint: rounds it
    overlaps are dropped from the summaries."""
    try:
        r = subprocess.run(["bpftool", "perf", "list", "-j"], capture_output=True, text=True,
                           timeout=10)
        items = json.loads(r.stdout or "[]")
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return set()
    me = os.getpid()
    return {f"{i.get('pid')}" for i in items
            if i.get("pid") != me and str(i.get("tracepoint", "")).split(":")[-1]
            in WATER_POINTS}


class Foreign:
    """Waits (up to wait_s) for other processes' programs to leave the tracepoints before a
    round, and remembers which rounds overlapped one (dirty)."""

    def __init__(self, wait_s: float):
        self.wait_s = wait_s
        self.seen: set[str] = set()
        self.waited_s = 0.0

    def before(self) -> bool:
        t0 = time.monotonic()
        found = foreign_programs()
        while found and time.monotonic() - t0 < self.wait_s:
            time.sleep(1.0)
            found = foreign_programs()
        self.waited_s += time.monotonic() - t0
        self.seen |= found
        return bool(found)

    def after(self) -> bool:
        found = foreign_programs()
        self.seen |= found
        return bool(found)


def clean_rounds(results: dict, dirty: list[bool]) -> tuple[dict, int]:
    """results without the dirty rounds (all of them when every round is dirty), and how many
    were dropped."""
    if not any(dirty) or all(dirty):
        return results, 0
    keep = [i for i, d in enumerate(dirty) if not d]
    return ({c: {w: [v[i] for i in keep] for w, v in ws.items()} for c, ws in results.items()},
            len(dirty) - len(keep))


# -- toggled pass: conditions switched under one long-lived ping-pong -------------------------
TOGGLE_WLS = [("t-pp", "us/rt", False, None, "us_per_rt"),
              ("t-pp-cpu", "us/rt", False, None, "cpu_us_per_rt")]


def task_ns(pid: int) -> int:
    """ns the task has run (/proc/PID/schedstat; softirq work in its context included)."""
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0])


def toggle_pass(progs: dict, consumer, driver: str, cpu: int, seconds: float, slot_s: float,
                foreign: Foreign, settle_s: float = 0.01) -> tuple[dict, list[bool]]:
    """One 64-byte ping-pong connection (bench/pingpong.c loop, both ends on `cpu`) runs the
    whole time; each round switches every condition on in turn under it (the order rotating
    round to round) and measures slot_s of it: round trips from the driver's shared counter,
    wall time, both ends' CPU time. Adjacent slots see the same machine a few hundred ms apart,
    so their per-round ratios are far tighter than those of separate runs seconds apart."""
    import mmap
    import struct

    results = {c: {w[0]: [] for w in TOGGLE_WLS} for c in CONDITIONS}
    dirty: list[bool] = []
    with tempfile.TemporaryDirectory(prefix="otw-toggle-") as tmp:
        path = os.path.join(tmp, "count")
        with open(path, "wb") as f:
            f.write(b"\0" * 8)
        fd = os.open(path, os.O_RDONLY)
        mm = mmap.mmap(fd, 8, prot=mmap.PROT_READ)
        c = str(cpu)
        proc = subprocess.Popen([driver, "loop", "0", "64", c, c, path],
                                stdout=subprocess.PIPE, text=True)
        try:
            server = int(proc.stdout.readline().split("=", 1)[1])
            pids = (proc.pid, server)

            def sample():
                return (struct.unpack_from("<Q", mm, 0)[0], time.monotonic_ns(),
                        sum(task_ns(p) for p in pids))

            time.sleep(0.5)   # warm-up
            t_end = time.monotonic() + seconds
            while time.monotonic() < t_end:
                k = len(dirty) % len(CONDITIONS)
                was = foreign.before()
                for cond in CONDITIONS[k:] + CONDITIONS[:k]:
                    p = progs[cond]
                    if p is not None:
                        p.attach()
                        if p.probe is not None:
                            consumer.switch((cond, p.probe))
                    try:
                        time.sleep(settle_s)
                        n0, t0, c0 = sample()
                        time.sleep(slot_s)
                        n1, t1, c1 = sample()
                    finally:
                        if p is not None:
                            consumer.switch(None)
                            p.detach()
                    n = max(n1 - n0, 1)
                    results[cond]["t-pp"].append((t1 - t0) / 1e3 / n)
                    results[cond]["t-pp-cpu"].append((c1 - c0) / 1e3 / n)
                dirty.append(foreign.after() or was)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            mm.close()
            os.close(fd)
    return results, dirty


# -- workloads ----------------------------------------------------------------------------
def run_worker_all(cmd: list[str]) -> dict[str, float]:
    """Every key=value line the worker printed."""
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300).stdout
    got = {}
    for line in out.splitlines():
        k, sep, v = line.partition("=")
        if sep:
            try:
                got[k] = float(v)
            except ValueError:
                pass
    return got


def run_worker(cmd: list[str], key: str) -> float:
    got = run_worker_all(cmd)
    if key not in got:
        raise RuntimeError(f"{cmd[0]} printed no {key}: {got!r}")
    return got[key]


def run_workloads(wls) -> dict[str, float]:
    """One run of each distinct command; every workload's figure (several may come from one
    run: c-pp's wall and CPU time)."""
    runs: dict[tuple, dict] = {}
    out = {}
    for name, _u, _h, cmd, key in wls:
        got = runs.get(tuple(cmd))
        if got is None:
            got = runs[tuple(cmd)] = run_worker_all(cmd)
        if key not in got:
            raise RuntimeError(f"{cmd[0]} printed no {key}: {got!r}")
        out[name] = got[key]
    return out


def build_driver(workdir: str) -> tuple[str | None, str]:
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        return None, "no C compiler: C workloads skipped"
    exe = os.path.join(workdir, "pingpong")
    r = subprocess.run([cc, "-O2", "-o", exe, str(HERE / "pingpong.c")],
                       capture_output=True, text=True)
    if r.returncode:
        return None, f"cc failed, C workloads skipped: {r.stderr.strip()[:300]}"
    return exe, f"{cc} -O2 bench/pingpong.c"


def workloads(args, driver: str | None, cpu: int):
    """(name, unit, higher_is_better, argv, key) for each workload."""
    c = str(cpu)
    out = []
    if driver:
        pp = [driver, "pp", "0", str(args.c_count), "64", c, c]
        out.append(("c-pp", "us/rt", False, pp, "us_per_rt"))
        # the same runs' CPU time of both ends (/proc/PID/schedstat): the time other tasks
        # held the CPU, most of the noise on a shared machine, is not in it
        out.append(("c-pp-cpu", "us/rt", False, pp, "cpu_us_per_rt"))
    if args.py_count > 0:
        out.append(("py-pp", "us/rt", False,
                    [sys.executable, str(Path(__file__).resolve()), "_pyping", str(args.py_count),
                     "64", c, c], "us_per_rt"))
    if driver and args.bulk_bytes > 0:
        out.append(("bulk", "GB/s", True,
                    [driver, "bulk", "0", str(args.bulk_bytes), "65536", c, c], "gb_per_s"))
    return out


# -- report -------------------------------------------------------------------------------
def _quartiles(xs: list[float]) -> tuple[float, float]:
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def _median_ci(xs: list[float], n: int = 2000, seed: int = 1) -> tuple[float, float]:
    """95% bootstrap interval of the median (fixed seed: the same data gives the same text)."""
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(xs, k=len(xs))) for _ in range(n))
    return meds[int(0.025 * n)], meds[int(0.975 * n) - 1]


def floor_ratio(ratios: list[float], floor: list[float], n: int = 2000,
                seed: int = 1) -> tuple[float, float, float]:
    """(slowdown - 1) / (floor's slowdown - 1), each the median of per-round ratios to "off",
    and a 95% bootstrap interval (rounds resampled together; inf where the floor's median is
    not above 1: the noise hides the floor)."""
    def est(idx):
        a = statistics.median(ratios[i] for i in idx)
        f = statistics.median(floor[i] for i in idx)
        return (a - 1) / (f - 1) if f > 1 else float("inf")

    k = len(ratios)
    rng = random.Random(seed)
    boots = sorted(est([rng.randrange(k) for _ in range(k)]) for _ in range(n))
    return est(range(k)), boots[int(0.025 * n)], boots[int(0.975 * n) - 1]


def summarize(results, wls):
    """results[cond][wl] = per-round values (rounds aligned across conditions)."""
    summary = {}
    for cond in CONDITIONS:
        summary[cond] = {}
        for name, _unit, higher_better, *_ in wls:
            vals = results[cond][name]
            offs = results["off"][name]
            # slowdown: time ratio to the same round's "off" run, > 1 means slower
            ratios = [(o / v) if higher_better else (v / o) for v, o in zip(vals, offs)]
            q1, q3 = _quartiles(ratios)
            lo, hi = _median_ci(ratios)
            summary[cond][name] = {
                "median": statistics.median(vals), "min": min(vals), "max": max(vals),
                "best": max(vals) if higher_better else min(vals),
                "ratio_median": statistics.median(ratios), "ratio_q1": q1, "ratio_q3": q3,
                "ratio_ci95": [lo, hi],
                "ratio_min": min(ratios), "ratio_max": max(ratios),
                "values": vals, "ratios": ratios,
            }
    return summary


def table(summary, wls) -> str:
    head = ["condition"]
    for name, unit, *_ in wls:
        head += [f"{name} {unit}", f"{name} slowdown [IQR]"]
    rows = [head]
    for cond in CONDITIONS:
        row = [CONDITION_TEXT[cond]]
        for name, *_ in wls:
            s = summary[cond][name]
            row.append(f"{s['median']:.3f}")
            row.append("1 (reference)" if cond == "off" else
                       f"{s['ratio_median']:.3f}x [{s['ratio_q1']:.3f}-{s['ratio_q3']:.3f}]")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def floor_lines(summary, wls) -> list[str]:
    """Each workload against the floors and the targets; for ping-pong also the time added per
    round trip and per program hit (a round trip is 4 hits on the hot tracepoints: an arrival
    and a read on each end), and each watched condition's added time against the floors'."""
    out = []
    watched = [c for c in CONDITIONS if c.startswith("all") or c == "other"]
    for name, unit, *_ in wls:
        fl = summary["empty"][name]
        out.append(f"{name}: floor (empty) {fl['ratio_median']:.3f}x "
                   f"[95% CI {fl['ratio_ci95'][0]:.3f}-{fl['ratio_ci95'][1]:.3f}]")
        for cond in ["empty", "empty-raw"] + watched:
            sm = summary[cond][name]
            lo, hi = sm["ratio_ci95"]
            text = f"  {cond:9s} {sm['ratio_median']:.3f}x [95% CI {lo:.3f}-{hi:.3f}]"
            if cond in TARGETS:
                text += (f", target {TARGETS[cond]}x: " +
                         ("met" if hi <= TARGETS[cond] else
                          "missed" if lo > TARGETS[cond] else "not resolved"))
            if unit == "us/rt":
                added = sm["median"] - summary["off"][name]["median"]
                text += f"; +{added:.2f} us a round trip, +{added / 4 * 1000:.0f} ns a hit"
            out.append(text)
        if unit == "us/rt":  # issue 11: the water probe's added time against each floor's
            off = summary["off"][name]["median"]
            for cond in [c for c in watched if c != "other"]:
                add = summary[cond][name]["median"] - off
                for fl_name in ("empty", "empty-raw"):
                    fl_add = summary[fl_name][name]["median"] - off
                    if fl_add > 0:
                        out.append(f"  {cond} adds {add / fl_add:.2f}x what {fl_name} adds, by "
                                   "the medians of the runs (target: at most 1.5x)")
                for fl_name in ("empty", "empty-raw"):
                    est, lo, hi = floor_ratio(summary[cond][name]["ratios"],
                                              summary[fl_name][name]["ratios"])
                    out.append(f"  {cond} adds {est:.2f}x [95% CI {lo:.2f}-{hi:.2f}] what "
                               f"{fl_name} adds, by the median per-round slowdowns: "
                               "(slowdown - 1) / (floor's slowdown - 1)")
    return out


def toggle_report(tog: dict, summary, args) -> list[str]:
    return [f"toggled pass: {tog['rounds']} rounds in {tog['elapsed_s']:.0f} s "
            f"({tog['dropped']} more left out: other processes' programs), each condition "
            f"{args.toggle_slot_ms:g} ms under one long-lived C ping-pong (t-pp: wall time, "
            "t-pp-cpu: both ends' CPU time, a round trip); slowdown = ratio to the same "
            "round's 'off' slot.", "", table(summary, TOGGLE_WLS), "",
            *floor_lines(summary, TOGGLE_WLS)]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_pyping":
        return pyping(int(argv[1]), int(argv[2]), int(argv[3]), int(argv[4]))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=None,
                    help="rounds, each running every condition once (default 36; --quick: 8)")
    ap.add_argument("--quick", action="store_true", help="8 rounds")
    ap.add_argument("--json", metavar="OUT", help="write every value and the summary here")
    ap.add_argument("--c-count", type=int, default=25_000,
                    help="C ping-pong round trips a run (default 25000)")
    ap.add_argument("--py-count", type=int, default=15_000,
                    help="Python ping-pong round trips a run (default 15000; 0: skip)")
    ap.add_argument("--bulk-bytes", type=int, default=1 << 30,
                    help="bytes a bulk run streams (default 1 GiB; 0: skip)")
    ap.add_argument("--profile-rounds", type=int, default=None,
                    help="rounds of the profile pass after the timed rounds (default 3; "
                         "--quick: 2; 0: none)")
    ap.add_argument("--toggle", type=float, default=None, metavar="SECONDS",
                    help="seconds of the toggled pass after the timed rounds: conditions "
                         "switched under one long-lived C ping-pong, --toggle-slot-ms each "
                         "(default 120; --quick: 30; 0: none)")
    ap.add_argument("--toggle-slot-ms", type=float, default=100.0,
                    help="how long each condition is measured in a toggled round (default 100)")
    ap.add_argument("--wait-foreign", type=float, default=60.0, metavar="SECONDS",
                    help="before each round, wait up to this long for other processes' BPF "
                         "programs to leave the measured tracepoints (default 60); rounds that "
                         "overlap one are dropped from the summaries")
    ap.add_argument("--profile-only", action="store_true",
                    help="only the profile pass (no timed rounds)")
    ap.add_argument("--variant", action="append", default=[],
                    metavar="NAME[@DIR][:-DX=1,-DY=2]",
                    help="one more condition, all:NAME: the water probe watching everything, "
                         "built from DIR's BPF sources instead of bpf/ (another commit's), "
                         "and/or with these -D flags (replacing the loader's for the same "
                         "macros); e.g. head@/tmp/head/bpf, probe:-DOTW_KF_RDONLY_CAST=0, "
                         "hash:-DOTW_SOCKS_TYPE=\\\"hash\\\"")
    ap.add_argument("--cpu", type=int, default=None,
                    help="CPU for both ends of every workload (default: the last one); this "
                         "process and its consumer thread run on the others")
    args = ap.parse_args(argv)
    if args.rounds is None:
        args.rounds = 8 if args.quick else 36
    if args.rounds < 0:
        ap.error("--rounds must not be negative")
    if args.profile_rounds is None:
        args.profile_rounds = 2 if args.quick else 3
    if args.toggle is None:
        args.toggle = 30.0 if args.quick else 120.0
    if args.profile_only:
        args.rounds = 0
        args.toggle = 0
        args.profile_rounds = max(args.profile_rounds, 1)
    variants = {}
    for v in args.variant:
        name, _, flags = v.partition(":")
        name, _, bpf_dir = name.partition("@")
        if not name or not (flags or bpf_dir):
            ap.error(f"--variant {v!r}: NAME[@DIR][:-DX=1,-DY=2...]")
        if bpf_dir and not Path(bpf_dir, "water.c").is_file():
            ap.error(f"--variant {v!r}: no water.c in {bpf_dir}")
        variants[name] = ([f for f in flags.split(",") if f], bpf_dir or None)
        CONDITIONS.append(f"all:{name}")
        PROFILE_CONDITIONS.append(f"all:{name}")
        CONDITION_TEXT[f"all:{name}"] = (f"water, everything watched, {name} "
                                         f"({', '.join(x for x in (bpf_dir, flags) if x)})")

    cpus = sorted(os.sched_getaffinity(0))
    cpu = args.cpu if args.cpu is not None else cpus[-1]
    rest = set(cpus) - {cpu}
    if rest:
        os.sched_setaffinity(0, rest)

    from otelwater.probes import host
    host.require_can_trace()
    have_rx_sk = host.kfree_skb_has_rx_sk()

    machine = {
        "command": " ".join([sys.executable, *sys.argv]),
        "kernel": platform.release(),
        "nproc": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "workload_cpu": cpu,
        "bench_cpus": sorted(rest),
        "bpf_stats_enabled": _read("/proc/sys/kernel/bpf_stats_enabled"),
        "bpf_jit_enable": _read("/proc/sys/net/core/bpf_jit_enable"),
        "rounds": args.rounds,
        "kfree_skb_rx_sk": have_rx_sk,
    }
    print(f"command: {machine['command']}")
    print(f"machine: Linux {machine['kernel']}, nproc {machine['nproc']}, {machine['cpu_model']}")
    print(f"pinning: workloads (both ends) on CPU {cpu}; this process and the consumer on "
          f"{sorted(rest) or 'the same CPU'}; bpf_jit_enable={machine['bpf_jit_enable']} "
          f"bpf_stats_enabled={machine['bpf_stats_enabled']}")
    if machine["bpf_stats_enabled"] not in ("0", None):
        print("warning: kernel.bpf_stats_enabled=1 adds two clock reads per program run")

    progs, closers = load_conditions(have_rx_sk, variants)
    consumer = Consumer()
    consumer.start()
    print("attach points (each condition): " + ", ".join(progs["all"].names()))
    try:
        with tempfile.TemporaryDirectory(prefix="otw-bench-") as tmp:
            driver, note = build_driver(tmp)
            print(f"driver: {note}")
            wls = workloads(args, driver, cpu)
            print(f"a run: c-pp {args.c_count} round trips of 64 B; py-pp {args.py_count} "
                  f"round trips of 64 B; bulk {args.bulk_bytes / 2**30:g} GiB in 64 KiB writes")
            print(f"rounds: {args.rounds}; each runs every condition once, in an order that "
                  f"rotates from round to round\n", flush=True)
            results = {c: {w[0]: [] for w in wls} for c in CONDITIONS}
            t_start = time.monotonic()
            foreign = Foreign(args.wait_foreign)
            dirty: list[bool] = []
            for r in range(args.rounds):
                k = r % len(CONDITIONS)
                order = CONDITIONS[k:] + CONDITIONS[:k]
                was = foreign.before()
                for cond in order:
                    p = progs[cond]
                    if p is not None:
                        p.attach()
                        if p.probe is not None:
                            consumer.switch((cond, p.probe))
                    try:
                        time.sleep(0.05)
                        for name, v in run_workloads(wls).items():
                            results[cond][name].append(v)
                    finally:
                        if p is not None:
                            consumer.switch(None)
                            p.detach()
                dirty.append(foreign.after() or was)
                if (r + 1) % max(1, args.rounds // 6) == 0 or r + 1 == args.rounds:
                    print(f"round {r + 1}/{args.rounds} ({time.monotonic() - t_start:.0f} s)",
                          flush=True)
            elapsed = time.monotonic() - t_start
            tog = None
            if args.toggle > 0 and driver:
                print(f"toggled pass: {args.toggle:g} s, {args.toggle_slot_ms:g} ms a condition",
                      flush=True)
                t0 = time.monotonic()
                tog_results, tog_dirty = toggle_pass(progs, consumer, driver, cpu, args.toggle,
                                                     args.toggle_slot_ms / 1e3, foreign)
                tog_results, tog_dropped = clean_rounds(tog_results, tog_dirty)
                tog = {"results": tog_results, "rounds": len(tog_dirty) - tog_dropped,
                       "dropped": tog_dropped, "elapsed_s": time.monotonic() - t0}
            prof = None
            pp_cmd = next((w[3] for w in wls if w[0] == "c-pp"), None)
            if args.profile_rounds > 0 and pp_cmd is not None:
                print(f"profile pass: {args.profile_rounds} rounds", flush=True)
                prof = profile_pass(progs, consumer, pp_cmd,
                                    args.c_count + args.c_count // 10, args.profile_rounds,
                                    foreign)
    finally:
        consumer.stop.set()
        consumer.join()
        lost = {c: (progs[c].probe.lost_total() if progs[c] and progs[c].probe else 0)
                for c in CONDITIONS}
        for close in closers:
            close()

    if args.rounds == 0:   # only the toggled and profile passes
        tog_summary = None
        if tog is not None:
            tog_summary = summarize(tog["results"], TOGGLE_WLS)
            print("\n" + "\n".join(toggle_report(tog, tog_summary, args)))
        if prof is not None:
            print("\n" + "\n".join(profile_report(prof)))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"machine": machine, "args": vars(args), "profile": prof,
                           "toggle": None if tog is None else
                           {"rounds": tog["rounds"], "elapsed_s": tog["elapsed_s"],
                            "summary": tog_summary}}, f, indent=1)
        return 0
    results, dropped = clean_rounds(results, dirty)
    summary = summarize(results, wls)
    print(f"\n{args.rounds} rounds in {elapsed:.0f} s. Medians over rounds; slowdown = time "
          f"ratio to the same round's 'off' run (> 1 is slower), median [interquartile range].")
    if foreign.seen:
        print(f"{len(foreign.seen)} other processes had programs on these tracepoints during "
              f"the rounds (pids {', '.join(sorted(foreign.seen, key=int)[:8])}"
              f"{', ...' if len(foreign.seen) > 8 else ''}); waited {foreign.waited_s:.0f} s "
              "for them; "
              + (f"{dropped} rounds they overlapped are left out" if dropped else
                 "every round overlapped one: NOTHING left out, the figures are theirs too"))
    print()
    print(table(summary, wls))
    print()
    watched = [c for c in CONDITIONS if c.startswith("all") or c == "other"]
    for cond in watched:
        wall = consumer.wall_s.get(cond, 0.0)
        pct = 100 * consumer.cpu_s.get(cond, 0.0) / wall if wall else 0.0
        print(f"consumer ({cond}): {consumer.records.get(cond, 0)} records, {lost[cond]} lost, "
              f"{pct:.2f}% of a CPU while attached")
    print("\n".join(floor_lines(summary, wls)))
    tog_summary = None
    if tog is not None:
        tog_summary = summarize(tog["results"], TOGGLE_WLS)
        print("\n" + "\n".join(toggle_report(tog, tog_summary, args)))
    if prof is not None:
        print("\n" + "\n".join(profile_report(prof)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "args": vars(args), "elapsed_s": elapsed,
                       "summary": summary, "profile": prof,
                       "toggle": None if tog is None else
                       {"rounds": tog["rounds"], "elapsed_s": tog["elapsed_s"],
                        "summary": tog_summary},
                       "consumer": {"records": consumer.records, "cpu_s": consumer.cpu_s,
                                    "wall_s": consumer.wall_s},
                       "lost": lost}, f, indent=1)
        print(f"\nwrote {args.json}")
    return 0


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


if __name__ == "__main__":
    sys.exit(main())
