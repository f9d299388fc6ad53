#!/usr/bin/env python3
"""A soak run of `otelwater agent` beside a real Go service: many short TCP connections and many
restarts of the traced service, with the agent's memory and BPF state sampled all along, so a
table that grows with connections, goroutines or processes shows as a slope.

    .venv/bin/python bench/agent_soak.py [--quick] [--connections N] [--restarts N]
        [--life-s S] [--concurrency N] [--rss-tolerance-mib M] [--warmup PCT]
        [--census] [--profile S]
        [--tree DIR] [--keep] [--json OUT]

The run (as root):
  service   a private copy of examples/bin/slowreader (-mode echo, 127.0.0.1:PORT), so the agent
            selects it alone (--go-binary COPY): other people's Go programs on the machine are
            neither traced nor counted. It lives --life-s seconds (1.2), is killed (SIGKILL and
            SIGTERM in turn) and started again on the same port, --restarts times (1,000;
            --quick 100); every pid started is one the agent must trace again.
            The service reads 64 bytes a Read and sleeps 3 ms after each (-readsize 64 -delay
            3ms).
  load      --connections TCP connections (100,000; --quick 10,000) opened and closed against
            it, spread evenly over the service's lives, at most --concurrency (32) at once, from
            this process (asyncio), two kinds in turn: a slow read (the client waits 3 ms, then
            sends 64 bytes: the server's first Read parks 3 ms, an idle read the kernel counts)
            and a little data (128 bytes at once: the second 64 wait in the queue while the
            server sleeps, a consumer-lagging slow read recorded in full: a verdict, a span);
            each reads its echo and closes. Connections refused while the service restarts are
            tried again; every connection opened counts.
  agent     `otelwater agent --go-binary COPY --otlp-endpoint URL --listen 127.0.0.1:PORT`
            (defaults otherwise: tracepoints, water of every socket on the host, the default
            span rate), exporting to a real OTLP receiver in another process
            (tests/integration/otlp_receiver.py's gRPC servicers, counting what arrives instead
            of keeping it), /metrics scraped every 15 s as Prometheus would; stopped by SIGTERM.

Sampled:
  every 1 s   the agent's VmRSS (/proc/PID/status) and CPU time (/proc/PID/stat)
  at 0% and each 10% of the run (by restarts done)
              its BPF programs and maps (the fds it holds: /proc/PID/fdinfo prog_id/map_id),
              each hash map's entries (counted by the map's keys, otelwater.probes.bpfinfo), the
              /metrics page's series, the load average; with --census also the sizes of the
              agent's own tables (every dict, set, list or deque of more than 64 items held by
              an otelwater or opentelemetry object, found through gc in the agent process after
              a full collection: a table that grows is named; the biggest with a sampled deep
              size) and its object counts by type.

Printed: RSS at start (the service first traced), after warm-up (10%), at each 10%, and its
slope after warm-up (least squares over the 1-s samples: MiB per hour, per 10,000 connections,
per 100 restarts), and PASS or FAIL on each criterion:
  rss        RSS after warm-up (--warmup, the 10% checkpoint) stays within
             --rss-tolerance-mib (16) of its figure then: max(RSS warm-up..100%) - RSS(warm-up)
             <= tolerance, and the fitted rise over the same span too
  programs   the same BPF program ids, as many, from start to end (no program lost or added)
  maps       the same map ids; every hash map's entries at 100% at most its largest count up
             to 50% plus 10% of its capacity (a table filling with closed sockets or exited
             processes fails)
  restarts   every service pid started has a process.traced log line (the agent's JSON logs)
  exit       the agent stopped on SIGTERM with status 0
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from self_cost import proc_cpu as proc_cpu_split, proc_status  # noqa: E402,F401 (agent_cost too)

TICK = os.sysconf("SC_CLK_TCK")
MIB = 1024.0                    # kB in a MiB (VmRSS is in kB)


# -- /proc ---------------------------------------------------------------------------------------
def proc_cpu_s(pid: int) -> float:
    """utime + stime of the whole process, seconds."""
    return sum(proc_cpu_split(pid))


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raise_nofile(want: int = 65536) -> None:
    """Children inherit the limit (the agent holds a fd per BPF object, the load its sockets)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard >= want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    else:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
        except (ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def foreign_otelwaters(mine: set[int]) -> int:
    """Other otelwater processes running now (others' tests and benchmarks)."""
    n = 0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) in mine:
            continue
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(b"otelwater" in c for c in cmd[:3]) and any(
                w in cmd for w in (b"watch", b"record", b"agent")):
            n += 1
    return n


# -- the agent's BPF objects ---------------------------------------------------------------------
_SYS_BPF = 321                  # x86-64
BPF_MAP_GET_FD_BY_ID = 14


def bpf_fds(pid: int) -> tuple[dict[int, int], dict[int, int]]:
    """({prog id: fd}, {map id: fd}) of the BPF objects the process holds (fdinfo's prog_id and
    map_id: what bpftool's `pids` would say, which this bpftool was built without)."""
    progs, maps = {}, {}
    base = f"/proc/{pid}/fd"
    for fd in os.listdir(base):
        try:
            target = os.readlink(f"{base}/{fd}")
        except OSError:
            continue
        if target not in ("anon_inode:bpf-prog", "anon_inode:bpf-map"):
            continue
        try:
            info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue
        for line in info.splitlines():
            k, _, v = line.partition(":")
            if k == "prog_id":
                progs[int(v)] = int(fd)
            elif k == "map_id":
                maps[int(v)] = int(fd)
    return progs, maps


def bpftool_json(*args: str) -> list:
    try:
        out = subprocess.run(["bpftool", *args, "-j"], capture_output=True, text=True,
                             timeout=30).stdout
        return json.loads(out or "[]")
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return []


class _MapAttr(ctypes.Structure):
    _fields_ = [("map_id", ctypes.c_uint32), ("next_id", ctypes.c_uint32),
                ("open_flags", ctypes.c_uint32)]


def map_fd_by_id(map_id: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    attr = _MapAttr(map_id, 0, 0)
    fd = libc.syscall(ctypes.c_long(_SYS_BPF), ctypes.c_int(BPF_MAP_GET_FD_BY_ID),
                      ctypes.byref(attr), ctypes.c_uint(ctypes.sizeof(attr)))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return fd


def bpf_state(pid: int, count_entries: bool = True) -> dict:
    """The agent's programs (id -> name) and maps (id -> name, type, max_entries, entries: hash
    maps counted by their keys, None for the others)."""
    prog_ids, map_ids = bpf_fds(pid)
    names = {p["id"]: p.get("name", "?") for p in bpftool_json("prog", "show")
             if p.get("id") in prog_ids}
    maps = {m["id"]: m for m in bpftool_json("map", "show") if m.get("id") in map_ids}
    out_maps = {}
    try:
        from otelwater.probes import bpfinfo
    except ImportError:
        bpfinfo = None
    for mid in sorted(map_ids):
        m = maps.get(mid, {})
        entries = None
        if count_entries and bpfinfo is not None and m.get("type") in (
                "hash", "lru_hash", "percpu_hash", "lru_percpu_hash", "hash_of_maps"):
            try:
                fd = map_fd_by_id(mid)
                try:
                    entries = bpfinfo.map_entries(fd, bpfinfo.map_info(fd))
                finally:
                    os.close(fd)
            except OSError:
                entries = None
        out_maps[mid] = {"name": m.get("name", "?"), "type": m.get("type", "?"),
                         "max_entries": m.get("max_entries"), "entries": entries}
    return {"programs": {pid_: names.get(pid_, "?") for pid_ in sorted(prog_ids)},
            "maps": out_maps}


# -- the OTLP receiver ---------------------------------------------------------------------------
RECEIVER_CODE = r"""
import json, sys, threading
from tests.integration import otlp_receiver as m

class Counting(m.Received):
    def __init__(self):
        super().__init__()
        self.spans_n = self.points_n = self.requests = 0
    def add_traces(self, req):
        n = sum(len(ss.spans) for rs in req.resource_spans for ss in rs.scope_spans)
        with self.lock:
            self.spans_n += n
            self.requests += 1
    def add_metrics(self, req):
        n = sum(len(getattr(x, x.WhichOneof("data")).data_points)
                for rm in req.resource_metrics for sm in rm.scope_metrics for x in sm.metrics)
        with self.lock:
            self.points_n += n
            self.requests += 1

r = m.GrpcReceiver()
r.got = Counting()
r.start()
print(json.dumps({"endpoint": r.endpoint}), flush=True)
sys.stdin.read()
r.stop()
print(json.dumps({"spans": r.got.spans_n, "points": r.got.points_n,
                  "requests": r.got.requests}), flush=True)
"""


class Receiver:
    """A gRPC OTLP receiver in its own process that counts spans and points (the soak would
    otherwise keep hours of requests in memory)."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", RECEIVER_CODE], cwd=ROOT,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.endpoint = json.loads(self.proc.stdout.readline())["endpoint"]

    def counts(self) -> dict:
        try:
            self.proc.stdin.close()
            out = json.loads(self.proc.stdout.readline() or "{}")
            self.proc.wait(20)
            return out
        except (OSError, ValueError, subprocess.TimeoutExpired):
            self.kill()
            return {}

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


# -- the agent -----------------------------------------------------------------------------------
def otelwater_exe() -> str:
    exe = Path(sys.executable).parent / "otelwater"
    return str(exe) if exe.exists() else ""


CENSUS_EVERY_S = 0.25


def census_main(argv: list[str]) -> int:
    """`agent_soak.py --census-agent REQ OUT -- otelwater ARGS`: the otelwater CLI in this
    process, plus a thread that answers each line written to the file REQ with a census of the
    process appended to OUT (one JSON line): the tables (dict, set, list, deque, OrderedDict of
    more than 64 items) held in the attributes of otelwater and opentelemetry objects, and the
    object counts by type."""
    req, out = argv[0], argv[1]
    rest = argv[argv.index("--") + 1:]

    def census(label: str) -> dict:
        import gc
        from collections import Counter, deque

        # garbage first (cycles the collector has not reached yet): what is left is held
        garbage = gc.collect()
        tables = Counter()
        types = Counter()
        kinds = (dict, set, list, deque, frozenset)
        def big_tables(count_types: bool = False):
            """(name, container) of every attribute or slot of otelwater's and
            opentelemetry's objects holding a container of more than 64 items."""
            for o in gc.get_objects():
                t = type(o)
                if count_types:
                    types[t.__name__] += 1
                mod = t.__dict__.get("__module__", "")
                if not isinstance(mod, str) or not mod.startswith(("otelwater",
                                                                   "opentelemetry")):
                    continue
                attrs = getattr(o, "__dict__", None)
                items = list(attrs.items()) if isinstance(attrs, dict) else []
                for slot in getattr(t, "__slots__", ()) or ():
                    try:
                        items.append((slot, getattr(o, slot)))
                    except AttributeError:
                        pass
                for k, v in items:
                    if isinstance(v, kinds) and len(v) > 64:
                        yield f"{mod}.{t.__qualname__}.{k}", v

        for name, v in big_tables(count_types=True):
            tables[name] += len(v)
        sizes = {}
        for name, n in tables.most_common(12):
            if n >= 1000:
                sizes[name] = None
        if sizes:       # an estimate of the biggest tables' memory (items sampled, deep)
            for name, v in big_tables():
                if name in sizes:
                    sizes[name] = (sizes[name] or 0) + table_bytes(v)
        return {"label": label, "t": time.monotonic(), "garbage": garbage,
                "python_blocks": sys.getallocatedblocks(), "malloc": mallinfo(),
                "tables": dict(tables.most_common(60)),
                "table_mib": {k: round(v / 2**20, 2) for k, v in sizes.items() if v},
                "types": dict(types.most_common()), "objects": sum(types.values())}

    def mallinfo() -> dict:
        """glibc's view: bytes in use, free inside its arenas, and mmapped (MiB)."""
        import ctypes as c

        class MallInfo2(c.Structure):
            _fields_ = [(n, c.c_size_t) for n in (
                "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                "uordblks", "fordblks", "keepcost")]

        try:
            f = c.CDLL(None).mallinfo2
        except (OSError, AttributeError):
            return {}
        f.restype = MallInfo2
        m = f()
        return {"in_use_mib": round(m.uordblks / 2**20, 1),
                "free_in_arenas_mib": round(m.fordblks / 2**20, 1),
                "mmapped_mib": round(m.hblkhd / 2**20, 1)}

    def deep(o, seen, depth=4) -> int:
        """Bytes of o and what it holds (containers, __dict__, __slots__), each object once,
        `depth` levels down; shared and immortal objects (small ints, interned names) are
        counted where first met."""
        from collections import deque as _dq

        if id(o) in seen:
            return 0
        seen.add(id(o))
        n = sys.getsizeof(o)
        if depth == 0 or isinstance(o, (str, bytes, int, float, bool, type(None))):
            return n
        if isinstance(o, dict):
            for k, v in o.items():
                n += deep(k, seen, depth - 1) + deep(v, seen, depth - 1)
            return n
        if isinstance(o, (list, tuple, set, frozenset, _dq)):
            for v in o:
                n += deep(v, seen, depth - 1)
            return n
        d = getattr(o, "__dict__", None)
        if isinstance(d, dict):
            n += deep(d, seen, depth - 1)
        for slot in getattr(type(o), "__slots__", ()) or ():
            v = getattr(o, slot, None)
            if v is not None:
                n += deep(v, seen, depth - 1)
        return n

    def table_bytes(v) -> int:
        """A table's size: the container, and its items' (200 sampled) scaled to all."""
        import random as _r

        items = list(v.items()) if isinstance(v, dict) else list(v)
        sample = _r.Random(1).sample(items, min(200, len(items)))
        seen: set = set()
        each = sum(deep(x, seen) for x in sample) / max(1, len(sample))
        return sys.getsizeof(v) + int(each * len(items))

    def serve():
        seen = 0
        while True:
            time.sleep(CENSUS_EVERY_S)
            try:
                lines = Path(req).read_text().splitlines()
            except OSError:
                continue
            for label in lines[seen:]:
                seen += 1
                try:
                    c = census(label)
                except Exception as e:  # noqa: BLE001 - a census must not stop the agent
                    c = {"label": label, "error": repr(e)}
                with open(out, "a") as f:
                    f.write(json.dumps(c) + "\n")

    threading.Thread(target=serve, name="census", daemon=True).start()
    tree = os.environ.get("OTW_TREE")
    if tree:                        # --tree: that tree's otelwater, not this checkout's
        sys.path.insert(0, tree)
    sys.argv = ["otelwater", *rest]
    from otelwater.cli import main
    return main()


class Agent:
    """`otelwater agent ...` (stderr: its JSON log lines, to a file), stopped by stop()."""

    def __init__(self, args: list[str], tmp: str, census: bool = False,
                 env: dict | None = None, tree: str | None = None, command: str = "agent"):
        self.log_path = os.path.join(tmp, "agent.log")
        self.census_req = os.path.join(tmp, "census.req")
        self.census_out = os.path.join(tmp, "census.jsonl")
        self.census = census
        exe = "" if tree else otelwater_exe()
        if census:
            Path(self.census_req).write_text("")
            cmd = [sys.executable, str(Path(__file__).resolve()), "--census-agent",
                   self.census_req, self.census_out, "--", command, *args]
        else:
            cmd = [exe, command, *args] if exe else [sys.executable, "-m", "otelwater",
                                                     command, *args]
        self.command = f"otelwater {command} " + " ".join(args)
        e = dict(os.environ if env is None else env)
        e.pop("OTELWATER_CONFIG", None)
        for k in [k for k in e if k.startswith("OTEL_")]:
            e.pop(k)
        if tree:
            e["PYTHONPATH"] = e["OTW_TREE"] = tree
        self._err = open(self.log_path, "w")
        self.t_exec = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self._err,
                                     stdin=subprocess.DEVNULL, env=e, cwd=tree or ROOT)
        self.pid = self.proc.pid
        self._read_at = 0
        self.events: list[dict] = []

    def lines(self) -> list[dict]:
        """The log lines written since the last call (JSON), kept in self.events too."""
        try:
            with open(self.log_path) as f:
                f.seek(self._read_at)
                text = f.read()
        except OSError:
            return []
        cut = text.rfind("\n") + 1
        self._read_at += len(text[:cut].encode())
        new = []
        for ln in text[:cut].splitlines():
            try:
                new.append(json.loads(ln))
            except ValueError:
                new.append({"event": "?", "msg": ln})
        self.events.extend(new)
        return new

    def wait_for(self, event: str, timeout_s: float = 240, **match) -> dict:
        deadline = time.monotonic() + timeout_s
        for e in self.events:
            if e.get("event") == event and all(e.get(k) == v for k, v in match.items()):
                return e
        while time.monotonic() < deadline:
            for e in self.lines():
                if e.get("event") == event and all(e.get(k) == v for k, v in match.items()):
                    return e
            if self.proc.poll() is not None:
                raise RuntimeError(f"the agent exited {self.proc.returncode}: "
                                   + Path(self.log_path).read_text()[-3000:])
            time.sleep(0.05)
        raise RuntimeError(f"no {event} from the agent in {timeout_s:g} s: "
                           + Path(self.log_path).read_text()[-3000:])

    def census_now(self, label: str, timeout_s: float = 120) -> dict | None:
        if not self.census:
            return None
        with open(self.census_req, "a") as f:
            f.write(label + "\n")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                for ln in Path(self.census_out).read_text().splitlines():
                    c = json.loads(ln)
                    if c.get("label") == label:
                        return c
            except (OSError, ValueError):
                pass
            time.sleep(0.2)
        return None

    def stop(self, timeout_s: float = 60) -> int | None:
        """SIGTERM, then SIGKILL after timeout_s; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._err.close()
        self.lines()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if not self._err.closed:
            self._err.close()


def scrape(port: int, timeout_s: float = 10) -> dict:
    """/metrics of the agent: its series count, and a few of its own figures."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout_s) as r:
            text = r.read().decode()
    except OSError as e:
        return {"error": str(e)}
    series = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    out: dict = {"series": len(series), "bytes": len(text)}
    by_name: dict[str, int] = {}
    for ln in series:
        name = ln.split("{", 1)[0].split(" ", 1)[0]
        by_name[name] = by_name.get(name, 0) + 1
    out["by_name"] = dict(sorted(by_name.items(), key=lambda kv: -kv[1]))
    for ln in series:
        for want in ("otelwater_agent_processes ", "otelwater_agent_processes{",
                     "otelwater_agent_records_lost_total", "otelwater_agent_sockets"):
            if ln.startswith(want):
                out[ln.split("{")[0].split(" ")[0]] = float(ln.rsplit(" ", 1)[1])
    return out


# -- the service ---------------------------------------------------------------------------------
SERVICE_FLAGS = ("-delay", "3ms", "-readsize", "64")


class Service:
    """One life of the service: a copy of slowreader, echo mode, on a fixed port, reading 64
    bytes a Read and sleeping 3 ms after each (SERVICE_FLAGS)."""

    def __init__(self, binary: str, port: int, out_path: str, flags=SERVICE_FLAGS):
        with open(out_path, "w") as out:
            self.proc = subprocess.Popen([binary, "-mode", "echo", "-listen",
                                          f"127.0.0.1:{port}", *flags],
                                         stdout=out, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            head = Path(out_path).read_text().partition("\n")
            if head[1]:
                info = json.loads(head[0])
                self.pid = info.get("pid", self.pid)
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"the service exited {self.proc.returncode}: "
                                   + Path(out_path).read_text()[-500:])
            time.sleep(0.005)
        self.proc.kill()
        raise RuntimeError("the service did not say where it listens")

    def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def private_copy(src: str, tmp: str, name: str = "otw-soak-svc") -> str:
    dst = os.path.join(tmp, name)
    shutil.copy2(src, dst)
    os.chmod(dst, 0o755)
    return dst


# -- the load ------------------------------------------------------------------------------------
class Churn:
    """Short connections against 127.0.0.1:port (module docstring), counted."""

    PAYLOAD = b"x" * 64
    SLOW_S = 0.003

    def __init__(self, port: int, concurrency: int):
        self.port = port
        self.sem = asyncio.Semaphore(concurrency)
        self.opened = self.completed = self.refused = self.failed = 0
        self.seq = 0

    async def one(self) -> None:
        async with self.sem:
            self.seq += 1
            slow = self.seq % 2 == 0
            out = self.PAYLOAD if slow else self.PAYLOAD * 2
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    r, w = await asyncio.open_connection("127.0.0.1", self.port)
                except OSError:
                    self.refused += 1
                    await asyncio.sleep(0.005)
                    continue
                self.opened += 1
                try:
                    if slow:
                        await asyncio.sleep(self.SLOW_S)
                    w.write(out)
                    await w.drain()
                    await asyncio.wait_for(r.readexactly(len(out)), 5)
                    self.completed += 1
                except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError):
                    self.failed += 1
                finally:
                    w.close()
                    try:
                        await w.wait_closed()
                    except OSError:
                        pass
                return

    async def batch(self, n: int, over_s: float) -> None:
        """n connections started evenly over over_s seconds; returns when all are done."""
        tasks = []
        t0 = time.monotonic()
        gap = over_s / max(1, n)
        for i in range(n):
            wait = t0 + i * gap - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            tasks.append(asyncio.ensure_future(self.one()))
        await asyncio.gather(*tasks)


# -- sampling ------------------------------------------------------------------------------------
class Sampler(threading.Thread):
    """The agent's RSS and CPU every second, its /metrics every 15 s."""

    def __init__(self, pid: int, listen_port: int | None, every_s: float = 1.0,
                 scrape_s: float = 15.0):
        super().__init__(daemon=True, name="sampler")
        self.pid, self.listen_port = pid, listen_port
        self.every_s, self.scrape_s = every_s, scrape_s
        self.samples: list[tuple[float, int, float, float, int]] = []  # t, RSS kB, cpu, prog, conns
        self.progress = 0.0
        self.connections = 0
        self.scrapes: list[dict] = []
        self.stop_event = threading.Event()
        self.t0 = time.monotonic()

    def run(self) -> None:
        next_scrape = time.monotonic() + self.scrape_s
        while not self.stop_event.wait(self.every_s):
            try:
                st = proc_status(self.pid)
                cpu = proc_cpu_s(self.pid)
            except OSError:
                return
            self.samples.append((time.monotonic() - self.t0, st["VmRSS"], cpu, self.progress,
                                 self.connections))
            if self.listen_port and time.monotonic() >= next_scrape:
                next_scrape = time.monotonic() + self.scrape_s
                s = scrape(self.listen_port)
                s["t"] = time.monotonic() - self.t0
                self.scrapes.append(s)


class Profile:
    """py-spy record of the agent for --profile seconds (--gil: the samples of the thread
    running Python), from a checkpoint on; summarized as bench/self_cost.py does."""

    def __init__(self, pid: int, label: str, args, tmp: str):
        self.label, self.pid, self.seconds = label, pid, args.profile
        self.path = os.path.join(tmp, f"profile-{label.rstrip('%')}.raw")
        self.cpu0, self.t0 = proc_cpu_s(pid), time.monotonic()
        self.cpu_pct = None
        self.result: dict = {"label": label}
        self.proc = subprocess.Popen([args.py_spy, "record", "--pid", str(pid), "--format",
                                      "raw", "--rate", "100", "--duration",
                                      f"{args.profile:g}", "--output", self.path, "--gil",
                                      "--function", "--nonblocking"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)

    def poll(self) -> None:
        if self.cpu_pct is None and time.monotonic() - self.t0 >= self.seconds:
            self.cpu_pct = 100 * (proc_cpu_s(self.pid) - self.cpu0) / (
                time.monotonic() - self.t0)

    def finish(self) -> None:
        from self_cost import summarize_profile

        try:
            _, err = self.proc.communicate(timeout=self.seconds + 60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            err = ""
        self.poll()
        self.result = summarize_profile(self.path, 100, self.seconds, top=20)
        self.result.update(label=self.label, cpu_pct=self.cpu_pct,
                           py_spy_stderr=(err or "").strip()[-300:])


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least squares: (slope, intercept)."""
    n = len(xs)
    if n < 2:
        return 0.0, (ys[0] if ys else 0.0)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return 0.0, my
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return slope, my - slope * mx


def checkpoint(agent: Agent, sampler: Sampler, label: str, pct: float, t0: float,
               count_entries: bool = True) -> dict:
    st = proc_status(agent.pid)
    cp = {"label": label, "pct": pct, "t_s": round(time.monotonic() - t0, 1),
          "rss_kib": st["VmRSS"], "hwm_kib": st["VmHWM"], "threads": st["Threads"],
          "rss_anon_kib": st.get("RssAnon"), "cpu_s": proc_cpu_s(agent.pid),
          "connections": sampler.connections, "loadavg": loadavg()}
    cp["bpf"] = bpf_state(agent.pid, count_entries)
    if sampler.listen_port:
        cp["metrics"] = scrape(sampler.listen_port)
    c = agent.census_now(label)
    if c is not None:
        cp["census"] = c
    return cp


# -- the run -------------------------------------------------------------------------------------
def run(args) -> dict:
    raise_nofile()
    tmp = tempfile.mkdtemp(prefix="otw-soak-")
    binary = private_copy(args.slowreader, tmp)
    port = free_port()
    listen_port = free_port()
    svc_out = os.path.join(tmp, "service.out")
    rx = agent = svc = None
    sampler = None
    res: dict = {"tmp": tmp}
    pids: list[int] = []
    try:
        rx = Receiver()
        agent_args = ["--go-binary", binary, "--otlp-endpoint", rx.endpoint, "--listen",
                      f"127.0.0.1:{listen_port}", "--log-format", "json"]
        # a first life before the agent: the agent meets its binary as a running process
        svc = Service(binary, port, svc_out)
        pids.append(svc.pid)
        agent = Agent(agent_args, tmp, census=args.census, tree=args.tree)
        res["command"] = agent.command.replace(binary, "COPY").replace(rx.endpoint, "URL")
        agent.wait_for("agent.started")
        agent.wait_for("process.traced", pid=svc.pid, timeout_s=60)
        t0 = time.monotonic()
        res["startup_s"] = t0 - agent.t_exec
        sampler = Sampler(agent.pid, listen_port)
        sampler.t0 = t0
        sampler.start()
        churn = Churn(port, args.concurrency)
        per_life = [args.connections // args.restarts
                    + (1 if i < args.connections % args.restarts else 0)
                    for i in range(args.restarts)]
        checkpoints = [checkpoint(agent, sampler, "start", 0.0, t0)]
        print(f"  start: RSS {checkpoints[0]['rss_kib'] / MIB:.1f} MiB, "
              f"{len(checkpoints[0]['bpf']['programs'])} programs, "
              f"{len(checkpoints[0]['bpf']['maps'])} maps; load {loadavg()}", flush=True)
        next_cp = 1
        profiles: list[Profile] = []
        loop = asyncio.new_event_loop()
        sigs = (signal.SIGKILL, signal.SIGTERM)
        for life in range(args.restarts):
            t_life = time.monotonic()
            loop.run_until_complete(churn.batch(per_life[life], args.life_s))
            left = args.life_s - (time.monotonic() - t_life)
            if left > 0:
                time.sleep(left)
            svc.stop(sigs[life % 2])
            svc = Service(binary, port, svc_out)
            pids.append(svc.pid)
            sampler.progress = (life + 1) / args.restarts
            sampler.connections = churn.opened
            agent.lines()
            while next_cp <= 10 and sampler.progress >= next_cp / 10:
                cp = checkpoint(agent, sampler, f"{next_cp * 10}%", next_cp / 10, t0)
                checkpoints.append(cp)
                counted = {m["name"]: m["entries"] for m in cp["bpf"]["maps"].values()
                           if m["entries"] is not None}
                print(f"  {cp['label']:>4}: {life + 1} restarts, {churn.opened:,} connections "
                      f"({churn.completed:,} echoed, {churn.refused:,} refused), RSS "
                      f"{cp['rss_kib'] / MIB:.1f} MiB, CPU {cp['cpu_s']:.0f} s, "
                      f"{len(cp['bpf']['programs'])} programs, maps {counted}, /metrics "
                      f"{cp.get('metrics', {}).get('series', '?')} series; load "
                      f"{cp['loadavg']} ({cp['t_s']:.0f} s)", flush=True)
                if args.profile and cp["label"] in ("10%", "80%"):
                    profiles.append(Profile(agent.pid, cp["label"], args, tmp))
                next_cp += 1
            for pr in profiles:
                pr.poll()
        loop.close()
        # the last life: let the agent see it before it stops
        try:
            agent.wait_for("process.traced", pid=svc.pid, timeout_s=10)
        except RuntimeError:
            pass
        sampler.stop_event.set()
        sampler.join(5)
        t_end = time.monotonic()
        res["run_s"] = t_end - t0
        for pr in profiles:
            pr.finish()
        res["profiles"] = [pr.result for pr in profiles]
        res["exit_code"] = agent.stop()
        agent.lines()
        res["receiver"] = rx.counts()
        rx = None
        res.update(churn={"opened": churn.opened, "completed": churn.completed,
                          "refused": churn.refused, "failed": churn.failed},
                   pids=len(pids), checkpoints=checkpoints, samples=sampler.samples,
                   scrapes=sampler.scrapes)
        # (the pids are this run's services; the exe a log line names is /proc/PID/exe when
        # the process exited between the scan and the lookup of its path)
        traced = {e.get("pid") for e in agent.events if e.get("event") == "process.traced"}
        res["traced"] = len(traced & set(pids))
        res["missed"] = [(pids.index(p), p) for p in pids if p not in traced]
        res["traced_by_proc_path"] = sum(
            1 for e in agent.events if e.get("event") == "process.traced"
            and e.get("pid") in set(pids) and e.get("exe") != binary)
        res["events"] = {}
        for e in agent.events:
            res["events"][e.get("event", "?")] = res["events"].get(e.get("event", "?"), 0) + 1
        stopped = [e for e in agent.events if e.get("event") == "agent.stopped"]
        res["stopped"] = stopped[-1] if stopped else None
        res["warnings"] = [e for e in agent.events if e.get("level") in ("warning", "error")][:20]
    finally:
        if sampler is not None:
            sampler.stop_event.set()
        if svc is not None:
            svc.stop()
        if agent is not None:
            agent.kill()
        if rx is not None:
            rx.kill()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return res


def judge(res: dict, args) -> list[tuple[str, bool, str]]:
    cps = res["checkpoints"]
    w = args.warmup / 100
    warm = next((c for c in cps if c["pct"] >= w - 1e-9), None)
    out = []
    tol = args.rss_tolerance_mib
    if warm is not None:
        after = [c for c in cps if c["pct"] >= warm["pct"]]
        rise = (max(c["rss_kib"] for c in after) - warm["rss_kib"]) / MIB
        t_w = warm["t_s"]
        pts = [(t, kb) for t, kb, _c, p, _n in res["samples"] if p >= warm["pct"]]
        slope, _ = fit([t for t, _ in pts], [kb / MIB for _, kb in pts])
        fitted = slope * (res["run_s"] - t_w)
        ok = rise <= tol and fitted <= tol
        out.append(("rss", ok, f"RSS rose {rise:+.1f} MiB from {warm['label']} (the warm-up) to "
                              f"its highest after (fitted {fitted:+.1f} MiB over "
                              f"{res['run_s'] - t_w:.0f} s); tolerance {tol:g} MiB"))
    first, last = cps[0]["bpf"], cps[-1]["bpf"]
    same = all(c["bpf"]["programs"] == first["programs"] for c in cps)
    out.append(("programs", same, f"{len(first['programs'])} programs at start, "
                                  f"{len(last['programs'])} at the end, "
                                  + ("the same ids throughout" if same else
                                     "ids changed: " + ", ".join(
                                         f"{c['label']}: {sorted(c['bpf']['programs'])}"
                                         for c in cps if c["bpf"]["programs"]
                                         != first["programs"])[:400])))
    maps_same = all(set(c["bpf"]["maps"]) == set(first["maps"]) for c in cps)
    grew = []
    half = [c for c in cps if c["pct"] <= 0.5]
    for mid, m in last["maps"].items():
        if m["entries"] is None:
            continue
        early = max((c["bpf"]["maps"].get(mid, {}).get("entries") or 0) for c in half)
        cap = m["max_entries"] or 0
        if m["entries"] > early + 0.1 * cap:
            grew.append(f"{m['name']} {early} -> {m['entries']} of {cap}")
    out.append(("maps", maps_same and not grew,
                f"{len(first['maps'])} maps, ids "
                + ("unchanged" if maps_same else "CHANGED")
                + ("; grew: " + "; ".join(grew) if grew else
                   "; hash maps' entries bounded: " + ", ".join(
                       f"{m['name']} {m['entries']}/{m['max_entries']}"
                       for m in last["maps"].values() if m["entries"] is not None))))
    out.append(("restarts", not res["missed"],
                f"{res['traced']} of {res['pids']} service pids traced (process.traced)"
                + (f"; missed (life, pid): {res['missed'][:10]}" if res["missed"] else "")))
    out.append(("exit", res["exit_code"] == 0, f"exit status {res['exit_code']} on SIGTERM"))
    return out


def report(res: dict, args) -> None:
    cps = res["checkpoints"]
    print(f"\n{res['pids']} service lives ({res['pids'] - 1} restarts), "
          f"{res['churn']['opened']:,} connections opened ({res['churn']['completed']:,} "
          f"echoed, {res['churn']['failed']:,} cut by a restart, "
          f"{res['churn']['refused']:,} connects refused while it restarted) in "
          f"{res['run_s']:.0f} s; agent start-up {res['startup_s']:.1f} s")
    print(f"  {res['command']}\n")
    print("| point | restarts | connections | RSS MiB | VmHWM MiB | agent CPU s (% core since "
          "the last) | BPF progs | hash maps' entries | /metrics series | load |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    prev = None
    for c in cps:
        pct = ""
        if prev is not None and c["t_s"] > prev["t_s"]:
            pct = f" ({100 * (c['cpu_s'] - prev['cpu_s']) / (c['t_s'] - prev['t_s']):.1f}%)"
        maps = ", ".join(f"{m['name']} {m['entries']}" for m in c["bpf"]["maps"].values()
                         if m["entries"] is not None)
        print(f"| {c['label']} | {round(c['pct'] * (res['pids'] - 1))} | {c['connections']:,} "
              f"| {c['rss_kib'] / MIB:.1f} | {c['hwm_kib'] / MIB:.1f} | {c['cpu_s']:.1f}{pct} "
              f"| {len(c['bpf']['programs'])} | {maps} | "
              f"{c.get('metrics', {}).get('series', '-')} | {c['loadavg']} |")
        prev = c
    warm = next((c for c in cps if c["pct"] >= args.warmup / 100 - 1e-9), None)
    if warm is not None:
        pts = [(t, kb / MIB, n) for t, kb, _c, p, n in res["samples"] if p >= warm["pct"]]
        slope_t, _ = fit([t for t, _, _ in pts], [r for _, r, _ in pts])
        slope_n, _ = fit([n for _, _, n in pts], [r for _, r, _ in pts])
        span_restarts = res["pids"] - 1 - round(warm["pct"] * (res["pids"] - 1))
        rise = (cps[-1]["rss_kib"] - warm["rss_kib"]) / MIB
        print(f"\nRSS slope after warm-up ({warm['label']}; least squares over {len(pts)} "
              f"samples): {slope_t * 3600:+.2f} MiB an hour, {slope_n * 10000:+.2f} MiB per "
              f"10,000 connections, {rise / max(1, span_restarts) * 100:+.2f} MiB per 100 "
              f"restarts (end - {warm['label']})")
    c0, cN = cps[0], cps[-1]
    m0, mN = c0.get("metrics", {}).get("by_name", {}), cN.get("metrics", {}).get("by_name", {})
    if mN:
        print("\n/metrics series by name, start -> end (the most at the end): "
              + ", ".join(f"{k} {m0.get(k, 0)} -> {v}" for k, v in list(mN.items())[:8]))
    if "tables" in cN.get("census", {}) and "tables" in c0.get("census", {}):
        print(f"\nthe agent's tables (census through gc, items; start -> "
              f"{(warm or {}).get('label', '?')} -> end):")
        mid = (warm or {}).get("census", {})   # (the warm-up's)
        mid = mid if "tables" in mid else {}
        keys = sorted(set(cN["census"]["tables"]) | set(c0["census"]["tables"]),
                      key=lambda k: -cN["census"]["tables"].get(k, 0))
        for k in keys[:25]:
            print(f"  {c0['census']['tables'].get(k, 0):>8} -> "
                  f"{mid.get('tables', {}).get(k, 0):>8} -> "
                  f"{cN['census']['tables'].get(k, 0):>8}  {k}")
        print(f"  objects: {c0['census']['objects']:,} -> {mid.get('objects', 0):,} -> "
              f"{cN['census']['objects']:,}")
        grown = sorted(((cN["census"]["types"].get(t, 0) - (mid or c0["census"]).get(
            "types", {}).get(t, 0), t) for t in cN["census"]["types"]), reverse=True)[:10]
        print("  types that grew most after warm-up: "
              + ", ".join(f"{t} {d:+,}" for d, t in grown))
    for p in res.get("profiles", []):
        if "error" in p or "self" not in p:
            print(f"\nprofile from {p['label']}: {p.get('error') or p.get('py_spy_stderr')}")
            continue
        cpu = p.get("cpu_pct") or 0.0
        print(f"\nprofile from {p['label']} (py-spy --gil, {p['samples']} samples; "
              f"'% core' = share x the agent's {cpu:.1f}% of a core then):")
        print("  self:      share  % core  function")
        for k, v in p["self"][:12]:
            print(f"          {v:6.1f}%  {v * cpu / 100:6.2f}  {k}")
        print("  inclusive: share  % core  function")
        for k, v in p["inclusive"][:16]:
            print(f"          {v:6.1f}%  {v * cpu / 100:6.2f}  {k}")
    if res.get("receiver"):
        print(f"\nOTLP receiver: {res['receiver']}")
    if res.get("stopped"):
        s = res["stopped"]
        print(f"agent.stopped: {s.get('msg')}")
    print(f"agent log events: {res['events']}")
    for w in res["warnings"][:8]:
        print(f"  {w.get('level')} {w.get('event')}: {str(w.get('msg'))[:200]}")
    print()
    verdicts = judge(res, args)
    for name, ok, text in verdicts:
        print(f"{'PASS' if ok else 'FAIL'} {name}: {text}")
    res["judged"] = [{"criterion": n, "pass": ok, "detail": t} for n, ok, t in verdicts]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--census-agent"]:
        return census_main(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="10,000 connections and 100 restarts (~2-3 minutes)")
    ap.add_argument("--connections", type=int, default=None,
                    help="TCP connections opened and closed (100,000; --quick 10,000)")
    ap.add_argument("--restarts", type=int, default=None,
                    help="restarts of the traced service (1,000; --quick 100)")
    ap.add_argument("--life-s", type=float, default=1.2,
                    help="seconds each life of the service lasts at least (1.2)")
    ap.add_argument("--concurrency", type=int, default=32,
                    help="connections open at once at most (32)")
    ap.add_argument("--rss-tolerance-mib", type=float, default=16.0,
                    help="RSS may rise this much after warm-up (16 MiB)")
    ap.add_argument("--warmup", type=int, default=10, choices=range(0, 100, 10),
                    metavar="PCT", help="the checkpoint that ends the warm-up (10%%): every "
                    "table bounded by a time fills by then (the alert stage forgets a process "
                    "600 s after its last read: at a restart every 1.2 s, 50%%)")
    ap.add_argument("--census", action="store_true",
                    help="run the agent with a census thread: its tables' sizes at each 10%%")
    ap.add_argument("--profile", type=float, default=0, metavar="SECONDS",
                    help="py-spy the agent this long from the 10%% and the 80%% checkpoints "
                         "and print where its CPU went (py-spy: the venv's, or on PATH)")
    ap.add_argument("--py-spy", default=None, help="the py-spy to use")
    ap.add_argument("--tree", metavar="DIR",
                    help="run the otelwater of this source tree (PYTHONPATH=DIR, from DIR: its "
                         "bpf/ too), e.g. a copy with a change, instead of this checkout's")
    ap.add_argument("--keep", action="store_true", help="keep the agent's log")
    ap.add_argument("--json", metavar="OUT", help="write every figure here")
    ap.add_argument("--slowreader", default=str(ROOT / "examples/bin/slowreader"))
    args = ap.parse_args(argv)
    args.connections = args.connections or (10_000 if args.quick else 100_000)
    args.restarts = args.restarts or (100 if args.quick else 1_000)
    if args.restarts < 1 or args.connections < args.restarts:
        ap.error("give at least one restart and one connection a restart")
    if os.geteuid() != 0:
        ap.error("run as root: the agent loads BPF programs")
    if args.profile:
        args.py_spy = (args.py_spy or shutil.which("py-spy")
                       or str(Path(sys.executable).parent / "py-spy"))
        if not os.path.exists(args.py_spy):
            ap.error("--profile needs py-spy (pip install py-spy, or --py-spy PATH)")
    machine = {"command": " ".join([sys.executable, *sys.argv]),
               "kernel": platform.release(), "nproc": os.cpu_count(),
               "python": platform.python_version(), "loadavg_start": loadavg()}
    others = foreign_otelwaters({os.getpid()})
    print(f"command: {machine['command']}")
    print(f"machine: Linux {machine['kernel']}, nproc {machine['nproc']}, Python "
          f"{machine['python']}; load average at start {machine['loadavg_start']}; "
          f"{others} other otelwater processes running")
    print(f"soak: {args.connections:,} connections over {args.restarts:,} restarts, each life "
          f">= {args.life_s:g} s, concurrency {args.concurrency}", flush=True)
    res = run(args)
    res["machine"] = machine
    res["loadavg_end"] = loadavg()
    report(res, args)
    print(f"load average at the end {res['loadavg_end']}; "
          f"{foreign_otelwaters({os.getpid()})} other otelwater processes running")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "args": vars(args), "result": res}, f, indent=1)
        print(f"wrote {args.json}")
    return 0 if all(j["pass"] for j in res["judged"]) else 1


if __name__ == "__main__":
    sys.exit(main())
