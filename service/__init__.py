"""The HTTP service: settings, the model and its engine, the micro-batcher, routes, metrics, CLI."""
