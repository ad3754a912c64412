"""The daily digest: one mail per person per day, at `[digest] time` in the desk's time zone.

Each person gets the sections of every role they hold, in one mail:
- engineers (L1/L2/L3/IM members, and anyone with incidents assigned): the open incidents
  their tier owns or they are assigned, oldest first, with SLA state and time waited;
- approvers: the requests waiting for their decision, with how to answer (these two lists
  show at most `[digest] max_rows` entries; their counts cover all);
- incident manager and service desk lead: yesterday's figures, open incidents by tier and
  priority, major incidents, breaches, escalations, and the target achievement rate for
  yesterday and the month to date (same definitions as the report, docs/metrics.md).

Nobody gets an empty digest unless `[digest] send_empty`; `[digest] time = "off"` sends none
(`mailflow digest` still builds them on demand). Sending is claimed in the
`job_runs` table under ("digest", "<local date>:<address>") in the same transaction that
queues the mail, so several daemons or a restart across the hour send it once; a daemon
that was down at the hour sends it when it comes back (the job catches up at start).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from typing import TYPE_CHECKING, Any

from apscheduler.triggers.cron import CronTrigger
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from mailflow import jobs, metrics, notify, report
from mailflow.metrics import Facts
from mailflow.models import JobRun, Ticket

if TYPE_CHECKING:
    from mailflow.desk import Desk

log = logging.getLogger(__name__)

JOB = "digest"
TIERS = ("L1", "L2", "L3", "IM")
TEMPLATES = {
    "manager": "digest_manager",
    "approver": "digest_approver",
    "engineer": "digest_engineer",
}


@dataclass(frozen=True)
class DigestItem:
    """One person's digest for the day (queued, or only built with --dry-run)."""

    role: str  # the main role: manager | approver | engineer
    roles: tuple[str, ...]
    recipient: str
    subject: str
    text: str


@dataclass(frozen=True)
class QueueRow:
    """One open incident in an engineer's queue."""

    ref: str
    subject: str
    priority: str
    tier: str | None
    status: str
    assignee: str | None
    major: bool
    requester: str
    created_at: datetime
    deadline: datetime | None
    waited: timedelta
    used: float
    state: str  # ok | at_risk | breached
    resolved_at: datetime | None = None
    within_target: bool = False


@dataclass
class Listing:
    """One list of the managers' overview: its first `LISTED` rows and how many in all."""

    rows: list[QueueRow]
    total: int

    def __bool__(self) -> bool:
        return self.total > 0


LISTED = 20  # rows per list of the managers' overview
LISTS = ("new", "resolved", "reopened", "escalated", "breaches", "major")


@dataclass(frozen=True)
class ApprovalRow:
    """One request waiting for an approver's decision."""

    ref: str
    subject: str
    requester: str
    request_type: str | None
    since: datetime
    waited: timedelta
    step: int | None


@dataclass
class Snapshot:
    """Everything the day's digests show, read once."""

    day: date
    yesterday: date
    now: datetime
    queues: dict[str, Queue]  # by engineer's address
    approvals: dict[str, list[ApprovalRow]] = field(default_factory=dict)
    overview: dict[str, Any] = field(default_factory=dict)


# -- reading ------------------------------------------------------------------------------


def _row(f: Facts, now: datetime, warn_at: float) -> QueueRow:
    return QueueRow(
        ref=f.ref,
        subject=f.subject,
        priority=f.priority,
        tier=f.tier,
        status=f.status,
        assignee=f.assignee,
        major=f.major,
        requester=f.requester,
        created_at=f.created_at,
        deadline=f.deadline,
        waited=now - f.created_at,
        used=f.used,
        state=f.sla_state(warn_at),
        resolved_at=f.resolved_at,
        within_target=f.within_target,
    )


def _waiting_approvers(
    session: Session, desk: Desk, ticket: Ticket
) -> list[tuple[str, int | None, datetime]]:
    """(approver, step, waiting since) for a request in pending_approval."""
    try:
        from mailflow import approvals
    except ImportError:
        approvals = None  # type: ignore[assignment]
    if approvals is not None:
        step = approvals.current_step(session, ticket)
        if step is not None:
            return [
                (r.approver, step, r.created_at) for r in approvals.open_rows(session, ticket, step)
            ]
    since = _entered(ticket, "pending_approval")
    return [(a, None, since) for a in desk.settings.roles.approvers_for(ticket.request_type)]


def _entered(ticket: Ticket, status: str) -> datetime:
    """When the ticket last entered `status` (its creation when no event says)."""
    times = [
        e.at for e in ticket.events if e.action == "status" and (e.data or {}).get("new") == status
    ]
    return max(times, default=ticket.created_at)


def _approvals(session: Session, desk: Desk, now: datetime) -> dict[str, list[ApprovalRow]]:
    out: dict[str, list[ApprovalRow]] = {}
    waiting = session.scalars(
        select(Ticket)
        .where(Ticket.kind == "request", Ticket.status == "pending_approval")
        .order_by(Ticket.created_at, Ticket.id)
    )
    for ticket in waiting:
        for approver, step, since in _waiting_approvers(session, desk, ticket):
            out.setdefault(approver.lower(), []).append(
                ApprovalRow(
                    ref=ticket.ref,
                    subject=ticket.subject,
                    requester=ticket.requester,
                    request_type=ticket.request_type,
                    since=since,
                    waited=now - since,
                    step=step,
                )
            )
    return out


@dataclass
class Queue:
    """A person's open incidents: the oldest `[digest] max_rows` as rows, counts of all."""

    rows: list[QueueRow] = field(default_factory=list)
    states: Counter[str] = field(default_factory=Counter)
    total: int = 0


class _Reader:
    """Takes the incidents one at a time (oldest first) and keeps only what the digests
    show: counters, summaries, and the first rows of each list — so the memory it needs
    does not grow with the number of open incidents."""

    def __init__(self, desk: Desk, yesterday: date, now: datetime) -> None:
        tz = desk.settings.desk.tz
        self.now, self.yesterday = now, yesterday
        self.warn_at, self.shown = desk.settings.sla.warn_at, desk.settings.digest.max_rows
        self.y_start, self.y_end = report.window(yesterday, yesterday, tz)
        m_start, _ = report.window(yesterday.replace(day=1), yesterday, tz)
        self.day = report.Summary(self.y_start, self.y_end, now)
        self.month = report.Summary(m_start, self.y_end, now)
        self.lists = {name: Listing([], 0) for name in LISTS}
        self.by_tier: dict[str, Counter[str]] = {}
        self.states: Counter[str] = Counter()
        roles = desk.settings.roles
        self.members = {t: [a.lower() for a in roles.tier_members(t)] for t in TIERS}
        # An engineer's queue: what their tiers own or they are assigned.
        self.queues = {a: Queue() for members in self.members.values() for a in members}

    def add(self, f: Facts) -> None:
        self.day.add(f)
        self.month.add(f)
        y_start, y_end = self.y_start, self.y_end
        for name, listed in (
            ("new", y_start <= f.created_at < y_end),
            ("resolved", f.resolved_at is not None and y_start <= f.resolved_at < y_end),
            ("reopened", bool(metrics.in_window(f.reopens, y_start, y_end))),
            ("escalated", bool(metrics.in_window(f.escalations, y_start, y_end))),
            ("breaches", f.missed_in(y_start, y_end, self.now)),
            ("major", f.major and (f.is_open or y_start <= f.created_at < y_end)),
        ):
            if listed:
                self._take(self.lists[name], f, LISTED)
        if f.is_open:
            self.by_tier.setdefault(f.tier or "-", Counter())[f.priority] += 1
            state = f.sla_state(self.warn_at)
            self.states[state] += 1
            owners = set(self.members.get(f.tier or "", ()))
            if f.assignee:
                owners.add(f.assignee.lower())
            for owner in owners:
                queue = self.queues.setdefault(owner, Queue())
                queue.states[state] += 1
                self._take(queue, f, self.shown)

    def _take(self, listing: Listing | Queue, f: Facts, limit: int) -> None:
        """Count the incident; keep its row while the list shows fewer than `limit`."""
        listing.total += 1
        if len(listing.rows) < limit:
            listing.rows.append(_row(f, self.now, self.warn_at))

    def overview(self, desk: Desk) -> dict[str, Any]:
        """The managers' section: yesterday, open incidents, breaches and the rate."""
        by_tier = self.by_tier
        tiers = [t for t in (*TIERS, *sorted(by_tier)) if t in by_tier]
        return {
            "date": self.yesterday,
            "month_since": self.yesterday.replace(day=1),
            "day": self.day.figures(),
            "month": self.month.figures(),
            "new_requests": _count_requests(desk, self.y_start, self.y_end),
            **self.lists,
            "open_total": sum(self.states.values()),
            "open_breached": self.states["breached"],
            "open_at_risk": self.states["at_risk"],
            "by_tier": {t: {p: by_tier[t][p] for p in report.PRIORITIES} for t in tiers},
            "by_priority": {p: sum(c[p] for c in by_tier.values()) for p in report.PRIORITIES},
        }


def _count_requests(desk: Desk, start: datetime, end: datetime) -> int:
    with desk.db.sessions() as session:
        count = session.scalar(
            select(func.count(Ticket.id)).where(
                Ticket.kind == "request", Ticket.created_at >= start, Ticket.created_at < end
            )
        )
    return count or 0


def snapshot(desk: Desk, now: datetime) -> Snapshot:
    """Read the day's digest data once, for everybody, an incident at a time."""
    day = now.astimezone(desk.settings.desk.tz).date()
    yesterday = day - timedelta(days=1)
    month_start, _ = report.window(yesterday.replace(day=1), day, desk.settings.desk.tz)
    reader = _Reader(desk, yesterday, now)
    with desk.db.sessions() as session:
        for f in metrics.iter_facts(session, desk, now, since=month_start):
            reader.add(f)
        approvals = _approvals(session, desk, now)
    return Snapshot(
        day=day,
        yesterday=yesterday,
        now=now,
        queues=reader.queues,
        approvals=approvals,
        overview=reader.overview(desk),
    )


# -- who gets what ------------------------------------------------------------------------


def people(desk: Desk, snap: Snapshot) -> dict[str, list[str]]:
    """Every address that may get a digest, with its roles (manager, approver, engineer)."""
    roles = desk.settings.roles
    out: dict[str, list[str]] = {}

    def add(address: str, role: str) -> None:
        held = out.setdefault(address.lower(), [])
        if role not in held:
            held.append(role)

    for address in (*roles.incident_manager, *roles.service_desk_lead):
        add(address, "manager")
    for approvers in roles.approvers.values():
        for address in approvers:
            add(address, "approver")
    for address in snap.approvals:
        add(address, "approver")
    for address in snap.queues:  # tier members and everyone assigned an open incident
        add(address, "engineer")
    order = list(TEMPLATES)
    return {a: sorted(r, key=order.index) for a, r in out.items()}


def queue_for(snap: Snapshot, address: str) -> Queue:
    """Open incidents the person's tiers own or the person is assigned, oldest first."""
    return snap.queues.get(address.lower(), Queue())


def _overview_empty(overview: dict[str, Any]) -> bool:
    return (
        not overview["open_total"]
        and not any(overview[k] for k in LISTS)
        and not (overview["day"]["incidents"] or overview["new_requests"])
    )


def context_for(desk: Desk, snap: Snapshot, address: str, roles: list[str]) -> dict[str, Any]:
    """The template context of one person's digest; `empty` when it has nothing to say."""
    queue = queue_for(snap, address) if "engineer" in roles else Queue()
    approvals = snap.approvals.get(address, []) if "approver" in roles else []
    overview = snap.overview if "manager" in roles else None
    empty = not queue.total and not approvals and (overview is None or _overview_empty(overview))
    return {
        "recipient": address,
        "roles": roles,
        "day": snap.day,
        "as_of": snap.now,
        "queue": queue.rows,  # a mail of 40,000 lines helps nobody: the counts cover the rest
        "queue_total": queue.total,
        "states": queue.states,
        "approvals": approvals[: desk.settings.digest.max_rows],
        "approvals_total": len(approvals),
        "overview": overview,
        "empty": empty,
    }


# -- sending ------------------------------------------------------------------------------


def _claimed(desk: Desk, key: str) -> bool:
    with desk.db.sessions() as session:
        return session.get(JobRun, (JOB, key)) is not None


def _queue_once(
    desk: Desk, key: str, template: str, address: str, ctx: dict[str, Any], now: datetime
) -> notify.Queued | None:
    """Claim the person's day and queue the digest in one transaction: both, or neither."""
    try:
        with desk.db.transaction() as session:
            session.add(JobRun(job=JOB, key=key, at=now))
            session.flush()
            rows = notify.queue(session, desk, template, [address], now, **ctx)
    except IntegrityError:
        return None  # another daemon (or an earlier run) sent it
    if not rows:  # mail to this address is suppressed: the day is claimed, nothing sent
        log.info("digest for %s suppressed", address)
        return None
    return rows[0]


def run_digests(desk: Desk, now: datetime, dry_run: bool = False) -> list[DigestItem]:
    """Build today's digests and queue those not sent yet (only build them with dry_run)."""
    snap = snapshot(desk, now)
    send_empty = desk.settings.digest.send_empty
    items = []
    for address, roles in people(desk, snap).items():
        if address == desk.address:
            continue
        key = f"{snap.day.isoformat()}:{address}"
        ctx = context_for(desk, snap, address, roles)
        if (ctx["empty"] and not send_empty) or _claimed(desk, key):
            continue
        template = TEMPLATES[roles[0]]
        if dry_run:
            rendered = desk.renderer.render(template, ticket=None, desk=desk.settings.desk, **ctx)
            subject, text = rendered.subject, rendered.text
        else:
            row = _queue_once(desk, key, template, address, ctx, now)
            if row is None:
                continue
            subject, text = row.subject, row.text
        items.append(DigestItem(roles[0], tuple(roles), address, subject, text))
    log.info("digests for %s: %d %s", snap.day, len(items), "built" if dry_run else "queued")
    return items


def due(desk: Desk, now: datetime) -> bool:
    """Whether today's digest time has come in the desk's time zone."""
    at = desk.settings.digest.time
    return at is not None and now.astimezone(desk.settings.desk.tz).time() >= at


def run_scheduled(desk: Desk, now: datetime) -> list[DigestItem]:
    """The job: at (or, catching up, after) the digest time, send what is not sent yet."""
    return run_digests(desk, now) if due(desk, now) else []


def _trigger(desk: Desk) -> CronTrigger:
    at = desk.settings.digest.time or time(8, 30)  # "off": wakes daily, sends nothing
    return CronTrigger(hour=at.hour, minute=at.minute, timezone=desk.settings.desk.timezone)


jobs.register(jobs.Job(name=JOB, run=run_scheduled, trigger=_trigger, catch_up=True))
