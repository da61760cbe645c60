"""``pgleakguard watch``: the breakdown, the suspects and long queries, refreshed live."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from . import analysis, report
from .commands import CommandError, analysis_options, dsn_of, live_diagnosis, psycopg_error
from .render import Block, Heading, Table, Text, to_rich, to_text
from .units import format_duration, iso

_TOP = 10


def frame(
    diag: analysis.Diagnosis, progress: dict[int, str], taken_at: float | None = None
) -> list[Block]:
    """One screen: capacity, sessions by state, owners, suspects, running queries."""
    out: list[Block] = report.summary_blocks(diag, "watch")
    states = [[k, str(n)] for k, n in diag.breakdown.get("state", [])]
    out.append(Table(["state", "sessions"], states, frozenset({1}), "by state"))
    owners = [
        [g.owner, str(g.client_pid or "-"), g.callsite or "-", str(g.sessions)]
        for g in diag.owners[:_TOP]
    ]
    out.append(
        Table(
            ["service / application", "pid", "call-site", "sessions"],
            owners,
            frozenset({1, 3}),
            "top owners",
        )
    )
    out += report.suspect_blocks(diag, _TOP)
    out += running_blocks(diag, progress)
    if taken_at is not None:
        out.append(Text(f"\nrefreshed {iso(taken_at)} - Ctrl-C to quit"))
    return out


def running_blocks(diag: analysis.Diagnosis, progress: dict[int, str]) -> list[Block]:
    """Active queries, longest first, with the progress of long operations."""
    now = diag.now
    active = [
        s
        for s in diag.sessions
        if s.state == "active" and s.backend_pid != diag.self_pid and s.query_start is not None
    ]
    active.sort(key=lambda s: s.query_start or 0.0)
    rows = [
        [
            str(s.backend_pid),
            format_duration(now - (s.query_start or now)) if now is not None else "-",
            s.owner,
            progress.get(s.backend_pid, "-"),
            " ".join((s.query or "-").split())[:60],
        ]
        for s in active[:_TOP]
    ]
    if not rows:
        return []
    return [
        Heading(f"Running queries ({len(active)})"),
        Table(["backend", "running", "owner", "progress", "query"], rows, frozenset({0})),
    ]


def read_frame(conn: Any, options: argparse.Namespace, dsn: str) -> list[Block]:
    """Read the server once and build a frame."""
    from .. import server

    try:
        live = server.read_server(conn, progress=True)
    except Exception as exc:
        raise psycopg_error(exc, dsn) from None
    diag = live_diagnosis(live, analysis_options(options), dsn)
    return frame(diag, live.progress, None if options.once else diag.now)


def watch_command(options: argparse.Namespace) -> int:
    """Refresh every ``--interval`` seconds until Ctrl-C; ``--once`` prints one frame."""
    from .. import server

    dsn = dsn_of(options)
    assert dsn is not None
    conn = server.connect(dsn, purpose="watch")
    try:
        if options.once:
            sys.stdout.write(to_text(read_frame(conn, options, dsn)))
            return 0
        if sys.stdout.isatty():
            _live(conn, options, dsn)
        else:
            _plain(conn, options, dsn)
    except KeyboardInterrupt:
        pass
    finally:
        conn.close()
    return 0


def _live(conn: Any, options: argparse.Namespace, dsn: str) -> None:
    try:
        from rich.console import Group
        from rich.live import Live
    except ImportError:
        raise CommandError("watch needs rich: pip install 'pgleakguard[cli]'") from None

    with Live(auto_refresh=False, screen=False) as live:
        while True:
            live.update(Group(*to_rich(read_frame(conn, options, dsn))), refresh=True)
            time.sleep(options.interval)


def _plain(conn: Any, options: argparse.Namespace, dsn: str) -> None:
    while True:
        sys.stdout.write(to_text(read_frame(conn, options, dsn)) + "\n")
        sys.stdout.flush()
        time.sleep(options.interval)
