"""Views of the running server: telemetry, Prometheus metrics, the status page."""
