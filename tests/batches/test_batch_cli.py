"""`qvq batch` as a user runs it (a subprocess, piped: plain lines, no progress bar), directly and over the
HTTP API: the dry run, submit --follow to the end, status --json, results as CSV and JSON Lines, refs from
stdin, and one-line errors."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from typing import Any

import pytest

from contracts.settings import Settings
from tests.batches.test_batches_api import _bucket_with_a_shift
from tests.producer import ApiServer

pytestmark = pytest.mark.timeout(120)


def _qvq(env: dict[str, str], *args: str, stdin: str | None = None, code: int = 0) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "producer.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **env, "LOG_LEVEL": "WARNING"}, input=stdin, timeout=90)
    assert done.returncode == code, (done.stdout, done.stderr)
    return done


def test_batch_commands_directly_and_over_http(service_env: dict[str, str], start_worker: Any, s3: Any) -> None:
    _bucket, source = _bucket_with_a_shift(s3, images=6)
    start_worker()
    dry = _qvq(service_env, "batch", "submit", source, "--suffix", ".png", "--prompt", "Colour?", "--dry-run")
    assert dry.stdout.startswith("6 items; estimated ") and "nothing queued (dry run)" in dry.stdout

    done = _qvq(service_env, "batch", "submit", source, "--suffix", ".png", "--prompt", "Colour?",
                "--model", "qvq-plus", "--follow")
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith("batch b-") and "6 items (6 new)" in lines[0]
    batch_id = lines[0].split()[1].rstrip(":")
    assert lines[-1].startswith(f"batch {batch_id} completed: 6/6 done (6 completed)"), lines

    status = json.loads(_qvq(service_env, "batch", "status", batch_id, "--json").stdout)
    assert status["status"] == "completed" and status["counts"] == {"completed": 6}
    table = list(csv.reader(io.StringIO(_qvq(service_env, "batch", "results", batch_id, "--csv").stdout)))
    assert len(table) == 7 and {row[3] for row in table[1:]} == {"completed"}

    refs = "\n".join(f"{source}photo-{n:03d}.png" for n in (1, 3)) + "\n"
    settings = Settings.from_env(service_env)
    with ApiServer(settings) as api:
        over_http = {**service_env, "QVQ_API_URL": api.url}
        piped = _qvq(over_http, "batch", "submit", "-", "--prompt", "Colour?", "--model", "qvq-plus", "--follow",
                     "--json", stdin=refs)
        answer = json.loads(piped.stdout.splitlines()[0])
        assert answer["items"] == 2 and answer["created"] == 2
        results = [json.loads(line) for line in _qvq(over_http, "batch", "results", answer["batch_id"]).stdout.splitlines()]
        assert [line["ref"] for line in results] == refs.split()
        assert all(line["status"] == "completed" and line["answer"] for line in results)
        missing = _qvq(over_http, "batch", "status", "b-no-such-batch", code=2)
        assert missing.stderr.strip().startswith("error: ") and len(missing.stderr.strip().splitlines()) == 1
    bad = _qvq(service_env, "batch", "submit", source, "--prompt", "Colour?", "--max-cost", "0.000001", code=1)
    assert "budget.exceeded" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
