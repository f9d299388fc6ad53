"""The correlator: pure (no BCC, no root, no I/O), used alike by watch, record and correlate.

    join.py      Correlator: the streaming ±window join of snapshots to reads, watermark, bounds
    rules.py     the verdict rules for slow reads (peer-starved, runtime-starved,
                 consumer-lagging, unknown)
    summary.py   per-socket and per-reader summaries: verdict counts, percentiles, peak water
"""

from otelwater.correlate.join import Correlator, CorrelatorConfig
from otelwater.correlate.rules import classify, is_slow
from otelwater.correlate.summary import LogSketch, Summaries

__all__ = ["Correlator", "CorrelatorConfig", "LogSketch", "Summaries", "classify", "is_slow"]
