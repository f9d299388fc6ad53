"""Analyses over recorded or streamed water series: pure, no I/O (rainwater: the water a
socket's queue held between its surges)."""

from otelwater.analysis.rainwater import RainFigure, RainGauge, RainGauges, trapped

__all__ = ["RainFigure", "RainGauge", "RainGauges", "trapped"]
