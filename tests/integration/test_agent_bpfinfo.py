"""otelwater.probes.bpfinfo on real BPF: a BCC program with maps of each kind, read through the
bpf(2) syscall and checked against the kernel's other accounts of them (/proc/self/fdinfo,
bpftool); and the agent's self-metrics scraped with that object. Root only (skips with the
reason otherwise)."""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import subprocess
import time
import urllib.request

import pytest

pytestmark = pytest.mark.root

SOURCE = r"""
struct big { char b[408]; };                       /* water.c's socket entry, in size */
BPF_TABLE("lru_hash", u64, struct big, lru_socks, 4096);
BPF_TABLE("lru_hash", u64, struct big, full_socks, 65536);
BPF_HASH(pids, u32, u64, 1024);
BPF_PERCPU_HASH(percpu, u32, u64, 128);
BPF_ARRAY(cfg, u64, 4);
BPF_RINGBUF_OUTPUT(events, 8);

TRACEPOINT_PROBE(syscalls, sys_enter_getppid) {
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    u64 one = 1;
    pids.update(&pid, &one);
    percpu.update(&pid, &one);
    return 0;
}
"""


@pytest.fixture(scope="module")
def bpf(bpf_ready):
    from bcc import BPF

    b = BPF(text=SOURCE)
    yield b
    b.cleanup()


def fill(table, n: int, start: int = 1) -> None:
    """n keys into a u64-keyed table in one BPF_MAP_UPDATE_BATCH."""
    from bcc.libbcc import lib

    keys = (ctypes.c_uint64 * n)(*range(start, start + n))
    values = ctypes.create_string_buffer(n * ctypes.sizeof(table.Leaf))
    count = ctypes.c_uint32(n)
    assert lib.bpf_update_batch(table.map_fd, keys, values, ctypes.byref(count)) == 0
    assert count.value == n


def fdinfo(fd: int) -> dict:
    with open(f"/proc/self/fdinfo/{fd}") as f:
        return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in f)}


def test_programs_and_maps_of_a_bcc_object(bpf):
    from otelwater.probes import bpfinfo

    progs = bpfinfo.programs_of(bpf)
    assert list(progs) == ["tracepoint__syscalls__sys_enter_getppid"]
    (fd,) = progs.values()
    p = bpfinfo.prog_info(fd)
    assert p.id == int(fdinfo(fd)["prog_id"])
    # the kernel's name: at most 15 characters of BCC's (which leaves off "tracepoint__")
    assert 0 < len(p.name) <= 15 and p.name in "tracepoint__syscalls__sys_enter_getppid"
    maps = bpfinfo.maps_of(bpf)
    assert set(maps) == {"lru_socks", "full_socks", "pids", "percpu", "cfg", "events"}
    shown = {m["id"]: m for m in json.loads(subprocess.run(
        ["bpftool", "map", "show", "--json"], capture_output=True, text=True,
        check=True).stdout)}
    for name, mfd in maps.items():
        m = bpfinfo.map_info(mfd)
        assert m.id == int(fdinfo(mfd)["map_id"])
        assert (shown[m.id]["name"], shown[m.id]["type"], shown[m.id]["max_entries"]) == \
            (name[:15], m.type_name, m.max_entries), name


def test_map_entries_are_counted_for_hashes_only_and_bounded(bpf):
    from otelwater.probes import bpfinfo

    maps = bpfinfo.maps_of(bpf)
    fill(bpf["lru_socks"], 3000)
    os.getppid()
    entries = {n: bpfinfo.map_entries(fd) for n, fd in maps.items()}
    assert entries["lru_socks"] == 3000
    assert entries["pids"] >= 1 and entries["percpu"] >= 1   # this process, and any other
    assert entries["cfg"] is None and entries["events"] is None
    # one key at a time (where the kernel has no batch lookup) counts the same
    info = bpfinfo.map_info(maps["lru_socks"])
    assert bpfinfo._count_by_keys(maps["lru_socks"], info) == 3000
    # a 64k LRU filled (it may have evicted a few already: its free lists are per CPU), the
    # two ways count the same; the cost printed (-s)
    fill(bpf["full_socks"], 65536)
    info = bpfinfo.map_info(maps["full_socks"])
    t0 = time.perf_counter()
    n = bpfinfo.map_entries(maps["full_socks"], info)
    t1 = time.perf_counter()
    assert 60000 < n <= 65536
    assert bpfinfo._count_by_keys(maps["full_socks"], info) == n
    t2 = time.perf_counter()
    print(f"\n{n}-entry LRU hash counted: {1e3 * (t1 - t0):.1f} ms by batches, "
          f"{1e3 * (t2 - t1):.1f} ms one key at a time")
    # never beyond max_entries, whatever a walk that races the programs meets
    small = dataclasses.replace(info, max_entries=1000)
    assert bpfinfo.map_entries(maps["full_socks"], small) == 1000
    assert bpfinfo._count_by_keys(maps["full_socks"], small) == 1000


def test_run_time_counted_only_while_the_statistics_are_on(bpf):
    from otelwater.probes import bpfinfo

    (fd,) = bpfinfo.programs_of(bpf).values()
    before = bpfinfo.prog_info(fd)
    stats = bpfinfo.enable_stats()      # root: CAP_SYS_ADMIN (the agent never does this)
    try:
        for _ in range(100):
            os.getppid()
        during = bpfinfo.prog_info(fd)
    finally:
        os.close(stats)
    assert during.run_cnt >= before.run_cnt + 100
    assert during.run_time_ns > before.run_time_ns
    assert bpfinfo.counted(during, enabled=False)
    if not bpfinfo.stats_enabled():     # (unless someone set kernel.bpf_stats_enabled=1)
        for _ in range(100):
            os.getppid()
        after = bpfinfo.prog_info(fd)
        assert after.run_cnt - during.run_cnt < 100


def test_closed_fds_are_errors_not_crashes():
    from otelwater.probes import bpfinfo

    r, w = os.pipe()
    os.close(w)
    with pytest.raises(OSError):
        bpfinfo.prog_info(r)            # not a BPF object
    os.close(r)
    with pytest.raises(OSError):
        bpfinfo.map_info(r)             # closed


def test_self_metrics_of_a_bcc_object_scraped(bpf):
    from prometheus_client.parser import text_string_to_metric_families as parse

    from otelwater.agent.selfmetrics import SelfMetrics
    from otelwater.agent.state import AgentState
    from otelwater.export.prometheus import PrometheusEndpoint
    from otelwater.probes import bpfinfo

    objects = [bpf]
    with PrometheusEndpoint(0) as endpoint:
        metrics = SelfMetrics(AgentState(), endpoint=endpoint, bpf_objects=lambda: objects)
        try:
            with urllib.request.urlopen(endpoint.url, timeout=10) as r:
                body = r.read().decode()
        finally:
            metrics.close()
    got = {(s.name, s.labels.get("bpf_map") or s.labels.get("bpf_program")): s.value
           for f in parse(body) for s in f.samples if s.name.startswith("otelwater_agent_bpf")}
    lru = bpfinfo.map_entries(bpfinfo.maps_of(bpf)["lru_socks"])
    assert got[("otelwater_agent_bpf_map_entries", "lru_socks")] == lru
    assert got[("otelwater_agent_bpf_map_max_entries", "lru_socks")] == 4096
    assert got[("otelwater_agent_bpf_map_max_entries", "cfg")] == 4
    assert ("otelwater_agent_bpf_map_entries", "cfg") not in got
    (fd,) = bpfinfo.programs_of(bpf).values()
    name = "tracepoint__syscalls__sys_enter_getppid"
    if bpfinfo.counted(bpfinfo.prog_info(fd)):
        assert got[("otelwater_agent_bpf_runs_total", name)] >= 100
    else:
        assert ("otelwater_agent_bpf_runs_total", name) not in got
