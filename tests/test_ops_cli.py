"""What an operator runs: `mailflow status` per the contract, `requeue` and `resend` after a
fix, structured logs, and the daemon's signals — SIGTERM mid-backlog loses and doubles
nothing, SIGHUP reloads the configuration and rules/."""

from __future__ import annotations

import email
import json
import re
import shutil
import signal
from collections import Counter
from datetime import datetime
from pathlib import Path

import pytest
from daemons import eventually, mailflow_process, terminate
from servers import Mailbox, SmtpSink
from sqlalchemy import func, select
from support import REPO, desk_config, make_desk, make_mail

from mailflow.cli import main
from mailflow.config import load_config
from mailflow.daemon import Daemon
from mailflow.desk import Desk
from mailflow.models import Inbound, Outbox, Ticket
from mailflow.pipeline import SQLITE_BATCH
from mailflow.rules import RuleSet


def cli(config: Path, capsys, *args: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["--config", str(config), *args])
    return code, capsys.readouterr().out


def status(desk: Desk, capsys) -> dict:
    code, out = cli(desk.settings.path, capsys, "status", "--json")
    assert code == 0
    return json.loads(out)


@pytest.fixture
def poison(monkeypatch):
    """Mail whose subject says POISON makes classification fail (a bug, fixed by undo())."""
    real = RuleSet.classify

    def classify(self, subject, body, sender="", person=None):
        if "POISON" in subject:
            raise RuntimeError("rule engine bug")
        return real(self, subject, body, sender, person)

    monkeypatch.setattr(RuleSet, "classify", classify)
    return lambda: monkeypatch.setattr(RuleSet, "classify", real)


# -- status -----------------------------------------------------------------------------------


def test_status_before_anything_was_fetched(desk, capsys):
    data = status(desk, capsys)
    assert data["inbound"] == {"processed": 0, "ignored": 0, "quarantined": 0, "pending": 0}
    assert data["outbox"] == {"queued": 0, "sent": 0, "dead": 0}
    assert data["last_poll"] is None


def test_every_fetched_mail_is_in_exactly_one_of_the_four_states(
    desk, mailbox, smtp, clock, capsys, poison
):
    daemon = Daemon(desk, clock)
    first = make_mail("a@example.test", "打印机卡纸", "三楼打印机")
    mailbox.append(first)
    mailbox.append(first)  # the same mail twice (e.g. To and Cc): the copy is ignored
    mailbox.append(
        make_mail(
            "b@example.test",
            "自动回复: 休假",
            "我在休假",
            headers={"Auto-Submitted": "auto-replied"},
        )
    )
    mailbox.append(make_mail("c@example.test", "POISON 蓝屏", "蓝屏"))
    daemon.run_once()
    mailbox.append(make_mail("d@example.test", "VPN 连不上", "809"))
    mailbox.append(make_mail("e@example.test", "OA 白屏", "白屏"))
    daemon.poll()  # fetched and stored, not yet processed
    data = status(desk, capsys)
    assert data["inbound"] == {"processed": 1, "ignored": 2, "quarantined": 1, "pending": 2}
    with desk.db.sessions() as session:
        assert sum(data["inbound"].values()) == session.query(Inbound).count() == 6
    assert data["outbox"] == {"queued": 0, "sent": 3, "dead": 0}
    assert set(data) >= {"inbound", "outbox", "last_poll"}
    assert datetime.fromisoformat(data["last_poll"].replace("Z", "+00:00")) == clock()
    name = daemon.imap.name
    assert data["mailboxes"][name]["last_poll"] == data["last_poll"]
    assert data["mailboxes"][name]["poller"] is None, "run --once gave its lease back"


def test_status_text_names_each_mailbox(desk, mailbox, clock, capsys):
    Daemon(desk, clock).run_once()
    code, out = cli(desk.settings.path, capsys, "status")
    assert code == 0
    assert "inbound: processed 0, ignored 0, quarantined 0, pending 0" in out
    assert f"mailbox imap:{mailbox.address}@" in out and "polled by no one now" in out


# -- requeue and resend after a fix -------------------------------------------------------------


def test_requeue_takes_the_named_quarantined_mail_back_after_a_fix(
    desk, mailbox, smtp, clock, capsys, poison
):
    for n in (1, 2):
        mailbox.append(make_mail(f"u{n}@example.test", f"POISON {n}", "蓝屏"))
    Daemon(desk, clock).run_once()
    assert status(desk, capsys)["inbound"]["quarantined"] == 2
    with desk.db.sessions() as session:
        first, second = (r.id for r in session.query(Inbound).order_by(Inbound.id))
        assert "rule engine bug" in session.get(Inbound, first).reason
    poison()  # the bug is fixed
    code, out = cli(desk.settings.path, capsys, "requeue", str(first))
    assert (code, out.strip()) == (0, "requeued 1 message(s)")
    Daemon(desk, clock).run_once()
    with desk.db.sessions() as session:
        assert session.get(Inbound, first).state == "processed"
        assert session.get(Inbound, second).state == "quarantined"
        assert session.query(Ticket).count() == 1
    assert cli(desk.settings.path, capsys, "requeue")[1].strip() == "requeued 1 message(s)"
    Daemon(desk, clock).run_once()
    assert status(desk, capsys)["inbound"] == {
        "processed": 2,
        "ignored": 0,
        "quarantined": 0,
        "pending": 0,
    }
    assert cli(desk.settings.path, capsys, "requeue")[1].strip() == "requeued 0 message(s)"


def test_resend_queues_dead_mail_again(desk, mailbox, smtp, clock, capsys):
    smtp.reject_recipient("f@example.test", "550 5.1.1 mailbox unavailable")
    mailbox.append(make_mail("f@example.test", "打印机卡纸", "卡纸"))
    Daemon(desk, clock).run_once()
    assert status(desk, capsys)["outbox"] == {"queued": 0, "sent": 2, "dead": 1}
    smtp._rejected.clear()  # the recipient's mailbox was repaired
    code, out = cli(desk.settings.path, capsys, "resend")
    assert (code, out.strip()) == (0, "queued 1 message(s) again")
    Daemon(desk, clock).run_once()
    assert status(desk, capsys)["outbox"] == {"queued": 0, "sent": 3, "dead": 0}
    assert sum("f@example.test" in m.rcpt_tos for m in smtp.messages) == 1


# -- structured logs --------------------------------------------------------------------------


def run_once_logged(tmp_path: Path, mailbox: Mailbox, fmt: str) -> list[str]:
    config = desk_config(
        tmp_path,
        mailbox=mailbox,
        log={"format": fmt},
        digest={"weekly_report": "off", "monthly_report": "off"},
    )
    process = mailflow_process(config, "--once", log=tmp_path / "run.log")
    assert process.wait(120) == 0
    return (tmp_path / "run.log").read_text(encoding="utf-8").splitlines()


def test_json_logs_carry_the_message_id_and_ticket_on_every_line(tmp_path, mailbox):
    mailbox.append(
        make_mail("g@example.test", "打印机卡纸", "卡纸", message_id="<log-1@example.test>")
    )
    mailbox.append(
        make_mail(
            "h@example.test",
            "POISON",
            "x",
            message_id="<log-2@example.test>",
            headers={"Auto-Submitted": "auto-replied"},
        )
    )
    records = [json.loads(line) for line in run_once_logged(tmp_path, mailbox, "json")]
    assert records and all(
        {"ts", "level", "logger", "msg_id", "ticket", "msg"} <= set(r) for r in records
    )
    about_mail = [r for r in records if r["logger"] == "mailflow.pipeline"]
    assert {(r["msg_id"], r["ticket"], r["msg"][:23]) for r in about_mail} == {
        ("log-1@example.test", "INC-1", "processed"),
        ("log-2@example.test", None, "ignored: automatic mail"),
    }
    assert all(r["msg_id"] for r in records if r["logger"].startswith("mailflow.pipeline"))


def test_logfmt_logs_are_key_value_pairs(tmp_path, mailbox):
    mailbox.append(
        make_mail("g@example.test", "打印机卡纸", "卡纸", message_id="<log-3@example.test>")
    )
    lines = run_once_logged(tmp_path, mailbox, "logfmt")
    pair = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')
    parsed = [dict(pair.findall(line)) for line in lines]
    assert all({"ts", "level", "logger", "msg_id", "ticket", "msg"} <= set(p) for p in parsed)
    processed = [p for p in parsed if p["logger"] == "mailflow.pipeline"]
    assert [(p["msg_id"], p["ticket"], p["msg"]) for p in processed] == [
        ("log-3@example.test", "INC-1", "processed")
    ]


def test_an_unknown_log_format_is_a_config_problem(tmp_path, capsys):
    config = desk_config(tmp_path, log={"format": "xml"})
    assert main(["--config", str(config), "check"]) == 1
    assert "log.format" in capsys.readouterr().out


# -- signals ----------------------------------------------------------------------------------


def backlog(box: Mailbox, count: int) -> list[str]:
    ids = [f"backlog-{n}@example.test" for n in range(count)]
    client = box.client()
    client.multiappend(
        "INBOX",
        [
            make_mail(f"user{n}@example.test", f"电脑蓝屏 {n}", "开机蓝屏", message_id=f"<{mid}>")
            for n, mid in enumerate(ids)
        ],
    )
    client.logout()
    return ids


def processed(desk: Desk) -> int:
    with desk.db.sessions() as session:
        return session.query(Inbound).filter_by(state="processed").count()


def backlog_desk(tmp_path: Path, mailbox: Mailbox, smtp: SmtpSink) -> tuple[Path, Desk]:
    """The config of a desk for the backlog tests (no review reports) and the desk."""
    config = desk_config(
        tmp_path,
        mailbox=mailbox,
        smtp=smtp,
        digest={"weekly_report": "off", "monthly_report": "off"},
    )
    return config, Desk(load_config(config))


def test_acknowledgements_go_out_while_a_backlog_is_worked_off(tmp_path, mailbox, smtp):
    """The relay gets its turns between processing batches: on SQLite a batch holds the
    write lock, and requesters must not wait for the whole backlog to get their answer.

    Judged by the database's own clock: mail sent before the last message was processed.
    Without relay turns only the one mail queued before the first relay pass went out that
    early; with them, at least the first batch's acknowledgements do (a turn comes after
    each second of processing, and 600 messages take several seconds on any machine here).
    """
    backlog(mailbox, 600)
    config, desk = backlog_desk(tmp_path, mailbox, smtp)
    daemon = mailflow_process(config, log=tmp_path / "daemon.log")
    try:
        eventually(lambda: processed(desk) == 600, timeout=300, what="the backlog processed")
    finally:
        assert terminate(daemon) == 0
    with desk.db.sessions() as session:
        last = session.scalar(select(func.max(Inbound.processed_at)))
        early = session.scalar(select(func.count()).where(Outbox.sent_at < last))
        acknowledged = session.scalar(
            select(func.count(func.distinct(Outbox.recipient))).where(
                Outbox.sent_at < last, Outbox.template == "ack"
            )
        )
    assert acknowledged >= SQLITE_BATCH, f"{early} mails sent before the backlog's end"


def test_sigterm_mid_backlog_then_restart_loses_and_doubles_nothing(tmp_path, mailbox, smtp):
    ids = backlog(mailbox, 300)
    config, desk = backlog_desk(tmp_path, mailbox, smtp)
    daemon = mailflow_process(config, log=tmp_path / "first.log")
    try:
        eventually(lambda: processed(desk) >= 20, timeout=120, what="20 mails processed")
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(60) == 0
    finally:
        terminate(daemon)
    log = (tmp_path / "first.log").read_text()
    assert "stopping: finishing the message in hand" in log and "mailflow stopped" in log
    with desk.db.sessions() as session:
        rows = session.query(Inbound).all()
        states = Counter(r.state for r in rows)
        done = states["processed"]
        assert 20 <= done < 300, "stopped mid-backlog"
        assert set(states) <= {"processed", "pending"}, states
        assert session.query(Ticket).count() == done, "a ticket for every processed mail only"
        assert all(r.ticket_id is None for r in rows if r.state == "pending")
    daemon = mailflow_process(config, log=tmp_path / "second.log")
    try:
        eventually(lambda: processed(desk) == 300, timeout=300, what="the rest processed")
        eventually(lambda: not queued(desk), timeout=120, what="the outbox drained")
    finally:
        assert terminate(daemon) == 0
    with desk.db.sessions() as session:
        rows = session.query(Inbound).all()
        assert sorted(r.message_id for r in rows) == sorted(ids), "nothing lost, nothing twice"
        assert {r.attempts for r in rows} == {1}
        assert session.query(Ticket).count() == 300
        # Ticket mail only: after the digest hour the daemons also send the daily digests.
        sent = session.query(Outbox).filter(Outbox.ticket_id.is_not(None)).count()
        assert session.query(Outbox).filter(Outbox.state != "sent").count() == 0
    mails = [email.message_from_bytes(m.content) for m in smtp.messages]
    seen = Counter(m["Message-ID"] for m in mails if m["X-Mailflow"] != "desk")
    assert sum(seen.values()) == sent == 900 and max(seen.values()) == 1
    assert len(set(m["Message-ID"] for m in mails)) == len(mails), "no mail sent twice"
    client = mailbox.client()
    client.select_folder("INBOX", readonly=True)
    assert len(client.search(["KEYWORD", "$MailflowDone"])) == 300
    client.logout()
    desk.close()


def queued(desk: Desk) -> int:
    with desk.db.sessions() as session:
        return session.query(Outbox).filter_by(state="queued").count()


RULE = """\
description = "XYZ 系统 XYZ system"

[match]
any = ["XYZ"]

[set]
kind = "incident"
category = "xyz"
priority = "P2"
tier = "L1"
"""


def category_of(desk: Desk, subject: str) -> str | None:
    with desk.db.sessions() as session:
        ticket = session.query(Ticket).filter_by(subject=subject).one_or_none()
        return ticket.category if ticket else None


def test_sighup_reloads_rules_and_keeps_them_when_the_new_set_is_broken(
    tmp_path, mailbox, smtp: SmtpSink
):
    rules = tmp_path / "rules"
    shutil.copytree(REPO / "rules", rules)
    config = desk_config(
        tmp_path,
        mailbox=mailbox,
        smtp=smtp,
        paths={"rules": str(rules)},
        digest={"weekly_report": "off", "monthly_report": "off"},
    )
    desk = Desk(load_config(config))
    log = tmp_path / "daemon.log"
    daemon = mailflow_process(config, log=log)
    try:
        mailbox.append(make_mail("x@example.test", "XYZ 报错 1", "XYZ 系统报错"))
        eventually(lambda: category_of(desk, "XYZ 报错 1"), timeout=60, what="first ticket")
        assert category_of(desk, "XYZ 报错 1") == "other"

        (rules / "05-xyz.toml").write_text(RULE, encoding="utf-8")
        daemon.send_signal(signal.SIGHUP)
        eventually(lambda: "SIGHUP: configuration reloaded" in log.read_text(), what="the reload")
        mailbox.append(make_mail("x@example.test", "XYZ 报错 2", "XYZ 系统报错"))
        eventually(lambda: category_of(desk, "XYZ 报错 2"), timeout=60, what="second ticket")
        assert category_of(desk, "XYZ 报错 2") == "xyz"

        (rules / "06-broken.toml").write_text("[match\n", encoding="utf-8")
        daemon.send_signal(signal.SIGHUP)
        eventually(
            lambda: "SIGHUP: configuration not reloaded" in log.read_text(), what="the refusal"
        )
        mailbox.append(make_mail("x@example.test", "XYZ 报错 3", "XYZ 系统报错"))
        eventually(lambda: category_of(desk, "XYZ 报错 3"), timeout=60, what="third ticket")
        assert category_of(desk, "XYZ 报错 3") == "xyz", "the last good rules stay"
    finally:
        assert terminate(daemon) == 0
    desk.close()


def test_make_desk_and_the_daemon_see_the_same_database(tmp_path):
    """A desk and `mailflow` started on the same config share one database (SQLite file
    or PostgreSQL schema), which the subprocess tests above rely on."""
    first = make_desk(tmp_path)
    second = Desk(load_config(first.settings.path))
    with first.db.transaction() as session:
        session.add(
            Ticket(
                kind="incident",
                number=1,
                status="open",
                priority="P3",
                category="other",
                rule="t",
                requester="a@example.test",
                subject="s",
                created_at=datetime.now().astimezone(),
                updated_at=datetime.now().astimezone(),
            )
        )
    with second.db.sessions() as session:
        assert session.query(Ticket).count() == 1
    first.close()
    second.close()


# -- deployment files ---------------------------------------------------------------------------


PRODUCTION = REPO / "deploy" / "config.production.toml"
SECRETS = {
    "MAILFLOW_DATABASE_URL": "postgresql+psycopg://mailflow:pw@db.example.test/mailflow",
    "MAILFLOW_IMAP_PASSWORD": "imap-pw",
    "MAILFLOW_SMTP_PASSWORD": "smtp-pw",
    "MAILFLOW_SECRET": "c2VjcmV0",
}


def test_the_production_config_takes_its_secrets_from_the_environment(monkeypatch, capsys):
    for name in SECRETS:
        monkeypatch.delenv(name, raising=False)
    assert main(["--config", str(PRODUCTION), "check"]) == 1
    out = capsys.readouterr().out
    for key in ("database.url_env", "imap.password_env", "smtp.password_env", "desk.secret_env"):
        assert key in out
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    assert main(["--config", str(PRODUCTION), "check"]) == 0
    settings = load_config(PRODUCTION)
    assert settings.database_url == SECRETS["MAILFLOW_DATABASE_URL"]
    assert (settings.imap.password, settings.smtp.password) == ("imap-pw", "smtp-pw")
    assert settings.imap.security == "tls" and settings.imap.verify_tls
    assert settings.smtp.security == "starttls" and settings.smtp.verify_tls
    assert settings.imap.idle and settings.imap.client_id
    text = PRODUCTION.read_text(encoding="utf-8")
    assert not re.search(r'^\s*(password|secret)\s*=\s*"[^"]', text, re.MULTILINE)


def test_the_systemd_unit_runs_the_daemon_with_the_right_signals():
    import configparser

    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(REPO / "deploy" / "mailflow.service")
    service = unit["Service"]
    assert service["ExecStart"].endswith("mailflow run")
    assert service["ExecStartPre"].endswith("mailflow check")
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["KillSignal"] == "SIGTERM"
    assert service["EnvironmentFile"] == "/etc/mailflow/env"
    assert service["RestartPreventExitStatus"] == "2"
    assert int(service["TimeoutStopSec"]) >= 60
