"""The engine: models, architecture adapters, tracing primitives, plugins, jobs."""
