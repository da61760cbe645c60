"""application_name tags: ``service/pid:1234`` or ``service/pid:1234/orders.py:42``.

Built from ``[A-Za-z0-9._:/@-]`` only and never longer than PostgreSQL's 63 bytes, so the
server keeps them intact; :func:`parse` reads them back from pg_stat_activity.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from urllib.parse import unquote

MAX_BYTES = 63
_SERVICE_BAD = re.compile(r"[^A-Za-z0-9._@-]+")
_FILE_BAD = re.compile(r"[^A-Za-z0-9._-]+")
_TAG = re.compile(
    r"^(?P<service>[A-Za-z0-9._@-]*)/pid:(?P<pid>[0-9]+)"
    r"(?:/(?P<file>[A-Za-z0-9._-]+):(?P<line>[0-9]+))?$"
)


@dataclass(frozen=True)
class Tag:
    """What a pgleakguard application_name says about the session's owner."""

    service: str
    pid: int
    file: str | None = None
    line: int | None = None

    @property
    def callsite(self) -> str | None:
        """``file:line`` when the tag carries a call-site."""
        return f"{self.file}:{self.line}" if self.file and self.line is not None else None


def clean_service(name: str) -> str:
    """``name`` reduced to the characters a tag's service part may hold."""
    return _SERVICE_BAD.sub("-", name).strip("-") or "python"


def default_service() -> str:
    """The program's name (``sys.argv[0]`` without directory and extension)."""
    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else "python"
    base = os.path.basename(argv0.rstrip("/"))
    if base in ("__main__.py", "-c", "-m", ""):
        base = "python"
    return clean_service(os.path.splitext(base)[0])


def application_name(user: str | None, service: str | None) -> str:
    """The tag for a new connection: the user's own application_name (or an earlier tag's
    service) is kept as the service part; else ``service``; else the program's name."""
    if user:
        tag = parse(user)
        name = tag.service if tag is not None else user
    else:
        name = service or default_service()
    return build(name, os.getpid())


def build(service: str, pid: int, file: str | None = None, line: int | None = None) -> str:
    """The application_name for ``service`` in process ``pid``, optionally with a call-site.

    The pid is always kept; the call-site is dropped before the service is cut to fit.
    """
    svc = clean_service(service)
    rest = f"/pid:{int(pid)}"
    site = ""
    if file and line is not None:
        base = _FILE_BAD.sub("-", os.path.basename(file)) or "-"
        site = f"/{base}:{int(line)}"
    if len(svc) + len(rest) + len(site) > MAX_BYTES:
        # Keep at least 8 characters of service, then shorten the file name from the left.
        room = MAX_BYTES - len(rest) - min(len(svc), 8)
        if site and line is not None and room >= len(f"/x:{line}"):
            keep = room - len(f"/:{line}")
            base = site[1:].rsplit(":", 1)[0][-keep:]
            site = f"/{base}:{int(line)}"
        else:
            site = ""
        svc = svc[: MAX_BYTES - len(rest) - len(site)]
    return svc + rest + site


def parse(application_name: str | None) -> Tag | None:
    """Read a tag built by :func:`build`; ``None`` for any other application_name."""
    if not application_name:
        return None
    m = _TAG.match(application_name)
    if m is None:
        return None
    line = m.group("line")
    return Tag(
        service=m.group("service"),
        pid=int(m.group("pid")),
        file=m.group("file"),
        line=int(line) if line is not None else None,
    )


_COMMENT = re.compile(r"/\*(?P<body>[^*]*(?:\*(?!/)[^*]*)*)\*/\s*;?\s*$")
_PAIR = re.compile(r"([A-Za-z0-9_.-]+)='([^']*)'")
_VALUE_BAD = re.compile(r"[^A-Za-z0-9._:/@-]+")


def sql_comment(**tags: str) -> str:
    """A sqlcommenter comment: sorted ``key='value'`` pairs, appended to a statement.

    Values are reduced to ``[A-Za-z0-9._:/@-]`` (other characters become ``-``), which URL
    decoding leaves unchanged: the comment needs no percent-encoding and so never contains
    ``%``, which psycopg would read as a placeholder.
    """
    pairs = ",".join(
        f"{key}='{_VALUE_BAD.sub('-', str(value))}'" for key, value in sorted(tags.items()) if value
    )
    return f"/*{pairs}*/"


def parse_sql_comment(query: str | None) -> dict[str, str]:
    """The ``key='value'`` pairs of a trailing sqlcommenter comment (URL-decoded)."""
    if not query:
        return {}
    m = _COMMENT.search(query)
    if m is None:
        return {}
    return {key: unquote(value) for key, value in _PAIR.findall(m.group("body"))}
