"""The worker's Celery configuration keeps the delivery guarantees, and Celery is told the truth."""

from __future__ import annotations

import pytest

from contracts.errors import ConfigError
from contracts.settings import Settings
from worker.celery import app, celery_config, delivery_problems, restore_interval_s


# -- delivery settings -----------------------------------------------------------------------------
def test_the_worker_configuration_keeps_the_delivery_guarantees() -> None:
    settings = Settings(visibility_timeout_s=12, task_timeout_s=6)
    conf = celery_config(settings)
    assert delivery_problems(conf, settings) == []
    assert conf["task_acks_late"] and conf["task_reject_on_worker_lost"] and conf["worker_prefetch_multiplier"] == 1
    assert conf["broker_connection_retry"] and conf["broker_connection_max_retries"] is None
    options = conf["broker_transport_options"]
    assert options["visibility_timeout"] == 12 and options["unacked_restore_interval"] == 3
    assert options["unacked_restore_throttle"] == 1
    assert delivery_problems(app.conf, Settings()) == []  # the app the worker runs, default settings


def test_delivery_problems_name_what_is_wrong() -> None:
    settings = Settings(visibility_timeout_s=7200, task_timeout_s=1800)
    good = celery_config(settings)
    assert any("acks_late" in p for p in delivery_problems({**good, "task_acks_late": False}, settings))
    assert any("reject_on_worker_lost" in p
               for p in delivery_problems({**good, "task_reject_on_worker_lost": False}, settings))
    assert any("prefetch_multiplier is 4" in p for p in delivery_problems({**good, "worker_prefetch_multiplier": 4}, settings))
    short = {**good, "broker_transport_options": {"visibility_timeout": 600}}
    problems = delivery_problems(short, settings)
    assert any("differs from QVQ_VISIBILITY_TIMEOUT_S" in p for p in problems)
    assert any("must exceed QVQ_TASK_TIMEOUT_S" in p for p in problems)
    assert any("kombu's default" in p for p in delivery_problems({**good, "broker_transport_options": {}}, settings))


def test_restore_sweep_period_follows_the_visibility_timeout() -> None:
    assert [restore_interval_s(v) for v in (2, 8, 12, 40, 7200)] == [1, 2, 3, 10, 10]


def test_settings_refuse_a_visibility_timeout_not_above_the_task_limit() -> None:
    with pytest.raises(ConfigError, match="QVQ_VISIBILITY_TIMEOUT_S"):
        Settings.from_env({"QVQ_VISIBILITY_TIMEOUT_S": "60", "QVQ_TASK_TIMEOUT_S": "60"})
    assert Settings.from_env({"QVQ_LEASE_TTL_S": "2.5"}).lease_ttl_s == 2.5
    with pytest.raises(ConfigError, match="QVQ_LEASE_TTL_S"):
        Settings.from_env({"QVQ_LEASE_TTL_S": "0"})


# -- Celery tells the truth ------------------------------------------------------------------------
def test_celery_sends_task_events_and_acknowledges_a_failure() -> None:
    conf = celery_config(Settings())
    assert conf["worker_send_task_events"] and conf["task_send_sent_event"]
    assert conf["task_acks_on_failure_or_timeout"] is True
