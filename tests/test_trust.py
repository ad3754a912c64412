"""Trust, tried as an attacker would, over the real IMAP (Dovecot) and SMTP (aiosmtpd) servers.

A From header is only a claim: a command counts only from a sender proven by a reply token
(the desk's mail to that very address about that ticket) or by our own MTA's DMARC pass; mail
about a ticket reaches only the people on it. Legitimate replies from the mail clients people
use still work.
"""

from __future__ import annotations

import json

import pytest
from clients import CLIENTS, reply_as
from support import DESK, body_of, make_desk, make_mail, parsed, reply, run_once

from mailflow.cli import main

USER = "zhang@example.test"
ATTACKER = "attacker@evil.test"
STRANGER = "stranger@elsewhere.test"
DESK1, IM = "desk1@example.test", "im@example.test"
APPROVER, EXECUTOR = "approver@example.test", "exec@example.test"
SUBJECT = "电脑无法开机"
MX = "mx.example.test"


def show(desk, capsys, ref: str = "INC-1") -> dict:
    capsys.readouterr()
    assert main(["--config", str(desk.settings.path), "show", ref, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def sent_to(smtp, address: str) -> list[bytes]:
    return [m.content for m in smtp.messages if address in m.rcpt_tos]


def subjects_to(smtp, address: str) -> list[str]:
    return [str(parsed(m)["Subject"]) for m in sent_to(smtp, address)]


def state(ticket: dict) -> tuple:
    return (ticket["status"], ticket["priority"], ticket["tier"], ticket["assignee"])


def forged(sender: str, subject: str, body: str, **headers: str) -> bytes:
    """A fresh mail that only claims to be from `sender`: replies go to the attacker."""
    return make_mail(sender, subject, body, headers={"Reply-To": ATTACKER, **headers})


def events(ticket: dict, action: str) -> list[dict]:
    return [e for e in ticket["events"] if e["action"] == action]


@pytest.fixture
def opened(desk, mailbox, smtp, clock) -> dict[str, bytes]:
    """INC-1 from USER at L1: the acknowledgement and the L1 notice, as received."""
    mailbox.append(make_mail(USER, SUBJECT, "按电源键没有反应", name="张三"))
    run_once(desk, clock)
    return {"ack": sent_to(smtp, USER)[0], "l1": sent_to(smtp, DESK1)[0]}


def mta_desk(tmp_path, mailbox, smtp, **sections):
    """A desk whose own MTA writes Authentication-Results as `mx.example.test`."""
    security = {"trusted_authserv_id": MX, **sections.pop("security", {})}
    return make_desk(tmp_path, mailbox=mailbox, smtp=smtp, security=security, **sections)


# -- forged staff commands ----------------------------------------------------------------

FORGED = [
    (IM, "priority P1"),
    (IM, f"assign {ATTACKER}"),
    (DESK1, "已解决\n重启就好了"),
    (DESK1, "升级"),
    (IM, "转问题"),
    (DESK1, f"指派 {ATTACKER}"),
]


@pytest.mark.parametrize(("claimed", "command"), FORGED)
def test_a_forged_staff_command_is_not_applied(
    claimed, command, desk, mailbox, smtp, clock, capsys, opened
):
    before = show(desk, capsys)
    for _ in range(2):  # the same forgery twice: the real person is told once
        mailbox.append(forged(claimed, f"Re: [INC-1] {SUBJECT}", command))
        clock.advance(minutes=10)
        run_once(desk, clock)
    after = show(desk, capsys)
    assert state(after) == state(before), "nothing changed"
    unproven = events(after, "unproven")
    assert [e["actor"] for e in unproven] == [claimed, claimed]
    assert not events(after, "refused")
    assert sent_to(smtp, ATTACKER) == [], "the writer is never answered"
    assert sent_to(smtp, USER) == [opened["ack"]], "nothing reached the requester"
    [notice] = [m for m in sent_to(smtp, claimed) if "请回复本邮件" in str(parsed(m)["Subject"])]
    assert parsed(notice)["To"] == claimed
    assert "回复本邮件" in body_of(notice)


def test_the_real_person_acts_by_replying_to_the_notice(desk, mailbox, smtp, clock, capsys,
                                                         opened):
    mailbox.append(forged(IM, f"Re: [INC-1] {SUBJECT}", "priority P1"))
    run_once(desk, clock)
    [notice] = sent_to(smtp, IM)
    mailbox.append(reply(notice, IM, "优先级 P1"))
    clock.advance(minutes=5)
    run_once(desk, clock)
    assert show(desk, capsys)["priority"] == "P1"


def test_the_engineers_own_reply_applies(desk, mailbox, smtp, clock, capsys, opened):
    mailbox.append(reply(opened["l1"], DESK1, "已解决\n重启就好了"))
    run_once(desk, clock)
    ticket = show(desk, capsys)
    assert ticket["status"] == "resolved"
    assert not events(ticket, "unproven")


def test_another_persons_token_proves_nothing(desk, mailbox, smtp, clock, capsys, opened):
    """The requester's own acknowledgement carries the requester's token, not the desk's."""
    mailbox.append(reply(opened["ack"], USER, "好的"))
    run_once(desk, clock)
    mailbox.append(reply(opened["ack"], DESK1, "已解决 重启"))  # forged From on a real thread
    run_once(desk, clock)
    ticket = show(desk, capsys)
    assert ticket["status"] == "open"
    assert [e["actor"] for e in events(ticket, "unproven")] == [DESK1]


def test_the_assignee_of_a_forged_assign_never_gets_the_ticket(
    desk, mailbox, smtp, clock, capsys, opened
):
    mailbox.append(forged(IM, f"Re: [INC-1] {SUBJECT}", f"assign {ATTACKER}"))
    run_once(desk, clock)
    # The attacker now writes as themself: a stranger to the ticket.
    mailbox.append(make_mail(ATTACKER, f"Re: [INC-1] {SUBJECT}", "已经修好了，请确认"))
    clock.advance(minutes=10)
    run_once(desk, clock)
    ticket = show(desk, capsys)
    assert ticket["assignee"] is None and ticket["status"] == "open"
    assert sent_to(smtp, USER) == [opened["ack"]]
    assert events(ticket, "stranger")[0]["actor"] == ATTACKER
    [neutral] = sent_to(smtp, ATTACKER)  # told only that the mail was kept
    assert SUBJECT not in body_of(neutral) + str(parsed(neutral)["Subject"])
    assert USER not in body_of(neutral) and "张三" not in body_of(neutral)


# -- forged requester and executor ----------------------------------------------------------


def test_a_forged_confirmation_does_not_close(desk, mailbox, smtp, clock, capsys, opened):
    mailbox.append(reply(opened["l1"], DESK1, "已解决 更换了电源"))
    run_once(desk, clock)
    [resolution] = [m for m in sent_to(smtp, USER) if m != opened["ack"]]
    mailbox.append(forged(USER, f"Re: [INC-1] {SUBJECT}", "确认"))
    clock.advance(minutes=10)
    run_once(desk, clock)
    assert show(desk, capsys)["status"] == "resolved"
    mailbox.append(reply(resolution, USER, "确认，谢谢"))
    clock.advance(minutes=10)
    run_once(desk, clock)
    assert show(desk, capsys)["status"] == "closed"


LAPTOP = "项类型：笔记本电脑\n申请原因：出差使用\n收货地点：三号仓库\n收货人位置：B座3楼"


def test_a_forged_done_does_not_fulfil(desk, mailbox, smtp, clock, capsys):
    mailbox.append(make_mail(USER, "申请一台笔记本电脑", LAPTOP, name="张三"))
    run_once(desk, clock)
    [approval] = sent_to(smtp, APPROVER)
    mailbox.append(reply(approval, APPROVER, "同意"))
    clock.advance(minutes=10)
    run_once(desk, clock)
    assert show(desk, capsys, "REQ-1")["status"] == "approved"
    [order] = sent_to(smtp, EXECUTOR)
    mailbox.append(forged(EXECUTOR, "Re: [REQ-1] 申请一台笔记本电脑", "完成"))
    clock.advance(minutes=10)
    run_once(desk, clock)
    ticket = show(desk, capsys, "REQ-1")
    assert ticket["status"] == "approved"
    assert [e["actor"] for e in events(ticket, "unproven")] == [EXECUTOR]
    mailbox.append(reply(order, EXECUTOR, "完成\n已发放"))
    clock.advance(minutes=10)
    run_once(desk, clock)
    assert show(desk, capsys, "REQ-1")["status"] == "fulfilled"


# -- our MTA's word ----------------------------------------------------------------------


def test_require_dkim_now_covers_commands_too(tmp_path, mailbox, smtp, clock, capsys):
    desk = make_desk(tmp_path, mailbox=mailbox, smtp=smtp,
                     requests={"require_dkim": True, "trusted_authserv_id": MX})
    mailbox.append(make_mail(USER, SUBJECT, "按电源键没有反应"))
    run_once(desk, clock)
    failed = f"{MX}; dkim=fail header.d=example.test; dmarc=fail header.from=example.test"
    mailbox.append(forged(DESK1, f"Re: [INC-1] {SUBJECT}", "已解决",
                          **{"Authentication-Results": failed}))
    clock.advance(minutes=10)
    run_once(desk, clock)
    ticket = show(desk, capsys)
    assert ticket["status"] == "open"
    assert "dkim=fail" in events(ticket, "unproven")[0]["detail"]
    desk.close()


def test_a_fresh_staff_mail_with_dmarc_pass_applies(tmp_path, mailbox, smtp, clock, capsys):
    desk = mta_desk(tmp_path, mailbox, smtp)
    mailbox.append(make_mail(USER, SUBJECT, "按电源键没有反应"))
    run_once(desk, clock)
    passed = f"{MX}; spf=pass smtp.mailfrom=example.test; dmarc=pass header.from=example.test"
    mailbox.append(make_mail(IM, f"Re: [INC-1] {SUBJECT}", "优先级 P1",
                             headers={"Authentication-Results": passed}))
    clock.advance(minutes=10)
    run_once(desk, clock)
    assert show(desk, capsys)["priority"] == "P1"
    desk.close()


AR_FORGERIES = [
    # Written by someone else's server (or by the sender): not our authserv-id.
    ["evil.test; dmarc=pass header.from=example.test"],
    # Ours on top says fail; a forged copy of our id below it is never read.
    [f"{MX}; dmarc=fail header.from=example.test",
     f"{MX}; dmarc=pass header.from=example.test"],
    # A DKIM pass for another domain is not aligned with the From domain.
    [f"{MX}; dkim=pass header.d=evil.test; dmarc=fail header.from=example.test"],
]


@pytest.mark.parametrize("results", AR_FORGERIES)
def test_forged_authentication_results_prove_nothing(tmp_path, mailbox, smtp, clock, capsys,
                                                     results):
    desk = mta_desk(tmp_path, mailbox, smtp)
    mailbox.append(make_mail(USER, SUBJECT, "按电源键没有反应"))
    run_once(desk, clock)
    raw = forged(IM, f"Re: [INC-1] {SUBJECT}", "优先级 P1")
    head = "".join(f"Authentication-Results: {r}\r\n" for r in results).encode()
    mailbox.append(head + raw)  # topmost first, as MTAs prepend them
    clock.advance(minutes=10)
    run_once(desk, clock)
    ticket = show(desk, capsys)
    assert ticket["priority"] != "P1"
    assert [e["actor"] for e in events(ticket, "unproven")] == [IM]
    desk.close()


def test_token_only_refuses_even_a_dmarc_pass(tmp_path, mailbox, smtp, clock, capsys):
    desk = mta_desk(tmp_path, mailbox, smtp, security={"commands": "token"})
    mailbox.append(make_mail(USER, SUBJECT, "按电源键没有反应"))
    run_once(desk, clock)
    passed = f"{MX}; dmarc=pass header.from=example.test"
    mailbox.append(make_mail(IM, f"Re: [INC-1] {SUBJECT}", "优先级 P1",
                             headers={"Authentication-Results": passed}))
    clock.advance(minutes=10)
    run_once(desk, clock)
    assert show(desk, capsys)["priority"] != "P1"
    desk.close()


def test_from_mode_trusts_the_header_and_check_warns(tmp_path, mailbox, smtp, clock, capsys):
    desk = make_desk(tmp_path, mailbox=mailbox, smtp=smtp, security={"commands": "from"})
    mailbox.append(make_mail(USER, SUBJECT, "按电源键没有反应"))
    run_once(desk, clock)
    mailbox.append(make_mail(IM, f"Re: [INC-1] {SUBJECT}", "优先级 P1"))
    clock.advance(minutes=10)
    run_once(desk, clock)
    assert show(desk, capsys)["priority"] == "P1"
    capsys.readouterr()
    assert main(["--config", str(desk.settings.path), "check"]) == 0
    assert 'security.commands = "from"' in capsys.readouterr().err
    desk.close()


# -- assigning outside IT support ----------------------------------------------------------


def test_assigning_outside_it_support_needs_the_incident_manager(
    tmp_path, mailbox, smtp, clock, capsys
):
    desk = mta_desk(tmp_path, mailbox, smtp)
    mailbox.append(make_mail(USER, SUBJECT, "按电源键没有反应"))
    run_once(desk, clock)
    vendor = "engineer@hp-service.test"
    [l1] = sent_to(smtp, DESK1)
    mailbox.append(reply(l1, DESK1, f"指派 {vendor}"))
    clock.advance(minutes=10)
    run_once(desk, clock)
    ticket = show(desk, capsys)
    assert ticket["assignee"] is None and sent_to(smtp, vendor) == []
    assert "事件经理" in events(ticket, "refused")[0]["detail"]
    passed = f"{MX}; dmarc=pass header.from=example.test"
    mailbox.append(make_mail(IM, f"Re: [INC-1] {SUBJECT}", f"指派 {vendor}",
                             headers={"Authentication-Results": passed}))
    clock.advance(minutes=10)
    run_once(desk, clock)
    assert show(desk, capsys)["assignee"] == vendor
    assert len(sent_to(smtp, vendor)) == 1
    desk.close()


# -- strangers ---------------------------------------------------------------------------


def test_a_stranger_on_a_request_reaches_nobody(desk, mailbox, smtp, clock, capsys):
    mailbox.append(make_mail(USER, "申请一台笔记本电脑", LAPTOP, name="张三"))
    run_once(desk, clock)
    before = {a: len(sent_to(smtp, a)) for a in (USER, APPROVER, DESK1, EXECUTOR)}
    for body in ("您好，您的申请需要先缴费，请把工号回复给我", "同意", "完成"):
        mailbox.append(make_mail(STRANGER, "Re: [REQ-1] 申请", body))
        clock.advance(minutes=10)
        run_once(desk, clock)
    assert {a: len(sent_to(smtp, a)) for a in before} == before
    ticket = show(desk, capsys, "REQ-1")
    assert ticket["status"] == "pending_approval"
    assert [e["actor"] for e in events(ticket, "stranger")] == [STRANGER] * 3
    assert "缴费" in events(ticket, "stranger")[0]["detail"], "kept for the staff"
    [neutral] = sent_to(smtp, STRANGER)  # once, naming nothing of the ticket
    text = body_of(neutral) + str(parsed(neutral)["Subject"])
    for secret in ("笔记本", "REQ-1", USER, "张三", "pending", "审批"):
        assert secret not in text


def test_a_stranger_on_an_incident_reaches_no_engineer(desk, mailbox, smtp, clock, capsys,
                                                        opened):
    before = {a: len(sent_to(smtp, a)) for a in (USER, DESK1, "desk2@example.test")}
    mailbox.append(make_mail(STRANGER, f"Re: [INC-1] {SUBJECT}", "resolve\nfixed it"))
    run_once(desk, clock)
    assert {a: len(sent_to(smtp, a)) for a in before} == before
    ticket = show(desk, capsys)
    assert ticket["status"] == "open" and not events(ticket, "refused")
    assert events(ticket, "stranger")


def test_a_cc_of_the_first_mail_is_a_watcher_and_may_comment(desk, mailbox, smtp, clock,
                                                            capsys):
    chief = "chief@example.test"
    mailbox.append(make_mail(USER, SUBJECT, "按电源键没有反应", cc=f"{chief}, {DESK1}"))
    run_once(desk, clock)
    ticket = show(desk, capsys)
    assert ticket["watchers"] == [chief]
    before = len(sent_to(smtp, DESK1))
    mailbox.append(make_mail(chief, f"Re: [INC-1] {SUBJECT}", "这台电脑很急，请尽快处理"))
    clock.advance(minutes=10)
    run_once(desk, clock)
    assert len(sent_to(smtp, DESK1)) == before + 1  # the watcher's words reach the desk
    assert not events(show(desk, capsys), "stranger")


# -- legitimate replies from real clients ------------------------------------------------


@pytest.mark.parametrize("client", CLIENTS, ids=[c.name for c in CLIENTS])
def test_replies_from_real_clients_prove_themselves(
    client, desk, mailbox, smtp, clock, capsys, opened
):
    mailbox.append(reply_as(client, opened["l1"], DESK1, "已解决\n重启了电脑"))
    clock.advance(minutes=10)
    run_once(desk, clock)
    assert show(desk, capsys)["status"] == "resolved"
    [resolution] = [m for m in sent_to(smtp, USER) if m != opened["ack"]]
    mailbox.append(reply_as(client, resolution, USER, "确认"))
    clock.advance(minutes=10)
    run_once(desk, clock)
    ticket = show(desk, capsys)
    assert ticket["status"] == "closed"
    assert not events(ticket, "unproven")


@pytest.mark.parametrize("client", CLIENTS, ids=[c.name for c in CLIENTS])
def test_approver_and_executor_replies_from_real_clients(client, desk, mailbox, smtp, clock,
                                                         capsys):
    mailbox.append(make_mail(USER, "申请一台笔记本电脑", LAPTOP, name="张三"))
    run_once(desk, clock)
    [approval] = sent_to(smtp, APPROVER)
    mailbox.append(reply_as(client, approval, APPROVER, "同意"))
    clock.advance(minutes=10)
    run_once(desk, clock)
    [order] = sent_to(smtp, EXECUTOR)
    mailbox.append(reply_as(client, order, EXECUTOR, "完成\n已发放"))
    clock.advance(minutes=10)
    run_once(desk, clock)
    assert show(desk, capsys, "REQ-1")["status"] == "fulfilled"


def test_every_mail_about_a_ticket_carries_its_recipients_own_token(smtp, opened):
    ack, l1 = parsed(opened["ack"]), parsed(opened["l1"])
    for msg in (ack, l1):
        assert str(msg["Reply-To"]).startswith("itsm+r-")
        token = str(msg["Reply-To"]).split("+r-")[1].split("@")[0]
        assert f".r-{token}@" in str(msg["Message-ID"])
    assert ack["Reply-To"] != l1["Reply-To"]
    assert DESK in str(ack["From"])
