"""Tags that pg_stat_activity shows: application_name and sqlcommenter SQL comments.

application_name is ``service/pid:1234`` or ``service/pid:1234/orders.py:42``, built from
``[A-Za-z0-9._:/@-]`` only and never longer than PostgreSQL's 63 bytes, so the server keeps
it intact; :func:`parse` reads it back. :func:`sql_comment` builds a comment to append to a
query (``/*callsite='orders.py:42',pid='4123',service='billing'*/``) and
:func:`parse_sql_comment` reads it back from the last query of a session.
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


# -- SQL comments (sqlcommenter format) ---------------------------------------------------

#: Characters a SQL-comment value keeps; anything else becomes ``-``. Values are sent as they
#: are, not URL-encoded (strict encoding would turn ``:`` and ``@`` into ``%3A`` and ``%40``):
#: each of these characters URL-decodes to itself, so a sqlcommenter parser reads the value
#: back unchanged, and the comment never holds a ``%`` (psycopg would read it as a placeholder).
_COMMENT_VALUE_BAD = re.compile(r"[^A-Za-z0-9._:/@-]")
_COMMENT_KEY_BAD = re.compile(r"[^A-Za-z0-9_]")
_PAIR = re.compile(r"\s*(?P<key>[^=,\s]+)\s*=\s*'(?P<value>(?:[^'\\]|\\.)*)'\s*(?:,|$)")


def sql_comment(**tags: object) -> str:
    """A sqlcommenter comment ``/*key='value',...*/`` for ``tags``, to append to a query.

    Keys are sorted; ``None`` values are left out. Values are reduced to
    ``[A-Za-z0-9._:/@-]`` (anything else becomes ``-``) and not URL-encoded: each of those
    characters URL-decodes to itself, so the comment is sqlcommenter-compatible and never
    contains ``%``. Use ``callsite`` (``orders.py:42``), ``service`` and ``pid``.
    """
    pairs = []
    for key in sorted(tags):
        value = tags[key]
        if value is None:
            continue
        clean_key = _COMMENT_KEY_BAD.sub("_", key)
        pairs.append(f"{clean_key}='{_COMMENT_VALUE_BAD.sub('-', str(value))}'")
    return "/*" + ",".join(pairs) + "*/" if pairs else ""


def _trailing_comment(query: str) -> tuple[int, str] | None:
    # (where the comment starts, its body) for a /*...*/ closing the query (before any ";").
    end = len(query.rstrip().rstrip(";").rstrip())
    if not query.endswith("*/", 0, end):
        return None
    start = query.rfind("/*", 0, end - 2)
    return None if start < 0 else (start, query[start + 2 : end - 2])


def strip_sql_comment(query: str) -> str:
    """``query`` without a trailing sqlcommenter comment (for display: the tags are shown
    in their own columns)."""
    found = _trailing_comment(query) if "*/" in query else None
    return query[: found[0]].rstrip() if found is not None and "='" in found[1] else query


def parse_sql_comment(query: str | None) -> dict[str, str]:
    """The ``key='value'`` pairs of a sqlcommenter comment at the end of ``query``.

    Values are URL-decoded; a query without such a comment gives ``{}``.
    """
    found = _trailing_comment(query) if query and "*/" in query else None
    if found is None:
        return {}
    body = found[1].strip()
    tags: dict[str, str] = {}
    pos = 0
    while pos < len(body):
        pair = _PAIR.match(body, pos)
        if pair is None:
            return {}
        key, value = pair.group("key"), pair.group("value").replace("\\'", "'")
        tags[unquote(key) if "%" in key else key] = unquote(value) if "%" in value else value
        pos = pair.end()
    return tags
