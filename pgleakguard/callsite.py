"""Call-site and acquisition-stack capture.

The hot path keeps frames as ``(code, lineno)`` tuples: no strings, no frame objects (which
would keep locals, and so connections, alive). Rendering happens only for reports.
"""

from __future__ import annotations

import linecache
import os
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from types import CodeType, FrameType
from typing import Any

Frame = tuple[CodeType, int]
Stack = tuple[Frame, ...]

#: Modules whose frames are never the call-site: ours and the libraries we hook.
LIBRARY_MODULES: tuple[str, ...] = (
    "pgleakguard",
    "psycopg",
    "psycopg_pool",
    "sqlalchemy",
    "django",
    "asgiref",
    "asyncio",
    "concurrent.futures",
    "contextlib",
    "threading",
)

#: The asyncio task awaiting the code this thread runs for it (asgiref's ``sync_to_async``,
#: Django's async ORM): the call-site walk continues into that task's coroutines.
AWAITING: ContextVar[Any] = ContextVar("pgleakguard_awaiting", default=None)

_prefixes: tuple[str, ...] = LIBRARY_MODULES
# code object -> "is a library frame"; code objects are few and long-lived.
_library_code: dict[CodeType, bool] = {}
_CACHE_LIMIT = 50_000


def set_ignored_modules(extra: tuple[str, ...]) -> None:
    """Extend the library filter with the user's own module prefixes."""
    global _prefixes
    _prefixes = LIBRARY_MODULES + tuple(extra)
    _library_code.clear()


def _is_library(frame: FrameType) -> bool:
    code = frame.f_code
    known = _library_code.get(code)
    if known is not None:
        return known
    module = frame.f_globals.get("__name__")
    name = module if isinstance(module, str) else ""
    result = any(name == p or name.startswith(p + ".") for p in _prefixes)
    if len(_library_code) >= _CACHE_LIMIT:
        _library_code.clear()
    _library_code[code] = result
    return result


def capture(depth: int, skip: int = 1) -> Stack:
    """Application frames from the call-site outwards (most recent first), at most ``depth``.

    The call-site is the first frame, walking out from the caller, whose module is not in
    the library filter. Library frames (event loop, thread bootstrap, ORM internals) only
    hide the application's own path, so only the application's frames are kept. Where the
    thread's own frames end, the walk goes on in the code this thread runs for: the parent
    greenlet (SQLAlchemy's asyncio layer runs the pool inside a greenlet) and the asyncio
    task awaiting it (:data:`AWAITING`).
    """
    out: list[Frame] = []
    append = out.append
    is_library = _is_library
    frame: FrameType | None = sys._getframe(skip + 1)
    while frame is not None:
        if not is_library(frame):
            append((frame.f_code, frame.f_lineno))
            if len(out) >= depth:
                return tuple(out)
        frame = frame.f_back
    for frame in _beyond_thread():
        if not is_library(frame):
            append((frame.f_code, frame.f_lineno))
            if len(out) >= depth:
                break
    return tuple(out)


def _beyond_thread() -> Iterator[FrameType]:
    """Frames, outwards, of the code the current thread runs on behalf of: suspended parent
    greenlets, then the coroutines of the task in :data:`AWAITING`."""
    module = sys.modules.get("greenlet")
    if module is not None:
        glet = module.getcurrent().parent
        while glet is not None:
            frame = glet.gr_frame
            while frame is not None:
                yield frame
                frame = frame.f_back
            glet = glet.parent
    task = AWAITING.get()
    if task is not None and not task.done():
        yield from reversed(task_frames(task))


def task_frames(task: Any) -> list[FrameType]:
    """The frames of a pending asyncio task's coroutine chain, outermost first."""
    frames: list[FrameType] = []
    coro: Any = task.get_coro()
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is None:
            break
        frames.append(frame)
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return frames


@dataclass(frozen=True)
class CallSite:
    """Where application code took a connection: ``file:line in function``."""

    file: str
    line: int
    function: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line} in {self.function}"

    @property
    def short(self) -> str:
        """``basename:line``, the form used in tags."""
        return f"{os.path.basename(self.file)}:{self.line}"


UNKNOWN = CallSite("<unknown>", 0, "<unknown>")


def callsite_of(stack: Stack) -> CallSite:
    """The call-site (first frame) of a captured stack."""
    if not stack:
        return UNKNOWN
    code, line = stack[0]
    return CallSite(code.co_filename, line, code.co_name)


def frames_of(stack: Stack | list[Frame]) -> list[dict[str, object]]:
    """Render a stack as JSON-ready frames, most recent first."""
    out: list[dict[str, object]] = []
    for code, line in stack:
        source = linecache.getline(code.co_filename, line).strip()
        out.append(
            {"file": code.co_filename, "line": line, "function": code.co_name, "code": source}
        )
    return out


def frames_from_live(frame: FrameType | None, depth: int) -> list[Frame]:
    """``(code, lineno)`` pairs of a live frame chain (a holder's current stack)."""
    out: list[Frame] = []
    while frame is not None and len(out) < depth:
        out.append((frame.f_code, frame.f_lineno))
        frame = frame.f_back
    return out


def outside_pgleakguard(frame: FrameType | None) -> FrameType | None:
    """The first frame, walking out from ``frame``, that is not pgleakguard's own."""
    while frame is not None:
        name = frame.f_globals.get("__name__")
        if not (
            isinstance(name, str) and (name == "pgleakguard" or name.startswith("pgleakguard."))
        ):
            break
        frame = frame.f_back
    return frame


def render_frames(frames: list[dict[str, object]], indent: str = "    ") -> str:
    """Traceback-style text, outermost call first, like Python's own tracebacks."""
    lines = []
    for f in reversed(frames):
        lines.append(f'{indent}File "{f["file"]}", line {f["line"]}, in {f["function"]}')
        if f["code"]:
            lines.append(f"{indent}  {f['code']}")
    return "\n".join(lines)
