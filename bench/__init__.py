"""Benchmarks for qvq-queue: stream fan-out, short-task throughput and baselines (see bench/RESULTS.md).

Run with `python -m bench` (or `python bench/run.py`); `--quick` for a smaller run. Not part of pytest.
"""
