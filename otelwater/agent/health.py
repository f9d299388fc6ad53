"""The agent's health, for whoever runs it (Kubernetes, systemd, a person with curl): two
plain-text routes served beside /metrics by the agent's HTTP endpoint
(otelwater.export.prometheus.PrometheusEndpoint(port, address, routes=health_routes(state))).

/healthz: liveness. 200 "ok" while the agent's loop goes round: its last round ended less than
`stale_s` ago, or it has not started yet (loading and compiling the probes takes seconds, and
is not a hang). 503 with one line ("stale: the loop last went round 42.0 s ago, more than
10 s") when it has not: a deadlock, a wait that never ends, a loop thread that died. As a
Kubernetes livenessProbe (httpGet path /healthz), a failure is the one thing a restart fixes:
the kubelet kills the container after failureThreshold failures in a row. It stays 200 while
the agent stops (SIGTERM: flushing, detaching), which must not be cut short. `stale_s` must be
longer than the loop's longest round (a sweep, attaching to a new process).

/readyz: readiness. 200 "ready" once the probes are attached and the first sweep is done
(`state.ready`), until the agent starts stopping; 503 "starting: ..." before, 503 "stopping"
after SIGTERM. As a Kubernetes readinessProbe (httpGet path /readyz), a failure never restarts
anything: the pod is left out of its Services' endpoints (so a Prometheus discovering targets
through them scrapes only agents that watch), and a DaemonSet's rolling update waits for the
new pod to be ready before it goes on to the next node (maxUnavailable), so an agent that
cannot attach on a node stops the rollout there instead of taking the watch off every node.
"""

from __future__ import annotations

import time

from otelwater.agent.state import AgentState

STALE_S = 10.0          # the loop may go this long without a round before /healthz fails

HEALTHZ, READYZ = "/healthz", "/readyz"


def liveness(state: AgentState, stale_s: float = STALE_S) -> tuple[int, str]:
    """(200, "ok") while state.alive(stale_s), else (503, why)."""
    if state.alive(stale_s):
        return 200, "ok"
    ago_s = (time.monotonic_ns() - state.last_loop_ns) / 1e9
    return 503, (f"stale: the loop last went round {ago_s:.1f} s ago, more than "
                 f"{stale_s:g} s")


def readiness(state: AgentState) -> tuple[int, str]:
    """(200, "ready") once state.ready and not state.stopping, else (503, why)."""
    if state.stopping:
        return 503, "stopping"
    if not state.ready:
        since_s = (time.monotonic_ns() - state.started_ns) / 1e9
        return 503, (f"starting: the probes are not attached or the first sweep is not done "
                     f"yet ({since_s:.1f} s since start)")
    return 200, "ready"


def health_routes(state: AgentState, stale_s: float = STALE_S) -> dict:
    """{"/healthz": ..., "/readyz": ...}: the routes of a PrometheusEndpoint, each () ->
    (status code, plain-text body), read from `state` at each request (module docstring)."""
    return {HEALTHZ: lambda: liveness(state, stale_s), READYZ: lambda: readiness(state)}
