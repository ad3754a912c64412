"""Network faults between the desk and its real IMAP (Dovecot) and SMTP (aiosmtpd) servers.

IMAP: the connection cut in the middle of a FETCH, the server restarted mid-session, a server
that stops answering (socket timeouts, no hang), refused logins (growing delays, one alert to
the service desk lead, a new alert only for a new outage). SMTP: 421 and 451 retried, 550
for one recipient leaves the others alone, a server that stops answering.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator

import pytest
from faultproxy import FaultProxy
from servers import Mailbox, SmtpSink
from support import body_of, desk_config, make_mail, parsed

from mailflow.cli import main
from mailflow.config import load_config
from mailflow.daemon import Daemon
from mailflow.desk import Desk
from mailflow.fetch import ImapSource

LEAD = "lead@example.test"
BIG = "网络故障测试 " * 1000  # about 25 kB once encoded


@pytest.fixture
def imap_proxy(mailbox: Mailbox) -> Iterator[FaultProxy]:
    proxy = FaultProxy(mailbox.host, mailbox.port)
    proxy.start()
    yield proxy
    proxy.stop()


@pytest.fixture
def smtp_proxy(smtp: SmtpSink) -> Iterator[FaultProxy]:
    proxy = FaultProxy(smtp.host, smtp.port)
    proxy.start()
    yield proxy
    proxy.stop()


class Via:
    """A mailbox or sink reached through the proxy (what the desk is configured with)."""

    def __init__(self, target, proxy: FaultProxy) -> None:
        self.__dict__.update(target.__dict__)
        self.host, self.port = proxy.host, proxy.port
        for name in ("address", "password"):
            if hasattr(target, name):
                setattr(self, name, getattr(target, name))


def make_desk(tmp_path, smtp_timeout: float | None = None, **kwargs) -> Desk:
    config = desk_config(tmp_path, **kwargs)
    if smtp_timeout is not None:  # [smtp] timeout = 5 in the test config
        text = config.read_text().replace("timeout = 5\n", f"timeout = {smtp_timeout}\n")
        config.write_text(text)
    return Desk(load_config(config))


def status(desk, capsys) -> dict:
    capsys.readouterr()
    assert main(["--config", str(desk.settings.path), "status", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def ticket_count(desk, capsys) -> int:
    capsys.readouterr()
    assert main(["--config", str(desk.settings.path), "tickets", "--json"]) == 0
    return len(json.loads(capsys.readouterr().out))


def flagged(mailbox: Mailbox) -> int:
    client = mailbox.client()
    try:
        client.select_folder("INBOX", readonly=True)
        return len(client.search(["KEYWORD", "$MailflowDone"]))
    finally:
        client.logout()


def sent_to(smtp, address: str) -> list:
    return [m for m in smtp.messages if address in m.rcpt_tos]


# -- IMAP -----------------------------------------------------------------------------------


def test_imap_cut_in_the_middle_of_a_fetch_loses_and_doubles_nothing(
    tmp_path, mailbox, imap_proxy, smtp, clock, capsys
):
    desk = make_desk(tmp_path, mailbox=Via(mailbox, imap_proxy), smtp=smtp,
                     imap={"batch_size": 2, "idle": False})
    mails = [make_mail(f"user{i}@example.test", f"大附件 {i}", BIG) for i in range(5)]
    for raw in mails:
        mailbox.append(raw)
    daemon = Daemon(desk, clock)
    # The session's first batch of two gets through; the cut falls inside the second FETCH.
    imap_proxy.cut_after(int(2.5 * len(mails[0])) + 2000)
    first = daemon.run_once()
    assert imap_proxy.cuts == 1
    assert first.errors and "UID FETCH" in first.errors[0]
    assert first.processed == 2, "the batch committed before the cut is kept"
    assert flagged(mailbox) == 2

    imap_proxy.heal()
    clock.advance(minutes=1)  # the first retry after one failure
    second = daemon.run_once()
    assert second.errors == [] and second.fetched == 3
    assert status(desk, capsys)["inbound"] == {
        "processed": 5, "ignored": 0, "quarantined": 0, "pending": 0
    }
    assert ticket_count(desk, capsys) == 5
    assert flagged(mailbox) == 5
    assert sorted(r for m in smtp.messages for r in m.rcpt_tos if r.startswith("user")) == [
        f"user{i}@example.test" for i in range(5)
    ], "one acknowledgement each"
    desk.close()


def test_imap_server_restarted_mid_session(
    tmp_path, dovecot, mailbox, imap_proxy, smtp, clock, capsys, monkeypatch
):
    desk = make_desk(tmp_path, mailbox=Via(mailbox, imap_proxy), smtp=smtp, imap={"idle": False})
    for i in range(3):
        mailbox.append(make_mail(f"r{i}@example.test", f"重启 {i}", "服务器重启"))
    search = ImapSource.uids_after
    restarts = []

    def restart_then_search(self, uid):
        if not restarts:  # logged in and selected: the server restarts under us
            restarts.append(1)
            dovecot.restart()
            imap_proxy.cut_after(0)  # and drops the sessions it had, as a restart does
        return search(self, uid)

    monkeypatch.setattr(ImapSource, "uids_after", restart_then_search)
    daemon = Daemon(desk, clock)
    first = daemon.run_once()
    assert restarts == [1] and first.fetched == 0 and len(first.errors) == 1
    assert "UID SEARCH" in first.errors[0]
    assert status(desk, capsys)["errors"], "the error is visible in `mailflow status`"

    imap_proxy.heal()
    clock.advance(minutes=1)
    second = daemon.run_once()
    assert second.errors == [] and second.fetched == 3
    assert ticket_count(desk, capsys) == 3 and flagged(mailbox) == 3
    assert status(desk, capsys)["errors"] == {}, "the error clears once a poll succeeds"
    desk.close()


def test_imap_server_that_stops_answering_times_out_and_recovers(
    tmp_path, mailbox, imap_proxy, smtp, clock, capsys
):
    desk = make_desk(tmp_path, mailbox=Via(mailbox, imap_proxy), smtp=smtp,
                     imap={"timeout": 1, "idle": False, "batch_size": 2})
    for i in range(3):
        mailbox.append(make_mail(f"s{i}@example.test", f"无响应 {i}", BIG))
    daemon = Daemon(desk, clock)

    imap_proxy.stall_after(0)  # not even a greeting
    first = daemon.run_once()
    assert first.fetched == 0 and "did not answer within 1.0s" in first.errors[0]

    imap_proxy.stall_after(40_000)  # stops in the middle of the first FETCH
    clock.advance(minutes=1)
    second = daemon.run_once()
    assert "did not answer within 1.0s during UID FETCH" in second.errors[0]
    assert imap_proxy.stalls == 2
    assert status(desk, capsys)["inbound"]["processed"] == 0

    imap_proxy.heal()
    clock.advance(minutes=2)
    third = daemon.run_once()
    assert third.errors == [] and third.fetched == 3
    assert ticket_count(desk, capsys) == 3
    desk.close()


def test_refused_logins_back_off_and_alert_the_lead_once(
    tmp_path, dovecot, mailbox, imap_proxy, smtp, clock, capsys
):
    desk = make_desk(tmp_path, mailbox=Via(mailbox, imap_proxy), smtp=smtp,
                     imap={"password": "wrong", "idle": False})
    daemon = Daemon(desk, clock)
    attempts = []
    for minute in range(0, 60):  # an hour of the daemon's 30 s polls
        for _ in range(2):
            result = daemon.run_once()
            if result.errors:
                assert "login failed" in result.errors[0]
                attempts.append(minute)
            clock.advance(seconds=30)
    assert attempts == [0, 1, 3, 7, 15, 31], "1, 2, 4, 8, 16 minutes between logins"
    alerts = sent_to(smtp, LEAD)
    assert len(alerts) == 1, "one alert, not one per attempt"
    assert "login failed" in body_of(alerts[0].content)

    # The password is put right on the server: the next login works, the outage is over.
    mailbox.append(make_mail("after@example.test", "恢复了吗", "测试"))
    dovecot.add_user(mailbox.address, "wrong")
    dovecot.restart()  # forget the cached password file at once
    clock.advance(minutes=30)
    recovered = daemon.run_once()
    assert recovered.errors == [] and recovered.fetched == 1
    assert len(sent_to(smtp, LEAD)) == 1

    # A new outage later is a new alert: the password changes, the restart ends our session.
    dovecot.add_user(mailbox.address, mailbox.password)
    dovecot.restart()
    imap_proxy.cut_after(0)
    clock.advance(hours=2)
    assert "UID SEARCH" in daemon.run_once().errors[0]
    assert len(sent_to(smtp, LEAD)) == 1, "one lost connection is no alert"
    imap_proxy.heal()
    clock.advance(minutes=1)
    assert "login failed" in daemon.run_once().errors[0]
    assert len(sent_to(smtp, LEAD)) == 2
    desk.close()


# -- SMTP -----------------------------------------------------------------------------------


def _three_mails(desk, mailbox, clock, n: int = 1) -> Daemon:
    for i in range(n):
        mailbox.append(make_mail(f"u{i}@example.test", f"邮件 {i}", "请处理"))
    return Daemon(desk, clock)


def test_smtp_421_and_451_are_retried(tmp_path, mailbox, smtp, clock, capsys):
    desk = make_desk(tmp_path, mailbox=mailbox, smtp=smtp)
    daemon = _three_mails(desk, mailbox, clock)  # an ack and two service desk notices
    smtp.fail_next(1, "421 4.3.2 service shutting down", stage="MAIL")
    first = daemon.run_once()
    # 421: the server closes the session; that mail waits, the rest wait for the next pass.
    assert (first.relay.sent, first.relay.retried, first.relay.dead) == (0, 1, 0)
    assert status(desk, capsys)["outbox"] == {"queued": 3, "sent": 0, "dead": 0}

    smtp.fail_next(1, "451 4.3.0 try again later")
    clock.advance(seconds=5)
    second = daemon.run_once()
    # 451 for one mail; the session goes on with the next.
    assert (second.relay.sent, second.relay.retried, second.relay.dead) == (1, 1, 0)

    clock.advance(minutes=1)
    third = daemon.run_once()
    assert (third.relay.sent, third.relay.retried, third.relay.dead) == (2, 0, 0)
    assert status(desk, capsys)["outbox"] == {"queued": 0, "sent": 3, "dead": 0}
    assert sorted(r for m in smtp.messages for r in m.rcpt_tos) == [
        "desk1@example.test", "desk2@example.test", "u0@example.test"
    ], "each delivered once"
    desk.close()


def test_smtp_550_for_one_recipient_does_not_stop_the_others(
    tmp_path, mailbox, smtp, clock, capsys
):
    desk = make_desk(tmp_path, mailbox=mailbox, smtp=smtp)
    smtp.reject_recipient("desk1@example.test")
    daemon = _three_mails(desk, mailbox, clock, n=2)
    result = daemon.run_once()
    assert (result.relay.sent, result.relay.dead) == (4, 2)
    assert status(desk, capsys)["outbox"] == {"queued": 0, "sent": 4, "dead": 2}
    assert sent_to(smtp, "desk1@example.test") == []
    assert len(sent_to(smtp, "desk2@example.test")) == 2
    assert len(sent_to(smtp, "u0@example.test")) == len(sent_to(smtp, "u1@example.test")) == 1
    desk.close()


def test_smtp_554_on_data_dead_letters_that_mail_only(tmp_path, mailbox, smtp, clock, capsys):
    desk = make_desk(tmp_path, mailbox=mailbox, smtp=smtp)
    daemon = _three_mails(desk, mailbox, clock)
    smtp.fail_next(1, "554 5.6.0 message refused")
    result = daemon.run_once()
    assert (result.relay.sent, result.relay.dead) == (2, 1)
    desk.close()


def test_smtp_server_that_stops_answering_times_out_and_retries(
    tmp_path, mailbox, smtp, smtp_proxy, clock, capsys
):
    desk = make_desk(tmp_path, mailbox=mailbox, smtp=Via(smtp, smtp_proxy), smtp_timeout=1)
    daemon = _three_mails(desk, mailbox, clock)
    smtp_proxy.stall_after(0)
    first = daemon.run_once()
    assert (first.relay.sent, first.relay.retried) == (0, 3)
    smtp_proxy.stall_after(200)  # answers the greeting and a little more, then goes quiet
    clock.advance(minutes=1)
    second = daemon.run_once()
    assert second.relay.retried == 1 and second.relay.sent <= 2 and second.relay.dead == 0
    smtp_proxy.heal()
    for _ in range(4):
        clock.advance(minutes=5)
        daemon.run_once()
    assert status(desk, capsys)["outbox"] == {"queued": 0, "sent": 3, "dead": 0}
    ids = Counter(parsed(m.content)["Message-ID"] for m in smtp.messages)
    assert len(ids) == 3 and sum(ids.values()) <= 4, "at most one twice (same Message-ID)"
    desk.close()
