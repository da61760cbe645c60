"""Reading an exported pg_stat_activity: CSV with a header, JSON, or what psql prints.

Accepted, detected from the content:

- CSV with a header line: ``\\copy (select * from pg_stat_activity) to 'f.csv' csv header``
- JSON: an array of objects, or one object per line
  (``select row_to_json(a) from pg_stat_activity a``)
- psql's aligned table (the default output of ``select * from pg_stat_activity;``) and its
  expanded form (``\\x``)

An optional ``now`` (or ``snapshot_time``) column gives the moment of the export
(``select now(), * from pg_stat_activity``); without it the newest timestamp in the file is used.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator
from typing import Any
from unicodedata import east_asian_width

from ..sqltext import mask_passwords
from .model import RowError, Session
from .units import to_epoch

_PSQL_RULE = re.compile(r"^-+(\+-+)*$")
_PSQL_RECORD = re.compile(r"^-\[ RECORD \d+ \]-*\+?-*$")
# What psql says when \x switches expanded output on (without -q), before the first record.
_PSQL_EXPANDED_ON = re.compile(r"^Expanded display is (on|used automatically)\.$")
_PSQL_FOOTER = re.compile(r"^\((\d+) rows?\)$")
_NOW_COLUMNS = ("now", "snapshot_time")
_WIDE = "\0"

Row = dict[str, Any]


class SnapshotError(ValueError):
    """A snapshot file cannot be read; the message names the line and what is wrong."""

    def __init__(self, line: int | None, message: str) -> None:
        self.line = line
        self.reason = message
        super().__init__(f"line {line}: {message}" if line is not None else message)


class Snapshot:
    """The sessions of one export, and the moment it was taken."""

    def __init__(self, sessions: list[Session], now: float | None, fmt: str) -> None:
        self.sessions = sessions
        #: Epoch seconds of the export; ``None`` when the file has no timestamp at all.
        self.now = now
        #: ``csv``, ``json`` or ``psql``.
        self.format = fmt


def load(path: str) -> Snapshot:
    """Read the snapshot at ``path``. Raises :class:`SnapshotError` or ``OSError``."""
    with open(path, encoding="utf-8", errors="replace", newline="") as fh:
        return parse(fh.read())


def parse(text: str) -> Snapshot:
    """Read a snapshot from its text (format detected from the content)."""
    fmt = detect(text)
    reader = {"json": _json_rows, "csv": _csv_rows, "psql": _psql_rows}[fmt]
    sessions: list[Session] = []
    now: float | None = None
    for line, row in reader(text):
        if not isinstance(row, dict):
            raise SnapshotError(
                line, f"expected an object with pg_stat_activity columns, got {row!r}"
            )
        if "pid" not in row:
            raise SnapshotError(line, "no pid column: export the pg_stat_activity columns")
        if isinstance(row.get("query"), str):
            row["query"] = mask_passwords(row["query"])
        try:
            sessions.append(Session.from_row(row))
            for name in _NOW_COLUMNS:
                if row.get(name) not in (None, ""):
                    taken = to_epoch(row[name])
                    now = taken if now is None or (taken or 0) > now else now
        except (RowError, ValueError) as exc:
            raise SnapshotError(line, str(exc)) from None
    if now is None:
        now = _newest(sessions)
    return Snapshot(sessions, now, fmt)


def detect(text: str) -> str:
    """``json``, ``csv`` or ``psql``; raises :class:`SnapshotError` for anything else."""
    stripped = text.lstrip()
    if not stripped:
        raise SnapshotError(1, "the file is empty")
    if stripped[0] in "[{":
        return "json"
    lines = text.splitlines()
    if any(_PSQL_RULE.match(ln.strip()) or _PSQL_RECORD.match(ln.strip()) for ln in lines[:50]):
        return "psql"
    first = next(ln for ln in lines if ln.strip())
    if "," in first and "pid" in [c.strip().strip('"') for c in first.split(",")]:
        return "csv"
    raise SnapshotError(
        1,
        "not a pg_stat_activity export: expected CSV with a header (incl. pid), JSON, "
        "or psql table output",
    )


def _newest(sessions: list[Session]) -> float | None:
    newest: float | None = None
    for s in sessions:
        for value in (s.state_change, s.query_start, s.xact_start, s.backend_start):
            if value is not None and (newest is None or value > newest):
                newest = value
    return newest


# -- CSV ----------------------------------------------------------------------------------


def _csv_rows(text: str) -> Iterator[tuple[int, Row]]:
    # strict: an unclosed quote is an error, not a field that swallows the rest of the file
    # (PostgreSQL's CSV is always well-formed).
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader)
    except (StopIteration, csv.Error) as exc:
        raise SnapshotError(1, f"bad CSV header: {_csv_reason(exc)}") from None
    names = [h.strip() for h in header]
    start = reader.line_num
    while True:
        start = reader.line_num + 1
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise SnapshotError(start, f"bad CSV: {_csv_reason(exc)}") from None
        if not fields:
            continue
        if len(fields) != len(names):
            raise SnapshotError(
                start, f"{len(fields)} fields, but the header has {len(names)} columns"
            )
        # PostgreSQL writes NULL as an unquoted empty field.
        yield start, {n: (v if v != "" else None) for n, v in zip(names, fields)}


def _csv_reason(exc: Exception) -> str:
    if "unexpected end of data" in str(exc):
        return 'a quoted field starting on this line has no closing quote (")'
    return str(exc)


# -- JSON ---------------------------------------------------------------------------------


def _json_rows(text: str) -> Iterator[tuple[int, Any]]:
    decoder = json.JSONDecoder()
    pos = _skip_ws(text, 0)
    in_array = text[pos] == "["
    if in_array:
        pos = _skip_ws(text, pos + 1)
        if text.startswith("]", pos):
            return
    while pos < len(text):
        line = text.count("\n", 0, pos) + 1
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise SnapshotError(exc.lineno, f"invalid JSON: {exc.msg}") from None
        yield line, value
        pos = _skip_ws(text, end)
        if not in_array:
            continue
        if text.startswith(",", pos):
            pos = _skip_ws(text, pos + 1)
        elif text.startswith("]", pos):
            rest = _skip_ws(text, pos + 1)
            if rest < len(text):
                raise SnapshotError(_line_of(text, rest), "invalid JSON: text after the array")
            return
        else:
            raise SnapshotError(_line_of(text, pos), "invalid JSON: expected ',' or ']'")
    if in_array:
        raise SnapshotError(_line_of(text, len(text)), "invalid JSON: the array is not closed")


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


# -- psql ---------------------------------------------------------------------------------


def _psql_rows(text: str) -> Iterator[tuple[int, Row]]:
    lines = text.splitlines()
    for ln in lines:
        if _PSQL_RECORD.match(ln.strip()):
            return _psql_expanded(lines)
    return _psql_aligned(lines)


def _psql_aligned(lines: list[str]) -> Iterator[tuple[int, Row]]:
    rule_at = next(i for i, ln in enumerate(lines) if _PSQL_RULE.match(ln.strip()))
    if rule_at == 0:
        raise SnapshotError(1, "psql table without a header line above the ----+---- rule")
    rule = lines[rule_at].rstrip()
    # Each column is a run of dashes; its cell is " value " padded to the run's width, and the
    # run's last position holds '+' when the value goes on in the next line.
    cuts = [i for i, ch in enumerate(rule) if ch == "+"]
    spans = list(zip([0, *(c + 1 for c in cuts)], [*cuts, len(rule)]))
    names = [lines[rule_at - 1][a:b].strip() for a, b in spans]
    if "pid" not in names:
        raise SnapshotError(rule_at, "the psql table has no pid column")
    row: dict[str, str] = {}
    row_line = 0
    going_on: list[bool] = []
    for number, raw in enumerate(lines[rule_at + 1 :], start=rule_at + 2):
        if not raw.strip():
            continue
        if _PSQL_FOOTER.match(raw.strip()):
            break
        raw = _by_display_column(raw)
        if any(len(raw) <= cut or raw[cut] != "|" for cut in cuts):
            raise SnapshotError(
                number,
                f"expected {len(names)} columns separated by '|' under the header's columns",
            )
        cells = [raw[a:b] for a, b in spans]
        if any(going_on):
            for i, name in enumerate(names):
                if going_on[i]:
                    row[name] += "\n" + _value(cells[i], spans[i])
        else:
            if row:
                yield row_line, _nulls(row)
            row = {name: _value(cell, span) for name, cell, span in zip(names, cells, spans)}
            row_line = number
        going_on = [len(cell) == b - a and cell.endswith("+") for cell, (a, b) in zip(cells, spans)]
    if row:
        yield row_line, _nulls(row)


def _psql_expanded(lines: list[str]) -> Iterator[tuple[int, Row]]:
    row: dict[str, str] | None = None
    row_line = 0
    last: str | None = None
    for number, raw in enumerate(lines, start=1):
        text = raw.rstrip()
        if not text or _PSQL_FOOTER.match(text.strip()):
            continue
        if row is None and _PSQL_EXPANDED_ON.match(text.strip()):
            continue
        if _PSQL_RECORD.match(text.strip()):
            if row is not None:
                yield row_line, _nulls(row)
            row, row_line, last = {}, number, None
            continue
        name, bar, value = text.partition("|")
        if row is None or not bar:
            raise SnapshotError(number, "expected 'column | value' inside a -[ RECORD n ]- block")
        name = name.strip()
        value = value[1:] if value.startswith(" ") else value
        if not name and last is not None and row[last].endswith("+"):
            # psql ends each line but the last of a multi-line value with '+'.
            row[last] = row[last][:-1].rstrip() + "\n" + value
            continue
        if not name or name in row:
            what = "an empty column name" if not name else f"column {name} twice"
            raise SnapshotError(number, f"{what} in one -[ RECORD n ]- block")
        row[name] = value
        last = name
    if row is not None:
        yield row_line, _nulls(row)


def _by_display_column(line: str) -> str:
    # psql pads by display width: give each wide character a second (placeholder) position.
    if line.isascii():
        return line
    return "".join(ch + _WIDE if east_asian_width(ch) in "WF" else ch for ch in line)


def _value(cell: str, span: tuple[int, int]) -> str:
    width = span[1] - span[0]
    text = cell[1 : width - 1] if len(cell) >= width else cell[1:]
    return text.rstrip().replace(_WIDE, "")


def _nulls(row: dict[str, str]) -> Row:
    # psql prints NULL as an empty cell (the default \pset null) and right-aligns numbers.
    out: Row = {}
    for key, value in row.items():
        text = value if key == "query" else value.strip()
        out[key] = text if text != "" else None
    return out
