"""Alert rules over water snapshots and read latencies, and the pipeline stage that runs them:
pure, no I/O."""

from otelwater.alerts.rules import AlertRules, Hysteresis, SlidingSkew, Thresholds, skewness
from otelwater.alerts.stage import AlertStage, AlertTransition

__all__ = ["AlertRules", "AlertStage", "AlertTransition", "Hysteresis", "SlidingSkew",
           "Thresholds", "skewness"]
