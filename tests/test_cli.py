"""The ``pgleakguard`` command line itself: --version, help texts, and the one-line messages
for options that do not fit together."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

import pgleakguard
from pgleakguard import cli as cli_module

from server_helpers import cli


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = cli_module._parser()
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_version_prints_the_package_version() -> None:
    proc = cli("--version")
    assert (proc.returncode, proc.stdout, proc.stderr) == (
        0,
        f"pgleakguard {pgleakguard.__version__}\n",
        "",
    )


@pytest.mark.parametrize("command", ["diagnose", "recommend", "terminate", "watch", "run", "demo"])
def test_every_option_of_every_command_has_a_help_text(command: str) -> None:
    parser = _subcommands()[command]
    silent = [a.option_strings[0] for a in parser._actions if a.option_strings and not a.help]
    assert silent == []


def test_terminate_state_help_lists_every_accepted_state_and_the_default() -> None:
    parser = _subcommands()["terminate"]
    [state] = [a for a in parser._actions if "--state" in a.option_strings]
    assert state.choices is not None
    assert sorted(state.choices) == sorted(cli_module._STATE_CHOICES)
    assert state.help == (
        "one of idle, idle-in-transaction, aborted, idle-in-transaction-aborted, active, "
        "fastpath, disabled (aborted is idle-in-transaction-aborted; repeatable; default: "
        "idle, idle-in-transaction and aborted)"
    )


def test_run_options_name_their_values_and_list_what_they_accept() -> None:
    text = " ".join(cli("run", "--help").stdout.split())  # argparse wraps to the terminal
    assert "[--leak-threshold SECONDS]" in text
    assert "[--idle-in-transaction-threshold SECONDS]" in text
    assert "[--integrations NAMES]" in text and "[--log-level LEVEL]" in text
    assert "comma- separated names from psycopg, psycopg_pool, sqlalchemy, django" in text
    assert "DEBUG, INFO, WARNING (default), ERROR, CRITICAL, or a number from 1 to 100" in text


def test_diagnose_without_a_source_names_both_sources() -> None:
    proc = cli("diagnose", env={"PATH": "/usr/bin:/bin"})  # no $PGLEAKGUARD_DSN
    assert proc.returncode == 2
    assert proc.stderr == (
        "pgleakguard: error: give --dsn DSN or --snapshot FILE (or set $PGLEAKGUARD_DSN)\n"
    )
    proc = cli("watch", "--once", env={"PATH": "/usr/bin:/bin"})  # watch reads no file
    assert proc.stderr == "pgleakguard: error: give --dsn DSN (or set $PGLEAKGUARD_DSN)\n"


def test_snapshot_only_options_with_a_live_server_are_one_warning(pg_dsn: str) -> None:
    proc = cli(
        "diagnose", "--dsn", pg_dsn, "--max-connections", "7", "--server-version", "12",
        "--format", "json",
    )  # fmt: skip
    assert proc.returncode == 0
    assert proc.stderr == (
        "pgleakguard diagnose: warning: --max-connections, --server-version only apply to "
        "--snapshot (a live server says them itself); ignored\n"
    )
    server = json.loads(proc.stdout)["server"]
    assert server["max_connections"] != 7 and server["version_num"] >= 150000  # the server's


def test_snapshot_only_options_with_a_snapshot_give_no_warning(tmp_path: Path) -> None:
    snap = tmp_path / "s.csv"
    snap.write_text("pid,state,state_change\n7,idle,2024-05-01 09:00:00+00\n")
    proc = cli("diagnose", "--snapshot", str(snap), "--max-connections", "7", "--format", "json")
    assert (proc.returncode, proc.stderr) == (0, "")
    assert json.loads(proc.stdout)["server"]["max_connections"] == 7


def test_recommend_says_where_its_settings_came_from(pg_dsn: str) -> None:
    [header, *_] = cli("recommend", "--ram", "16GB").stdout.splitlines()
    assert header == (
        "pgleakguard recommend: 16 GiB of RAM, 1 application instance(s); settings: "
        "PostgreSQL defaults (no --dsn given)"
    )
    [header, *_] = cli("recommend", "--ram", "16GB", "--dsn", pg_dsn).stdout.splitlines()
    assert header.startswith("pgleakguard recommend: 16 GiB of RAM, 1 application instance(s); ")
    assert ": shared_buffers, " in header and "settings: read from " in header
