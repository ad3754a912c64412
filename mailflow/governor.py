"""The automatic-reply and fan-out governor: may a mail be queued while inbound mail is
processed?

Policy is data: `[limits]` in config.toml and the rows of `suppressions`, `auto_replies` and
`alerts` (migration 0005).

- Automatic replies: a mail queued while an inbound mail is processed, *to that mail's
  sender*, is an automatic reply (acknowledgement, refusal …). `may_mail` counts them per
  sender and per ticket over the last hour; above `[limits] auto_replies_per_*_per_hour` they
  are withheld, the ticket records it and the service desk lead gets one alert per episode.
- Loops (`loop_detection`): a mail taken for an auto-responder's answer gets no automatic
  reply; it is still recorded.
- Storms through third parties: two auto-responders can answer each other *through* the desk
  (A's answer is mailed to B, whose answer is mailed to A …), which the caps above, counting
  mail back to the sender, never see. So the mail the desk queues to anyone else while
  processing inbound mail is bounded too: at most `[limits] mails_per_ticket_per_hour` on one
  ticket, and nothing more from a sender whose new mails were taken for an auto-responder's
  answer twice within the hour. Withheld mail is recorded and the lead alerted once.
- Suppressed addresses (`bounces`) get nothing; the desk's own addresses neither.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import bindparam, func, insert, or_, select
from sqlalchemy.orm import Session

from mailflow import bounces, mail_in_hand
from mailflow.alerts import alert
from mailflow.loop_detection import LOOP_SUSPECTED, loop_reason
from mailflow.mail import ParsedMail
from mailflow.mail_in_hand import InHand
from mailflow.models import AutoReply, Inbound, Outbox, Ticket
from mailflow.senders import is_desk_address
from mailflow.size_limits import omitted_text
from mailflow.tickets import SYSTEM, record

if TYPE_CHECKING:
    from mailflow.desk import Desk

log = logging.getLogger(__name__)

HOUR = timedelta(hours=1)


def begin(session: Session, mail: ParsedMail, inbound: Inbound, now: datetime) -> InHand:
    """Start governing the mail in hand: its sender may get automatic replies."""
    ctx = InHand(mail.from_addr, inbound.id, inbound.received_at, mail.date)
    mail_in_hand.put(session, ctx)
    bounces.lift(session, mail.from_addr, now)
    return ctx


def end(session: Session) -> None:
    mail_in_hand.drop(session)


def on_ticket(
    session: Session, desk: Desk, ticket: Ticket, mail: ParsedMail, inbound: Inbound,
    now: datetime, new: bool,
) -> None:
    """The mail's ticket is known: count replies on it, note a loop, record omissions."""
    ctx = mail_in_hand.current(session)
    if ctx is not None:
        ctx.ticket, ctx.new = ticket, new
        if new:
            ctx.quiet = loop_reason(session, desk, ctx)
    left_out = omitted_text(mail)
    if not left_out:
        return
    if new:  # (a reply's stored text names it: pipeline.handle)
        ticket.omitted = left_out
    record(session, ticket, "omitted", SYSTEM, now, left_out, inbound_id=inbound.id)


# Built once (building costs as much as running), run on the session's connection.
_MINE = AutoReply.address == bindparam("sender")
_OURS = AutoReply.ticket_id == bindparam("ticket_id")  # NULL (no ticket) matches nothing
_SENT_SINCE = select(func.count().filter(_MINE), func.count().filter(_OURS)).where(
    or_(_MINE, _OURS), AutoReply.outcome == "sent", AutoReply.at > bindparam("since")
)
_INSERT_AUTO_REPLY = insert(AutoReply)


# -- may this mail go out? -------------------------------------------------------------------


def may_mail(session: Session, desk: Desk, address: str, now: datetime) -> bool:
    """Whether a mail to `address` may be queued now (suppression, loops, caps)."""
    address = address.strip().lower()
    if is_desk_address(desk, address):
        return False
    ctx = mail_in_hand.current(session)
    held = bounces.suppressed(session, now).get(address)
    if held is not None and held.until > now:
        if ctx is not None and ctx.ticket is not None:
            record(session, ctx.ticket, "not_mailed", SYSTEM, now,
                   f"{address} suppressed until {held.until:%Y-%m-%d %H:%M} UTC: {held.reason}")
        return False
    if ctx is None:
        return True
    if address == ctx.sender:
        return _automatic_reply(session, desk, ctx, now)
    return _fan_out(session, desk, ctx, address, now)


_TICKET_MAIL_SINCE = select(func.count(Outbox.id)).where(
    Outbox.ticket_id == bindparam("ticket_id"), Outbox.created_at > bindparam("since")
)
_LOOPS_SINCE = select(func.count(AutoReply.id)).where(
    AutoReply.address == bindparam("sender"),
    AutoReply.outcome == "withheld",
    AutoReply.reason.startswith(LOOP_SUSPECTED),
    AutoReply.inbound_id != bindparam("inbound_id"),
    AutoReply.at > bindparam("since"),
)


def _fan_out(session: Session, desk: Desk, ctx: InHand, address: str, now: datetime) -> bool:
    """Allow or withhold a mail to someone other than the sender in hand (see the module
    docstring: storms through third parties)."""
    if ctx.ticket is None:
        return True
    connection, key = session.connection(), None
    if ctx.fan_out is None:  # counted once per mail; a ticket it opened has none yet
        since = now - HOUR
        ctx.fan_out = 0 if ctx.new else connection.scalar(
            _TICKET_MAIL_SINCE, {"ticket_id": ctx.ticket.id, "since": since}
        ) or 0
        if ctx.quiet is not None and connection.scalar(
            _LOOPS_SINCE, {"sender": ctx.sender, "inbound_id": ctx.inbound_id, "since": since}
        ):
            ctx.held = f"{ctx.quiet}, again within the hour: nobody else is mailed about it"
            key = f"loop:{ctx.sender}"
    cap = desk.settings.limits.mails_per_ticket_per_hour
    if ctx.held is None and ctx.fan_out >= cap:
        ctx.held = (
            f"{ctx.fan_out} mails on {ctx.ticket.ref} in the last hour "
            f"(limits.mails_per_ticket_per_hour = {cap})"
        )
        key = f"cap:mails:{ctx.ticket.ref}"
    if ctx.held is None:
        ctx.fan_out += 1
        return True
    record(session, ctx.ticket, "not_mailed", SYSTEM, now, ctx.held, to=address)
    if key is not None and key not in ctx.alerted:
        ctx.alerted.add(key)
        log.warning("%s: %s", ctx.ticket.ref, ctx.held)
        alert(session, desk, key, ctx.held, now)
    return False


def _sent_last_hour(
    session: Session, sender: str, ticket_id: int | None, now: datetime
) -> tuple[int, int]:
    """Automatic replies sent in the last hour to the sender, and on the ticket: one query."""
    params = {"sender": sender, "ticket_id": ticket_id, "since": now - HOUR}
    to_sender, on_ticket = session.connection().execute(_SENT_SINCE, params).one()
    return to_sender, on_ticket


def _automatic_reply(session: Session, desk: Desk, ctx: InHand, now: datetime) -> bool:
    """Allow (and count) or withhold one automatic reply to the sender in hand."""
    limits = desk.settings.limits
    ticket_id = ctx.ticket.id if ctx.ticket is not None else None
    why, key = ctx.quiet, None
    if why is None:
        to_sender, on_ticket = _sent_last_hour(session, ctx.sender, ticket_id, now)
        if to_sender >= limits.auto_replies_per_sender_per_hour:
            why = (
                f"{to_sender} automatic replies to {ctx.sender} in the last hour "
                f"(limits.auto_replies_per_sender_per_hour = "
                f"{limits.auto_replies_per_sender_per_hour})"
            )
            key = f"cap:sender:{ctx.sender}"
        elif ticket_id is not None and on_ticket >= limits.auto_replies_per_ticket_per_hour:
            assert ctx.ticket is not None
            why = (
                f"{on_ticket} automatic replies on {ctx.ticket.ref} in the last hour "
                f"(limits.auto_replies_per_ticket_per_hour = "
                f"{limits.auto_replies_per_ticket_per_hour})"
            )
            key = f"cap:ticket:{ctx.ticket.ref}"
    session.connection().execute(
        _INSERT_AUTO_REPLY,
        {"address": ctx.sender, "ticket_id": ticket_id, "inbound_id": ctx.inbound_id,
         "at": now, "outcome": "withheld" if why else "sent", "reason": why},
    )
    if why is None:
        return True
    log.warning("automatic reply to %s withheld: %s", ctx.sender, why)
    if ctx.ticket is not None and not ctx.noted:
        ctx.noted = True
        record(session, ctx.ticket, "auto_reply_withheld", SYSTEM, now, why, to=ctx.sender)
    if key is not None and key not in ctx.alerted:
        ctx.alerted.add(key)
        alert(session, desk, key, why, now)
    return False
