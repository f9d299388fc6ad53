"""Alert rules over water snapshots and read latencies, and the pipeline stage that runs them:
pure, no I/O."""

from otelwater.alerts.rules import AlertRules, Hysteresis, TailWatch, Thresholds, read_latency
from otelwater.alerts.stage import AlertStage, AlertTransition

__all__ = ["AlertRules", "AlertStage", "AlertTransition", "Hysteresis", "TailWatch",
           "Thresholds", "read_latency"]
