"""`otelwater agent` as a sidecar: in a pod whose containers share one pid namespace, beside a Go
service, with the node's other sockets and processes around it.

The pod is made as a container runtime makes one: a pause process that is pid 1 of a new pid
namespace, with a mount namespace of its own (its /proc numbers the pod's processes) and a new
network namespace (lo, and a veth pair from this namespace to reach the agent's /metrics). The
Go service (examples/bin/slowreader, reading 4 KiB every 20 ms) and the agent join the pod by
nsenter, as containers do; a feeder writes to the service from the pod's network without pause,
so its queue stays full and its reads find data that waited.

The ground truth is the test's own: the pid the Go program gives itself (os.Getpid(), which it
prints) and the NSpid line of its /proc status here (two numbers: this namespace's and the
pod's), the service's Recv-Q measured with `ss` inside the pod, and a socket of this (the
node's) namespace with water in it, filled before and during the run.

Before the probes read ids in the pod's pid namespace (bpf/pidns.h), the agent took the service
by its pod pid and its programs looked it up by its node pid: not one Go read was traced, and
its socket's water was reported under both pids; the node's sockets were watched too."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest

from otelwater.sockkey import format_key, sock_key

from .agent_harness import Agent, stop
from .loopback import Pair
from .services import children, wait_for
from .slowreader import SLOWREADER
from .test_namespaces import sh, veth_pair

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("bpf_ready")]

SERVICE_PORT = 7000
FEEDER = """\
import socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
print(s.getsockname()[1], flush=True)
s.settimeout(0.2)
chunk = b"w" * 4096
while True:
    try:
        s.send(chunk)
    except (TimeoutError, BlockingIOError):
        pass
    except OSError:         # the service is gone: the test is over
        break
"""


def nspids(pid: int) -> list[int]:
    """The NSpid line of /proc/PID/status: its pid here, then in each namespace below."""
    with open(f"/proc/{pid}/status") as f:
        return [int(x) for x in re.search(r"^NSpid:\s+(.*)$", f.read(), re.M)[1].split()]


class Pod:
    """A pod's namespaces, held by its pause process (pid 1 there). close() ends that pid 1,
    and the kernel kills every process of the pod with it."""

    def __init__(self):
        self.unshare = subprocess.Popen(["unshare", "--pid", "--net", "--mount", "--fork",
                                         "--mount-proc", "--kill-child", "sleep", "infinity"])
        self.veth = None
        try:
            self.pid = wait_for("the pod's pid 1", lambda: (children(self.unshare.pid) or
                                                            [None])[0], timeout_s=10)
            sh(*self.enter("-n"), "ip", "link", "set", "lo", "up")
            self.netns = os.stat(f"/proc/{self.pid}/ns/net").st_ino
            # a veth pair from here into the pod: the pod side's address
            self.veth, _, self.address = veth_pair(str(self.pid), [*self.enter("-n"), "ip"])
        except BaseException:
            self.close()
            raise

    def enter(self, *which: str) -> list[str]:
        """nsenter's argv prefix into the pod's namespaces (`which`: all of them by default)."""
        return ["nsenter", "-t", str(self.pid), *(which or ("-p", "-m", "-n")), "--"]

    def start(self, *cmd: str, which: tuple[str, ...] = ()) -> tuple[subprocess.Popen, int]:
        """`cmd` run in the pod: the nsenter process, and the node pid of `cmd` (nsenter's
        child when it enters the pid namespace, else nsenter itself, become `cmd`)."""
        p = subprocess.Popen([*self.enter(*which), *cmd], stdout=subprocess.PIPE, text=True)
        if which and "-p" not in which:
            return p, p.pid
        pid = wait_for(f"{cmd[0]} in the pod", lambda: (children(p.pid) or [None])[0],
                       timeout_s=10)
        return p, pid

    def recv_q(self, lport: int, rport: int) -> int:
        """The service's Recv-Q as `ss` inside the pod says it."""
        out = sh(*self.enter("-n"), "ss", "-Htn", "state", "established",
                 f"( sport = :{lport} and dport = :{rport} )")
        fields = out.split()
        return int(fields[0]) if fields else -1

    def close(self) -> None:
        if self.veth:
            subprocess.run(["ip", "link", "del", self.veth], capture_output=True)
        stop(self.unshare, signal.SIGKILL)


@pytest.fixture
def pod():
    p = Pod()
    yield p
    p.close()


def samples_of(agent: Agent, prefix: str) -> list:
    return [s for s in agent.metrics() if s.name.startswith(prefix)]


@pytest.mark.parametrize("probes", ["tracepoint", "uprobe"])
def test_sidecar_traces_its_pod_by_the_pods_pids_and_watches_its_pods_sockets(pod, probes):
    # Given a Go service in the pod, which knows itself as a pid of the pod's
    svc, svc_node_pid = pod.start(SLOWREADER, "-mode", "sink", "-delay", "20ms",
                                  "-listen", f"127.0.0.1:{SERVICE_PORT}")
    agent = None
    outside = Pair().connect()   # water in a socket of the node's namespace, not the pod's
    try:
        hello = svc.stdout.readline()
        pod_pid = int(re.search(r'"pid":\s*(\d+)', hello)[1])
        assert nspids(svc_node_pid) == [svc_node_pid, pod_pid], hello
        assert pod_pid != svc_node_pid
        outside.fill(100_000)
        # ...fed from the pod's network without pause (the feeder is not the pod's process)
        feeder, _ = pod.start(sys.executable, "-c", FEEDER, str(SERVICE_PORT), which=("-n",))
        feeder_port = int(feeder.stdout.readline())
        # When the agent runs in the pod (every Go process it can see: the service)
        agent = Agent("--min-age", "0.5", "--probes", probes, prefix=tuple(pod.enter()),
                      host=pod.address)
        agent.pid = wait_for("the agent in the pod", lambda: (children(agent.proc.pid) or
                                                             [None])[0])
        agent.wait_ready(timeout_s=120)
        traced = agent.wait_event("process.traced", timeout_s=30)
        # ...and more water comes to the node's socket while it runs
        outside.fill(50_000)
        # Then it traced the service under the pod's pid for it, and nothing else
        assert traced["pid"] == pod_pid, traced
        assert [e["pid"] for e in agent.events("process.traced")] == [pod_pid]
        # ...the service's queue stands full (ss inside the pod), and its reads get verdicts:
        # the bytes waited in its queue
        assert pod.recv_q(SERVICE_PORT, feeder_port) > 0
        wait_for("consumer-lagging verdicts of the service", lambda: sum(
            s.value for s in samples_of(agent, "otelwater_read_verdicts_total")
            if s.labels.get("service_name") == "slowreader"
            and s.labels.get("otelwater_verdict") == "consumer-lagging") >= 20, timeout_s=30)
        # ...its socket's water is reported, keyed in the pod's network namespace, under its
        # pod pid only
        key = format_key(sock_key(pod.netns, "127.0.0.1", SERVICE_PORT, "127.0.0.1",
                                  feeder_port))
        water = wait_for("the service socket's water", lambda: [
            s for s in samples_of(agent, "otelwater_socket_water_volume")
            if s.labels.get("otelwater_socket_key") == key] or None, timeout_s=30)
        assert {s.labels.get("process_pid") for s in water} == {str(pod_pid)}, water
        assert max(s.value for s in water) > 0
        # ...and no socket of the node's namespace is watched: the filled one has no series
        outside_key = format_key(sock_key(os.stat("/proc/self/ns/net").st_ino, "127.0.0.1",
                                          outside.port, "127.0.0.1", outside.client_port))
        every = agent.metrics()
        keys = {s.labels.get("otelwater_socket_key") for s in every} - {None}
        assert outside_key not in keys
        # ...and every socket it reports is one of the pod's: the service's connection (both
        # ends: the feeder, not a process of the pod, is no owner it can name: pid 0) or the
        # agent's own /metrics connections, which this test's scrapes make
        ends = [(s.labels["network_local_port"], s.labels["network_peer_port"]) for s in every
                if s.labels.get("network_local_port")]
        assert ends
        pod_ports = {str(SERVICE_PORT), str(agent.port)}
        assert all(pod_ports & set(e) for e in ends), (sorted(set(ends)), pod_ports)
        # (and its own metrics: its pid in the pod)
        own = nspids(agent.pid)[-1]
        pids = {s.labels.get("process_pid") for s in every} - {None}
        assert pids <= {str(pod_pid), "0", str(own)}, (pids, own)
        agent.check_running("at the end")
    finally:
        if agent is not None:
            if agent.pid != agent.proc.pid:
                os.kill(agent.pid, signal.SIGTERM)     # nsenter passes no signal on
            agent.wait(timeout_s=60)
        outside.close()
        svc.kill()
