"""Configuration: kwargs beat PGLEAKGUARD_* beat defaults; bad values name what is wrong."""

from __future__ import annotations

import pytest

import pgleakguard
from pgleakguard.config import Config


def test_defaults_need_no_arguments() -> None:
    config = Config.load(environ={})
    assert config.leak_threshold == 30.0
    assert config.capture_stack is True
    assert config.integrations == ("auto",)
    assert config.service is None


def test_environment_sets_every_option() -> None:
    env = {
        "PGLEAKGUARD_SERVICE": "billing",
        "PGLEAKGUARD_LEAK_THRESHOLD": "2.5",
        "PGLEAKGUARD_IDLE_IN_TRANSACTION_THRESHOLD": "0.5",
        "PGLEAKGUARD_CAPTURE_STACK": "off",
        "PGLEAKGUARD_STACK_DEPTH": "7",
        "PGLEAKGUARD_INTEGRATIONS": "psycopg, psycopg_pool",
        "PGLEAKGUARD_LOG_LEVEL": "error",
        "PGLEAKGUARD_IGNORE_MODULES": "myapp.db,vendor",
        "PGLEAKGUARD_TAG_APPLICATION_NAME": "0",
        "PGLEAKGUARD_JSONL_PATH": "/tmp/leaks.jsonl",
    }
    config = Config.load(environ=env)
    assert config == Config(
        service="billing",
        leak_threshold=2.5,
        idle_in_transaction_threshold=0.5,
        capture_stack=False,
        stack_depth=7,
        integrations=("psycopg", "psycopg_pool"),
        log_level="ERROR",
        ignore_modules=("myapp.db", "vendor"),
        tag_application_name=False,
        jsonl_path="/tmp/leaks.jsonl",
    )


def test_keyword_beats_environment() -> None:
    env = {"PGLEAKGUARD_LEAK_THRESHOLD": "2.5", "PGLEAKGUARD_SERVICE": "from-env"}
    config = Config.load(environ=env, leak_threshold=9, service="from-kwarg")
    assert (config.leak_threshold, config.service) == (9.0, "from-kwarg")


@pytest.mark.parametrize(
    ("option", "value", "accepted"),
    [
        ("leak_threshold", -1, "a positive number of seconds"),
        ("leak_threshold", "soon", "a positive number of seconds"),
        ("idle_in_transaction_threshold", 0, "a positive number of seconds"),
        ("stack_depth", 0, "a whole number of frames from 1 to 1000"),
        ("capture_stack", "maybe", "true or false"),
        ("log_level", "LOUD", "one of DEBUG, INFO, WARNING, ERROR, CRITICAL"),
        ("integrations", ["psycopg", "mysql"], '"auto" or names from psycopg'),
        ("on_leak", 42, "a callable"),
    ],
)
def test_bad_keyword_value_names_option_value_and_accepted(
    option: str, value: object, accepted: str
) -> None:
    with pytest.raises(ValueError) as info:
        Config.load(environ={}, **{option: value})
    message = str(info.value)
    assert f"invalid {option}={value!r}" in message
    assert accepted in message


@pytest.mark.parametrize(
    ("variable", "value", "accepted"),
    [
        ("PGLEAKGUARD_LEAK_THRESHOLD", "abc", "a positive number of seconds"),
        ("PGLEAKGUARD_STACK_DEPTH", "1.5", "a whole number of frames"),
        ("PGLEAKGUARD_INTEGRATIONS", "oracle", '"auto" or names from'),
    ],
)
def test_bad_environment_value_names_the_variable(
    variable: str, value: str, accepted: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(variable, value)
    option = variable.removeprefix("PGLEAKGUARD_").lower()
    with pytest.raises(ValueError) as info:
        pgleakguard.install()
    message = str(info.value)
    assert f"invalid {option}={value!r} (from ${variable})" in message
    assert accepted in message
    assert not pgleakguard.stats()["installed"]


def test_unknown_option_is_a_type_error_listing_known_ones() -> None:
    with pytest.raises(TypeError, match="unknown option.*leak_treshold.*known options: service"):
        pgleakguard.install(leak_treshold=5)
