"""Message sources against a real Dovecot and a local Maildir."""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import pytest
from servers import Mailbox, free_port

from mailflow.errors import MailflowError
from mailflow.fetch import Fetched, ImapSettings, ImapSource, MaildirSource, SourceError


def message(n: int) -> bytes:
    """A small distinct message numbered n."""
    return (
        f"From: user{n}@example.test\r\nTo: desk@example.test\r\n"
        f"Subject: ticket {n}\r\nMessage-ID: <m{n}@example.test>\r\n\r\nbody {n}\r\n"
    ).encode()


def settings(box: Mailbox, **overrides: object) -> ImapSettings:
    """Plain-text settings for the test mailbox."""
    values: dict[str, object] = {
        "host": box.host,
        "port": box.port,
        "security": "none",
        "username": box.address,
        "password": box.password,
        "timeout": 5.0,
    }
    values.update(overrides)
    return ImapSettings(**values)  # type: ignore[arg-type]


@pytest.fixture
def source(mailbox: Mailbox) -> Iterator[ImapSource]:
    """A connected ImapSource on the empty test mailbox."""
    src = ImapSource(settings(mailbox))
    src.connect()
    yield src
    src.close()


def flags_of(box: Mailbox, folder: str = "INBOX") -> dict[int, set[bytes]]:
    """UID -> flags, read without touching anything."""
    client = box.client()
    try:
        client.select_folder(folder, readonly=True)
        uids = client.search()
        return {uid: set(d[b"FLAGS"]) for uid, d in client.fetch(uids, ["FLAGS"]).items()}
    finally:
        client.logout()


def test_name_and_uidvalidity(mailbox: Mailbox, source: ImapSource) -> None:
    assert source.name == f"imap:{mailbox.address}@127.0.0.1:{mailbox.port}/INBOX"
    assert isinstance(source.uidvalidity, int) and source.uidvalidity > 0
    assert source.connect() == source.uidvalidity  # reconnecting reports the same value


def test_fetch_returns_all_in_uid_order_even_seen(mailbox: Mailbox, source: ImapSource) -> None:
    for n in range(1, 6):
        mailbox.append(message(n), flags=[r"\Seen"] if n % 2 else [])
    uids = source.uids_after(0)
    assert uids == [1, 2, 3, 4, 5]
    got = list(source.fetch(list(reversed(uids))))
    assert [f.uid for f in got] == uids
    assert [f.raw for f in got] == [message(n) for n in range(1, 6)]
    assert got[0] == Fetched(f"{source.name};{source.uidvalidity};1", 1, message(1))


def test_uids_after_filters_the_star_match(mailbox: Mailbox, source: ImapSource) -> None:
    assert source.uids_after(0) == []
    for n in range(3):
        mailbox.append(message(n))
    assert source.uids_after(1) == [2, 3]
    assert source.uids_after(3) == []  # "UID 4:*" still matches UID 3 on the wire
    assert source.uids_after(99) == []


def test_batches_cover_everything(mailbox: Mailbox) -> None:
    for n in range(10):
        mailbox.append(message(n))
    with ImapSource(settings(mailbox, batch_size=3)) as src:
        got = list(src.fetch(src.uids_after(0)))
    assert [f.uid for f in got] == list(range(1, 11))
    assert [f.raw for f in got] == [message(n) for n in range(10)]


def test_fetch_leaves_seen_unset(mailbox: Mailbox, source: ImapSource) -> None:
    mailbox.append(message(1))
    list(source.fetch(source.uids_after(0)))
    assert rb"\Seen" not in flags_of(mailbox)[1]


def test_mark_done_sets_keyword(mailbox: Mailbox, source: ImapSource) -> None:
    for n in range(3):
        mailbox.append(message(n))
    source.mark_done([1, 3])
    source.mark_done([])
    flags = flags_of(mailbox)
    assert b"$MailflowDone" in flags[1] and b"$MailflowDone" in flags[3]
    assert b"$MailflowDone" not in flags[2]
    assert all(rb"\Seen" not in f for f in flags.values())


def test_mark_done_moves_when_configured(mailbox: Mailbox) -> None:
    for n in range(3):
        mailbox.append(message(n))
    with ImapSource(settings(mailbox, move_to="Processed")) as src:
        src.mark_done([1, 2])
        assert src.uids_after(0) == [3]
    assert list(flags_of(mailbox)) == [3]
    moved = flags_of(mailbox, "Processed")
    assert len(moved) == 2
    assert all(b"$MailflowDone" in f for f in moved.values())


def test_wrong_password_is_a_clear_source_error(mailbox: Mailbox) -> None:
    src = ImapSource(settings(mailbox, password="wrong"))
    with pytest.raises(SourceError) as info:
        src.connect()
    assert str(info.value) == (
        f"IMAP login failed for {mailbox.address}@127.0.0.1: check [imap] username/password"
    )
    assert isinstance(info.value, MailflowError)


def test_closed_port_fails_fast() -> None:
    port = free_port()
    started = time.monotonic()
    with pytest.raises(SourceError, match=f"127.0.0.1:{port}.*check \\[imap\\] host/port"):
        ImapSource(ImapSettings("127.0.0.1", port, security="none", timeout=5)).connect()
    assert time.monotonic() - started < 2


def test_silent_server_times_out() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(SourceError, match="did not answer within 0.5s"):
            ImapSource(ImapSettings("127.0.0.1", port, security="none", timeout=0.5)).connect()
        assert time.monotonic() - started < 3


@pytest.fixture
def tls_imap(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A minimal IMAP-over-TLS server with a self-signed cert; yields (port, cert file)."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]
        + ["-nodes", "-days", "1"]
        + ["-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"]
        + ["-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
                with context.wrap_socket(conn, server_side=True) as tls:
                    converse(tls.makefile("rwb"))
            except (TimeoutError, OSError):
                continue

    def converse(stream: BinaryIO) -> None:
        stream.write(b"* OK IMAP4rev1 ready\r\n")
        stream.flush()
        for line in stream:
            tag, command = ([*line.split(), b"", b""])[:2]
            if command.upper() == b"CAPABILITY":
                stream.write(b"* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\n%s OK done\r\n" % tag)
            elif command.upper() == b"LOGIN":
                stream.write(b"%s NO [AUTHENTICATIONFAILED] no\r\n" % tag)
            else:
                stream.write(b"* BYE\r\n%s OK bye\r\n" % tag)
                stream.flush()
                return
            stream.flush()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1], cert
    stop.set()
    thread.join(5)
    listener.close()


def test_tls_verifies_certificates_by_default(tls_imap: tuple[int, Path]) -> None:
    port, _ = tls_imap
    with pytest.raises(SourceError, match=f"TLS certificate of 127.0.0.1:{port} not trusted"):
        ImapSource(ImapSettings("127.0.0.1", port, username="u", timeout=5)).connect()


def test_tls_ca_file_is_honoured(tls_imap: tuple[int, Path]) -> None:
    port, cert = tls_imap
    src = ImapSource(ImapSettings("127.0.0.1", port, username="u", ca_file=str(cert), timeout=5))
    with pytest.raises(SourceError, match="login failed for u@127.0.0.1"):  # past TLS
        src.connect()


def test_tls_verification_can_be_disabled(tls_imap: tuple[int, Path]) -> None:
    port, _ = tls_imap
    src = ImapSource(ImapSettings("127.0.0.1", port, username="u", verify_tls=False, timeout=5))
    with pytest.raises(SourceError, match="login failed"):
        src.connect()


def test_tls_to_a_plain_server_fails_cleanly() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def answer_plain() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.sendall(b"* OK not tls at all\r\n")
                time.sleep(0.5)

        thread = threading.Thread(target=answer_plain, daemon=True)
        thread.start()
        with pytest.raises(SourceError, match=f"127.0.0.1:{port}"):
            ImapSource(ImapSettings("127.0.0.1", port, timeout=2)).connect()
        thread.join()


def test_missing_folder_is_a_source_error(mailbox: Mailbox) -> None:
    with pytest.raises(SourceError, match=r"folder 'Nope'.*check \[imap\] folder"):
        ImapSource(settings(mailbox, folder="Nope")).connect()


def test_bad_settings_rejected() -> None:
    with pytest.raises(SourceError, match="security"):
        ImapSource(ImapSettings("h", security="ssl"))
    with pytest.raises(SourceError, match="call connect"):
        ImapSource(ImapSettings("h")).uids_after(0)


def test_lost_connection_is_a_source_error(mailbox: Mailbox, source: ImapSource) -> None:
    source._connected().shutdown()  # the server side going away looks the same
    with pytest.raises(SourceError, match=mailbox.host):
        source.uids_after(0)
    assert source.connect() == source.uidvalidity  # and a reconnect works


def test_maildir_pending_and_mark_done(tmp_path: Path) -> None:
    src = MaildirSource(tmp_path / "md")
    assert all((tmp_path / "md" / d).is_dir() for d in ("new", "cur", "tmp"))
    assert src.name == f"maildir:{tmp_path / 'md'}"
    for name in ("1700000002.b.host", "1700000001.a.host", ".hidden"):
        (tmp_path / "md" / "new" / name).write_bytes(name.encode())
    pending = list(src.pending())
    assert [f.key for f in pending] == [
        f"{src.name};1700000001.a.host",
        f"{src.name};1700000002.b.host",
    ]
    assert pending[0].uid is None and pending[0].raw == b"1700000001.a.host"
    src.mark_done(pending[0])
    assert (tmp_path / "md" / "cur" / "1700000001.a.host:2,S").read_bytes() == pending[0].raw
    assert [f.key for f in src.pending()] == [pending[1].key]
    with pytest.raises(SourceError):
        src.mark_done(Fetched("maildir:/elsewhere;x", None, b""))
