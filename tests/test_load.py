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
        print(
            f"\nload: {THREADS * CHECKOUTS:,} checkouts, {len(plan)} leaks injected, "
            f"{len(leaks)} reported, each at its line"
        )
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
    from pgleakguard.tracker import Checkout

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

        def ours(snapshot: tracemalloc.Snapshot) -> int:
            return sum(
                stat.size
                for stat in snapshot.statistics("filename")
                if "pgleakguard" in str(stat.traceback)
            )

        def hold_all() -> list[Any]:
            return [pool.getconn() for _ in range(8)]

        tracemalloc.start()
        try:
            # Warm every cache, with tracing on, by the very steps measured below: the
            # interpreter keeps a frame per function for reuse (before Python 3.11 a heap
            # object, counted here), whichever thread called it last.
            for _ in range(2):
                for conn in hold_all():
                    pool.putconn(conn)
                run(8, 2_000)
                churn(10)
            gc.collect()
            base_snap = tracemalloc.take_snapshot()
            baseline = ours(base_snap)
            held = hold_all()
            during = ours(tracemalloc.take_snapshot())
            for conn in held:
                pool.putconn(conn)
            run(8, 2_500)
            gc.collect()
            after_snap = tracemalloc.take_snapshot()
            after = ours(after_snap)
        finally:
            tracemalloc.stop()

        def live_records() -> int:
            gc.collect()
            return sum(1 for o in gc.get_objects() if type(o) is Checkout)

        live_before = live_records()  # other tests' records may still be referenced
        run(8, 125_000)  # 1,000,000 checkouts, untraced (tracing would triple the time)
        live = live_records() - live_before
    # The figures docs/reliability.md quotes (shown with pytest -s).
    print(
        f"\nmemory: 8 open checkouts +{during - baseline} B; after 20,000 more "
        f"checkouts, all returned: {after - baseline:+d} B against the baseline; "
        f"after 1,000,000 more: {live} Checkout records alive"
    )
    # open checkouts cost memory, and it all comes back once they are returned
    assert during - baseline >= 8 * 300
    diff = [
        str(d)
        for d in after_snap.compare_to(base_snap, "lineno")
        if "pgleakguard" in str(d.traceback) and d.size_diff
    ][:5]
    assert after - baseline <= 2048, f"{after - baseline} bytes not given back: {diff}"
    # after a million checkouts: no record is alive, the registry is empty
    assert live == 0
    assert pgleakguard.stats()["open_checkouts"] == 0
    assert events == []


def test_the_registry_is_bounded_and_its_overflow_counted_and_warned_once(
    pg_dsn: str, install: Callable[..., EventLog], caplog: pytest.LogCaptureFixture
) -> None:
    install(max_open_checkouts=3, leak_threshold=120, idle_in_transaction_threshold=120)
    with psycopg_pool.ConnectionPool(pg_dsn, min_size=1, max_size=6, name="bounded") as pool:
        held = [pool.getconn() for _ in range(6)]
        assert len(pgleakguard.open_checkouts()) == 3  # tracked up to the bound
        stats = pgleakguard.stats()
        assert (stats["open_checkouts"], stats["untracked_checkouts"]) == (3, 3)
        warned = [r for r in caplog.records if "checkouts are open" in r.getMessage()]
        assert len(warned) == 1  # once, not once per untracked checkout
        for conn in held:
            assert conn.execute("SELECT 1").fetchone() == (1,)  # untracked ones work
            pool.putconn(conn)
        assert pgleakguard.open_checkouts() == []
        with pool.connection():  # room again: tracked
            assert len(pgleakguard.open_checkouts()) == 1
