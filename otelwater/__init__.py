"""otelwater: why are a Go service's TCP reads slow?

Kernel receive-queue "water levels" (eBPF tracepoints) joined to the Go reads of the same
sockets (read-syscall tracepoints or uprobes), exported as OpenTelemetry traces and metrics.
"""

__version__ = "0.1.0"
