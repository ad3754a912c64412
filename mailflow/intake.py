"""Intake: fetch new mail from the sources and store it raw, before anything else.

The database records what was consumed: for IMAP the last UID stored per mailbox (and its
UIDVALIDITY); the server-side flag or move happens only after the commit. A crash between
the two re-fetches the same UIDs, which `store()` recognises, so nothing is taken twice.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path

from mailflow import leases, logs
from mailflow.config import ImapConfig
from mailflow.desk import Desk
from mailflow.fetch import (
    FETCH_BYTES,
    Fetched,
    ImapSettings,
    ImapSource,
    MaildirSource,
    TokenSource,
)
from mailflow.mailboxes import mailbox_config
from mailflow.models import MailboxState
from mailflow.pipeline import message_id_of, store

log = logging.getLogger(__name__)

MAILDIR_BATCH = 200  # messages per transaction from a Maildir (and FETCH_BYTES at most)


def imap_source(desk: Desk) -> ImapSource | None:
    """The [imap] mailbox (the first one), or None when there is none."""
    sources = imap_sources(desk)
    return sources[0] if sources else None


def imap_mailboxes(desk: Desk) -> list[ImapConfig]:
    """Every configured IMAP mailbox: [imap], then each [[mailboxes]] entry."""
    if desk.settings.mailboxes:
        return list(desk.settings.mailboxes)
    return [desk.settings.imap] if desk.settings.imap.enabled else []


def imap_sources(desk: Desk) -> list[ImapSource]:
    """One source per configured mailbox, in imap_mailboxes() order."""
    return [source_for(cfg) for cfg in imap_mailboxes(desk)]


def source_for(cfg: ImapConfig) -> ImapSource:
    token = None
    if cfg.auth == "xoauth2":
        token = TokenSource(
            command=cfg.oauth2_token_command or None,
            file=Path(cfg.oauth2_token_file) if cfg.oauth2_token_file else None,
            margin=cfg.oauth2_refresh_margin,
        )
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
            auth=cfg.auth,
            token=token,
            client_id=cfg.client_id,
        )
    )


def _store_batch(
    desk: Desk, mailbox: str, batch: list[Fetched], now: datetime, below: int | None = None
) -> None:
    """Store a fetched batch and move the mailbox's progress past it, but not up to UID
    `below` (a message the server would not deliver: it is asked for again next time)."""
    with desk.db.transaction() as session:
        state = session.get(MailboxState, mailbox)
        for fetched in batch:
            with logs.context(msg_id=message_id_of(fetched.raw)):
                row = store(session, mailbox, fetched.key, fetched.uid, fetched.raw, now)
                log.debug("stored %s as %s", fetched.key, f"#{row}" if row else "a repeat")
        if state is not None and batch and batch[-1].uid is not None:
            done = max(f.uid or 0 for f in batch)
            if below is not None:
                done = min(done, below - 1)
            state.last_uid = max(state.last_uid, done)
            state.last_poll_at = now


def _batches(items: Iterator[Fetched], count: int, size: int) -> Iterator[list[Fetched]]:
    """Lists of at most `count` messages and `size` bytes (a bigger message alone)."""
    batch: list[Fetched] = []
    held = 0
    for item in items:
        if batch and (len(batch) >= count or held + len(item.raw) > size):
            yield batch
            batch, held = [], 0
        batch.append(item)
        held += len(item.raw)
    if batch:
        yield batch


def lease_ttl(desk: Desk, source: ImapSource) -> timedelta:
    cfg = mailbox_config(desk, source.name)
    return timedelta(seconds=cfg.lease_ttl if cfg else 60.0)


def poll_imap(
    desk: Desk, source: ImapSource, clock: Callable[[], datetime], owner: str | None = None
) -> int:
    """Store every message after the last stored UID; returns how many were fetched.

    Takes (or renews) the mailbox lease first: when another daemon holds it, nothing is
    fetched. An open connection is reused (the IDLE loop keeps one); else one is opened.
    """
    mailbox = source.name
    owner = owner or leases.process_owner()
    if not leases.acquire(desk.db, mailbox, owner, clock(), lease_ttl(desk, source)):
        log.debug("%s: polled by %s; skipped", mailbox, leases.holder(desk.db, mailbox, clock()))
        source.close()
        return 0
    uidvalidity = source.uidvalidity if source.connected else source.connect()
    assert uidvalidity is not None
    with desk.db.transaction() as session:
        state = session.get(MailboxState, mailbox)
        if state is None:
            state = MailboxState(name=mailbox, uidvalidity=uidvalidity, last_uid=0)
            session.add(state)
        elif state.uidvalidity is None:
            state.uidvalidity = uidvalidity
        elif state.uidvalidity != uidvalidity:
            # The server renumbered the folder: read it again; Message-IDs stop duplicates.
            log.warning("%s: UIDVALIDITY changed %s → %s", mailbox, state.uidvalidity, uidvalidity)
            state.uidvalidity, state.last_uid = uidvalidity, 0
        last_uid = state.last_uid
    # Stored by a run that died before flagging them: flag (or move) them now.
    source.mark_done(source.unmarked_upto(last_uid))
    uids = source.uids_after(last_uid)
    count = 0
    for batch in source.fetch_batches(uids):  # bounded by count and bytes
        below = min(source.unreadable, default=None)
        _store_batch(desk, mailbox, batch, clock(), below)
        source.mark_done([f.uid for f in batch if f.uid is not None])
        count += len(batch)
    error = None
    if source.unreadable:  # the rest went on; these stay on the server, asked for again
        error = "; ".join(
            f"the server would not deliver UID {uid} ({why}): it stays in the mailbox and "
            "is asked for again at each poll" for uid, why in sorted(source.unreadable.items())
        )[:2000]
        log.error("%s: %s", mailbox, error)
    with desk.db.transaction() as session:
        state = session.get(MailboxState, mailbox)
        if state is not None:
            state.last_poll_at, state.last_error = clock(), error
    return count


def poll_maildir(desk: Desk, source: MaildirSource, clock: Callable[[], datetime]) -> int:
    """Store every message in new/, then move it to cur/."""
    count = 0
    for batch in _batches(source.pending(), MAILDIR_BATCH, FETCH_BYTES):
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


def ingest_key(raw: bytes, origin: str = "ingest") -> str:
    """Where a handed-in message comes from: its Message-ID (cut to fit the column, which a
    490-character one overflowed on PostgreSQL) and a digest of its bytes, so the very same
    message handed in twice is stored once."""
    return f"{origin}:{message_id_of(raw)[:400]}:{hashlib.sha256(raw).hexdigest()[:16]}"


def ingest_bytes(desk: Desk, raw: bytes, now: datetime, origin: str = "ingest") -> int | None:
    """Store one message handed in directly (`mailflow ingest`); returns its inbound id."""
    key = ingest_key(raw, origin)
    with desk.db.transaction() as session:
        return store(session, origin, key, None, raw, now)
