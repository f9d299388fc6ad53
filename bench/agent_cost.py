#!/usr/bin/env python3
"""What `otelwater agent` costs the machine it runs on: its CPU at a given rate of slow reads
with OTLP export on, side by side with the same load and no agent and with `otelwater watch`;
its memory with many watched sockets; and how both grow with the event rate, the sockets and
the number of traced processes.

    .venv/bin/python bench/agent_cost.py [--quick] [--parts a,b,c] [--rounds N]
        [--window S] [--settle S] [--profile ROW [--profile-tool agent|watch]] [--tree DIR]
        [--json OUT]

--parts takes a, b, c, or the curves one by one: c-rate, c-sockets, c-processes. --tree DIR
runs the otelwater of another source tree (PYTHONPATH=DIR, from DIR: its bpf/ too), e.g. a copy
with a change, for a before/after in two runs.

Each run (as root) starts its own service and load, then the condition, measures over a
window, and stops everything it started:
  service    a private copy of examples/bin/slowreader (-mode echo), so `--go-binary COPY`
             selects it alone; for the curve of traced processes, N of them
  load       examples/bin/loadgen -mode pingpong -size 64 against each service
             - idle:  -pause 2ms, conns = rate x (2 ms + 0.7 ms): every Read of the server
                      parks ~2 ms for the client's next message: an idle slow read, counted by
                      the kernel, not recorded (the default)
             - lag:   the server sleeps 25 ms after each echo (-delay 25ms), no client pause,
                      conns = rate / 40: every Read finds a message that waited: a
                      consumer-lagging slow read, recorded in full up to the default 1,000 a
                      second (--record-rate), a span each up to the default 500 a second
             - keep:  -pause 1s: keep-alive connections, a message a second each (the
                      sockets' curve: 2 sockets a connection, both ends watched)
  condition  none   the load alone (the service's CPU without any probe)
             agent  otelwater agent --go-binary COPY --otlp-endpoint URL --listen
                    127.0.0.1:PORT (defaults otherwise; /metrics scraped just before and
                    after the window, as a Prometheus would: "-" where it did not answer
                    within a minute)
             watch  otelwater watch --go-pid PID [--go-pid ...] --otlp-endpoint URL --json
                    > FILE (as users run it, its JSON Lines to a file)
             The OTLP endpoint is a real receiver in another process
             (tests/integration/otlp_receiver.py's gRPC servicers, counting what arrives).

Measured over the window (--window, 15 s; --quick 6), from --settle (3 s, and 1 s more per
2,000 keep-alive connections) after the tool has attached (agent: its process.traced log line
for every service; watch: its start line):
  CPU        utime+stime of the tool's process (/proc/PID/stat, every thread), % of one core;
             the services' and load generators' the same way
  RSS        VmRSS of the tool at the window's end, its maximum (sampled every 0.5 s), VmHWM
  rate       slow reads a second: the kernel's exact counts, from the agent's /metrics
             (otelwater_read_verdicts_total, summed) or watch's `counts` records; the
             service's read(2) calls a second (/proc/PID/io syscr) under every condition
  sockets    the water probe's socket table (map `socks`, counted by its keys) at the end

Parts (--parts, default all):
  a  5,000 slow reads/s, idle and lag loads: none, agent and watch side by side, the
     conditions' order turning every round (--rounds, 3; --quick 1); target: the agent at
     most 10% of one core
  b  10,000 watched sockets (5,000 keep-alive connections): the agent's RSS; target < 150 MB
  c  the curves, agent only: CPU and RSS vs slow reads a second (c-rate: 500, 1k, 2k, 5k,
     10k; idle and lag), RSS and CPU vs sockets (c-sockets: 1k, 5k, 10k, 20k; keep), CPU and
     RSS vs traced processes (c-processes: 1, 4, 16, 32 sharing 2,000 idle slow reads a
     second: one connection each, pausing longer when 2 ms would make more)
Printed: a table per part, the machine, the commands, the load average at each run's end and
how many other otelwater processes ran (others' tests on a shared machine land in every row
alike; compare rows of one run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from agent_soak import (Agent, Receiver, bpf_state, foreign_otelwaters, free_port,  # noqa: E402
                        loadavg, otelwater_exe, private_copy, proc_cpu_split, proc_status,
                        raise_nofile, scrape)
from self_cost import proc_syscr  # noqa: E402

MIB = 1024.0
PER_CONN_S = 0.0007             # a round trip + Go's timer overshoot (bench/self_cost.py)
LAG_PER_CONN = 40               # -delay 25ms: a slow read per connection every 25 ms
GOAL_CPU_PCT = 10.0             # (a): at most 10% of one core at 5,000 slow reads/s
GOAL_RSS_MB = 150.0             # (b): under 150 MB with 10,000 watched sockets


def cpu_s(pid: int) -> float:
    try:
        u, s = proc_cpu_split(pid)
        return u + s
    except OSError:
        return 0.0


# -- the service and its load --------------------------------------------------------------------
class Load:
    """N services (copies of one binary) and a loadgen each, until stop()."""

    def __init__(self, binary: str, loadgen: str, kind: str, rate: int = 0, conns: int = 0,
                 services: int = 1, tmp: str = "/tmp"):
        self.kind = kind
        server_flags = ["-delay", "25ms"] if kind == "lag" else []
        if kind == "idle":
            per_f = rate * (0.002 + PER_CONN_S) / services
            if per_f >= 1:
                pause, per = "2ms", round(per_f)
            else:       # fewer slow reads a service than one connection makes at 2 ms
                pause = f"{max(2.0, 1000 * services / rate - 1000 * PER_CONN_S):.1f}ms"
                per = 1
        elif kind == "lag":
            pause, per = "0s", max(1, round(rate / LAG_PER_CONN / services))
        else:
            pause, per = "1s", max(1, conns // services)
        self.conns = per * services
        self.servers: list[subprocess.Popen] = []
        self.clients: list[subprocess.Popen] = []
        self.pids: list[int] = []
        try:
            for i in range(services):
                out = os.path.join(tmp, f"server{i}.out")
                with open(out, "w") as f:
                    p = subprocess.Popen([binary, "-mode", "echo", *server_flags], stdout=f,
                                         stderr=subprocess.STDOUT)
                self.servers.append(p)
                info = None
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    head = Path(out).read_text().partition("\n")
                    if head[1]:
                        info = json.loads(head[0])
                        break
                    time.sleep(0.01)
                if info is None:
                    raise RuntimeError("slowreader did not say where it listens")
                self.pids.append(info["pid"])
                self.clients.append(subprocess.Popen(
                    [loadgen, "-addr", info["listening"], "-conns", str(per), "-mode",
                     "pingpong", "-size", "64", "-pause", pause, "-duration", "3600s"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        except BaseException:
            self.stop()
            raise
        # the clients connected and running (thousands of connections take a while)
        time.sleep(1.0 + self.conns / 4000)

    def cpu_s(self) -> tuple[float, float]:
        return (sum(cpu_s(p.pid) for p in self.servers),
                sum(cpu_s(p.pid) for p in self.clients))

    def syscr(self) -> int:
        return sum(proc_syscr(p.pid) for p in self.servers)

    def stop(self) -> None:
        for p in self.clients + self.servers:
            if p.poll() is None:
                p.kill()
        for p in self.clients + self.servers:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                pass


def verdicts_total(metrics_text: str | None) -> float | None:
    if metrics_text is None:
        return None
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in metrics_text.splitlines()
               if ln.startswith("otelwater_read_verdicts_total"))


def metrics_text(port: int) -> str | None:
    """The agent's /metrics, or None when it did not answer within a minute."""
    import urllib.request
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60) as r:
            return r.read().decode()
    except OSError:
        return None


def watch_rates(path: str, pids: list[int], ta_ns: int, tb_ns: int) -> dict:
    """Slow reads a second over [ta, tb] from watch's cumulative `counts` records (every
    service, every verdict), and the recorded ones."""
    latest: dict = {}
    sweeps: list[tuple[int, float, float]] = []
    want = set(pids)
    try:
        f = open(path)
    except OSError:
        return {}
    with f:
        for line in f:
            if '"counts"' not in line:
                continue
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if r.get("type") != "counts" or r.get("pid") not in want:
                continue
            latest[(r["pid"], r["role"], r["verdict"])] = (r["reads"], r["recorded"])
            ts = r["ts_ns"]
            tot = (sum(v[0] for v in latest.values()), sum(v[1] for v in latest.values()))
            if sweeps and sweeps[-1][0] == ts:
                sweeps[-1] = (ts, *tot)
            else:
                sweeps.append((ts, *tot))
    inside = [s for s in sweeps if ta_ns <= s[0] <= tb_ns]
    if len(inside) < 2:
        return {}
    (t0, a, ra), (t1, b, rb) = inside[0], inside[-1]
    dt = (t1 - t0) / 1e9
    return {"slow_per_s": (b - a) / dt, "recorded_per_s": (rb - ra) / dt}


# -- one run -------------------------------------------------------------------------------------
def run_one(args, tmp: str, cond: str, kind: str, rate: int = 0, conns: int = 0,
            services: int = 1, label: str = "") -> dict:
    binary = args.binary
    load = tool = rx = None
    res: dict = {"label": label, "condition": cond, "kind": kind, "rate": rate,
                 "sockets_wanted": conns * 2, "services": services}
    out_path = os.path.join(tmp, "watch.jsonl")
    listen = free_port()
    try:
        load = Load(binary, args.loadgen, kind, rate, conns, services, tmp)
        res["conns"] = load.conns
        if cond in ("agent", "watch"):
            rx = Receiver()
        t_start = time.monotonic()
        if cond == "agent":
            tool = Agent(["--go-binary", binary, "--otlp-endpoint", rx.endpoint, "--listen",
                          f"127.0.0.1:{listen}", "--log-format", "json"], tmp, tree=args.tree)
            res["command"] = (tool.command.replace(binary, "COPY")
                              .replace(rx.endpoint, "URL").replace(str(listen), "PORT"))
            tool.wait_for("agent.started")
            for pid in load.pids:
                tool.wait_for("process.traced", pid=pid, timeout_s=60)
            tpid = tool.pid
        elif cond == "watch":
            err = os.path.join(tmp, "watch.err")
            flags = [f for pid in load.pids for f in ("--go-pid", str(pid))]
            cmd = ([otelwater_exe()] if otelwater_exe() and not args.tree
                   else [sys.executable, "-m", "otelwater"])
            cmd += ["watch", *flags, "--otlp-endpoint", rx.endpoint, "--json"]
            env = dict(os.environ)
            env.pop("OTELWATER_CONFIG", None)
            if args.tree:
                env["PYTHONPATH"] = args.tree
            with open(out_path, "w") as out, open(err, "w") as e:
                tool = subprocess.Popen(cmd, stdout=out, stderr=e, stdin=subprocess.DEVNULL,
                                        env=env, cwd=args.tree or ROOT)
            res["command"] = ("otelwater watch " + " ".join(
                "--go-pid PID" if f.isdigit() else f for f in flags if f != "--go-pid")
                + " --otlp-endpoint URL --json > FILE")
            deadline = time.monotonic() + 240
            while "Tracing TCP receive queues" not in Path(err).read_text():
                if tool.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("watch did not start: " + Path(err).read_text()[-2000:])
                time.sleep(0.05)
            tpid = tool.pid
        else:
            tpid = None
            res["command"] = "(no otelwater)"
        res["startup_s"] = time.monotonic() - t_start
        # thousands of new sockets: the first sweeps and summaries take a while to settle
        time.sleep(args.settle + (load.conns / 2000 if kind == "keep" else 0))
        # the window (the agent's /metrics read just before it and just after: a scrape's
        # cost stays out of the window's CPU)
        m0 = verdicts_total(metrics_text(listen)) if cond == "agent" else 0.0
        tm0 = time.monotonic()
        ta_ns = time.monotonic_ns()
        t0 = time.monotonic()
        c0 = cpu_s(tpid) if tpid else 0.0
        u0 = proc_cpu_split(tpid) if tpid else (0.0, 0.0)
        s0, l0 = load.cpu_s()
        r0 = load.syscr()
        spy = None
        if args.profile and tpid and label == args.profile and cond == args.profile_tool:
            prof_path = os.path.join(tmp, "profile.raw")
            spy = subprocess.Popen([args.py_spy, "record", "--pid", str(tpid), "--format", "raw",
                                    "--rate", "100", "--duration", f"{args.window:g}",
                                    "--output", prof_path, "--gil", "--function",
                                    "--nonblocking"], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        rss_max = 0
        end = t0 + args.window
        while time.monotonic() < end:
            time.sleep(min(0.5, max(0.0, end - time.monotonic())))
            if tpid:
                rss_max = max(rss_max, proc_status(tpid)["VmRSS"])
        wall = time.monotonic() - t0
        tb_ns = time.monotonic_ns()
        c1 = cpu_s(tpid) if tpid else 0.0
        u1 = proc_cpu_split(tpid) if tpid else (0.0, 0.0)
        s1, l1 = load.cpu_s()
        r1 = load.syscr()
        res.update(window_s=wall, tool_cpu_pct=100 * (c1 - c0) / wall,
                   tool_user_pct=100 * (u1[0] - u0[0]) / wall,
                   tool_sys_pct=100 * (u1[1] - u0[1]) / wall,
                   service_cpu_pct=100 * (s1 - s0) / wall, load_cpu_pct=100 * (l1 - l0) / wall,
                   read2_per_s=(r1 - r0) / wall, loadavg=loadavg(),
                   others=foreign_otelwaters({os.getpid(), tpid or 0}))
        if tpid:
            st = proc_status(tpid)
            res.update(rss_mib=st["VmRSS"] / MIB, rss_max_mib=rss_max / MIB,
                       hwm_mib=st["VmHWM"] / MIB, threads=st["Threads"],
                       rss_anon_mib=(st.get("RssAnon") or 0) / MIB)
            bpf = bpf_state(tpid)
            res["socks"] = next((m["entries"] for m in bpf["maps"].values()
                                 if m["name"] == "socks"), None)
        if spy is not None:
            from self_cost import print_profile, summarize_profile

            try:
                spy.wait(args.window + 60)
            except subprocess.TimeoutExpired:
                spy.kill()
            res["profile"] = summarize_profile(prof_path, 100, args.window, top=20)
            print(f"\nprofile of {cond} at {label}:")
            print_profile(label, res["profile"], res["tool_cpu_pct"])
        if cond == "agent":
            text = metrics_text(listen)
            m1 = verdicts_total(text)
            if m0 is not None and m1 is not None:
                res["slow_per_s"] = (m1 - m0) / (time.monotonic() - tm0)
            else:
                res["scrape_failed"] = True
            sc = scrape(listen)
            res["metrics_series"] = sc.get("series")
        # stop the tool, then the receiver's count
        if cond == "agent":
            res["exit_code"] = tool.stop()
        elif cond == "watch":
            tool.terminate()
            try:
                res["exit_code"] = tool.wait(60)
            except subprocess.TimeoutExpired:
                tool.kill()
                res["exit_code"] = tool.wait(10)
            res.update(watch_rates(out_path, load.pids, ta_ns, tb_ns))
        if rx is not None:
            res["received"] = rx.counts()
            rx = None
    finally:
        if tool is not None:
            if isinstance(tool, Agent):
                tool.kill()
            elif tool.poll() is None:
                tool.kill()
                tool.wait(10)
        if rx is not None:
            rx.kill()
        if load is not None:
            load.stop()
        if os.path.exists(out_path):
            os.unlink(out_path)
    return res


def say(r: dict) -> None:
    parts = [f"{r['label']:<24} {r['condition']:<6}"]
    if r["condition"] != "none":
        parts.append(f"otelwater {r['tool_cpu_pct']:5.1f}% core "
                     f"({r['tool_user_pct']:.1f}+{r['tool_sys_pct']:.1f}), RSS "
                     f"{r['rss_mib']:.0f} MiB (max {r['rss_max_mib']:.0f})")
    parts.append(f"service {r['service_cpu_pct']:.1f}%, load {r['load_cpu_pct']:.1f}%, "
                 f"read(2)/s {r['read2_per_s']:,.0f}")
    if "slow_per_s" in r:
        parts.append(f"slow reads/s {r['slow_per_s']:,.0f}")
    if r.get("socks") is not None:
        parts.append(f"socks {r['socks']:,}")
    parts.append(f"load {r['loadavg']}")
    print("  " + "; ".join(parts), flush=True)


def md_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def med(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def fmt(v, spec=".1f", none="-"):
    return none if v is None else format(v, spec)


# -- the parts -----------------------------------------------------------------------------------
def part_a(args, tmp: str, results: list) -> str:
    rows = []
    conds = ["none", "agent", "watch"]
    for kind in ("idle", "lag"):
        label = f"5,000/s {kind}"
        runs = []
        for rnd in range(args.rounds):
            order = conds[rnd % 3:] + conds[:rnd % 3]
            for cond in order:
                r = run_one(args, tmp, cond, kind, rate=5000, label=label)
                r["part"], r["round"] = "a", rnd
                say(r)
                runs.append(r)
                results.append(r)
        by = {c: [r for r in runs if r["condition"] == c] for c in conds}
        none_svc = med([r["service_cpu_pct"] for r in by["none"]])
        for cond in conds:
            rs = by[cond]
            cpu = med([r.get("tool_cpu_pct") for r in rs]) if cond != "none" else None
            svc = med([r["service_cpu_pct"] for r in rs])
            each = ", ".join(f"{r['tool_cpu_pct']:.1f}" for r in rs) if cond != "none" else ""
            rows.append([label, cond, f"**{cpu:.1f}** [{each}]" if cpu is not None else "-",
                         fmt(med([r.get("rss_mib") for r in rs]), ".0f"),
                         fmt(med([r.get("slow_per_s") for r in rs]), ",.0f"),
                         fmt(med([r.get("recorded_per_s") for r in rs]), ",.0f"),
                         fmt(med([r.get("received", {}).get("spans")
                                  if r.get("received") else None for r in rs]), ",.0f"),
                         f"{svc:.1f}" + (f" ({svc / none_svc:.2f}x)" if none_svc else ""),
                         fmt(med([r["read2_per_s"] for r in rs]), ",.0f"),
                         " / ".join(r["loadavg"].split()[0] for r in rs)])
    return md_table(["load", "condition", "otelwater CPU % of a core, median [runs]",
                     "RSS MiB", "slow reads/s (kernel counts)", "recorded/s (watch)",
                     "spans received (whole run)", "service CPU % (x none)",
                     "service read(2)/s", "load avg (1 min) at each run's end"], rows)


def part_curve(args, tmp: str, results: list, part: str, points: list[tuple]) -> str:
    rows = []
    for label, kind, rate, conns, services in points:
        r = run_one(args, tmp, "agent", kind, rate=rate, conns=conns, services=services,
                    label=label)
        r["part"] = part
        say(r)
        results.append(r)
        rows.append([label, str(r["conns"]), str(services),
                     fmt(r.get("slow_per_s"), ",.0f"), fmt(r.get("socks"), ",", "-"),
                     f"**{r['tool_cpu_pct']:.1f}** ({r['tool_user_pct']:.1f}+"
                     f"{r['tool_sys_pct']:.1f})",
                     f"{r['rss_mib']:.0f} / {r['rss_max_mib']:.0f} / {r['hwm_mib']:.0f}",
                     f"{r['rss_anon_mib']:.0f}",
                     fmt(r.get("metrics_series"), "d"), f"{r['service_cpu_pct']:.1f}",
                     r["loadavg"].split()[0]])
    return md_table(["row", "conns", "services", "slow reads/s", "sockets (socks map)",
                     "agent CPU % core (user+sys)", "RSS MiB end / max / VmHWM",
                     "of it anonymous MiB", "/metrics series", "services' CPU %",
                     "load (1 min)"], rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="1 round, 6-s windows, fewer curve points (~8 minutes)")
    ap.add_argument("--parts", default="a,b,c", help="which parts: a, b, c (default all)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds of part a (3; --quick 1)")
    ap.add_argument("--window", type=float, default=None, help="seconds measured (15; quick 6)")
    ap.add_argument("--settle", type=float, default=3.0,
                    help="seconds between the attach and the window (3)")
    ap.add_argument("--profile", metavar="ROW",
                    help="py-spy the tool over the window of this row (e.g. '5,000/s lag') "
                         "and print where its CPU went")
    ap.add_argument("--profile-tool", default="agent", choices=["agent", "watch"],
                    help="which tool --profile samples (agent)")
    ap.add_argument("--py-spy", default=None, help="the py-spy to use")
    ap.add_argument("--tree", metavar="DIR",
                    help="run the otelwater of this source tree (PYTHONPATH=DIR, from DIR)")
    ap.add_argument("--json", metavar="OUT", help="write every figure here")
    ap.add_argument("--slowreader", default=str(ROOT / "examples/bin/slowreader"))
    ap.add_argument("--loadgen", default=str(ROOT / "examples/bin/loadgen"))
    args = ap.parse_args(argv)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.window = args.window or (6.0 if args.quick else 15.0)
    parts = set(args.parts.split(","))
    if "c" in parts:
        parts |= {"c-rate", "c-sockets", "c-processes"}
    if parts - {"a", "b", "c", "c-rate", "c-sockets", "c-processes"}:
        ap.error("--parts takes a, b, c (or c-rate, c-sockets, c-processes)")
    if os.geteuid() != 0:
        ap.error("run as root: otelwater loads BPF programs")
    if args.profile:
        args.py_spy = (args.py_spy or shutil.which("py-spy")
                       or str(Path(sys.executable).parent / "py-spy"))
        if not os.path.exists(args.py_spy):
            ap.error("--profile needs py-spy (pip install py-spy, or --py-spy PATH)")
    raise_nofile()
    machine = {"command": " ".join([sys.executable, *sys.argv]) if argv is None else repr(argv),
               "kernel": platform.release(), "nproc": os.cpu_count(),
               "python": platform.python_version(), "loadavg_start": loadavg()}
    print(f"command: {machine['command']}")
    print(f"machine: Linux {machine['kernel']}, nproc {machine['nproc']}, Python "
          f"{machine['python']}; load average at start {machine['loadavg_start']}; "
          f"{foreign_otelwaters({os.getpid()})} other otelwater processes running")
    print(f"each run: a fresh service (copy of slowreader) and loadgen, the condition, "
          f"{args.settle:g} s to settle, {args.window:g} s measured\n", flush=True)
    results: list = []
    tables: dict[str, str] = {}
    t0 = time.monotonic()
    tmp = tempfile.mkdtemp(prefix="otw-agentcost-")
    try:
        args.binary = private_copy(args.slowreader, tmp, "otw-cost-svc")
        if "a" in parts:
            tables["a"] = part_a(args, tmp, results)
        if "b" in parts:
            tables["b"] = part_curve(args, tmp, results, "b",
                                     [("10,000 sockets", "keep", 0, 5000, 1)])
        if "c-rate" in parts:
            rates = [500, 2000, 10000] if args.quick else [500, 1000, 2000, 5000, 10000]
            tables["c-rate"] = part_curve(args, tmp, results, "c-rate", [
                (f"{r:,}/s {k}", k, r, 0, 1) for k in ("idle", "lag") for r in rates])
        if "c-sockets" in parts:
            socks = [1000, 10000, 20000] if args.quick else [1000, 5000, 10000, 20000]
            tables["c-sockets"] = part_curve(args, tmp, results, "c-sockets", [
                (f"{n:,} sockets", "keep", 0, n // 2, 1) for n in socks])
        if "c-processes" in parts:
            procs = [1, 4, 32] if args.quick else [1, 4, 16, 32]
            tables["c-processes"] = part_curve(args, tmp, results, "c-processes", [
                (f"{n} process{'es' if n > 1 else ''}", "idle", 2000, 0, n) for n in procs])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    elapsed = time.monotonic() - t0
    cmds = sorted({r["command"] for r in results})
    print(f"\n{len(results)} runs in {elapsed:.0f} s; load average at the end {loadavg()}")
    print("commands:\n" + "\n".join(f"  {c}" for c in cmds))
    titles = {"a": "(a) 5,000 slow reads/s, OTLP export on: none, agent, watch side by side",
              "b": "(b) 10,000 watched sockets",
              "c-rate": "(c) the agent vs the slow-read rate",
              "c-sockets": "(c) the agent vs the sockets watched",
              "c-processes": "(c) the agent vs the traced processes (2,000 idle slow reads/s "
                             "in all)"}
    for k, t in tables.items():
        print(f"\n{titles[k]}\n\n{t}")
    print()
    for r in results:
        if r.get("part") == "a" and r["condition"] == "agent":
            ok = r["tool_cpu_pct"] <= GOAL_CPU_PCT
            print(f"target (a), {r['label']} round {r['round']}: agent {r['tool_cpu_pct']:.1f}% "
                  f"of a core (at most {GOAL_CPU_PCT:g}%): {'met' if ok else 'NOT met'}")
        if r.get("part") in ("b", "c-sockets") and r.get("sockets_wanted") == 10000:
            mb = r["rss_max_mib"] * 1.048576
            print(f"target (b), {r['label']}: agent RSS {mb:.0f} MB at most in the window "
                  f"({r['rss_max_mib']:.0f} MiB; under {GOAL_RSS_MB:g} MB): "
                  f"{'met' if mb < GOAL_RSS_MB else 'NOT met'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "args": vars(args), "elapsed_s": elapsed,
                       "results": results, "tables": tables}, f, indent=1)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
