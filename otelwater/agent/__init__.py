"""`otelwater agent`: the long-running mode (discovery of Go processes, health, self-metrics,
structured logs). See otelwater.agent.run."""
