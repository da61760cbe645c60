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
    "django.db",
    "asyncio",
    "contextlib",
    "threading",
    "greenlet",
    "wrapt",
    "opentelemetry.instrumentation",
)

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
    """``depth`` frames from the call-site outwards, most recent first, as a flat tuple.

    The call-site is the first frame, walking out from the caller, whose module is not in
    the library filter. SQLAlchemy's asyncio layer runs the pool inside a greenlet whose
    stack ends at the greenlet; the walk goes on in the parent greenlet, where the
    application's ``await`` is.
    """
    try:
        frame: FrameType | None = sys._getframe(skip + 1)
    except ValueError:  # called from a shallower stack than the hooks that usually call us
        frame = None
    known = _library_code
    glet: Any = None
    while True:
        while frame is not None:
            library = known.get(frame.f_code)
            if library is None:
                library = _is_library(frame)
            if not library:
                break
            frame = frame.f_back
        if frame is not None:
            break
        frame, glet = _parent_greenlet_frame(glet)
        if glet is None:
            break
    out: list[Any] = []
    append = out.append
    while depth:
        if frame is None:
            frame, glet = _parent_greenlet_frame(glet)
            if frame is None:
                break
        append(frame.f_code)
        append(frame.f_lasti)
        frame = frame.f_back
        depth -= 1
    return tuple(out)


def _parent_greenlet_frame(glet: Any) -> tuple[FrameType | None, Any]:
    """The suspended frame of the parent of ``glet`` (or of the current greenlet)."""
    module = sys.modules.get("greenlet")
    if module is None:
        return None, None
    if glet is None:
        glet = module.getcurrent()
    parent = glet.parent
    if parent is None:
        return None, None
    return parent.gr_frame, parent


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


_sites: dict[tuple[CodeType, int], CallSite] = {}


def callsite_of(stack: Stack) -> CallSite:
    """The call-site (first frame) of a captured stack."""
    if not stack:
        return UNKNOWN
    key = (stack[0], stack[1])
    site = _sites.get(key)
    if site is None:
        code = stack[0]
        site = CallSite(code.co_filename, line_of(code, stack[1]), code.co_name)
        if len(_sites) >= _CACHE_LIMIT:
            _sites.clear()
        _sites[key] = site
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


def frames_of(stack: Stack) -> list[dict[str, object]]:
    """Render a stack as JSON-ready frames, most recent first.

    Library frames past the call-site (event loop, thread bootstrap, ORM internals) are left
    out: they only hide the application's own path.
    """
    out: list[dict[str, object]] = []
    library = _library_files()
    for i in range(0, len(stack) - 1, 2):
        code, lasti = stack[i], stack[i + 1]
        if i and code.co_filename.startswith(library):
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


def render_frames(frames: list[dict[str, object]], indent: str = "    ") -> str:
    """Traceback-style text, outermost call first, like Python's own tracebacks."""
    lines = []
    for f in reversed(frames):
        lines.append(f'{indent}File "{f["file"]}", line {f["line"]}, in {f["function"]}')
        if f["code"]:
            lines.append(f"{indent}  {f['code']}")
    return "\n".join(lines)
