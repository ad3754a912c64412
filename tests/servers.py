"""Real mail servers for tests: a private Dovecot IMAP server and a recording SMTP sink.

Both listen on 127.0.0.1 on a free port and touch nothing outside their own directory.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import imapclient
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

LOOPBACK = "127.0.0.1"
INSTALL_HINT = (
    "install it with: apt-get update && "
    "DEBIAN_FRONTEND=noninteractive apt-get install -y dovecot-imapd (or run scripts/test)"
)


def free_port(host: str = LOOPBACK) -> int:
    """Return a TCP port on host that was free a moment ago (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float) -> bool:
    """Poll until something accepts TCP connections on host:port; False on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.02)
    return False


def _find_binary(name: str) -> str | None:
    """Locate a Dovecot binary even when /usr/sbin is not on PATH."""
    return shutil.which(name) or next(
        (str(p) for d in ("/usr/sbin", "/usr/bin") if (p := Path(d, name)).exists()), None
    )


class Dovecot:
    """A private Dovecot IMAP server in a temp dir on a free 127.0.0.1 port."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).absolute()
        self.host = LOOPBACK
        self.port = 0
        self.conf = self.root / "dovecot.conf"
        self.log = self.root / "dovecot.log"
        # One passwd-file per user: Dovecot re-reads a changed file at most once a second,
        # but opens a file it has not seen yet at once, so a new user can log in at once.
        self.users_dir = self.root / "users"
        self.mail_root = self.root / "mail"
        self.pid: int | None = None
        self.startup_seconds = 0.0  # how long the last start() took
        # Dovecot refuses uid 0 for mail; as root, mail belongs to nobody. Unprivileged,
        # everything runs as the current user instead.
        self.privileged = os.geteuid() == 0
        self.uid = 65534 if self.privileged else os.getuid()
        self.gid = 65534 if self.privileged else os.getgid()

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Write the private config, start `dovecot -c CONF` and wait for the IMAP port."""
        binary = _find_binary("dovecot")
        if binary is None:
            raise RuntimeError(f"dovecot is not installed; {INSTALL_HINT}")
        self._prepare_dirs()
        if not self.port:  # a restart keeps its port so configured clients can reconnect
            self.port = free_port(self.host)
        self._write_config()
        (self.root / "run" / "master.pid").unlink(missing_ok=True)
        started = time.monotonic()
        # The master daemonizes and keeps inherited descriptors: send output to a file,
        # never to a pipe we would wait on.
        errors = self.root / "dovecot.stderr"
        with errors.open("wb") as err:
            code = subprocess.call(
                [binary, "-c", str(self.conf)],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                timeout=30,
            )
        if code != 0:
            raise RuntimeError(
                f"dovecot failed to start (exit {code}): "
                f"{errors.read_text(errors='replace').strip()}\n{self.log_tail()}"
            )
        ready = wait_for_port(self.host, self.port, timeout=10)
        self.pid = self._read_pid()  # written by the daemonized master, not the launcher
        if not ready:
            self.stop()
            raise RuntimeError(
                f"dovecot did not open {self.host}:{self.port} within 10s\n{self.log_tail()}"
            )
        self.startup_seconds = time.monotonic() - started

    def stop(self) -> None:
        """Stop the server we started: SIGTERM to our master pid, else doveadm stop."""
        pid = self.pid or self._read_pid()
        self.pid = None
        if pid is not None and self._is_ours(pid):
            os.kill(pid, signal.SIGTERM)
            if not self._wait_gone(pid, 10):
                os.kill(pid, signal.SIGKILL)
                self._wait_gone(pid, 5)
        elif (doveadm := _find_binary("doveadm")) is not None and self.conf.exists():
            subprocess.run(
                [doveadm, "-c", str(self.conf), "stop"],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=30,
                check=False,
            )

    def restart(self) -> None:
        """Stop and start again on the same port; users and mail are kept."""
        self.stop()
        self.start()

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the server log, for error messages."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return f"(no log at {self.log})"
        return "dovecot log tail:\n" + "\n".join(text.splitlines()[-lines:])

    # -- users and mail ------------------------------------------------------------------

    def add_user(self, address: str, password: str = "secret") -> None:
        """Add a passwd-file user whose Maildir lives under the server root."""
        if "/" in address or address.startswith("."):
            raise ValueError(f"unusable test address {address!r}")
        self.users_dir.mkdir(parents=True, exist_ok=True)
        home = self.mail_root / address
        home.mkdir(parents=True, exist_ok=True)
        os.chown(home, self.uid, self.gid)
        line = f"{address}:{{PLAIN}}{password}:{self.uid}:{self.gid}::{home}::\n"
        (self.users_dir / address).write_text(line)

    def client(self, address: str, password: str = "secret") -> imapclient.IMAPClient:
        """A logged-in plain-text IMAP client; the caller logs out."""
        client = imapclient.IMAPClient(self.host, self.port, ssl=False, timeout=10)
        client.login(address, password)
        return client

    def append(
        self,
        address: str,
        raw: bytes,
        folder: str = "INBOX",
        flags: Sequence[str] = (),
        password: str = "secret",
    ) -> None:
        """Store raw in the user's folder with IMAP APPEND, creating the folder if needed."""
        client = self.client(address, password)
        try:
            if not client.folder_exists(folder):
                client.create_folder(folder)
            client.append(folder, raw, flags=tuple(flags))
        finally:
            client.logout()

    # -- internals -----------------------------------------------------------------------

    def _prepare_dirs(self) -> None:
        for sub in ("run", "state", "mail", "users"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        if self.privileged:
            # The mail processes run as nobody: every parent must be traversable.
            self.root.chmod(0o755)
            (self.mail_root).chmod(0o755)
            for parent in self.root.parents:
                if not parent.stat().st_mode & stat.S_IXOTH:
                    raise RuntimeError(
                        f"{parent} is not searchable by other users, so Dovecot's mail "
                        f"processes (uid 65534) cannot reach {self.mail_root}; "
                        "use a root directory such as one from tempfile.mkdtemp()"
                    )

    def _write_config(self) -> None:
        r = self.root
        # Unprivileged, Dovecot cannot chroot or switch to its own service users.
        chroot = "" if self.privileged else "  chroot =\n"
        users = ""
        if not self.privileged:
            name = pwd.getpwuid(os.getuid()).pw_name
            group = grp.getgrgid(os.getgid()).gr_name
            users = (
                f"default_login_user = {name}\ndefault_internal_user = {name}\n"
                f"default_internal_group = {group}\n"
            )
        self.conf.write_text(
            f"""\
base_dir = {r}/run
state_dir = {r}/state
log_path = {self.log}
info_log_path = {self.log}
protocols = imap
listen = {self.host}
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
first_valid_uid = 1
mail_location = maildir:~/Maildir
mail_fsync = never
{users}
# Wrong-password tests must not slow later logins: no failure delay, and no per-IP
# auth penalty (auth cannot reach this anvil socket, which disables the penalty).
auth_failure_delay = 0
service anvil {{
{chroot}  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
# No stats connections: shutdown would otherwise stall while auth waits for them.
stats_writer_socket_path =

passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {self.users_dir}/%u
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {self.users_dir}/%u
}}
service imap-login {{
{chroot}  inet_listener imap {{
    address = {self.host}
    port = {self.port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
"""
        )

    def _read_pid(self) -> int | None:
        try:
            return int((self.root / "run" / "master.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def _is_ours(self, pid: int) -> bool:
        """True when pid is a live dovecot master running our config file."""
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return str(self.conf).encode() in cmdline

    @staticmethod
    def _wait_gone(pid: int, timeout: float) -> bool:
        """Wait for pid to exit; a zombie awaiting its reaper counts as gone."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (ProcessLookupError, FileNotFoundError):
                return True
            except (OSError, IndexError):
                state = ""
            if state == "Z":
                return True
            time.sleep(0.02)
        return False


@dataclass
class Mailbox:
    """One IMAP user on a running Dovecot."""

    server: Dovecot
    address: str
    password: str = "secret"

    @property
    def host(self) -> str:
        return self.server.host

    @property
    def port(self) -> int:
        return self.server.port

    def append(self, raw: bytes, folder: str = "INBOX", flags: Sequence[str] = ()) -> None:
        """Store raw in this mailbox via IMAP APPEND."""
        self.server.append(self.address, raw, folder, flags, self.password)

    def client(self) -> imapclient.IMAPClient:
        """A logged-in IMAP client for this user; the caller logs out."""
        return self.server.client(self.address, self.password)


@dataclass(frozen=True)
class Received:
    """One message accepted by the SMTP sink."""

    mail_from: str
    rcpt_tos: list[str]
    content: bytes = field(repr=False)


class _Handler:
    """aiosmtpd handler that records envelopes and answers scripted failures."""

    def __init__(self, sink: SmtpSink) -> None:
        self.sink = sink

    async def handle_MAIL(  # noqa: N802 - aiosmtpd hook name
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: Any
    ) -> str:
        with self.sink._lock:
            self.sink._sessions[id(session)] = session
        code = self.sink._take_failure("MAIL")
        if code:
            return code
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(  # noqa: N802 - aiosmtpd hook name
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: Any
    ) -> str:
        with self.sink._lock:
            code = self.sink._rejected.get(address.lower())
        if code:
            return code
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 OK"

    async def handle_DATA(  # noqa: N802 - aiosmtpd hook name
        self, server: SMTP, session: Session, envelope: Envelope
    ) -> str:
        code = self.sink._take_failure("DATA")
        if code:
            return code
        content = envelope.original_content or b""
        message = Received(str(envelope.mail_from), list(envelope.rcpt_tos), bytes(content))
        with self.sink._arrived:
            self.sink.messages.append(message)
            self.sink._arrived.notify_all()
        return "250 Message accepted"


class SmtpSink:
    """An aiosmtpd server recording every envelope, with scripted failures."""

    def __init__(self, host: str = LOOPBACK, smtputf8: bool = True) -> None:
        self.host = host
        self.port = 0
        self.smtputf8 = smtputf8  # offer SMTPUTF8 (RFC 6531: non-ASCII addresses)
        self.messages: list[Received] = []
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._failures: list[tuple[str, str]] = []
        self._rejected: dict[str, str] = {}
        self._sessions: dict[int, Session] = {}  # kept, so that no id is reused
        self._controller: Controller | None = None

    @property
    def connections(self) -> int:
        """How many SMTP sessions (connections) have sent a MAIL FROM."""
        with self._lock:
            return len(self._sessions)

    def fail_next(
        self, n: int, code: str = "451 4.3.0 try again later", stage: str = "DATA"
    ) -> None:
        """Answer the next n DATA (or, with stage="MAIL", MAIL FROM) commands with code."""
        stage = stage.upper()
        if stage not in ("DATA", "MAIL"):
            raise ValueError("stage must be 'DATA' or 'MAIL'")
        with self._lock:
            self._failures.extend([(stage, code)] * n)

    def reject_recipient(self, address: str, code: str = "550 5.1.1 no such user") -> None:
        """Refuse RCPT TO for address with code; other recipients are still accepted."""
        with self._lock:
            self._rejected[address.lower()] = code

    def start(self, port: int | None = None) -> None:
        """Start listening on `port`, or on a free loopback port (a restart keeps the port)."""
        self.port = port or self.port or free_port(self.host)
        self._controller = Controller(
            _Handler(self), hostname=self.host, port=self.port, enable_SMTPUTF8=self.smtputf8
        )
        self._controller.start()

    def stop(self) -> None:
        """Stop the server; recorded messages are kept."""
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def wait_for(self, count: int, timeout: float = 10) -> list[Received]:
        """Wait until at least count messages arrived and return them all."""
        deadline = time.monotonic() + timeout
        with self._arrived:
            while len(self.messages) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"expected {count} message(s) on {self.host}:{self.port}, "
                        f"got {len(self.messages)} in {timeout}s"
                    )
                self._arrived.wait(remaining)
            return list(self.messages)

    def _take_failure(self, stage: str) -> str | None:
        with self._lock:
            for i, (when, code) in enumerate(self._failures):
                if when == stage:
                    del self._failures[i]
                    return code
        return None
