"""Loops told by what they look like, people served: over the real Dovecot and SMTP servers.

Two loops that passed every count: another help desk that answers each of our mails with a
fresh acknowledgement 15 minutes later, and a requester and an engineer both away with
auto-replies a few minutes apart on one ticket. Both stop within three of their answers,
with one alert to the lead. And people are not capped like machines: ten real reports in an
hour get ten acknowledgements, and a weekend's backlog drained after an outage is answered
in full.
"""

from __future__ import annotations

import random
from datetime import timedelta
from email.utils import make_msgid

from sqlalchemy import select
from support import body_of, make_mail, parsed, reply, run_once

from mailflow.models import Alert, Event, Ticket

LEAD = "lead@example.test"
OTHER = "support@other-desk.test"


def sent_to(smtp, address: str) -> list:
    return [m for m in smtp.messages if address in m.rcpt_tos]


def loop_alerts(smtp) -> list:
    return [m for m in sent_to(smtp, LEAD) if "loop suspected" in body_of(m.content)]


def events(desk, action: str) -> list[Event]:
    with desk.db.sessions() as session:
        return list(session.scalars(select(Event).where(Event.action == action)))


def tickets(desk) -> int:
    with desk.db.sessions() as session:
        return len(session.scalars(select(Ticket.id)).all())


def _other_desk_ack(number: int, clock) -> bytes:
    """What the other desk sends for each mail it gets: a fresh mail, no tag, no RFC 3834."""
    return make_mail(
        OTHER,
        f"Your request #{number} has been received",
        f"Dear customer,\n\nThank you for contacting Other Corp IT support. Your request has "
        f"been logged as #{number} on {clock.now:%Y-%m-%d %H:%M}. An engineer will contact "
        "you within one business day.\n\nPlease do not reply to this message.\n\n"
        "Other Corp Service Desk",
        date=clock.now,
    )


def test_a_help_desk_acknowledging_each_of_our_mails_stops_within_three_exchanges(
    desk, mailbox, smtp, clock
):
    """12 simulated hours of a desk that answers every mail of ours 15 minutes later."""
    mailbox.append(make_mail(OTHER, "Fwd: printer on floor 3 is broken",
                             "Forwarding a report from our user: the printer on floor 3 "
                             "shows error 50.4 and prints nothing.", date=clock.now))
    due: list[tuple] = []  # (when, number) of the other desk's answers
    answered, number = 0, 1000
    for _ in range(12 * 4):
        for when, n in [d for d in due if d[0] <= clock.now]:
            mailbox.append(_other_desk_ack(n, clock))
            due.remove((when, n))
        run_once(desk, clock)
        ours = sent_to(smtp, OTHER)[answered:]
        answered += len(ours)
        for _mail in ours:
            number += 1
            due.append((clock.now + timedelta(minutes=15), number))
        clock.advance(minutes=15)
    exchanges = number - 1000  # answers the other desk sent us
    assert exchanges <= 3, f"{exchanges} automatic answers in 12 hours"
    assert tickets(desk) <= 3
    assert answered == exchanges, "the answer we withheld ended it"
    assert len(loop_alerts(smtp)) == 1, "the lead is told once"
    assert "loop:" + OTHER in _alert_keys(desk)
    withheld = events(desk, "auto_reply_withheld") + events(desk, "not_mailed")
    assert withheld and all("loop suspected" in e.detail for e in withheld), "recorded"
    assert events(desk, "loop_suspected")


def _alert_keys(desk) -> set[str]:
    with desk.db.sessions() as session:
        return set(session.scalars(select(Alert.key)))


AWAY = {
    "zhang@example.test": "您好，我于11月24日至12月1日休假，期间不能及时回复邮件。紧急事宜请联系"
                          "李明（分机 8123）。谢谢！",
    "desk1@example.test": "Thank you for your email. I am out of the office until Monday "
                          "1 December with limited access to email. For urgent matters please "
                          "call the service desk hotline.",
}


def test_requester_and_engineer_both_away_stop_within_three_exchanges(
    desk, mailbox, smtp, clock
):
    """8 simulated hours: each away message is a threaded reply, unmarked, four minutes after
    the mail it answers, and the desk passes each one on to the other side."""
    requester, engineer = AWAY
    mailbox.append(make_mail(requester, "打印机卡纸", "三楼打印机一直卡纸，无法打印。",
                             date=clock.now))
    run_once(desk, clock)
    notice = sent_to(smtp, engineer)[0]
    clock.advance(minutes=3)
    mailbox.append(reply(notice.content, engineer, "请问是哪一台打印机？型号是什么？"))
    seen, away = len(smtp.messages), 0
    for _ in range(8 * 15):
        run_once(desk, clock)
        new, seen = smtp.messages[seen:], len(smtp.messages)
        clock.advance(minutes=4)
        for mail in new:
            for person in set(mail.rcpt_tos) & set(AWAY):
                mailbox.append(_away_reply(mail.content, person, clock))
                away += 1
    assert away <= 3, f"{away} away messages in 8 hours"
    assert seen == len(smtp.messages), "the exchange has stopped"
    assert len(loop_alerts(smtp)) == 1, "the lead is told once"
    assert events(desk, "loop_suspected") and events(desk, "not_mailed")


def _away_reply(original: bytes, person: str, clock) -> bytes:
    """An unmarked auto-reply that threads: Re: subject, In-Reply-To, no Auto-Submitted."""
    msg = parsed(original)
    our_id = msg["Message-ID"].strip("<>")
    return make_mail(person, "Re: " + str(msg["Subject"]), AWAY[person], in_reply_to=our_id,
                     references=[our_id], date=clock.now)


REPORTS = [
    ("打印机卡纸", "三楼东侧的打印机一直卡纸，取出纸后还是报错。"),
    ("Outlook keeps asking for my password", "Since this morning Outlook prompts me again "
     "and again, even after I type the right password."),
    ("无法连接VPN", "在家用VPN客户端连接时提示：服务器无响应，错误代码 809。"),
    ("显示器闪屏", "工位 305 的显示器每隔几分钟黑屏一次，换了线也一样。"),
    ("Cannot open the billing system", "The billing system page stays blank in Edge; "
     "Chrome shows a certificate warning."),
    ("共享盘 Z 盘打不开", "双击 Z 盘提示找不到网络路径，同事的电脑可以打开。"),
    ("Keyboard missing keys", "The E and R keys on my keyboard stopped working after I "
     "spilled some water on it yesterday."),
    ("申请开通营销系统权限", "新入职同事王芳需要营销系统查询权限，部门经理已同意。"),
    ("Meeting room projector has no signal", "Room 4B's projector says no signal with "
     "every laptop we tried, HDMI and VGA."),
    ("电话分机没有声音", "我的分机 8123 拿起听筒没有拨号音，昨天还正常。"),
]


def test_a_person_filing_ten_real_reports_in_an_hour_gets_ten_acknowledgements(
    desk, mailbox, smtp, clock
):
    person = "busy@example.test"
    gaps = [0, 3, 7, 4, 6, 9, 5, 8, 4, 6]  # minutes between reports: 52 in all
    for gap, (subject, text) in zip(gaps, REPORTS, strict=True):
        clock.advance(minutes=gap)
        mailbox.append(make_mail(person, subject, text, date=clock.now))
        run_once(desk, clock)
    assert tickets(desk) == 10
    assert len(sent_to(smtp, person)) == 10
    assert sent_to(smtp, LEAD) == []


PLACES = ["三楼 305", "二楼财务室", "四楼会议室", "营业厅前台", "调度中心", "仓库",
          "Room 4B", "the 6th floor", "reception", "the billing office"]
THINGS = [("打印机", "printer"), ("电脑", "PC"), ("显示器", "monitor"), ("VPN", "VPN"),
          ("邮箱", "mailbox"), ("营销系统", "billing system"), ("电话", "phone"),
          ("扫描仪", "scanner"), ("OA系统", "OA system"), ("共享盘", "shared drive")]
FAULTS = [("无法开机", "won't start"), ("很慢", "is very slow"), ("报错", "shows an error"),
          ("连不上网络", "cannot reach the network"), ("登录失败", "rejects my login"),
          ("经常死机", "keeps freezing")]


def _backlog(rng: random.Random, start, people: list[str], n: int) -> list[bytes]:
    """n reports written over a weekend by `people`, some in bursts, every body its own."""
    mails, at = [], start
    for i in range(n):
        at += timedelta(minutes=rng.choice([1, 2, 3, 5, 8, 13, 21, 34]))
        person = people[(i // rng.choice([1, 3])) % len(people)] if i % 4 else rng.choice(people)
        (thing_cn, thing_en), (fault_cn, fault_en) = rng.choice(THINGS), rng.choice(FAULTS)
        place = rng.choice(PLACES)
        if rng.random() < 0.5:
            subject, body = f"{place}的{thing_cn}{fault_cn}", (
                f"您好，{place}的{thing_cn}从{at:%H点%M分}开始{fault_cn}，"
                f"资产编号 {rng.randint(10000, 99999)}，重启后仍然不行。请尽快处理，谢谢！")
        else:
            subject, body = f"The {thing_en} in {place} {fault_en}", (
                f"Hello, the {thing_en} in {place} {fault_en} since {at:%H:%M}. Asset tag "
                f"{rng.randint(10000, 99999)}; restarting did not help. Ticket for my team, "
                "thanks.")
        mails.append(make_mail(person, subject, body, date=at,
                               message_id=make_msgid(f"b{i}", "example.test")))
    return mails


def test_a_backlog_drained_after_an_outage_acknowledges_every_real_report(
    desk, mailbox, smtp, clock
):
    """240 reports from 30 people written over a weekend, fetched at once on Monday."""
    rng = random.Random(15)
    people = [f"user{i:02d}@example.test" for i in range(30)]
    weekend = clock.now - timedelta(days=2, hours=12)
    mails = _backlog(rng, weekend, people, 240)
    for mail in mails:
        mailbox.append(mail)
    run_once(desk, clock)
    assert tickets(desk) == 240
    acks = sum(len(sent_to(smtp, person)) for person in people)
    assert acks == 240, f"{acks} of 240 reports acknowledged"
    assert sent_to(smtp, LEAD) == []
