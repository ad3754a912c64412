"""Alerts to the service desk lead: once per episode of a condition (a tripped cap, a loop,
a failing mail source), recorded in the `alerts` table."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import delete
from sqlalchemy.orm import Session

from mailflow import mail_in_hand, notify
from mailflow.models import Alert

if TYPE_CHECKING:
    from mailflow.desk import Desk

log = logging.getLogger(__name__)

ALERT_QUIET = timedelta(hours=1)  # an alert episode ends after this long without the condition
ALERT_TEMPLATE = "guard_alert"


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
    with mail_in_hand.set_aside(session):  # the governor's own mail is not governed
        notify.queue(session, desk, ALERT_TEMPLATE, to, now, key=key, detail=detail, at=now)
    log.error("alert to %s: %s", ", ".join(to), detail)
    return True


def clear(session: Session, key: str) -> None:
    """The condition is over: the next occurrence alerts again."""
    session.execute(delete(Alert).where(Alert.key == key))
