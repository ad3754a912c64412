"""The relay: sends queued outbox rows over SMTP with retry, backoff and dead-lettering.

Connection errors and 4xx answers leave a row queued with a later `next_attempt_at`; a 5xx
answer dead-letters that recipient only. A crash after the server accepted a mail but
before the row was marked sent re-sends it once, with the same Message-ID.
With no `[smtp] host`, mail is written to the pickup directory instead (embedded default).
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import aiosmtplib
from sqlalchemy import select, update

from mailflow import exporter, leases, logs
from mailflow.config import SmtpConfig
from mailflow.db import Database
from mailflow.models import Outbox

log = logging.getLogger(__name__)

BATCH = 100
BACKOFF_FIRST = timedelta(seconds=30)
BACKOFF_MAX = timedelta(hours=1)


@dataclass
class RelayResult:
    sent: int = 0
    retried: int = 0
    dead: int = 0


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


def _due(db: Database, now: datetime) -> list[int]:
    with db.sessions() as session:
        return list(
            session.scalars(
                select(Outbox.id)
                .where(Outbox.state == "queued", Outbox.next_attempt_at <= now)
                .order_by(Outbox.id)
                .limit(BATCH)
            )
        )


def _finish(
    db: Database, row_id: int, now: datetime, cfg: SmtpConfig, error: str | None, permanent: bool
) -> str:
    """Record one attempt's outcome; returns the row's new state (the mail itself, often
    tens of KB, is not read again)."""
    with db.transaction() as session:
        row = session.execute(
            select(Outbox.attempts, Outbox.recipient, Outbox.message_id).where(
                Outbox.id == row_id
            )
        ).one()
        attempts = row.attempts + 1
        values: dict[str, object] = {"attempts": attempts, "claimed_by": None}
        with logs.context(msg_id=row.message_id):
            if error is None:
                values.update(state="sent", sent_at=now, last_error=None)
            elif permanent or attempts >= cfg.max_attempts:
                values.update(state="dead", last_error=error)
                log.error("outbox #%s to %s dead: %s", row_id, row.recipient, error)
            else:
                values.update(last_error=error, next_attempt_at=now + backoff(attempts))
                log.warning("outbox #%s to %s retry later: %s", row_id, row.recipient, error)
        session.execute(update(Outbox).where(Outbox.id == row_id).values(**values))
    state = str(values.get("state", "queued"))
    exporter.relayed("retry" if state == "queued" else state)
    return state


CLAIM_FOR = timedelta(minutes=10)  # a claimed row is due again after this (relay died)


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


def _claim(db: Database, row_id: int, now: datetime) -> Outbox | None:
    """The row if it is still due, claimed for this relay; None when another has it.

    The claim moves `next_attempt_at` past the send and names this process as the claimer,
    in one conditional UPDATE (on PostgreSQL after FOR UPDATE SKIP LOCKED), so a second
    relay — in this daemon or another — finds the row not due and passes over it (unless
    the claimer died on its host: `_free_dead_claims`). `_finish` records the outcome.
    """
    claim = {"next_attempt_at": now + CLAIM_FOR, "claimed_by": leases.process_owner()}
    with db.transaction() as session:
        query = select(Outbox).where(
            Outbox.id == row_id, Outbox.state == "queued", Outbox.next_attempt_at <= now
        )
        if db.is_postgres:
            query = query.with_for_update(skip_locked=True)
        else:  # SQLite: the conditional UPDATE first takes the write lock
            claimed = session.execute(
                update(Outbox)
                .where(
                    Outbox.id == row_id, Outbox.state == "queued", Outbox.next_attempt_at <= now
                )
                .values(**claim)
                .execution_options(synchronize_session=False)
            )
            if not claimed.rowcount:  # type: ignore[attr-defined]
                return None
            return session.get(Outbox, row_id)
        row = session.scalar(query)
        if row is not None:
            row.next_attempt_at, row.claimed_by = claim["next_attempt_at"], claim["claimed_by"]
        return row


async def relay(db: Database, cfg: SmtpConfig, clock: Callable[[], datetime]) -> RelayResult:
    """Send every due row once; stops the batch early when the server is unreachable."""
    result = RelayResult()
    if cfg.host:
        _free_dead_claims(db, clock())
    while ids := _due(db, clock()):
        if not cfg.host:
            for row_id in ids:
                _deliver_to_pickup(db, cfg, row_id, clock())
                result.sent += 1
            continue
        smtp = _client(cfg)
        try:
            await smtp.connect()
        except (aiosmtplib.SMTPException, OSError) as exc:
            for row_id in ids:
                _finish(db, row_id, clock(), cfg, f"cannot connect: {exc}", permanent=False)
                result.retried += 1
            return result
        try:
            for row_id in ids:
                row = _claim(db, row_id, clock())
                if row is None:
                    continue
                error, permanent = None, False
                # An address beyond ASCII (RFC 6531, e.g. 张三@…) needs SMTPUTF8.
                utf8 = [] if f"{row.sender}{row.recipient}".isascii() else ["SMTPUTF8"]
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
                    state = _finish(db, row_id, clock(), cfg, f"{exc}", permanent=False)
                    result.retried += state == "queued"
                    result.dead += state == "dead"
                    return result  # the connection is gone: try the rest later
                state = _finish(db, row_id, clock(), cfg, error, permanent)
                result.sent += state == "sent"
                result.retried += state == "queued"
                result.dead += state == "dead"
                if not smtp.is_connected:
                    return result  # the server hung up (e.g. 421): try the rest later
        finally:
            if smtp.is_connected:
                try:
                    await smtp.quit()
                except (aiosmtplib.SMTPException, OSError):
                    smtp.close()
        if len(ids) < BATCH:
            break
    return result


def _deliver_to_pickup(db: Database, cfg: SmtpConfig, row_id: int, now: datetime) -> None:
    """Embedded default: write the mail to `pickup_dir` as NNNNNN.eml."""
    assert cfg.pickup_dir is not None
    cfg.pickup_dir.mkdir(parents=True, exist_ok=True)
    with db.transaction() as session:
        row = session.get(Outbox, row_id)
        assert row is not None
        (cfg.pickup_dir / f"{row.id:06d}.eml").write_bytes(row.raw)
        row.state, row.sent_at, row.attempts = "sent", now, row.attempts + 1
