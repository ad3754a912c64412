"""Push delivery: the daemon waits in IMAP IDLE on the real Dovecot and tickets new mail
without waiting for a poll; IDLE is renewed; a dead connection is rebuilt; a server without
IDLE is polled."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from daemons import daemon_thread, eventually
from dovecots import NO_IDLE, private_dovecot
from servers import Mailbox
from support import make_desk, make_mail

from mailflow.cli import main
from mailflow.desk import Desk
from mailflow.models import Ticket

HOUR = 3600  # a poll interval no test waits out: only IDLE can bring the mail in


def tickets(desk: Desk) -> list[Ticket]:
    with desk.db.sessions() as session:
        return list(session.query(Ticket).order_by(Ticket.id))


def idle_desk(tmp_path: Path, mailbox: Mailbox, smtp, **imap: object) -> Desk:
    return make_desk(
        tmp_path, mailbox=mailbox, smtp=smtp, desk={"poll_interval": HOUR}, imap=imap
    )


def test_mail_is_ticketed_while_the_daemon_waits_in_idle(tmp_path, mailbox, smtp):
    desk = idle_desk(tmp_path, mailbox, smtp)
    with daemon_thread(desk) as daemon:
        watcher = eventually(lambda: daemon.watchers and daemon.watchers[0], what="a watcher")
        eventually(lambda: watcher.idles >= 1, what="the watcher in IDLE")
        polls = watcher.polls
        mailbox.append(make_mail("wang.wu@example.test", "打印机卡纸", "三楼打印机卡纸了。"))
        found = eventually(lambda: tickets(desk), what="a ticket from the IDLE wake-up")
        assert found[0].subject == "打印机卡纸"
        # The acknowledgement went out too, without any timer firing.
        eventually(lambda: any("wang.wu@example.test" in m.rcpt_tos for m in smtp.messages),
                   what="the acknowledgement")
        assert watcher.polls == polls + 1, "one poll, woken by IDLE's EXISTS"
    desk.close()


def test_idle_is_left_and_renewed_every_idle_renew(tmp_path, mailbox, smtp):
    desk = idle_desk(tmp_path, mailbox, smtp, idle_renew=0.3)
    with daemon_thread(desk) as daemon:
        watcher = eventually(lambda: daemon.watchers and daemon.watchers[0], what="a watcher")
        eventually(lambda: watcher.idles >= 4, what="IDLE renewed three times")
        assert watcher.source.logins == 1, "renewal re-issues IDLE on the same connection"
        mailbox.append(make_mail("li.si@example.test", "VPN 连不上", "VPN 报错 809。"))
        eventually(lambda: tickets(desk), what="a ticket after renewals")
    desk.close()


def test_idle_renew_defaults_below_the_servers_30_minutes(tmp_path, mailbox, smtp):
    desk = make_desk(tmp_path, mailbox=mailbox, smtp=smtp)
    assert desk.settings.imap.idle is True
    assert desk.settings.imap.idle_renew == 25 * 60
    desk.close()


@pytest.mark.parametrize(("value", "seconds"), [("20m", 1200.0), ("90s", 90.0), (600, 600.0)])
def test_idle_renew_accepts_durations(tmp_path, mailbox, value, seconds):
    desk = make_desk(tmp_path, mailbox=mailbox, imap={"idle_renew": value})
    assert desk.settings.imap.idle_renew == seconds
    desk.close()


def test_idle_renew_of_29_minutes_or_more_is_a_config_problem(tmp_path, mailbox, capsys):
    from support import desk_config

    config = desk_config(tmp_path, mailbox=mailbox, imap={"idle_renew": "30m"})
    assert main(["--config", str(config), "check"]) == 1
    assert "imap.idle_renew" in capsys.readouterr().out


def test_a_dropped_connection_is_rebuilt_and_mail_still_arrives(tmp_path, smtp):
    with private_dovecot() as server:
        box = Mailbox(server, "desk@example.test")
        server.add_user(box.address, box.password)
        desk = idle_desk(tmp_path, box, smtp)
        with daemon_thread(desk) as daemon:
            watcher = eventually(lambda: daemon.watchers and daemon.watchers[0], what="watcher")
            eventually(lambda: watcher.idles >= 1, what="the watcher in IDLE")
            server.kick(box.address)  # the server drops the session mid-IDLE
            eventually(lambda: watcher.source.logins >= 2, what="a second login", timeout=30)
            box.append(make_mail("zhao.liu@example.test", "OA 打不开", "OA 系统白屏。"))
            eventually(lambda: tickets(desk), what="a ticket after the reconnection")
        desk.close()


def test_a_failed_reconnection_is_recorded_and_retried_with_backoff(tmp_path, smtp, capsys):
    with private_dovecot() as server:
        box = Mailbox(server, "desk@example.test")
        server.add_user(box.address, box.password)
        desk = idle_desk(tmp_path, box, smtp)
        with daemon_thread(desk) as daemon:
            watcher = eventually(lambda: daemon.watchers and daemon.watchers[0], what="watcher")
            eventually(lambda: watcher.idles >= 1, what="the watcher in IDLE")
            server.stop_hard()  # the server goes away mid-IDLE, then comes back on its port
            eventually(lambda: watcher.backoff.failures >= 2, what="two failed reconnections")
            status = _status(desk, capsys)
            assert box.address in next(iter(status["errors"]))
            server.start()
            box.append(make_mail("zhao.liu@example.test", "邮箱满了", "邮箱提示空间不足。"))
            eventually(lambda: tickets(desk), what="a ticket once the server is back", timeout=30)
            assert watcher.backoff.failures == 0
            assert _status(desk, capsys)["errors"] == {}
        desk.close()


def test_a_server_without_idle_is_polled(tmp_path, smtp):
    with private_dovecot(extra=NO_IDLE) as server:
        box = Mailbox(server, "desk@example.test")
        server.add_user(box.address, box.password)
        desk = make_desk(tmp_path, mailbox=box, smtp=smtp)  # poll_interval 0.2 s
        with daemon_thread(desk) as daemon:
            watcher = eventually(lambda: daemon.watchers and daemon.watchers[0], what="watcher")
            eventually(lambda: watcher.polls >= 2, what="two polls")
            assert not watcher.source.supports_idle
            box.append(make_mail("sun.qi@example.test", "电脑很慢", "开机要十分钟。"))
            eventually(lambda: tickets(desk), what="a ticket by polling")
            assert watcher.idles == 0
        desk.close()


def test_idle_can_be_switched_off(tmp_path, mailbox, smtp):
    desk = make_desk(tmp_path, mailbox=mailbox, smtp=smtp, imap={"idle": False})
    with daemon_thread(desk) as daemon:
        watcher = eventually(lambda: daemon.watchers and daemon.watchers[0], what="watcher")
        mailbox.append(make_mail("sun.qi@example.test", "键盘坏了", "键盘有几个键不灵。"))
        eventually(lambda: tickets(desk), what="a ticket by polling")
        assert watcher.idles == 0 and watcher.source.supports_idle
    desk.close()


def test_stopping_leaves_idle_and_gives_the_lease_back(tmp_path, mailbox, smtp):
    from mailflow import leases
    from mailflow.models import utcnow

    desk = idle_desk(tmp_path, mailbox, smtp)
    with daemon_thread(desk) as daemon:
        watcher = eventually(lambda: daemon.watchers and daemon.watchers[0], what="watcher")
        eventually(lambda: watcher.idles >= 1, what="the watcher in IDLE")
        assert leases.holder(desk.db, watcher.name, utcnow()) == daemon.owner
    assert leases.holder(desk.db, watcher.name, utcnow()) is None
    assert not watcher.source.connected
    desk.close()


def _status(desk: Desk, capsys) -> dict:
    capsys.readouterr()
    assert main(["--config", str(desk.settings.path), "status", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_mail_announced_during_a_poll_is_not_missed_by_the_next_idle(mailbox):
    """The server says EXISTS once; if it rides on the answer to our NOOP or SEARCH, IDLE
    will not repeat it, so the source must remember it and ask for a poll."""
    from mailflow.fetch import ImapSettings, ImapSource

    mailbox.append(make_mail("a@example.test", "第一封", "1"))
    source = ImapSource(ImapSettings(mailbox.host, mailbox.port, security="none",
                                     username=mailbox.address, password=mailbox.password))
    with source:
        uids = source.uids_after(0)
        list(source.fetch(uids))
        mailbox.append(make_mail("b@example.test", "第二封", "2"))  # arrives mid-poll
        source.mark_done(uids)  # its NOOP carries the EXISTS for the second mail
        assert source.wait_for_mail(timeout=1.0) is True
        assert source.uids_after(uids[-1]) == [uids[-1] + 1]
        assert source.wait_for_mail(timeout=0.3) is False, "nothing new since"
