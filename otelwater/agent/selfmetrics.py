"""The agent's metrics about itself: one OpenTelemetry MeterProvider, read from the AgentState,
the process (psutil) and the agent's BPF objects (otelwater.probes.bpfinfo) when collected,
exported over OTLP (a PeriodicExportingMetricReader every `interval_s`) and/or served by the
agent's PrometheusEndpoint (its reader(): collected at each scrape).

    metrics = SelfMetrics(state, otlp=opts, endpoint=endpoint,
                          bpf_objects=lambda: [probe._bpf for probe in probes])
    ...
    metrics.close(timeout_s)

Resource: service.name "otelwater-agent" (the agent's own OTEL_SERVICE_NAME or
OTEL_RESOURCE_ATTRIBUTES service.name first, and all its OTEL_RESOURCE_ATTRIBUTES: e.g.
k8s.pod.name from the downward API), service.version (otelwater's), service.instance.id,
host.name, process.pid, process.executable.name/path: otlp.resources.resource_attributes, as
for a traced service.

Instruments (Prometheus names in brackets), all observed at collection, nothing recorded on the
loop's thread:

    otelwater.agent.processes           gauge    traced now        [otelwater_agent_processes]
    otelwater.agent.processes.started   counter  picked up         [..._processes_started_total]
    otelwater.agent.processes.exited    counter  forgotten after they exited
    otelwater.agent.processes.failed    counter  could not be traced, by `reason` (a series
                                                 appears with its reason's first failure)
    otelwater.agent.records             counter  delivered by the ring buffers
    otelwater.agent.records.lost        counter  the kernel could not put on a ring buffer
    otelwater.agent.export.dropped      counter  spans the export queues dropped
    otelwater.agent.export.failures     counter  export failures the pipeline counted
    otelwater.agent.sockets             gauge    sockets the kernel probe holds
    process.cpu.time                    counter  s, by cpu.mode user/system [process_cpu_time_
                                                 seconds_total] (semantic conventions)
    process.memory.usage                updown   By, resident (RSS) [process_memory_usage_bytes]
    otelwater.agent.bpf.run_time        counter  s, by bpf.program   [..._bpf_run_time_seconds_
                                                 total]: only while the kernel counts it
    otelwater.agent.bpf.runs            counter  by bpf.program, the same
    otelwater.agent.bpf.map.entries     gauge    by bpf.map: hash maps only
    otelwater.agent.bpf.map.max_entries gauge    by bpf.map: every map

BPF run time: the kernel counts it only while its BPF statistics are on (kernel.bpf_stats_enabled
=1, or some process's BPF_ENABLE_STATS fd); the agent never turns them on (that needs
CAP_SYS_ADMIN and costs every BPF program of the machine), so a program's run_time and runs
series are there only once the kernel has counted its runs (bpfinfo.counted), and say the runs
made while the statistics were on. Programs and maps are named as BCC names them; programs or
maps of the same name in several objects are summed.

Cost. The program and map facts are one syscall each (a few µs), read at most once a second
whatever the number of readers and instruments. Map entries are counted by reading the keys
(bpfinfo.map_entries: BPF_MAP_LOOKUP_BATCH, else BPF_MAP_GET_NEXT_KEY), at most once every
`interval_s` (10 s), each map's count kept in between: a full 65,536-entry LRU hash (water.c's
socket table) took 22-30 ms of CPU by batches on the 2-vCPU test VM (the GIL released during
the syscalls; 121-149 ms one key at a time where the kernel has no batch lookup), so about
0.3% of a CPU at the default interval; the first collection after each interval pays it (a
scrape's answer is that much later: 50 ms while the other vCPU was busy).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import threading
import time
from typing import Callable, Iterable

from otelwater import __version__
from otelwater.agent.state import AgentState
from otelwater.names import Instrument
from otelwater.probes import bpfinfo

AGENT_SERVICE = "otelwater-agent"
SCOPE = "otelwater.agent"
INTERVAL_S = 10.0               # OTLP export, and map entries counted at most this often
FACTS_FRESH_S = 1.0             # program and map facts read at most this often
CLOSE_TIMEOUT_S = 5.0

# attributes
SERVICE_VERSION = "service.version"
REASON = "reason"                    # why a process could not be traced (AgentState.fail)
CPU_MODE = "cpu.mode"                # semantic conventions: user | system
BPF_PROGRAM = "bpf.program"          # BCC's name of the program
BPF_MAP = "bpf.map"                  # BCC's name of the map

PROCESSES = Instrument("otelwater.agent.processes", "gauge", "{process}",
                       "Go processes the agent traces now.")
PROCESSES_STARTED = Instrument("otelwater.agent.processes.started", "counter", "{process}",
                               "Go processes the agent picked up to trace.")
PROCESSES_EXITED = Instrument("otelwater.agent.processes.exited", "counter", "{process}",
                              "Traced processes that exited and were forgotten.")
PROCESSES_FAILED = Instrument("otelwater.agent.processes.failed", "counter", "{process}",
                              "Go processes the agent could not trace, by reason.")
RECORDS = Instrument("otelwater.agent.records", "counter", "{record}",
                     "Records the probes' ring buffers delivered.")
RECORDS_LOST = Instrument("otelwater.agent.records.lost", "counter", "{record}",
                          "Records the kernel could not put on a full ring buffer.")
EXPORT_DROPPED = Instrument("otelwater.agent.export.dropped", "counter", "{span}",
                            "Spans the export queues dropped (full: the oldest first).")
EXPORT_FAILURES = Instrument("otelwater.agent.export.failures", "counter", "{failure}",
                             "Export failures (a sink or an exporter) the pipeline counted.")
SOCKETS = Instrument("otelwater.agent.sockets", "gauge", "{socket}",
                     "Sockets the kernel probe holds now.")
CPU_TIME = Instrument("process.cpu.time", "counter", "s",
                      "CPU time the agent process used, by cpu.mode (user, system).")
MEMORY_USAGE = Instrument("process.memory.usage", "updowncounter", "By",
                          "Physical memory the agent process uses (resident set size).")
BPF_RUN_TIME = Instrument("otelwater.agent.bpf.run_time", "counter", "s",
                          "Time the agent's BPF programs ran, by program: counted by the "
                          "kernel only while kernel.bpf_stats_enabled=1 (or a BPF_ENABLE_STATS "
                          "fd) is on.")
BPF_RUNS = Instrument("otelwater.agent.bpf.runs", "counter", "{run}",
                      "Runs of the agent's BPF programs, by program: counted by the kernel "
                      "only while its BPF statistics are on.")
BPF_MAP_ENTRIES = Instrument("otelwater.agent.bpf.map.entries", "gauge", "{entry}",
                             "Entries in the agent's BPF hash maps, by map (counted at most "
                             "once an export interval).")
BPF_MAP_MAX_ENTRIES = Instrument("otelwater.agent.bpf.map.max_entries", "gauge", "{entry}",
                                 "Capacity of the agent's BPF maps, by map (max_entries: bytes "
                                 "for a ring buffer).")

INSTRUMENTS = (PROCESSES, PROCESSES_STARTED, PROCESSES_EXITED, PROCESSES_FAILED, RECORDS,
               RECORDS_LOST, EXPORT_DROPPED, EXPORT_FAILURES, SOCKETS, CPU_TIME, MEMORY_USAGE,
               BPF_RUN_TIME, BPF_RUNS, BPF_MAP_ENTRIES, BPF_MAP_MAX_ENTRIES)

# AgentState field of each instrument read straight from it
STATE_FIELDS = {PROCESSES: "processes_traced", PROCESSES_STARTED: "processes_started",
                PROCESSES_EXITED: "processes_exited", RECORDS: "records_seen",
                RECORDS_LOST: "records_lost", EXPORT_DROPPED: "queue_drops",
                EXPORT_FAILURES: "export_failures", SOCKETS: "sockets_watched"}


def agent_resource_attributes(host: str | None = None) -> dict:
    """The agent's resource (module docstring), built as a traced service's is."""
    from otelwater.export.otlp.resources import (Identity, identity_from_proc,
                                                 own_host_name, resource_attributes)

    pid = os.getpid()
    try:
        own = identity_from_proc(pid)
    except Exception:  # noqa: BLE001 - /proc unreadable: named by what Python knows
        own = None
    if own is None:
        own = Identity(pid, exe=sys.executable, service_name=AGENT_SERVICE)
    elif not getattr(own, "service_name", None):
        own = dataclasses.replace(own, service_name=AGENT_SERVICE)
    attrs = resource_attributes(own, pid, host or own_host_name())
    attrs[SERVICE_VERSION] = __version__
    return attrs


class BpfFacts:
    """What the agent's BPF objects say, read at most once every FACTS_FRESH_S, the map
    entries at most once every `entries_every_s` (module docstring). Thread-safe: the readers
    collect from their own threads."""

    def __init__(self, objects: Callable[[], Iterable], entries_every_s: float = INTERVAL_S,
                 now: Callable[[], float] = time.monotonic):
        self.objects = objects
        self.entries_every_s = entries_every_s
        self.now = now
        self.errors = 0                  # objects that could not be read (closed meanwhile)
        self.programs: dict[str, tuple[int, int]] = {}    # name -> (run_time_ns, run_cnt)
        self.maps: dict[str, tuple[int | None, int]] = {}  # name -> (entries, max_entries)
        self._read_at: float | None = None
        self._counted_at: float | None = None
        self._entries: dict[int, int | None] = {}          # map id -> its last count
        self._lock = threading.Lock()

    def read(self) -> "BpfFacts":
        with self._lock:
            t = self.now()
            if self._read_at is not None and t - self._read_at < FACTS_FRESH_S:
                return self
            count = self._counted_at is None or t - self._counted_at >= self.entries_every_s
            programs: dict[str, tuple[int, int]] = {}
            maps: dict[str, tuple[int | None, int]] = {}
            entries: dict[int, int | None] = {}
            enabled = bpfinfo.stats_enabled()
            try:
                objects = list(self.objects())
            except Exception:  # noqa: BLE001 - the agent's own callable: never a dead reader
                objects = []
                self.errors += 1
            for obj in objects:
                try:
                    self._read_object(obj, enabled, count, programs, maps, entries)
                except Exception:  # noqa: BLE001 - closed under us, a fd reused: skip it
                    self.errors += 1
            self.programs, self.maps, self._entries = programs, maps, entries
            self._read_at = t
            if count:
                self._counted_at = t
            return self

    def _read_object(self, obj, enabled: bool, count: bool, programs: dict, maps: dict,
                     entries: dict) -> None:
        for name, fd in bpfinfo.programs_of(obj).items():
            p = bpfinfo.prog_info(fd)
            if bpfinfo.counted(p, enabled):
                t, n = programs.get(name, (0, 0))
                programs[name] = (t + p.run_time_ns, n + p.run_cnt)
        for name, fd in bpfinfo.maps_of(obj).items():
            m = bpfinfo.map_info(fd)
            if count or m.id not in self._entries:
                entries[m.id] = bpfinfo.map_entries(fd, m)
            else:
                entries[m.id] = self._entries[m.id]
            n, cap = maps.get(name, (None, 0))
            e = entries[m.id]
            maps[name] = (e if n is None else n + (e or 0), cap + m.max_entries)


class SelfMetrics:
    """The agent's own MeterProvider (module docstring). `otlp`: an
    otelwater.export.otlp.ExportOptions (its metric exporter, every `interval_s`); `endpoint`:
    a PrometheusEndpoint (a reader of its own); `readers`: more MetricReaders (tests);
    `bpf_objects`: () -> the BCC BPF objects the agent holds now."""

    def __init__(self, state: AgentState, *, otlp=None, endpoint=None,
                 bpf_objects: Callable[[], Iterable] = lambda: [],
                 interval_s: float = INTERVAL_S, readers: Iterable = (),
                 host: str | None = None, now: Callable[[], float] = time.monotonic):
        import psutil
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.resources import Resource

        self.state = state
        self.interval_s = interval_s
        self.bpf = BpfFacts(bpf_objects, interval_s, now)
        self._process = psutil.Process()
        self._exporter = None
        self._closed = False
        self._closing: threading.Thread | None = None   # start_close()'s thread
        self._deadline = 0.0
        # the OTLP reader last: the provider shuts its readers down in order, under one
        # deadline, and the OTLP one's last export may use all of it (a Collector down)
        all_readers = list(readers)
        if endpoint is not None:
            all_readers.append(endpoint.reader())
        if otlp is not None:
            from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

            self._exporter = otlp.metric_exporter()
            all_readers.append(PeriodicExportingMetricReader(
                self._exporter, export_interval_millis=interval_s * 1000))
        self.resource = Resource(agent_resource_attributes(host))
        self.provider = MeterProvider(resource=self.resource, metric_readers=all_readers,
                                      shutdown_on_exit=False)
        self._instruments(self.provider.get_meter(SCOPE, __version__))

    def _instruments(self, meter) -> None:
        from opentelemetry.metrics import Observation

        make = {"gauge": meter.create_observable_gauge,
                "counter": meter.create_observable_counter,
                "updowncounter": meter.create_observable_up_down_counter}

        def observe(inst: Instrument, callback) -> None:
            make[inst.kind](inst.name, [callback], unit=inst.unit, description=inst.description)

        def field_of(name: str):
            return lambda _options: [Observation(getattr(self.state, name))]

        for inst, name in STATE_FIELDS.items():
            observe(inst, field_of(name))
        observe(PROCESSES_FAILED, lambda _o: [
            Observation(n, {REASON: str(reason)})
            for reason, n in dict(self.state.failures_by_reason).items()])
        observe(CPU_TIME, self._cpu)
        observe(MEMORY_USAGE, lambda _o: [Observation(self._process.memory_info().rss)])
        observe(BPF_RUN_TIME, lambda _o: [
            Observation(t / 1e9, {BPF_PROGRAM: name})
            for name, (t, _) in self.bpf.read().programs.items()])
        observe(BPF_RUNS, lambda _o: [
            Observation(n, {BPF_PROGRAM: name})
            for name, (_, n) in self.bpf.read().programs.items()])
        observe(BPF_MAP_ENTRIES, lambda _o: [
            Observation(n, {BPF_MAP: name})
            for name, (n, _) in self.bpf.read().maps.items() if n is not None])
        observe(BPF_MAP_MAX_ENTRIES, lambda _o: [
            Observation(cap, {BPF_MAP: name}) for name, (_, cap) in self.bpf.read().maps.items()])

    def _cpu(self, _options) -> list:
        from opentelemetry.metrics import Observation

        t = self._process.cpu_times()
        return [Observation(t.user, {CPU_MODE: "user"}),
                Observation(t.system, {CPU_MODE: "system"})]

    def __enter__(self) -> "SelfMetrics":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start_close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Begin shutting the provider down (its readers' last collection and the OTLP
        reader's last export) on a thread of its own, so the agent's stop waits for it and the
        services' export side by side, under one deadline, not one after the other."""
        if self._closing is not None:
            return
        self._deadline = time.monotonic() + max(0.0, timeout_s)

        def shutdown() -> None:
            try:
                self.provider.shutdown(timeout_millis=max(1.0, timeout_s * 1000))
            except Exception as e:  # noqa: BLE001 - the SDK raises when a reader timed out
                logging.getLogger(__name__).warning("self-metrics shut down incompletely: %s",
                                                    str(e).replace("\n", " "))

        self._closing = threading.Thread(target=shutdown, name="otelwater-selfmetrics-close",
                                         daemon=True)
        self._closing.start()

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Shut the provider down (the OTLP reader's last export included) within `timeout_s`
        of start_close() (called here when it was not): past it, the exporter is shut, which
        ends its retries. Never raises (a reader that failed to shut down, a Collector down:
        logged by the SDK, or here)."""
        if self._closed:
            return
        self._closed = True
        self.start_close(timeout_s)
        t = self._closing
        t.join(max(0.0, self._deadline - time.monotonic()))
        if t.is_alive() and self._exporter is not None:
            try:
                self._exporter.shutdown()
            except Exception:  # noqa: BLE001
                pass
            t.join(0.5)
