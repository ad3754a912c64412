"""Mailbox leases: one poller per mailbox at a time, however many daemons share the database.

A lease is the pair (`lease_owner`, `lease_until`) on the mailbox's `MailboxState` row. It is
taken or renewed by one conditional UPDATE — free, expired, or already ours — so two daemons
can never both hold it, on SQLite or PostgreSQL. The holder renews it while it works; when
it dies, the lease runs out and the next daemon that asks takes the mailbox over. Times come
from the caller's clock: keep the hosts' clocks in sync (NTP) and the TTL well above skew.

A holder that died on this host need not be waited for: an owner names its host, process id
and (on Linux) when and where that process started, so a daemon on the same host sees that
the process is gone (or that its pid now belongs to another) and takes the lease over at
once, by a conditional UPDATE on the dead owner. The relay's outbox claims use the same test.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

from sqlalchemy import ColumnElement, or_, select, update
from sqlalchemy.exc import IntegrityError

from mailflow.db import Database
from mailflow.models import MailboxState

log = logging.getLogger(__name__)
PROC = Path("/proc")
HOST = socket.gethostname()


class Lease(NamedTuple):
    owner: str
    until: datetime


def _boot_and_namespace() -> str | None:
    """This machine's boot and pid namespace: pids are only comparable within both."""
    try:
        boot = (PROC / "sys/kernel/random/boot_id").read_text().strip().replace("-", "")[:12]
        namespace = os.readlink(PROC / "self/ns/pid").removeprefix("pid:[").removesuffix("]")
    except OSError:
        return None  # no /proc (not Linux): dead holders are known by their lease running out
    return f"{boot}-{namespace}"


_WHERE = _boot_and_namespace()


def _started(pid: int) -> str | None:
    """When the process started (clock ticks since boot), or None when it is no more (a
    zombie, killed and not yet reaped, is no more) or cannot be read."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (command) "
    return None if fields[0] in ("Z", "X") else fields[19]


def owner_of(pid: int, token: str) -> str:
    """The identity of process `pid` on this host: host:pid:token[:where.started]."""
    started = _started(pid) if _WHERE else None
    return f"{HOST}:{pid}:{token}" + (f":{_WHERE}.{started}" if started else "")


_PROCESS_OWNER = owner_of(os.getpid(), uuid.uuid4().hex[:8])


def process_owner() -> str:
    """This process's lease identity: host:pid:random[:where.started]."""
    return _PROCESS_OWNER


def gone(owner: str) -> bool:
    """True when `owner` names a process of this host (same boot, same pid namespace) that
    no longer runs: its pid is free, a zombie, or taken by a later process. Owners of other
    hosts, or written without a start time, are never judged (their leases run out)."""
    host, _, rest = owner.partition(":")
    parts = rest.split(":")
    if host != HOST or len(parts) != 3 or _WHERE is None or owner == _PROCESS_OWNER:
        return False
    pid, _token, stamp = parts
    where, _, started = stamp.rpartition(".")
    if where != _WHERE or not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return True  # our pid, not us: an earlier process that had it
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # it runs, as another user
    return _started(int(pid)) != started


def acquire(db: Database, mailbox: str, owner: str, now: datetime, ttl: timedelta) -> bool:
    """Take or renew the mailbox lease until now + ttl; False when another owner holds it
    (a holder that died on this host gives way at once)."""
    _ensure_row(db, mailbox)
    free_or_ours = or_(
        MailboxState.lease_owner.is_(None),
        MailboxState.lease_owner == owner,
        MailboxState.lease_until.is_(None),
        MailboxState.lease_until < now,
    )
    if _take(db, mailbox, free_or_ours, owner, now + ttl):
        return True
    held = lease(db, mailbox, now)
    if held is None or not gone(held.owner):
        return False
    log.warning("%s: the lease holder %s is gone; taking the mailbox over", mailbox, held.owner)
    return _take(db, mailbox, MailboxState.lease_owner == held.owner, owner, now + ttl)


def _take(
    db: Database, mailbox: str, when: ColumnElement[Any], owner: str, until: datetime
) -> bool:
    """One conditional UPDATE: the lease is ours until `until` if `when` held."""
    with db.transaction() as session:
        result = session.execute(
            update(MailboxState)
            .where(MailboxState.name == mailbox, when)
            .values(lease_owner=owner, lease_until=until)
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
    held = lease(db, mailbox, now)
    return held.owner if held is not None else None


def lease(db: Database, mailbox: str, now: datetime) -> Lease | None:
    """The mailbox's lease unless it is free or expired."""
    with db.sessions() as session:
        row = session.execute(
            select(MailboxState.lease_owner, MailboxState.lease_until).where(
                MailboxState.name == mailbox
            )
        ).first()
    if row is None:
        return None
    return current(row.lease_owner, row.lease_until, now)


def current(owner: str | None, until: datetime | None, now: datetime) -> Lease | None:
    """The lease (owner, until) unless it is free or expired at `now`."""
    if owner is None or until is None or until < now:
        return None
    return Lease(owner, until)


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
