"""REDIS_URL and CELERY_BROKER_URL: one server or a master behind Sentinel, read without any I/O."""

from __future__ import annotations

import pytest

from contracts.errors import ConfigError
from contracts.redis_clients import celery_broker
from contracts.redis_url import SentinelTarget, sentinel_target
from contracts.settings import Settings

THREE = (("10.0.0.1", 26379), ("10.0.0.2", 26380), ("sentinel-3", 26379))


def test_a_plain_url_names_no_sentinel_and_goes_to_celery_unchanged() -> None:
    assert sentinel_target("redis://:pw@cache:6379/2") is None
    assert celery_broker("rediss://cache:6380/0") == ("rediss://cache:6380/0", {})


def test_the_redis_sentinel_form_names_its_sentinels_master_db_and_passwords() -> None:
    target = sentinel_target("redis+sentinel://app:s%40cret@10.0.0.1,10.0.0.2:26380,sentinel-3/prod-master/3"
                             "?sentinel_password=sp")
    assert target == SentinelTarget(THREE, "prod-master", 3, "app", "s@cret", "sp")


def test_celerys_sentinel_form_reads_the_same_with_the_master_in_the_query() -> None:
    target = sentinel_target("sentinel://:pw@10.0.0.1:26379/1;sentinel://10.0.0.2:26380/1;"
                             "sentinel://sentinel-3/1?master_name=prod-master")
    assert target == SentinelTarget(THREE, "prod-master", 1, None, "pw")


def test_a_sentinel_redis_url_gives_celery_its_own_form_and_the_master_name() -> None:
    url, options = celery_broker("redis+sentinel://:pw@10.0.0.1,10.0.0.2:26380/m/2?sentinel_password=sp")
    assert url == "sentinel://:pw@10.0.0.1:26379/2;sentinel://:pw@10.0.0.2:26380/2"
    assert options == {"master_name": "m", "sentinel_kwargs": {"password": "sp"}}
    assert sentinel_target(url + "?master_name=m") == SentinelTarget(
        (("10.0.0.1", 26379), ("10.0.0.2", 26380)), "m", 2, None, "pw")


@pytest.mark.parametrize(("variable", "value", "says"), [
    ("REDIS_URL", "http://cache:6379", "expected redis://"),
    ("REDIS_URL", "redis+sentinel://:hunter2@10.0.0.1,10.0.0.2", "names its sentinels and master"),
    ("REDIS_URL", "redis+sentinel://:hunter2@10.0.0.1:x/m", "port is not a number"),
    ("REDIS_URL", "redis+sentinel://10.0.0.1/m/zero", "must be a number"),
    ("CELERY_BROKER_URL", "sentinel://:hunter2@10.0.0.1:26379;sentinel://10.0.0.2:26379", "?master_name="),
])
def test_a_bad_url_is_one_line_naming_the_variable_never_the_password(variable: str, value: str,
                                                                       says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({variable: value})
    message = str(caught.value)
    assert variable in message and says in message and "hunter2" not in message and "\n" not in message


def test_another_broker_is_celerys_to_judge() -> None:
    settings = Settings.from_env({"CELERY_BROKER_URL": "amqp://guest@rabbit//"})
    assert settings.celery_broker_url == "amqp://guest@rabbit//"
