"""`pgleakguard watch`: one frame with the breakdown, suspects and the progress of a long
operation (a COPY in flight), and a clean exit on Ctrl-C."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from typing import Any

import psycopg

from server_helpers import Leaker, cli, leaking_program


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


def test_once_prints_breakdown_suspects_and_copy_progress(pg_dsn: str) -> None:
    with leaking_program(pg_dsn) as leaker, psycopg.connect(pg_dsn) as loader:
        loader.execute("CREATE TEMP TABLE numbers (n integer)")
        copying = loader.info.backend_pid
        with loader.cursor().copy("COPY numbers FROM STDIN") as copy:
            copy.write("".join(f"{n}\n" for n in range(200_000)))
            done = _copy_progress(pg_dsn, copying)
            proc = cli("watch", "--dsn", pg_dsn, "--once", "--idle-in-transaction-threshold", "0s")
        loader.rollback()
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    _assert_suspect(lines, leaker)
    [running] = [ln for ln in lines if ln.split()[:1] == [str(copying)]]
    assert f"COPY FROM {done} tuples" in running
    assert "by state:" in lines
    assert any(
        ln.split() == ["idle", "in", "transaction", "1"] or "idle in transaction" in ln
        for ln in lines
    )


def _assert_suspect(lines: list[str], leaker: Leaker) -> None:
    pid = leaker.backends["in_transaction"]
    [row] = [ln for ln in lines if ln.split()[:1] == [str(pid)]]
    cells = row.split()
    assert cells[1:4] == ["idle", "in", "transaction"]
    assert "billing" in cells and str(leaker.pid) in cells


def test_ctrl_c_exits_cleanly(pg_dsn: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "pgleakguard.cli", "watch", "--dsn", pg_dsn, "--interval", "0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()
    assert first.startswith("pgleakguard watch: ")
    while "Ctrl-C to quit" not in proc.stdout.readline():
        pass  # the rest of the first frame
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
