"""Loaded by ``pgleakguard run``: install pgleakguard from PGLEAKGUARD_* before the program runs.

The directory holding this file is put first on PYTHONPATH. After installing, the
program's own ``sitecustomize`` (if any) is still imported, so nothing is shadowed.
"""

from __future__ import annotations

import importlib
import os
import sys


def _bootstrap() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        import pgleakguard

        pgleakguard.install()
    except Exception as exc:  # a bad option must not stop the program; say why, once
        print(f"pgleakguard run: not installed: {exc}", file=sys.stderr)
    # Import the sitecustomize we shadowed, if there is one further down the path.
    del sys.modules["sitecustomize"]
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    try:
        importlib.import_module("sitecustomize")
    except ImportError:
        pass
    finally:
        sys.path[:] = saved


_bootstrap()
