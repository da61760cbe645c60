"""The Django integration's tests: pytest-django against the real PostgreSQL of ``pg_dsn``."""
