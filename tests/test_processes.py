"""Processes: a forked child tracks only its own connections; `pgleakguard run` needs no code."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any, Callable

import psycopg
import psycopg_pool
import pytest

import pgleakguard
from pgleakguard import _runtime, _safety, sinks

from conftest import EventLog, marked_line


def in_forked_child(body: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run ``body`` in a forked child; return what it returned (as JSON)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        try:
            os.close(read_end)
            os.write(write_end, json.dumps(body()).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as fh:
        result: dict[str, Any] = json.loads(fh.read() or "{}")
    os.waitpid(pid, 0)
    return result


def test_forked_child_tracks_its_own_connections_not_the_parents(
    pg_dsn: str, events: EventLog
) -> None:
    parent_conn = psycopg.connect(pg_dsn)
    events.wait_for("held_too_long")  # the parent's watchdog is running

    def child() -> dict[str, Any]:
        inherited = [c.checkout_id for c in pgleakguard.open_checkouts()]
        events.clear()
        child_conn = psycopg.connect(pg_dsn)  # leak: child
        events.wait_for("held_too_long", timeout=5)
        return {
            "inherited": inherited,
            "open": [c.backend_pid for c in pgleakguard.open_checkouts()],
            "child_pid": child_conn.info.backend_pid,
            "reported": [(e.backend_pid, e.callsite.line) for e in events.leaks()],
        }

    result = in_forked_child(child)
    parent_pid = parent_conn.info.backend_pid
    assert result["inherited"] == []
    assert result["open"] == [result["child_pid"]]
    assert result["reported"] == [[result["child_pid"], marked_line(__file__, "child")]]
    assert parent_pid not in [p for p, _ in result["reported"]]
    assert [c.backend_pid for c in pgleakguard.open_checkouts()] == [parent_pid]
    parent_conn.close()


@pytest.mark.allow_internal_errors  # one is injected, so the parent has one to count
@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_forked_child_starts_with_its_own_counters_and_free_locks(
    pg_dsn: str, install: Callable[..., EventLog], tmp_path: Path
) -> None:
    # an unwritable jsonl_path: every event is an operational error of the parent
    unwritable = tmp_path / "no" / "such" / "dir.jsonl"
    events = install(leak_threshold=0.1, max_open_checkouts=2, jsonl_path=str(unwritable))
    with psycopg_pool.ConnectionPool(pg_dsn, min_size=1, max_size=4, name="forky") as pool:
        held = [pool.getconn(), pool.getconn()]
        events.wait_for("held_too_long", count=2)
        untracked = psycopg.connect(pg_dsn)  # max_open_checkouts are open: not tracked
        pool.putconn(held.pop())

        def drop() -> None:
            pool.getconn()

        drop()
        gc.collect()
        events.wait_for("garbage_collected")
        state = _runtime.current()
        assert state is not None and len(state.tracker.collected) == 1
        with _safety.guard():  # an internal error, swallowed and counted
            raise RuntimeError("injected")
        state.delivery._limit = 0  # one event dropped: the sinks' queue is "full"
        state.delivery.put(events.leaks()[0])
        state.delivery._limit = sinks.QUEUE_LIMIT
        pgleakguard.check()  # the jsonl sink has failed on every event by now
        parent = pgleakguard.stats()
        assert parent["leaks"] == {"held_too_long": 2, "garbage_collected": 1}
        assert parent["untracked_checkouts"] == 1
        assert parent["internal_errors"] >= 1 and parent["dropped_events"] == 1
        assert parent["operational_errors"] >= 3 and parent["watchdog_scans"] >= 1

        # Another thread holds pgleakguard's locks at the moment of the fork.
        holding, release = threading.Event(), threading.Event()

        def holder() -> None:
            with _runtime._lock, _safety._lock:
                holding.set()
                release.wait(30)

        thread = threading.Thread(target=holder)
        thread.start()
        assert holding.wait(10)

        def child() -> dict[str, Any]:
            stats = pgleakguard.stats()
            current = _runtime.current()
            assert current is not None
            finished: list[bool] = []

            def reinstall() -> None:  # takes both locks: they must not be the parent's
                _safety.forget_logged()
                pgleakguard.install(leak_threshold=60)
                finished.append(True)

            worker = threading.Thread(target=reinstall, daemon=True)
            worker.start()
            worker.join(10)
            return {
                "stats": stats,
                "collected": len(current.tracker.collected),
                "finished": finished,
            }

        try:
            result = in_forked_child(child)
        finally:
            release.set()
            thread.join()
        # every counter of stats() starts at zero in the child
        assert result == {
            "stats": {
                "installed": True,
                "internal_errors": 0,
                "operational_errors": 0,
                "open_checkouts": 0,
                "leaks": {},
                "watchdog_scans": 0,
                "untracked_checkouts": 0,
                "dropped_events": 0,
            },
            "collected": 0,
            "finished": [True],
        }
        after = pgleakguard.stats()  # the parent's are untouched
        assert after["leaks"] == parent["leaks"]
        assert after["internal_errors"] == parent["internal_errors"]
        assert after["dropped_events"] == parent["dropped_events"]
        pool.putconn(held.pop())
        untracked.close()


RUN_SCRIPT = """
import sys, threading, time
import psycopg
import psycopg_pool
import pytest

kept = []
def worker():
    kept.append(psycopg.connect(sys.argv[1]))  # leak: run-thread
t = threading.Thread(target=worker, name="background-sync")
t.start(); t.join()
time.sleep(1.0)
"""


def test_run_installs_pgleakguard_without_a_code_change(pg_dsn: str, tmp_path: Path) -> None:
    script = tmp_path / "app.py"
    script.write_text(textwrap.dedent(RUN_SCRIPT))
    report = tmp_path / "leaks.jsonl"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pgleakguard.cli",
            "run",
            "--service",
            "runner",
            "--leak-threshold",
            "0.2",
            "--jsonl-path",
            str(report),
            "--",
            sys.executable,
            "-W",
            "ignore::ResourceWarning",
            str(script),
            pg_dsn,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    line = marked_line(str(script), "run-thread")
    assert f"[owner_exited, definite] checked out at {script}:{line} in worker" in proc.stderr
    # Nothing but the reports on stderr (no "Error in sitecustomize", no traceback).
    assert proc.stderr.startswith("pgleakguard: connection leak [owner_exited, definite]")
    assert [t for t in proc.stderr.splitlines() if not t.startswith(("pgleakguard: ", " "))] == []
    assert "holder=thread 'background-sync' (ended)" in proc.stderr
    first = json.loads(report.read_text().splitlines()[0])
    assert first["kind"] == "owner_exited"
    assert first["callsite"] == {"file": str(script), "line": line, "function": "worker"}
    assert first["service"] == "runner"
    assert first["application_name"].startswith("runner/pid:")


INSTALLED = (
    "import sys; runtime = sys.modules.get('pgleakguard._runtime'); "
    "print('installed:', runtime is not None and runtime.current() is not None)"
)


def test_run_leaves_a_program_without_sitecustomize_a_clean_stderr() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pgleakguard.cli", "run", "--", sys.executable, "-c", INSTALLED],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "installed: True\n", "")


def test_run_still_runs_the_programs_own_sitecustomize(tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text(INSTALLED.replace("'installed:'", "'own:'"))
    proc = subprocess.run(
        [sys.executable, "-m", "pgleakguard.cli", "run", "--", sys.executable, "-c", INSTALLED],
        env=dict(os.environ, PYTHONPATH=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    # The first line is the `pgleakguard run` process's own start-up (nothing installed).
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout.splitlines() == ["own: False", "own: True", "installed: True"]


def test_run_leaves_a_python_of_another_virtualenv_untracked_with_one_line(
    tmp_path: Path,
) -> None:
    # a virtualenv without pgleakguard: its Python finds our sitecustomize but not the package
    venv = tmp_path / "other-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    other = venv / "bin" / "python"
    proc = subprocess.run(
        [sys.executable, "-m", "pgleakguard.cli", "run", "--", str(other), "-c", "print('ran')"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (proc.returncode, proc.stdout) == (0, "ran\n")
    assert proc.stderr == "pgleakguard run: not installed: No module named 'pgleakguard'\n"


def test_run_rejects_a_bad_option_before_starting_the_program(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pgleakguard.cli",
            "run",
            "--leak-threshold",
            "-3",
            "--",
            sys.executable,
            "-c",
            f"open({str(marker)!r}, 'w')",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "pgleakguard: error: invalid leak_threshold='-3' (from --leak-threshold): "
        "expected a positive number of seconds, e.g. 30 or 0.5"
    )
    assert not marker.exists()


def test_run_without_a_command_says_how_to_use_it() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pgleakguard.cli", "run"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "run needs a command: pgleakguard run -- python app.py" in proc.stderr


def test_holder_stack_shows_where_a_live_thread_is_now(pg_dsn: str, events: EventLog) -> None:
    release = threading.Event()

    def busy() -> None:
        with psycopg.connect(pg_dsn):  # leak: busy
            release.wait(10)  # leak: waiting

    t = threading.Thread(target=busy, name="slow-worker")
    t.start()
    try:
        [event] = events.wait_for("held_too_long")
    finally:
        release.set()
        t.join()
    assert event.callsite.line == marked_line(__file__, "busy")
    assert event.holder == "slow-worker" and event.holder_alive
    assert event.holder_stack is not None
    here: list[Any] = [f["line"] for f in event.holder_stack if f["file"] == __file__]
    assert here[0] == marked_line(__file__, "waiting")
    text = event.render()
    assert "Holder is now at (most recent call last):" in text
    assert "release.wait(10)" in text


def test_prefork_child_with_the_parents_engine_tracks_only_its_own(
    pg_dsn: str, events: EventLog
) -> None:
    """gunicorn --preload style: the engine is made (and used) in the parent, then forked."""
    from sqlalchemy import create_engine, text

    engine = create_engine(pg_dsn.replace("postgresql://", "postgresql+psycopg://", 1))
    parent_conn = engine.connect()  # held across the fork
    parent_pid = parent_conn.execute(text("SELECT pg_backend_pid()")).scalar_one()

    def worker() -> dict[str, Any]:
        engine.dispose(close=False)  # SQLAlchemy's advice for forked workers
        events.clear()
        kept: list[Any] = []

        def job() -> None:
            kept.append(engine.connect())  # leak: prefork-child

        thread = threading.Thread(target=job)
        thread.start()
        thread.join()
        events.wait_for("owner_exited", timeout=5)
        child_pid = kept[0].execute(text("SELECT pg_backend_pid()")).scalar_one()
        return {
            "open": [c.backend_pid for c in pgleakguard.open_checkouts()],
            "reported": [(e.kind, e.backend_pid, e.callsite.line) for e in events.leaks()],
            "child_pid": child_pid,
        }

    result = in_forked_child(worker)
    line = marked_line(__file__, "prefork-child")
    assert result["reported"] == [["owner_exited", result["child_pid"], line]]
    assert parent_pid not in result["open"]
    assert [c.backend_pid for c in pgleakguard.open_checkouts()] == [parent_pid]
    parent_conn.close()
    engine.dispose()


def spawned_child(dsn: str, out: Any) -> None:
    """Runs in a fresh interpreter (multiprocessing 'spawn'): installs and leaks."""
    import threading as _threading

    import pgleakguard as guard

    log: list[Any] = []
    guard.install(service="spawned", leak_threshold=60, on_leak=log.append)
    kept: list[Any] = []
    worker = _threading.Thread(target=lambda: kept.append(psycopg.connect(dsn)))
    worker.start()
    worker.join()
    guard.check()
    out.put([(e.kind, e.service, e.backend_pid == kept[0].info.backend_pid) for e in log])
    kept[0].close()


def test_spawned_child_tracks_only_its_own(pg_dsn: str, install: Callable[..., EventLog]) -> None:
    import multiprocessing

    events = install(leak_threshold=60)
    parent_conn = psycopg.connect(pg_dsn)
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=spawned_child, args=(pg_dsn, queue))
    child.start()
    reported = queue.get(timeout=60)
    child.join(60)
    assert child.exitcode == 0
    assert reported == [("owner_exited", "spawned", True)]
    assert [c.backend_pid for c in pgleakguard.open_checkouts()] == [parent_conn.info.backend_pid]
    pgleakguard.check()
    assert events.leaks() == []
    parent_conn.close()


STUCK_CALLBACK = """
import sys, threading, time
import psycopg
import psycopg_pool
import pytest
import pgleakguard

entered = threading.Event()

def stuck(event):
    entered.set()
    time.sleep(1000)

how = sys.argv[2]
threshold = 0.1 if how == "uninstall" else 60
pgleakguard.install(service="stuck", leak_threshold=threshold, on_leak=stuck)
conn = psycopg.connect(sys.argv[1])  # leak: stuck
if how == "uninstall":
    assert entered.wait(10)  # the callback is stuck in the held_too_long report
    pgleakguard.uninstall()
print("main done", flush=True)
"""


@pytest.mark.parametrize("how", ["exit", "uninstall"])
def test_a_stuck_on_leak_callback_never_holds_exit_or_uninstall(
    how: str, pg_dsn: str, tmp_path: Path
) -> None:
    script = tmp_path / "stuck.py"
    script.write_text(textwrap.dedent(STUCK_CALLBACK))
    proc = subprocess.run(  # without a bound on the wait this never ends (timeout: failure)
        [sys.executable, "-W", "ignore::ResourceWarning", str(script), pg_dsn, how],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (proc.returncode, proc.stdout) == (0, "main done\n"), proc.stderr
    kind = "never_closed, definite" if how == "exit" else "held_too_long, suspected"
    where = f"{script}:{marked_line(str(script), 'stuck')}"
    # our own sinks still delivered the report; then the callback was given up on
    assert f"pgleakguard: connection leak [{kind}] checked out at {where} in <module>" in (
        proc.stderr
    )
    assert proc.stderr.rstrip().endswith(
        "pgleakguard: gave up waiting for the on_leak callback after 2s; "
        "1 event(s) not delivered to it"
    )
