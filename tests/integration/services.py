"""Real servers no one here wrote, as throwaway instances for the integration tests: a
PostgreSQL cluster (Debian's postgresql) and a redis-server (Debian's redis-server), each on a
free port of 127.0.0.1, in a temporary directory removed at the end, stopped cleanly.

Both need root (PostgreSQL refuses to run as root: the cluster is made and run as the
`postgres` user Debian's package creates; this process must be root to switch to it). Without
root or without the binaries the test skips, naming the fix: scripts/setup.sh installs the
packages (APT_PKGS)."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

SETUP = "run scripts/setup.sh (as root) to install it"


def wait_for(what: str, check, timeout_s: float = 30.0, every_s: float = 0.2):
    """check()'s first true value, polled; the test fails naming `what` after timeout_s."""
    end = time.monotonic() + timeout_s
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > end:
            pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(every_s)


def children(pid: int) -> list[int]:
    """The pids of process `pid`'s children (/proc/PID/task/PID/children); [] once it is gone.
    nsenter and unshare --fork run their command as a child: this finds it."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def free_port() -> int:
    """A TCP port of 127.0.0.1 no one listens on now (the kernel's pick; a server started
    right after gets it unless something else grabs it in between)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _need_root(what: str) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"a throwaway {what} needs root (run scripts/test.sh as root)")


def _wait_ready(proc: subprocess.Popen, ready, what: str, log: Path, timeout_s: float = 20.0):
    end = time.monotonic() + timeout_s
    while not ready():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode}) before it was ready:\n"
                               + log.read_text(errors="replace")[-3000:])
        if time.monotonic() > end:
            raise RuntimeError(f"{what} not ready after {timeout_s:g} s:\n"
                               + log.read_text(errors="replace")[-3000:])
        time.sleep(0.1)


def _stop(proc: subprocess.Popen, sig: int, timeout_s: float = 10.0) -> int:
    """Stop a server we started by its own clean-shutdown signal; kill it only if it hangs."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
            raise RuntimeError(f"pid {proc.pid} did not stop on signal {sig} within "
                               f"{timeout_s:g} s: killed")
    return proc.returncode


class Postgres:
    """A throwaway PostgreSQL cluster: initdb in a temporary directory as the `postgres` user,
    trust authentication, listening on 127.0.0.1:`port` and on a unix socket in that
    directory; fsync off (nothing here is worth keeping). Use as a context manager; `dsn` is
    lib/pq's connection string. Stopped with SIGINT (PostgreSQL's "fast" shutdown: it ends the
    sessions and exits cleanly)."""

    def __init__(self):
        _need_root("PostgreSQL cluster")
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                      key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
        if not bins:
            pytest.skip(f"PostgreSQL is not installed (Debian package postgresql): {SETUP}")
        self.bindir = Path(bins[-1]).parent
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip(f"no `postgres` user (Debian's postgresql package makes it): {SETUP}")
        self.uid, self.gid = pw.pw_uid, pw.pw_gid
        self.port = free_port()
        self.host = "127.0.0.1"
        self.dir = Path(tempfile.mkdtemp(prefix="otelwater-pg-"))
        self.proc: subprocess.Popen | None = None

    @property
    def dsn(self) -> str:
        return (f"host={self.host} port={self.port} user=postgres dbname=postgres "
                "sslmode=disable")

    def _as_postgres(self) -> dict:
        # Popen's own user/group switch (done in C in the child; never a preexec_fn)
        return dict(user=self.uid, group=self.gid, extra_groups=[], cwd=self.dir,
                    env={"PATH": "/usr/bin:/bin", "LANG": "C", "LC_ALL": "C"})

    def __enter__(self) -> "Postgres":
        os.chown(self.dir, self.uid, self.gid)
        os.chmod(self.dir, 0o700)
        data = self.dir / "data"
        try:
            r = subprocess.run([str(self.bindir / "initdb"), "-D", str(data), "-A", "trust",
                                "-U", "postgres", "-E", "UTF8", "--locale=C", "--no-sync"],
                               capture_output=True, text=True, timeout=120, **self._as_postgres())
            if r.returncode != 0:
                raise RuntimeError(f"initdb failed ({r.returncode}):\n{r.stdout}{r.stderr}")
            self.log = self.dir / "postgres.log"
            with open(self.log, "w") as log:
                os.chown(self.log, self.uid, self.gid)
                self.proc = subprocess.Popen(
                    [str(self.bindir / "postgres"), "-D", str(data), "-p", str(self.port),
                     "-k", str(self.dir), "-c", f"listen_addresses={self.host}",
                     "-c", "fsync=off", "-c", "synchronous_commit=off",
                     "-c", "full_page_writes=off", "-c", "max_connections=30",
                     "-c", "shared_buffers=16MB"],
                    stdout=log, stderr=subprocess.STDOUT, **self._as_postgres())
            isready = [str(self.bindir / "pg_isready"), "-q", "-h", self.host,
                       "-p", str(self.port), "-U", "postgres"]
            _wait_ready(self.proc, lambda: subprocess.run(isready).returncode == 0,
                        "postgres", self.log)
        except BaseException:
            self.close()
            raise
        return self

    def psql(self, sql: str) -> str:
        r = subprocess.run([str(self.bindir / "psql"), "-X", "-A", "-t", "-h", self.host,
                            "-p", str(self.port), "-U", "postgres", "-c", sql],
                           capture_output=True, text=True, timeout=30, **self._as_postgres())
        if r.returncode != 0:
            raise RuntimeError(f"psql {sql!r}: {r.stderr}")
        return r.stdout.strip()

    def close(self) -> None:
        try:
            if self.proc is not None:
                code = _stop(self.proc, signal.SIGINT)
                assert code == 0, f"postgres exited {code}:\n" + self.log.read_text()[-2000:]
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __exit__(self, *exc) -> None:
        self.close()


class Redis:
    """A throwaway redis-server on 127.0.0.1:`port`: no persistence, its directory temporary,
    DEBUG allowed from local clients (DEBUG SLEEP), and `hz` its event loop's timer rate
    (Redis notices a blocked command's timeout, BLPOP's, on that timer: 500, its most, gives
    a 2 ms resolution). Stopped with SIGTERM (it exits cleanly; with `save ""` it writes
    nothing)."""

    def __init__(self, hz: int = 500):
        _need_root("redis-server")
        self.binary = shutil.which("redis-server")
        if not self.binary:
            pytest.skip(f"redis-server is not installed (Debian package redis-server): {SETUP}")
        self.host, self.port, self.hz = "127.0.0.1", free_port(), hz
        self.dir = Path(tempfile.mkdtemp(prefix="otelwater-redis-"))
        self.proc: subprocess.Popen | None = None

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"

    def command(self, *words: str) -> bytes:
        """One command over RESP; its raw reply (enough for PING and the readiness check)."""
        with socket.create_connection((self.host, self.port), timeout=2) as s:
            s.sendall(b"".join([f"*{len(words)}\r\n".encode()]
                               + [f"${len(w)}\r\n{w}\r\n".encode() for w in words]))
            return s.recv(4096)

    def _ready(self) -> bool:
        try:
            return self.command("PING").startswith(b"+PONG")
        except OSError:
            return False

    def __enter__(self) -> "Redis":
        self.log = self.dir / "redis.log"
        try:
            with open(self.log, "w") as log:
                self.proc = subprocess.Popen(
                    [self.binary, "--port", str(self.port), "--bind", self.host,
                     "--dir", str(self.dir), "--save", "", "--appendonly", "no",
                     "--daemonize", "no", "--protected-mode", "yes", "--hz", str(self.hz),
                     "--enable-debug-command", "local", "--logfile", ""],
                    stdout=log, stderr=subprocess.STDOUT)
            _wait_ready(self.proc, self._ready, "redis-server", self.log)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        try:
            if self.proc is not None:
                code = _stop(self.proc, signal.SIGTERM)
                assert code == 0, f"redis-server exited {code}:\n" + self.log.read_text()[-2000:]
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __exit__(self, *exc) -> None:
        self.close()
