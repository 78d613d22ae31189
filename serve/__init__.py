"""The serving side: HTTP API, engine, pipeline, CLI."""
