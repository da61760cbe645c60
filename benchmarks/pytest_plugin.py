"""What the pytest plugin adds to the time of a suite of 500 tiny database tests.

Run ``python benchmarks/pytest_plugin.py [--dsn DSN] [--pairs N] [--tests N] [--heap N]``.

Each sample is a whole ``python -m pytest`` run in a new process (start-up, collection,
pgleakguard's installation included; bytecode cached, as for an installed package). Samples
run in ABBA pairs (BAAB every other pair): A with the plugin off (``-p no:pgleakguard``:
pgleakguard is then not installed at all), B with it on. A row quotes the median of the pair
ratios (B1 + B2) / (A1 + A2), on the pytest process's CPU time (user + system: what the
plugin adds; the server's time is not in it) and on the wall clock, with their interquartile
range; the A/A row runs both sides with the plugin off: the noise of this machine. The first
pair of each row is a warm-up.

The suites share one session-scoped psycopg_pool pool and keep ``--heap`` container objects
alive (200,000 by default: the heap of a mid-sized application, which is what a full
``gc.collect()`` has to walk):

- clean: every test takes a connection, runs ``SELECT 1`` and gives it back;
- mixed: the same, but one test in ten leaks a connection of its own: alternately kept in a
  module-level list (still held: ``scope_ended``) and dropped in a reference cycle (garbage
  only a collection frees: ``garbage_collected``), in ``--pgleakguard=warn`` mode so the run
  completes;
- leaky: every test leaks, alternately kept and dropped (information: the worst case).

When the plugin runs ``gc.collect()``: at the end of a test, only if a connection the test
(or a fixture finalized with it) took is still open: first ``gc.collect(1)`` (the young
generations, where a connection dropped during the test is), then ``gc.collect(2)`` only if
one is still open after that (a connection still held, which no collection frees). A clean
test returns what it took, so the clean rows never collect, with or without
``--pgleakguard-no-gc``; the mixed and leaky rows are where the option matters. The script
counts the plugin's ``gc.collect()`` calls in every B run and prints them per row.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from overhead import machine, postgres  # noqa: E402

TARGET = 1.05

CONFTEST = """
import gc
import json
import os
import sys

import psycopg_pool
import pytest

#: An application's heap: what a full collection walks.
HEAP = [[n] for n in range(int(os.environ["BENCH_HEAP"]))]

#: gc.collect() calls made by pgleakguard, by generation (the script reads them).
CALLS = {}
_collect = gc.collect


def _counting_collect(generation=2):
    if sys._getframe(1).f_globals.get("__name__", "").startswith("pgleakguard"):
        CALLS[generation] = CALLS.get(generation, 0) + 1
    return _collect(generation)


gc.collect = _counting_collect


def pytest_sessionfinish():
    runtime = sys.modules.get("pgleakguard._runtime")
    installed = runtime is not None and runtime.current() is not None
    with open(os.environ["BENCH_GC_LOG"], "w") as fh:
        json.dump({"collections": CALLS, "installed": installed}, fh)


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

# A test that leaks keeps its connection in a module-level list (held) or drops it in a
# reference cycle (garbage until a collection); either way it opened it itself (a pool
# would run dry).
LEAKS = """
import os

import psycopg
import pytest

KEPT = []


class Holder:
    def __init__(self, conn):
        self.conn = conn
        self.me = self


@pytest.mark.parametrize("n", range({tests}))
def test_tiny(pool, n):
    if n % {every}:
        with pool.connection() as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        return
    conn = psycopg.connect(os.environ["BENCH_DSN"])
    assert conn.execute("SELECT 1").fetchone() == (1,)
    if {keep} and (n // {every}) % 2:
        KEPT.append(conn)
    else:
        Holder(conn)
"""

INI = """[pytest]
addopts = -p no:cacheprovider -q
asyncio_default_fixture_loop_scope = function
filterwarnings = ignore::ResourceWarning
"""


@dataclasses.dataclass
class Sample:
    """One pytest run."""

    wall: float
    cpu: float
    #: pgleakguard's gc.collect() calls in the run, by generation.
    collections: dict[str, int]


def suite(root: Path, body: str, **fields: Any) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "conftest.py").write_text(textwrap.dedent(CONFTEST))
    (root / "pytest.ini").write_text(INI)
    (root / "test_tiny.py").write_text(textwrap.dedent(body.format(**fields)))
    return root


def run(root: Path, args: list[str], dsn: str, heap: int, under: Sequence[str] = ()) -> Sample:
    """One pytest run in a new process (fails loudly if it did not do what it should),
    ``under`` a tool (valgrind) if given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PGLEAKGUARD_", "PYTEST_"))}
    log = root / "gc.json"
    env.update(BENCH_DSN=dsn, BENCH_HEAP=str(heap), BENCH_GC_LOG=str(log))
    # Bytecode cached as for any installed package (some machines set
    # PYTHONDONTWRITEBYTECODE: every run would compile pgleakguard's sources again).
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(root.parent / "pycache")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.run(
        [*under, sys.executable, "-m", "pytest", *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark bug: pytest {args} exited {proc.returncode}:\n{proc.stdout}")
    logged = json.loads(log.read_text())
    plugin_on = "no:pgleakguard" not in args
    reported = "= pgleakguard =" in proc.stdout
    if logged["installed"] != plugin_on or ("leak" in root.name and reported != plugin_on):
        raise SystemExit(f"benchmark bug: pytest {args} in {root}: plugin on/off not as asked")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Sample(elapsed, cpu, logged["collections"])


@dataclasses.dataclass
class Row:
    """The pairs of one row."""

    wall: list[float]
    cpu: list[float]
    bare_wall: float
    bare_cpu: float
    collections: dict[str, float]  # per B run


def pairs(root: Path, a: list[str], b: list[str], dsn: str, count: int, heap: int) -> Row:
    """``count`` ABBA pairs (after one warm-up pair)."""
    wall, cpu, bare, gcs = [], [], [], []
    for k in range(count + 1):
        order = (True, False, False, True) if k % 2 == 0 else (False, True, True, False)
        samples = [(is_a, run(root, a if is_a else b, dsn, heap)) for is_a in order]
        if k == 0:
            continue  # warm-up: file caches, bytecode
        bare_side = [t for is_a, t in samples if is_a]
        instr = [t for is_a, t in samples if not is_a]
        wall.append(sum(t.wall for t in instr) / sum(t.wall for t in bare_side))
        cpu.append(sum(t.cpu for t in instr) / sum(t.cpu for t in bare_side))
        bare += bare_side
        gcs += [t.collections for t in instr]
    keys = sorted({key for g in gcs for key in g})
    return Row(
        wall,
        cpu,
        statistics.median(t.wall for t in bare),
        statistics.median(t.cpu for t in bare),
        {key: statistics.mean(g.get(key, 0) for g in gcs) for key in keys},
    )


def instructions(root: Path, args: list[str], dsn: str, heap: int) -> int:
    """Instructions executed by one pytest run (all its threads), counted by callgrind:
    the same to a fraction of a percent from run to run, whatever else the machine does."""
    out = root / "callgrind.out"
    run(root, args, dsn, heap, ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"])
    for line in out.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise SystemExit(f"benchmark bug: no instruction count in {out}")


def row(name: str, measured: Row, tests: int, target: float | None) -> str:
    cells = []
    for ratios in (measured.cpu, measured.wall):
        median = statistics.median(ratios)
        q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (median,) * 3
        cells.append(f"{median:6.3f}x {q1:.3f}-{q3:.3f}")
    median = statistics.median(measured.cpu)
    added = (median - 1) * measured.bare_cpu / tests * 1e6
    verdict = "-" if target is None else ("PASS" if median <= target else "MISS")
    limit = f"<= {target:.2f}x" if target else "-"
    collections = ",".join(f"{k}:{v:g}" for k, v in measured.collections.items()) or "0"
    return (
        f"{name:<50} {measured.bare_cpu:5.2f} s  {cells[0]}  {cells[1]}  {added:+6.0f} us"
        f"  {collections:>12}  {limit:>8}  {verdict}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", help="PostgreSQL to use (default: a throwaway embedded one)")
    parser.add_argument("--pairs", type=int, default=15, help="ABBA pairs per row (default 15)")
    parser.add_argument("--tests", type=int, default=500, help="tests per suite (default 500)")
    parser.add_argument(
        "--heap", type=int, default=200_000, help="objects kept alive (default 200000)"
    )
    parser.add_argument(
        "--callgrind",
        action="store_true",
        help="instead of timing: count the instructions of one run per side under valgrind",
    )
    args = parser.parse_args()
    # Killed: still stop the throwaway server (the context manager's cleanup runs).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    off = ["-p", "no:pgleakguard"]
    n = args.tests
    with postgres(args.dsn) as dsn, tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        clean = suite(root / "clean", CLEAN, tests=n)
        mixed = suite(root / "mixed-leaks", LEAKS, tests=n, every=10, keep=True)
        leaky = suite(root / "all-leak", LEAKS, tests=n, every=1, keep=False)
        run(clean, off, dsn, args.heap)  # warm the file cache
        print(machine())
        print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        no_gc = ["--pgleakguard-no-gc"]
        warn = ["--pgleakguard=warn"]
        rows = [
            ("A/A control: plugin off on both sides", clean, off, None),
            (f"{n} clean tests, plugin on (gc on: never runs)", clean, [], TARGET),
            (f"{n} clean tests, plugin on, --pgleakguard-no-gc", clean, no_gc, TARGET),
            ("A/A control: mixed suite, plugin off on both sides", mixed, off, None),
            (f"{n} tests, 1 in 10 leaks, warn mode (gc on)", mixed, warn, TARGET),
            (
                f"{n} tests, 1 in 10 leaks, warn, --pgleakguard-no-gc",
                mixed,
                [*warn, *no_gc],
                TARGET,
            ),
            (f"{n} tests, all leak (garbage), warn (gc on)", leaky, warn, None),
            (f"{n} tests, all leak (garbage), warn, no gc", leaky, [*warn, *no_gc], None),
        ]
        if args.callgrind:
            print(f"{n} tests per suite, {args.heap:,} objects on the heap\n")
            print(f"{'suite (one pytest run per side)':<50} {'bare':>14} {'plugin on':>14}  ratio")
            for name, where, b_side, _ in rows:
                if b_side is off:
                    continue  # A/A: the counts are exact, there is no noise to show
                run(where, off, dsn, args.heap)  # bytecode of both sides cached
                run(where, b_side, dsn, args.heap)
                bare = instructions(where, off, dsn, args.heap)
                instr = instructions(where, b_side, dsn, args.heap)
                print(f"{name:<50} {bare:>14,} {instr:>14,}  {instr / bare:.4f}x", flush=True)
            return 0
        print(
            f"{n} tests per suite, {args.heap:,} objects on the heap, {args.pairs} ABBA pairs "
            f"per row ({max(3, args.pairs // 3)} for the all-leak rows), each sample a whole "
            "pytest run in a new process; verdict on the CPU ratio\n"
        )
        print(
            f"{'suite (whole pytest runs)':<50} {'bare CPU':>8}  {'CPU ratio, IQR':<20}  "
            f"{'wall ratio, IQR':<20}  {'per test':>9}  {'gc calls/run':>12}  {'target':>8}"
        )
        for name, where, b_side, target in rows:
            count = args.pairs if where is not leaky else max(3, args.pairs // 3)
            measured = pairs(where, off, b_side, dsn, count, args.heap)
            print(row(name, measured, n, target), flush=True)
        print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
