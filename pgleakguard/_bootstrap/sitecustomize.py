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
    ours = sys.modules.pop("sitecustomize", None)
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    try:
        importlib.import_module("sitecustomize")
    except ImportError as exc:
        if exc.name != "sitecustomize":  # the program's own one failed: as site.py would say
            raise
    finally:
        sys.path[:] = saved
        # site.py's import of us ends by moving sys.modules["sitecustomize"]: it must exist.
        if "sitecustomize" not in sys.modules and ours is not None:
            sys.modules["sitecustomize"] = ours


_bootstrap()
