"""The inbound mail being processed, as the governor sees it while that mail's replies queue.

It travels in the transaction's `session.info` from `governor.begin` to `governor.end`. Mail
queued while no mail is in hand (scheduled jobs, alerts) is not governed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy.orm import Session

from mailflow.models import Ticket

_KEY = "mailflow.in_hand"


@dataclass
class InHand:
    """One inbound mail and what has been decided about the mail it may cause."""

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


def current(session: Session) -> InHand | None:
    return session.info.get(_KEY)


def put(session: Session, in_hand: InHand) -> None:
    session.info[_KEY] = in_hand


def drop(session: Session) -> None:
    session.info.pop(_KEY, None)


@contextmanager
def set_aside(session: Session) -> Iterator[None]:
    """Queue mail that is not governed (the governor's own alerts) while a mail is in hand."""
    in_hand = session.info.pop(_KEY, None)
    try:
        yield
    finally:
        if in_hand is not None:
            session.info[_KEY] = in_hand
