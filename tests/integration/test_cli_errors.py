"""Bad input to the real `otelwater` as root: one line `otelwater: <problem>; <fix>`, the
documented exit code, and nothing attached first (the start line "Tracing TCP receive queues"
comes only once every probe is attached). And a BPF program that does not load: one line,
with BCC's whole output and the cflags kept for --verbose."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from .conftest import OTELWATER, ROOT

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("bpf_ready")]
ENV = dict(os.environ, PYTHONPATH=str(ROOT))
ENV.pop("OTELWATER_DEBUG", None)
GO_BINARY = ROOT / "examples" / "bin" / "slowreader"


def otelwater(*args, timeout=60):
    t0 = time.monotonic()
    r = subprocess.run(OTELWATER + list(args), capture_output=True, text=True, env=ENV,
                       cwd=ROOT, timeout=timeout)
    return r, time.monotonic() - t0


def refused(code, *args):
    """The command exits with `code` at once, saying one line and attaching nothing."""
    r, took = otelwater(*args)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == code, r.stderr
    assert len(lines) == 1 and lines[0].startswith("otelwater: ") and "; " in lines[0], r.stderr
    assert "Tracing TCP receive queues" not in r.stderr and r.stdout == ""
    assert took < 15, f"took {took:.1f} s: it did more than check its arguments"
    return lines[0]


def kernel_thread_pid() -> int:
    with open("/proc/2/comm") as f:
        if f.read().strip() != "kthreadd":
            pytest.skip("pid 2 is not kthreadd here (a pid namespace)")
    return 2


@pytest.mark.parametrize("probes", ["tracepoint", "uprobe"])
def test_go_pid_of_a_kernel_thread(probes):
    pid = kernel_thread_pid()
    line = refused(4, "watch", "--go-pid", str(pid), "--probes", probes, "-d", "1")
    assert f"process {pid} has no executable" in line


def test_go_pid_that_is_not_a_go_program_with_uprobes():
    # pid 1 is init (not Go) or, in a container, may be unreadable even by root: both refuse
    refused(4, "watch", "--go-pid", "1", "--probes", "uprobe", "-d", "1")


@pytest.mark.parametrize("cut", [300_000, -1])
def test_truncated_go_binary(tmp_path, cut):
    if not GO_BINARY.is_file():
        pytest.skip("examples/bin/slowreader is not built: run scripts/setup.sh")
    data = GO_BINARY.read_bytes()
    trunc = tmp_path / "trunc"
    trunc.write_bytes(data[:cut])
    assert "is truncated" in refused(4, "locate", str(trunc))
    for probes in ("tracepoint", "uprobe"):
        assert "is truncated" in refused(4, "watch", "--go-binary", str(trunc),
                                         "--probes", probes, "-d", "1")


@pytest.mark.parametrize("args", [
    ["-d", "nan"], ["-d", "inf"], ["-i", "nan"], ["-i", "inf"],
    ["--blocked-ms", "nan"], ["--blocked-ms", "inf"],
    ["--ringbuf-pages", "3"], ["--ringbuf-pages", str(2**20)],
    ["--high-water", str(2**32)],
])
def test_bad_numbers_are_usage_errors(args):
    refused(2, "watch", *args, *([] if args[0] == "-d" else ["-d", "1"]))


def test_cgroup_that_is_not_a_cgroup_v2_directory(tmp_path):
    f = tmp_path / "f"
    f.write_text("")
    assert "not a cgroup v2 directory" in refused(4, "watch", "--cgroup", str(tmp_path), "-d", "1")
    assert "not a directory" in refused(4, "watch", "--cgroup", str(f), "-d", "1")
    v1 = "/sys/fs/cgroup/cpu"
    if os.path.isdir(v1) and not os.path.exists(f"{v1}/cgroup.controllers"):
        assert "not a cgroup v2 directory" in refused(4, "watch", "--cgroup", v1, "-d", "1")


def test_largest_high_water_is_accepted():
    """The limit is the kernel's type (u32), not tighter."""
    r, _ = otelwater("watch", "-P", "1", "--wait", "--high-water", str(2**32 - 1), "-d", "0.5",
                     "--json", timeout=120)
    assert r.returncode == 0, r.stderr
    assert "Tracing TCP receive queues" in r.stderr


def test_a_program_that_does_not_load_is_one_line_and_verbose_has_the_whole_log(capfd):
    from otelwater.errors import ProbeLoadError
    from otelwater.probes import host
    from otelwater.probes.btf import kernel_offsets
    from otelwater.probes.kernel import WaterOptions, build_cflags, sock_done_bit
    from otelwater.probes.loader import load_bpf, running_kernel_btf

    btf = running_kernel_btf()
    cflags = build_cflags(kernel_offsets(btf), WaterOptions(), host.kfree_skb_has_rx_sk(),
                          sock_done_bit(btf))
    bad = [f for f in cflags if not f.startswith("-DOTW_HIGH_WATER=")]
    bad.append("-DOTW_HIGH_WATER=no_such_identifier")
    with pytest.raises(ProbeLoadError) as e:
        load_bpf("water.c", bad, "the kernel probe")
    line = e.value.one_line()
    assert "\n" not in line
    assert line.startswith("the kernel probe did not load: bpf/water.c:")
    assert "error: use of undeclared identifier 'no_such_identifier'" in line
    assert "--verbose" in line
    details = e.value.details
    assert "generated." in details  # clang's whole output ("2 errors generated.")
    assert "-DOTW_HIGH_WATER=no_such_identifier" in details  # and the cflags
    assert "no_such_identifier" not in capfd.readouterr().err  # kept, not sprayed on stderr


@pytest.fixture
def standing_water():
    """A loopback connection holding unread bytes (seeded as `standing` at start: output)."""
    import socket

    lsn = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(lsn.getsockname())
    server, _ = lsn.accept()
    client.sendall(b"x" * 50_000)
    yield
    for s in (client, server, lsn):
        s.close()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full on this system")
@pytest.mark.parametrize("output,what", [(["--json"], "the JSON Lines output"),
                                         ([], "the live view")], ids=["json", "live view"])
def test_a_full_disk_behind_stdout_ends_watch_with_one_line(standing_water, output, what):
    # stdout on a full disk: the run ends at the first write (not at -d), probes detached,
    # one line naming the output and the errno, exit 1
    t0 = time.monotonic()
    with open("/dev/full", "w") as full:
        r = subprocess.run(OTELWATER + ["watch", "-d", "60", *output], stdout=full,
                           stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT, timeout=120)
    took = time.monotonic() - t0
    err = r.stderr.strip().splitlines()
    assert r.returncode == 1, r.stderr
    assert err[-1] == (f"otelwater: cannot write {what}: No space left on device (ENOSPC); "
                       "free space, or send the output elsewhere"), r.stderr
    assert [x for x in err if x.startswith("otelwater: ")] == err[-1:], r.stderr
    assert "internal error" not in r.stderr and "Traceback" not in r.stderr
    assert took < 40, f"took {took:.0f} s: the run went on after its output failed"


def test_a_go_binary_that_never_reads_a_connection_is_said_and_the_watch_goes_on():
    from tests.goexamples import fixture

    nonet = fixture("nonet")
    r, _ = otelwater("watch", "--go-binary", nonet, "-d", "1", "--json", timeout=120)
    assert r.returncode == 0, r.stderr
    said = (f"{nonet} never reads a network connection through net.(*conn).Read, so no Go "
            "reads will be seen; the watch goes on with the sockets alone (for Go reads, give "
            "the program that serves the connections)")
    assert r.stderr.count(said) == 1 and f"otelwater: {said}" in r.stderr.splitlines(), r.stderr
    import json

    notices = [x for x in map(json.loads, r.stdout.splitlines()) if x["type"] == "notice"]
    assert [n["text"] for n in notices] == [said]
