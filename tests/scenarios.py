"""Fixed scenarios for the digest and report tests, fed through the real pipeline.

Each step is a mail at a given local (Asia/Shanghai) time, stored and processed exactly as
`mailflow ingest` does, so tickets and events are what the desk itself records.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import func, select
from support import desk_config, make_mail

from mailflow import intake, pipeline
from mailflow.config import load_config
from mailflow.desk import Desk
from mailflow.models import Event

SHANGHAI = ZoneInfo("Asia/Shanghai")

RULES = {
    "10-email.toml": ("邮件", "incident", "email", "P2", "L1", False),
    "20-printer.toml": ("打印机", "incident", "printer", "P4", "L1", True),
    "30-oa.toml": ("OA", "incident", "oa", "P3", "L3", False),
    "40-network.toml": ("网络", "incident", "network", "P3", "L1", False),
    "50-desktop.toml": ("电脑", "incident", "desktop", "P3", "L1", True),
    "05-outage.toml": ("全部瘫痪", "incident", "network", "P1", "L2", False),
    "70-request.toml": ("申请", "request", "account", "P4", None, False),
}

SLA = {
    "hours": ["08:30-12:00", "13:30-17:30"],
    "holidays": "CN",
    "warn_at": 0.75,
    "P1": {"response": "15m", "resolve": "4h", "calendar": "24x7"},
    "P2": {"response": "30m", "resolve": "8h", "calendar": "24x7"},
    "P3": {"response": "2h", "resolve": "16h", "calendar": "business"},
    "P4": {"response": "4h", "resolve": "40h", "calendar": "business"},
}


def local(text: str) -> datetime:
    """'2026-10-08 16:00' in Shanghai → aware UTC."""
    return datetime.fromisoformat(text).replace(tzinfo=SHANGHAI).astimezone(UTC)


def write_rules(directory: Path) -> Path:
    """Rules that pin category, priority and tier by one keyword each (plus a default)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, (word, kind, category, priority, tier, desktop) in RULES.items():
        lines = [f'description = "{category}"', "", "[match]", f'any = ["{word}"]', "", "[set]",
                 f'kind = "{kind}"', f'category = "{category}"', f'priority = "{priority}"']
        if kind == "incident":
            lines.append(f"desktop = {'true' if desktop else 'false'}")
        if tier:
            lines.append(f'tier = "{tier}"')
        if kind == "request":
            lines.append(f'request_type = "{category}"')
        if priority == "P1":
            lines.append("major = true")
        (directory / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    (directory / "99-default.toml").write_text(
        'description = "default"\n\n[set]\nkind = "incident"\ncategory = "other"\n'
        'priority = "P3"\ntier = "L1"\ndesktop = true\n',
        encoding="utf-8",
    )
    return directory


MX = "mx.example.test"  # the desk's own MTA: it vouches for every scenario mail (DMARC pass)


def scenario_desk(tmp: Path, **overrides: Any) -> Desk:
    """A desk with the scenario rules and explicit SLA targets (no mail servers needed)."""
    rules = write_rules(tmp / "rules")
    paths = {"rules": str(rules)}
    security = {"trusted_authserv_id": MX, **overrides.pop("security", {})}
    config = desk_config(tmp, sla=SLA, **{"paths": paths, "security": security, **overrides})
    return Desk(load_config(config))


def send(desk: Desk, when: str, sender: str, subject: str, body: str) -> str:
    """One mail at local time `when`, through the pipeline; returns the ticket ref."""
    now = local(when)
    passed = f"{MX}; dmarc=pass header.from={sender.rpartition('@')[2]}"
    raw = make_mail(sender, subject, body, date=now, headers={"Authentication-Results": passed})
    inbound = intake.ingest_bytes(desk, raw, now)
    assert inbound is not None
    outcome = pipeline.process_one(desk, inbound, now)
    assert outcome.state == "processed", outcome
    assert outcome.ticket is not None
    return outcome.ticket.ref


def refused(desk: Desk) -> int:
    with desk.db.sessions() as session:
        return session.scalar(select(func.count(Event.id)).where(Event.action == "refused")) or 0


U1, U2, U3 = "u1@example.test", "u2@example.test", "u3@example.test"
DESK1, L2, IM = "desk1@example.test", "l2@example.test", "im@example.test"


def october(desk: Desk) -> None:
    """Incidents around the 2026 National Day holiday (Oct 1–7 off, Sat Oct 10 worked)."""
    s = lambda *a: send(desk, *a)  # noqa: E731
    # INC-1 P3 network: deadline Thu Oct 9 10:00 (the holiday skipped); resolved Oct 8.
    assert s("2026-09-30 09:00", U2, "网络很慢", "网页打不开") == "INC-1"
    s("2026-09-30 09:30", DESK1, "Re: [INC-1] 网络很慢", "正在排查，请稍候")
    s("2026-10-08 16:00", DESK1, "Re: [INC-1] 网络很慢", "已解决 更换了网线")
    s("2026-10-09 09:00", U2, "Re: [INC-1] 网络很慢", "确认")  # closed: the deadline stays
    # INC-2 P3 desktop: pending a day; deadline moves to Sat Oct 10 16:00 (make-up day).
    assert s("2026-09-30 15:00", U3, "电脑开不了机", "按电源没反应") == "INC-2"
    s("2026-10-08 09:00", DESK1, "Re: [INC-2] 电脑开不了机", "待用户 请问是哪台电脑？")
    s("2026-10-09 09:00", U3, "Re: [INC-2] 电脑开不了机", "是办公室靠窗那台")
    s("2026-10-10 15:00", DESK1, "Re: [INC-2] 电脑开不了机", "已解决 更换了电源")
    # INC-3 P2 (24x7) opened on a holiday evening, resolved, reopened, resolved again.
    assert s("2026-10-03 20:00", U1, "邮件发不出去", "一直报错") == "INC-3"
    s("2026-10-04 02:00", DESK1, "Re: [INC-3] 邮件发不出去", "已解决 重启了邮件网关")
    s("2026-10-04 10:00", U1, "Re: [INC-3] 邮件发不出去", "重开 还是发不出去")
    s("2026-10-04 11:00", DESK1, "Re: [INC-3] 邮件发不出去", "已解决 修复了发送队列")
    # INC-4 P4 printer: escalated to L2, resolved a day late.
    assert s("2026-10-09 10:00", U1, "打印机卡纸", "三楼打印机") == "INC-4"
    s("2026-10-12 09:00", DESK1, "Re: [INC-4] 打印机卡纸", "升级 需要现场处理")
    s("2026-10-15 10:00", U2, "申请新账号", "申请类型: account\n申请原因: 新员工入职")
    s("2026-10-16 10:00", L2, "Re: [INC-4] 打印机卡纸", "已解决 更换了搓纸轮")
    # INC-5 P3 OA (L3): handed to problem management after its deadline (Oct 22 10:00).
    assert s("2026-10-20 09:00", U2, "OA无法登录", "提示密码错误") == "INC-5"
    # INC-6 P3 OA (L3): handed over before its deadline: its incident clock stops.
    assert s("2026-10-21 09:00", U3, "OA流程报错", "审批流程卡住") == "INC-6"
    s("2026-10-21 14:00", IM, "Re: [INC-6] OA流程报错", "转问题 需要厂商分析根因")
    s("2026-10-23 10:00", IM, "Re: [INC-5] OA无法登录", "转问题 反复出现")
    # INC-7 P3 desktop: never resolved; deadline Oct 28 10:00 passes.
    assert s("2026-10-26 09:00", U2, "电脑很卡", "打开文件很慢") == "INC-7"
    # INC-8 P3 network: pending since an hour after it opened: deadline not known.
    assert s("2026-10-28 09:00", U3, "网络掉线", "经常断开") == "INC-8"
    s("2026-10-28 10:00", DESK1, "Re: [INC-8] 网络掉线", "待用户 请提供网口编号")
    # INC-9 P3 network: opened Fri Oct 30 14:00, due Tue Nov 3 15:00 (outside October).
    assert s("2026-10-30 14:00", U1, "网络打不开网页", "浏览器报错") == "INC-9"
    assert refused(desk) == 0, "every scenario command must be applied"


L3, APPROVER = "l3@example.test", "approver@example.test"
DIGEST_TIME = "2026-11-24 08:30"  # Tuesday; "yesterday" is Monday Nov 23


def november(desk: Desk) -> None:
    """Open and closed incidents and a request as they stand on the morning of Nov 24."""
    s = lambda *a: send(desk, *a)  # noqa: E731
    # INC-1 P3 network L1: due Mon Nov 23 10:00, still open (breached yesterday).
    assert s("2026-11-19 09:00", U1, "网络很慢", "网页打不开") == "INC-1"
    # INC-2 P3 desktop L1: 13.5 h of 16 used by Tuesday morning (at risk).
    assert s("2026-11-20 10:00", U2, "电脑蓝屏", "开机蓝屏") == "INC-2"
    # INC-3 P3 network L1: opened and resolved yesterday.
    assert s("2026-11-23 09:00", U3, "网络掉线", "经常断开") == "INC-3"
    s("2026-11-23 11:00", DESK1, "Re: [INC-3] 网络掉线", "已解决 更换了网线")
    # INC-4 P4 printer L1: resolved Friday, reopened yesterday; due Nov 23 15:00 (breached).
    assert s("2026-11-16 09:00", U1, "打印机卡纸", "三楼打印机") == "INC-4"
    s("2026-11-20 16:00", DESK1, "Re: [INC-4] 打印机卡纸", "已解决 清理了卡纸")
    s("2026-11-23 09:00", U1, "Re: [INC-4] 打印机卡纸", "重开 又卡纸了")
    # INC-5 P3 OA at L3, new yesterday.
    assert s("2026-11-23 10:00", U2, "OA无法登录", "提示密码错误") == "INC-5"
    # REQ-1 waiting for approval.
    assert s("2026-11-23 11:00", U3, "申请新账号", "申请类型: account\n申请原因: 新员工入职") \
        == "REQ-1"
    # INC-6 P3 desktop L1: pending since yesterday afternoon.
    assert s("2026-11-23 14:00", U2, "电脑很卡", "打开文件很慢") == "INC-6"
    s("2026-11-23 15:00", DESK1, "Re: [INC-6] 电脑很卡", "待用户 请问是哪台电脑？")
    # INC-7 P1 major outage at L2, escalated to L3 yesterday; due 20:00 (breached).
    assert s("2026-11-23 16:00", U3, "网络全部瘫痪", "整栋楼无法上网") == "INC-7"
    s("2026-11-23 18:00", L2, "Re: [INC-7] 网络全部瘫痪", "升级 核心交换机故障")
    # INC-8 P3 network: resolved within target on Nov 10 (due Nov 11 10:00).
    assert s("2026-11-10 09:00", U1, "网络打不开网页", "浏览器报错") == "INC-8"
    s("2026-11-10 15:00", DESK1, "Re: [INC-8] 网络打不开网页", "已解决 清除了代理设置")
    assert refused(desk) == 0, "every scenario command must be applied"
