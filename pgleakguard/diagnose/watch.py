"""``pgleakguard watch``: the suspects, the breakdown and long queries, refreshed live.

On a terminal the frame is sized to it: the summary and the suspects come first and the
suspects table is cut to what fits, so the point of the screen is never below its edge.
A read that fails after the first frame (a restart, a killed backend) is shown in the frame
and retried on a new connection at the next refresh; watch keeps going.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Callable

from . import analysis, report
from .commands import CommandError, analysis_options, dsn_of, live_diagnosis, psycopg_error
from .render import Block, Heading, Table, Text, to_rich, to_text
from .units import format_duration, iso

_TOP = 10
_MORE = "pgleakguard diagnose --format json lists them all"


def frame(
    diag: analysis.Diagnosis,
    progress: dict[int, str],
    taken_at: float | None = None,
    fits: Callable[[list[Block]], bool] | None = None,
) -> list[Block]:
    """One frame: summary, suspects, running queries, sessions by state, owners.

    ``fits`` tells whether blocks fit on the terminal: the suspects are cut until the summary
    and they do (their footer says how many were left out). Sessions by state leave out the
    states nobody is in.
    """
    out: list[Block] = report.summary_blocks(diag, "watch")
    if taken_at is not None:
        out.append(Text(f"refreshed {iso(taken_at)} - Ctrl-C to quit"))
    top = _TOP
    suspects = report.suspect_blocks(diag, top, more=_MORE, compact=True)
    while fits is not None and top > 1 and not fits(out + suspects):
        top -= 1
        suspects = report.suspect_blocks(diag, top, more=_MORE, compact=True)
    out += suspects
    out += running_blocks(diag, progress)
    states = [[k, str(n)] for k, n in diag.breakdown.get("state", []) if n]
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


def read_frame(
    conn: Any,
    options: argparse.Namespace,
    dsn: str,
    fits: Callable[[list[Block]], bool] | None = None,
) -> list[Block]:
    """Read the server once and build a frame."""
    from .. import server

    try:
        live = server.read_server(conn, progress=True)
    except Exception as exc:
        raise psycopg_error(exc, dsn) from None
    diag = live_diagnosis(live, analysis_options(options), dsn)
    return frame(diag, live.progress, None if options.once else diag.now, fits)


class _Frames:
    """Frames from the server, on a connection reopened after a failure."""

    def __init__(self, conn: Any, options: argparse.Namespace, dsn: str) -> None:
        self.conn: Any = conn
        self.options = options
        self.dsn = dsn
        self.last: list[Block] = []

    def next(self, fits: Callable[[list[Block]], bool] | None = None) -> list[Block]:
        """The next frame; after a failed read, the error above the last good frame.

        A read that fails before any frame was shown is not transient (a wrong role, a
        missing grant): it is raised.
        """
        from .. import server

        try:
            if self.conn is None:
                self.conn = server.connect(self.dsn, purpose="watch")
            self.last = read_frame(self.conn, self.options, self.dsn, fits)
            return self.last
        except (CommandError, server.ServerError) as exc:
            if not self.last:
                raise
            self.close()
            interval = format_duration(self.options.interval)
            failed = Text(
                f"pgleakguard watch: reading the server failed at {iso(time.time())}, "
                f"retrying every {interval}: {exc}"
            )
            return [failed, *self.last]

    def close(self) -> None:
        """Close the connection (the next frame opens a new one)."""
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def watch_command(options: argparse.Namespace) -> int:
    """Refresh every ``--interval`` seconds until Ctrl-C; ``--once`` prints one frame."""
    from .. import server

    dsn = dsn_of(options)
    assert dsn is not None
    frames = _Frames(server.connect(dsn, purpose="watch"), options, dsn)
    try:
        if options.once:
            sys.stdout.write(to_text(read_frame(frames.conn, options, dsn)))
            return 0
        if sys.stdout.isatty():
            _live(frames, options.interval)
        else:
            _plain(frames, options.interval)
    except KeyboardInterrupt:
        pass
    finally:
        frames.close()
    return 0


def _live(frames: _Frames, interval: float) -> None:
    try:
        from rich.console import Group
        from rich.live import Live
    except ImportError:
        raise CommandError("watch needs rich: pip install 'pgleakguard[cli]'") from None

    with Live(auto_refresh=False, screen=False) as live:
        console = live.console

        def fits(blocks: list[Block]) -> bool:
            # Measured as rich draws them at the terminal's current size (wrapped rows and
            # all); Live keeps the last line for itself.
            height = sum(len(console.render_lines(r, pad=False)) for r in to_rich(blocks))
            return height < console.size.height

        while True:
            live.update(Group(*to_rich(frames.next(fits))), refresh=True)
            time.sleep(interval)


def _plain(frames: _Frames, interval: float) -> None:
    while True:
        sys.stdout.write(to_text(frames.next()) + "\n")
        sys.stdout.flush()
        time.sleep(interval)
