"""`otelwater agent` as its integration tests run it, and the ground truth they hold it to.

    Agent         the real `python -m otelwater agent ...` on a port of its own: its JSON log
                  lines (stderr, each stamped with when this test read it), /metrics, /healthz and
                  /readyz, and the BPF objects it holds (its pid's fds, read from /proc)
    Service       a private copy of examples/bin/slowreader (a copy: an executable of its own, so
                  an agent selecting it by --go-binary traces this test's processes only, not
                  those of other tests running beside it), logging its every Read, with a
                  loadgen client streaming to it
    bpf state     what the kernel says is loaded and attached, never what otelwater says:
                  /proc/PID/fdinfo (prog_id), `bpftool prog show`, `bpftool perf list`,
                  `bpftool link show`, tracefs's uprobe/kprobe events
    Prometheus    Debian's /usr/bin/prometheus scraping the agent, queried through its HTTP API

Every process started here is stopped by its own pid (SIGTERM, then SIGKILL if it hangs).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from .conftest import ROOT, prog_ids_of
from .slowreader import SlowReader
from .services import free_port, wait_for  # noqa: F401  (the tests take them from here)

AGENT = [sys.executable, "-m", "otelwater", "agent"]
LOADGEN = str(ROOT / "examples" / "bin" / "loadgen")
PROMETHEUS = "/usr/bin/prometheus"
MS = 1_000_000
SLOW_NS = 2 * MS        # a Read the Go program timed at this or more blocked past the 1 ms mark
CLOCK_SLACK_NS = 20_000    # the Go program's CLOCK_MONOTONIC readings are this exact, or better
TRACEFS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout_s: float = 20.0) -> int:
    """Stop a process this test started, by its pid: `sig`, then SIGKILL if it hangs."""
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait(timeout=10)


def http_get(url: str, timeout_s: float = 5.0) -> tuple[int | None, str]:
    """(status, body); (None, why) when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError as e:
        return None, str(e)


# -- the agent -------------------------------------------------------------------------------

class Agent:
    """`otelwater agent ARGS --listen HOST:PORT` (a free port), its log lines collected.
    `env` is added to this process's environment; `prefix` runs it through another command
    (nsenter into a pod's namespaces), `host` is the address it serves on (127.0.0.1)."""

    def __init__(self, *args: str, env: dict | None = None, prefix: tuple[str, ...] = (),
                 host: str = "127.0.0.1"):
        self.port = free_port()
        self.host = host
        self.proc = subprocess.Popen([*prefix, *AGENT, *args, "--listen", f"{host}:{self.port}"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, cwd=ROOT,
                                     env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
        self.pid = self.proc.pid
        self.lines: list[tuple[float, str]] = []     # (monotonic time read, raw line)
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            with self._lock:
                self.lines.append((time.monotonic(), line))

    @property
    def base(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stderr(self) -> str:
        with self._lock:
            return "".join(line for _, line in self.lines)

    def logs(self) -> list[dict]:
        """Every JSON log line so far (what is not JSON is left out: see not_json())."""
        out = []
        with self._lock:
            lines = list(self.lines)
        for t, line in lines:
            try:
                d = json.loads(line)
            except ValueError:
                continue
            if isinstance(d, dict):
                d["_read_at"] = t
                out.append(d)
        return out

    def not_json(self) -> list[str]:
        with self._lock:
            lines = [line for _, line in self.lines]
        bad = []
        for line in lines:
            try:
                d = json.loads(line)
            except ValueError:
                bad.append(line)
                continue
            if not isinstance(d, dict) or not {"time", "level", "event", "msg"} <= d.keys():
                bad.append(line)
        return bad

    def events(self, event: str, **fields) -> list[dict]:
        return [d for d in self.logs() if d.get("event") == event
                and all(d.get(k) == v for k, v in fields.items())]

    def wait_event(self, event: str, timeout_s: float = 30.0, **fields) -> dict:
        def seen():
            self.check_running(f"waiting for {event} {fields}")
            got = self.events(event, **fields)
            return got[0] if got else None
        return wait_for(f"the agent's log line {event} {fields}", seen, timeout_s)

    def check_running(self, doing: str = "") -> None:
        if self.proc.poll() is not None:
            time.sleep(0.2)     # the reader takes the last lines
            pytest.fail(f"the agent exited ({self.proc.returncode}) {doing}:\n"
                        + self.stderr()[-4000:])

    def get(self, path: str) -> tuple[int | None, str]:
        return http_get(self.base + path)

    def wait_ready(self, timeout_s: float = 90.0) -> None:
        def ready():
            self.check_running("before it was ready")
            return self.get("/readyz")[0] == 200
        wait_for("the agent's /readyz to say 200", ready, timeout_s, every_s=0.1)

    def metrics(self) -> list:
        """The samples of one scrape of /metrics (prometheus_client's parser)."""
        from prometheus_client.parser import text_string_to_metric_families

        status, body = self.get("/metrics")
        assert status == 200, f"/metrics answered {status}: {body[:500]}"
        return [s for f in text_string_to_metric_families(body) for s in f.samples]

    def sample_sum(self, name: str, **labels) -> float:
        """The sum of one scrape's samples of `name` whose labels include `labels`."""
        return sum(s.value for s in self.metrics() if s.name == name
                   and all(s.labels.get(k) == v for k, v in labels.items()))

    def programs(self) -> dict[int, str]:
        """id -> name of the BPF programs the agent holds (its fds, /proc/PID/fdinfo), named
        by `bpftool prog show`."""
        ids = prog_ids_of(self.pid)
        return {p["id"]: p.get("name", "") for p in bpftool("prog", "show") if p["id"] in ids}

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait(self, timeout_s: float = 60.0) -> int:
        code = self.proc.wait(timeout=timeout_s)
        self._reader.join(5)
        return code

    def close(self) -> None:
        stop(self.proc, signal.SIGTERM, timeout_s=30)
        self._reader.join(5)


# -- the Go services -------------------------------------------------------------------------

def private_copy(binary: str, directory: Path, name: str) -> str:
    """`binary` copied to directory/name: the same program, an executable of its own."""
    path = directory / name
    shutil.copy2(binary, path)
    os.chmod(path, 0o755)
    return str(path)


class Service:
    """A slowreader (a private copy, -mode sink reading 64 B at a time), logging each Read,
    named `name` by OTEL_SERVICE_NAME; load() starts a client streaming 64-byte messages with
    5 ms pauses, so each of its Reads parks ~5 ms waiting for the peer: a slow read."""

    def __init__(self, binary: str, log: Path, name: str):
        self.name = name
        self.started_ns = time.monotonic_ns()     # just before its exec
        self.started_wall = time.time()
        self.server = SlowReader("-readsize", "64", "-mode", "sink", log=log, binary=binary,
                                 env={"OTEL_SERVICE_NAME": name})
        self.pid, self.addr = self.server.pid, self.server.addr
        self.loads: list[subprocess.Popen] = []

    def load(self, seconds: float, conns: int = 1) -> subprocess.Popen:
        lg = subprocess.Popen([LOADGEN, "-addr", self.addr, "-conns", str(conns), "-size", "64",
                               "-mode", "stream", "-pause", "5ms", "-duration", f"{seconds}s"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.loads.append(lg)
        return lg

    def wait_loads(self, timeout_s: float = 120.0) -> None:
        for lg in self.loads:
            lg.wait(timeout=timeout_s)

    def kill(self) -> None:
        """SIGKILL: the log keeps what was flushed (every 0.5 s)."""
        for lg in self.loads:
            stop(lg, signal.SIGKILL)
        stop(self.server.proc, signal.SIGKILL)

    def stop(self) -> int:
        """Its clients, then itself (SIGTERM: it flushes its log and exits 0)."""
        for lg in self.loads:
            stop(lg, signal.SIGTERM)
        return self.server.stop()

    def reads(self) -> list[dict]:
        """Its own log of every Read (CLOCK_MONOTONIC start_ns/end_ns around the call)."""
        if not self.server.log.exists():
            return []
        out = []
        for line in self.server.log.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:      # a line cut by a kill
                pass
        return out

    def slow_reads(self) -> list[dict]:
        return [r for r in self.reads() if r["duration_ns"] >= SLOW_NS]


# -- spans at the receiver -------------------------------------------------------------------

def read_spans(receiver, pid: int) -> list[dict]:
    """The attributes of every read span the receiver got from process `pid`'s resource."""
    from .otlp_receiver import attrs

    return [attrs(s.attributes) for res, s in receiver.got.spans()
            if res.get("process.pid") == pid and s.name.startswith("tcp read ")]


def span_resources(receiver, pid: int) -> list[dict]:
    return [res for res, s in receiver.got.spans() if res.get("process.pid") == pid]


def matching_read(span: dict, reads: list[dict]) -> dict | None:
    """The Read of the program's log a span is about: same goroutine and fd, and the span's
    read inside the program's timing of it. The program reads CLOCK_MONOTONIC just before it
    calls conn.Read and just after it returns, and the probes stamp the read inside that call
    (at net.(*conn).Read's entry and return, or its syscalls), so the span lies within the
    logged read however long a loaded machine delays either side. One goroutine's reads of one
    fd do not overlap: the read it lies in is the one; CLOCK_SLACK_NS allows for the program's
    calibration of its clock, and the nearest read within it is taken (reads that return at
    once follow each other microseconds apart)."""
    start, end = span["otelwater.read.start_ns"], span["otelwater.read.end_ns"]
    best, best_out = None, CLOCK_SLACK_NS + 1
    for r in reads:
        if r["goid"] != span.get("otelwater.goroutine.id") or r["fd"] != span.get("otelwater.fd"):
            continue
        out = max(0, r["start_ns"] - start) + max(0, end - r["end_ns"])   # how far outside
        if out < best_out:
            best, best_out = r, out
    return best


def has_span(read: dict, spans: list[dict]) -> bool:
    return any(matching_read(s, [read]) is not None for s in spans)


# -- what the kernel holds -------------------------------------------------------------------

def bpftool(*args: str) -> list:
    out = subprocess.run(["bpftool", *args, "--json"], capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out) if out.strip() else []


def perf_of(pid: int) -> list[dict]:
    """`bpftool perf list`: the tracepoints, kprobes and uprobes process `pid` attached."""
    return [p for p in bpftool("perf", "list") if p.get("pid") == pid]


def links_of(prog_ids: set[int]) -> list[dict]:
    """`bpftool link show`: the links of these programs."""
    return [link for link in bpftool("link", "show") if link.get("prog_id") in prog_ids]


def maps_of(pid: int) -> dict[int, dict]:
    """id -> `bpftool map show` entry of the BPF maps process `pid` holds (its fds)."""
    ids = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:bpf-map":
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                ids |= {int(line.split()[1]) for line in f if line.startswith("map_id:")}
        except OSError:
            continue
    return {m["id"]: m for m in bpftool("map", "show") if m["id"] in ids}


def loaded(prog_ids: set[int]) -> set[int]:
    """Which of these programs are loaded at all (`bpftool prog show`)."""
    return prog_ids & {p["id"] for p in bpftool("prog", "show")}


def tracefs_events_of(pid: int) -> list[str]:
    """uprobe/kprobe events BCC named after process `pid` (…_bcc_PID, made through tracefs
    on kernels without perf's kprobe/uprobe PMUs: they outlive a SIGKILL)."""
    out = []
    for base in TRACEFS:
        for name in ("uprobe_events", "kprobe_events"):
            try:
                with open(f"{base}/{name}") as f:
                    out += [line for line in f if f"_bcc_{pid}" in line]
            except OSError:
                continue
    return out


def gone_within(prog_ids: set[int], timeout_s: float = 10.0) -> set[int]:
    """The programs still loaded after timeout_s (the kernel frees a closed program after an
    RCU grace period): empty once all are gone."""
    end = time.monotonic() + timeout_s
    while True:
        left = loaded(prog_ids)
        if not left or time.monotonic() > end:
            return left
        time.sleep(0.1)


# -- Prometheus ------------------------------------------------------------------------------

class Prometheus:
    """Debian's Prometheus scraping `target` every second as job `job`, its config and TSDB
    in `tmp`, on a free port."""

    def __init__(self, tmp: Path, target: str, job: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.job = job
        cfg = tmp / "prometheus.yml"
        cfg.write_text(f"""\
global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: {job}
    static_configs:
      - targets: ["{target}"]
""")
        self.log = tmp / "prometheus.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [PROMETHEUS, f"--config.file={cfg}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT)

    def api(self, path: str, **params):
        status, body = http_get(f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}",
                                timeout_s=10)
        if status != 200:
            return None
        data = json.loads(body)
        return data["data"] if data.get("status") == "success" else None

    def target_health(self) -> str | None:
        data = self.api("targets") or {}
        for t in data.get("activeTargets", []):
            if t.get("labels", {}).get("job") == self.job:
                return t.get("health")
        return None

    def query(self, expr: str) -> list:
        assert self.proc.poll() is None, "prometheus exited:\n" + self.log.read_text()[-2000:]
        return (self.api("query", query=expr) or {}).get("result", [])

    def value(self, expr: str) -> float | None:
        """The value of a query that gives one series, else None."""
        got = self.query(expr)
        return float(got[0]["value"][1]) if len(got) == 1 else None

    def stop(self) -> None:
        stop(self.proc, signal.SIGTERM, timeout_s=15)


# -- an otelwater run that must not get as far as BPF ----------------------------------------

# Runs `otelwater ARGS` as `python -m otelwater` does and, at its exit, writes to the file named
# by $OTW_TEST_EXIT_REPORT what it had come to: the BPF objects and perf events its fds held, and
# whether the modules that load and attach the probes (the kernel probe, the Go read sampler:
# imported only once the run starts) were ever imported.
EXIT_REPORT = r"""
import atexit, json, os, runpy, sys

def report():
    fds = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link.startswith("anon_inode:bpf") or link == "anon_inode:[perf_event]":
            fds.append(link)
    probes = sorted(m for m in ("otelwater.probes.kernel", "otelwater.probes.goread")
                    if m in sys.modules)
    with open(os.environ["OTW_TEST_EXIT_REPORT"], "w") as f:
        json.dump({"bpf_fds": fds, "probe_modules": probes}, f)

atexit.register(report)
sys.argv = ["otelwater", *sys.argv[1:]]
runpy.run_module("otelwater", run_name="__main__", alter_sys=True)
"""


def refused_run(tmp: Path, *args: str, env: dict | None = None) -> tuple[int, str, dict]:
    """(exit code, stderr, exit report) of `otelwater ARGS` run through EXIT_REPORT."""
    report = tmp / f"exit-report-{time.monotonic_ns()}.json"
    r = subprocess.run([sys.executable, "-c", EXIT_REPORT, *args], capture_output=True,
                       text=True, timeout=60, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT),
                            "OTW_TEST_EXIT_REPORT": str(report), **(env or {})})
    return r.returncode, r.stderr, json.loads(report.read_text())
