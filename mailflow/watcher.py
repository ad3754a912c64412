"""Push delivery: one watcher per IMAP mailbox, waiting in IDLE between polls.

    ┌────────────── lease held? ──no──▶ close, wait, ask again ─────────────┐
    └─yes─▶ poll (store new mail) ─▶ IDLE until mail / renew / stop ────────┘
                 │ error: close, back off 1 s, 2 s, 4 s … reconnect_max

The watcher runs in its own thread. It holds the mailbox lease while it works (renewed
about every third of `lease_ttl`, also from inside IDLE), so with several daemons exactly
one watches each mailbox; when it dies the lease runs out and another daemon takes over.
IDLE is left and re-issued every `idle_renew` seconds (servers drop it at 30 minutes) and
before an OAuth2 token expires; servers without IDLE are polled every `poll_interval`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Protocol

from mailflow import intake, leases, logs
from mailflow.config import ImapConfig
from mailflow.desk import Desk
from mailflow.fetch import ImapSource, LoginRefused, SourceError
from mailflow.models import MailboxState

log = logging.getLogger(__name__)

FIRST_BACKOFF = 1.0
TOKEN_RECHECK = 10.0  # seconds between asks for a fresh token inside the refresh margin


class LoginBackoff(Protocol):
    """The slower schedule for refused logins (the daemon's per-source backoff)."""

    def failed(self, desk: Desk, error: BaseException, now: datetime) -> datetime: ...

    def succeeded(self, desk: Desk) -> None: ...


class Backoff:
    """1 s, 2 s, 4 s … at most `ceiling`; reset after a success."""

    def __init__(self, ceiling: float, first: float = FIRST_BACKOFF) -> None:
        self.first = first
        self.ceiling = max(ceiling, first)
        self.failures = 0

    def next(self) -> float:
        delay = min(self.first * 2**self.failures, self.ceiling)
        self.failures += 1
        return delay

    def reset(self) -> None:
        self.failures = 0


class MailboxWatcher:
    """Keeps one mailbox fetched: lease, poll, IDLE (or sleep), reconnect with backoff."""

    def __init__(
        self,
        desk: Desk,
        source: ImapSource,
        cfg: ImapConfig,
        clock: Callable[[], datetime],
        stop: threading.Event,
        on_mail: Callable[[], None],
        owner: str | None = None,
        login_backoff: LoginBackoff | None = None,
    ) -> None:
        self.desk = desk
        self.source = source
        self.cfg = cfg
        self.clock = clock
        self.stop = stop
        self.on_mail = on_mail
        self.owner = owner or leases.process_owner()
        self.ttl = timedelta(seconds=cfg.lease_ttl)
        self.backoff = Backoff(cfg.reconnect_max)  # lost connections: retry soon
        self.login_backoff = login_backoff  # refused logins: retry slowly, alert
        self.poll_interval = desk.settings.desk.poll_interval
        self._renewed_at = 0.0
        self.polls = 0  # successful polls (for tests and the log)
        self.idles = 0  # IDLE waits entered

    @property
    def name(self) -> str:
        return self.source.name

    def run(self) -> None:
        """Until `stop` is set; always gives the lease up and logs out at the end."""
        with logs.context(mailbox=self.name):
            log.info("watching %s (IDLE %s)", self.name, "on" if self.cfg.idle else "off")
            try:
                while not self.stop.is_set():
                    self.step()
            finally:
                self.source.close()
                leases.release(self.desk.db, self.name, self.owner)
                log.info("stopped watching %s", self.name)

    def step(self) -> None:
        """One round: poll when we hold the lease, then wait for mail or the next round."""
        try:
            if not self._renew():
                self.source.close()
                self.stop.wait(min(self.poll_interval, self.cfg.lease_ttl / 3))
                return
            if intake.poll_imap(self.desk, self.source, self.clock, self.owner):
                self.on_mail()
            self.polls += 1
            self.backoff.reset()
            if self.login_backoff is not None:
                self.login_backoff.succeeded(self.desk)
            self._wait()
        except SourceError as exc:
            self._failed(exc)
        except Exception as exc:  # noqa: BLE001 — the watcher must outlive any one failure
            log.exception("watching %s failed", self.name)
            self._failed(exc)

    def _wait(self) -> None:
        """IDLE until mail arrives or a renewal is due; else sleep one poll interval."""
        if self.cfg.idle and self.source.supports_idle:
            timeout = self._idle_timeout()
            if timeout is None:
                self.source.close()  # log in again with a fresh token on the next poll
                return
            self.idles += 1
            # Re-poll at least every poll_interval even in IDLE: a notification the server
            # never sent (or we never read) then delays mail by one interval, not 25 minutes.
            self.source.wait_for_mail(min(timeout, self.poll_interval), self.stop,
                                      self._keep_lease)
            return
        deadline = time.monotonic() + self.poll_interval
        while not self.stop.is_set() and (left := deadline - time.monotonic()) > 0:
            self.stop.wait(min(left, self.cfg.lease_ttl / 3))
            if not self._keep_lease():
                return

    def _idle_timeout(self) -> float | None:
        """How long to IDLE: until idle_renew, or until the login token is due for refresh.

        None: log in again now (a fresh token is on hand). A token inside its refresh
        margin with no fresh one yet keeps the session and is asked for again shortly.
        """
        timeout = self.cfg.idle_renew
        token = self.source.settings.token
        expires = self.source.auth_expires_at
        if expires is None or token is None:
            return timeout
        until_refresh = expires - token.margin - token.clock()
        if until_refresh > 0:
            return min(timeout, until_refresh)
        try:
            fresh = token.token()
        except SourceError as exc:
            log.warning("cannot refresh the login token yet: %s", exc)
            fresh = None
        if fresh is not None and fresh.value != self.source.auth_token:
            return None
        log.warning("%s: no fresh token yet; the session's token expires at %s", self.name,
                    time.strftime("%H:%M:%S", time.localtime(expires)))
        return min(timeout, TOKEN_RECHECK)

    def _keep_lease(self) -> bool:
        """Renew the lease when a third of its TTL has passed; False when it was lost."""
        if time.monotonic() - self._renewed_at < self.cfg.lease_ttl / 3:
            return True
        if self._renew():
            return True
        log.warning("lost the lease on %s; stepping back", self.name)
        return False

    def _renew(self) -> bool:
        held = leases.acquire(self.desk.db, self.name, self.owner, self.clock(), self.ttl)
        if held:
            self._renewed_at = time.monotonic()
        return held

    def _failed(self, exc: Exception) -> None:
        self.source.close()
        error = str(exc) if isinstance(exc, SourceError) else f"{type(exc).__name__}: {exc}"
        if isinstance(exc, LoginRefused) and self.login_backoff is not None:
            now = self.clock()
            retry_at = self.login_backoff.failed(self.desk, exc, now)
            delay = max((retry_at - now).total_seconds(), FIRST_BACKOFF)
        else:
            delay = self.backoff.next()
        log.error("%s; reconnecting in %.0f s", error, delay)
        try:
            with self.desk.db.transaction() as session:
                state = session.get(MailboxState, self.name)
                if state is not None:
                    state.last_error = error[:2000]
        except Exception:  # noqa: BLE001 — the database may be what failed
            log.exception("cannot record the error for %s", self.name)
        self.stop.wait(delay)
