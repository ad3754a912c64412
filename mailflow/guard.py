"""The loop and flood governor, delivery reports and failing-source backoff.

Policy is data: `[limits]` in config.toml and the rows of `suppressions`, `auto_replies` and
`alerts` (migration 0005).

- Automatic replies: a mail queued while an inbound mail is processed, *to that mail's
  sender*, is an automatic reply (acknowledgement, refusal …). `may_mail` counts them per
  sender and per ticket over the last hour; above `[limits] auto_replies_per_*_per_hour` they
  are withheld, the ticket records it and the service desk lead gets one alert per episode.
- Loops: a new mail from someone we mailed within `[limits] loop_window` (and dated after our
  mail) gets no automatic reply. An auto-responder that answers us, however it marks its mail,
  ends the exchange at its first answer; its mail is still recorded.
- Storms through third parties: two auto-responders can answer each other *through* the desk
  (A's answer is mailed to B, whose answer is mailed to A …), which the caps above, counting
  mail back to the sender, never see. So the mail the desk queues to anyone else while
  processing inbound mail is bounded too: at most `[limits] mails_per_ticket_per_hour` on one
  ticket, and nothing more from a sender whose new mails were taken for an auto-responder's
  answer twice within the hour. Withheld mail is recorded and the lead alerted once.
- Bounces (`delivery_report`): a report quoting the Message-ID of a mail we sent is attached
  to that outbox row and recorded on its ticket; a permanent failure suppresses the recipient
  for `[limits] bounce_suppress`. A report on no mail of ours changes nothing, so a forged
  bounce cannot silence an address. A person's own mail from a suppressed address lifts it.
- Sources (`SourceBackoff`): a failing mailbox is retried with a growing delay and the lead
  is alerted once per outage (at once for a refused login).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import bindparam, delete, func, insert, or_, select
from sqlalchemy.orm import Session

from mailflow import notify
from mailflow.loops import parse_bounce
from mailflow.mail import ParsedMail, parse
from mailflow.models import Alert, AutoReply, Inbound, Outbox, Suppression, Ticket
from mailflow.senders import is_desk_address
from mailflow.tickets import record

if TYPE_CHECKING:
    from mailflow.config import LimitSettings
    from mailflow.desk import Desk

log = logging.getLogger(__name__)

SYSTEM = "mailflow"
HOUR = timedelta(hours=1)
LOOP_SUSPECTED = "mail loop suspected"  # how a loop_window reason starts (counted below)
ALERT_QUIET = timedelta(hours=1)  # an alert episode ends after this long without the condition
DATE_SKEW = timedelta(minutes=2)  # tolerated clock difference between us and a sender
ALERT_TEMPLATE = "guard_alert"
_CONTEXT = "mailflow.guard"
_SUPPRESSED = "mailflow.suppressed"


# -- size limits -----------------------------------------------------------------------------


def _size(n: int) -> str:
    return f"{n / 1_000_000:.1f} MB" if n >= 100_000 else f"{n} bytes"


def parse_limited(raw: bytes, limits: LimitSettings) -> ParsedMail:
    """Parse within the size limits; what was left out is listed in `omitted`.

    A message over `max_message_bytes` keeps its text but none of its attachments (each is
    listed with its size); one over four times the limit is read only up to the limit.
    """
    size = len(raw)
    if size <= limits.max_message_bytes:
        return parse(
            raw,
            max_attachment_bytes=limits.max_attachment_bytes,
            max_attachments=limits.max_attachments,
        )
    cut = size > 4 * limits.max_message_bytes
    mail = parse(raw[: limits.max_message_bytes] if cut else raw, max_attachment_bytes=0)
    note = (
        f"邮件 {_size(size)} 超过上限 {_size(limits.max_message_bytes)}，附件未收录 / "
        f"message of {_size(size)} is over the {_size(limits.max_message_bytes)} limit: "
        + ("only its beginning was read" if cut else "attachments not kept")
    )
    mail.omitted.insert(0, note)
    return mail


def omitted_text(mail: ParsedMail) -> str:
    """One line naming everything the size limits left out ("" when nothing)."""
    return "; ".join(mail.omitted)[:4000]


# -- the context of one inbound mail -------------------------------------------------------


@dataclass
class Context:
    """The inbound mail being processed in this transaction (kept in `session.info`)."""

    sender: str
    inbound_id: int | None
    received_at: datetime | None
    date: datetime | None
    ticket: Ticket | None = None
    quiet: str | None = None  # why no automatic reply goes out for this mail
    noted: bool = False
    alerted: set[str] = field(default_factory=set)
    new: bool = False  # the mail opened its ticket
    fan_out: int | None = None  # mail queued on the ticket in the last hour (counted once)
    held: str | None = None  # why no mail to anyone else goes out for this mail


def begin(session: Session, mail: ParsedMail, inbound: Inbound, now: datetime) -> Context:
    """Start governing the mail in hand: its sender may get automatic replies."""
    ctx = Context(mail.from_addr, inbound.id, inbound.received_at, mail.date)
    session.info[_CONTEXT] = ctx
    lift(session, mail.from_addr, now)
    return ctx


def end(session: Session) -> None:
    session.info.pop(_CONTEXT, None)


def on_ticket(
    session: Session, desk: Desk, ticket: Ticket, mail: ParsedMail, inbound: Inbound,
    now: datetime, new: bool,
) -> None:
    """The mail's ticket is known: count replies on it, note a loop, record omissions."""
    ctx = session.info.get(_CONTEXT)
    if ctx is not None:
        ctx.ticket, ctx.new = ticket, new
        if new:
            ctx.quiet = _loop_reason(session, desk, ctx)
    left_out = omitted_text(mail)
    if not left_out:
        return
    if new:  # (a reply's stored text names it: pipeline.handle)
        ticket.omitted = left_out
    record(session, ticket, "omitted", SYSTEM, now, left_out, inbound_id=inbound.id)


# Both run on every new mail, so they are built once (building costs as much as running)
# and run on the session's connection: they read only rows already written.
_LAST_SENT = select(func.max(Outbox.sent_at)).where(
    Outbox.recipient == bindparam("sender"),
    Outbox.state == "sent",
    Outbox.sent_at >= bindparam("since"),
    Outbox.sent_at <= bindparam("until"),
)
_MINE = AutoReply.address == bindparam("sender")
_OURS = AutoReply.ticket_id == bindparam("ticket_id")  # NULL (no ticket) matches nothing
_SENT_SINCE = select(func.count().filter(_MINE), func.count().filter(_OURS)).where(
    or_(_MINE, _OURS), AutoReply.outcome == "sent", AutoReply.at > bindparam("since")
)
_INSERT_AUTO_REPLY = insert(AutoReply)


def _loop_reason(session: Session, desk: Desk, ctx: Context) -> str | None:
    """Why a new mail looks like an automatic answer to our mail (loop_window), else None."""
    window = desk.settings.limits.loop_window
    arrived = ctx.received_at
    if window <= timedelta(0) or arrived is None:
        return None
    last = session.connection().scalar(
        _LAST_SENT, {"sender": ctx.sender, "since": arrived - window, "until": arrived}
    )
    if last is None or (ctx.date is not None and ctx.date < last - DATE_SKEW):
        return None  # nothing of ours to answer, or written before our mail went out
    minutes = max((arrived - last).total_seconds(), 0) / 60
    return (
        f"{LOOP_SUSPECTED}: {ctx.sender} wrote {minutes:.1f} min after our mail of "
        f"{last:%Y-%m-%d %H:%M:%S} UTC (within [limits] loop_window)"
    )


# -- may this mail go out? -------------------------------------------------------------------


def _suppressed(session: Session, now: datetime) -> dict[str, Suppression]:
    """Suppressed addresses, read once per transaction."""
    cache = session.info.get(_SUPPRESSED)
    if cache is None:
        rows = session.scalars(select(Suppression).where(Suppression.until > now))
        cache = session.info[_SUPPRESSED] = {row.address: row for row in rows}
    return cache


def may_mail(session: Session, desk: Desk, address: str, now: datetime) -> bool:
    """Whether a mail to `address` may be queued now (suppression, loops, caps)."""
    address = address.strip().lower()
    if is_desk_address(desk, address):
        return False
    ctx: Context | None = session.info.get(_CONTEXT)
    held = _suppressed(session, now).get(address)
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


def _fan_out(session: Session, desk: Desk, ctx: Context, address: str, now: datetime) -> bool:
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


def _automatic_reply(session: Session, desk: Desk, ctx: Context, now: datetime) -> bool:
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


# -- alerts ------------------------------------------------------------------------------------


def alert(session: Session, desk: Desk, key: str, detail: str, now: datetime) -> bool:
    """Tell the service desk lead once per episode; True when a mail was queued.

    An episode lasts while the condition recurs less than ALERT_QUIET apart (or until
    `clear`); within it only the count and the time seen last move.
    """
    row = session.get(Alert, key)
    if row is not None and now - row.last_at < ALERT_QUIET:
        row.last_at, row.count = now, row.count + 1
        return False
    if row is None:
        session.add(Alert(key=key, first_at=now, last_at=now, count=1, detail=detail[:4000]))
    else:
        row.first_at = row.last_at = now
        row.count, row.detail = 1, detail[:4000]
    roles = desk.settings.roles
    to = roles.service_desk_lead or roles.service_desk
    ctx = session.info.pop(_CONTEXT, None)  # the governor's own mail is not governed
    try:
        notify.queue(session, desk, ALERT_TEMPLATE, to, now, key=key, detail=detail, at=now)
    finally:
        if ctx is not None:
            session.info[_CONTEXT] = ctx
    log.error("alert to %s: %s", ", ".join(to), detail)
    return True


def clear(session: Session, key: str) -> None:
    """The condition is over: the next occurrence alerts again."""
    session.execute(delete(Alert).where(Alert.key == key))


# -- bounces -----------------------------------------------------------------------------------


def suppress(
    session: Session, address: str, until: datetime, reason: str, now: datetime
) -> None:
    """Mail nothing to `address` until `until` (extending an existing suppression)."""
    row = session.get(Suppression, address)
    if row is None:
        row = Suppression(address=address, until=until, reason=reason[:2000], created_at=now)
        session.add(row)
    else:
        row.until, row.reason = max(row.until, until), reason[:2000]
    cache = session.info.get(_SUPPRESSED)
    if cache is not None:
        cache[address] = row


def lift(session: Session, address: str, now: datetime) -> None:
    """The address wrote to us itself: it works again."""
    row = _suppressed(session, now).pop(address, None)
    if row is not None:
        session.delete(row)


def safe_text(value: str) -> str:
    """Text safe to store: raw 8-bit bytes a parser left as surrogates become U+FFFD."""
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def delivery_report(
    session: Session, desk: Desk, inbound: Inbound, now: datetime
) -> str | None:
    """Attach a delivery report to the mail it reports on; None when it is not a report.

    Returns what happened, for the inbound row's reason.
    """
    bounce = parse_bounce(inbound.raw)
    if bounce is None:
        return None
    original = safe_text(bounce.original_message_id or "") or None
    for r in bounce.recipients:
        r.address, r.status = safe_text(r.address), safe_text(r.status)
        r.diagnostic = safe_text(r.diagnostic)
    row = (
        session.scalar(select(Outbox).where(Outbox.message_id == original)) if original else None
    )
    if row is None:
        return (
            f"delivery report on mail we did not send (Message-ID {original or 'not quoted'}): "
            "nothing attached, nothing suppressed"
        )
    matching = [r for r in bounce.recipients if r.address == row.recipient] or bounce.recipients
    failed = next((r for r in matching if r.permanent), matching[0] if matching else None)
    permanent = failed is not None and failed.permanent
    status = (
        f"{failed.status} {failed.action}: {failed.diagnostic}".strip() if failed else "failed"
    )[:2000]
    row.bounce, row.bounced_at = status, now
    inbound.ticket_id = row.ticket_id
    outcome = f"mail #{row.id} ({row.template}) to {row.recipient} bounced: {status}"
    if permanent:
        until = now + desk.settings.limits.bounce_suppress
        suppress(session, row.recipient, until, f"hard bounce of <{row.message_id}>: {status}", now)
        outcome += f"; {row.recipient} suppressed until {until:%Y-%m-%d %H:%M} UTC"
    ticket = session.get(Ticket, row.ticket_id) if row.ticket_id is not None else None
    if ticket is not None:
        record(session, ticket, "bounced", SYSTEM, now, outcome, recipient=row.recipient,
               outbox_id=row.id, inbound_id=inbound.id, permanent=permanent)
    return f"delivery report: {outcome}"


# -- failing mail sources -----------------------------------------------------------------------

SOURCE_ALERT_AFTER = 3  # consecutive failures (a refused login alerts at once)


def _login_refused(error: BaseException) -> bool:
    from mailflow.fetch import LoginRefused

    return isinstance(error, LoginRefused)


def source_failed(
    desk: Desk, name: str, error: BaseException, failures: int, now: datetime
) -> bool:
    """A mail source failed `failures` times in a row: alert the lead once per outage.

    A refused login alerts at once (it will not heal by itself), other errors from the
    SOURCE_ALERT_AFTER-th failure on. True when an alert mail was queued.
    """
    if not (_login_refused(error) or failures >= SOURCE_ALERT_AFTER):
        return False
    detail = f"{name}: {error} ({failures} failed attempt(s) in a row)"
    with desk.db.transaction() as session:
        return alert(session, desk, f"source:{name}", detail, now)


def source_recovered(desk: Desk, name: str) -> None:
    """The source works again: its next outage alerts again."""
    with desk.db.transaction() as session:
        clear(session, f"source:{name}")


@dataclass
class SourceBackoff:
    """Retry a failing mail source after 1, 2, 4 … at most 30 minutes; alert once."""

    name: str
    first: timedelta = timedelta(minutes=1)
    most: timedelta = timedelta(minutes=30)
    failures: int = 0
    retry_at: datetime | None = None
    checked: bool = False  # an alert left by an earlier process was cleared

    def due(self, now: datetime) -> bool:
        return self.retry_at is None or now >= self.retry_at

    def failed(self, desk: Desk, error: BaseException, now: datetime) -> datetime:
        """Record one failure; returns when to try again."""
        self.failures += 1
        self.retry_at = now + min(self.first * 2 ** (self.failures - 1), self.most)
        source_failed(desk, self.name, error, self.failures, now)
        return self.retry_at

    def succeeded(self, desk: Desk) -> None:
        if self.failures or not self.checked:
            source_recovered(desk, self.name)
        self.failures, self.retry_at, self.checked = 0, None, True
