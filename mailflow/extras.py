"""What the configured features need installed, checked before they are needed.

A feature that config.toml turns on, or a scheduled job, whose package is missing is a
configuration problem: `mailflow check` names it by file and key, and `mailflow run` refuses
to start with one sentence (exit 2, which systemd does not restart), rather than a traceback
at the first scrape, the first connection or the first weekly report.

Policy is data: `FEATURES` says which setting turns a feature on and which module it imports;
each scheduled job names its own modules (`jobs.Job.needs`); the database driver is the one
the URL's dialect imports. `INSTALL` says what to install for a module.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from mailflow import jobs
from mailflow.config import Problem
from mailflow.errors import ConfigError

if TYPE_CHECKING:
    from mailflow.config import Settings


@dataclass(frozen=True)
class Feature:
    """An optional feature: on when `on(settings)`, then `module` must import."""

    key: str  # the setting that turns it on, as `check` names it
    on: Callable[[Settings], bool]
    module: str
    what: str  # what the feature is, in a sentence


FEATURES: tuple[Feature, ...] = (
    Feature("metrics.port", lambda s: bool(s.metrics.port), "prometheus_client",
            "the metrics endpoint"),
)

# module → (its package, how to install it): the extra that carries it, or the package
INSTALL: dict[str, tuple[str, str]] = {
    "prometheus_client": ("prometheus-client", "pip install 'mailflow[metrics]'"),
    "psycopg": ("psycopg", "pip install 'mailflow[postgres]'"),
}


def _import_error(module: str) -> ImportError | None:
    """None when the module imports; else why not (also a dependency of it that is missing)."""
    try:
        importlib.import_module(module)
    except ImportError as exc:
        return exc
    return None


def _missing(module: str, exc: ImportError) -> str:
    """`psycopg is not installed: pip install …`, or why it does not import."""
    package, install = INSTALL.get(module, (module, f"pip install {module}"))
    if exc.name == module and "No module named" in str(exc):
        return f"{package} is not installed: {install}"
    return f"{package} cannot be imported ({' '.join(str(exc).split())}): {install}"


def _database(settings: Settings) -> Iterator[tuple[str, str]]:
    """The driver the database URL's dialect imports."""
    try:
        dialect = make_url(settings.database_url).get_dialect()
    except (ArgumentError, NoSuchModuleError) as exc:
        yield "database.url", f"not a database URL SQLAlchemy knows: {' '.join(str(exc).split())}"
        return
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        module = (exc.name or "").split(".")[0] or dialect.driver
        yield "database.url", (
            f"the database is {dialect.name}+{dialect.driver}, but {_missing(module, exc)}"
        )


def _features(settings: Settings) -> Iterator[tuple[str, str]]:
    for feature in FEATURES:
        if feature.on(settings) and (exc := _import_error(feature.module)) is not None:
            yield feature.key, f"{feature.what} is on, but {_missing(feature.module, exc)}"


def _jobs(settings: Settings) -> Iterator[tuple[str, str]]:
    for job in jobs.load_all():
        if not job.enabled(settings):
            continue
        for module in job.needs:
            if (exc := _import_error(module)) is not None:
                yield job.setting or "-", (
                    f"the scheduled job {job.name} is on, but {_missing(module, exc)}"
                )


def problems(settings: Settings, *, daemon: bool = True) -> list[Problem]:
    """Every missing package the settings need: the database driver always, and with
    `daemon` also the features and scheduled jobs that only the daemon runs."""
    found = list(_database(settings))
    if daemon:
        found += [*_features(settings), *_jobs(settings)]
    return [Problem(str(settings.path), key, message) for key, message in found]


def require(settings: Settings, *, daemon: bool = True) -> None:
    """Raise ConfigError (one sentence naming file and key) when a package is missing."""
    found = problems(settings, daemon=daemon)
    if found:
        raise ConfigError("; ".join(str(p) for p in found))
