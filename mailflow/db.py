"""Engine, sessions and schema migrations.

SQLite is the embedded default (WAL, busy timeout, foreign keys); PostgreSQL works through
the same code. `open_database(url)` migrates the schema to the newest revision on start.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event, make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from mailflow.errors import TemporaryFailure

MIGRATIONS = Path(__file__).parent / "migrations"


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    # FULL: a commit is on disk before the mail is flagged or moved on the IMAP server and
    # before a sent mail counts as sent. NORMAL may lose the last commits to an OS crash or
    # power loss (moved mail gone, mail sent twice). The price is an fsync per commit: none
    # measurable in processing (a commit per batch), 14% off the relay's rate in a backlog
    # (two commits per mail; docs/operations.md).
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def make_engine(url: str) -> Engine:
    """An engine for the URL; SQLite parent directories are created."""
    if url.startswith("sqlite:///") and ":memory:" not in url:
        Path(url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, pool_pre_ping=not url.startswith("sqlite"))
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    if engine.dialect.name == "postgresql":
        event.listen(engine, "before_cursor_execute", _no_nul_characters, retval=True)
    return engine


def migrate(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to `revision` (the newest by default): idempotent, safe on every
    start, and all or nothing — one transaction for every migration it applies, so a
    process killed at any moment leaves the schema as it found it, and the next start
    does the whole upgrade again."""
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if _is_at(engine, cfg, revision):
        return  # the usual start: no write lock taken, no waiting for a busy database
    with _migration_transaction(engine) as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, revision)  # checks again, now under the lock


def _is_at(engine: Engine, cfg: AlembicConfig, revision: str) -> bool:
    """Whether the database's recorded revision is already `revision`."""
    scripts = ScriptDirectory.from_config(cfg).get_revisions(revision)
    wanted = {script.revision for script in scripts if script is not None}
    with engine.connect() as connection:
        return set(MigrationContext.configure(connection).get_current_heads()) == wanted


@contextmanager
def _migration_transaction(engine: Engine) -> Iterator[Connection]:
    """A connection inside one real transaction that DDL cannot escape."""
    if engine.dialect.name == "sqlite":
        with _sqlite_transaction(engine) as connection:
            yield connection
        return
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":  # DDL is transactional there
            # Several daemons may start at once: one migrates, the others wait.
            connection.exec_driver_sql("SELECT pg_advisory_xact_lock(727001)")
        yield connection


@contextmanager
def _sqlite_transaction(engine: Engine) -> Iterator[Connection]:
    """pysqlite opens a transaction only before INSERT/UPDATE/DELETE: each CREATE TABLE of a
    new database committed on its own, and a start killed half-way left tables with no
    recorded revision, which no later start got past. With its implicit handling off the
    driver leaves BEGIN to us; IMMEDIATE also takes the write lock at once, so of several
    daemons starting together one migrates while the others wait."""
    with engine.connect() as connection:
        raw = connection.connection.dbapi_connection
        assert raw is not None
        implicit = raw.isolation_level
        raw.isolation_level = None
        try:
            connection.exec_driver_sql("BEGIN IMMEDIATE")
            try:
                yield connection
            except BaseException:
                connection.rollback()
                raise
            connection.commit()
        finally:
            raw.isolation_level = implicit


def _no_nul(value: Any) -> Any:
    return value.replace("\x00", "\ufffd") if isinstance(value, str) else value


def _no_nul_characters(
    _conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool
) -> tuple[str, Any]:
    """PostgreSQL text cannot hold NUL (SQLite can): a mail carrying one (broken mailers,
    hostile mail) is stored and looked up with U+FFFD instead of failing."""
    if isinstance(parameters, dict):
        if any(isinstance(v, str) and "\x00" in v for v in parameters.values()):
            parameters = {k: _no_nul(v) for k, v in parameters.items()}
    elif isinstance(parameters, list | tuple) and parameters and isinstance(parameters[0], dict):
        parameters = [{k: _no_nul(v) for k, v in row.items()} for row in parameters]
    return statement, parameters


class Database:
    """The engine plus a session factory; one per process."""

    def __init__(self, url: str, *, migrate_schema: bool = True) -> None:
        self.url = url
        try:
            self.engine = make_engine(url)
            if migrate_schema:
                migrate(self.engine)
        except (OperationalError, OSError) as exc:
            shown = make_url(url).render_as_string(hide_password=True)
            raise TemporaryFailure(f"database {shown} unavailable: {exc}") from exc
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def is_postgres(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session whose work commits at the end of the block, or rolls back on error."""
        with self.sessions() as session, session.begin():
            yield session

    def close(self) -> None:
        self.engine.dispose()
