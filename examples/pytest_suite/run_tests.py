"""Run this example suite with the pgleakguard pytest plugin (it is on whenever pgleakguard is
installed): ``test_export_report`` fails in teardown, naming ``orders.py`` and its line.

Run: ``pgleakguard demo examples/pytest_suite/run_tests.py`` (throwaway PostgreSQL), or
``DATABASE_URL=postgresql://... pytest examples/pytest_suite``.
"""

from __future__ import annotations

import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))

if __name__ == "__main__":
    sys.exit(pytest.main([HERE, "-p", "no:cacheprovider", *sys.argv[1:]]))
