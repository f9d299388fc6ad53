"""`otelwater agent` run for real, as root, beside real Go services (private copies of
examples/bin/<go version>/slowreader, the oldest and the newest Go built), held to ground truth
the tests measure themselves:

    the Go program's own log of its every Read (goroutine, fd, CLOCK_MONOTONIC start and end
        timed inside the program): which slow reads happened, and when
    the kernel's own account of BPF: /proc/PID/fdinfo (the programs and maps the agent holds),
        `bpftool prog show`, `bpftool perf list`, `bpftool link show`, tracefs's probe events
    a real OTLP receiver (otlp_receiver.py) and Debian's Prometheus: what arrived where
    this test's clocks: when it started a process, sent a signal

Two agent runs serve the tests of this module (each start compiles the probes: seconds):

    tracepoints   `--go-binary OLD --go-binary NEW --probes tracepoint`, exporting to a gRPC
                  receiver and scraped by Prometheus: readiness at start, a service started
                  after the agent, two Go versions at once, a restart, the Collector away and
                  back, the scrape, the agent's own metrics; SIGTERM ends it (the last test
                  using it).
    uprobes       `--probes uprobe --pid SLEEP --pid OLD --pid NEW` (a process that is not Go
                  among Go services): two Go versions by one set of uprobe programs, the bad
                  target failed and counted while the others are served; SIGKILL ends it.

And configuration errors, refused before anything is attached. The tests of a run go in the
order of the file (the last one stops the agent); each can also run alone.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pytest

from tests.goexamples import built, toolchains

from .agent_harness import (PROMETHEUS, Agent, Prometheus, Service, bpftool, gone_within,
                            has_span, links_of, maps_of, matching_read, perf_of, private_copy,
                            read_spans, refused_run, span_resources, tracefs_events_of, wait_for)
from .conftest import prog_ids_of
from .otlp_receiver import GrpcReceiver

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("bpf_ready")]

MS = 1_000_000
JOB = "otelwater-agent-test"
# Export gives up on a request after 2 s (the outage test's Collector is away longer), and
# keeps the SDK's batching otherwise: a span waits up to 5 s for a batch of 512, so the
# spans of the last seconds before SIGTERM are still queued when it comes.
AGENT_ENV = {"OTEL_EXPORTER_OTLP_TIMEOUT": "2"}


def go_versions() -> tuple[str, str]:
    """The oldest and the newest Go that built the examples (go1.19.8 and go1.27.3 by
    scripts/setup.sh)."""
    listed = toolchains()
    if len(listed) < 2:
        pytest.skip("two Go toolchains' builds of the examples are needed: run "
                    "scripts/setup.sh (as root)")
    ordered = sorted(listed, key=lambda v: tuple(int(x) for x in v.removeprefix("go").split(".")))
    return ordered[0], ordered[-1]


def wall_s(log_time: str) -> float:
    """A log line's "time" (RFC 3339, UTC, ms) as seconds since the epoch."""
    return datetime.fromisoformat(log_time.replace("Z", "+00:00")).timestamp()


def export_drops(agent: Agent) -> float:
    """What the agent counts as not delivered: its otelwater_agent_export_* counters."""
    samples = agent.metrics()
    return sum(s.value for s in samples if s.name in (
        "otelwater_agent_export_failures_total", "otelwater_agent_export_dropped_total"))


def by_read(spans: list[dict]) -> dict:
    """Spans indexed by (goroutine, fd), to match reads of the program's log quickly."""
    out = defaultdict(list)
    for s in spans:
        out[(s.get("otelwater.goroutine.id"), s.get("otelwater.fd"))].append(s)
    return out


def delivered(reads: list[dict], spans: list[dict]) -> list[dict]:
    """The reads of the program's log that have a span."""
    index = by_read(spans)
    return [r for r in reads if has_span(r, index.get((r["goid"], r["fd"]), []))]


def check_spans_match_the_log(svc: Service, spans: list[dict]) -> None:
    """Each span is one of the service's Reads as the program logged it (same goroutine and
    fd, the span's read within the program's timing of it), with a goroutine id."""
    reads = svc.reads()
    assert spans, f"no spans of pid {svc.pid}"
    assert all(isinstance(s.get("otelwater.goroutine.id"), int)
               and s["otelwater.goroutine.id"] > 0 for s in spans), spans[0]
    goids = {r["goid"] for r in reads}
    assert {s["otelwater.goroutine.id"] for s in spans} <= goids
    index = defaultdict(list)
    for r in reads:
        index[(r["goid"], r["fd"])].append(r)
    unmatched = [s for s in spans if matching_read(
        s, index[(s["otelwater.goroutine.id"], s["otelwater.fd"])]) is None]
    assert not unmatched, (f"{len(unmatched)} of {len(spans)} spans are no Read of the log, "
                           f"e.g. {unmatched[:2]}")


# -- the tracepoint run ----------------------------------------------------------------------

@dataclass
class Observation:
    """One look at the agent while it starts: its BPF programs before and after the answers."""
    t: float
    progs_before: int
    readyz: int | None
    readyz_body: str
    healthz: int | None
    progs_after: set = field(default_factory=set)


@dataclass
class TracepointRun:
    agent: Agent
    receiver: GrpcReceiver
    prometheus: Prometheus | None
    startup: list[Observation]
    attached_at_ready: set          # prog ids bpftool shows attached right after the first 200
    old: str                        # go versions and their private binaries
    new: str
    binaries: dict


def watch_startup(agent: Agent, timeout_s: float = 120.0) -> list[Observation]:
    """/readyz, /healthz and the agent's programs, every 50 ms until /readyz says 200."""
    seen = []
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        agent.check_running("while starting")
        before = len(prog_ids_of(agent.pid))
        ready, body = agent.get("/readyz")
        health, _ = agent.get("/healthz")
        seen.append(Observation(time.monotonic(), before, ready, body, health,
                                prog_ids_of(agent.pid)))
        if ready == 200:
            return seen
        time.sleep(0.05)
    pytest.fail(f"/readyz never said 200 within {timeout_s:g} s:\n" + agent.stderr()[-3000:])


@pytest.fixture(scope="module")
def tp(tmp_path_factory):
    old, new = go_versions()
    tmp = tmp_path_factory.mktemp("agent-tp")
    binaries = {v: private_copy(built(v, "slowreader"), tmp, f"svc-{v}") for v in (old, new)}
    receiver = GrpcReceiver().start()
    prometheus = agent = None
    try:
        agent = Agent("--go-binary", binaries[old], "--go-binary", binaries[new],
                      "--probes", "tracepoint", "--min-age", "0.5", "--otlp-endpoint",
                      receiver.endpoint, "--otlp-span-rate", "0", env=AGENT_ENV)
        if os.access(PROMETHEUS, os.X_OK):
            prometheus = Prometheus(tmp, f"127.0.0.1:{agent.port}", JOB)
        startup = watch_startup(agent)
        attached = {p["prog_id"] for p in perf_of(agent.pid)} | {
            link["prog_id"] for link in links_of(prog_ids_of(agent.pid))}
        agent.wait_event("agent.started")
        yield TracepointRun(agent, receiver, prometheus, startup, attached, old, new, binaries)
    finally:
        if agent is not None:
            agent.close()
        if prometheus is not None:
            prometheus.stop()
        receiver.stop()


def test_readyz_says_503_until_the_probes_are_attached(tp):
    seen = [o for o in tp.startup if o.readyz is not None]
    # Given the agent's endpoint answering from before its probes are loaded
    assert seen, "the endpoint never answered"
    # Then /readyz said 503 "starting" while the agent held no BPF program at all (not even
    # after the answer), and never 200 before it had them
    starting = [o for o in seen if o.readyz == 503]
    assert all(o.readyz_body.startswith("starting") for o in starting), starting[0]
    assert any(not o.progs_after for o in starting), \
        f"no 503 seen before the programs loaded: {[(o.readyz, o.progs_before) for o in seen]}"
    first_ready = next(o for o in seen if o.readyz == 200)
    assert first_ready.progs_after
    print(f"\n/readyz: {len(starting)} x 503 over {first_ready.t - seen[0].t:.1f} s, then 200 "
          f"with {len(first_ready.progs_after)} programs attached")
    # and by its first 200 each of the agent's programs was attached (a tracepoint or a link
    # of the agent's pid in bpftool), the same programs it holds from then on
    assert first_ready.progs_after <= tp.attached_at_ready, (
        first_ready.progs_after - tp.attached_at_ready)
    assert first_ready.progs_after == set(tp.agent.programs())
    # and /healthz said 200 from its first answer on (liveness: loading is not a hang)
    assert {o.healthz for o in seen} == {200}
    assert tp.agent.get("/healthz") == (200, "ok\n")


def test_picks_up_a_service_started_after_it_and_forgets_it_when_it_exits(tp, tmp_path):
    agent = tp.agent
    exited_before = agent.sample_sum("otelwater_agent_processes_exited_total")
    # Given the agent running, and then a Go service of a binary it selects starting
    svc = Service(tp.binaries[tp.old], tmp_path / "reads.jsonl", "agent-late-start")
    try:
        # When it has run its minimum age (0.5 s)
        traced = agent.wait_event("process.traced", pid=svc.pid)
        # Then the agent took it within a few seconds of its start, naming its Go
        took_s = wall_s(traced["time"]) - svc.started_wall
        print(f"\npicked up {took_s:.2f} s after its start")
        assert took_s < 5.0, traced
        assert traced["go_version"] == tp.old and traced["exe"] == tp.binaries[tp.old]
        # and its slow reads (a client pausing 5 ms between messages) get verdicts: the
        # counter of its service name counts every one of the program's slow reads
        svc.load(3).wait(timeout=60)
        time.sleep(1.0)                                 # its log is flushed every 0.5 s
        slow = svc.slow_reads()
        assert len(slow) > 100, f"only {len(slow)} slow reads in the program's log"
        wait_for("the verdict counter to count the program's slow reads", lambda: agent.sample_sum(
            "otelwater_read_verdicts_total", service_name=svc.name) >= 0.95 * len(slow))
        assert agent.sample_sum("otelwater_read_verdicts_total", service_name=svc.name) <= \
            len(svc.reads())
        # and each reaches the receiver as a span carrying its pid and the read it is about
        spans = wait_for("its spans at the receiver", lambda: (
            s if len(s := read_spans(tp.receiver, svc.pid)) >= 0.95 * len(slow) else None))
        check_spans_match_the_log(svc, spans)
        assert {r["service.name"] for r in span_resources(tp.receiver, svc.pid)} == {svc.name}
        # When it exits
        assert svc.stop() == 0
        # Then the agent forgets it, and goes on serving
        forgotten = agent.wait_event("process.forgotten", pid=svc.pid)
        assert "exited" in forgotten["msg"]
        agent.check_running("after the service exited")
        assert agent.get("/healthz")[0] == 200 and agent.get("/readyz")[0] == 200
        assert agent.sample_sum("otelwater_agent_processes_exited_total") >= exited_before + 1
    finally:
        svc.stop()


def test_two_go_versions_traced_by_one_set_of_tracepoint_programs(tp, tmp_path):
    agent = tp.agent
    programs_before = agent.programs()
    # Given two services built by different Go versions, started together
    old = Service(tp.binaries[tp.old], tmp_path / "old.jsonl", "agent-two-old")
    new = Service(tp.binaries[tp.new], tmp_path / "new.jsonl", "agent-two-new")
    try:
        for svc, version in ((old, tp.old), (new, tp.new)):
            assert agent.wait_event("process.traced", pid=svc.pid)["go_version"] == version
        # When both read slowly at once
        loads = [old.load(3), new.load(3)]
        for lg in loads:
            lg.wait(timeout=60)
        time.sleep(1.0)
        # Then the same BPF programs serve both: none loaded for either binary or Go version,
        # and no program name twice among the agent's
        programs = agent.programs()
        assert programs == programs_before
        assert max(Counter(programs.values()).values()) == 1, programs
        # and both get verdicts, with the goroutine ids of the reads in their own logs
        for svc in (old, new):
            n = len(svc.slow_reads())
            assert n > 100, f"pid {svc.pid}: only {n} slow reads in its log"
            spans = wait_for(f"spans of pid {svc.pid}", lambda: (
                s if len(s := read_spans(tp.receiver, svc.pid)) >= 0.95 * n else None))
            check_spans_match_the_log(svc, spans)
    finally:
        old.stop()
        new.stop()


def test_restarted_service_is_traced_again_from_its_start(tp, tmp_path):
    agent = tp.agent
    # Given a service the agent traces
    first = Service(tp.binaries[tp.old], tmp_path / "first.jsonl", "agent-restart")
    try:
        agent.wait_event("process.traced", pid=first.pid)
    finally:
        # When it is killed and started again (the same binary), a client streaming to it at once
        first.kill()
    second = Service(tp.binaries[tp.old], tmp_path / "second.jsonl", "agent-restart")
    try:
        second.load(3)
        # Then the agent traces the new process within 2 s of its start
        traced = agent.wait_event("process.traced", pid=second.pid)
        took_s = wall_s(traced["time"]) - second.started_wall
        print(f"\nthe restarted process traced {took_s:.2f} s after its start")
        assert took_s <= 2.0, f"traced {took_s:.2f} s after its start"
        second.wait_loads()
        time.sleep(1.0)
        # and from its very start: its first slow read, as the program logged it, is a span
        # (tracepoints: the kernel enters a known binary's process at its exec)
        reads = second.slow_reads()
        assert reads, "no slow reads in the program's log"
        first_read = min(reads, key=lambda r: r["start_ns"])
        spans = wait_for("the span of its first slow read", lambda: (
            s if has_span(first_read, s := read_spans(tp.receiver, second.pid)) else None))
        earliest_ns = min(s["otelwater.read.start_ns"] for s in spans)
        print(f"its first recorded read began {(earliest_ns - second.started_ns) / 1e6:.0f} ms "
              "after its start")
        assert earliest_ns - second.started_ns <= 2_000 * MS, (
            f"first read recorded {(earliest_ns - second.started_ns) / 1e9:.2f} s after start")
        check_spans_match_the_log(second, spans)
    finally:
        second.stop()


def test_collector_away_and_back_without_restarting_the_agent(tp, tmp_path):
    agent, receiver = tp.agent, tp.receiver
    # Given a service under steady slow-peer load whose spans reach the receiver
    svc = Service(tp.binaries[tp.old], tmp_path / "reads.jsonl", "agent-outage")
    try:
        agent.wait_event("process.traced", pid=svc.pid)
        svc.load(120)
        wait_for("its first spans", lambda: read_spans(receiver, svc.pid), timeout_s=60)
        drops_before = export_drops(agent)
        # When the Collector goes away
        receiver.stop()
        # Then the agent keeps serving, and counts what it could not deliver
        def counted():
            agent.check_running("while the Collector was away")
            assert agent.get("/healthz")[0] == 200
            return export_drops(agent) > drops_before
        wait_for("the agent to count spans it could not export", counted, timeout_s=60,
                 every_s=0.5)
        print(f"\n{export_drops(agent) - drops_before:.0f} counted as not delivered")
        failing = [d for d in agent.logs() if d["event"].startswith("export")
                   and d["level"] == "warning"]
        assert failing and "failing" in failing[0]["msg"], agent.stderr()[-3000:]
        # When the Collector comes back on the same port
        back_ns = time.monotonic_ns()
        receiver.start()
        # Then spans come again, of reads made after it came back, without a restart
        def fresh():
            return [s for s in read_spans(receiver, svc.pid)
                    if s["otelwater.read.start_ns"] > back_ns]
        wait_for("spans of reads made after the Collector came back", fresh, timeout_s=90)
        assert agent.events("agent.started")[0]["pid"] == agent.pid
        assert len(agent.events("agent.started")) == 1 and not agent.events("agent.stopping")
        svc.stop()
        check_spans_match_the_log(svc, fresh())
    finally:
        svc.stop()
        if receiver.server is None:
            receiver.start()


def test_prometheus_scrapes_the_agent(tp, tmp_path):
    if tp.prometheus is None:
        pytest.skip(f"{PROMETHEUS} is missing (Debian's prometheus): run scripts/setup.sh "
                    "(as root) to install it")
    prom, agent = tp.prometheus, tp.agent
    # Given a service the agent traces, which read slowly
    svc = Service(tp.binaries[tp.old], tmp_path / "reads.jsonl", "agent-scraped")
    try:
        agent.wait_event("process.traced", pid=svc.pid)
        svc.load(3).wait(timeout=60)
        time.sleep(1.0)
        slow = svc.slow_reads()
        # When Prometheus has scraped the agent since (every second)
        wait_for("the agent as an up target of Prometheus", lambda: prom.target_health() == "up")
        sel = f'job="{JOB}", service_name="{svc.name}"'

        def counted():
            v = prom.value(f"sum(otelwater_read_verdicts_total{{{sel}}})")
            return v is not None and v >= 0.95 * len(slow)
        # Then Prometheus holds the service's verdicts: every slow read of the program's log
        wait_for("the service's verdicts in Prometheus", counted)
        # and the agent's own series: a map's capacity as the kernel reports it (bpftool)
        socks = [m for m in maps_of(agent.pid).values() if m.get("name") == "socks"]
        assert socks, "the agent holds no map named socks"
        capacity = sum(m["max_entries"] for m in socks)
        wait_for("the agent's own metrics in Prometheus", lambda: prom.value(
            f'otelwater_agent_bpf_map_max_entries{{job="{JOB}", bpf_map="socks"}}') == capacity)
        started = prom.value(f'otelwater_agent_processes_started_total{{job="{JOB}"}}')
        assert started is not None and started >= 1
        assert prom.value(f'otelwater_agent_processes{{job="{JOB}"}}') is not None
    finally:
        svc.stop()


def test_own_metrics_over_otlp_under_the_agent_service(tp):
    # Given the agent exporting to the receiver, when its own metrics have gone out (every 10 s)
    def points():
        return [(res, p) for res, _, p in tp.receiver.got.metric(
            "otelwater.agent.processes.started") if res.get("process.pid") == tp.agent.pid]
    got = wait_for("the agent's own metrics at the receiver", points, timeout_s=40)
    # Then they come under its own service, counting the processes it logged as traced
    assert {res["service.name"] for res, _ in got} == {"otelwater-agent"}
    assert max(p.as_int for _, p in got) <= len(tp.agent.events("process.traced"))


def test_sigterm_delivers_the_last_spans_and_detaches(tp, tmp_path):
    agent, receiver = tp.agent, tp.receiver
    # Given a service under load, its reads flowing to the receiver
    svc = Service(tp.binaries[tp.old], tmp_path / "reads.jsonl", "agent-sigterm")
    try:
        agent.wait_event("process.traced", pid=svc.pid)
        svc.load(60)
        wait_for("its first spans", lambda: read_spans(receiver, svc.pid), timeout_s=60)
        time.sleep(2.0)
        programs = set(agent.programs())
        assert programs and perf_of(agent.pid)
        drops = export_drops(agent)        # (the outage test's, when it ran before)
        # When SIGTERM comes (the client still streaming)
        signalled_ns = time.monotonic_ns()
        agent.signal(signal.SIGTERM)
        code = agent.wait(timeout_s=60)
    finally:
        svc.stop()
    # Then it exits 0, having said it stops and what it did, every line a JSON object
    assert code == 0, agent.stderr()[-3000:]
    assert agent.events("agent.stopping")
    (stopped,) = agent.events("agent.stopped")
    for key in ("processes_started", "records_seen", "records_lost", "queue_drops",
                "export_failures"):
        assert isinstance(stopped[key], int) and stopped[key] >= 0, stopped
    assert stopped["processes_started"] >= 1 and stopped["records_seen"] > 0
    assert stopped["export_failures"] + stopped["queue_drops"] >= drops
    assert not agent.not_json(), agent.not_json()[:5]
    # and the last spans were delivered: the program's slow reads of its last 3 s before the
    # signal (a span waits up to 5 s for its batch: these were still queued) are spans, the
    # last one too
    spans = read_spans(receiver, svc.pid)
    before = [r for r in svc.slow_reads() if r["end_ns"] < signalled_ns - 50 * MS]
    last = [r for r in before if r["end_ns"] >= signalled_ns - 3_000 * MS]
    assert len(last) > 100, f"only {len(last)} slow reads in the last 3 s"
    got = delivered(last, spans)
    assert len(got) >= 0.95 * len(last), f"{len(got)} of the last {len(last)} reads delivered"
    assert has_span(max(before, key=lambda r: r["end_ns"]), spans)
    # and nothing of the agent stays loaded or attached
    assert not gone_within(programs), "programs still loaded after SIGTERM"
    assert not perf_of(agent.pid) and not links_of(programs)
    assert not tracefs_events_of(agent.pid)


# -- the uprobe run --------------------------------------------------------------------------

@dataclass
class UprobeRun:
    agent: Agent
    receiver: GrpcReceiver
    old: Service
    new: Service
    not_go: subprocess.Popen
    binaries: dict
    versions: tuple


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    old_v, new_v = go_versions()
    tmp = tmp_path_factory.mktemp("agent-up")
    binaries = {v: private_copy(built(v, "slowreader"), tmp, f"svc-{v}") for v in (old_v, new_v)}
    receiver = GrpcReceiver().start()
    started = []
    agent = None
    try:
        # the targets first: --pid names running processes
        not_go = subprocess.Popen(["sleep", "600"])
        started.append(lambda: (not_go.kill(), not_go.wait()))
        old = Service(binaries[old_v], tmp / "old.jsonl", "agent-uprobe-old")
        started.append(old.stop)
        new = Service(binaries[new_v], tmp / "new.jsonl", "agent-uprobe-new")
        started.append(new.stop)
        agent = Agent("--probes", "uprobe", "--pid", str(not_go.pid), "--pid", str(old.pid),
                      "--pid", str(new.pid), "--otlp-endpoint", receiver.endpoint,
                      "--otlp-span-rate", "0", env=AGENT_ENV)
        agent.wait_ready()
        yield UprobeRun(agent, receiver, old, new, not_go, binaries, (old_v, new_v))
    finally:
        if agent is not None:
            agent.close()
        for undo in reversed(started):
            undo()
        receiver.stop()


@pytest.fixture(scope="module")
def up_loaded(up):
    """The uprobe run after both Go services read slowly for 3 s."""
    loads = [up.old.load(3), up.new.load(3)]
    for lg in loads:
        lg.wait(timeout=60)
    time.sleep(1.0)
    return up


def test_two_go_versions_traced_by_one_set_of_uprobe_programs(up_loaded):
    up, agent = up_loaded, up_loaded.agent
    # Given two services of different Go versions, traced by uprobes
    for svc, version in ((up.old, up.versions[0]), (up.new, up.versions[1])):
        assert agent.wait_event("process.traced", pid=svc.pid)["go_version"] == version
    # Then one set of programs serves both: no program name twice among the agent's, and the
    # uprobes on each binary run the same programs
    programs = agent.programs()
    assert max(Counter(programs.values()).values()) == 1, programs
    on_file = defaultdict(set)
    for p in perf_of(agent.pid):
        if p.get("fd_type") in ("uprobe", "uretprobe"):
            on_file[p["filename"]].add(p["prog_id"])
    old_progs, new_progs = (on_file[up.binaries[v]] for v in up.versions)
    assert old_progs and old_progs == new_progs, dict(on_file)
    assert old_progs <= set(programs)
    # and both get verdicts, with the goroutine ids of the reads in their own logs
    for svc in (up.old, up.new):
        n = len(svc.slow_reads())
        assert n > 100, f"pid {svc.pid}: only {n} slow reads in its log"
        spans = wait_for(f"spans of pid {svc.pid}", lambda: (
            s if len(s := read_spans(up.receiver, svc.pid)) >= 100 else None))
        check_spans_match_the_log(svc, spans)
        assert {s["otelwater.read.source"] for s in spans} == {"uprobe"}


def test_the_last_reads_before_a_quiet_spell_get_their_verdicts(up_loaded):
    up = up_loaded
    # Given services that read slowly for 3 s and then got nothing more, and an agent that
    # watches their sockets only (--pid): no later record comes to move its clock on
    # Then every slow read of their logs still becomes a span within seconds: a long-running
    # agent does not keep a service's last reads until its next traffic, maybe hours later
    for svc in (up.old, up.new):
        slow = svc.slow_reads()
        end = time.monotonic() + 20
        while True:
            got = delivered(slow, read_spans(up.receiver, svc.pid))
            if len(got) >= 0.95 * len(slow) or time.monotonic() > end:
                break
            time.sleep(0.5)
        missing = [r for r in slow if r not in got]
        last = [r for r in missing if r["end_ns"] >= slow[-1]["end_ns"] - 1_500 * MS]
        assert len(got) >= 0.95 * len(slow), (
            f"pid {svc.pid}: {len(got)} of its {len(slow)} slow reads are spans 20 s into the "
            f"quiet spell; {len(last)} of the {len(missing)} others ended in the last 1.5 s "
            "before it")


def test_a_target_that_is_not_go_fails_alone(up_loaded):
    up, agent = up_loaded, up_loaded.agent
    # Given --pid of a process that is not Go among Go services, by uprobes
    # Then it is logged as failed, with its reason, and counted by that reason
    failed = agent.wait_event("process.failed", pid=up.not_go.pid)
    assert failed["level"] == "warning" and "not a Go program" in failed["msg"], failed
    assert agent.sample_sum("otelwater_agent_processes_failed_total",
                            reason=failed["reason"]) == 1
    assert not agent.events("process.traced", pid=up.not_go.pid)
    assert agent.sample_sum("otelwater_agent_processes") == 2
    # and the Go services are served: every slow read of their logs counted under a verdict
    for svc in (up.old, up.new):
        slow = svc.slow_reads()
        wait_for(f"the verdicts of {svc.name}", lambda: agent.sample_sum(
            "otelwater_read_verdicts_total", service_name=svc.name) >= 0.95 * len(slow))
    assert agent.get("/healthz")[0] == 200 and agent.get("/readyz")[0] == 200


def test_sigkill_leaves_nothing_attached(up):
    agent = up.agent
    # Given the agent holding its programs, uprobes on both binaries among its attachments
    programs = set(agent.programs())
    attached = perf_of(agent.pid)
    assert programs and {p["filename"] for p in attached if "filename" in p} >= set(
        up.binaries.values())
    # When it is killed outright (no chance to detach anything itself)
    agent.signal(signal.SIGKILL)
    assert agent.wait(timeout_s=30) == -signal.SIGKILL
    # Then the kernel has dropped every program it loaded, and every probe and link with them
    assert not gone_within(programs), "programs still loaded after SIGKILL"
    assert not perf_of(agent.pid) and not links_of(programs)
    assert not [p for p in bpftool("perf", "list") if p.get("prog_id") in programs]
    assert not tracefs_events_of(agent.pid)
    # and the services it traced run on, untouched
    assert up.old.server.proc.poll() is None and up.new.server.proc.poll() is None


# -- configuration errors --------------------------------------------------------------------

@pytest.mark.parametrize("args, env, names", [
    pytest.param([], {"OTELWATER_AGENT_MIN_AGE_S": "-1"},
                 ["agent.min_age_s", "OTELWATER_AGENT_MIN_AGE_S"], id="env-min-age"),
    pytest.param([], {"OTELWATER_AGENT_PROBES": "kprobe"},
                 ["agent.probes", "OTELWATER_AGENT_PROBES"], id="env-probes"),
    pytest.param(["--listen", "nonsense"], {}, ["agent.listen", "--listen"], id="listen-text"),
    pytest.param(["--listen", "127.0.0.1:99999"], {}, ["--listen", "99999"], id="listen-port"),
])
def test_a_config_error_is_one_line_naming_the_key(tmp_path, args, env, names):
    # When the agent is started with a bad setting
    code, stderr, report = refused_run(tmp_path, "agent", "-d", "5", *args, env=env)
    # Then it exits 2 with one line naming the setting, where it came from, and the fix
    lines = stderr.strip().splitlines()
    assert code == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("otelwater: ") and "; " in lines[0], stderr
    for name in names:      # (a flag as the user typed it: --listen, not --agent-listen)
        assert re.search(rf"(?<![\w.-]){re.escape(name)}(?![\w-])", lines[0]), (
            f"{name!r} not named: {lines[0]}")
    # and nothing was attached: no BPF object or perf event held, the probes never loaded
    assert report == {"bpf_fds": [], "probe_modules": []}, report


def test_a_listen_port_in_use_is_refused_before_anything_attaches(tmp_path):
    # Given a port this test listens on
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # When the agent is told to listen there
        code, stderr, report = refused_run(tmp_path, "agent", "-d", "5", "--listen",
                                           f"127.0.0.1:{port}")
    # Then one line naming the option given (--listen) and the address, exit 2
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1, stderr
    assert f"127.0.0.1:{port}" in lines[0] and "--listen" in lines[0], lines[0]
    assert "--prometheus" not in lines[0], lines[0]
    # and nothing was attached
    assert report == {"bpf_fds": [], "probe_modules": []}, report
