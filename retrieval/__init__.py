"""Cross-task demonstration retrieval: data sources, embedder, store, prompt assembly."""
