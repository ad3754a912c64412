"""Mail people read: text and HTML from one template, one language per mail, labels instead of
codes, local times with the zone, and action links whose reply applies the command. Through
the real Dovecot and SMTP servers."""

from __future__ import annotations

import json
import re
from datetime import datetime
from html.parser import HTMLParser
from urllib.parse import unquote, urlsplit
from zoneinfo import ZoneInfo

import pytest
from support import body_of, make_desk, make_mail, parsed, reply, run_once

from mailflow.cli import main

CJK = re.compile(r"[\u3000-\u303f\u4e00-\u9fff\uff00-\uffef]")
ADDRESS = re.compile(r"<?[\w.+-]+@[\w.-]+>?")
SENTENCE = re.compile(r"\b[A-Za-z]{2,}(?:[ ,]+[A-Za-z]{2,}){2,}")  # three English words in a row

MAILS = {
    "zh-CN": ("营销部3楼打印机无法打印", "打印机显示脱机，无法打印，麻烦尽快处理。", "张三"),
    "en": ("Printer on floor 3 does not print", "The printer shows offline.", "Zhang San"),
}
LABELS = {
    "zh-CN": {"category": "打印机", "tier": "一线 服务台", "status": "处理中"},
    "en": {"category": "Printer", "tier": "L1 service desk", "status": "open"},
}


class _Links(HTMLParser):
    """The visible text and the links of an HTML part, as a reader sees them."""

    def __init__(self) -> None:
        super().__init__()
        self.text: list[str] = []
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.hrefs += [v for k, v in attrs if k == "href" and v]

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parts(raw: bytes) -> tuple[str, str, _Links]:
    msg = parsed(raw)
    assert msg.get_content_type() == "multipart/alternative"
    text = msg.get_body(preferencelist=("plain",)).get_content()
    html = msg.get_body(preferencelist=("html",)).get_content()
    links = _Links()
    links.feed(html)
    return text, html, links


@pytest.fixture(params=["zh-CN", "en"])
def lang_desk(request, tmp_path, mailbox, smtp):
    name = "IT服务台" if request.param == "zh-CN" else "IT Service Desk"
    made = make_desk(
        tmp_path, mailbox=mailbox, smtp=smtp, desk={"language": request.param, "name": name}
    )
    yield request.param, made
    made.close()


def show(desk, capsys, ref: str = "INC-1") -> dict:
    capsys.readouterr()
    assert main(["--config", str(desk.settings.path), "show", ref, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def last_to(smtp, address: str) -> bytes:
    return [m for m in smtp.messages if address in m.rcpt_tos][-1].content


def open_ticket(language, desk, mailbox, clock) -> None:
    subject, body, name = MAILS[language]
    mailbox.append(make_mail("zhang.san@example.test", subject, body, name=name))
    assert run_once(desk, clock).processed == 1


def assert_one_language(language: str, readable: str) -> None:
    user_text = " ".join(MAILS[language])  # the requester's own words are theirs
    for line in readable.splitlines():
        line = ADDRESS.sub(" ", line.replace(user_text, ""))
        for own in MAILS[language]:
            line = line.replace(own, " ")
        if language == "en":
            assert not CJK.search(line), line
        else:
            assert not SENTENCE.search(line), line


def test_ack_and_l1_notice_are_text_and_html_in_one_language_with_labels_and_local_times(
    lang_desk, mailbox, smtp, clock, capsys
):
    language, desk = lang_desk
    open_ticket(language, desk, mailbox, clock)
    ticket = show(desk, capsys)
    created = datetime.fromisoformat(ticket["created_at"].replace("Z", "+00:00"))
    local = created.astimezone(ZoneInfo("Asia/Shanghai")).strftime("%Y-%m-%d %H:%M CST")

    for address in ("zhang.san@example.test", "desk1@example.test"):
        text, html, links = parts(last_to(smtp, address))
        seen = "".join(links.text)
        for readable in (text, seen):
            assert_one_language(language, readable)
            assert local in readable  # the desk's local time, with its zone
            assert LABELS[language]["category"] in readable
            assert LABELS[language]["tier"] in readable
            assert LABELS[language]["status"] in readable
            assert not re.search(r"(分类|Category)\s*[:：]\s*printer", readable)
        # Outlook 2016 / Foxmail: inline CSS, tables with widths, nothing remote.
        assert "<style" not in html and "flex" not in html and "grid" not in html
        assert not re.search(r"(src|href)=\"https?:", html)
        assert re.search(r'<table[^>]*width="100%"', html) and 'width="120"' in html


def test_an_action_link_turned_into_a_reply_applies_its_command(
    lang_desk, mailbox, smtp, clock, capsys
):
    language, desk = lang_desk
    open_ticket(language, desk, mailbox, clock)
    notices = {a: parsed(last_to(smtp, a)) for a in ("desk1@example.test", "desk2@example.test")}
    links = {a: parts(last_to(smtp, a))[2].hrefs for a in notices}
    word = "body=" + ("%E5%8D%87%E7%BA%A7" if language == "zh-CN" else "escalate")  # 升级
    escalate = {a: next(h for h in links[a] if word in h) for a in links}
    # Each recipient's link answers their own reply address (their Reply-To, with their token).
    for address, href in escalate.items():
        assert urlsplit(href).path == str(notices[address]["Reply-To"])
    assert escalate["desk1@example.test"] != escalate["desk2@example.test"]

    # What a mail client does with the link: a new mail to the address, subject and body
    # as given (no In-Reply-To), the person adding a line of their own.
    url = urlsplit(escalate["desk1@example.test"])
    query = dict(pair.split("=", 1) for pair in url.query.split("&"))
    subject, body = unquote(query["subject"]), unquote(query["body"])
    assert "[INC-1]" in subject
    mailbox.append(
        make_mail("desk1@example.test", subject, body + "\nneed an on-site visit", to=url.path)
    )
    run_once(desk, clock)
    assert show(desk, capsys)["tier"] != "L1"


def test_a_bilingual_desk_keeps_english_in_zh_cn_mail(tmp_path, mailbox, smtp, clock):
    desk = make_desk(tmp_path, mailbox=mailbox, smtp=smtp, desk={"bilingual": True})
    try:
        open_ticket("zh-CN", desk, mailbox, clock)
        text, _, links = parts(last_to(smtp, "zhang.san@example.test"))
        assert "Your incident is registered as INC-1" in text
        assert "Your incident is registered as INC-1" in "".join(links.text)
    finally:
        desk.close()


def test_show_and_tickets_print_local_times_with_the_zone_json_keeps_utc(
    desk, mailbox, clock, capsys
):
    open_ticket("zh-CN", desk, mailbox, clock)
    due = show(desk, capsys)["due_at"]
    assert due.endswith("Z")  # the contract: ISO 8601 UTC
    local = datetime.fromisoformat(due.replace("Z", "+00:00")).astimezone(
        ZoneInfo("Asia/Shanghai")
    ).strftime("%Y-%m-%d %H:%M CST")
    for command in (["show", "INC-1"], ["tickets"]):
        capsys.readouterr()
        assert main(["--config", str(desk.settings.path), *command]) == 0
        out = capsys.readouterr().out
        assert local in out and due not in out


REFUSED = {
    "zh-CN": ("已解决 好了", "只有 事件经理、当前处理组 可以执行 “已解决”"),
    "en": ("resolve done", "only the incident manager or the owning tier may do this"),
}


def test_a_refusal_gives_its_reason_in_the_mail_language_only(
    lang_desk, mailbox, smtp, clock
):
    language, desk = lang_desk
    open_ticket(language, desk, mailbox, clock)
    command, reason = REFUSED[language]
    ack = last_to(smtp, "zhang.san@example.test")
    mailbox.append(reply(ack, "zhang.san@example.test", command, quote=False))
    run_once(desk, clock)
    refused = last_to(smtp, "zhang.san@example.test")
    text = body_of(refused)
    assert reason in text and " / " not in text.split(reason)[0].splitlines()[-1]
    assert_one_language(language, text)
    assert_one_language(language, "".join(parts(refused)[2].text))


def test_an_unproven_command_is_explained_in_the_mail_language_only(
    lang_desk, mailbox, smtp, clock
):
    language, desk = lang_desk
    open_ticket(language, desk, mailbox, clock)
    command, _ = REFUSED[language]
    before = len(smtp.messages)
    # A fresh mail naming the ticket, from the requester's address: nothing proves who wrote it.
    mailbox.append(make_mail("zhang.san@example.test", "Re: [INC-1] ?", command))
    run_once(desk, clock)
    told = [m.content for m in smtp.messages[before:] if "zhang.san@example.test" in m.rcpt_tos]
    assert len(told) == 1
    doubt = "没有回复服务台" if language == "zh-CN" else "answers no mail the desk sent"
    text = body_of(told[0])
    assert doubt in text
    assert_one_language(language, text)
    assert_one_language(language, "".join(parts(told[0])[2].text))


def client_reply(href: str, sender: str, extra: str = "") -> bytes:
    """What a mail client sends for a `mailto:` link: a new mail, no In-Reply-To."""
    url = urlsplit(href)
    query = dict(pair.split("=", 1) for pair in url.query.split("&"))
    body = unquote(query["body"]) + extra
    return make_mail(sender, unquote(query["subject"]), body, to=url.path)


def test_the_approve_link_of_an_approval_mail_approves(desk, mailbox, smtp, clock, capsys):
    mailbox.append(make_mail("zhang.san@example.test", "申请开通VPN", "申请原因：出差期间访问内网"))
    run_once(desk, clock)
    approval = last_to(smtp, "approver@example.test")
    approve = next(h for h in parts(approval)[2].hrefs if "body=%E5%90%8C%E6%84%8F" in h)  # 同意
    assert urlsplit(approve).path == str(parsed(approval)["Reply-To"])  # the one-time token
    mailbox.append(client_reply(approve, "approver@example.test"))
    run_once(desk, clock)
    assert show(desk, capsys, "REQ-1")["status"] == "approved"
