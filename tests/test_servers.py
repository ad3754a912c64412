"""The test servers themselves: Dovecot over IMAP and the SMTP sink."""

from __future__ import annotations

import asyncio
import socket

import aiosmtplib
import pytest
from servers import Dovecot, Mailbox, SmtpSink

MESSAGE = b"From: a@example.test\r\nTo: desk@example.test\r\nSubject: printer\r\n\r\njammed\r\n"


def send(sink: SmtpSink, recipients: list[str], sender: str = "a@example.test") -> object:
    """Send MESSAGE through the sink with aiosmtplib and return its result."""
    return asyncio.run(
        aiosmtplib.send(
            MESSAGE,
            sender=sender,
            recipients=recipients,
            hostname=sink.host,
            port=sink.port,
            start_tls=False,
            use_tls=False,
            timeout=10,
        )
    )


def test_dovecot_append_then_list(mailbox: Mailbox) -> None:
    mailbox.append(MESSAGE)
    mailbox.append(MESSAGE, flags=[r"\Seen"])
    mailbox.append(MESSAGE, folder="Archive")
    client = mailbox.client()
    try:
        assert "Archive" in [name for _, _, name in client.list_folders()]
        client.select_folder("INBOX", readonly=True)
        uids = client.search()
        assert uids == [1, 2]
        data = client.fetch(uids, ["FLAGS", "BODY.PEEK[]"])
        assert data[1][b"BODY[]"] == MESSAGE
        assert rb"\Seen" in data[2][b"FLAGS"]
    finally:
        client.logout()


def test_mailboxes_are_separate(dovecot: Dovecot, mailbox: Mailbox) -> None:
    mailbox.append(MESSAGE)
    dovecot.add_user("other@example.test", "pw")
    client = dovecot.client("other@example.test", "pw")
    try:
        assert client.select_folder("INBOX")[b"EXISTS"] == 0
    finally:
        client.logout()


def test_dovecot_listens_on_loopback(dovecot: Dovecot) -> None:
    assert dovecot.host == "127.0.0.1"
    with socket.create_connection((dovecot.host, dovecot.port), timeout=5) as sock:
        assert sock.recv(100).startswith(b"* OK")


def test_dovecot_missing_binary_says_how_to_install(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("servers._find_binary", lambda name: None)
    with pytest.raises(RuntimeError, match="apt-get install -y dovecot-imapd"):
        Dovecot(tmp_path).start()  # type: ignore[arg-type]


def test_smtp_records_envelope(smtp: SmtpSink) -> None:
    send(smtp, ["desk@example.test", "l2@example.test"])
    [received] = smtp.wait_for(1)
    assert received.mail_from == "a@example.test"
    assert received.rcpt_tos == ["desk@example.test", "l2@example.test"]
    assert received.content.replace(b"\r\n", b"\n") == MESSAGE.replace(b"\r\n", b"\n")


def test_smtp_fail_next_gives_4xx_then_accepts(smtp: SmtpSink) -> None:
    smtp.fail_next(2)
    for _ in range(2):
        with pytest.raises(aiosmtplib.SMTPDataError) as info:
            send(smtp, ["desk@example.test"])
        assert info.value.code == 451
    send(smtp, ["desk@example.test"])
    assert len(smtp.wait_for(1)) == 1


def test_smtp_fail_next_at_mail_from(smtp: SmtpSink) -> None:
    smtp.fail_next(1, "421 4.7.0 busy", stage="MAIL")
    with pytest.raises(aiosmtplib.SMTPResponseException) as info:
        send(smtp, ["desk@example.test"])
    assert info.value.code == 421
    assert smtp.messages == []


def test_smtp_reject_recipient_refuses_only_that_one(smtp: SmtpSink) -> None:
    smtp.reject_recipient("gone@example.test")
    errors, _ = send(smtp, ["gone@example.test", "desk@example.test"])  # type: ignore[misc]
    assert errors["gone@example.test"].code == 550
    [received] = smtp.wait_for(1)
    assert received.rcpt_tos == ["desk@example.test"]
    with pytest.raises(aiosmtplib.SMTPRecipientsRefused):
        send(smtp, ["gone@example.test"])


def test_smtp_wait_for_times_out(smtp: SmtpSink) -> None:
    with pytest.raises(TimeoutError, match="expected 1 message"):
        smtp.wait_for(1, timeout=0.2)
