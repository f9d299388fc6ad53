"""otelwater run as an ordinary user holding exactly the capabilities the agent ships with
(`otelwater.probes.host.AGENT_CAPABILITIES`, what the systemd unit and the DaemonSet grant):
uid/gid 65534 (nobody/nogroup, no supplementary groups, no_new_privs), those capabilities in
its bounding, inheritable and ambient sets (setpriv), and nothing else.

The service it watches is another user's (root's): the example Go server (examples/bin/
slowreader) reading 4 KiB every 20 ms while this test feeds it without pause, so its receive
queue stays full and its reads find data that waited (consumer-lagging). The ground truth is
the test's own: the server's socket is duplicated into this process (pidfd_getfd) and measured
with SIOCINQ while the server is stopped (SIGSTOP: the queue stands still), then it goes on
(SIGCONT) and its reads get their verdicts. A socket of this test's own process, filled before
the run and never read, is the standing water the start-up scan must find and attribute (its
/proc/PID/fd is root's). docs/privileges.md says what each capability is for; the tests below
also take each one away and check that the run fails naming it.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import pytest

from otelwater.probes.host import AGENT_CAPABILITIES, capability_mask, parse_caps
from tests.goexamples import debian

from .conftest import OTELWATER, ROOT, gone, prog_ids_of
from .loopback import Pair, siocinq
from .services import free_port
from .slowreader import SlowReader

if os.geteuid() != 0:
    pytest.skip("needs root: the test drops to uid 65534 holding exactly the agent's "
                "capabilities (setpriv), which only root can grant (run scripts/test.sh as root)",
                allow_module_level=True)

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("bpf_ready")]

NOBODY = 65534
SYS_PIDFD_GETFD = 438          # the same on x86-64 and arm64 (asm-generic)
# BPF helpers that write to memory or change what a traced program does: none of ours may call one
WRITING_HELPERS = ("bpf_probe_write_user", "bpf_send_signal", "bpf_send_signal_thread",
                   "bpf_override_return")


def setpriv(caps: tuple[str, ...]) -> list[str]:
    """setpriv's argv prefix: uid/gid 65534, no groups, no_new_privs, `caps` alone in the
    bounding, inheritable and ambient sets (so the program run gets them effective)."""
    tool = shutil.which("setpriv")
    assert tool, "setpriv (util-linux) missing"
    names = ",".join(["-all", *("+" + c.removeprefix("CAP_").lower() for c in caps)])
    return [tool, "--no-new-privs", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
            f"--inh-caps={names}", f"--ambient-caps={names}", f"--bounding-set={names}", "--"]


def without(cap: str) -> tuple[str, ...]:
    return tuple(c for c in AGENT_CAPABILITIES if c != cap)


@pytest.fixture(scope="module")
def user_env():
    """The environment the user runs otelwater in: cwd /, HOME /nonexistent (nobody's: nowhere
    to write).
    The checkout may be private: the user then gets a copy of the package; a venv the user
    cannot read is a skip that says so (the test never changes the permissions of the tree)."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/nonexistent",
           "LANG": "C.UTF-8"}
    probe = [*setpriv(AGENT_CAPABILITIES), sys.executable, "-c", "import otelwater.cli, bcc"]
    r = subprocess.run(probe, env=env, cwd="/", capture_output=True, text=True)
    copy = None
    if r.returncode != 0:
        copy = tempfile.mkdtemp(prefix="otelwater-src-")
        shutil.copytree(ROOT / "otelwater", os.path.join(copy, "otelwater"))
        shutil.copytree(ROOT / "bpf", os.path.join(copy, "bpf"))
        os.chmod(copy, 0o755)     # our own temp directory, nobody else's
        env["PYTHONPATH"] = copy
        r = subprocess.run(probe, env=env, cwd="/", capture_output=True, text=True)
        if r.returncode != 0:
            shutil.rmtree(copy, ignore_errors=True)
            last = (r.stderr.strip().splitlines() or ["no output"])[-1]
            pytest.skip(f"uid {NOBODY} cannot run {sys.executable} with otelwater's "
                        f"dependencies ({last}): the venv must be readable by other users "
                        "(for this test and for an agent run as its own user)")
    yield env
    if copy:
        shutil.rmtree(copy, ignore_errors=True)


def run_as(caps, *args, env, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([*setpriv(caps), *OTELWATER, *args], env=env, cwd="/",
                          capture_output=True, text=True, timeout=timeout)


def start_as(caps, *args, env, stderr=subprocess.PIPE) -> subprocess.Popen:
    return subprocess.Popen([*setpriv(caps), *OTELWATER, *args], env=env, cwd="/",
                            stdout=subprocess.PIPE, stderr=stderr, text=True)


def assert_holds_exactly_agent_caps(pid: int) -> None:
    with open(f"/proc/{pid}/status") as f:
        status = f.read()
    uids = re.search(r"^Uid:\s+(.*)$", status, re.M)[1].split()
    assert uids == [str(NOBODY)] * 4, status
    want = capability_mask(AGENT_CAPABILITIES)
    for field in ("CapEff", "CapPrm", "CapBnd", "CapAmb"):
        assert parse_caps(status, field) == want, (field, status)


class Feeder:
    """The Go server's client: writes without pause until stopped, so its queue stays full."""

    def __init__(self, addr: str):
        host, port = addr.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        chunk = b"w" * 4096
        while not self._stop.is_set():
            try:
                self.sock.send(chunk)
            except (TimeoutError, BlockingIOError):
                continue
            except OSError:
                return

    def stop(self):
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


def grab_socket(pid: int, lport: int, rport: int, timeout_s: float = 10.0) -> socket.socket:
    """Process `pid`'s end of the connection lport<->rport, duplicated into this process
    (pidfd_getfd, root): the same socket, for SIOCINQ. The connection is up on the client's
    side before the server has accepted it, so this waits for the accept."""
    end = time.monotonic() + timeout_s
    while True:
        found = _find_socket(pid, lport, rport)
        if found is not None:
            return found
        if time.monotonic() >= end:
            raise AssertionError(f"process {pid} holds no socket {lport}<->{rport} "
                                 f"after {timeout_s:g}s")
        time.sleep(0.02)


def _find_socket(pid: int, lport: int, rport: int) -> socket.socket | None:
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            try:
                if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                    continue
            except OSError:
                continue
            fd = libc.syscall(SYS_PIDFD_GETFD, pidfd, int(name), 0)
            if fd < 0:
                continue
            s = socket.socket(fileno=fd)
            try:
                if s.getsockname()[1] == lport and s.getpeername()[1] == rport:
                    return s
            except OSError:
                pass
            s.close()
    finally:
        os.close(pidfd)
    return None


def wait_still(sock: socket.socket, settle_s: float = 0.5, timeout_s: float = 30.0) -> int:
    """SIOCINQ once it has not changed for settle_s."""
    last, since = siocinq(sock), time.monotonic()
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        time.sleep(0.05)
        now = siocinq(sock)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= settle_s:
            return now
    raise AssertionError(f"the queue did not stand still in {timeout_s:g}s")


class GoService:
    """The Go server (root's), fed without pause; `socket` is its end of the fed connection."""

    def __init__(self, binary: str):
        self.server = SlowReader("-mode", "sink", "-delay", "20ms", binary=binary)
        self.pid, self.port = self.server.pid, self.server.port
        try:
            self.feeder = Feeder(self.server.addr)
            self.socket = grab_socket(self.pid, self.port, self.feeder.port)
        except BaseException:
            self.server.stop()
            raise

    @contextlib.contextmanager
    def stopped(self):
        """The server stopped (its queue stands still); it goes on after the block."""
        os.kill(self.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(self.pid, signal.SIGCONT)

    def close(self):
        os.kill(self.pid, signal.SIGCONT)
        self.feeder.stop()
        self.socket.close()
        assert self.server.stop() == 0


@pytest.fixture(scope="module")
def go_service():
    svc = GoService(debian("slowreader"))
    yield svc
    svc.close()


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_watch_as_nobody_with_the_agent_capabilities(user_env, go_service):
    # Given water standing in a socket of this (root's) process before the run: filled, unread
    standing = Pair().connect()
    try:
        standing.fill(200_000)
        standing_inq = standing.wait_still()
        assert standing_inq > 0
        # When uid 65534 holding exactly AGENT_CAPABILITIES watches it and the Go service
        proc = start_as(AGENT_CAPABILITIES, "watch", "-p", str(go_service.pid),
                        "-p", str(os.getpid()), "--go-pid", str(go_service.pid), "--json",
                        "-i", "0.2", env=user_env)
        try:
            line = proc.stderr.readline()
            assert line.startswith("Tracing TCP receive queues"), line + proc.stderr.read()
            assert_holds_exactly_agent_caps(proc.pid)
            # ...and the Go service stops reading: its queue stands still
            with go_service.stopped():
                go_inq = wait_still(go_service.socket)
                time.sleep(2.0)     # several sweeps (-i 0.2) see the still queue
                cont_ns = time.monotonic_ns()
            time.sleep(3.0)         # ...then it reads again, ~150 slow reads
            assert siocinq(standing.server) == standing_inq
        finally:
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=60)
    finally:
        standing.close()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    records = json_lines(out)
    snaps = [r for r in records if r["type"] == "snapshot"]
    # Then the standing water is found at start and attributed to this process
    mine = [s for s in snaps if s["lport"] == standing.port and s["rport"] == standing.client_port]
    assert mine, "the standing water of this process's socket was not reported"
    assert mine[0]["trigger"] == "standing"
    assert mine[0]["pid"] == os.getpid()
    assert mine[-1]["unread_bytes"] == standing_inq
    # ...the Go service's still queue is reported exactly as SIOCINQ measured it
    go = [s for s in snaps if s["pid"] == go_service.pid and s["lport"] == go_service.port
          and s["rport"] == go_service.feeder.port]
    assert go, "no snapshot of the Go service's socket"
    before = [s for s in go if s["ts_ns"] < cont_ns]
    assert before, "no snapshot of the Go service's socket while it stood still"
    assert go_inq > 0
    assert before[-1]["unread_bytes"] == go_inq
    # ...and its slow reads get verdicts: the bytes waited in its queue
    key = go[-1]["sock_key"]
    verdicts = [r for r in records if r["type"] == "verdict" and r["pid"] == go_service.pid]
    assert any(v["verdict"] == "consumer-lagging" and v["sock_key"] == key for v in verdicts), \
        sorted({(v["verdict"], v["sock_key"]) for v in verdicts})
    counts = [r for r in records if r["type"] == "counts" and r["pid"] == go_service.pid
              and r["verdict"] == "consumer-lagging"]
    assert counts and counts[-1]["reads"] > 0


def test_the_shipped_unit_names_these_capabilities():
    """The capabilities this module runs otelwater with are the shipped unit's."""
    unit = ROOT / "examples" / "systemd" / "otelwater-agent.service"
    if not unit.is_file():
        pytest.skip(f"{unit.relative_to(ROOT)} is not in this checkout")
    settings = dict(line.split("=", 1) for line in unit.read_text().splitlines()
                    if line[:1].isalpha() and "=" in line)
    for key in ("AmbientCapabilities", "CapabilityBoundingSet"):
        assert tuple(settings[key].split()) == AGENT_CAPABILITIES, key


def test_doctor_passes_with_the_agent_capabilities(user_env):
    r = run_as(AGENT_CAPABILITIES, "doctor", env=user_env)
    assert r.returncode == 0, r.stdout + r.stderr
    for cap in AGENT_CAPABILITIES:
        assert re.search(rf"^ok +{cap}: held", r.stdout, re.M), r.stdout
    assert "otelwater can run here" in r.stdout


def _tracefs_private() -> bool:
    from otelwater.probes.host import tracefs

    where = tracefs()
    return bool(where) and not os.stat(where).st_mode & 0o005


@pytest.mark.parametrize("cap", AGENT_CAPABILITIES)
def test_without_each_capability_doctor_and_the_run_name_it(cap, user_env, go_service):
    # Given the agent's capabilities but one
    caps = without(cap)
    # When doctor runs
    r = run_as(caps, "doctor", env=user_env)
    # Then it fails naming the capability and what it is for
    assert r.returncode == 3, r.stdout + r.stderr
    assert re.search(rf"^FAIL +{cap}: missing: .*needed to \S", r.stdout, re.M), r.stdout
    assert re.search(rf"^ +fix: grant {cap} ", r.stdout, re.M), r.stdout
    # ...and a run fails with one line naming it, before anything is attached
    if cap == "CAP_SYS_PTRACE":
        # (what needs it: reading another user's /proc/PID/exe, here root's Go service's)
        r = run_as(caps, "watch", "--go-pid", str(go_service.pid), "-d", "1", env=user_env)
        code = 4
    else:
        if cap == "CAP_DAC_READ_SEARCH" and not _tracefs_private():
            pytest.skip("tracefs is readable by every user on this host: without "
                        "CAP_DAC_READ_SEARCH the run starts (doctor still names it: other "
                        "users' /proc/PID/fd stay closed)")
        r = run_as(caps, "watch", "-d", "1", env=user_env)
        code = 3
    lines = r.stderr.strip().splitlines()
    assert r.returncode == code, r.stderr
    assert len(lines) == 1 and cap in lines[0], r.stderr


def test_sigkill_leaves_nothing_attached_and_no_program_writes(user_env, go_service):
    # Given the watch as nobody, attached
    proc = start_as(AGENT_CAPABILITIES, "watch", "-p", str(go_service.pid), "--go-pid",
                    str(go_service.pid), "--json", env=user_env, stderr=subprocess.PIPE)
    try:
        line = proc.stderr.readline()
        assert line.startswith("Tracing TCP receive queues"), line + proc.stderr.read()
        ours = prog_ids_of(proc.pid)
        assert len(ours) >= 6, "the watch attached nothing"
        perf = [e for e in bpftool_json("perf", "show") if e["pid"] == proc.pid]
        # Then every attach point is a tracepoint: no uprobe (no breakpoint in the Go
        # service's code), no kprobe
        assert perf and {e["fd_type"] for e in perf} <= {"raw_tracepoint", "tracepoint"}, perf
        # ...and no program calls a helper that writes memory or alters the traced program
        for prog_id in ours:
            text = subprocess.run(["bpftool", "prog", "dump", "xlated", "id", str(prog_id)],
                                  capture_output=True, text=True, check=True).stdout
            called = set(re.findall(r"call (\w+)", text))
            assert not called & set(WRITING_HELPERS), (prog_id, called)
    finally:
        # When it is killed without a chance to detach
        proc.kill()
        proc.communicate(timeout=30)
    # Then the kernel freed every program and perf link with its file descriptors
    assert gone(ours), f"programs {sorted(ours)} still loaded after SIGKILL"
    assert not [e for e in bpftool_json("perf", "show") if e["pid"] == proc.pid]


def bpftool_json(*args) -> list:
    out = subprocess.run(["bpftool", *args, "--json"], capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out or "[]")


def _agent_exists() -> bool:
    r = subprocess.run([*OTELWATER, "agent", "--help"], capture_output=True, text=True)
    return r.returncode == 0


def scrape(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.read().decode()
    except OSError:
        return None


def wait_for(what: str, check, proc: subprocess.Popen, log, timeout_s: float = 120.0):
    end = time.monotonic() + timeout_s
    while True:
        got = check()
        if got:
            return got
        if proc.poll() is not None:
            log.seek(0)
            pytest.fail(f"the agent exited ({proc.returncode}) before {what}: {log.read()}")
        if time.monotonic() > end:
            log.seek(0)
            pytest.fail(f"timed out after {timeout_s:g}s waiting for {what}: {log.read()[-3000:]}")
        time.sleep(0.5)


def series(text: str, name: str, **labels) -> list[float]:
    """Values of the Prometheus series `name` whose labels include `labels`."""
    out = []
    for line in (text or "").splitlines():
        m = re.match(rf"{name}\{{(.*)\}} (\S+)$", line)
        if not m:
            continue
        have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m[1]))
        if all(have.get(k) == str(v) for k, v in labels.items()):
            out.append(float(m[2]))
    return out


def test_agent_as_nobody_serves_the_water_and_the_verdicts(user_env, go_service, tmp_path):
    if not _agent_exists():
        pytest.skip("this otelwater has no `agent` command yet")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    # Given the agent as uid 65534 holding exactly AGENT_CAPABILITIES, tracing the Go service
    with tempfile.TemporaryFile("w+") as log:
        proc = start_as(AGENT_CAPABILITIES, "agent", "-p", str(go_service.pid),
                        "--listen", f"127.0.0.1:{port}", env=user_env, stderr=log)
        try:
            wait_for("/readyz to answer 200", lambda: scrape(f"{base}/readyz") is not None,
                     proc, log)
            assert_holds_exactly_agent_caps(proc.pid)
            labels = {"process_pid": go_service.pid,
                      "network_local_port": go_service.port,
                      "network_peer_port": go_service.feeder.port}
            # When the service stops reading and its queue stands still
            with go_service.stopped():
                go_inq = wait_still(go_service.socket)
                assert go_inq > 0
                # Then /metrics serves the water SIOCINQ measures
                wait_for(f"the unread water gauge to read {go_inq}", lambda: go_inq in series(
                    scrape(f"{base}/metrics"), "otelwater_socket_water_unread_bytes",
                    **labels), proc, log, timeout_s=30)
            # ...and once it reads again, its slow reads' verdicts
            wait_for("consumer-lagging verdicts", lambda: any(v > 0 for v in series(
                scrape(f"{base}/metrics"), "otelwater_read_verdicts_total",
                otelwater_verdict="consumer-lagging")), proc, log, timeout_s=60)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=60)
        log.seek(0)
        text = log.read()
    assert proc.returncode == 0, text
    events = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    assert not [e for e in events if e.get("level") == "error"], text
