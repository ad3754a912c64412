"""Private Dovecot servers configured like real providers: TLS and STARTTLS with a
certificate, XOAUTH2 checked by the oauth2 passdb, ID logged, IDLE not offered.

Each is the real Dovecot of tests/servers.py with lines added to or changed in its config;
an OAuth2 provider's token introspection endpoint (what Dovecot asks whether a token is
valid) is a small HTTP server on loopback, as the provider would be on the network.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from urllib.parse import parse_qs

from servers import LOOPBACK, Dovecot, _find_binary, free_port


class CustomDovecot(Dovecot):
    """Dovecot with `replacements` applied to and `extra` appended to its config."""

    def __init__(
        self, root: Path, extra: str = "", replacements: Sequence[tuple[str, str]] = ()
    ) -> None:
        super().__init__(root)
        self.extra = extra
        self.replacements = list(replacements)

    def _write_config(self) -> None:
        super()._write_config()
        text = self.conf.read_text()
        for old, new in self.replacements:
            if old not in text:
                raise RuntimeError(f"test Dovecot config has no {old!r} to replace")
            text = text.replace(old, new)
        self.conf.write_text(text + "\n" + self.extra)

    def kick(self, user: str) -> None:
        """Disconnect the user's sessions from the server side (doveadm kick)."""
        doveadm = _find_binary("doveadm")
        assert doveadm is not None
        subprocess.run([doveadm, "-c", str(self.conf), "kick", user], check=True,
                       capture_output=True, timeout=30)

    def stop_hard(self) -> None:
        """Stop, and end the IMAP sessions it started at once (they outlive the master by
        about ten seconds, still serving their clients)."""
        sessions = {int(p) for p in re.findall(r"mpid=(\d+)", self.log.read_text())}
        self.stop()
        for pid in sessions:
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"imap" in cmdline:
                os.kill(pid, signal.SIGTERM)


@contextmanager
def private_dovecot(
    extra: str = "", replacements: Sequence[tuple[str, str]] = ()
) -> Iterator[CustomDovecot]:
    """A started private Dovecot, stopped and removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="mailflow-dovecot-"))
    server = CustomDovecot(root, extra, replacements)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 / localhost: (cert, key)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-days", "2", "-subj", "/CN=localhost", "-keyout", str(key), "-out",
         str(cert), "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True,
    )
    key.chmod(0o644)
    return cert, key


def tls_config(cert: Path, key: Path, imaps_port: int) -> list[tuple[str, str]]:
    """Replacements that turn on TLS: STARTTLS on the imap port, implicit TLS on imaps."""
    return [
        ("ssl = no", f"ssl = yes\nssl_cert = <{cert}\nssl_key = <{key}"),
        ("inet_listener imaps {\n    port = 0\n  }",
         f"inet_listener imaps {{\n    address = {LOOPBACK}\n    port = {imaps_port}\n  }}"),
    ]


NO_IDLE = "imap_capability = IMAP4rev1 LITERAL+ SASL-IR ID ENABLE UIDPLUS MOVE NAMESPACE\n"
LOG_ID = "imap_id_log = *\n"


@dataclass
class TokenIssuer:
    """The provider's side of OAuth2: which access tokens are valid, for whom.

    Serves RFC 7662 token introspection on loopback for Dovecot's oauth2 passdb and
    records every token it was asked about.
    """

    valid: dict[str, str] = field(default_factory=dict)  # token → username
    asked: list[str] = field(default_factory=list)
    port: int = 0
    _server: HTTPServer | None = None

    def start(self) -> None:
        issuer = self

        class Introspect(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 — http.server hook name
                length = int(self.headers.get("Content-Length", 0))
                form = parse_qs(self.rfile.read(length).decode())
                token = form.get("token", [""])[0]
                issuer.asked.append(token)
                user = issuer.valid.get(token)
                body = json.dumps(
                    {"active": True, "username": user} if user else {"active": False}
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.port = free_port()
        self._server = HTTPServer((LOOPBACK, self.port), Introspect)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def dovecot_config(self, directory: Path) -> tuple[str, list[tuple[str, str]]]:
        """(extra, replacements) for a Dovecot that accepts XOAUTH2 via this issuer."""
        ext = directory / "oauth2.conf.ext"
        ext.write_text(
            "introspection_mode = post\n"
            f"introspection_url = http://{LOOPBACK}:{self.port}/introspect\n"
            "force_introspection = yes\n"
            "username_attribute = username\n"
            "active_attribute = active\n"
            "active_value = true\n"
        )
        extra = (
            "passdb {\n  driver = oauth2\n  mechanisms = xoauth2 oauthbearer\n"
            f"  args = {ext}\n}}\n"
        )
        return extra, [("auth_mechanisms = plain login",
                        "auth_mechanisms = plain login xoauth2 oauthbearer")]
