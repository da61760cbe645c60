"""How long `pgleakguard diagnose` takes over a 10,000-row pg_stat_activity snapshot.

Usage: python benchmarks/diagnose.py [ROWS] [RUNS]

Writes a realistic CSV snapshot (the columns of `\\copy (select * from pg_stat_activity) to
... csv header`: many services and processes, every state, tags in application_name and in
SQL comments), then times, median of RUNS:

- analysis: read the file, diagnose, build the report, render the text and the JSON
  (in-process, what the command spends beyond starting Python);
- command: the whole `pgleakguard diagnose --snapshot FILE --format json` in a subprocess.
"""

from __future__ import annotations

import csv
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from pgleakguard import tagging
from pgleakguard.diagnose import analysis, report, snapshot
from pgleakguard.diagnose.model import ServerSettings, Setting
from pgleakguard.diagnose.render import to_text

#: What `select * from pg_stat_activity` has on PostgreSQL 14 to 18.
COLUMNS = [
    "datid",
    "datname",
    "pid",
    "leader_pid",
    "usesysid",
    "usename",
    "application_name",
    "client_addr",
    "client_hostname",
    "client_port",
    "backend_start",
    "xact_start",
    "query_start",
    "state_change",
    "wait_event_type",
    "wait_event",
    "state",
    "backend_xid",
    "backend_xmin",
    "query_id",
    "query",
    "backend_type",
]
STATES = (
    ["idle"] * 60
    + ["active"] * 20
    + ["idle in transaction"] * 15
    + ["idle in transaction (aborted)"] * 4
    + ["fastpath function call"]
)
NOW = datetime(2024, 5, 1, 10, 0, tzinfo=timezone.utc)


def _ts(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S.%f") + "+00"


def write_snapshot(path: Path, rows: int, seed: int = 7) -> None:
    """A CSV snapshot of ``rows`` client sessions from 40 services x 10 processes."""
    rnd = random.Random(seed)
    with path.open("w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(COLUMNS)
        for i in range(rows):
            service = f"svc{rnd.randrange(40)}"
            proc = 1000 + rnd.randrange(400)
            state = rnd.choice(STATES)
            changed = NOW - timedelta(seconds=rnd.uniform(0, 7200))
            started = changed - timedelta(seconds=rnd.uniform(0, 600))
            site = f"{service}_views.py:{rnd.randrange(10, 500)}"
            comment = tagging.sql_comment(callsite=site, pid=proc, service=service)
            query = f"SELECT * FROM orders WHERE id = $1 {comment}"
            in_xact = state.startswith("idle in") or state == "active"
            out.writerow(
                [
                    16384,
                    f"db{rnd.randrange(3)}",
                    20000 + i,
                    "",
                    10,
                    f"role{rnd.randrange(5)}",
                    tagging.build(service, proc),
                    f"10.0.{rnd.randrange(8)}.{rnd.randrange(250)}",
                    "",
                    40000 + i % 20000,
                    _ts(started),
                    _ts(started) if in_xact else "",
                    _ts(changed),
                    _ts(changed),
                    "Client",
                    "ClientRead",
                    state,
                    "",
                    "",
                    "",
                    query,
                    "client backend",
                ]
            )


def analysis_once(path: Path) -> tuple[float, float]:
    """(wall, CPU) seconds to read, diagnose, build and render (text and JSON) the snapshot."""
    start, cpu = time.perf_counter(), time.process_time()
    snap = snapshot.load(str(path))
    settings = ServerSettings(
        values={"max_connections": Setting("12000"), "superuser_reserved_connections": Setting("3")}
    )
    diag = analysis.diagnose(
        snap.sessions,
        settings,
        analysis.Options(),
        snap.now,
        source=str(path),
        source_kind="snapshot",
    )
    rep = report.build(diag)
    to_text(report.blocks(rep))
    json.dumps(report.as_json(rep), default=str)
    return time.perf_counter() - start, time.process_time() - cpu


def command_once(path: Path) -> float:
    """Seconds for the whole command in a fresh Python process."""
    start = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pgleakguard.cli",
            "diagnose",
            "--snapshot",
            str(path),
            "--format",
            "json",
            "--max-connections",
            "12000",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - start


def main() -> None:
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "activity.csv"
        write_snapshot(path, rows)
        analysis_once(path)  # warm-up
        timed = [analysis_once(path) for _ in range(runs)]
        inproc, cpu = [w for w, _ in timed], [c for _, c in timed]
        whole = [command_once(path) for _ in range(runs)]
    print(f"diagnose over a {rows:,}-row snapshot, median of {runs} runs:")
    print(
        f"  analysis (read, diagnose, report, render): {statistics.median(inproc):.3f} s wall, "
        f"{statistics.median(cpu):.3f} s CPU (wall min {min(inproc):.3f}, max {max(inproc):.3f})"
    )
    print(
        f"  whole command (new Python process):        {statistics.median(whole):.3f} s "
        f"(min {min(whole):.3f}, max {max(whole):.3f})"
    )


if __name__ == "__main__":
    main()
