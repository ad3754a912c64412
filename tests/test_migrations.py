"""The database: migrations build exactly the models' schema and run twice harmlessly;
the embedded SQLite keeps what it committed."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from mailflow.db import Database
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
