"""Configuration: kwargs beat PGLEAKGUARD_* beat defaults; bad values name what is wrong."""

from __future__ import annotations

import dataclasses
from typing import Any

import psycopg
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
        "PGLEAKGUARD_SQL_COMMENTS": "yes",
        "PGLEAKGUARD_RETAG_ON_CHECKOUT": "true",
        "PGLEAKGUARD_MAX_OPEN_CHECKOUTS": "500",
        "PGLEAKGUARD_OTEL": "no",
        "PGLEAKGUARD_OTEL_CHECKOUT_SPANS": "on",
        "PGLEAKGUARD_MAX_SQL_LENGTH": "80",
        "PGLEAKGUARD_REDACT_SQL": "1",
        "PGLEAKGUARD_ACTIVITY_DSN": "postgresql://monitor@db/app",
    }
    # every option but the objects (callback, providers), which only a keyword can give
    options = {f.name for f in dataclasses.fields(Config)}
    objects = {"on_leak", "meter_provider", "tracer_provider"}
    assert {v.removeprefix("PGLEAKGUARD_").lower() for v in env} == options - objects
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
        sql_comments=True,
        retag_on_checkout=True,
        max_open_checkouts=500,
        otel=False,
        otel_checkout_spans=True,
        max_sql_length=80,
        redact_sql=True,
        activity_dsn="postgresql://monitor@db/app",
    )
    # the objects are never read from the environment
    assert Config.load(environ={"PGLEAKGUARD_ON_LEAK": "print"}).on_leak is None


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
        ("log_level", "LOUD", "one of DEBUG, INFO, WARNING, ERROR, CRITICAL or a number"),
        ("log_level", 0, "or a number from 1 to 100"),
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


@pytest.mark.parametrize(
    ("given", "kept"), [(15, "15"), ("15", "15"), (20, "INFO"), ("debug", "DEBUG")]
)
def test_log_level_takes_a_name_or_a_number(given: object, kept: str) -> None:
    assert Config.load(environ={}, log_level=given).log_level == kept


def test_a_custom_numeric_log_level_still_logs_every_report(
    pg_dsn: str, install: Any, caplog: pytest.LogCaptureFixture
) -> None:
    events = install(log_level=15)
    with caplog.at_level(15, logger="pgleakguard"), psycopg.connect(pg_dsn):
        events.wait_for("held_too_long")
        pgleakguard.check()
    [record] = [r for r in caplog.records if "connection leak [held_too_long" in r.getMessage()]
    assert (record.levelno, record.levelname) == (15, "Level 15")


def test_a_bad_activity_dsn_is_never_echoed() -> None:
    with pytest.raises(ValueError) as info:
        Config.load(environ={}, activity_dsn=b"postgresql://u:Sentinel-pw@h/db")
    assert str(info.value) == (
        "pgleakguard: invalid activity_dsn=<bytes, not shown>: expected a string"
    )


@pytest.mark.parametrize(
    ("option", "method"), [("meter_provider", "get_meter"), ("tracer_provider", "get_tracer")]
)
def test_a_provider_that_is_not_one_is_a_one_line_value_error(option: str, method: str) -> None:
    with pytest.raises(ValueError) as info:
        pgleakguard.install(**{option: object()})
    message = str(info.value)
    assert message.startswith(f"pgleakguard: invalid {option}=<object object at ")
    assert message.endswith(f": expected an OpenTelemetry provider (with {method}()), or None")
    assert "\n" not in message
    assert not pgleakguard.stats()["installed"]
