"""Adapter routing: registry, router, merging, logit fusion, training."""
