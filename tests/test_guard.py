"""Loops, bounces and floods over the real IMAP (Dovecot) and SMTP (aiosmtpd) servers.

Automatic mail is recorded and never answered; delivery reports are attached to the mail
they report on and suppress an address that hard-bounces; automatic replies are capped per
sender and per ticket with one alert to the service desk lead; and a second desk that
answers every mail we send ends the exchange within three messages.
"""

from __future__ import annotations

import json
from datetime import timedelta
from email.utils import make_msgid
from pathlib import Path

import pytest
from sqlalchemy import select
from support import DESK, body_of, make_desk, make_mail, parsed, reply, run_once

from mailflow.cli import main
from mailflow.mail import parse
from mailflow.models import Alert, AutoReply, Inbound, Outbox, Suppression

FIXTURES = Path(__file__).parent / "fixtures" / "mail"
LEAD = "lead@example.test"


def cli_json(desk, capsys, *args: str):
    capsys.readouterr()
    assert main(["--config", str(desk.settings.path), *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def sent_to(smtp, address: str) -> list:
    return [m for m in smtp.messages if address in m.rcpt_tos]


def reasons(desk) -> list[str]:
    with desk.db.sessions() as session:
        return [r or "" for r in session.scalars(select(Inbound.reason).order_by(Inbound.id))]


# -- automatic mail ---------------------------------------------------------------------------

AUTOMATIC = {
    "Auto-Submitted": {"Auto-Submitted": "auto-replied"},
    "X-Autoreply": {"X-Autoreply": "yes"},
    "Precedence bulk": {"Precedence": "bulk"},
    "Precedence junk": {"Precedence": "junk"},
    "Precedence list": {"Precedence": "list"},
    "Precedence auto_reply": {"Precedence": "auto_reply"},
    "List-Id": {"List-Id": "<it-news.example.test>"},
    "null Return-Path": {"Return-Path": "<>"},
    "Exchange rule": {"X-MS-Exchange-Generated-Message-Source": "Mailbox Rules Agent"},
}


def test_automatic_mail_is_recorded_and_never_answered(desk, mailbox, smtp, clock, capsys):
    for i, headers in enumerate(AUTOMATIC.values()):
        mailbox.append(make_mail(f"bot{i}@example.test", f"Notice {i}", "auto", headers=headers))
    mailbox.append(make_mail("wang@example.test", "自动回复：我正在休假", "下周一回来"))
    mailbox.append(make_mail("li@example.test", "Out of Office: back Monday", "Away"))
    mailbox.append((FIXTURES / "exchange_ooo.eml").read_bytes())
    total = len(AUTOMATIC) + 3
    result = run_once(desk, clock)
    assert result.processed == total
    assert smtp.messages == []
    assert cli_json(desk, capsys, "tickets") == []
    status = cli_json(desk, capsys, "status")
    assert status["inbound"] == {"processed": 0, "ignored": total, "quarantined": 0, "pending": 0}
    assert all(r.startswith("automatic mail: ") for r in reasons(desk))


# -- delivery reports -------------------------------------------------------------------------


def _bounce(fixture: str, original_id: str, old_id: str) -> bytes:
    raw = (FIXTURES / fixture).read_bytes()
    return raw.replace(old_id.encode(), original_id.encode()).replace(
        b"servicedesk@example.com", DESK.encode()
    )


BOUNCES = {
    # fixture, the bounced address in it, the Message-ID it quotes
    "RFC 3464 DSN": ("dsn_550.eml", "former.staff@partner.example.net",
                     "mf.inc42.update.77@desk.example.com"),
    "qmail": ("qmail_bounce.eml", "nobody@partner.example.org",
              "mf.req9.notice.3@desk.example.com"),
    "Chinese Coremail": ("cn_bounce.eml", "zhang.wei@partner.example.cn",
                         "mf.inc42.update.78@desk.example.com"),
}


@pytest.mark.parametrize("kind", list(BOUNCES))
def test_a_hard_bounce_is_attached_to_its_mail_and_suppresses_the_address(
    kind, desk, mailbox, smtp, clock, capsys
):
    fixture, user, old_id = BOUNCES[kind]
    mailbox.append(make_mail(user, "VPN 连不上", "家里无法连接 VPN"))
    run_once(desk, clock)
    ack = sent_to(smtp, user)[0]
    ack_id = parsed(ack.content)["Message-ID"].strip("<>")
    notice = sent_to(smtp, "desk1@example.test")[0]

    clock.advance(minutes=10)
    mailbox.append(_bounce(fixture, ack_id, old_id))
    run_once(desk, clock)
    status = cli_json(desk, capsys, "status")
    assert status["inbound"]["ignored"] == 1 and status["inbound"]["processed"] == 1
    assert reasons(desk)[1].startswith("delivery report: ")
    ticket = cli_json(desk, capsys, "show", "INC-1")
    bounced = [e for e in ticket["events"] if e["action"] == "bounced"]
    assert len(bounced) == 1 and user in bounced[0]["detail"]
    assert "suppressed" in bounced[0]["detail"]
    assert ticket["messages"] == 1, "a bounce is not a message from the requester"
    out = [i for i in ticket["interactions"] if i["direction"] == "out" and i["to"] == user]
    assert out[0]["bounce"].startswith("5."), "shown on the mail it reports on"
    with desk.db.sessions() as session:
        row = session.scalar(select(Outbox).where(Outbox.message_id == ack_id))
        assert row.bounce and row.bounce.startswith("5.") and row.bounced_at == clock.now
        bounce_inbound = session.scalar(select(Inbound).order_by(Inbound.id.desc()))
        assert bounce_inbound.ticket_id == row.ticket_id
        held = session.get(Suppression, user)
        assert held.until == clock.now + timedelta(days=7)

    # The engineer answers: the comment for the requester is not queued, and that is recorded.
    before = len(smtp.messages)
    mailbox.append(reply(notice.content, "desk1@example.test", "请重启电脑后再试"))
    run_once(desk, clock)
    assert sent_to(smtp, user) == [ack]
    assert len(smtp.messages) == before
    events = cli_json(desk, capsys, "show", "INC-1")["events"]
    assert any(e["action"] == "not_mailed" and user in e["detail"] for e in events)

    # The requester writes again from a working mailbox: the suppression is lifted.
    clock.advance(hours=1)
    mailbox.append(make_mail(user, "VPN 又断了", "还是连不上"))
    run_once(desk, clock)
    assert len(sent_to(smtp, user)) == 2


def test_soft_and_forged_bounces_suppress_nothing(desk, mailbox, smtp, clock, capsys):
    user = "slow@partner.example.net"
    mailbox.append(make_mail(user, "邮箱满了", "无法收邮件"))
    run_once(desk, clock)
    ack_id = parsed(sent_to(smtp, user)[0].content)["Message-ID"].strip("<>")
    dsn = (FIXTURES / "dsn_550.eml").read_bytes()
    # Delayed (4.4.1) for our address: attached to the mail, no suppression.
    soft = dsn.replace(b"mf.inc42.update.77@desk.example.com", ack_id.encode()).replace(
        b"Former.Staff@partner.example.net", b"gone@partner.example.net"
    )
    # A report on a Message-ID we never sent, for the lead's address: changes nothing.
    forged = dsn.replace(b"Former.Staff@partner.example.net", LEAD.encode()).replace(
        b"former.staff@partner.example.net", LEAD.encode()
    ).replace(b"20241108024002.4Xm1", b"forged.1")
    mailbox.append(soft)
    mailbox.append(forged)
    clock.advance(minutes=10)
    run_once(desk, clock)
    with desk.db.sessions() as session:
        assert session.scalars(select(Suppression)).all() == []
        row = session.scalar(select(Outbox).where(Outbox.message_id == ack_id))
        assert row.bounce.startswith("4.4.1 delayed")
    assert "did not send" in reasons(desk)[2]
    events = cli_json(desk, capsys, "show", "INC-1")["events"]
    assert [e for e in events if e["action"] == "bounced"][0]["detail"].count("suppressed") == 0


# -- caps -------------------------------------------------------------------------------------


def test_automatic_replies_to_one_sender_are_capped_with_one_alert(
    tmp_path, mailbox, smtp, clock, capsys
):
    desk = make_desk(tmp_path, mailbox=mailbox, smtp=smtp,
                     limits={"auto_replies_per_sender_per_hour": 2})
    user = "flood@example.test"
    for i in range(4):
        mailbox.append(make_mail(user, f"问题 {i}", f"第 {i} 个问题"))
    run_once(desk, clock)
    assert len(cli_json(desk, capsys, "tickets")) == 4, "every mail still becomes a ticket"
    assert len(sent_to(smtp, user)) == 2
    alerts = sent_to(smtp, LEAD)
    assert len(alerts) == 1
    assert user in body_of(alerts[0].content)
    assert "auto_replies_per_sender_per_hour" in body_of(alerts[0].content)
    withheld = [e for t in ("INC-3", "INC-4")
                for e in cli_json(desk, capsys, "show", t)["events"]
                if e["action"] == "auto_reply_withheld"]
    assert len(withheld) == 2

    # Still flooding ten minutes later: withheld, and no second alert in the same episode.
    clock.advance(minutes=10)
    mailbox.append(make_mail(user, "问题 5", "第 5 个问题"))
    run_once(desk, clock)
    assert len(sent_to(smtp, user)) == 2 and len(sent_to(smtp, LEAD)) == 1

    # Two hours on the hour's count has gone: answered again.
    clock.advance(hours=2)
    mailbox.append(make_mail(user, "问题 6", "第 6 个问题"))
    run_once(desk, clock)
    assert len(sent_to(smtp, user)) == 3
    with desk.db.sessions() as session:
        outcomes = [a.outcome for a in session.scalars(select(AutoReply).order_by(AutoReply.id))]
        assert outcomes == ["sent", "sent", "withheld", "withheld", "withheld", "sent"]
        assert session.get(Alert, f"cap:sender:{user}").count == 3
    desk.close()


def test_automatic_replies_on_one_ticket_are_capped_with_one_alert(
    tmp_path, mailbox, smtp, clock, capsys
):
    desk = make_desk(tmp_path, mailbox=mailbox, smtp=smtp,
                     limits={"auto_replies_per_ticket_per_hour": 2})
    mailbox.append(make_mail("owner@example.test", "共享盘打不开", "Z 盘报错"))
    run_once(desk, clock)  # the ack is the ticket's first automatic reply
    ack = sent_to(smtp, "owner@example.test")[0]
    strangers = [f"stranger{i}@example.test" for i in range(3)]
    for who in strangers:  # each tries a command they may not give: a refusal answers them
        mailbox.append(reply(ack.content, who, "已解决"))
    clock.advance(minutes=10)
    run_once(desk, clock)
    refused = [len(sent_to(smtp, who)) for who in strangers]
    assert refused == [1, 0, 0]
    assert len(sent_to(smtp, LEAD)) == 1
    assert "INC-1" in body_of(sent_to(smtp, LEAD)[0].content)
    assert cli_json(desk, capsys, "show", "INC-1")["status"] == "open"
    desk.close()


# -- two desks answering each other -------------------------------------------------------------

OTHER = "helpdesk@other.test"


def _answer(ours: bytes, variant: str, clock) -> bytes:
    """What the other desk sends back when it gets one of our mails."""
    msg = parsed(ours)
    subject = str(msg["Subject"])
    our_id = msg["Message-ID"].strip("<>")
    date = clock.now + timedelta(seconds=5)
    body = "We received your message.\n\n" + body_of(ours)
    if variant == "RFC 3834 auto-replied":
        return make_mail(OTHER, "Auto: " + subject, body, in_reply_to=our_id, date=date,
                         headers={"Auto-Submitted": "auto-replied"})
    if variant == "threaded, unmarked":
        return make_mail(OTHER, "Re: " + subject, body, in_reply_to=our_id, references=[our_id],
                         date=date)
    if variant == "subject tag only, unmarked":
        return make_mail(OTHER, "Re: " + subject, body, date=date)
    if variant == "fresh subject echoing us, unmarked":
        return make_mail(OTHER, "[OTHER-77] Your request was received", body, date=date)
    if variant == "fixed text, unmarked":
        return make_mail(OTHER, "Thank you for your message", "We will answer soon.", date=date)
    if variant == "another mailflow desk":
        return make_mail(OTHER, "[INC-9] 已登记", body, date=date,
                         headers={"Auto-Submitted": "auto-generated", "X-Mailflow": "INC-9"})
    raise AssertionError(variant)


@pytest.mark.parametrize("variant", [
    "RFC 3834 auto-replied",
    "threaded, unmarked",
    "subject tag only, unmarked",
    "fresh subject echoing us, unmarked",
    "fixed text, unmarked",
    "another mailflow desk",
])
def test_two_desks_answering_each_other_stop_within_three_messages(
    variant, desk, mailbox, smtp, clock, capsys
):
    first = make_mail(OTHER, "Printer on floor 3 is broken", "Please fix.",
                      message_id=make_msgid("first", "other.test"),
                      date=clock.now)
    mailbox.append(first)
    exchanged, answered = 1, 0
    for _ in range(6):
        run_once(desk, clock)
        ours = sent_to(smtp, OTHER)[answered:]
        answered += len(ours)
        exchanged += len(ours)
        clock.advance(seconds=30)
        for mail in ours:
            mailbox.append(_answer(mail.content, variant, clock))
            exchanged += 1
    assert exchanged <= 3, f"{variant}: {exchanged} messages exchanged"
    assert answered == 1, "only the first mail is acknowledged"
    status = cli_json(desk, capsys, "status")
    assert status["inbound"]["pending"] == 0 and status["inbound"]["quarantined"] == 0
    assert sum(status["inbound"].values()) == exchanged - answered, "every mail is recorded"


def test_two_auto_responders_answering_each_other_through_the_desk_are_stopped(
    desk, mailbox, smtp, clock, capsys
):
    """desk1 and desk2 (service desk members) are both away with a fixed-text, unmarked
    auto-reply: each answer is a new mail that the desk would mail to the other member."""
    staff = ("desk1@example.test", "desk2@example.test")
    mailbox.append(make_mail("user@example.test", "打印机坏了", "三楼打印机不能用", date=clock.now))
    seen = 0
    for _ in range(20):  # a round a minute: whatever reached a member is answered
        run_once(desk, clock)
        new, seen = smtp.messages[seen:], len(smtp.messages)
        clock.advance(minutes=1)
        for mail in new:
            for member in set(mail.rcpt_tos) & set(staff):
                mailbox.append(make_mail(member, "Thank you for your message",
                                         "I am out of the office.", date=clock.now))
    assert len(smtp.messages) <= 12, f"{len(smtp.messages)} mails in 20 minutes"
    assert seen == len(smtp.messages), "the exchange has stopped"
    with desk.db.sessions() as session:
        keys = set(session.scalars(select(Alert.key)))
    assert keys & {f"loop:{member}" for member in staff}, "the lead is told"
    status = cli_json(desk, capsys, "status")
    assert status["inbound"]["pending"] == status["inbound"]["quarantined"] == 0


def test_mail_on_one_ticket_is_capped_whoever_it_goes_to(tmp_path, mailbox, smtp, clock,
                                                          capsys):
    """A requester that is another helpdesk answering every mail, and an engineer's
    threaded out-of-office: each answer goes on to the other side, never back to its
    sender. With the machine signals set aside (a score no mail reaches), the per-ticket
    cap on all mail still ends it: the last safety net."""
    desk = make_desk(tmp_path, mailbox=mailbox, smtp=smtp,
                     limits={"mails_per_ticket_per_hour": 8, "machine_score": 99})
    helpdesk = "helpdesk@other.test"
    mailbox.append(make_mail(helpdesk, "打印机坏了", "三楼打印机不能用", date=clock.now))
    seen = 0
    for _ in range(15):
        run_once(desk, clock)
        new, seen = smtp.messages[seen:], len(smtp.messages)
        clock.advance(minutes=6)  # past the loop window: each answer looks like a person's
        for mail in new:
            for rcpt in mail.rcpt_tos:
                if rcpt in (helpdesk, "desk1@example.test"):
                    mailbox.append(reply(mail.content, rcpt, "已收到，我们会尽快处理。"
                                         if rcpt == helpdesk else "我在休假，下周回来。"))
    ticket = cli_json(desk, capsys, "show", "INC-1")
    assert seen == len(smtp.messages), "the exchange has stopped"
    assert len(smtp.messages) <= 8 + 2  # the cap, the acknowledgement and the alert
    assert any(e["action"] == "not_mailed" and "mails_per_ticket_per_hour" in e["detail"]
               for e in ticket["events"])
    with desk.db.sessions() as session:
        assert "cap:mails:INC-1" in set(session.scalars(select(Alert.key)))
    desk.close()


def test_auto_submitted_no_with_a_comment_is_a_person():
    raw = make_mail("user@example.test", "打印机坏了", "卡纸",
                    headers={"Auto-Submitted": "no (written by a person)"})
    assert parse(raw).auto is None


def test_a_quick_second_mail_written_before_our_ack_is_still_answered(
    desk, mailbox, smtp, clock, capsys
):
    """The loop window looks at the mail's Date: a person who wrote before our ack is answered."""
    user = "quick@example.test"
    mailbox.append(make_mail(user, "键盘坏了", "键盘失灵", date=clock.now))
    run_once(desk, clock)
    clock.advance(seconds=40)
    mailbox.append(make_mail(user, "鼠标也坏了", "鼠标失灵", date=clock.now - timedelta(minutes=3)))
    run_once(desk, clock)
    assert len(sent_to(smtp, user)) == 2


def test_a_user_replying_quickly_to_a_question_is_not_taken_for_a_loop(
    desk, mailbox, smtp, clock, capsys
):
    """Replies in a ticket's thread are not governed by the loop window, only by the caps."""
    user = "fast@example.test"
    mailbox.append(make_mail(user, "无法打印", "打印机没反应"))
    run_once(desk, clock)
    notice = sent_to(smtp, "desk1@example.test")[0]
    mailbox.append(reply(notice.content, "desk1@example.test", "待用户\n请问是哪台打印机？"))
    run_once(desk, clock)
    question = [m for m in sent_to(smtp, user) if "哪台打印机" in body_of(m.content)][0]
    clock.advance(seconds=20)
    mailbox.append(reply(question.content, user, "三楼的 HP 打印机"))
    run_once(desk, clock)
    assert cli_json(desk, capsys, "show", "INC-1")["status"] == "open"
    assert not any(e["action"] == "auto_reply_withheld"
                   for e in cli_json(desk, capsys, "show", "INC-1")["events"])


