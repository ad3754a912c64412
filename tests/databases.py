"""The database each test's desk uses: SQLite by default, PostgreSQL when asked.

Set MAILFLOW_TEST_DATABASE to a PostgreSQL URL (e.g.
``postgresql+psycopg://postgres@127.0.0.1:5432/test``) and every desk built by
``support.desk_config`` gets a schema of that database to itself: one per test directory,
taken on first use and given back when the test that took it ends — or, for a module- or
session-scoped fixture's desk, at the end of the run (conftest.py). A schema given back is
emptied (every table truncated, identities restarted) and handed to a later test, which
saves creating and migrating one per test; a schema that cannot be emptied is dropped. The
schema is selected with the connection's ``search_path`` and named in ``application_name``
too, so leftover connections — a daemon subprocess, a desk a test did not close — can be
found and ended first. Without the variable, a desk's database is ``tmp/mailflow.db``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

ENV = "MAILFLOW_TEST_DATABASE"
_taken: dict[str, str] = {}  # test directory → its schema
_free: list[str] = []  # emptied schemas, ready for another test


def configured() -> str | None:
    """The PostgreSQL URL the suite runs on, or None for SQLite."""
    url = os.environ.get(ENV, "").strip()
    return url or None


def url_for(tmp: Path) -> str:
    """The database URL for a desk whose files live in `tmp`."""
    base = configured()
    if base is None:
        return f"sqlite:///{tmp / 'mailflow.db'}"
    key = str(Path(tmp).resolve())
    if key not in _taken:
        if _free:
            _taken[key] = _free.pop()
        else:
            schema = f"t_{os.getpid()}_" + hashlib.sha1(key.encode()).hexdigest()[:16]
            _execute(base, f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
            _taken[key] = schema
    return schema_url(base, _taken[key])


def schema_url(base: str, schema: str) -> str:
    """`base` with the connection's search_path (and application_name) set to `schema`."""
    from sqlalchemy.engine import make_url

    url = make_url(base).update_query_dict(
        {"options": f"-csearch_path={schema}", "application_name": schema}
    )
    return url.render_as_string(hide_password=False)


def created() -> set[str]:
    """The schemas taken so far and not given back."""
    return set(_taken.values())


def drop_created(keep: set[str] | frozenset[str] = frozenset(), *, reuse: bool = True) -> list[str]:
    """Give back the schemas taken, but those in `keep`: emptied for reuse (or dropped, and
    at the end of the run all are); returns the names of those that could not be."""
    base = configured()
    if base is None:
        return []
    stuck = []
    for key, schema in sorted(_taken.items()):
        if schema in keep:
            continue
        del _taken[key]
        ending = (
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            f"WHERE application_name = '{schema}' AND pid <> pg_backend_pid()"
        )
        try:
            if reuse and _empty(base, ending, schema):
                _free.append(schema)
                continue
            _execute(
                base,
                ending,
                f"SET lock_timeout = '10s'; DROP SCHEMA IF EXISTS \"{schema}\" CASCADE",
            )
        except Exception:  # noqa: BLE001 — reported by the caller, never hides a test result
            stuck.append(schema)
    if not reuse:
        for schema in _free:
            _execute(base, f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        _free.clear()
    return stuck


def _empty(base: str, ending: str, schema: str) -> bool:
    """Truncate every table of a migrated schema but the migration record (identities
    restarted); False when it was never migrated or cannot be emptied (then it is dropped)."""
    import psycopg

    tables = [
        name
        for (name,) in _query(
            base, f"SELECT tablename FROM pg_tables WHERE schemaname = '{schema}'"
        )
    ]
    if "alembic_version" not in tables:
        return False
    tables.remove("alembic_version")
    listed = ", ".join(f'"{schema}"."{t}"' for t in tables)
    try:
        _execute(
            base,
            ending,
            f"SET lock_timeout = '10s'; TRUNCATE {listed} RESTART IDENTITY CASCADE",
        )
    except psycopg.Error:
        return False
    return True


def _connect(base: str):  # noqa: ANN202 — psycopg is imported lazily
    import psycopg
    from sqlalchemy.engine import make_url

    url = make_url(base)
    return psycopg.connect(
        host=url.host or "127.0.0.1",
        port=url.port or 5432,
        user=url.username,
        password=url.password,
        dbname=url.database,
        autocommit=True,
        connect_timeout=10,
    )


def _query(base: str, statement: str) -> list[tuple]:
    with _connect(base) as connection:
        return connection.execute(statement).fetchall()  # type: ignore[arg-type]


def _execute(base: str, *statements: str) -> None:
    with _connect(base) as connection:
        for statement in statements:
            connection.execute(statement)  # type: ignore[arg-type]
