"""Per-incident SLA facts read from the event log: the one source of every digest and report.

The status history of an incident is rebuilt from its events (`status` events, and the
`pending` / `resolved` / `reopened` / `confirmed` / `problem` actions). As in the SLA jobs,
the resolution clock runs on the priority's calendar from `created_at` only while the
incident is `open`: it stands still while `pending` (waiting for the requester), `resolved`
(waiting for confirmation) or handed to problem management. A reopen restarts it; the
incident is judged by its final resolution. docs/metrics.md defines every figure built on
these facts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from mailflow import sla
from mailflow.models import Event, Ticket

if TYPE_CHECKING:
    from mailflow.desk import Desk

RUNNING = "open"
DONE = frozenset({"resolved", "closed"})
OPEN = ("open", "pending")
ACTION_STATUS = {
    "pending": "pending",
    "resolved": "resolved",
    "reopened": "open",
    "confirmed": "closed",
    "auto_closed": "closed",
    "closed": "closed",
    "problem": "problem",
}


@dataclass(slots=True)  # one per incident of the period: tens of thousands in a backlog
class Facts:
    """What the event log says about one incident, as of `now`."""

    id: int
    ref: str
    subject: str
    priority: str
    tier: str | None
    category: str
    requester: str
    assignee: str | None
    major: bool
    status: str
    created_at: datetime
    responded_at: datetime | None
    target: timedelta
    changes: list[tuple[datetime, str]]
    pauses: list[sla.Pause] = field(default_factory=list)
    resolved_at: datetime | None = None  # the final resolution; None while not resolved
    resolutions: list[datetime] = field(default_factory=list)  # every time it was resolved
    reopens: list[datetime] = field(default_factory=list)
    escalations: list[datetime] = field(default_factory=list)
    handoffs: list[datetime] = field(default_factory=list)
    deadline: datetime | None = None  # None while the clock stands still before it
    resolve_seconds: float | None = None
    respond_seconds: float | None = None
    open_pause: datetime | None = None  # since when the clock stands still, if it does now
    calendar: sla.Calendar | None = field(default=None, repr=False)
    now: datetime | None = field(default=None, repr=False)
    _used: float | None = field(default=None, repr=False)

    @property
    def used(self) -> float:
        """Share of the resolution target used: at the resolution, or by now (computed on
        first use — only the digest needs it for unresolved incidents)."""
        if self._used is None:
            if self.resolve_seconds is not None:
                seconds = self.resolve_seconds
            else:
                assert self.calendar is not None and self.now is not None
                pauses = list(self.pauses)
                if self.open_pause is not None:
                    pauses.append((self.open_pause, None))
                end = max(self.now, self.created_at)
                seconds = sla.elapsed(self.calendar, self.created_at, end, pauses)
            self._used = seconds / self.target.total_seconds()
        return self._used

    @property
    def within_target(self) -> bool:
        return (
            self.resolved_at is not None
            and self.deadline is not None
            and self.resolved_at <= self.deadline
        )

    @property
    def is_open(self) -> bool:
        return self.status in OPEN

    def due_in(self, start: datetime, end: datetime, now: datetime) -> bool:
        """Its deadline fell in [start, end): passed by `now`, or known early by a resolution."""
        if self.deadline is None or not start <= self.deadline < end:
            return False
        return self.deadline <= now or self.resolved_at is not None

    def missed_in(self, start: datetime, end: datetime, now: datetime) -> bool:
        """A breach in [start, end): due there and not resolved by its deadline."""
        return self.due_in(start, end, now) and not self.within_target

    def sla_state(self, warn_at: float) -> str:
        """ok | at_risk | breached, for an open incident."""
        if self.used >= 1.0:
            return "breached"
        return "at_risk" if self.used >= warn_at else "ok"


@dataclass(frozen=True)
class EventRow:
    """The part of an event the facts need."""

    at: datetime
    id: int
    action: str
    data: dict[str, Any] | None


def status_changes(
    created_at: datetime, status_now: str, updated_at: datetime, events: Sequence[EventRow]
) -> list[tuple[datetime, str]]:
    """(when, new status) from the events (in order), starting with `open` at creation."""
    status = "open"
    changes = [(created_at, status)]
    for event in events:
        new = None
        if event.action == "status" and event.data and event.data.get("new"):
            new = str(event.data["new"])
        elif event.action in ACTION_STATUS:
            new = ACTION_STATUS[event.action]
        if new and new != status:
            changes.append((event.at, new))
            status = new
    if status != status_now:  # an unrecorded change: trust the ticket row
        changes.append((max(updated_at, changes[-1][0]), status_now))
    return changes


def _segments(
    changes: Sequence[tuple[datetime, str]],
) -> list[tuple[datetime, datetime | None, str]]:
    ends: list[datetime | None] = [at for at, _ in changes[1:]]
    return [(at, end, status) for (at, status), end in zip(changes, [*ends, None], strict=True)]


def _action_times(events: Iterable[EventRow], action: str) -> list[datetime]:
    return sorted(e.at for e in events if e.action == action)


class FactBuilder:
    """Builds Facts for a desk, caching one calendar per priority."""

    def __init__(self, desk: Desk, now: datetime) -> None:
        self.desk = desk
        self.now = now
        self._calendars: dict[str, sla.Calendar] = {}

    def calendar(self, priority: str) -> sla.Calendar:
        if priority not in self._calendars:
            self._calendars[priority] = self.desk.calendar(priority)
        return self._calendars[priority]

    def facts(self, row: Any, events: Sequence[EventRow]) -> Facts:
        """Facts of one incident from its ticket columns (TICKET_COLUMNS) and events."""
        target = self.desk.target(row.priority)
        f = Facts(
            id=row.id,
            ref=f"INC-{row.number}",
            subject=row.subject,
            priority=row.priority,
            tier=row.tier,
            category=row.category,
            requester=row.requester,
            assignee=row.assignee,
            major=bool(row.major),
            status=row.status,
            created_at=row.created_at,
            responded_at=row.responded_at,
            target=target.resolve,
            changes=status_changes(row.created_at, row.status, row.updated_at, events),
            reopens=_action_times(events, "reopened"),
            escalations=_action_times(events, "escalated"),
            handoffs=_action_times(events, "problem"),
        )
        self._clock(f)
        return f

    def _clock(self, f: Facts) -> None:
        """Pauses, resolution, deadline and times, from the status changes."""
        cal = self.calendar(f.priority)
        segments = _segments(f.changes)
        last_status = segments[-1][2]
        f.resolutions = _entries(segments, DONE)
        if last_status in DONE:
            f.resolved_at = f.resolutions[-1]
        stop = f.resolved_at  # after the final resolution nothing moves the deadline
        f.pauses = [
            (start, end)
            for start, end, st in segments
            if st != RUNNING and end and (stop is None or start < stop)
        ]
        f.open_pause = segments[-1][0] if last_status not in (RUNNING, *DONE) else None
        f.calendar, f.now = cal, self.now
        f.deadline = sla.due_at(cal, f.created_at, f.target, f.pauses)
        if f.open_pause is not None and f.deadline is not None and f.deadline > f.open_pause:
            f.deadline = None  # the clock stopped before the deadline: not known yet
        if f.resolved_at is not None:
            f.resolve_seconds = sla.elapsed(cal, f.created_at, f.resolved_at, f.pauses)
        if f.responded_at is not None:
            f.respond_seconds = sla.elapsed(cal, f.created_at, f.responded_at)


def _entries(
    segments: Sequence[tuple[datetime, datetime | None, str]], statuses: frozenset[str]
) -> list[datetime]:
    """When the incident entered one of `statuses` from a status outside them."""
    out, inside = [], False
    for start, _, status in segments:
        if status in statuses and not inside:
            out.append(start)
        inside = status in statuses
    return out


TICKET_COLUMNS = (
    Ticket.id,
    Ticket.number,
    Ticket.subject,
    Ticket.priority,
    Ticket.tier,
    Ticket.category,
    Ticket.requester,
    Ticket.assignee,
    Ticket.major,
    Ticket.status,
    Ticket.created_at,
    Ticket.updated_at,
    Ticket.responded_at,
)
EVENT_ACTIONS = ("status", "escalated", "reopened", *ACTION_STATUS)


def lookback(desk: Desk) -> timedelta:
    """How long after its last change an incident's deadline can still fall: generous for
    the longest target on a business calendar (7.5 h a day, a 9-day holiday)."""
    longest = max(t.resolve for t in desk.settings.sla.targets.values())
    return timedelta(days=30) + longest * 10


FACTS_CHUNK = 1000  # incidents read at a time by iter_facts


def iter_facts(
    session: Session,
    desk: Desk,
    now: datetime,
    created_before: datetime | None = None,
    since: datetime | None = None,
) -> Iterator[Facts]:
    """Facts for the incidents created before `created_before` that can count from `since`
    on: open ones, and the others changed since then (minus the lookback). Oldest first,
    read `FACTS_CHUNK` incidents (and their events) at a time: a backlog of tens of
    thousands costs one chunk of memory."""
    conditions = [Ticket.kind == "incident"]
    if created_before is not None:
        conditions.append(Ticket.created_at < created_before)
    if since is not None:
        conditions.append(or_(Ticket.status.in_(OPEN), Ticket.updated_at >= since - lookback(desk)))
    builder = FactBuilder(desk, now)
    after: list[Any] = []
    while True:
        rows = session.execute(
            select(*TICKET_COLUMNS)
            .where(*conditions, *after)
            .order_by(Ticket.created_at, Ticket.id)
            .limit(FACTS_CHUNK)
        ).all()
        events = _events(session, [row.id for row in rows])
        for row in rows:
            yield builder.facts(row, events.get(row.id, []))
        if len(rows) < FACTS_CHUNK:
            return
        last = rows[-1]
        after = [
            or_(
                Ticket.created_at > last.created_at,
                (Ticket.created_at == last.created_at) & (Ticket.id > last.id),
            )
        ]


def _events(session: Session, ticket_ids: list[int]) -> dict[int, list[EventRow]]:
    """The events the facts need, by ticket, in order."""
    events: dict[int, list[EventRow]] = {}
    if not ticket_ids:
        return events
    rows = session.execute(
        select(Event.ticket_id, Event.at, Event.id, Event.action, Event.data)
        .where(Event.ticket_id.in_(ticket_ids), Event.action.in_(EVENT_ACTIONS))
        .order_by(Event.ticket_id, Event.at, Event.id)
    )
    for ticket_id, at, event_id, action, data in rows:
        events.setdefault(ticket_id, []).append(EventRow(at, event_id, action, data))
    return events


def in_window(times: Iterable[datetime], start: datetime, end: datetime) -> list[datetime]:
    return [t for t in times if start <= t < end]


def rate(due: int, within: int) -> float | None:
    """The target achievement rate, rounded to 4 places; None when nothing was due."""
    return round(within / due, 4) if due else None


def p90(values: Sequence[float]) -> float | None:
    """90th percentile by the nearest-rank method (the smallest value ≥ 90% of them)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[math.ceil(0.9 * len(ordered)) - 1]


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None
