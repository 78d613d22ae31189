"""/health and /metrics."""
