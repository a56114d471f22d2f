"""Bounded memory per worker: big decodes wait for room in the process's decode budget, and the heap
they used is handed back afterwards.

Worst-case RSS of one worker process (README, Guarantees):
    RSS_idle + QVQ_DECODE_MEMORY_MB + concurrency x (207 KB + 3 x the sent bytes of a job's images)
(207 KB: one open stream, bench/RESULTS.md; a job's images are held as bytes, as base64 in the
request, and in the serialized request body while it is sent.)
"""

from __future__ import annotations

import threading
from typing import Any

import psutil
import pytest

from tests.imagegen import make_image
from tests.reliability import Stack

pytestmark = pytest.mark.timeout(300)

STREAM_MB = 207 / 1024
JOBS, IMAGES, SIDE = 4, 8, 8000


IMAGE_THREAD_MB = 20  # a fetched object and its encoded output, per image thread


def worst_case_rss_mb(idle_mb: float, budget_mb: int, concurrency: int, sent_mb_per_job: float) -> float:
    """The README's bound (Guarantees, "Memory"): idle + decode budget + the image threads' fetched and
    encoded bytes (outside the decode budget) + per stream its state and three copies of its images."""
    from worker.context import IMAGE_THREADS

    return idle_mb + budget_mb + IMAGE_THREADS * IMAGE_THREAD_MB + concurrency * (STREAM_MB + 3 * sent_mb_per_job)


def test_jobs_of_huge_images_stay_under_the_stated_bound_and_all_complete(make_stack: Any) -> None:
    budget_mb = 1024
    stack: Stack = make_stack(QVQ_DECODE_MEMORY_MB=str(budget_mb), QVQ_TASK_TIMEOUT_S="240",
                              QVQ_VISIBILITY_TIMEOUT_S="7200", QVQ_LEASE_TTL_S="30")
    files = []
    for n in range(IMAGES):
        path = stack.tmp / f"huge{n}.png"
        path.write_bytes(make_image("PNG", size=(SIDE, SIDE), color=(30 * n, 120, 200)))
        files.append(str(path))
    worker = stack.start_worker(concurrency=JOBS, name="mem")
    assert worker.process is not None
    process = psutil.Process(worker.process.pid)
    idle_mb = process.memory_info().rss / 2**20
    peak_mb = idle_mb
    finished = threading.Event()

    def sample() -> None:
        nonlocal peak_mb
        while not finished.is_set():
            peak_mb = max(peak_mb, process.memory_info().rss / 2**20)
            finished.wait(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        ids = [stack.client.submit(images=files, prompt=f"Compare these, job {j}.").task_id for j in range(JOBS)]
        records = stack.wait_terminal(ids, timeout=240)
    finally:
        finished.set()
        sampler.join()
    assert all(r.status == "completed" for r in records.values()), \
        [(r.error_code, r.error_message) for r in records.values()]
    sent_mb = max(sum(image["bytes"] for image in r.images or []) for r in records.values()) / 2**20
    bound_mb = worst_case_rss_mb(idle_mb, budget_mb, JOBS, sent_mb)
    after_mb = process.memory_info().rss / 2**20
    print(f"\nworker RSS: idle {idle_mb:.0f} MB, peak {peak_mb:.0f} MB, after {after_mb:.0f} MB; "
          f"bound {bound_mb:.0f} MB ({JOBS} jobs x {IMAGES} images of {SIDE}x{SIDE})")
    assert peak_mb < bound_mb
    assert after_mb < idle_mb + budget_mb / 2  # the decodes' memory went back to the system
