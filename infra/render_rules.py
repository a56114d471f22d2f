"""Write the Kubernetes PrometheusRule from infra/prometheus/alerts.yml, the one place the alert rules are
written (tests/ops/test_alerts.py fails when the two differ).

    .venv/bin/python infra/render_rules.py
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

INFRA = Path(__file__).resolve().parent
RULES = INFRA / "prometheus" / "alerts.yml"
OUT = INFRA / "kubernetes" / "components" / "monitoring" / "prometheusrule.yaml"
HEADER = "# Generated from infra/prometheus/alerts.yml by infra/render_rules.py: edit that file, then rerun.\n"


def prometheus_rule(rules: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
            "metadata": {"name": "qvq-queue", "labels": {"app.kubernetes.io/name": "qvq-queue"}},
            "spec": {"groups": rules["groups"]}}


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the expressions) as literal blocks, as alerts.yml writes them."""


def _text(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _text)


def rendered() -> str:
    document = prometheus_rule(yaml.safe_load(RULES.read_text()))
    return HEADER + yaml.dump(document, Dumper=_Dumper, sort_keys=False, width=120, allow_unicode=True)


if __name__ == "__main__":
    OUT.write_text(rendered())
    print(f"wrote {OUT.relative_to(INFRA.parent)}")
