"""`pgleakguard watch`: one frame with the suspects, the breakdown and the progress of a long
operation (a COPY in flight); on an 80x24 terminal the suspects are on screen; a failed read
is shown and retried; a clean exit on Ctrl-C, on a pipe and on a terminal."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import psycopg

from pgleakguard.diagnose.model import STATES

from cli_terminal import CliProcess
from server_helpers import Leaker, cli, leaker_line, leaking_program


def _copy_progress(dsn: str, pid: int) -> int:
    """tuples_processed of ``pid``'s COPY once it stops moving."""
    last = -1
    deadline = time.monotonic() + 10
    with psycopg.connect(dsn, autocommit=True) as conn:
        while time.monotonic() < deadline:
            row: Any = conn.execute(
                "SELECT tuples_processed FROM pg_stat_progress_copy WHERE pid = %s", [pid]
            ).fetchone()
            if row and row[0] > 0 and row[0] == last:
                return int(row[0])
            last = row[0] if row else -1
            time.sleep(0.2)
    raise AssertionError("the COPY made no progress")


def _states_now(dsn: str) -> list[list[str]]:
    """The client sessions by state, as watch's table shows them (states nobody is in left out).
    Watch leaves its own session out; this reading leaves out its own."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT state, count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
            "AND pid <> pg_backend_pid() GROUP BY state"
        ).fetchall()
    counts = dict(rows)
    return [[state, str(counts[state])] for state in STATES if counts.get(state)]


def test_once_prints_suspects_breakdown_and_copy_progress(pg_dsn: str) -> None:
    with leaking_program(pg_dsn) as leaker, psycopg.connect(pg_dsn) as loader:
        loader.execute("CREATE TEMP TABLE numbers (n integer)")
        copying = loader.info.backend_pid
        with loader.cursor().copy("COPY numbers FROM STDIN") as copy:
            copy.write("".join(f"{n}\n" for n in range(200_000)))
            done = _copy_progress(pg_dsn, copying)
            proc = cli("watch", "--dsn", pg_dsn, "--once", "--idle-in-transaction-threshold", "0s")
            states = _states_now(pg_dsn)
        loader.rollback()
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    _assert_suspect(lines, leaker)
    [running] = [ln for ln in lines if ln.split()[:1] == [str(copying)]]
    assert f"COPY FROM {done} tuples" in running
    # Sessions by state: exactly the server's counts, and no row for a state nobody is in.
    at = lines.index("by state:")
    shown = [re.split(r"\s{2,}", ln.strip()) for ln in lines[at + 3 : at + 3 + len(states)]]
    assert shown == states
    assert not lines[at + 3 + len(states)].startswith("  ")  # the table ends there
    assert ["idle in transaction (aborted)", "1"] in states and len(states) < len(STATES)
    # The suspects come before the breakdown: on a short terminal they are what is seen.
    assert next(i for i, ln in enumerate(lines) if ln.startswith("Leak suspects (")) < at


def _assert_suspect(lines: list[str], leaker: Leaker) -> None:
    """The idle-in-transaction suspect's row names service, process and exact call-site."""
    pid = leaker.backends["in_transaction"]
    [row] = [ln for ln in lines if ln.split()[:1] == [str(pid)]]
    cells = row.split()
    assert cells[1:4] == ["idle", "in", "transaction"]
    assert cells[5:8] == ["billing", str(leaker.pid), f"leaker.py:{leaker_line('in-transaction')}"]


@contextmanager
def idle_in_transaction(dsn: str, count: int) -> Iterator[None]:
    """``count`` sessions left idle in a transaction (younger suspects than the leaker's)."""
    with ExitStack() as stack:
        for _ in range(count):
            stack.enter_context(psycopg.connect(dsn)).execute("SELECT 1")
        yield


def test_on_an_80x24_terminal_the_suspects_are_on_screen(pg_dsn: str) -> None:
    with leaking_program(pg_dsn) as leaker, idle_in_transaction(pg_dsn, 14):
        watch = CliProcess(
            "watch",
            "--dsn",
            pg_dsn,
            "--interval",
            "0.5",
            "--idle-in-transaction-threshold",
            "0s",
            terminal=(80, 24),
        )
        try:
            at = watch.wait_for("Leak suspects (")
            end = watch.wait_for("pgleakguard watch: ", start=at)  # the next frame
        finally:
            watch.interrupt()
            code = watch.finish()
    assert code == 0, watch.text
    first = watch.text[watch.text.rfind("pgleakguard watch: ", 0, at) : end].splitlines()
    # 16 suspects, the leaker's two the longest, cut to what fits under the summary, with the
    # way to see them all.
    footer = r"\.\.\. and \d+ more \(pgleakguard diagnose --format json lists them all\)"
    assert any(re.fullmatch(footer, ln) for ln in first), first
    rows = [[c.strip() for c in ln.strip("│").split("│")] for ln in first if ln.startswith("│")]
    pid = str(leaker.backends["in_transaction"])
    matching = [r for r in rows if r[0] == pid]
    assert len(matching) == 1, "\n".join(first)
    [row] = matching
    # The call-site is whole (never wrapped) on an 80-column terminal.
    assert row[3:6] == ["billing", str(leaker.pid), f"leaker.py:{leaker_line('in-transaction')}"]
    assert len(first) <= 24  # the frame, cut by rich at the terminal's height
    assert "Traceback" not in watch.text and "KeyboardInterrupt" not in watch.text


def test_ctrl_c_exits_cleanly_on_a_pipe(pg_dsn: str) -> None:
    watch = CliProcess("watch", "--dsn", pg_dsn, "--interval", "0.5")
    try:
        assert watch.wait_for("pgleakguard watch: ") == 0
        watch.wait_for("Ctrl-C to quit")  # the first frame is out
    finally:
        watch.interrupt()
        code = watch.finish()
    assert code == 0
    assert "Traceback" not in watch.text and "KeyboardInterrupt" not in watch.text


def test_a_failed_read_is_shown_and_watch_goes_on(pg_dsn: str) -> None:
    watch = CliProcess("watch", "--dsn", pg_dsn, "--interval", "0.5")
    try:
        watch.wait_for("Ctrl-C to quit")
        with psycopg.connect(pg_dsn, autocommit=True) as admin:
            [(ended,)] = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = 'pgleakguard-watch'"
            ).fetchall()
        assert ended
        failed = watch.wait_for("pgleakguard watch: reading the server failed at ")
        line = watch.text[failed:].splitlines()[0]
        assert re.fullmatch(
            r"pgleakguard watch: reading the server failed at \S+Z, retrying every 500ms: .+",
            line,
        ), line
        # The next frame comes from a new connection.
        again = watch.wait_for("refreshed ", start=failed + len(line))
        assert watch.proc.poll() is None
    finally:
        watch.interrupt()
        code = watch.finish()
    assert code == 0
    assert "reading the server failed" not in watch.text[again:]


def test_an_interval_under_half_a_second_is_a_usage_error() -> None:
    proc = cli("watch", "--interval", "0")
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "pgleakguard watch: error: argument --interval: '0' is less than 0.5s (each refresh "
        "queries the server) (see pgleakguard watch --help)"
    ]
