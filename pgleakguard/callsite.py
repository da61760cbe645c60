"""Call-site and acquisition-stack capture.

The hot path keeps a stack as one flat tuple ``(code, lasti, code, lasti, ...)``: no
strings, no line-number lookups, no frame objects (which would keep locals, and so
connections, alive). Line numbers, the library-frame filter and the text are worked out
only when a report is made.
"""

from __future__ import annotations

import dis
import linecache
import os
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from types import CodeType, FrameType
from typing import Any

#: ``(code, lasti, code, lasti, ...)``, most recent call first.
Stack = tuple[Any, ...]

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
    "greenlet",
    "wrapt",
    "opentelemetry.instrumentation",
    # The test harness: never where a test took its connection, only what ran the test.
    "_pytest",
    "pluggy",
    "pytest_asyncio",
    "xdist",
    "execnet",
)

#: The asyncio task awaiting the code this thread runs for it (asgiref's ``sync_to_async``,
#: Django's async ORM): the call-site walk continues into that task's coroutines.
AWAITING: ContextVar[Any] = ContextVar("pgleakguard_awaiting", default=None)

_prefixes: tuple[str, ...] = LIBRARY_MODULES
# id(code object) -> "is a library frame". Keyed by identity: equal code objects (the same
# function in two files compare equal) may differ in module. _codes keeps each key's code
# alive, so an id is never reused while cached. Code objects are few and long-lived.
_library_code: dict[int, bool] = {}
_codes: list[CodeType] = []
_CACHE_LIMIT = 50_000


def set_ignored_modules(extra: tuple[str, ...]) -> None:
    """Extend the library filter with the user's own module prefixes."""
    global _prefixes
    _prefixes = LIBRARY_MODULES + tuple(extra)
    _library_code.clear()
    _codes.clear()


def _is_library(frame: FrameType) -> bool:
    code = frame.f_code
    known = _library_code.get(id(code))
    if known is not None:
        return known
    module = frame.f_globals.get("__name__")
    name = module if isinstance(module, str) else ""
    result = any(name == p or name.startswith(p + ".") for p in _prefixes)
    if len(_library_code) >= _CACHE_LIMIT:
        _library_code.clear()
        _codes.clear()
    _codes.append(code)
    _library_code[id(code)] = result
    return result


def capture(depth: int, skip: int = 1, awaiting: Any = None) -> Stack:
    """``depth`` frames from the call-site outwards, most recent first, as a flat tuple.

    The call-site is the first frame, walking out from the caller, whose module is not in
    the library filter. Where the thread's own frames end, the walk goes on in the code this
    thread runs for: the parent greenlet (SQLAlchemy's asyncio layer runs the pool inside a
    greenlet) and the asyncio task awaiting it (``awaiting``, else :data:`AWAITING`, set for
    Django's ``sync_to_async``). Library frames past the call-site are kept here and left
    out when a report is rendered.
    """
    try:
        frame: FrameType | None = sys._getframe(skip + 1)
    except ValueError:  # called from a shallower stack than the hooks that usually call us
        frame = None
    known = _library_code
    beyond: Iterator[FrameType] | None = None
    if awaiting is not None:
        beyond = _then_awaiting(frame, awaiting)
        frame = next(beyond, None)
    while True:  # to the call-site
        if frame is None:
            if beyond is None:
                beyond = _beyond_thread(awaiting)
            frame = next(beyond, None)
            if frame is None:
                break
        library = known.get(id(frame.f_code))
        if library is None:
            library = _is_library(frame)
        if not library:
            break
        frame = frame.f_back if beyond is None else next(beyond, None)
        if frame is None and beyond is not None:
            break
    out: list[Any] = []
    append = out.append
    while depth and frame is not None:
        append(frame.f_code)
        append(frame.f_lasti)
        depth -= 1
        if beyond is None:
            frame = frame.f_back
            if frame is None:
                beyond = _beyond_thread(awaiting)
                frame = next(beyond, None)
        else:
            frame = next(beyond, None)
    return tuple(out)


def _beyond_thread(awaiting: Any = None) -> Iterator[FrameType]:
    """Frames, outwards, of the code the current thread runs on behalf of: suspended parent
    greenlets, then the coroutines of the task ``awaiting`` (else the one in
    :data:`AWAITING`)."""
    module = sys.modules.get("greenlet")
    if module is not None:
        glet = module.getcurrent().parent
        while glet is not None:
            frame = glet.gr_frame
            while frame is not None:
                yield frame
                frame = frame.f_back
            glet = glet.parent
    task = AWAITING.get() if awaiting is None else awaiting
    if task is not None and not task.done():
        yield from reversed(task_frames(task))


def _then_awaiting(frame: FrameType | None, awaiting: Any) -> Iterator[FrameType]:
    """Frames, outwards, of the current task's coroutines, then of ``awaiting``'s: the
    current task runs for ``awaiting`` (``asyncio.wait_for`` before Python 3.12), and the
    event loop's frames below its coroutines say nothing."""
    task = sys.modules["asyncio"].current_task()
    top = getattr(task.get_coro(), "cr_frame", None) if task is not None else None
    own: list[FrameType] = []
    while frame is not None:
        own.append(frame)
        if frame is top:
            yield from own
            break
        frame = frame.f_back
    # Not found: the frames skipped as ours were all the task ran (wait_for(pool.getconn())).
    yield from reversed(task_frames(awaiting))


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


# (id(code), lasti) -> (code, call-site); the code is checked by identity (see _library_code).
_sites: dict[tuple[int, int], tuple[CodeType, CallSite]] = {}


def callsite_of(stack: Stack) -> CallSite:
    """The call-site (first frame) of a captured stack."""
    if not stack:
        return UNKNOWN
    code = stack[0]
    key = (id(code), stack[1])
    cached = _sites.get(key)
    if cached is not None and cached[0] is code:
        return cached[1]
    site = CallSite(code.co_filename, line_of(code, stack[1]), code.co_name)
    if len(_sites) >= _CACHE_LIMIT:
        _sites.clear()
    _sites[key] = (code, site)
    return site


def line_of(code: CodeType, lasti: int) -> int:
    """The line number of bytecode offset ``lasti`` in ``code`` (what ``f_lineno`` says)."""
    if hasattr(code, "co_lines"):  # Python 3.10+
        for start, end, line in code.co_lines():
            if start <= lasti < end:
                return line if line is not None else code.co_firstlineno
        return code.co_firstlineno
    line = code.co_firstlineno
    for offset, number in dis.findlinestarts(code):
        if offset > lasti:
            break
        line = number
    return line


def frames_of(stack: Stack, app_only: bool = True) -> list[dict[str, object]]:
    """Render a stack as JSON-ready frames, most recent first.

    With ``app_only``, library frames past the first (event loop, thread bootstrap, ORM
    internals) are left out: in an acquisition stack they only hide the application's path.
    """
    out: list[dict[str, object]] = []
    library = _library_files() if app_only else ()
    for i in range(0, len(stack) - 1, 2):
        code, lasti = stack[i], stack[i + 1]
        if i and library and code.co_filename.startswith(library):
            continue
        line = line_of(code, lasti)
        source = linecache.getline(code.co_filename, line).strip()
        out.append(
            {"file": code.co_filename, "line": line, "function": code.co_name, "code": source}
        )
    return out


def _library_files() -> tuple[str, ...]:
    """File-name prefixes of the library modules that are imported now."""
    prefixes: list[str] = []
    for name in _prefixes:
        module = sys.modules.get(name)
        if module is None:
            continue
        paths = list(getattr(module, "__path__", []) or [])
        if paths:
            prefixes.extend(os.path.join(p, "") for p in paths)
        elif getattr(module, "__file__", None):
            prefixes.append(str(module.__file__))
    return tuple(prefixes)


def frames_from_live(frame: FrameType | None, depth: int) -> Stack:
    """A live frame chain (a holder's current stack) in the captured-stack form."""
    out: list[Any] = []
    while frame is not None and depth:
        out.append(frame.f_code)
        out.append(frame.f_lasti)
        frame = frame.f_back
        depth -= 1
    return tuple(out)


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
