"""The people on a ticket besides its requester and staff, by mail over the real servers.

Watchers (the Cc of the first mail, `抄送`/`cc`, `取消抄送`/`uncc`) get the requester's public
updates and nothing internal; a vendor (`转厂商`/`vendor`) gets the ticket in its own language
and its replies reach the engineers only; `分类`/`category` corrects a misfiled ticket;
`状态`/`查询`/`status` and the fresh mails `查询 INC-1` and `我的工单`/`my tickets` are
answered to the sender alone. Each refusal (wrong role, unproven) is shown beside.
"""

from __future__ import annotations

import json
from datetime import datetime

import pytest
from support import body_of, make_desk, make_mail, parsed, reply, run_once

from mailflow.cli import main

USER = "zhang@example.test"
CHIEF = "chief@example.test"
BOSS = "boss@example.test"
OTHER = "other@example.test"
STRANGER = "stranger@elsewhere.test"
DESK1, DESK2, IM = "desk1@example.test", "desk2@example.test", "im@example.test"
HP = "service@hp-vendor.test"
SUBJECT = "电脑无法开机"
ENGINEERS = (DESK1, DESK2, "l2@example.test", "l3@example.test", IM, "lead@example.test")
VENDORS = {"hp": {"name": "HP Service", "addresses": [HP], "language": "en",
                  "response": "4h"}}


@pytest.fixture
def desk(tmp_path, mailbox, smtp):
    made = make_desk(tmp_path, mailbox=mailbox, smtp=smtp, vendors=VENDORS)
    yield made
    made.close()


def show(desk, capsys, ref: str = "INC-1") -> dict:
    capsys.readouterr()
    assert main(["--config", str(desk.settings.path), "show", ref, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def ticket_count(desk, capsys) -> int:
    capsys.readouterr()
    assert main(["--config", str(desk.settings.path), "tickets", "--json"]) == 0
    return len(json.loads(capsys.readouterr().out))


def sent_to(smtp, address: str) -> list[bytes]:
    return [m.content for m in smtp.messages if address in m.rcpt_tos]


def subjects_to(smtp, address: str) -> list[str]:
    return [str(parsed(m)["Subject"]) for m in sent_to(smtp, address)]


def counts(smtp, *addresses: str) -> dict[str, int]:
    return {a: len(sent_to(smtp, a)) for a in addresses}


def events(ticket: dict, action: str) -> list[dict]:
    return [e for e in ticket["events"] if e["action"] == action]


def step(desk, mailbox, clock, raw: bytes) -> None:
    mailbox.append(raw)
    clock.advance(minutes=10)
    run_once(desk, clock)


def forged(sender: str, body: str, ref: str = "INC-1") -> bytes:
    """A fresh mail that only claims to be from `sender`."""
    return make_mail(sender, f"Re: [{ref}] {SUBJECT}", body)


@pytest.fixture
def opened(desk, mailbox, smtp, clock) -> dict[str, bytes]:
    """INC-1 from USER with CHIEF in Cc: the acknowledgement and the L1 notice."""
    mailbox.append(make_mail(USER, SUBJECT, "按电源键没有反应", name="张三",
                             cc=f"{CHIEF}, {DESK1}"))
    run_once(desk, clock)
    return {"ack": sent_to(smtp, USER)[0], "l1": sent_to(smtp, DESK1)[0]}


# -- watchers --------------------------------------------------------------------------


def test_a_watcher_gets_the_public_updates_and_nothing_internal(
    desk, mailbox, smtp, clock, capsys, opened
):
    l1 = opened["l1"]
    assert sent_to(smtp, CHIEF) == [], "no acknowledgement: the watcher did not write"
    step(desk, mailbox, clock, reply(l1, DESK1, "内部: 先查电源适配器"))
    step(desk, mailbox, clock, reply(l1, DESK1, "我们正在联系您，请稍候"))
    step(desk, mailbox, clock, reply(l1, DESK1, "已解决\n更换了电源适配器"))
    resolution = sent_to(smtp, USER)[-1]
    step(desk, mailbox, clock, reply(resolution, USER, "还是不行，按了没反应"))
    step(desk, mailbox, clock, reply(l1, DESK1, "resolve\nreplaced the power board"))
    step(desk, mailbox, clock, reply(sent_to(smtp, USER)[-1], USER, "确认"))
    assert show(desk, capsys)["status"] == "closed"
    got = [body_of(m) for m in sent_to(smtp, CHIEF)]
    assert len(got) == 5, subjects_to(smtp, CHIEF)
    assert "我们正在联系您" in got[0]
    assert "更换了电源适配器" in got[1]
    assert "重新打开" in got[2]
    assert "replaced the power board" in got[3]
    assert "已关闭" in got[4]
    assert not any("先查电源适配器" in b for b in got), "never an internal note"
    assert not any("还是不行" in b for b in got), "never the requester's own words"
    for raw in sent_to(smtp, CHIEF):  # each carries the watcher's own reply token
        assert parsed(raw)["To"] == CHIEF and "+r-" in str(parsed(raw)["Reply-To"])


def test_a_watcher_may_comment_and_ask_the_state_and_nothing_more(
    desk, mailbox, smtp, clock, capsys, opened
):
    step(desk, mailbox, clock, reply(opened["l1"], DESK1, "我们正在联系您"))
    update = sent_to(smtp, CHIEF)[-1]
    before = counts(smtp, USER, *ENGINEERS)
    step(desk, mailbox, clock, reply(update, CHIEF, "这台电脑很急，请尽快"))
    assert len(sent_to(smtp, DESK1)) == before[DESK1] + 1, "the comment reaches the desk"
    for command in ("已解决 重启好了", "优先级 P1", "分类 network", f"转厂商 {HP}",
                    f"抄送 {OTHER}"):
        step(desk, mailbox, clock, reply(update, CHIEF, command))
    ticket = show(desk, capsys)
    assert (ticket["status"], ticket["priority"], ticket["category"]) == ("open", "P3", "desktop")
    assert ticket["vendor"] is None and ticket["watchers"] == [CHIEF]
    assert [e["detail"].split(":")[0] for e in events(ticket, "refused")] == [
        "resolve", "priority", "category", "vendor", "cc"]
    assert sent_to(smtp, HP) == [] and sent_to(smtp, OTHER) == []


def test_a_reply_all_from_a_watcher_threads_and_adds_nobody(
    desk, mailbox, smtp, clock, capsys, opened
):
    step(desk, mailbox, clock, reply(opened["l1"], DESK1, "已解决\n更换了电源"))
    [resolution] = sent_to(smtp, CHIEF)
    answer = reply(resolution, CHIEF, "谢谢，我这边也确认可以开机了")
    answer = answer.replace(b"\nSubject:", f"\nCc: {USER}, {BOSS}, {DESK1}\nSubject:".encode(), 1)
    step(desk, mailbox, clock, answer)
    assert ticket_count(desk, capsys) == 1
    ticket = show(desk, capsys)
    assert ticket["watchers"] == [CHIEF] and ticket["status"] == "resolved"
    assert sent_to(smtp, BOSS) == []


def test_cc_and_uncc_by_mail(desk, mailbox, smtp, clock, capsys, opened):
    step(desk, mailbox, clock, reply(opened["ack"], USER, f"抄送 科长 <{BOSS}>"))
    assert show(desk, capsys)["watchers"] == [BOSS, CHIEF]
    [added] = sent_to(smtp, BOSS)
    assert "[INC-1]" in str(parsed(added)["Subject"]) and "取消抄送" in body_of(added)
    step(desk, mailbox, clock, reply(opened["l1"], DESK1, f"cc {OTHER}"))
    assert show(desk, capsys)["watchers"] == [BOSS, CHIEF, OTHER]
    step(desk, mailbox, clock, reply(added, BOSS, f"uncc {BOSS}"))  # a watcher, themself
    step(desk, mailbox, clock, reply(opened["ack"], USER, f"取消抄送 {OTHER}"))
    ticket = show(desk, capsys)
    assert ticket["watchers"] == [CHIEF]
    assert [e["actor"] for e in events(ticket, "watchers")] == [USER, USER, DESK1, BOSS, USER]
    before = counts(smtp, BOSS, OTHER, CHIEF)
    step(desk, mailbox, clock, reply(opened["l1"], DESK1, "我们正在处理"))
    assert counts(smtp, BOSS, OTHER, CHIEF) == {**before, CHIEF: before[CHIEF] + 1}
    step(desk, mailbox, clock, reply(added, BOSS, "还有别的问题吗"))  # no longer on it
    assert events(show(desk, capsys), "stranger")[0]["actor"] == BOSS


CC_REFUSED = [
    # (who, command, why): a watcher adds nobody and removes only themself
    (CHIEF, f"抄送 {OTHER}", "只有"),
    (CHIEF, f"uncc {BOSS}", "only remove themself"),
    (USER, f"cc {DESK2}", "already"),
    (USER, "抄送", "missing address"),
    (USER, f"取消抄送 {OTHER}", "not a watcher"),
]


@pytest.mark.parametrize(("who", "command", "why"), CC_REFUSED)
def test_cc_refused(who, command, why, desk, mailbox, smtp, clock, capsys, opened):
    step(desk, mailbox, clock, reply(opened["ack"], USER, f"cc {BOSS}"))
    source = opened["ack"] if who == USER else None
    if source is None:
        step(desk, mailbox, clock, reply(opened["l1"], DESK1, "正在处理"))
        source = sent_to(smtp, who)[-1]
    step(desk, mailbox, clock, reply(source, who, command))
    ticket = show(desk, capsys)
    assert ticket["watchers"] == [BOSS, CHIEF]
    [refused] = events(ticket, "refused")
    assert refused["actor"] == who and why in refused["detail"]
    assert sent_to(smtp, OTHER) == []


def test_a_forged_cc_or_uncc_is_not_applied(desk, mailbox, smtp, clock, capsys, opened):
    step(desk, mailbox, clock, forged(USER, f"抄送 {STRANGER}"))
    step(desk, mailbox, clock, forged(USER, f"uncc {CHIEF}"))
    ticket = show(desk, capsys)
    assert ticket["watchers"] == [CHIEF]
    assert [e["actor"] for e in events(ticket, "unproven")] == [USER, USER]
    assert sent_to(smtp, STRANGER) == []


# -- status by mail --------------------------------------------------------------------


@pytest.mark.parametrize("word", ["状态", "查询", "status"])
def test_status_is_answered_to_the_sender_alone(
    word, desk, mailbox, smtp, clock, capsys, opened
):
    step(desk, mailbox, clock, reply(opened["l1"], DESK1, "已联系，下午上门"))
    before = counts(smtp, USER, CHIEF, *ENGINEERS)
    step(desk, mailbox, clock, reply(opened["ack"], USER, word))
    after = counts(smtp, USER, CHIEF, *ENGINEERS)
    assert after == {**before, USER: before[USER] + 1}, "no engineer is bothered"
    answer = sent_to(smtp, USER)[-1]
    text = body_of(answer)
    ticket = show(desk, capsys)
    due = datetime.fromisoformat(ticket["due_at"].replace("Z", "+00:00"))
    assert "[INC-1]" in str(parsed(answer)["Subject"])
    assert "处理中" in text and "一线" in text
    assert desk.renderer.local(due) in text, "the deadline in local time"
    assert "已联系，下午上门" in text, "the last public update"
    assert ticket["status"] == "open" and not events(ticket, "comment")[1:]
    assert events(ticket, "responded")[0]["actor"] == DESK1


def test_a_watcher_and_a_forged_status_are_answered_to_the_address(
    desk, mailbox, smtp, clock, capsys, opened
):
    step(desk, mailbox, clock, forged(CHIEF, "状态"))  # unproven: answered to CHIEF only
    [answer] = sent_to(smtp, CHIEF)
    assert parsed(answer)["To"] == CHIEF and "处理中" in body_of(answer)
    assert "已登记" in body_of(answer) and "rule=" not in body_of(answer), "nothing internal"
    assert not events(show(desk, capsys), "unproven")


def test_status_of_a_long_closed_incident_opens_nothing(
    desk, mailbox, smtp, clock, capsys, opened
):
    step(desk, mailbox, clock, reply(opened["l1"], DESK1, "已解决\n换了电源"))
    step(desk, mailbox, clock, reply(sent_to(smtp, USER)[-1], USER, "确认"))
    clock.advance(days=30)
    step(desk, mailbox, clock, reply(opened["ack"], USER, "status"))
    assert ticket_count(desk, capsys) == 1
    assert "已关闭" in body_of(sent_to(smtp, USER)[-1])


def test_a_fresh_query_is_answered_only_to_someone_on_the_ticket(
    desk, mailbox, smtp, clock, capsys, opened
):
    step(desk, mailbox, clock, make_mail(USER, "查询 INC-1", "", name="张三"))
    step(desk, mailbox, clock, make_mail(CHIEF, "请问进度", "status INC-1\n\n谢谢"))
    for address in (USER, CHIEF):
        assert "处理中" in body_of(sent_to(smtp, address)[-1])
    step(desk, mailbox, clock, make_mail(STRANGER, "查询 INC-1", ""))
    step(desk, mailbox, clock, make_mail(STRANGER, "查询 INC-99", ""))
    assert ticket_count(desk, capsys) == 1, "no query opened a ticket"
    neutral = [body_of(m) + str(parsed(m)["Subject"]) for m in sent_to(smtp, STRANGER)]
    assert len(neutral) == 2 and neutral[0] == neutral[1], "the same whether it exists or not"
    for secret in (SUBJECT, "INC-1", USER, "张三", "处理中"):
        assert secret not in neutral[0]
    assert [e["actor"] for e in events(show(desk, capsys), "stranger")] == [STRANGER]


def test_my_tickets_lists_what_the_sender_reported_or_watches(
    desk, mailbox, smtp, clock, capsys, opened
):
    step(desk, mailbox, clock, make_mail(CHIEF, "打印机卡纸", "三楼打印机一直卡纸"))
    step(desk, mailbox, clock, make_mail(USER, "OA登录不了", "OA系统提示密码错误"))
    step(desk, mailbox, clock, make_mail(CHIEF, "我的工单", ""))
    step(desk, mailbox, clock, make_mail(USER, "Hello", "my tickets"))
    assert ticket_count(desk, capsys) == 3
    chief, user = body_of(sent_to(smtp, CHIEF)[-1]), body_of(sent_to(smtp, USER)[-1])
    assert "INC-1" in chief and "INC-2" in chief and "INC-3" not in chief
    assert "INC-1" in user and "INC-3" in user and "INC-2" not in user


# -- vendors ---------------------------------------------------------------------------


def test_a_vendor_gets_the_ticket_and_its_reply_reaches_the_engineers_only(
    desk, mailbox, smtp, clock, capsys, opened
):
    before_user = len(sent_to(smtp, USER))
    due = show(desk, capsys)["due_at"]
    step(desk, mailbox, clock, reply(opened["l1"], DESK1, "转厂商 hp 请尽快上门\n机器在B座3楼"))
    ticket = show(desk, capsys)
    assert ticket["vendor"] == HP
    assert len(sent_to(smtp, USER)) == before_user, "nothing of it reaches the requester"
    assert sent_to(smtp, CHIEF) == []
    [handoff] = sent_to(smtp, HP)
    text = body_of(handoff)
    assert "[INC-1]" in str(parsed(handoff)["Subject"])
    assert "Support request" in str(parsed(handoff)["Subject"]), "in the vendor's language"
    assert "按电源键没有反应" in text and "请尽快上门\n机器在B座3楼" in text
    assert "Desktop" in text and USER not in text
    assert "+r-" in str(parsed(handoff)["Reply-To"])
    before = counts(smtp, USER, CHIEF, DESK1, DESK2)
    clock.advance(hours=1)
    step(desk, mailbox, clock, reply(handoff, HP, "We will replace the power board tomorrow."))
    after = counts(smtp, USER, CHIEF, DESK1, DESK2)
    assert after == {**before, DESK1: before[DESK1] + 1, DESK2: before[DESK2] + 1}
    assert "replace the power board" in body_of(sent_to(smtp, DESK1)[-1])
    ticket = show(desk, capsys)
    [replied] = events(ticket, "vendor_replied")
    assert replied["actor"] == HP
    assert ticket["status"] == "open"
    assert ticket["due_at"] == due, "by default the bureau's target still counts"


def test_an_engineer_forwards_the_vendors_word_by_commenting(
    desk, mailbox, smtp, clock, capsys, opened
):
    step(desk, mailbox, clock, reply(opened["l1"], DESK1, f"vendor {HP}"))
    step(desk, mailbox, clock, reply(sent_to(smtp, HP)[0], HP, "Board ordered."))
    step(desk, mailbox, clock, reply(sent_to(smtp, DESK1)[-1], DESK1, "厂商已订购主板，明天更换"))
    assert "厂商已订购主板" in body_of(sent_to(smtp, USER)[-1])


VENDOR_REFUSED = [
    # (who replies to what, command, why)
    ("user", f"转厂商 {HP}", "只有"),
    ("desk", "转厂商 someone@elsewhere.test", "incident manager"),
    ("desk", "vendor", "missing vendor"),
]


@pytest.mark.parametrize(("who", "command", "why"), VENDOR_REFUSED)
def test_vendor_refused(who, command, why, desk, mailbox, smtp, clock, capsys, opened):
    sender, source = (USER, opened["ack"]) if who == "user" else (DESK1, opened["l1"])
    step(desk, mailbox, clock, reply(source, sender, command))
    ticket = show(desk, capsys)
    assert ticket["vendor"] is None and sent_to(smtp, HP) == []
    assert sent_to(smtp, "someone@elsewhere.test") == []
    [refused] = events(ticket, "refused")
    assert why in refused["detail"]


def test_a_forged_vendor_command_mails_no_vendor(desk, mailbox, smtp, clock, capsys, opened):
    step(desk, mailbox, clock, forged(DESK1, f"转厂商 {HP}"))
    ticket = show(desk, capsys)
    assert ticket["vendor"] is None and sent_to(smtp, HP) == []
    [unproven] = events(ticket, "unproven")
    assert unproven["actor"] == DESK1 and unproven["detail"].startswith("vendor:")


def test_the_incident_manager_may_bring_in_an_unlisted_vendor(
    desk, mailbox, smtp, clock, capsys, opened
):
    step(desk, mailbox, clock, forged(IM, "转厂商 repair@lenovo.test"))
    assert sent_to(smtp, "repair@lenovo.test") == []  # unproven: told how to act
    [told] = [m for m in sent_to(smtp, IM) if "请回复本邮件" in str(parsed(m)["Subject"])]
    step(desk, mailbox, clock, reply(told, IM, "转厂商 repair@lenovo.test\n请检查主板"))
    assert show(desk, capsys)["vendor"] == "repair@lenovo.test"
    [handoff] = sent_to(smtp, "repair@lenovo.test")
    assert "请检查主板" in body_of(handoff) and "技术支持请求" in str(parsed(handoff)["Subject"])


def report(desk, capsys) -> dict:
    capsys.readouterr()
    argv = ["--config", str(desk.settings.path), "report", "--since", "2026-11-01",
            "--until", "2026-11-30", "--format", "json"]
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_the_clock_waits_for_the_vendor_when_configured_and_the_report_measures_it(
    tmp_path, mailbox, smtp, clock, capsys
):
    desk = make_desk(tmp_path, mailbox=mailbox, smtp=smtp, vendors=VENDORS,
                     sla={"pause_for_vendor": True})
    mailbox.append(make_mail(USER, SUBJECT, "按电源键没有反应"))
    run_once(desk, clock)
    due = show(desk, capsys)["due_at"]
    step(desk, mailbox, clock, reply(sent_to(smtp, DESK1)[0], DESK1, "转厂商 hp"))
    clock.advance(hours=1)
    step(desk, mailbox, clock, reply(sent_to(smtp, HP)[0], HP, "On our way."))
    later = show(desk, capsys)["due_at"]
    assert later > due, "the time waiting on the vendor moved the deadline"
    step(desk, mailbox, clock, reply(sent_to(smtp, HP)[0], HP, "Fixed on site."))
    assert show(desk, capsys)["due_at"] == later, "only the first reply ends the wait"
    assert report(desk, capsys)["vendors"] == {"hp": {
        "handoffs": 1, "replied": 1, "within_contract": 1, "contract_hours": 4.0,
        "mean_response_hours": 1.17, "max_response_hours": 1.17,
    }}
    desk.close()


# -- category correction ---------------------------------------------------------------


def test_the_desk_corrects_the_category_and_the_sla_follows(
    desk, mailbox, smtp, clock, capsys, opened
):
    before = show(desk, capsys)
    assert (before["category"], before["priority"]) == ("desktop", "P3")
    step(desk, mailbox, clock, reply(opened["l1"], DESK1, "分类 营销系统"))  # by its label
    ticket = show(desk, capsys)
    assert (ticket["category"], ticket["priority"]) == ("marketing", "P2")
    assert ticket["due_at"] < before["due_at"], "re-planned on the P2 target"
    [change] = events(ticket, "category")
    assert change["actor"] == DESK1 and change["detail"] == "desktop → marketing"
    step(desk, mailbox, clock, reply(opened["l1"], DESK1, "priority P1"))
    step(desk, mailbox, clock, reply(opened["l1"], DESK1, "category printer"))  # by its code
    ticket = show(desk, capsys)
    assert (ticket["category"], ticket["priority"]) == ("printer", "P1"), "set by hand: kept"
    assert [e["detail"] for e in events(ticket, "category")] == [
        "desktop → marketing", "marketing → printer"]


CATEGORY_REFUSED = [
    ("user", "分类 network", "只有"),
    ("desk", "category nonsense", "unknown category"),
    ("desk", "分类 desktop", "already"),
]


@pytest.mark.parametrize(("who", "command", "why"), CATEGORY_REFUSED)
def test_category_refused(who, command, why, desk, mailbox, smtp, clock, capsys, opened):
    sender, source = (USER, opened["ack"]) if who == "user" else (DESK1, opened["l1"])
    step(desk, mailbox, clock, reply(source, sender, command))
    ticket = show(desk, capsys)
    assert ticket["category"] == "desktop" and not events(ticket, "category")
    [refused] = events(ticket, "refused")
    assert why in refused["detail"]


def test_a_forged_category_is_not_applied(desk, mailbox, smtp, clock, capsys, opened):
    step(desk, mailbox, clock, forged(DESK1, "分类 network"))
    ticket = show(desk, capsys)
    assert ticket["category"] == "desktop"
    [unproven] = events(ticket, "unproven")
    assert unproven["actor"] == DESK1 and unproven["detail"].startswith("category:")


# -- requests --------------------------------------------------------------------------

LAPTOP = "项类型：笔记本电脑\n申请原因：出差使用\n收货地点：三号仓库\n收货人位置：B座3楼"


def test_a_requests_watcher_hears_of_approval_and_asks_the_state(
    desk, mailbox, smtp, clock, capsys
):
    mailbox.append(make_mail(USER, "申请一台笔记本电脑", LAPTOP, name="张三"))
    run_once(desk, clock)
    step(desk, mailbox, clock, reply(sent_to(smtp, USER)[0], USER, f"抄送 {BOSS}"))
    assert show(desk, capsys, "REQ-1")["watchers"] == [BOSS]
    step(desk, mailbox, clock, reply(sent_to(smtp, "approver@example.test")[0],
                                     "approver@example.test", "同意"))
    approved = sent_to(smtp, BOSS)[-1]
    assert "REQ-1" in str(parsed(approved)["Subject"])
    before = counts(smtp, USER, "exec@example.test", DESK1)
    step(desk, mailbox, clock, reply(approved, BOSS, "状态"))
    assert counts(smtp, USER, "exec@example.test", DESK1) == before
    assert "已批准" in body_of(sent_to(smtp, BOSS)[-1])


def test_the_desk_corrects_a_requests_category(desk, mailbox, smtp, clock, capsys):
    mailbox.append(make_mail(USER, "申请一台笔记本电脑", LAPTOP, name="张三"))
    run_once(desk, clock)
    category = show(desk, capsys, "REQ-1")["category"]
    assert category != "software"
    notice = make_mail(DESK1, "Re: [REQ-1] 申请一台笔记本电脑", "分类 软件")
    step(desk, mailbox, clock, notice)  # unproven: the desk is told how to act
    [told] = [m for m in sent_to(smtp, DESK1) if "请回复本邮件" in str(parsed(m)["Subject"])]
    step(desk, mailbox, clock, reply(told, DESK1, "分类 软件"))
    ticket = show(desk, capsys, "REQ-1")
    assert ticket["category"] == "software"
    assert [e["detail"] for e in events(ticket, "category")] == [f"{category} → software"]
    step(desk, mailbox, clock, reply(sent_to(smtp, USER)[0], USER, "category hardware"))
    assert show(desk, capsys, "REQ-1")["category"] == "software", "the requester may not"

