"""From stored raw mail to tickets and queued notifications, one transaction per message.

`store()` records the raw bytes first (unique per mailbox position and per Message-ID);
`process_pending()` then takes each pending row in order: parse → drop automatic mail →
find the ticket → open one (classified by rules/) or apply the reply → queue notifications.
A message that raises is rolled back and quarantined with its error; the next goes on.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.exc import DataError, IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from mailflow import approvals, exporter, guard, incidents, logs, requests, tracking
from mailflow.desk import Desk
from mailflow.mail import ParsedMail
from mailflow.mailboxes import with_mailbox_defaults
from mailflow.models import Inbound, Ticket
from mailflow.tickets import open_ticket, record

log = logging.getLogger(__name__)

QUARANTINE_RETRIES = 3
_MESSAGE_ID = re.compile(rb"^message-id:[ \t]*(.*(?:\r?\n[ \t].*)*)", re.IGNORECASE | re.MULTILINE)
_HEADER_END = re.compile(rb"\r?\n\r?\n")
_CONTROLS = re.compile(r"[\x00-\x1f\x7f]")
_THREAD_HEADERS = re.compile(
    rb"^(?:in-reply-to|references):[ \t]*(.*(?:\r?\n[ \t].*)*)", re.IGNORECASE | re.MULTILINE
)


def message_id_of(raw: bytes) -> str:
    """The Message-ID without <>, or a hash of the bytes when there is none."""
    end = _HEADER_END.search(raw)
    head = raw[: end.start()] if end else raw[:65536]
    match = _MESSAGE_ID.search(head)
    if match:
        value = b" ".join(match.group(1).split()).decode("ascii", "replace").strip()
        value = _CONTROLS.sub("", value)  # never valid in a Message-ID; NUL breaks PostgreSQL
        value = value.strip("<>").strip() if value.count("<") <= 1 else value
        inner = re.search(r"<([^<>]+)>", value)
        value = inner.group(1).strip() if inner else value
        if value:
            return value[:490]
    return f"sha256-{hashlib.sha256(raw).hexdigest()}@mailflow.invalid"


def store(
    session: Session, mailbox: str, key: str, uid: int | None, raw: bytes, now: datetime
) -> Inbound | None:
    """Record a raw message as pending; None when this mailbox position is already stored.

    A second copy of a Message-ID already stored (e.g. the desk in To and Cc of two
    mailboxes) is kept but marked ignored, so nothing is processed twice.
    """
    if session.scalar(select(Inbound.id).where(Inbound.source_key == key)) is not None:
        return None
    message_id = message_id_of(raw)
    first = session.scalar(select(Inbound.id).where(Inbound.dedup_key == message_id))
    row = Inbound(
        source_key=key,
        mailbox=mailbox,
        uid=uid,
        message_id=message_id,
        dedup_key=None if first else message_id,
        raw=raw,
        size=len(raw),
        received_at=now,
        state="ignored" if first else "pending",
        reason=f"duplicate of inbound #{first}" if first else None,
        attempts=0,
    )
    session.add(row)
    session.flush()
    return row


@dataclass
class Outcome:
    state: str
    reason: str | None = None
    ticket: Ticket | None = None


def _automatic(desk: Desk, mail: ParsedMail) -> str | None:
    if mail.auto:
        return mail.auto
    if mail.from_addr == desk.address:
        return "sent from the desk's own address"
    claim = guard.claims_desk(desk, mail)
    if claim:
        return f"not trusted: {claim}"
    if not mail.from_addr:
        return "no sender address"
    return None


def handle(session: Session, desk: Desk, inbound: Inbound, now: datetime) -> Outcome:
    """Process one stored message inside the caller's transaction."""
    mail = guard.parse_limited(inbound.raw, desk.settings.limits)
    inbound.from_addr = mail.from_addr[:320]
    inbound.to_addrs = ", ".join(mail.to + mail.cc)
    inbound.subject = mail.subject
    inbound.text = mail.new_text
    inbound.sent_at = mail.date
    automatic = _automatic(desk, mail)
    if automatic:
        report = guard.delivery_report(session, desk, inbound, now) if mail.auto else None
        return Outcome("ignored", guard.safe_text(report or f"automatic mail: {automatic}"))
    refused = guard.refused_sender(desk, mail)
    if refused:
        return Outcome("ignored", guard.safe_text(refused))
    if tracking.answers_ticketless_mail(session, mail.in_reply_to):
        return Outcome("ignored", "a reply to a digest or report, which belongs to no ticket")
    guard.begin(session, mail, inbound, now)
    ticket = tracking.find_ticket(
        session, mail.subject, mail.in_reply_to, mail.references
    ) or approvals.ticket_by_token(session, mail, desk.address)
    process = incidents if ticket is None or ticket.kind == "incident" else requests
    if ticket is not None and _closed_too_long(desk, ticket, mail.from_addr, now):
        parent, ticket = ticket, None
    else:
        parent = None
    if ticket is None:
        found = desk.rules.classify(mail.subject, mail.text, mail.from_addr)
        found = with_mailbox_defaults(desk, inbound.mailbox, found)
        ticket = open_ticket(session, desk, mail, inbound, found, now)
        if parent is not None:
            ticket.parent_id = parent.id
            record(session, ticket, "linked", "mailflow", now, f"follows closed {parent.ref}")
        process = incidents if ticket.kind == "incident" else requests
        guard.on_ticket(session, desk, ticket, mail, inbound, now, new=True)
        process.on_new(session, desk, ticket, mail, inbound, now)
    else:
        inbound.ticket_id = ticket.id
        tracking.remember(session, ticket, mail.message_id)
        guard.on_ticket(session, desk, ticket, mail, inbound, now, new=False)
        process.on_reply(session, desk, ticket, mail, inbound, now)
    guard.end(session)
    return Outcome("processed", None, ticket)


def _closed_too_long(desk: Desk, ticket: Ticket, sender: str, now: datetime) -> bool:
    """A user's reply to an incident closed longer than the grace period opens a new one.

    Staff replying to an old incident add to its record instead of opening one in their name.
    """
    return (
        ticket.kind == "incident"
        and not desk.settings.roles.of(sender)
        and ticket.status == "closed"
        and ticket.closed_at is not None
        and now - ticket.closed_at > desk.settings.incident.reopen_grace
    )


def _claim(session: Session, desk: Desk, inbound_id: int) -> Inbound | None:
    """Lock the row for this transaction so no other daemon processes it too.

    PostgreSQL: FOR UPDATE SKIP LOCKED — a row another daemon is working on is passed over
    (None). SQLite: a first write takes the database's write lock (waiting its turn), so
    the state read next is the latest committed one.
    """
    if desk.db.is_postgres:
        return session.scalar(
            select(Inbound).where(Inbound.id == inbound_id).with_for_update(skip_locked=True)
        )
    session.execute(
        update(Inbound)
        .where(Inbound.id == inbound_id)
        .values(attempts=Inbound.attempts)
        .execution_options(synchronize_session=False)
    )
    return session.get(Inbound, inbound_id)


def process_one(desk: Desk, inbound_id: int, now: datetime) -> Outcome:
    """Process one row in its own transaction; on failure quarantine it with the error."""
    started = time.perf_counter()
    with logs.context(msg_id=None, ticket=None, inbound=inbound_id):
        outcome = _process_one(desk, inbound_id, now)
        if outcome.state == "conflict":  # the other transaction has committed: try again
            outcome = _process_one(desk, inbound_id, now, last_try=True)
        if outcome.state in ("processed", "ignored", "quarantined"):
            exporter.observe(outcome.state, time.perf_counter() - started)
            log.info("%s%s", outcome.state, f": {outcome.reason}" if outcome.reason else "")
    return outcome


def _process_one(desk: Desk, inbound_id: int, now: datetime, last_try: bool = False) -> Outcome:
    db = desk.db
    try:
        with db.transaction() as session:
            inbound = _claim(session, desk, inbound_id)
            if inbound is None:  # PostgreSQL: another daemon holds it
                return Outcome("busy" if db.is_postgres else "missing")
            logs.bind(msg_id=inbound.message_id)
            if inbound.state not in ("pending", "quarantined"):  # done by another daemon
                return Outcome("skipped", f"already {inbound.state}")
            if _answers_pending(session, inbound):
                return Outcome("deferred", "answers mail still being processed")
            with session.no_autoflush:  # one flush at commit, not one per query (3× faster)
                outcome = handle(session, desk, inbound, now)
            if outcome.ticket is not None:
                logs.bind(ticket=outcome.ticket.ref)
            inbound.state, inbound.reason = outcome.state, outcome.reason
            inbound.processed_at = now
            inbound.attempts += 1
    except IntegrityError as exc:
        if not last_try:
            # A concurrent daemon inserted the same row first (e.g. a new requester's
            # details): rolled back; processed again at once against the committed data.
            log.warning("conflict with a concurrent transaction, trying again: %s", exc.orig)
            return Outcome("conflict", str(exc.orig)[:200])
        return _quarantine(desk, inbound_id, now, exc)
    except DataError as exc:  # this mail's data cannot be stored: retrying will not help
        return _quarantine(desk, inbound_id, now, exc)
    except SQLAlchemyError:
        raise  # the database itself failed: the row stays as it was, retried later
    except Exception as exc:  # noqa: BLE001 — a poison message must not stop the others
        return _quarantine(desk, inbound_id, now, exc)
    return outcome


def _answers_pending(session: Session, inbound: Inbound) -> bool:
    """Does this mail answer an earlier one still pending (perhaps in another daemon's
    hands)? Then it waits, so a reply never opens a ticket of its own beside its original."""
    end = _HEADER_END.search(inbound.raw)
    head = inbound.raw[: end.start()] if end else inbound.raw[:65536]
    refs = {
        ref.decode("ascii", "replace").strip()[:490]
        for value in _THREAD_HEADERS.findall(head)
        for ref in re.findall(rb"<([^<>\s\x00-\x1f\x7f]+)>", value)
    }
    if not refs:
        return False
    earlier = select(Inbound.id).where(
        Inbound.message_id.in_(refs), Inbound.state == "pending", Inbound.id < inbound.id
    )
    return session.scalar(earlier.limit(1)) is not None


def _quarantine(desk: Desk, inbound_id: int, now: datetime, exc: Exception) -> Outcome:
    """Record the failure on the row; retried later with backoff, visible in the CLI."""
    log.error("inbound #%s quarantined", inbound_id, exc_info=exc)
    with desk.db.transaction() as session:
        inbound = session.get(Inbound, inbound_id)
        assert inbound is not None
        inbound.attempts += 1
        inbound.state = "quarantined"
        inbound.reason = f"{type(exc).__name__}: {exc}"[:2000]
        inbound.next_attempt_at = now + timedelta(minutes=5 * 2**inbound.attempts)
    return Outcome("quarantined", inbound.reason)


def pending_ids(session: Session, now: datetime, limit: int = 500) -> list[int]:
    """Pending rows in arrival order, then quarantined ones due for another try."""
    ids = list(
        session.scalars(
            select(Inbound.id).where(Inbound.state == "pending").order_by(Inbound.id).limit(limit)
        )
    )
    ids += session.scalars(
        select(Inbound.id)
        .where(
            Inbound.state == "quarantined",
            Inbound.attempts < QUARANTINE_RETRIES,
            Inbound.next_attempt_at <= now,
        )
        .order_by(Inbound.id)
        .limit(limit)
    )
    return ids


def process_pending(
    desk: Desk, clock: Callable[[], datetime], stop: Callable[[], bool] | None = None
) -> int:
    """Process everything pending; returns how many rows were handled.

    `stop` is asked between messages (a daemon shutting down finishes the one in hand).
    Rows another daemon holds or has done meanwhile are passed over and not counted.
    """
    done = 0
    while True:
        with desk.db.sessions() as session:
            ids = pending_ids(session, clock())
        if not ids:
            return done
        progress, deferred = 0, 0
        for inbound_id in ids:
            if stop is not None and stop():
                return done
            outcome = process_one(desk, inbound_id, clock())
            progress += outcome.state in ("processed", "ignored", "quarantined")
            deferred += outcome.state == "deferred"
        done += progress
        if len(ids) < 500 and not (deferred and progress):
            return done
