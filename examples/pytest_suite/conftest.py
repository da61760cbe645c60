"""One engine for the whole session, on $DATABASE_URL."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import create_engine


@pytest.fixture(scope="session")
def engine() -> Iterator[Any]:
    url = os.environ["DATABASE_URL"].replace("postgresql://", "postgresql+psycopg://", 1)
    engine = create_engine(url, pool_size=2, max_overflow=0)
    yield engine
    engine.dispose()
