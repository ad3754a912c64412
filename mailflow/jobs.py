"""Scheduled jobs (APScheduler): each is a plain function of (desk, now), idempotent
through the database, so several daemons or a restart across the hour do it once.

Other modules add their jobs to `JOBS`; the daemon registers them all and runs each through
`run`, so no failure is silent: it is logged, and the service desk lead is alerted once per
episode (until the job succeeds again). A job names the modules it imports (`needs`), which
`mailflow check` and `mailflow run` verify before it is due (mailflow/extras.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import IntegrityError

from mailflow import alerts
from mailflow.models import Alert, JobRun

if TYPE_CHECKING:
    from mailflow.config import Settings
    from mailflow.desk import Desk

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    """A job: `run(desk, now)`, fired by an APScheduler trigger built from the settings."""

    name: str
    run: Callable[[Desk, datetime], Any]
    trigger: Callable[[Desk], Any]  # desk → an APScheduler trigger
    catch_up: bool = False  # also run once at start (a daemon that was down at the hour)
    needs: tuple[str, ...] = ()  # modules it imports when it runs, checked before it is due
    setting: str = ""  # the config key that schedules it, named when a need is missing
    enabled: Callable[[Settings], bool] = lambda settings: True  # off: its needs are not


JOBS: list[Job] = []


def once(desk: Desk, job: str, key: str, now: datetime) -> bool:
    """Claim the unit of work (job, key); False when it was already done by anyone."""
    try:
        with desk.db.transaction() as session:
            session.add(JobRun(job=job, key=key, at=now))
    except IntegrityError:
        return False
    return True


def release(desk: Desk, job: str, key: str) -> None:
    """Give a claimed unit back (its work failed and should be tried again)."""
    with desk.db.transaction() as session:
        row = session.get(JobRun, (job, key))
        if row is not None:
            session.delete(row)


def register(job: Job) -> Job:
    JOBS[:] = [j for j in JOBS if j.name != job.name] + [job]
    return job


def run(job: Job, desk: Desk, now: datetime) -> Any:
    """Run the job for the scheduler: its result, or None when it failed. A failure is
    logged and alerted (once per episode); the first success after one ends the episode."""
    key = f"job:{job.name}"
    try:
        result = job.run(desk, now)
    except Exception as exc:  # noqa: BLE001 — the scheduler must outlive any one failure
        log.exception("job %s failed", job.name)
        detail = " ".join(f"{type(exc).__name__}: {exc}".split())
        _alert(desk, key, f"the scheduled job {job.name} failed: {detail}", now)
        return None
    _ended(desk, key)
    return result


def _alert(desk: Desk, key: str, detail: str, now: datetime) -> None:
    """Tell the service desk lead, once per episode (alerts.py)."""
    try:
        with desk.db.transaction() as session:
            alerts.alert(session, desk, key, detail, now)
    except Exception:  # noqa: BLE001 — e.g. the database is down: the log still has it
        log.exception("could not alert the lead: %s", detail)


def _ended(desk: Desk, key: str) -> None:
    """The job succeeded: a failure after this is a new episode, alerted again."""
    with desk.db.sessions() as session:
        if session.get(Alert, key) is None:
            return  # the usual case: one read, no write
    with desk.db.transaction() as session:
        alerts.clear(session, key)


def load_all() -> list[Job]:
    """Import the modules that define jobs, then return them."""
    import importlib

    for module in ("sla_jobs", "requests", "digest", "report", "people"):
        importlib.import_module(f"mailflow.{module}")
    return list(JOBS)
