"""The database each test's desk uses: SQLite by default, PostgreSQL when asked.

Set MAILFLOW_TEST_DATABASE to a PostgreSQL URL (e.g.
``postgresql+psycopg://postgres@127.0.0.1:5432/test``) and every desk built by
``support.desk_config`` gets a fresh schema of that database: one per test directory,
created on first use and dropped when the test that made it ends — or, for a module- or
session-scoped fixture's desk, at the end of the run (conftest.py). The schema is selected with
the connection's ``search_path`` and named in ``application_name`` too, so leftover
connections — a daemon subprocess, a desk a test did not close — can be found and ended
before the drop. Without the variable, a desk's database is ``tmp/mailflow.db``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

ENV = "MAILFLOW_TEST_DATABASE"
_created: set[str] = set()


def configured() -> str | None:
    """The PostgreSQL URL the suite runs on, or None for SQLite."""
    url = os.environ.get(ENV, "").strip()
    return url or None


def url_for(tmp: Path) -> str:
    """The database URL for a desk whose files live in `tmp`."""
    base = configured()
    if base is None:
        return f"sqlite:///{tmp / 'mailflow.db'}"
    schema = "t_" + hashlib.sha1(str(Path(tmp).resolve()).encode()).hexdigest()[:20]
    if schema not in _created:
        _execute(base, f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        _created.add(schema)
    return schema_url(base, schema)


def schema_url(base: str, schema: str) -> str:
    """`base` with the connection's search_path (and application_name) set to `schema`."""
    from sqlalchemy.engine import make_url

    url = make_url(base).update_query_dict(
        {"options": f"-csearch_path={schema}", "application_name": schema}
    )
    return url.render_as_string(hide_password=False)


def created() -> set[str]:
    """The schemas made so far and not dropped."""
    return set(_created)


def drop_created(keep: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """Drop the schemas made and not dropped yet, but those in `keep`; returns the names of
    those that could not be dropped."""
    base = configured()
    if base is None or not _created - keep:
        return []
    stuck = []
    for schema in sorted(_created - keep):
        try:
            _execute(
                base,
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                f"WHERE application_name = '{schema}' AND pid <> pg_backend_pid()",
                f"SET lock_timeout = '10s'; DROP SCHEMA IF EXISTS \"{schema}\" CASCADE",
            )
        except Exception:  # noqa: BLE001 — reported by the caller, never hides a test result
            stuck.append(schema)
        _created.discard(schema)
    return stuck


def _execute(base: str, *statements: str) -> None:
    import psycopg
    from sqlalchemy.engine import make_url

    url = make_url(base)
    with psycopg.connect(
        host=url.host or "127.0.0.1",
        port=url.port or 5432,
        user=url.username,
        password=url.password,
        dbname=url.database,
        autocommit=True,
        connect_timeout=10,
    ) as connection:
        for statement in statements:
            connection.execute(statement)  # type: ignore[arg-type]
