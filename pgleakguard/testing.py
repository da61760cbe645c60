"""Leak checks for test suites: which connections a block of code took and did not give back.

The pytest plugin runs one :class:`Window` per test (the checkouts of wider-scoped fixtures
are excluded from it and checked when the fixture is finalized); :func:`assert_no_leaks` is
the same check for any block of code::

    with pgleakguard.testing.assert_no_leaks():
        export_report()

A connection taken inside the window is leaked when, at its end, it is still checked out
(``scope_ended``; ``owner_exited`` if the thread or task that took it has ended) or was
garbage collected without being returned (``garbage_collected``). Connections a framework
keeps on purpose (a parked Django connection) are not leaks. Before deciding, one
``gc.collect()`` runs if a connection taken in the window is still open, so a connection
that is only garbage is reported as such, deterministically.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

from . import _runtime
from ._safety import logger
from .events import GARBAGE_COLLECTED, OWNER_EXITED, SCOPE_ENDED, LeakEvent
from .tracker import Checkout, Tracker

__all__ = ["UNTRACKED", "LeakError", "ServerCheck", "ServerLeak", "Window", "assert_no_leaks"]


class LeakError(AssertionError):
    """Raised by :func:`assert_no_leaks`: the block leaked connections (``.leaks``)."""

    __module__ = "pgleakguard.testing"

    def __init__(self, leaks: list[LeakEvent]) -> None:
        self.leaks = leaks
        super().__init__(render_leaks(f"{len(leaks)} leaked PostgreSQL connection(s)", leaks))


def render_leaks(title: str, leaks: Iterable[LeakEvent]) -> str:
    """``title`` then each leak's full report, separated by blank lines."""
    return "\n\n".join([f"pgleakguard: {title}", *(leak.render() for leak in leaks)])


class Window:
    """Checkouts begun from its creation on, and which of them were leaked.

    ``scope`` names the window in reports (``test tests/test_orders.py::test_refund``).
    """

    def __init__(self, scope: str) -> None:
        self.scope = scope
        self.tracker = _current_tracker()
        self.start = self.tracker.mark() if self.tracker is not None else 0
        #: Checkout ids that belong to someone else (a wider-scoped fixture set up inside).
        self.excluded: set[int] = set()

    def taken(self) -> list[Checkout]:
        """The window's checkouts that are still open or were garbage collected."""
        tracker = _current_tracker()
        if tracker is None:
            return []
        # pgleakguard re-installed during the window: every checkout of the new one is ours.
        start = self.start if tracker is self.tracker else 0
        recs = [*tracker.registry.snapshot(), *list(tracker.collected)]
        seen: set[int] = set()
        out = []
        for rec in recs:
            if rec.id > start and rec.id not in self.excluded and rec.id not in seen:
                seen.add(rec.id)
                out.append(rec)
        return out

    def leaks(self, collect: bool = True) -> list[LeakEvent]:
        """The leaks of this window, oldest first; each is also reported to pgleakguard's
        sinks (once per kind, as every leak is)."""
        tracker = _current_tracker()
        if tracker is None:
            return []
        return classify(tracker, self.taken(), self.scope, collect)


def classify(
    tracker: Tracker, recs: list[Checkout], scope: str, collect: bool = True
) -> list[LeakEvent]:
    """Which of ``recs`` are leaked at the end of ``scope``, as reports (oldest first).

    With ``collect``, a ``gc.collect()`` first tells garbage from a connection still held,
    but only if one of them is still open.
    """
    if collect:
        collect_garbage(recs)
    tracker.flush()  # what the collection found (garbage_collected) reaches the sinks now
    collected = {id(r) for r in list(tracker.collected)}
    here = threading.current_thread()
    out = []
    for rec in sorted(recs, key=lambda r: r.started):
        if rec.closed:
            if id(rec) not in collected:
                continue  # returned or closed: no leak
            out.append(tracker.leak_event(rec, GARBAGE_COLLECTED, {"scope": scope}))
            continue
        if rec.parked:
            continue  # kept by a framework for reuse, not held by application code
        kind = SCOPE_ENDED if rec.owner_alive() else OWNER_EXITED
        event = tracker.leak_event(rec, kind, {"scope": scope})
        if rec.owner_object() is here:
            # The holder is the thread running this check: its stack is the check's.
            event = dataclasses.replace(event, holder_stack=None)
        tracker.report_now(rec, event)
        out.append(event)
    return out


def collect_garbage(recs: Iterable[Checkout]) -> None:
    """Collect garbage until none of ``recs`` is open or a full collection ran: first the
    young generations (where a connection dropped during a test usually is; cheap), then
    everything. Nothing runs when all of them are closed already."""
    recs = list(recs)
    for generation in (1, 2):
        if not any(not r.closed and not r.parked for r in recs):
            return
        gc.collect(generation)


@contextmanager
def assert_no_leaks(collect: bool = True) -> Iterator[Window]:
    """Raise :class:`LeakError` if the block leaks a connection (pgleakguard must be
    installed). The error's message is the leak reports: kind, call-site, stack, backend pid.
    """
    if _current_tracker() is None:
        raise RuntimeError("pgleakguard is not installed: call pgleakguard.install() first")
    window = Window("block")
    yield window
    leaks = window.leaks(collect)
    if leaks:
        raise LeakError(leaks)


def _current_tracker() -> Any:
    state = _runtime.current()
    return state.tracker if state is not None else None


# -- server-side confirmation (the pytest plugin's --pgleakguard-server-check) --------------

#: A session tagged with this process's pid that no connection pgleakguard tracks holds:
#: opened by code no hook sees.
UNTRACKED = "untracked"
_IN_TRANSACTION = ("idle in transaction", "idle in transaction (aborted)")


@dataclasses.dataclass(frozen=True)
class ServerLeak:
    """A session of this process that the server shows left behind."""

    #: ``idle_in_transaction`` or ``untracked``.
    kind: str
    backend_pid: int
    state: str | None
    application_name: str | None
    xact_start: str | None
    state_change: str | None
    query: str | None
    #: ``file:line`` from the session's tags (application_name or SQL comment), if any.
    callsite: str | None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return dataclasses.asdict(self)

    def render(self) -> str:
        """The human report."""
        why = (
            "the server shows it idle inside a transaction after the test"
            if self.kind != UNTRACKED
            else "the server lists it, but no connection tracked by pgleakguard holds it "
            "(opened by code no hook sees)"
        )
        lines = [
            f"pgleakguard: server-side session [{self.kind}] backend_pid={self.backend_pid}",
            f"  {why}",
            f"  state={self.state or '-'} application_name={self.application_name or '-'} "
            f"xact_start={self.xact_start or '-'} callsite={self.callsite or '-'}",
        ]
        if self.query:
            lines.append(f"  last query: {' '.join(self.query.split())[:200]}")
        return "\n".join(lines)


class ServerCheck:
    """Reads pg_stat_activity over a connection of its own for the sessions tagged with this
    process's pid, and tells which appeared or opened a transaction since the last check.

    A backend whose client has just closed its connection exits a moment later: an
    untracked session must still be listed after :attr:`grace` seconds to be reported.
    """

    grace = 1.0

    def __init__(self, dsn: str) -> None:
        from . import server

        self.dsn = dsn
        self.conn: Any = server.connect(dsn, purpose="pytest")
        self._seen: set[int] = set()
        self._seen_tx: set[tuple[int, str | None]] = set()
        self._primed = False
        self._failed = False

    def start(self) -> None:
        """Before the first check: what exists now is nobody's leak."""
        if not self._primed:
            self._primed = True
            self._remember(self._rows())

    def close(self) -> None:
        """Close the connection."""
        with suppress(Exception):
            self.conn.close()

    def check(self, tracker: Tracker, exclude: Iterable[int | None] = ()) -> list[ServerLeak]:
        """The sessions left idle in a transaction, or untracked, since the last check;
        ``exclude`` are backend pids already reported otherwise."""
        rows = self._rows()
        skip = set(exclude)
        accounted = {r.backend_pid for r in tracker.registry.snapshot()}
        accounted.update(tracker.connections.keys())
        leaks = []
        untracked = []
        for row in rows:
            pid = row["pid"]
            if pid in skip:
                continue
            if row["state"] in _IN_TRANSACTION:
                if (pid, row["xact_start"]) not in self._seen_tx:
                    leaks.append(_server_leak("idle_in_transaction", row))
            elif pid not in accounted and pid not in self._seen:
                untracked.append(row)
        if untracked:
            gone = self._wait_gone({row["pid"] for row in untracked})
            leaks += [_server_leak(UNTRACKED, r) for r in untracked if r["pid"] not in gone]
            rows = [r for r in rows if r["pid"] not in gone]
        self._remember(rows)
        return leaks

    def _remember(self, rows: list[dict[str, Any]]) -> None:
        self._seen = {r["pid"] for r in rows}
        self._seen_tx = {(r["pid"], r["xact_start"]) for r in rows if r["state"] in _IN_TRANSACTION}

    def _wait_gone(self, pids: set[int]) -> set[int]:
        deadline = time.monotonic() + self.grace
        while True:
            listed = {r["pid"] for r in self._rows()}
            if not pids & listed or time.monotonic() >= deadline:
                return pids - listed
            time.sleep(0.01)

    def _rows(self) -> list[dict[str, Any]]:
        from . import server
        from .tagging import parse

        pid = os.getpid()
        sql = (
            "SELECT pid, state, application_name, xact_start::text AS xact_start, "
            "state_change::text AS state_change, query FROM pg_stat_activity "
            "WHERE pid <> pg_backend_pid() AND (application_name LIKE %s "
            "OR application_name LIKE %s)"
        )
        for attempt in (1, 2):
            try:
                cur = self.conn.execute(sql, [f"%/pid:{pid}", f"%/pid:{pid}/%"])
                names = [c.name for c in cur.description or ()]
                rows = [dict(zip(names, values)) for values in cur.fetchall()]
                break
            except Exception as exc:
                if attempt == 2:
                    if not self._failed:
                        self._failed = True
                        logger.warning("pgleakguard: server check failed: %s", exc)
                    return []
                with suppress(Exception):
                    self.conn.close()
                with suppress(Exception):
                    self.conn = server.connect(self.dsn, purpose="pytest")
        out = []
        for row in rows:
            tag = parse(row["application_name"])
            if tag is not None and tag.pid == pid:
                out.append(row)
        return out


def _server_leak(kind: str, row: dict[str, Any]) -> ServerLeak:
    from .server import sql_policy
    from .sqltext import for_report
    from .tagging import parse, parse_sql_comment

    tag = parse(row["application_name"])
    callsite = (tag.callsite if tag else None) or parse_sql_comment(row["query"]).get("callsite")
    return ServerLeak(
        kind=kind,
        backend_pid=int(row["pid"]),
        state=row["state"],
        application_name=row["application_name"],
        xact_start=row["xact_start"],
        state_change=row["state_change"],
        query=for_report(row["query"], *sql_policy()),
        callsite=callsite,
    )
