"""The agent's operating pieces, without root: its HTTP endpoint (/metrics, /healthz, /readyz,
404) over real HTTP on port 0, its structured logs (JSON lines that parse, text lines, a closed
stream, library logs rate-limited on a stepped clock), its self-metrics scraped for real and
exported over OTLP to a real receiver, and the bookkeeping of its BPF facts (bpfinfo itself on
real BPF: tests/integration/test_agent_bpfinfo.py)."""

from __future__ import annotations

import ctypes
import io
import json
import logging
import os
import re
import threading
import time
import urllib.error
import urllib.request
import warnings

import psutil
import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families as parse_text

from otelwater.agent import selfmetrics
from otelwater.agent.health import health_routes, liveness, readiness
from otelwater.agent.logs import (AgentLog, LibraryLogHandler, RepeatLimit,
                                  capture_library_logs, rfc3339_ms)
from otelwater.agent.selfmetrics import BpfFacts, SelfMetrics
from otelwater.agent.state import AgentState
from otelwater.errors import UsageError
from otelwater.events.model import Notice
from otelwater.export.otlp import resolve_options
from otelwater.export.prometheus import PrometheusEndpoint
from otelwater.probes import bpfinfo
from tests.integration.otlp_receiver import HttpReceiver, free_port

T0 = 1738324800.0               # 2025-01-31T12:00:00Z


def get(url: str, method: str = "GET") -> tuple[int, str]:
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def samples(endpoint: PrometheusEndpoint) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels but the scope's and service's): value} of one scrape."""
    service = ("service_name", "service_instance_id")
    status, body = get(endpoint.url)
    assert status == 200
    out = {}
    for family in parse_text(body):
        for s in family.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items()
                                  if not k.startswith("otel_scope_") and k not in service))
            out[(s.name, labels)] = s.value
    return out


# -- the endpoint ------------------------------------------------------------------------------

def test_endpoint_serves_metrics_health_and_readiness_and_404_elsewhere():
    # Given an agent's state and its endpoint on a free port, a provider's metrics on it
    state = AgentState()
    with PrometheusEndpoint(0, routes=health_routes(state, stale_s=10.0)) as endpoint:
        assert endpoint.port > 0 and endpoint.url == f"{endpoint.base_url}/metrics"
        from opentelemetry.sdk.metrics import MeterProvider

        provider = MeterProvider(metric_readers=[endpoint.reader()])
        provider.get_meter("m").create_counter("c").add(3)

        # When nothing has gone round yet: alive, not ready
        assert get(endpoint.base_url + "/healthz") == (200, "ok\n")
        status, body = get(endpoint.base_url + "/readyz")
        assert status == 503 and body.startswith("starting: ")
        # When the loop went round and the probes are attached
        state.last_loop_ns, state.ready = time.monotonic_ns(), True
        assert get(endpoint.base_url + "/healthz") == (200, "ok\n")
        assert get(endpoint.base_url + "/readyz") == (200, "ready\n")
        # When the loop has not gone round for longer than stale_s
        state.last_loop_ns = time.monotonic_ns() - 42 * 10**9
        status, body = get(endpoint.base_url + "/healthz")
        assert status == 503 and re.fullmatch(
            r"stale: the loop last went round 4\d\.\d s ago, more than 10 s\n", body), body
        # and again when it does
        state.last_loop_ns = time.monotonic_ns()
        assert get(endpoint.base_url + "/healthz")[0] == 200
        # When SIGTERM came: not ready, still alive (a restart must not cut the flush short)
        state.stopping = True
        assert get(endpoint.base_url + "/readyz") == (503, "stopping\n")
        assert get(endpoint.base_url + "/healthz")[0] == 200

        # Then /metrics is served as before, and nothing else is
        assert samples(endpoint)[("c_total", ())] == 3
        status, body = get(endpoint.base_url + "/")
        assert status == 404 and "/metrics, /healthz, /readyz" in body
        assert get(endpoint.base_url + "/metrics/x")[0] == 404
        assert get(endpoint.base_url + "/healthz", "POST")[0] == 405
        assert get(endpoint.base_url + "/healthz", "HEAD") == (200, "")
        provider.shutdown()


def test_endpoint_routes_added_later_a_failing_route_and_an_extra_collector():
    class Collector:
        def collect(self):
            g = GaugeMetricFamily("extra_thing", "an extra family")
            g.add_metric([], 7)
            yield g

    with PrometheusEndpoint(0) as endpoint:
        assert get(endpoint.base_url + "/healthz")[0] == 404
        endpoint.route("/healthz", lambda: (200, "fine"))
        endpoint.route("/boom", lambda: 1 / 0)
        endpoint.register(Collector())
        assert get(endpoint.base_url + "/healthz") == (200, "fine\n")
        status, body = get(endpoint.base_url + "/boom")
        assert (status, body) == (500, "/boom failed: ZeroDivisionError: division by zero\n")
        assert samples(endpoint)[("extra_thing", ())] == 7
        with pytest.raises(ValueError):
            endpoint.route("/metrics", lambda: (200, ""))


def test_a_scrape_that_fails_is_a_500_and_a_log_record_not_stderr(caplog, capfd):
    class Broken:
        def collect(self):
            raise RuntimeError("a collector bug")

    with PrometheusEndpoint(0) as endpoint:
        endpoint.register(Broken())
        with caplog.at_level(logging.WARNING, logger="otelwater.export.prometheus"):
            assert get(endpoint.url)[0] == 500
    (record,) = [r for r in caplog.records if r.name == "otelwater.export.prometheus"]
    assert "RuntimeError: a collector bug" in record.getMessage()
    assert "a collector bug" not in capfd.readouterr().err


def test_a_taken_port_is_still_one_usage_error():
    with PrometheusEndpoint(0) as endpoint:
        with pytest.raises(UsageError, match="already in use"):
            PrometheusEndpoint(endpoint.port, routes=health_routes(AgentState()))


def test_health_answers_read_the_state_at_each_call():
    state = AgentState()
    assert liveness(state) == (200, "ok")      # not started: not a hang
    state.last_loop_ns = time.monotonic_ns() - 11 * 10**9
    assert liveness(state, stale_s=10)[0] == 503
    assert liveness(state, stale_s=60) == (200, "ok")
    assert readiness(state)[1].startswith("starting")
    state.ready = True
    assert readiness(state) == (200, "ready")


# -- logs --------------------------------------------------------------------------------------

def test_json_lines_parse_and_carry_their_fields():
    out = io.StringIO()
    log = AgentLog("json", out, "info", now=lambda: T0 + 0.1234)
    log.info("process.traced", "tracing a Go process", pid=1234, exe="/srv/my api",
             ratio=0.5, ok=True, none=None, ports=[80, 443])
    log.debug("hidden", "below the level")
    log.warning("odd", "fields JSON cannot hold", obj=object(), nan=float("nan"),
                keys={(1, 2): 3}, tags={"a"}, msg="not the message", level=9)
    log.error("notice.x", "a\nb")
    log.notice(Notice(5_000, "reads", "pid 4242 exited"))

    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(lines) == 4 and out.getvalue().endswith("\n")
    first = lines[0]
    assert list(first)[:4] == ["time", "level", "event", "msg"]
    assert first == {"time": "2025-01-31T12:00:00.123Z", "level": "info",
                     "event": "process.traced", "msg": "tracing a Go process", "pid": 1234,
                     "exe": "/srv/my api", "ratio": 0.5, "ok": True, "none": None,
                     "ports": [80, 443]}
    odd = lines[1]
    assert odd["msg"] == "fields JSON cannot hold" and odd["level"] == "warning"
    assert odd["obj"].startswith("<object object at") and odd["nan"] == "nan"
    assert odd["keys"] == "{(1, 2): 3}" and odd["tags"] == "{'a'}"
    assert odd["msg_"] == "not the message" and odd["level_"] == 9
    assert lines[2]["msg"] == "a\nb"
    assert lines[3] == {"time": "2025-01-31T12:00:00.123Z", "level": "info",
                        "event": "notice.reads", "msg": "pid 4242 exited", "ts_ns": 5000}


def test_text_lines():
    out = io.StringIO()
    log = AgentLog("text", out, "debug", now=lambda: T0)
    log.debug("process.traced", "tracing", pid=1, exe="/srv/my api", q='a"b', n=None,
              ports=[1, 2])
    log.info("two", "lines\nin one")
    assert out.getvalue().splitlines() == [
        '2025-01-31T12:00:00.000Z debug process.traced: tracing pid=1 exe="/srv/my api" '
        'q="a\\"b" n=null ports=[1,2]',
        "2025-01-31T12:00:00.000Z info two: lines\\nin one"]


def test_rfc3339_with_milliseconds_in_utc():
    assert rfc3339_ms(0) == "1970-01-01T00:00:00.000Z"
    assert rfc3339_ms(T0 + 59.9999) == "2025-01-31T12:00:59.999Z"


def test_bad_format_or_level_is_refused():
    with pytest.raises(ValueError, match="json or text"):
        AgentLog("xml")
    with pytest.raises(ValueError, match="debug, info, warning, error"):
        AgentLog("json", level="loud")


def test_a_closed_stream_never_stops_the_agent():
    class Gone(io.StringIO):
        def write(self, s):
            raise BrokenPipeError(32, "Broken pipe")

    log = AgentLog("json", Gone())
    log.info("a", "b")
    log.error("c", "d")
    assert log.broken and log.dropped == 2
    closed = io.StringIO()
    closed.close()
    log = AgentLog("text", closed)
    log.info("a", "b")
    assert log.dropped == 1
    r, w = os.pipe()
    os.close(r)
    with os.fdopen(w, "w") as pipe:
        log = AgentLog("json", pipe)
        log.info("a", "b")                  # the reader went away: EPIPE, no exception
        assert log.broken
        try:
            pipe.close()
        except BrokenPipeError:
            pass


def test_lines_of_many_threads_do_not_interleave():
    out = io.StringIO()
    log = AgentLog("json", out)

    def many(i):
        for j in range(200):
            log.info("t", "x" * 50, thread=i, j=j)

    threads = [threading.Thread(target=many, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(lines) == 800


def test_log_stream_turns_printed_lines_into_log_lines():
    out = io.StringIO()
    log = AgentLog("json", out, now=lambda: T0)
    stream = log.stream_for("export.otlp")
    print("otelwater: OTLP export to http://c:4317 failing: connection refused; still retrying",
          file=stream, flush=True)
    stream.write("half a ")
    stream.write("line\n")
    stream.write("the rest")
    stream.flush()                          # not the end of a line
    assert len(out.getvalue().splitlines()) == 2
    stream.close()
    got = [(d["level"], d["event"], d["msg"]) for d in map(json.loads, out.getvalue().splitlines())]
    assert got == [("warning", "export.otlp",
                    "OTLP export to http://c:4317 failing: connection refused; still retrying"),
                   ("warning", "export.otlp", "half a line"),
                   ("warning", "export.otlp", "the rest")]


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_repeat_limit_says_once_then_a_count_a_minute_at_most():
    clock = Clock()
    limit = RepeatLimit(every_s=60, now=clock)
    said = []
    # a retry every 3.6 s for an hour (1,000 of them)
    for i in range(1000):
        got = limit.admit("k", i)
        if got is not None:
            said.append((i, got))
        clock.t += 3.6
    assert said[0] == (0, 0)
    assert 55 <= len(said) <= 61
    # every message is said or counted in the next line's count, once
    trailing = limit.due(final=True)
    assert len(said) + sum(n for _, n in said) + len(trailing) + sum(n for _, n in trailing) \
        == 1000
    # a line at most every 60 s
    times = [i * 3.6 for i, _ in said]
    assert min(b - a for a, b in zip(times, times[1:])) >= 60
    # other messages are limited apart
    assert limit.admit("other", 0) == 0


def test_library_logs_come_out_as_json_lines_rate_limited():
    # Given the agent's log capturing Python logging, on a stepped clock
    out = io.StringIO()
    log = AgentLog("json", out, now=lambda: T0)
    clock = Clock()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, logging.getLogger("opentelemetry").level)
    handler = capture_library_logs(log, now=clock)
    try:
        exporter = logging.getLogger("opentelemetry.exporter.otlp.proto.grpc.exporter")
        logging.getLogger("opentelemetry").setLevel(logging.CRITICAL)   # as quiet_sdk_logs
        handler = capture_library_logs(log, now=clock)                  # again: one handler
        assert [h for h in root.handlers if isinstance(h, LibraryLogHandler)] == [handler]
        # When the exporter retries every 5 s for 10 minutes (a Collector down)
        for i in range(120):
            exporter.warning("Transient error %s encountered while exporting %s to %s, "
                             "retrying in %.2fs.", "StatusCode.UNAVAILABLE", "metrics",
                             "localhost:4317", 1.0 + i % 7)
            clock.t += 5
        logging.getLogger("grpc").error("something else")
        logging.getLogger("some.lib").info("below the level")
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("a library warning", DeprecationWarning)
        clock.t += 60
        handler.flush()                      # the count of the last repeats
        handler.flush()                      # said once
    finally:
        root.removeHandler(handler)
        root.handlers[:], root.level = saved[0], saved[1]
        logging.getLogger("opentelemetry").setLevel(saved[2])
        logging.captureWarnings(False)
        threading.excepthook = threading.__excepthook__

    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    retries = [d for d in lines if d["event"] == "library.opentelemetry"]
    # Then the first retry is said, then one line a minute with the count of those not said
    assert retries[0]["msg"] == ("Transient error StatusCode.UNAVAILABLE encountered while "
                                 "exporting metrics to localhost:4317, retrying in 1.00s.")
    assert retries[0]["level"] == "warning" and "suppressed" not in retries[0]
    assert retries[0]["logger"] == "opentelemetry.exporter.otlp.proto.grpc.exporter"
    assert 10 <= len(retries) <= 12
    assert all(d["suppressed"] == 11 for d in retries[1:-1])
    assert len(retries) + sum(d.get("suppressed", 0) for d in retries) == 120
    assert [d["msg"] for d in lines if d["event"] == "library.grpc"] == ["something else"]
    assert not [d for d in lines if d["event"] == "library.some"]
    (warned,) = [d for d in lines if d["event"] == "library.py"]
    assert "a library warning" in warned["msg"]


def test_a_thread_that_dies_is_a_log_line_with_its_stack():
    out = io.StringIO()
    log = AgentLog("json", out)
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, threading.excepthook)
    try:
        capture_library_logs(log)

        def boom():
            raise RuntimeError("a bug in a thread")

        for _ in range(3):                   # the same failure again: said once (a minute)
            t = threading.Thread(target=boom, name="otelwater-x")
            t.start()
            t.join()
    finally:
        root.handlers[:], root.level, threading.excepthook = saved
        logging.captureWarnings(False)
    (line,) = [json.loads(x) for x in out.getvalue().splitlines()]
    assert line["level"] == "error" and line["event"] == "library.otelwater"
    assert line["msg"] == "thread otelwater-x stopped: RuntimeError: a bug in a thread"
    assert line["error"] == "RuntimeError: a bug in a thread"
    assert "in boom" in line["stack"]


def test_library_handler_never_raises():
    class Broken(AgentLog):
        def log(self, *a, **kw):
            raise RuntimeError("no")

    h = LibraryLogHandler(Broken("json", io.StringIO()))
    h.emit(logging.LogRecord("x", logging.ERROR, __file__, 1, "m %s %s", ("one",), None))


# -- self-metrics ------------------------------------------------------------------------------

def test_self_metrics_scraped_match_the_state_and_the_process():
    # Given an agent's state, its endpoint, and its self-metrics on it
    state = AgentState(processes_traced=3, processes_started=5, processes_exited=2,
                       records_seen=1234, records_lost=7, queue_drops=11, export_failures=1,
                       sockets_watched=42)
    state.fail("unreadable binary")
    state.fail("unreadable binary")
    state.fail("not a Go binary")
    with PrometheusEndpoint(0, routes=health_routes(state)) as endpoint:
        metrics = SelfMetrics(state, endpoint=endpoint, host="testhost")
        try:
            # When Prometheus scrapes
            got = samples(endpoint)
            rss = psutil.Process().memory_info().rss
            cpu = psutil.Process().cpu_times()
            # Then the agent's families carry the state's values
            assert {k: v for k, v in got.items() if k[0].startswith("otelwater_agent_")} == {
                ("otelwater_agent_processes", ()): 3,
                ("otelwater_agent_processes_started_total", ()): 5,
                ("otelwater_agent_processes_exited_total", ()): 2,
                ("otelwater_agent_processes_failed_total",
                 (("reason", "unreadable binary"),)): 2,
                ("otelwater_agent_processes_failed_total", (("reason", "not a Go binary"),)): 1,
                ("otelwater_agent_records_total", ()): 1234,
                ("otelwater_agent_records_lost_total", ()): 7,
                ("otelwater_agent_export_dropped_total", ()): 11,
                ("otelwater_agent_export_failures_total", ()): 1,
                ("otelwater_agent_sockets", ()): 42,
            }
            # and the process's, by the semantic conventions
            user = got[("process_cpu_time_seconds_total", (("cpu_mode", "user"),))]
            system = got[("process_cpu_time_seconds_total", (("cpu_mode", "system"),))]
            assert 0 < user <= cpu.user and 0 <= system <= cpu.system
            assert 0.5 * rss < got[("process_memory_usage_bytes", ())] < 2 * rss
            # and target_info the agent's resource
            (info,) = [dict(k[1]) for k in got if k[0] == "target_info"]
            assert info["host_name"] == "testhost" and info["process_pid"] == str(os.getpid())
            assert info["service_version"] == "0.1.0"
            status, body = get(endpoint.url)
            assert 'service_name="otelwater-agent"' in body

            # When the loop moves the state on, the next scrape says so
            state.records_seen, state.processes_traced = 2000, 1
            state.fail("not a Go binary")
            got = samples(endpoint)
            assert got[("otelwater_agent_records_total", ())] == 2000
            assert got[("otelwater_agent_processes", ())] == 1
            assert got[("otelwater_agent_processes_failed_total",
                         (("reason", "not a Go binary"),))] == 2
        finally:
            metrics.close(timeout_s=5)
        # Then once closed its families leave the scrape
        assert not [k for k in samples(endpoint) if k[0].startswith("otelwater_agent_")]


def test_self_metrics_names_units_and_kinds():
    reader = InMemoryMetricReader()
    with SelfMetrics(AgentState(), readers=[reader]) as metrics:
        data = reader.get_metrics_data()
        (rm,) = data.resource_metrics
        assert rm.resource.attributes["service.name"] == "otelwater-agent"
        assert rm.resource.attributes["process.pid"] == os.getpid()
        (sm,) = rm.scope_metrics
        assert sm.scope.name == "otelwater.agent"
        got = {m.name: m.unit for m in sm.metrics}
        # (no BPF objects: their instruments have no points; no failure yet: no reason)
        want = {i.name: i.unit for i in selfmetrics.INSTRUMENTS
                if not i.name.startswith("otelwater.agent.bpf.")
                and i is not selfmetrics.PROCESSES_FAILED}
        assert got == want
    assert metrics._closed                  # closed on leaving the block


@pytest.mark.parametrize("protocol", ["http/protobuf"])
def test_self_metrics_over_otlp_and_close_within_its_deadline(protocol, monkeypatch):
    for var in [v for v in os.environ if v.startswith("OTEL_")]:
        monkeypatch.delenv(var)
    receiver = HttpReceiver().start()
    try:
        # Given self-metrics exporting to a Collector
        opts = resolve_options(receiver.endpoint, protocol)
        state = AgentState(records_seen=99)
        metrics = SelfMetrics(state, otlp=opts, interval_s=60)
        # When the agent stops: the last collection goes out on close
        metrics.close(timeout_s=10)
        points = receiver.got.metric("otelwater.agent.records")
        assert points and points[-1][2].as_int == 99
        res = points[-1][0]
        assert res["service.name"] == "otelwater-agent" and res["service.version"] == "0.1.0"
        assert receiver.got.metric("process.cpu.time")
    finally:
        receiver.stop()
    # Given a Collector that is not there, close still ends by its deadline (not a timing
    # assertion: the bound is 5x the deadline)
    opts = resolve_options(f"http://127.0.0.1:{free_port()}", protocol)
    metrics = SelfMetrics(AgentState(), otlp=opts, interval_s=60)
    t0 = time.monotonic()
    metrics.close(timeout_s=1)
    assert time.monotonic() - t0 < 5


# -- BPF facts (bookkeeping; the real syscalls: tests/integration/test_agent_bpfinfo.py) ------

class FakeBpf:
    """bpfinfo's view of a BCC object, for the bookkeeping."""

    def __init__(self, progs, maps):
        self.progs, self.maps = progs, maps     # name -> ProgInfo / (MapInfo, entries)


def fake_bpfinfo(monkeypatch, stats=False):
    counted = []
    fds = {}

    def fd_of(obj):
        fds[id(obj)] = obj
        return id(obj)

    monkeypatch.setattr(bpfinfo, "stats_enabled", lambda: stats)
    monkeypatch.setattr(bpfinfo, "programs_of",
                        lambda b: {n: fd_of(p) for n, p in b.progs.items()})
    monkeypatch.setattr(bpfinfo, "maps_of", lambda b: {n: fd_of(m) for n, m in b.maps.items()})
    monkeypatch.setattr(bpfinfo, "prog_info", lambda fd: fds[fd])
    monkeypatch.setattr(bpfinfo, "map_info", lambda fd: fds[fd][0])

    def entries(fd, info):
        counted.append(info.name)
        return fds[fd][1] if info.counted else None

    monkeypatch.setattr(bpfinfo, "map_entries", entries)
    return counted


def prog(name, t=0, n=0):
    return bpfinfo.ProgInfo(1, 5, name[:15], t, n, 0)


def bmap(name, kind, cap, id_=1):
    return bpfinfo.MapInfo(id_, bpfinfo.MAP_TYPES.index(kind), name[:15], 8, 8, cap, 0)


def test_bpf_facts_cache_and_bound_the_map_walks(monkeypatch):
    counted = fake_bpfinfo(monkeypatch, stats=False)
    clock = Clock()
    socks = [bmap("socks", "lru_hash", 65536, 1), 100]
    a = FakeBpf({"raw_tracepoint__sock_recv_length": prog("r", 5_000, 10),
                 "never_counted": prog("n")},
                {"socks": socks, "cfg": (bmap("cfg", "array", 1, 2), None),
                 "events": (bmap("events", "ringbuf", 1 << 20, 3), None)})
    b = FakeBpf({"raw_tracepoint__sock_recv_length": prog("r", 1_000, 2)}, {})

    class Closed:
        pass

    facts = BpfFacts(lambda: [a, b, Closed()], entries_every_s=10, now=clock)
    f = facts.read()
    # programs the kernel never counted are left out (statistics off); same names summed
    assert f.programs == {"raw_tracepoint__sock_recv_length": (6_000, 12)}
    assert f.maps == {"socks": (100, 65536), "cfg": (None, 1), "events": (None, 1 << 20)}
    assert facts.errors == 1                 # the object that could not be read
    assert counted == ["socks", "cfg", "events"]
    # within a second: nothing read again; within the interval: facts again, no walk
    socks[1] = 200
    clock.t += 0.5
    facts.read()
    clock.t += 1
    assert facts.read().maps["socks"] == (100, 65536)
    assert counted == ["socks", "cfg", "events"]
    # after the interval: walked again
    clock.t += 10
    assert facts.read().maps["socks"] == (200, 65536)
    assert counted.count("socks") == 2


def test_bpf_instruments_scraped(monkeypatch):
    fake_bpfinfo(monkeypatch, stats=True)
    obj = FakeBpf({"p": prog("p", 2_500_000_000, 4), "idle": prog("idle")},
                  {"socks": (bmap("socks", "lru_hash", 65536), 321)})
    with PrometheusEndpoint(0) as endpoint:
        metrics = SelfMetrics(AgentState(), endpoint=endpoint, bpf_objects=lambda: [obj])
        try:
            got = samples(endpoint)
        finally:
            metrics.close()
    assert got[("otelwater_agent_bpf_run_time_seconds_total", (("bpf_program", "p"),))] == 2.5
    assert got[("otelwater_agent_bpf_runs_total", (("bpf_program", "p"),))] == 4
    # statistics on: a program that has not run yet is counted, from 0
    assert got[("otelwater_agent_bpf_runs_total", (("bpf_program", "idle"),))] == 0
    assert got[("otelwater_agent_bpf_map_entries", (("bpf_map", "socks"),))] == 321
    assert got[("otelwater_agent_bpf_map_max_entries", (("bpf_map", "socks"),))] == 65536


def test_bpf_info_layouts_are_the_kernels():
    # struct bpf_prog_info and bpf_map_info of include/uapi/linux/bpf.h (Linux 6.x)
    assert ctypes.sizeof(bpfinfo._ProgInfo) == 232
    assert bpfinfo._ProgInfo.name.offset == 64
    assert bpfinfo._ProgInfo.run_time_ns.offset == 192
    assert bpfinfo._ProgInfo.run_cnt.offset == 200
    assert bpfinfo._ProgInfo.recursion_misses.offset == 208
    assert ctypes.sizeof(bpfinfo._MapInfo) == 88
    assert bpfinfo._MapInfo.max_entries.offset == 16
    assert bpfinfo._MapInfo.name.offset == 24
    assert bpfinfo._MapInfo.map_extra.offset == 80
    assert bpfinfo.MAP_TYPES.index("lru_hash") == 9 and bpfinfo.MAP_TYPES.index("ringbuf") == 27
    assert bmap("x", "hash", 1).counted and not bmap("x", "array", 1).counted
