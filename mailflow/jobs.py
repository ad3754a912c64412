"""Scheduled jobs (APScheduler): each is a plain function of (desk, now), idempotent
through the database, so several daemons or a restart across the hour do it once.

Other modules add their jobs to `JOBS`; the daemon registers them all.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import IntegrityError

from mailflow.models import JobRun

if TYPE_CHECKING:
    from mailflow.desk import Desk

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    """A job: `run(desk, now)`, fired by an APScheduler trigger built from the settings."""

    name: str
    run: Callable[[Desk, datetime], Any]
    trigger: Callable[[Desk], Any]  # desk → an APScheduler trigger
    catch_up: bool = False  # also run once at start (a daemon that was down at the hour)


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


def load_all() -> list[Job]:
    """Import the modules that define jobs, then return them."""
    import importlib

    for module in ("sla_jobs", "requests", "digest", "report"):
        importlib.import_module(f"mailflow.{module}")
    return list(JOBS)
