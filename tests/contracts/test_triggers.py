"""Trigger rules and the webhook settings: parsed once, first match wins, bad values fail at start."""

from __future__ import annotations

import json

import pytest

from contracts.errors import ConfigError
from contracts.settings import Settings
from contracts.triggers import first_match, parse_triggers


def test_the_first_matching_rule_wins_and_sets_the_job_fields() -> None:
    rules = parse_triggers(json.dumps([
        {"bucket": "photos", "prefix": "boards/", "suffix": ".jpg", "prompt": "Damaged?", "model": "qvq-plus",
         "high_resolution": True, "callback_url": "https://hooks.example/q"},
        {"bucket": "photos", "prompt": "What is it?"},
    ]))
    assert first_match(rules, "photos", "boards/a.jpg") is rules[0]
    assert first_match(rules, "photos", "boards/a.png") is rules[1]
    assert first_match(rules, "other", "boards/a.jpg") is None
    assert rules[0].job_fields() == {"prompt": "Damaged?", "model": "qvq-plus", "high_resolution": True,
                                     "callback_url": "https://hooks.example/q"}
    assert rules[1].job_fields() == {"prompt": "What is it?"}
    assert parse_triggers("") == ()


@pytest.mark.parametrize(("rules", "message"), [
    ({"bucket": "b"}, "QVQ_TRIGGERS: expected a JSON list of rules"),
    (["b"], "QVQ_TRIGGERS rule 1: expected an object"),
    ([{"bucket": "", "prompt": "p"}], "rule 1: field 'bucket' must not be empty"),
    ([{"bucket": "b", "prompt": 3}], "rule 1: field 'prompt' must be a string"),
    ([{"bucket": "b", "prompt": "p", "high_resolution": "yes"}], "rule 1: field 'high_resolution' must be true"),
    ([{"bucket": "b", "prompt": "p", "tenant": "a b"}], "rule 1: field 'tenant' must be"),
    ([{"bucket": "b", "prompt": "p", "callback_url": "ftp://x"}], "rule 1: field 'callback_url' must be"),
])
def test_a_bad_rule_is_one_line_naming_it(rules: object, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        Settings.from_env({"QVQ_TRIGGERS": json.dumps(rules)})
    assert message in str(error.value) and "\n" not in str(error.value)


def test_webhook_secrets_and_the_api_url_are_checked_and_masked() -> None:
    settings = Settings.from_env({"QVQ_WEBHOOK_SECRETS": "acme:acme-secret-0123456789,globex:globex-secret-012345",
                                  "QVQ_API_URL": "https://qvq.example", "QVQ_API_KEY": "key-0123456789abcdef"})
    assert settings.tenant_webhook_secrets == {"acme": "acme-secret-0123456789", "globex": "globex-secret-012345"}
    assert "acme-secret" not in repr(settings) and "key-0123456789abcdef" not in repr(settings)
    for raw, message in (("acme", "expected tenant:secret"), ("acme:short", "at least 16"),
                         ("a:0123456789abcdef,a:0123456789abcdef", "listed twice")):
        with pytest.raises(ConfigError, match=message):
            Settings.from_env({"QVQ_WEBHOOK_SECRETS": raw})
    with pytest.raises(ConfigError, match="QVQ_API_URL"):
        Settings.from_env({"QVQ_API_URL": "qvq.example:8000"})
