"""Event model: what the probes report, as frozen dataclasses in integer nanoseconds."""
