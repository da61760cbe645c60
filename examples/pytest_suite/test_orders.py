"""Two tests of orders.py: one passes, one leaks a connection (through the helper)."""

from __future__ import annotations

from typing import Any

import orders


def test_order_count(engine: Any) -> None:
    assert orders.order_count(engine) > 0


def test_export_report(engine: Any) -> None:
    assert len(orders.export_report(engine)) == 3
