"""Daily digests: content by role, one per person per day, catching up after downtime.

The November scenario (tests/scenarios.py) is the desk on the morning of Tuesday Nov 24,
2026 (digest time 08:30 Asia/Shanghai); "yesterday" is Monday Nov 23.
"""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path

import pytest
from scenarios import DIGEST_TIME, U1, U2, local, november, scenario_desk, send
from sqlalchemy import func, select
from support import DESK, body_of, make_desk, make_mail, parsed, reply, run_once

from mailflow import digest, jobs, metrics
from mailflow.cli import main
from mailflow.config import ConfigError
from mailflow.desk import Desk
from mailflow.models import Inbound, JobRun, Outbox, Ticket

NOW = local(DIGEST_TIME)
EXPECTED = {
    "im@example.test": "manager",
    "lead@example.test": "manager",
    "approver@example.test": "approver",
    "desk1@example.test": "engineer",
    "desk2@example.test": "engineer",
    "l3@example.test": "engineer",
}


@pytest.fixture
def nov_desk(tmp_path: Path):
    desk = scenario_desk(tmp_path)
    november(desk)
    yield desk
    desk.close()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, digest.DigestItem]:
    """The morning's digests, built once (the desk is closed before any test runs)."""
    desk = scenario_desk(tmp_path_factory.mktemp("november"))
    try:
        november(desk)
        items = digest.run_digests(desk, NOW, dry_run=True)
    finally:
        desk.close()
    assert len(items) == len({i.recipient for i in items}), "one digest per person"
    return {item.recipient: item for item in items}


def _lines(text: str, start: str) -> list[str]:
    """The indented lines of the section whose heading starts with `start`."""
    lines = text.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith(start))
    out = []
    for line in lines[first + 1 :]:
        if not line.startswith("  "):
            break
        out.append(line.strip())
    return out


def _refs(section: list[str]) -> list[str]:
    return [line.split()[0] for line in section if line.startswith(("INC-", "REQ-"))]


def test_who_gets_a_digest(built):
    # l2 owns nothing (the major incident went on to L3) and holds no other role: no mail.
    assert {r: i.role for r, i in built.items()} == EXPECTED
    assert built["im@example.test"].roles == ("manager", "engineer")


def test_engineer_digest_own_tier_oldest_first_with_sla_state(built):
    text = built["desk1@example.test"].text
    queue = _lines(text, "您负责的未解决事件")
    assert _refs(queue) == ["INC-4", "INC-1", "INC-2", "INC-6"]  # by creation, oldest first
    by_ref = {line.split()[0]: line for line in queue if line.startswith("INC-")}
    # INC-4 P4: 35.5 h to Friday 16:00, paused while resolved, 7 h since Monday's reopen.
    assert "已超时（已用 106%）" in by_ref["INC-4"] and "已等待 7天23小时" in by_ref["INC-4"]
    assert "时限 2026-11-23 15:00" in by_ref["INC-4"]
    assert "已超时（已用 138%）" in by_ref["INC-1"]  # 22 of 16 business hours
    assert "即将超时（已用 84%）" in by_ref["INC-2"]  # 13.5 of 16: past the 75% warning
    assert "时限 2026-11-24 11:00" in by_ref["INC-2"]
    assert "正常（已用 6%）" in by_ref["INC-6"] and "暂停中" in by_ref["INC-6"]
    assert "[待用户]" in by_ref["INC-6"]
    assert "（4 件：已超时 2，即将超时 1，正常 1）" in text
    assert "INC-5" not in text and "INC-7" not in text  # L3's, not L1's
    assert "第一行写命令" in text
    subject = built["desk1@example.test"].subject
    assert subject == "每日待办 2026-11-24：4 件未解决事件，2 件已超时"
    assert built["desk2@example.test"].text.replace("desk2", "desk1") == text


def test_l3_digest(built):
    text = built["l3@example.test"].text
    queue = _lines(text, "您负责的未解决事件")
    assert _refs(queue) == ["INC-5", "INC-7"]
    major = next(line for line in queue if line.startswith("INC-7"))
    assert "【重大】" in major and "已超时（已用 412%）" in major  # 16.5 h of a 4 h P1


def test_approver_digest_with_how_to_answer(built):
    item = built["approver@example.test"]
    assert item.subject == "每日待审批 2026-11-24：1 件服务请求等待您审批"
    section = _lines(item.text, "待您审批的服务请求")
    assert _refs(section) == ["REQ-1"]
    assert "申请人 u3@example.test" in section[1] and "已等待 21小时30分" in section[1]
    assert "回复该申请的审批邮件（主题含 [REQ-1]），第一行写“同意”，或“驳回 原因”" in item.text
    assert "INC-" not in item.text


def test_manager_digest_figures(built):
    item = built["im@example.test"]
    text = item.text
    assert item.subject == "事件管理日报 2026-11-23：目标事件达成率 0.0%（本月 25.0%），未解决 6"
    assert "新登记事件 4（重大 1），新服务请求 1" in text
    assert "已解决 1，重开 1，升级 1 次，转问题管理 0" in text
    # Due yesterday: INC-1 (10:00), INC-4 (15:00), INC-7 (20:00) — none resolved.
    assert "到期事件 3，按时解决 0，超时 3" in text
    assert "目标事件达成率（昨日）：0.0%" in text
    # Month to date adds INC-8, due Nov 11 and resolved the day before.
    assert "至 2026-11-23）：25.0%（到期 4，按时 1）" in text
    assert "当前未解决事件：6（已超时 3，即将超时 1）" in text
    table = _lines(text, "当前未解决事件")
    assert table[1].split() == ["L1", "0", "0", "3", "1", "4"]
    assert table[2].split() == ["L3", "1", "0", "1", "0", "2"]
    assert table[3].split() == ["合计", "1", "0", "4", "1", "6"]
    assert _refs(_lines(text, "重大事件")) == ["INC-7"]
    assert _refs(_lines(text, "昨日超时")) == ["INC-4", "INC-1", "INC-7"]
    assert _refs(_lines(text, "昨日升级")) == ["INC-7"]
    assert _refs(_lines(text, "昨日重开")) == ["INC-4"]
    assert _refs(_lines(text, "昨日新事件")) == ["INC-3", "INC-5", "INC-6", "INC-7"]
    resolved = _lines(text, "昨日解决")
    assert _refs(resolved) == ["INC-3"] and "已于 2026-11-23 11:00 CST 解决（按时" in resolved[0]
    assert built["lead@example.test"].text.replace("lead@", "im@") == text


def test_long_lists_show_the_oldest_rows_and_count_all(tmp_path, monkeypatch):
    """A backlog of thousands must not make a mail of thousands of lines (nor hold a row
    per incident in memory): `max_rows` rows are listed, the counts still cover all."""
    monkeypatch.setattr(digest, "LISTED", 2)  # the managers' lists, normally 20
    desk = scenario_desk(tmp_path, digest={"max_rows": 2})
    try:
        november(desk)
        items = {i.recipient: i for i in digest.run_digests(desk, NOW, dry_run=True)}
    finally:
        desk.close()
    engineer = items["desk1@example.test"]
    assert engineer.subject == "每日待办 2026-11-24：4 件未解决事件，2 件已超时"
    assert "（4 件：已超时 2，即将超时 1，正常 1）" in engineer.text
    queue = _lines(engineer.text, "您负责的未解决事件")
    assert _refs(queue) == ["INC-4", "INC-1"]  # the oldest two of four
    assert "……另有 2 件未列出 / and 2 more not listed" in queue
    manager = items["im@example.test"].text
    new = _lines(manager, "昨日新事件")
    assert "昨日新事件（4）：" in manager
    assert _refs(new) == ["INC-3", "INC-5"] and new[-1] == "……另有 2 件"
    assert _refs(_lines(manager, "重大事件")) == ["INC-7"]  # a short list: no "more" line
    assert "另有" not in "\n".join(_lines(manager, "重大事件"))


def test_reading_a_few_incidents_at_a_time_gives_the_same_digests(tmp_path, monkeypatch):
    """Digests read the incidents in chunks so memory stays flat however many are open;
    chunks of one (with two incidents opened in the same instant) change no figure."""
    desk = scenario_desk(tmp_path)
    try:
        november(desk)
        send(desk, "2026-11-23 18:00", U1, "打印机不能用", "三楼打印机")
        send(desk, "2026-11-23 18:00", U2, "电脑很慢", "开机要十分钟")
        whole = {i.recipient: i for i in digest.run_digests(desk, NOW, dry_run=True)}
        monkeypatch.setattr(metrics, "FACTS_CHUNK", 1)
        chunked = {i.recipient: i for i in digest.run_digests(desk, NOW, dry_run=True)}
    finally:
        desk.close()
    assert "当前未解决事件：8" in whole["im@example.test"].text
    assert {r: (i.subject, i.text) for r, i in chunked.items()} == {
        r: (i.subject, i.text) for r, i in whole.items()
    }


def test_max_rows_must_be_positive(tmp_path):
    with pytest.raises(ConfigError, match="digest.max_rows"):
        scenario_desk(tmp_path, digest={"max_rows": 0})


def test_figures_agree_with_the_report(nov_desk):
    from datetime import date

    from mailflow import report

    day = report.compute(nov_desk, date(2026, 11, 23), date(2026, 11, 23), NOW)
    month = report.compute(nov_desk, date(2026, 11, 1), date(2026, 11, 23), NOW)
    assert (day["incidents"], day["resolved_within_target"], day["opened"]) == (3, 0, 4)
    assert (month["incidents"], month["resolved_within_target"]) == (4, 1)
    assert month["target_achievement_rate"] == 0.25


def test_english_digest(tmp_path):
    desk = scenario_desk(tmp_path, desk={"language": "en"})
    november(desk)
    items = {i.recipient: i for i in digest.run_digests(desk, NOW, dry_run=True)}
    assert items["desk1@example.test"].subject == (
        "Daily digest 2026-11-24: 4 open incidents, 2 breached"
    )
    assert "BREACHED (138% used)" in items["desk1@example.test"].text
    assert "AT RISK (84% used)" in items["desk1@example.test"].text
    assert "reply to that request's approval mail" in items["approver@example.test"].text
    manager = items["lead@example.test"]
    assert "Target achievement rate month to date (2026-11-01 to 2026-11-23): 25.0% (1 of 4)" \
        in manager.text
    desk.close()


# -- empty digests ------------------------------------------------------------------------


def test_nobody_gets_an_empty_digest_unless_configured(tmp_path):
    quiet = scenario_desk(tmp_path / "quiet")
    assert digest.run_digests(quiet, NOW) == []
    with quiet.db.sessions() as session:
        assert session.scalar(select(func.count(Outbox.id))) == 0
    quiet.close()
    chatty = scenario_desk(tmp_path / "chatty", digest={"send_empty": True})
    items = digest.run_digests(chatty, NOW)
    assert {i.recipient for i in items} == {
        *EXPECTED, "l2@example.test"
    }
    l2 = next(i for i in items if i.recipient == "l2@example.test")
    assert "今天没有需要您处理的事项" in l2.text
    chatty.close()


# -- once per person per day --------------------------------------------------------------


def _digest_rows(desk: Desk) -> list[tuple[str, str]]:
    with desk.db.sessions() as session:
        rows = session.execute(
            select(Outbox.recipient, Outbox.template).where(Outbox.template.like("digest_%"))
        ).all()
    return sorted((r, t) for r, t in rows)


def test_one_digest_per_person_per_day_across_a_restart(tmp_path):
    desk = scenario_desk(tmp_path)
    november(desk)
    first = digest.run_scheduled(desk, NOW)
    assert {i.recipient for i in first} == set(EXPECTED)
    desk.close()
    restarted = Desk(desk.settings)  # the daemon restarts across the hour
    assert digest.run_scheduled(restarted, NOW + timedelta(minutes=5)) == []
    assert digest.run_digests(restarted, NOW + timedelta(hours=6)) == []  # `mailflow digest`
    assert digest.run_digests(restarted, NOW, dry_run=True) == []  # nothing left to send
    rows = _digest_rows(restarted)
    assert len(rows) == len(EXPECTED) and {r for r, _ in rows} == set(EXPECTED)
    assert ("desk1@example.test", "digest_engineer") in rows
    assert ("approver@example.test", "digest_approver") in rows
    assert ("lead@example.test", "digest_manager") in rows
    # The next day everyone gets the next one.
    assert len(digest.run_scheduled(restarted, NOW + timedelta(days=1))) == len(EXPECTED)
    assert len(_digest_rows(restarted)) == 2 * len(EXPECTED)
    with restarted.db.sessions() as session:
        keys = set(session.scalars(select(JobRun.key).where(JobRun.job == "digest")))
    assert "2026-11-24:desk1@example.test" in keys and "2026-11-25:desk1@example.test" in keys
    restarted.close()


def test_two_daemons_on_one_database_send_each_digest_once(tmp_path):
    desk = scenario_desk(tmp_path)
    november(desk)
    daemons = [desk, Desk(desk.settings)]
    results: list[list[digest.DigestItem]] = [[], []]
    start = threading.Barrier(2)

    def run(index: int) -> None:
        start.wait()
        results[index] = digest.run_scheduled(daemons[index], NOW + timedelta(seconds=index))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sent = [i.recipient for r in results for i in r]
    assert sorted(sent) == sorted(EXPECTED)  # each person by exactly one of the daemons
    assert len(_digest_rows(desk)) == len(EXPECTED)
    for d in daemons:
        d.close()


def test_a_daemon_down_at_the_hour_sends_when_it_comes_back(tmp_path):
    desk = scenario_desk(tmp_path)
    november(desk)
    assert digest.run_scheduled(desk, local("2026-11-24 08:29")) == []  # not yet
    assert _digest_rows(desk) == []
    # Down from 08:00 to 14:00: the job catches up at start.
    job = next(j for j in jobs.load_all() if j.name == "digest")
    assert job.catch_up
    caught = job.run(desk, local("2026-11-24 14:00"))
    assert {i.recipient for i in caught} == set(EXPECTED)
    desk.close()


def test_digest_job_fires_at_the_configured_local_time(tmp_path):
    desk = scenario_desk(tmp_path, digest={"time": "07:45"})
    job = next(j for j in jobs.load_all() if j.name == "digest")
    trigger = job.trigger(desk)
    assert trigger.get_next_fire_time(None, local("2026-11-24 08:00")) == local("2026-11-25 07:45")
    assert digest.due(desk, local("2026-11-24 07:45"))
    assert not digest.due(desk, local("2026-11-24 07:44"))
    desk.close()


def test_digest_off_sends_none_on_schedule_but_builds_on_demand(tmp_path):
    desk = scenario_desk(tmp_path, digest={"time": "off"})
    try:
        november(desk)
        assert not digest.due(desk, local("2026-11-24 23:59"))
        assert digest.run_scheduled(desk, local("2026-11-24 23:59")) == []
        with desk.db.sessions() as session:
            assert session.scalar(select(func.count()).select_from(JobRun)) == 0
        built = digest.run_digests(desk, NOW, dry_run=True)  # `mailflow digest --dry-run`
        assert {item.recipient for item in built} == set(EXPECTED)
    finally:
        desk.close()


# -- the CLI and the real servers ---------------------------------------------------------


def test_cli_digest_dry_run_builds_without_queueing(tmp_path, capsys):
    desk = scenario_desk(tmp_path)
    november(desk)
    config = str(desk.settings.path)
    capsys.readouterr()
    assert main(["--config", config, "digest", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would send engineer digest → desk1@example.test" in out
    assert "would send manager digest → im@example.test" in out
    assert "INC-4" in out
    assert _digest_rows(desk) == []
    assert main(["--config", config, "digest"]) == 0
    assert "queued approver digest → approver@example.test" in capsys.readouterr().out
    assert len(_digest_rows(desk)) == len(EXPECTED)
    assert main(["--config", config, "digest"]) == 0
    assert "no digest due" in capsys.readouterr().out
    desk.close()


def test_end_to_end_mail_in_digest_out(tmp_path: Path, mailbox, smtp, clock):
    desk = make_desk(tmp_path, mailbox=mailbox, smtp=smtp)
    mailbox.append(make_mail("zhang.san@example.test", "我的电脑蓝屏了", "开机后蓝屏",
                             name="张三", date=clock.now))
    run_once(desk, clock)  # Tue Nov 24 10:00: INC-1 opened, notices sent
    smtp.messages.clear()
    clock.advance(days=1, minutes=-90)  # Wed 08:30
    digest.run_scheduled(desk, clock.now)
    run_once(desk, clock)  # relays the queued digests
    to_desk1 = [m for m in smtp.messages if "desk1@example.test" in m.rcpt_tos]
    assert len(to_desk1) == 1
    msg = parsed(to_desk1[0].content)
    assert msg["Auto-Submitted"] == "auto-generated"
    assert msg["From"].addresses[0].addr_spec == DESK
    assert str(msg["Subject"]).startswith("每日待办 2026-11-25：1 件未解决事件")
    body = body_of(to_desk1[0].content)
    assert "INC-1" in body and "我的电脑蓝屏了" in body and "zhang.san@example.test" in body
    managers = [m for m in smtp.messages if "im@example.test" in m.rcpt_tos]
    assert len(managers) == 1 and "新登记事件 1" in body_of(managers[0].content)
    # A second pass the same day sends nothing more.
    before = len(smtp.messages)
    digest.run_scheduled(desk, clock.advance(hours=2))
    run_once(desk, clock)
    assert len(smtp.messages) == before
    # Replying to the digest opens no ticket: it is recorded and ignored.
    mailbox.append(reply(to_desk1[0].content, "desk1@example.test", "收到，今天处理。"))
    run_once(desk, clock)
    with desk.db.sessions() as session:
        assert session.query(Ticket).count() == 1
        row = session.query(Inbound).order_by(Inbound.id.desc()).first()
        assert (row.state, row.reason) == (
            "ignored", "a reply to a digest or report, which belongs to no ticket"
        )
    desk.close()
