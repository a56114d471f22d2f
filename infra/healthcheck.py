"""The image's HEALTHCHECK: GET a URL on this container, healthy on a 2xx answer within 3 s.

    python /app/healthcheck.py [URL]    # default: $QVQ_HEALTH_URL, else the worker's /livez

One image runs every role, so each role names its own URL (docker-compose.yml): the API its /readyz,
the emulator /v1/models, Flower /healthcheck; the default suits `qvq worker`: /livez on QVQ_METRICS_PORT
(503 when its consumer stopped taking messages that wait).
Standard library only: it runs in the slim image without the project's imports.
"""

from __future__ import annotations

import os
import sys
import urllib.request

TIMEOUT_S = 3.0


def main(argv: list[str]) -> int:
    port = os.environ.get("QVQ_METRICS_PORT") or "9808"
    url = argv[1] if len(argv) > 1 else os.environ.get("QVQ_HEALTH_URL", f"http://127.0.0.1:{port}/livez")
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:  # noqa: S310 - a fixed local URL
            healthy = 200 <= response.status < 300
    except Exception as exc:
        print(f"unhealthy: {url}: {type(exc).__name__}", file=sys.stderr)
        return 1
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
