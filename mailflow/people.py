"""The people directory: who the requesters are (department, phone, office, language, VIP).

Loaded from a CSV file (`mailflow people import FILE`: UTF-8 with or without a BOM, or
GB18030 as Excel in China saves it) or synced from an LDAP directory such as Active
Directory (`[directory]`, on schedule and by `mailflow people sync`). Either way people are
matched by address and their details replaced; the desk's mail only ever adds a name.
The directory feeds the owning tier's notice, `show --json`, rules that route by department
or location, the VIP priority raise and the person's mail language.
"""

from __future__ import annotations

import csv
import io
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from mailflow import jobs
from mailflow.errors import MailflowError
from mailflow.models import Person
from mailflow.tickets import requester_details

if TYPE_CHECKING:
    from apscheduler.triggers.interval import IntervalTrigger

    from mailflow.config import DirectorySettings
    from mailflow.desk import Desk

log = logging.getLogger(__name__)

REQUIRED = ("email", "name", "department", "phone", "location")
OPTIONAL = ("language", "vip")
DETAILS = ("name", "department", "phone", "location", "language", "vip")  # what a load sets
LIMITS = {"name": 300, "department": 200, "phone": 100, "location": 200, "language": 35}
VIP_VALUES = {  # how a spreadsheet or a directory attribute says yes or no
    **dict.fromkeys(("1", "y", "yes", "true", "vip", "是", "√", "x"), True),
    **dict.fromkeys(("", "0", "n", "no", "false", "否"), False),
}
ENCODINGS = ("utf-8-sig", "gb18030")  # tried in order; GB18030 is Excel's CSV in China
_EMAIL = re.compile(r"^[^@\s<>,;]+@[^@\s<>,;]+\.[^@\s<>,;]+$")
_LANGUAGE = re.compile(r"^[A-Za-z]{2,3}([-_][A-Za-z0-9]{2,8})*$")
JOB = "directory_sync"
PAGE_SIZE = 500  # Active Directory returns at most 1000 entries a page


class DirectoryError(MailflowError):
    """The directory (a CSV file or the LDAP server) could not be read at all."""


@dataclass(frozen=True)
class Entry:
    """One person as a directory lists them; None: the source does not say."""

    email: str
    name: str | None = None
    department: str | None = None
    phone: str | None = None
    location: str | None = None
    language: str | None = None
    vip: bool | None = None


@dataclass
class Loaded:
    """What a load did: people added and updated, and the rows skipped with why."""

    added: int = 0
    updated: int = 0
    skipped: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return f"added {self.added}, updated {self.updated}, skipped {len(self.skipped)}"


# -- reading a CSV file --------------------------------------------------------------------


def decode(data: bytes) -> str:
    """The file's text: UTF-8 (a BOM or none), else GB18030."""
    for encoding in ENCODINGS:
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            continue
    raise DirectoryError("the file is neither UTF-8 nor GB18030 text")


def _text(value: str | None, key: str) -> str | None:
    """A cell's text, one line, within the column's limit; None when empty."""
    value = " ".join((value or "").split())
    if len(value) > LIMITS[key]:
        raise ValueError(f"{key} is longer than {LIMITS[key]} characters")
    return value or None


def vip_flag(value: str | None) -> bool:
    """`是`, `yes`, `1`, `VIP` … → True; empty, `否`, `no`, `0` → False."""
    flag = VIP_VALUES.get((value or "").strip().lower())
    if flag is None:
        raise ValueError(f"vip must be yes or no (是/否, 1/0), got {value!r}")
    return flag


def language_tag(value: str | None) -> str | None:
    """A BCP 47 tag as the desk writes it (`zh_cn` → `zh-CN`); None when empty."""
    value = (value or "").strip()
    if not value:
        return None
    if not _LANGUAGE.match(value):
        raise ValueError(f"language must be a tag like zh-CN or en, got {value!r}")
    head, *rest = re.split(r"[-_]", value)
    return "-".join([head.lower(), *(p.upper() if len(p) == 2 else p for p in rest)])


def entry(row: dict[str, str | None], columns: Iterable[str]) -> Entry:
    """An Entry from a row keyed by field name; ValueError says what is wrong with it."""
    email = (row.get("email") or "").strip().lower()
    if not _EMAIL.match(email):
        raise ValueError(f"{email or '(empty)'!r} is not an email address" if email
                         else "no email address")
    values: dict[str, Any] = {"email": email}
    for key in columns:
        if key in LIMITS:
            values[key] = _text(row.get(key), key)
    if "language" in columns:
        values["language"] = language_tag(values.get("language"))
    if "vip" in columns:
        values["vip"] = vip_flag(row.get("vip"))
    return Entry(**values)


def _header(reader: csv.DictReader) -> tuple[str, ...]:
    """The known columns of the header (names trimmed, any case); every required one."""
    names = [(n or "").strip().lower() for n in reader.fieldnames or ()]
    missing = [n for n in REQUIRED if n not in names]
    if missing:
        raise DirectoryError(
            f"the header lacks {', '.join(missing)}: the first line must be "
            f"{','.join(REQUIRED)} (optional: {', '.join(OPTIONAL)})"
        )
    reader.fieldnames = names
    return tuple(n for n in (*REQUIRED, *OPTIONAL) if n in names)


def read_csv(text: str) -> tuple[tuple[str, ...], list[Entry], list[str]]:
    """The columns, the entries of a directory CSV and the rows skipped, each `line N:
    why`. A repeated address is skipped after its first row."""
    reader = csv.DictReader(io.StringIO(text, newline=""))
    columns = _header(reader)
    entries: dict[str, tuple[int, Entry]] = {}
    skipped: list[str] = []
    line = reader.line_num
    for row in reader:
        first, line = line + 1, reader.line_num
        if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
            continue  # a blank line, or a row of empty cells from a spreadsheet
        try:
            found = entry(row, columns)
        except ValueError as exc:
            skipped.append(f"line {first}: {exc}")
            continue
        if found.email in entries:
            skipped.append(f"line {first}: {found.email} is already on line "
                           f"{entries[found.email][0]}")
            continue
        entries[found.email] = (first, found)
    return columns, [e for _, e in entries.values()], skipped


# -- storing -------------------------------------------------------------------------------


def store(
    session: Session, entries: Iterable[Entry], carried: Iterable[str], source: str,
    now: datetime,
) -> Loaded:
    """Add or update each person by address. The fields the source carries replace what
    the desk had (an emptied cell clears it; a name is only ever replaced by a name); the
    fields it does not carry (a CSV without `vip`, a mapping without `language`) are kept."""
    carried = [key for key in DETAILS if key in set(carried)]
    loaded = Loaded()
    for found in entries:
        person = session.get(Person, found.email)
        if person is None:
            person = Person(address=found.email, first_seen=now, last_seen=now, vip=False)
            session.add(person)
            loaded.added += 1
        else:
            loaded.updated += 1
        for key in carried:
            value = getattr(found, key)
            if key == "name" and not value:
                continue
            setattr(person, key, bool(value) if key == "vip" else value)
        person.source, person.synced_at = source, now
    session.flush()
    return loaded


def import_csv(desk: Desk, path: Path, now: datetime) -> Loaded:
    """`mailflow people import FILE`: load the file's people in one transaction.
    DirectoryError when nothing could be read (no file, no header, no good row)."""
    columns, entries, skipped = read_csv(decode(path.read_bytes()))
    if not entries and skipped:
        raise DirectoryError(f"{path}: no row could be read ({'; '.join(skipped[:5])})")
    with desk.db.transaction() as session:
        loaded = store(session, entries, columns, "csv", now)
    loaded.skipped = skipped
    return loaded


# -- LDAP ----------------------------------------------------------------------------------


def _first(value: Any) -> str | None:
    """One attribute value as text: the first of a multi-valued one."""
    if isinstance(value, list | tuple):
        value = value[0] if value else None
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return None if value is None else str(value)


def _ldap_entries(settings: DirectorySettings) -> Iterator[dict[str, Any]]:
    """Every entry under base_dn matching the filter, page by page, as attribute → value."""
    import ldap3
    from ldap3.core.exceptions import LDAPException

    wanted = sorted({a for a in settings.attributes.values() if a})
    timeout = max(1, round(settings.timeout))  # ldap3 packs socket timeouts as integers
    try:
        server = ldap3.Server(settings.url, connect_timeout=timeout, get_info=ldap3.NONE)
        connection = ldap3.Connection(
            server, user=settings.bind_dn or None, password=settings.password or None,
            auto_bind=True, read_only=True, receive_timeout=timeout,
        )
        with connection:
            for found in connection.extend.standard.paged_search(
                settings.base_dn, settings.filter, attributes=wanted, paged_size=PAGE_SIZE,
                generator=True,
            ):
                if found.get("type") == "searchResEntry":
                    yield {k.lower(): v for k, v in found["attributes"].items()}
    except LDAPException as exc:
        raise DirectoryError(
            f"the directory {settings.url} cannot be read: {' '.join(str(exc).split())}"
        ) from exc


def ldap_entries(settings: DirectorySettings) -> tuple[list[Entry], list[str]]:
    """The directory's people as entries, and those skipped (no usable address) with why."""
    mapped = {key: attr.lower() for key, attr in settings.attributes.items() if attr}
    entries: dict[str, Entry] = {}
    skipped: list[str] = []
    for number, attrs in enumerate(_ldap_entries(settings), 1):
        row = {key: _first(attrs.get(attr)) for key, attr in mapped.items()}
        try:
            found = entry(row, [k for k in mapped if k != "email"])
        except ValueError as exc:
            skipped.append(f"entry {number} ({row.get('name') or '?'}): {exc}")
            continue
        entries.setdefault(found.email, found)
    return list(entries.values()), skipped


def sync(desk: Desk, now: datetime) -> Loaded:
    """`mailflow people sync` and the scheduled job: load the LDAP directory's people."""
    settings = desk.settings.directory
    if not settings.enabled:
        raise DirectoryError("no [directory] url is configured")
    try:
        import ldap3  # noqa: F401 — the one sentence below instead of a traceback
    except ImportError as exc:
        raise DirectoryError(
            "[directory] is configured, but ldap3 is not installed: "
            "pip install 'mailflow[ldap]'"
        ) from exc
    entries, skipped = ldap_entries(settings)
    carried = [key for key, attr in settings.attributes.items() if attr]
    with desk.db.transaction() as session:
        loaded = store(session, entries, carried, "ldap", now)
    loaded.skipped = skipped
    log.info("directory sync: %s", loaded)
    return loaded


def _slot(desk: Desk, now: datetime) -> str:
    """The schedule period `now` falls in: one sync per period, whichever daemon runs it."""
    period = desk.settings.directory.schedule
    assert period is not None
    return str(int(now.astimezone(UTC).timestamp() // period.total_seconds()))


def run_scheduled(desk: Desk, now: datetime) -> Loaded | None:
    """The job: sync once per schedule period (nothing when no directory is scheduled)."""
    settings = desk.settings.directory
    if not settings.enabled or settings.schedule is None:
        return None
    key = _slot(desk, now)
    if not jobs.once(desk, JOB, key, now):
        return None
    try:
        return sync(desk, now)
    except Exception:
        jobs.release(desk, JOB, key)  # the next run tries again
        raise


def _trigger(desk: Desk) -> IntervalTrigger:
    from apscheduler.triggers.interval import IntervalTrigger

    period = desk.settings.directory.schedule
    return IntervalTrigger(seconds=period.total_seconds() if period else 86400)


jobs.register(jobs.Job(
    name=JOB, run=run_scheduled, trigger=_trigger, catch_up=True, setting="directory.schedule",
    enabled=lambda s: s.directory.enabled and s.directory.schedule is not None,
))


# -- reading the directory -----------------------------------------------------------------


def lookup(session: Session, address: str | None) -> Person | None:
    """The person with this address, if the desk knows them."""
    return session.get(Person, address.strip().lower()) if address else None


def language_of(session: Session, address: str) -> str | None:
    """The language the directory gives for this person (a tag such as zh-CN), or None."""
    person = lookup(session, address)
    return person.language if person is not None else None


def _iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None


def listing(session: Session) -> list[dict[str, Any]]:
    """`mailflow people --json`: everyone, by address."""
    return [
        {"email": p.address, **requester_details(p), "source": p.source,
         "synced_at": _iso(p.synced_at), "last_seen": _iso(p.last_seen)}
        for p in session.scalars(select(Person).order_by(Person.address))
    ]

