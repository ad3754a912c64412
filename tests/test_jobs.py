"""No scheduled job fails in silence: the daemon logs the failure and the service desk lead
is told once per episode, which the job's next success ends."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from daemons import daemon_thread, eventually
from sqlalchemy import select
from support import REPO, Clock, make_desk

from mailflow import jobs
from mailflow.desk import Desk
from mailflow.models import Alert, Outbox

LEAD = "lead@example.test"


def _alerts(desk: Desk) -> list[Outbox]:
    with desk.db.sessions() as session:
        return list(session.scalars(
            select(Outbox).where(Outbox.template == "guard_alert").order_by(Outbox.id)
        ))


def _report_template(templates: Path, broken: bool) -> None:
    """The weekly report's text template, failing as it renders (not as it loads) or not."""
    shipped = (REPO / "templates" / "zh-CN" / "report.txt").read_text(encoding="utf-8")
    flaw = "{{ report.no_such_figure() }}" if broken else ""
    text = shipped.replace("{% endblock %}", flaw + "{% endblock %}", 1)
    (templates / "zh-CN" / "report.txt").write_text(text, encoding="utf-8")


def test_a_failing_job_is_logged_and_alerts_the_lead_once_per_episode(tmp_path, caplog):
    templates = tmp_path / "templates"
    shutil.copytree(REPO / "templates", templates)
    _report_template(templates, broken=True)
    desk = make_desk(
        tmp_path, paths={"templates": str(templates)}, digest={"monthly_report": "off"}
    )
    clock = Clock()  # Tuesday: the weekly report ("mon 09:00") is due when the daemon starts
    weekly = next(job for job in jobs.load_all() if job.name == "report-weekly")

    with caplog.at_level(logging.ERROR), daemon_thread(desk, clock):
        eventually(lambda: _alerts(desk), 20, "an alert about the failing report")
    [alert] = _alerts(desk)
    assert alert.recipient == LEAD
    assert "report-weekly" in alert.subject and "UndefinedError" in alert.text
    failed = [r for r in caplog.records if r.getMessage() == "job report-weekly failed"]
    assert failed and failed[0].exc_info is not None  # the traceback is in the log

    # The same episode: failing again (a restart, the next run) tells no one again.
    clock.advance(minutes=10)
    assert jobs.run(weekly, desk, clock()) is None
    assert len(_alerts(desk)) == 1

    # Fixed: the report goes out, and the episode is over.
    _report_template(templates, broken=False)
    assert desk.reload_config() == []
    assert len(jobs.run(weekly, desk, clock()) or []) == 4
    with desk.db.sessions() as session:
        assert session.get(Alert, "job:report-weekly") is None

    # Broken again for next week's report: a new episode, a new alert.
    _report_template(templates, broken=True)
    assert desk.reload_config() == []
    clock.advance(days=7)
    assert jobs.run(weekly, desk, clock()) is None
    assert [a.recipient for a in _alerts(desk)] == [LEAD, LEAD]
    desk.close()
