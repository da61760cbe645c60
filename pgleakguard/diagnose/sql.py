"""Quoting for the SQL pgleakguard prints for people to run (no driver needed)."""

from __future__ import annotations


def quote_literal(value: str) -> str:
    """A string literal that means ``value`` whatever standard_conforming_strings is."""
    if "\\" in value:
        return "E'" + value.replace("\\", "\\\\").replace("'", "''") + "'"
    return "'" + value.replace("'", "''") + "'"


def quote_ident(name: str) -> str:
    """An identifier, always double-quoted (so reserved words and odd names are safe)."""
    return '"' + name.replace('"', '""') + '"'


def like_prefix(value: str) -> str:
    """A LIKE pattern matching strings that start with ``value`` (its % and _ escaped)."""
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
