"""End-to-end conversations over the real IMAP (Dovecot) and SMTP (aiosmtpd) servers."""

from __future__ import annotations

import json

from support import DESK, body_of, make_mail, parsed, reply, run_once

from mailflow.cli import main


def cli_json(desk, capsys, *args: str):
    capsys.readouterr()
    assert main(["--config", str(desk.settings.path), *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def sent_to(smtp, address: str) -> list:
    return [m for m in smtp.messages if address in m.rcpt_tos]


def test_user_writes_desk_answers_engineer_resolves_user_confirms(
    desk, mailbox, smtp, clock, capsys
):
    # A user reports an incident.
    mailbox.append(
        make_mail(
            "zhang.san@example.test", "我的电脑蓝屏了", "开机后蓝屏，无法进入系统。", name="张三"
        )
    )
    result = run_once(desk, clock)
    assert (result.fetched, result.processed) == (1, 1)

    tickets = cli_json(desk, capsys, "tickets")
    assert len(tickets) == 1
    ticket = tickets[0]
    assert ticket["ref"] == "INC-1"
    assert ticket["kind"] == "incident"
    assert ticket["status"] == "open"
    assert ticket["tier"] == "L1"
    assert ticket["requester"] == "zhang.san@example.test"
    assert ticket["messages"] == 1
    assert ticket["due_at"] is not None

    # The desk acknowledged the requester and told every service desk member.
    ack = sent_to(smtp, "zhang.san@example.test")
    assert len(ack) == 1
    ack_msg = parsed(ack[0].content)
    assert "[INC-1]" in ack_msg["Subject"]
    assert ack_msg["Auto-Submitted"] == "auto-generated"
    assert "INC-1" in body_of(ack[0].content)
    assert len(sent_to(smtp, "desk1@example.test")) == 1
    assert len(sent_to(smtp, "desk2@example.test")) == 1
    notice = sent_to(smtp, "desk1@example.test")[0].content

    # The requester replies to the acknowledgement; the client mangled the subject.
    mailbox.append(
        reply(
            ack[0].content,
            "zhang.san@example.test",
            "补充：显示 0x0000007B 错误",
            subject="答复: 我的电脑蓝屏了",
        )
    )
    run_once(desk, clock)
    tickets = cli_json(desk, capsys, "tickets")
    assert len(tickets) == 1, "a reply must never open a second ticket"
    assert tickets[0]["messages"] == 2

    # The service desk engineer resolves it by replying to the notice.
    mailbox.append(
        reply(
            notice,
            "desk1@example.test",
            "已解决\n更新了磁盘控制器驱动，已恢复正常。",
            prefix="回复：",
        )
    )
    run_once(desk, clock)
    ticket = cli_json(desk, capsys, "show", "INC-1")
    assert ticket["status"] == "resolved"
    assert ticket["resolved_at"] is not None
    resolved_mail = [
        m
        for m in sent_to(smtp, "zhang.san@example.test")
        if "更新了磁盘控制器驱动" in body_of(m.content)
    ]
    assert len(resolved_mail) == 1

    # The requester confirms; the ticket closes.
    mailbox.append(reply(resolved_mail[0].content, "zhang.san@example.test", "确认"))
    run_once(desk, clock)
    ticket = cli_json(desk, capsys, "show", "INC-1")
    assert ticket["status"] == "closed"
    actions = [e["action"] for e in ticket["events"]]
    assert actions[0] == "opened"
    assert "resolved" in actions and "confirmed" in actions
    directions = [i["direction"] for i in ticket["interactions"]]
    assert directions.count("in") == 4
    assert ticket["interactions"][0]["text"].startswith("开机后蓝屏")
    # Quoted history is not part of the stored new text.
    assert all(
        "原始邮件" not in (i["text"] or "")
        for i in ticket["interactions"]
        if i["direction"] == "in"
    )

    status = cli_json(desk, capsys, "status")
    assert status["inbound"] == {"processed": 4, "ignored": 0, "quarantined": 0, "pending": 0}
    assert status["outbox"]["queued"] == 0 and status["outbox"]["dead"] == 0
    assert status["outbox"]["sent"] == len(smtp.messages)
    assert status["last_poll"] is not None


def test_reply_found_by_message_id_when_desk_only_in_cc_and_subject_lost(
    desk, mailbox, smtp, clock, capsys
):
    mailbox.append(make_mail("li.si@example.test", "Outlook cannot send mail", "Error 0x800CCC0E"))
    run_once(desk, clock)
    ack = sent_to(smtp, "li.si@example.test")[0].content
    follow_up = reply(
        ack,
        "li.si@example.test",
        "Still failing this morning.",
        subject="AW: WG: Re[2]: something else entirely",
        to="boss@example.test",
    )
    follow_up = follow_up.replace(
        b"To: boss@example.test", b"To: boss@example.test\r\nCc: " + DESK.encode(), 1
    )
    mailbox.append(follow_up)
    run_once(desk, clock)
    tickets = cli_json(desk, capsys, "tickets")
    assert [t["messages"] for t in tickets] == [2]


def test_our_own_mail_and_auto_replies_are_recorded_but_never_answered(
    desk, mailbox, smtp, clock, capsys
):
    mailbox.append(
        make_mail(
            "wang@example.test",
            "自动回复: 我正在休假",
            "我将于下周一返回。",
            headers={"Auto-Submitted": "auto-replied"},
        )
    )
    mailbox.append(make_mail(DESK, "[INC-9] loop", "from ourselves"))
    result = run_once(desk, clock)
    assert result.processed == 2
    assert smtp.messages == []
    assert cli_json(desk, capsys, "tickets") == []
    status = cli_json(desk, capsys, "status")
    assert status["inbound"]["ignored"] == 2


def test_the_same_message_twice_makes_one_ticket(desk, mailbox, smtp, clock, capsys):
    raw = make_mail("zhao@example.test", "打印机卡纸", "三楼打印机卡纸")
    mailbox.append(raw)
    mailbox.append(raw)
    run_once(desk, clock)
    assert len(cli_json(desk, capsys, "tickets")) == 1
    status = cli_json(desk, capsys, "status")
    assert status["inbound"] == {"processed": 1, "ignored": 1, "quarantined": 0, "pending": 0}
    run_once(desk, clock)
    assert cli_json(desk, capsys, "status")["inbound"]["processed"] == 1
