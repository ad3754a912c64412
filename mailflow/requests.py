"""The request process (seed §4.2) by mail. Minimal: acknowledged and sent for approval."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session

from mailflow import notify
from mailflow.models import Inbound, Ticket

if TYPE_CHECKING:
    from mailflow.desk import Desk
    from mailflow.mail import ParsedMail


def on_new(
    session: Session, desk: Desk, ticket: Ticket, mail: ParsedMail, inbound: Inbound, now: datetime
) -> None:
    notify.queue(
        session, desk, "ack", [ticket.requester], now, ticket=ticket, in_reply_to=mail.message_id
    )


def on_reply(
    session: Session, desk: Desk, ticket: Ticket, mail: ParsedMail, inbound: Inbound, now: datetime
) -> None:
    from mailflow.tickets import record

    record(session, ticket, "comment", mail.from_addr, now, mail.new_text)
