"""Operations: metrics, probes, logs as data, and the deployment files (compose, Dockerfile, Kubernetes,
Grafana) checked offline."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Scrape:
    """A Prometheus text page, parsed: family names and sample values by (name, labels)."""

    def __init__(self, text: str) -> None:
        self.families = {family.name: family for family in text_string_to_metric_families(text)}
        self.samples = {(s.name, frozenset(s.labels.items())): s.value
                        for family in self.families.values() for s in family.samples}

    def value(self, name: str, **labels: str) -> float:
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def has(self, metric: str) -> bool:
        """Whether the page declares `metric` (its exported name; counters are parsed without _total)."""
        return metric in self.families or metric.removesuffix("_total") in self.families


def schemas_dir() -> Path | None:
    """Third-party schemas (compose-spec, KEDA's CRDs) are not vendored in the repository: they are read
    from QVQ_TEST_SCHEMAS_DIR, else from shared/schemas beside the checkout; None when absent."""
    for candidate in (os.environ.get("QVQ_TEST_SCHEMAS_DIR"), REPO.parent / "shared" / "schemas"):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None
