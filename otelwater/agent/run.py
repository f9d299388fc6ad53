"""`otelwater agent`: the watch, made to run for weeks beside Go services.

    discovery   every `agent.rescan_s` the processes are scanned (otelwater.agent.discover): the
                ones selected and old enough are handed to the one Go read sampler
                (GoReadSampler.set_targets: one set of BPF programs whatever the binaries, each
                binary's Go facts in maps by executable); the ones gone are forgotten. A process
                that cannot be traced (an unreadable binary, a uprobe refused) is logged and
                counted once, and the agent serves the others.
    pipeline    the watch's: the kernel probe and the sampler, the analysis, and the export
                sinks (OTLP, the Prometheus endpoint); AgentSink counts what flows and turns
                notices into log lines.
    operating   AgentState (the loop writes, the HTTP endpoint and the self-metrics read):
                /healthz, /readyz, the agent's own metrics; JSON log lines on stderr.
    the end     SIGTERM, SIGINT or --duration: the probes detach and hand over what their ring
                buffers hold, the reads pending get their verdicts, the exporters flush within a
                deadline. SIGKILL: the kernel drops every program and link with the process's
                file descriptors (nothing of otelwater is pinned), docs/privileges.md shows how
                to check.
"""

from __future__ import annotations

import os
import time

from otelwater.agent.discover import Scanner, Selection, exe_key
from otelwater.agent.logs import LogStream
from otelwater.agent.state import AgentState
from otelwater.export.sink import RunInfo, Sink
from otelwater.pipeline import Analysis, Pipeline, Stopper, WatchLoop

CGROUPS_EVERY_S = 2.0   # --cgroup: the cgroups below looked up again this often (new containers)
TRIM_EVERY_S = 2.0      # the C heap's free pages go back to the system this often
FORGET_AFTER_S = 30.0   # an exited process's export identity is kept this long (late verdicts)


def _running(pid: int) -> bool:
    """The process runs (a zombie, exited but not reaped yet, does not)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except (OSError, IndexError):
        return False


class AgentSink(Sink):
    """What flows through the pipeline, counted into the state; notices as log lines."""

    name = "agent log"
    ignores = frozenset({"alert", "process", "summary", "verdict", "counts"})

    def __init__(self, state: AgentState, log):
        self.state = state
        self.log = log
        self._lost: dict[str, int] = {}

    def on_snapshot(self, _s) -> None:
        self.state.records_seen += 1

    def on_read(self, _r) -> None:
        self.state.records_seen += 1

    def on_lost(self, r) -> None:
        total = getattr(r, "lost_total", None)
        if total is not None:
            self._lost[r.probe] = max(self._lost.get(r.probe, 0), int(total))
            self.state.records_lost = sum(self._lost.values())

    def on_notice(self, n) -> None:
        self.log.notice(n)


class Agent:
    """The agent's own work each round of the watch loop (WatchLoop.chores)."""

    def __init__(self, *, selection: Selection, config, state: AgentState, log, sampler,
                 water, exporter=None, library_logs=None, forget_process=None):
        a = config.agent
        self.forget_process = forget_process    # pid -> None: the analysis forgets it
        self.selection = selection
        self.state = state
        self.log = log
        self.sampler = sampler
        self.water = water
        self.exporter = exporter
        self.library_logs = library_logs    # its flush() says the counts of repeated lines
        self.scanner = Scanner(selection, a.min_age_s)
        self.rescan_s = a.rescan_s
        self.max_processes = int(a.max_processes)
        self.traced: dict[int, str] = {}        # pid -> executable path
        self.failed: dict[int, str] = {}        # pid -> why (not tried again while it lives)
        self.exited: dict[int, float] = {}      # pid -> when it was forgotten (export)
        self._next_scan = 0.0
        self._next_trim = time.monotonic() + TRIM_EVERY_S
        self._next_cgroups = time.monotonic() + CGROUPS_EVERY_S
        self._said_denied = False

    def chores(self) -> list:
        now = time.monotonic()
        self.state.last_loop_ns = time.monotonic_ns()
        if now < self._next_scan:
            return []
        self._next_scan = now + self.rescan_s
        self.scan()
        self._counts()
        if self.selection.cgroups and now >= self._next_cgroups:
            # containers started since: their cgroups into the kernel's filter
            self._next_cgroups = now + CGROUPS_EVERY_S
            self.water.refresh_cgroups()
        if now >= self._next_trim:
            from otelwater.probes.loader import trim_heap

            self._next_trim = now + TRIM_EVERY_S
            trim_heap()
        if self.library_logs is not None:
            self.library_logs.flush()
        self.state.ready = True
        return []

    def scan(self) -> None:
        result = self.scanner.scan()
        found = result.targets
        if result.denied and not self._said_denied:
            self._said_denied = True
            from otelwater.probes.host import missing_capabilities

            if "CAP_SYS_PTRACE" in missing_capabilities():
                self.log.warning("process.denied", f"{result.denied} processes' executables "
                                 "cannot be read (/proc/PID/exe refused): they are not "
                                 "traced; grant CAP_SYS_PTRACE (docs/privileges.md)",
                                 processes=result.denied)
            else:   # held: refused by a security module (AppArmor, Yama) or a user namespace
                self.log.info("process.denied", f"{result.denied} processes' executables "
                              "cannot be read (/proc/PID/exe refused although CAP_SYS_PTRACE "
                              "is held: a security module or another user namespace): they "
                              "are not traced", processes=result.denied)
        for pid in [p for p in self.failed if p not in found]:
            del self.failed[pid]                      # gone: a new process may take its pid
        wanted = {pid: path for pid, path in found.items() if pid not in self.failed}
        if len(wanted) > self.max_processes:
            keep = sorted(wanted, key=lambda p: (p not in self.traced, p))[:self.max_processes]
            for pid in wanted.keys() - set(keep):
                self._failed(pid, wanted[pid], "too-many",
                             f"more than agent.max_processes = {self.max_processes} processes "
                             "to trace; raise it, or select fewer (--pid, --go-binary, "
                             "--cgroup, --port)")
            wanted = {pid: wanted[pid] for pid in keep}
        for pid, why in self.sampler.set_targets(wanted).items():
            self._failed(pid, wanted[pid], "unreadable" if "cannot read" in why else "refused",
                         why)
        traced = self.sampler.watched_pids()
        for pid in sorted(traced - self.traced.keys()):
            self._picked_up(pid, wanted.get(pid, ""))
        for pid in sorted(self.traced.keys() - traced):
            path = self.traced.pop(pid)
            alive = _running(pid)
            if not alive:
                self.state.processes_exited += 1
            self.exited[pid] = time.monotonic()
            self.log.info("process.forgotten", f"pid {pid} ({os.path.basename(path)}) "
                          + ("exited" if not alive else "is no longer selected"),
                          pid=pid, exe=path)
        self.state.processes_traced = len(self.traced)
        self._forget_exports()

    def _picked_up(self, pid: int, path: str) -> None:
        self.traced[pid] = path
        self.state.processes_started += 1
        binary = self.sampler.binary_of(pid)
        info = getattr(binary, "info", None)
        key = exe_key(f"/proc/{pid}/exe")
        if key is not None and info is not None:
            self.scanner.trust(key)     # its restarts are taken at once
        fields = {"pid": pid, "exe": path}
        if info is not None:
            fields["go_version"] = info.go_version
        else:
            fields["go_version"] = None
            fields["why"] = getattr(binary, "why_no_goid", "")
        self.log.info("process.traced", f"tracing pid {pid} ({os.path.basename(path)}"
                      + (f", {info.go_version})" if info is not None else
                         ", without goroutine ids)"), **fields)
        try:
            self.water.learn_listeners([pid])   # its namespace's listeners: roles of sockets
        except Exception as e:  # noqa: BLE001 - a process that vanished meanwhile
            self.log.debug("process.listeners", f"pid {pid}: {e}", pid=pid)

    def _failed(self, pid: int, path: str, reason: str, why: str) -> None:
        if pid in self.failed:
            return
        self.failed[pid] = why
        self.state.fail(reason)
        self.log.warning("process.failed", f"pid {pid} cannot be traced: {why}", pid=pid,
                         exe=path, reason=reason)

    def _forget_exports(self) -> None:
        """Exited processes' export identities, once their last verdicts are out."""
        if not self.exited:
            return
        cutoff = time.monotonic() - FORGET_AFTER_S
        forget = getattr(self.exporter, "forget", None)
        for pid in [p for p, t in self.exited.items() if t < cutoff]:
            del self.exited[pid]
            if pid in self.traced:
                continue
            if forget is not None:
                forget(pid)
            if self.forget_process is not None:      # its alert state (read_skew by process)
                self.forget_process(pid)

    def _counts(self) -> None:
        st = self.state
        st.sockets_watched = getattr(self.water, "socket_count", 0)
        try:
            stats = self.sampler.stats()
            st.unknown_reads = stats.unknown
        except Exception:  # noqa: BLE001 - closed at the end
            pass
        health = getattr(self.exporter, "health", None)
        if health is not None:
            st.queue_drops = health.overflowed + health.records_dropped
            st.export_failures = (health.spans_dropped - health.overflowed
                                  + health.points_dropped)


def run_agent(*, selection: Selection, config, log, state: AgentState | None = None,
              otlp=None, endpoint=None, duration: float | None = None, interval: float = 1.0,
              ringbuf_pages: int = 64, library_logs=None) -> AgentState:
    """Run until SIGTERM/SIGINT or the duration; returns the final state."""
    from otelwater.events.links import LinkKeys
    from otelwater.export.prometheus import export_sink
    from otelwater.probes.goread import GoReadOptions, GoReadSampler
    from otelwater.probes.kernel import WaterOptions, WaterProbe
    from otelwater.probes.loader import release_compiler_memory

    state = state or AgentState()
    a, c, ln = config.agent, config.correlate, config.links
    exporter = None
    if otlp is not None or endpoint is not None:
        exporter = export_sink(otlp, endpoint, window_ns=c.window_ns,
                               span_rate=config.export.span_rate or None,
                               out=LogStream(log, "export"))
    sinks = [AgentSink(state, log)] + ([exporter] if exporter is not None else [])
    water_opts = WaterOptions(ports=selection.ports, pids=selection.pids,
                              cgroups=frozenset(selection.cgroups),
                              ringbuf_pages=ringbuf_pages,
                              still_reports=max(3, config.alerts.surge_window),
                              still_ns=config.alerts.hold_ns)
    read_opts = GoReadOptions(dynamic=True, by_exe=selection.by_exe, mechanism=a.probes,
                              threshold_ns=c.threshold_ns, embed=True,
                              ringbuf_pages=ringbuf_pages, run_ns=c.run_threshold_ns,
                              record_rate=c.record_rate, include_idle=c.include_idle,
                              links=LinkKeys(ln.trace_key, ln.span_key, ln.encoding)
                              if ln.enabled else None)

    def stopping(signum):
        state.stopping = True
        log.info("agent.stopping", f"signal {signum}: flushing and detaching", signal=signum)

    from otelwater.agent.selfmetrics import SelfMetrics

    t0 = time.monotonic()
    t_traced = None     # when the probes were attached and the loop began
    bpfs: list = []     # the water probe's program (the sampler's is in it), once loaded
    with SelfMetrics(state, otlp=otlp, endpoint=endpoint,
                     bpf_objects=lambda: list(bpfs)) as self_metrics, \
            Pipeline(sinks=sinks, out=LogStream(log, "pipeline")) as pipeline, \
            Stopper(on_signal=stopping) as stopper, GoReadSampler(read_opts) as sampler, \
            WaterProbe(water_opts, readers=sampler) as water:
        bpfs.append(water._bpf)
        dropped = release_compiler_memory()   # weeks of running: the compiler's pages go
        log.debug("agent.compiled", f"compiler pages dropped: {dropped >> 20} MiB",
                  dropped_bytes=dropped)
        start_ns = time.monotonic_ns()
        pipeline.analysis = Analysis(config, start_ns=start_ns, summaries=False)
        what = selection.describe()
        pipeline.start(RunInfo(start_ns, config, pids=tuple(selection.pids), what=what))
        agent = Agent(selection=selection, config=config, state=state, log=log,
                      sampler=sampler, water=water, exporter=exporter,
                      library_logs=library_logs,
                      forget_process=lambda pid: pipeline.emit(
                          pipeline.analysis.alerts.forget_process(pid, time.monotonic_ns())))
        log.info("agent.started", f"tracing {what} by {a.probes}s, TCP receive queues of "
                 + (f"the selected sockets" if selection.pids or selection.ports
                    or selection.cgroups else "every socket"),
                 selection=what, probes=a.probes, min_age_s=a.min_age_s,
                 otlp=getattr(otlp, "target", None),
                 listen=getattr(endpoint, "url", None), pid=os.getpid())
        t_traced = time.monotonic()
        pipeline.run_live(WatchLoop(water, pipeline.feed, interval_s=interval,
                                    duration_s=duration, readers=sampler,
                                    chores=agent.chores), stopper)
        state.stopping = True
        agent._counts()
        # the agent's own last export goes beside the services' (the pipeline's close): one
        # deadline for both, not one after the other (a Collector down cost 2 x 5 s)
        self_metrics.start_close()
    ended = time.monotonic()
    tracing = f"{ended - t_traced:.0f} s of tracing ({ended - t0:.0f} s with start-up)" \
        if t_traced is not None else f"{ended - t0:.0f} s, before tracing began"
    log.info("agent.stopped", f"stopped after {tracing}: "
             f"{state.processes_started} processes traced, {state.records_seen} records, "
             f"{state.records_lost} lost", processes_started=state.processes_started,
             processes_failed=state.processes_failed, records_seen=state.records_seen,
             records_lost=state.records_lost, queue_drops=state.queue_drops,
             export_failures=state.export_failures)
    return state
