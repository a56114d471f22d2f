"""infra/kubernetes: every manifest valid against the Kubernetes schemas (kubernetes-validate, offline) and
KEDA's CRD, every file listed by its kustomization (and `kubectl kustomize` builds it when kubectl is
here), and the settings that must agree do: probes, security, grace period, image tag, queue name."""

from __future__ import annotations

import json
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from contracts.job import QUEUE
from tests.ops import REPO, schemas_dir

KUBE = REPO / "infra" / "kubernetes"
BASE = KUBE / "base"
OVERLAYS = sorted(p for p in (KUBE / "overlays").iterdir() if p.is_dir())
COMPONENTS = sorted(p for p in (KUBE / "components").iterdir() if p.is_dir())
EXAMPLE = KUBE / "overlays" / "example"
CRD_GROUPS = ("keda.sh/", "monitoring.coreos.com/")  # validated against their CRDs, not the core schemas
KEDA_CRDS = {"ScaledObject": "keda.sh_scaledobjects.yaml", "TriggerAuthentication": "keda.sh_triggerauthentications.yaml"}


def _documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _manifests(directory: Path) -> dict[str, list[dict[str, Any]]]:
    return {p.name: _documents(p) for p in sorted(directory.glob("*.yaml")) if p.name != "kustomization.yaml"}


def _base_objects() -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d for docs in _manifests(BASE).values() for d in docs}


@pytest.mark.parametrize("directory", [BASE, *OVERLAYS, *COMPONENTS], ids=lambda p: p.name)
def test_every_manifest_is_listed_by_its_kustomization(directory: Path) -> None:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    listed = {Path(r).name for r in kustomization.get("resources", []) if not r.startswith("..")}
    patches = {p["path"] for p in kustomization.get("patches", [])}
    for name in listed | patches:
        assert (directory / name).exists(), name
    assert set(_manifests(directory)) == listed | patches


@pytest.mark.parametrize("directory", [BASE, *OVERLAYS], ids=lambda p: p.name)
def test_kubectl_kustomize_builds_it(directory: Path) -> None:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed (its built-in kustomize builds the directory)")
    result = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    kinds = {d["kind"] for d in yaml.safe_load_all(result.stdout) if d}
    assert {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget", "NetworkPolicy"} <= kinds
    assert ("Secret" in kinds) is (directory == EXAMPLE)  # secrets are never in the base
    assert ("ScaledObject" in kinds) != ("HorizontalPodAutoscaler" in kinds)  # one autoscaler, never both


def test_core_manifests_match_the_kubernetes_schemas() -> None:
    version = kubernetes_validate.latest_version()
    checked = 0
    for directory in (BASE, *OVERLAYS, *COMPONENTS):
        for documents in _manifests(directory).values():
            for document in documents:
                if document["apiVersion"].startswith(CRD_GROUPS) or "$patch" in document:
                    continue
                kubernetes_validate.validate(document, version, strict=True)
                checked += 1
    assert checked >= 8


KEDA_MODELS = "@kubernetes-models/keda@2.0.0"  # KEDA's CRD schemas, generated, from the npm registry


@pytest.fixture(scope="session")
def keda_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with the npm package installed (skipped where Node.js and npm are absent)."""
    if not (shutil.which("node") and shutil.which("npm")):
        pytest.skip("Node.js and npm are needed for KEDA's schemas (@kubernetes-models/keda)")
    directory = tmp_path_factory.mktemp("keda-models")
    done = subprocess.run(["npm", "install", "--silent", "--no-audit", "--no-fund", "--prefix", str(directory),
                           KEDA_MODELS], capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        pytest.skip(f"npm could not install {KEDA_MODELS}: {done.stderr.strip()[-300:]}")
    return directory


def test_keda_objects_match_the_keda_crd_schemas(keda_models: Path, tmp_path: Path) -> None:
    objects = [d for (kind, _), d in _base_objects().items() if kind in KEDA_CRDS]
    assert {d["kind"] for d in objects} == set(KEDA_CRDS)
    script = keda_models / "validate.mjs"  # beside node_modules, so the import resolves
    shutil.copy(Path(__file__).with_name("keda") / "validate.mjs", script)
    for name, documents in (("ours", objects), ("broken", [{**objects[0], "spec": {"triggers": "x"}}])):
        given = tmp_path / f"{name}.json"
        given.write_text(json.dumps(documents))
        done = subprocess.run(["node", str(script), str(given)], capture_output=True, text=True, timeout=60)
        assert (done.returncode == 0) is (name == "ours"), done.stdout + done.stderr  # and it can fail


def test_keda_objects_match_the_keda_crds() -> None:
    directory = schemas_dir()
    if directory is None or not all((directory / f).exists() for f in KEDA_CRDS.values()):
        pytest.skip("KEDA's CRDs not found (QVQ_TEST_SCHEMAS_DIR or shared/schemas)")
    for (kind, _), document in _base_objects().items():
        if kind not in KEDA_CRDS:
            continue
        crd = yaml.safe_load((directory / KEDA_CRDS[kind]).read_text())
        version = next(v for v in crd["spec"]["versions"] if document["apiVersion"].endswith("/" + v["name"]))
        jsonschema.validate(document, version["schema"]["openAPIV3Schema"])


def test_workers_scale_on_the_celery_queue_with_credentials_from_the_secret() -> None:
    objects = _base_objects()
    scaled = objects[("ScaledObject", "qvq-worker")]
    assert scaled["spec"]["scaleTargetRef"]["name"] == "qvq-worker"
    trigger = scaled["spec"]["triggers"][0]
    assert trigger["type"] == "redis" and trigger["metadata"]["listName"] == QUEUE
    auth = objects[("TriggerAuthentication", trigger["authenticationRef"]["name"])]
    secret = _documents(EXAMPLE / "secret.yaml")[0]
    refs = {r["parameter"]: r for r in auth["spec"]["secretTargetRef"]}
    assert set(refs) == {"address", "password"}
    assert all(r["name"] == "qvq-secrets" and r["key"] in secret["stringData"] for r in refs.values())
    hpa = _documents(KUBE / "overlays" / "hpa" / "hpa.yaml")[0]
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "qvq_active_streams"


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    return dict(deployment["spec"]["template"]["spec"]["containers"][0])


def test_deployments_run_locked_down_with_probes_and_resources() -> None:
    objects = _base_objects()
    for name in ("qvq-api", "qvq-worker"):
        pod = objects[("Deployment", name)]["spec"]["template"]["spec"]
        container = _container(objects[("Deployment", name)])
        assert pod["securityContext"]["runAsNonRoot"] is True
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True and security["capabilities"]["drop"] == ["ALL"]
        assert security["allowPrivilegeEscalation"] is False
        tmp = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert tmp == {"tmp": "/tmp"} and pod["volumes"][0]["emptyDir"] is not None
        assert container["livenessProbe"] and container["readinessProbe"]
        assert container["resources"]["requests"]["memory"] and container["resources"]["limits"]["memory"]
        assert container["envFrom"] == [{"configMapRef": {"name": "qvq-config"}},
                                        {"secretRef": {"name": "qvq-secrets"}}]
    api = _container(objects[("Deployment", "qvq-api")])
    assert api["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    worker = _container(objects[("Deployment", "qvq-worker")])
    config = objects[("ConfigMap", "qvq-config")]["data"]
    assert worker["ports"][0]["containerPort"] == int(config["QVQ_METRICS_PORT"])
    assert config["QVQ_HEARTBEAT_FILE"] in " ".join(worker["readinessProbe"]["exec"]["command"])


def test_the_worker_grace_period_covers_the_task_limit_and_the_image_is_versioned() -> None:
    objects = _base_objects()
    limit = float(objects[("ConfigMap", "qvq-config")]["data"]["QVQ_TASK_TIMEOUT_S"])
    grace = objects[("Deployment", "qvq-worker")]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= limit + 30
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    tags = {image["name"]: image["newTag"] for image in kustomization["images"]}
    assert tags["qvq-queue"] not in {"", "latest"}
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert tags["qvq-queue"] == version  # the release the image was built from (compose: QVQ_IMAGE_TAG)
    assert f"QVQ_IMAGE_TAG={version}" in (REPO / ".env.example").read_text()
    for name in ("qvq-api", "qvq-worker"):  # the same tag without kustomize
        assert _container(objects[("Deployment", name)])["image"] == f"qvq-queue:{tags['qvq-queue']}"


def test_the_base_holds_no_secret_and_the_example_overlay_holds_every_key_the_pods_need() -> None:
    assert not any(kind == "Secret" for kind, _ in _base_objects())
    secret = _documents(EXAMPLE / "secret.yaml")[0]
    assert secret["metadata"]["name"] == "qvq-secrets"
    assert {"REDIS_URL", "DATABASE_URL", "QVQ_API_KEYS", "QVQ_WEBHOOK_SECRET", "BROKER_ADDRESS",
            "BROKER_PASSWORD"} <= set(secret["stringData"])


def test_metrics_have_their_own_ports_reached_only_from_monitoring_and_the_worker_liveness_checks_consuming() -> None:
    objects = _base_objects()
    config = objects[("ConfigMap", "qvq-config")]["data"]
    ports = {name: {p["name"]: p["containerPort"] for p in _container(objects[("Deployment", name)])["ports"]}
             for name in ("qvq-api", "qvq-worker")}
    assert ports["qvq-api"]["metrics"] == int(config["QVQ_API_METRICS_PORT"])
    assert ports["qvq-worker"]["metrics"] == int(config["QVQ_METRICS_PORT"])
    service = objects[("Service", "qvq-api")]
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]  # /metrics is not on the Service
    worker = _container(objects[("Deployment", "qvq-worker")])
    assert worker["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "metrics"}
    for name in ("qvq-api", "qvq-worker"):
        policy = objects[("NetworkPolicy", name)]["spec"]
        assert policy["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": name}
        open_ports = [p["port"] for rule in policy["ingress"] if "from" not in rule for p in rule["ports"]]
        monitored = [p["port"] for rule in policy["ingress"] if "from" in rule for p in rule["ports"]]
        assert open_ports == (["http"] if name == "qvq-api" else []) and monitored == ["metrics"]


def test_the_monitoring_component_scrapes_both_ports_named_metrics_and_ships_the_alert_rules() -> None:
    component = KUBE / "components" / "monitoring"
    monitors = {d["metadata"]["name"]: d for d in _documents(component / "podmonitors.yaml")}
    objects = _base_objects()
    for name, monitor in monitors.items():
        labels = objects[("Deployment", name)]["spec"]["template"]["metadata"]["labels"]
        assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]
    assert set(monitors) == {"qvq-api", "qvq-worker"}
    rule = _documents(component / "prometheusrule.yaml")[0]
    assert rule["kind"] == "PrometheusRule" and rule["spec"]["groups"][0]["rules"]
