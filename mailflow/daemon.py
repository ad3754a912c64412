"""The daemon: intake, processing, relay and scheduled jobs in one asyncio process.

    sources ──poll──▶ inbound (raw) ──pipeline──▶ tickets + events + outbox ──relay──▶ SMTP
                                    scheduler (SLA, digests, reports) ─┘

`run_once()` does one pass of everything (`mailflow run --once`); `run()` loops until
SIGTERM, finishing the message in hand before it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from mailflow import intake, jobs, outbox, pipeline
from mailflow.desk import Desk
from mailflow.fetch import MaildirSource, SourceError
from mailflow.models import MailboxState, utcnow

log = logging.getLogger(__name__)


@dataclass
class PassResult:
    fetched: int = 0
    processed: int = 0
    relay: outbox.RelayResult = field(default_factory=outbox.RelayResult)
    errors: list[str] = field(default_factory=list)


async def _wait(event: asyncio.Event, seconds: float) -> None:
    """Until the event is set or the time is up."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout=seconds)


class Daemon:
    """Runs one desk; `clock` is passed in so tests control time."""

    def __init__(self, desk: Desk, clock: Callable[[], datetime] = utcnow) -> None:
        self.desk = desk
        self.clock = clock
        self.imap = intake.imap_source(desk)
        maildir = desk.settings.maildir
        self.maildir = MaildirSource(maildir) if maildir else None
        self._stop = asyncio.Event()
        self._relay_now = asyncio.Event()

    # one pass --------------------------------------------------------------------------
    def poll(self) -> tuple[int, list[str]]:
        """Fetch from every source; a failing source is logged and recorded, not fatal."""
        fetched, errors = 0, []
        if self.imap is not None:
            try:
                fetched += intake.poll_imap(self.desk, self.imap, self.clock)
            except SourceError as exc:
                errors.append(str(exc))
                log.error("%s", exc)
                self._record_error(self.imap.name, str(exc))
                self.imap.close()
        if self.maildir is not None:
            try:
                fetched += intake.poll_maildir(self.desk, self.maildir, self.clock)
            except (SourceError, OSError) as exc:
                errors.append(str(exc))
                log.error("maildir %s: %s", self.maildir.path, exc)
        return fetched, errors

    def _record_error(self, mailbox: str, error: str) -> None:
        with self.desk.db.transaction() as session:
            state = session.get(MailboxState, mailbox)
            if state is not None:
                state.last_error = error[:2000]

    def intake_pass(self) -> tuple[int, int, list[str]]:
        fetched, errors = self.poll()
        processed = pipeline.process_pending(self.desk, self.clock)
        return fetched, processed, errors

    def run_once(self) -> PassResult:
        """Fetch everything new, process it, deliver every due outbox message."""
        fetched, processed, errors = self.intake_pass()
        relayed = asyncio.run(outbox.relay(self.desk.db, self.desk.settings.smtp, self.clock))
        return PassResult(fetched, processed, relayed, errors)

    # the daemon ------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()
        self._relay_now.set()

    async def _intake_loop(self) -> None:
        interval = self.desk.settings.desk.poll_interval
        while not self._stop.is_set():
            try:
                _, processed, _ = await asyncio.to_thread(self.intake_pass)
            except Exception:  # noqa: BLE001 — the loop must outlive any one failure
                log.exception("intake pass failed; retrying")
                processed = 0
            if processed:
                self._relay_now.set()
            if self._stop.is_set():
                break
            await _wait(self._stop, interval)

    async def _relay_loop(self) -> None:
        while not self._stop.is_set():
            try:
                await outbox.relay(self.desk.db, self.desk.settings.smtp, self.clock)
            except Exception:  # noqa: BLE001
                log.exception("relay pass failed; retrying")
            await _wait(self._relay_now, 5)
            self._relay_now.clear()

    def _scheduler(self) -> AsyncIOScheduler:
        scheduler = AsyncIOScheduler(timezone=self.desk.settings.desk.timezone)
        for job in jobs.load_all():
            scheduler.add_job(
                self._run_job,
                job.trigger(self.desk),
                args=[job],
                id=job.name,
                coalesce=True,
                max_instances=1,
                misfire_grace_time=3600,
            )
        return scheduler

    async def _run_job(self, job: jobs.Job) -> None:
        try:
            await asyncio.to_thread(job.run, self.desk, self.clock())
        except Exception:  # noqa: BLE001
            log.exception("job %s failed", job.name)

    async def run(self) -> None:
        """Until SIGTERM/SIGINT; SIGHUP reloads rules/."""
        self._stop = asyncio.Event()
        self._relay_now = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self.desk.reload_rules)
        scheduler = self._scheduler()
        scheduler.start()
        for job in jobs.JOBS:
            if job.catch_up:
                loop.create_task(self._run_job(job))
        log.info("mailflow running for %s", self.desk.address)
        try:
            await asyncio.gather(self._intake_loop(), self._relay_loop())
        finally:
            scheduler.shutdown(wait=False)
            if self.imap is not None:
                self.imap.close()
            log.info("mailflow stopped")
