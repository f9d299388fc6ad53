"""What the Go read sampler holds for an executable (its uprobes, its exec_targets/up_exes rows)
and when it goes (otelwater.probes.goread.retire_due): kept while a traced process runs it or its
path still names it, gone at once after a deploy replaced the file, and after an idle time when
it was known only by /proc/PID/exe (a container's process, gone). On fixture paths."""

from __future__ import annotations

from otelwater.probes.goread import RETIRE_IDLE_S, retire_due

KEY, OTHER = (8388609, 4242), (8388609, 4243)


def files(mapping):
    return lambda path: mapping.get(path)


def test_kept_while_a_traced_process_runs_it_whatever_its_path_says():
    idle = {}
    assert not retire_due(KEY, "/usr/bin/svc", True, idle, 0.0, files({}))
    assert not retire_due(KEY, "/proc/7/exe", True, idle, 0.0, files({}))
    assert idle == {}


def test_kept_while_its_path_still_names_it_gone_when_a_deploy_replaced_or_removed_it():
    idle = {}
    assert not retire_due(KEY, "/usr/bin/svc", False, idle, 0.0, files({"/usr/bin/svc": KEY}))
    assert retire_due(KEY, "/usr/bin/svc", False, idle, 0.0, files({"/usr/bin/svc": OTHER}))
    assert retire_due(KEY, "/usr/bin/svc", False, idle, 0.0, files({}))
    assert idle == {}


def test_a_binary_known_by_proc_pid_exe_waits_out_its_idle_time():
    # a container's process is gone: its /proc/PID/exe says nothing of the file any more
    idle = {}
    gone = files({})
    assert not retire_due(KEY, "/proc/7/exe", False, idle, 100.0, gone)
    assert not retire_due(KEY, "/proc/7/exe", False, idle, 100.0 + RETIRE_IDLE_S - 1, gone)
    # ...a process of it traced again in between starts the wait over
    assert not retire_due(KEY, "/proc/7/exe", True, idle, 100.0 + RETIRE_IDLE_S - 1, gone)
    assert not retire_due(KEY, "/proc/7/exe", False, idle, 100.0 + RETIRE_IDLE_S, gone)
    assert retire_due(KEY, "/proc/7/exe", False, idle, 100.0 + 2 * RETIRE_IDLE_S, gone)
    assert idle == {}
    # ...and a pid reused by another program's process says nothing of the file either
    other = files({"/proc/7/exe": OTHER})
    assert not retire_due(KEY, "/proc/7/exe", False, idle, 0.0, other)
    assert retire_due(KEY, "/proc/7/exe", False, idle, RETIRE_IDLE_S, other)
