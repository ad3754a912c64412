"""Several daemons on one database: one poller per mailbox (a lease that passes over when
its holder dies), inbound and outbox rows taken once, notifications sent once.

Runs on whatever database the suite runs on (SQLite, or PostgreSQL with
MAILFLOW_TEST_DATABASE): the daemons are real `mailflow run` processes.
"""

from __future__ import annotations

import email
import os
import signal
from collections import Counter
from datetime import timedelta
from pathlib import Path

from daemons import eventually, mailflow_process, terminate
from servers import Mailbox, SmtpSink
from support import desk_config, make_desk, make_mail

from mailflow import leases, pipeline
from mailflow.config import load_config
from mailflow.desk import Desk
from mailflow.models import Inbound, Outbox, Ticket, utcnow

TTL = timedelta(seconds=60)


# -- the lease ------------------------------------------------------------------------------


def test_a_lease_is_held_by_one_owner_until_it_expires(desk, clock):
    db, box = desk.db, "imap:desk@host:993/INBOX"
    assert leases.acquire(db, box, "a", clock(), TTL)
    assert not leases.acquire(db, box, "b", clock(), TTL)
    assert leases.holder(db, box, clock()) == "a"
    clock.advance(seconds=59)
    assert leases.acquire(db, box, "a", clock(), TTL), "the holder renews"
    clock.advance(seconds=59)
    assert not leases.acquire(db, box, "b", clock(), TTL), "renewed: still a's"
    clock.advance(seconds=2)
    assert leases.holder(db, box, clock()) is None
    assert leases.acquire(db, box, "b", clock(), TTL), "expired: passes over"
    assert not leases.acquire(db, box, "a", clock(), TTL)


def test_a_released_lease_is_free_at_once(desk, clock):
    db, box = desk.db, "imap:desk@host:993/INBOX"
    assert leases.acquire(db, box, "a", clock(), TTL)
    leases.release(db, box, "b")  # not b's to give
    assert leases.holder(db, box, clock()) == "a"
    leases.release(db, box, "a")
    assert leases.acquire(db, box, "b", clock(), TTL)


def test_leases_are_per_mailbox(desk, clock):
    db = desk.db
    assert leases.acquire(db, "imap:x@h:993/INBOX", "a", clock(), TTL)
    assert leases.acquire(db, "imap:x@h:993/Requests", "b", clock(), TTL)


def test_a_daemon_without_the_lease_does_not_poll(desk, mailbox, clock):
    from mailflow.daemon import Daemon

    mailbox.append(make_mail("a@example.test", "打印机卡纸", "卡纸"))
    daemon = Daemon(desk, clock)
    assert leases.acquire(desk.db, daemon.imap.name, "another-host:1:x", clock(), TTL)
    assert daemon.run_once().fetched == 0
    clock.advance(seconds=61)
    assert daemon.run_once().fetched == 1


# -- rows taken once ---------------------------------------------------------------------------


def test_a_row_in_hand_is_not_processed_again(desk, mailbox, clock):
    """process_one on a row already processed (another daemon finished it) does nothing."""
    from sqlalchemy import select

    from mailflow.daemon import Daemon

    mailbox.append(make_mail("a@example.test", "打印机卡纸", "卡纸"))
    Daemon(desk, clock).poll()
    with desk.db.sessions() as session:
        row_id = session.scalar(select(Inbound.id))
    assert pipeline.process_one(desk, row_id, clock()).state == "processed"
    again = pipeline.process_one(desk, row_id, clock())
    assert (again.state, again.reason) == ("skipped", "already processed")
    with desk.db.sessions() as session:
        assert session.query(Ticket).count() == 1
        assert session.get(Inbound, row_id).attempts == 1


def test_postgresql_passes_over_a_row_another_daemon_holds(desk, mailbox, clock):
    """On PostgreSQL a locked row is skipped (SKIP LOCKED); on SQLite the claim waits its
    turn and then sees the row done. Either way it is processed once."""
    from sqlalchemy import select

    from mailflow.daemon import Daemon

    mailbox.append(make_mail("a@example.test", "打印机卡纸", "卡纸"))
    Daemon(desk, clock).poll()
    with desk.db.sessions() as session:
        row_id = session.scalar(select(Inbound.id))
    if not desk.db.is_postgres:
        assert pipeline.process_one(desk, row_id, clock()).state == "processed"
        assert pipeline.process_one(desk, row_id, clock()).state == "skipped"
        return
    other = Desk(desk.settings)  # a second daemon's connection pool
    with other.db.transaction() as session:
        locked = session.scalar(
            select(Inbound).where(Inbound.id == row_id).with_for_update()
        )
        assert locked is not None
        assert pipeline.process_one(desk, row_id, clock()).state == "busy"
    assert pipeline.process_one(desk, row_id, clock()).state == "processed"
    other.close()


def test_an_outbox_row_claimed_by_one_relay_is_not_sent_by_another(desk, clock):
    from mailflow import outbox

    with desk.db.transaction() as session:
        session.add(Outbox(message_id="m1@x", template="t", sender="itsm@example.test",
                           recipient="a@example.test", subject="s", text="t", raw=b"x",
                           next_attempt_at=clock(), created_at=clock()))
    with desk.db.sessions() as session:
        row_id = session.query(Outbox.id).scalar()
    assert outbox._claim(desk.db, row_id, clock()) is not None
    assert outbox._claim(desk.db, row_id, clock()) is None, "claimed: not due for another"
    clock.advance(minutes=11)
    assert outbox._claim(desk.db, row_id, clock()) is not None, "its relay died: due again"


# -- several daemons on one mailbox ------------------------------------------------------------


def append_many(box: Mailbox, count: int, prefix: str = "") -> list[str]:
    """Store `count` distinct new mails in the mailbox; returns their Message-IDs."""
    ids = [f"scale-{prefix}{n}@example.test" for n in range(count)]
    mails = [
        make_mail(f"user{prefix}{n}@example.test", f"{prefix}电脑问题 {n}",
                  f"第 {n} 台电脑开机后蓝屏。", message_id=f"<{mid}>")
        for n, mid in enumerate(ids)
    ]
    client = box.client()
    try:
        for start in range(0, count, 100):  # MULTIAPPEND: one command per 100 mails
            client.multiappend("INBOX", mails[start : start + 100])
    finally:
        client.logout()
    return ids


def counts(desk: Desk) -> tuple[int, int, int]:
    """(inbound processed, outbox queued, outbox sent)."""
    with desk.db.sessions() as session:
        processed = session.query(Inbound).filter_by(state="processed").count()
        queued = session.query(Outbox).filter_by(state="queued").count()
        sent = session.query(Outbox).filter_by(state="sent").count()
    return processed, queued, sent


def sink_message_ids(sink: SmtpSink) -> Counter[str]:
    return Counter(
        email.message_from_bytes(m.content)["Message-ID"].strip() for m in sink.messages
    )


def scale_config(tmp_path: Path, box: Mailbox, sink: SmtpSink, **extra: dict) -> Path:
    return desk_config(
        tmp_path, mailbox=box, smtp=sink,
        desk={"poll_interval": 1.0},
        imap={"lease_ttl": 5},
        # No scheduled mail: a daemon's catch-up digest, when it starts after the first
        # tickets exist (after 08:30 desk time), would add to the mail these tests count.
        digest={"time": "off", "weekly_report": "off", "monthly_report": "off"},
        **extra,
    )


def test_three_daemons_take_each_of_1000_mails_once(tmp_path, mailbox, smtp):
    message_ids = append_many(mailbox, 1000)
    config = scale_config(tmp_path, mailbox, smtp)
    desk = Desk(load_config(config))
    daemons = [mailflow_process(config, log=tmp_path / f"daemon{n}.log") for n in range(3)]
    try:
        eventually(lambda: counts(desk)[0] == 1000, timeout=600, what="1000 mails processed")
        eventually(lambda: counts(desk)[1] == 0, timeout=300, what="the outbox drained")
    finally:
        codes = [terminate(p) for p in daemons]
    assert codes == [0, 0, 0]
    with desk.db.sessions() as session:
        rows = session.query(Inbound).all()
        assert len(rows) == 1000
        assert sorted(r.message_id for r in rows) == sorted(message_ids)
        assert {r.state for r in rows} == {"processed"}
        assert {r.attempts for r in rows} == {1}, "no mail was processed twice"
        assert session.query(Ticket).count() == 1000
        sent = session.query(Outbox).filter_by(state="sent").count()
        states = Counter(state for (state,) in session.query(Outbox.state))
    assert states == {"sent": 3000}, states  # the requester and two desk members each
    # Every notification reached the SMTP server exactly once.
    seen = sink_message_ids(smtp)
    assert sum(seen.values()) == sent
    assert [mid for mid, n in seen.items() if n > 1] == []
    desk.close()


def test_the_lease_passes_over_when_its_holder_dies(tmp_path, mailbox, smtp):
    config = scale_config(tmp_path, mailbox, smtp)
    desk = Desk(load_config(config))
    mailbox_name = f"imap:{mailbox.address}@{mailbox.host}:{mailbox.port}/INBOX"
    first = mailflow_process(config, log=tmp_path / "first.log")
    second = None
    try:
        holder = eventually(lambda: leases.holder(desk.db, mailbox_name, utcnow()),
                            what="a lease holder")
        assert holder.split(":")[1] == str(first.pid)
        second = mailflow_process(config, log=tmp_path / "second.log")
        append_many(mailbox, 5, "a")
        eventually(lambda: counts(desk)[0] == 5, what="mail while the first holds the lease")
        os.kill(first.pid, signal.SIGKILL)  # dies without giving the lease back
        first.wait(10)
        new = eventually(
            lambda: (h := leases.holder(desk.db, mailbox_name, utcnow())) != holder and h,
            timeout=30, what="the lease passed to the second daemon")
        assert new.split(":")[1] == str(second.pid)
        append_many(mailbox, 5, "b")
        eventually(lambda: counts(desk)[0] == 10, what="mail after the takeover")
    finally:
        terminate(first)  # already gone unless the test failed early
        assert second is None or terminate(second) == 0
    with desk.db.sessions() as session:
        assert session.query(Ticket).count() == 10
    desk.close()


def test_run_once_gives_the_lease_back(desk, mailbox, clock):
    from mailflow.daemon import Daemon

    daemon = Daemon(desk, clock)
    daemon.run_once()
    assert leases.holder(desk.db, daemon.imap.name, clock()) is None


def test_make_desk_uses_the_suites_database(tmp_path):
    desk = make_desk(tmp_path)
    expected = "postgresql" if os.environ.get("MAILFLOW_TEST_DATABASE") else "sqlite"
    assert desk.db.engine.dialect.name == expected
    desk.close()


def test_a_reply_waits_for_its_original_still_being_processed(desk, mailbox, clock):
    """With several daemons the reply may be taken while another daemon still works on the
    original: it waits, and then joins the original's ticket instead of opening one."""
    from sqlalchemy import select

    from mailflow.daemon import Daemon

    original = make_mail("a@example.test", "打印机卡纸", "卡纸", message_id="<orig@example.test>")
    follow_up = make_mail("a@example.test", "Re: 打印机卡纸", "还是卡纸",
                          in_reply_to="orig@example.test", references=["orig@example.test"])
    mailbox.append(original)
    mailbox.append(follow_up)
    Daemon(desk, clock).poll()
    with desk.db.sessions() as session:
        first, second = session.scalars(select(Inbound.id).order_by(Inbound.id))
    assert pipeline.process_one(desk, second, clock()).state == "deferred"
    assert pipeline.process_one(desk, first, clock()).state == "processed"
    assert pipeline.process_one(desk, second, clock()).state == "processed"
    with desk.db.sessions() as session:
        assert session.query(Ticket).count() == 1
        assert session.get(Inbound, second).ticket_id == session.get(Inbound, first).ticket_id


def test_mail_with_nul_characters_is_processed_on_every_database(desk, clock):
    """PostgreSQL text cannot hold NUL, SQLite can: such mail (a broken mailer) must still
    become a ticket on both, never stop the desk."""
    from mailflow.intake import ingest_bytes

    raw = (b"From: A\x00B <a\x00b@example.test>\r\nTo: itsm@example.test\r\n"
           b"Subject: \xe6\x89\x93\x00\xe5\x8d\xb0\r\nMessage-ID: <n\x00ul@example.test>\r\n\r\n"
           b"bo\x00dy\r\n")
    inbound_id = ingest_bytes(desk, raw, clock())
    assert pipeline.process_one(desk, inbound_id, clock()).state == "processed"
    with desk.db.sessions() as session:
        row = session.get(Inbound, inbound_id)
        assert row.message_id == "nul@example.test"
        assert session.query(Ticket).count() == 1
