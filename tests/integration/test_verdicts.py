"""Verdicts against ground truth the test imposes and measures: real kernel, real Go, loopback.

Three scenarios drive examples/slowreader with examples/loadgen while the water probe and the
embedded tracepoint read sampler watch it, and the correlator decides each slow read:

- **slow consumer**: the server sleeps 30 ms after each Read (4 KiB, which drains the queue),
  the client streams a 64-byte message every 6 ms: each Read finds its bytes waiting.
- **client think time**: the server reads at once, the client pauses 3 ms between ping-pong
  messages: each Read parks after the server's answer went out and returns as soon as the next
  message arrives. The peer owed nothing meanwhile: ``idle``, not the peer's fault (idle reads
  are recorded and given verdicts here, as with ``--include-idle``; by default they are only
  counted). A peer that is slow to answer is tested on real services (test_real_services.py).
- **starved runtime**: data on time (ping-pong, 2 ms pauses) but ``GOMAXPROCS=1`` and
  ``slowreader -burn 1`` (a goroutine spinning on the only P): a Read woken by its data waits
  for Go's scheduler (sysmon's netpoll and 10 ms preemption) before it returns.

Ground truth is independent of otelwater: slowreader logs every Read (start/end on
CLOCK_MONOTONIC around the call), loadgen ``-log`` every message (CLOCK_MONOTONIC just before
its Write, ``send_ns``, and just after, ``done_ns``). Per connection, in order, a Read's first
byte lies in message ``offset // size``; so for each Read:

- the message was written before the Read began (``done <= start``): its bytes waited in the
  queue; truth queue delay lies in ``[start - done, end - send]`` (the kernel stamps it inside
  the Read); truth verdict ``consumer-lagging`` when that whole range is >= 1 ms;
- the message was written after the Read began (``send >= start``): it parked after the
  server's answer, waiting for a client that owed nothing; truth ``wait_idle = send - start``,
  ``wait_run = end - send``, and the verdict ``runtime-starved`` when ``wait_run >= 1 ms``,
  else ``idle``;
- anything else (the Write straddles the start, or a range straddles 1 ms) is *borderline*:
  either neighbouring verdict counts as a match.

A slow read (the denominator) is a Read the truth says is slow by a clear margin: parked for
at least 1.5 ms (the sampler's own interval lies inside the logged one, so a Read logged just
over 1 ms may rightly be under it in the kernel), or whose bytes waited at least 1.5 ms. Its
verdict matches when the correlator emitted one for it (matched by goroutine, fd, and the
kernel interval lying inside the logged one) with the truth verdict; a slow read without a
verdict is a miss. Required: at least MIN_MATCH (95%) in each scenario.

Measured on the 2-core test VM while other suites and builds ran (``pytest -s`` prints the
``match`` lines), 8 runs: verdicts matched 100% of the slow reads in every run (consumer
363-396 slow reads, peer 296-297, starved runtime 239-240); one peer run under heavy load had
9% of its slow reads truly runtime-starved (the OS kept the reader off the CPU) and otelwater
said so for each. Figures: median error 0-25 us; per read within 1 ms for 98.9-100%
(the worst: 4 consumer reads whose server fell ~200 ms behind got lower-bound stamps, below).

Figures, per read (``TOL_NS``, 1 ms: loopback delivery after the Write, and the Go code and
thread scheduling between the program's timer and the syscall, on a loaded VM), for at least
MIN_FIGURES (95%) of the reads whose truth is not borderline, and the median within
``TOL_MEDIAN_NS`` (200 µs):

- consumer: the stamped queue delay lies in the truth range widened by TOL_NS, and is at
  least the imposed sleep less the sender's pause (the oldest byte may come up to one pause
  after the previous Read) less TOL_NS;
- think time: wait_idle and wait_run each within TOL_NS of the truth; wait_idle at least the
  sender's pause less TOL_NS;
- starved runtime: the same, and the median wait_run at least 5 ms (the starvation imposed).
"""

from __future__ import annotations

import bisect
import json
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from otelwater.correlate import Correlator, CorrelatorConfig
from otelwater.events.model import LostEvents, ReadRecord
from otelwater.events.verdict import CONSUMER_LAGGING, IDLE, RUNTIME_STARVED, UNKNOWN
from otelwater.probes.goread import GoReadOptions, GoReadSampler
from otelwater.probes.kernel import WaterOptions, WaterProbe

from .conftest import ROOT
from .slowreader import SlowReader

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("bpf_ready")]

BIN = ROOT / "examples" / "bin"
LOADGEN = str(BIN / "loadgen")

MS = 1_000_000
T_NS = 1 * MS                # the correlator's slow-read and waiting-to-run thresholds
MARGIN_NS = MS // 2          # a slow read is slow by at least this much beyond T_NS
EDGE_NS = 50_000             # the kernel interval may poke out of the logged one by this
TOL_NS = 1 * MS              # per-read tolerance of the figures
TOL_MEDIAN_NS = 200_000      # ...and of their median
MIN_MATCH = 0.95
MIN_FIGURES = 0.95
MIN_IMPOSED = 0.75           # slow reads whose truth is the scenario's own cause


# -- the programs --------------------------------------------------------------------------
def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@dataclass
class Run:
    reads: list[dict]          # slowreader's log
    messages: list[dict]       # loadgen's log
    size: int                  # message bytes
    verdicts: list             # the correlator's, live
    stats: object              # the sampler's GoReadStats
    lost: tuple[int, int]      # (water, reads) records lost


def run(tmp_path: Path, server_args: list[str], load_args: list[str], size: int,
        env: dict | None = None) -> Run:
    """Serve, trace and correlate one scenario; the programs' logs and the live verdicts."""
    server = SlowReader(*server_args, log=tmp_path / "reads.jsonl", env=env)
    try:
        sampler = GoReadSampler(GoReadOptions(pids=frozenset({server.pid}), embed=True,
                                              include_idle=True))
        with WaterProbe(WaterOptions(ports=frozenset({server.port})), readers=sampler) as probe:
            corr = Correlator(CorrelatorConfig(slow_ns=T_NS, include_idle=True),
                              start_ns=time.monotonic_ns())
            verdicts: list = []
            lost_seen = {"water": 0, "reads": 0}

            def step(sweep: bool) -> None:
                batch = probe.poll() + [r for r in sampler.poll() if isinstance(r, ReadRecord)]
                if sweep:
                    batch += probe.sweep()
                    for name, src in (("water", probe), ("reads", sampler)):
                        if src.lost_total() != lost_seen[name]:
                            lost_seen[name] = src.lost_total()
                            batch.append(LostEvents(time.monotonic_ns(), name, lost_seen[name]))
                batch.sort(key=lambda r: getattr(r, "ts_ns", getattr(r, "ts_end_ns", 0)))
                verdicts.extend(corr.feed(batch))

            lg = subprocess.Popen([LOADGEN, "-addr", server.addr, "-size", str(size),
                                   "-log", str(tmp_path / "sent.jsonl"), *load_args],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            next_sweep = time.monotonic() + 0.5
            while lg.poll() is None:
                step(sweep=time.monotonic() >= next_sweep)
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + 0.5
                time.sleep(0.02)
            out, err = lg.communicate()
            assert lg.returncode == 0, err
            time.sleep(0.2)  # the EOF reads of the closing connections
            step(sweep=True)
            stats = sampler.stats()
            verdicts.extend(corr.finish())
    finally:
        code = server.stop()
    assert code == 0
    return Run(lines(tmp_path / "reads.jsonl"), lines(tmp_path / "sent.jsonl"), size,
               verdicts, stats, tuple(lost_seen.values()))


# -- ground truth ---------------------------------------------------------------------------
@dataclass
class Truth:
    read: dict                 # slowreader's log line
    kind: str                  # "waiting" (bytes were there), "parked", "borderline"
    verdicts: frozenset        # acceptable verdicts
    slow: bool                 # clearly slow: in the denominator
    wait_idle: int | None = None
    wait_run: int | None = None
    qd_lo: int | None = None   # truth queue delay range
    qd_hi: int | None = None


def _pick(lo: int, hi: int, below: str, above: str) -> frozenset:
    """The verdict(s) for a figure known to lie in [lo, hi] against the threshold T_NS."""
    if lo >= T_NS:
        return frozenset({above})
    if hi < T_NS:
        return frozenset({below})
    return frozenset({below, above})


def truths(r: Run) -> list[Truth]:
    """Every data-returning Read of the server, with what the two logs say about it."""
    sent: dict[int, list[dict]] = {}
    for m in r.messages:
        sent.setdefault(m["port"], []).append(m)
    for msgs in sent.values():
        msgs.sort(key=lambda m: m["seq"])
        assert [m["seq"] for m in msgs] == list(range(len(msgs)))
    by_conn: dict[int, list[dict]] = {}
    for t in r.reads:
        by_conn.setdefault(int(t["remote"].rsplit(":", 1)[1]), []).append(t)
    out = []
    for port, reads in by_conn.items():
        msgs = sent[port]
        offset = 0
        for t in sorted(reads, key=lambda t: t["start_ns"]):
            if t["returned"] <= 0:
                continue
            m = msgs[offset // r.size]
            offset += t["returned"]
            start, end = t["start_ns"], t["end_ns"]
            if m["done_ns"] <= start:        # its bytes were waiting when the Read began
                lo, hi = start - m["done_ns"], end - m["send_ns"]
                ok = _pick(lo, hi, UNKNOWN, CONSUMER_LAGGING)
                out.append(Truth(t, "waiting" if len(ok) == 1 else "borderline", ok,
                                 lo >= T_NS + MARGIN_NS, qd_lo=lo, qd_hi=hi))
            elif m["send_ns"] >= start:      # it came while the Read was parked
                wait_idle, wait_run = m["send_ns"] - start, end - m["send_ns"]
                # the Write took done - send: the arrival lies in it
                ok = _pick(end - m["done_ns"], wait_run, IDLE, RUNTIME_STARVED)
                out.append(Truth(t, "parked" if len(ok) == 1 else "borderline", ok,
                                 end - start >= T_NS + MARGIN_NS, wait_idle, wait_run))
            else:                            # the Write straddles the start
                out.append(Truth(t, "borderline",
                                 frozenset({IDLE, RUNTIME_STARVED, CONSUMER_LAGGING}),
                                 end - start >= T_NS + MARGIN_NS))
    return out


def pair_up(r: Run, ts: list[Truth]) -> tuple[dict[int, object], list]:
    """{id(truth): its verdict}, and the verdicts of data-returning reads matching no Read."""
    index: dict[tuple, tuple[list[int], list[Truth]]] = {}
    for t in sorted(ts, key=lambda t: t.read["start_ns"]):
        starts, items = index.setdefault((t.read["goid"], t.read["fd"]), ([], []))
        starts.append(t.read["start_ns"])
        items.append(t)
    found, stray = {}, []
    for v in r.verdicts:
        rec = v.read
        if rec.returned <= 0:
            continue                         # EOF and errors: no message to compare with
        starts, items = index.get((rec.goid, rec.fd), ([], []))
        i = bisect.bisect_right(starts, rec.ts_start_ns + EDGE_NS) - 1
        # the Read whose logged interval holds the record's, up to EDGE_NS; Reads follow each
        # other within microseconds, so of the two candidates take the one it pokes out of less
        def outside(j: int) -> int:
            t = items[j].read
            return max(t["start_ns"] - rec.ts_start_ns, 0) + max(rec.ts_end_ns - t["end_ns"], 0)

        cands = sorted((outside(j), j) for j in (i, i - 1) if j >= 0)
        t = items[cands[0][1]] if cands and cands[0][0] <= EDGE_NS else None
        if t is None:
            stray.append(v)
            continue
        assert id(t) not in found, f"two verdicts for one Read: {found[id(t)]}\n{v}\n{t}"
        assert rec.returned == t.read["returned"], (rec, t.read)
        found[id(t)] = v
    return found, stray


def check_verdicts(name: str, r: Run, ts: list[Truth], expect: str) -> dict[int, object]:
    assert r.lost == (0, 0), f"records lost (water, reads): {r.lost}"
    found, stray = pair_up(r, ts)
    assert not stray, f"{len(stray)} verdicts match no logged Read: {stray[:2]}"
    slow = [t for t in ts if t.slow]
    matched = [t for t in slow if id(t) in found and found[id(t)].verdict in t.verdicts]
    rate = len(matched) / len(slow)
    wrong: dict[str, int] = {}
    for t in slow:
        got = found[id(t)].verdict if id(t) in found else "no verdict"
        if got not in t.verdicts:
            key = f"{'/'.join(sorted(t.verdicts))} -> {got}"
            wrong[key] = wrong.get(key, 0) + 1
    print(f"\n{name}: match {rate:.1%} of {len(slow)} slow reads "
          f"({sum(t.kind == 'borderline' for t in slow)} borderline, "
          f"{sum(t.verdicts == {expect} for t in slow)} truly {expect}); misses {wrong}; "
          f"qslow {r.stats.queue_slow} limited {r.stats.queue_slow_limited}")
    assert len(slow) >= 200, f"only {len(slow)} slow reads: the scenario did not take"
    assert rate >= MIN_MATCH, f"{name}: verdicts match {rate:.1%} of {len(slow)}: {wrong}"
    # the scenario imposed the cause it claims: most slow reads' truth is that verdict (not
    # all: on a loaded VM the OS, too, can keep a reader from running after its data came;
    # the truth then says runtime-starved, and the verdict must say so as well)
    share = sum(t.verdicts == {expect} for t in slow) / len(slow)
    assert share >= MIN_IMPOSED, f"{name}: only {share:.1%} of slow reads are truly {expect}"
    return found


def within(name: str, errors: list[int], what: str) -> None:
    """At least MIN_FIGURES of |error| within TOL_NS, the median within TOL_MEDIAN_NS."""
    assert errors, f"{name}: no {what} to compare"
    abs_err = sorted(abs(e) for e in errors)
    ok = sum(e <= TOL_NS for e in abs_err) / len(abs_err)
    med = statistics.median(abs_err)
    print(f"{name}: {what}: {ok:.1%} of {len(errors)} within {TOL_NS / MS:g} ms, "
          f"median |error| {med / 1000:.0f} us, max {abs_err[-1] / 1000:.0f} us")
    assert ok >= MIN_FIGURES, f"{name}: {what}: only {ok:.1%} within {TOL_NS} ns"
    assert med <= TOL_MEDIAN_NS, f"{name}: {what}: median error {med} ns"


def check_waits(name: str, ts: list[Truth], found: dict) -> list:
    """The waiting split of parked reads against the truth; their verdicts."""
    vs = [(t, found[id(t)]) for t in ts if t.slow and t.kind == "parked" and id(t) in found]
    vs = [(t, v) for t, v in vs if v.wait_idle_ns is not None]
    within(name, [v.wait_idle_ns - t.wait_idle for t, v in vs], "wait_idle")
    within(name, [v.wait_run_ns - t.wait_run for t, v in vs], "wait_run")
    return vs


# -- the scenarios ---------------------------------------------------------------------------
SLEEP_MS, STREAM_PAUSE_MS = 30, 6


def test_slow_consumer_is_consumer_lagging(tmp_path):
    # Given a server that sleeps 30 ms after each Read of up to 4 KiB, and 4 clients streaming
    # a 64-byte message every 6 ms (about 5 arrivals a Read: within the kernel's remembered
    # arrivals (8), and 33 slow reads a socket a second: within the per-socket record rate, 200)
    r = run(tmp_path, ["-mode", "sink", "-readsize", "4096", "-delay", f"{SLEEP_MS}ms"],
            ["-mode", "stream", "-conns", "4", "-duration", "3s",
             "-pause", f"{STREAM_PAUSE_MS}ms"], size=64)
    ts = truths(r)
    # Then the slow reads are consumer-lagging
    found = check_verdicts("consumer", r, ts, CONSUMER_LAGGING)
    # and their queue delay is the truth's, and at least the sleep the server imposed
    vs = [(t, found[id(t)]) for t in ts if t.slow and t.kind == "waiting" and id(t) in found]
    vs = [(t, v) for t, v in vs if v.queue_delay_ns is not None]
    # an exact stamp lies in the truth range; one marked inexact is a lower bound (its byte
    # came before the arrivals the kernel remembers: the server fell far behind), so only its
    # upper side is checked
    outside = [max(t.qd_lo - v.queue_delay_ns if v.read.queue_delay_exact else 0,
                   v.queue_delay_ns - t.qd_hi, 0) for t, v in vs]
    width = statistics.median(t.qd_hi - t.qd_lo for t, _ in vs)
    print(f"consumer: truth queue-delay ranges {width / 1000:.0f} us wide (median)")
    within("consumer", outside, "queue delay outside the truth range")
    floor = (SLEEP_MS - STREAM_PAUSE_MS) * MS - TOL_NS
    short = [v.queue_delay_ns for _, v in vs if v.queue_delay_ns < floor]
    assert len(short) <= (1 - MIN_FIGURES) * len(vs), \
        f"{len(short)} of {len(vs)} queue delays below {floor} ns: {short[:5]}"
    exact = sum(bool(v.read.queue_delay_exact) for _, v in vs) / len(vs)
    print(f"consumer: {exact:.1%} of the queue delays exact")


def test_client_think_time_is_idle_not_the_peers_fault(tmp_path):
    # Given a server that reads at once, and 4 clients pausing 3 ms between ping-pong messages
    pause_ms = 3
    r = run(tmp_path, ["-mode", "echo", "-readsize", "64"],
            ["-mode", "pingpong", "-conns", "4", "-count", "75", "-pause", f"{pause_ms}ms"],
            size=64)
    ts = truths(r)
    # Then the server's slow reads are idle (it had answered; the client owed nothing), on
    # sockets it accepted, idle about the pause imposed
    found = check_verdicts("think time", r, ts, IDLE)
    assert {v.read.role for v in found.values()} == {"accepted"}
    vs = check_waits("think time", ts, found)
    short = [v.wait_idle_ns for _, v in vs if v.wait_idle_ns < pause_ms * MS - TOL_NS]
    assert len(short) <= (1 - MIN_FIGURES) * len(vs), short[:5]


def test_starved_runtime_is_runtime_starved(tmp_path):
    # Given a Go runtime with one P held by a spinning goroutine, and 4 clients sending on time
    # (ping-pong, 2 ms pauses)
    r = run(tmp_path, ["-mode", "echo", "-readsize", "64", "-burn", "1"],
            ["-mode", "pingpong", "-conns", "4", "-count", "60", "-pause", "2ms"],
            size=64, env={"GOMAXPROCS": "1"})
    ts = truths(r)
    # Then the slow reads are runtime-starved, and waited to run as long as the truth says
    found = check_verdicts("runtime", r, ts, RUNTIME_STARVED)
    vs = check_waits("runtime", ts, found)
    waits = sorted(v.wait_run_ns for _, v in vs)
    assert statistics.median(waits) >= 5 * MS, f"median wait_run {statistics.median(waits)} ns"
