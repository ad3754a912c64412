"""The daemon: intake, processing, relay and scheduled jobs in one asyncio process.

    sources ──poll──▶ inbound (raw) ──pipeline──▶ tickets + events + outbox ──relay──▶ SMTP
                                    scheduler (SLA, digests, reports) ─┘

`run_once()` does one pass of everything (`mailflow run --once`); `run()` loops until
SIGTERM, finishing the message in hand before it stops. In `run()` each IMAP mailbox has
a watcher thread (mailflow/watcher.py: lease, poll, IDLE, reconnect with backoff) that
wakes the processing loop when mail is stored; SIGHUP reloads rules/.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from mailflow import exporter, intake, jobs, leases, outbox, pipeline, watcher
from mailflow.desk import Desk
from mailflow.fetch import MaildirSource, SourceError
from mailflow.models import MailboxState, utcnow
from mailflow.source_backoff import SourceBackoff

log = logging.getLogger(__name__)
RELAY_TURN = 10.0  # seconds the processing waits, at most, for its relay turn


@dataclass
class PassResult:
    fetched: int = 0
    processed: int = 0
    relay: outbox.RelayResult = field(default_factory=outbox.RelayResult)
    errors: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # mailboxes another daemon polls


async def _wait(event: asyncio.Event, seconds: float) -> None:
    """Until the event is set or the time is up."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout=seconds)


class Daemon:
    """Runs one desk; `clock` is passed in so tests control time."""

    def __init__(self, desk: Desk, clock: Callable[[], datetime] = utcnow) -> None:
        self.desk = desk
        self.clock = clock
        self.mailboxes = intake.imap_mailboxes(desk)
        self.sources = [intake.source_for(cfg) for cfg in self.mailboxes]
        self.imap = self.sources[0] if self.sources else None  # the [imap] mailbox
        maildir = desk.settings.maildir
        self.maildir = MaildirSource(maildir) if maildir else None
        self.backoffs: dict[str, SourceBackoff] = {}  # per failing mail source
        self.owner = leases.process_owner()
        self._stop = asyncio.Event()
        self._relay_now = asyncio.Event()
        self._work = asyncio.Event()  # set when a watcher stored mail
        self._halt = threading.Event()  # the stop flag as threads see it
        self._loop: asyncio.AbstractEventLoop | None = None  # run()'s loop, for threads
        self._relay_poked = 0.0
        self._relay_passed = threading.Event()  # set after each relay pass (see _relay_turn)
        self.watchers: list[watcher.MailboxWatcher] = []
        self.skipped: list[str] = []  # the last poll's mailboxes leased to another daemon

    # one pass --------------------------------------------------------------------------
    def poll(self) -> tuple[int, list[str]]:
        """Fetch from every source; a failing source is logged and recorded, not fatal."""
        fetched, errors = 0, []
        self.skipped = []
        for source in self.sources:
            backoff = self.backoffs.setdefault(source.name, SourceBackoff(source.name))
            if not backoff.due(self.clock()):
                continue  # failed lately: waiting 1, 2, 4 … 30 min before the next login
            try:
                taken = intake.poll_imap(self.desk, source, self.clock, self.owner)
                fetched += taken
                if not taken:
                    self._note_skip(source.name)
                backoff.succeeded(self.desk)
            except SourceError as exc:
                errors.append(str(exc))
                log.error("%s", exc)
                self._record_error(source.name, str(exc))
                source.close()
                backoff.failed(self.desk, exc, self.clock())
        if self.maildir is not None:
            try:
                fetched += intake.poll_maildir(self.desk, self.maildir, self.clock)
            except (SourceError, OSError) as exc:
                errors.append(str(exc))
                log.error("maildir %s: %s", self.maildir.path, exc)
        return fetched, errors

    def _note_skip(self, mailbox: str) -> None:
        """Record the mailbox as skipped when a live lease of another daemon kept us out."""
        held = leases.lease(self.desk.db, mailbox, self.clock())
        if held is not None and held.owner != self.owner:
            until = held.until.strftime("%Y-%m-%dT%H:%M:%SZ")
            self.skipped.append(
                f"mailbox {mailbox} not polled: the daemon {held.owner} holds its lease "
                f"until {until}"
            )

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
        try:
            fetched, processed, errors = self.intake_pass()
        finally:
            for source in self.sources:  # the next `run --once` may run on another host
                leases.release(self.desk.db, source.name, self.owner)
        relayed = asyncio.run(outbox.relay(self.desk.db, self.desk.settings.smtp, self.clock))
        return PassResult(fetched, processed, relayed, errors, list(self.skipped))

    # the daemon ------------------------------------------------------------------------
    def stop(self) -> None:
        """Finish the message in hand, then stop (SIGTERM, SIGINT)."""
        log.info("stopping: finishing the message in hand")
        self._halt.set()
        self._relay_passed.set()  # a processing thread waiting for its relay turn goes on
        self._stop.set()
        self._relay_now.set()
        self._work.set()

    def reload(self) -> None:
        """SIGHUP: read config.toml, rules/ and templates again; on a problem keep what runs."""
        problems = self.desk.reload_config()
        if problems:
            log.error("SIGHUP: configuration not reloaded: %s", "; ".join(problems))
        else:
            log.info("SIGHUP: configuration reloaded (%d rules)", len(self.desk.rules))

    def _process_pass(self) -> int:
        """Maildir intake, then every pending message (IMAP mail comes from the watchers)."""
        if self.maildir is not None:
            try:
                intake.poll_maildir(self.desk, self.maildir, self.clock)
            except (SourceError, OSError) as exc:
                log.error("maildir %s: %s", self.maildir.path, exc)
        return pipeline.process_pending(
            self.desk, self.clock, stop=self._halt.is_set, between_batches=self._relay_turn
        )

    def _relay_turn(self) -> None:
        """Between two processing batches, about once a second: start a relay pass and wait
        for it (at most RELAY_TURN seconds). On SQLite a batch holds the write lock the relay
        needs too; without turns a long backlog held back every acknowledgement, even a
        major-incident alert, until its end (seen in benchmarks/backlog.py)."""
        now = time.monotonic()
        if self._loop is None or now - self._relay_poked < 1.0:
            return
        self._relay_poked = now
        self._relay_passed.clear()
        self._loop.call_soon_threadsafe(self._relay_now.set)
        self._relay_passed.wait(RELAY_TURN)
        self._relay_poked = time.monotonic()  # the next turn after a second of processing

    async def _intake_loop(self) -> None:
        interval = self.desk.settings.desk.poll_interval
        while not self._stop.is_set():
            self._work.clear()  # before the pass: mail stored during it wakes the next one
            try:
                processed = await asyncio.to_thread(self._process_pass)
            except Exception:  # noqa: BLE001 — the loop must outlive any one failure
                log.exception("intake pass failed; retrying")
                processed = 0
            if processed:
                self._relay_now.set()
            if self._stop.is_set():
                break
            await _wait(self._work, interval)

    async def _relay_loop(self) -> None:
        while not self._stop.is_set():
            self._relay_now.clear()
            try:
                await outbox.relay(self.desk.db, self.desk.settings.smtp, self.clock)
            except Exception:  # noqa: BLE001
                log.exception("relay pass failed; retrying")
            self._relay_passed.set()
            await _wait(self._relay_now, 5)

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
            await asyncio.to_thread(jobs.run, job, self.desk, self.clock())  # alerts
        except Exception:  # noqa: BLE001
            log.exception("job %s failed", job.name)

    def _watchers(self, loop: asyncio.AbstractEventLoop) -> list[watcher.MailboxWatcher]:
        def wake() -> None:
            loop.call_soon_threadsafe(self._work.set)

        return [
            watcher.MailboxWatcher(
                self.desk,
                source,
                cfg,
                self.clock,
                self._halt,
                wake,
                self.owner,
                login_backoff=self.backoffs.setdefault(
                    source.name, SourceBackoff(source.name)
                ),
            )
            for source, cfg in zip(self.sources, self.mailboxes, strict=True)
        ]

    async def run(self) -> None:
        """Until SIGTERM/SIGINT; SIGHUP reloads rules/."""
        self._stop = asyncio.Event()
        self._relay_now = asyncio.Event()
        self._work = asyncio.Event()
        self._halt.clear()
        self._loop = loop = asyncio.get_running_loop()
        if threading.current_thread() is threading.main_thread():  # else embedded: no signals
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop)
            loop.add_signal_handler(signal.SIGHUP, self.reload)
        metrics = exporter.serve(self.desk)
        scheduler = self._scheduler()
        scheduler.start()
        for job in jobs.JOBS:
            if job.catch_up:
                loop.create_task(self._run_job(job))
        self.watchers = self._watchers(loop)
        log.info("mailflow running for %s as %s", self.desk.address, self.owner)
        try:
            await asyncio.gather(
                self._intake_loop(),
                self._relay_loop(),
                *(asyncio.to_thread(w.run) for w in self.watchers),
            )
        finally:
            self._halt.set()
            scheduler.shutdown(wait=False)
            if metrics is not None:
                metrics.stop()
            for source in self.sources:
                source.close()
            log.info("mailflow stopped")
