"""Settings from config.toml: typed, validated, every problem named by file and key.

`load_config(path)` returns a `Settings` or raises `ConfigError` listing every problem;
`check_config(path)` returns the problems without raising (for `mailflow check`).
Relative paths are resolved against the directory holding the config file.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import time, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from mailflow.errors import ConfigError

PACKAGE_DEFAULTS = Path(__file__).parent / "default"
ROLE_KEYS = (
    "service_desk",
    "service_desk_lead",
    "l2",
    "l3",
    "incident_manager",
    "post_lead",
    "problem_manager",
)
PRIORITIES = ("P1", "P2", "P3", "P4")
CONFIRM_WORKING_DAYS = 3  # default [incident] confirm_timeout, in working days of [sla] hours
_EMAIL = re.compile(r"^[^@\s<>]+@[^@\s<>]+$")


@dataclass(frozen=True)
class Problem:
    """One thing wrong in a config or rule file."""

    file: str
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.key}: {self.message}"


@dataclass(frozen=True)
class DeskSettings:
    address: str = "itsm@example.test"
    name: str = "IT服务台"
    language: str = "zh-CN"
    timezone: str = "Asia/Shanghai"
    secret: str = ""
    poll_interval: float = 30.0
    bilingual: bool = False  # true: zh-CN mail repeats each sentence in English

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


@dataclass(frozen=True)
class ImapConfig:
    host: str = ""
    port: int = 993
    security: str = "tls"
    username: str = ""
    password: str = ""
    folder: str = "INBOX"
    timeout: float = 30.0
    batch_size: int = 200
    verify_tls: bool = True
    ca_file: str | None = None
    done_flag: str = "$MailflowDone"
    move_to: str | None = None
    # Operations (docs/operations.md): push delivery, provider quirks, OAuth2, leases.
    idle: bool = True  # wait in IMAP IDLE when the server offers it, else poll
    idle_renew: float = 1500.0  # seconds; re-issue IDLE before servers cut it (29–30 min)
    client_id: tuple[tuple[str, str], ...] = ()  # RFC 2971 ID fields; empty: ID not sent
    auth: str = "password"  # password | xoauth2
    oauth2_token_command: str = ""
    oauth2_token_file: str = ""
    oauth2_refresh_margin: float = 300.0  # seconds before expiry a token is read again
    lease_ttl: float = 60.0  # seconds a poller's lease on the mailbox lasts unrenewed
    reconnect_max: float = 300.0  # the longest wait between reconnection attempts
    # Defaults for new mail in this mailbox that no rule (but the default rule) matched.
    kind: str | None = None
    category: str | None = None
    priority: str | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.host)


@dataclass(frozen=True)
class MetricsSettings:
    port: int = 0  # 0: no Prometheus endpoint
    address: str = "127.0.0.1"


@dataclass(frozen=True)
class LogSettings:
    format: str = "text"  # text | logfmt | json
    level: str = "INFO"


@dataclass(frozen=True)
class SmtpConfig:
    host: str = ""
    port: int = 587
    security: str = "starttls"
    username: str = ""
    password: str = ""
    timeout: float = 30.0
    verify_tls: bool = True
    ca_file: str | None = None
    pickup_dir: Path | None = None  # with no host: write outgoing mail here as .eml files
    max_attempts: int = 12


@dataclass(frozen=True)
class Roles:
    service_desk: tuple[str, ...] = ()
    service_desk_lead: tuple[str, ...] = ()
    l2: tuple[str, ...] = ()
    l3: tuple[str, ...] = ()
    incident_manager: tuple[str, ...] = ()
    post_lead: tuple[str, ...] = ()
    problem_manager: tuple[str, ...] = ()
    approvers: dict[str, tuple[str, ...]] = field(default_factory=dict)
    executors: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def tier_members(self, tier: str | None) -> tuple[str, ...]:
        """The people who work a tier's queue (L1, L2, L3, IM)."""
        return {
            "L1": self.service_desk,
            "L2": self.l2,
            "L3": self.l3,
            "IM": self.incident_manager,
        }.get(tier or "", ())

    def of(self, address: str) -> frozenset[str]:
        """Every role the address holds ('approver'/'executor' for any request type)."""
        address = address.lower()
        held = {key for key in ROLE_KEYS if address in getattr(self, key)}
        if any(address in people for people in self.approvers.values()):
            held.add("approver")
        if any(address in people for people in self.executors.values()):
            held.add("executor")
        return frozenset(held)

    def approvers_for(self, request_type: str | None) -> tuple[str, ...]:
        return self.approvers.get(request_type or "", self.approvers.get("default", ()))

    def executors_for(self, request_type: str | None) -> tuple[str, ...]:
        return self.executors.get(request_type or "", self.executors.get("default", ()))


@dataclass(frozen=True)
class SlaTarget:
    response: timedelta
    resolve: timedelta
    calendar: str  # "24x7" | "business"


@dataclass(frozen=True)
class SlaSettings:
    hours: tuple[str, ...] = ("08:30-12:00", "13:30-17:30")
    holidays: str | None = "CN"
    warn_at: float = 0.75
    pause_for_vendor: bool = False  # the resolution clock stands still while a vendor is awaited
    targets: dict[str, SlaTarget] = field(
        default_factory=lambda: {
            "P1": SlaTarget(timedelta(minutes=15), timedelta(hours=4), "24x7"),
            "P2": SlaTarget(timedelta(minutes=30), timedelta(hours=8), "24x7"),
            "P3": SlaTarget(timedelta(hours=2), timedelta(hours=16), "business"),
            "P4": SlaTarget(timedelta(hours=4), timedelta(hours=40), "business"),
        }
    )


@dataclass(frozen=True)
class Vendor:
    """One `[vendors.<key>]` entry: a supplier the engineers hand incidents to."""

    key: str
    name: str
    addresses: tuple[str, ...]
    language: str = "zh-CN"
    response: timedelta | None = None  # the contract's response time; None: none agreed


@dataclass(frozen=True)
class IncidentSettings:
    # Working time on the business calendar: 3 working days of the [sla] hours; with the
    # default 08:30-12:00 + 13:30-17:30 (7.5 h a day) that is 22h30m.
    confirm_timeout: timedelta = timedelta(hours=22, minutes=30)
    reopen_grace: timedelta = timedelta(days=7)
    similar_count: int = 3


@dataclass(frozen=True)
class RequestSettings:
    required_fields: dict[str, tuple[str, ...]] = field(
        default_factory=lambda: {"default": ("request_type", "reason")}
    )
    approval_chain: dict[str, tuple[str, ...]] = field(default_factory=dict)
    token_ttl: timedelta = timedelta(days=14)
    require_dkim: bool = False
    trusted_authserv_id: str = ""


SECURITY_MODES = ("token", "dmarc", "token_or_dmarc", "from")


@dataclass(frozen=True)
class SecuritySettings:
    """[security]: what proves who sent a mail before a command in it counts (senders.py)."""

    commands: str = "token_or_dmarc"
    trusted_authserv_id: str = ""  # the authserv-id our own MTA writes in Authentication-Results
    plus_address: bool = True  # Reply-To carries the reply token as desk+r-<token>@domain


@dataclass(frozen=True)
class DigestSettings:
    time: time | None = time(8, 30)  # None: no daily digests ("off")
    send_empty: bool = False
    max_rows: int = 50
    weekly_report: str = "mon 09:00"
    monthly_report: str = "1 09:00"


# What marks a mail as a machine's answer to ours, and how much each mark weighs
# ([limits] machine_signals; loop_detection.py computes them).
MACHINE_SIGNALS = {"answered_before": 1, "same_text": 2, "counted_subject": 1, "regular_timing": 1}


@dataclass(frozen=True)
class LimitSettings:
    max_message_bytes: int = 25_000_000
    max_attachment_bytes: int = 10_000_000
    max_attachments: int = 20
    forward_attachment_bytes: int = 10_000_000  # attached to the owning tier's notice, in all
    # Safety nets, counted by when each mail was written (its Date, clipped to arrival).
    auto_replies_per_sender_per_hour: int = 20
    auto_replies_per_sender_per_day: int = 40
    auto_replies_per_ticket_per_hour: int = 10
    mails_per_ticket_per_hour: int = 60  # to anyone, while inbound mail is processed
    bounce_suppress: timedelta = timedelta(days=7)
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    # A sender who writes again this soon after we mailed them gets no automatic reply.
    loop_window: timedelta = timedelta(minutes=2)
    # A mail written this soon after our mail to its sender answers it; such a mail whose
    # machine_signals weigh machine_score or more is a machine's: nothing goes out about it.
    answer_window: timedelta = timedelta(minutes=30)
    machine_score: int = 3
    machine_signals: tuple[tuple[str, int], ...] = tuple(MACHINE_SIGNALS.items())
    loop_lookback: timedelta = timedelta(hours=24)  # the sender's earlier mails compared
    same_text: float = 0.9  # similarity of normalised texts that makes them the same
    same_text_min_chars: int = 10  # shorter texts ("thanks") are never taken for the same
    regular_spread: float = 0.1  # the last 3 intervals within this share of their mean
    written_within: timedelta = timedelta(days=7)  # an older Date counts as this old


def _machine_signals(value: Any) -> tuple[tuple[str, int], ...]:
    """[limits] machine_signals: a table of known signal names to whole weights."""
    if not isinstance(value, dict):
        raise ValueError(f"must be a table like {MACHINE_SIGNALS}, got {value!r}")
    unknown = sorted(set(value) - set(MACHINE_SIGNALS))
    if unknown:
        raise ValueError(f"unknown signal(s) {unknown}; known: {sorted(MACHINE_SIGNALS)}")
    if not all(isinstance(w, int) and not isinstance(w, bool) and w >= 0 for w in value.values()):
        raise ValueError("each weight must be a whole number, 0 or more")
    return tuple({**MACHINE_SIGNALS, **value}.items())


DIRECTORY_ATTRIBUTES = {  # a person's field → the LDAP attribute read (Active Directory's)
    "email": "mail",
    "name": "displayName",
    "department": "department",
    "phone": "telephoneNumber",
    "location": "physicalDeliveryOfficeName",
    "language": "preferredLanguage",
    "vip": "",  # no attribute by default: VIPs come from the CSV
}


@dataclass(frozen=True)
class DirectorySettings:
    """[directory]: the LDAP source of the people directory (on when `url` is set), and
    whether a VIP requester's incident is raised a priority step (also for CSV people)."""

    url: str = ""  # ldap://dc.example.test or ldaps://…; empty: no LDAP sync
    bind_dn: str = ""
    password: str = ""
    base_dn: str = ""
    filter: str = "(&(objectClass=person)(mail=*))"
    attributes: dict[str, str] = field(default_factory=lambda: dict(DIRECTORY_ATTRIBUTES))
    schedule: timedelta | None = timedelta(hours=1)  # None: only by `mailflow people sync`
    timeout: float = 30.0
    vip_raise: bool = False

    @property
    def enabled(self) -> bool:
        return bool(self.url)


@dataclass(frozen=True)
class Settings:
    """Everything mailflow reads from config.toml."""

    path: Path
    desk: DeskSettings
    database_url: str
    imap: ImapConfig
    maildir: Path | None
    smtp: SmtpConfig
    roles: Roles
    sla: SlaSettings
    incident: IncidentSettings
    requests: RequestSettings
    digest: DigestSettings
    limits: LimitSettings
    rules_dir: Path
    templates_dir: Path
    raw: dict[str, Any] = field(repr=False, default_factory=dict)
    # Every IMAP mailbox polled: [imap] first (when it has a host), then [[mailboxes]].
    mailboxes: tuple[ImapConfig, ...] = ()
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    log: LogSettings = field(default_factory=LogSettings)
    security: SecuritySettings = field(default_factory=SecuritySettings)
    directory: DirectorySettings = field(default_factory=DirectorySettings)
    vendors: dict[str, Vendor] = field(default_factory=dict)

    @property
    def base_dir(self) -> Path:
        return self.path.parent


def resolve_config_path(explicit: str | None) -> Path:
    """--config, else $MAILFLOW_CONFIG, else ./config.toml."""
    return Path(explicit or os.environ.get("MAILFLOW_CONFIG") or "config.toml")


class _Reader:
    """Reads typed values out of the parsed TOML, collecting problems instead of stopping."""

    def __init__(self, data: dict[str, Any], file: str) -> None:
        self.data = data
        self.file = file
        self.problems: list[Problem] = []
        self.read: set[str] = set()  # dotted keys the settings were read from
        self.free: set[str] = set()  # tables whose keys are names of the user's choosing

    def problem(self, key: str, message: str) -> None:
        self.problems.append(Problem(self.file, key, message))

    def table(self, key: str) -> dict[str, Any]:
        node: Any = self.data
        for part in key.split("."):
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if not isinstance(node, dict):
            self.problem(key, "must be a table")
            return {}
        return node

    def entries(self, key: str) -> dict[str, Any]:
        """A table whose keys the user names (request types, vendors …), checked by the caller."""
        self.free.add(key)
        return self.table(key)

    def get(self, section: str, key: str, kind: type, default: Any) -> Any:
        self.read.add(f"{section}.{key}")
        value = self.table(section).get(key, default)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if value is not None and not isinstance(value, kind):
            self.problem(f"{section}.{key}", f"must be {kind.__name__}, got {value!r}")
            return default
        return value

    def parsed(self, section: str, key: str, default: Any, convert: Callable[[Any], Any]) -> Any:
        self.read.add(f"{section}.{key}")
        value = self.table(section).get(key)
        if value is None:
            return default
        try:
            return convert(value)
        except (ValueError, TypeError) as exc:
            self.problem(f"{section}.{key}", str(exc))
            return default

    def secret(self, section: str, key: str) -> str:
        """A secret given inline or through `<key>_env` naming an environment variable."""
        env_name = self.get(section, f"{key}_env", str, "")
        self.read.add(f"{section}.{key}")
        if env_name:
            if env_name not in os.environ:
                self.problem(f"{section}.{key}_env", f"environment variable {env_name} is not set")
            return os.environ.get(env_name, "")
        return self.get(section, key, str, "")

    def emails(self, key: str, value: Any) -> tuple[str, ...]:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            self.problem(key, "must be a list of email addresses")
            return ()
        out = []
        for item in value:
            if not isinstance(item, str) or not _EMAIL.match(item.strip()):
                self.problem(key, f"{item!r} is not an email address")
                continue
            out.append(item.strip().lower())
        return tuple(out)


def _duration(value: Any) -> timedelta:
    from mailflow.sla import parse_duration

    if isinstance(value, int | float) and not isinstance(value, bool):
        return timedelta(minutes=value)
    if not isinstance(value, str):
        raise ValueError(f"must be a duration like '4h' or '30m', got {value!r}")
    return parse_duration(value)


def _working_day(hours: tuple[str, ...]) -> timedelta:
    """Length of one working day of the business calendar (the sum of its periods)."""
    from mailflow.sla import parse_hours

    total = timedelta()
    for start, end in parse_hours(list(hours)):
        end_minutes = end.hour * 60 + end.minute or 24 * 60
        total += timedelta(minutes=end_minutes - (start.hour * 60 + start.minute))
    return total


def _clock(value: Any) -> time:
    if not isinstance(value, str) or not re.fullmatch(r"\d{1,2}:\d{2}", value):
        raise ValueError(f"must be a time of day like '08:30', got {value!r}")
    hour, minute = map(int, value.split(":"))
    return time(hour, minute)


def _clock_or_off(value: Any) -> time | None:
    """`[digest] time`: "08:30", or "off" for no daily digests."""
    return None if isinstance(value, str) and value.strip().lower() == "off" else _clock(value)


WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def weekly_schedule(value: str) -> tuple[int, time] | None:
    """`[digest] weekly_report`: "mon 09:00" → (0, 09:00); "off" → None."""
    if value.strip().lower() == "off":
        return None
    parts = value.split()
    if len(parts) != 2 or parts[0].lower() not in WEEKDAYS:
        raise ValueError(f"must be a weekday and a time like 'mon 09:00', or 'off'; got {value!r}")
    return WEEKDAYS.index(parts[0].lower()), _clock(parts[1])


def monthly_schedule(value: str) -> tuple[int, time] | None:
    """`[digest] monthly_report`: "1 09:00" (day 1–28 of the month) → (1, 09:00); "off" → None."""
    if value.strip().lower() == "off":
        return None
    parts = value.split()
    if len(parts) != 2 or not parts[0].isdigit() or not 1 <= int(parts[0]) <= 28:
        raise ValueError(f"must be a day 1-28 and a time like '1 09:00', or 'off'; got {value!r}")
    return int(parts[0]), _clock(parts[1])


def _choice(r: _Reader, section: str, key: str, default: str, allowed: tuple[str, ...]) -> str:
    value = r.get(section, key, str, default)
    if value not in allowed:
        r.problem(f"{section}.{key}", f"must be one of {', '.join(allowed)}, got {value!r}")
        return default
    return value


def _path(base: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def _database_url(base: Path, url: str) -> str:
    """Resolve a relative SQLite path against the config directory."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/") and ":memory:" not in url:
        return prefix + str(base / url[len(prefix) :])
    return url


def _names(r: _Reader, key: str, value: Any) -> tuple[str, ...] | None:
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        r.problem(key, f"must be a list of names, got {value!r}")
        return None
    return tuple(v.strip() for v in value)


def _senders(r: _Reader, key: str) -> tuple[str, ...]:
    """[limits] allow/deny: addresses and @domains, lowercased."""
    value = r.get("limits", key, list, [])
    out = []
    for item in value:
        entry = item.strip().lower() if isinstance(item, str) else ""
        if not (_EMAIL.match(entry) or re.fullmatch(r"@[^@\s<>]+\.[^@\s<>]+", entry)):
            r.problem(f"limits.{key}", f"{item!r} is not an address or an @domain")
            continue
        out.append(entry)
    return tuple(out)


def _seconds(value: Any) -> float:
    """A number of seconds, or a duration string ('90s', '25m', '1h')."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and re.fullmatch(r"\s*\d+(\.\d+)?\s*s\s*", value):
        seconds = float(value.strip()[:-1])
    elif isinstance(value, str):
        seconds = _duration(value).total_seconds()
    else:
        raise ValueError(f"must be seconds (a number) or a duration like '25m', got {value!r}")
    if seconds <= 0:
        raise ValueError(f"must be longer than zero, got {value!r}")
    return seconds


def _client_id(r: _Reader, section: str) -> tuple[tuple[str, str], ...]:
    """[imap] id = {name = …} (sent as is) or send_id = true (mailflow's own fields)."""
    from mailflow import __version__

    table = r.table(section)
    r.read.add(f"{section}.id")
    fields = table.get("id")
    if fields is not None:
        if not isinstance(fields, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in fields.items()
        ):
            r.problem(f"{section}.id", 'must be a table of strings, e.g. {name = "mailflow"}')
            return ()
        bad = [k for k, v in fields.items() if len(k) > 30 or len(v) > 1024]
        if bad or len(fields) > 30:
            r.problem(f"{section}.id", "RFC 2971 allows 30 fields, names ≤ 30 and values ≤ 1024")
        return tuple(fields.items())
    if r.get(section, "send_id", bool, False):
        return (("name", "mailflow"), ("version", __version__), ("vendor", "mailflow"))
    return ()


def _imap_config(r: _Reader, section: str, base: Path) -> ImapConfig:
    """One mailbox's settings from `section` ([imap] or mailboxes.N)."""
    s = section
    cfg = ImapConfig(
        host=r.get(s, "host", str, ""),
        port=r.get(s, "port", int, 993),
        security=_choice(r, s, "security", "tls", ("none", "starttls", "tls")),
        username=r.get(s, "username", str, ""),
        password=r.secret(s, "password"),
        folder=r.get(s, "folder", str, "INBOX"),
        timeout=r.get(s, "timeout", float, 30.0),
        batch_size=r.get(s, "batch_size", int, 200),
        verify_tls=r.get(s, "verify_tls", bool, True),
        ca_file=r.get(s, "ca_file", str, None),
        done_flag=r.get(s, "done_flag", str, "$MailflowDone"),
        move_to=r.get(s, "move_to", str, None),
        idle=r.get(s, "idle", bool, True),
        idle_renew=r.parsed(s, "idle_renew", 1500.0, _seconds),
        client_id=_client_id(r, s),
        auth=_choice(r, s, "auth", "password", ("password", "xoauth2")),
        oauth2_token_command=r.get(s, "oauth2_token_command", str, ""),
        oauth2_token_file=r.get(s, "oauth2_token_file", str, ""),
        oauth2_refresh_margin=r.parsed(s, "oauth2_refresh_margin", 300.0, _seconds),
        lease_ttl=r.parsed(s, "lease_ttl", 60.0, _seconds),
        reconnect_max=r.parsed(s, "reconnect_max", 300.0, _seconds),
        kind=_choice(r, s, "kind", "", ("", "incident", "request")) or None,
        category=r.get(s, "category", str, None),
        priority=_choice(r, s, "priority", "", ("", *PRIORITIES)) or None,
    )
    if cfg.oauth2_token_file:
        cfg = replace(cfg, oauth2_token_file=str(_path(base, cfg.oauth2_token_file)))
    if cfg.enabled and not cfg.username:
        r.problem(f"{s}.username", f"required when {s}.host is set")
    if cfg.idle_renew >= 29 * 60:
        r.problem(f"{s}.idle_renew", "must be under 29 minutes (RFC 2177: servers cut IDLE at 30)")
    if cfg.auth == "xoauth2" and bool(cfg.oauth2_token_command) == bool(cfg.oauth2_token_file):
        r.problem(f"{s}.auth", "xoauth2 needs one of oauth2_token_command, oauth2_token_file")
    if cfg.auth != "xoauth2" and (cfg.oauth2_token_command or cfg.oauth2_token_file):
        r.problem(f"{s}.auth", 'set auth = "xoauth2" to use an OAuth2 token')
    if cfg.lease_ttl < 5:
        r.problem(f"{s}.lease_ttl", "must be at least 5 seconds")
    return cfg


def _mailboxes(r: _Reader, imap: ImapConfig, base: Path) -> tuple[ImapConfig, ...]:
    """[imap] (when it has a host) and each [[mailboxes]] entry, which inherits from [imap]."""
    entries = r.data.get("mailboxes", [])
    r.free.add("mailboxes")  # each entry is checked by a reader of its own
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        r.problem("mailboxes", "must be an array of tables ([[mailboxes]])")
        return (imap,) if imap.enabled else ()
    out = [imap] if imap.enabled else []
    inherited = r.table("imap")
    for n, entry in enumerate(entries):
        section = f"mailboxes.{n}"
        # A nested copy so the reader's dotted lookup finds "mailboxes.N" (and names it).
        local = _Reader({"mailboxes": {str(n): {**inherited, **entry}}}, r.file)
        cfg = _imap_config(local, section, base)
        local.problems += unknown_keys(local, section)
        r.problems.extend(local.problems)
        if not cfg.enabled:
            r.problem(f"{section}.host", "required (here or in [imap])")
        out.append(cfg)
    names = [(c.username, c.host, c.port, c.folder) for c in out]
    if len(set(names)) != len(names):
        r.problem("mailboxes", "two mailboxes read the same folder of the same account")
    return tuple(out)


def _log_settings(r: _Reader) -> LogSettings:
    level = r.get("log", "level", str, "INFO").upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        r.problem("log.level", f"must be DEBUG, INFO, WARNING or ERROR, got {level!r}")
        level = "INFO"
    return LogSettings(_choice(r, "log", "format", "text", ("text", "logfmt", "json")), level)


def _metrics_settings(r: _Reader) -> MetricsSettings:
    port = r.get("metrics", "port", int, 0)
    if not 0 <= port <= 65535:
        r.problem("metrics.port", f"must be a TCP port (1-65535), or 0 for none; got {port}")
        port = 0
    return MetricsSettings(port, r.get("metrics", "address", str, "127.0.0.1"))


def _request_settings(r: _Reader, roles: Roles) -> RequestSettings:
    """[requests]: required form fields and approval chains per request type, tokens."""
    from mailflow.forms import FIELDS

    fields: dict[str, tuple[str, ...]] = {}
    for rtype, value in r.entries("requests.required_fields").items():
        key = f"requests.required_fields.{rtype}"
        names = _names(r, key, value)
        unknown = [n for n in names or () if n not in FIELDS]
        if unknown:
            r.problem(key, f"unknown field(s) {', '.join(unknown)}; known: {', '.join(FIELDS)}")
        if names is not None:
            fields[rtype] = tuple(n for n in names if n in FIELDS)
    chains: dict[str, tuple[str, ...]] = {}
    for rtype, value in r.entries("requests.approval_chain").items():
        key = f"requests.approval_chain.{rtype}"
        steps = _names(r, key, value)
        if not steps:
            if steps is not None:
                r.problem(key, "needs at least one step")
            continue
        for step in steps:
            known = "@" in step or step in roles.approvers or step in ROLE_KEYS
            if not known:
                r.problem(key, f"{step!r} is not an address, a [roles.approvers] group or a role")
            elif "@" in step and not _EMAIL.match(step):
                r.problem(key, f"{step!r} is not an email address")
        chains[rtype] = steps
    settings = RequestSettings(
        required_fields=fields or RequestSettings().required_fields,
        approval_chain=chains,
        token_ttl=r.parsed("requests", "token_ttl", timedelta(days=14), _duration),
        require_dkim=r.get("requests", "require_dkim", bool, False),
        trusted_authserv_id=r.get("requests", "trusted_authserv_id", str, "").strip(),
    )
    if settings.token_ttl <= timedelta(0):
        r.problem("requests.token_ttl", "must be longer than zero")
    if settings.require_dkim and not settings.trusted_authserv_id:
        r.problem(
            "requests.trusted_authserv_id",
            "required when require_dkim = true: the authserv-id your own MTA writes in "
            "Authentication-Results (e.g. \"mx.example.test\")",
        )
    return settings


def _security_settings(r: _Reader, requests: RequestSettings) -> SecuritySettings:
    """[security]; `[requests] trusted_authserv_id` (older configs) is the fallback."""
    trusted = r.get("security", "trusted_authserv_id", str, "").strip()
    settings = SecuritySettings(
        commands=_choice(r, "security", "commands", "token_or_dmarc", SECURITY_MODES),
        trusted_authserv_id=trusted or requests.trusted_authserv_id,
        plus_address=r.get("security", "plus_address", bool, True),
    )
    if settings.commands == "dmarc" and not settings.trusted_authserv_id:
        r.problem(
            "security.trusted_authserv_id",
            'required when commands = "dmarc": the authserv-id your own MTA writes in '
            'Authentication-Results (e.g. "mx.example.test")',
        )
    return settings


def _directory_settings(r: _Reader) -> DirectorySettings:
    """[directory] and [directory.attributes]: the LDAP people source."""
    attributes = dict(DIRECTORY_ATTRIBUTES)
    for key, value in r.entries("directory.attributes").items():
        if key not in DIRECTORY_ATTRIBUTES:
            r.problem(f"directory.attributes.{key}",
                      f"unknown field; known: {', '.join(DIRECTORY_ATTRIBUTES)}")
        elif not isinstance(value, str):
            r.problem(f"directory.attributes.{key}", f"must be an attribute name, got {value!r}")
        else:
            attributes[key] = value.strip()
    settings = DirectorySettings(
        url=r.get("directory", "url", str, "").strip(),
        bind_dn=r.get("directory", "bind_dn", str, ""),
        password=r.secret("directory", "password"),
        base_dn=r.get("directory", "base_dn", str, ""),
        filter=r.get("directory", "filter", str, DirectorySettings.filter),
        attributes=attributes,
        schedule=r.parsed("directory", "schedule", timedelta(hours=1), _duration_or_off),
        timeout=r.get("directory", "timeout", float, 30.0),
        vip_raise=r.get("directory", "vip_raise", bool, False),
    )
    if settings.url and not re.match(r"ldaps?://", settings.url):
        r.problem("directory.url", f"must start with ldap:// or ldaps://, got {settings.url!r}")
    if settings.url and not settings.base_dn:
        r.problem("directory.base_dn", "required when url is set: where the people are")
    if settings.url and not attributes["email"]:
        r.problem("directory.attributes.email", "required: people are matched by address")
    if settings.schedule is not None and settings.schedule < timedelta(minutes=1):
        r.problem("directory.schedule", "must be at least 1m, or \"off\"")
    return settings


def _duration_or_off(value: Any) -> timedelta | None:
    return None if value == "off" else _duration(value)


def _vendors(r: _Reader, language: str) -> dict[str, Vendor]:
    """[vendors.<key>]: name, addresses, language (default the desk's), response time."""
    vendors: dict[str, Vendor] = {}
    for key, table in r.entries("vendors").items():
        section = f"vendors.{key}"
        if not isinstance(table, dict):
            r.problem(section, "must be a table ([vendors.<key>] with name and addresses)")
            continue
        for unknown in set(table) - {"name", "addresses", "language", "response"}:
            r.problem(f"{section}.{unknown}", "unknown key; allowed: name, addresses, language, "
                      "response")
        addresses = r.emails(f"{section}.addresses", table.get("addresses", []))
        if not addresses:
            r.problem(f"{section}.addresses", "at least one address is required")
        vendors[key] = Vendor(
            key=key,
            name=r.get(section, "name", str, key),
            addresses=addresses,
            language=_choice(r, section, "language", language, ("zh-CN", "en")),
            response=r.parsed(section, "response", None, _duration),
        )
    return vendors


def unknown_keys(r: _Reader, within: str = "") -> list[Problem]:
    """A problem for every key and table of the file that no setting was read from, with the
    nearest known name ("did you mean `poll_interval`?"): a misspelt key is no silent default."""
    known: dict[str, set[str]] = {}  # table → the keys and sub-tables it may hold
    for dotted in r.read | r.free:
        parts = dotted.split(".")
        for depth in range(len(parts)):
            known.setdefault(".".join(parts[:depth]), set()).add(parts[depth])
    problems: list[Problem] = []

    def walk(table: dict[str, Any], path: str) -> None:
        for key, value in table.items():
            dotted = f"{path}.{key}" if path else key
            if dotted in r.free:
                continue
            if key not in known.get(path, set()):
                near = difflib.get_close_matches(key, sorted(known.get(path, set())), n=1)
                what = "table" if isinstance(value, dict) else "key"
                hint = f"; did you mean `{near[0]}`?" if near else ""
                problems.append(Problem(r.file, dotted, f"unknown {what}{hint}"))
            elif isinstance(value, dict) and dotted not in r.read:
                walk(value, dotted)

    start: Any = r.data
    for part in within.split(".") if within else []:
        start = start.get(part, {}) if isinstance(start, dict) else {}
    if isinstance(start, dict):
        walk(start, within)
    return problems


def read_config(path: Path) -> tuple[Settings | None, list[Problem]]:
    """The settings and every problem in the config file. The settings come back despite
    problems whenever the file is TOML (e.g. to find rules/ for `check`); None when not."""
    file = str(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, [Problem(file, "-", "config file not found (use --config PATH)")]
    except (OSError, UnicodeDecodeError) as exc:
        return None, [Problem(file, "-", f"cannot read: {exc}")]
    except tomllib.TOMLDecodeError as exc:
        return None, [Problem(file, "-", f"not valid TOML: {exc}")]
    r = _Reader(data, file)
    base = path.resolve().parent

    desk = DeskSettings(
        address=r.get("desk", "address", str, DeskSettings.address).lower(),
        name=r.get("desk", "name", str, DeskSettings.name),
        language=_choice(r, "desk", "language", "zh-CN", ("zh-CN", "en")),
        timezone=r.get("desk", "timezone", str, DeskSettings.timezone),
        secret=r.secret("desk", "secret"),
        poll_interval=r.get("desk", "poll_interval", float, DeskSettings.poll_interval),
        bilingual=r.get("desk", "bilingual", bool, DeskSettings.bilingual),
    )
    if not _EMAIL.match(desk.address):
        r.problem("desk.address", f"{desk.address!r} is not an email address")
    try:
        ZoneInfo(desk.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        r.problem("desk.timezone", f"unknown time zone {desk.timezone!r}")
        desk = DeskSettings(**{**desk.__dict__, "timezone": "Asia/Shanghai"})

    imap = _imap_config(r, "imap", base)
    mailboxes = _mailboxes(r, imap, base)

    maildir_value = r.get("maildir", "path", str, "")
    smtp_host = r.get("smtp", "host", str, "")
    smtp = SmtpConfig(
        host=smtp_host,
        port=r.get("smtp", "port", int, 587),
        security=_choice(r, "smtp", "security", "starttls", ("none", "starttls", "tls")),
        username=r.get("smtp", "username", str, ""),
        password=r.secret("smtp", "password"),
        timeout=r.get("smtp", "timeout", float, 30.0),
        verify_tls=r.get("smtp", "verify_tls", bool, True),
        ca_file=r.get("smtp", "ca_file", str, None),
        pickup_dir=_path(base, r.get("smtp", "pickup_dir", str, "var/outgoing")),
        max_attempts=r.get("smtp", "max_attempts", int, 12),
    )

    roles_table = r.entries("roles")  # unknown roles are named below
    role_values = {k: r.emails(f"roles.{k}", roles_table.get(k, [])) for k in ROLE_KEYS}
    for key in roles_table:
        if key not in ROLE_KEYS and key not in ("approvers", "executors"):
            r.problem(f"roles.{key}", f"unknown role; known: {', '.join(ROLE_KEYS)}")
    by_type = {}
    for group in ("approvers", "executors"):
        table = r.entries(f"roles.{group}")
        by_type[group] = {t: r.emails(f"roles.{group}.{t}", v) for t, v in table.items()}
    roles = Roles(**role_values, approvers=by_type["approvers"], executors=by_type["executors"])
    if not roles.service_desk:
        r.problem("roles.service_desk", "at least one service desk (L1) address is required")

    targets = dict(SlaSettings().targets)
    for prio in PRIORITIES:
        section = f"sla.{prio}"
        if prio in r.table("sla"):
            old = targets[prio]
            targets[prio] = SlaTarget(
                response=r.parsed(section, "response", old.response, _duration),
                resolve=r.parsed(section, "resolve", old.resolve, _duration),
                calendar=_choice(r, section, "calendar", old.calendar, ("24x7", "business")),
            )
    hours = tuple(r.get("sla", "hours", list, list(SlaSettings.hours)))
    try:
        from mailflow.sla import parse_hours

        parse_hours(list(hours))
    except (ValueError, TypeError) as exc:
        r.problem("sla.hours", str(exc))
        hours = SlaSettings.hours
    warn_at = r.get("sla", "warn_at", float, 0.75)
    if not 0 < warn_at < 1:
        r.problem("sla.warn_at", f"must be a share between 0 and 1 (e.g. 0.75), got {warn_at!r}")
        warn_at = 0.75
    sla = SlaSettings(
        hours=hours,
        holidays=r.get("sla", "holidays", str, "CN") or None,
        warn_at=warn_at,
        pause_for_vendor=r.get("sla", "pause_for_vendor", bool, False),
        targets=targets,
    )

    confirm_default = CONFIRM_WORKING_DAYS * _working_day(hours)
    incident = IncidentSettings(
        confirm_timeout=r.parsed("incident", "confirm_timeout", confirm_default, _duration),
        reopen_grace=r.parsed("incident", "reopen_grace", timedelta(days=7), _duration),
        similar_count=r.get("incident", "similar_count", int, 3),
    )
    if not 0 <= incident.similar_count <= 10:
        r.problem("incident.similar_count", f"must be 0 to 10, got {incident.similar_count}")

    requests = _request_settings(r, roles)

    digest = DigestSettings(
        time=r.parsed("digest", "time", time(8, 30), _clock_or_off),
        send_empty=r.get("digest", "send_empty", bool, False),
        max_rows=r.get("digest", "max_rows", int, 50),
        weekly_report=r.get("digest", "weekly_report", str, "mon 09:00"),
        monthly_report=r.get("digest", "monthly_report", str, "1 09:00"),
    )
    if digest.max_rows < 1:
        r.problem("digest.max_rows", f"must be at least 1, got {digest.max_rows}")
    for key, parse in (("weekly_report", weekly_schedule), ("monthly_report", monthly_schedule)):
        try:
            parse(getattr(digest, key))
        except ValueError as exc:
            r.problem(f"digest.{key}", str(exc))

    limits = LimitSettings(
        max_message_bytes=r.get("limits", "max_message_bytes", int, 25_000_000),
        max_attachment_bytes=r.get("limits", "max_attachment_bytes", int, 10_000_000),
        max_attachments=r.get("limits", "max_attachments", int, 20),
        forward_attachment_bytes=r.get("limits", "forward_attachment_bytes", int, 10_000_000),
        auto_replies_per_sender_per_hour=r.get(
            "limits", "auto_replies_per_sender_per_hour", int, 20
        ),
        auto_replies_per_sender_per_day=r.get("limits", "auto_replies_per_sender_per_day", int, 40),
        auto_replies_per_ticket_per_hour=r.get(
            "limits", "auto_replies_per_ticket_per_hour", int, 10
        ),
        mails_per_ticket_per_hour=r.get("limits", "mails_per_ticket_per_hour", int, 60),
        bounce_suppress=r.parsed("limits", "bounce_suppress", timedelta(days=7), _duration),
        allow=_senders(r, "allow"),
        deny=_senders(r, "deny"),
        loop_window=r.parsed("limits", "loop_window", timedelta(minutes=2), _duration),
        answer_window=r.parsed("limits", "answer_window", timedelta(minutes=30), _duration),
        machine_score=r.get("limits", "machine_score", int, 3),
        machine_signals=r.parsed(
            "limits", "machine_signals", tuple(MACHINE_SIGNALS.items()), _machine_signals
        ),
        loop_lookback=r.parsed("limits", "loop_lookback", timedelta(hours=24), _duration),
        same_text=r.get("limits", "same_text", float, 0.9),
        same_text_min_chars=r.get("limits", "same_text_min_chars", int, 10),
        regular_spread=r.get("limits", "regular_spread", float, 0.1),
        written_within=r.parsed("limits", "written_within", timedelta(days=7), _duration),
    )
    for key in ("max_message_bytes", "max_attachment_bytes", "max_attachments"):
        if getattr(limits, key) < 1:
            r.problem(f"limits.{key}", f"must be at least 1, got {getattr(limits, key)}")
    for key in ("auto_replies_per_sender_per_hour", "auto_replies_per_sender_per_day",
                "auto_replies_per_ticket_per_hour"):
        if getattr(limits, key) < 0:
            r.problem(f"limits.{key}", "must be 0 (no automatic replies) or more")
    if limits.mails_per_ticket_per_hour < 1:
        r.problem("limits.mails_per_ticket_per_hour", "must be at least 1")
    if limits.machine_score < 1:
        r.problem("limits.machine_score", "must be at least 1")
    for key in ("same_text", "regular_spread"):
        if not 0 <= getattr(limits, key) <= 1:
            r.problem(f"limits.{key}", f"must be between 0 and 1, got {getattr(limits, key)}")

    rules_dir = base / "rules" if (base / "rules").is_dir() else PACKAGE_DEFAULTS / "rules"
    rules_dir = _path(base, r.get("paths", "rules", str, str(rules_dir)))
    templates_dir = base / "templates"
    if not templates_dir.is_dir():
        templates_dir = PACKAGE_DEFAULTS / "templates"
    templates_dir = _path(base, r.get("paths", "templates", str, str(templates_dir)))

    url = r.get("database", "url", str, "sqlite:///var/mailflow.db")
    url_env = r.get("database", "url_env", str, "")
    if url_env:
        if url_env not in os.environ:
            r.problem("database.url_env", f"environment variable {url_env} is not set")
        url = os.environ.get(url_env, url)
    settings = Settings(
        path=path.resolve(),
        desk=desk,
        database_url=_database_url(base, url),
        imap=imap,
        maildir=_path(base, maildir_value) if maildir_value else None,
        smtp=smtp,
        roles=roles,
        sla=sla,
        incident=incident,
        requests=requests,
        digest=digest,
        limits=limits,
        rules_dir=rules_dir,
        templates_dir=templates_dir,
        raw=data,
        mailboxes=mailboxes,
        metrics=_metrics_settings(r),
        log=_log_settings(r),
        security=_security_settings(r, requests),
        directory=_directory_settings(r),
        vendors=_vendors(r, desk.language),
    )
    return settings, r.problems + unknown_keys(r)


def check_config(path: Path) -> list[Problem]:
    """Every problem in the config file (empty when it is valid)."""
    return read_config(path)[1]


def load_config(path: Path) -> Settings:
    """Load and validate; raise ConfigError naming every problem."""
    settings, problems = read_config(path)
    if problems or settings is None:
        raise ConfigError("; ".join(str(p) for p in problems))
    return settings
