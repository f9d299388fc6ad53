#!/usr/bin/env python3
"""otelwater's own cost: the CPU and memory of the `otelwater watch` process, running the real
CLI against a Go service doing 1,000 to 20,000 slow reads a second, or holding 2,000 idle
keep-alive connections.

    .venv/bin/python bench/self_cost.py [--quick] [--window S] [--rows NAME,...] [--json OUT]
        [--profile ROW] [--keep] [--tree NAME=DIR ...] [--rounds N]

Each row is one run: a fresh examples/bin/slowreader (-mode echo), examples/bin/loadgen
pingpong clients driving it (64-byte messages), then

    otelwater watch --go-pid PID --json --duration D [--include-idle] [...] > FILE

(the live-view rows write to a pseudo-terminal of 50x120 instead, the OTLP row adds
--otlp-endpoint to a local gRPC receiver, tests/integration/otlp_receiver.py, in another
process). A slow read is a Go Read that waited >= 1 ms (the default --blocked-ms). In the rate
rows every Read of the server parks waiting for the client's next message and the clients
pause 2 ms between messages (1 s in the keep-alive rows), so the slow-read rate is set by the
number of connections. Those reads are verdict "idle" (the peer owed nothing): by default the
kernel counts them and records none; with --include-idle each one is recorded in full (ring
buffer, stack, verdict, JSON line): the heavy path. The "-lag" row records slow reads by
default instead: the server sleeps 25 ms after each echo and the clients do not pause, so
every Read finds a message that waited in the queue (consumer-lagging). The record token
bucket (--record-rate, 1,000 a second) and the ring buffer size (64 pages) stay at their
defaults except in the "-rb" rows (--ringbuf-pages 1024: nothing lost) and "5k-idle-all"
(--record-rate 0 --ringbuf-pages 1024: every slow read recorded and paid for, what a recorded
read costs).

Measured, over the steady part of each run (from --settle s after otelwater says it is
tracing, i.e. after the BPF compile and attach, for --window seconds):
  CPU     utime+stime of the otelwater process (/proc/PID/stat, every thread), % of one core
  RSS     VmRSS at the window's start and end and its maximum (sampled every 0.5 s);
          VmHWM (peak, the BPF compile included) at the window's end
  rate    slow reads a second from otelwater's own "counts" records (the kernel's cumulative
          count per pid/role/verdict, exact): between the first and the last sweep inside the
          window, all verdicts; of those, recorded (put on the ring buffer) and cut (kept off
          it by a token bucket); records lost (otelwater's "lost" records in the window);
          beside them the server's read(2) calls a second (/proc/PID/io syscr: a Go Read
          that parks is two read(2), one that finds data waiting is one), the only rate of
          the live-view rows
and, for the whole run, the CPU and peak RSS of the process from wait4 (compile included).

--tree NAME=DIR (repeatable): compare source trees side by side, e.g. this checkout against a
copy of it with otelwater's files as they were before a change: each row runs once per tree
and round, the trees one after the other (their order turned every round), otelwater started
as `python -m otelwater` with PYTHONPATH=DIR from DIR (its bpf/ too); --rounds N (default 1)
repeats that. The table then gives each tree's figures side by side (the median of the rounds,
with each round's in the JSON).

--profile ROW: run that row once more under `py-spy record --gil --function --format raw` for
the window and print the functions holding the most samples (self and inclusive), as a share
of the samples and as that share of the run's measured CPU.

Nothing is pinned: the service, its clients and otelwater share the machine's CPUs, as they
would in production. Run it on an idle machine; the 1-minute load average at each run's end
and the number of other otelwater processes are printed with the row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import pty
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

TICK = os.sysconf("SC_CLK_TCK")
PER_CONN_OVERHEAD_S = 0.0007   # a round trip + Go's timer overshoot (measured: ~373 msgs/s a
                               # connection with -pause 2ms on the 2-vCPU test VM)
GOAL_RATE, GOAL_PCT = 5000, 10.0   # the goal: under 10% of a core at 5,000 slow reads/s

# name -> (target slow reads/s or None, conns or None, pause, output, extra flags, text);
# "-delay" rows: slowreader sleeps that long after each echo and the clients do not pause, so
# each Read finds a message that waited in the queue (verdict consumer-lagging, recorded by
# default: the heavy path without --include-idle). The kernel records at most 50 such reads a
# socket a second (OTW_QSLOW_PER_S), so the connections each make ~40 a second (25 ms)
ROWS = {
    "1k":          (1_000, None, "2ms", "json", [], "1,000/s, counted"),
    "1k-idle":     (1_000, None, "2ms", "json", ["--include-idle"], "1,000/s, --include-idle"),
    "5k":          (5_000, None, "2ms", "json", [], "5,000/s, counted"),
    "5k-idle":     (5_000, None, "2ms", "json", ["--include-idle"], "5,000/s, --include-idle"),
    "5k-idle-rb":  (5_000, None, "2ms", "json", ["--include-idle", "--ringbuf-pages", "1024"],
                    "5,000/s, --include-idle, --ringbuf-pages 1024"),
    "5k-idle-all": (5_000, None, "2ms", "json", ["--include-idle", "--record-rate", "0",
                                                 "--ringbuf-pages", "1024"],
                    "5,000/s, --include-idle --record-rate 0 --ringbuf-pages 1024 "
                    "(every slow read recorded, none lost)"),
    "5k-lag":      (5_000, None, "-delay 25ms", "json", [],
                    "5,000/s consumer-lagging (server -delay 25ms), default flags"),
    "20k":         (20_000, None, "2ms", "json", [], "20,000/s, counted"),
    "20k-idle":    (20_000, None, "2ms", "json", ["--include-idle"],
                    "20,000/s, --include-idle"),
    "20k-idle-rb": (20_000, None, "2ms", "json", ["--include-idle", "--ringbuf-pages", "1024"],
                    "20,000/s, --include-idle, --ringbuf-pages 1024"),
    "keepalive":   (None, 2000, "1s", "json", [], "2,000 keep-alive conns, counted"),
    "keepalive-idle": (None, 2000, "1s", "json", ["--include-idle"],
                       "2,000 keep-alive conns, --include-idle"),
    "keepalive-quiet": (None, 2000, "30s", "json", [],
                        "2,000 keep-alive conns, a message each 30 s, counted"),
    "5k-live":     (5_000, None, "2ms", "pty", [], "5,000/s, live view (pty), counted"),
    "5k-idle-live": (5_000, None, "2ms", "pty", ["--include-idle"],
                     "5,000/s, live view (pty), --include-idle"),
    "5k-idle-otlp": (5_000, None, "2ms", "json", ["--include-idle", "--otlp-endpoint"],
                     "5,000/s, --include-idle, --json + OTLP gRPC"),
}
DEFAULT_ROWS = ["1k", "1k-idle", "5k", "5k-idle", "5k-idle-rb", "5k-idle-all", "5k-lag", "20k",
                "20k-idle", "20k-idle-rb", "keepalive", "keepalive-idle", "5k-idle-live",
                "5k-idle-otlp"]
QUICK_ROWS = ["1k", "5k", "5k-idle", "20k-idle", "keepalive"]


def conns_for(rate: int, pause_s: float) -> int:
    return max(1, round(rate * (pause_s + PER_CONN_OVERHEAD_S)))


def parse_pause(text: str) -> float:
    return float(text[:-2]) / 1e3 if text.endswith("ms") else float(text[:-1])


# -- /proc ----------------------------------------------------------------------------------
def proc_cpu(pid: int) -> tuple[float, float]:
    """(utime, stime) seconds of the whole process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICK, int(fields[12]) / TICK


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile (kB), Threads (bench/agent_soak.py and agent_cost.py
    use it too)."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "Threads", "RssAnon", "RssFile"):
                out[k] = int(v.split()[0])
    return out


def proc_syscr(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                if line.startswith("syscr:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_by_mapping(pid: int, top: int = 6) -> list[tuple[str, float]]:
    """The mappings holding the most resident memory (MiB), by file ([anon] for the heap and
    anonymous mappings), from /proc/PID/smaps."""
    by: dict[str, int] = defaultdict(int)
    name = "?"
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                head = line.split()
                if not head:
                    continue
                if "-" in head[0] and not head[0].endswith(":"):
                    path = head[5] if len(head) > 5 else "[anon]"
                    name = os.path.basename(path) if path.startswith("/") else (
                        path if path.startswith("[") else "[anon]")
                elif head[0] == "Rss:":
                    by[name] += int(head[1])
    except OSError:
        return []
    return [(k, round(v / 1024, 1)) for k, v in sorted(by.items(), key=lambda x: -x[1])[:top]]


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def other_otelwaters(mine: set[int]) -> int:
    """How many other otelwater processes (others' tests) run now."""
    n = 0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) in mine:
            continue
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(b"otelwater" in c for c in cmd[:3]) and (b"watch" in cmd or b"record" in cmd):
            n += 1
    return n


# -- the service and its clients -------------------------------------------------------------
class Service:
    """slowreader -mode echo and loadgen pingpong clients, until stop()."""

    def __init__(self, args, conns: int, pause: str, tmp: str, server_flags=()):
        path = Path(tmp) / "server.out"
        with open(path, "w") as out:
            self.server = subprocess.Popen([args.slowreader, "-mode", "echo", *server_flags],
                                           stdout=out,
                                           stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        info = None
        while time.monotonic() < deadline:
            line = path.read_text().partition("\n")
            if line[1]:
                info = json.loads(line[0])
                break
            time.sleep(0.02)
        if info is None:
            self.server.kill()
            raise RuntimeError("slowreader did not say where it listens")
        self.pid, self.addr = info["pid"], info["listening"]
        self.client = subprocess.Popen(
            [args.loadgen, "-addr", self.addr, "-conns", str(conns), "-mode", "pingpong",
             "-size", "64", "-pause", pause, "-duration", "3600s"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        for p in (self.client, self.server):
            if p.poll() is None:
                p.kill()
            p.wait(10)


class Receiver:
    """tests/integration/otlp_receiver.py in its own process (gRPC)."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.integration.otlp_receiver",
                                      "grpc"], cwd=ROOT, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.endpoint = json.loads(self.proc.stdout.readline())["endpoint"]

    def counts(self) -> dict:
        self.proc.stdin.close()
        out = json.loads(self.proc.stdout.readline() or "{}")
        self.proc.wait(20)
        return out


def otelwater_cmd(tree: str | None = None) -> list[str]:
    exe = Path(sys.executable).parent / "otelwater"
    if tree is None and exe.exists():
        return [str(exe)]
    return [sys.executable, "-m", "otelwater"]


class PtyDrain(threading.Thread):
    """The terminal side of the live view: a pty of 50x120, read and thrown away."""

    def __init__(self):
        super().__init__(daemon=True)
        import fcntl
        import termios
        self.master, self.slave = pty.openpty()
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 120, 0, 0))
        self.bytes = 0

    def run(self):
        while True:
            try:
                b = os.read(self.master, 65536)
            except OSError:
                return
            if not b:
                return
            self.bytes += len(b)


# -- one run ----------------------------------------------------------------------------------
def run_row(name: str, args, tmp: str, profile: bool = False, tree=None) -> dict:
    """tree: (name, directory) of the source tree to run, or None (this checkout)."""
    rate, conns, pause, output, extra, text = ROWS[name]
    server_flags: list[str] = []
    if pause.startswith("-delay "):          # the server paces: no client pause
        server_flags = pause.split()
        pause = "0s"
    pause_s = parse_pause(server_flags[1] if server_flags else pause)
    conns = conns or conns_for(rate, pause_s)
    svc = Service(args, conns, pause, tmp, server_flags)
    rx = drain = proc = None
    out_path = os.path.join(tmp, f"{name}.jsonl")
    err_path = os.path.join(tmp, f"{name}.err")
    settle, window = args.settle, args.window
    try:
        flags = []
        for f in extra:
            if f == "--otlp-endpoint":
                rx = Receiver()
                flags += ["--otlp-endpoint", rx.endpoint]
            else:
                flags.append(f)
        if output == "json":
            flags.append("--json")
        duration = f"{settle + window + 1.0:g}"
        cmd = [*otelwater_cmd(tree and tree[1]), "watch", "--go-pid", str(svc.pid), *flags,
               "--duration", duration]
        env = dict(os.environ, TERM="xterm-256color", COLUMNS="120", LINES="50")
        env.pop("OTELWATER_CONFIG", None)
        cwd = ROOT
        if tree is not None:
            env["PYTHONPATH"] = cwd = tree[1]
        shown = [("URL" if f.startswith("http://") else f) for f in flags]
        res: dict = {"row": name, "text": text, "conns": conns, "pause": pause,
                     "tree": tree[0] if tree else None,
                     "server_flags": server_flags,
                     "command": " ".join(["otelwater watch --go-pid PID", *shown,
                                          "--duration", duration])
                     + (" > FILE" if output == "json" else " (stdout: a pty)")}
        time.sleep(1.0 if conns < 1000 else 2.0)   # the clients connected and running
        err = open(err_path, "w")
        if output == "pty":
            drain = PtyDrain()
            stdout = drain.slave
        else:
            stdout = open(out_path, "w")
        w_start = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=stdout, stderr=err, stdin=subprocess.DEVNULL,
                                env=env, cwd=cwd)
        if drain is not None:
            os.close(drain.slave)
            drain.start()
        else:
            stdout.close()
        err.close()
        # the end of the BPF compile and attach: otelwater says it is tracing
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if "Tracing TCP receive queues" in Path(err_path).read_text():
                break
            if proc.poll() is not None:
                raise RuntimeError(f"otelwater exited {proc.returncode}: "
                                   f"{Path(err_path).read_text()[-2000:]}")
            time.sleep(0.05)
        else:
            raise RuntimeError("otelwater did not start tracing in 180 s")
        t_attach = time.monotonic()
        res["startup_s"] = t_attach - w_start
        time.sleep(settle)
        spy = None
        if profile:
            prof_path = os.path.join(tmp, f"{name}.raw")
            spy = subprocess.Popen([args.py_spy, "record", "--pid", str(proc.pid), "--format",
                                    "raw", "--rate", str(args.profile_rate), "--duration",
                                    f"{window:g}", "--output", prof_path, "--threads",
                                    "--gil", "--function"]
                                   + (["--native"] if args.native else []),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        ta_ns = time.monotonic_ns()
        ut0, st0 = proc_cpu(proc.pid)
        s0 = proc_status(proc.pid)
        sc0 = proc_syscr(svc.pid)
        rss_max = s0["VmRSS"]
        rss_series = [(0.0, s0["VmRSS"])]
        end = time.monotonic() + window
        while True:
            left = end - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(0.5, left))
            try:
                rss = proc_status(proc.pid)["VmRSS"]
                rss_max = max(rss_max, rss)
                rss_series.append((round((time.monotonic_ns() - ta_ns) / 1e9, 2), rss))
            except OSError:
                break
        tb_ns = time.monotonic_ns()
        ut1, st1 = proc_cpu(proc.pid)
        s1 = proc_status(proc.pid)
        sc1 = proc_syscr(svc.pid)
        res["rss_by_mapping_mib"] = rss_by_mapping(proc.pid)
        wall = (tb_ns - ta_ns) / 1e9
        res["others_running"] = other_otelwaters({proc.pid, os.getpid()})
        # the whole run: wait4 gives the CPU and peak RSS from exec to exit
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                break
            time.sleep(0.05)
        else:
            proc.kill()
            pid, status, ru = os.wait4(proc.pid, 0)
            proc.returncode = -9
        res["exit_code"] = proc.returncode
        res["run_s"] = time.monotonic() - w_start
        res["run_cpu_s"] = ru.ru_utime + ru.ru_stime
        res["run_maxrss_mib"] = ru.ru_maxrss / 1024
        if spy is not None:
            _, perr = spy.communicate(timeout=window + 30)
            res["profile"] = summarize_profile(prof_path, args.profile_rate, window)
            res["profile"]["raw"] = prof_path if args.keep else None
            res["profile"]["py_spy_stderr"] = perr.strip()[-500:]
        res.update({
            "window_s": wall,
            "cpu_pct": 100 * ((ut1 - ut0) + (st1 - st0)) / wall,
            "user_pct": 100 * (ut1 - ut0) / wall, "sys_pct": 100 * (st1 - st0) / wall,
            "rss_start_mib": s0["VmRSS"] / 1024, "rss_end_mib": s1["VmRSS"] / 1024,
            "rss_max_mib": rss_max / 1024, "hwm_mib": s1["VmHWM"] / 1024,
            "threads": s1["Threads"], "rss_series_kib": rss_series,
            "server_read2_per_s": (sc1 - sc0) / wall,
            "loadavg": loadavg(),
        })
        if output == "json":
            res.update(rates_from_counts(out_path, svc.pid, ta_ns, tb_ns))
        else:
            res["pty_bytes"] = drain.bytes
        last = [ln for ln in Path(err_path).read_text().splitlines() if ln.startswith("otelwater:")]
        res["closing_line"] = last[-1] if last else ""
        if rx is not None:
            res["otlp_received"] = rx.counts()
            rx = None
    finally:
        if proc is not None and proc.returncode is None and proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if drain is not None:
            try:
                os.close(drain.master)
            except OSError:
                pass
        if rx is not None:
            rx.proc.kill()
            rx.proc.wait(10)
        svc.stop()
        if os.path.exists(out_path) and not args.keep:
            os.unlink(out_path)
    return res


def rates_from_counts(path: str, pid: int, ta_ns: int, tb_ns: int) -> dict:
    """Slow reads a second over the window from the cumulative "counts" records: the totals at
    the first and the last sweep inside [ta, tb]; also what every record type numbered."""
    latest: dict = {}
    sweeps: list[tuple[int, dict]] = []   # (ts, {verdict: (reads, recorded, cut)}) per sweep
    kinds: dict[str, int] = defaultdict(int)
    lost = lost_in = 0
    with open(path) as f:
        for line in f:
            try:
                r = json.loads(line)
            except ValueError:
                continue
            kind = r.get("type", "snapshot" if "sock_key" in r else "?")
            kinds[kind] += 1
            if kind == "lost":
                lost += r.get("count") or 0
                if ta_ns <= r.get("ts_ns", 0) <= tb_ns:
                    lost_in += r.get("count") or 0
            if kind != "counts" or r.get("pid") != pid:
                continue
            latest[(r["role"], r["verdict"])] = (r["reads"], r["recorded"], r["cut"])
            ts = r["ts_ns"]
            if sweeps and sweeps[-1][0] == ts:
                sweeps[-1] = (ts, dict(latest))
            else:
                sweeps.append((ts, dict(latest)))
    inside = [s for s in sweeps if ta_ns <= s[0] <= tb_ns]
    out = {"records": dict(kinds), "lost_records": lost,
           "lost_per_s": lost_in / ((tb_ns - ta_ns) / 1e9), "sweeps_in_window": len(inside)}
    if len(inside) < 2:
        return out
    (t0, a), (t1, b) = inside[0], inside[-1]
    dt = (t1 - t0) / 1e9

    def total(d, i, verdict=None):
        return sum(v[i] for (_role, vd), v in d.items() if verdict in (None, vd))

    out["slow_per_s"] = (total(b, 0) - total(a, 0)) / dt
    out["idle_per_s"] = (total(b, 0, "idle") - total(a, 0, "idle")) / dt
    out["recorded_per_s"] = (total(b, 1) - total(a, 1)) / dt
    out["cut_per_s"] = (total(b, 2) - total(a, 2)) / dt
    out["by_verdict_per_s"] = {vd: round((sum(v[0] for (_r, x), v in b.items() if x == vd)
                                          - sum(v[0] for (_r, x), v in a.items() if x == vd))
                                         / dt, 1)
                               for vd in sorted({k[1] for k in b})}
    return out


# -- profile -----------------------------------------------------------------------------------
def summarize_profile(path: str, rate: int, window: float, top: int = 25) -> dict:
    """py-spy raw output ("frame;frame;... count" per stack, root first; --gil: samples of
    the thread holding the GIL, i.e. running Python) -> the functions holding the most
    samples, self (leaf) and inclusive, and the threads, as % of the samples."""
    selfc: dict[str, int] = defaultdict(int)
    incl: dict[str, int] = defaultdict(int)
    threads: dict[str, int] = defaultdict(int)
    total = 0
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return {"error": "no profile written"}
    for line in lines:
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        n = int(n)
        frames = stack.split(";")
        total += n
        th = next((f for f in frames if f.startswith("thread (")), "?")
        threads[th] += n
        funcs = [f for f in frames if not f.startswith(("thread (", "process "))]
        if funcs:
            selfc[funcs[-1]] += n
        for f in set(funcs):
            incl[f] += n
    scale = 100.0 / max(1, total)   # samples -> % of the samples

    def best(d):
        # the frames every sample has (the command's entry chain) say nothing: left out
        items = [(k, v) for k, v in d.items() if v < total or d is threads]
        return [(k, round(v * scale, 2)) for k, v in sorted(items, key=lambda x: -x[1])[:top]]

    return {"samples": total, "cpu_pct_sampled": round(100 * total / (rate * window), 2),
            "self": best(selfc), "inclusive": best(incl), "threads": best(threads)}


# -- report -------------------------------------------------------------------------------------
def fmt_rate(r: dict) -> str:
    return f"{r['slow_per_s']:,.0f}" if "slow_per_s" in r else "-"


def table(results: list[dict]) -> str:
    head = ["row", "conns", "slow reads/s (counts)", "recorded/s", "cut/s", "lost/s",
            "server read(2)/s",
            "otelwater CPU % core (user+sys)", "RSS MiB start/end/max", "peak RSS (VmHWM)",
            "load"]
    rows = [head]
    for r in results:
        rows.append([
            (f"[{r['tree']}] " if r.get("tree") else "") + r["text"], str(r["conns"]),
            fmt_rate(r),
            f"{r['recorded_per_s']:,.0f}" if "recorded_per_s" in r else "-",
            f"{r['cut_per_s']:,.0f}" if "cut_per_s" in r else "-",
            f"{r['lost_per_s']:,.0f}" if "lost_per_s" in r else "-",
            f"{r['server_read2_per_s']:,.0f}",
            f"{r['cpu_pct']:.1f} ({r['user_pct']:.1f}+{r['sys_pct']:.1f})",
            f"{r['rss_start_mib']:.0f}/{r['rss_end_mib']:.0f}/{r['rss_max_mib']:.0f}",
            f"{r['hwm_mib']:.0f}",
            f"{r['loadavg']:.1f}",
        ])
    widths = [max(len(x[i]) for x in rows) for i in range(len(head))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(x, widths)) + " |" for x in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def table_ab(results: list[dict], trees: list[str]) -> str:
    """The trees side by side: per row, each tree's median over the rounds (CPU % of a core,
    user+sys; slow reads, recorded and lost a second; µs of CPU per recorded read where most
    slow reads were recorded), and the first tree's CPU over each other's."""
    import statistics

    def med(rs, key):
        vals = [r[key] for r in rs if key in r]
        return statistics.median(vals) if vals else None

    head = ["row", "conns"]
    for t in trees:
        head += [f"{t}: CPU % core (user+sys)", f"{t}: slow/recorded/lost a s"]
    head += [f"{trees[0]}/{t} CPU" for t in trees[1:]]
    head += [f"{t}: µs a recorded read" for t in trees]
    rows = [head]
    order = list(dict.fromkeys(r["row"] for r in results))
    for name in order:
        rs = {t: [r for r in results if r["row"] == name and r.get("tree") == t] for t in trees}
        first = next(r for r in results if r["row"] == name)
        cells = [first["text"], str(first["conns"])]
        cpu = {}
        for t in trees:
            c, u, sy = (med(rs[t], k) for k in ("cpu_pct", "user_pct", "sys_pct"))
            cpu[t] = c
            each = ", ".join(f"{r['cpu_pct']:.1f}" for r in rs[t])
            cells.append(f"**{c:.1f}** ({u:.1f}+{sy:.1f}; runs: {each})" if c is not None
                         else "-")
            sl, rec, lo = (med(rs[t], k) for k in ("slow_per_s", "recorded_per_s", "lost_per_s"))
            cells.append("/".join("-" if x is None else f"{x:,.0f}" for x in (sl, rec, lo)))
        for t in trees[1:]:
            cells.append(f"{cpu[trees[0]] / cpu[t]:.1f}x" if cpu[t] else "-")
        for t in trees:
            c, rec, sl = cpu[t], med(rs[t], "recorded_per_s"), med(rs[t], "slow_per_s")
            cells.append(f"{c / 100 / rec * 1e6:.1f}" if c and rec and sl and rec > sl / 2
                         else "")
        rows.append(cells)
    widths = [max(len(x[i]) for x in rows) for i in range(len(head))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(x, widths)) + " |" for x in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def print_profile(name: str, p: dict, cpu_pct: float) -> None:
    if "error" in p:
        print(f"\nprofile of {name}: {p['error']}")
        return
    print(f"\nprofile of {name} (py-spy --gil, {p['samples']} samples holding the GIL over "
          f"the window, {p['cpu_pct_sampled']:.1f}% of the sampling slots; "
          f"'% core' = share of the samples x the run's measured {cpu_pct:.1f}% CPU):")
    print("  per thread: " + "; ".join(f"{k} {v:.1f}%" for k, v in p["threads"]))
    print("  self:      share  % core  function")
    for k, v in p["self"]:
        print(f"          {v:6.1f}%  {v * cpu_pct / 100:6.2f}  {k}")
    print("  inclusive: share  % core  function (the command's entry frames left out)")
    for k, v in p["inclusive"]:
        print(f"          {v:6.1f}%  {v * cpu_pct / 100:6.2f}  {k}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help=f"rows {','.join(QUICK_ROWS)} with a 4 s window (~1 minute)")
    ap.add_argument("--rows", help=f"comma-separated rows of: {', '.join(ROWS)} "
                                   f"(default: {','.join(DEFAULT_ROWS)}; none: only --profile)")
    ap.add_argument("--window", type=float, default=None,
                    help="seconds measured in each run, after the compile (default 12; "
                         "--quick: 4)")
    ap.add_argument("--settle", type=float, default=1.0,
                    help="seconds between otelwater saying it traces and the window (default 1)")
    ap.add_argument("--profile", metavar="ROW",
                    help="also run ROW once under py-spy and print the top functions")
    ap.add_argument("--profile-rate", type=int, default=200, help="py-spy samples/s (200)")
    ap.add_argument("--native", action="store_true", help="py-spy --native (C frames too)")
    ap.add_argument("--json", metavar="OUT", help="write every figure here")
    ap.add_argument("--keep", action="store_true", help="keep each run's JSON Lines output")
    ap.add_argument("--tree", action="append", default=[], metavar="NAME=DIR",
                    help="a source tree to run (repeatable): the rows run for each, side by "
                         "side (default: this checkout, as installed)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="runs of each row and tree (the trees' order turned every round)")
    ap.add_argument("--slowreader", default=str(ROOT / "examples/bin/slowreader"))
    ap.add_argument("--loadgen", default=str(ROOT / "examples/bin/loadgen"))
    args = ap.parse_args(argv)
    trees: list = []
    for t in args.tree:
        name, eq, path = t.partition("=")
        if not eq or not (Path(path) / "otelwater").is_dir():
            ap.error(f"--tree {t!r}: give NAME=DIR, DIR holding otelwater/ and bpf/")
        trees.append((name, str(Path(path).resolve())))
    trees = trees or [None]
    names = (([] if args.rows == "none" else args.rows.split(",")) if args.rows
             else QUICK_ROWS if args.quick else DEFAULT_ROWS)
    for n in names + ([args.profile] if args.profile else []):
        if n not in ROWS:
            ap.error(f"unknown row {n!r}: one of {', '.join(ROWS)}")
    if args.window is None:
        args.window = 4.0 if args.quick else 12.0
    if os.geteuid() != 0:
        ap.error("run as root: otelwater watch loads BPF programs")
    args.py_spy = str(Path(sys.executable).parent / "py-spy")
    if args.profile and not os.path.exists(args.py_spy):
        args.py_spy = shutil.which("py-spy") or ap.error("--profile needs py-spy")

    # 2,000 connections are 4,000 sockets on this host (loadgen's and slowreader's ends): the
    # children inherit this limit (Go raises its soft limit to the hard one itself, too)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 16384
    if hard != resource.RLIM_INFINITY and hard < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
        except (ValueError, OSError):
            pass
    else:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(want, hard)), hard))

    machine = {
        "command": " ".join([sys.executable, *sys.argv]) if argv is None else repr(argv),
        "kernel": platform.release(), "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "nofile": resource.getrlimit(resource.RLIMIT_NOFILE),
        "loadavg_start": Path("/proc/loadavg").read_text().strip(),
    }
    print(f"command: {machine['command']}")
    print(f"machine: Linux {machine['kernel']}, nproc {machine['nproc']}, Python "
          f"{machine['python']}; load average at start {machine['loadavg_start']}")
    print(f"each run: slowreader -mode echo, loadgen -mode pingpong -size 64 -conns N -pause P; "
          f"otelwater {' '.join(otelwater_cmd(trees[0] and trees[0][1])[1:]) or otelwater_cmd()[0]}"
          f"{' (PYTHONPATH=DIR, from DIR)' if trees[0] else ''} watch --go-pid PID ... --duration "
          f"{args.settle + args.window + 1:g}; CPU and RSS over {args.window:g} s starting "
          f"{args.settle:g} s after the attach\n", flush=True)
    results = []
    t0 = time.monotonic()
    keep = tempfile.mkdtemp(prefix="otw-selfcost-") if args.keep else None
    with tempfile.TemporaryDirectory(prefix="otw-selfcost-") as tmp:
        tmp = keep or tmp
        for n in names:
            for rnd in range(args.rounds):
                order = trees if rnd % 2 == 0 else trees[::-1]
                for tree in order:
                    r = run_row(n, args, tmp, tree=tree)
                    r["round"] = rnd
                    results.append(r)
                    extra = (f", by verdict {r['by_verdict_per_s']}"
                             if "by_verdict_per_s" in r else "")
                    who = f"[{tree[0]}] " if tree else ""
                    print(f"{who}{n}: {r['cpu_pct']:.1f}% of a core, {fmt_rate(r)} slow "
                          f"reads/s{extra}; startup {r['startup_s']:.1f} s; run "
                          f"{r['run_cpu_s']:.2f} s CPU in {r['run_s']:.1f} s, max RSS "
                          f"{r['run_maxrss_mib']:.0f} MiB; exit {r['exit_code']}; load "
                          f"{r['loadavg']:.1f}; {r['others_running']} other otelwater "
                          f"processes ({time.monotonic() - t0:.0f} s)\n  {r['command']}",
                          flush=True)
        profs = []
        if args.profile:
            for tree in trees:
                profs.append(run_row(args.profile, args, tmp, profile=True, tree=tree))
    elapsed = time.monotonic() - t0

    print(f"\n{len(results)} runs in {elapsed:.0f} s. CPU: utime+stime of the otelwater "
          f"process over the {args.window:g}-s window, % of one core. Slow reads/s: "
          f"otelwater's counts records over the window (every verdict); server read(2)/s: "
          f"slowreader's (/proc/PID/io syscr; a Go Read that parks is 2, one that finds data "
          f"waiting 1).\n")
    if len(trees) > 1:
        print(table_ab(results, [t[0] for t in trees]))
        print()
    print(table(results))
    print()
    for r in results:
        if r.get("slow_per_s") and r["row"].startswith(("5k", "20k", "1k")):
            per = r["cpu_pct"] / 100 / r["slow_per_s"] * 1e6
            who = f"[{r['tree']}] " if r.get("tree") else ""
            print(f"{who}{r['row']}: {per:.1f} us of otelwater CPU per slow read"
                  + (f" ({r['cpu_pct'] / 100 / r['recorded_per_s'] * 1e6:.1f} us per "
                     f"recorded one)" if r.get("recorded_per_s", 0) > r["slow_per_s"] / 2
                     else ""))
    for r in results:
        if r["row"].startswith("5k"):
            ok = r["cpu_pct"] < GOAL_PCT
            who = f"[{r['tree']}] " if r.get("tree") else ""
            print(f"{who}goal, {r['text']}: {r['cpu_pct']:.1f}% of a core (target < {GOAL_PCT:g}% "
                  f"at {GOAL_RATE:,} slow reads/s): {'met' if ok else 'NOT met'}")
    for r in results[:1]:
        print(f"{r['row']}: resident memory at the window's end by mapping (MiB): "
              + ", ".join(f"{k} {v:g}" for k, v in r["rss_by_mapping_mib"]))
    for r in results:
        if r.get("otlp_received"):
            print(f"{r['row']}: the receiver got {r['otlp_received']}")
        if r.get("lost_records"):
            print(f"{r['row']}: {r['lost_records']} records lost (the whole run)")
    for prof in profs:
        who = f" [{prof['tree']}]" if prof.get("tree") else ""
        print(f"\nprofiled run {prof['row']}{who}: {prof['cpu_pct']:.1f}% of a core under "
              f"py-spy (the sampling pauses the process), {fmt_rate(prof)} slow reads/s")
        print_profile(prof["row"], prof["profile"], prof["cpu_pct"])
    if keep:
        print(f"\nkept each run's output in {keep}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "args": {k: v for k, v in vars(args).items()},
                       "elapsed_s": elapsed, "results": results, "profile": profs},
                      f, indent=1)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
