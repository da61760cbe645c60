"""Server-side diagnosis: pure functions over pg_stat_activity rows and server settings.

- :mod:`.snapshot` reads exported pg_stat_activity files (CSV, JSON, psql output)
- :mod:`.analysis` breaks sessions down, finds leak suspects and ranks root causes
- :mod:`.fixes`, :mod:`.pgbouncer`, :mod:`.recommend` say what to do about them
- :mod:`.report` and :mod:`.render` print it as text, markdown, rich tables or JSON
- :mod:`.commands` (diagnose), :mod:`.recommend_command`, :mod:`.terminate_command` and
  :mod:`.watch` are the ``pgleakguard`` subcommands; :mod:`.terminate` builds their SQL

Nothing here imports psycopg or rich at import time.
"""

from __future__ import annotations

from .analysis import Diagnosis, Options, diagnose
from .model import ServerSettings, Session
from .snapshot import Snapshot, SnapshotError

__all__ = [
    "Diagnosis",
    "Options",
    "ServerSettings",
    "Session",
    "Snapshot",
    "SnapshotError",
    "diagnose",
]
