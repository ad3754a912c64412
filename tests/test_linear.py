"""Reading a mail takes time linear in its size, and what is kept of it is bounded.

Each hostile shape is large enough that the quadratic (or worse) code it replaced would
run for minutes; a generous alarm turns that into a failure instead of a hung suite. The
figures per KB are printed by benchmarks/linear.py, not asserted here.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from support import DESK, make_desk, make_mail, run_once

from mailflow import commands, forms
from mailflow.cli import main
from mailflow.mail import (
    ADDRESS_LIMIT,
    IN_REPLY_TO_LIMIT,
    NAME_LIMIT,
    REFERENCES_LIMIT,
    SUBJECT_LIMIT,
    ParsedMail,
    parse,
)

TEXT = 4_000_000
GUARD = 10  # seconds: linear code takes milliseconds; the old code took minutes to hours


class TookTooLong(BaseException):
    """Raised by the alarm; not an Exception, so parse() cannot swallow it."""


@contextmanager
def finishes(seconds: float = GUARD) -> Iterator[None]:
    """Fail (rather than hang) when the block runs for more than `seconds`."""

    def expired(signum: int, frame: object) -> None:
        raise TookTooLong(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def read(raw: bytes) -> ParsedMail:
    """The parsed mail, all of its text kept (a desk keeps the first 200,000 characters)."""
    with finishes():
        return parse(raw, max_text_chars=TEXT)


def headers(*lines: str, body: str = "The VPN is down.") -> bytes:
    """A mail from these header lines (CRLF, as sent), then `body`."""
    base = {
        "from": "From: Li Si <li.si@example.test>",
        "to": f"To: {DESK}",
        "subject": "Subject: VPN down",
        "message-id": "Message-ID: <m1@example.test>",
        "content-type": "Content-Type: text/plain; charset=utf-8",
    }
    for line in lines:
        base[line.split(":", 1)[0].lower()] = line
    return ("\r\n".join(base.values()) + "\r\n\r\n" + body.replace("\n", "\r\n")).encode()


FOLDED = " \r\n" * 10_000  # 30 KB of folded whitespace: 14 s, and minutes in From's pattern


# -- headers ---------------------------------------------------------------------------------


def test_a_from_of_30_kb_folded_whitespace_is_read() -> None:
    mail = read(headers(f"From:{FOLDED} li.si@example.test"))
    assert (mail.from_addr, mail.from_name) == ("li.si@example.test", "")


@pytest.mark.parametrize("name", ["To", "Cc", "Reply-To", "Sender"])
def test_every_address_header_of_folded_whitespace_is_read(name: str) -> None:
    mail = read(headers(f"{name}:{FOLDED} wang.wu@example.test"))
    with finishes():
        assert mail.addresses(name) == ["wang.wu@example.test"]
    if name != "Sender":
        assert getattr(mail, name.lower().replace("-", "_")) == ["wang.wu@example.test"]


def test_an_address_split_by_a_long_run_of_spaces_is_no_address() -> None:
    mail = read(headers("Reply-To: li" + " " * 100_000 + "si@example.test"))
    assert mail.reply_to == []
    assert mail.from_addr == "li.si@example.test"


def test_a_content_type_of_many_semicolons_in_quotes_is_read() -> None:
    quoted = '"' + "; " * 300_000 + '"'
    raw = headers(f"Content-Type: text/plain; x={quoted}; charset=gb2312", body="")
    mail = read(raw.replace(b"\r\n\r\n", "\r\n\r\n打印机卡纸".encode("gbk")))
    assert mail.text == "打印机卡纸"


def test_a_subject_of_many_encoded_words_is_decoded_whole_and_cut() -> None:
    word = "=?utf-8?b?5pWF6Zqc?="  # 故障
    mail = read(headers("Subject: " + "\r\n ".join([word] * 60_000)))
    assert mail.subject == "故障" * (SUBJECT_LIMIT // 2)


# -- bounded size ----------------------------------------------------------------------------


def test_a_1_mb_subject_is_cut_to_the_limit() -> None:
    subject = "打印机 " + "坏了 " * 350_000
    mail = read(headers("Subject: " + subject))
    assert mail.subject == subject[:SUBJECT_LIMIT].rstrip()


def test_a_long_display_name_is_cut_to_the_limit() -> None:
    mail = read(headers(f'From: "{"李四 " * 100_000}" <li.si@example.test>'))
    assert mail.from_addr == "li.si@example.test"
    assert NAME_LIMIT <= 200
    assert mail.from_name == ("李四 " * NAME_LIMIT)[:NAME_LIMIT].rstrip()


def test_only_the_last_references_are_kept() -> None:
    refs = [f"r{i}@mail.example.test" for i in range(260_000)]
    lines = "\r\n ".join(f"<{r}>" for r in refs)
    mail = read(headers(f"References: {lines}", f"In-Reply-To: {lines}"))
    assert mail.references == refs[-REFERENCES_LIMIT:]
    assert mail.in_reply_to == refs[-IN_REPLY_TO_LIMIT:]


def test_references_are_cut_as_stored_message_ids_are() -> None:
    long_id = "a" * 2000 + "@example.test"
    mail = read(headers(f"Message-ID: <{long_id}>", f"References: <{long_id}>"))
    assert mail.references == [mail.message_id]


def test_address_lists_keep_their_first_addresses() -> None:
    people = [f"user{i}@example.test" for i in range(20_000)]
    mail = read(headers("To: " + ",\r\n ".join(people), "Cc: " + ", ".join(people)))
    assert mail.to == mail.cc == people[:ADDRESS_LIMIT]


# -- body lines ------------------------------------------------------------------------------


def test_a_from_line_of_40000_spaces_is_text_and_history_after_it_is_cut() -> None:
    quoted = "From" + " " * 200_000 + ": 李四\nSent: 2026年11月24日\nSubject: VPN\n\n旧的内容"
    mail = read(headers(body="VPN 断了\nFrom" + " " * 200_000 + "\n请尽快处理\n\n" + quoted))
    assert [line.rstrip() for line in mail.new_text.splitlines()] == [
        "VPN 断了", "From", "请尽快处理",
    ]


def test_a_form_after_a_line_of_leading_spaces() -> None:
    mail = read(headers(body=" " * 300_000 + "x\n申请类型: 账号"))
    with finishes():
        form = forms.parse(mail.text)
    assert form.fields == {"request_type": "账号"}


def test_many_greeting_lines_before_a_command() -> None:
    mail = read(headers(body="hi\n" * 600_000 + "resolve 重启了网关"))
    with finishes():
        command = commands.parse(mail.new_text, mail.from_name)
    assert (command.action, command.argument) == ("resolve", "重启了网关")


def test_many_signature_lines_after_a_command() -> None:
    mail = read(headers(body="reject no budget\n" + "thanks\n" * 300_000))
    with finishes():
        command = commands.parse(mail.new_text, mail.from_name)
    assert command.action == "reject"
    assert command.argument.startswith("no budget\nthanks")


def test_assign_with_a_long_word_and_an_address() -> None:
    mail = read(headers(body="assign " + "a" * 300_000 + " to wang.wu@example.test"))
    with finishes():
        command = commands.parse(mail.new_text, mail.from_name)
    assert (command.action, command.argument) == ("assign", "wang.wu@example.test")


def test_a_form_value_with_a_long_run_of_spaces() -> None:
    mail = read(headers(body="申请原因: 新员工" + " " * 300_000 + "入职 |"))
    with finishes():
        form = forms.parse(mail.text)
    assert form.fields["reason"] == "新员工" + " " * 300_000 + "入职"


def test_a_reason_wrapped_over_many_lines_and_many_refs() -> None:
    body = "申请原因: 新员工\n" + "入职\n" * 400_000 + "\n关联事件: " + "INC-7 " * 100_000
    mail = read(headers(body=body))
    with finishes():
        form = forms.parse(mail.text)
    assert form.fields["reason"] == "新员工" + "\n入职" * 400_000
    assert form.links == ["INC-7"]


def test_a_form_field_given_many_times() -> None:
    mail = read(headers(body="原因: 入职\n" * 400_000))
    with finishes():
        form = forms.parse(mail.text)
    assert form.fields["reason"] == "; ".join(["入职"] * 400_000)


def test_html_of_many_line_breaks() -> None:
    mail = read(headers("Content-Type: text/html; charset=utf-8",
                        body="打印机<br>" + "<br>" * 200_000 + "卡纸"))
    assert mail.text == "打印机\n\n卡纸"


# -- through the real servers ----------------------------------------------------------------


def cli_json(desk, capsys, *args: str):
    capsys.readouterr()
    assert main(["--config", str(desk.settings.path), *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def raw_mail(sender: str, subject: str, body: str, message_id: str) -> bytes:
    """A mail written out by hand (a client's generator would take a minute to fold it)."""
    return (
        f"From: {sender}\r\nTo: {DESK}\r\nSubject: {subject}\r\n"
        f"Message-ID: <{message_id}@example.test>\r\nDate: Tue, 24 Nov 2026 10:00:00 +0800\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n\r\n" + body.replace("\n", "\r\n") + "\r\n"
    ).encode()


def test_hostile_mail_over_the_real_servers_then_the_next_mail(
    tmp_path, mailbox, smtp, clock, capsys
) -> None:
    desk = make_desk(tmp_path, mailbox=mailbox, smtp=smtp)
    try:
        mailbox.append(raw_mail(f"{FOLDED} Li Si <li.si@example.test>", "VPN 断了",
                                "VPN 连不上了", "folded"))
        mailbox.append(raw_mail("wang.wu@example.test", "Printer jammed" + "\r\n urgent" * 120_000,
                                "打印机卡纸\nFrom" + " " * 40_000 + "\n三楼东区", "spaces"))
        mailbox.append(make_mail("zhao.liu@example.test", "邮箱满了", "邮箱满了，收不到邮件"))
        with finishes(60):
            result = run_once(desk, clock)
        assert result.errors == []
        status = cli_json(desk, capsys, "status")["inbound"]
        assert (status["processed"], status["quarantined"], status["pending"]) == (3, 0, 0)
        tickets = {t["requester"]: t for t in cli_json(desk, capsys, "tickets")}
        assert set(tickets) == {"li.si@example.test", "wang.wu@example.test",
                                "zhao.liu@example.test"}
        assert len(tickets["wang.wu@example.test"]["subject"]) <= SUBJECT_LIMIT
        acked = {r for m in smtp.messages for r in m.rcpt_tos}
        assert set(tickets) <= acked
        assert all(len(m.content) < 100_000 for m in smtp.messages), "no notice holds the subject"
    finally:
        desk.close()
