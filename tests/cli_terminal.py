"""The CLI as a running process, read with deadlines: on a pipe, or on a real pseudo-terminal
of a given size (what a person at a terminal sees).

Rich draws tables and Live frames only when stdout is a terminal, and sizes them from the
terminal: a pipe never shows that path. Output is never read with a blocking call, and is
returned with the ANSI control sequences removed.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\x1b[()][A-Za-z0-9]|\x1b[=>]")


class CliProcess:
    """``python -m pgleakguard.cli ARGS``; stdout and stderr together, on a pipe or, with
    ``terminal=(columns, rows)``, on a pty of that size (stdin too)."""

    def __init__(self, *args: str, terminal: tuple[int, int] | None = None) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "NO_COLOR")}
        argv = [sys.executable, "-m", "pgleakguard.cli", *args]
        if terminal is None:
            self.proc = subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env
            )
            assert self.proc.stdout is not None
            self._fd = self.proc.stdout.fileno()
        else:
            master, slave = pty.openpty()
            columns, rows = terminal
            fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
            env["TERM"] = "xterm-256color"
            self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env)
            os.close(slave)
            self._fd = master
        self._raw = b""

    @property
    def text(self) -> str:
        """Everything printed so far, without control sequences, lines ending in \\n."""
        text = self._raw.decode("utf-8", "replace").replace("\r\n", "\n")
        return _ANSI.sub("", text)

    def _read(self, timeout: float) -> bool:
        """Read what arrives within ``timeout``; False once the output is closed."""
        ready, _, _ = select.select([self._fd], [], [], timeout)
        if not ready:
            return True
        try:
            chunk = os.read(self._fd, 65536)
        except OSError:  # a pty whose slave side is closed: EIO
            return False
        self._raw += chunk
        return bool(chunk)

    def wait_for(self, needle: str, start: int = 0, timeout: float = 30.0) -> int:
        """Read until ``needle`` appears in :attr:`text` at or after ``start``; where it is."""
        deadline = time.monotonic() + timeout
        while True:
            at = self.text.find(needle, start)
            if at >= 0:
                return at
            if time.monotonic() > deadline or not self._read(0.1):
                raise AssertionError(f"{needle!r} not seen within {timeout}s; got:\n{self.text}")

    def interrupt(self) -> None:
        """Ctrl-C."""
        self.proc.send_signal(signal.SIGINT)

    def finish(self, timeout: float = 30.0) -> int:
        """Read to the end; the exit code (killed, and the test failed, after ``timeout``)."""
        deadline = time.monotonic() + timeout
        try:
            while self._read(0.1):
                if time.monotonic() > deadline:
                    self.proc.kill()
                    self.proc.wait()
                    raise AssertionError(f"still running after {timeout}s:\n{self.text}")
            return self.proc.wait(timeout)
        finally:
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            else:
                os.close(self._fd)


def run_in_terminal(*args: str, columns: int = 80, rows: int = 24) -> tuple[int, str]:
    """Run the CLI on a ``columns`` x ``rows`` terminal to the end: (exit code, what it printed)."""
    process = CliProcess(*args, terminal=(columns, rows))
    code = process.finish()
    return code, process.text
