"""The desk: settings, database, rules and templates that every step is handed.

No globals: the daemon, the CLI and the tests each build a Desk and pass it (and `now`) in.
"""

from __future__ import annotations

import dataclasses
import logging
from datetime import datetime, timedelta

import jinja2
from sqlalchemy.orm import Session

from mailflow import governor, sla
from mailflow.config import Settings, SlaTarget, load_config
from mailflow.db import Database
from mailflow.errors import ConfigError, RuleError
from mailflow.render import Renderer
from mailflow.rules import RuleSet, load_rules, load_rules_lenient

log = logging.getLogger(__name__)


class Desk:
    """One configured service desk."""

    def __init__(self, settings: Settings, db: Database | None = None) -> None:
        self.settings = settings
        self.db = db or Database(settings.database_url)
        self.renderer = Renderer(settings.templates_dir, settings.desk.language, settings.desk.tz)
        self._calendars = _calendars(settings)
        self.rules, problems = load_rules_lenient(settings.rules_dir)
        for problem in problems:
            log.error("rule problem, file skipped: %s", problem)

    @property
    def address(self) -> str:
        return self.settings.desk.address

    def reload_rules(self) -> list[str]:
        """Load rules/ again; on any problem keep the running rules and return the problems."""
        try:
            self.rules = load_rules(self.settings.rules_dir)
        except RuleError as exc:
            log.error("rules not reloaded, keeping the last good set: %s", exc)
            return [str(exc)]
        return []

    def reload_config(self) -> list[str]:
        """Read config.toml, rules/ and templates again; on any problem keep all that runs.

        Returns the problems, each naming its file and key. The database and the mail
        sources stay as started (changing them needs a restart).
        """
        try:
            settings = load_config(self.settings.path)
            rules = load_rules(settings.rules_dir)
            language, tz = settings.desk.language, settings.desk.tz
            renderer = Renderer(settings.templates_dir, language, tz)
        except (ConfigError, RuleError, jinja2.TemplateError, OSError) as exc:
            log.error("configuration not reloaded, keeping the last good one: %s", exc)
            return [str(exc)]
        self.settings = dataclasses.replace(settings, database_url=self.settings.database_url)
        self.renderer, self.rules, self._calendars = renderer, rules, _calendars(settings)
        log.info("configuration reloaded from %s", settings.path)
        return []

    def set_rules(self, rules: RuleSet) -> None:
        self.rules = rules

    def calendar(self, priority: str) -> sla.Calendar:
        """The clock a priority's SLA runs on (24x7 or business hours with holidays)."""
        return self._calendars["24x7" if self.target(priority).calendar == "24x7" else "business"]

    def business_calendar(self) -> sla.Calendar:
        return self._calendars["business"]

    def target(self, priority: str) -> SlaTarget:
        return self.settings.sla.targets.get(priority) or self.settings.sla.targets["P3"]

    def due(self, priority: str, start: datetime, which: str = "resolve") -> datetime | None:
        target: timedelta = getattr(self.target(priority), which)
        return sla.due_at(self.calendar(priority), start, target)

    def may_mail(self, session: Session, address: str, now: datetime) -> bool:
        """Whether mail to this address may be queued: not suppressed, no loop, within caps."""
        return governor.may_mail(session, self, address, now)

    def close(self) -> None:
        self.db.close()


def _calendars(settings: Settings) -> dict[str, sla.Calendar]:
    tz, hours = settings.desk.tz, sla.parse_hours(list(settings.sla.hours))
    return {
        "24x7": sla.Calendar(tz, None, settings.sla.holidays),
        "business": sla.Calendar(tz, hours, settings.sla.holidays),
    }
