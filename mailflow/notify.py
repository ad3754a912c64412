"""Notifications: render a template and queue one outbox row per recipient.

Queued in the caller's transaction, so a ticket change and its mail commit together. Every
mail gets a Message-ID remembered for threading, the subject tag, `Auto-Submitted` and our
marker header (so our own mail coming back is recognised and never answered).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable
from datetime import datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from mailflow import tracking
from mailflow.models import Outbox, Ticket

if TYPE_CHECKING:
    from mailflow.desk import Desk

MARKER = "X-Mailflow"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


def clean_header(value: str, limit: int = 200) -> str:
    """One line, no control characters (no header injection), bounded length."""
    value = " ".join(_CONTROL.sub(" ", value).split())
    return value if len(value) <= limit else value[: limit - 1] + "…"


def new_message_id(desk_address: str) -> str:
    domain = desk_address.rpartition("@")[2] or "mailflow.invalid"
    return f"mf.{uuid.uuid4().hex}@{domain}"


def build(
    desk: Desk,
    *,
    recipient: str,
    subject: str,
    text: str,
    html: str | None,
    message_id: str,
    now: datetime,
    ticket: Ticket | None,
    in_reply_to: str | None = None,
    reply_to: str | None = None,
    attachments: Iterable[tuple[str, str, bytes]] = (),
) -> EmailMessage:
    """The outgoing message, ready to send."""
    msg = EmailMessage(policy=SMTP)
    msg["From"] = Address(display_name=desk.settings.desk.name, addr_spec=desk.address)
    msg["To"] = recipient
    msg["Subject"] = subject
    msg["Date"] = format_datetime(now)
    msg["Message-ID"] = f"<{message_id}>"
    if in_reply_to:
        msg["In-Reply-To"] = f"<{in_reply_to}>"
        msg["References"] = f"<{in_reply_to}>"
    if reply_to:
        msg["Reply-To"] = reply_to
    msg["Auto-Submitted"] = "auto-generated"
    msg["X-Auto-Response-Suppress"] = "All"
    msg[MARKER] = ticket.ref if ticket is not None else "desk"
    msg.set_content(text, charset="utf-8")
    if html:
        msg.add_alternative(html, subtype="html", charset="utf-8")
    for filename, content_type, data in attachments:
        maintype, _, subtype = content_type.partition("/")
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    return msg


def queue(
    session: Session,
    desk: Desk,
    template: str,
    recipients: Iterable[str],
    now: datetime,
    *,
    ticket: Ticket | None = None,
    in_reply_to: str | None = None,
    reply_to: str | None = None,
    attachments: Iterable[tuple[str, str, bytes]] = (),
    message_id: str | None = None,
    **context: Any,
) -> list[Outbox]:
    """Render `template` and queue it for each distinct recipient (never the desk itself).

    `message_id` fixes the Message-ID (e.g. one carrying an approval token); it is only
    allowed with a single recipient, since every outgoing mail has its own.
    """
    rendered = desk.renderer.render(template, ticket=ticket, desk=desk.settings.desk, **context)
    subject = clean_header(rendered.subject)
    if ticket is not None and tracking.tag(ticket) not in subject:
        subject = f"{tracking.tag(ticket)} {subject}"
    attachments = list(attachments)
    rows = []
    targets = list(dict.fromkeys(r.strip().lower() for r in recipients if r))
    if message_id is not None and len(targets) > 1:
        raise ValueError("a fixed message_id needs exactly one recipient")
    for recipient in targets:
        if recipient == desk.address or not desk.may_mail(session, recipient, now):
            continue
        mid = message_id or new_message_id(desk.address)
        msg = build(
            desk,
            recipient=recipient,
            subject=subject,
            text=rendered.text,
            html=rendered.html,
            message_id=mid,
            now=now,
            ticket=ticket,
            in_reply_to=in_reply_to,
            reply_to=reply_to,
            attachments=attachments,
        )
        row = Outbox(
            ticket_id=ticket.id if ticket is not None else None,
            message_id=mid,
            template=template,
            sender=desk.address,
            recipient=recipient,
            subject=subject,
            text=rendered.text,
            raw=msg.as_bytes(),
            state="queued",
            attempts=0,
            next_attempt_at=now,
            created_at=now,
        )
        session.add(row)
        if ticket is not None:
            tracking.remember(session, ticket, mid)
        rows.append(row)
    return rows
