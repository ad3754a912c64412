"""Loop detection: does a new mail look like an automatic answer to our mail?

A new mail from someone we mailed within `[limits] loop_window` (and dated after our mail)
is taken for an auto-responder's answer: it gets no automatic reply (it is still recorded).
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

from sqlalchemy import bindparam, func, select
from sqlalchemy.orm import Session

from mailflow.mail_in_hand import InHand
from mailflow.models import Outbox

if TYPE_CHECKING:
    from mailflow.desk import Desk

LOOP_SUSPECTED = "mail loop suspected"  # how a loop_window reason starts (counted by governor)
DATE_SKEW = timedelta(minutes=2)  # tolerated clock difference between us and a sender

# Runs on every new mail, so it is built once (building costs as much as running) and runs
# on the session's connection: it reads only rows already written.
_LAST_SENT = select(func.max(Outbox.sent_at)).where(
    Outbox.recipient == bindparam("sender"),
    Outbox.state == "sent",
    Outbox.sent_at >= bindparam("since"),
    Outbox.sent_at <= bindparam("until"),
)


def loop_reason(session: Session, desk: Desk, mail: InHand) -> str | None:
    """Why a new mail looks like an automatic answer to our mail (loop_window), else None."""
    window = desk.settings.limits.loop_window
    arrived = mail.received_at
    if window <= timedelta(0) or arrived is None:
        return None
    last = session.connection().scalar(
        _LAST_SENT, {"sender": mail.sender, "since": arrived - window, "until": arrived}
    )
    if last is None or (mail.date is not None and mail.date < last - DATE_SKEW):
        return None  # nothing of ours to answer, or written before our mail went out
    minutes = max((arrived - last).total_seconds(), 0) / 60
    return (
        f"{LOOP_SUSPECTED}: {mail.sender} wrote {minutes:.1f} min after our mail of "
        f"{last:%Y-%m-%d %H:%M:%S} UTC (within [limits] loop_window)"
    )
