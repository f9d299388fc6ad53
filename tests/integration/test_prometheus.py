"""`otelwater watch --prometheus-port` scraped by a real Prometheus (Debian's /usr/bin/prometheus,
installed by scripts/setup.sh), queried through its HTTP API.

One scenario serves every test of the module: a loopback socket of this test holding water
(the peer filled it, the reader stopped), a second one overflowing (its receive buffer shrunk
after the handshake, so the kernel drops), and the example Go service (examples/bin/slowreader)
answering nothing (-mode sink), fed by loadgen streaming with 5 ms pauses, so each of its
Reads parks ~5 ms mid-stream: slow, peer-starved (a ping-pong's reads after each answer would
be idle: the peer owed nothing).
Prometheus scrapes otelwater every second, as OpenMetrics and with exemplar storage on; it is
stopped whatever happens. A second watch of the same service, exporting its spans over OTLP to a
receiver of this test as well, is scraped as job otelwater-otlp while the test of exemplars
against spans runs: the first watch's spans end nowhere, so only the second's can be matched.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from otelwater import names as N

from .conftest import OTELWATER, ROOT
from .loopback import Pair, ss
from .otlp_receiver import HttpReceiver, attrs
from .services import free_port, wait_for

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("bpf_ready")]

PROMETHEUS = "/usr/bin/prometheus"
BIN = ROOT / "examples" / "bin"
SERVICE = "slowreader-prometheus-test"   # the Go service's OTEL_SERVICE_NAME
JOB = "otelwater"
JOB_OTLP = "otelwater-otlp"              # the second watch: Prometheus and OTLP
READ_BUCKETS = "otelwater_read_duration_seconds_bucket"
DASHBOARD = ROOT / "examples" / "grafana" / "dashboards" / "otelwater.json"
# what Grafana would put in the dashboard's variables and intervals
SUBSTITUTE = {"$job": JOB, "$pid": ".*", "$__rate_interval": "15s", "$__range": "5m"}


class Prometheus:
    """A Prometheus server of this test, with its own config and TSDB in a temp directory."""

    def __init__(self, tmp: Path, target_port: int, otlp_target_port: int):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = tmp / "prometheus.yml"
        cfg.write_text(f"""\
global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: {JOB}
    static_configs:
      - targets: ["127.0.0.1:{target_port}"]
  - job_name: {JOB_OTLP}
    static_configs:
      - targets: ["127.0.0.1:{otlp_target_port}"]
""")
        self.log = tmp / "prometheus.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [PROMETHEUS, f"--config.file={cfg}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{self.port}",
                 "--enable-feature=exemplar-storage", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT)

    def wait_ready(self):
        def ready():
            assert self.proc.poll() is None, f"prometheus exited: {self.log.read_text()}"
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_for("prometheus to be ready", ready)

    def api(self, path: str, **params) -> dict:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list:
        return self.api("query", query=expr)["result"]

    def exemplars(self, selector: str, seconds: int = 300) -> list[tuple[dict, dict]]:
        """(series labels, exemplar) of every exemplar stored for the selector's series."""
        now = time.time()
        data = self.api("query_exemplars", query=selector, start=now - seconds, end=now)
        return [(series["seriesLabels"], ex) for series in data for ex in series["exemplars"]]

    def query_range(self, expr: str, seconds: int = 60) -> list:
        now = time.time()
        return self.api("query_range", query=expr, start=now - seconds, end=now,
                        step=1)["result"]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@dataclass
class Scenario:
    prom: Prometheus
    water: Pair
    overflow: Pair
    go_pid: int
    go_port: str
    tmp: Path
    otlp_metrics_port: int           # where Prometheus scrapes job otelwater-otlp


def start_watch(tmp: Path, metrics_port: int, *args: str, name: str = "otelwater",
                env: dict | None = None) -> subprocess.Popen:
    err = tmp / f"{name}.err"
    proc = subprocess.Popen(
        OTELWATER + ["watch", "--json", "-i", "0.5", "-d", "600",
                     "--prometheus-port", str(metrics_port), *args],
        stdout=subprocess.DEVNULL, stderr=open(err, "w"), cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT), **(env or {})))

    def attached():
        assert proc.poll() is None, f"otelwater exited: {err.read_text()}"
        return "Tracing TCP receive queues" in err.read_text()

    wait_for("otelwater to attach", attached)
    return proc


def stop_gently(proc: subprocess.Popen, sig=signal.SIGINT):
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    assert os.access(PROMETHEUS, os.X_OK), "no /usr/bin/prometheus: run scripts/setup.sh"
    tmp = tmp_path_factory.mktemp("prometheus")
    metrics_port, otlp_metrics_port = free_port(), free_port()
    with contextlib.ExitStack() as stack:
        prom = Prometheus(tmp, metrics_port, otlp_metrics_port)
        stack.callback(prom.stop)          # whatever happens below
        water, overflow = Pair(), Pair()
        stack.callback(water.close)
        stack.callback(overflow.close)
        water.connect()
        overflow.connect()
        overflow.server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        server = subprocess.Popen([str(BIN / "slowreader"), "-mode", "sink", "-readsize", "64"],
                                  stdout=subprocess.PIPE, text=True,
                                  env=dict(os.environ, OTEL_SERVICE_NAME=SERVICE))
        stack.callback(stop_gently, server, signal.SIGTERM)
        hello = json.loads(server.stdout.readline())
        addr, go_pid = hello["listening"], hello["pid"]
        go_port = addr.rsplit(":", 1)[1]
        watch = start_watch(tmp, metrics_port, "-P", str(water.port), "-P", str(overflow.port),
                            "-P", go_port, "--go-pid", str(go_pid))
        stack.callback(stop_gently, watch)
        prom.wait_ready()
        load = subprocess.Popen([str(BIN / "loadgen"), "-addr", addr, "-conns", "2",
                                 "-size", "64", "-mode", "stream", "-pause", "5ms",
                                 "-duration", "300s"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        stack.callback(stop_gently, load, signal.SIGTERM)
        # the water: the peer writes until the window is shut, the reader never reads
        water.fill(300_000, chunk=7000)
        overflow.fill(2_000_000, chunk=16384)
        water.wait_still()
        overflow.wait_still()
        yield Scenario(prom, water, overflow, go_pid, go_port, tmp, otlp_metrics_port)


def volume_series(s: Scenario, metric: str, pair: Pair) -> str:
    return (f'{metric}{{job="{JOB}", network_local_port="{pair.port}", '
            f'network_peer_port="{pair.client_port}"}}')


def test_volume_in_prometheus_equals_ss(scenario):
    # Given a socket whose queue is still (the peer cannot write more, the reader stopped)
    truth = ss(scenario.water.port, scenario.water.client_port)
    assert truth.r > 0
    # When Prometheus has scraped otelwater since
    want = {"otelwater_socket_water_volume_bytes": truth.r,
            "otelwater_socket_water_unread_bytes": truth.recv_q,
            "otelwater_socket_capacity_bytes": truth.rb}

    def scraped():
        got = {}
        for metric in want:
            result = scenario.prom.query(volume_series(scenario, metric, scenario.water))
            if len(result) != 1:
                return None
            got[metric] = float(result[0]["value"][1])
        return got if got == want else None

    wait_for("the socket's water in Prometheus", scraped, timeout_s=20)
    # Then the volume, unread bytes and capacity in Prometheus are exactly what ss shows.
    # Tolerance: none. The queue is still, so otelwater's last snapshot of it is exact
    # (tests/integration/test_water_probe.py), and a float64 sample holds these integers
    # exactly; ss is read again to show nothing moved meanwhile (drops may: the peer's
    # zero-window probes are dropped, and counted, by a full queue).
    again = ss(scenario.water.port, scenario.water.client_port)
    assert (again.r, again.recv_q, again.rb) == (truth.r, truth.recv_q, truth.rb)
    (series,) = scenario.prom.query(volume_series(scenario, "otelwater_socket_water_volume_bytes",
                                                  scenario.water))
    assert series["metric"]["process_pid"] == str(os.getpid())
    assert series["metric"]["otelwater_socket_key"] != "other"


def test_read_duration_histogram_of_the_go_service(scenario):
    # Given the Go service's reads, each parked ~5 ms waiting for loadgen's next message
    sel = f'job="{JOB}", service_name="{SERVICE}"'

    def counted():
        r = scenario.prom.query(f"sum(otelwater_read_duration_seconds_count{{{sel}}})")
        return r and float(r[0]["value"][1]) >= 50

    # When enough slow reads were decided and scraped
    wait_for("slow reads of the Go service in Prometheus", counted, timeout_s=40)
    # Then the histogram is there under the service's own name, with otelwater's buckets
    buckets = scenario.prom.query(f"otelwater_read_duration_seconds_bucket{{{sel}}}")
    les = {b["metric"]["le"] for b in buckets}
    assert {"0.001", "0.005", "0.01", "+Inf"} <= les, les
    # and its median lies in the bucket of the 5 ms pause (5-10 ms; interpolated within it)
    median = scenario.prom.query("histogram_quantile(0.5, sum by (le) "
                                 f"(otelwater_read_duration_seconds_bucket{{{sel}}}))")
    assert 0.005 <= float(median[0]["value"][1]) <= 0.01, median
    verdicts = scenario.prom.query(f"otelwater_read_verdicts_total{{{sel}}}")
    assert {v["metric"]["otelwater_verdict"] for v in verdicts} >= {"peer-starved"}
    # the kernel's counts: by verdict and socket role, with the cut records (none cut here)
    # and its log2 histograms, whose buckets are powers of two of a nanosecond
    assert {v["metric"].get("otelwater_socket_role") for v in verdicts
            if float(v["value"][1])} == {"accepted"}
    cut = scenario.prom.query(f"sum(otelwater_records_cut_total{{{sel}}})")
    assert cut and float(cut[0]["value"][1]) == 0
    peer = f'{sel}, otelwater_verdict="peer-starved"'
    les = {b["metric"]["le"] for b in scenario.prom.query(
        f"otelwater_read_verdict_wait_seconds_bucket{{{peer}}}")}
    assert {repr((1 << 22) / 1e9), repr((1 << 23) / 1e9), "+Inf"} <= les, les
    wait = scenario.prom.query("histogram_quantile(0.5, sum by (le) "
                               f"(otelwater_read_verdict_wait_seconds_bucket{{{peer}}}))")
    assert (1 << 22) / 1e9 <= float(wait[0]["value"][1]) <= (1 << 23) / 1e9, wait


def exemplar_problems(series: dict, ex: dict) -> list[str]:
    """What is wrong with an exemplar of a read-duration bucket: it must point at a span by
    its ids and sit in the bucket that counted its value (le inclusive) among otelwater's."""
    problems = []
    ids = ex["labels"]
    if not re.fullmatch(r"[0-9a-f]{32}", ids.get("trace_id", "")) or \
            not int(ids["trace_id"], 16):
        problems.append(f"bad trace_id {ids}")
    if not re.fullmatch(r"[0-9a-f]{16}", ids.get("span_id", "")):
        problems.append(f"bad span_id {ids}")
    bounds = (*N.READ_DURATION_BOUNDS_S, float("inf"))
    value = float(ex["value"])
    if float(series["le"]) != bounds[bisect.bisect_left(bounds, value)]:
        problems.append(f"value {value} in bucket le={series['le']}")
    return problems


def test_read_duration_exemplars_point_at_spans(scenario):
    # Given the Go service's slow reads, served by --prometheus-port alone (no OTLP endpoint:
    # the spans the exemplars point at are made, then end nowhere)
    sel = f'{READ_BUCKETS}{{job="{JOB}", service_name="{SERVICE}"}}'

    # When Prometheus, with exemplar storage, has scraped otelwater's OpenMetrics
    def several():   # more than one scrape's: they keep coming, not once
        got = scenario.prom.exemplars(sel)
        return got if len({ex["timestamp"] for _, ex in got}) >= 5 else None

    got = wait_for("read-duration exemplars in Prometheus", several, timeout_s=40)
    # Then each exemplar names a span by trace and span id, and sits in its value's bucket
    print(f"\n{len(got)} exemplars of {sel}, e.g. {got[0][1]} on le={got[0][0]['le']}")
    for series, ex in got:
        assert not exemplar_problems(series, ex), (series, ex)
        # a slow read parked over the 1 ms threshold, or (consumer-lagging) returned at once
        # bytes that had stood that long: its duration is then ~0, the syscall's own time
        assert float(ex["value"]) >= 0.0
    # each of a different read
    assert len({ex["labels"]["span_id"] for _, ex in got}) == len(got)


def test_exemplars_are_the_spans_of_the_reads(scenario):
    # Given a second watch of the same Go service exporting to Prometheus (job otelwater-otlp)
    # and over OTLP to a receiver of this test, which so gets the spans otelwater made
    receiver = HttpReceiver().start()
    sel = f'{READ_BUCKETS}{{job="{JOB_OTLP}", service_name="{SERVICE}"}}'
    try:
        watch = start_watch(scenario.tmp, scenario.otlp_metrics_port, "-P", scenario.go_port,
                            "--go-pid", str(scenario.go_pid), "--otlp-endpoint",
                            receiver.endpoint, "--otlp-protocol", "http/protobuf",
                            name="otelwater-otlp", env={"OTEL_BSP_SCHEDULE_DELAY": "200"})
        try:
            def matched():
                spans = {(span.trace_id.hex(), span.span_id.hex()): (resource, span)
                         for resource, span in receiver.got.spans()
                         if span.name.startswith(N.READ_SPAN_PREFIX)}
                return [(series, ex, *spans[key]) for series, ex in scenario.prom.exemplars(sel)
                        if (key := (ex["labels"]["trace_id"], ex["labels"]["span_id"])) in spans]

            # When Prometheus has scraped its exemplars and the receiver got its spans
            got = wait_for("exemplars whose trace and span ids are spans received", matched,
                           timeout_s=40)
        finally:
            stop_gently(watch)
    finally:
        receiver.stop()
    print(f"\n{len(got)} exemplars of {sel} are spans received, e.g. {got[0][1]}")
    # Then each is the span of the read it counts: same read duration, service and verdict
    # (the span's own bar may be longer: a lagging read's starts at its oldest byte)
    for series, ex, resource, span in got:
        assert not exemplar_problems(series, ex), (series, ex)
        a = attrs(span.attributes)
        assert float(ex["value"]) == (a[N.READ_END_NS] - a[N.READ_START_NS]) / 1e9
        assert span.end_time_unix_nano - span.start_time_unix_nano >= \
            a[N.READ_END_NS] - a[N.READ_START_NS]
        assert resource[N.SERVICE_NAME] == SERVICE
        assert attrs(span.attributes)[N.VERDICT] == series["otelwater_verdict"]


def dashboard_targets():
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield pytest.param(panel["title"], target, id=f"{panel['title']}/{target['refId']}")


@pytest.mark.parametrize("title,target", list(dashboard_targets()))
def test_every_dashboard_panel_query_returns_data(scenario, title, target):
    # Given the dashboard's query with its variables set as Grafana would (All processes)
    expr = target["expr"]
    for var, value in SUBSTITUTE.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unsubstituted variable in {expr}"

    # When Prometheus evaluates it over the scenario (range queries as the panel draws them)
    def data():
        if target.get("instant"):
            result = scenario.prom.query(expr)
            return result if any(r["value"][1] not in ("NaN",) for r in result) else None
        result = scenario.prom.query_range(expr)
        return result if any(v[1] != "NaN" for r in result for v in r["values"]) else None

    # Then it returns data
    assert wait_for(f"data for panel {title!r}: {expr}", data, timeout_s=40)


def test_taken_port_is_one_line_before_anything_attaches():
    # Given a port something already listens on
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # When watch is asked to serve metrics there
        r = subprocess.run(OTELWATER + ["watch", "--prometheus-port", str(port), "-d", "5"],
                           capture_output=True, text=True, cwd=ROOT, timeout=60,
                           env=dict(os.environ, PYTHONPATH=str(ROOT)))
    # Then it is one line naming the port and the fix, exit 2, and no probe was attached
    assert r.returncode == 2, r.stderr
    (line,) = r.stderr.splitlines()
    assert f"--prometheus-port {port}" in line and "in use" in line and "pick a free port" in line
    assert "Tracing" not in r.stderr
