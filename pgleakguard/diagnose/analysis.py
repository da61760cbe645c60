"""What the sessions say: breakdowns, leak suspects and ranked root-cause findings.

Pure functions over :class:`~pgleakguard.diagnose.model.Session` rows and
:class:`~pgleakguard.diagnose.model.ServerSettings`; no I/O.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .model import HIDDEN_STATE, STATES, ServerSettings, Session
from .sql import quote_ident
from .units import format_duration

#: Suspect reasons (the session's state) and how a finding words them.
REASONS = {
    "idle": "idle connections",
    "idle in transaction": "connections idle in transaction",
    "idle in transaction (aborted)": "connections in an aborted transaction",
}
#: Breakdown dimensions, in display order, with the column heading.
DIMENSIONS = (
    ("state", "state"),
    ("user", "user"),
    ("service", "application / service"),
    ("client_addr", "client_addr"),
    ("database", "database"),
)
_NO_VALUE = "(none)"
_LOCAL = "(local socket)"


@dataclasses.dataclass(frozen=True)
class Options:
    """Thresholds of a diagnosis, in seconds, and how queries are shown."""

    #: An idle session is a suspect once idle this long (measured from state_change).
    idle_threshold: float = 600.0
    #: A session idle in a transaction (or an aborted one) is a suspect after this long.
    idle_in_transaction_threshold: float = 10.0
    #: An active query running this long is reported as long-running.
    long_query_threshold: float = 300.0
    #: Show queries with their literals replaced by ``?`` (the tags are read before).
    redact_sql: bool = False


@dataclasses.dataclass(frozen=True)
class Suspect:
    """A session that looks leaked: idle too long, or idle inside a transaction."""

    session: Session
    #: The state that makes it a suspect (a key of :data:`REASONS`).
    reason: str
    #: Seconds in that state.
    seconds: float


@dataclasses.dataclass(frozen=True)
class OwnerGroup:
    """Sessions of one owner: tagged (service, pid, call-site) or by application_name."""

    owner: str
    service: str | None
    client_pid: int | None
    callsite: str | None
    states: Mapping[str, int]

    @property
    def sessions(self) -> int:
        """How many sessions the owner has."""
        return sum(self.states.values())


@dataclasses.dataclass(frozen=True)
class Finding:
    """One ranked root cause, in words, with the evidence behind it."""

    kind: str
    sessions: int
    summary: str
    backend_pids: tuple[int, ...]
    evidence: Mapping[str, Any]


@dataclasses.dataclass
class Diagnosis:
    """Everything diagnose found; rendered by :mod:`pgleakguard.diagnose.report`."""

    sessions: list[Session]
    settings: ServerSettings
    options: Options
    now: float | None
    #: Where the rows came from: a redacted DSN or a file path.
    source: str
    source_kind: str
    role: str | None = None
    self_pid: int | None = None
    breakdown: dict[str, list[tuple[str, int]]] = dataclasses.field(default_factory=dict)
    owners: list[OwnerGroup] = dataclasses.field(default_factory=list)
    suspects: list[Suspect] = dataclasses.field(default_factory=list)
    findings: list[Finding] = dataclasses.field(default_factory=list)
    hidden: int = 0
    #: Blocked backend pid -> the pids blocking it (live servers only).
    blockers: dict[int, list[int]] = dataclasses.field(default_factory=dict)

    @property
    def total(self) -> int:
        """Client sessions seen."""
        return len(self.sessions)

    @property
    def slots_phrase(self) -> str:
        """``of 97 slots`` (usable slots) when known, else ``of 120 sessions``."""
        usable = self.settings.usable
        return f"of {usable} slots" if usable is not None else f"of {self.total} sessions"


def diagnose(
    sessions: Sequence[Session],
    settings: ServerSettings,
    options: Options,
    now: float | None,
    *,
    source: str,
    source_kind: str,
    role: str | None = None,
    self_pid: int | None = None,
    blockers: Mapping[int, list[int]] | None = None,
) -> Diagnosis:
    """Breakdowns, suspects and ranked findings for one set of client sessions.

    The session running the diagnosis (``self_pid``) is left out: it is not the workload.
    """
    sessions = [s for s in sessions if s.backend_pid != self_pid]
    diag = Diagnosis(
        sessions=[s.redacted() for s in sessions] if options.redact_sql else sessions,
        settings=settings,
        options=options,
        now=now,
        source=source,
        source_kind=source_kind,
        role=role,
        self_pid=self_pid,
        blockers=dict(blockers or {}),
    )
    diag.hidden = sum(1 for s in diag.sessions if s.hidden)
    diag.breakdown = breakdown(diag.sessions)
    diag.owners = owner_groups(diag.sessions)
    diag.suspects = suspects(diag.sessions, options, now, self_pid)
    diag.findings = findings(diag)
    return diag


def state_of(session: Session) -> str:
    """The state as shown in breakdowns (hidden rows get their own bucket)."""
    if session.state is not None:
        return session.state
    return HIDDEN_STATE if session.hidden else _NO_VALUE


def owner_name(session: Session) -> str:
    """The service from the tags, else the application_name, else ``(none)``."""
    return session.service or session.application_name or _NO_VALUE


def breakdown(sessions: Iterable[Session]) -> dict[str, list[tuple[str, int]]]:
    """Session counts by state (every state listed, even at 0), user, service, address, db."""
    counters: dict[str, Counter[str]] = {name: Counter() for name, _ in DIMENSIONS}
    for s in sessions:
        counters["state"][state_of(s)] += 1
        counters["user"][s.user or _NO_VALUE] += 1
        counters["service"][owner_name(s)] += 1
        counters["client_addr"][s.client_addr or _LOCAL] += 1
        counters["database"][s.database or _NO_VALUE] += 1
    out = {name: _ranked(counter) for name, counter in counters.items()}
    states = counters["state"]
    extra = [(k, n) for k, n in out["state"] if k not in STATES]
    out["state"] = [(state, states.get(state, 0)) for state in STATES] + extra
    return out


def _ranked(counter: Mapping[str, int]) -> list[tuple[str, int]]:
    return sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))


def owner_groups(sessions: Iterable[Session]) -> list[OwnerGroup]:
    """Sessions by owner (service, pid, call-site from the tags), most sessions first."""
    groups: dict[tuple[str, int | None, str | None], dict[str, int]] = {}
    services: dict[tuple[str, int | None, str | None], str | None] = {}
    for s in sessions:
        key = (owner_name(s), s.client_pid, s.callsite)
        states = groups.get(key)
        if states is None:
            states = groups[key] = {}
            services[key] = s.service
        state = state_of(s)
        states[state] = states.get(state, 0) + 1
    out = [
        OwnerGroup(owner=k[0], service=services[k], client_pid=k[1], callsite=k[2], states=c)
        for k, c in groups.items()
    ]
    out.sort(key=lambda g: (-g.sessions, g.owner, g.client_pid or 0, g.callsite or ""))
    return out


def suspects(
    sessions: Iterable[Session], options: Options, now: float | None, self_pid: int | None
) -> list[Suspect]:
    """Sessions idle past ``idle_threshold``, or idle in a (possibly aborted) transaction
    past ``idle_in_transaction_threshold``; longest first."""
    if now is None:
        return []
    limits = {
        "idle": options.idle_threshold,
        "idle in transaction": options.idle_in_transaction_threshold,
        "idle in transaction (aborted)": options.idle_in_transaction_threshold,
    }
    found = []
    for s in sessions:
        limit = limits.get(s.state or "")
        if limit is None or s.backend_pid == self_pid or s.state_change is None:
            # No state_change: cannot be measured (see unmeasured_findings).
            continue
        seconds = max(0.0, now - s.state_change)
        if seconds >= limit:
            found.append(Suspect(s, s.state or "", seconds))
    found.sort(key=lambda x: (-x.seconds, x.session.backend_pid))
    return found


# -- findings -----------------------------------------------------------------------------


def findings(diag: Diagnosis) -> list[Finding]:
    """Root causes, most slots first: leak groups, unmeasurable sessions, idle pools, lock
    waits, long queries, hidden sessions, sessions in the reserved slots."""
    out = leak_findings(diag) + idle_pool_findings(diag) + blocked_findings(diag)
    out += long_query_findings(diag) + hidden_findings(diag) + unmeasured_findings(diag)
    out += reserved_slot_findings(diag)
    order = {
        "leak": 0,
        "unmeasured": 1,
        "blocked": 2,
        "idle_pool": 3,
        "long_query": 4,
        "hidden": 5,
        "reserved_slots": 6,
    }
    # The sum of the small leak groups goes last, whatever its size (the first sort key).
    out.sort(key=lambda f: (f.kind == "leak_other", -f.sessions, order.get(f.kind, 9), f.summary))
    return out


def _pids_phrase(pids: Sequence[int]) -> str:
    if not pids:
        return ""
    if len(pids) == 1:
        return f", pid {pids[0]}"
    shown = ", ".join(str(p) for p in pids[:5])
    more = f" and {len(pids) - 5} more" if len(pids) > 5 else ""
    return f", pids {shown}{more}"


#: Leak groups reported one by one; smaller ones are summed up in one ``leak_other`` finding.
MAX_LEAK_FINDINGS = 20


def leak_findings(diag: Diagnosis) -> list[Finding]:
    """One finding per (reason, owner, call-site) among the suspects, biggest first."""
    groups: dict[tuple[str, str, str | None], list[Suspect]] = {}
    for sus in diag.suspects:
        key = (sus.reason, sus.session.owner, sus.session.callsite)
        groups.setdefault(key, []).append(sus)
    ranked = sorted(
        groups.items(), key=lambda kv: (-len(kv[1]), kv[0][0], kv[0][1], kv[0][2] or "")
    )
    out = [_leak_finding(diag, key, members) for key, members in ranked[:MAX_LEAK_FINDINGS]]
    rest = ranked[MAX_LEAK_FINDINGS:]
    if rest:
        pids = tuple(sorted(m.session.backend_pid for _, members in rest for m in members))
        out.append(
            Finding(
                kind="leak_other",
                sessions=len(pids),
                summary=f"{len(pids)} {diag.slots_phrase} are leak suspects in {len(rest)} "
                "smaller groups (see the suspects)",
                backend_pids=pids,
                evidence={"groups": len(rest)},
            )
        )
    return out


def _leak_finding(
    diag: Diagnosis, key: tuple[str, str, str | None], members: list[Suspect]
) -> Finding:
    reason, owner, site = key
    client_pids = sorted({m.session.client_pid for m in members if m.session.client_pid})
    where = f", last call-site {site}" if site else ""
    longest = max(m.seconds for m in members)
    summary = (
        f"{len(members)} {diag.slots_phrase} are {REASONS[reason]} from {owner}"
        f"{_pids_phrase(client_pids)}{where} (longest {format_duration(longest)})"
    )
    first = members[0].session
    return Finding(
        kind="leak",
        sessions=len(members),
        summary=summary,
        backend_pids=tuple(sorted(m.session.backend_pid for m in members)),
        evidence={
            "reason": reason,
            "service": first.service,
            "application_name": first.application_name,
            "client_pids": client_pids,
            "callsite": site,
            "users": sorted({m.session.user or _NO_VALUE for m in members}),
            "databases": sorted({m.session.database or _NO_VALUE for m in members}),
            "longest_seconds": round(longest, 3),
            "last_query": first.query,
        },
    )


def idle_pool_findings(diag: Diagnosis) -> list[Finding]:
    """Owners keeping many idle, not-yet-suspect sessions open (pools sized too large)."""
    suspect_pids = {s.session.backend_pid for s in diag.suspects}
    idle: dict[str, list[Session]] = {}
    busy: Counter[str] = Counter()
    for s in diag.sessions:
        if s.state == "idle" and s.backend_pid not in suspect_pids:
            idle.setdefault(s.owner, []).append(s)
        elif s.state == "active":
            busy[s.owner] += 1
    floor = max(5, (diag.settings.usable or diag.total) // 10)
    out = []
    for owner, members in idle.items():
        if len(members) < floor:
            continue
        processes = len({m.client_pid or m.client_addr for m in members})
        summary = (
            f"{len(members)} {diag.slots_phrase} are idle connections kept open by {owner} "
            f"({processes} process{'es' if processes != 1 else ''}, {busy[owner]} active "
            f"at the moment): pools larger than the work needs"
        )
        out.append(
            Finding(
                kind="idle_pool",
                sessions=len(members),
                summary=summary,
                backend_pids=tuple(sorted(m.backend_pid for m in members)),
                evidence={"owner": owner, "processes": processes, "active": busy[owner]},
            )
        )
    return out


def blocked_findings(diag: Diagnosis) -> list[Finding]:
    """Sessions waiting on a lock, and (live servers) who blocks them."""
    waiting = [s for s in diag.sessions if s.wait_event_type == "Lock"]
    if not waiting:
        return []
    blockers = sorted({b for s in waiting for b in diag.blockers.get(s.backend_pid, [])})
    by_pid = {s.backend_pid: s for s in diag.sessions}
    held = ""
    if blockers:
        who = [
            f"{b} ({by_pid[b].state or 'state hidden'}, {by_pid[b].owner})"
            if b in by_pid
            else str(b)
            for b in blockers[:5]
        ]
        held = "; blocked by backend " + ", ".join(who)
    summary = f"{len(waiting)} {diag.slots_phrase} are waiting on locks{held}"
    return [
        Finding(
            kind="blocked",
            sessions=len(waiting),
            summary=summary,
            backend_pids=tuple(sorted(s.backend_pid for s in waiting)),
            evidence={"blocking_pids": blockers},
        )
    ]


def long_query_findings(diag: Diagnosis) -> list[Finding]:
    """Active queries running longer than ``long_query_threshold``."""
    now = diag.now
    if now is None:
        return []
    limit = diag.options.long_query_threshold
    slow = [
        s
        for s in diag.sessions
        if s.state == "active"
        and s.query_start is not None
        and s.backend_pid != diag.self_pid
        and now - s.query_start >= limit
    ]
    if not slow:
        return []
    slow.sort(key=lambda s: s.query_start or 0.0)
    first = slow[0]
    longest = now - (first.query_start or now)
    summary = (
        f"{len(slow)} {diag.slots_phrase} run queries active for more than "
        f"{format_duration(limit)} (longest {format_duration(longest)}: backend "
        f"{first.backend_pid}, {first.owner})"
    )
    return [
        Finding(
            kind="long_query",
            sessions=len(slow),
            summary=summary,
            backend_pids=tuple(sorted(s.backend_pid for s in slow)),
            evidence={"longest_seconds": round(longest, 3), "query": first.query},
        )
    ]


def grant_advice(role: str | None) -> str:
    """The GRANT that lets ``role`` see every session's state and query."""
    return f"GRANT pg_monitor TO {quote_ident(role) if role else '<your role>'};"


def hidden_findings(diag: Diagnosis) -> list[Finding]:
    """Sessions whose state and query the reading role may not see."""
    if not diag.hidden:
        return []
    as_role = f" from role {diag.role}" if diag.role else ""
    summary = (
        f"{diag.hidden} {diag.slots_phrase} are hidden{as_role} (<insufficient privilege>): "
        f"their state and query are unknown; fix: {grant_advice(diag.role)}"
    )
    pids = tuple(sorted(s.backend_pid for s in diag.sessions if s.hidden))
    return [
        Finding(
            kind="hidden",
            sessions=diag.hidden,
            summary=summary,
            backend_pids=pids,
            evidence={"role": diag.role, "grant": grant_advice(diag.role)},
        )
    ]


def unmeasured_findings(diag: Diagnosis) -> list[Finding]:
    """Sessions that may be leaks but whose time in their state cannot be measured (a
    snapshot without ``state_change`` values, or without any timestamp to date it)."""
    unknown = [
        s
        for s in diag.sessions
        if s.state in REASONS and (diag.now is None or s.state_change is None)
    ]
    if not unknown:
        return []
    states = Counter(s.state or "" for s in unknown)
    what = ", ".join(f"{n} {state}" for state, n in _ranked(states))
    if diag.now is None:
        missing = "the moment of the snapshot is unknown (no now column, no timestamps: give --now)"
        columns = ["now"]
    else:
        missing = "state_change is missing (export every pg_stat_activity column)"
        columns = ["state_change"]
    summary = (
        f"{len(unknown)} {diag.slots_phrase} could be leaks but cannot be measured ({what}): "
        f"{missing}"
    )
    return [
        Finding(
            kind="unmeasured",
            sessions=len(unknown),
            summary=summary,
            backend_pids=tuple(sorted(s.backend_pid for s in unknown)),
            evidence={"states": dict(states), "missing": columns},
        )
    ]


def reserved_slot_findings(diag: Diagnosis) -> list[Finding]:
    """More client sessions than usable slots: the rest sit in the reserved slots, which
    only superusers (and, 16+, members of pg_use_reserved_connections) may take."""
    settings = diag.settings
    usable, reserved = settings.usable, settings.reserved
    if usable is None or reserved is None or diag.total <= usable:
        return []
    over = diag.total - usable
    supers = [s for s in diag.sessions if s.superuser]
    who = "superusers"
    if settings.integer("reserved_connections"):
        who += " and members of pg_use_reserved_connections"
    known = (
        f"; {len(supers)} session(s) run as superuser "
        + ", ".join(sorted({s.user or _NO_VALUE for s in supers}))
        if supers
        else ""
    )
    summary = (
        f"{diag.total} client sessions {diag.slots_phrase}: {over} of them are in the "
        f"{reserved} reserved slot(s), which only {who} may use{known}; every other role "
        'already gets "remaining connection slots are reserved"'
    )
    return [
        Finding(
            kind="reserved_slots",
            sessions=over,
            summary=summary,
            backend_pids=tuple(sorted(s.backend_pid for s in supers)),
            evidence={"usable": usable, "reserved": reserved, "superuser_sessions": len(supers)},
        )
    ]
