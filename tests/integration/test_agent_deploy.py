"""`otelwater agent --go-binary PATH` across deploys: a new build written over PATH (a rename, as
package managers and deploy tools do: a new inode at the same path), the old process stopped,
the new one started from PATH.

- The new build's process is traced, and its slow reads get verdicts (the agent resolved the
  path once at its start, and a new inode at PATH was nobody it selected).
- What the agent held for the old build goes once no process runs it: its uprobes (their
  offsets in `bpftool perf list`, which differ between the two Go versions' builds) and its row
  in the table the kernel enters new processes from (exec_targets, dumped with bpftool). A
  deploy a day for weeks would otherwise pile up uprobes, rows (the table is bounded: a full
  one stops restarts from being traced at their exec) and the old files' inodes, which the
  kernel's uprobes keep alive.
- A container's binary (another mount namespace: the agent knows it by /proc/PID/exe only)
  keeps its row between its processes: the next process of the same file is entered at exec.
Ground truth: the kernel's own lists (bpftool) and stat of PATH (or of the file through the
container's /proc/PID/root), the service's log of its Reads."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import struct
import subprocess
import time

import pytest

from tests.goexamples import built

from .agent_harness import (LOADGEN, Agent, Service, bpftool, maps_of, perf_of, private_copy,
                            stop, wait_for)
from .services import children
from .test_agent import AGENT_ENV, go_versions

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("bpf_ready")]


def deploy(build: str, path: str) -> tuple[int, int]:
    """`build` written over `path` as a deploy does (copy beside it, rename over it); the new
    file's (st_dev, st_ino)."""
    tmp = path + ".new"
    shutil.copy2(build, tmp)
    os.chmod(tmp, 0o755)
    os.rename(tmp, path)
    st = os.stat(path)
    return st.st_dev, st.st_ino


def uprobe_offsets(agent: Agent) -> set[int]:
    return {p["offset"] for p in perf_of(agent.pid) if p.get("fd_type") == "uprobe"}


def exec_rows(agent: Agent) -> list[tuple[int, int]]:
    """(dev, ino) of each row of the agent's exec_targets (struct goread_exe: two u64, dev as
    the kernel keeps it), from the raw key bytes bpftool dumps."""
    ids = [i for i, m in maps_of(agent.pid).items() if m.get("name") == "exec_targets"]
    assert len(ids) == 1, maps_of(agent.pid)
    rows = []
    for e in bpftool("map", "dump", "id", str(ids[0])):
        raw = bytes(int(b, 16) for b in e["key"])
        rows.append(struct.unpack("<QQ", raw))
    return rows


def kernel_dev(st_dev: int) -> int:
    return os.major(st_dev) << 20 | os.minor(st_dev)


@contextlib.contextmanager
def run_deploy(tmp_path, probes: str):
    old_v, new_v = go_versions()
    path = private_copy(built(old_v, "slowreader"), tmp_path, "svc")
    agent = Agent("--probes", probes, "--go-binary", path, "--min-age", "0.5", env=AGENT_ENV)
    svc = None
    try:
        agent.wait_ready()
        svc = Service(path, tmp_path / "v1.jsonl", "deploy-v1")
        agent.wait_event("process.traced", pid=svc.pid, timeout_s=30)
        before = uprobe_offsets(agent) if probes == "uprobe" else set()
        # When a new build is deployed over the path and the service restarted from it
        new_key = deploy(built(new_v, "slowreader"), path)
        assert svc.stop() == 0
        svc = Service(path, tmp_path / "v2.jsonl", "deploy-v2")
        # Then the new build's process is traced, named by its Go version
        traced = agent.wait_event("process.traced", pid=svc.pid, timeout_s=30)
        assert traced["go_version"] == new_v, traced
        # ...and its slow reads get verdicts
        svc.load(2).wait(timeout=60)
        wait_for("the new build's verdicts", lambda: agent.sample_sum(
            "otelwater_read_verdicts_total", service_name="deploy-v2") >= 50)
        yield agent, before, new_key
        agent.check_running("at the end")
    finally:
        if svc is not None:
            svc.stop()
        agent.close()


def test_a_deploy_over_the_path_is_traced_and_the_old_builds_uprobes_go(tmp_path):
    with run_deploy(tmp_path, "uprobe") as (agent, before, _):
        assert before, "no uprobe of the first build in bpftool perf list"
        # ...and the first build's uprobes are detached once its process is gone: only the
        # new build's offsets are attached
        now = wait_for("the old build's uprobes to go", lambda: (
            o if not (o := uprobe_offsets(agent)) & before else None), timeout_s=15)
        assert now, "no uprobe of the new build"


def test_a_deploy_over_the_path_leaves_one_exec_row(tmp_path):
    with run_deploy(tmp_path, "tracepoint") as (agent, _, (dev, ino)):
        # ...and the kernel enters new processes from the new file's row only
        want = [(kernel_dev(dev), ino)]
        wait_for("one exec_targets row, the new file's", lambda: exec_rows(agent) == want,
                 timeout_s=15)


# -- a container's binary: known by /proc/PID/exe only ---------------------------------------

def test_a_containers_binary_keeps_its_row_between_its_processes(tmp_path):
    """A container's file system is another mount namespace: the agent reaches the service's
    binary through /proc/PID/exe only, a path that dies with the process. What it holds for the
    binary must outlive that process (RETIRE_IDLE_S), so the next process of the same file is
    entered by the kernel at its exec, as on the host."""
    old_v, _ = go_versions()
    ctr = tmp_path / "ctr"
    ctr.mkdir()
    # Given a "container": a mount namespace of its own, held by a process, with the service's
    # binary on a tmpfs there only (this namespace sees an empty directory)
    holder = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "--fork",
                               "--kill-child", "sleep", "infinity"])
    agent = None
    started: list[subprocess.Popen] = []
    try:
        ns = wait_for("the container's holder", lambda: (children(holder.pid) or [None])[0])
        enter = ["nsenter", "-t", str(ns), "-m", "--"]
        subprocess.run([*enter, "sh", "-c", f"mount -t tmpfs tmpfs {ctr} && "
                        f"cp {built(old_v, 'slowreader')} {ctr}/svc"], check=True)
        assert not (ctr / "svc").exists()
        inside = os.stat(f"/proc/{ns}/root{ctr}/svc")
        row = (kernel_dev(inside.st_dev), inside.st_ino)

        def start(name: str) -> tuple[subprocess.Popen, int]:
            p = subprocess.Popen([*enter, f"{ctr}/svc", "-readsize", "64", "-mode", "sink"],
                                 stdout=subprocess.PIPE, text=True,
                                 env={**os.environ, "OTEL_SERVICE_NAME": name})
            started.append(p)
            addr = json.loads(p.stdout.readline())["listening"]
            return p, addr

        agent = Agent("--probes", "tracepoint", "--min-age", "0.5", env=AGENT_ENV)
        agent.wait_ready()
        first, _ = start("ctr-first")
        traced = agent.wait_event("process.traced", pid=first.pid, timeout_s=30)
        assert traced["exe"] == f"/proc/{first.pid}/exe", traced
        wait_for("the kernel's row for the container's binary", lambda: row in exec_rows(agent),
                 timeout_s=15)
        # When its process exits and a few scans go by
        first.kill()
        first.wait()
        agent.wait_event("process.forgotten", pid=first.pid, timeout_s=30)
        time.sleep(2.0)
        # Then the row is still there (before: gone at the next scan, and the next process
        # was traced only once a scan found it)
        assert row in exec_rows(agent)
        # ...and the next process of the same file is traced, its reads with verdicts
        second, addr = start("ctr-second")
        agent.wait_event("process.traced", pid=second.pid, timeout_s=30)
        lg = subprocess.Popen([LOADGEN, "-addr", addr, "-size", "64", "-mode", "stream",
                               "-pause", "5ms", "-duration", "2s"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started.append(lg)
        lg.wait(timeout=60)
        wait_for("the second process's verdicts", lambda: agent.sample_sum(
            "otelwater_read_verdicts_total", service_name="ctr-second") >= 50)
        assert not agent.events("process.failed", pid=second.pid)
        agent.check_running("at the end")
    finally:
        for p in started:
            stop(p, signal.SIGKILL)
        if agent is not None:
            agent.close()
        stop(holder, signal.SIGKILL)
