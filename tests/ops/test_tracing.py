"""Trace context end to end, on loopback: a `traceparent` sent with POST /v1/tasks rides in the task, the
worker continues it (its spans exported over OTLP to a receiver of the test's own), the model call's HTTP
request carries it to the model service (seen by a proxy in front of the emulator), and the task's log
lines name the trace. With tracing off, the carried traceparent still reaches the model service as it came."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from contracts.settings import Settings
from contracts.tracing import carrier, enabled
from tests.imagegen import make_image
from tests.loopback_proxy import LoopbackProxy
from tests.ops import free_port
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(120)

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


class _Spans(http.server.ThreadingHTTPServer):
    """An OTLP/HTTP receiver: every span exported to POST /v1/traces, decoded."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _OtlpHandler)
        self.spans: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def named(self, trace_id: str) -> dict[str, dict[str, Any]]:
        with self.lock:
            return {s["name"]: s for s in self.spans if s["trace_id"] == trace_id}


class _OtlpHandler(http.server.BaseHTTPRequestHandler):
    server: _Spans

    def do_POST(self) -> None:  # noqa: N802 - the http.server interface
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        request = ExportTraceServiceRequest.FromString(body)
        found = []
        for resource in request.resource_spans:
            service = next((a.value.string_value for a in resource.resource.attributes if a.key == "service.name"), "")
            for scope in resource.scope_spans:
                found += [{"name": s.name, "trace_id": s.trace_id.hex(), "span_id": s.span_id.hex(),
                           "parent": s.parent_span_id.hex(), "service": service} for s in scope.spans]
        with self.server.lock:
            self.server.spans.extend(found)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def spans() -> Iterator[_Spans]:
    server = _Spans()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture()
def proxy(service_env: dict[str, str]) -> Iterator[LoopbackProxy]:
    yield LoopbackProxy(service_env["QVQ_BASE_URL"])  # its loop thread is a daemon: it ends with the run


def _api(env: dict[str, str], tmp_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    log = (tmp_path / "api.log").open("wb")
    process = subprocess.Popen([sys.executable, "-m", "producer.cli", "api", "--port", str(port)],
                               env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: _answers(f"{url}/livez"), timeout=60)
    return process, url


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def _submit(url: str, tmp_path: Path) -> str:
    image = tmp_path / "red.png"
    image.write_bytes(make_image("PNG", size=(64, 48), color=(220, 20, 20)))
    upload = httpx.post(f"{url}/v1/uploads", files={"file": ("red.png", image.read_bytes(), "image/png")}, timeout=30)
    assert upload.status_code == 201, upload.text
    created = httpx.post(f"{url}/v1/tasks", json={"images": [upload.json()["ref"]], "prompt": "Which colour?"},
                         headers={"traceparent": PARENT, "tracestate": "vendor=1"}, timeout=30)
    assert created.status_code == 202, created.text
    task_id = str(created.json()["task_id"])
    wait_until(lambda: httpx.get(f"{url}/v1/tasks/{task_id}", timeout=10).json()["status"] == "completed",
               timeout=60)
    return task_id


def test_a_traceparent_sent_to_the_api_is_continued_by_the_worker_up_to_the_model_call(
        service_env: dict[str, str], start_worker: Any, spans: _Spans, proxy: LoopbackProxy, tmp_path: Path) -> None:
    otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{spans.server_address[1]}", "OTEL_BSP_SCHEDULE_DELAY": "100",
            "QVQ_UPLOAD_URL": str(tmp_path / "uploads"), "QVQ_API_INSECURE": "1", "LOG_FORMAT": "json"}
    worker = start_worker(QVQ_BASE_URL=proxy.url, **otel)
    api, url = _api({**service_env, **otel}, tmp_path)
    try:
        task_id = _submit(url, tmp_path)
        names = {"qvq.run", "qvq.images", "qvq.model_call", "qvq.persist", "qvq.publish", "POST /v1/tasks"}
        wait_until(lambda: names <= set(spans.named(TRACE_ID)), timeout=30)
    finally:
        api.terminate()
        api.wait(30)
    found = spans.named(TRACE_ID)
    assert found["POST /v1/tasks"]["service"] == "qvq-api" and found["qvq.run"]["service"] == "qvq-worker"
    by_id = {s["span_id"]: s for s in found.values()}
    chain, span = [], found["qvq.model_call"]
    while span["parent"] in by_id:
        span = by_id[span["parent"]]
        chain.append(span["name"])
    assert "qvq.run" in chain and "POST /v1/tasks" in chain  # the model call descends from the API's request
    sent = proxy.header_values("traceparent", "/chat/completions")
    assert sent and all(p.split("-")[1] == TRACE_ID for p in sent), sent  # every model request: this trace
    every = {s["span_id"]: s for s in spans.spans if s["trace_id"] == TRACE_ID}
    client = every[sent[-1].split("-")[2]]  # the model request's parent: httpx's client span, under qvq.model_call
    assert client["parent"] == found["qvq.model_call"]["span_id"] or every[client["parent"]]["name"] == "qvq.model_call"
    _assert_run_lines_name_the_trace(worker.log_events(task_id=task_id))


def test_with_tracing_off_the_carried_traceparent_reaches_the_model_service_as_it_came(
        service_env: dict[str, str], start_worker: Any, proxy: LoopbackProxy, tmp_path: Path) -> None:
    env = {"QVQ_UPLOAD_URL": str(tmp_path / "uploads"), "QVQ_API_INSECURE": "1"}
    worker = start_worker(QVQ_BASE_URL=proxy.url, **env)
    api, url = _api({**service_env, **env}, tmp_path)
    try:
        task_id = _submit(url, tmp_path)
    finally:
        api.terminate()
        api.wait(30)
    assert proxy.header_values("traceparent", "/chat/completions") == [PARENT]
    _assert_run_lines_name_the_trace(worker.log_events(task_id=task_id))


def _assert_run_lines_name_the_trace(lines: list[dict[str, Any]]) -> None:
    """Every line the run logs (Celery's own "received" and "succeeded" lines are before and after it)."""
    run = [line for line in lines if not str(line.get("logger", "")).startswith("celery.")]
    assert run and all(line.get("trace_id") == TRACE_ID for line in run), run[:3]
    assert any(line["event"] == "task.finished" for line in run)


def test_only_a_w3c_traceparent_is_carried_and_tracing_is_off_unless_an_exporter_is_named() -> None:
    assert carrier({"traceparent": PARENT.upper(), "tracestate": "a=1"}) == {"traceparent": PARENT, "tracestate": "a=1"}
    for bad in ("", "01-" + PARENT[3:], f"00-{'0' * 32}-00f067aa0ba902b7-01", PARENT + "-x", "00-xyz"):
        assert carrier({"traceparent": bad}) is None, bad
    assert carrier({"traceparent": PARENT, "tracestate": "bad\x00state"}) == {"traceparent": PARENT}
    assert not enabled(Settings.from_env({}))
    assert enabled(Settings.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}))
    assert not enabled(Settings.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x", "OTEL_SDK_DISABLED": "true"}))
    assert not enabled(Settings.from_env({"OTEL_TRACES_EXPORTER": "none"}))
    assert json.dumps(carrier({"traceparent": PARENT}))  # a plain dict: it rides in the row's JSON
