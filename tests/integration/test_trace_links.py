"""Slow reads' spans inside the traces of the requests they served (issue 18), against a real
OTLP receiver (tests/integration/otlp_receiver.py), with `otelwater watch --go-pid PID
--otlp-endpoint URL` as a user runs it.

examples/tracedapi is a traced HTTP api: for each request it takes the W3C traceparent header
(or starts a trace), makes its own span id, and runs its handler inside
pprof.Do(ctx, pprof.Labels("trace_id", T, "span_id", S), ...). The handler calls a downstream
that answers after DELAY (30 ms), so the api's read of each answer is a slow read, waiting for
its peer. Keep-alive clients with think times drive it; one client sends traceparent headers
(the test knows the trace ids up front), another lets the api start its traces.

- **tcp** (`-downstream tcp:HOST:PORT`): a line protocol on pooled raw TCP connections, written
  and read by the handler's goroutine itself, inside pprof.Do. Each slow read on the api's
  downstream socket is the child of the request it served: the trace id of the request whose
  downstream call (in the truth) contains the read, and parent span id = that request's span
  id; its events (park, request sent, arrival, return, water) in time order, the park and the
  return among them.
- **http** (`-downstream http://HOST:PORT`): net/http's client. Its reads happen in the
  Transport's persistConn.readLoop, a goroutine started by the request that dialled the
  connection, holding that request's labels for as long as the connection lives: linking by
  them would put every later answer into a finished trace. So no span is linked to a request
  whose truth interval does not contain its read (no stale links), and the readLoop's reads are
  roots carrying otelwater.link.skipped (why) and otelwater.goroutine.start (its start
  function: g.startpc names the compiler's wrapper of `go pconn.readLoop()`, see
  readloop_start).
- **no labels** (`-labels=false`): the spans are roots, as before issue 18.

tcp and http run for Debian's Go 1.19 and the newest toolchain, plain and stripped (labels and
the goroutine's start function are read differently without DWARF); no labels for Debian's
plain and the newest stripped build. Ground truth comes from the
programs' truth files only (CLOCK_MONOTONIC ns, the clock of the spans'
otelwater.read.start_ns/end_ns): the api logs each request's trace id, its own span id, the
handler's goroutine id, the local port of its downstream connection, when the call had that
connection and when it ended. A read belongs to the call on the same connection whose interval
contains it (tcp: the whole read, made by the handler's goroutine, which the truth names too;
http: its return, the readLoop having parked since the previous answer). Span names are not
relied on: a read's span is one carrying otelwater.read.start_ns, under the api's resource.

The checks that hold today (the scenario took, the spans arrive, the truth matches the slow
reads by time and goroutine) come first in each test, so a failure of the link checks says
that the scenario itself was right. Each scenario: attaching 3-10 s, LOAD_S of load.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.goexamples import built, debian, newest

from .conftest import OTELWATER, ROOT
from .otlp_receiver import GrpcReceiver, attrs

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("bpf_ready")]

MS = 1_000_000
DELAY = "30ms"           # the downstream's answer, after each request
LOAD_S = 4               # seconds of client load
CONNS = 3                # keep-alive clients sending traceparent (and one that does not)
THINK = ("5ms", "40ms")  # their think time, uniformly random
TOL_NS = 200_000         # the programs' clock calibration against the kernel's, loosely
MIN_SHARE = 0.95         # of the spans on the downstream socket: matched by the truth
MIN_COVER = 0.90         # of the calls made while watching: a span each
FAST = {"OTEL_BSP_SCHEDULE_DELAY": "200", "OTEL_METRIC_EXPORT_INTERVAL": "1000",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "5"}
# span attributes
LOCAL_PORT, PEER_PORT = "network.local.port", "network.peer.port"
ROLE, GOID = "otelwater.socket.role", "otelwater.goroutine.id"
START_NS, END_NS = "otelwater.read.start_ns", "otelwater.read.end_ns"
STACK = "code.stacktrace"
LINK_SKIPPED, GO_START = "otelwater.link.skipped", "otelwater.goroutine.start"
# span events the feature adds (by name: these words in the event's name)
PARK, RETURN = "park", "return"

BUILDS = ["go1.19", "go1.19-stripped", "newest", "newest-stripped"]


def binary(build: str) -> str:
    """tracedapi of Debian's Go (examples/bin/tracedapi's toolchain) or of the newest one."""
    version = (Path(debian("tracedapi")).resolve().parent.name if build.startswith("go1.19")
               else newest())
    return built(version, "tracedapi-stripped" if build.endswith("-stripped") else "tracedapi")


def readloop_start(name: str) -> bool:
    """The start function of net/http's persistConn.readLoop goroutine: readLoop itself, or
    the wrapper the compiler makes of `go pconn.readLoop()` in Transport.dialConn
    (g.startpc names it: dialConn.func5 in Go 1.19, dialConn.gowrap2 in 1.27)."""
    return "readLoop" in name or "(*Transport).dialConn.func" in name \
        or "(*Transport).dialConn.gowrap" in name


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


class Server:
    """tracedapi in a server mode: address and pid from its first line, truth in a file,
    stopped with SIGTERM (it flushes its truth and exits 0)."""

    def __init__(self, exe: str, truth: Path, *args: str):
        self.truth_path = truth
        self.proc = subprocess.Popen([exe, "-truth", str(truth), *args],
                                     stdout=subprocess.PIPE, text=True)
        hello = json.loads(self.proc.stdout.readline())
        self.addr, self.pid = hello["listening"], hello["pid"]
        self.port = int(self.addr.rsplit(":", 1)[1])

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=10)

    def truth(self) -> list[dict]:
        return lines(self.truth_path)


class Watch:
    """`otelwater watch --go-pid PID --json --otlp-endpoint URL`; ready at its start line,
    stopped with SIGINT as a user stops it (it then delivers what it made)."""

    def __init__(self, pid: int, endpoint: str):
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [*OTELWATER, "watch", "--go-pid", str(pid), "--json", "-i", "0.5", "-d", "90",
             "--otlp-endpoint", endpoint],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), **FAST})
        self.err: list[str] = []
        self.out: list[str] = []
        self.ready = threading.Event()
        self.threads = [threading.Thread(target=self._read, args=(self.proc.stderr, self.err),
                                         daemon=True),
                        threading.Thread(target=self._read, args=(self.proc.stdout, self.out),
                                         daemon=True)]
        for t in self.threads:
            t.start()
        assert self.ready.wait(60) and self.proc.poll() is None, \
            "watch did not start: " + "".join(self.err)
        self.ready_ns = time.monotonic_ns()
        self.attach_s = time.monotonic() - t0

    def _read(self, stream, into: list):
        for line in stream:
            into.append(line)
            if line.startswith("Tracing"):
                self.ready.set()
        self.ready.set()   # it exited: let the constructor say so

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(timeout=60)
        for t in self.threads:
            t.join(5)
        return code

    def records(self, kind: str) -> list[dict]:
        return [d for d in map(json.loads, self.out) if d.get("type") == kind]


@dataclass(repr=False)
class Run:
    name: str
    calls: list[dict]        # the api's truth, one per request
    requests: list[dict]     # the clients' truth
    spans: list              # the api's slow-read spans (protobuf Span)
    verdicts: list[dict]     # watch --json's verdict records (for the messages)
    down_port: int
    ready_ns: int
    watch_err: str           # what watch said on stderr

    def __repr__(self) -> str:
        return f"Run({self.name}: {len(self.calls)} calls, {len(self.spans)} spans)"

    def on_downstream(self) -> list:
        """Spans of reads on the api's connections to the downstream (by the truth's ports)."""
        ports = {c["local_port"] for c in self.calls}
        return [s for s in self.spans if attrs(s.attributes).get(LOCAL_PORT) in ports]


def run(tmp_path: Path, build: str, downstream: str, *api_args: str) -> Run:
    """downstream (DELAY an answer) <- api <- clients, the api watched with OTLP export for the
    clients' LOAD_S: its truth, the clients', and the spans the receiver got for it."""
    exe = binary(build)
    receiver = GrpcReceiver().start()
    down = api = watch = None
    clients: list[subprocess.Popen] = []
    try:
        down = Server(exe, tmp_path / "down.jsonl", "-mode", f"{downstream}-downstream",
                      "-delay", DELAY)
        target = f"tcp:{down.addr}" if downstream == "tcp" else f"http://{down.addr}/"
        api = Server(exe, tmp_path / "api.jsonl", "-mode", "api", "-downstream", target,
                     *api_args)
        watch = Watch(api.pid, receiver.endpoint)
        # clients: CONNS sending traceparent, one letting the api start its traces
        for n, tp in ((CONNS, "true"), (1, "false")):
            clients.append(subprocess.Popen(
                [exe, "-mode", "client", "-target", f"http://{api.addr}/", "-conns", str(n),
                 "-think-min", THINK[0], "-think-max", THINK[1], "-duration", f"{LOAD_S}s",
                 "-seed", str(n), f"-traceparent={tp}",
                 "-truth", str(tmp_path / f"client{n}.jsonl")],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        for c in clients:
            out, err = c.communicate(timeout=LOAD_S + 60)
            assert c.returncode == 0, out + err
        time.sleep(0.5)                     # the last reads reach the watch
        code = watch.stop()
        assert code == 0, "".join(watch.err)
        # watch delivered its spans before it exited; a moment for the receiver's threads
        n = -1
        while n != len(receiver.got.spans()):
            n = len(receiver.got.spans())
            time.sleep(0.3)
    finally:
        for p in clients + ([watch.proc] if watch is not None else []):
            if p.poll() is None:
                p.kill()
                p.wait(10)
        for s in (api, down):
            if s is not None:
                assert s.stop() == 0
        receiver.stop()
    calls = api.truth()
    requests = lines(tmp_path / f"client{CONNS}.jsonl") + lines(tmp_path / "client1.jsonl")
    assert calls and all(c["err"] is None for c in calls), [c for c in calls if c["err"]][:3]
    assert requests and all(r["err"] is None for r in requests)
    # the truth agrees with itself: a client's trace is the api's, and the api names its span
    by_trace = {c["trace_id"]: c for c in calls}
    for r in requests:
        c = by_trace[r["api_trace_id"]]
        assert c["span_id"] == r["api_span_id"]
        if r["trace_id"]:
            assert r["trace_id"] == c["trace_id"] and r["span_id"] == c["parent_span_id"]
        else:
            assert c["parent_span_id"] == ""
    everything = receiver.got.spans()
    # (a read's span, whatever its name: it carries the read's CLOCK_MONOTONIC times)
    spans = [s for res, s in everything
             if res.get("process.pid") == api.pid and START_NS in attrs(s.attributes)]
    print(f"\n{build} {downstream} {' '.join(api_args)}: watch attached in {watch.attach_s:.1f} s; "
          f"{len(calls)} requests ({sum(1 for r in requests if not r['trace_id'])} traces "
          f"started by the api); {len(spans)} read spans received for the api "
          f"(of {len(everything)}; names such as {sorted({s.name for _, s in everything})[:3]})")
    return Run(f"{build}/{downstream}", calls, requests, spans, watch.records("verdict"),
               down.port, watch.ready_ns, "".join(watch.err))


# -- matching spans with the truth -----------------------------------------------------------
def read_of(span) -> tuple[int, int, int, int | None]:
    """(local port, CLOCK_MONOTONIC start, end, goroutine id) of a span's read."""
    a = attrs(span.attributes)
    return a[LOCAL_PORT], a[START_NS], a[END_NS], a.get(GOID)


def call_of(run: Run, span, whole: bool) -> dict | None:
    """The api's call on the span's connection whose downstream interval (from when it had
    the connection to its end) contains the read (`whole`: all of it; else its return, which
    comes DELAY after: no tolerance there, as net/http's pool hands the connection to the next
    call right after the read, while the call that read it is still finishing), if exactly
    one does."""
    port, start, end, _ = read_of(span)
    found = [c for c in run.calls if c["local_port"] == port and end <= c["end_ns"] + TOL_NS
             and (c["conn_ns"] - TOL_NS <= start if whole else c["conn_ns"] <= end)]
    return found[0] if len(found) == 1 else None


def matched(run: Run, whole: bool) -> list[tuple[object, dict]]:
    """(span, call) for the spans on the downstream socket, checking that the scenario took:
    enough spans, nearly all matched by the truth, and nearly every call watched has one."""
    spans = run.on_downstream()
    pairs = [(s, call_of(run, s, whole)) for s in spans]
    good = [(s, c) for s, c in pairs if c is not None]
    print(f"{run.name}: {len(spans)} spans on the api's downstream connections, {len(good)} "
          "matched by the truth (the call on that connection containing the read)")
    for s, c in pairs:
        if c is None:
            port, start, end, goid = read_of(s)
            near = sorted((c for c in run.calls if c["local_port"] == port),
                          key=lambda c: abs(c["end_ns"] - end))[:2]
            print(f"  unmatched: read [{start}, {end}] goid {goid} on port {port}; nearest calls "
                  f"{[(c['start_ns'] - start, c['end_ns'] - end) for c in near]} (ns from it); "
                  f"{attrs(s.attributes).get('otelwater.verdict')}")
    assert len(spans) >= 20, (f"{run.name}: only {len(spans)} spans on the downstream socket; "
                              f"{kernel_view(run)}; watch said: {run.watch_err[-1500:]}")
    assert len(good) >= MIN_SHARE * len(spans), \
        f"{run.name}: unmatched: {[read_of(s) for s, c in pairs if c is None][:5]}"
    watched = [c for c in run.calls if c["start_ns"] > run.ready_ns + 200 * MS]
    seen = {id(c) for _, c in good}
    covered = sum(1 for c in watched if id(c) in seen)
    assert covered >= MIN_COVER * len(watched), \
        f"{run.name}: only {covered} of {len(watched)} calls made while watching have a span"
    for s, _ in good:                       # waited for the downstream: peer-starved
        assert attrs(s.attributes)[ROLE] == "dialed"
        assert attrs(s.attributes).get(PEER_PORT) == run.down_port
    return good


def ids(span) -> tuple[str, str]:
    return span.trace_id.hex(), span.parent_span_id.hex()


def kernel_view(run: Run) -> str:
    """What the watch's JSON says the kernel read (for the messages): labels seen, notes."""
    vs = [v for v in run.verdicts if v.get("role") == "dialed"]
    with_ids = sum(1 for v in vs if v.get("trace_id"))
    notes = sorted({v.get("link_note", "") for v in vs} - {""})
    starts = sorted({v.get("go_start", "") for v in vs} - {""})
    return (f"watch --json: {len(vs)} dialed verdicts, {with_ids} with a trace_id from labels, "
            f"link notes {notes[:3]}, goroutine starts {starts[:3]}")


class Checks:
    """The feature's checks of one run: each printed with its figures, all asserted at the end
    (so one failing check does not hide what the others found)."""

    def __init__(self, run: Run):
        self.run, self.failed = run, []
        print(f"{run.name}: {kernel_view(run)}")

    def check(self, what: str, bad: list[str], total: int) -> None:
        print(f"{self.run.name}: {what}: {total - len(bad)} of {total} right")
        for b in bad[:3]:
            print(f"  {b}")
        if bad:
            self.failed.append(f"{what}: {len(bad)} of {total} wrong, e.g. {bad[:2]}")

    def done(self) -> None:
        if self.failed:
            pytest.fail(f"{self.run.name}: " + "; ".join(self.failed), pytrace=False)


# -- the scenarios ---------------------------------------------------------------------------
@pytest.mark.parametrize("build", BUILDS)
def test_handler_reads_are_children_of_their_request(tmp_path, build):
    # Given a labelled api whose handler reads its pooled TCP downstream (30 ms) itself
    r = run(tmp_path, build, "tcp")
    # Then each slow read on the downstream socket lies in one call of the truth, read by that
    # request's handler goroutine
    pairs = matched(r, whole=True)
    goids = [(read_of(s)[3], c["goid"]) for s, c in pairs if read_of(s)[3] != c["goid"]]
    assert not goids, f"{r.name}: reads not made by the handler's goroutine: {goids[:5]}"
    # and its span is a child of that request's span: same trace, parent = the api's span id
    # (traces the client started and traces the api started alike)
    bad = [f"span {ids(s)} for call {(c['trace_id'], c['span_id'])} "
           f"(started by {'the client' if c['parent_span_id'] else 'the api'})"
           + (f", {LINK_SKIPPED} {attrs(s.attributes)[LINK_SKIPPED]!r}"
              if attrs(s.attributes).get(LINK_SKIPPED) else "")
           for s, c in pairs if ids(s) != (c["trace_id"], c["span_id"])
           or attrs(s.attributes).get(LINK_SKIPPED)]
    checks = Checks(r)
    checks.check("spans linked to the request whose call contains the read", bad, len(pairs))
    # and its events are in time order, the park and the return among them, within the read
    bad = []
    for s, _ in pairs:
        evs = [(e.time_unix_nano, e.name) for e in s.events]
        park = [t for t, n in evs if PARK in n]
        ret = [t for t, n in evs if RETURN in n]
        if [t for t, _ in evs] != sorted(t for t, _ in evs):
            bad.append(f"events out of order: {evs}")
        elif not park or not ret:
            bad.append(f"no park or no return event: {[n for _, n in evs]}")
        elif not (s.start_time_unix_nano <= park[0] <= ret[-1] <= s.end_time_unix_nano):
            bad.append(f"park {park[0]} / return {ret[-1]} outside the span "
                       f"[{s.start_time_unix_nano}, {s.end_time_unix_nano}]")
    checks.check("spans with ordered events including the park and the return", bad, len(pairs))
    checks.done()


@pytest.mark.parametrize("build", BUILDS)
def test_transport_reads_are_never_linked_to_another_request(tmp_path, build):
    # Given the same api calling an HTTP downstream through net/http's client: the reads are
    # made by the Transport's readLoop, which holds the labels of the request that dialled
    r = run(tmp_path, build, "http")
    pairs = matched(r, whole=False)
    loops = [s for s, _ in pairs if "readLoop" in attrs(s.attributes).get(STACK, "")]
    assert len(loops) >= MIN_SHARE * len(pairs), \
        f"{r.name}: only {len(loops)} of {len(pairs)} downstream reads are in readLoop"
    # Then no span is linked to a request whose interval does not contain its read
    by_span = {(c["trace_id"], c["span_id"]): c for c in r.calls}
    bad = []
    for s in r.spans:
        if not s.parent_span_id:
            continue
        _, start, end, _ = read_of(s)
        c = by_span.get(ids(s))
        if c is None:
            bad.append(f"linked to {ids(s)}: no such request in the truth")
        elif not (c["req_start_ns"] - TOL_NS <= start and end <= c["req_end_ns"] + TOL_NS):
            bad.append(f"read [{start}, {end}] linked to the request of "
                       f"[{c['req_start_ns']}, {c['req_end_ns']}] (stale)")
    checks = Checks(r)
    checks.check("spans not linked to a request that does not contain them", bad, len(r.spans))
    # and the readLoop's reads are roots saying why they are not linked, and whose goroutine
    bad = []
    for s in loops:
        a = attrs(s.attributes)
        if s.parent_span_id:
            bad.append(f"linked: {ids(s)}")
        elif not a.get(LINK_SKIPPED):
            bad.append(f"no {LINK_SKIPPED} (goroutine start {a.get(GO_START)!r})")
        elif not readloop_start(a.get(GO_START, "")):
            bad.append(f"{GO_START} = {a.get(GO_START)!r}, not the readLoop")
    checks.check(f"readLoop reads as roots with {LINK_SKIPPED} and {GO_START}", bad, len(loops))
    checks.done()


@pytest.mark.parametrize("build", ["go1.19", "newest-stripped"])
def test_without_labels_spans_are_roots(tmp_path, build):
    # Given the api with its labels off (-labels=false), its handler reading the TCP downstream
    r = run(tmp_path, build, "tcp", "-labels=false")
    pairs = matched(r, whole=True)
    # Then every span is a root of a trace of its own, as before issue 18: no request's trace,
    # and nothing said about a link (there was nothing to link by)
    traces = {c["trace_id"] for c in r.calls}
    bad = [f"span {ids(s)} {attrs(s.attributes).get(LINK_SKIPPED)!r}" for s in r.spans
           if s.parent_span_id or s.trace_id.hex() in traces
           or attrs(s.attributes).get(LINK_SKIPPED)]
    checks = Checks(r)
    checks.check("spans that are roots, unlinked", bad, len(r.spans))
    checks.done()
