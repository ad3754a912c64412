"""Notifications: render a template and queue one outbox row per recipient.

Queued in the caller's transaction, so a ticket change and its mail commit together. Every
mail gets a Message-ID remembered for threading, the subject tag, `Auto-Submitted` and our
marker header (so our own mail coming back is recognised and never answered).
"""

from __future__ import annotations

import base64
import re
import uuid
from collections.abc import Iterable
from datetime import datetime
from email.encoders import encode_base64
from email.header import Header
from email.message import Message
from email.mime.base import MIMEBase
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.policy import Compat32
from email.utils import format_datetime, formataddr
from functools import lru_cache
from typing import TYPE_CHECKING, Any, NamedTuple

from sqlalchemy import insert
from sqlalchemy.orm import Session

from mailflow import senders, tracking
from mailflow.attachments import listing
from mailflow.models import Outbox, Ticket
from mailflow.render import REPLY_PLACEHOLDER

if TYPE_CHECKING:
    from mailflow.desk import Desk

MARKER = "X-Mailflow"


class _Wire(Compat32):
    """compat32 with CRLF, for headers encoded when they are set (RFC 2047, one line).

    compat32 runs every header through `Header` again on the way out, which costs more
    than building the message; a value of printable ASCII is written as it is instead (the
    same bytes). Anything else still takes compat32's way.
    """

    def fold_binary(self, name: str, value: Any) -> bytes:
        if isinstance(value, str) and _PRINTABLE.fullmatch(value):
            return f"{name}: {value}{self.linesep}".encode("ascii")
        return super().fold_binary(name, value)


_PRINTABLE = re.compile(r"[\x20-\x7e]*")  # no line break of any kind (str.splitlines)
WIRE = _Wire(linesep="\r\n", max_line_length=None)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


_INSERT_OUTBOX = insert(Outbox)
# Stands for the HTML part's base64 body in a built message when that part is each
# recipient's own (its action links name their reply address): see `build` and `addressed`.
HTML_SLOT = b"MAILFLOW-PERSONAL-HTML-PART"


class Queued(NamedTuple):
    """One queued mail, as its outbox row holds it."""

    message_id: str
    recipient: str
    subject: str
    text: str
    reply_to: str | None = None


def clean_header(value: str, limit: int = 200) -> str:
    """One line, no control characters (no header injection), bounded length."""
    value = " ".join(_CONTROL.sub(" ", value).split())
    return value if len(value) <= limit else value[: limit - 1] + "…"


@lru_cache(maxsize=8)
def _from_header(name: str, address: str) -> str:
    """The desk as sender, its name RFC 2047-encoded: the same on every mail, so once."""
    return formataddr((str(Header(clean_header(name), "utf-8")), address))


def new_message_id(desk_address: str) -> str:
    domain = desk_address.rpartition("@")[2] or "mailflow.invalid"
    return f"mf.{uuid.uuid4().hex}@{domain}"


def build(
    desk: Desk,
    *,
    subject: str,
    text: str,
    html: str | None,
    now: datetime,
    ticket: Ticket | None,
    in_reply_to: str | None = None,
    attachments: Iterable[tuple[str, str, bytes]] = (),
    inline: Iterable[tuple[str, str, bytes]] = (),
) -> bytes:
    """The outgoing message on the wire, less `To`, `Message-ID` and `Reply-To`, which are
    each recipient's own (see `addressed`).

    Built and serialised once for all the recipients of a notification (compat32 MIME
    classes: 6× faster to build than EmailMessage). `inline` (Content-ID, type, data) parts
    go with the HTML in a multipart/related, so the HTML shows them as `<img src="cid:...">`.
    An HTML part with action links (which name each recipient's reply address) is left as
    `HTML_SLOT`, encoded for each recipient in `addressed`.
    """
    body: Message = MIMEText(text, "plain", "utf-8")
    if html:
        alternative = MIMEMultipart("alternative")
        alternative.attach(body)
        alternative.attach(_related(_html_part(html), inline))
        body = alternative
    attachments = list(attachments)
    if attachments:
        mixed = MIMEMultipart("mixed")
        mixed.attach(body)
        for filename, content_type, data in attachments:
            maintype, _, subtype = content_type.partition("/")
            part = MIMEBase(maintype, subtype)
            part.set_payload(data)
            encode_base64(part)
            part.add_header("Content-Disposition", "attachment", filename=("utf-8", "", filename))
            mixed.attach(part)
        body = mixed
    body["From"] = _from_header(desk.settings.desk.name, desk.address)
    body["Subject"] = Header(clean_header(subject), "utf-8").encode()
    body["Date"] = format_datetime(now)
    if in_reply_to:
        body["In-Reply-To"] = f"<{clean_header(in_reply_to, 500)}>"
        body["References"] = f"<{clean_header(in_reply_to, 500)}>"
    body["Auto-Submitted"] = "auto-generated"
    body["X-Auto-Response-Suppress"] = "All"
    body[MARKER] = ticket.ref if ticket is not None else "desk"
    return body.as_bytes(policy=WIRE)


def _html_part(html: str) -> Message:
    if REPLY_PLACEHOLDER not in html:
        return MIMEText(html, "html", "utf-8")
    part = MIMEBase("text", "html", charset="utf-8")
    part["Content-Transfer-Encoding"] = "base64"
    part.set_payload(HTML_SLOT.decode("ascii"))
    return part


def personal_html(html: str, reply_address: str) -> bytes:
    """One recipient's HTML part body: action links to their reply address, base64 in
    76-character lines as the MIME classes write it."""
    data = html.replace(REPLY_PLACEHOLDER, reply_address).encode("utf-8")
    encoded = base64.encodebytes(data).replace(b"\n", b"\r\n")
    return encoded.rstrip(b"\r\n")


def addressed(
    wire: bytes, recipient: str, message_id: str, reply_to: str | None = None,
    html: bytes | None = None,
) -> bytes:
    """One recipient's copy of a built message: its own `To`, `Message-ID` and `Reply-To`
    (which carry that recipient's reply token) in front, and its own HTML part (`html`,
    from `personal_html`) in the slot `build` left."""
    head = f"To: {clean_header(recipient, 320)}\r\nMessage-ID: <{message_id}>\r\n"
    if reply_to:
        head += f"Reply-To: {clean_header(reply_to, 320)}\r\n"
    if html is not None:
        wire = wire.replace(HTML_SLOT, html, 1)
    return head.encode("utf-8") + wire


def _related(html: Message, inline: Iterable[tuple[str, str, bytes]]) -> Message:
    parts = list(inline)
    if not parts:
        return html
    related = MIMEMultipart("related", type="text/html")  # RFC 2387: the root's type
    related.attach(html)
    for cid, content_type, data in parts:
        maintype, _, subtype = content_type.partition("/")
        part = MIMEBase(maintype, subtype)
        part.set_payload(data)
        encode_base64(part)
        part.add_header("Content-ID", f"<{cid}>")
        part.add_header("Content-Disposition", "inline", filename=cid.split("@")[0])
        related.attach(part)
    return related


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
    inline: Iterable[tuple[str, str, bytes]] = (),
    message_id: str | None = None,
    **context: Any,
) -> list[Queued]:
    """Render `template` and queue it for each distinct recipient (never the desk itself).

    `message_id` fixes the Message-ID (e.g. one carrying an approval token); it is only
    allowed with a single recipient, since every outgoing mail has its own. A mail about a
    ticket answers `in_reply_to`, by default the mail that opened the ticket, and carries
    each recipient's reply token (senders.py) in its Message-ID and Reply-To, so their reply
    proves who wrote it.
    """
    if in_reply_to is None and ticket is not None and ticket.id is not None:
        in_reply_to = tracking.opener_id(session, ticket.id)  # one thread per ticket
    context["attachments"] = listing(session, ticket.id if ticket else None)  # named in notices
    rendered = desk.renderer.render(
        template, ticket=ticket, desk=desk.settings.desk, rules=desk.rules, **context
    )
    subject = clean_header(rendered.subject)
    if ticket is not None and tracking.tag(ticket) not in subject:
        subject = f"{tracking.tag(ticket)} {subject}"
    rows: list[Queued] = []
    targets = list(dict.fromkeys(r.strip().lower() for r in recipients if r))
    if message_id is not None and len(targets) > 1:
        raise ValueError("a fixed message_id needs exactly one recipient")
    targets = [r for r in targets if r != desk.address and desk.may_mail(session, r, now)]
    if not targets:
        return rows
    wire = build(
        desk,
        subject=subject,
        text=rendered.text,
        html=rendered.html,
        now=now,
        ticket=ticket,
        in_reply_to=in_reply_to,
        attachments=attachments,
        inline=inline,
    )
    ticket_id = ticket.id if ticket is not None else None
    for recipient in targets:
        mid, their_reply_to = _addressing(session, desk, ticket_id, recipient, message_id, reply_to)
        rows.append(Queued(mid, recipient, subject, rendered.text, their_reply_to))
    outbox = [
        {
            "ticket_id": ticket_id, "message_id": q.message_id, "template": template,
            "sender": desk.address, "recipient": q.recipient, "subject": subject,
            "text": rendered.text,
            "raw": addressed(
                wire, q.recipient, q.message_id, q.reply_to,
                _personal(rendered.html, q.reply_to or desk.address),
            ),
            "state": "queued", "attempts": 0, "next_attempt_at": now, "created_at": now,
        }
        for q in rows
    ]
    # Written at once with a multi-row insert: no ORM object is needed for mail that only
    # waits for the relay.
    session.connection().execute(_INSERT_OUTBOX, outbox)
    if ticket_id is not None:
        tracking.remember_ours(session, ticket_id, [q.message_id for q in rows])
    return rows


def _personal(html: str | None, reply_address: str) -> bytes | None:
    if html is None or REPLY_PLACEHOLDER not in html:
        return None
    return personal_html(html, reply_address)


def _addressing(
    session: Session, desk: Desk, ticket_id: int | None, recipient: str,
    message_id: str | None, reply_to: str | None,
) -> tuple[str, str | None]:
    """The Message-ID and Reply-To of one recipient's copy: with their reply token when the
    mail is about a ticket (unless the caller fixed them, as approval mails do)."""
    if ticket_id is None:
        return message_id or new_message_id(desk.address), reply_to
    token = senders.reply_token(senders.secret(session, desk), ticket_id, recipient)
    mid = message_id or senders.reply_message_id(desk.address, token, uuid.uuid4().hex[:20])
    if reply_to is None and desk.settings.security.plus_address:
        reply_to = senders.reply_address(desk.address, token)
    return mid, reply_to
