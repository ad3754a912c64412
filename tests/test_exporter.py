"""The optional Prometheus endpoint ([metrics] port): messages by outcome, processing time,
outbox depth, last poll, the poller lease and SLA breaches, scraped over HTTP from a
running daemon."""

from __future__ import annotations

import json
import urllib.request
from urllib.error import URLError

import pytest
from daemons import daemon_thread, eventually
from prometheus_client.parser import text_string_to_metric_families
from servers import free_port
from support import desk_config, make_desk, make_mail

from mailflow import exporter
from mailflow.cli import main
from mailflow.models import Inbound, Ticket, utcnow
from mailflow.rules import RuleSet


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample on /metrics as {(name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def done(desk) -> int:
    with desk.db.sessions() as session:
        return session.query(Inbound).filter(Inbound.state != "pending").count()


def test_a_running_daemon_serves_the_desks_figures(tmp_path, mailbox, smtp, monkeypatch, capsys):
    real = RuleSet.classify

    def classify(self, subject, body, sender="", person=None):
        if "POISON" in subject:
            raise RuntimeError("rule engine bug")
        return real(self, subject, body, sender, person)

    monkeypatch.setattr(RuleSet, "classify", classify)
    port = free_port()
    desk = make_desk(tmp_path, mailbox=mailbox, smtp=smtp, metrics={"port": port},
                     digest={"weekly_report": "off", "monthly_report": "off"})
    before = {o: exporter.MESSAGES.labels(o)._value.get() for o in ("processed", "ignored")}
    timed = exporter.PROCESSING._sum.get()
    relayed = exporter.RELAY.labels("sent")._value.get()
    mailbox.append(make_mail("a@example.test", "打印机卡纸", "卡纸"))
    mailbox.append(make_mail("b@example.test", "自动回复", "休假中",
                             headers={"Auto-Submitted": "auto-replied"}))
    mailbox.append(make_mail("c@example.test", "POISON", "蓝屏"))
    with daemon_thread(desk) as daemon:
        eventually(lambda: done(desk) == 3, what="three mails handled")
        eventually(lambda: scrape(port)[("mailflow_outbox_depth", ())] == 0, what="sent")
        with desk.db.transaction() as session:  # an SLA job found the ticket late
            session.query(Ticket).update({"sla_breached_at": utcnow()})
        samples = scrape(port)
        name = daemon.imap.name
        owner = daemon.owner
    assert samples[("mailflow_messages_total", (("outcome", "processed"),))] == (
        before["processed"] + 1)
    assert samples[("mailflow_messages_total", (("outcome", "ignored"),))] == (
        before["ignored"] + 1)
    assert samples[("mailflow_messages_total", (("outcome", "quarantined"),))] >= 1
    assert samples[("mailflow_processing_seconds_count", ())] >= 3
    assert samples[("mailflow_processing_seconds_sum", ())] > timed
    assert samples[("mailflow_relay_attempts_total", (("result", "sent"),))] == relayed + 3
    capsys.readouterr()
    assert main(["--config", str(desk.settings.path), "status", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    for state, count in status["inbound"].items():
        assert samples[("mailflow_inbound", (("state", state),))] == count
    for state, count in status["outbox"].items():
        assert samples[("mailflow_outbox", (("state", state),))] == count
    assert samples[("mailflow_outbox_depth", ())] == 0
    assert samples[("mailflow_outbox", (("state", "sent"),))] == 3
    last_poll = samples[("mailflow_last_poll_timestamp_seconds", (("mailbox", name),))]
    assert abs(last_poll - utcnow().timestamp()) < 3600
    assert samples[("mailflow_mailbox_lease", (("mailbox", name), ("owner", owner)))] == 1
    assert samples[("mailflow_mailbox_error", (("mailbox", name),))] == 0
    assert samples[("mailflow_sla_breaches", (("target", "resolve"),))] == 1
    assert samples[("mailflow_sla_breached_open", ())] == 1
    assert samples[("mailflow_database_up", ())] == 1
    # The endpoint closes with the daemon.
    with pytest.raises(URLError):
        scrape(port)
    desk.close()


def test_no_port_no_endpoint(tmp_path):
    desk = make_desk(tmp_path)
    assert exporter.serve(desk) is None
    desk.close()


def test_a_bad_port_is_a_config_problem(tmp_path, capsys):
    config = desk_config(tmp_path, metrics={"port": 70000})
    assert main(["--config", str(config), "check"]) == 1
    assert "metrics.port" in capsys.readouterr().out


def test_the_database_going_away_shows_as_down(tmp_path):
    port = free_port()
    desk = make_desk(tmp_path, metrics={"port": port})
    endpoint = exporter.serve(desk)
    assert endpoint is not None
    try:
        assert scrape(port)[("mailflow_database_up", ())] == 1
        from sqlalchemy import create_engine

        unreachable = create_engine("postgresql+psycopg://nobody@127.0.0.1:1/none")
        desk.db.sessions.configure(bind=unreachable)  # the database server went away
        assert scrape(port)[("mailflow_database_up", ())] == 0
    finally:
        endpoint.stop()
        desk.close()
