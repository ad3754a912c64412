"""Intake: fetch new mail from the sources and store it raw, before anything else.

The database records what was consumed: for IMAP the last UID stored per mailbox (and its
UIDVALIDITY); the server-side flag or move happens only after the commit. A crash between
the two re-fetches the same UIDs, which `store()` recognises, so nothing is taken twice.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from datetime import datetime
from itertools import islice

from mailflow.desk import Desk
from mailflow.fetch import Fetched, ImapSettings, ImapSource, MaildirSource
from mailflow.models import MailboxState
from mailflow.pipeline import message_id_of, store

log = logging.getLogger(__name__)


def imap_source(desk: Desk) -> ImapSource | None:
    cfg = desk.settings.imap
    if not cfg.enabled:
        return None
    return ImapSource(
        ImapSettings(
            host=cfg.host,
            port=cfg.port,
            security=cfg.security,
            username=cfg.username,
            password=cfg.password,
            folder=cfg.folder,
            timeout=cfg.timeout,
            batch_size=cfg.batch_size,
            verify_tls=cfg.verify_tls,
            ca_file=cfg.ca_file,
            done_flag=cfg.done_flag,
            move_to=cfg.move_to,
        )
    )


def _store_batch(desk: Desk, mailbox: str, batch: list[Fetched], now: datetime) -> None:
    with desk.db.transaction() as session:
        state = session.get(MailboxState, mailbox)
        for fetched in batch:
            store(session, mailbox, fetched.key, fetched.uid, fetched.raw, now)
        if state is not None and batch and batch[-1].uid is not None:
            state.last_uid = max(state.last_uid, max(f.uid or 0 for f in batch))
            state.last_poll_at = now


def poll_imap(desk: Desk, source: ImapSource, clock: Callable[[], datetime]) -> int:
    """Store every message after the last stored UID; returns how many were fetched."""
    uidvalidity = source.connect()
    mailbox = source.name
    with desk.db.transaction() as session:
        state = session.get(MailboxState, mailbox)
        if state is None:
            state = MailboxState(name=mailbox, uidvalidity=uidvalidity, last_uid=0)
            session.add(state)
        elif state.uidvalidity != uidvalidity:
            # The server renumbered the folder: read it again; Message-IDs stop duplicates.
            log.warning("%s: UIDVALIDITY changed %s → %s", mailbox, state.uidvalidity, uidvalidity)
            state.uidvalidity, state.last_uid = uidvalidity, 0
        last_uid = state.last_uid
    uids = source.uids_after(last_uid)
    fetched = source.fetch(uids)
    count = 0
    while batch := list(islice(fetched, desk.settings.imap.batch_size)):
        _store_batch(desk, mailbox, batch, clock())
        source.mark_done([f.uid for f in batch if f.uid is not None])
        count += len(batch)
    with desk.db.transaction() as session:
        state = session.get(MailboxState, mailbox)
        if state is not None:
            state.last_poll_at, state.last_error = clock(), None
    return count


def poll_maildir(desk: Desk, source: MaildirSource, clock: Callable[[], datetime]) -> int:
    """Store every message in new/, then move it to cur/."""
    count = 0
    pending = source.pending()
    while batch := list(islice(pending, 200)):
        now = clock()
        _store_batch(desk, source.name, batch, now)
        for fetched in batch:
            source.mark_done(fetched)
        count += len(batch)
    with desk.db.transaction() as session:
        state = session.get(MailboxState, source.name) or MailboxState(name=source.name)
        state.last_poll_at = clock()
        session.merge(state)
    return count


def ingest_bytes(desk: Desk, raw: bytes, now: datetime, origin: str = "ingest") -> int | None:
    """Store one message handed in directly (`mailflow ingest`); returns its inbound id."""
    key = f"{origin}:{message_id_of(raw)}:{hashlib.sha256(raw).hexdigest()[:16]}"
    with desk.db.transaction() as session:
        row = store(session, origin, key, None, raw, now)
        return row.id if row is not None else None
