"""Tests for mailflow.loops: automatic-mail detection and bounce parsing."""

from __future__ import annotations

import email
import email.policy
from pathlib import Path

import pytest

from mailflow.loops import Bounce, BounceRecipient, automatic_reason, parse_bounce
from mailflow.mail import parse

FIXTURES = Path(__file__).parent / "fixtures" / "mail"


def reason(headers: str, subject: str = "printer broken") -> str | None:
    raw = f"From: user@example.com\nSubject: {subject}\n{headers}\n\nbody\n".encode()
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    return automatic_reason(msg, subject)


@pytest.mark.parametrize(
    ("headers", "subject", "expected"),
    [
        ("", "printer broken", None),
        ("Auto-Submitted: no", "printer broken", None),
        ("Auto-Submitted: auto-generated", "x", "Auto-Submitted: auto-generated"),
        ("Auto-Submitted: auto-replied; owner-email=a@b", "x", "Auto-Submitted: auto-replied"),
        ("X-Autoreply: yes", "x", "X-Autoreply"),
        ("X-Autorespond: Out of office", "x", "X-Autorespond"),
        ("Precedence: bulk", "x", "Precedence: bulk"),
        ("Precedence: Junk", "x", "Precedence: junk"),
        ("Precedence: list", "x", "Precedence: list"),
        ("Precedence: auto_reply", "x", "Precedence: auto_reply"),
        ("Precedence: first-class", "x", None),
        ("List-Id: <it.lists.example.com>", "x", "mailing list (List-Id)"),
        ("List-Unsubscribe: <mailto:u@x>", "x", "mailing list (List-Unsubscribe)"),
        ("Return-Path: <>", "x", "null return path"),
        ("Return-Path: <user@example.com>", "x", None),
        ("Sender: MAILER-DAEMON@mx.example.com", "x", "sender is mailer-daemon"),
        ("Content-Type: multipart/report; report-type=delivery-status; boundary=x", "x",
         "delivery or read report (multipart/report)"),
        ("X-MS-Exchange-Generated-Message-Source: Mailbox Rules Agent", "x",
         "Exchange generated (X-MS-Exchange-Generated-Message-Source)"),
        ("X-MS-Exchange-Inbox-Rules-Loop: a@example.com", "x",
         "Exchange inbox rule (X-MS-Exchange-Inbox-Rules-Loop)"),
        ("X-Mailflow: INC-42", "Re: [INC-42] x", "own mail (X-Mailflow)"),
        ("", "自动回复: [INC-42] 打印机", "out-of-office subject"),
        ("", "Automatic reply: [INC-42] printer", "out-of-office subject"),
        ("", "Auto Reply: hello", "out-of-office subject"),
        ("", "Out of Office: hello", "out-of-office subject"),
        ("", "Abwesenheitsnotiz: Drucker", "out-of-office subject"),
        ("", "休假自动回复：我在休假", "out-of-office subject"),
        ("", "休假期间VPN无法连接", None),
        ("", "Out of office laptop request", None),
        ("X-Auto-Response-Suppress: All", "printer broken", None),
        ("X-Auto-Response-Suppress: OOF, AutoReply", "Re: I am on vacation until Monday",
         "out-of-office subject with X-Auto-Response-Suppress"),
    ],
)
def test_automatic_reason(headers: str, subject: str, expected: str | None) -> None:
    assert reason(headers, subject) == expected


def test_mailer_daemon_from() -> None:
    raw = b"From: Mail Delivery System <MAILER-DAEMON@mx.example.com>\nSubject: x\n\nbody\n"
    assert parse(raw).auto == "sender is mailer-daemon"
    raw = b"From: postmaster@example.cn\nSubject: x\n\nbody\n"
    assert parse(raw).auto == "sender is postmaster"


def test_custom_desk_marker() -> None:
    raw = b"From: desk@example.com\nX-Desk-Id: 1\nSubject: [INC-1] x\n\nbody\n"
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    assert automatic_reason(msg, "x", desk_marker="X-Desk-Id") == "own mail (X-Desk-Id)"
    assert automatic_reason(msg, "x") is None
    assert parse(raw, desk_marker="X-Desk-Id").auto == "own mail (X-Desk-Id)"


def bounce(name: str) -> Bounce | None:
    return parse_bounce((FIXTURES / name).read_bytes())


def test_rfc3464_dsn() -> None:
    assert bounce("dsn_550.eml") == Bounce(
        original_message_id="mf.inc42.update.77@desk.example.com",
        recipients=[
            BounceRecipient(
                address="former.staff@partner.example.net",
                status="5.1.1",
                action="failed",
                diagnostic="550 5.1.1 <former.staff@partner.example.net>: Recipient address "
                "rejected: User unknown in virtual mailbox table",
                permanent=True,
            ),
            BounceRecipient(
                address="slow@partner.example.net",
                status="4.4.1",
                action="delayed",
                diagnostic="421 4.4.1 connection timed out",
                permanent=False,
            ),
        ],
    )


def test_qmail_bounce() -> None:
    assert bounce("qmail_bounce.eml") == Bounce(
        original_message_id="mf.req9.notice.3@desk.example.com",
        recipients=[
            BounceRecipient("nobody@partner.example.org", "5.1.1", "failed",
                            "Sorry, no mailbox here by that name. (#5.1.1)", True),
            BounceRecipient("full@partner.example.org", "5.2.2", "failed",
                            "203.0.113.9 does not like recipient. Remote host said: 552 5.2.2 "
                            "Mailbox full Giving up on 203.0.113.9.", True),
        ],
    )


def test_exim_bounce() -> None:
    assert bounce("exim_bounce.eml") == Bounce(
        original_message_id="mf.inc99.n1@desk.example.com",
        recipients=[
            BounceRecipient("gone@example.net", "5.1.1", "failed",
                            "host mx.example.net [198.51.100.4] SMTP error from remote mail "
                            "server after RCPT TO:<gone@example.net>: 550 5.1.1 No such user",
                            True),
        ],
    )


def test_chinese_bounce() -> None:
    assert bounce("cn_bounce.eml") == Bounce(
        original_message_id="mf.inc42.update.78@desk.example.com",
        recipients=[
            BounceRecipient("zhang.wei@partner.example.cn", "5.0.0", "failed",
                            "550 User not found: zhang.wei@partner.example.cn", True),
        ],
    )


def test_postfix_plain_text_bounce() -> None:
    raw = (
        b"From: MAILER-DAEMON@mx.example.com (Mail Delivery System)\n"
        b"Subject: Undelivered Mail Returned to Sender\n\n"
        b"This is the mail system at host mx.example.com.\n\n"
        b"<a@partner.example>: host mx.partner.example[192.0.2.1] said: 450 4.2.0\n"
        b"    mailbox busy (in reply to RCPT TO command)\n\n"
        b"Message-ID: <orig@desk.example.com>\n"
    )
    assert parse_bounce(raw) == Bounce(
        "orig@desk.example.com",
        [BounceRecipient("a@partner.example", "4.2.0", "delayed",
                         "host mx.partner.example[192.0.2.1] said: 450 4.2.0 mailbox busy "
                         "(in reply to RCPT TO command)", False)],
    )


@pytest.mark.parametrize(
    "name",
    ["english_reply.eml", "exchange_ooo.eml", "gbk_labelled_gb2312.eml", "qq_reply.eml",
     "no_subject.eml", "html_only_cn.eml"],
)
def test_not_a_bounce(name: str) -> None:
    assert bounce(name) is None


def test_person_forwarding_a_bounce_is_not_a_bounce() -> None:
    raw = (
        b"From: user@example.com\nSubject: Fwd: failure notice\n\nWhy did this fail?\n\n"
        b"Hi. This is the qmail-send program at mx.\n<x@y.example>:\nSorry (#5.1.1)\n"
    )
    assert parse_bounce(raw) is None


def test_read_receipt_is_not_a_bounce() -> None:
    raw = (
        b"From: a@example.com\nContent-Type: multipart/report; "
        b'report-type=disposition-notification; boundary="r"\n\n--r\n'
        b"Content-Type: text/plain\n\nread\n--r--\n"
    )
    assert parse_bounce(raw) is None


@pytest.mark.parametrize("raw", [b"", b"\xff\x00garbage", b"Content-Type: multipart/report\n\n"])
def test_parse_bounce_garbage(raw: bytes) -> None:
    assert parse_bounce(raw) is None
