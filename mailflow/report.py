"""The incident-management report: target achievement rate and the review-meeting figures.

`compute(desk, since, until, now)` returns one dict (the JSON of `mailflow report`);
`render(data, fmt)` prints it as text, JSON or CSV. The weekly and monthly jobs mail the same
dict to the review meeting as HTML with charts, a plain-text part and CSV attachments.
Every figure is defined in docs/metrics.md.
"""

from __future__ import annotations

import calendar
import csv
import io
import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from datetime import date, datetime, time, timedelta
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from apscheduler.triggers.cron import CronTrigger
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from mailflow import jobs, metrics, notify
from mailflow.config import monthly_schedule, weekly_schedule
from mailflow.errors import MailflowError
from mailflow.metrics import Facts
from mailflow.models import Event, JobRun, Ticket

if TYPE_CHECKING:
    from mailflow.config import Settings
    from mailflow.desk import Desk

log = logging.getLogger(__name__)

PRIORITIES = ("P1", "P2", "P3", "P4")
TIERS = ("L1", "L2", "L3", "IM")
TOP = 5
TREND_PERIODS = 6
CORE = (
    "incidents",
    "resolved_within_target",
    "target_achievement_rate",
    "breached",
    "opened",
    "major",
    "resolved",
    "reopened",
    "reopen_rate",
    "escalations",
    "problem_handoffs",
)
TIMES = ("time_to_respond_hours", "time_to_resolve_hours")
DUE_COLUMNS = (
    "ref",
    "priority",
    "tier",
    "category",
    "requester",
    "status",
    "created_at",
    "deadline",
    "resolved_at",
    "within_target",
    "resolve_hours",
    "reopened",
    "escalations",
)
GROUP_METRICS = ("opened", "incidents", "resolved_within_target", "target_achievement_rate")


# -- periods ------------------------------------------------------------------------------


def period(since: date | None, until: date | None, today: date) -> tuple[date, date]:
    """The report period: default until today, since the first day of until's month."""
    until = until or today
    since = since or until.replace(day=1)
    if since > until:
        raise MailflowError(f"--since {since} is after --until {until}; swap them")
    return since, until


def window(since: date, until: date, tz: ZoneInfo) -> tuple[datetime, datetime]:
    """[local midnight of since, local midnight after until) as aware datetimes."""
    start = datetime.combine(since, time(0), tzinfo=tz)
    end = datetime.combine(until + timedelta(days=1), time(0), tzinfo=tz)
    return start, end


def _last_day(day: date) -> date:
    return day.replace(day=calendar.monthrange(day.year, day.month)[1])


def _add_months(day: date, months: int) -> date:
    index = day.year * 12 + day.month - 1 + months
    year, month = divmod(index, 12)
    first = date(year, month + 1, 1)
    return first.replace(day=min(day.day, _last_day(first).day))


def previous_period(since: date, until: date) -> tuple[date, date]:
    """The period to compare with: the months before for whole months, the same days of the
    previous month for a month to date, else the same number of days just before."""
    if since.day == 1:
        months = (until.year - since.year) * 12 + until.month - since.month + 1
        if until == _last_day(until):
            start = _add_months(since, -months)
            return start, _last_day(_add_months(start, months - 1))
        if months == 1:
            return _add_months(since, -1), _add_months(until, -1)
    days = (until - since).days + 1
    return since - timedelta(days=days), since - timedelta(days=1)


def trend_periods(since: date, until: date, count: int = TREND_PERIODS) -> list[tuple[date, date]]:
    """This period and the ones before it, oldest first."""
    periods = [(since, until)]
    while len(periods) < count:
        periods.insert(0, previous_period(*periods[0]))
    return periods


# -- figures ------------------------------------------------------------------------------


def _hours(seconds: Sequence[float]) -> dict[str, Any]:
    mean, p90 = metrics.mean(seconds), metrics.p90(seconds)
    return {
        "count": len(seconds),
        "mean": round(mean / 3600, 2) if mean is not None else None,
        "p90": round(p90 / 3600, 2) if p90 is not None else None,
    }


class Summary:
    """The core figures of one window [start, end), fed one incident at a time."""

    def __init__(self, start: datetime, end: datetime, now: datetime) -> None:
        self.start, self.end, self.now = start, end, now
        self.due = self.within = self.opened = self.major = 0
        self.reopened = self.escalations = self.handoffs = 0
        self.resolved_here = self.reopened_after = 0  # for the reopen rate
        self.respond: list[float] = []
        self.resolve: list[float] = []

    def add(self, f: Facts) -> None:
        start, end = self.start, self.end
        if f.due_in(start, end, self.now):
            self.due += 1
            self.within += f.within_target
        if start <= f.created_at < end:
            self.opened += 1
            self.major += f.major
        if f.resolved_at and start <= f.resolved_at < end:
            self.resolve.append(f.resolve_seconds or 0.0)
        if f.responded_at and start <= f.responded_at < end:
            self.respond.append(f.respond_seconds or 0.0)
        self.reopened += bool(metrics.in_window(f.reopens, start, end))
        self.escalations += len(metrics.in_window(f.escalations, start, end))
        self.handoffs += len(metrics.in_window(f.handoffs, start, end))
        # Of the incidents resolved in the window, the share reopened after that resolution.
        first = next(iter(metrics.in_window(f.resolutions, start, end)), None)
        if first is not None:
            self.resolved_here += 1
            self.reopened_after += any(t > first for t in f.reopens)

    def figures(self) -> dict[str, Any]:
        return {
            "incidents": self.due,
            "resolved_within_target": self.within,
            "target_achievement_rate": metrics.rate(self.due, self.within),
            "breached": self.due - self.within,
            "opened": self.opened,
            "major": self.major,
            "resolved": len(self.resolve),
            "reopened": self.reopened,
            "reopen_rate": metrics.rate(self.resolved_here, self.reopened_after),
            "escalations": self.escalations,
            "problem_handoffs": self.handoffs,
            "time_to_respond_hours": _hours(self.respond),
            "time_to_resolve_hours": _hours(self.resolve),
        }


def summarize(facts: Iterable[Facts], start: datetime, end: datetime, now: datetime) -> dict:
    """The core figures of one window [start, end)."""
    summary = Summary(start, end, now)
    for f in facts:
        summary.add(f)
    return summary.figures()


def _groups(
    opened: Sequence[Facts], due: Sequence[Facts], key: Callable[[Facts], str], names: Iterable[str]
) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys([*names, *map(key, opened), *map(key, due)]):
        d = [f for f in due if key(f) == name]
        within = sum(f.within_target for f in d)
        out[name] = {
            "opened": sum(key(f) == name for f in opened),
            "incidents": len(d),
            "resolved_within_target": within,
            "target_achievement_rate": metrics.rate(len(d), within),
        }
    return out


def _iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None


def _due_rows(due: Sequence[Facts]) -> list[dict[str, Any]]:
    return [
        {
            "ref": f.ref,
            "priority": f.priority,
            "tier": f.tier,
            "category": f.category,
            "requester": f.requester,
            "status": f.status,
            "created_at": _iso(f.created_at),
            "deadline": _iso(f.deadline),
            "resolved_at": _iso(f.resolved_at),
            "within_target": f.within_target,
            "resolve_hours": round(f.resolve_seconds / 3600, 2)
            if f.resolve_seconds is not None
            else None,
            "reopened": len(f.reopens),
            "escalations": len(f.escalations),
        }
        for f in sorted(due, key=lambda f: (f.deadline or f.created_at, f.id))
    ]


def _change(current: dict[str, Any], previous: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in CORE:
        a, b = current[key], previous[key]
        out[key] = round(a - b, 4) if a is not None and b is not None else None
    for key in TIMES:
        a, b = current[key]["mean"], previous[key]["mean"]
        out[f"{key}.mean"] = round(a - b, 2) if a is not None and b is not None else None
    return out


def _requests_opened(desk: Desk, start: datetime, end: datetime) -> int:
    with desk.db.sessions() as session:
        return (
            session.scalar(
                select(func.count(Ticket.id)).where(
                    Ticket.kind == "request", Ticket.created_at >= start, Ticket.created_at < end
                )
            )
            or 0
        )


VENDOR_METRICS = ("handoffs", "replied", "within_contract", "contract_hours",
                  "mean_response_hours", "max_response_hours")


def _vendor_figures(desk: Desk, start: datetime, end: datetime) -> dict[str, dict[str, Any]]:
    """Per vendor, the hand-overs in the period (`转厂商`) and how soon the vendor answered
    (its first reply after each), against the response time of its contract ([vendors])."""
    with desk.db.sessions() as session:
        handed = select(Event.ticket_id).where(
            Event.action == "vendor", Event.at >= start, Event.at < end
        )
        rows = session.execute(
            select(Event.ticket_id, Event.at, Event.action, Event.data)
            .where(Event.ticket_id.in_(handed), Event.action.in_(("vendor", "vendor_replied")))
            .order_by(Event.ticket_id, Event.id)
        ).all()
    figures: dict[str, dict[str, Any]] = {}
    waiting: dict[int, dict[str, Any]] = {}
    for ticket_id, at, action, data in rows:
        data = data or {}
        if action == "vendor":
            waiting[ticket_id] = data
            if not start <= at < end:
                continue
            name = data.get("vendor") or data.get("address") or "-"
            vendor = desk.settings.vendors.get(data.get("vendor") or "")
            contract = vendor.response.total_seconds() / 3600 if vendor and vendor.response \
                else None
            entry = figures.setdefault(name, {"handoffs": 0, "replied": 0, "within_contract": 0,
                                              "contract_hours": contract, "hours": []})
            entry["handoffs"] += 1
            data["_counted"] = name
        elif (name := waiting.pop(ticket_id, {}).get("_counted")) is not None:
            entry = figures[name]
            hours = float(data.get("seconds") or 0) / 3600
            entry["replied"] += 1
            entry["hours"].append(hours)
            if entry["contract_hours"] is not None and hours <= entry["contract_hours"]:
                entry["within_contract"] += 1
    for entry in figures.values():
        hours = entry.pop("hours")
        entry["mean_response_hours"] = round(sum(hours) / len(hours), 2) if hours else None
        entry["max_response_hours"] = round(max(hours), 2) if hours else None
    return dict(sorted(figures.items()))


def compute(desk: Desk, since: date | None, until: date | None, now: datetime) -> dict[str, Any]:
    """Every figure of the report for [since, until] (local dates, inclusive)."""
    tz = desk.settings.desk.tz
    since, until = period(since, until, now.astimezone(tz).date())
    start, end = window(since, until, tz)
    periods = trend_periods(since, until)
    earliest, _ = window(periods[0][0], periods[0][1], tz)
    with desk.db.sessions() as session:
        # A list, not a stream: the report lists every incident due in its period.
        facts = list(metrics.iter_facts(session, desk, now, created_before=end, since=earliest))
    current = summarize(facts, start, end, now)
    opened = [f for f in facts if start <= f.created_at < end]
    due = [f for f in facts if f.due_in(start, end, now)]
    prev_since, prev_until = previous_period(since, until)
    previous = summarize(facts, *window(prev_since, prev_until, tz), now)
    trend = []
    for a, b in periods:
        s = summarize(facts, *window(a, b, tz), now)
        trend.append({"since": a.isoformat(), "until": b.isoformat(), **_rate_keys(s)})
    by_category = _groups(opened, due, lambda f: f.category, ())
    top_requesters = Counter(f.requester for f in opened).most_common(TOP)
    return {
        "since": since.isoformat(),
        "until": until.isoformat(),
        "timezone": desk.settings.desk.timezone,
        "generated_at": _iso(now),
        **current,
        "requests_opened": _requests_opened(desk, start, end),
        "by_priority": _groups(opened, due, lambda f: f.priority, PRIORITIES),
        "by_tier": _groups(opened, due, lambda f: f.tier or "-", TIERS),
        "by_category": dict(sorted(by_category.items(), key=lambda kv: (-kv[1]["opened"], kv[0]))),
        "top_categories": [
            {"category": k, "opened": v["opened"]}
            for k, v in sorted(by_category.items(), key=lambda kv: (-kv[1]["opened"], kv[0]))
            if v["opened"]
        ][:TOP],
        "top_requesters": [{"requester": r, "opened": n} for r, n in top_requesters],
        "previous": {
            "since": prev_since.isoformat(),
            "until": prev_until.isoformat(),
            **previous,
        },
        "change": _change(current, previous),
        "trend": trend,
        "due_incidents": _due_rows(due),
        "vendors": _vendor_figures(desk, start, end),
    }


def _rate_keys(summary: dict[str, Any]) -> dict[str, Any]:
    return {
        k: summary[k] for k in ("incidents", "resolved_within_target", "target_achievement_rate")
    }


# -- rendering ----------------------------------------------------------------------------


def csv_rows(data: dict[str, Any]) -> list[tuple[str, str, str, Any]]:
    """The report as (section, key, metric, value) rows: the CSV and the HTML share these."""
    rows: list[tuple[str, str, str, Any]] = [
        ("summary", "", "since", data["since"]),
        ("summary", "", "until", data["until"]),
    ]
    rows += _summary_rows("summary", data)
    rows.append(("summary", "", "requests_opened", data["requests_opened"]))
    for section, table in (
        ("priority", data["by_priority"]),
        ("tier", data["by_tier"]),
        ("category", data["by_category"]),
    ):
        rows += [
            (section, name, m, values[m]) for name, values in table.items() for m in GROUP_METRICS
        ]
    rows += [("top_category", t["category"], "opened", t["opened"]) for t in data["top_categories"]]
    rows += [
        ("top_requester", t["requester"], "opened", t["opened"]) for t in data["top_requesters"]
    ]
    previous = data["previous"]
    rows += [
        ("previous", "", "since", previous["since"]),
        ("previous", "", "until", previous["until"]),
    ]
    rows += _summary_rows("previous", previous)
    rows += [("change", "", k, v) for k, v in data["change"].items()]
    for item in data["trend"]:
        key = f"{item['since']}..{item['until']}"
        rows += [("trend", key, m, item[m]) for m in GROUP_METRICS[1:]]
    for name, values in data.get("vendors", {}).items():
        rows += [("vendor", name, m, values[m]) for m in VENDOR_METRICS]
    return rows


def _summary_rows(section: str, summary: dict[str, Any]) -> list[tuple[str, str, str, Any]]:
    rows = [(section, "", key, summary[key]) for key in CORE]
    for key in TIMES:
        rows += [(section, "", f"{key}.{m}", summary[key][m]) for m in ("count", "mean", "p90")]
    return rows


def _csv(rows: Iterable[Sequence[Any]], header: Sequence[str]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if v is None else v for v in row])
    return out.getvalue()


def to_csv(data: dict[str, Any]) -> str:
    return _csv(csv_rows(data), ("section", "key", "metric", "value"))


def incidents_csv(data: dict[str, Any]) -> str:
    """One row per incident due in the period (the report's own evidence)."""
    rows = data["due_incidents"]
    return _csv(([row[k] for k in DUE_COLUMNS] for row in rows), DUE_COLUMNS)


def render(data: dict[str, Any], fmt: str, desk: Desk | None = None) -> str:
    """`text` (the report template), `json` or `csv`."""
    if fmt == "json":
        return json.dumps(data, ensure_ascii=False, indent=2)
    if fmt == "csv":
        return to_csv(data).rstrip("\n")
    if desk is None:
        raise MailflowError("the text report needs the desk's templates")
    rendered = desk.renderer.render(
        "report", desk=desk.settings.desk, **template_context(desk, data, None, mail=False)
    )
    return f"{rendered.subject}\n\n{rendered.text}".rstrip("\n")


def template_context(
    desk: Desk,
    data: dict[str, Any],
    kind: str | None,
    *,
    mail: bool,
    images: Sequence[tuple[str, str, bytes]] = (),
) -> dict[str, Any]:
    """What the report templates get: the data, and `when` to show its times locally."""

    def when(iso: str | None) -> str:
        return desk.renderer.local(datetime.fromisoformat(iso)) if iso else "-"

    return {
        "report": data,
        "kind": kind,
        "mail": mail,
        "when": when,
        "charts": {cid.split(".png@")[0]: cid for cid, _, _ in images},
    }


# -- the weekly and monthly mail ----------------------------------------------------------


def last_period(kind: str, today: date) -> tuple[date, date]:
    """The last full week (Monday–Sunday) or month before `today`."""
    if kind == "weekly":
        monday = today - timedelta(days=today.weekday())
        return monday - timedelta(days=7), monday - timedelta(days=1)
    first = today.replace(day=1)
    return _add_months(first, -1), first - timedelta(days=1)


SCHEDULES = {"weekly": weekly_schedule, "monthly": monthly_schedule}  # kind → its parser


def schedule_of(settings: Settings, kind: str) -> tuple[int, time] | None:
    """When the weekly or monthly report goes out (`[digest] <kind>_report`); None: off."""
    return SCHEDULES[kind](getattr(settings.digest, f"{kind}_report"))


def due_period(desk: Desk, kind: str, now: datetime) -> tuple[date, date] | None:
    """The period of the report whose time came last, at or before `now` (desk time): the
    last full week (month) before that day; None when the report is off.

    A daemon that was down at that time sends it when it comes back, even after the week
    (month) has turned ("sun 18:00", "28 09:00"), once a report of this kind has been
    sent before: a new desk does not start with a report of a time before it ran.
    """
    schedule = schedule_of(desk.settings, kind)
    if schedule is None:
        return None
    day, at = schedule
    local = now.astimezone(desk.settings.desk.tz)
    today = local.date()
    if kind == "weekly":
        scheduled = today - timedelta(days=today.weekday()) + timedelta(days=day)
        earlier = scheduled - timedelta(days=7)
    else:
        scheduled = today.replace(day=day)
        earlier = _add_months(scheduled, -1)
    if (today, local.time()) >= (scheduled, at):
        return last_period(kind, scheduled)
    if _ever_sent(desk, f"report-{kind}"):
        return last_period(kind, earlier)
    return None


def recipients(desk: Desk) -> list[str]:
    """The review meeting: incident manager, service desk lead, L2 and L3."""
    roles = desk.settings.roles
    people = [*roles.incident_manager, *roles.service_desk_lead, *roles.l2, *roles.l3]
    return list(dict.fromkeys(people))


def attachments(data: dict[str, Any]) -> list[tuple[str, str, bytes]]:
    name = f"{data['since']}_{data['until']}"
    return [
        (f"report_{name}.csv", "text/csv", to_csv(data).encode("utf-8-sig")),
        (f"incidents_{name}.csv", "text/csv", incidents_csv(data).encode("utf-8-sig")),
    ]


def send_report(desk: Desk, kind: str, now: datetime, *, force: bool = False) -> list[str]:
    """Mail the due week's or month's report once per recipient; returns who got it.
    `force`: the last full week or month before today, whatever the schedule."""
    if force:
        period = last_period(kind, now.astimezone(desk.settings.desk.tz).date())
    else:
        period = due_period(desk, kind, now)
    if period is None:
        return []
    since, until = period
    job = f"report-{kind}"
    todo = [a for a in recipients(desk) if not _claimed(desk, job, f"{since}:{a}")]
    if not todo:
        return []
    data = compute(desk, since, until, now)
    from mailflow import charts

    images = charts.images(data)
    files = attachments(data)
    sent = []
    for address in todo:
        if _queue_once(desk, job, f"{since}:{address}", address, data, kind, images, files, now):
            sent.append(address)
    log.info("%s report %s..%s sent to %s", kind, since, until, ", ".join(sent) or "nobody")
    return sent


def _ever_sent(desk: Desk, job: str) -> bool:
    with desk.db.sessions() as session:
        return session.scalar(select(JobRun.key).where(JobRun.job == job).limit(1)) is not None


def _claimed(desk: Desk, job: str, key: str) -> bool:
    with desk.db.sessions() as session:
        return session.get(JobRun, (job, key)) is not None


def _queue_once(
    desk: Desk,
    job: str,
    key: str,
    address: str,
    data: dict[str, Any],
    kind: str,
    images: list[tuple[str, str, bytes]],
    files: list[tuple[str, str, bytes]],
    now: datetime,
) -> bool:
    """Claim (job, key) and queue the mail in one transaction: both happen, or neither."""
    try:
        with desk.db.transaction() as session:
            session.add(JobRun(job=job, key=key, at=now))
            session.flush()
            notify.queue(
                session,
                desk,
                "report",
                [address],
                now,
                attachments=files,
                inline=images,
                **template_context(desk, data, kind, mail=True, images=images),
            )
    except IntegrityError:
        return False  # another daemon claimed it first
    return True


def _trigger(kind: str) -> Callable[[Desk], CronTrigger]:
    def trigger(desk: Desk) -> CronTrigger:
        tz = desk.settings.desk.timezone
        schedule = schedule_of(desk.settings, kind)
        if schedule is None:  # disabled: wake daily, send nothing
            return CronTrigger(hour=9, minute=0, timezone=tz)
        day, at = schedule
        when = {"day_of_week": day} if kind == "weekly" else {"day": day}
        return CronTrigger(**when, hour=at.hour, minute=at.minute, timezone=tz)

    return trigger


for _kind in ("weekly", "monthly"):
    jobs.register(
        jobs.Job(
            name=f"report-{_kind}",
            run=lambda desk, now, kind=_kind: send_report(desk, kind, now),
            trigger=_trigger(_kind),
            catch_up=True,
            needs=("matplotlib",),  # the charts (mailflow/charts.py), imported when it runs
            setting=f"digest.{_kind}_report",
            enabled=lambda settings, kind=_kind: schedule_of(settings, kind) is not None,
        )
    )
