"""Observability: one Prometheus registry and the process memory sampler."""
