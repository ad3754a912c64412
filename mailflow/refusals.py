"""What the desk answers when it does not act on a mail about a ticket (senders.py decides).

- An **unproven** command is not applied. It is recorded on the ticket, and the claimed
  sender — the From address, never whoever wrote the mail — is told once per ticket why, and
  how to act: reply to the desk's own mail, whose reply token proves them.
- A **stranger** (nobody on the ticket) is recorded for the staff; the mail is passed on to
  nobody. They are told once per ticket that it was kept, in words that name no subject,
  status or person of the ticket.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import bindparam, func, select
from sqlalchemy.orm import Session

from mailflow import notify
from mailflow.models import Event, Ticket
from mailflow.tickets import record

if TYPE_CHECKING:
    from mailflow.commands import Command
    from mailflow.desk import Desk
    from mailflow.mail import ParsedMail
    from mailflow.senders import Sender

_EARLIER = select(func.count(Event.id)).where(
    Event.ticket_id == bindparam("ticket_id"),
    Event.action == bindparam("action"),
    Event.actor == bindparam("actor"),
)


def _first(session: Session, ticket: Ticket, action: str, actor: str) -> bool:
    """Whether no event `action` by `actor` is on the ticket yet."""
    params = {"ticket_id": ticket.id, "action": action, "actor": actor}
    return not session.connection().scalar(_EARLIER, params)


def unproven(
    session: Session, desk: Desk, ticket: Ticket, sender: Sender, cmd: Command, now: datetime
) -> None:
    """Record an unproven command and tell the claimed sender once how to act."""
    first = _first(session, ticket, "unproven", sender.address)
    record(
        session, ticket, "unproven", sender.address, now, f"{cmd.action}: {sender.doubt}",
        command=cmd.action, text=cmd.text[:4000],
    )
    if first:
        notify.queue(
            session, desk, "unproven", [sender.address], now, ticket=ticket, command=cmd,
            reason=sender.doubt, address=sender.address, received_at=now,
        )


def stranger(
    session: Session, desk: Desk, ticket: Ticket, mail: ParsedMail, inbound_id: int,
    now: datetime,
) -> None:
    """Keep a mail from someone not on the ticket for the staff; tell them once, blandly."""
    address = mail.from_addr.strip().lower()
    first = _first(session, ticket, "stranger", address)
    record(
        session, ticket, "stranger", address, now, mail.new_text[:4000], inbound_id=inbound_id
    )
    if first:  # about no ticket: no tag, subject, status or name reaches them
        notify.queue(
            session, desk, "not_on_ticket", [address], now, in_reply_to=mail.message_id
        )
