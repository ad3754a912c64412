"""Message sources: an IMAP folder or a local Maildir.

Sources only read and mark mail. What was consumed is recorded in the database by the
pipeline; ``mark_done`` is called only after that commit, so a crash in between leads to
a re-fetch that the database recognises by ``Fetched.key``.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import imapclient
from imapclient import exceptions as imap_errors

from mailflow.errors import MailflowError

SECURITY_MODES = ("none", "starttls", "tls")
AUTH_MODES = ("password", "xoauth2")
IDLE_SLICE = 1.0  # seconds between checks of the stop flag while in IDLE
# The first IDLE of a wait ends after this and IDLE starts again: a server may not announce
# mail that came between our last command and IDLE (Dovecot held such an EXISTS back for
# its 30 s check interval); it does report it with the answer to DONE.
IDLE_SETTLE = 1.0
NEWS = frozenset({b"EXISTS", b"RECENT"})  # untagged responses that announce new mail
# Mail fetched per round trip, whatever [imap] batch_size says: memory follows the bytes
# held, and eight 24 MB mails in one batch took 600 MB. A bigger message comes alone.
FETCH_BYTES = 32 * 2**20
IMAPLIB_DEBUG = 4  # imaplib's debug level: 5 formats whole responses (see _connect)

log = logging.getLogger(__name__)


class SourceError(MailflowError):
    """The mail source cannot be reached or refused us; the message says what to check."""


class LoginRefused(SourceError):
    """The server refused our credentials: retrying soon will not help (and may lock us out)."""


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
    auth: str = "password"  # password | xoauth2
    token: TokenSource | None = field(default=None, repr=False, compare=False)  # for xoauth2
    client_id: tuple[tuple[str, str], ...] = ()  # RFC 2971 ID fields sent before SELECT


@dataclass(frozen=True)
class Token:
    """An OAuth2 access token and when it expires (epoch seconds; None when not known)."""

    value: str = field(repr=False)
    expires_at: float | None = None


class TokenSource:
    """An OAuth2 access token read from a command's output or from a file.

    The output or file holds the bare token, or JSON with ``access_token`` and either
    ``expires_in`` (seconds from when the command ran or the file was written) or
    ``expires_at`` (epoch seconds or ISO 8601). A token whose expiry is known is reused
    until ``margin`` seconds before it; one without is read again for every login.
    Something else (the provider's CLI, a cron job) keeps the file fresh.
    """

    def __init__(
        self,
        *,
        command: str | None = None,
        file: Path | None = None,
        margin: float = 300.0,
        clock: Callable[[], float] = time.time,
        timeout: float = 60.0,
    ) -> None:
        if (command is None) == (file is None):
            raise SourceError("give exactly one of [imap] oauth2_token_command, oauth2_token_file")
        self.command = command
        self.file = file
        self.margin = margin
        self.clock = clock
        self.timeout = timeout
        self._cached: Token | None = None
        self._lock = threading.Lock()

    @property
    def origin(self) -> str:
        return "oauth2_token_command" if self.command else "oauth2_token_file"

    def token(self) -> Token:
        """A token valid for at least `margin` more seconds, when its expiry is known."""
        with self._lock:
            cached = self._cached
            if cached is not None and not self.stale(cached):
                return cached
            self._cached = token = self._read()
            if self.stale(token) and token.expires_at is not None:
                log.warning("[imap] %s gave a token expiring within %ss", self.origin, self.margin)
            return token

    def stale(self, token: Token) -> bool:
        """True when the token must be read again before the next login."""
        return token.expires_at is None or self.clock() >= token.expires_at - self.margin

    def invalidate(self) -> None:
        """Forget the cached token (the server refused it)."""
        with self._lock:
            self._cached = None

    def _read(self) -> Token:
        if self.command:
            issued = self.clock()
            text = self._run(self.command)
        else:
            assert self.file is not None
            try:
                issued = self.file.stat().st_mtime
                text = self.file.read_text(encoding="utf-8")
            except OSError as exc:
                raise SourceError(
                    f"cannot read [imap] oauth2_token_file {self.file}: {exc}"
                ) from exc
        return self._parse(text, issued)

    def _run(self, command: str) -> str:
        try:
            done = subprocess.run(
                shlex.split(command),
                capture_output=True,
                text=True,
                timeout=self.timeout,
                check=False,
            )
        except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
            raise SourceError(f"[imap] oauth2_token_command could not run: {exc}") from exc
        if done.returncode != 0:
            raise SourceError(
                f"[imap] oauth2_token_command exited {done.returncode}: "
                f"{done.stderr.strip()[:300] or 'no message'}"
            )
        return done.stdout

    def _parse(self, text: str, issued: float) -> Token:
        text = text.strip()
        if not text.startswith("{"):
            if not text or any(c.isspace() for c in text):
                raise SourceError(f"[imap] {self.origin} gave no token (one line expected)")
            return Token(text)
        try:
            data = json.loads(text)
            value = data["access_token"]
            expires_at = _expiry(data, issued)
        except (ValueError, KeyError, TypeError) as exc:
            raise SourceError(
                f"[imap] {self.origin} gave JSON without a usable access_token/expiry: {exc}"
            ) from exc
        if not isinstance(value, str) or not value:
            raise SourceError(f"[imap] {self.origin} gave an empty access_token")
        return Token(value, expires_at)


def _expiry(data: dict[str, object], issued: float) -> float | None:
    """expires_at (epoch or ISO 8601) or issued + expires_in; None when neither is given."""
    at = data.get("expires_at")
    if isinstance(at, int | float) and not isinstance(at, bool):
        return float(at)
    if isinstance(at, str):
        when = datetime.fromisoformat(at.replace("Z", "+00:00"))
        return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()
    seconds = data.get("expires_in")
    if seconds is None:
        return None
    return issued + float(seconds)  # type: ignore[arg-type]


class ImapSource:
    """Reads one IMAP folder by UID; never relies on or changes \\Seen."""

    def __init__(self, settings: ImapSettings) -> None:
        if settings.security not in SECURITY_MODES:
            raise SourceError(
                f"[imap] security = {settings.security!r} is not one of {', '.join(SECURITY_MODES)}"
            )
        if settings.batch_size < 1:
            raise SourceError("[imap] batch_size must be at least 1")
        if settings.auth not in AUTH_MODES:
            raise SourceError(
                f"[imap] auth = {settings.auth!r} is not one of {', '.join(AUTH_MODES)}"
            )
        if settings.auth == "xoauth2" and settings.token is None:
            raise SourceError(
                "[imap] auth = 'xoauth2' needs oauth2_token_command or oauth2_token_file"
            )
        self.settings = settings
        self.uidvalidity: int | None = None
        self.server_id: dict[str, str] = {}  # what the server answered to ID
        self.auth_expires_at: float | None = None  # when the token used to log in expires
        self.auth_token: str | None = None  # the token used to log in
        self.logins = 0  # successful connections so far (reconnections show here)
        self._announced = False  # new mail announced in a response we did not look for
        self._client: imapclient.IMAPClient | None = None
        self.unreadable: dict[int, str] = {}  # UID → why the server would not deliver it

    @property
    def name(self) -> str:
        """The mailbox identity: imap:user@host:port/folder."""
        s = self.settings
        return f"imap:{s.username}@{s.host}:{s.port}/{s.folder}"

    @property
    def _where(self) -> str:
        return f"{self.settings.host}:{self.settings.port}"

    @property
    def connected(self) -> bool:
        return self._client is not None

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
            # imapclient sets imaplib's debug level 5, at which every response is formatted
            # with %r for a debug line, logged or not: two more copies of each fetched mail
            # (a 23 MB mail took 77 MB). Level 4 still traces the protocol lines.
            client._imap.debug = min(client._imap.debug, IMAPLIB_DEBUG)
            if s.security == "starttls":
                client.starttls(context)
        with self._errors("LOGIN"):
            if s.auth == "xoauth2":
                self._xoauth2(client)
            else:
                try:
                    client.login(s.username, s.password)
                except imap_errors.LoginError as exc:
                    raise LoginRefused(
                        f"IMAP login failed for {s.username}@{s.host}: "
                        "check [imap] username/password"
                    ) from exc
        if s.client_id:
            self._send_id(client)
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
        self.logins += 1
        return self.uidvalidity

    def _xoauth2(self, client: imapclient.IMAPClient) -> None:
        """AUTHENTICATE XOAUTH2; a refused cached token is read again and tried once more."""
        s = self.settings
        assert s.token is not None
        token = s.token.token()
        for attempt in (1, 2):
            try:
                client.oauth2_login(s.username, token.value)
            except imap_errors.LoginError as exc:
                if attempt == 1:
                    s.token.invalidate()
                    fresh = s.token.token()
                    if fresh.value != token.value:
                        token = fresh
                        continue
                raise LoginRefused(
                    f"IMAP XOAUTH2 login refused for {s.username}@{s.host}: the token from "
                    f"[imap] {s.token.origin} was not accepted ({exc})"
                ) from exc
            self.auth_expires_at, self.auth_token = token.expires_at, token.value
            return

    def _send_id(self, client: imapclient.IMAPClient) -> None:
        """RFC 2971 ID before SELECT (Coremail/NetEase refuse SELECT without it)."""
        if not client.has_capability("ID"):
            log.info("IMAP server %s does not offer ID; not sent", self._where)
            return
        with self._errors("ID"):
            answer = client.id_(dict(self.settings.client_id))
        self.server_id = _id_fields(answer)

    @property
    def supports_idle(self) -> bool:
        return self._client is not None and bool(self._client.has_capability("IDLE"))

    def wait_for_mail(
        self,
        timeout: float,
        stop: threading.Event | None = None,
        tick: Callable[[], bool] | None = None,
    ) -> bool:
        """IDLE (RFC 2177) until the server announces mail; True when it did.

        Returns False when `timeout` passes (renew IDLE before servers cut it at 30 min),
        when `stop` is set, or when `tick` (called about once a second) returns False.
        Raises SourceError when the connection dies or the server says BYE.
        """
        client = self._connected()
        if self._news_pending():  # announced during the last poll's commands: poll again
            return True
        deadline = time.monotonic() + timeout
        settle = min(deadline, time.monotonic() + IDLE_SETTLE)
        with self._errors("IDLE"):
            for until in (settle, deadline):
                client.idle()
                try:
                    arrived = self._idle_until(client, until, stop, tick)
                except BaseException:
                    self.close()
                    raise
                _, late = client.idle_done()  # what came in while we were saying DONE
                if arrived or any(_words(r) & NEWS for r in late):
                    return True
                if time.monotonic() < until or (stop is not None and stop.is_set()):
                    return False  # stopping, the lease lost, or the connection looks dead
        return False

    def _news_pending(self) -> bool:
        """Did an EXISTS/RECENT come with a response since the last uids_after()?

        The server announces a message once; if that rides on the answer to FETCH, STORE or
        SEARCH, IDLE will not announce it again, so it must not be lost.
        """
        client = self._connected()
        pending = client._imap.untagged_responses  # imaplib keeps unclaimed responses here
        return self._announced or any(pending.get(kind) for kind in ("EXISTS", "RECENT"))

    def _forget_news(self) -> None:
        self._announced = False
        pending = self._connected()._imap.untagged_responses
        for kind in ("EXISTS", "RECENT"):
            pending.pop(kind, None)

    def _idle_until(
        self,
        client: imapclient.IMAPClient,
        deadline: float,
        stop: threading.Event | None,
        tick: Callable[[], bool] | None,
    ) -> bool:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or (stop is not None and stop.is_set()):
                return False
            if tick is not None and not tick():
                return False
            wait = min(IDLE_SLICE, remaining)
            started = time.monotonic()
            responses = client.idle_check(timeout=wait)
            if any(b"BYE" in _words(r) for r in responses):
                raise SourceError(f"IMAP server {self._where} ended the session during IDLE")
            if any(_words(r) & NEWS for r in responses):
                return True
            if not responses and time.monotonic() - started < wait / 2:
                # Woken with nothing to read: often EOF. Leaving IDLE tells (DONE fails on a
                # dead connection); on a live one the caller just polls once more.
                return False

    def uids_after(self, uid: int) -> list[int]:
        """UIDs greater than uid in ascending order, whatever their flags."""
        client = self._connected()
        self._forget_news()  # this NOOP and SEARCH see whatever they announced
        with self._errors("UID SEARCH"):
            client.noop()  # a selected folder only learns of new mail when it syncs
            found = client.search(["UID", f"{uid + 1}:*"])
        # "n:*" always matches the highest UID, even when it is below n.
        return sorted(u for u in found if u > uid)

    def unmarked_upto(self, uid: int) -> list[int]:
        """UIDs up to uid still without the done keyword (stored, then a crash before marking)."""
        if uid < 1:
            return []
        client = self._connected()
        with self._errors("UID SEARCH"):
            found = client.search(["UID", f"1:{uid}", "UNKEYWORD", self.settings.done_flag])
        return sorted(u for u in found if u <= uid)

    def fetch(self, uids: Sequence[int]) -> Iterator[Fetched]:
        """Yield the messages in UID order, leaving \\Seen alone (see fetch_batches)."""
        for batch in self.fetch_batches(uids):
            yield from batch

    def fetch_batches(self, uids: Sequence[int]) -> Iterator[list[Fetched]]:
        """The messages in UID order, one list per round trip: at most batch_size of them
        and FETCH_BYTES of mail (a bigger message alone), leaving \\Seen alone.

        The key is ``imap:user@host:port/folder;UIDVALIDITY;UID``. Messages expunged
        meanwhile are skipped. When the server refuses a batch (NO, or BYE because it cannot
        read or convert one message), each UID is fetched alone: the one it will not
        deliver is noted in `unreadable`, left on the server, and the others go on.
        """
        ordered = sorted(set(uids))
        size = self.settings.batch_size
        self.unreadable = {}
        for start in range(0, len(ordered), size):
            for batch in self._by_bytes(ordered[start : start + size]):
                response = self._bodies(batch)
                yield [
                    Fetched(f"{self.name};{self.uidvalidity};{uid}", uid, bytes(raw))
                    for uid in batch
                    if (raw := response.pop(uid, {}).get(b"BODY[]")) is not None
                ]

    def _by_bytes(self, uids: list[int]) -> list[list[int]]:
        """The UIDs cut into runs of at most FETCH_BYTES of mail, by RFC822.SIZE (one
        UID a run when the server will not say)."""
        try:
            with self._errors("UID FETCH"):
                sizes = self._connected().fetch(uids, [b"RFC822.SIZE"])
        except SourceError as failed:
            if not _refused(failed):
                raise
            return [[uid] for uid in uids]
        runs: list[list[int]] = []
        held = 0
        for uid in uids:
            grows = int(sizes.get(uid, {}).get(b"RFC822.SIZE") or 0)
            if not runs or held + grows > FETCH_BYTES:
                runs.append([])
                held = 0
            runs[-1].append(uid)
            held += grows
        return runs

    def _bodies(self, batch: list[int]) -> dict[int, dict[bytes, object]]:
        """UID FETCH BODY.PEEK[] of the batch; one UID at a time when the server refuses."""
        try:
            with self._errors("UID FETCH"):
                return self._reopened().fetch(batch, [b"BODY.PEEK[]"])
        except SourceError as failed:
            if not _refused(failed):
                raise  # the connection broke or timed out: the whole pass is retried
        # The server refused, e.g. a message it cannot read fails the batch (Dovecot
        # answers BYE): each UID alone, logging in again when it hung up.
        response: dict[int, dict[bytes, object]] = {}
        for uid in batch:
            client = self._reopened()
            try:
                with self._errors("UID FETCH"):
                    response |= client.fetch([uid], [b"BODY.PEEK[]"])
            except SourceError as refused:
                if not _refused(refused):
                    raise
                self.unreadable[uid] = str(refused.__cause__)[:300]
        return response

    def mark_done(self, uids: Sequence[int]) -> None:
        """Set the done keyword (and move when configured); call after the DB commit."""
        if not uids:
            return
        client = self._connected()
        s = self.settings
        ordered = sorted(set(uids))
        with self._errors("marking done"):
            _, updates = client.noop()  # the session learns of UIDs that arrived after SELECT
            self._announced |= any(_words(r) & NEWS for r in updates)
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

    def _reopened(self) -> imapclient.IMAPClient:
        """The session, logged in again when the server dropped it (same UIDVALIDITY)."""
        if self._client is None:
            before = self.uidvalidity
            if self.connect() != before:
                raise SourceError(f"{self.name}: UIDVALIDITY changed while fetching")
        return self._connected()

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
            if action == "IDLE":
                # E.g. "* 3 EXISTS" before "+ idling" (mail that came after the last poll):
                # imapclient gives up although the server is idling. The session's state is
                # unknown, so it is dropped; the reconnection polls and finds the mail.
                self.close()
            raise SourceError(f"IMAP {action} failed on {where}: {exc}") from exc


def _refused(error: SourceError) -> bool:
    """Whether the server answered (NO, BAD, or BYE with its reason), rather than the
    connection breaking or timing out (imaplib says "socket error" then)."""
    cause = error.__cause__
    return isinstance(cause, imap_errors.IMAPClientError) and "socket error" not in str(cause)


def _words(response: object) -> set[bytes]:
    """The bytes atoms of one parsed untagged response, e.g. {b'EXISTS'} for (3, b'EXISTS')."""
    items = response if isinstance(response, tuple) else (response,)
    return {item.upper() for item in items if isinstance(item, bytes)}


def _id_fields(answer: object) -> dict[str, str]:
    """ID's answer (a flat tuple of name, value, … or None) as a dict."""
    flat: list[object] = []
    if isinstance(answer, tuple | list):
        for item in answer:
            flat.extend(item if isinstance(item, tuple | list) else [item])
    text = [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in flat]
    return dict(zip(text[0::2], text[1::2], strict=False))


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
