"""The relay: sends queued outbox rows over SMTP with retry, backoff and dead-lettering.

A relay pass claims up to `BATCH` due rows in one transaction, sends them over one SMTP
connection (kept open across the pass's batches) and records their outcomes in one more
transaction: two commits a batch instead of two a recipient.
Connection errors and 4xx answers leave a row queued with a later `next_attempt_at`; a 5xx
answer dead-letters that recipient only. A crash after the server accepted mail but before
the batch's outcomes were recorded re-sends at most that batch, with the same Message-IDs.
With no `[smtp] host`, mail is written to the pickup directory instead (embedded default),
a batch to a commit.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

import aiosmtplib
from sqlalchemy import ColumnElement, select, update

from mailflow import exporter, leases, logs
from mailflow.config import SmtpConfig
from mailflow.db import Database
from mailflow.models import Outbox

log = logging.getLogger(__name__)

BATCH = 100
BACKOFF_FIRST = timedelta(seconds=30)
BACKOFF_MAX = timedelta(hours=1)
CLAIM_FOR = timedelta(minutes=10)  # a claimed row is due again after this (relay died)


@dataclass
class RelayResult:
    sent: int = 0
    retried: int = 0
    dead: int = 0

    def count(self, states: Iterable[str]) -> None:
        for state in states:
            self.sent += state == "sent"
            self.retried += state == "queued"
            self.dead += state == "dead"


@dataclass(frozen=True)
class Claimed:
    """What the relay needs of one claimed row."""

    id: int
    sender: str
    recipient: str
    raw: bytes
    message_id: str
    attempts: int


@dataclass(frozen=True)
class Outcome:
    """One claimed row's fate in this pass: `tried` False when the connection went first."""

    row: Claimed
    error: str | None = None
    permanent: bool = False
    tried: bool = True


def backoff(attempts: int) -> timedelta:
    """30 s, 1 min, 2 min … at most an hour."""
    return min(BACKOFF_FIRST * 2 ** max(attempts - 1, 0), BACKOFF_MAX)


def _tls_context(cfg: SmtpConfig) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=cfg.ca_file)
    if not cfg.verify_tls:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _client(cfg: SmtpConfig) -> aiosmtplib.SMTP:
    return aiosmtplib.SMTP(
        hostname=cfg.host,
        port=cfg.port,
        timeout=cfg.timeout,
        use_tls=cfg.security == "tls",
        start_tls=cfg.security == "starttls",
        tls_context=_tls_context(cfg) if cfg.security != "none" else None,
        username=cfg.username or None,
        password=cfg.password or None,
    )


def _due(now: datetime) -> tuple[ColumnElement[bool], ...]:
    """The conditions of a row due to be sent at `now`."""
    return (Outbox.state == "queued", Outbox.next_attempt_at <= now)


def _claim_batch(
    db: Database, now: datetime, limit: int = BATCH, ids: list[int] | None = None
) -> list[Claimed]:
    """Up to `limit` due rows (of `ids`, if given), claimed for this relay in one transaction.

    One conditional UPDATE … RETURNING moves `next_attempt_at` past the send and names this
    process as the claimer; on PostgreSQL its row choice is FOR UPDATE SKIP LOCKED, on
    SQLite the UPDATE holds the write lock. A second relay — in this daemon or another —
    finds the rows not due and passes over them (unless the claimer died on its host:
    `_free_dead_claims`). `_finish` records the outcomes.
    """
    choice = select(Outbox.id).where(*_due(now)).order_by(Outbox.id).limit(limit)
    if ids is not None:
        choice = choice.where(Outbox.id.in_(ids))
    if db.is_postgres:
        choice = choice.with_for_update(skip_locked=True)
    claim = (
        update(Outbox)
        .where(Outbox.id.in_(choice.scalar_subquery()), *_due(now))
        .values(next_attempt_at=now + CLAIM_FOR, claimed_by=leases.process_owner())
        .returning(Outbox.id, Outbox.sender, Outbox.recipient, Outbox.raw, Outbox.message_id,
                   Outbox.attempts)
        .execution_options(synchronize_session=False)
    )
    with db.transaction() as session:
        rows = session.execute(claim).all()
    return sorted((Claimed(*row) for row in rows), key=lambda row: row.id)


def _claim(db: Database, row_id: int, now: datetime) -> Claimed | None:
    """The row if it is still due, claimed for this relay; None when another has it."""
    rows = _claim_batch(db, now, limit=1, ids=[row_id])
    return rows[0] if rows else None


def _values(outcome: Outcome, now: datetime, cfg: SmtpConfig) -> dict[str, object]:
    """The row's new columns after `outcome`, logging a retry or a dead letter."""
    row = outcome.row
    if not outcome.tried:  # never attempted: due again, the attempt not counted
        return {"claimed_by": None, "next_attempt_at": now}
    attempts = row.attempts + 1
    values: dict[str, object] = {"attempts": attempts, "claimed_by": None}
    with logs.context(msg_id=row.message_id):
        if outcome.error is None:
            values.update(state="sent", sent_at=now, last_error=None)
        elif outcome.permanent or attempts >= cfg.max_attempts:
            values.update(state="dead", last_error=outcome.error)
            log.error("outbox #%s to %s dead: %s", row.id, row.recipient, outcome.error)
        else:
            values.update(last_error=outcome.error, next_attempt_at=now + backoff(attempts))
            log.warning("outbox #%s to %s retry later: %s", row.id, row.recipient,
                        outcome.error)
    return values


def _finish(db: Database, outcomes: list[Outcome], now: datetime, cfg: SmtpConfig) -> list[str]:
    """Record a batch's outcomes in one transaction; returns the states of the rows tried."""
    changes = [(outcome, _values(outcome, now, cfg)) for outcome in outcomes]
    with db.transaction() as session:
        for outcome, values in changes:
            session.execute(
                update(Outbox)
                .where(Outbox.id == outcome.row.id)
                .values(**values)
                .execution_options(synchronize_session=False)
            )
    states = [str(values.get("state", "queued")) for outcome, values in changes if outcome.tried]
    for state in states:
        exporter.relayed("retry" if state == "queued" else state)
    return states


def _free_dead_claims(db: Database, now: datetime) -> int:
    """Make the rows claimed by a relay that died on this host due at once (instead of
    after CLAIM_FOR); returns how many. Claims of other hosts wait out CLAIM_FOR."""
    with db.sessions() as session:
        claimers = session.scalars(
            select(Outbox.claimed_by)
            .where(Outbox.state == "queued", Outbox.claimed_by.is_not(None))
            .distinct()
        )
        dead = [claimer for claimer in claimers if claimer and leases.gone(claimer)]
    if not dead:
        return 0
    with db.transaction() as session:
        freed = session.execute(
            update(Outbox)
            .where(Outbox.state == "queued", Outbox.claimed_by.in_(dead))
            .values(next_attempt_at=now, claimed_by=None)
            .execution_options(synchronize_session=False)
        ).rowcount  # type: ignore[attr-defined]
    log.warning("%d outgoing mail(s) claimed by %s, whose process is gone: due now",
                freed, ", ".join(dead))
    return int(freed)


def _attempted(row: Claimed, error: str | None, permanent: bool) -> Outcome:
    """The outcome of one SMTP attempt (the point a crash test stops at)."""
    return Outcome(row, error, permanent)


async def _send_one(smtp: aiosmtplib.SMTP, row: Claimed) -> tuple[Outcome, bool]:
    """Send `row` on `smtp`; returns its outcome and whether the connection is lost."""
    # An address beyond ASCII (RFC 6531, e.g. 张三@…) needs SMTPUTF8.
    utf8 = [] if f"{row.sender}{row.recipient}".isascii() else ["SMTPUTF8"]
    error, permanent = None, False
    try:
        await smtp.sendmail(row.sender, [row.recipient], row.raw, mail_options=utf8)
    except aiosmtplib.SMTPNotSupported as exc:  # no SMTPUTF8: this one cannot go
        permanent, error = True, f"{exc} (needed for {row.recipient})"
    except aiosmtplib.SMTPRecipientsRefused as exc:
        refusal = exc.recipients[0] if exc.recipients else None
        permanent = refusal is not None and refusal.code >= 500
        error = str(refusal or exc)
    except aiosmtplib.SMTPResponseException as exc:
        permanent = exc.code >= 500
        error = f"{exc.code} {exc.message}"
    except (aiosmtplib.SMTPException, OSError) as exc:
        return _attempted(row, f"{exc}", False), True
    return _attempted(row, error, permanent), not smtp.is_connected  # e.g. 421 hangs up


async def _send_batch(smtp: aiosmtplib.SMTP, batch: list[Claimed]) -> tuple[list[Outcome], bool]:
    """Send the batch in order; when the connection goes, the rest are left untried.
    Returns the outcomes and whether the connection is lost."""
    outcomes: list[Outcome] = []
    for i, row in enumerate(batch):
        outcome, lost = await _send_one(smtp, row)
        outcomes.append(outcome)
        if lost:
            outcomes.extend(Outcome(rest, tried=False) for rest in batch[i + 1:])
            return outcomes, True
    return outcomes, False


async def _connect(smtp: aiosmtplib.SMTP) -> str | None:
    """Open the connection; the error if it cannot be."""
    try:
        await smtp.connect()
    except (aiosmtplib.SMTPException, OSError) as exc:
        return f"cannot connect: {exc}"
    return None


async def _close(smtp: aiosmtplib.SMTP) -> None:
    if smtp.is_connected:
        try:
            await smtp.quit()
        except (aiosmtplib.SMTPException, OSError):
            smtp.close()


async def relay(db: Database, cfg: SmtpConfig, clock: Callable[[], datetime]) -> RelayResult:
    """Send every due row once, a batch at a time over one connection; stops early when the
    server is unreachable or hangs up (the rest are tried on the next pass)."""
    result = RelayResult()
    if not cfg.host:
        while sent := _deliver_to_pickup(db, cfg, clock()):
            result.sent += sent
        return result
    _free_dead_claims(db, clock())
    smtp = _client(cfg)
    try:
        while batch := _claim_batch(db, clock()):
            error = None if smtp.is_connected else await _connect(smtp)
            if error is not None:
                failed = [_attempted(row, error, False) for row in batch]
                result.count(_finish(db, failed, clock(), cfg))
                break
            outcomes, lost = await _send_batch(smtp, batch)
            result.count(_finish(db, outcomes, clock(), cfg))
            if lost or len(batch) < BATCH:
                break
    finally:
        await _close(smtp)
    return result


def _deliver_to_pickup(db: Database, cfg: SmtpConfig, now: datetime) -> int:
    """Embedded default: write up to `BATCH` due mails to `pickup_dir` as NNNNNN.eml and
    mark them sent, in one transaction; returns how many."""
    assert cfg.pickup_dir is not None
    cfg.pickup_dir.mkdir(parents=True, exist_ok=True)
    with db.transaction() as session:
        rows = session.scalars(
            select(Outbox).where(*_due(now)).order_by(Outbox.id).limit(BATCH)
        ).all()
        for row in rows:
            (cfg.pickup_dir / f"{row.id:06d}.eml").write_bytes(row.raw)
            row.state, row.sent_at, row.attempts = "sent", now, row.attempts + 1
    exporter.relayed("sent", len(rows))
    return len(rows)
