"""Sizes, durations and timestamps: parsed from what people type and what PostgreSQL prints."""

from __future__ import annotations

import calendar
import datetime as _dt
import math
import re
import time

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB
TIB = 1024 * GIB

# PostgreSQL's memory units are powers of 1024 (kB = 1024 bytes); so are ours.
_SIZE_UNITS = {
    "b": 1,
    "k": KIB,
    "kb": KIB,
    "kib": KIB,
    "m": MIB,
    "mb": MIB,
    "mib": MIB,
    "g": GIB,
    "gb": GIB,
    "gib": GIB,
    "t": TIB,
    "tb": TIB,
    "tib": TIB,
}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]+)\s*$")
_DURATION_UNITS = {
    "ms": 0.001,
    "s": 1.0,
    "sec": 1.0,
    "m": 60.0,
    "min": 60.0,
    "h": 3600.0,
    "d": 86400.0,
}
_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-z]*)\s*$")
# What PostgreSQL prints for timestamptz (text, CSV, JSON): date, time, fraction, offset.
_TIMESTAMP = re.compile(
    r"^(\d{4})-(\d\d)-(\d\d)[ T](\d\d):(\d\d):(\d\d)(?:\.(\d{1,6}))?"
    r"\s*(?:(Z)|([+-])(\d\d)(?::?(\d\d))?(?::?(\d\d))?)?$"
)


def parse_size(text: str) -> int:
    """Bytes in ``16GB``, ``512MB``, ``1.5GiB`` (units are powers of 1024, as in PostgreSQL).

    Raises ``ValueError`` saying what is accepted.
    """
    m = _SIZE.match(text)
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _SIZE_UNITS:
        raise ValueError(
            f"{text!r} is not a size: expected a number and a unit, e.g. 16GB or 512MB"
        )
    value = float(m.group(1)) * _SIZE_UNITS[unit]
    if value < 1:
        raise ValueError(f"{text!r} is not a size: it must be more than zero")
    return int(value)


def parse_duration(text: str) -> float:
    """Seconds in ``10m``, ``30s``, ``1h``, ``500ms`` or a bare number of seconds."""
    m = _DURATION.match(text.lower())
    unit = m.group(2) if m else ""
    if m is None or (unit and unit not in _DURATION_UNITS):
        raise ValueError(
            f"{text!r} is not a duration: expected a number and a unit (ms, s, m, h, d), e.g. 10m"
        )
    return float(m.group(1)) * _DURATION_UNITS.get(unit, 1.0)


def parse_timestamp(text: str) -> float:
    """Seconds since the epoch for a PostgreSQL timestamp (no offset means UTC)."""
    try:
        # The C fast path (Python 3.11+ reads "+00" and short fractions; older ones raise).
        moment = _dt.datetime.fromisoformat(text)
    except ValueError:
        return _parse_timestamp_slowly(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=_dt.timezone.utc)
    return moment.timestamp()


def _parse_timestamp_slowly(text: str) -> float:
    m = _TIMESTAMP.match(text.strip())
    if m is None:
        raise ValueError(f"{text!r} is not a timestamp")
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    fraction = m.group(7)
    try:
        _dt.date(year, month, day)
    except ValueError:
        raise ValueError(f"{text!r} is not a timestamp") from None
    secs = calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0))
    if fraction:
        secs += int(fraction) / 10 ** len(fraction)
    if m.group(9):
        offset = int(m.group(10)) * 3600 + int(m.group(11) or 0) * 60 + int(m.group(12) or 0)
        secs -= offset if m.group(9) == "+" else -offset
    return float(secs)


def to_epoch(value: object) -> float | None:
    """A timestamp from a driver (aware ``datetime``) or a file (text) as epoch seconds."""
    if value is None or value == "":
        return None
    if isinstance(value, _dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=_dt.timezone.utc)
        return value.timestamp()
    return parse_timestamp(str(value))


def iso(epoch: float | None) -> str | None:
    """ISO 8601 in UTC, to the second."""
    if epoch is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(round(epoch)))


def format_size(num_bytes: float) -> str:
    """``16 GiB``, ``512 MiB``, ``4 MiB``, ``8 kiB``: the largest unit that keeps 1 decimal."""
    for unit, size in (("TiB", TIB), ("GiB", GIB), ("MiB", MIB), ("kiB", KIB)):
        if num_bytes >= size:
            value = num_bytes / size
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{num_bytes:.0f} B"


def pg_size(num_bytes: float) -> str:
    """A size as a postgresql.conf value: ``4GB``, ``512MB``, ``4MB`` (rounded down)."""
    for unit, size in (("TB", TIB), ("GB", GIB), ("MB", MIB)):
        if num_bytes >= size and num_bytes % size == 0:
            return f"{int(num_bytes // size)}{unit}"
    if num_bytes >= MIB:
        return f"{int(num_bytes // MIB)}MB"
    return f"{max(1, int(num_bytes // KIB))}kB"


def format_duration(seconds: float | None) -> str:
    """``850ms``, ``42s``, ``12m 5s``, ``10m``, ``3h 20m``, ``2d 4h``."""
    if seconds is None or math.isnan(seconds):
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    for size, unit, small, small_unit in (
        (86400, "d", 3600, "h"),
        (3600, "h", 60, "m"),
        (60, "m", 1, "s"),
    ):
        if whole >= size:
            rest = whole % size // small
            return f"{whole // size}{unit}" + (f" {rest}{small_unit}" if rest else "")
    return f"{whole}s"  # pragma: no cover - unreachable


def pg_interval(seconds: float) -> str:
    """A duration as a PostgreSQL interval / GUC value: ``10min``, ``30s``, ``500ms``."""
    if seconds >= 60 and seconds % 60 == 0:
        return f"{int(seconds // 60)}min"
    if seconds >= 1 and seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{int(round(seconds * 1000))}ms"
