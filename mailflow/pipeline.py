"""From stored raw mail to tickets and queued notifications, each message all or nothing.

`store()` records the raw bytes first (unique per mailbox position and per Message-ID);
`process_pending()` then takes each pending row in order: parse → drop automatic mail →
find the ticket → open one (classified by rules/) or apply the reply → queue notifications.
Each message runs in a savepoint of its own inside a batch transaction (`batch_size`): a
message that raises is rolled back alone and quarantined with its error; the next goes on.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.exc import (
    DataError,
    DBAPIError,
    IntegrityError,
    SQLAlchemyError,
    StatementError,
)
from sqlalchemy.orm import Session, defer

from mailflow import (
    approvals,
    attachments,
    bounces,
    commands,
    exporter,
    governor,
    incidents,
    logs,
    parties,
    refusals,
    requests,
    senders,
    size_limits,
    tracking,
)
from mailflow.desk import Desk
from mailflow.mail import MESSAGE_ID_LIMIT, ParsedMail
from mailflow.mailboxes import with_mailbox_defaults
from mailflow.models import Inbound, Person, Ticket
from mailflow.tickets import open_ticket, record

log = logging.getLogger(__name__)

QUARANTINE_RETRIES = 3
SQLITE_BATCH = 50  # messages per transaction on SQLite (see batch_size)
# Stored bytes per transaction, whatever the count: on SQLite the claim rewrites every row
# of the batch, raw bytes and all; a message bigger than this is a batch of its own.
BATCH_BYTES = 32 * 2**20
PENDING_PAGE = 500  # rows read per look for pending work
# What says the database itself failed, not the mail (the batch rolls back and is tried
# again later): SQLite result code names, PostgreSQL SQLSTATE classes, by prefix. Any other
# error a statement raises while a message is handled quarantines that message alone.
DATABASE_FAILURES = {
    "sqlite": (
        "SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_IOERR", "SQLITE_FULL", "SQLITE_CANTOPEN",
        "SQLITE_READONLY", "SQLITE_CORRUPT", "SQLITE_NOTADB", "SQLITE_NOMEM",
        "SQLITE_PROTOCOL", "SQLITE_INTERRUPT", "SQLITE_PERM",
    ),
    # connection, transaction rollback (deadlock, serialization), resources, object state
    # (lock not available), operator intervention, system error, internal error; a table
    # or column missing (a schema not yet upgraded) is the database's too
    "postgresql": ("08", "40", "53", "55", "57", "58", "XX", "42P01", "42703"),
}
SQLITE_SCHEMA_FAULTS = ("no such table", "no such column")  # SQLite names them only in words
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
            return value[:MESSAGE_ID_LIMIT]
    return f"sha256-{hashlib.sha256(raw).hexdigest()}@mailflow.invalid"


_STORED = select(Inbound.id).where(Inbound.source_key == bindparam("key"))
_FIRST_COPY = select(Inbound.id).where(Inbound.dedup_key == bindparam("message_id"))
_STORE = insert(Inbound)


def store(
    session: Session, mailbox: str, key: str, uid: int | None, raw: bytes, now: datetime
) -> int | None:
    """Record a raw message as pending; its id, or None when this mailbox position is
    already stored.

    A second copy of a Message-ID already stored (e.g. the desk in To and Cc of two
    mailboxes) is kept but marked ignored, so nothing is processed twice. Three statements
    built once, on the session's connection: this runs for every message fetched.
    """
    connection = session.connection()
    if connection.scalar(_STORED, {"key": key}) is not None:
        return None
    message_id = message_id_of(raw)
    first = connection.scalar(_FIRST_COPY, {"message_id": message_id})
    row = {
        "source_key": key,
        "mailbox": mailbox,
        "uid": uid,
        "message_id": message_id,
        "dedup_key": None if first else message_id,
        "raw": raw,
        "size": len(raw),
        "received_at": now,
        "state": "ignored" if first else "pending",
        "reason": f"duplicate of inbound #{first}" if first else None,
        "attempts": 0,
    }
    return connection.execute(_STORE, row).inserted_primary_key[0]


@dataclass
class Outcome:
    state: str
    reason: str | None = None
    ticket: Ticket | None = None
    opened: bool = False  # the mail opened `ticket` (else it was added to it)


def _automatic(desk: Desk, mail: ParsedMail) -> str | None:
    if mail.auto:
        return mail.auto
    if mail.from_addr == desk.address:
        return "sent from the desk's own address"
    claim = senders.claims_desk(desk, mail)
    if claim:
        return f"not trusted: {claim}"
    if not mail.from_addr:
        return "no sender address"
    return None


def handle(session: Session, desk: Desk, inbound: Inbound, now: datetime) -> Outcome:
    """Process one stored message inside the caller's transaction."""
    mail = size_limits.parse_limited(inbound.raw, desk.settings.limits)
    try:
        outcome = _route(session, desk, inbound, mail, now)
    finally:  # a mail that raised leaves no state behind for the next one
        governor.end(session)
    # What the mail says goes on its row last. The row holds the raw bytes, which every
    # UPDATE rewrites: set first, it took an UPDATE of its own when a new ticket was
    # flushed for its id, besides the one that records the outcome.
    inbound.from_addr = mail.from_addr[:320]
    inbound.to_addrs = ", ".join(mail.to + mail.cc)
    inbound.subject = mail.subject
    inbound.text = mail.new_text
    left_out = size_limits.omitted_text(mail)
    if left_out and outcome.ticket is not None and not outcome.opened:
        inbound.text = f"{mail.new_text}\n\n[未收录 / left out: {left_out}]".strip()
    inbound.sent_at = mail.date
    return outcome


def _route(
    session: Session, desk: Desk, inbound: Inbound, mail: ParsedMail, now: datetime
) -> Outcome:
    """Drop automatic mail, else find the mail's ticket and open one or add the reply."""
    if not mail.raw_headers:  # not one header: a file that is no mail (junk in a Maildir)
        return Outcome("ignored", "not a mail message")
    automatic = _automatic(desk, mail)
    if automatic:
        report = bounces.delivery_report(session, desk, inbound, now) if mail.auto else None
        return Outcome("ignored", bounces.safe_text(report or f"automatic mail: {automatic}"))
    refused = senders.refused_sender(desk, mail)
    if refused:
        return Outcome("ignored", bounces.safe_text(refused))
    ticket = tracking.find_ticket(session, mail.subject, mail.in_reply_to, mail.references)
    # A reply to a digest or report is about no ticket, unless its subject names one.
    if ticket is None and tracking.answers_ticketless_mail(session, mail.in_reply_to):
        return Outcome("ignored", "a reply to a digest or report, which belongs to no ticket")
    governor.begin(session, mail, inbound, now)
    ticket = ticket or approvals.ticket_by_token(session, mail, desk.address)
    process = incidents if ticket is None or ticket.kind == "incident" else requests
    if ticket is not None and _closed_too_long(desk, ticket, mail, now):
        parent, ticket = ticket, None
    else:
        parent = None
    query = parties.fresh_query(mail) if ticket is None and parent is None else None
    if query is not None:  # 查询 INC-12, 我的工单: answered to the sender alone, no ticket opened
        reason, about = parties.answer_query(session, desk, mail, inbound, query, now)
        return Outcome("processed", reason, about)
    if ticket is None:
        found = desk.rules.classify(
            mail.subject, mail.text, mail.from_addr, session.get(Person, mail.from_addr))
        found = with_mailbox_defaults(desk, inbound.mailbox, found)
        ticket = open_ticket(session, desk, mail, inbound, found, now)
        if parent is not None:
            ticket.parent_id = parent.id
            record(session, ticket, "linked", "mailflow", now, f"follows closed {parent.ref}")
        process = incidents if ticket.kind == "incident" else requests
        governor.on_ticket(session, desk, ticket, mail, inbound, now, new=True)
        process.on_new(session, desk, ticket, mail, inbound, now)
        return Outcome("processed", None, ticket, opened=True)
    inbound.ticket_id = ticket.id
    who = senders.identify(session, desk, ticket, mail)
    governor.on_ticket(session, desk, ticket, mail, inbound, now, new=False)
    # Recorded for the staff and passed on to nobody; an approval token's own checks tell
    # its approver about anyone else who tries it (requests.decide).
    if not who.on_ticket and not approvals.tokens_in(mail, desk.address):
        refusals.stranger(session, desk, ticket, mail, inbound.id, now)
        return Outcome("processed", f"{who.address} is not on {ticket.ref}", ticket)
    tracking.remember(session, ticket, mail.message_id)
    attachments.store(session, ticket.id, inbound, mail, now)
    process.on_reply(session, desk, ticket, mail, inbound, now, who)
    return Outcome("processed", None, ticket)


def _closed_too_long(desk: Desk, ticket: Ticket, mail: ParsedMail, now: datetime) -> bool:
    """A user's reply to an incident closed longer than the grace period opens a new one.

    Staff replying to an old incident add to its record instead of opening one in their name;
    so does a user who only says thanks or confirms.
    """
    return (
        ticket.kind == "incident"
        and not desk.settings.roles.of(mail.from_addr)
        and ticket.status == "closed"
        and ticket.closed_at is not None
        and now - ticket.closed_at > desk.settings.incident.reopen_grace
        and not incidents.acknowledges(commands.parse(mail.new_text, mail.from_name))
    )


def batch_size(desk: Desk) -> int:
    """Messages per transaction. SQLite has one writer at a time, so many messages share a
    claim and a commit (the claim alone went from 1.3 to 0.1 ms a message); daemons sharing
    PostgreSQL work side by side, and a transaction per message keeps their waits short."""
    return 1 if desk.db.is_postgres else SQLITE_BATCH


def _claim(session: Session, desk: Desk, ids: list[int]) -> dict[int, Inbound]:
    """Lock the rows for this transaction so no other daemon processes them too.

    PostgreSQL: FOR UPDATE SKIP LOCKED — a row another daemon is working on is passed over
    (absent). SQLite: a first write takes the database's write lock (waiting its turn), so
    the states read next are the latest committed ones. `ids` is one batch: its length is
    bounded by `batch_size` and `BATCH_BYTES`.
    """
    # The raw bytes are read one message at a time, when it is handled (see _process_claimed).
    query = select(Inbound).where(Inbound.id.in_(ids)).options(defer(Inbound.raw))
    if desk.db.is_postgres:
        query = query.with_for_update(skip_locked=True)
    else:
        session.execute(
            update(Inbound)
            .where(Inbound.id.in_(ids))
            .values(attempts=Inbound.attempts)
            .execution_options(synchronize_session=False)
        )
    return {row.id: row for row in session.scalars(query)}


def process_one(desk: Desk, inbound_id: int, now: datetime) -> Outcome:
    """Process one row in a transaction of its own; on failure quarantine it."""
    return process_batch(desk, [inbound_id], lambda: now)[0]


def process_batch(
    desk: Desk,
    ids: list[int],
    clock: Callable[[], datetime],
    stop: Callable[[], bool] | None = None,
) -> list[Outcome]:
    """Process rows in one transaction, each message in a savepoint of its own.

    A message that raises is rolled back alone and quarantined with its error; the others
    commit. A failure of the database itself rolls back the batch (retried later). `stop`
    is asked between messages: what is done so far commits.
    """
    done: list[tuple[int, str | None, Outcome, float]] = []
    with desk.db.transaction() as session:
        claimed = _claim(session, desk, ids)
        for inbound_id in ids:
            if stop is not None and stop():
                break
            started = time.perf_counter()
            with logs.context(msg_id=None, ticket=None, inbound=inbound_id):
                outcome = _process_claimed(session, desk, claimed.get(inbound_id), clock())
            message_id = claimed[inbound_id].message_id if inbound_id in claimed else None
            done.append((inbound_id, message_id, outcome, time.perf_counter() - started))
    for inbound_id, message_id, outcome, elapsed in done:  # committed: now say so
        if outcome.state in ("processed", "ignored", "quarantined"):
            ref = outcome.ticket.ref if outcome.ticket is not None else None
            with logs.context(msg_id=message_id, ticket=ref, inbound=inbound_id):
                exporter.observe(outcome.state, elapsed)
                log.info("%s%s", outcome.state, f": {outcome.reason}" if outcome.reason else "")
    return [outcome for _, _, outcome, _ in done]


def _process_claimed(
    session: Session, desk: Desk, inbound: Inbound | None, now: datetime
) -> Outcome:
    if inbound is None:  # PostgreSQL: another daemon holds it
        return Outcome("busy" if desk.db.is_postgres else "missing")
    logs.bind(msg_id=inbound.message_id)
    if inbound.state not in ("pending", "quarantined"):  # done by another daemon
        return Outcome("skipped", f"already {inbound.state}")
    try:
        outcome = _quarantined_on_failure(session, desk, inbound, now)
    finally:
        session.expire(inbound, ["raw"])  # its bytes go now, not with the batch
    if outcome.ticket is not None:
        logs.bind(ticket=outcome.ticket.ref)
    return outcome


def _quarantined_on_failure(
    session: Session, desk: Desk, inbound: Inbound, now: datetime
) -> Outcome:
    """Every step of one message in a savepoint: a failure rolls back and quarantines this
    message alone; only a failure of the database itself goes on to roll back the batch."""
    for last_try in (False, True):
        try:
            # One flush when the savepoint is released, not one per query (3× faster).
            with session.begin_nested(), session.no_autoflush:
                return _handled(session, desk, inbound, now)
        except IntegrityError as exc:
            if last_try:
                return _quarantine(inbound, now, exc)
            # A concurrent daemon inserted the same row first (e.g. a new requester's
            # details): rolled back; processed again at once against the committed data.
            log.warning("conflict with a concurrent transaction, trying again: %s", exc.orig)
        except DataError as exc:  # this mail's data cannot be stored: retrying will not help
            return _quarantine(inbound, now, exc)
        except SQLAlchemyError as exc:
            if _database_failed(session, exc):
                raise  # the batch rolls back, retried later
            return _quarantine(inbound, now, exc)
        except Exception as exc:  # noqa: BLE001 — a poison message must not stop the others
            return _quarantine(inbound, now, exc)
    raise AssertionError("unreachable")


def _handled(session: Session, desk: Desk, inbound: Inbound, now: datetime) -> Outcome:
    """Defer a mail that answers one still pending, else handle it and record the outcome."""
    if _answers_pending(session, inbound):
        return Outcome("deferred", "answers mail still being processed")
    outcome = handle(session, desk, inbound, now)
    inbound.state, inbound.reason = outcome.state, outcome.reason
    inbound.processed_at = now
    inbound.attempts += 1
    return outcome


def _database_failed(session: Session, exc: SQLAlchemyError) -> bool:
    """Whether a statement failed because of the database (connection lost, locked, disk
    full ...) rather than what this message made it do (e.g. too many parameters)."""
    if not isinstance(exc, DBAPIError):
        return not isinstance(exc, StatementError)  # else a value of this mail's was refused
    if exc.connection_invalidated:
        return True
    code = getattr(exc.orig, "sqlite_errorname", None) or getattr(exc.orig, "sqlstate", None)
    dialect = session.get_bind().dialect.name
    if code and str(code).startswith(DATABASE_FAILURES.get(dialect, ())):
        return True
    if dialect == "sqlite" and str(exc.orig).startswith(SQLITE_SCHEMA_FAULTS):
        return True
    try:  # the savepoint is rolled back: a database that still answers is fine
        session.connection().exec_driver_sql("SELECT 1")
    except SQLAlchemyError:
        return True
    return False


_EARLIER_PENDING = (
    select(Inbound.id)
    .where(
        Inbound.message_id.in_(bindparam("refs", expanding=True)),
        Inbound.state == "pending",
        Inbound.id < bindparam("id"),
    )
    .limit(1)
)


def _answers_pending(session: Session, inbound: Inbound) -> bool:
    """Does this mail answer an earlier one still pending (perhaps in another daemon's
    hands)? Then it waits, so a reply never opens a ticket of its own beside its original.

    Only the last `tracking.REFS_KEPT` ids of each header are asked about (RFC 5322
    §3.6.4 lets a References list be trimmed so): a statement's parameters never grow with
    a header.
    """
    end = _HEADER_END.search(inbound.raw)
    head = inbound.raw[: end.start()] if end else inbound.raw[:65536]
    refs: dict[str, None] = {}
    for value in _THREAD_HEADERS.findall(head):
        ids = re.findall(rb"<([^<>\s\x00-\x1f\x7f]+)>", value)[-tracking.REFS_KEPT :]
        refs.update((ref.decode("ascii", "replace").strip()[:MESSAGE_ID_LIMIT], None)
                    for ref in ids)
    if not refs:
        return False
    params = {"refs": list(refs)[-2 * tracking.REFS_KEPT :], "id": inbound.id}
    return session.connection().scalar(_EARLIER_PENDING, params) is not None


def _quarantine(inbound: Inbound, now: datetime, exc: Exception) -> Outcome:
    """Record the failure on the row (its work rolled back); retried later with backoff."""
    log.error("inbound #%s quarantined", inbound.id, exc_info=exc)
    inbound.attempts += 1
    inbound.state = "quarantined"
    inbound.reason = f"{type(exc).__name__}: {exc}"[:2000]
    inbound.next_attempt_at = now + timedelta(minutes=5 * 2**inbound.attempts)
    return Outcome("quarantined", inbound.reason)


def pending_ids(session: Session, now: datetime, limit: int = PENDING_PAGE) -> list[int]:
    """Pending rows in arrival order, then quarantined ones due for another try."""
    return [row_id for row_id, _ in _pending(session, now, limit)]


def _pending(session: Session, now: datetime, limit: int) -> list[tuple[int, int]]:
    """(id, stored size) of the rows pending_ids() names, in its order."""
    rows = list(
        session.execute(
            select(Inbound.id, Inbound.size)
            .where(Inbound.state == "pending")
            .order_by(Inbound.id)
            .limit(limit)
        )
    )
    rows += session.execute(
        select(Inbound.id, Inbound.size)
        .where(
            Inbound.state == "quarantined",
            Inbound.attempts < QUARANTINE_RETRIES,
            Inbound.next_attempt_at <= now,
        )
        .order_by(Inbound.id)
        .limit(limit)
    )
    return rows


def batches(rows: list[tuple[int, int]], count: int, size: int = BATCH_BYTES) -> list[list[int]]:
    """The ids cut into batches of at most `count` rows and `size` stored bytes (a row
    bigger than `size` alone), in order."""
    cut: list[list[int]] = []
    held = 0
    for row_id, row_size in rows:
        if not cut or len(cut[-1]) >= count or held + (row_size or 0) > size:
            cut.append([])
            held = 0
        cut[-1].append(row_id)
        held += row_size or 0
    return cut


def process_pending(
    desk: Desk,
    clock: Callable[[], datetime],
    stop: Callable[[], bool] | None = None,
    between_batches: Callable[[], None] | None = None,
) -> int:
    """Process everything pending; returns how many rows were handled.

    `stop` is asked between messages (a daemon shutting down finishes the one in hand);
    `between_batches` is called after each commit, outside any transaction. Rows another
    daemon holds or has done meanwhile are passed over and not counted. A batch is bounded
    by count (`batch_size`) and by stored bytes (`BATCH_BYTES`).
    """
    done = 0
    while True:
        with desk.db.sessions() as session:
            rows = _pending(session, clock(), PENDING_PAGE)
        if not rows:
            return done
        progress, deferred = 0, 0
        for batch in batches(rows, batch_size(desk)):
            if stop is not None and stop():
                return done
            for outcome in process_batch(desk, batch, clock, stop):
                progress += outcome.state in ("processed", "ignored", "quarantined")
                deferred += outcome.state == "deferred"
            if between_batches is not None:
                between_batches()
        done += progress
        if len(rows) < PENDING_PAGE and not (deferred and progress):
            return done
