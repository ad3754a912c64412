"""The database schema: what the desk records.

Inbound mail (raw bytes first), tickets with their audit trail of events, the Message-IDs
that thread mail to tickets, the outbox of notifications, mailbox progress, and job runs
that make scheduled work happen once.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class UTCDateTime(TypeDecorator[datetime]):
    """Stores UTC; always returns timezone-aware datetimes (SQLite forgets the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime stored; pass an aware UTC datetime")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    pass


class Inbound(Base):
    """One fetched or ingested mail; raw bytes stored before anything else."""

    __tablename__ = "inbound"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source_key: Mapped[str] = mapped_column(String(500), unique=True)
    mailbox: Mapped[str] = mapped_column(String(300))
    uid: Mapped[int | None] = mapped_column(BigInteger)
    message_id: Mapped[str] = mapped_column(String(500), index=True)
    # Unique Message-ID of the first copy; NULL on later copies (state "ignored", duplicate).
    dedup_key: Mapped[str | None] = mapped_column(String(500), unique=True)
    raw: Mapped[bytes] = mapped_column(LargeBinary)
    size: Mapped[int] = mapped_column(Integer, default=0)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # pending | processed | ignored | quarantined
    state: Mapped[str] = mapped_column(String(20), default="pending", index=True)
    reason: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    processed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    ticket_id: Mapped[int | None] = mapped_column(ForeignKey("tickets.id"), index=True)
    from_addr: Mapped[str | None] = mapped_column(String(320))
    to_addrs: Mapped[str | None] = mapped_column(Text)
    subject: Mapped[str | None] = mapped_column(Text)
    text: Mapped[str | None] = mapped_column(Text)  # the new (unquoted) text
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # the mail's Date header


class Counter(Base):
    """Per-kind ticket numbers (INC-1, INC-2, REQ-1 …)."""

    __tablename__ = "counters"

    name: Mapped[str] = mapped_column(String(20), primary_key=True)
    value: Mapped[int] = mapped_column(Integer, default=0)


class Ticket(Base):
    """An incident or a service request."""

    __tablename__ = "tickets"
    __table_args__ = (
        UniqueConstraint("kind", "number"),
        # Know-how reuse: recent resolutions of one category (migration 0002), and of all
        # categories (0007) — without it the search read every open ticket.
        Index("ix_tickets_similar", "kind", "category", "resolved_at"),
        Index("ix_tickets_resolved", "kind", "resolved_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(20))  # incident | request
    number: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(30), index=True)
    priority: Mapped[str] = mapped_column(String(2))
    category: Mapped[str] = mapped_column(String(100))
    tier: Mapped[str | None] = mapped_column(String(4))
    major: Mapped[bool] = mapped_column(Boolean, default=False)
    desktop: Mapped[bool] = mapped_column(Boolean, default=False)
    rule: Mapped[str] = mapped_column(String(200))
    request_type: Mapped[str | None] = mapped_column(String(100))
    requester: Mapped[str] = mapped_column(String(320), index=True)
    requester_name: Mapped[str | None] = mapped_column(String(300))
    assignee: Mapped[str | None] = mapped_column(String(320))
    subject: Mapped[str] = mapped_column(Text)
    description: Mapped[str | None] = mapped_column(Text)
    solution: Mapped[str | None] = mapped_column(Text)
    # What the opening mail lost to the size limits (attachments kept out …), shown in notices.
    omitted: Mapped[str | None] = mapped_column(Text)
    form: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("tickets.id"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    responded_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    response_due_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    due_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    resolved_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    closed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    sla_warned_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    sla_breached_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # The response target passed with no staff action (recorded once; migration 0002).
    response_breached_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    events: Mapped[list[Event]] = relationship(
        back_populates="ticket", order_by="Event.id", cascade="all, delete-orphan"
    )
    # The requester's directory entry (department, phone, location), read when shown.
    requester_person: Mapped[Person | None] = relationship(
        primaryjoin="foreign(Ticket.requester) == Person.address", viewonly=True
    )

    @property
    def ref(self) -> str:
        return f"{'INC' if self.kind == 'incident' else 'REQ'}-{self.number}"


class Event(Base):
    """One change to a ticket: the audit trail and the source of SLA reports."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ticket_id: Mapped[int] = mapped_column(ForeignKey("tickets.id"), index=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    action: Mapped[str] = mapped_column(String(50))
    actor: Mapped[str] = mapped_column(String(320))
    detail: Mapped[str] = mapped_column(Text, default="")
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON)

    ticket: Mapped[Ticket] = relationship(back_populates="events")


class ThreadRef(Base):
    """A Message-ID we sent or received on a ticket, so replies find it."""

    __tablename__ = "thread_refs"

    message_id: Mapped[str] = mapped_column(String(500), primary_key=True)
    ticket_id: Mapped[int] = mapped_column(ForeignKey("tickets.id"), index=True)


class Party(Base):
    """Someone on a ticket besides its requester and its staff: a watcher or its vendor.

    Watchers (the Cc of the first mail, or added by command) are kept informed; the vendor is
    brought in by the engineers. Both may write to the ticket (senders.py: who is on a ticket).
    """

    __tablename__ = "parties"
    __table_args__ = (UniqueConstraint("ticket_id", "address", "role"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ticket_id: Mapped[int] = mapped_column(ForeignKey("tickets.id"), index=True)
    address: Mapped[str] = mapped_column(String(320))
    role: Mapped[str] = mapped_column(String(20))  # watcher | vendor
    added_at: Mapped[datetime] = mapped_column(UTCDateTime)
    added_by: Mapped[str] = mapped_column(String(320))


class Person(Base):
    """Someone the desk knows: who wrote to it, or who the directory lists (the requester's
    details, 维护用户信息). `first_seen`/`last_seen`: when the desk first and last heard of
    them, by mail or by a directory load; `source` says where the details came from."""

    __tablename__ = "people"

    address: Mapped[str] = mapped_column(String(320), primary_key=True)
    name: Mapped[str | None] = mapped_column(String(300))
    first_seen: Mapped[datetime] = mapped_column(UTCDateTime)
    last_seen: Mapped[datetime] = mapped_column(UTCDateTime)
    department: Mapped[str | None] = mapped_column(String(200))
    phone: Mapped[str | None] = mapped_column(String(100))
    location: Mapped[str | None] = mapped_column(String(200))
    language: Mapped[str | None] = mapped_column(String(35))  # a BCP 47 tag: zh-CN, en
    vip: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")
    source: Mapped[str] = mapped_column(String(10), default="mail", server_default="mail")
    synced_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # last csv/ldap load


class Outbox(Base):
    """One outgoing mail to one recipient; the Message-ID is fixed when queued."""

    __tablename__ = "outbox"
    __table_args__ = (
        Index("ix_outbox_due", "state", "next_attempt_at"),
        # Our last mail sent to an address (loop check on every mail; migration 0007).
        Index("ix_outbox_recipient_sent", "recipient", "state", "sent_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ticket_id: Mapped[int | None] = mapped_column(ForeignKey("tickets.id"), index=True)
    message_id: Mapped[str] = mapped_column(String(500), unique=True)
    template: Mapped[str] = mapped_column(String(100))
    sender: Mapped[str] = mapped_column(String(320))
    recipient: Mapped[str] = mapped_column(String(320))
    subject: Mapped[str] = mapped_column(Text)
    text: Mapped[str] = mapped_column(Text)
    raw: Mapped[bytes] = mapped_column(LargeBinary)
    # queued | sent | dead
    state: Mapped[str] = mapped_column(String(20), default="queued", index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # The relay sending it now (a lease owner string), else None (migration 0009).
    claimed_by: Mapped[str | None] = mapped_column(String(200))
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # A delivery report on this mail (migration 0005): "5.1.1 failed: …", and when it came.
    bounce: Mapped[str | None] = mapped_column(Text)
    bounced_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class MailboxState(Base):
    """Progress through one mailbox: the database is the record of what was consumed."""

    __tablename__ = "mailboxes"

    name: Mapped[str] = mapped_column(String(300), primary_key=True)
    uidvalidity: Mapped[int | None] = mapped_column(BigInteger)
    last_uid: Mapped[int] = mapped_column(BigInteger, default=0)
    last_poll_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)


class JobRun(Base):
    """A scheduled job's unit of work done once (e.g. one digest per person per day)."""

    __tablename__ = "job_runs"

    job: Mapped[str] = mapped_column(String(100), primary_key=True)
    key: Mapped[str] = mapped_column(String(300), primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime)


class KeyValue(Base):
    """Small persistent settings the desk generates itself (e.g. a token secret)."""

    __tablename__ = "kv"

    key: Mapped[str] = mapped_column(String(100), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class Approval(Base):
    """One approver's single-use decision token on one step of a request's approval chain.

    Only a hash of the token is kept; `decision` is set once (approve | reject) when the
    approver decides, or `void` when the step was decided by someone else or the token was
    replaced. A row with a decision never accepts another.
    """

    __tablename__ = "approvals"
    __table_args__ = (Index("ix_approvals_ticket_step", "ticket_id", "step"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ticket_id: Mapped[int] = mapped_column(ForeignKey("tickets.id"))
    step: Mapped[int] = mapped_column(Integer)  # 0-based position in the approval chain
    group: Mapped[str] = mapped_column(String(200))  # the chain entry this step came from
    approver: Mapped[str] = mapped_column(String(320))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    message_id: Mapped[str] = mapped_column(String(500))  # of the approval mail
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    decision: Mapped[str | None] = mapped_column(String(20))  # approve | reject | void
    reason: Mapped[str | None] = mapped_column(Text)


class Suppression(Base):
    """An address the desk does not mail until `until` (it hard-bounced)."""

    __tablename__ = "suppressions"

    address: Mapped[str] = mapped_column(String(320), primary_key=True)
    until: Mapped[datetime] = mapped_column(UTCDateTime)
    reason: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class AutoReply(Base):
    """One automatic reply (a mail to the sender of the mail being processed): sent or withheld.

    The loop and flood governor counts these per sender and per ticket.
    """

    __tablename__ = "auto_replies"
    __table_args__ = (
        Index("ix_auto_replies_address_at", "address", "at"),
        Index("ix_auto_replies_ticket_at", "ticket_id", "at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    address: Mapped[str] = mapped_column(String(320))
    ticket_id: Mapped[int | None] = mapped_column(Integer)
    inbound_id: Mapped[int | None] = mapped_column(Integer)
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    outcome: Mapped[str] = mapped_column(String(20))  # sent | withheld
    reason: Mapped[str | None] = mapped_column(Text)


class Alert(Base):
    """An alert told to the service desk lead once per episode (a tripped cap, a failing login).

    `last_at` moves while the condition lasts; a new alert is sent only after a quiet period.
    """

    __tablename__ = "alerts"

    key: Mapped[str] = mapped_column(String(400), primary_key=True)
    first_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_at: Mapped[datetime] = mapped_column(UTCDateTime)
    count: Mapped[int] = mapped_column(Integer, default=1)
    detail: Mapped[str] = mapped_column(Text, default="")


class Blob(Base):
    """The bytes of an attachment, stored once however many mails carry them."""

    __tablename__ = "blobs"

    hash: Mapped[str] = mapped_column(String(64), primary_key=True)  # SHA-256, hex
    size: Mapped[int] = mapped_column(Integer)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class TicketAttachment(Base):
    """A file a mail on a ticket carried (an inline image of HTML mail too), by its blob."""

    __tablename__ = "attachments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ticket_id: Mapped[int] = mapped_column(ForeignKey("tickets.id"), index=True)
    inbound_id: Mapped[int | None] = mapped_column(ForeignKey("inbound.id"), index=True)
    blob_hash: Mapped[str] = mapped_column(ForeignKey("blobs.hash"))
    filename: Mapped[str] = mapped_column(String(300))
    content_type: Mapped[str] = mapped_column(String(200))
    size: Mapped[int] = mapped_column(Integer)
    inline: Mapped[bool] = mapped_column(Boolean, default=False)  # no name of its own
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


def utcnow() -> datetime:
    return datetime.now(UTC)
