"""Load: 64 threads x 10,000 checkouts on a real pool, leaks injected at known lines at
random moments: every leak reported with its line, nothing else; memory comes back."""

from __future__ import annotations

import gc
import random
import threading
import tracemalloc
from typing import Any, Callable

import psycopg_pool
import pytest

import pgleakguard

from conftest import EventLog, marked_line

THREADS = 64
CHECKOUTS = 10_000


def leak_and_keep(pool: psycopg_pool.ConnectionPool[Any], kept: list[Any]) -> None:
    kept.append(pool.getconn())  # leak: load-kept


def leak_and_drop(pool: psycopg_pool.ConnectionPool[Any]) -> None:
    pool.getconn()  # leak: load-dropped


@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_injected_leaks_are_all_reported_and_nothing_else(
    pg_dsn: str, install: Callable[..., EventLog]
) -> None:
    events = install(leak_threshold=120, idle_in_transaction_threshold=120)
    rng = random.Random(20261128)
    # (thread, checkout number) -> how that checkout leaks; the rest are returned properly
    plan: dict[tuple[int, int], str] = {}
    while len(plan) < 24:
        plan[(rng.randrange(THREADS), rng.randrange(CHECKOUTS))] = rng.choice(["kept", "dropped"])
    kept: list[Any] = []
    errors: list[BaseException] = []
    with psycopg_pool.ConnectionPool(
        pg_dsn, min_size=4, max_size=40, timeout=120, name="load"
    ) as pool:

        def work(me: int) -> None:
            try:
                for n in range(CHECKOUTS):
                    how = plan.get((me, n))
                    if how == "kept":
                        leak_and_keep(pool, kept)
                    elif how == "dropped":
                        leak_and_drop(pool)
                    else:
                        conn = pool.getconn()
                        pool.putconn(conn)
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,), name=f"w{i}") for i in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        gc.collect()
        pgleakguard.check()
        leaks = events.leaks()
        assert errors == []
        expected = sorted((how, f"w{me}") for (me, _), how in plan.items())
        kinds = {"kept": "owner_exited", "dropped": "garbage_collected"}
        got = sorted((next(h for h, k in kinds.items() if k == e.kind), e.holder) for e in leaks)
        assert got == expected  # recall and precision: 100%
        lines = {"owner_exited": "load-kept", "garbage_collected": "load-dropped"}
        for event in leaks:
            assert (event.callsite.file, event.callsite.line) == (
                __file__,
                marked_line(__file__, lines[event.kind]),
            )
        assert pgleakguard.stats()["leaks"] == {
            "owner_exited": sum(1 for h in plan.values() if h == "kept"),
            "garbage_collected": sum(1 for h in plan.values() if h == "dropped"),
        }
        for conn in kept:
            pool.putconn(conn)
    assert pgleakguard.open_checkouts() == []


def test_memory_returns_to_baseline_and_a_million_checkouts_do_not_grow_it(
    pg_dsn: str, install: Callable[..., EventLog]
) -> None:
    events = install(leak_threshold=120, idle_in_transaction_threshold=120)
    with psycopg_pool.ConnectionPool(pg_dsn, min_size=8, max_size=8, name="mem") as pool:
        pool.wait()

        def churn(count: int) -> None:
            for _ in range(count):
                pool.putconn(pool.getconn())

        def run(threads: int, each: int) -> None:
            workers = [threading.Thread(target=churn, args=(each,)) for _ in range(threads)]
            for t in workers:
                t.start()
            for t in workers:
                t.join()

        run(8, 2_000)  # warm every cache
        gc.collect()
        tracemalloc.start()
        try:
            baseline = tracemalloc.take_snapshot()
            held = [pool.getconn() for _ in range(8)]
            during = tracemalloc.get_traced_memory()[0]
            for conn in held:
                pool.putconn(conn)
            run(8, 2_500)
            gc.collect()
            after_small = tracemalloc.get_traced_memory()[0]
            tracemalloc.stop()
            run(8, 125_000)  # 1,000,000 checkouts
            tracemalloc.start()
            gc.collect()
            run(8, 2_500)
            gc.collect()
            after_million = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
        growth = sum(
            stat.size_diff
            for stat in after_million.compare_to(baseline, "filename")
            if "pgleakguard" in str(stat.traceback)
        )
    assert during > 0 and after_small >= 0
    assert growth <= 4096, f"pgleakguard's own memory grew by {growth} bytes"
    assert pgleakguard.stats()["open_checkouts"] == 0
    assert events == []
