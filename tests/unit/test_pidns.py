"""Which pid namespace the probes read ids in (otelwater.probes.host.pid_namespace): the one
this process's /proc numbers processes in, named to the BPF programs only when it is not the
host's. On fixture /proc trees (a status file, ns files) and on this machine's own /proc."""

from __future__ import annotations

import os

import pytest

from otelwater.probes import host, loader

HOST_STATUS = "Name:\totelwater\nPid:\t48213\nNSpid:\t48213\n"
POD_VIEW = "Name:\totelwater\nPid:\t8\nNSpid:\t8\n"            # a pod's /proc, seen in the pod
NODE_VIEW = "Name:\totelwater\nPid:\t48213\nNSpid:\t48213\t8\n"  # the node's /proc in a pod


@pytest.mark.parametrize("status,depth", [(HOST_STATUS, 1), (POD_VIEW, 1), (NODE_VIEW, 2),
                                          ("Name:\tx\nNSpid:\t9\t5\t1\n", 3),
                                          ("Name:\told kernel\nPid:\t9\n", 1)])
def test_nspid_depth_counts_the_namespaces_from_procs_down(status, depth):
    assert host._nspid_depth(status) == depth


def fake_proc(tmp_path, status: str):
    """A /proc of self/status, self/ns/{pid,net} and 1/ns/pid (plain files: their inodes
    stand for the namespaces')."""
    for d in ("self/ns", "1/ns"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "self" / "status").write_text(status)
    for f in ("self/ns/pid", "self/ns/net", "1/ns/pid"):
        (tmp_path / f).write_text("")
    return tmp_path


def test_procs_namespace_is_our_own_when_it_numbers_us_once(tmp_path):
    proc = fake_proc(tmp_path, POD_VIEW)
    ns = host.pid_namespace(str(proc))
    own = os.stat(proc / "self" / "ns" / "pid")
    assert ns == host.PidNamespace(own.st_dev, own.st_ino,
                                   os.stat(proc / "self" / "ns" / "net").st_ino)
    assert ns.cflags() == [f"-DOTW_PIDNS_DEV={own.st_dev}", f"-DOTW_PIDNS_INO={own.st_ino}",
                           f"-DOTW_NETNS_ONLY={ns.net_ino}"]


def test_procs_namespace_is_its_pid_1s_when_it_is_an_ancestor_of_ours(tmp_path):
    # /proc numbers us twice: it is a namespace above ours, the one its pid 1 lives in
    proc = fake_proc(tmp_path, NODE_VIEW)
    ns = host.pid_namespace(str(proc))
    assert ns.ino == os.stat(proc / "1" / "ns" / "pid").st_ino
    assert ns.ino != os.stat(proc / "self" / "ns" / "pid").st_ino


def test_no_namespace_files_is_the_hosts_numbering(tmp_path):
    (tmp_path / "self").mkdir()
    (tmp_path / "self" / "status").write_text(HOST_STATUS)
    assert host.pid_namespace(str(tmp_path)) is None


def test_this_machines_proc():
    own = os.stat("/proc/self/ns/pid").st_ino
    ns = host.pid_namespace()
    if own == host.INIT_PID_NS_INO:
        assert ns is None          # the host's: the programs read ids as the kernel gives them
    else:
        assert ns is not None and ns.net_ino == os.stat("/proc/self/ns/net").st_ino


def test_every_program_is_built_for_the_namespace(monkeypatch):
    pod = host.PidNamespace(4, 4026532242, 4026532245)
    monkeypatch.setattr(host, "pid_namespace", lambda: pod)
    flags = loader.kernel_cflags({"OFF_X": 8}, 64)
    assert flags[-3:] == pod.cflags()
    monkeypatch.setattr(host, "pid_namespace", lambda: None)
    assert not [f for f in loader.kernel_cflags({"OFF_X": 8}, 64)
                if "PIDNS" in f or "NETNS" in f]

