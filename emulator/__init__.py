"""A QVQ-compatible server (DashScope compatible mode) for the demo, tests and benchmarks.

server.py runs it (EmulatorServer in a thread, serve() for the CLI); app.py holds the routes;
request.py checks a body; images.py reads image parts; script.py writes the deterministic thinking
and answer; stream.py sends them as SSE chunks at the configured pace; directives.py and faults.py
read per-request settings and injected faults from the prompt; config.py, errors.py, stats.py hold
the settings, the service's error bodies and the counters at GET /_emulator/stats.
"""
