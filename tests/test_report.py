"""The review report and `mailflow report`: figures checked against hand-computed values.

The October 2026 scenario (tests/scenarios.py) spans the National Day holiday (Oct 1–7 off,
Saturday Oct 10 a make-up working day), a pending period, a reopen, an escalation, two
problem hand-offs (one before, one after the deadline) and an incident still pending.
Business hours 08:30–12:00 and 13:30–17:30 (7.5 h a day); P3 16 h, P4 40 h of business
time; P2 8 h around the clock.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
from datetime import UTC, date, datetime
from email import message_from_bytes
from html.parser import HTMLParser
from pathlib import Path

import pytest
from scenarios import local, october, scenario_desk
from sqlalchemy import select
from support import make_desk, parsed

from mailflow import jobs, notify, outbox, report
from mailflow.cli import main
from mailflow.config import check_config, monthly_schedule, weekly_schedule
from mailflow.desk import Desk
from mailflow.errors import MailflowError
from mailflow.models import Outbox

NOW = local("2026-11-02 10:00")  # Monday
OCT = (date(2026, 10, 1), date(2026, 10, 31))
REVIEW = {"im@example.test", "lead@example.test", "l2@example.test", "l3@example.test"}


@pytest.fixture
def oct_desk(tmp_path: Path):
    desk = scenario_desk(tmp_path)
    october(desk)
    yield desk
    desk.close()


@pytest.fixture(scope="module")
def oct_data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """October's report, computed once (the desk is closed before any test runs)."""
    desk = scenario_desk(tmp_path_factory.mktemp("october"))
    try:
        october(desk)
        return report.compute(desk, *OCT, NOW)
    finally:
        desk.close()


# -- the figures --------------------------------------------------------------------------


def test_target_achievement_rate_for_october(oct_data):
    # Due in October: INC-1 (Oct 9 10:00, resolved Oct 8: within), INC-2 (Sat Oct 10 16:00
    # after a day pending, resolved 15:00: within), INC-3 (P2, Oct 4 12:00 after 8 h
    # resolved-then-reopened, final resolution 11:00: within), INC-4 (Oct 15 14:00,
    # resolved Oct 16: late), INC-5 (Oct 22 10:00, handed over Oct 23: missed), INC-7
    # (Oct 28 10:00, still open: missed). Not due: INC-6 (handed to problem management
    # before its deadline), INC-8 (pending), INC-9 (due Nov 3).
    assert oct_data["since"] == "2026-10-01" and oct_data["until"] == "2026-10-31"
    assert oct_data["incidents"] == 6
    assert oct_data["resolved_within_target"] == 3
    assert oct_data["target_achievement_rate"] == 0.5
    assert oct_data["breached"] == 3
    due = {row["ref"]: row for row in oct_data["due_incidents"]}
    assert set(due) == {"INC-1", "INC-2", "INC-3", "INC-4", "INC-5", "INC-7"}
    expected = {
        "INC-1": ("2026-10-09 10:00", True),
        "INC-2": ("2026-10-10 16:00", True),
        "INC-3": ("2026-10-04 12:00", True),
        "INC-4": ("2026-10-15 14:00", False),
        "INC-5": ("2026-10-22 10:00", False),
        "INC-7": ("2026-10-28 10:00", False),
    }
    for ref, (deadline, within) in expected.items():
        assert due[ref]["deadline"] == local(deadline).isoformat().replace("+00:00", "Z"), ref
        assert due[ref]["within_target"] is within, ref


def test_volumes_times_and_flow(oct_data):
    assert oct_data["opened"] == 7  # INC-3..INC-9
    assert oct_data["major"] == 0
    assert oct_data["requests_opened"] == 1
    assert oct_data["resolved"] == 4  # final resolutions: INC-1, 2, 3, 4
    assert oct_data["reopened"] == 1  # INC-3
    assert oct_data["reopen_rate"] == 0.25  # 1 of the 4 resolved in October
    assert oct_data["escalations"] == 1  # INC-4 L1 → L2
    assert oct_data["problem_handoffs"] == 2  # INC-5, INC-6
    # SLA-clock hours to resolve: INC-1 13, INC-2 15 (day pending excluded), INC-3 7 (24x7,
    # the 8 h between resolution and reopen excluded), INC-4 45.
    assert oct_data["time_to_resolve_hours"] == {"count": 4, "mean": 20.0, "p90": 45.0}
    # First staff action in October: INC-2 3.0, INC-3 6.0, INC-4 14.0, INC-5 23.5,
    # INC-6 3.5, INC-8 1.0 (INC-1's answer was in September).
    assert oct_data["time_to_respond_hours"] == {"count": 6, "mean": 8.5, "p90": 23.5}


def test_breakdowns(oct_data):
    prio = oct_data["by_priority"]
    assert prio["P1"] == {
        "opened": 0, "incidents": 0, "resolved_within_target": 0, "target_achievement_rate": None
    }
    assert prio["P2"] == {
        "opened": 1, "incidents": 1, "resolved_within_target": 1, "target_achievement_rate": 1.0
    }
    assert prio["P3"] == {
        "opened": 5, "incidents": 4, "resolved_within_target": 2, "target_achievement_rate": 0.5
    }
    assert prio["P4"] == {
        "opened": 1, "incidents": 1, "resolved_within_target": 0, "target_achievement_rate": 0.0
    }
    tier = oct_data["by_tier"]
    assert (tier["L1"]["incidents"], tier["L1"]["resolved_within_target"]) == (4, 3)
    assert tier["L1"]["target_achievement_rate"] == 0.75
    assert (tier["L2"]["opened"], tier["L2"]["incidents"], tier["L2"]["resolved_within_target"]) \
        == (1, 1, 0)
    assert (tier["L3"]["opened"], tier["L3"]["incidents"]) == (2, 1)
    assert tier["IM"]["target_achievement_rate"] is None
    cats = oct_data["by_category"]
    assert list(cats) == ["network", "oa", "desktop", "email", "printer"]
    assert (cats["desktop"]["opened"], cats["desktop"]["incidents"]) == (1, 2)
    assert cats["desktop"]["target_achievement_rate"] == 0.5
    assert oct_data["top_categories"][:2] == [
        {"category": "network", "opened": 2},
        {"category": "oa", "opened": 2},
    ]
    assert oct_data["top_requesters"] == [
        {"requester": "u1@example.test", "opened": 3},
        {"requester": "u2@example.test", "opened": 2},
        {"requester": "u3@example.test", "opened": 2},
    ]


def test_compared_with_the_previous_period_and_trend(oct_data):
    prev = oct_data["previous"]
    assert (prev["since"], prev["until"]) == ("2026-09-01", "2026-09-30")
    assert prev["opened"] == 2 and prev["incidents"] == 0
    assert prev["target_achievement_rate"] is None
    assert prev["time_to_respond_hours"] == {"count": 1, "mean": 0.5, "p90": 0.5}
    change = oct_data["change"]
    assert change["opened"] == 5 and change["incidents"] == 6
    assert change["target_achievement_rate"] is None  # nothing was due in September
    assert change["time_to_respond_hours.mean"] == 8.0
    trend = oct_data["trend"]
    assert [t["since"] for t in trend] == [f"2026-{m:02d}-01" for m in range(5, 11)]
    assert trend[-1] == {
        "since": "2026-10-01", "until": "2026-10-31", "incidents": 6,
        "resolved_within_target": 3, "target_achievement_rate": 0.5,
    }
    assert all(t["incidents"] == 0 for t in trend[:-1])


def test_a_week_and_the_rate_by_day(oct_desk):
    # Week of the make-up Saturday: INC-1 (Thu Oct 9) and INC-2 (Sat Oct 10) are due.
    week = report.compute(oct_desk, date(2026, 10, 5), date(2026, 10, 11), NOW)
    assert (week["incidents"], week["resolved_within_target"]) == (2, 2)
    assert (week["previous"]["since"], week["previous"]["until"]) == ("2026-09-28", "2026-10-04")
    assert week["previous"]["incidents"] == 1  # INC-3 on Oct 4
    day = report.compute(oct_desk, date(2026, 10, 15), date(2026, 10, 15), NOW)
    assert (day["incidents"], day["target_achievement_rate"]) == (1, 0.0)  # INC-4


def test_pending_incident_counts_once_its_deadline_is_known(oct_desk):
    # INC-9 (due Tue Nov 3 15:00) is not due yet on Nov 2, and is due by Nov 4.
    november = (date(2026, 11, 1), date(2026, 11, 30))
    before = report.compute(oct_desk, *november, NOW)
    after = report.compute(oct_desk, *november, local("2026-11-04 09:00"))
    assert before["incidents"] == 0 and before["target_achievement_rate"] is None
    assert after["incidents"] == 1 and after["target_achievement_rate"] == 0.0
    # INC-8 stays pending: its deadline is unknown, so it is in no period.
    assert "INC-8" not in {r["ref"] for r in after["due_incidents"]}


def test_periods():
    today = date(2026, 11, 25)
    assert report.period(None, None, today) == (date(2026, 11, 1), today)
    assert report.period(date(2026, 11, 3), None, today) == (date(2026, 11, 3), today)
    assert report.period(None, date(2026, 10, 31), today) == (date(2026, 10, 1), date(2026, 10, 31))
    with pytest.raises(MailflowError):
        report.period(date(2026, 11, 5), date(2026, 11, 1), today)
    assert report.previous_period(date(2026, 3, 1), date(2026, 3, 31)) == (
        date(2026, 2, 1), date(2026, 2, 28)
    )
    assert report.previous_period(date(2026, 3, 1), date(2026, 3, 30)) == (
        date(2026, 2, 1), date(2026, 2, 28)
    )  # month to date: the same days of the month before, clipped
    assert report.previous_period(date(2026, 1, 1), date(2026, 3, 31)) == (
        date(2025, 10, 1), date(2025, 12, 31)
    )
    assert report.previous_period(date(2026, 11, 16), date(2026, 11, 22)) == (
        date(2026, 11, 9), date(2026, 11, 15)
    )
    assert report.last_period("weekly", date(2026, 11, 25)) == (
        date(2026, 11, 16), date(2026, 11, 22)
    )
    assert report.last_period("monthly", date(2026, 1, 1)) == (
        date(2025, 12, 1), date(2025, 12, 31)
    )


# -- the CLI ------------------------------------------------------------------------------


def _cli(desk: Desk, capsys, *args: str) -> str:
    capsys.readouterr()
    assert main(["--config", str(desk.settings.path), "report", *args]) == 0
    return capsys.readouterr().out


def test_cli_json_contract_and_same_numbers_in_csv_and_text(oct_desk, oct_data, capsys):
    # The CLI reads the real clock; the scenario lies in the past, so October is settled.
    out = _cli(oct_desk, capsys, "--since", "2026-10-01", "--until", "2026-10-31",
               "--format", "json")
    data = json.loads(out)
    for key in ("since", "until", "incidents", "resolved_within_target",
                "target_achievement_rate"):
        assert data[key] == oct_data[key], key
    assert data["by_priority"] == oct_data["by_priority"]
    rows = _csv_values(_cli(oct_desk, capsys, "--since", "2026-10-01", "--until",
                            "2026-10-31", "--format", "csv"))
    assert rows[("summary", "", "target_achievement_rate")] == "0.5"
    assert rows[("summary", "", "incidents")] == "6"
    assert rows[("priority", "P3", "resolved_within_target")] == "2"
    text = _cli(oct_desk, capsys, "--since", "2026-10-01", "--until", "2026-10-31")
    assert "目标事件达成率" in text and "50.0%" in text
    assert "到期事件 6，按时解决 3，超时 3" in text


def test_cli_rejects_a_backwards_period(oct_desk, capsys):
    code = main(["--config", str(oct_desk.settings.path), "report", "--since", "2026-10-31",
                 "--until", "2026-10-01"])
    assert code != 0
    assert "--since" in capsys.readouterr().err


def test_english_text_report(tmp_path):
    desk = scenario_desk(tmp_path, desk={"language": "en"})
    data = report.compute(desk, *OCT, NOW)
    text = report.render(data, "text", desk)
    assert text.startswith("Incident management report 2026-10-01 to 2026-10-31")
    assert "Target achievement rate: -" in text
    desk.close()


# -- the mail -----------------------------------------------------------------------------


def _csv_values(text: str) -> dict[tuple[str, str, str], str]:
    reader = csv.reader(io.StringIO(text.lstrip("\ufeff")))
    assert next(reader) == ["section", "key", "metric", "value"]
    values = {}
    for section, key, metric, value in reader:
        assert (section, key, metric) not in values, "each figure once"
        values[(section, key, metric)] = value
    return values


class _Cells(HTMLParser):
    """Every element carrying data-metric: (section, key, metric) → (data-value, text)."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: dict[tuple[str, str, str], list[str]] = {}
        self.images: list[str] = []
        self._open: tuple[str, str, str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a["src"])
        if "data-metric" in a:
            self._open = (a["data-section"], a["data-key"], a["data-metric"])
            self.cells[self._open] = [a["data-value"], ""]

    def handle_data(self, data):
        if self._open is not None:
            self.cells[self._open][1] += data

    def handle_endtag(self, tag):
        self._open = None


def _mail_parts(raw: bytes):
    msg = parsed(raw)
    text = html = None
    images, files = {}, {}
    for part in msg.walk():
        ctype = part.get_content_type()
        disposition = part.get_content_disposition()
        if ctype == "text/plain" and disposition is None:
            text = part.get_content()
        elif ctype == "text/html":
            html = part.get_content()
        elif ctype == "image/png":
            images[part["Content-ID"].strip("<>")] = part.get_payload(decode=True)
        elif disposition == "attachment":
            files[part.get_filename()] = part.get_payload(decode=True).decode("utf-8-sig")
    return msg, text, html, images, files


def test_monthly_report_mail_html_and_csv_parse_back_to_the_same_numbers(tmp_path, smtp):
    desk = scenario_desk(tmp_path, smtp=smtp)
    october(desk)
    now = local("2026-11-01 09:05")  # monthly_report "1 09:00"
    assert set(report.send_report(desk, "monthly", now)) == REVIEW
    asyncio.run(outbox.relay(desk.db, desk.settings.smtp, lambda: now))
    mails = [m for m in smtp.messages if "月报" in str(parsed(m.content)["Subject"])]
    assert sorted(r for m in mails for r in m.rcpt_tos) == sorted(REVIEW)
    data = report.compute(desk, *OCT, now)

    msg, text, html, images, files = _mail_parts(mails[0].content)
    assert "事件管理月报 2026-10-01 至 2026-10-31" in msg["Subject"]
    assert msg["Auto-Submitted"] == "auto-generated"
    assert msg.get_content_type() == "multipart/mixed"
    # Plain-text part with the same headline numbers.
    assert "目标事件达成率：50.0%" in text
    assert "到期事件 6，按时解决 3，超时 3" in text
    # Charts inline: every <img> points at a PNG part of the mail.
    cells = _Cells()
    cells.feed(html)
    assert len(cells.images) == 2
    for src in cells.images:
        assert src.startswith("cid:")
        assert images[src[4:]].startswith(b"\x89PNG\r\n\x1a\n")
    # CSV attachment == HTML cells == JSON, figure by figure.
    csv_values = _csv_values(files["report_2026-10-01_2026-10-31.csv"])
    html_values = {k: v[0] for k, v in cells.cells.items()}
    assert html_values == csv_values
    assert csv_values == {
        (s, k, m): "" if v is None else str(v) for s, k, m, v in report.csv_rows(data)
    }
    assert csv_values[("summary", "", "target_achievement_rate")] == "0.5"
    assert csv_values[("tier", "L1", "target_achievement_rate")] == "0.75"
    assert csv_values[("summary", "", "time_to_resolve_hours.p90")] == "45.0"
    assert csv_values[("trend", "2026-10-01..2026-10-31", "incidents")] == "6"
    # What the HTML shows matches its data: rates as percentages, hours to 2 places.
    assert cells.cells[("summary", "", "target_achievement_rate")][1] == "50.0%"
    assert cells.cells[("summary", "", "time_to_resolve_hours.mean")][1] == "20.00"
    assert cells.cells[("priority", "P1", "target_achievement_rate")][1] == "-"
    # The incidents attachment: one row per incident due, with its outcome.
    rows = list(csv.DictReader(io.StringIO(files["incidents_2026-10-01_2026-10-31.csv"])))
    assert [r["ref"] for r in rows] == [d["ref"] for d in data["due_incidents"]]
    assert sum(r["within_target"] == "True" for r in rows) == 3
    desk.close()


def test_report_mail_once_per_period_across_restarts_and_two_daemons(tmp_path):
    desk = scenario_desk(tmp_path)
    october(desk)
    other = Desk(desk.settings)  # a second daemon on the same database
    early = local("2026-11-01 08:59")
    assert report.send_report(desk, "monthly", early) == []  # not its time yet
    sent = report.send_report(desk, "monthly", local("2026-11-01 09:00"))
    assert set(sent) == REVIEW
    assert report.send_report(other, "monthly", local("2026-11-01 09:01")) == []
    restarted = Desk(desk.settings)
    assert report.send_report(restarted, "monthly", local("2026-11-09 10:00")) == []
    # The weekly report of the week before Monday Nov 2, sent on catching up Tuesday.
    assert set(report.send_report(restarted, "weekly", local("2026-11-03 07:00"))) == REVIEW
    with desk.db.sessions() as session:
        rows = list(session.scalars(select(Outbox).where(Outbox.template == "report")))
    assert len(rows) == 8
    subjects = sorted({r.subject for r in rows})
    assert any("月报 2026-10-01 至 2026-10-31" in s for s in subjects)
    assert any("周报 2026-10-26 至 2026-11-01" in s for s in subjects)
    for d in (desk, other, restarted):
        d.close()


def test_a_report_missed_while_down_is_sent_after_the_week_or_month_turned(tmp_path):
    desk = scenario_desk(
        tmp_path, digest={"weekly_report": "sun 18:00", "monthly_report": "28 09:00"}
    )
    october(desk)
    # A new desk does not start with a report of a time before it ran.
    assert report.send_report(desk, "weekly", local("2026-10-12 08:00")) == []
    assert set(report.send_report(desk, "weekly", local("2026-10-18 18:00"))) == REVIEW
    # Down at Sun 10-25 18:00, back on Monday: the week of 10-12 goes then, not never.
    assert set(report.send_report(desk, "weekly", local("2026-10-26 08:00"))) == REVIEW
    assert report.send_report(desk, "weekly", local("2026-10-27 08:00")) == []  # once
    assert set(report.send_report(desk, "weekly", local("2026-11-01 18:00"))) == REVIEW
    assert set(report.send_report(desk, "monthly", local("2026-09-28 09:00"))) == REVIEW
    # Down on 10-28, back in November: September's report still goes.
    assert set(report.send_report(desk, "monthly", local("2026-11-02 08:00"))) == REVIEW
    with desk.db.sessions() as session:
        subjects = {r.subject for r in session.scalars(
            select(Outbox).where(Outbox.template == "report", Outbox.recipient == "im@example.test")
        )}
    weeks = ["2026-10-05 至 2026-10-11", "2026-10-12 至 2026-10-18", "2026-10-19 至 2026-10-25"]
    months = ["2026-08-01 至 2026-08-31", "2026-09-01 至 2026-09-30"]
    assert sorted(p for p in weeks + months if any(p in s for s in subjects)) == sorted(
        weeks + months
    )
    assert len(subjects) == 5
    desk.close()


def test_disabled_report_sends_nothing(tmp_path):
    desk = scenario_desk(tmp_path, digest={"weekly_report": "off", "monthly_report": "off"})
    assert report.send_report(desk, "weekly", local("2026-11-02 12:00")) == []
    assert report.send_report(desk, "monthly", local("2026-11-01 12:00")) == []
    desk.close()


# -- configuration and jobs ---------------------------------------------------------------


def test_schedule_format_and_validation(tmp_path):
    assert weekly_schedule("mon 09:00") == (0, __import__("datetime").time(9, 0))
    assert weekly_schedule("Fri 17:30")[0] == 4
    assert weekly_schedule("off") is None
    assert monthly_schedule("1 09:00")[0] == 1
    assert monthly_schedule("off") is None
    for bad in ("monday 9am", "mon", "xyz 09:00", "mon 25:00"):
        with pytest.raises(ValueError):
            weekly_schedule(bad)
    for bad in ("31 09:00", "0 09:00", "first 09:00"):
        with pytest.raises(ValueError):
            monthly_schedule(bad)
    config = scenario_desk(tmp_path).settings.path
    text = Path(config).read_text(encoding="utf-8")
    Path(config).write_text(
        text + '\n[digest]\nweekly_report = "monday"\nmonthly_report = "31 09:00"\n',
        encoding="utf-8",
    )
    keys = {p.key for p in check_config(Path(config))}
    assert {"digest.weekly_report", "digest.monthly_report"} <= keys


def test_report_jobs_registered_with_catch_up(tmp_path):
    oct_desk = scenario_desk(tmp_path)
    found = {job.name: job for job in jobs.load_all()}
    for name in ("report-weekly", "report-monthly"):
        assert found[name].catch_up
    weekly = found["report-weekly"].trigger(oct_desk)
    monthly = found["report-monthly"].trigger(oct_desk)
    after = local("2026-11-02 09:30")
    assert weekly.get_next_fire_time(None, after) == local("2026-11-09 09:00")
    assert monthly.get_next_fire_time(None, after) == local("2026-12-01 09:00")
    oct_desk.close()


def test_the_related_part_names_its_root_type(tmp_path):
    """RFC 2387: multipart/related says the type of its root part (the HTML)."""
    desk = make_desk(tmp_path)
    wire = notify.build(desk, subject="s", text="t", html="<img src='cid:c1@x'>",
                        now=datetime(2026, 11, 2, tzinfo=UTC), ticket=None,
                        inline=[("c1@x", "image/png", b"\x89PNG")])
    related = [p for p in message_from_bytes(wire).walk()
               if p.get_content_type() == "multipart/related"]
    assert [p.get_param("type") for p in related] == ["text/html"]
    desk.close()
