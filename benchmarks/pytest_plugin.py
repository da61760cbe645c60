"""What the pytest plugin adds to the wall time of a suite of 500 tiny database tests.

Run ``python benchmarks/pytest_plugin.py [--dsn DSN] [--pairs N] [--tests N]``.

The suite: one session-scoped psycopg_pool pool; each test takes a connection, runs
``SELECT 1`` and gives it back. Each sample is a whole ``python -m pytest`` run in a new
process (start-up and collection included), timed on the wall clock. Samples run in ABBA
pairs (BAAB every other pair): A with the plugin off (``-p no:pgleakguard``: pgleakguard is
then not installed at all), B with it on. A row quotes the median of the pair ratios
(B1 + B2) / (A1 + A2) and their interquartile range; the A/A row runs both sides with the
plugin off, the noise of this machine.

Rows: the plugin on (default: a gc.collect() whenever a connection the test took is still
open at its end, which a clean test never leaves); the same with ``--pgleakguard-no-gc``; and
for information a suite whose every test leaks one connection (``--pgleakguard=warn``, so the
run completes): there each test pays the collection that tells garbage from a held
connection.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from overhead import machine, postgres  # noqa: E402

TARGET = 1.05

CONFTEST = """
import os

import psycopg_pool
import pytest


@pytest.fixture(scope="session")
def pool():
    with psycopg_pool.ConnectionPool(os.environ["BENCH_DSN"], min_size=2, max_size=2) as pool:
        yield pool
"""

CLEAN = """
import pytest


@pytest.mark.parametrize("n", range({tests}))
def test_tiny(pool, n):
    with pool.connection() as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
"""

# Each test leaks a connection it opened itself (a pool would run dry); a reference cycle
# keeps it until a collection, so the plugin's gc.collect() is what frees it.
LEAKY = """
import os

import psycopg
import pytest


class Holder:
    def __init__(self, conn):
        self.conn = conn
        self.me = self


@pytest.mark.parametrize("n", range({tests}))
def test_tiny(pool, n):
    conn = psycopg.connect(os.environ["BENCH_DSN"])
    assert conn.execute("SELECT 1").fetchone() == (1,)
    Holder(conn)
"""

INI = """[pytest]
addopts = -p no:cacheprovider -q
asyncio_default_fixture_loop_scope = function
filterwarnings = ignore::ResourceWarning
"""


def suite(root: Path, body: str, tests: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "conftest.py").write_text(textwrap.dedent(CONFTEST))
    (root / "pytest.ini").write_text(INI)
    (root / "test_tiny.py").write_text(textwrap.dedent(body.format(tests=tests)))
    return root


def run(root: Path, args: list[str], dsn: str) -> tuple[float, float]:
    """Wall and CPU (user + system) seconds of one pytest run, in a new process (fails
    loudly if the run did not do what it should)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGLEAKGUARD_")}
    env["BENCH_DSN"] = dsn
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark bug: pytest {args} exited {proc.returncode}:\n{proc.stdout}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return elapsed, cpu


def pairs(
    root: Path, a: list[str], b: list[str], dsn: str, count: int
) -> tuple[list[float], list[float], float]:
    """Wall and CPU pair ratios, and the median bare wall time of one run."""
    wall, cpu, bare_runs = [], [], []
    for k in range(count + 1):
        order = (True, False, False, True) if k % 2 == 0 else (False, True, True, False)
        times = [(is_a, run(root, a if is_a else b, dsn)) for is_a in order]
        if k == 0:
            continue  # warm-up: file caches, bytecode
        for clock, out in ((0, wall), (1, cpu)):
            bare = sum(t[clock] for is_a, t in times if is_a)
            instr = sum(t[clock] for is_a, t in times if not is_a)
            out.append(instr / bare)
        bare_runs += [t[0] for is_a, t in times if is_a]
    return wall, cpu, statistics.median(bare_runs)


def row(name: str, measured: tuple[list[float], list[float], float], target: float | None) -> str:
    wall, cpu, bare = measured
    cells = []
    for ratios in (wall, cpu):
        median = statistics.median(ratios)
        q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (median,) * 3
        cells.append(f"{median:6.3f}x {q1:.3f}-{q3:.3f}")
    median = statistics.median(wall)
    verdict = "-" if target is None else ("PASS" if median <= target else "MISS")
    limit = f"<= {target:.2f}x" if target else "-"
    return f"{name:<52} {bare:5.2f} s  {cells[0]}  {cells[1]}  {limit:>8}  {verdict}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", help="PostgreSQL to use (default: a throwaway embedded one)")
    parser.add_argument("--pairs", type=int, default=7, help="ABBA pairs per row (default 7)")
    parser.add_argument("--tests", type=int, default=500, help="tests per suite (default 500)")
    args = parser.parse_args()
    off = ["-p", "no:pgleakguard"]
    with postgres(args.dsn) as dsn, tempfile.TemporaryDirectory() as tmp:
        clean = suite(Path(tmp) / "clean", CLEAN, args.tests)
        leaky = suite(Path(tmp) / "leaky", LEAKY, args.tests)
        run(clean, off, dsn)  # warm the file cache
        print(machine())
        print(f"{args.tests} tests per suite, {args.pairs} ABBA pairs per row (leaking suites:")
        print(f"{max(3, args.pairs // 4)}), each sample a whole pytest run in a new process\n")
        print(
            f"{'suite (whole pytest runs)':<52} {'bare':>7}  {'wall ratio, IQR':<20}  "
            f"{'CPU ratio, IQR':<20}  {'target':>8}"
        )
        n = args.tests
        no_gc = ["--pgleakguard-no-gc"]
        warn = ["--pgleakguard=warn"]
        rows = [
            ("A/A control: plugin off on both sides", clean, off, None),
            (f"{n} clean tests, plugin on (gc on)", clean, [], TARGET),
            (f"{n} clean tests, plugin on, --pgleakguard-no-gc", clean, no_gc, TARGET),
            (f"{n} leaking tests, warn mode (gc on)", leaky, warn, None),
            (f"{n} leaking tests, warn mode, --pgleakguard-no-gc", leaky, [*warn, *no_gc], None),
        ]
        for name, root, b_side, target in rows:
            # The leaking suites are information (and slow): fewer pairs.
            count = args.pairs if root is clean else max(3, args.pairs // 4)
            print(row(name, pairs(root, off, b_side, dsn, count), target), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
