"""Service requests by mail over the real IMAP (Dovecot) and SMTP (aiosmtpd) servers:
form → approval (one step or a chain) → execution → confirmation."""

from __future__ import annotations

import json
from email.message import EmailMessage
from email.policy import SMTP

import pytest
from support import body_of, make_desk, make_mail, parsed, reply, run_once

from mailflow import requests
from mailflow.cli import main

REQUESTER = "zhang.san@example.test"
APPROVER = "approver@example.test"
EXECUTOR = "exec@example.test"
LAPTOP = (
    "项类型：笔记本电脑\n申请原因：出差使用\n收货地点：三号仓库\n收货人位置：B座3楼\n关联事件：INC-12"
)


def cli_json(desk, capsys, *args: str):
    capsys.readouterr()
    assert main(["--config", str(desk.settings.path), *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def sent_to(smtp, address: str) -> list:
    return [m for m in smtp.messages if address in m.rcpt_tos]


def mails_to(smtp, address: str, words: str) -> list[bytes]:
    """Raw mails to an address whose subject contains `words`."""
    return [m.content for m in sent_to(smtp, address) if words in parsed(m.content)["Subject"]]


def answer(original: bytes, sender: str, body: str, **kwargs) -> bytes:
    """A reply as a mail client writes it: to the mail's Reply-To, quoting it below."""
    msg = parsed(original)
    return reply(original, sender, body, to=str(msg.get("Reply-To") or msg["From"]), **kwargs)


def show(desk, capsys, ref: str = "REQ-1") -> dict:
    return cli_json(desk, capsys, "show", ref)


@pytest.fixture
def chain_desk(tmp_path, mailbox, smtp):
    """Hardware requests need the department head, then one of two IT managers."""
    made = make_desk(
        tmp_path, mailbox=mailbox, smtp=smtp,
        roles={
            "approvers": {"default": [APPROVER], "dept_head": ["head@example.test"],
                          "it": ["itmgr1@example.test", "itmgr2@example.test"]},
            "executors": {"default": [EXECUTOR], "hardware": ["store@example.test"]},
        },
        requests={"approval_chain": {"hardware": ["dept_head", "it"]}},
    )
    yield made
    made.close()


@pytest.fixture
def strict_desk(tmp_path, mailbox, smtp):
    """Hardware requests need the full goods form before approval."""
    made = make_desk(
        tmp_path, mailbox=mailbox, smtp=smtp,
        requests={"required_fields": {
            "default": ["request_type", "reason"],
            "hardware": ["request_type", "item_type", "reason", "receiving_location",
                         "consignee_location"],
        }},
    )
    yield made
    made.close()


def test_form_approve_execute_confirm_close(desk, mailbox, smtp, clock, capsys):
    mailbox.append(make_mail(REQUESTER, "申请一台笔记本电脑", LAPTOP, name="张三"))
    run_once(desk, clock)
    ticket = show(desk, capsys)
    assert (ticket["kind"], ticket["status"]) == ("request", "pending_approval")
    assert ticket["request_type"] == "hardware"  # from the rule: the form names no type
    form = ticket["form"]
    assert form["item_type"] == "笔记本电脑" and form["reason"] == "出差使用"
    assert form["receiving_location"] == "三号仓库" and form["consignee_location"] == "B座3楼"
    assert form["links"] == ["INC-12"]
    assert any(e["action"] == "linked" and "INC-12" in e["detail"] for e in ticket["events"])

    # The requester is told it went for approval; the approver gets a personal approval mail.
    assert len(mails_to(smtp, REQUESTER, "提交审批")) == 1
    [approval] = [m.content for m in sent_to(smtp, APPROVER)]
    msg = parsed(approval)
    token_address = msg["Reply-To"]
    assert token_address.startswith("itsm+") and token_address.endswith("@example.test")
    token = token_address[len("itsm+"):].split("@")[0]
    assert token in msg["Message-ID"]
    assert "笔记本电脑" in body_of(approval) and "驳回" in body_of(approval)
    assert sent_to(smtp, EXECUTOR) == []

    # The approver approves by replying; the executor is mailed, the requester told.
    clock.advance(hours=1)
    mailbox.append(answer(approval, APPROVER, "同意"))
    run_once(desk, clock)
    ticket = show(desk, capsys)
    assert ticket["status"] == "approved"
    assert [e["actor"] for e in ticket["events"] if e["action"] == "approved"] == [APPROVER]
    [work] = [m.content for m in sent_to(smtp, EXECUTOR)]
    assert "笔记本电脑" in body_of(work) and "完成" in body_of(work)
    assert len(mails_to(smtp, REQUESTER, "已批准")) == 1
    assert len(mails_to(smtp, APPROVER, "审批已记录")) == 1

    # Only the executor may mark it done.
    clock.advance(hours=1)
    mailbox.append(reply(work, REQUESTER, "完成"))
    run_once(desk, clock)
    assert show(desk, capsys)["status"] == "approved"

    clock.advance(hours=1)
    mailbox.append(reply(work, EXECUTOR, "完成\n已从三号仓库发放 ThinkPad X1"))
    run_once(desk, clock)
    ticket = show(desk, capsys)
    assert ticket["status"] == "fulfilled"
    assert ticket["resolved_at"] is not None
    [done_mail] = mails_to(smtp, REQUESTER, "请确认")
    assert "ThinkPad X1" in body_of(done_mail)

    clock.advance(hours=1)
    mailbox.append(reply(done_mail, REQUESTER, "确认，谢谢"))
    run_once(desk, clock)
    ticket = show(desk, capsys)
    assert ticket["status"] == "closed" and ticket["closed_at"] is not None
    assert len(mails_to(smtp, REQUESTER, "已关闭")) == 1

    actions = [e["action"] for e in ticket["events"]]
    for earlier, later in [("opened", "approval_requested"), ("approval_requested", "approved"),
                           ("approved", "dispatched"), ("dispatched", "fulfilled"),
                           ("fulfilled", "confirmed")]:
        assert actions.index(earlier) < actions.index(later)
    # Every mail in and out is an interaction, in order.
    interactions = ticket["interactions"]
    assert [i["at"] for i in interactions] == sorted(i["at"] for i in interactions)
    inbound = [(i["from"], i["text"].splitlines()[0]) for i in interactions
               if i["direction"] == "in"]
    assert inbound == [(REQUESTER, "项类型：笔记本电脑"), (APPROVER, "同意"), (REQUESTER, "完成"),
                       (EXECUTOR, "完成"), (REQUESTER, "确认，谢谢")]
    outbound = [i["to"] for i in interactions if i["direction"] == "out"]
    assert outbound.count(APPROVER) == 2 and outbound.count(EXECUTOR) == 1
    assert len(outbound) == len(smtp.messages)
    assert ticket["messages"] == 5

    # The text view shows the form and its links too.
    capsys.readouterr()
    assert main(["--config", str(desk.settings.path), "show", "REQ-1"]) == 0
    text = capsys.readouterr().out
    assert "form.receiving_location: 三号仓库" in text and "form.links: INC-12" in text


def test_missing_fields_are_asked_for_once_then_supplied(strict_desk, mailbox, smtp, clock,
                                                        capsys):
    desk = strict_desk
    mailbox.append(make_mail(REQUESTER, "申请一台笔记本电脑",
                             "您好，因出差需要申请一台笔记本电脑。\n项类型：笔记本电脑"))
    run_once(desk, clock)
    ticket = show(desk, capsys)
    assert ticket["status"] == "pending"
    assert ticket["form"]["reason"].startswith("您好，因出差需要")  # the mail's own words
    [ask] = [m.content for m in sent_to(smtp, REQUESTER)]
    assert len(smtp.messages) == 1, "one reply, nothing to approvers yet"
    text = body_of(ask)
    assert "收货地点" in text and "收货人位置" in text and "项类型：\n" not in text

    # A partial answer: asked again for what is still missing, only that.
    clock.advance(hours=1)
    mailbox.append(answer(ask, REQUESTER, "收货地点：三号仓库"))
    run_once(desk, clock)
    assert show(desk, capsys)["status"] == "pending"
    [again] = [m.content for m in sent_to(smtp, REQUESTER)][1:]
    assert "收货人位置" in body_of(again) and "收货地点：\n" not in body_of(again)
    assert sent_to(smtp, APPROVER) == []

    clock.advance(hours=1)
    mailbox.append(answer(again, REQUESTER, "收货人位置: B座3楼 302室"))
    run_once(desk, clock)
    ticket = show(desk, capsys)
    assert ticket["status"] == "pending_approval"
    assert ticket["form"]["receiving_location"] == "三号仓库"
    assert ticket["form"]["consignee_location"] == "B座3楼 302室"
    [approval] = [m.content for m in sent_to(smtp, APPROVER)]
    assert "B座3楼 302室" in body_of(approval) and "三号仓库" in body_of(approval)
    missing = [e for e in ticket["events"] if e["action"] == "form_incomplete"]
    assert len(missing) == 2


def test_answers_to_the_form_as_people_write_them(strict_desk, mailbox, smtp, clock, capsys):
    desk = strict_desk
    mailbox.append(make_mail(REQUESTER, "申请一台笔记本电脑",
                             "因出差需要申请一台笔记本电脑。\n项类型：笔记本电脑"))
    run_once(desk, clock)
    [ask] = [m.content for m in sent_to(smtp, REQUESTER)]
    # "同意" starts the answer: no approval is awaited yet, so it is no decision.
    mailbox.append(answer(ask, REQUESTER, "同意，信息补充如下：\n收货地点：三号仓库"))
    run_once(desk, clock)
    ticket = show(desk, capsys)
    assert (ticket["status"], ticket["form"]["receiving_location"]) == ("pending", "三号仓库")
    assert sent_to(smtp, APPROVER) == []
    assert "approval_refused" not in [e["action"] for e in ticket["events"]]
    # The service desk makes out the form (seed §4.2 step 2): it may fill a field in.
    again = [m.content for m in sent_to(smtp, REQUESTER)][-1]
    # A fresh mail in the desk's name proves nothing (it answers no mail sent to the desk)…
    mailbox.append(answer(again, "desk1@example.test", "收货人位置：B座3楼"))
    run_once(desk, clock)
    assert show(desk, capsys)["status"] == "pending"
    # …so the desk answers the notice it was sent about the request.
    [notice] = [m for m in sent_to(smtp, "desk1@example.test")
                if "请回复本邮件" in str(parsed(m.content)["Subject"])]
    mailbox.append(answer(notice.content, "desk1@example.test", "收货人位置：B座3楼"))
    run_once(desk, clock)
    ticket = show(desk, capsys)
    assert (ticket["status"], ticket["form"]["consignee_location"]) == (
        "pending_approval", "B座3楼"
    )
    assert len(sent_to(smtp, APPROVER)) == 1


def test_a_forwarded_request_and_a_form_in_a_word_table(strict_desk, mailbox, smtp, clock,
                                                        capsys):
    desk = strict_desk
    forwarded = (
        "请帮忙办理，谢谢。\n\n-----原始邮件-----\n发件人: 李四 <li.si@example.test>\n"
        "发送时间: 2026年11月23日 9:00\n主题: 申请领用笔记本电脑\n\n申请类型：硬件\n"
        "项类型：笔记本电脑\n申请原因：新员工入职使用\n收货地点：三号仓库\n收货人位置：B座3楼\n"
    )
    mailbox.append(make_mail(REQUESTER, "转发: 申请领用笔记本电脑", forwarded))
    rows = [("申请类型", "硬件"), ("项类型", "显示器"), ("申请原因", "双屏办公"),
            ("收货地点", "三号仓库"), ("收货人位置", "B座5楼")]
    table = "".join(f"<tr><td><p class=MsoNormal>{k}：</p></td><td><p class=MsoNormal>{v}</p>"
                    "</td></tr>" for k, v in rows)
    word = EmailMessage(policy=SMTP)
    word["From"], word["To"], word["Subject"] = REQUESTER, "itsm@example.test", "申请领用显示器"
    word["Message-ID"] = "<word-table@example.test>"
    word.set_content(f"<html><body><p>您好：</p><table border=1>{table}</table></body></html>",
                     subtype="html")
    mailbox.append(word.as_bytes())
    run_once(desk, clock)
    forwarded_ticket, word_ticket = show(desk, capsys, "REQ-1"), show(desk, capsys, "REQ-2")
    assert forwarded_ticket["status"] == word_ticket["status"] == "pending_approval"
    assert forwarded_ticket["form"]["reason"] == "新员工入职使用"
    assert forwarded_ticket["form"]["item_type"] == "笔记本电脑"
    assert word_ticket["form"]["receiving_location"] == "三号仓库"
    assert word_ticket["form"]["reason"] == "双屏办公"
    approvals = [body_of(m.content) for m in sent_to(smtp, APPROVER)]
    assert len(approvals) == 2 and not any("|" in text for text in approvals)


def test_english_form_and_the_form_type_routes(tmp_path, mailbox, smtp, clock, capsys):
    desk = make_desk(tmp_path, mailbox=mailbox, smtp=smtp, desk={"language": "en"}, roles={
        "approvers": {"default": [APPROVER], "other": ["boss@example.test"]},
        "executors": {"default": [EXECUTOR]},
    })
    try:
        mailbox.append(make_mail("li.si@example.test", "Request: a second monitor",
                                 "Request type: other\nReason: design review work\n"
                                 "Related: INC-3, CHG-7"))
        run_once(desk, clock)
        ticket = show(desk, capsys)
        assert ticket["rule"] == "34-request-hardware"
        assert ticket["request_type"] == "other", "the form's type wins over the rule's"
        assert any(e["action"] == "request_type" and "hardware → other" in e["detail"]
                   for e in ticket["events"])
        assert ticket["form"]["links"] == ["INC-3", "CHG-7"]
        assert sent_to(smtp, APPROVER) == []
        [approval] = [m.content for m in sent_to(smtp, "boss@example.test")]
        assert "Approval needed" in parsed(approval)["Subject"]
        assert "reject <reason>" in body_of(approval)
    finally:
        desk.close()


def test_reject_needs_a_reason_and_then_closes_the_request(desk, mailbox, smtp, clock, capsys):
    mailbox.append(make_mail(REQUESTER, "申请开通VPN", "申请原因：出差期间访问内网"))
    run_once(desk, clock)
    [approval] = [m.content for m in sent_to(smtp, APPROVER)]

    clock.advance(hours=1)
    mailbox.append(answer(approval, APPROVER, "驳回"))
    run_once(desk, clock)
    ticket = show(desk, capsys)
    assert ticket["status"] == "pending_approval", "a rejection without a reason is refused"
    refused = [e for e in ticket["events"] if e["action"] == "approval_refused"]
    assert len(refused) == 1 and "原因" in refused[0]["detail"]
    assert len(mails_to(smtp, APPROVER, "审批未生效")) == 1
    assert len(sent_to(smtp, REQUESTER)) == 1  # only the first acknowledgement

    clock.advance(hours=1)
    mailbox.append(answer(approval, APPROVER, "驳回 本季度预算已用完，请下季度再申请"))
    run_once(desk, clock)
    ticket = show(desk, capsys)
    assert ticket["status"] == "rejected"
    assert ticket["closed_at"] is not None
    [rejected] = mails_to(smtp, REQUESTER, "驳回")
    assert "本季度预算已用完" in body_of(rejected)
    assert sent_to(smtp, EXECUTOR) == []
    event = [e for e in ticket["events"] if e["action"] == "rejected"]
    assert event[0]["actor"] == APPROVER and "预算" in event[0]["detail"]

    # Final: a later approval by the same approver changes nothing.
    clock.advance(hours=1)
    mailbox.append(answer(approval, APPROVER, "同意"))
    run_once(desk, clock)
    assert show(desk, capsys)["status"] == "rejected"
    assert sent_to(smtp, EXECUTOR) == []


def test_two_step_chain(chain_desk, mailbox, smtp, clock, capsys):
    desk = chain_desk
    mailbox.append(make_mail(REQUESTER, "申请一台笔记本电脑", LAPTOP))
    run_once(desk, clock)
    assert "2" in body_of(mails_to(smtp, REQUESTER, "提交审批")[0])
    [head_mail] = [m.content for m in sent_to(smtp, "head@example.test")]
    assert "1/2" in parsed(head_mail)["Subject"]
    assert sent_to(smtp, "itmgr1@example.test") == [] and sent_to(smtp, APPROVER) == []

    clock.advance(hours=1)
    mailbox.append(answer(head_mail, "head@example.test", "同意"))
    run_once(desk, clock)
    ticket = show(desk, capsys)
    assert ticket["status"] == "pending_approval"
    [it1] = [m.content for m in sent_to(smtp, "itmgr1@example.test")]
    [it2] = [m.content for m in sent_to(smtp, "itmgr2@example.test")]
    assert parsed(it1)["Reply-To"] != parsed(it2)["Reply-To"], "a token per approver"
    assert "2/2" in parsed(it1)["Subject"] and "head@example.test" in body_of(it1)

    # The head's token is spent: using it again does not decide step 2.
    clock.advance(hours=1)
    mailbox.append(answer(head_mail, "head@example.test", "同意 again"))
    run_once(desk, clock)
    assert show(desk, capsys)["status"] == "pending_approval"
    assert sent_to(smtp, "store@example.test") == []

    clock.advance(hours=1)
    mailbox.append(answer(it2, "itmgr2@example.test", "approve"))
    run_once(desk, clock)
    ticket = show(desk, capsys)
    assert ticket["status"] == "approved"
    assert len(sent_to(smtp, "store@example.test")) == 1  # the hardware executors
    assert sent_to(smtp, EXECUTOR) == []
    approvals = [(e["actor"], e["detail"]) for e in ticket["events"] if e["action"] == "approved"]
    assert [a for a, _ in approvals] == ["head@example.test", "itmgr2@example.test"]
    assert "1/2" in approvals[0][1] and "2/2" in approvals[1][1]

    # The other IT manager's token was voided by the decision of its step.
    clock.advance(hours=1)
    mailbox.append(answer(it1, "itmgr1@example.test", "驳回 太贵"))
    run_once(desk, clock)
    ticket = show(desk, capsys)
    assert ticket["status"] == "approved"
    codes = [e["detail"] for e in ticket["events"] if e["action"] == "approval_refused"]
    assert len(codes) == 2
    assert len(mails_to(smtp, "itmgr1@example.test", "审批未生效")) == 1


def test_executor_reopened_and_unconfirmed_requests_close_themselves(desk, mailbox, smtp, clock,
                                                                    capsys):
    mailbox.append(make_mail(REQUESTER, "申请开通VPN", "申请原因：出差期间访问内网"))
    run_once(desk, clock)
    mailbox.append(answer(sent_to(smtp, APPROVER)[0].content, APPROVER, "同意"))
    run_once(desk, clock)
    work = sent_to(smtp, EXECUTOR)[0].content
    mailbox.append(reply(work, EXECUTOR, "done: VPN account vpn-zhangsan created"))
    run_once(desk, clock)
    [done_mail] = mails_to(smtp, REQUESTER, "请确认")

    # The requester says something is missing: back to the executor.
    clock.advance(hours=1)
    mailbox.append(reply(done_mail, REQUESTER, "重开 还没有收到初始密码"))
    run_once(desk, clock)
    ticket = show(desk, capsys)
    assert ticket["status"] == "approved" and ticket["resolved_at"] is None
    assert "初始密码" in body_of(sent_to(smtp, EXECUTOR)[-1].content)

    mailbox.append(reply(work, EXECUTOR, "完成 密码已短信发送"))
    run_once(desk, clock)
    assert show(desk, capsys)["status"] == "fulfilled"

    # No confirmation: closed once the confirmation time (working time) has run out.
    clock.advance(hours=2)
    assert requests.auto_close(desk, clock()) == 0
    clock.advance(days=7)
    assert requests.auto_close(desk, clock()) == 1
    assert requests.auto_close(desk, clock()) == 0
    ticket = show(desk, capsys)
    assert ticket["status"] == "closed" and ticket["closed_at"] is not None
    run_once(desk, clock)
    closed = mails_to(smtp, REQUESTER, "已关闭")
    assert len(closed) == 1 and "自动关闭" in body_of(closed[0])


def test_no_approver_is_asked_to_approve_their_own_request(chain_desk, mailbox, smtp, clock,
                                                           capsys):
    desk = chain_desk
    mailbox.append(make_mail("itmgr1@example.test", "申请一台笔记本电脑", LAPTOP))
    run_once(desk, clock)
    head_mail = sent_to(smtp, "head@example.test")[0].content
    mailbox.append(answer(head_mail, "head@example.test", "同意"))
    run_once(desk, clock)
    assert len(sent_to(smtp, "itmgr2@example.test")) == 1
    assert not [m for m in sent_to(smtp, "itmgr1@example.test")
                if "待审批" in parsed(m.content)["Subject"]]


def test_a_step_with_nobody_to_ask_waits_and_tells_the_desk(tmp_path, mailbox, smtp, clock,
                                                            capsys):
    desk = make_desk(tmp_path, mailbox=mailbox, smtp=smtp,
                     roles={"approvers": {"default": [APPROVER], "it": []}},
                     requests={"approval_chain": {"default": ["it"]}})
    try:
        mailbox.append(make_mail(REQUESTER, "申请开通VPN", "申请原因：出差"))
        run_once(desk, clock)
        ticket = show(desk, capsys)
        assert ticket["status"] == "pending_approval"
        assert "approval_unroutable" in [e["action"] for e in ticket["events"]]
        assert len(sent_to(smtp, "desk1@example.test")) == 1
        assert sent_to(smtp, APPROVER) == []
    finally:
        desk.close()
