"""Capabilities as otelwater reads them (/proc/self/status's CapEff) and what `otelwater doctor`
and the probes' first check say about them: on fixture capability sets, no root needed."""

from __future__ import annotations

import resource
from pathlib import Path

import pytest
from click.testing import CliRunner

from otelwater.cli import main
from otelwater.errors import NotRoot
from otelwater.probes import host

ROOT = Path(__file__).resolve().parents[2]

# CapEff values as /proc/PID/status shows them
AGENT = 0x000000c000080004      # CAP_DAC_READ_SEARCH CAP_SYS_PTRACE CAP_PERFMON CAP_BPF
ROOT_FULL = 0x000001ffffffffff  # root on a 6.x kernel: every capability
NO_BPF = AGENT & ~(1 << 39)
SYS_ADMIN_ONLY = 1 << 21
DOCKER_DEFAULT = 0x00000000a80425fb   # a container's default set: no BPF, PERFMON, SYS_PTRACE
DAC_OVERRIDE_SET = host.capability_mask(("CAP_BPF", "CAP_PERFMON", "CAP_DAC_OVERRIDE",
                                         "CAP_SYS_PTRACE"))

STATUS = """Name:\totelwater
Umask:\t0022
State:\tS (sleeping)
Uid:\t65534\t65534\t65534\t65534
CapInh:\t000000c000080004
CapPrm:\t000000c000080004
CapEff:\t000000c000080004
CapBnd:\t000000c000080004
CapAmb:\t000000c000080004
NoNewPrivs:\t1
"""


def test_parse_caps_reads_each_set_of_a_status_file():
    assert host.parse_caps(STATUS) == AGENT
    assert host.parse_caps(STATUS, "CapBnd") == AGENT
    assert host.parse_caps("Name:\tx\n") == 0


def test_agent_capabilities_are_the_four_and_never_sys_admin():
    assert host.AGENT_CAPABILITIES == ("CAP_BPF", "CAP_PERFMON", "CAP_DAC_READ_SEARCH",
                                       "CAP_SYS_PTRACE")
    assert "CAP_SYS_ADMIN" not in host.AGENT_CAPABILITIES
    assert host.capability_mask(host.AGENT_CAPABILITIES) == AGENT
    for cap in host.AGENT_CAPABILITIES:
        assert host.CAPABILITY_USES[cap]


def test_capability_names_lowest_first():
    assert host.capability_names(AGENT) == ["CAP_DAC_READ_SEARCH", "CAP_SYS_PTRACE",
                                            "CAP_PERFMON", "CAP_BPF"]
    assert host.capability_names(0) == []


@pytest.mark.parametrize("caps, missing", [
    (AGENT, []),
    (ROOT_FULL, []),
    (0, list(host.AGENT_CAPABILITIES)),
    (NO_BPF, ["CAP_BPF"]),
    # CAP_SYS_ADMIN counts for CAP_BPF and CAP_PERFMON (the kernel's bpf_capable() and
    # perfmon_capable()), not for reading other users' /proc
    (SYS_ADMIN_ONLY, ["CAP_DAC_READ_SEARCH", "CAP_SYS_PTRACE"]),
    # CAP_DAC_OVERRIDE covers reading and searching
    (DAC_OVERRIDE_SET, []),
    (DOCKER_DEFAULT, ["CAP_BPF", "CAP_PERFMON", "CAP_SYS_PTRACE"]),
])
def test_missing_capabilities(caps, missing):
    assert host.missing_capabilities(caps) == missing


@pytest.mark.parametrize("caps, ok", [(AGENT, True), (ROOT_FULL, True), (SYS_ADMIN_ONLY, True),
                                      (NO_BPF, False), (0, False), (DOCKER_DEFAULT, False)])
def test_privileged_accepts_the_agent_set(caps, ok):
    assert host.privileged(caps) is ok


def by_name(checks):
    return {c.name: c for c in checks}


def test_doctor_lines_with_the_agent_set_all_ok():
    lines = by_name(host.capability_checks(AGENT, 65534))
    assert lines["privileges"].ok
    assert lines["privileges"].found == ("euid 65534, CapEff 0xc000080004 (CAP_DAC_READ_SEARCH "
                                         "CAP_SYS_PTRACE CAP_PERFMON CAP_BPF)")
    for cap in host.AGENT_CAPABILITIES:
        assert lines[cap].ok and lines[cap].found.startswith("held: ")


def test_doctor_names_a_missing_capability_and_what_it_is_for():
    lines = by_name(host.capability_checks(NO_BPF, 65534))
    bpf = lines["CAP_BPF"]
    assert not bpf.ok and bpf.required
    assert bpf.found == "missing: needed to create BPF maps and load BPF programs"
    assert bpf.fix == "grant CAP_BPF (docs/privileges.md)"
    assert lines["privileges"].found.endswith(": lacks CAP_BPF")
    assert not lines["privileges"].required     # counted once, on the capability's own line
    assert all(lines[c].ok for c in host.AGENT_CAPABILITIES if c != "CAP_BPF")


def test_doctor_says_which_capability_gives_one_it_lacks_by_name():
    lines = by_name(host.capability_checks(ROOT_FULL & ~(1 << 39) & ~(1 << 38), 0))
    assert lines["CAP_BPF"].ok and lines["CAP_BPF"].found.startswith("given by CAP_SYS_ADMIN")
    assert lines["CAP_PERFMON"].found.startswith("given by CAP_SYS_ADMIN")


def test_doctor_without_dac_read_search_says_what_is_lost_when_tracefs_is_readable():
    caps = AGENT & ~(1 << 2)
    readable = by_name(host.capability_checks(caps, 65534, tracefs_readable=True))
    private = by_name(host.capability_checks(caps, 65534, tracefs_readable=False))
    assert not readable["CAP_DAC_READ_SEARCH"].ok and not private["CAP_DAC_READ_SEARCH"].ok
    assert "/proc/PID/fd cannot be listed" in readable["CAP_DAC_READ_SEARCH"].found
    assert private["CAP_DAC_READ_SEARCH"].found.startswith("missing: needed to read tracefs")


def test_not_privileged_error_names_what_is_missing():
    e = host.not_privileged_error(0, 65534)
    assert isinstance(e, NotRoot) and e.exit_code == 3
    assert e.one_line() == (
        "loading eBPF programs needs CAP_BPF and CAP_PERFMON, and this process (euid 65534) "
        "lacks CAP_BPF and CAP_PERFMON; run as root (sudo), or grant CAP_BPF, CAP_PERFMON, "
        "CAP_DAC_READ_SEARCH and CAP_SYS_PTRACE (docs/privileges.md)")
    e = host.not_privileged_error(NO_BPF, 0)
    assert "(euid 0) lacks CAP_BPF;" in e.one_line()
    assert "grant this root process" in e.one_line()


def test_require_can_trace_without_capabilities_is_the_named_line(monkeypatch):
    monkeypatch.setattr(host, "_cap_eff", lambda: AGENT & ~(1 << 38))
    with pytest.raises(NotRoot, match="lacks CAP_PERFMON;"):
        host.require_can_trace()


@pytest.mark.parametrize("release, version", [("6.18.44-1-cloud-amd64", (6, 18)),
                                               ("5.10.0-28-amd64", (5, 10)),
                                               ("6.1.0-57-amd64", (6, 1)), ("garbage", (0, 0))])
def test_kernel_version(release, version):
    assert host.kernel_version(release) == version


def test_memlock_matters_before_5_11_only(monkeypatch):
    assert host.memlock_check(AGENT, "6.1.0") is None
    monkeypatch.setattr(resource, "getrlimit", lambda _r: (65536, 65536))
    check = host.memlock_check(AGENT, "5.10.0")
    assert not check.ok and "CAP_SYS_RESOURCE" in check.name
    assert "LimitMEMLOCK=infinity" in check.fix
    assert host.memlock_check(AGENT | 1 << 24, "5.10.0").ok
    monkeypatch.setattr(resource, "getrlimit",
                        lambda _r: (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    assert host.memlock_check(AGENT, "5.10.0").ok


def test_doctor_command_names_the_missing_capability(monkeypatch):
    # Given a process holding the agent's capabilities but CAP_BPF (the other facilities are
    # this host's: whatever they say, the capability lines are the point here)
    monkeypatch.setattr(host, "_cap_eff", lambda: NO_BPF)
    monkeypatch.setattr(host, "uprobes_need_sys_admin", lambda: None)
    r = CliRunner().invoke(main, ["doctor"])
    assert r.exit_code == 3
    assert "FAIL  CAP_BPF: missing: needed to create BPF maps and load BPF programs\n" \
           "      fix: grant CAP_BPF (docs/privileges.md)\n" in r.output
    assert "ok    CAP_PERFMON: held: " in r.output


def test_privileges_doc_covers_every_capability():
    doc = (ROOT / "docs" / "privileges.md").read_text()
    for cap in (*host.AGENT_CAPABILITIES, "CAP_SYS_ADMIN", "CAP_SYS_RESOURCE"):
        assert f"`{cap}`" in doc, cap
