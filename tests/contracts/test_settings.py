from __future__ import annotations

import pytest

from contracts.errors import ConfigError
from contracts.settings import DASHSCOPE_BASE_URL, Settings


def test_defaults_match_the_design() -> None:
    s = Settings.from_env({})
    assert s.redis_url == "redis://localhost:6379/0" and s.celery_broker_url == s.redis_url
    assert s.database_url == "sqlite:///qvq.db" and s.base_url == DASHSCOPE_BASE_URL
    assert s.model == "qvq-max" and s.event_ttl_s == 86_400 and not s.allow_local_files
    assert s.coalesce_ms == 50 and s.coalesce_chars == 256 and s.max_attempts == 4
    assert s.stall_timeout_s == 60 and s.queue == "qvq"


def test_values_are_parsed_from_the_environment() -> None:
    s = Settings.from_env({"QVQ_ALLOW_LOCAL_FILES": "1", "QVQ_ALLOWED_BUCKETS": "a, b", "QVQ_MODEL": "qvq-plus",
                           "CELERY_BROKER_URL": "redis://broker:6379/1"})
    assert s.allow_local_files and s.allowed_buckets == ("a", "b") and s.model == "qvq-plus"
    assert s.celery_broker_url == "redis://broker:6379/1"


@pytest.mark.parametrize("env", [
    {"QVQ_MODEL": "gpt-4"}, {"QVQ_ALLOW_LOCAL_FILES": "maybe"}, {"QVQ_EVENT_TTL_S": "-1"},
    {"LOG_FORMAT": "xml"}, {"QVQ_TASK_TIMEOUT_S": "9000", "QVQ_VISIBILITY_TIMEOUT_S": "3600"},
    {"QVQ_QUEUE": "two words"}, {"DATABASE_URL": "qvq.db"},
])
def test_bad_values_fail_fast_naming_the_variable(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(env)
    assert any(name in str(caught.value) for name in env)


def test_secrets_are_masked_in_repr() -> None:
    s = Settings.from_env({"DASHSCOPE_API_KEY": "sk-secret", "OSS_ACCESS_KEY_SECRET": "oss-secret"})
    assert "sk-secret" not in repr(s) and "oss-secret" not in repr(s) and "***" in repr(s)


@pytest.mark.parametrize("url", ["postgres://qvq:pw@db.internal:5432/qvq", "postgresql://qvq:pw@db.internal/qvq"])
def test_postgres_urls_as_other_tools_write_them_use_the_installed_driver(url: str) -> None:
    database_url = Settings.from_env({"DATABASE_URL": url}).database_url
    assert database_url.startswith("postgresql+psycopg://qvq:pw@db.internal")


def test_a_driver_named_explicitly_is_kept() -> None:
    url = "postgresql+psycopg2://qvq@db/qvq"
    assert Settings.from_env({"DATABASE_URL": url}).database_url == url


def test_a_bad_url_setting_never_shows_its_password() -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"DATABASE_URL": "postgres:/qvq:hunter2@db/qvq"})
    assert "DATABASE_URL" in str(caught.value) and "hunter2" not in str(caught.value)


def test_the_queue_is_chosen_by_qvq_queue() -> None:
    assert Settings.from_env({"QVQ_QUEUE": " qvq-demo-12 "}).queue == "qvq-demo-12"
