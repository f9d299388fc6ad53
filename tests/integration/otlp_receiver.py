"""OTLP receivers the tests run: gRPC (opentelemetry-proto's TraceService and MetricsService
servicers on grpcio) and HTTP/protobuf (http.server parsing the Export*ServiceRequest bodies).
Each keeps every request it got; stop() and start() again on the same port play a Collector
going down and coming back."""

from __future__ import annotations

import gzip
import http.server
import socket
import threading
import time
from concurrent import futures

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as mpb
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc as mgrpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as tpb
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as tgrpc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def value(v):
    """An AnyValue as a Python value."""
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


def attrs(kvs) -> dict:
    return {kv.key: value(kv.value) for kv in kvs}


class Received:
    def __init__(self):
        self.lock = threading.Lock()
        self.traces: list[tpb.ExportTraceServiceRequest] = []
        self.metrics: list[mpb.ExportMetricsServiceRequest] = []

    def add_traces(self, req):
        with self.lock:
            self.traces.append(req)

    def add_metrics(self, req):
        with self.lock:
            self.metrics.append(req)

    def spans(self) -> list[tuple[dict, object]]:
        """(resource attributes, Span) of every span received."""
        with self.lock:
            return [(attrs(rs.resource.attributes), span) for req in self.traces
                    for rs in req.resource_spans for ss in rs.scope_spans for span in ss.spans]

    def metric(self, name: str) -> list[tuple[dict, object, object]]:
        """(resource attributes, Metric, data point) of every point of that metric."""
        out = []
        with self.lock:
            for req in self.metrics:
                for rm in req.resource_metrics:
                    res = attrs(rm.resource.attributes)
                    for sm in rm.scope_metrics:
                        for m in sm.metrics:
                            if m.name != name:
                                continue
                            data = getattr(m, m.WhichOneof("data"))
                            out.extend((res, m, p) for p in data.data_points)
        return out

    def wait(self, cond, timeout_s: float = 10.0) -> bool:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if cond():
                return True
            time.sleep(0.05)
        return cond()


class GrpcReceiver:
    protocol = "grpc"

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.got = Received()
        self.server = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "GrpcReceiver":
        got = self.got

        class Traces(tgrpc.TraceServiceServicer):
            def Export(self, request, context):
                got.add_traces(request)
                return tpb.ExportTraceServiceResponse()

        class Metrics(mgrpc.MetricsServiceServicer):
            def Export(self, request, context):
                got.add_metrics(request)
                return mpb.ExportMetricsServiceResponse()

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        tgrpc.add_TraceServiceServicer_to_server(Traces(), self.server)
        mgrpc.add_MetricsServiceServicer_to_server(Metrics(), self.server)
        assert self.server.add_insecure_port(f"127.0.0.1:{self.port}") == self.port
        self.server.start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(grace=None).wait()
            self.server = None


class HttpReceiver:
    protocol = "http/protobuf"

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.got = Received()
        self.server = None
        self.thread = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "HttpReceiver":
        got = self.got

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path == "/v1/traces":
                    req, resp = tpb.ExportTraceServiceRequest(), tpb.ExportTraceServiceResponse()
                    req.ParseFromString(body)
                    got.add_traces(req)
                elif self.path == "/v1/metrics":
                    req, resp = (mpb.ExportMetricsServiceRequest(),
                                 mpb.ExportMetricsServiceResponse())
                    req.ParseFromString(body)
                    got.add_metrics(req)
                else:
                    self.send_error(404)
                    return
                out = resp.SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args):
                pass

        class Server(http.server.ThreadingHTTPServer):
            allow_reuse_address = True
            daemon_threads = True

        self.server = Server(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.thread.join(5)
            self.server = None


def main() -> None:
    """`python -m tests.integration.otlp_receiver [grpc|http/protobuf]`: serve on a free port,
    print {"endpoint": URL}, and when stdin closes print what arrived: {"spans", "points"}."""
    import json
    import sys

    r = (HttpReceiver if sys.argv[1:] == ["http/protobuf"] else GrpcReceiver)().start()
    print(json.dumps({"endpoint": r.endpoint}), flush=True)
    sys.stdin.read()
    r.stop()
    with r.got.lock:
        points = sum(len(getattr(m, m.WhichOneof("data")).data_points)
                     for req in r.got.metrics for rm in req.resource_metrics
                     for sm in rm.scope_metrics for m in sm.metrics)
    print(json.dumps({"spans": len(r.got.spans()), "points": points}), flush=True)


if __name__ == "__main__":
    main()
