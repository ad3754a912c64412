"""Threading: which ticket a mail belongs to, whatever the client did to the subject."""

from __future__ import annotations

import re
from collections.abc import Iterable

from sqlalchemy import bindparam, insert, select
from sqlalchemy.orm import Session

from mailflow.models import Inbound, Outbox, ThreadRef, Ticket

TAG = re.compile(r"\[\s*(INC|REQ)\s*-\s*(\d{1,9})\s*\]", re.IGNORECASE)
KINDS = {"INC": "incident", "REQ": "request"}
# Message-IDs of a References (or In-Reply-To) list looked up: the last ones, the nearest
# in the thread (RFC 5322 §3.6.4 allows trimming the list so). No statement's parameter
# count grows with a header.
REFS_KEPT = 100


def tag(ticket: Ticket) -> str:
    """The subject tag, e.g. `[INC-42]`."""
    return f"[{ticket.ref}]"


def parse_ref(ref: str) -> tuple[str, int] | None:
    """`INC-42` → ("incident", 42); None when it is not a ticket ref."""
    match = re.fullmatch(r"\s*(INC|REQ)-(\d{1,9})\s*", ref, re.IGNORECASE)
    return (KINDS[match.group(1).upper()], int(match.group(2))) if match else None


# Built once (building a statement costs as much as running it): every reply asks these.
_BY_NUMBER = select(Ticket).where(
    Ticket.kind == bindparam("kind"), Ticket.number == bindparam("number")
)
_REFS = select(ThreadRef.message_id, ThreadRef.ticket_id).where(
    ThreadRef.message_id.in_(bindparam("ids", expanding=True))
)
_TICKETLESS = (
    select(Outbox.id)
    .where(Outbox.message_id.in_(bindparam("ids", expanding=True)), Outbox.ticket_id.is_(None))
    .limit(1)
)


def by_ref(session: Session, ref: str) -> Ticket | None:
    parsed = parse_ref(ref)
    if parsed is None:
        return None
    kind, number = parsed
    return session.scalar(_BY_NUMBER, {"kind": kind, "number": number})


def by_subject(session: Session, subject: str) -> Ticket | None:
    """The ticket named by the first tag in the subject that exists."""
    for match in TAG.finditer(subject):
        kind, number = KINDS[match.group(1).upper()], int(match.group(2))
        ticket = session.scalar(_BY_NUMBER, {"kind": kind, "number": number})
        if ticket is not None:
            return ticket
    return None


def by_message_ids(session: Session, message_ids: Iterable[str]) -> Ticket | None:
    """The ticket of the newest referenced Message-ID we know (sent or received), among the
    last `REFS_KEPT`."""
    ids = [m for m in message_ids if m][-REFS_KEPT:]
    if not ids:
        return None
    refs = dict(session.connection().execute(_REFS, {"ids": ids}).all())
    for message_id in reversed(ids):
        if message_id in refs:
            return session.get(Ticket, refs[message_id])
    return None


def answers_ticketless_mail(session: Session, in_reply_to: list[str]) -> bool:
    """Whether the mail answers one of our mails that belongs to no ticket (digest, report)."""
    if not in_reply_to:
        return False
    return session.connection().scalar(_TICKETLESS, {"ids": in_reply_to[-5:]}) is not None


def find_ticket(
    session: Session, subject: str, in_reply_to: list[str], references: list[str]
) -> Ticket | None:
    """Subject tag first, then In-Reply-To, then References."""
    return (
        by_subject(session, subject)
        or by_message_ids(session, in_reply_to)
        or by_message_ids(session, references)
    )


_OPENER = (
    select(Inbound.message_id)
    .where(Inbound.ticket_id == bindparam("ticket_id"))
    .order_by(Inbound.id)
    .limit(1)
)


def opener_id(session: Session, ticket_id: int) -> str | None:
    """The Message-ID of the mail that opened the ticket: the desk's later mails about it
    answer that one, so the requester's mail client shows them all in one thread."""
    return session.connection().scalar(_OPENER, {"ticket_id": ticket_id})


_KNOWN = select(ThreadRef.ticket_id).where(ThreadRef.message_id == bindparam("message_id"))
_REMEMBER = insert(ThreadRef)


def remember_ours(session: Session, ticket_id: int, message_ids: list[str]) -> None:
    """Record the Message-IDs of mail we just queued on a ticket: fresh ones, no lookup."""
    rows = [{"message_id": m, "ticket_id": ticket_id} for m in message_ids]
    session.connection().execute(_REMEMBER, rows)


def remember(session: Session, ticket: Ticket, message_id: str) -> None:
    """Record a Message-ID as belonging to the ticket (idempotent)."""
    if not message_id:
        return
    connection = session.connection()
    if connection.scalar(_KNOWN, {"message_id": message_id}) is None:
        connection.execute(_REMEMBER, {"message_id": message_id, "ticket_id": ticket.id})
