"""A failing mail source is retried with a growing delay; the lead is alerted once per outage
(at once for a refused login, which will not heal by itself)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from mailflow.alerts import alert, clear

if TYPE_CHECKING:
    from mailflow.desk import Desk

SOURCE_ALERT_AFTER = 3  # consecutive failures (a refused login alerts at once)


def _login_refused(error: BaseException) -> bool:
    from mailflow.fetch import LoginRefused

    return isinstance(error, LoginRefused)


def source_failed(
    desk: Desk, name: str, error: BaseException, failures: int, now: datetime
) -> bool:
    """A mail source failed `failures` times in a row: alert the lead once per outage.

    A refused login alerts at once, other errors from the SOURCE_ALERT_AFTER-th failure on.
    True when an alert mail was queued.
    """
    if not (_login_refused(error) or failures >= SOURCE_ALERT_AFTER):
        return False
    detail = f"{name}: {error} ({failures} failed attempt(s) in a row)"
    with desk.db.transaction() as session:
        return alert(session, desk, f"source:{name}", detail, now)


def source_recovered(desk: Desk, name: str) -> None:
    """The source works again: its next outage alerts again."""
    with desk.db.transaction() as session:
        clear(session, f"source:{name}")


@dataclass
class SourceBackoff:
    """Retry a failing mail source after 1, 2, 4 … at most 30 minutes; alert once."""

    name: str
    first: timedelta = timedelta(minutes=1)
    most: timedelta = timedelta(minutes=30)
    failures: int = 0
    retry_at: datetime | None = None
    checked: bool = False  # an alert left by an earlier process was cleared

    def due(self, now: datetime) -> bool:
        return self.retry_at is None or now >= self.retry_at

    def failed(self, desk: Desk, error: BaseException, now: datetime) -> datetime:
        """Record one failure; returns when to try again."""
        self.failures += 1
        self.retry_at = now + min(self.first * 2 ** (self.failures - 1), self.most)
        source_failed(desk, self.name, error, self.failures, now)
        return self.retry_at

    def succeeded(self, desk: Desk) -> None:
        if self.failures or not self.checked:
            source_recovered(desk, self.name)
        self.failures, self.retry_at, self.checked = 0, None, True
