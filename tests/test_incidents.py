"""The incident lifecycle by mail, end to end over the real IMAP (Dovecot) and SMTP servers.

Each test is a conversation: people's mail is appended to the desk's mailbox, the daemon
makes one pass (`run_once`), and the test looks at what reached the SMTP sink and at the
contract's CLI JSON. Time is the hand-moved Clock (Tue 24 Nov 2026 10:00 Shanghai at start).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, make_msgid
from zoneinfo import ZoneInfo

import pytest
from support import DESK, REPO, body_of, make_desk, make_mail, parsed, reply, run_once

from mailflow import digest, jobs, sla_jobs
from mailflow.cli import main
from mailflow.commands import Command
from mailflow.models import Ticket
from mailflow.render import Renderer
from mailflow.similar import similar_resolved, tokens

USER = "zhang.san@example.test"
SHANGHAI_OFFSET = 8


def shanghai(day: int, hour: int, minute: int = 0) -> datetime:
    """An instant given in Shanghai wall time, November 2026."""
    return datetime(2026, 11, day, hour - SHANGHAI_OFFSET, minute, tzinfo=UTC)


def cli_json(desk, capsys, *args: str):
    capsys.readouterr()
    assert main(["--config", str(desk.settings.path), *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def show(desk, capsys, ref: str = "INC-1") -> dict:
    return cli_json(desk, capsys, "show", ref)


def sent_to(smtp, address: str) -> list[bytes]:
    return [m.content for m in smtp.messages if address in m.rcpt_tos]


def last_to(smtp, address: str) -> bytes:
    mails = sent_to(smtp, address)
    assert mails, f"nothing was sent to {address}"
    return mails[-1]


def subjects_to(smtp, address: str) -> list[str]:
    return [str(parsed(raw)["Subject"]) for raw in sent_to(smtp, address)]


def actions(ticket: dict) -> list[str]:
    return [e["action"] for e in ticket["events"]]


def report(desk, mailbox, clock, subject: str, body: str, sender: str = USER) -> None:
    mailbox.append(make_mail(sender, subject, body, name="张三"))
    run_once(desk, clock)


def answer(desk, mailbox, clock, to: bytes, sender: str, body: str, **kwargs) -> None:
    """`sender` replies to mail `to` (Outlook-style quote below), and the daemon makes a pass."""
    mailbox.append(reply(to, sender, body, **kwargs))
    run_once(desk, clock)


# -- 1. L1 resolves, the requester confirms ----------------------------------------------


def test_l1_resolves_and_requester_confirms(desk, mailbox, smtp, clock, capsys):
    report(desk, mailbox, clock, "三楼打印机卡纸", "打印机卡纸，无法打印。")
    ticket = show(desk, capsys)
    assert (ticket["status"], ticket["tier"], ticket["category"]) == ("open", "L1", "printer")
    notice = last_to(smtp, "desk1@example.test")
    assert "已解决 <解决方法>" in body_of(notice), "the notice tells engineers how to reply"
    assert sent_to(smtp, "desk2@example.test"), "every service desk member is told"
    assert not sent_to(smtp, "l2@example.test")

    clock.advance(minutes=20)
    answer(desk, mailbox, clock, notice, "desk1@example.test",
           "已解决\n取出卡住的纸张，打印恢复正常。", prefix="回复：")
    ticket = show(desk, capsys)
    assert ticket["status"] == "resolved"
    assert ticket["solution"] == "取出卡住的纸张，打印恢复正常。"
    assert ticket["resolved_at"] == "2026-11-24T02:20:00Z"
    resolved = last_to(smtp, USER)
    text = body_of(resolved)
    assert "取出卡住的纸张" in text and "确认" in text and "未解决" in text
    # 3 working days of 7.5 h from Tue 10:20 run out on Fri 10:20 (Shanghai).
    assert "2026-11-27 10:20" in text
    assert parsed(resolved)["From"].addresses[0].addr_spec == DESK

    clock.advance(hours=1)
    answer(desk, mailbox, clock, resolved, USER, "确认")
    ticket = show(desk, capsys)
    assert ticket["status"] == "closed"
    assert ticket["closed_at"] == "2026-11-24T03:20:00Z"
    assert "已关闭" in body_of(last_to(smtp, USER))
    assert actions(ticket) == [
        "opened", "resolved", "responded", "status", "confirmed", "status",
    ]
    statuses = [e["detail"] for e in ticket["events"] if e["action"] == "status"]
    assert statuses == ["open → resolved", "resolved → closed"]


def test_requester_saying_resolved_to_a_resolution_confirms_it(desk, mailbox, smtp, clock,
                                                                capsys):
    report(desk, mailbox, clock, "三楼打印机卡纸", "打印机卡纸，无法打印。")
    answer(desk, mailbox, clock, last_to(smtp, "desk2@example.test"), "desk2@example.test",
           "resolved: paper removed")
    answer(desk, mailbox, clock, last_to(smtp, USER), USER, "已解决，谢谢！")
    assert show(desk, capsys)["status"] == "closed"


# -- 2. escalation paths -----------------------------------------------------------------


def test_desktop_incident_escalates_l1_l2_l3_then_im(desk, mailbox, smtp, clock, capsys):
    report(desk, mailbox, clock, "我的电脑蓝屏了", "开机后蓝屏，无法进入系统。")
    assert show(desk, capsys)["tier"] == "L1"

    answer(desk, mailbox, clock, last_to(smtp, "desk1@example.test"), "desk1@example.test",
           "升级\n需要现场处理，请二线支持上门。")
    assert show(desk, capsys)["tier"] == "L2"
    to_l2 = last_to(smtp, "l2@example.test")
    assert "升级至 二线 桌面支持" in str(parsed(to_l2)["Subject"])
    assert "需要现场处理" in body_of(to_l2)
    assert not sent_to(smtp, "l3@example.test")

    # L1 no longer owns it: the desk may not escalate it again.
    answer(desk, mailbox, clock, last_to(smtp, "desk1@example.test"), "desk1@example.test",
           "升级")
    assert show(desk, capsys)["tier"] == "L2"
    assert "操作未执行" in str(parsed(last_to(smtp, "desk1@example.test"))["Subject"])

    answer(desk, mailbox, clock, to_l2, "l2@example.test", "escalate: motherboard\nfault")
    assert show(desk, capsys)["tier"] == "L3"
    to_l3 = last_to(smtp, "l3@example.test")
    answer(desk, mailbox, clock, to_l3, "l3@example.test", "升级")
    ticket = show(desk, capsys)
    assert ticket["tier"] == "IM"
    assert "升级至 事件经理" in str(parsed(last_to(smtp, "im@example.test"))["Subject"])

    # At the top the incident manager is told to use `problem` instead.
    answer(desk, mailbox, clock, last_to(smtp, "im@example.test"), "im@example.test", "升级")
    refused = body_of(last_to(smtp, "im@example.test"))
    assert "转问题" in refused and "最高处理层级" in refused
    ticket = show(desk, capsys)
    escalations = [e["detail"] for e in ticket["events"] if e["action"] == "escalated"]
    assert escalations == ["L1 → L2: 需要现场处理，请二线支持上门。", "L2 → L3: motherboard\nfault",
                           "L3 → IM"]
    assert actions(ticket).count("refused") == 2
    assert ticket["status"] == "open"


def test_non_desktop_incident_goes_from_l1_straight_to_l3(desk, mailbox, smtp, clock, capsys):
    report(desk, mailbox, clock, "Outlook 无法发送邮件", "点击发送后报错 0x800CCC0E")
    ticket = show(desk, capsys)
    assert (ticket["category"], ticket["tier"]) == ("email", "L1")
    answer(desk, mailbox, clock, last_to(smtp, "desk2@example.test"), "desk2@example.test",
           "escalate")
    assert show(desk, capsys)["tier"] == "L3"
    assert not sent_to(smtp, "l2@example.test"), "L2 is not on a non-desktop path"
    answer(desk, mailbox, clock, last_to(smtp, "l3@example.test"), "l3@example.test", "升级")
    ticket = show(desk, capsys)
    assert ticket["tier"] == "IM"
    assert [e["detail"] for e in ticket["events"] if e["action"] == "escalated"] == [
        "L1 → L3", "L3 → IM",
    ]


# -- 3. major incidents ------------------------------------------------------------------


def test_major_incident_goes_to_l2_and_alerts_everyone_at_once(desk, mailbox, smtp, clock,
                                                               capsys):
    report(desk, mailbox, clock, "营销系统瘫痪", "营销系统宕机，所有人都无法登录。")
    ticket = show(desk, capsys)
    assert (ticket["major"], ticket["tier"], ticket["priority"]) == (True, "L2", "P1")
    # The contract: every new incident is mailed to every service_desk member.
    for person in ("desk1@example.test", "desk2@example.test", "l2@example.test",
                   "post@example.test", "lead@example.test", "im@example.test"):
        mails = sent_to(smtp, person)
        assert len(mails) == 1, person
        assert "重大事件" in str(parsed(mails[0])["Subject"])
    assert not sent_to(smtp, "l3@example.test")
    assert "已登记" in body_of(last_to(smtp, USER))
    alert = next(e for e in ticket["events"] if e["action"] == "major_alert")
    assert "post@example.test" in alert["detail"] and "im@example.test" in alert["detail"]
    # P1 runs on the 24x7 calendar: due 4 h after it opened.
    assert ticket["due_at"] == "2026-11-24T06:00:00Z"
    # From L2 a non-desktop major incident escalates to L3.
    answer(desk, mailbox, clock, last_to(smtp, "l2@example.test"), "l2@example.test", "升级")
    assert show(desk, capsys)["tier"] == "L3"


# -- 4. commands and who may give them ---------------------------------------------------


def test_unauthorised_resolve_is_refused_with_why_and_what_is_allowed(desk, mailbox, smtp, clock,
                                                                      capsys):
    report(desk, mailbox, clock, "我的电脑蓝屏了", "开机后蓝屏，无法进入系统。")
    notice = last_to(smtp, "desk1@example.test")
    answer(desk, mailbox, clock, notice, "desk1@example.test", "升级")  # now L2's incident
    answer(desk, mailbox, clock, notice, "desk1@example.test", "已解决\n重装了系统")
    ticket = show(desk, capsys)
    assert ticket["status"] == "open" and ticket["solution"] is None
    refusal = last_to(smtp, "desk1@example.test")
    text = body_of(refusal)
    assert "未执行" in text and "已解决" in text
    assert "当前处理组" in text and "事件经理" in text, "says who may"
    assert "留言、内部:" in text, "says what the sender may do instead"
    assert "重装了系统" not in "".join(body_of(m) for m in sent_to(smtp, USER)), (
        "a refused resolution never reaches the requester"
    )
    refused = [e for e in ticket["events"] if e["action"] == "refused"]
    assert refused[0]["actor"] == "desk1@example.test"


def test_requester_command_refused_but_the_text_reaches_the_team(desk, mailbox, smtp, clock,
                                                                 capsys):
    report(desk, mailbox, clock, "我的电脑蓝屏了", "开机后蓝屏，无法进入系统。")
    answer(desk, mailbox, clock, last_to(smtp, USER), USER, "升级\n领导明天要用，请尽快！")
    assert show(desk, capsys)["tier"] == "L1"
    refusal = body_of(last_to(smtp, USER))
    assert "留言" in refusal and "已作为留言转给处理人员" in refusal
    assert "领导明天要用" in body_of(last_to(smtp, "desk1@example.test"))
    # A command that does not apply in this status.
    answer(desk, mailbox, clock, last_to(smtp, USER), USER, "确认")
    assert "当前状态为 处理中" in body_of(last_to(smtp, USER))
    assert show(desk, capsys)["status"] == "open"


def test_comments_go_to_the_requester_from_the_desk_and_notes_stay_internal(desk, mailbox, smtp,
                                                                           clock, capsys):
    report(desk, mailbox, clock, "我的电脑蓝屏了", "开机后蓝屏，无法进入系统。")
    notice = last_to(smtp, "desk1@example.test")
    before = len(sent_to(smtp, USER))

    answer(desk, mailbox, clock, notice, "desk1@example.test", "请先重启电脑，看是否仍然蓝屏。")
    comment = last_to(smtp, USER)
    assert "请先重启电脑" in body_of(comment)
    assert parsed(comment)["From"].addresses[0].addr_spec == DESK
    assert "desk1@example.test" not in body_of(comment)
    assert len(sent_to(smtp, USER)) == before + 1

    answer(desk, mailbox, clock, notice, "desk1@example.test", "内部：怀疑是磁盘控制器驱动问题")
    own = sent_to(smtp, "desk2@example.test")[0]  # each replies to the notice they got
    answer(desk, mailbox, clock, own, "desk2@example.test", "note: same model as INC-0")
    assert len(sent_to(smtp, USER)) == before + 1, "internal notes never reach the requester"
    assert "磁盘控制器驱动" in body_of(last_to(smtp, "desk2@example.test"))
    assert "内部备注" in str(parsed(last_to(smtp, "desk2@example.test"))["Subject"])

    # The requester's answer goes to the team; a user's "Note:" is just a comment.
    answer(desk, mailbox, clock, comment, USER, "Note: it only happens after 9 am")
    assert "after 9 am" in body_of(last_to(smtp, "desk1@example.test"))
    ticket = show(desk, capsys)
    assert actions(ticket).count("note") == 2
    assert actions(ticket).count("comment") == 2
    assert "refused" not in actions(ticket)
    assert ticket["events"][actions(ticket).index("responded")]["actor"] == "desk1@example.test"


def test_assign_and_priority_by_the_desk(desk, mailbox, smtp, clock, capsys):
    report(desk, mailbox, clock, "我的电脑蓝屏了", "开机后蓝屏，无法进入系统。")
    notice = last_to(smtp, "desk1@example.test")
    assert show(desk, capsys)["due_at"] == "2026-11-26T03:00:00Z"  # P3: Thu 11:00 Shanghai

    answer(desk, mailbox, clock, notice, "desk1@example.test", "指派 l2@example.test")
    ticket = show(desk, capsys)
    assert (ticket["assignee"], ticket["tier"]) == ("l2@example.test", "L2")
    assert "指派给您" in str(parsed(last_to(smtp, "l2@example.test"))["Subject"])

    answer(desk, mailbox, clock, notice, "desk1@example.test", "优先级 P1")
    ticket = show(desk, capsys)
    assert ticket["priority"] == "P1"
    assert ticket["due_at"] == "2026-11-24T06:00:00Z"  # P1: 4 h around the clock

    answer(desk, mailbox, clock, sent_to(smtp, USER)[0], USER, "priority P1")
    answer(desk, mailbox, clock, notice, "desk1@example.test", "指派")
    assert "缺少参数" in body_of(last_to(smtp, "desk1@example.test"))
    ticket = show(desk, capsys)
    assert [e["detail"] for e in ticket["events"] if e["action"] == "priority"] == ["P3 → P1"]
    assert actions(ticket).count("refused") == 2


# -- quoted history never carries a command ---------------------------------------------


def _outlook_cn(new: str, quoted: str) -> str:
    return (f"{new}\n\n________________________________\n"
            "发件人: 李工 <l2@example.test>\n发送时间: 2026年11月24日 10:05\n"
            "收件人: IT服务台 <itsm@example.test>\n主题: 回复: [INC-1] 我的电脑蓝屏了\n\n"
            f"{quoted}\n")


def _gmail(new: str, quoted: str) -> str:
    lines = "\n".join("> " + line for line in quoted.splitlines())
    return (f"{new}\n\n在 2026年11月24日周二 10:05，李工 <l2@example.test>\n写道：\n\n"
            f"{lines}\n")


def _qq_html(new: str, quoted: str) -> str:
    quoted_html = "".join(f"<div>{line}</div>" for line in quoted.splitlines())
    return (f"<div>{new}</div><div><br></div>"
            '<div style="font-size: 12px;font-family: Arial Narrow;padding:2px 0 2px 0;">'
            "------------------&nbsp;原始邮件&nbsp;------------------</div>"
            '<div style="font-size: 12px;background:#efefef;padding:8px;">'
            "<div><b>发件人:</b>&nbsp;\"李工\"&lt;l2@example.test&gt;;</div>"
            "<div><b>发送时间:</b>&nbsp;2026年11月24日(星期二) 上午10:05</div>"
            "<div><b>主题:</b>&nbsp;[INC-1] 我的电脑蓝屏了</div></div>"
            f"<div><br></div>{quoted_html}")


def _client_reply(style: str, to: bytes, sender: str, new: str, quoted: str) -> bytes:
    original = parsed(to)
    subject = "回复：" + str(original["Subject"])
    if style != "qq":
        body = (_outlook_cn if style == "outlook" else _gmail)(new, quoted)
        return make_mail(sender, subject, body, in_reply_to=original["Message-ID"],
                         references=[original["Message-ID"]])
    msg = EmailMessage(policy=SMTP)  # QQ Mail: HTML only, GB18030
    msg["From"] = sender
    msg["To"] = DESK
    msg["Subject"] = subject
    msg["Date"] = format_datetime(datetime.now(UTC))
    msg["Message-ID"] = make_msgid("qq", "qq.com")
    msg["In-Reply-To"] = original["Message-ID"]
    msg["References"] = original["Message-ID"]
    msg["X-Mailer"] = "QQMail 2.x"
    msg.set_content(_qq_html(new, quoted).encode("gb18030"), "text", "html",
                    cte="base64", params={"charset": "gb18030"})
    return msg.as_bytes()


@pytest.mark.parametrize("style", ["outlook", "qq", "gmail"])
def test_a_command_in_quoted_text_is_never_applied(style, desk, mailbox, smtp, clock, capsys):
    report(desk, mailbox, clock, "我的电脑蓝屏了", "开机后蓝屏，无法进入系统。")
    notice = last_to(smtp, "desk1@example.test")
    # The engineer answers above a quoted mail whose first line is a command.
    mailbox.append(_client_reply(style, notice, "desk1@example.test", "正在处理，请稍候。",
                                 "已解决\n重启后恢复正常。"))
    run_once(desk, clock)
    ticket = show(desk, capsys)
    assert ticket["status"] == "open"
    assert "resolved" not in actions(ticket)
    forwarded = body_of(last_to(smtp, USER))
    assert "正在处理，请稍候。" in forwarded
    assert "重启后恢复正常" not in forwarded, "quoted history is not forwarded"

    # Quoted text alone (nothing new above it) is no command either.
    mailbox.append(_client_reply(style, notice, "desk1@example.test", "", "已解决\n重装驱动。"))
    run_once(desk, clock)
    assert show(desk, capsys)["status"] == "open"

    # The same client with the command in the new text does apply it.
    new_text = "已解决<br>更换了内存条。" if style == "qq" else "已解决\n更换了内存条。"
    mailbox.append(_client_reply(style, notice, "desk1@example.test", new_text, "请回复命令"))
    run_once(desk, clock)
    ticket = show(desk, capsys)
    assert ticket["status"] == "resolved"
    assert ticket["solution"] == "更换了内存条。"


# -- 4. reopen, auto-close, replies to closed incidents ----------------------------------


def test_reopen_goes_back_to_the_tier_that_resolved_it_and_moves_the_deadline(
    desk, mailbox, smtp, clock, capsys
):
    report(desk, mailbox, clock, "我的电脑蓝屏了", "开机后蓝屏，无法进入系统。")
    answer(desk, mailbox, clock, last_to(smtp, "desk1@example.test"), "desk1@example.test",
           "升级")
    to_l2 = last_to(smtp, "l2@example.test")
    clock.now = shanghai(24, 10, 30)
    answer(desk, mailbox, clock, to_l2, "l2@example.test", "已解决\n更换了硬盘数据线。")
    ticket = show(desk, capsys)
    assert ticket["due_at"] == "2026-11-26T03:00:00Z"  # Thu 11:00 Shanghai (P3, 16 h)
    resolved = last_to(smtp, USER)

    # The requester's "未解决" sends it back to L2, which resolved it (not to the desk).
    clock.now = shanghai(24, 11, 0)
    answer(desk, mailbox, clock, resolved, USER, "未解决\n今天早上又蓝屏了。")
    ticket = show(desk, capsys)
    assert (ticket["status"], ticket["tier"]) == ("open", "L2")
    assert ticket["resolved_at"] is None and ticket["solution"] is None
    reopened = last_to(smtp, "l2@example.test")
    assert "重开" in str(parsed(reopened)["Subject"]) and "又蓝屏了" in body_of(reopened)
    # The 30 working minutes it waited as resolved do not count: due 30 min later.
    assert ticket["due_at"] == "2026-11-26T03:30:00Z"

    # The desk may reopen too; the engineer who was not the resolver may not.
    answer(desk, mailbox, clock, reopened, "l2@example.test", "resolved\nreplaced the disk")
    answer(desk, mailbox, clock, reopened, "l3@example.test", "reopen")
    assert show(desk, capsys)["status"] == "resolved"
    answer(desk, mailbox, clock, sent_to(smtp, "desk1@example.test")[0], "desk1@example.test",
           "重开\n用户电话反馈仍有问题")
    ticket = show(desk, capsys)
    assert (ticket["status"], ticket["tier"]) == ("open", "L2")
    assert actions(ticket).count("reopened") == 2


def test_unconfirmed_resolution_closes_after_three_working_days_once(
    desk, mailbox, smtp, clock, capsys, tmp_path
):
    assert desk.settings.incident.confirm_timeout.total_seconds() == 3 * 7.5 * 3600
    names = {job.name for job in jobs.load_all()}
    assert {"sla-scan", "incident-auto-close"} <= names
    report(desk, mailbox, clock, "三楼打印机卡纸", "打印机卡纸，无法打印。")
    clock.now = shanghai(24, 10, 0)
    answer(desk, mailbox, clock, last_to(smtp, "desk1@example.test"), "desk1@example.test",
           "已解决\n清理了进纸器。")
    sent = len(sent_to(smtp, USER))

    # Tue 10:00 + 22.5 working hours = Fri 10:00 (Shanghai); the night and lunch do not count.
    clock.now = shanghai(27, 9, 59)
    assert sla_jobs.auto_close(desk, clock()).closed == []
    clock.now = shanghai(27, 10, 0)
    assert sla_jobs.auto_close(desk, clock()).closed == ["INC-1"]
    run_once(desk, clock)
    ticket = show(desk, capsys)
    assert ticket["status"] == "closed"
    assert ticket["closed_at"] == "2026-11-27T02:00:00Z"
    notice = last_to(smtp, USER)
    assert "自动关闭" in body_of(notice) or "未收到确认" in body_of(notice)
    assert len(sent_to(smtp, USER)) == sent + 1

    # Again, and after a restart (a new desk on the same database): nothing more.
    clock.advance(minutes=5)
    assert sla_jobs.auto_close(desk, clock()).closed == []
    again = make_desk(tmp_path, mailbox=mailbox, smtp=smtp)
    try:
        assert sla_jobs.auto_close(again, clock()).closed == []
        run_once(again, clock)
    finally:
        again.close()
    assert len(sent_to(smtp, USER)) == sent + 1
    assert actions(show(desk, capsys)).count("auto_closed") == 1


def test_reply_to_a_closed_incident_reopens_within_grace_and_later_opens_a_linked_one(
    desk, mailbox, smtp, clock, capsys
):
    report(desk, mailbox, clock, "三楼打印机卡纸", "打印机卡纸，无法打印。")
    answer(desk, mailbox, clock, last_to(smtp, "desk1@example.test"), "desk1@example.test",
           "已解决\n清理了进纸器。")
    answer(desk, mailbox, clock, last_to(smtp, USER), USER, "确认")
    closed = last_to(smtp, USER)
    assert show(desk, capsys)["status"] == "closed"

    # A thank-you does not reopen it.
    clock.advance(hours=1)
    answer(desk, mailbox, clock, closed, USER, "好的，谢谢！")
    assert show(desk, capsys)["status"] == "closed"

    # Within the grace period (7 days) a reply reopens it, back to the tier that resolved it.
    clock.advance(days=2)
    answer(desk, mailbox, clock, closed, USER, "又卡纸了，还是同一台。")
    ticket = show(desk, capsys)
    assert (ticket["status"], ticket["tier"]) == ("open", "L1")
    assert "又卡纸了" in body_of(last_to(smtp, "desk1@example.test"))

    answer(desk, mailbox, clock, last_to(smtp, "desk1@example.test"), "desk1@example.test",
           "已解决\n更换了搓纸轮。")
    answer(desk, mailbox, clock, last_to(smtp, USER), USER, "确认")
    closed = last_to(smtp, USER)

    # After the grace period the same reply opens a new incident linked to the old one.
    clock.advance(days=8)
    answer(desk, mailbox, clock, closed, USER, "打印机又卡纸了。")
    tickets = cli_json(desk, capsys, "tickets")
    assert [t["ref"] for t in tickets] == ["INC-1", "INC-2"]
    assert show(desk, capsys, "INC-1")["status"] == "closed"
    # An engineer's late reply to the old incident adds to its record, opening nothing.
    before = show(desk, capsys, "INC-1")["messages"]
    answer(desk, mailbox, clock, closed, "desk1@example.test", "补充：已更换整个进纸模块。")
    assert len(cli_json(desk, capsys, "tickets")) == 2
    assert show(desk, capsys, "INC-1")["messages"] == before + 1
    new = show(desk, capsys, "INC-2")
    assert new["status"] == "open"
    linked = next(e for e in new["events"] if e["action"] == "linked")
    assert "INC-1" in linked["detail"]
    with desk.db.sessions() as session:
        old_id = session.query(Ticket.id).filter(Ticket.number == 1).scalar()
        assert session.query(Ticket.parent_id).filter(Ticket.number == 2).scalar() == old_id


# -- replies as people write them ---------------------------------------------------------

SIGNATURE = "\n\n张三\n信息中心 网络运维班\n电话：0769-12345678"


def closed_incident(desk, mailbox, smtp, clock, capsys) -> bytes:
    """INC-1 resolved by desk1 and confirmed; returns the 'closed' notice the user got."""
    report(desk, mailbox, clock, "三楼打印机卡纸", "打印机卡纸，无法打印。")
    answer(desk, mailbox, clock, last_to(smtp, "desk1@example.test"), "desk1@example.test",
           "已解决\n清理了进纸器。")
    answer(desk, mailbox, clock, last_to(smtp, USER), USER, "确认")
    assert show(desk, capsys)["status"] == "closed"
    return last_to(smtp, USER)


def test_thanks_with_a_signature_or_after_the_grace_period_opens_nothing(
    desk, mailbox, smtp, clock, capsys
):
    closed = closed_incident(desk, mailbox, smtp, clock, capsys)
    answer(desk, mailbox, clock, closed, USER, "好的，谢谢！" + SIGNATURE)
    assert show(desk, capsys)["status"] == "closed"
    assert "reopened" not in actions(show(desk, capsys))
    clock.advance(days=8)  # past [incident] reopen_grace: thanks and a late confirmation
    answer(desk, mailbox, clock, closed, USER, "好的，谢谢！")
    answer(desk, mailbox, clock, closed, USER, "确认" + SIGNATURE)
    assert [t["ref"] for t in cli_json(desk, capsys, "tickets")] == ["INC-1"]
    assert show(desk, capsys)["messages"] == 6  # all kept on the old incident's record
    # A report that it is broken again still opens a new incident.
    answer(desk, mailbox, clock, closed, USER, "打印机又卡纸了。" + SIGNATURE)
    assert [t["ref"] for t in cli_json(desk, capsys, "tickets")] == ["INC-1", "INC-2"]


def test_the_requesters_answer_to_a_question_resumes_the_incident(
    desk, mailbox, smtp, clock, capsys
):
    report(desk, mailbox, clock, "电脑很卡", "打开文件很慢。")
    answer(desk, mailbox, clock, last_to(smtp, "desk1@example.test"), "desk1@example.test",
           "待用户\n请问是否同意我们远程协助？")
    assert show(desk, capsys)["status"] == "pending"
    # "同意" and "确认" start many an answer: they are no commands of the requester's here.
    answer(desk, mailbox, clock, last_to(smtp, USER), USER, "同意，下午两点以后都可以。")
    ticket = show(desk, capsys)
    assert ticket["status"] == "open" and "refused" not in actions(ticket)
    assert "下午两点以后" in body_of(last_to(smtp, "desk1@example.test"))
    assert not [s for s in subjects_to(smtp, USER) if "未执行" in s]


def test_still_broken_after_a_resolution_reopens_it_and_it_is_not_auto_closed(
    desk, mailbox, smtp, clock, capsys
):
    report(desk, mailbox, clock, "三楼打印机卡纸", "打印机卡纸，无法打印。")
    answer(desk, mailbox, clock, last_to(smtp, "desk1@example.test"), "desk1@example.test",
           "已解决\n清理了进纸器。")
    answer(desk, mailbox, clock, last_to(smtp, USER), USER,
           "还是不行，打印机还是卡纸，请再看一下。" + SIGNATURE)
    ticket = show(desk, capsys)
    assert (ticket["status"], ticket["tier"]) == ("open", "L1")
    reopened = next(e for e in ticket["events"] if e["action"] == "reopened")
    assert reopened["detail"] == "还是不行，打印机还是卡纸，请再看一下。"
    clock.advance(days=7)
    assert sla_jobs.auto_close(desk, clock()).closed == []
    assert show(desk, capsys)["status"] == "open"


def test_a_forwarded_report_keeps_what_it_forwards(desk, mailbox, smtp, clock, capsys):
    body = ("请处理，谢谢\n\n-----原始邮件-----\n发件人: monitor@vendor.test\n"
            "发送时间: 2026年11月24日 09:00\n主题: 告警\n\n营销系统全部用户无法登录，业务中断。\n")
    report(desk, mailbox, clock, "FW: 营销系统告警", body)
    assert show(desk, capsys)["major"]
    with desk.db.sessions() as session:
        assert "全部用户无法登录" in session.query(Ticket.description).scalar()
    assert "全部用户无法登录" in body_of(last_to(smtp, "l2@example.test"))


def test_every_mail_about_an_incident_answers_the_mail_that_opened_it(
    desk, mailbox, smtp, clock, capsys
):
    """So the requester's and the engineers' mail clients show one thread per ticket."""
    report(desk, mailbox, clock, "三楼打印机卡纸", "打印机卡纸，无法打印。")
    [opener] = [m.content for m in smtp.messages if USER in m.rcpt_tos]
    opened = str(parsed(opener)["In-Reply-To"])
    answer(desk, mailbox, clock, last_to(smtp, "desk1@example.test"), "desk1@example.test",
           "待用户\n是哪一台打印机？")
    answer(desk, mailbox, clock, last_to(smtp, USER), USER, "三楼东侧那台")
    answer(desk, mailbox, clock, last_to(smtp, "desk1@example.test"), "desk1@example.test",
           "已解决\n清理了进纸器。")
    answer(desk, mailbox, clock, last_to(smtp, USER), USER, "确认")
    mails = [parsed(m.content) for m in smtp.messages]
    assert len(mails) >= 7  # ack, notices, question, comment, resolved, closed
    assert {str(m["In-Reply-To"]) for m in mails} == {opened}
    assert all(opened in str(m["References"]) for m in mails)


def test_a_reply_to_the_digest_naming_a_ticket_acts_on_it(desk, mailbox, smtp, clock, capsys):
    report(desk, mailbox, clock, "三楼打印机卡纸", "打印机卡纸，无法打印。")
    clock.advance(days=1)
    digest.run_digests(desk, clock())
    run_once(desk, clock)
    todo = last_to(smtp, "desk1@example.test")
    assert "INC-1" in body_of(todo) and "[INC-1]" not in str(parsed(todo)["Subject"])
    answer(desk, mailbox, clock, todo, "desk1@example.test", "已解决\n清理了进纸器。",
           subject="Re: [INC-1] 三楼打印机卡纸")
    # The digest names many tickets and carries no ticket's reply token: the engineer is
    # asked to answer the mail that does, and that answer acts.
    assert show(desk, capsys)["status"] == "open"
    notice = last_to(smtp, "desk1@example.test")
    assert "INC-1" in str(parsed(notice)["Subject"]) and "回复本邮件" in body_of(notice)
    answer(desk, mailbox, clock, notice, "desk1@example.test", "已解决\n清理了进纸器。")
    assert show(desk, capsys)["status"] == "resolved"
    # Without a ticket in the subject a reply to the digest still belongs to no ticket.
    answer(desk, mailbox, clock, todo, "desk1@example.test", "收到")
    assert [t["ref"] for t in cli_json(desk, capsys, "tickets")] == ["INC-1"]


# -- 5. problem management ---------------------------------------------------------------


def test_incident_manager_hands_over_to_problem_management_with_full_history(
    desk, mailbox, smtp, clock, capsys
):
    report(desk, mailbox, clock, "Outlook 无法发送邮件", "点击发送后报错 0x800CCC0E")
    answer(desk, mailbox, clock, last_to(smtp, "desk1@example.test"), "desk1@example.test",
           "内部：重建了配置文件，无效")
    answer(desk, mailbox, clock, last_to(smtp, "desk1@example.test"), "desk1@example.test",
           "升级")
    to_l3 = last_to(smtp, "l3@example.test")
    answer(desk, mailbox, clock, to_l3, "l3@example.test", "problem\nneeds root cause")
    assert "只有 事件经理" in body_of(last_to(smtp, "l3@example.test"))
    answer(desk, mailbox, clock, to_l3, "l3@example.test", "升级\n邮件网关偶发拒收，需要厂家分析")

    answer(desk, mailbox, clock, last_to(smtp, "im@example.test"), "im@example.test",
           "转问题\n同类故障本月第三次，需根因分析。")
    ticket = show(desk, capsys)
    assert ticket["status"] == "problem"
    handed = sent_to(smtp, "pm@example.test")
    assert len(handed) == 1
    text = body_of(handed[0])
    assert "转问题管理" in str(parsed(handed[0])["Subject"])
    for piece in ("点击发送后报错", "重建了配置文件", "L1 → L3", "邮件网关偶发拒收",
                  "需根因分析", "refused", "im@example.test"):
        assert piece in text, piece
    # Nothing more can be resolved or escalated in incident management.
    answer(desk, mailbox, clock, handed[0], "l3@example.test", "已解决")
    assert show(desk, capsys)["status"] == "problem"


# -- 7. know-how reuse -------------------------------------------------------------------


def test_the_l1_notice_lists_similar_resolved_incidents_with_their_solutions(
    desk, mailbox, smtp, clock, capsys
):
    history = [
        ("三楼打印机卡纸", "打印机卡纸，无法打印。", "打开后盖取出卡纸，清理搓纸轮。"),
        ("Outlook 无法发送邮件", "点击发送后报错 0x800CCC0E", "重建 Outlook 配置文件。"),
        ("二楼打印机卡纸严重", "打印机频繁卡纸", "更换了搓纸轮。"),
        ("电脑蓝屏", "开机蓝屏 0x7B", "更新磁盘控制器驱动。"),
    ]
    for subject, body, solution in history:
        report(desk, mailbox, clock, subject, body, sender="li.si@example.test")
        answer(desk, mailbox, clock, last_to(smtp, "desk1@example.test"), "desk1@example.test",
               f"已解决\n{solution}")
        clock.advance(minutes=10)

    report(desk, mailbox, clock, "五楼打印机卡纸", "打印机卡纸了，打印不出来。")
    notice = body_of(last_to(smtp, "desk1@example.test"))
    assert "相似的已解决事件" in notice
    listed = notice.split("相似的已解决事件")[1]
    assert "INC-1" in listed and "取出卡纸" in listed
    assert "INC-3" in listed and "更换了搓纸轮" in listed
    assert "INC-2" not in listed and "INC-4" not in listed
    similar = next(e for e in show(desk, capsys, "INC-5")["events"] if e["action"] == "similar")
    assert similar["detail"].split(", ")[0] == "INC-1"  # the closest first


def test_similar_resolved_ranks_by_bigrams_same_category_first_and_at_most_the_limit(
    desk, monkeypatch
):
    def incident(number, subject, category, solution="done", status="closed", minutes=0):
        now = shanghai(20, 9, minutes)
        return Ticket(kind="incident", number=number, status=status, priority="P3",
                      category=category, tier="L1", rule="r", requester="u@example.test",
                      subject=subject, description=subject, solution=solution,
                      created_at=now, updated_at=now, resolved_at=now)

    with desk.db.transaction() as session:
        session.add_all([
            incident(1, "VPN 连接失败 错误 800", "network", minutes=1),
            incident(2, "VPN 连接失败", "network", minutes=2),
            incident(3, "VPN 连接失败 错误 800", "security", minutes=3),
            incident(4, "VPN 客户端 连接 失败 800", "network", minutes=4),
            incident(5, "VPN 连接失败 错误 800", "network", solution=None, minutes=5),
            incident(6, "VPN 连接失败 错误 800", "network", status="open", minutes=6),
            incident(7, "打印机卡纸", "network", minutes=7),
        ])
        new = incident(8, "VPN 连接失败，错误 800", "network", status="open", solution=None)
        session.add(new)
        session.flush()
        # Exact text first; another category's exact match counts a little less than its
        # own; no solution, still open or unrelated never; at most the limit.
        assert [t.number for t in similar_resolved(session, new, limit=3)] == [1, 3, 2]
        assert [t.number for t in similar_resolved(session, new, limit=9)] == [1, 3, 2, 4]
        assert similar_resolved(session, new, limit=0) == []
        # With few candidates read, the same category's recent ones are read first.
        monkeypatch.setattr("mailflow.similar.CANDIDATES", 3)
        assert [t.number for t in similar_resolved(session, new, limit=3)] == [2, 4]
    assert tokens("打印机卡纸 Outlook 0x7B") == ("打印", "印机", "机卡", "卡纸", "outlook", "0x7b")


# -- templates ---------------------------------------------------------------------------

INCIDENT_TEMPLATES = [
    "ack", "new_incident", "major_incident", "comment", "comment_to_team", "refused",
    "resolved", "escalated", "assigned", "question", "closed", "reopened", "problem",
    "sla_warning", "sla_breached",
]


@pytest.mark.parametrize("language", ["zh-CN", "en"])
def test_every_incident_template_renders_in_both_languages(language, tmp_path):
    renderer = Renderer(REPO / "templates", language, ZoneInfo("Asia/Shanghai"))
    assert (REPO / "templates" / language / "_macros.txt").is_file()
    ticket = Ticket(kind="incident", number=7, status="open", priority="P3", category="desktop",
                    tier="L2", major=True, rule="r", requester=USER, requester_name="张三",
                    subject="我的电脑蓝屏了", description="开机后蓝屏", solution="换了内存",
                    created_at=shanghai(24, 10), updated_at=shanghai(24, 10),
                    due_at=shanghai(26, 11))
    context = dict(ticket=ticket, desk=make_desk(tmp_path).settings.desk, author="l2@example.test",
                   text="说明", similar=[ticket], command=Command("resolve"), reason="why",
                   allowed=["comment"], forwarded=True, internal=True, old_tier="L1",
                   new_tier="L3", automatic=True, used="75%", events=[],
                   confirm_by=shanghai(27, 10))
    for name in INCIDENT_TEMPLATES:
        assert (REPO / "templates" / language / f"{name}.txt").is_file(), name
        rendered = renderer.render(name, **context)
        assert rendered.subject and rendered.text.strip(), name
        assert "None" not in rendered.text, name
        if language == "en":
            assert not any("\u4e00" <= c <= "\u9fff" for c in rendered.subject.replace(
                ticket.subject, "")), name
    # A requester who gave no display name is their address, not " <address>".
    ticket.requester_name = None
    text = renderer.render("ack", **context).text
    assert f": {USER}\n" in text.replace("：", ": ") and f" <{USER}>" not in text


def test_an_english_desk_speaks_english(tmp_path, mailbox, smtp, clock, capsys):
    desk = make_desk(tmp_path, mailbox=mailbox, smtp=smtp, desk={"language": "en"})
    try:
        report(desk, mailbox, clock, "Printer paper jam", "The printer on floor 3 jams.")
        notice = last_to(smtp, "desk1@example.test")
        assert "New incident" in str(parsed(notice)["Subject"])
        assert "resolve <solution>" in body_of(notice)
        answer(desk, mailbox, clock, notice, "desk1@example.test", "resolve\nCleared the jam.")
        text = body_of(last_to(smtp, USER))
        assert "has been resolved" in text and "Cleared the jam." in text
    finally:
        desk.close()
