"""Where OTLP export goes, checked before anything attaches, and why it fails when it does.

Bad settings (an endpoint that is no usable URL, a compression or timeout variable the
exporters cannot use, per signal too) are usage errors: one line naming the flag or variable
and what it takes, exit 2. A dead endpoint's notice names its cause: the host name does not
resolve, the connection is refused, no answer (a timeout), or it answers but the export fails.
"""

from __future__ import annotations

import io
import os
import socket
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from otelwater.cli import main
from otelwater.clock import WallClock
from otelwater.errors import UsageError
from otelwater.export.otlp import (GRPC, HTTP, ExportHealth, ExportOptions, Identity, OtlpSink,
                                   _counting_span_exporter, resolve_options)
from otelwater.export.otlp.health import Cause, diagnose_endpoint, say_delivery
from otelwater.export.otlp.options import compression, endpoint_address

from .test_otlp import MS, OFFSET, read, snap, verdict

RECORDING = Path(__file__).resolve().parent.parent / "fixtures" / "recordings" / "mixed.otw.gz"
UP = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://localhost:4317"}


def refused_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def usage_error(endpoint, protocol, env, live=False) -> str:
    with pytest.raises(UsageError) as e:
        resolve_options(endpoint, protocol, env, live=live)
    line = e.value.one_line()
    assert e.value.exit_code == 2 and "\n" not in line
    return line


# -- bad settings: usage errors naming the flag or the variable -----------------------------

@pytest.mark.parametrize("url,what", [
    ("notaurl", "is not an http:// or https:// URL"),
    ("localhost:4317", "is not an http:// or https:// URL"),
    ("ftp://x:1", "is not an http:// or https:// URL"),
    ("http://", "names no host"),
    ("http://:4317", "names no host"),
    ("http://x:0", "has a bad port"),
    ("http://x:99999", "has a bad port"),
    ("http://x:abc", "has a bad port"),
    ("http://x:", "has a bad port"),
    ("http://[::1:4317", "is not a URL (Invalid IPv6 URL)"),
    ("http://a b:4317", "is not a URL (it has a space)"),
])
def test_bad_endpoints_name_the_flag_and_what_it_takes(url, what):
    line = usage_error(url, None, {})
    assert line.startswith(f"--otlp-endpoint {url!r} {what}; ")
    assert "http://localhost:4317" in line and "1 to 65535" in line


@pytest.mark.parametrize("var", ["OTEL_EXPORTER_OTLP_ENDPOINT",
                                 "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                                 "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"])
def test_every_endpoint_variable_the_sdk_may_use_is_checked(var):
    env = {**UP, var: "http://collector:0"}
    assert usage_error(None, None, env).startswith(f"{var} 'http://collector:0' has a bad port")


@pytest.mark.parametrize("var", ["OTEL_EXPORTER_OTLP_TIMEOUT",
                                 "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
                                 "OTEL_EXPORTER_OTLP_METRICS_TIMEOUT"])
@pytest.mark.parametrize("value", ["abc", "0", "-1", "inf", "nan", "10s"])
def test_bad_timeouts_are_usage_errors_naming_the_variable(var, value):
    for protocol in (GRPC, HTTP):
        line = usage_error("http://localhost:4317", protocol, {var: value})
        assert line.startswith(f"{var}={value!r} is not a timeout in seconds; ")
        assert "seconds > 0" in line and f"{var}=10" in line


@pytest.mark.parametrize("var", ["OTEL_EXPORTER_OTLP_COMPRESSION",
                                 "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION",
                                 "OTEL_EXPORTER_OTLP_METRICS_COMPRESSION"])
@pytest.mark.parametrize("protocol,value,accepted", [
    (GRPC, "zzz", "gzip or none"), (GRPC, "deflate", "gzip or none"),
    (HTTP, "zzz", "gzip or deflate or none"), (HTTP, "br", "gzip or deflate or none")])
def test_bad_compressions_are_usage_errors_naming_the_variable(var, protocol, value, accepted):
    line = usage_error("http://localhost:4317", protocol, {var: value})
    assert line == (f"{var}={value!r} is not a compression {protocol} export takes; "
                    f"set it to {accepted}, or unset it")


@pytest.mark.parametrize("var", ["OTEL_EXPORTER_OTLP_HEADERS",
                                 "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
                                 "OTEL_EXPORTER_OTLP_METRICS_HEADERS"])
@pytest.mark.parametrize("value,bad", [("s3cret", 1), ("a=1,s3cret", 2), ("=s3cret", 1),
                                       ("a=1, bearer s3cret=x", 2), ("a=s3cret;c", 1),
                                       ("x:y=s3cret", 1), ("key=vä-s3cret", 1),
                                       ("a=1,b=s3cret\"c", 2)])
def test_bad_headers_are_usage_errors_that_never_show_the_value(var, value, bad, caplog):
    line = usage_error("http://localhost:4317", GRPC, {var: value})
    n = len([e for e in value.split(",") if e.strip()])
    assert line.startswith(f"{var}: entry {bad} of {n} is not a name=value header"), line
    assert "s3cret" not in line
    # nor does the SDK's parser, asked here, log it
    assert "s3cret" not in caplog.text


@pytest.mark.parametrize("value", ["authorization=Bearer%20x", "a=1,b=2", " a = 1 , b=x=y ",
                                   "a=", ",a=1,", "tenant=team one"])
def test_headers_the_sdk_keeps_whole_are_accepted(value):
    from opentelemetry.util.re import parse_env_headers

    assert resolve_options("http://localhost:4317", GRPC,
                           {"OTEL_EXPORTER_OTLP_HEADERS": value}) is not None
    # the SDK's exporters (liberal parsing) keep every entry: nothing is dropped silently
    entries = [e for e in value.split(",") if e.strip()]
    assert len(parse_env_headers(value, liberal=True)) == len(entries)


def test_a_bad_metric_interval_is_a_usage_error_for_the_live_export():
    env = {**UP, "OTEL_METRIC_EXPORT_INTERVAL": "abc"}
    assert "OTEL_METRIC_EXPORT_INTERVAL='abc'" in usage_error(None, None, env, live=True)
    assert resolve_options(None, None, env) is not None     # correlate does not read it


@pytest.mark.parametrize("protocol", [GRPC, HTTP])
def test_accepted_settings_build_the_exporters(monkeypatch, protocol):
    # the SDK's gRPC exporter alone raises on "none" and on an empty timeout: they work here
    for value in ("gzip", "GZIP", " none ", "", *(["deflate"] if protocol == HTTP else [])):
        for var in [k for k in os.environ if k.startswith("OTEL_EXPORTER_OTLP_")]:
            monkeypatch.delenv(var)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_COMPRESSION", value)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "")   # empty is unset
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_TIMEOUT", "2.5")
        opts = resolve_options("http://localhost:4317", protocol)
        spans, metrics = opts.exporters()
        spans.shutdown()
        metrics.shutdown()
        want = value.strip().lower() or "none"
        got = compression(protocol, "TRACES").name.lower()
        assert got == {"none": "nocompression"}.get(want, want)


def test_the_address_an_export_connects_to():
    assert endpoint_address("http://c:4317", GRPC) == ("c", 4317)
    assert endpoint_address("http://c", HTTP) == ("c", 80)
    assert endpoint_address("https://c/v1/traces", HTTP) == ("c", 443)
    assert endpoint_address("http://c", GRPC) == ("c", 443)
    assert endpoint_address("http://[::1]:4318", HTTP) == ("::1", 4318)


@pytest.mark.parametrize("args,env,named", [
    (["--otlp-endpoint", "notaurl"], {}, "--otlp-endpoint 'notaurl'"),
    (["--otlp-endpoint", "http://"], {}, "--otlp-endpoint 'http://'"),
    (["--otlp-endpoint", "ftp://x:1"], {}, "--otlp-endpoint 'ftp://x:1'"),
    (["--otlp-endpoint", "http://x:70000"], {}, "--otlp-endpoint 'http://x:70000'"),
    ([], {**UP, "OTEL_EXPORTER_OTLP_TIMEOUT": "abc"}, "OTEL_EXPORTER_OTLP_TIMEOUT='abc'"),
    ([], {**UP, "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "abc"},
     "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT='abc'"),
    ([], {**UP, "OTEL_EXPORTER_OTLP_COMPRESSION": "zzz"},
     "OTEL_EXPORTER_OTLP_COMPRESSION='zzz'"),
    ([], {**UP, "OTEL_EXPORTER_OTLP_METRICS_COMPRESSION": "zzz"},
     "OTEL_EXPORTER_OTLP_METRICS_COMPRESSION='zzz'"),
])
@pytest.mark.parametrize("command", ["watch", "correlate"])
def test_the_commands_refuse_them_first_with_one_line_exit_2(args, env, named, command):
    # watch checks them before anything else (no root needed to be refused: nothing attaches)
    argv = ["watch", "-d", "1"] if command == "watch" else ["correlate", str(RECORDING)]
    r = CliRunner().invoke(main, argv + args, env=env)
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"otelwater: {named} "), r.output
    assert "internal error" not in r.output


# -- a dead endpoint: its cause ---------------------------------------------------------------

def test_a_closed_port_is_connection_refused():
    port = refused_port()
    c = diagnose_endpoint("127.0.0.1", port)
    assert c.text == f"connection refused (nothing listens on 127.0.0.1:{port})"
    assert "start the Collector" in c.fix


def test_a_name_that_does_not_resolve_is_said_so():
    t0 = time.monotonic()
    c = diagnose_endpoint("nonexistent.invalid", 4317, timeout_s=3.0)
    assert c.text.startswith("the host name nonexistent.invalid ")
    assert "resolve" in c.text and "check the host name" in c.fix
    assert time.monotonic() - t0 < 4.0


def test_no_answer_is_a_timeout():
    # a listener whose accept queue is full drops new connections' SYNs: no answer
    with socket.socket() as lsn:
        lsn.bind(("127.0.0.1", 0))
        lsn.listen(0)
        port = lsn.getsockname()[1]
        held = []
        try:
            for _ in range(3):     # fill the queue (Linux takes backlog + 1)
                s = socket.socket()
                s.settimeout(0.3)
                held.append(s)
                try:
                    s.connect(("127.0.0.1", port))
                except OSError:
                    break
            t0 = time.monotonic()
            c = diagnose_endpoint("127.0.0.1", port, timeout_s=0.5)
            took = time.monotonic() - t0
        finally:
            for s in held:
                s.close()
    assert c.text == f"no answer from 127.0.0.1:{port} within 0.5 s (the connection timed out)"
    assert took < 2.0


def test_an_endpoint_that_accepts_but_fails_the_export():
    with socket.socket() as lsn:
        lsn.bind(("127.0.0.1", 0))
        lsn.listen(8)
        port = lsn.getsockname()[1]
        quick = diagnose_endpoint("127.0.0.1", port, took_s=0.01, request_timeout_s=10)
        slow = diagnose_endpoint("127.0.0.1", port, took_s=10.0, request_timeout_s=10)
    assert quick.text == (f"127.0.0.1:{port} accepts connections, but the export request "
                          "failed there")
    assert slow.text == (f"127.0.0.1:{port} accepts connections but did not answer within "
                         "the export's 10 s timeout")
    assert "--otlp-protocol" in quick.fix


def test_the_outage_line_and_the_last_line_name_the_cause():
    from opentelemetry.sdk.trace.export import SpanExportResult
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    class Down(InMemorySpanExporter):
        def export(self, spans):
            return SpanExportResult.FAILURE

    asked = []

    def diagnose(took_s, timeout_s=2.0):
        asked.append(took_s)
        return Cause("connection refused (nothing listens on c:4317)", "start it")

    out = io.StringIO()
    health = ExportHealth("http://c:4317", out, diagnose=diagnose)
    exp = _counting_span_exporter(Down(), health)
    for _ in range(3):
        exp.export([object(), object()])
    say_delivery(health, 6, delivers=True)
    assert out.getvalue().splitlines() == [
        "otelwater: OTLP export to http://c:4317 failing: connection refused (nothing listens "
        "on c:4317); 2 spans, 0 metric points dropped so far; still retrying",
        "otelwater: OTLP export to http://c:4317: 0 spans and 0 metric points delivered; "
        "6 spans and 0 metric points not delivered: connection refused (nothing listens on "
        "c:4317)"]
    assert len(asked) == 1      # found once per outage


@pytest.mark.parametrize("protocol", [GRPC, HTTP])
def test_the_real_exporters_at_a_closed_port_say_connection_refused(protocol):
    url = f"http://127.0.0.1:{refused_port()}"
    out = io.StringIO()
    sink = OtlpSink.for_options(ExportOptions(protocol, url, url), out=out,
                                identity=lambda pid: Identity(pid), clock=WallClock(OFFSET),
                                metric_interval_s=0.2)
    sink.write([read(0, 2 * MS), snap(MS, volume=100), verdict(0, 2 * MS)])
    sink.close(timeout_s=1.0)
    last = out.getvalue().splitlines()[-1]
    assert "not delivered: connection refused (nothing listens on 127.0.0.1:" in last, last
