"""Shared pytest fixtures."""

from __future__ import annotations

import itertools
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from ldapserver import Slapd
from servers import Dovecot, Mailbox, SmtpSink

# -- mail and directory servers (tests/servers.py, tests/ldapserver.py) -------------------

_mailbox_numbers = itertools.count(1)


@pytest.fixture(scope="session")
def dovecot() -> Iterator[Dovecot]:
    """One private Dovecot IMAP server for the whole run; fails (never skips) if missing."""
    # Not tmp_path_factory: its 0700 parent would hide the mail from uid 65534.
    root = Path(tempfile.mkdtemp(prefix="mailflow-dovecot-"))
    server = Dovecot(root)
    try:
        server.start()
    except RuntimeError as exc:
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"cannot start the test IMAP server: {exc}", pytrace=False)
    yield server
    server.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def slapd() -> Iterator[Slapd]:
    """One private OpenLDAP server for the whole run; fails (never skips) if missing."""
    root = Path(tempfile.mkdtemp(prefix="mailflow-slapd-"))
    server = Slapd(root)
    try:
        server.start()
    except RuntimeError as exc:
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"cannot start the test LDAP server: {exc}", pytrace=False)
    yield server
    server.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def mailbox(dovecot: Dovecot) -> Mailbox:
    """A fresh, empty IMAP user desk-<n>@example.test on the shared Dovecot."""
    box = Mailbox(dovecot, f"desk-{next(_mailbox_numbers)}@example.test")
    dovecot.add_user(box.address, box.password)
    return box


@pytest.fixture
def smtp() -> Iterator[SmtpSink]:
    """A started SMTP sink recording every message; stopped afterwards."""
    sink = SmtpSink()
    sink.start()
    yield sink
    sink.stop()


# -- the database: SQLite, or a fresh PostgreSQL schema per test (tests/databases.py) ---


@pytest.fixture(autouse=True, scope="session")
def _databases_left() -> Iterator[None]:
    """At the end of the run, drop the schemas of module- and session-scoped desks."""
    import databases

    yield
    databases.drop_created(reuse=False)


@pytest.fixture(autouse=True)
def _fresh_database(_databases_left: None) -> Iterator[None]:
    """Drop the PostgreSQL schemas the test's own desks used (no-op on SQLite), after ending
    the `mailflow run` processes a failed test left behind. Desks of wider-scoped fixtures,
    set up before this, keep theirs."""
    import daemons
    import databases

    wider = databases.created()
    yield
    daemons.reap()
    stuck = databases.drop_created(keep=wider)
    if stuck:
        pytest.fail(f"could not drop test schema(s) {', '.join(stuck)}", pytrace=False)


# -- desks on the test servers (tests/support.py) -----------------------------------------


@pytest.fixture
def clock():
    from support import Clock

    return Clock()


@pytest.fixture
def desk(tmp_path: Path, mailbox: Mailbox, smtp: SmtpSink):
    """A desk reading the test mailbox over IMAP and sending to the SMTP sink."""
    from support import make_desk

    made = make_desk(tmp_path, mailbox=mailbox, smtp=smtp)
    yield made
    made.close()
