"""Delivery reports and the addresses they suppress.

A report quoting the Message-ID of a mail we sent is attached to that outbox row and recorded
on its ticket; a permanent failure suppresses the recipient for `[limits] bounce_suppress`.
A report on no mail of ours changes nothing, so a forged bounce cannot silence an address.
A person's own mail from a suppressed address lifts it (`lift`).
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session

from mailflow.loops import parse_bounce
from mailflow.models import Inbound, Outbox, Suppression, Ticket
from mailflow.tickets import SYSTEM, record

if TYPE_CHECKING:
    from mailflow.desk import Desk

_SUPPRESSED = "mailflow.suppressed"


def suppressed(session: Session, now: datetime) -> dict[str, Suppression]:
    """Suppressed addresses, read once per transaction."""
    cache = session.info.get(_SUPPRESSED)
    if cache is None:
        rows = session.scalars(select(Suppression).where(Suppression.until > now))
        cache = session.info[_SUPPRESSED] = {row.address: row for row in rows}
    return cache


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
    row = suppressed(session, now).pop(address, None)
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
