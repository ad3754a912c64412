"""Mailbox leases: one poller per mailbox at a time, however many daemons share the database.

A lease is the pair (`lease_owner`, `lease_until`) on the mailbox's `MailboxState` row. It is
taken or renewed by one conditional UPDATE — free, expired, or already ours — so two daemons
can never both hold it, on SQLite or PostgreSQL. The holder renews it while it works; when
it dies, the lease runs out and the next daemon that asks takes the mailbox over. Times come
from the caller's clock: keep the hosts' clocks in sync (NTP) and the TTL well above skew.
"""

from __future__ import annotations

import os
import socket
import uuid
from datetime import datetime, timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError

from mailflow.db import Database
from mailflow.models import MailboxState

_PROCESS_OWNER = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def process_owner() -> str:
    """This process's lease identity: host:pid:random."""
    return _PROCESS_OWNER


def acquire(db: Database, mailbox: str, owner: str, now: datetime, ttl: timedelta) -> bool:
    """Take or renew the mailbox lease until now + ttl; False when another owner holds it."""
    _ensure_row(db, mailbox)
    with db.transaction() as session:
        result = session.execute(
            update(MailboxState)
            .where(
                MailboxState.name == mailbox,
                or_(
                    MailboxState.lease_owner.is_(None),
                    MailboxState.lease_owner == owner,
                    MailboxState.lease_until.is_(None),
                    MailboxState.lease_until < now,
                ),
            )
            .values(lease_owner=owner, lease_until=now + ttl)
            .execution_options(synchronize_session=False)
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]


def release(db: Database, mailbox: str, owner: str) -> None:
    """Give the lease up at once (on shutdown), if we hold it."""
    with db.transaction() as session:
        session.execute(
            update(MailboxState)
            .where(MailboxState.name == mailbox, MailboxState.lease_owner == owner)
            .values(lease_owner=None, lease_until=None)
            .execution_options(synchronize_session=False)
        )


def holder(db: Database, mailbox: str, now: datetime) -> str | None:
    """Who holds the lease now (None when it is free or expired)."""
    with db.sessions() as session:
        row = session.execute(
            select(MailboxState.lease_owner, MailboxState.lease_until).where(
                MailboxState.name == mailbox
            )
        ).first()
    if row is None or row.lease_owner is None or row.lease_until is None:
        return None
    return row.lease_owner if row.lease_until >= now else None


def _ensure_row(db: Database, mailbox: str) -> None:
    """Create the mailbox's state row if it is missing (two daemons may race to do it)."""
    with db.sessions() as session:
        if session.get(MailboxState, mailbox) is not None:
            return
    try:
        with db.transaction() as session:
            session.add(MailboxState(name=mailbox, last_uid=0))
    except IntegrityError:
        pass  # another daemon created it meanwhile
