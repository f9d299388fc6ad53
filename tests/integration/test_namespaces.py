"""otelwater beside a service in another network namespace, as a sidecar or a DaemonSet agent
runs: addresses, port filters, socket keys and standing water are the traced process's view,
not otelwater's own.

Each test makes a network namespace (`ip netns add`, a unique name, deleted at the end with
everything in it), starts a real Go reader (examples/bin/slowreader) and its writer inside it,
stops the reader (SIGSTOP) so real backlog stands in its queue before otelwater starts, and runs
`otelwater watch` from this (the root) namespace. The ground truth is measured inside the
namespace, independently of otelwater: `ss -tnmi` there (sock_diag of that namespace) for the
connection's ends, its Recv-Q and its skmem, and /proc/PID/ns/net for the namespace. Then more
data comes and the reader is let go (SIGCONT): the kernel's snapshots and the Go reads' verdicts
carry the same socket key as the standing water. Behind the veth pair otelwater runs as the
agent does, without CAP_SYS_ADMIN: it cannot join the service's namespace (setns), and need not.
Before otelwater read other namespaces, `-P` with the service's port was refused ("no TCP socket
uses port") and no standing water was reported at all."""

from __future__ import annotations

import ipaddress
import json
import os
import queue
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from otelwater.sockkey import format_key, sock_key

from .conftest import OTELWATER, ROOT
from .slowreader import SLOWREADER

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("bpf_ready")]
ENV = dict(os.environ, PYTHONPATH=str(ROOT))
STANDING = 40_000          # bytes written into the stopped reader's queue before the watch
MORE = 10_000              # and after it started

# The writer, run inside the namespace: connects to the reader, then obeys lines on stdin:
#   write N        send N more bytes (answers "wrote N")
#   pair N         a loopback connection of its own on another port, N bytes left unread in
#                  it (answers "pair LISTEN_PORT CLIENT_PORT"): water the filters must keep out
WRITER = textwrap.dedent("""\
    import socket, sys, time
    def send(s, n):
        s.setblocking(False)
        sent, end = 0, time.monotonic() + 10
        while sent < n and time.monotonic() < end:
            try:
                sent += s.send(b"w" * min(4096, n - sent))
            except BlockingIOError:
                time.sleep(0.005)
        return sent
    host, port = sys.argv[1], int(sys.argv[2])
    conn = socket.create_connection((host, port))
    print("connected", conn.getsockname()[1], flush=True)
    keep = []
    for line in sys.stdin:
        cmd, n = line.split()
        if cmd == "write":
            print("wrote", send(conn, int(n)), flush=True)
        elif cmd == "pair":
            ls = socket.socket()
            ls.bind(("127.0.0.1", 0))
            ls.listen()
            c = socket.create_connection(ls.getsockname())
            a, _ = ls.accept()
            keep += [ls, c, a]
            send(c, int(n))
            print("pair", ls.getsockname()[1], c.getsockname()[1], flush=True)
""")


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def veth_pair(target: str, ip_there: list[str]) -> tuple[str, str, str]:
    """A veth pair from the root namespace into network namespace `target` (a name under
    /run/netns or a pid of a process in it), a free 10.x.y.0/30 of its own; `ip_there` runs
    `ip` in that namespace. (The root side's device, its address, the namespace side's.)"""
    used = sh("ip", "-o", "-4", "addr") + sh("ip", "-4", "route")
    for _ in range(50):
        net = f"10.{secrets.randbelow(50) + 200}.{secrets.randbelow(256)}"
        if f" {net}." not in used:
            break
    else:
        pytest.fail("no free 10.x.y.0/30 for the veth pair")
    outside, inside = f"{net}.1", f"{net}.2"
    host, peer = f"otw{secrets.token_hex(4)}", f"otw{secrets.token_hex(4)}"
    sh("ip", "link", "add", host, "type", "veth", "peer", "name", peer)
    try:
        sh("ip", "link", "set", peer, "netns", target)
        sh("ip", "addr", "add", f"{outside}/30", "dev", host)
        sh("ip", "link", "set", host, "up")
        sh(*ip_there, "addr", "add", f"{inside}/30", "dev", peer)
        sh(*ip_there, "link", "set", peer, "up")
    except BaseException:
        subprocess.run(["ip", "link", "del", host], capture_output=True)
        raise
    return host, outside, inside


class Netns:
    """A network namespace of this test's own, lo up; deleted (with its veth ends) by close()."""

    def __init__(self):
        self.name = f"otw-test-{os.getpid()}-{secrets.token_hex(3)}"
        sh("ip", "netns", "add", self.name)
        self.veths: list[str] = []
        try:
            sh("ip", "-n", self.name, "link", "set", "lo", "up")
            self.inode = os.stat(f"/run/netns/{self.name}").st_ino
        except BaseException:
            self.close()
            raise

    def argv(self, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *cmd]

    def veth(self) -> tuple[str, str]:
        """A veth pair from the root namespace into this one, a /30 of its own: (the root
        side's address, the namespace side's)."""
        host, outside, inside = veth_pair(self.name, ["ip", "-n", self.name])
        self.veths.append(host)
        return outside, inside

    def close(self) -> None:
        for dev in self.veths:
            subprocess.run(["ip", "link", "del", dev], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def endpoint(text: str) -> tuple[str, int]:
    """ss's "127.0.0.1:80" / "[::ffff:127.0.0.1]:80" as otelwater prints it."""
    host, port = text.rsplit(":", 1)
    ip = ipaddress.ip_address(host.strip("[]"))
    if ip.version == 6 and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return str(ip), int(port)


def ss_in(ns: Netns, lport: int, rport: int) -> dict:
    """The connection lport -> rport as `ss -tnmi` inside the namespace shows it: its ends, its
    Recv-Q, and skmem's r (volume), rb (capacity) and d (drops)."""
    out = sh(*ns.argv("ss", "-tnmiH", "state", "all",
                      f"( sport = :{lport} and dport = :{rport} )"))
    rows = [ln.split() for ln in out.splitlines() if ln and not ln[0].isspace()]
    assert len(rows) == 1, out
    state, recv_q, _send_q, local, peer = rows[0][:5]
    (laddr, lp), (raddr, rp) = endpoint(local), endpoint(peer)
    mem = re.search(r"skmem:\(r(\d+),rb(\d+),.*?d(\d+)\)", out)
    assert mem, out
    return dict(state=state, recv_q=int(recv_q), laddr=laddr, lport=lp, raddr=raddr, rport=rp,
                volume=int(mem[1]), capacity=int(mem[2]), drops=int(mem[3]))


def still_recv_q(ns: Netns, lport: int, rport: int, settle_s: float = 0.5,
                 timeout_s: float = 10.0) -> dict:
    """ss_in once its Recv-Q has stopped changing (everything written has arrived)."""
    last, since, end = ss_in(ns, lport, rport), time.monotonic(), time.monotonic() + timeout_s
    while time.monotonic() < end:
        time.sleep(0.1)
        now = ss_in(ns, lport, rport)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= settle_s:
            return now
    return last


def free_root_port() -> int:
    """A port no socket of the root namespace uses (bound and released)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Reader:
    """slowreader inside the namespace (`ip netns exec` execs it: the same pid)."""

    def __init__(self, ns: Netns, listen: str, log):
        self.proc = subprocess.Popen(ns.argv(SLOWREADER, "-mode", "sink", "-listen", listen,
                                             "-log", str(log)),
                                     stdout=subprocess.PIPE, text=True)
        hello = json.loads(self.proc.stdout.readline())
        self.pid = hello["pid"]
        self.port = int(hello["listening"].rsplit(":", 1)[1])
        assert self.pid == self.proc.pid

    def stop_reading(self) -> None:
        """SIGSTOP, and back once every thread is stopped (a thread still running could read
        what the test writes next)."""
        os.kill(self.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            states = []
            for task in os.listdir(f"/proc/{self.pid}/task"):
                try:
                    with open(f"/proc/{self.pid}/task/{task}/stat") as f:
                        states.append(f.read().rsplit(")", 1)[1].split()[0])
                except OSError:
                    continue
            if states and all(st in ("T", "t") for st in states):
                return
            time.sleep(0.01)
        raise AssertionError(f"slowreader {self.pid} did not stop")

    def go_on(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def close(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Writer:
    """WRITER inside the namespace, connected to host:port."""

    def __init__(self, ns: Netns, host: str, port: int):
        self.proc = subprocess.Popen(ns.argv(sys.executable, "-c", WRITER, host, str(port)),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        word, lport = self.proc.stdout.readline().split()
        assert word == "connected"
        self.port = int(lport)

    def say(self, line: str) -> list[str]:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().split()

    def write(self, n: int) -> None:
        assert self.say(f"write {n}") == ["wrote", str(n)]

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


# What the agent runs with (docs/privileges.md): no CAP_SYS_ADMIN, so no setns(2)
AGENT_CAPS = ("bpf", "perfmon", "sys_ptrace", "dac_read_search")
CAP_SYS_ADMIN = 21


def agent_caps() -> list[str]:
    """setpriv's argv prefix: root still, but holding the agent's capabilities alone."""
    assert shutil.which("setpriv"), "setpriv (util-linux) missing"
    caps = ",".join(["-all", *("+" + c for c in AGENT_CAPS)])
    return ["setpriv", f"--inh-caps={caps}", f"--ambient-caps={caps}",
            f"--bounding-set={caps}", "--"]


def effective_caps(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(ln for ln in f if ln.startswith("CapEff:")).split()[1], 16)


class Watch:
    """`otelwater watch ARGS --json` run from the root namespace (behind `prefix`, e.g.
    agent_caps()), its records read as they come (wait_for) and at the end (finish)."""

    def __init__(self, *args: str, prefix: tuple[str, ...] = ()):
        self.proc = subprocess.Popen([*prefix, *OTELWATER, "watch", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=ENV, cwd=ROOT)
        self.records: list[dict] = []
        self._lines: queue.Queue = queue.Queue()
        self._err: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()
        threading.Thread(target=lambda: self._err.extend(self.proc.stderr), daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(json.loads(line))
        self._lines.put(None)

    def wait_for(self, pred, timeout_s: float = 180.0) -> dict:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            try:
                r = self._lines.get(timeout=0.5)
            except queue.Empty:
                continue
            if r is None:
                break
            self.records.append(r)
            if pred(r):
                return r
        self.kill()
        pytest.fail("the watch never said it; stderr: " + "".join(self._err))

    def finish(self, timeout_s: float = 180.0) -> list[dict]:
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail("the watch did not end; stderr: " + "".join(self._err))
        while (r := self._lines.get(timeout=10)) is not None:
            self.records.append(r)
        assert self.proc.returncode == 0, "".join(self._err)
        return self.records

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def of(records, type_: str, **fields) -> list[dict]:
    return [r for r in records if r["type"] == type_
            and all(r.get(k) == v for k, v in fields.items())]


def water(snap: dict) -> tuple:
    return snap["unread_bytes"], snap["volume"], snap["capacity"], snap["drops"]


def water_in(truth: dict) -> tuple:
    """What ss says of the same: Recv-Q and skmem r, rb, d."""
    return truth["recv_q"], truth["volume"], truth["capacity"], truth["drops"]


def standing_snapshot(lport: int, rport: int):
    return lambda r: (r["type"] == "snapshot" and r["trigger"] == "standing"
                      and (r["lport"], r["rport"]) == (lport, rport))


def check_service_view(records, truth: dict, netns: int, pid: int) -> str:
    """Every snapshot of the connection says the service's view: its namespace, its ends as
    `ss` shows them inside, and the key of those. Returns the key."""
    key = format_key(sock_key(netns, truth["laddr"], truth["lport"], truth["raddr"],
                              truth["rport"]))
    snaps = of(records, "snapshot", lport=truth["lport"], rport=truth["rport"])
    assert snaps
    for s in snaps:
        assert (s["laddr"], s["lport"], s["raddr"], s["rport"]) == (
            truth["laddr"], truth["lport"], truth["raddr"], truth["rport"]), s
        assert s["netns"] == netns, s
        assert s["sock_key"] == key, s
    assert {s["pid"] for s in snaps} == {pid}
    return key


def check_reads(records, key: str, pid: int) -> None:
    """The Go reads after the reader went on: verdicts on the same key, the lag among them."""
    verdicts = of(records, "verdict", pid=pid)
    assert verdicts, "no verdict on the Go reads"
    assert {v["sock_key"] for v in verdicts} == {key}
    assert {r["sock_key"] for r in of(records, "read", pid=pid)} == {key}
    assert "consumer-lagging" in {v["verdict"] for v in verdicts}, \
        {v["verdict"] for v in verdicts}


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_service_in_its_own_namespace_on_loopback(tmp_path, host):
    with Netns() as ns:
        # Given a Go reader and its writer inside a namespace, on a port the root namespace
        # does not use, and another connection there holding water on another port
        port = free_root_port()
        reader = writer = None
        try:
            listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            reader = Reader(ns, listen, tmp_path / "reads.jsonl")
            writer = Writer(ns, host, port)
            other = writer.say("pair 20000")
            assert other[0] == "pair"
            other_ports = {int(other[1]), int(other[2])}
            assert ss_in(ns, port, writer.port)["state"] == "ESTAB"
            time.sleep(0.3)            # the reader's goroutine parks in its Read
            # and, the reader stopped, real backlog standing before otelwater starts
            reader.stop_reading()
            writer.write(STANDING)
            truth = still_recv_q(ns, port, writer.port)
            assert truth["recv_q"] == STANDING
            assert port not in {int(ln.split()[3].rsplit(":", 1)[1])
                                for ln in sh("ss", "-tanH").splitlines()}
            netns = os.stat(f"/proc/{reader.pid}/ns/net").st_ino
            assert netns == ns.inode != os.stat("/proc/self/ns/net").st_ino

            # When a watch filters on the port alone (no pid: every namespace)
            by_port = Watch("-P", str(port), "--go-pid", str(reader.pid), "--json",
                            "-i", "0.3", "-d", "3")
            first = by_port.wait_for(standing_snapshot(port, writer.port))
            records = by_port.finish()
            # Then the port, used only inside the namespace, was accepted and filters to it
            assert water(first) == water_in(truth)
            snaps = of(records, "snapshot")
            assert snaps and all(port in (s["lport"], s["rport"]) for s in snaps)
            assert not other_ports & {s["lport"] for s in snaps}
            check_service_view(records, truth, netns, reader.pid)

            # When a watch follows the process, reads of it traced
            by_pid = Watch("-p", str(reader.pid), "--go-pid", str(reader.pid), "--json",
                           "-i", "0.3", "-d", "6")
            first = by_pid.wait_for(standing_snapshot(port, writer.port))
            # (the standing water seen, more comes and the reader goes on)
            writer.write(MORE)
            time.sleep(0.5)
            reader.go_on()
            records = by_pid.finish()
        finally:
            for p in (writer, reader):
                if p is not None:
                    p.close()
    # Then the standing water at start is what ss measured inside the namespace, no more
    assert water(first) == water_in(truth) and truth["recv_q"] == STANDING
    assert first["tcp_state"] == "ESTABLISHED" and first["comm"] == "slowreader"
    # every snapshot of it (standing, the kernel's arrivals and sweeps) is the service's view
    key = check_service_view(records, truth, netns, reader.pid)
    kernel = [s for s in of(records, "snapshot", sock_key=key) if s["trigger"] != "standing"]
    assert kernel, "no kernel snapshot of the connection"
    assert max(s["unread_bytes"] for s in kernel) > STANDING
    # the other connection in the namespace is not the process's: not reported
    assert not other_ports & {s["lport"] for s in of(records, "snapshot")}
    check_reads(records, key, reader.pid)


def test_service_behind_a_veth_pair_reports_its_own_view(tmp_path):
    with Netns() as ns:
        # Given the service inside, its client outside (the root namespace), a veth between:
        # the two ends' addresses differ, and the keys of each side would too. The service
        # listens as Go services do by default, on every address of both families (":0"): its
        # connection is an IPv6 socket speaking IPv4 (::ffff:a.b.c.d, /proc/PID/net/tcp6)
        outside, inside = ns.veth()
        reader = client = None
        try:
            reader = Reader(ns, ":0", tmp_path / "reads.jsonl")
            client = socket.create_connection((inside, reader.port), timeout=10)
            cport = client.getsockname()[1]
            assert client.getsockname()[0] == outside
            time.sleep(0.3)
            reader.stop_reading()
            client.sendall(b"v" * STANDING)
            truth = still_recv_q(ns, reader.port, cport)
            assert truth["recv_q"] == STANDING
            assert (truth["laddr"], truth["raddr"]) == (inside, outside)
            assert "[::ffff:" in sh(*ns.argv("ss", "-tnH", f"( sport = :{reader.port} )"))
            netns = os.stat(f"/proc/{reader.pid}/ns/net").st_ino
            # When otelwater, in the root namespace with the agent's capabilities alone (it
            # cannot join the service's namespace), follows the service
            watch = Watch("-p", str(reader.pid), "--go-pid", str(reader.pid), "--json",
                          "-i", "0.3", "-d", "6", prefix=agent_caps())
            first = watch.wait_for(standing_snapshot(reader.port, cport))
            caps = effective_caps(watch.proc.pid)
            client.sendall(b"v" * MORE)
            time.sleep(0.5)
            reader.go_on()
            records = watch.finish()
        finally:
            if client is not None:
                client.close()
            if reader is not None:
                reader.close()
    # Then what it reports is the service's view: its namespace, its address as local, its
    # standing water with the socket's own figures
    assert caps and not caps & (1 << CAP_SYS_ADMIN)
    assert water(first) == water_in(truth) and truth["recv_q"] == STANDING
    key = check_service_view(records, truth, netns, reader.pid)
    client_view = format_key(sock_key(os.stat("/proc/self/ns/net").st_ino, outside, cport,
                                      inside, reader.port))
    assert key != client_view
    assert client_view not in {s["sock_key"] for s in of(records, "snapshot")}
    check_reads(records, key, reader.pid)
