"""SQL text as reports show it: passwords masked, literals replaced (``redact_sql``), length capped.

A query in a report (the pg_stat_activity row of a leak, a correlation, ``diagnose``) can
carry data: a customer's e-mail in a WHERE clause, a token in an INSERT. :func:`redact`
replaces every string, dollar-quoted and numeric literal with ``?`` and keeps the rest
(keywords, identifiers, ``$1`` placeholders and comments, where pgleakguard's own
sqlcommenter tags are). :func:`mask_passwords` hides what is a password whatever the
options say (``ALTER ROLE ... PASSWORD '...'``, a conninfo's ``password=...``).
:func:`shorten` cuts a query to a length.

Literals are read as PostgreSQL reads them with ``standard_conforming_strings`` on (the
default since 9.1): in ``'...'`` a backslash is an ordinary character and a quote is doubled
(``''``); only ``E'...'`` has backslash escapes.
"""

from __future__ import annotations

import re

#: What redaction keeps (comments, quoted identifiers, placeholders) or replaces (literals).
#: An unterminated literal or comment (a query cut by track_activity_query_size) runs to the end.
_TOKENS = re.compile(
    r"""
      (?P<keep>--[^\n]*|/\*.*?(?:\*/|\Z)|(?:[Uu]&)?"(?:[^"]|"")*(?:"|\Z)|\$\d+)
    | (?P<dollar>(?<![\w$])\$(?P<tag>(?:[^\W\d]\w*)?)\$.*?(?:\$(?P=tag)\$|\Z))
    | (?P<escape>(?<![\w$])[Ee]'(?:[^'\\]|''|\\.)*\\?(?:'|\Z))
    | (?P<string>(?:(?<![\w$])(?:[BbXxNn]|[Uu]&))?'(?:[^']|'')*(?:'|\Z))
    | (?P<number>(?<![\w$])
        (?:0[Xx][0-9A-Fa-f_]+|0[Oo][0-7_]+|0[Bb][01_]+
          |(?:\d[\d_]*(?:\.[\d_]*)?|\.\d[\d_]*)(?:[Ee][+-]?\d[\d_]*)?))
    """,
    re.S | re.X,
)


def redact(query: str) -> str:
    """``query`` with its literals replaced by ``?``.

    ``SELECT * FROM users WHERE email = 'a@b.c' AND id > 42`` becomes
    ``SELECT * FROM users WHERE email = ? AND id > ?``. Strings (``'...'``, ``E'...'``,
    ``U&'...'``, ``B'...'``, ``X'...'``), dollar-quoted text and numbers (``1.5e10``,
    ``0xDEADBEEF``, ``4_111``) are literals. An unterminated literal (a query cut by
    ``track_activity_query_size``) is replaced up to the end.
    """
    return _TOKENS.sub(_replace, query)


def _replace(match: re.Match[str]) -> str:
    return match.group("keep") or "?"


#: A password given as a literal: ``[ENCRYPTED] PASSWORD '...'`` in CREATE/ALTER ROLE or USER,
#: and ``password '...'`` in a USER MAPPING's OPTIONS (postgres_fdw, dblink_fdw).
_PASSWORD_LITERAL = re.compile(
    r"""(?ix)(?<![\w$])(password\s+)
    ( E'(?:[^'\\]|''|\\.)*\\?(?:'|\Z)
    | '(?:[^']|'')*(?:'|\Z)
    | \$(?P<tag>(?:[^\W\d]\w*)?)\$.*?(?:\$(?P=tag)\$|\Z) )""",
    re.S,
)
#: ``password=...`` inside a conninfo string (dblink, CREATE SUBSCRIPTION ... CONNECTION): the
#: value ends at a space or at the quote closing the SQL literal; ``''...''`` when quoted.
_CONNINFO_PASSWORD = re.compile(
    r"(?i)(?<![\w$])((?:ssl)?password\s*=\s*)(''(?:[^']|'(?!'))*(?:''|\Z)|(?:\\.|[^\s'\\])+)"
)
#: ``postgresql://user:secret@host`` inside a string.
_URI_PASSWORD = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^\s:/@']*):[^\s']*@")


def mask_passwords(query: str) -> str:
    """``query`` with the passwords it holds replaced by ``***``; nothing else changes.

    ``ALTER ROLE svc PASSWORD 'Hunter2'`` becomes ``ALTER ROLE svc PASSWORD '***'``, and so do
    ``password=...`` in a conninfo string and the password of a URI.
    """
    if "password" not in query.lower() and "://" not in query:
        return query
    query = _PASSWORD_LITERAL.sub(r"\1'***'", query)
    query = _CONNINFO_PASSWORD.sub(r"\1***", query)
    return _URI_PASSWORD.sub(r"\1:***@", query)


def shorten(query: str, limit: int) -> str:
    """``query`` cut to ``limit`` characters, saying how many were left out."""
    if len(query) <= limit:
        return query
    return f"{query[:limit]}... ({len(query) - limit} more characters)"


def for_report(query: str | None, limit: int, redact_literals: bool) -> str | None:
    """A query as a report shows it: passwords masked, redacted if asked, cut to ``limit``."""
    if query is None:
        return None
    query = mask_passwords(query)
    return shorten(redact(query) if redact_literals else query, limit)
