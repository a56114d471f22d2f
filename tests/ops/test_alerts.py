"""infra/prometheus/alerts.yml: the alert rules operators asked for, on metrics contracts/metrics.py
defines, checked and unit-tested by promtool where it is installed, and the Kubernetes PrometheusRule
rendered from the same file."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from typing import Any

import pytest
import yaml

from contracts.metrics import METRIC_NAMES
from tests.ops import REPO

PROMETHEUS = REPO / "infra" / "prometheus"
RULES = PROMETHEUS / "alerts.yml"
RULE_TESTS = PROMETHEUS / "alerts-test.yml"
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")


def _rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def _metric(sample_name: str) -> str:
    for suffix in HISTOGRAM_SUFFIXES:
        if sample_name.removesuffix(suffix) in METRIC_NAMES:
            return sample_name.removesuffix(suffix)
    return sample_name


def test_each_rule_watches_defined_metrics_and_says_what_to_do() -> None:
    for rule in _rules():
        names = {_metric(n) for n in re.findall(r"\bqvq_[a-z_]+", rule["expr"])}
        assert names and names <= METRIC_NAMES, (rule["alert"], names - METRIC_NAMES)
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


def test_the_alerts_asked_for_are_there() -> None:
    watched = {name: " ".join(r["expr"] for r in _rules() if name in r["expr"]) for name in (
        "qvq_tasks_total", "qvq_first_token_seconds_bucket", "qvq_queue_oldest_age_seconds",
        "qvq_active_streams", "qvq_flow_wait_seconds_bucket", 'code="budget.exceeded"', "qvq_callback_tries_total",
        "qvq_http_requests_total")}
    assert all(watched.values()), [name for name, expr in watched.items() if not expr]


def test_every_alert_fires_in_a_promtool_unit_test() -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fired = {case["alertname"] for test in tests for case in test["alert_rule_test"] if case["exp_alerts"]}
    quiet = {case["alertname"] for test in tests for case in test["alert_rule_test"] if not case["exp_alerts"]}
    assert fired >= {"QvqTaskErrorRateHigh", "QvqBudgetExhausted", "QvqStuckTasks", "QvqQueueOld",
                     "QvqCallbacksFailing"}
    assert fired & quiet  # the same alerts are also shown quiet on a healthy fleet


@pytest.mark.parametrize("command", [["check", "rules", str(RULES)], ["test", "rules", str(RULE_TESTS)]],
                         ids=["check", "test"])
def test_promtool_accepts_the_rules(command: list[str]) -> None:
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus; .ci/run installs it)")
    result = subprocess.run(["promtool", *command], capture_output=True, text=True, timeout=120, cwd=PROMETHEUS)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_the_kubernetes_prometheus_rule_is_rendered_from_the_rules_file() -> None:
    result = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, 'infra'); import render_rules; "
                             "sys.stdout.write(render_rules.rendered())"],
                            capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 0, result.stderr
    committed = (REPO / "infra" / "kubernetes" / "components" / "monitoring" / "prometheusrule.yaml").read_text()
    assert committed == result.stdout, "run infra/render_rules.py"
    assert yaml.safe_load(committed)["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]
