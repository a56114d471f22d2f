"""docker-compose.yml: valid Compose, healthchecks and health conditions everywhere, only four published
ports (configurable, on 127.0.0.1 by default), no secret with a default, limits and rotated logs on every
container, scalable workers found by Prometheus with the alert rules, Flower scraped, Grafana provisioned,
and a stop grace period that covers the task limit."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.ops import REPO, schemas_dir

COMPOSE = REPO / "docker-compose.yml"
PUBLISHED = {"api", "flower", "minio", "grafana"}
SECRETS = {"REDIS_PASSWORD", "POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "QVQ_API_KEYS", "QVQ_WEBHOOK_API_KEY",
           "QVQ_WEBHOOK_SECRET", "FLOWER_PASSWORD", "GRAFANA_ADMIN_PASSWORD"}
ONE_SHOT = {"minio-init"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE.read_text()))


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return dict(compose["services"])


#: Debian's docker-compose package ships an (older) copy of the Compose specification's schema.
DEBIAN_COMPOSE_SCHEMA = Path("/usr/lib/python3/dist-packages/compose/config/compose_spec.json")


def _compose_schema() -> Path | None:
    directory = schemas_dir()
    for candidate in (directory / "compose-spec.json" if directory else None, DEBIAN_COMPOSE_SCHEMA):
        if candidate is not None and candidate.exists():
            return candidate
    return None


def test_compose_file_matches_the_compose_specification(compose: dict[str, Any]) -> None:
    path = _compose_schema()
    if path is None:
        pytest.skip("no compose-spec schema (QVQ_TEST_SCHEMAS_DIR, shared/schemas, or apt docker-compose)")
    schema = json.loads(path.read_text())
    errors = [f"{list(e.path)}: {e.message}" for e in jsonschema.Draft7Validator(schema).iter_errors(compose)]
    assert errors == []


def test_docker_compose_config_accepts_the_file_with_secrets_and_refuses_it_without(tmp_path: Path) -> None:
    command = next((c for c in (["docker", "compose"], ["docker-compose"]) if _runs([*c, "version"])), None)
    if command is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    filled = tmp_path / ".env"
    filled.write_text((REPO / ".env.example").read_text() + "".join(
        f"{name}={'uploads:' if name == 'QVQ_API_KEYS' else ''}secret-{name.lower().replace('_', '-')}-0123456789\n"
        for name in SECRETS))

    def config(env_file: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*command, "--env-file", str(env_file), "-f", str(COMPOSE), "config", "--quiet"],
                              capture_output=True, text=True, timeout=60, cwd=REPO,
                              env={"PATH": "/usr/local/bin:/usr/bin:/bin"})

    accepted = config(filled)
    assert accepted.returncode == 0, accepted.stderr
    refused = config(REPO / ".env.example")  # copied unchanged: its secrets are empty
    assert refused.returncode != 0 and any(name in refused.stderr for name in SECRETS), refused.stderr


def test_no_secret_has_a_default_and_every_one_is_required() -> None:
    text = COMPOSE.read_text()
    for name in SECRETS:
        uses = re.findall(r"\$\{" + name + r"(:?[-?][^}]*)?\}", text)
        assert uses, name
        assert all(use.startswith(":?") for use in uses), (name, uses)
    example = dict(re.findall(r"^([A-Z_][A-Z0-9_]*)=(.*)$", (REPO / ".env.example").read_text(), re.M))
    assert all(example[name] == "" for name in SECRETS), "an example secret would start a stack with a known key"


def test_every_container_has_limits_and_rotated_logs(services: dict[str, Any]) -> None:
    for name, service in services.items():
        limits = service["deploy"]["resources"]["limits"]
        assert limits["memory"] and float(limits["cpus"]) > 0, name
        assert service["logging"]["options"]["max-size"] and int(service["logging"]["options"]["max-file"]) > 1, name


def test_prometheus_loads_the_alert_rules_and_scrapes_flower_and_grafana_shows_the_dashboard(
        services: dict[str, Any]) -> None:
    prometheus = yaml.safe_load((REPO / "infra" / "prometheus" / "prometheus.yml").read_text())
    assert prometheus["rule_files"] == ["alerts.yml"]
    assert "./infra/prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro" in services["prometheus"]["volumes"]
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    assert jobs["flower"]["static_configs"][0]["targets"] == ["flower:5555"]
    assert services["flower"]["command"][:2] == ["qvq", "flower"]  # JSON log lines
    grafana = services["grafana"]
    mounts = {volume.split(":")[1]: volume.split(":")[0] for volume in grafana["volumes"]}
    provisioning = REPO / mounts["/etc/grafana/provisioning"]
    dashboards = yaml.safe_load((provisioning / "dashboards" / "qvq.yml").read_text())["providers"][0]
    assert (REPO / mounts[f"{dashboards['options']['path']}/qvq-dashboard.json"]).name == "qvq-dashboard.json"
    source = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"


def _runs(command: list[str]) -> bool:
    if shutil.which(command[0]) is None:
        return False
    return subprocess.run(command, capture_output=True, timeout=30).returncode == 0


def test_every_service_has_a_healthcheck_and_waits_for_healthy_dependencies(services: dict[str, Any]) -> None:
    for name, service in services.items():
        if name not in ONE_SHOT:
            assert "healthcheck" in service, name
            assert service["healthcheck"]["test"], name
        for dependency, rule in (service.get("depends_on") or {}).items():
            expected = ("service_completed_successfully" if dependency in ONE_SHOT else "service_healthy")
            assert rule["condition"] == expected, (name, dependency)
            assert dependency in services


def test_only_the_api_flower_grafana_and_minio_console_are_published_on_loopback_by_default(
        services: dict[str, Any]) -> None:
    published = {name for name, service in services.items() if service.get("ports")}
    assert published == PUBLISHED
    for name in published:
        for port in services[name]["ports"]:
            assert re.fullmatch(r"\$\{QVQ_BIND_ADDRESS:-127\.0\.0\.1\}:\$\{QVQ_[A-Z_]+_PORT:-\d+\}:\d+", port), (name, port)
    assert not any("container_name" in service for service in services.values())


def test_workers_scale_and_are_scraped_by_dns(services: dict[str, Any]) -> None:
    worker = services["worker"]
    assert "ports" not in worker and "container_name" not in worker
    prometheus = yaml.safe_load((REPO / "infra" / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    dns = jobs["qvq-worker"]["dns_sd_configs"][0]
    assert dns["names"] == ["worker"] and dns["port"] == int(worker["environment"]["QVQ_METRICS_PORT"])
    assert jobs["qvq-api"]["static_configs"][0]["targets"] == ["api:8000"]


def test_the_worker_grace_period_covers_the_task_limit(services: dict[str, Any]) -> None:
    worker = services["worker"]
    limit = float(worker["environment"]["QVQ_TASK_TIMEOUT_S"])
    grace = worker["stop_grace_period"]
    assert grace.endswith("s")
    assert float(grace[:-1]) >= limit + 30


def test_state_lives_in_volumes_and_redis_keeps_an_append_only_file_behind_a_password(
        compose: dict[str, Any], services: dict[str, Any]) -> None:
    for name, path in (("redis", "/data"), ("postgres", "/var/lib/postgresql/data"), ("minio", "/data"),
                       ("prometheus", "/prometheus")):
        volumes = [v.split(":") for v in services[name]["volumes"]]
        assert any(target == path and source in compose["volumes"] for source, target, *_ in volumes), name
    command = services["redis"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert "--requirepass" in command


def test_every_variable_the_file_reads_is_documented_in_env_example() -> None:
    used = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", COMPOSE.read_text()))
    documented = set(re.findall(r"^#?\s*([A-Z_][A-Z0-9_]*)=", (REPO / ".env.example").read_text(), re.M))
    assert used - documented == set()


def test_the_webhook_trigger_rules_watch_the_bucket_minio_notifies_about(services: dict[str, Any]) -> None:
    rules = json.loads((REPO / "infra" / "compose" / "triggers.json").read_text())
    init = " ".join(services["minio-init"]["command"])
    for rule in rules:
        assert rule["prefix"] in init
    assert "uploads" not in {rule["prefix"].strip("/") for rule in rules}  # uploads are not analysed twice
    minio = services["minio"]["environment"]
    assert minio["MINIO_NOTIFY_WEBHOOK_ENDPOINT_QVQ"].endswith("/v1/webhooks/objects")
