"""Bad input, fuzzed: snapshot files (random bytes, truncated and mutated CSV/JSON/psql exports,
wrong types), command-line values and configuration. The only outcomes allowed are a result
or one clear line (ValueError / TypeError naming the option; exit code 2 from the CLI) —
never a traceback, never a hang."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from pgleakguard import cli
from pgleakguard.config import Config
from pgleakguard.server import ACTIVITY_COLUMNS

from conftest import skip_or_fail

NOW = "2024-05-01 10:00:00+00"
# A fixed, repeatable sample in CI; PGLEAKGUARD_FUZZ_EXAMPLES=5000 for a longer, random hunt.
_LONG_HUNT = os.environ.get("PGLEAKGUARD_FUZZ_EXAMPLES")
FUZZ = settings(
    max_examples=int(_LONG_HUNT or 150),
    derandomize=not _LONG_HUNT,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

FORMATS = ["csv", "json", "aligned", "expanded"]


@pytest.fixture(scope="module")
def exports(pg_dsn: str) -> dict[str, str]:
    """One moment of the test server, exported by real psql in each format (the seeds)."""
    psql = shutil.which("psql")
    if psql is None:
        skip_or_fail("psql not found (apt-get install postgresql-client)")
    assert psql is not None
    with psycopg.connect(pg_dsn) as idle, psycopg.connect(pg_dsn) as stuck:
        idle.execute("SELECT 'é' /*callsite='orders.py:42',pid='4123',service='billing'*/")
        idle.commit()
        stuck.execute("SELECT 2 /*callsite='orders.py:42',pid='4123',service='billing'*/")

        def run_psql(*args: str) -> str:
            argv = [psql, "-X", "-q", "-d", pg_dsn, *args]
            return subprocess.run(argv, capture_output=True, text=True, check=True).stdout

        query = "select * from pg_stat_activity where backend_type = 'client backend'"
        with tempfile.TemporaryDirectory() as tmp:
            csv_path = Path(tmp) / "a.csv"
            run_psql("-c", f"\\copy ({query}) to '{csv_path}' csv header")
            csv_text = csv_path.read_text()
        return {
            "csv": csv_text,
            "json": run_psql("-t", "-A", "-c", f"select json_agg(a) from ({query}) a"),
            "aligned": run_psql("-c", query),
            "expanded": run_psql("-x", "-c", query),
        }


@contextlib.contextmanager
def no_hang(seconds: float = 20.0) -> Iterator[None]:
    """Fail (instead of hanging the suite) if the block takes longer than ``seconds``."""

    def hung(signum: int, frame: Any) -> None:
        raise AssertionError(f"no answer within {seconds}s: a hang")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_cli(*argv: str) -> tuple[int, str, str]:
    """``pgleakguard ARGV`` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with no_hang(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(list(argv))
        except SystemExit as exc:  # argparse's usage errors
            code = exc.code if isinstance(exc.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def diagnose_file(data: bytes) -> tuple[int, str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "activity.snapshot"
        path.write_bytes(data)
        return run_cli("diagnose", "--snapshot", str(path), "--format", "json", "--now", NOW)


def assert_result_or_one_line(code: int, out: str, err: str) -> None:
    if code == 0:
        assert json.loads(out)["version"] == 1
        return
    assert code == 2, (code, err)
    # "pgleakguard: error: ..." (input), "pgleakguard diagnose: error: ..." (usage)
    assert re.match(r"pgleakguard( [a-z]+)?: error: ", err), err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_seed_exports_are_read(exports: dict[str, str], fmt: str) -> None:
    code, out, err = diagnose_file(exports[fmt].encode())
    assert code == 0, err
    document = json.loads(out)
    assert document["totals"]["sessions"] >= 3
    owners = {(o["service"], o["client_pid"], o["callsite"]) for o in document["owners"]}
    assert ("billing", 4123, "orders.py:42") in owners


@FUZZ
@given(st.binary(max_size=2000))
@example(b"")
@example(b"\xff\xfe\x00")
@example(b"pid\n1\n")
def test_random_bytes(data: bytes) -> None:
    assert_result_or_one_line(*diagnose_file(data))


@FUZZ
@given(st.sampled_from(FORMATS), st.floats(0, 1))
def test_truncated_exports(exports: dict[str, str], fmt: str, fraction: float) -> None:
    export = exports[fmt]
    cut = export[: int(len(export) * fraction)]
    assert_result_or_one_line(*diagnose_file(cut.encode()))


@FUZZ
@given(
    st.sampled_from(FORMATS),
    st.lists(st.tuples(st.floats(0, 1), st.text(max_size=5)), min_size=1, max_size=5),
)
def test_mutated_exports(exports: dict[str, str], fmt: str, edits: list[tuple[float, str]]) -> None:
    text = exports[fmt]
    for where, new in edits:
        at = int(len(text) * where)
        text = text[:at] + new + text[at + 1 :]
    assert_result_or_one_line(*diagnose_file(text.encode("utf-8", "surrogatepass")))


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=5,
)


@FUZZ
@given(
    st.lists(
        st.fixed_dictionaries(
            {"pid": JSON_VALUES},
            optional={name: JSON_VALUES for name, _ in ACTIVITY_COLUMNS if name != "pid"},
        ),
        max_size=4,
    )
)
def test_json_with_wrong_types(rows: list[dict[str, Any]]) -> None:
    data = json.dumps(rows, allow_nan=True).encode()
    assert_result_or_one_line(*diagnose_file(data))


@pytest.fixture(scope="module")
def seed_file(exports: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("seed") / "activity.csv"
    path.write_text(exports["csv"])
    return str(path)


OPTION_VALUES = st.text(max_size=12) | st.from_regex(
    r"-?[0-9]{0,400}(\.[0-9]*)?(e-?[0-9]{1,4})?\s*(ms|s|m|h|d|kb|mb|gb|tb|b|x)?", fullmatch=True
)


@FUZZ
@given(
    st.sampled_from(
        [
            "--idle-threshold",
            "--idle-in-transaction-threshold",
            "--long-query-threshold",
            "--max-connections",
            "--reserved-connections",
            "--server-version",
            "--now",
        ]
    ),
    OPTION_VALUES,
)
@example("--idle-threshold", "1e400h")
def test_diagnose_option_values(seed_file: str, option: str, value: str) -> None:
    path = seed_file
    assert_result_or_one_line(
        *run_cli("diagnose", "--snapshot", path, option, value, "--format", "json")
    )


@FUZZ
@given(
    st.sampled_from(["--ram", "--work-mem", "--shared-buffers", "--cpus", "--instances"]),
    OPTION_VALUES,
)
@example("--ram", "1e400GB")
@example("--ram", "99999999999999999999999999TB")
def test_recommend_option_values(option: str, value: str) -> None:
    argv = ["recommend", "--format", "json"]
    argv += [option, value] if option == "--ram" else ["--ram", "16GB", option, value]
    assert_result_or_one_line(*run_cli(*argv))


# -- configuration ----------------------------------------------------------------------------

OPTIONS = [f.name for f in Config.__dataclass_fields__.values()]
ANY_VALUE = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.lists(st.text(max_size=8), max_size=3)
    | st.dictionaries(st.text(max_size=4), st.integers(), max_size=2)
)


@FUZZ
@given(st.sampled_from(OPTIONS), ANY_VALUE)
@example("max_sql_length", float("inf"))  # found by a long hunt: int(inf) overflowed
@example("stack_depth", float("-inf"))
def test_config_keyword_values(name: str, value: Any) -> None:
    try:
        Config.load(environ={}, **{name: value})
    except ValueError as exc:
        message = str(exc)
        assert message.startswith(f"pgleakguard: invalid {name}="), message
        assert "expected" in message and "\n" not in message


@FUZZ
@given(st.sampled_from(OPTIONS), st.text(max_size=30))
def test_config_environment_values(name: str, value: str) -> None:
    var = f"PGLEAKGUARD_{name.upper()}"
    try:
        Config.load(environ={var: value})
    except ValueError as exc:
        message = str(exc)
        assert message.startswith(f"pgleakguard: invalid {name}="), message
        assert f"(from ${var})" in message and "\n" not in message


@FUZZ
@given(st.text(min_size=1, max_size=20).filter(lambda n: n not in OPTIONS))
def test_config_unknown_option_is_a_type_error_naming_it(name: str) -> None:
    with pytest.raises(TypeError, match="unknown option"):
        Config.load(environ={}, **{name: 1})


# -- DSNs -------------------------------------------------------------------------------------

SENTINEL = "Sentinel-pw-4c1d"
#: Where the sentinel password sits, with junk around it; every host is a socket directory that
#: does not exist, so nothing connects and nothing waits on the network.
DSN_TEMPLATES = [
    "postgresql://u:{pw}{junk}@/db?host=/nonexistent-pgl",
    "postgresql://u:{junk}{pw}@{junk2}/db?host=/nonexistent-pgl",
    "postgresql://u:{pw}@[{junk}/db",
    "postgresql://u@/db?host=/nonexistent-pgl&password={pw}{junk}",
    "postgresql://u@/db?host=/nonexistent-pgl&{junk}sslpassword={pw}",
    "host=/nonexistent-pgl password={pw}{junk}",
    "host=/nonexistent-pgl password='{pw}{junk}",
    "host=/nonexistent-pgl {junk}password = '{pw}' {junk2}",
    "{junk}postgresql://u:{pw}@/db?host=/nonexistent-pgl",
]
DSN_JUNK = st.text(alphabet="@:/?#[]%'\" \\=&,.ab01", max_size=6)


@FUZZ
@given(st.sampled_from(DSN_TEMPLATES), DSN_JUNK, DSN_JUNK)
@example(DSN_TEMPLATES[2], ":", "")  # urlsplit's "Invalid IPv6 URL" printed a traceback
@example(DSN_TEMPLATES[0], "%a0", "")  # psycopg's UnicodeDecodeError printed a traceback
@example(DSN_TEMPLATES[2], ".]", "")  # host "." failed IDNA encoding: a traceback
def test_dsn_values_never_show_the_password(template: str, junk: str, junk2: str) -> None:
    dsn = template.format(pw=SENTINEL, junk=junk, junk2=junk2)
    code, out, err = run_cli("diagnose", f"--dsn={dsn}", "--format", "json")
    assert code == 2, (code, err)
    assert err.startswith("pgleakguard: error: ") and len(err.splitlines()) == 1, err
    assert SENTINEL not in out + err


# -- literals in SQL --------------------------------------------------------------------------

_NUMBERS = st.from_regex(
    r"0[xX][0-9a-fA-F](_?[0-9a-fA-F]){0,8}|0[oO][0-7](_?[0-7]){0,8}|0[bB][01](_?[01]){0,8}"
    r"|[0-9](_?[0-9]){0,12}(\.([0-9](_?[0-9]){0,4})?)?([eE][+-]?[0-9]{1,3})?"
    r"|\.[0-9]{1,4}([eE][+-]?[0-9]{1,3})?",
    fullmatch=True,
)


@st.composite
def sql_literals(draw: Any) -> str:
    """A PostgreSQL literal holding random text, in any of its spellings."""
    form = draw(st.sampled_from(["plain", "escape", "unicode", "dollar", "tagged", "number"]))
    if form == "number":
        return str(draw(_NUMBERS))
    text = draw(st.text(max_size=30).filter(lambda t: "\0" not in t))
    if form == "plain":
        return "'" + text.replace("'", "''") + "'"
    if form == "unicode":
        return "U&'" + text.replace("'", "''") + "'"
    if form == "escape":
        return "E'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"
    tag = "$$" if form == "dollar" else "$Tag_1$"
    # A dollar-quoted body ends at the first delimiter: text that would end it early is not
    # a literal PostgreSQL would read.
    assume((text + tag).find(tag) == len(text))
    return tag + text + tag


@FUZZ
@given(sql_literals(), sql_literals(), sql_literals())
@example("'C:\\'", "'secret-token'", "1")  # a backslash escaped the quote: the token survived
@example("0xDEADBEEF", "4111_1111_1111_1111", "1.5e10")
def test_no_literal_survives_redaction(first: str, second: str, third: str) -> None:
    from pgleakguard.sqltext import redact

    query = (
        f"SELECT {first} AS a, f({second}), $1 FROM t1 WHERE c = {third}\n"
        "/*callsite='orders.py:42',service='billing'*/"
    )
    assert redact(query) == (
        "SELECT ? AS a, f(?), $1 FROM t1 WHERE c = ?\n/*callsite='orders.py:42',service='billing'*/"
    )
