"""The CLI through click's test runner: help that teaches, usage errors, one-line failures."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from otelwater import cli
from otelwater.cli import main
from otelwater.errors import ProbeLoadError
from otelwater.probes.loader import first_error

ROOT = Path(__file__).resolve().parents[2]
GO_BINARY = ROOT / "examples" / "bin" / "slowreader"


def run(*args):
    return CliRunner().invoke(main, list(args))


def test_help_lists_commands():
    r = run("--help")
    assert r.exit_code == 0
    for cmd in ("watch", "doctor", "locate"):
        assert cmd in r.output


def test_watch_help_has_examples_and_explains_columns():
    r = run("watch", "--help")
    assert r.exit_code == 0
    assert "Examples:" in r.output and "otelwater watch -P 8080" in r.output
    assert "SIOCINQ" in r.output


def test_bad_values_are_usage_errors():
    assert run("watch", "--port", "0").exit_code == 2
    assert run("watch", "--interval", "0").exit_code == 2
    assert run("watch", "--bogus").exit_code == 2


def test_missing_pid_is_one_line_exit_4():
    r = run("watch", "--pid", str(2**22 + 11), "-d", "1")
    assert r.exit_code == 4
    assert r.output.strip().startswith("otelwater: no process with pid")
    assert "Traceback" not in r.output


def test_locate_bad_binary_is_one_line(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    r = run("locate", str(f))
    assert r.exit_code == 4
    assert len(r.output.strip().splitlines()) == 1


# -- every bad value is one line `otelwater: <problem>; <fix>`, checked before anything runs ---

def one_line(r, code):
    """The run failed with this exit code and said so in exactly one line, with a fix."""
    lines = r.output.strip().splitlines()
    assert r.exit_code == code, r.output
    assert len(lines) == 1 and lines[0].startswith("otelwater: ") and "; " in lines[0], r.output
    assert "Traceback" not in r.output
    return lines[0]


@pytest.mark.parametrize("opt", ["-d", "-i", "--blocked-ms"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN"])
def test_non_finite_numbers_are_usage_errors(opt, value):
    line = one_line(run("watch", opt, value), 2)
    assert opt in line


def test_duration_fix_says_how_to_run_until_ctrl_c():
    assert "leave -d out" in one_line(run("watch", "-d", "inf"), 2)


@pytest.mark.parametrize("pages", ["0", "3", "48", str(2**20), str(2**40)])
def test_ring_buffer_pages_beyond_the_kernel_are_usage_errors(pages):
    assert "power of two" in one_line(run("watch", "--ringbuf-pages", pages), 2)


@pytest.mark.parametrize("value", ["0", str(2**32), str(2**64)])
def test_high_water_beyond_u32_is_a_usage_error(value):
    assert "--high-water" in one_line(run("watch", "--high-water", value), 2)


def test_click_usage_errors_are_one_line_too():
    assert "--bogus" in one_line(run("watch", "--bogus"), 2)
    assert "--bogus" in one_line(run("--bogus"), 2)
    assert "nosuch" in one_line(run("nosuch"), 2)
    assert "BINARY" in one_line(run("locate"), 2)
    assert "--port" in one_line(run("watch", "--port", "0"), 2)


def test_cgroup_that_is_not_cgroup_v2_is_a_bad_target(tmp_path):
    f = tmp_path / "file"
    f.write_text("")
    assert "not a cgroup v2 directory" in one_line(run("watch", "--cgroup", str(tmp_path)), 4)
    assert "not a directory" in one_line(run("watch", "--cgroup", str(f)), 4)
    assert "does not exist" in one_line(run("watch", "--cgroup", str(tmp_path / "no")), 4)


def test_cgroup_v2_directories_pass_the_check():
    mounts = cli.cgroup2_mounts()
    if not mounts:
        pytest.skip("no cgroup v2 hierarchy mounted here")
    cli._check_cgroups([mounts[0]])  # does not raise


def test_go_pid_of_a_kernel_thread_is_one_line():
    try:
        kthread = open("/proc/2/comm").read().strip() == "kthreadd"
    except OSError:
        kthread = False
    if not kthread:
        pytest.skip("pid 2 is not kthreadd here (a pid namespace)")
    for probes in ("tracepoint", "uprobe"):
        line = one_line(run("watch", "--go-pid", "2", "--probes", probes, "-d", "1"), 4)
        assert "process 2" in line


def test_go_pid_whose_executable_cannot_be_read_is_one_line():
    """/proc/1/exe cannot be read by an unprivileged user (nor by root in some containers):
    run the CLI as nobody (dropping root when we have it)."""
    code = textwrap.dedent("""
        import os, sys
        if os.geteuid() == 0:
            os.setgroups([]); os.setgid(65534); os.setuid(65534)
        try:
            os.readlink("/proc/1/exe")
            sys.exit(99)  # readable: nothing to test here
        except PermissionError:
            pass
        from otelwater.cli import main
        main(["watch", "--go-pid", "1", "--probes", "uprobe", "-d", "1"])
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd="/")
    if r.returncode == 99:
        pytest.skip("/proc/1/exe is readable even without privileges here")
    assert r.returncode == 4, r.stderr
    assert r.stderr.strip().splitlines() == [
        "otelwater: cannot read the executable of process 1 (Permission denied); "
        "run as root (or with CAP_SYS_PTRACE), or give --go-binary PATH"]


def truncated(src: str, tmp_path, size: int) -> str:
    out = tmp_path / f"trunc-{size}"
    with open(src, "rb") as f:
        out.write_bytes(f.read(size))
    return str(out)


@pytest.mark.parametrize("size", [100, 2000, 300_000, -1])
def test_truncated_executables_are_one_line(tmp_path, size):
    for src in (os.path.realpath(sys.executable), str(GO_BINARY)):
        if not os.path.isfile(src):
            continue
        n = os.path.getsize(src) + size if size < 0 else size
        path = truncated(src, tmp_path, n)
        assert "truncated" in one_line(run("locate", path), 4)
        assert "truncated" in one_line(run("watch", "--go-binary", path, "-d", "1"), 4)


@pytest.mark.parametrize("command", ["watch", "record"])
@pytest.mark.parametrize("flag,pid", [("--go-pid", "-5"), ("--go-pid", "0"), ("-p", "-5"),
                                      ("--pid", "0")])
def test_pids_below_1_are_usage_errors_naming_the_flag(command, flag, pid):
    args = [command, flag, pid, "-d", "1"] + (["-o", "x.otw"] if command == "record" else [])
    line = one_line(run(*args), 2)
    named = "'--go-pid'" if flag == "--go-pid" else "'-p' / '--pid'"
    assert line.startswith(f"otelwater: invalid value for {named}: {pid} is not in the range "
                           "x>=1; give a process id (from 1 up), e.g. ")


def test_a_go_binary_without_conn_read_is_said_once_at_the_start():
    from tests.goexamples import fixture

    nonet = fixture("nonet")
    assert cli._check_go_targets(nonet, (), "tracepoint") == [
        f"{nonet} never reads a network connection through net.(*conn).Read, so no Go reads "
        "will be seen; the watch goes on with the sockets alone (for Go reads, give the "
        "program that serves the connections)"]
    if GO_BINARY.is_file():
        assert cli._check_go_targets(str(GO_BINARY), (), "tracepoint") == []
    # uprobes cannot trace it at all: refused, as before (exit 4)
    assert "has no net.(*conn).Read" in one_line(
        run("watch", "--go-binary", nonet, "--probes", "uprobe", "-d", "1"), 4)


def test_go_binary_and_go_pid_together_are_a_usage_error():
    assert "not both" in one_line(run("watch", "--go-binary", sys.executable,
                                      "--go-pid", str(os.getpid()), "-d", "1"), 2)


# -- the safety net: an unexpected exception is one line naming it, unless debugging ---------

@click.group(cls=cli.Group)
@cli.verbose_option
def toy():
    pass


@toy.command()
@cli.verbose_option
def boom():
    raise KeyError("surprise")


@toy.command()
@cli.verbose_option
def refused():
    raise ProbeLoadError("the kernel probe did not load: x", "run 'otelwater doctor'",
                         details="clang says: the whole story\n-DOTW_X=1")


def test_unexpected_exception_is_one_line_exit_1(monkeypatch):
    monkeypatch.delenv("OTELWATER_DEBUG", raising=False)
    r = CliRunner().invoke(toy, ["boom"])
    assert r.exit_code == 1
    assert r.output.strip().splitlines() == [
        f"otelwater: internal error: KeyError: 'surprise'; report this at {cli.issues_url()} "
        "with the traceback (rerun with --verbose)"]


@pytest.mark.parametrize("how", [["--verbose", "boom"], ["boom", "--verbose"], ["boom", "-v"]])
def test_verbose_shows_the_traceback(monkeypatch, how):
    monkeypatch.delenv("OTELWATER_DEBUG", raising=False)
    r = CliRunner().invoke(toy, how)
    assert isinstance(r.exception, KeyError)  # propagated: click's runner holds the traceback


def test_otelwater_debug_shows_the_traceback(monkeypatch):
    monkeypatch.setenv("OTELWATER_DEBUG", "1")
    r = CliRunner().invoke(toy, ["boom"])
    assert isinstance(r.exception, KeyError)


def test_verbose_prints_the_details_of_a_failure_before_its_line(monkeypatch):
    monkeypatch.delenv("OTELWATER_DEBUG", raising=False)
    quiet = CliRunner().invoke(toy, ["refused"])
    assert quiet.exit_code == 3 and "whole story" not in quiet.output
    loud = CliRunner().invoke(toy, ["refused", "--verbose"])
    assert loud.exit_code == 3
    assert loud.output.splitlines() == [
        "clang says: the whole story", "-DOTW_X=1",
        "otelwater: the kernel probe did not load: x; run 'otelwater doctor'"]


def test_verbose_is_in_help():
    assert "--verbose" in run("--help").output
    assert "--verbose" in run("watch", "--help").output


def test_first_error_picks_the_compiler_error():
    log = ("In file included from <built-in>:2:\n1 warning generated.\n"
           "/virtual/main.c:82:22: error: use of undeclared identifier 'X'\n"
           "/virtual/main.c:90:1: error: second\n")
    assert first_error(log) == "/virtual/main.c:82:22: error: use of undeclared identifier 'X'"
    assert first_error("could not open bpf map: events, error: Invalid argument\n") == (
        "could not open bpf map: events, error: Invalid argument")
    assert first_error("1 warning generated.\n") is None


def test_locate_on_a_device_is_one_line_not_a_hang():
    from click.testing import CliRunner

    from otelwater.cli import main

    r = CliRunner().invoke(main, ["locate", "/dev/zero"])
    assert r.exit_code == 4
    assert "not a regular file" in r.output


@pytest.mark.parametrize("command", ["", "doctor", "watch", "record", "correlate", "locate"])
def test_help_fits_80_columns(command):
    runner = CliRunner()
    got = runner.invoke(main, [*command.split(), "--help"], terminal_width=80)
    assert got.exit_code == 0, got.output
    wide = [line for line in got.output.splitlines() if len(line) > 80]
    assert not wide, wide
