"""Message sources: an IMAP folder or a local Maildir.

Sources only read and mark mail. What was consumed is recorded in the database by the
pipeline; ``mark_done`` is called only after that commit, so a crash in between leads to
a re-fetch that the database recognises by ``Fetched.key``.
"""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import imapclient
from imapclient import exceptions as imap_errors

from mailflow.errors import MailflowError

SECURITY_MODES = ("none", "starttls", "tls")


class SourceError(MailflowError):
    """The mail source cannot be reached or refused us; the message says what to check."""


@dataclass(frozen=True)
class Fetched:
    """One stored message as read from a source."""

    key: str  # unique per stored message, see ImapSource.fetch / MaildirSource.pending
    uid: int | None  # IMAP UID; None for Maildir
    raw: bytes = field(repr=False)


@dataclass(frozen=True)
class ImapSettings:
    """How to reach and use one IMAP folder (the [imap] config section)."""

    host: str
    port: int = 993
    security: str = "tls"  # none | starttls | tls
    username: str = ""
    password: str = field(default="", repr=False)
    folder: str = "INBOX"
    timeout: float = 30.0
    batch_size: int = 200
    verify_tls: bool = True
    ca_file: str | None = None
    done_flag: str = "$MailflowDone"  # keyword set after the DB commit
    move_to: str | None = None  # folder processed mail is moved to, created if missing


class ImapSource:
    """Reads one IMAP folder by UID; never relies on or changes \\Seen."""

    def __init__(self, settings: ImapSettings) -> None:
        if settings.security not in SECURITY_MODES:
            raise SourceError(
                f"[imap] security = {settings.security!r} is not one of {', '.join(SECURITY_MODES)}"
            )
        if settings.batch_size < 1:
            raise SourceError("[imap] batch_size must be at least 1")
        self.settings = settings
        self.uidvalidity: int | None = None
        self._client: imapclient.IMAPClient | None = None

    @property
    def name(self) -> str:
        """The mailbox identity: imap:user@host:port/folder."""
        s = self.settings
        return f"imap:{s.username}@{s.host}:{s.port}/{s.folder}"

    @property
    def _where(self) -> str:
        return f"{self.settings.host}:{self.settings.port}"

    def connect(self) -> int:
        """Connect, log in and select the folder; return its UIDVALIDITY."""
        self.close()
        try:
            return self._connect()
        except SourceError:
            self.close()
            raise

    def _connect(self) -> int:
        s = self.settings
        context = self._tls_context() if s.security != "none" else None
        with self._errors("connect"):
            self._client = client = imapclient.IMAPClient(
                s.host, s.port, ssl=s.security == "tls", ssl_context=context, timeout=s.timeout
            )
            if s.security == "starttls":
                client.starttls(context)
        with self._errors("LOGIN"):
            try:
                client.login(s.username, s.password)
            except imap_errors.LoginError as exc:
                raise SourceError(
                    f"IMAP login failed for {s.username}@{s.host}: check [imap] username/password"
                ) from exc
        with self._errors("SELECT"):
            if s.move_to and not client.folder_exists(s.move_to):
                client.create_folder(s.move_to)
            if not client.folder_exists(s.folder):
                raise SourceError(
                    f"IMAP folder {s.folder!r} does not exist for {s.username} on "
                    f"{self._where}: check [imap] folder"
                )
            info = client.select_folder(s.folder)
        if b"UIDVALIDITY" not in info:
            raise SourceError(f"IMAP server {self._where} sent no UIDVALIDITY for {s.folder!r}")
        self.uidvalidity = int(info[b"UIDVALIDITY"])
        return self.uidvalidity

    def uids_after(self, uid: int) -> list[int]:
        """UIDs greater than uid in ascending order, whatever their flags."""
        client = self._connected()
        with self._errors("UID SEARCH"):
            client.noop()  # a selected folder only learns of new mail when it syncs
            found = client.search(["UID", f"{uid + 1}:*"])
        # "n:*" always matches the highest UID, even when it is below n.
        return sorted(u for u in found if u > uid)

    def fetch(self, uids: Sequence[int]) -> Iterator[Fetched]:
        """Yield the messages in UID order, batch_size per round trip, leaving \\Seen alone.

        The key is ``imap:user@host:port/folder;UIDVALIDITY;UID``. Messages expunged
        meanwhile are skipped.
        """
        client = self._connected()
        ordered = sorted(set(uids))
        size = self.settings.batch_size
        for start in range(0, len(ordered), size):
            batch = ordered[start : start + size]
            with self._errors("UID FETCH"):
                response = client.fetch(batch, [b"BODY.PEEK[]"])
            for uid in batch:
                raw = response.get(uid, {}).get(b"BODY[]")
                if raw is not None:
                    yield Fetched(f"{self.name};{self.uidvalidity};{uid}", uid, bytes(raw))

    def mark_done(self, uids: Sequence[int]) -> None:
        """Set the done keyword (and move when configured); call after the DB commit."""
        if not uids:
            return
        client = self._connected()
        s = self.settings
        ordered = sorted(set(uids))
        with self._errors("marking done"):
            client.noop()  # make sure the session knows UIDs that arrived after SELECT
            client.add_flags(ordered, [s.done_flag], silent=True)
            if not s.move_to:
                return
            if client.has_capability("MOVE"):
                client.move(ordered, s.move_to)
                return
            client.copy(ordered, s.move_to)
            client.add_flags(ordered, [imapclient.DELETED], silent=True)
            if client.has_capability("UIDPLUS"):
                client.uid_expunge(ordered)
            else:  # also removes other \Deleted mail in the folder; RFC 3501 has no finer tool
                client.expunge()

    def close(self) -> None:
        """Log out (best effort) and drop the connection."""
        client, self._client = self._client, None
        if client is None:
            return
        try:
            client.logout()
        except (imap_errors.IMAPClientError, OSError):
            with suppress(imap_errors.IMAPClientError, OSError):
                client.shutdown()

    def __enter__(self) -> ImapSource:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _connected(self) -> imapclient.IMAPClient:
        if self._client is None:
            raise SourceError(f"not connected to {self._where}: call connect() first")
        return self._client

    def _tls_context(self) -> ssl.SSLContext:
        s = self.settings
        try:
            context = ssl.create_default_context(cafile=s.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise SourceError(f"cannot load [imap] ca_file {s.ca_file!r}: {exc}") from exc
        if not s.verify_tls:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """Turn socket and protocol failures into SourceError; drop a broken connection."""
        where = self._where
        try:
            yield
        except SourceError:
            raise
        except ssl.SSLCertVerificationError as exc:
            self.close()
            raise SourceError(
                f"TLS certificate of {where} not trusted ({exc.verify_message}): "
                "check [imap] host, ca_file or verify_tls"
            ) from exc
        except socket.gaierror as exc:
            self.close()
            raise SourceError(
                f"cannot resolve IMAP host {self.settings.host!r}: check [imap] host"
            ) from exc
        except TimeoutError as exc:
            self.close()
            raise SourceError(
                f"IMAP server {where} did not answer within {self.settings.timeout}s "
                f"during {action}: check [imap] host/port/security and the network"
            ) from exc
        except ConnectionRefusedError as exc:
            self.close()
            raise SourceError(
                f"IMAP connection to {where} refused: check [imap] host/port "
                "and that the server is running"
            ) from exc
        except (OSError, imap_errors.IMAPClientAbortError) as exc:
            self.close()
            raise SourceError(
                f"IMAP connection to {where} failed during {action} "
                f"({type(exc).__name__}: {exc}): check [imap] host/port/security and the network"
            ) from exc
        except imap_errors.IMAPClientError as exc:
            raise SourceError(f"IMAP {action} failed on {where}: {exc}") from exc


class MaildirSource:
    """Reads new/ of a local Maildir; done mail moves to cur/ marked seen."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path).expanduser().absolute()
        for sub in ("new", "cur", "tmp"):
            (self.path / sub).mkdir(parents=True, exist_ok=True)
        self.name = f"maildir:{self.path}"

    def pending(self) -> Iterator[Fetched]:
        """Yield messages in new/ by name (arrival order); key is maildir:PATH;NAME."""
        new = self.path / "new"
        for name in sorted(os.listdir(new)):
            if name.startswith("."):
                continue
            try:
                raw = (new / name).read_bytes()
            except (FileNotFoundError, IsADirectoryError):
                continue  # taken by another reader meanwhile, or not a message
            yield Fetched(f"{self.name};{name}", None, raw)

    def mark_done(self, fetched: Fetched) -> None:
        """Move new/NAME to cur/NAME:2,S."""
        prefix = f"{self.name};"
        if not fetched.key.startswith(prefix):
            raise SourceError(f"{fetched.key!r} does not belong to {self.name}")
        name = fetched.key[len(prefix) :]
        base, _, info = name.partition(":2,")
        flags = "".join(sorted(set(info) | {"S"}))
        os.replace(self.path / "new" / name, self.path / "cur" / f"{base}:2,{flags}")
