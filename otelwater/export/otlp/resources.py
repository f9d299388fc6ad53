"""Who the telemetry is about: the resource of each traced process, and the registry of
per-service providers.

Resource = the traced service. One span destination (and, live, one MeterProvider) per traced
process (a pid seen in a Go read or verdict, or named by the recording), created when it first
appears: service.name from its own OTEL_SERVICE_NAME, else service.name of its
OTEL_RESOURCE_ATTRIBUTES (all of which are kept), else its executable's basename; plus
process.pid, process.executable.name/path, host.name and service.instance.id. Sockets of
processes that are not traced, and lost records, go under otelwater's own resource
(service.name "otelwater", key OWN). Every resource also carries the run (clock offset, attach
time, the verdict thresholds), so the spans alone give the same verdicts.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterable

from otelwater import names as N
from otelwater.export.series import OWN

PROBES = ("water", "reads")     # whose lost records are counted from 0
MAX_SERVICES = 256              # providers kept; the least recently used is shut down beyond
RETIRE_TIMEOUT_S = 5.0          # the most a retired provider's last export may take
INSTANCE_NS = uuid.UUID("6f74656c-7761-7465-7200-000000000001")  # uuid5 namespace



@dataclass(frozen=True)
class Identity:
    """What names a traced process: the fields of recording.ProcessInfo that export uses."""

    pid: int
    exe: str | None = None
    comm: str | None = None
    service_name: str | None = None
    resource_attributes: dict | None = None
    start_time: int | None = None
    container_id: str | None = None


def own_host_name() -> str:
    """The host the telemetry is about: host.name of otelwater's own OTEL_RESOURCE_ATTRIBUTES
    when given (a DaemonSet's pod has a hostname of its own: give it the node's name, e.g.
    OTEL_RESOURCE_ATTRIBUTES=host.name=$(NODE_NAME) from the downward API), else the hostname."""
    import socket

    from otelwater.events.recording import parse_resource_attributes

    given = parse_resource_attributes(os.environ.get("OTEL_RESOURCE_ATTRIBUTES", "")) or {}
    return given.get(N.HOST_NAME) or socket.gethostname()


def identity_from_proc(pid: int):
    """The process's identity from /proc/PID (exe, environ's OTEL_* variables, start time, the
    container its cgroup names)."""
    from otelwater.events.recording import process_info

    p = process_info(pid)
    return Identity(p.pid, p.exe, p.comm, p.service_name, p.resource_attributes, p.start_time,
                    container_id(pid))


# the container id a runtime puts in a cgroup path: 64 hex digits, after a runtime prefix
# (docker-, cri-containerd-, crio-, libpod-) and before an optional .scope
_CONTAINER_ID = re.compile(r"(?:^|[/-])([0-9a-f]{64})(?:\.scope)?$")


def container_id(pid: int) -> str | None:
    """The container id of a process from /proc/PID/cgroup (cgroup v2's one line, or the
    first v1 hierarchy that names one), as the Collector's k8sattributes processor matches
    it (container.id); None outside containers."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    return container_id_of(lines)


def container_id_of(lines) -> str | None:
    for line in lines:
        path = line.split(":", 2)[-1]
        for part in reversed(path.split("/")):
            m = _CONTAINER_ID.search(part)
            if m:
                return m.group(1)
    return None


def resource_attributes(ident, pid: int, host: str) -> dict:
    """The resource of a traced process: its own OTEL_RESOURCE_ATTRIBUTES, its service name
    (OTEL_SERVICE_NAME > service.name of those attributes > the executable's basename), and
    what otelwater knows of it."""
    attrs: dict = {}
    given = dict(getattr(ident, "resource_attributes", None) or {})
    attrs.update(given)
    exe = getattr(ident, "exe", None)
    comm = getattr(ident, "comm", None)
    attrs[N.SERVICE_NAME] = (getattr(ident, "service_name", None) or given.get(N.SERVICE_NAME)
                             or (os.path.basename(exe) if exe else None) or comm
                             or f"pid-{pid}")
    attrs[N.PROCESS_PID] = pid
    if exe:
        attrs[N.PROCESS_EXECUTABLE_PATH] = exe
        attrs[N.PROCESS_EXECUTABLE_NAME] = os.path.basename(exe)
    elif comm:
        attrs[N.PROCESS_EXECUTABLE_NAME] = comm
    attrs[N.HOST_NAME] = given.get(N.HOST_NAME) or host
    cid = getattr(ident, "container_id", None)
    if cid and N.CONTAINER_ID not in given:
        attrs[N.CONTAINER_ID] = cid
    if N.SERVICE_INSTANCE_ID not in given:  # the same process gives the same id, live or offline
        start = getattr(ident, "start_time", None)
        attrs[N.SERVICE_INSTANCE_ID] = str(uuid.uuid5(INSTANCE_NS, f"{host}/{pid}/{start}"))
    return attrs


def endpoints_from_proc(pid: int) -> dict[int, tuple[str, int, str, int]]:
    """{socket key: (laddr, lport, raddr, rport)} of the process's TCP sockets, from its
    network namespace's /proc/PID/net/tcp{,6}; {} when it is gone. Live only: a slow-peer
    socket may have no snapshot at all (its queue never rises), yet its span needs its ends."""
    from otelwater.hostsockets import netns_inode, tcp_table
    from otelwater.sockkey import addr_text, sock_key

    try:
        ns = netns_inode(pid)
        return {sock_key(ns, e.laddr, e.lport, e.raddr, e.rport):
                (addr_text(e.laddr), e.lport, addr_text(e.raddr), e.rport)
                for e in tcp_table(pid).values()}
    except OSError:
        return {}
    if key is None:     # every socket: {key: ends}
        return {sock_key(ns, e.laddr, e.lport, e.raddr, e.rport):
                (addr_text(e.laddr), e.lport, addr_text(e.raddr), e.rport)
                for e in tcp_table(pid).values()}
    for e in tcp_table(pid).values():
        if sock_key(ns, e.laddr, e.lport, e.raddr, e.rport) == key:
            return addr_text(e.laddr), e.lport, addr_text(e.raddr), e.rport
    return None


class Service:
    """One resource: where its spans go (emit()) and, when `make_pipeline` gives a metric
    reader, a MeterProvider with otelwater's instruments (`observe(key, field)` feeds its
    gauges). make_pipeline() -> (spans, metric reader or None): `spans` is otelwater's own
    span processor (one with add_span(), otlp.spans.SpanExport, shared by a sink's services),
    or any SDK SpanProcessor, which is given each span as a ReadableSpan at its end (tests,
    the in-memory exporter). No TracerProvider: the spans are built from records with their
    own times and ids (otlp.spans), never started and ended through a Tracer."""

    def __init__(self, key: int, attrs: dict, make_pipeline: Callable[[], tuple],
                 extra_readers: Callable[[], list], observe: Callable | None,
                 produce: Callable[[int], list] | None = None):
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import SpanProcessor

        from otelwater.export.otlp.spans import scope

        self.key = key
        self.done = False              # shut down (a retired one is then let go)
        self.resource = Resource(attrs)
        self.scope = scope()
        self.span_processor, self.metric_reader = make_pipeline()
        self._add_span = getattr(self.span_processor, "add_span", None)
        self._nowhere = type(self.span_processor) is SpanProcessor   # metrics only
        self.meter_provider = None
        if self.metric_reader is not None:
            self._meters(key, extra_readers, observe, produce)

    def emit(self, span) -> None:
        """One span (an otlp.spans.SpanData) of this service out."""
        if self._add_span is not None:
            self._add_span(self.resource, span)
        elif not self._nowhere:
            from otelwater.export.otlp.spans import to_readable

            self.span_processor.on_end(to_readable(span, self.resource, self.scope))

    def _meters(self, key, extra_readers, observe, produce) -> None:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope

        from otelwater import __version__
        from otelwater.export.otlp.metrics import add_producer

        # the endpoint's readers first: a Collector that is down cannot use up their deadline
        readers = [*extra_readers(), self.metric_reader]
        if produce is not None:   # the verdict counts, pre-aggregated (otlp.metrics)
            scope = InstrumentationScope(N.SCOPE, __version__)
            for reader in readers:
                add_producer(reader, lambda: produce(key), self.resource, scope)
        self.meter_provider = MeterProvider(resource=self.resource, metric_readers=readers,
                                            shutdown_on_exit=False)
        meter = self.meter_provider.get_meter(N.SCOPE, __version__)

        def gauge(inst, field):
            meter.create_observable_gauge(inst.name, [lambda _o: observe(key, field)],
                                          unit=inst.unit, description=inst.description)

        for field, inst in enumerate((N.WATER_LEVEL, N.WATER_VOLUME, N.WATER_UNREAD,
                                      N.CAPACITY, N.FILL_RATIO)):
            gauge(inst, field)
        i = N.DROPS
        self.drops = meter.create_counter(i.name, unit=i.unit, description=i.description)
        i = N.READ_DURATION
        self.read_duration = meter.create_histogram(
            i.name, unit=i.unit, description=i.description,
            explicit_bucket_boundaries_advisory=list(N.READ_DURATION_BOUNDS_S))
        i = N.ALERTS_ACTIVE
        self.alerts = meter.create_up_down_counter(i.name, unit=i.unit,
                                                   description=i.description)
        i = N.RECORDS_LOST
        self.lost = meter.create_counter(i.name, unit=i.unit, description=i.description)
        i = N.SPANS_LIMITED
        self.limited = meter.create_counter(i.name, unit=i.unit, description=i.description)
        # counters start at 0, so rate() and increase() work from the first point
        if key == OWN:
            for probe in PROBES:
                self.lost.add(0, {N.PROBE: probe})
        else:   # (the verdict counts' series start at 0 too: otelwater.export.tally)
            self.limited.add(0)

    def shutdown(self, timeout_s: float) -> None:
        try:
            if self._add_span is None:  # a span processor of its own (a shared one: the sink's)
                self.span_processor.shutdown()
            if self.meter_provider is not None:
                self.meter_provider.shutdown(timeout_millis=max(1.0, timeout_s * 1000))
        except Exception:  # noqa: BLE001 - a reader out of time (a Collector that is down):
            pass           # what it could not send is counted by the export's health
        finally:
            self.done = True


class Services:
    """The providers by resource key (a traced pid, or OWN), least recently used first; beyond
    MAX_SERVICES the oldest is shut down. `traced`: the pids whose sockets and alerts are
    their own service's; `run`: attributes put on every resource made from now on. Not
    thread-safe: the sink calls it under its lock."""

    def __init__(self, *, make_pipeline: Callable[[], tuple],
                 identity: Callable[[int], object] = identity_from_proc, host: str,
                 traced_pids: Iterable[int] = (), extra_readers: Callable[[], list] = list,
                 observe: Callable | None = None, produce: Callable[[int], list] | None = None,
                 max_services: int = MAX_SERVICES):
        self.make_pipeline = make_pipeline   # -> (SpanProcessor, MetricReader or None)
        self.extra_readers = extra_readers   # -> more MetricReaders per service (Prometheus)
        self.identity = identity
        self.host = host
        self.observe = observe
        self.produce = produce               # key -> more Metrics of each collection
        self.max_services = max_services
        self.by_key: OrderedDict[int, Service] = OrderedDict()
        self.traced: set[int] = set(traced_pids)
        self.identities: dict[int, object] = {}
        self.run: dict = {}
        self.retired: list[Service] = []
        for pid in self.traced:
            self.identity_of(pid)

    def set_run(self, start_ns: int, config=None) -> None:
        """The run's attach time and verdict thresholds (config.correlate), on every resource
        made from now on."""
        self.run[N.START_NS] = int(start_ns)
        c = getattr(config, "correlate", None)
        if c is not None:
            self.run.update({N.THRESHOLD_MS: float(c.threshold_ms),
                             N.RUN_THRESHOLD_MS: float(c.run_threshold_ms),
                             N.WINDOW_MS: float(c.window_ms),
                             N.INCLUDE_IDLE: bool(c.include_idle)})

    def identity_of(self, pid: int, comm: str = ""):
        """The process's identity, read once; `comm` (a record's) names a process that is
        gone before it could be read (a short-lived one) by its program, not as pid-NNNN."""
        if pid in self.identities:
            return self.identities[pid]
        try:
            ident = self.identity(pid)
        except Exception:  # noqa: BLE001 - an unreadable process is named by its pid
            ident = None
        if comm and not (getattr(ident, "exe", None) or getattr(ident, "comm", None)
                         or getattr(ident, "service_name", None)):
            ident = Identity(pid, comm=comm)
        self.identities[pid] = ident
        return ident

    def learn(self, process) -> None:
        """A process described by a record (a recording's ProcessInfo): traced, named so."""
        self.identities[process.pid] = process
        self.traced.add(process.pid)

    def owner(self, pid: int) -> int:
        return pid if pid in self.traced else OWN

    def trace(self, pid: int, comm: str = "") -> None:
        """A pid with Go reads is a traced service: its resource now (its counters at 0 before
        its first verdict). `comm`: its records' process name (identity_of)."""
        if pid not in self.traced:
            self.traced.add(pid)
            self.identity_of(pid, comm)
            self.get(pid)

    def forget(self, pid: int) -> None:
        """Shut the process's service down (its last export on a thread of its own) and
        forget its name; its key is made afresh if it is seen again."""
        self.traced.discard(pid)
        self.identities.pop(pid, None)
        svc = self.by_key.pop(pid, None)
        if svc is not None:
            self._retire(svc)

    def _retire(self, svc: "Service") -> None:
        self.retired = [r for r in self.retired if not r.done]
        self.retired.append(svc)
        threading.Thread(target=svc.shutdown, args=(RETIRE_TIMEOUT_S,), daemon=True).start()

    def get(self, key: int) -> Service:
        svc = self.by_key.get(key)
        if svc is not None:
            self.by_key.move_to_end(key)
            return svc
        if key == OWN:
            attrs = resource_attributes(Identity(os.getpid(), exe=sys.executable,
                                                 service_name=N.OWN_SERVICE), os.getpid(),
                                        self.host)
        else:
            attrs = resource_attributes(self.identity_of(key), key, self.host)
        attrs.update(self.run)
        svc = self.by_key[key] = Service(key, attrs, self.make_pipeline, self.extra_readers,
                                         self.observe, self.produce)
        if len(self.by_key) > self.max_services:
            old_key, old = self.by_key.popitem(last=False)
            # a process seen again later is named afresh (a long run meets many pids)
            self.identities.pop(old_key, None)
            self.traced.discard(old_key)
            self._retire(old)
        return svc

    def all(self) -> list[Service]:
        return list(self.by_key.values()) + list(self.retired)
