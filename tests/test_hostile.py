"""Hostile and broken input: nothing escapes a message, nothing gets into a header.

A property-based test drives generated and mutated mail (tests/hostile_mail.py) through
parsing and the whole pipeline; the same kind of mail also goes through the real IMAP and
SMTP servers. Size limits turn oversize mail into a ticket that says what was left out;
header injection through subjects, names and rule values adds no header to outgoing mail;
mail text is escaped in HTML templates; a broken rule file or config keeps the last good one.
"""

from __future__ import annotations

import base64
import email
import email.utils
import json
import random
import shutil
from datetime import UTC, datetime
from email.errors import HeaderParseError
from email.header import Header
from email.message import EmailMessage
from email.mime.text import MIMEText
from email.policy import SMTP, compat32

import pytest
from hostile_mail import fixtures, generate, mutate, renamed
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select
from support import DESK, REPO, body_of, desk_config, make_desk, make_mail, parsed, reply, run_once

from mailflow import notify, pipeline
from mailflow.cli import main
from mailflow.config import ROLE_KEYS, load_config
from mailflow.desk import Desk
from mailflow.intake import ingest_bytes, ingest_key
from mailflow.mail import ParsedMail, parse
from mailflow.models import Inbound, Outbox

CORPUS = fixtures()
EXAMPLES = 1000  # per strategy below: 3,000 messages through parse and the pipeline
OUTGOING_HEADERS = {
    "from",
    "to",
    "subject",
    "date",
    "message-id",
    "in-reply-to",
    "references",
    "reply-to",
    "auto-submitted",
    "x-auto-response-suppress",
    "x-mailflow",
    "content-type",
    "mime-version",
    "content-transfer-encoding",
}
NOW = datetime(2026, 11, 24, 2, 0, tzinfo=UTC)


def cli_json(desk, capsys, *args: str):
    capsys.readouterr()
    assert main(["--config", str(desk.settings.path), *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def sent_to(smtp, address: str) -> list:
    return [m for m in smtp.messages if address in m.rcpt_tos]


def header_names(raw: bytes) -> set[str]:
    msg = email.message_from_bytes(raw, policy=compat32)
    return {name.lower() for name in msg}


# -- property-based: parse and the pipeline never let an exception out -----------------------------


@pytest.fixture(scope="module")
def fuzz_desk(tmp_path_factory):
    desk = make_desk(tmp_path_factory.mktemp("fuzz"))
    yield desk
    desk.close()


def through_pipeline(desk: Desk, raw: bytes) -> None:
    mail = parse(raw)
    assert isinstance(mail, ParsedMail) and isinstance(mail.text, str)
    assert isinstance(mail.subject, str) and "\n" not in mail.subject
    with desk.db.sessions() as session:
        last = session.scalar(select(func.max(Outbox.id))) or 0
    inbound_id = ingest_bytes(desk, raw, NOW)
    if inbound_id is None:  # the very same bytes again (hypothesis replays): stored once
        key = ingest_key(raw)
        with desk.db.sessions() as session:
            row = session.scalar(select(Inbound).where(Inbound.source_key == key))
            assert row is not None and row.state in ("processed", "ignored"), row.reason
        return
    outcome = pipeline.process_one(desk, inbound_id, NOW)
    with desk.db.sessions() as session:
        row = session.get(Inbound, inbound_id)
        assert row.state in ("processed", "ignored"), (outcome.reason, raw[:3000])
    with desk.db.sessions() as session:
        for out in session.scalars(select(Outbox).where(Outbox.id > last)):
            assert header_names(out.raw) <= OUTGOING_HEADERS, out.raw[:2000]
            assert "\n" not in out.subject and "\r" not in out.subject
            assert out.recipient != DESK


PROPERTY = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
        HealthCheck.data_too_large,
    ],
)


def test_a_message_id_of_any_length_is_stored_and_processed(fuzz_desk):
    """Found by the fuzzer on PostgreSQL: a 490-character Message-ID overflowed the column
    of the message's origin (SQLite does not check lengths)."""
    long_id = "<" + "a" * 600 + "@example.test>"
    raw = make_mail("user@example.test", "电脑蓝屏", "开机蓝屏", message_id=long_id)
    through_pipeline(fuzz_desk, raw)


@PROPERTY
@given(rng=st.randoms(use_true_random=False))
def test_generated_mail_never_escapes(fuzz_desk, rng):
    through_pipeline(fuzz_desk, generate(rng))


@PROPERTY
@given(rng=st.randoms(use_true_random=False), base=st.sampled_from(CORPUS), n=st.integers(0, 10**9))
def test_mutated_real_mail_never_escapes(fuzz_desk, rng, base, n):
    through_pipeline(fuzz_desk, mutate(rng, renamed(base, n)))


@PROPERTY
@given(raw=st.binary(max_size=3000))
def test_arbitrary_bytes_never_escape(fuzz_desk, raw):
    through_pipeline(fuzz_desk, raw)


def test_hostile_mail_over_the_real_servers(desk, mailbox, smtp, clock, capsys):
    rng = random.Random(20261124)
    client = mailbox.client()
    appended, senders = 0, set()
    try:
        for i in range(150):
            raw = generate(rng) if i % 2 else mutate(rng, renamed(rng.choice(CORPUS), i))
            raw = raw.replace(b"\x00", b"?")  # IMAP literals carry no NUL
            client.append("INBOX", raw)
            appended += 1
            senders.add(parse(raw).from_addr)
    finally:
        client.logout()
    roles = desk.settings.roles
    staff = {a for key in ROLE_KEYS for a in getattr(roles, key)}
    staff |= {
        a
        for group in (roles.approvers, roles.executors)
        for people in group.values()
        for a in people
    }
    result = run_once(desk, clock)
    assert result.errors == []
    status = cli_json(desk, capsys, "status")
    inbound = status["inbound"]
    assert inbound["quarantined"] == 0 and inbound["pending"] == 0
    assert inbound["processed"] + inbound["ignored"] == appended
    assert status["outbox"]["queued"] == 0 and status["outbox"]["dead"] == 0
    assert len(smtp.messages) == status["outbox"]["sent"]
    for message in smtp.messages:
        assert header_names(message.content) <= OUTGOING_HEADERS
        assert set(message.rcpt_tos) <= senders | staff, "only senders and staff are mailed"
        assert DESK not in message.rcpt_tos


# -- size limits -----------------------------------------------------------------------------------


def with_attachments(sender: str, subject: str, files: list[tuple[str, int]]) -> bytes:
    msg = EmailMessage(policy=SMTP)
    msg["From"], msg["To"], msg["Subject"] = sender, DESK, subject
    msg["Message-ID"] = f"<{subject.encode().hex()[:20]}.{len(files)}@example.test>"
    msg.set_content("附件见邮件 / see the attachments")
    for name, size in files:
        msg.add_attachment(
            random.Random(size).randbytes(size),
            maintype="application",
            subtype="octet-stream",
            filename=name,
        )
    return msg.as_bytes()


def test_oversize_mail_becomes_a_ticket_that_says_what_was_left_out(
    tmp_path, mailbox, smtp, clock, capsys
):
    desk = make_desk(
        tmp_path,
        mailbox=mailbox,
        smtp=smtp,
        limits={
            "max_message_bytes": 400_000,
            "max_attachment_bytes": 50_000,
            "max_attachments": 2,
        },
    )
    mailbox.append(
        with_attachments("a@example.test", "很多附件", [(f"log{i}.txt", 2000) for i in range(5)])
    )
    mailbox.append(with_attachments("b@example.test", "一个大附件", [("dump.bin", 80_000)]))
    mailbox.append(with_attachments("c@example.test", "超大邮件", [("disk.img", 350_000)]))
    mailbox.append(with_attachments("d@example.test", "巨大邮件", [("all.zip", 2_000_000)]))
    run_once(desk, clock)
    tickets = {t["requester"]: t for t in cli_json(desk, capsys, "tickets")}
    assert len(tickets) == 4, "every oversize mail still becomes a ticket"
    expected = {
        "a@example.test": "3 attachment(s) not kept (limit 2 attachments)",
        "b@example.test": "dump.bin (",
        "c@example.test": "attachments not kept",
        "d@example.test": "only its beginning was read",
    }
    for user, phrase in expected.items():
        ticket = cli_json(desk, capsys, "show", tickets[user]["ref"])
        omitted = [e["detail"] for e in ticket["events"] if e["action"] == "omitted"]
        assert len(omitted) == 1 and phrase in omitted[0], (user, omitted)
        ack = body_of(sent_to(smtp, user)[0].content)
        assert "未收录" in ack and phrase in ack
        notices = [
            m
            for m in sent_to(smtp, "desk1@example.test")
            if tickets[user]["ref"] in parsed(m.content)["Subject"]
        ]
        assert phrase in body_of(notices[0].content), "the L1 notice says it too"
    assert "disk.img (" in body_of(sent_to(smtp, "c@example.test")[0].content)

    # A reply with too big an attachment: recorded on the ticket and in its text.
    ack = sent_to(smtp, "a@example.test")[0].content
    big_reply = with_attachments("a@example.test", "Re: x", [("more.bin", 90_000)])
    big_reply = big_reply.replace(
        b"Subject: Re: x", b"Subject: " + parsed(ack)["Subject"].encode("utf-8")
    )
    mailbox.append(big_reply)
    run_once(desk, clock)
    ticket = cli_json(desk, capsys, "show", tickets["a@example.test"]["ref"])
    assert ticket["messages"] == 2
    assert "more.bin" in ticket["interactions"][-1]["text"] or any(
        "more.bin" in (i["text"] or "") for i in ticket["interactions"] if i["direction"] == "in"
    )
    desk.close()


def test_an_oversize_reply_is_kept_on_its_ticket_with_what_was_left_out(
    tmp_path, mailbox, smtp, clock, capsys
):
    """A new ticket says what was left out in its own field; a reply says it in its text."""
    desk = make_desk(
        tmp_path, mailbox=mailbox, smtp=smtp, limits={"max_attachment_bytes": 50_000}
    )
    mailbox.append(with_attachments("a@example.test", "打印机卡纸", [("first.bin", 80_000)]))
    run_once(desk, clock)
    reply_subject = "Re: [INC-1] 打印机卡纸"
    mailbox.append(with_attachments("a@example.test", reply_subject, [("log.bin", 90_000)]))
    run_once(desk, clock)
    assert len(cli_json(desk, capsys, "tickets")) == 1, "the reply found its ticket"
    ticket = cli_json(desk, capsys, "show", "INC-1")
    first, second = [i for i in ticket["interactions"] if i["direction"] == "in"]
    text = "附件见邮件 / see the attachments"
    assert first["text"] == text, "the ticket's own field says it"
    assert second["text"] == f"{text}\n\n[未收录 / left out: log.bin (88 KB)]"
    omitted = [e["detail"] for e in ticket["events"] if e["action"] == "omitted"]
    assert omitted == ["first.bin (78 KB)", "log.bin (88 KB)"]
    desk.close()


# -- header injection ------------------------------------------------------------------------------


def raw_mail(sender: str, subject: str, message_id: str | None = None) -> bytes:
    """A mail written byte by byte, as a hostile client would send it."""
    mid = message_id or f"<{abs(hash((sender, subject)))}@example.test>"
    return (
        f"From: {sender}\r\nTo: {DESK}\r\nSubject: {subject}\r\nMessage-ID: {mid}\r\n"
        f"Date: Tue, 24 Nov 2026 10:00:00 +0800\r\n\r\n注入测试\r\n"
    ).encode()


def test_header_injection_adds_no_header_to_outgoing_mail(tmp_path, mailbox, smtp, clock, capsys):
    rules = tmp_path / "rules"
    shutil.copytree(REPO / "rules", rules)
    (rules / "05-injected.toml").write_text(
        'description = "x"\n[match]\nany = ["注入"]\n[set]\nkind = "incident"\n'
        'category = "printer\\r\\nBcc: evil@evil.test"\npriority = "P3"\n',
        encoding="utf-8",
    )
    config = desk_config(tmp_path, mailbox=mailbox, smtp=smtp, paths={"rules": str(rules)})
    text = config.read_text(encoding="utf-8")  # a desk name with a header in it (TOML escapes)
    config.write_text(
        text.replace('name = "IT服务台"', 'name = "IT服务台\\r\\nBcc: e@evil.test"'),
        encoding="utf-8",
    )
    desk = Desk(load_config(config))
    assert "\r\n" in desk.settings.desk.name
    crlf = base64.b64encode("打印机\r\nX-Injected: 1\r\n\r\n<html>".encode()).decode()
    injected = [
        raw_mail("a@example.test", "=?utf-8?q?=E6=B3=A8=E5=85=A5=0D=0ABcc:_evil@evil.test?="),
        raw_mail("b@example.test", f"=?utf-8?b?{crlf}?="),
        raw_mail("=?utf-8?q?Zhang=0D=0ABcc:_evil@evil.test?= <c@example.test>", "名字"),
        raw_mail(
            "d@example.test",
            "注入 Message-ID",
            message_id="<x\r\n Bcc: evil@evil.test@example.test>",
        ),
    ]
    for raw in injected:
        mailbox.append(raw)
    run_once(desk, clock)
    ack = sent_to(smtp, "a@example.test")[0]
    # A command that tries to smuggle a header in with its argument.
    mailbox.append(
        reply(ack.content, "desk1@example.test", "assign l2@example.test\r\nBcc: evil@evil.test")
    )
    run_once(desk, clock)
    # Pythons with the stricter getaddresses (e.g. Debian's 3.11.2) find no address in the
    # third sender and ignore that mail: safe either way, so expect what this Python parses.
    third = email.utils.getaddresses(
        ["=?utf-8?q?Zhang=0D=0ABcc:_evil@evil.test?= <c@example.test>"]
    )
    assert len(cli_json(desk, capsys, "tickets")) == (4 if third[0][1] else 3)
    assert smtp.messages, "mail went out"
    for message in smtp.messages:
        assert header_names(message.content) <= OUTGOING_HEADERS, message.content[:1500]
        assert "evil@evil.test" not in message.rcpt_tos
        head = message.content.split(b"\r\n\r\n", 1)[0]
        assert b"\nBcc:" not in head and b"\nX-Injected" not in head
    subject = parsed(ack.content)["Subject"]
    assert "\n" not in subject and "Bcc: evil@evil.test" in subject, "kept as text, one line"
    # The rule with a header in its value was refused: `mailflow check` names it.
    capsys.readouterr()
    assert main(["--config", str(desk.settings.path), "check"]) == 1
    assert "05-injected.toml" in capsys.readouterr().out
    desk.close()


@settings(max_examples=300, deadline=None)
@given(
    st.text(max_size=300),
    st.text(max_size=80),
    st.text(max_size=600),
    st.text(alphabet=st.characters(max_codepoint=127), max_size=200),
)
def test_outgoing_headers_are_written_as_compat32_writes_them(subject, name, reference, raw):
    """notify.WIRE writes a ready-encoded one-line header as it is (compat32 ran each one
    through Header again, the costliest step of building a notification): same bytes."""
    message = MIMEText("正文", "plain", "utf-8")
    desk_name = str(Header(notify.clean_header(name), "utf-8"))
    message["From"] = email.utils.formataddr((desk_name, DESK))
    message["Subject"] = Header(notify.clean_header(subject), "utf-8").encode()
    message["In-Reply-To"] = f"<{notify.clean_header(reference, 500)}>"
    message["X-Any"] = raw  # control characters and line breaks: compat32's own way
    plain = compat32.clone(linesep="\r\n", max_line_length=None)
    try:
        expected = message.as_bytes(policy=plain)
    except HeaderParseError:  # a line break then "Name:" reads as a header: refused alike
        with pytest.raises(HeaderParseError):
            message.as_bytes(policy=notify.WIRE)
        return
    assert message.as_bytes(policy=notify.WIRE) == expected


# -- HTML templates escape mail text ---------------------------------------------------------------


def test_mail_text_is_escaped_in_html_templates(tmp_path, mailbox, smtp, clock):
    templates = tmp_path / "templates"
    shutil.copytree(REPO / "templates", templates)
    for lang in ("zh-CN", "en"):
        (templates / lang / "new_incident.html").write_text(
            "<html><body><h1>{{ ticket.subject }}</h1><p>{{ ticket.requester_name }}</p>"
            "<pre>{{ ticket.description }}</pre></body></html>\n",
            encoding="utf-8",
        )
    desk = make_desk(tmp_path, mailbox=mailbox, smtp=smtp, paths={"templates": str(templates)})
    mailbox.append(
        make_mail(
            "x@example.test",
            "<script>alert('subject')</script>",
            '<img src=x onerror=alert(1)> & "quotes"',
            name='"<b>Mallory</b>"',
        )
    )
    run_once(desk, clock)
    notice = parsed(sent_to(smtp, "desk1@example.test")[0].content)
    html = notice.get_body(preferencelist=("html",)).get_content()
    assert "&lt;script&gt;alert(&#39;subject&#39;)&lt;/script&gt;" in html
    assert "&lt;img src=x onerror=alert(1)&gt; &amp; &#34;quotes&#34;" in html
    assert "&lt;b&gt;Mallory&lt;/b&gt;" in html
    assert "<script" not in html and "<img" not in html and "<b>" not in html
    plain = notice.get_body(preferencelist=("plain",)).get_content()
    assert "<script>alert('subject')</script>" in plain, "plain text is left as written"
    desk.close()


# -- broken rules or config: the last good one keeps running ---------------------------------------


def test_a_broken_rule_file_keeps_the_last_good_rules(tmp_path, mailbox, smtp, clock, capsys):
    rules = tmp_path / "rules"
    shutil.copytree(REPO / "rules", rules)
    desk = make_desk(tmp_path, mailbox=mailbox, smtp=smtp, paths={"rules": str(rules)})
    printer = (rules / "60-printer.toml").read_text(encoding="utf-8")
    (rules / "60-printer.toml").write_text(printer.replace("[set]", "[set\nbroken"), "utf-8")
    problems = desk.reload_rules()
    assert problems and "60-printer.toml" in problems[0]
    mailbox.append(make_mail("p@example.test", "打印机卡纸", "三楼打印机卡纸"))
    run_once(desk, clock)
    assert cli_json(desk, capsys, "tickets")[0]["category"] == "printer", "old rules still run"
    capsys.readouterr()
    assert main(["--config", str(desk.settings.path), "check"]) == 1
    assert "60-printer.toml" in capsys.readouterr().out

    (rules / "60-printer.toml").write_text(printer.replace('"printer"', '"printing"'), "utf-8")
    assert desk.reload_rules() == []
    mailbox.append(make_mail("q@example.test", "打印机缺纸", "二楼打印机缺纸"))
    run_once(desk, clock)
    assert {t["category"] for t in cli_json(desk, capsys, "tickets")} == {"printer", "printing"}
    desk.close()


def test_a_broken_config_keeps_the_last_good_one(tmp_path, mailbox, smtp, clock, capsys):
    config = desk_config(tmp_path, mailbox=mailbox, smtp=smtp)
    desk = Desk(load_config(config))
    good = config.read_text(encoding="utf-8")
    config.write_text(good.replace('language = "zh-CN"', 'language = "fr"'), encoding="utf-8")
    problems = desk.reload_config()
    assert len(problems) == 1 and "desk.language" in problems[0] and str(config) in problems[0]
    config.write_text(good + "\n[limits\n", encoding="utf-8")
    assert "not valid TOML" in desk.reload_config()[0]
    assert desk.settings.desk.language == "zh-CN"
    mailbox.append(make_mail("u@example.test", "无法上网", "网络断了"))
    run_once(desk, clock)
    assert "您好" in body_of(sent_to(smtp, "u@example.test")[0].content), "still running"

    config.write_text(good.replace('language = "zh-CN"', 'language = "en"'), encoding="utf-8")
    assert desk.reload_config() == []
    assert desk.settings.desk.language == "en"
    mailbox.append(make_mail("v@example.test", "No network", "The network is down"))
    run_once(desk, clock)
    assert "Hello" in body_of(sent_to(smtp, "v@example.test")[0].content)
    with desk.db.sessions() as session:
        assert session.scalar(select(func.count(Inbound.id))) == 2
    desk.close()
