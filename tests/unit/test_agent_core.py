"""The agent's pure parts and its /proc scan, on real processes the test starts (no BPF):
which executables are Go, which processes a selection names, the minimum age, the container id
of a cgroup path, --listen, and the export registry letting go of exited processes."""

import os
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest

from otelwater.agent.discover import (Scanner, Selection, exe_key, is_go_executable,
                                      start_age_s)
from otelwater.cli_agent import parse_listen
from otelwater.errors import UsageError
from otelwater.export.otlp.resources import Services, container_id_of
from tests.integration.services import free_port

ROOT = Path(__file__).resolve().parents[2]
GO = ROOT / "examples" / "bin" / "slowreader"
STRIPPED = ROOT / "examples" / "bin" / "go1.19.8" / "slowreader-stripped"
needs_go = pytest.mark.skipif(not GO.exists(), reason="examples not built: run scripts/setup.sh")


@needs_go
def test_go_executables_are_told_by_their_build_info(tmp_path):
    assert is_go_executable(str(GO))
    if STRIPPED.exists():
        assert is_go_executable(str(STRIPPED))
    assert not is_go_executable("/bin/sh")
    assert not is_go_executable("/dev/null")
    assert not is_go_executable(str(tmp_path))            # a directory
    text = tmp_path / "script"
    text.write_text("#!/bin/sh\necho hi\n")
    assert not is_go_executable(str(text))
    cut = tmp_path / "cut"
    cut.write_bytes(GO.read_bytes()[:48])                 # an ELF header cut short
    assert not is_go_executable(str(cut))


@needs_go
def test_a_go_binary_without_section_headers_is_found_by_its_build_info_magic(tmp_path):
    data = bytearray(GO.read_bytes())
    struct.pack_into("<Q", data, 0x28, 0)                 # e_shoff = 0: no section table
    struct.pack_into("<HHH", data, 0x3A, 0, 0, 0)
    p = tmp_path / "noshdr"
    p.write_bytes(bytes(data))
    assert is_go_executable(str(p))


def test_start_age_of_a_live_and_a_missing_process():
    age = start_age_s(os.getpid())
    assert age is not None and 0 <= age < 10 * 86400
    assert start_age_s(2**22 + 12345) is None


@pytest.fixture
def procs():
    """A Go server listening on a port, and a process that is not Go."""
    if not GO.exists():
        pytest.skip("examples not built: run scripts/setup.sh")
    port = free_port()
    go = subprocess.Popen([str(GO), "-listen", f"127.0.0.1:{port}"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    other = subprocess.Popen(["sleep", "60"])
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.05)
        yield go.pid, other.pid, port
    finally:
        for p in (go, other):
            p.kill()
            p.wait()


def test_every_go_process_but_not_others(procs):
    go, other, _ = procs
    found = Scanner(Selection(), min_age_s=0).scan().targets
    assert go in found and other not in found
    assert found[go] == os.path.realpath(GO)
    assert os.getpid() not in found


def test_young_processes_wait_unless_their_binary_was_traced_before(procs):
    go, _, _ = procs
    scanner = Scanner(Selection(), min_age_s=3600)
    scan = scanner.scan()
    assert go not in scan.targets and scan.young >= 1
    scanner.trust(exe_key(f"/proc/{go}/exe"))             # a restart of a traced binary
    assert go in scanner.scan().targets


def test_each_selection_names_its_processes(procs):
    go, other, port = procs
    by_pid = Scanner(Selection(pids=frozenset({other})), 3600).scan().targets
    assert set(by_pid) == {other}                          # named: whatever its age or kind
    by_binary = Scanner(Selection(go_binaries=(os.path.realpath(GO),)), 0).scan().targets
    assert go in by_binary and other not in by_binary
    by_port = Scanner(Selection(ports=frozenset({port})), 0).scan().targets
    assert set(by_port) == {go}


def test_a_cgroup_names_its_go_processes_and_those_below(procs):
    from otelwater.cli_checks import cgroup2_mounts

    go, other, _ = procs
    mounts = cgroup2_mounts()
    if os.geteuid() != 0 or not mounts:
        pytest.skip("needs root and a cgroup v2 hierarchy to make a cgroup")
    top = Path(mounts[0]) / f"otelwater-test-{os.getpid()}"
    below = top / "below"
    below.mkdir(parents=True)
    try:
        for pid in (go, other):
            (below / "cgroup.procs").write_text(str(pid))
        found = Scanner(Selection(cgroups=(str(top),)), 0).scan().targets
        assert go in found and other not in found          # Go processes of the cgroup only
    finally:
        for pid in (go, other):
            try:
                (Path(mounts[0]) / "cgroup.procs").write_text(str(pid))
            except OSError:
                pass
        below.rmdir()
        top.rmdir()


def test_selection_words_and_by_exe():
    assert Selection().describe() == "every Go process" and Selection().by_exe
    s = Selection(pids=frozenset({3, 1}), ports=frozenset({80}))
    assert s.describe() == "pid 1,3 or port 80" and not s.by_exe
    assert Selection(go_binaries=("/srv/api",)).by_exe


@pytest.mark.parametrize("lines, want", [
    (["0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod12.slice/"
      "cri-containerd-" + "a" * 64 + ".scope"], "a" * 64),
    (["0::/system.slice/docker-" + "b" * 64 + ".scope"], "b" * 64),
    (["12:pids:/kubepods/besteffort/pod0/" + "c" * 64, "0::/"], "c" * 64),
    (["0::/machine.slice/libpod-" + "d" * 64 + ".scope/container"], "d" * 64),
    (["0::/user.slice/user-0.slice/session-1.scope"], None),
    (["0::/system.slice/" + "e" * 63 + ".scope"], None),
])
def test_container_id_from_cgroup_paths(lines, want):
    assert container_id_of(lines) == want


@pytest.mark.parametrize("text, want", [
    ("127.0.0.1:9464", ("127.0.0.1", 9464)), ("[::]:9464", ("::", 9464)),
    ("0.0.0.0:80", ("0.0.0.0", 80)), (":9464", ("0.0.0.0", 9464)), ("off", None),
    ("localhost:9464", ("localhost", 9464)),
])
def test_listen_addresses(text, want):
    assert parse_listen(text) == want


@pytest.mark.parametrize("text", ["9464", "host", "1.2.3.4:99999", "[::1]", "a b:1"])
def test_bad_listen_addresses_are_one_line(text):
    with pytest.raises(UsageError) as e:
        parse_listen(text)
    assert "--listen" in e.value.one_line() and "\n" not in e.value.one_line()


def test_an_exited_process_is_let_go_by_the_export_registry():
    from opentelemetry.sdk.trace import SpanProcessor

    reg = Services(make_pipeline=lambda: (SpanProcessor(), None), host="h",
                   identity=lambda pid: None, max_services=4)
    for pid in range(100, 110):                            # more than max_services
        reg.trace(pid)
    assert len(reg.by_key) == 4
    assert len(reg.traced) == 4 and len(reg.identities) <= 4   # the retired are forgotten
    reg.forget(109)
    assert 109 not in reg.by_key and 109 not in reg.traced and 109 not in reg.identities
    deadline = time.monotonic() + 5
    while not all(r.done for r in reg.retired) and time.monotonic() < deadline:
        time.sleep(0.01)
    reg.trace(200)                                         # retiring again lets the done go
    assert len(reg.retired) <= 1
