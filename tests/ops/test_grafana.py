"""infra/grafana/qvq-dashboard.json: a Grafana dashboard whose panels query only metrics that
contracts/metrics.py defines, and that shows every one of them."""

from __future__ import annotations

import json
import re
from typing import Any

from contracts.metrics import METRIC_NAMES
from tests.ops import REPO

DASHBOARD = REPO / "infra" / "grafana" / "qvq-dashboard.json"
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")


def _dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def _metric(sample_name: str) -> str:
    for suffix in HISTOGRAM_SUFFIXES:
        if sample_name.endswith(suffix) and sample_name.removesuffix(suffix) in METRIC_NAMES:
            return sample_name.removesuffix(suffix)
    return sample_name


def test_the_dashboard_is_a_grafana_dashboard() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"] and dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["type"] == "timeseries" and set(panel["gridPos"]) == {"h", "w", "x", "y"}
        assert panel["targets"] and all(t["refId"] and t["expr"] for t in panel["targets"])
        assert panel["datasource"]["uid"] == "${datasource}"
    assert [v["name"] for v in dashboard["templating"]["list"]] == ["datasource"]


def test_every_query_names_only_defined_metrics_and_every_metric_is_shown() -> None:
    used = set()
    for panel in _dashboard()["panels"]:
        for target in panel["targets"]:
            names = {_metric(n) for n in re.findall(r"\bqvq_[a-z_]+", target["expr"])}
            assert names and names <= METRIC_NAMES, (panel["title"], names - METRIC_NAMES)
            used |= names
    assert used == METRIC_NAMES


def test_the_panels_the_operators_asked_for_are_there() -> None:
    titles = " | ".join(panel["title"].lower() for panel in _dashboard()["panels"])
    for topic in ("throughput by status", "first token", "active streams", "queue depth", "tokens by model",
                  "cost by model", "waiting by reason", "errors by code"):
        assert topic in titles, topic
