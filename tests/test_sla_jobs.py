"""SLA jobs over the real IMAP and SMTP servers, with the Clock moved by hand (never slept).

The calendar arithmetic itself is tested in test_sla.py; here: which calendar each priority
runs on, that `pending` stops the clock and moves `due_at`, that the warning at 75 % and the
escalation at 100 % happen once — also across a restart and with two daemons at once — and
that a response breach is recorded once.
"""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime

from apscheduler.triggers.interval import IntervalTrigger
from scenarios import local, scenario_desk, send
from support import Clock, body_of, make_desk, make_mail, parsed, reply, run_once
from test_sla import _brute_due, _brute_minutes

from mailflow import incidents, jobs, sla, sla_jobs
from mailflow.cli import main
from mailflow.daemon import Daemon
from mailflow.models import Ticket
from mailflow.tickets import record

USER = "zhang.san@example.test"


def shanghai(day: int, hour: int, minute: int = 0, month: int = 11) -> datetime:
    """An instant given in Shanghai wall time (UTC+8) in 2026."""
    return datetime(2026, month, day, hour, minute, tzinfo=UTC) - (
        datetime(2026, 1, 1, 8, tzinfo=UTC) - datetime(2026, 1, 1, tzinfo=UTC)
    )


def show(desk, capsys, ref: str = "INC-1") -> dict:
    capsys.readouterr()
    assert main(["--config", str(desk.settings.path), "show", ref, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def sent_to(smtp, address: str) -> list[bytes]:
    return [m.content for m in smtp.messages if address in m.rcpt_tos]


def subject_of(raw: bytes) -> str:
    return str(parsed(raw)["Subject"])


def subjects(smtp, address: str) -> list[str]:
    return [subject_of(raw) for raw in sent_to(smtp, address)]


def actions(ticket: dict) -> list[str]:
    return [e["action"] for e in ticket["events"]]


def report(desk, mailbox, clock, subject: str, body: str, sender: str = USER) -> None:
    mailbox.append(make_mail(sender, subject, body))
    run_once(desk, clock)


def answer(desk, mailbox, clock, to: bytes, sender: str, body: str) -> None:
    mailbox.append(reply(to, sender, body))
    run_once(desk, clock)


def scan(desk, clock) -> sla_jobs.ScanResult:
    """One run of the job, then one daemon pass to deliver what it queued."""
    result = sla_jobs.scan(desk, clock())
    run_once(desk, clock)
    return result


def stamps(desk, number: int = 1) -> tuple:
    with desk.db.sessions() as session:
        t = session.query(Ticket).filter(Ticket.number == number).one()
        return t.sla_warned_at, t.sla_breached_at, t.response_breached_at


# A desktop P3 incident opened Tue 24 Nov 2026 10:00 (Shanghai) has 16 working hours
# (08:30-12:00, 13:30-17:30): 75 % is used at Wed 16:00, all of it at Thu 11:00.


def test_warning_at_75_percent_goes_to_the_tier_once_also_after_a_restart(
    desk, mailbox, smtp, clock, capsys, tmp_path
):
    report(desk, mailbox, clock, "我的电脑蓝屏了", "开机后蓝屏。")
    assert show(desk, capsys)["due_at"] == "2026-11-26T03:00:00Z"

    clock.now = shanghai(25, 15, 59)
    assert scan(desk, clock).warned == []
    clock.now = shanghai(25, 16, 0)
    assert scan(desk, clock).warned == ["INC-1"]
    for person in ("desk1@example.test", "desk2@example.test"):
        assert any("SLA 预警 75%" in s for s in subjects(smtp, person)), person
    assert not sent_to(smtp, "im@example.test")
    assert stamps(desk)[0] == shanghai(25, 16, 0)

    clock.advance(minutes=1)
    assert scan(desk, clock).warned == []
    restarted = make_desk(tmp_path, mailbox=mailbox, smtp=smtp)  # same database, new process
    try:
        again = Clock(clock.now)
        assert scan(restarted, again).warned == []
    finally:
        restarted.close()
    ticket = show(desk, capsys)
    assert actions(ticket).count("sla_warning") == 1
    assert sum("SLA 预警" in s for s in subjects(smtp, "desk1@example.test")) == 1


def test_breach_escalates_to_the_next_tier_and_tells_the_incident_manager_once(
    desk, mailbox, smtp, clock, capsys, tmp_path
):
    report(desk, mailbox, clock, "我的电脑蓝屏了", "开机后蓝屏。")
    answer(desk, mailbox, clock, sent_to(smtp, "desk1@example.test")[-1], "desk1@example.test",
           "指派 desk2@example.test")
    clock.now = shanghai(26, 10, 59)
    result = scan(desk, clock)
    assert (result.warned, result.breached) == (["INC-1"], [])
    clock.now = shanghai(26, 11, 0)
    result = scan(desk, clock)
    assert (result.warned, result.breached) == ([], ["INC-1"])

    ticket = show(desk, capsys)
    assert (ticket["tier"], ticket["assignee"]) == ("L2", None)  # desktop path: L1 → L2
    escalated = [e for e in ticket["events"] if e["action"] == "escalated"]
    assert len(escalated) == 1 and escalated[0]["actor"] == "mailflow"
    to_l2 = sent_to(smtp, "l2@example.test")
    assert len(to_l2) == 1 and "自动升级" in body_of(to_l2[0])
    to_im = sent_to(smtp, "im@example.test")
    assert len(to_im) == 1 and "SLA 超时" in str(parsed(to_im[0])["Subject"])
    assert "一线 服务台 自动升级至 二线 桌面支持" in body_of(to_im[0])

    clock.advance(hours=5)
    assert scan(desk, clock).breached == []
    restarted = make_desk(tmp_path, mailbox=mailbox, smtp=smtp)
    try:
        assert scan(restarted, Clock(clock.now)).breached == []
    finally:
        restarted.close()
    assert len(sent_to(smtp, "im@example.test")) == 1
    assert len(sent_to(smtp, "l2@example.test")) == 1
    assert actions(show(desk, capsys)).count("sla_breached") == 1


def test_a_breach_with_no_warning_before_it_sends_no_late_warning(desk, mailbox, smtp, clock,
                                                                  capsys):
    report(desk, mailbox, clock, "我的电脑蓝屏了", "开机后蓝屏。")
    clock.now = shanghai(26, 12, 0)  # the daemon was down from before 75 % until after 100 %
    result = scan(desk, clock)
    assert (result.warned, result.breached) == ([], ["INC-1"])
    clock.advance(minutes=1)
    assert scan(desk, clock).warned == []
    assert not any("SLA 预警" in s for s in subjects(smtp, "desk1@example.test"))
    assert stamps(desk)[0] is not None


def test_at_the_top_tier_a_breach_only_tells_the_incident_manager(desk, mailbox, smtp, clock,
                                                                  capsys):
    report(desk, mailbox, clock, "Outlook 无法发送邮件", "点击发送后报错 0x800CCC0E")
    answer(desk, mailbox, clock, sent_to(smtp, "desk1@example.test")[-1], "desk1@example.test",
           "升级")
    answer(desk, mailbox, clock, sent_to(smtp, "l3@example.test")[-1], "l3@example.test", "升级")
    assert show(desk, capsys)["tier"] == "IM"
    clock.now = shanghai(26, 11, 0)
    assert scan(desk, clock).breached == ["INC-1"]
    ticket = show(desk, capsys)
    assert ticket["tier"] == "IM"
    assert actions(ticket).count("escalated") == 2  # only the two by command
    breach = [m for m in sent_to(smtp, "im@example.test") if "SLA 超时" in subject_of(m)]
    assert len(breach) == 1 and "最高处理层级" in body_of(breach[0])


def test_p1_runs_around_the_clock_and_p3_only_in_working_hours(desk, mailbox, smtp, clock,
                                                               capsys):
    clock.now = shanghai(27, 20, 0)  # Friday evening
    report(desk, mailbox, clock, "营销系统瘫痪", "营销系统宕机，所有人都无法登录。")
    report(desk, mailbox, clock, "我的电脑蓝屏了", "开机后蓝屏。")
    p1, p3 = show(desk, capsys, "INC-1"), show(desk, capsys, "INC-2")
    assert (p1["priority"], p3["priority"]) == ("P1", "P3")
    assert p1["due_at"] == "2026-11-27T16:00:00Z"  # Sat 00:00: 4 h straight through the night
    # 16 working hours from Friday night: Mon 7.5 + Tue 7.5 + Wed 08:30-09:30.
    assert p3["due_at"] == "2026-12-02T01:30:00Z"

    clock.now = shanghai(27, 23, 0)
    assert scan(desk, clock).warned == ["INC-1"]
    clock.now = shanghai(28, 0, 0)
    result = scan(desk, clock)
    assert (result.breached, result.warned) == (["INC-1"], [])
    assert show(desk, capsys, "INC-1")["tier"] == "L3"  # major non-desktop: L2 → L3
    clock.now = shanghai(1, 17, 30, month=12)  # Tue evening: 15 of 16 working hours used
    assert scan(desk, clock).warned == ["INC-2"]
    clock.now = shanghai(2, 9, 29, month=12)
    assert scan(desk, clock).breached == []
    clock.now = shanghai(2, 9, 30, month=12)
    assert scan(desk, clock).breached == ["INC-2"]


def test_pending_stops_the_clock_and_due_at_moves_by_the_paused_time(desk, mailbox, smtp, clock,
                                                                      capsys):
    report(desk, mailbox, clock, "我的电脑蓝屏了", "开机后蓝屏。")
    clock.now = shanghai(24, 11, 0)
    answer(desk, mailbox, clock, sent_to(smtp, "desk1@example.test")[-1], "desk1@example.test",
           "待用户\n请提供蓝屏时屏幕上的错误代码。")
    assert show(desk, capsys)["status"] == "pending"
    question = sent_to(smtp, USER)[-1]
    assert "错误代码" in body_of(question)

    clock.now = shanghai(26, 12, 0)  # past the original deadline (Thu 11:00), but paused
    result = scan(desk, clock)
    assert (result.warned, result.breached) == ([], [])

    answer(desk, mailbox, clock, question, USER, "错误代码是 0x0000007B")
    ticket = show(desk, capsys)
    assert ticket["status"] == "open"
    # 1 h ran before the pause; 15 h remain from Thu 12:00: Thu 4 + Fri 7.5 + Mon 3.5.
    assert ticket["due_at"] == "2026-11-30T04:00:00Z"  # Mon 12:00 Shanghai
    assert [e["detail"] for e in ticket["events"] if e["action"] == "status"] == [
        "open → pending", "pending → open (requester answered)",
    ]

    clock.now = shanghai(27, 16, 59)
    assert scan(desk, clock).warned == []
    clock.now = shanghai(27, 17, 0)  # 12 h used: 1 + Thu 4 + Fri 7
    assert scan(desk, clock).warned == ["INC-1"]
    clock.now = shanghai(30, 11, 59)
    assert scan(desk, clock).breached == []
    clock.now = shanghai(30, 12, 0)
    assert scan(desk, clock).breached == ["INC-1"]


def test_a_missed_response_target_is_recorded_once(desk, mailbox, smtp, clock, capsys):
    # P3: respond within 2 working hours — Tue 10:00 → Tue 12:00.
    report(desk, mailbox, clock, "我的电脑蓝屏了", "开机后蓝屏。", sender="a@example.test")
    report(desk, mailbox, clock, "电脑很卡", "电脑运行慢。", sender="b@example.test")
    report(desk, mailbox, clock, "Outlook 无法发送邮件", "报错 0x800CCC0E", sender="c@example.test")
    notices = sent_to(smtp, "desk1@example.test")
    clock.now = shanghai(24, 11, 0)
    answer(desk, mailbox, clock, notices[1], "desk1@example.test", "请重启后再试。")

    clock.now = shanghai(24, 11, 59)
    assert scan(desk, clock).response_breached == []
    clock.now = shanghai(24, 12, 1)
    # INC-3 is answered late before the job runs: the reply itself records the breach.
    answer(desk, mailbox, clock, sent_to(smtp, "desk2@example.test")[2], "desk2@example.test",
           "正在查看。")
    assert scan(desk, clock).response_breached == ["INC-1"]
    clock.now = shanghai(24, 14, 0)
    assert scan(desk, clock).response_breached == []
    answer(desk, mailbox, clock, notices[0], "desk1@example.test", "马上处理。")
    assert scan(desk, clock).response_breached == []

    late, on_time, late_reply = (show(desk, capsys, f"INC-{n}") for n in (1, 2, 3))
    assert actions(late).count("response_breached") == 1
    assert "response_breached" not in actions(on_time)
    assert actions(late_reply).count("response_breached") == 1
    assert stamps(desk, 2)[2] is None


def test_two_daemons_scanning_at_the_same_moment_warn_once(desk, mailbox, smtp, clock, capsys,
                                                           tmp_path):
    report(desk, mailbox, clock, "我的电脑蓝屏了", "开机后蓝屏。")
    other = make_desk(tmp_path, mailbox=mailbox, smtp=smtp)
    now = shanghai(25, 16, 0)
    barrier = threading.Barrier(2)
    results: list[sla_jobs.ScanResult] = []

    def run(d) -> None:
        barrier.wait()
        results.append(sla_jobs.scan(d, now))

    try:
        threads = [threading.Thread(target=run, args=(d,)) for d in (desk, other)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    finally:
        other.close()
    assert sorted(r.warned for r in results) == [[], ["INC-1"]]
    clock.now = now
    run_once(desk, clock)
    assert sum("SLA 预警" in s for s in subjects(smtp, "desk1@example.test")) == 1
    assert actions(show(desk, capsys)).count("sla_warning") == 1


def test_the_jobs_run_every_minute_in_the_daemon(desk):
    by_name = {job.name: job for job in jobs.load_all()}
    for name in ("sla-scan", "incident-auto-close"):
        trigger = by_name[name].trigger(desk)
        assert isinstance(trigger, IntervalTrigger)
        assert trigger.interval.total_seconds() == 60
        assert by_name[name].catch_up
    scheduler = Daemon(desk)._scheduler()
    assert {"sla-scan", "incident-auto-close"} <= {j.id for j in scheduler.get_jobs()}


def test_pauses_come_from_the_status_events_and_due_at_matches_a_minute_count(desk):
    """Around National Day 2026 (10-01..10-07 off, Saturday 10-10 a make-up working day)."""
    opened = shanghai(30, 10, 0, month=9)
    changes = [  # (when, new status)
        (shanghai(30, 11, 0, month=9), "pending"),
        (shanghai(8, 10, 0, month=10), "open"),
        (shanghai(9, 9, 0, month=10), "resolved"),
        (shanghai(9, 10, 0, month=10), "open"),
        (shanghai(10, 11, 0, month=10), "pending"),  # still waiting on the make-up Saturday
    ]
    now = shanghai(10, 12, 0, month=10)
    with desk.db.transaction() as session:
        ticket = Ticket(kind="incident", number=1, status="open", priority="P3",
                        category="desktop", tier="L1", rule="r", requester=USER, subject="s",
                        created_at=opened, updated_at=opened)
        session.add(ticket)
        session.flush()
        old = "open"
        for at, new in changes:
            record(session, ticket, "status", USER, at, "", old=old, new=new)
            old = new
        record(session, ticket, "comment", USER, now, "not a status change")
        paused = incidents.pauses(session, ticket)
        at = [when for when, _ in changes]
        assert paused == [(at[0], at[1]), (at[2], at[3]), (at[4], None)]
        incidents.refresh_due(session, desk, ticket, now)
        closed = [(a, b or now) for a, b in paused]
        cal = desk.calendar("P3")
        assert ticket.due_at == _brute_due(cal, opened, 16 * 60, closed)
        used = 60 * _brute_minutes(cal, opened, now, closed)
        assert sla.elapsed(cal, opened, now, paused) == used


def test_a_new_priority_re_plans_the_warning_and_the_breach(tmp_path):
    """P2 (8 h, 24x7) warned at 75%, then lowered to P3 (16 business hours): the incident is
    judged as if it had been P3 all along, so P3's warning and breach are still to come."""
    desk = scenario_desk(tmp_path)
    send(desk, "2026-11-02 09:00", "u1@example.test", "邮件发不出去", "发送时报错")  # P2
    assert sla_jobs.scan(desk, local("2026-11-02 15:01")).warned == ["INC-1"]  # 6 h of 8
    send(desk, "2026-11-02 15:30", "desk1@example.test", "Re: [INC-1] 邮件发不出去",
         "优先级 P3")
    # P3 counts working hours only (08:30-12:00, 13:30-17:30): 5 h used by then, 31%.
    # 75% (12 h) comes on Tuesday at 15:00, 100% (16 h) on Wednesday at 10:00.
    assert sla_jobs.scan(desk, local("2026-11-02 17:00")).warned == []
    assert sla_jobs.scan(desk, local("2026-11-03 14:59")).warned == []
    assert sla_jobs.scan(desk, local("2026-11-03 15:00")).warned == ["INC-1"]
    assert sla_jobs.scan(desk, local("2026-11-04 09:59")).breached == []
    assert sla_jobs.scan(desk, local("2026-11-04 10:00")).breached == ["INC-1"]
    desk.close()
