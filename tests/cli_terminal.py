"""The CLI on a real pseudo-terminal of a given size: what a person at a terminal sees.

Rich draws tables and Live frames only when stdout is a terminal, and sizes them from the
terminal: a pipe never shows that path. Output is read with deadlines (never a blocking read),
and returned with the ANSI control sequences removed.
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


class Terminal:
    """``python -m pgleakguard.cli ARGS`` with stdin, stdout and stderr on a pty."""

    def __init__(self, *args: str, columns: int = 80, rows: int = 24) -> None:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "NO_COLOR")}
        env.update(TERM="xterm-256color")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pgleakguard.cli", *args],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            close_fds=True,
        )
        os.close(slave)
        self._master = master
        self._raw = b""

    @property
    def text(self) -> str:
        """Everything printed so far, without control sequences, lines ending in \\n."""
        text = self._raw.decode("utf-8", "replace").replace("\r\n", "\n")
        return _ANSI.sub("", text)

    def _read(self, timeout: float) -> bool:
        """Read what is there within ``timeout``; False once the program closed the terminal."""
        ready, _, _ = select.select([self._master], [], [], timeout)
        if not ready:
            return True
        try:
            chunk = os.read(self._master, 65536)
        except OSError:  # EIO: every copy of the slave side is closed
            return False
        self._raw += chunk
        return bool(chunk)

    def wait_for(self, needle: str, timeout: float = 30.0, start: int = 0) -> int:
        """Read until ``needle`` appears after position ``start`` of :attr:`text`; its index."""
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
        """Read to the end; the exit code (the program is killed after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._read(0.1):
            if self.proc.poll() is not None and not select.select([self._master], [], [], 0)[0]:
                break
        try:
            code = self.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"still running after {timeout}s; printed:\n{self.text}") from None
        finally:
            os.close(self._master)
        return code


def run_in_terminal(*args: str, columns: int = 80, rows: int = 24) -> tuple[int, str]:
    """Run the CLI on a ``columns`` x ``rows`` terminal to the end: (exit code, what it printed)."""
    term = Terminal(*args, columns=columns, rows=rows)
    code = term.finish()
    return code, term.text
