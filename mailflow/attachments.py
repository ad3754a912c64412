"""Attachments of the mails on a ticket: stored once by content hash, listed, forwarded, saved.

Each file a mail carries (an inline image of HTML mail too) becomes a row of `attachments`
naming the ticket and the mail; its bytes go to `blobs` under their SHA-256, once however
many mails carry the same screenshot. Files the size limits kept out (no bytes) are not
stored: the ticket's `omitted` already names them.
"""

from __future__ import annotations

import hashlib
import mimetypes
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import event, insert, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from mailflow.mail import human_size
from mailflow.models import Blob, Inbound, TicketAttachment

if TYPE_CHECKING:
    from mailflow.mail import Attachment, ParsedMail

NAME_LIMIT = 200
# A blob another process stored meanwhile (the same screenshot in two mails at once) is
# the same bytes: its insert is let go, not an error that fails the mail.
_INSERT_NEW = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}
_CACHE = "mailflow.attachments"  # session.info: ticket id -> its listing, for one transaction
_UNSAFE = re.compile(r"[\x00-\x1f\x7f:*?\"<>|]+")  # controls, and what Windows reserves


@dataclass(frozen=True)
class Listed:
    """One attachment as notices and `show` name it."""

    id: int
    inbound_id: int | None
    filename: str
    content_type: str
    size: int
    blob_hash: str

    @property
    def human_size(self) -> str:
        return human_size(self.size)

    def __str__(self) -> str:
        return f"{self.filename} ({self.human_size})"


def _name(att: Attachment, number: int) -> str:
    """The attachment's own name, or one made from its type (an inline image has none)."""
    name = " ".join(att.filename.split())[:NAME_LIMIT]
    if name:
        return name
    ext = mimetypes.guess_extension(att.content_type) or ".bin"
    return f"inline-{number}{ext}"


def store(session: Session, ticket_id: int, inbound: Inbound, mail: ParsedMail,
          now: datetime) -> int:
    """Record the files `mail` carried on the ticket; each distinct content is stored once.

    Returns how many were recorded."""
    kept = [a for a in mail.attachments if a.data is not None]
    if not kept:
        return 0
    hashes = [hashlib.sha256(a.data or b"").hexdigest() for a in kept]
    known = set(session.scalars(select(Blob.hash).where(Blob.hash.in_(set(hashes)))))
    new_blobs: dict[str, bytes] = {}
    for digest, att in zip(hashes, kept, strict=True):
        if digest not in known:
            new_blobs.setdefault(digest, att.data or b"")
    if new_blobs:
        dialect = session.get_bind().dialect.name
        statement = _INSERT_NEW[dialect](Blob).on_conflict_do_nothing(index_elements=["hash"])
        session.execute(
            statement, [{"hash": h, "size": len(d), "data": d} for h, d in new_blobs.items()]
        )
    rows = [
        {
            "ticket_id": ticket_id, "inbound_id": inbound.id, "blob_hash": digest,
            "filename": _name(att, n), "content_type": att.content_type[:200],
            "size": att.size, "inline": not att.filename.strip(), "created_at": now,
        }
        for n, (digest, att) in enumerate(zip(hashes, kept, strict=True), 1)
    ]
    session.execute(insert(TicketAttachment), rows)
    _cached(session).pop(ticket_id, None)
    return len(rows)


def _cached(session: Session) -> dict[int, list[Listed]]:
    return session.info.setdefault(_CACHE, {})


@event.listens_for(Session, "after_transaction_end")
def _forget(session: Session, _transaction: object) -> None:
    """A listing is kept for the transaction that read it (every notice of one mail names
    the same files, read once), never past it."""
    session.info.pop(_CACHE, None)


def listing(session: Session, ticket_id: int | None) -> list[Listed]:
    """The ticket's attachments in the order they came."""
    if ticket_id is None:
        return []
    cache = _cached(session)
    if ticket_id in cache:
        return cache[ticket_id]
    rows = session.execute(
        select(
            TicketAttachment.id, TicketAttachment.inbound_id, TicketAttachment.filename,
            TicketAttachment.content_type, TicketAttachment.size, TicketAttachment.blob_hash,
        )
        .where(TicketAttachment.ticket_id == ticket_id)
        .order_by(TicketAttachment.id)
    )
    cache[ticket_id] = [Listed(*row) for row in rows]
    return cache[ticket_id]


def forwardable(
    session: Session, ticket_id: int, inbound_id: int, limit: int
) -> tuple[list[tuple[str, str, bytes]], list[Listed]]:
    """The files of one mail that go with a notice, in order, up to `limit` bytes in all
    (as `notify.queue` takes them), and the ones left behind (listed, with their sizes)."""
    files = [a for a in listing(session, ticket_id) if a.inbound_id == inbound_id]
    attached: list[Listed] = []
    rest: list[Listed] = []
    total = 0
    for att in files:
        if total + att.size <= limit:
            attached.append(att)
            total += att.size
        else:
            rest.append(att)
    data = blobs(session, {a.blob_hash for a in attached})
    return [(a.filename, a.content_type, data[a.blob_hash]) for a in attached], rest


def blobs(session: Session, hashes: set[str]) -> dict[str, bytes]:
    if not hashes:
        return {}
    return dict(session.execute(select(Blob.hash, Blob.data).where(Blob.hash.in_(hashes))).all())


def as_json(items: list[Listed]) -> list[dict[str, object]]:
    """The contract's `attachments` of `show REF --json`."""
    return [
        {"filename": a.filename, "content_type": a.content_type, "size": a.size} for a in items
    ]


def safe_name(name: str) -> str:
    """A file name that stays in its directory: its last path component, without control
    or reserved characters (`../../etc/passwd` is saved as `passwd`)."""
    base = re.split(r"[/\\]", name)[-1]
    cleaned = _UNSAFE.sub("_", base).strip(" .")
    return cleaned[:NAME_LIMIT] or "attachment"


def _free(directory: Path, name: str, taken: set[str]) -> Path:
    """`name` in `directory`, suffixed (name-2.png, name-3.png …) when it is already there."""
    stem, dot, ext = name.rpartition(".") if "." in name.lstrip(".") else (name, "", "")
    candidate, n = name, 1
    while candidate in taken or (directory / candidate).exists():
        n += 1
        candidate = f"{stem}-{n}{dot}{ext}"
    return directory / candidate


def save(session: Session, ticket_id: int, directory: Path) -> list[Path]:
    """Write the ticket's attachments into `directory` (made if missing), never overwriting
    a file: a name already there gets a suffix. Returns the files written."""
    items = listing(session, ticket_id)
    directory.mkdir(parents=True, exist_ok=True)
    data = blobs(session, {a.blob_hash for a in items})
    written: list[Path] = []
    taken: set[str] = set()
    for att in items:
        path = _free(directory, safe_name(att.filename), taken)
        with path.open("xb") as out:  # exclusive: a file that appeared meanwhile is kept
            out.write(data[att.blob_hash])
        taken.add(path.name)
        written.append(path)
    return written
