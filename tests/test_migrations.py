"""The database: migrations build exactly the models' schema and run twice harmlessly;
the embedded SQLite keeps what it committed; a start killed at any moment of its schema
migration (a new database, or an upgrade) leaves a database the next start migrates."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import databases
from alembic.autogenerate import compare_metadata
from alembic.config import Config as AlembicConfig
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from support import desk_config

from mailflow.db import MIGRATIONS, Database, make_engine, migrate
from mailflow.errors import TemporaryFailure
from mailflow.models import Base


def test_migrations_match_the_models(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'm.db'}")
    with db.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        diff = compare_metadata(context, Base.metadata)
    assert diff == [], f"models and migrations differ; add a migration: {diff}"
    db.close()


def test_starting_twice_migrates_once(tmp_path):
    url = f"sqlite:///{tmp_path / 'm.db'}"
    Database(url).close()
    db = Database(url)
    tables = set(inspect(db.engine).get_table_names())
    assert {"inbound", "tickets", "events", "outbox", "thread_refs", "alembic_version"} <= tables
    with db.engine.connect() as connection:
        assert MigrationContext.configure(connection).get_current_revision() is not None
    db.close()


def test_sqlite_commits_survive_a_power_loss(tmp_path):
    """WAL with synchronous=FULL: a commit is on disk before mail is flagged or moved on the
    IMAP server and before the relay's "sent" is trusted. (NORMAL may roll the last commits
    back after an OS crash or power loss: moved mail lost, sent mail sent twice.)"""
    db = Database(f"sqlite:///{tmp_path / 'm.db'}")
    with db.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
    db.close()


# -- killed at any moment: the first start and an upgrade ---------------------------------

CRASHRUN = Path(__file__).parent / "crashrun.py"
BY_STATEMENT = 16  # kills right after a statement of the migration, spread over all of them
BY_CLOCK = 8  # kills at a random moment of the migration (inside statements and commits)
SEED = 15


def _head() -> str:
    script = ScriptDirectory.from_config(_alembic_config())
    head = script.get_current_head()
    assert head is not None
    return head


def _alembic_config() -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


@contextmanager
def _empty_databases(tmp_path: Path) -> Iterator[Callable[[str], str]]:
    """Makes a database with nothing in it per name: a SQLite file, or a PostgreSQL schema
    of its own (not one of the suite's reused, already migrated schemas)."""
    base = databases.configured()
    made: list[str] = []

    def make(name: str) -> str:
        if base is None:
            return f"sqlite:///{tmp_path / name / 'mailflow.db'}"
        schema = f"mig_{os.getpid()}_{name}"
        databases._execute(base, f'DROP SCHEMA IF EXISTS "{schema}" CASCADE',
                           f'CREATE SCHEMA "{schema}"')
        made.append(schema)
        return databases.schema_url(base, schema)

    try:
        yield make
    finally:
        for schema in made:
            databases._execute(
                base,  # type: ignore[arg-type]
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                f"WHERE application_name = '{schema}' AND pid <> pg_backend_pid()",
                f'DROP SCHEMA IF EXISTS "{schema}" CASCADE',
            )


def _at_first_revision(url: str) -> None:
    """A desk of the first release, with a mailbox and a ticket number in use."""
    engine = make_engine(url)
    try:
        migrate(engine, "0001")
        with engine.begin() as connection:
            connection.execute(text("INSERT INTO mailboxes (name, last_uid) VALUES ('INBOX', 42)"))
            connection.execute(text("INSERT INTO counters (name, value) VALUES ('incident', 7)"))
    finally:
        engine.dispose()


def _crashrun(tmp: Path, url: str, *args: str) -> subprocess.CompletedProcess:
    """`mailflow run --once` on the database, in a process of its own (tests/crashrun.py)."""
    tmp.mkdir(parents=True, exist_ok=True)
    config = desk_config(tmp, database_url=url)
    return subprocess.run(
        [sys.executable, str(CRASHRUN), "--config", str(config), *args],
        capture_output=True, text=True, timeout=120,
    )


def _statements_and_seconds(tmp: Path, url: str) -> tuple[int, float]:
    """How many statements the migration on start runs, and how long it takes."""
    run = _crashrun(tmp, url, "--measure")
    assert run.returncode == 0, run.stderr[-2000:]
    found = re.search(r"migration: (\d+) statements in ([\d.]+) s", run.stderr)
    assert found is not None, run.stderr[-2000:]
    return int(found.group(1)), float(found.group(2))


def _starts(url: str, upgraded: bool) -> str | None:
    """None when a desk on the database starts and has the whole schema (and, after an
    upgrade, what it held before); else what is wrong."""
    try:
        db = Database(url)
    except TemporaryFailure as exc:
        return str(exc)
    try:
        with db.engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            if (revision := context.get_current_revision()) != _head():
                return f"at revision {revision}"
            if diff := compare_metadata(context, Base.metadata):
                return f"schema differs from the models: {diff}"
            if upgraded:
                kept = connection.execute(text(
                    "SELECT (SELECT last_uid FROM mailboxes WHERE name = 'INBOX'),"
                    " (SELECT value FROM counters WHERE name = 'incident')"
                )).one()
                if tuple(kept) != (42, 7):
                    return f"lost what it held: {tuple(kept)}"
    finally:
        db.close()
    return None


def _kill_points(statements: int, seconds: float) -> list[list[str]]:
    """crashrun arguments: after statements spread over the whole migration, then at
    random moments of it (and a little after)."""
    step = (statements - 1) / (BY_STATEMENT - 1)
    after = sorted({1 + round(i * step) for i in range(BY_STATEMENT)})
    moments = random.Random(SEED)
    return [["--kill-at", "migrating", "--after", str(n)] for n in after] + [
        ["--within", f"{moments.uniform(0, seconds * 1.2):.4f}"] for _ in range(BY_CLOCK)
    ]


def _kill_and_restart(tmp_path: Path, upgrade: bool) -> None:
    with _empty_databases(tmp_path) as make:
        probe = make("probe")
        if upgrade:
            _at_first_revision(probe)
        statements, seconds = _statements_and_seconds(tmp_path / "probe", probe)
        broken = []
        for n, args in enumerate(_kill_points(statements, seconds)):
            url = make(f"try{n}")
            if upgrade:
                _at_first_revision(url)
            killed = _crashrun(tmp_path / f"try{n}", url, *args)
            if args[0] == "--kill-at":
                assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
            else:  # a moment after the end: the run was done
                assert killed.returncode in (-signal.SIGKILL, 0), killed.stderr[-2000:]
            if (problem := _starts(url, upgrade)) is not None:
                broken.append(f"{' '.join(args)}: {problem}")
        tries = BY_STATEMENT + BY_CLOCK
        print(f"{'upgrade' if upgrade else 'first start'} killed {tries} times "
              f"({statements} statements, {seconds:.3f} s): {len(broken)} broken")
        assert broken == [], f"{len(broken)} of {tries} kills left a desk that cannot start: " \
            + "; ".join(broken)


def test_a_first_start_killed_at_any_moment_leaves_a_desk_that_starts(tmp_path):
    _kill_and_restart(tmp_path, upgrade=False)


def test_an_upgrade_killed_at_any_moment_leaves_a_desk_that_starts(tmp_path):
    """From the first release's schema, with data, to the newest: every migration after
    0001 (table rebuilds on SQLite included) is interrupted somewhere."""
    _kill_and_restart(tmp_path, upgrade=True)
