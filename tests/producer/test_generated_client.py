"""A client generated from the served OpenAPI document by openapi-python-client (the generator users run):
it generates without a single warning, and drives submit -> events -> result against the real API, a
worker and the emulator, with typed bodies and typed records."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from contracts import events as ev
from contracts.settings import Settings
from tests.imagegen import make_image
from tests.producer import ApiServer

pytestmark = pytest.mark.timeout(300)
KEY = "generated-client-key-0123456789ab"
PACKAGE = "qvq_queue_client"


@pytest.fixture()
def generated(tmp_path: Path, service_env: dict[str, str], start_worker: Any) -> Iterator[tuple[Any, str]]:
    """(the generated package, the API's URL): generated into tmp_path, imported, unloaded afterwards."""
    start_worker()
    settings = Settings.from_env({**service_env, "QVQ_API_KEYS": f"acme:{KEY}"})
    with ApiServer(settings) as api:
        spec = tmp_path / "openapi.json"
        spec.write_text(httpx.get(f"{api.url}/openapi.json", timeout=30).text)
        scripts = str(Path(sys.executable).parent)  # the generator runs ruff on what it writes
        done = subprocess.run([os.path.join(scripts, "openapi-python-client"), "generate", "--path", str(spec),
                               "--output-path", str(tmp_path / "client"), "--meta", "none"],
                              capture_output=True, text=True, timeout=240,
                              env={**os.environ, "PATH": scripts + os.pathsep + os.environ.get("PATH", "")})
        output = done.stdout + done.stderr
        assert done.returncode == 0, output
        for trouble in ("Warning", "WARNING", "Unable", "Error"):  # every schema and endpoint generated
            assert trouble not in output, output
        sys.path.insert(0, str(tmp_path))
        package_dir = tmp_path / PACKAGE
        (tmp_path / "client").rename(package_dir)
        try:
            yield importlib.import_module(PACKAGE), api.url
        finally:
            sys.path.remove(str(tmp_path))
            for name in [name for name in sys.modules if name == PACKAGE or name.startswith(PACKAGE + ".")]:
                del sys.modules[name]


def test_a_generated_client_submits_follows_and_reads_a_typed_result(generated: tuple[Any, str], s3: Any) -> None:
    package, url = generated
    models = importlib.import_module(f"{PACKAGE}.models")
    submit_task, task_events, get_task = (importlib.import_module(f"{PACKAGE}.api.tasks.{name}")
                                          for name in ("submit_task", "task_events", "get_task"))
    bucket = f"gen-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(bucket)
    s3.put(bucket, "blue.png", make_image("PNG", size=(72, 40), color=(20, 20, 220)), "image/png")
    client = package.AuthenticatedClient(base_url=url, token=KEY, timeout=httpx.Timeout(60),
                                         raise_on_unexpected_status=True)

    body = models.NewJobBody(images=[f"s3://{bucket}/blue.png"], prompt="Which colour is it?",
                             model=models.NewJobBodyModel("qvq-plus"))
    created = submit_task.sync(client=client, body=body)
    assert isinstance(created, models.TaskCreated) and created.created is True

    stream = task_events.sync_detailed(created.task_id, client=client)  # SSE: the whole stream as text
    assert stream.status_code == 200
    events = [json.loads(line[len("data: "):]) for line in stream.content.decode().splitlines()
              if line.startswith("data: ")]
    assert events[0]["type"] == ev.QUEUED and events[-1]["type"] == ev.COMPLETED

    record = get_task.sync(created.task_id, client=client)
    assert isinstance(record, models.TaskRecord)
    assert record.status == models.TaskRecordStatus.COMPLETED and "72x40" in record.answer
    assert record.answer == "".join(e["text"] for e in events if e["type"] == ev.ANSWER_DELTA)
    assert isinstance(record.cost, models.Cost) and record.cost.total == events[-1]["cost"]["total"]
    assert isinstance(record.images[0], models.ImageSummary) and record.images[0].width == 72

    refused = submit_task.sync(client=client, body=models.FollowUpBody(
        conversation_id="never-started", prompt="And then?"))
    assert isinstance(refused, models.ErrorBody) and refused.error.code == "conversation.not_found"
