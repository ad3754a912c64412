"""The automatic-reply and fan-out governor: may a mail be queued while inbound mail is
processed?

Policy is data: `[limits]` in config.toml and the rows of `suppressions`, `auto_replies` and
`alerts` (migration 0005).

- Loops (`loop_detection`) are told by what they look like, not by how much someone writes:
  a mail that answers ours at machine speed gets no automatic reply, and one whose signals
  mark a machine (answering every mail of ours within minutes, the same text, a subject
  with a counter, a regular beat) causes no mail to anyone. The ticket records what was
  withheld and the service desk lead gets one alert per episode (`loop:<sender>`). This
  stops both an auto-responder answering us and two auto-responders answering each other
  *through* the desk (A's answer mailed to B, whose answer is mailed to A …).
- Automatic replies (a mail to the sender of the mail in hand: acknowledgement, refusal …)
  are capped as a safety net, per sender per hour and per day and per ticket per hour,
  counted by when each mail was *written* (its Date, clipped to arrival): a person's ten
  reports in an hour, or a weekend's mail drained after an outage, are all answered.
- Mail to anyone else on one ticket is capped at `[limits] mails_per_ticket_per_hour`.
- Suppressed addresses (`bounces`) get nothing; the desk's own addresses neither.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import bindparam, func, insert, or_, select
from sqlalchemy.orm import Session

from mailflow import bounces, loop_detection, mail_in_hand
from mailflow.alerts import alert
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
DAY = timedelta(days=1)


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
    """The mail's ticket is known: judge whether a machine wrote it, record omissions."""
    ctx = mail_in_hand.current(session)
    if ctx is not None:
        ctx.ticket, ctx.new = ticket, new
        _judge(session, desk, ctx, mail, now)
    left_out = omitted_text(mail)
    if not left_out:
        return
    if new:  # (a reply's stored text names it: pipeline.handle)
        ticket.omitted = left_out
    record(session, ticket, "omitted", SYSTEM, now, left_out, inbound_id=inbound.id)


def _judge(session: Session, desk: Desk, ctx: InHand, mail: ParsedMail, now: datetime) -> None:
    """Set what goes out for the mail in hand; a machine's mail alerts the lead at once."""
    limits = desk.settings.limits
    verdict = loop_detection.verdict(session, limits, ctx, mail.subject, mail.new_text)
    ctx.quiet = verdict.quiet
    if verdict.machine is None or ctx.ticket is None:
        return
    ctx.held = f"{ctx.sender}: {verdict.machine}: nobody is mailed about it"
    record(session, ctx.ticket, "loop_suspected", SYSTEM, now, ctx.held, sender=ctx.sender)
    log.warning("%s: %s", ctx.ticket.ref, ctx.held)
    key = f"loop:{ctx.sender}"
    ctx.alerted.add(key)
    alert(session, desk, key, f"{ctx.ticket.ref}: {ctx.held}", now)


# Built once (building costs as much as running), run on the session's connection.
_MINE = AutoReply.address == bindparam("sender")
_OURS = AutoReply.ticket_id == bindparam("ticket_id")  # NULL (no ticket) matches nothing
_THIS_HOUR = AutoReply.at > bindparam("hour")
_SENT_SINCE = select(
    func.count().filter(_MINE, _THIS_HOUR), func.count().filter(_MINE),
    func.count().filter(_OURS, _THIS_HOUR),
).where(
    or_(_MINE, _OURS), AutoReply.outcome == "sent",
    AutoReply.at > bindparam("day"), AutoReply.at <= bindparam("at"),
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


def _fan_out(session: Session, desk: Desk, ctx: InHand, address: str, now: datetime) -> bool:
    """Allow or withhold a mail to someone other than the sender in hand: nothing about a
    machine's mail, and at most mails_per_ticket_per_hour on its ticket."""
    if ctx.ticket is None:
        return True
    key = None
    if ctx.fan_out is None:  # counted once per mail; a ticket it opened has none yet
        ctx.fan_out = 0 if ctx.new else session.connection().scalar(
            _TICKET_MAIL_SINCE, {"ticket_id": ctx.ticket.id, "since": now - HOUR}
        ) or 0
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


def _cap_reason(
    session: Session, desk: Desk, ctx: InHand, at: datetime
) -> tuple[str, str] | None:
    """The safety-net cap an automatic reply to a mail written at `at` would pass, with its
    alert key; None within them all. Counted by when each mail was written: one query."""
    ticket = ctx.ticket
    params = {"sender": ctx.sender, "ticket_id": ticket.id if ticket is not None else None,
              "at": at, "hour": at - HOUR, "day": at - DAY}
    hour, day, on_ticket = session.connection().execute(_SENT_SINCE, params).one()
    caps = [  # (replies counted, [limits] key, where, alert key), in the order checked
        (hour, "auto_replies_per_sender_per_hour", f"to {ctx.sender} within the hour",
         f"cap:sender:{ctx.sender}"),
        (day, "auto_replies_per_sender_per_day", f"to {ctx.sender} within the day",
         f"cap:sender:{ctx.sender}"),
    ]
    if ticket is not None:
        caps.append((on_ticket, "auto_replies_per_ticket_per_hour",
                     f"on {ticket.ref} within the hour", f"cap:ticket:{ticket.ref}"))
    for count, key, where, alert_key in caps:
        cap = getattr(desk.settings.limits, key)
        if count >= cap:
            return f"{count} automatic replies {where} (limits.{key} = {cap})", alert_key
    return None


def _automatic_reply(session: Session, desk: Desk, ctx: InHand, now: datetime) -> bool:
    """Allow (and count) or withhold one automatic reply to the sender in hand."""
    ticket_id = ctx.ticket.id if ctx.ticket is not None else None
    at = loop_detection.written_at(ctx.date, ctx.received_at or now, desk.settings.limits)
    why, key = ctx.quiet, None
    if why is None:
        why, key = _cap_reason(session, desk, ctx, at) or (None, None)
    session.connection().execute(
        _INSERT_AUTO_REPLY,
        {"address": ctx.sender, "ticket_id": ticket_id, "inbound_id": ctx.inbound_id,
         "at": at, "outcome": "withheld" if why else "sent", "reason": why},
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
