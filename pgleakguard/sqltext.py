"""SQL text as reports show it: literals replaced (``redact_sql``), length capped.

A query in a report (the pg_stat_activity row of a leak, a correlation, ``diagnose``) can
carry data: a customer's e-mail in a WHERE clause, a token in an INSERT. :func:`redact`
replaces every string, dollar-quoted and numeric literal with ``?`` and keeps the rest
(keywords, identifiers, ``$1`` placeholders and comments, where pgleakguard's own
sqlcommenter tags are). :func:`shorten` cuts a query to a length.
"""

from __future__ import annotations

import re

#: What redaction keeps (comments, quoted identifiers, placeholders) or replaces (literals).
_TOKENS = re.compile(
    r"""
      (?P<keep>--[^\n]*|/\*.*?(?:\*/|\Z)|"(?:[^"]|"")*(?:"|\Z)|\$\d+)
    | (?P<dollar>\$\$.*?(?:\$\$|\Z)|\$(?P<tag>[A-Za-z_][A-Za-z0-9_]*)\$.*?(?:\$(?P=tag)\$|\Z))
    | (?P<string>(?<![A-Za-z0-9_])(?:[EeBbXxNn]|[Uu]&)?'(?:[^'\\]|''|\\.)*(?:'|\Z))
    | (?P<number>(?<![A-Za-z0-9_$.])(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?(?![A-Za-z0-9_]))
    """,
    re.S | re.X,
)


def redact(query: str) -> str:
    """``query`` with its literals replaced by ``?``.

    ``SELECT * FROM users WHERE email = 'a@b.c' AND id > 42`` becomes
    ``SELECT * FROM users WHERE email = ? AND id > ?``. An unterminated literal (a query cut
    by ``track_activity_query_size``) is replaced up to the end.
    """
    return _TOKENS.sub(_replace, query)


def _replace(match: re.Match[str]) -> str:
    return match.group("keep") or "?"


def shorten(query: str, limit: int) -> str:
    """``query`` cut to ``limit`` characters, saying how many were left out."""
    if len(query) <= limit:
        return query
    return f"{query[:limit]}... ({len(query) - limit} more characters)"


def for_report(query: str | None, limit: int, redact_literals: bool) -> str | None:
    """A query as a report shows it: redacted if asked, then cut to ``limit``."""
    if query is None:
        return None
    return shorten(redact(query) if redact_literals else query, limit)
