"""How a worker shows it is healthy: what lives here.

    health.py    the metrics endpoint (liveness) and the heartbeat file (readiness)
    metrics.py   the task metrics, read off the events the worker publishes
    probe.py     the model endpoint checked at start (a key for DashScope, GET /models)
"""
