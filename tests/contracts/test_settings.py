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
    assert s.stall_timeout_s == 60


def test_values_are_parsed_from_the_environment() -> None:
    s = Settings.from_env({"QVQ_ALLOW_LOCAL_FILES": "1", "QVQ_ALLOWED_BUCKETS": "a, b", "QVQ_MODEL": "qvq-plus",
                           "CELERY_BROKER_URL": "redis://broker:6379/1"})
    assert s.allow_local_files and s.allowed_buckets == ("a", "b") and s.model == "qvq-plus"
    assert s.celery_broker_url == "redis://broker:6379/1"


@pytest.mark.parametrize("env", [
    {"QVQ_MODEL": "gpt-4"}, {"QVQ_ALLOW_LOCAL_FILES": "maybe"}, {"QVQ_EVENT_TTL_S": "-1"},
    {"LOG_FORMAT": "xml"}, {"QVQ_TASK_TIMEOUT_S": "9000", "QVQ_VISIBILITY_TIMEOUT_S": "3600"},
])
def test_bad_values_fail_fast_naming_the_variable(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(env)
    assert any(name in str(caught.value) for name in env)


def test_secrets_are_masked_in_repr() -> None:
    s = Settings.from_env({"DASHSCOPE_API_KEY": "sk-secret", "OSS_ACCESS_KEY_SECRET": "oss-secret"})
    assert "sk-secret" not in repr(s) and "oss-secret" not in repr(s) and "***" in repr(s)
