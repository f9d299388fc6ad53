"""Sinks: the live terminal view, JSON Lines, and (later) OTLP."""
