"""Scheduled incident jobs: SLA warnings and breaches, and closing unconfirmed resolutions.

`scan(desk, now)` (every minute) looks at every open incident. At `[sla] warn_at` of the
resolution target it warns the assignee (or the owning tier); at 100 % it escalates to the
next tier of the incident's path and tells the incident manager; when the response target
passes with no staff action it records the response breach. `auto_close(desk, now)` closes
incidents resolved longer than `[incident] confirm_timeout` of working time ago without an
answer, with a notice to the requester.

Each step happens once, also across restarts and several daemons: it is claimed by a
conditional UPDATE (`… WHERE sla_warned_at IS NULL`, `… WHERE status = 'resolved'`) as the
first statement of the transaction that also records the event and queues the mail, so the
claim, the event and the mail commit together or not at all. A new priority re-plans the
incident (incidents._priority): a warning or breach its new target has not reached yet is
to come again, once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from apscheduler.triggers.interval import IntervalTrigger
from sqlalchemy import Row, or_, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from mailflow import incidents, jobs, notify, sla
from mailflow.models import Ticket
from mailflow.tickets import SYSTEM, close_unconfirmed, public, record

if TYPE_CHECKING:
    from mailflow.desk import Desk

log = logging.getLogger(__name__)


@dataclass
class ScanResult:
    """Refs of the incidents each step acted on in one scan."""

    warned: list[str] = field(default_factory=list)
    breached: list[str] = field(default_factory=list)
    response_breached: list[str] = field(default_factory=list)
    closed: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Due:
    """What one open incident is due for, computed from a read-only look."""

    ticket_id: int
    used: float  # share of the resolution target used
    warn: bool
    breach: bool
    response_breach: bool


def _assess(desk: Desk, ticket: Row[Any], pauses: list[sla.Pause], now: datetime) -> _Due:
    cal = desk.calendar(ticket.priority)
    target = desk.target(ticket.priority)
    used = sla.fraction_used(cal, ticket.created_at, now, target.resolve, pauses)
    response_breach = (
        ticket.responded_at is None
        and ticket.response_breached_at is None
        and ticket.response_due_at is not None
        and now >= ticket.response_due_at
    )
    return _Due(
        ticket.id,
        used,
        warn=ticket.sla_warned_at is None and used >= desk.settings.sla.warn_at,
        breach=ticket.sla_breached_at is None and used >= 1.0,
        response_breach=response_breach,
    )


SCAN_CHUNK = 500  # open incidents read at a time: memory stays flat however many are open
_SCAN_COLUMNS = (
    Ticket.id,
    Ticket.priority,
    Ticket.created_at,
    Ticket.responded_at,
    Ticket.response_breached_at,
    Ticket.response_due_at,
    Ticket.sla_warned_at,
    Ticket.sla_breached_at,
)


def _open_incidents(session: Session, after_id: int) -> list[Row[Any]]:
    """The next open incidents (by id) with a step still to come — the clock stands still
    in other statuses — as the few columns the scan reads."""
    return list(
        session.execute(
            select(*_SCAN_COLUMNS)
            .where(
                Ticket.kind == "incident",
                Ticket.status == "open",
                or_(
                    Ticket.sla_breached_at.is_(None),
                    Ticket.responded_at.is_(None) & Ticket.response_breached_at.is_(None),
                ),
                Ticket.id > after_id,
            )
            .order_by(Ticket.id)
            .limit(SCAN_CHUNK)
        )
    )


def _claim(session: Session, ticket_id: int, **values: datetime) -> bool:
    """Set the given timestamp columns where all of them are still empty; True if we did."""
    conditions = [getattr(Ticket, name).is_(None) for name in values]
    result = session.execute(
        update(Ticket)
        .where(Ticket.id == ticket_id, Ticket.status == "open", *conditions)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1  # type: ignore[attr-defined]


def _percent(used: float) -> str:
    return f"{used * 100:.0f}%"


def _warn(session: Session, desk: Desk, ticket: Ticket, due: _Due, now: datetime) -> None:
    record(
        session,
        ticket,
        "sla_warning",
        SYSTEM,
        now,
        f"{_percent(due.used)} of the {ticket.priority} resolution target used",
        used=round(due.used, 4),
    )
    notify.queue(
        session,
        desk,
        "sla_warning",
        incidents.team(desk, ticket),
        now,
        ticket=ticket,
        used=_percent(due.used),
    )


def _breach(session: Session, desk: Desk, ticket: Ticket, due: _Due, now: datetime) -> None:
    old = ticket.tier
    record(
        session,
        ticket,
        "sla_breached",
        SYSTEM,
        now,
        f"{ticket.priority} resolution target passed at {old}",
        used=round(due.used, 4),
        tier=old,
    )
    reason = f"SLA 解决时限已过 / resolution target passed ({_percent(due.used)})"
    new = incidents.escalate(session, desk, ticket, SYSTEM, now, reason, automatic=True)
    notify.queue(
        session,
        desk,
        "sla_breached",
        desk.settings.roles.incident_manager,
        now,
        ticket=ticket,
        old_tier=old,
        new_tier=new,
        used=_percent(due.used),
    )


def _act(desk: Desk, due: _Due, now: datetime, result: ScanResult) -> None:
    """Claim and carry out what one incident is due for, in one transaction."""
    with desk.db.transaction() as session:
        breach = due.breach and _claim(session, due.ticket_id, sla_breached_at=now)
        if breach:  # a breach makes a late warning pointless
            _claim(session, due.ticket_id, sla_warned_at=now)
        warn = not breach and due.warn and _claim(session, due.ticket_id, sla_warned_at=now)
        if not (breach or warn or due.response_breach):
            return
        ticket = session.get(Ticket, due.ticket_id)  # read after the claims: current
        assert ticket is not None
        if due.response_breach and incidents.record_response_breach(session, ticket, now):
            result.response_breached.append(ticket.ref)
        if breach:
            _breach(session, desk, ticket, due, now)
            result.breached.append(ticket.ref)
        elif warn:
            _warn(session, desk, ticket, due, now)
            result.warned.append(ticket.ref)


def scan(desk: Desk, now: datetime) -> ScanResult:
    """Warn, escalate and record breaches for every open incident that is due."""
    result = ScanResult()
    after_id = 0
    while True:
        with desk.db.sessions() as session:
            tickets = _open_incidents(session, after_id)
            ids = [t.id for t in tickets]
            history = incidents.status_history(session, ids)
            waits = incidents.vendor_waits(session, ids) if desk.settings.sla.pause_for_vendor \
                else {}
        for ticket in tickets:
            stopped = incidents.pauses_of(history.get(ticket.id, [])) + waits.get(ticket.id, [])
            item = _assess(desk, ticket, stopped, now)
            if not (item.warn or item.breach or item.response_breach):
                continue
            try:
                _act(desk, item, now, result)
            except SQLAlchemyError:  # e.g. another daemon holds the row: the next scan retries
                log.exception("SLA step for ticket #%s failed; retried next scan", item.ticket_id)
        if len(tickets) < SCAN_CHUNK:
            return result
        after_id = tickets[-1].id


def auto_close(desk: Desk, now: datetime) -> ScanResult:
    """Close incidents whose resolution went unanswered for `confirm_timeout` working time."""

    def closing(session: Session, ticket: Ticket) -> None:
        timeout = desk.settings.incident.confirm_timeout
        record(session, ticket, "auto_closed", SYSTEM, now,
               f"no answer within {timeout} of working time")
        notify.queue(session, desk, "closed", public(session, ticket), now, ticket=ticket,
                     reason="timeout")

    return ScanResult(closed=close_unconfirmed(desk, "incident", "resolved", now, closing))


def _every_minute(desk: Desk) -> IntervalTrigger:
    return IntervalTrigger(minutes=1, timezone=desk.settings.desk.tz)


jobs.register(jobs.Job("sla-scan", scan, _every_minute, catch_up=True))
jobs.register(jobs.Job("incident-auto-close", auto_close, _every_minute, catch_up=True))
