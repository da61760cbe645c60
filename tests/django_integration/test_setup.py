"""Setup through INSTALLED_APPS and settings.PGLEAKGUARD, application_name tags, the
``manage.py pgleakguard diagnose`` command, and uninstall."""

from __future__ import annotations

import importlib
import io
import json
import logging
import os
import subprocess
import sys
import threading
import weakref
from pathlib import Path
from typing import Any, Callable

import pytest
from asgiref.sync import SyncToAsync
from django.apps import apps
from django.conf import settings as django_settings
from django.contrib.contenttypes.models import ContentType
from django.core import checks, signals
from django.core.handlers.asgi import ASGIHandler
from django.core.management import ManagementUtility, call_command
from django.core.management.base import CommandError
from django.db import close_old_connections, connection, connections
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.backends.postgresql.base import DatabaseWrapper

import pgleakguard
from pgleakguard import _runtime, tagging
from pgleakguard.integrations import django as django_hooks
from pgleakguard.integrations.django.management.commands import pgleakguard as command

from .helpers import close_from_here, database_settings
from conftest import EventLog

pytest_plugins = ["pytester"]

PATCHED = [
    (BaseDatabaseWrapper, "ensure_connection"),
    (BaseDatabaseWrapper, "close"),
    (DatabaseWrapper, "get_connection_params"),
    (SyncToAsync, "__call__"),
    (ASGIHandler, "__call__"),
]


def _originals() -> list[Any]:
    return [vars(owner).get(name) for owner, name in PATCHED]


def _identifiers() -> list[str]:
    state = _runtime.current()
    assert state is not None
    return [i.identifier for i in state.integrations]


def ready() -> None:
    """What Django runs at startup for the app in INSTALLED_APPS."""
    apps.get_app_config("pgleakguard").ready()


def test_installed_app_takes_settings_then_environment(
    settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DJANGO_SETTINGS_MODULE", "django_integration.settings")  # manage.py's
    monkeypatch.setenv("PGLEAKGUARD_LOG_LEVEL", "error")
    monkeypatch.setenv("PGLEAKGUARD_LEAK_THRESHOLD", "99")
    monkeypatch.delenv("PGLEAKGUARD_SERVICE", raising=False)
    monkeypatch.delenv("PGLEAKGUARD_INTEGRATIONS", raising=False)
    settings.PGLEAKGUARD = {"leak_threshold": 45, "idle_in_transaction_threshold": 20}
    ready()
    state = _runtime.current()
    assert state is not None
    config = state.config
    # settings beat the environment, which beats the defaults
    assert (config.leak_threshold, config.idle_in_transaction_threshold) == (45.0, 20.0)
    assert config.log_level == "ERROR"
    assert config.service == "django_integration"  # the settings module's project
    assert _identifiers() == ["psycopg", "psycopg_pool", "sqlalchemy", "django"]


@pytest.mark.parametrize(
    ("files", "module", "service"),
    [
        # cookiecutter-django: the project is the folder holding config/ (and manage.py)
        (["my_shop/config/__init__.py", "my_shop/config/settings/__init__.py",
          "my_shop/config/settings/production.py"], "config.settings.production", "my_shop"),
        (["billing/src/conf/__init__.py", "billing/src/conf/settings.py"],
         "conf.settings", "billing"),
        (["inventory/settings.py"], "settings", "inventory"),
        (["site/mysite/__init__.py", "site/mysite/settings.py"], "mysite.settings", "mysite"),
    ],
    ids=["cookiecutter-config", "src-layout", "top-level-settings-module", "startproject"],
)  # fmt: skip
def test_service_defaults_to_the_projects_folder_when_the_settings_package_is_generic(
    files: list[str],
    module: str,
    service: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    root = tmp_path / files[-1].split("/")[0]
    import_root = root / "src" if (root / "src").is_dir() else root
    monkeypatch.syspath_prepend(str(import_root))
    top = module.split(".")[0]
    monkeypatch.delitem(sys.modules, top, raising=False)
    try:
        importlib.import_module(module)  # as Django imports the settings module
        monkeypatch.setenv("DJANGO_SETTINGS_MODULE", module)
        monkeypatch.delenv("PGLEAKGUARD_SERVICE", raising=False)
        assert django_hooks.project_name() == service
        assert django_hooks.settings_options()["service"] == service
    finally:
        for name in [m for m in sys.modules if m == top or m.startswith(top + ".")]:
            del sys.modules[name]


def test_named_integrations_in_settings_always_include_django(settings: Any) -> None:
    settings.PGLEAKGUARD = {"integrations": ["sqlalchemy"], "service": "billing"}
    ready()
    assert _identifiers() == ["psycopg", "sqlalchemy", "psycopg_pool", "django"]
    assert _runtime.current().config.service == "billing"  # type: ignore[union-attr]


def test_an_installation_made_before_django_started_is_kept(
    settings: Any, install: Callable[..., EventLog]
) -> None:
    settings.PGLEAKGUARD = None
    install(service="from-pgleakguard-run")
    ready()
    assert _runtime.current().config.service == "from-pgleakguard-run"  # type: ignore[union-attr]


def test_bad_setting_is_logged_and_reported_by_check_and_django_runs_on(
    settings: Any, caplog: pytest.LogCaptureFixture
) -> None:
    settings.PGLEAKGUARD = {"leak_threshold": "soon"}
    with caplog.at_level(logging.ERROR, logger="pgleakguard"):
        ready()
    assert not pgleakguard.stats()["installed"]
    assert "pgleakguard is not installed: pgleakguard: invalid leak_threshold='soon'" in (
        caplog.text
    )
    [warning] = [m for m in checks.run_checks() if m.id == "pgleakguard.W001"]
    assert "invalid leak_threshold='soon'" in warning.msg
    settings.PGLEAKGUARD = {"leak_threshold": 5}
    ready()
    assert [m for m in checks.run_checks() if m.id == "pgleakguard.W001"] == []


def _receivers(signal: Any) -> list[Any]:
    return [r() if isinstance(r, weakref.ref) else r for _, r, *_ in signal.receivers]


def _ours(signal: Any) -> list[Any]:
    return [r for r in _receivers(signal) if "pgleakguard" in getattr(r, "__module__", "")]


def test_uninstall_restores_everything_and_keeps_djangos_own_receivers() -> None:
    before = _originals()
    pgleakguard.install(integrations=["django"])
    assert all(a is not b for a, b in zip(before, _originals()))
    finished = _receivers(signals.request_finished)
    # ours runs before Django's close_old_connections, which closes what it must check
    assert finished.index(_ours(signals.request_finished)[0]) < finished.index(
        close_old_connections
    )
    assert len(_ours(signals.request_started)) == 1
    pgleakguard.uninstall()
    assert all(a is b for a, b in zip(before, _originals()))
    for signal in (signals.request_started, signals.request_finished):
        assert close_old_connections in _receivers(signal)
        assert _ours(signal) == []


@pytest.mark.django_db(transaction=True)
def test_application_name_is_the_project_name_unless_options_or_pgappname_set_one(
    install: Callable[..., EventLog], monkeypatch: pytest.MonkeyPatch
) -> None:
    install(service=None)

    def server_side() -> str:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()"
            )
            return str(cursor.fetchone()[0])

    with database_settings():
        assert server_side() == f"django_integration/pid:{os.getpid()}"
        [held] = pgleakguard.open_checkouts()
        assert held.application_name == f"django_integration/pid:{os.getpid()}"
    options = connection.settings_dict["OPTIONS"]
    with database_settings(OPTIONS={**options, "application_name": "billing api"}):
        assert server_side() == f"billing-api/pid:{os.getpid()}"  # kept as the service part
        assert tagging.parse(server_side()) == tagging.Tag("billing-api", os.getpid())
    monkeypatch.setenv("PGAPPNAME", "billing worker")  # libpq's variable: kept the same way
    with database_settings():
        assert server_side() == f"billing-worker/pid:{os.getpid()}"
        [held] = pgleakguard.open_checkouts()
        assert held.application_name == f"billing-worker/pid:{os.getpid()}"


def manage_py(*argv: str) -> None:
    """``python manage.py ARGV`` as Django runs it (ManagementUtility), in this process."""
    ManagementUtility(["manage.py", *argv]).execute()


_DJANGO_OPTIONS_AFTER = [
    "diagnose", "--database", "ALIAS", "--format", "json", "--idle-threshold", "0s",
    "-v", "2", "--settings=django_integration.settings", "--traceback",
]  # fmt: skip
_DJANGO_OPTIONS_BEFORE = [
    "--database", "ALIAS", "-v", "2", "--settings=django_integration.settings",
    "diagnose", "--format=json", "--idle-threshold", "0s",
]  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "forwarded"),
    [
        (_DJANGO_OPTIONS_AFTER, "--format json --idle-threshold 0s"),
        (_DJANGO_OPTIONS_BEFORE, "--format=json --idle-threshold 0s"),
    ],
    ids=["django-options-after-diagnose", "django-options-before-diagnose"],
)
@pytest.mark.django_db(transaction=True)
def test_manage_py_diagnose_takes_djangos_options_anywhere_and_names_the_services_sessions(
    argv: list[str],
    forwarded: str,
    events: EventLog,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    # the alias --database names: its own libpq options show it was the one diagnosed
    alias = "pooled" if django_settings.NATIVE_POOL else "default"
    passfile = tmp_path / "pgpass"
    passfile.write_text("*:*:*:*:from-the-passfile\n")
    passfile.chmod(0o600)
    options = connections[alias].settings_dict["OPTIONS"]
    monkeypatch.setitem(options, "passfile", str(passfile))
    monkeypatch.setitem(options, "sslmode", "disable")
    # trust authentication on the test server: any password connects, none may be shown
    monkeypatch.setitem(connections[alias].settings_dict, "PASSWORD", "s3cret-pw-77")
    monkeypatch.setenv("DJANGO_SETTINGS_MODULE", "django_integration.settings")  # --settings
    kept: list[Any] = []
    ready_to_look = threading.Event()

    def poller() -> None:
        ContentType.objects.count()
        kept.append(connections["default"])
        ready_to_look.set()

    worker = threading.Thread(target=poller, name="poller")
    worker.start()
    assert ready_to_look.wait(10)
    worker.join()
    [poller_pid] = [c.backend_pid for c in pgleakguard.open_checkouts() if c.holder == "poller"]
    try:
        manage_py("pgleakguard", *[alias if a == "ALIAS" else a for a in argv])
    finally:
        close_from_here(kept[0])
    captured = capsys.readouterr()
    assert "s3cret-pw-77" not in captured.out + captured.err
    document = json.loads(captured.out)  # stdout is the JSON document alone
    dsn = document["source"]["name"]
    # what ran (on stderr), with only diagnose's own options passed on
    assert captured.err == f"pgleakguard diagnose --dsn {dsn!r} {forwarded}\n"
    assert f"passfile='{passfile}'" in dsn and "sslmode='disable'" in dsn
    assert f"dbname='{connections[alias].settings_dict['NAME']}'" in dsn
    # the poller's idle session (a suspect at --idle-threshold 0s), named from its tag
    [suspect] = [s for s in document["suspects"] if s["backend_pid"] == poller_pid]
    assert (suspect["service"], suspect["client_pid"]) == ("tests", os.getpid())


@pytest.mark.parametrize(
    "argv",
    [["diagnose", "--database", "nope"], ["--database", "nope", "diagnose"]],
    ids=["after", "before"],
)
def test_manage_py_diagnose_of_an_unknown_alias_is_one_error_line(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        manage_py("pgleakguard", *argv)
    assert exit_.value.code == 1
    assert capsys.readouterr().err == "CommandError: no database 'nope' in settings.DATABASES\n"


def test_example_projects_manage_py_diagnose_with_djangos_options_after_diagnose(
    pg_dsn: str,
) -> None:
    # the form examples/django_project/README.md documents, in a process of its own
    manage = Path(__file__).parents[2] / "examples" / "django_project" / "manage.py"
    alias = "reports" if django_settings.NATIVE_POOL else "default"
    proc = subprocess.run(
        [sys.executable, str(manage), "pgleakguard", "diagnose", "--database", alias]
        + ["--format", "json", "-v", "2", "--no-color"],
        env={k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
        | {"DATABASE_URL": pg_dsn},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    [command_line] = proc.stderr.splitlines()  # what ran, on stderr
    assert command_line.startswith("pgleakguard diagnose --dsn ")
    assert command_line.rsplit('" ', 1)[1] == "--format json"  # -v 2, --no-color: Django's
    assert json.loads(proc.stdout)["version"] == 1  # stdout parses as JSON


@pytest.mark.django_db(transaction=True)
def test_manage_py_diagnose_at_verbosity_0_prints_only_the_json_document(
    capsys: pytest.CaptureFixture[str],
) -> None:
    manage_py("pgleakguard", "diagnose", "--format", "json", "-v", "0")
    captured = capsys.readouterr()
    assert captured.err == ""  # not even the command line
    assert json.loads(captured.out)["source"]["kind"] == "dsn"


def test_a_bad_diagnose_option_is_a_command_error_not_an_exit(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(CommandError, match="^pgleakguard diagnose exited with status 2$"):
        call_command("pgleakguard", "diagnose", "--format", "yaml")
    assert "argument --format: invalid choice: 'yaml'" in capsys.readouterr().err


def test_conninfo_passes_libpqs_options_and_keeps_secrets_out() -> None:
    dsn, password = command.conninfo(
        {
            "dbname": "db",
            "host": "/tmp/pg dir",
            "port": 5432,
            "user": "o'neil",
            "password": "s3cret",
            "passfile": "/home/app/.pgpass",
            "sslmode": "verify-full",
            "sslrootcert": "/etc/ssl/root.crt",
            "sslpassword": "key-s3cret",
            "target_session_attrs": "read-write",
            "application_name": "shop/pid:1",
            "client_encoding": "UTF8",
            "cursor_factory": object(),
            "prepare_threshold": None,
            "context": object(),
        }
    )
    assert dsn == (
        "dbname='db' host='/tmp/pg dir' port='5432' user='o\\'neil' "
        "passfile='/home/app/.pgpass' sslmode='verify-full' sslrootcert='/etc/ssl/root.crt' "
        "target_session_attrs='read-write'"
    )
    assert password == "s3cret"


@pytest.mark.django_db(transaction=True)
def test_diagnose_passes_the_password_through_the_environment_only(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    # trust authentication on the test server: any password connects, none may be shown
    monkeypatch.setitem(connection.settings_dict, "PASSWORD", "s3cret-pw-77")
    monkeypatch.delenv("PGPASSWORD", raising=False)
    out, err = io.StringIO(), io.StringIO()
    call_command("pgleakguard", "diagnose", "--format", "json", stdout=out, stderr=err)
    text = out.getvalue()
    captured = capfd.readouterr()
    assert json.loads(text)["version"] == 1  # the real diagnosis ran, in JSON
    assert err.getvalue().startswith("pgleakguard diagnose --dsn ")
    assert "s3cret-pw-77" not in err.getvalue()
    assert "s3cret-pw-77" not in text + captured.out + captured.err
    assert "PGPASSWORD" not in os.environ  # restored after the command


def test_inline_pytest_runs_in_this_configured_process_do_not_start_pytest_django(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile("def test_ok():\n    assert 1\n")
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.runpytest().assert_outcomes(passed=1)
