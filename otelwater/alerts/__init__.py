"""Alert rules over water snapshots (and, later, read latencies): pure, no I/O."""
