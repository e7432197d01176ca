"""Use cases: what the API and the dashboard may ask of the service, each once, on top of
the stores. Routes and pages are thin: they parse, call one use case, and render."""
