"""Real processes for the server-side tests: a leaking program, the CLI, PostgreSQL 15, PgBouncer.

Plain helpers (not fixtures) so each test module declares the fixtures it needs.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg

from conftest import marked_line, skip_or_fail

HERE = Path(__file__).parent
LEAKER = HERE / "programs" / "leaker.py"
PG15_BIN = Path("/usr/lib/postgresql/15/bin")
PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


def leaker_line(name: str) -> int:
    """The line of ``tests/programs/leaker.py`` marked ``# leak: <name>``."""
    return marked_line(str(LEAKER), name)


class Leaker:
    """A running program instrumented with pgleakguard that leaks one connection per kind."""

    def __init__(self, proc: subprocess.Popen[str], info: dict[str, Any]) -> None:
        self.proc = proc
        #: The program's process id (what its tags carry).
        self.pid: int = info["pid"]
        #: kind -> backend pid: idle, in_transaction, aborted, named (call-site in app name).
        self.backends: dict[str, int] = info["backends"]

    def stop(self) -> None:
        """Let the program exit (it closes its connections)."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@contextmanager
def leaking_program(dsn: str, service: str = "billing") -> Iterator[Leaker]:
    """Start tests/programs/leaker.py against ``dsn``; stop it afterwards."""
    proc = subprocess.Popen(
        [sys.executable, str(LEAKER), dsn, service],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        _, err = proc.communicate(timeout=10)
        raise AssertionError(f"leaker did not start: {err}")
    leaker = Leaker(proc, json.loads(line))
    try:
        yield leaker
    finally:
        leaker.stop()


def cli(*args: str, input: str | None = None, env: dict[str, str] | None = None) -> Any:
    """Run ``python -m pgleakguard.cli ARGS``; the CompletedProcess (text)."""
    return subprocess.run(
        [sys.executable, "-m", "pgleakguard.cli", *args],
        capture_output=True,
        text=True,
        input=input,
        env=env,
        timeout=120,
    )


def cli_json(*args: str) -> Any:
    """Run the CLI with ``--format json``; the parsed document (fails on a non-zero exit)."""
    proc = cli(*args, "--format", "json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def with_user(dsn: str, user: str) -> str:
    """``dsn`` (a URI) connecting as ``user``, without password."""
    params = psycopg.conninfo.conninfo_to_dict(dsn)
    params["user"] = user
    params.pop("password", None)
    return psycopg.conninfo.make_conninfo(**params)


def ensure_role(dsn: str, role: str, *, monitor: bool) -> str:
    """Create login role ``role`` (member of pg_monitor or not) if needed; its DSN."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [role]).fetchone()
        if not exists:
            conn.execute(f'CREATE ROLE "{role}" LOGIN')
        if monitor:
            conn.execute(f'GRANT pg_monitor TO "{role}"')
    return with_user(dsn, role)


def service_user() -> str | None:
    """The user server processes run as when the tests run as root (PostgreSQL refuses root)."""
    if os.geteuid() != 0:
        return None
    for name in ("embedded_postgres", "postgres"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    skip_or_fail("running as root and no 'embedded_postgres' or 'postgres' user to run servers")
    return None


def _give(path: Path, user: str | None) -> None:
    if user is not None:
        entry = pwd.getpwnam(user)
        os.chown(path, entry.pw_uid, entry.pw_gid)


@contextmanager
def postgres15() -> Iterator[str]:
    """A throwaway Debian PostgreSQL 15 cluster on a Unix socket; its DSN."""
    if not (PG15_BIN / "initdb").exists():
        skip_or_fail(
            f"PostgreSQL 15 binaries not found in {PG15_BIN} (apt-get install postgresql-15)"
        )
    user = service_user()
    tmp = Path(tempfile.mkdtemp(prefix="pgleakguard-pg15-"))
    os.chmod(tmp, 0o755)
    _give(tmp, user)
    data = tmp / "data"
    run_as = {"user": user} if user else {}
    subprocess.run(
        [str(PG15_BIN / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8"],
        check=True,
        capture_output=True,
        **run_as,  # type: ignore[call-overload]
    )
    port = free_port()
    options = f"-k {tmp} -p {port} -c listen_addresses='' -c max_connections=40"
    subprocess.run(
        [
            str(PG15_BIN / "pg_ctl"),
            "-D",
            str(data),
            "-o",
            options,
            "-l",
            str(tmp / "log"),
            "-w",
            "start",
        ],
        check=True,
        capture_output=True,
        **run_as,  # type: ignore[call-overload]
    )
    try:
        yield f"postgresql://postgres@/postgres?host={tmp}&port={port}"
    finally:
        subprocess.run(
            [str(PG15_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            capture_output=True,
            **run_as,  # type: ignore[call-overload]
        )
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def pgbouncer(ini: Path, port: int) -> Iterator[None]:
    """Run the real pgbouncer binary with ``ini`` until the block ends (it must listen on
    127.0.0.1:``port``)."""
    if not Path(PGBOUNCER).exists():
        skip_or_fail("pgbouncer binary not found (apt-get install pgbouncer)")
    user = service_user()
    for path in (ini.parent, *ini.parent.iterdir()):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    args = [PGBOUNCER, *(["-u", user] if user else []), str(ini)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                out = proc.stdout.read() if proc.stdout else ""
                raise AssertionError(f"pgbouncer exited with {proc.returncode}:\n{out}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError("pgbouncer did not start listening") from None
                time.sleep(0.05)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
