"""Dead holders give way at once: a mailbox lease or an outbox claim whose holder ran on this
host and whose process is gone is taken over at the next poll, not after `lease_ttl` or
`CLAIM_FOR`; a live holder keeps it, and `run --once` and `status` say who has it.

The holders are real processes: a `python` that takes a lease (or is named as a claimer)
and exits, a `sleep` that is still running, and `mailflow run --once` itself.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update
from support import REPO, make_mail, parsed

from mailflow import leases, outbox, pipeline
from mailflow.cli import main
from mailflow.daemon import Daemon
from mailflow.models import Outbox, utcnow

TTL = timedelta(seconds=60)


def dead_owner() -> str:
    """The lease identity of a process of this host that has ended."""
    ended = subprocess.run(
        [sys.executable, "-c", "from mailflow import leases; print(leases.process_owner())"],
        capture_output=True, text=True, check=True, cwd=REPO,
    )
    return ended.stdout.strip()


@pytest.fixture
def running():
    """A process of this host that is still running (ended afterwards)."""
    process = subprocess.Popen(["sleep", "300"])
    yield process
    process.kill()
    process.wait()


def run_once(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mailflow", "--config", str(config), "run", "--once"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )


def status(config: Path, capsys, *args: str) -> str:
    capsys.readouterr()
    assert main(["--config", str(config), "status", *args]) == 0
    return capsys.readouterr().out


# -- who is gone --------------------------------------------------------------------------


def test_a_process_is_gone_when_it_ended_or_its_pid_went_to_another(running):
    alive = leases.owner_of(running.pid, "x")
    assert not leases.gone(alive)
    assert not leases.gone(leases.process_owner()), "we are not gone"
    assert leases.gone(dead_owner())
    started = alive.rpartition(".")[2]
    assert leases.gone(f"{alive.rpartition('.')[0]}.{int(started) + 1}"), "pid reused"
    assert not leases.gone(f"another-{alive}"), "another host's process is not judged"
    assert not leases.gone(f"{leases.HOST}:{running.pid}:x"), "no start time: not judged"
    running.kill()
    running.wait()
    assert leases.gone(alive)


# -- the mailbox lease ----------------------------------------------------------------------


def test_a_lease_whose_holder_died_on_this_host_passes_at_once(desk, mailbox, capsys):
    box = Daemon(desk).imap.name
    dead = dead_owner()
    assert leases.acquire(desk.db, box, dead, utcnow(), TTL)
    shown = json.loads(status(desk.settings.path, capsys, "--json"))["mailboxes"][box]
    assert shown["poller"] is None and shown["gone_holder"] == dead
    assert f"its holder {dead} is gone" in status(desk.settings.path, capsys)
    mailbox.append(make_mail("zhao@example.test", "打印机卡纸", "三楼打印机卡纸"))
    ran = run_once(desk.settings.path)  # seconds later, well inside the dead one's TTL
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert ran.stdout.startswith("fetched 1, processed 1"), ran.stdout
    assert "not polled" not in ran.stderr


def test_a_live_holder_keeps_the_lease_and_run_once_says_who_has_it(desk, mailbox, capsys):
    box = Daemon(desk).imap.name
    live = leases.process_owner()  # this test's process: running, and not the run below
    assert leases.acquire(desk.db, box, live, utcnow(), TTL)
    mailbox.append(make_mail("zhao@example.test", "打印机卡纸", "三楼打印机卡纸"))
    ran = run_once(desk.settings.path)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert ran.stdout.startswith("fetched 0"), ran.stdout
    said = [line for line in ran.stderr.splitlines() if "not polled" in line]
    assert len(said) == 1, ran.stderr[-2000:]
    assert said[0].startswith(f"mailflow: mailbox {box} not polled: the daemon {live} holds")
    shown = json.loads(status(desk.settings.path, capsys, "--json"))["mailboxes"][box]
    assert shown["poller"] == live and shown["gone_holder"] is None
    assert shown["lease_until"].endswith("Z")
    assert f"polled by {live} (lease until " in status(desk.settings.path, capsys)


def test_a_lease_held_on_another_host_or_by_a_live_process_waits_its_ttl(desk, running):
    box = "imap:x@h:993/INBOX"
    now = utcnow()
    for holder in (f"other-host:{running.pid}:x:abc-1.1", leases.owner_of(running.pid, "x")):
        assert leases.acquire(desk.db, box, holder, now, TTL)
        assert not leases.acquire(desk.db, box, "me", now, TTL)
        assert leases.acquire(desk.db, box, "me", now + TTL * 2, TTL), "expired: passes over"
        leases.release(desk.db, box, "me")


# -- outbox claims ----------------------------------------------------------------------------


def queue_one(desk, mailbox) -> int:
    """One acknowledgement queued for a new mail; returns its outbox id."""
    mailbox.append(make_mail("zhao@example.test", "打印机卡纸", "三楼打印机卡纸"))
    daemon = Daemon(desk)
    daemon.poll()
    pipeline.process_pending(desk, utcnow)
    with desk.db.sessions() as session:
        ids = list(session.scalars(select(Outbox.id).where(Outbox.state == "queued")))
    assert ids
    return ids[0]


def claim_as(desk, row_id: int, claimer: str) -> None:
    """The row as a relay `claimer` left it when it claimed it and stopped."""
    with desk.db.transaction() as session:
        session.execute(
            update(Outbox)
            .where(Outbox.id == row_id)
            .values(claimed_by=claimer, next_attempt_at=utcnow() + outbox.CLAIM_FOR)
        )


def relay(desk) -> outbox.RelayResult:
    return asyncio.run(outbox.relay(desk.db, desk.settings.smtp, utcnow))


def test_mail_claimed_by_a_relay_that_died_on_this_host_is_sent_at_once(desk, mailbox, smtp):
    row_id = queue_one(desk, mailbox)
    claim_as(desk, row_id, dead_owner())
    relay(desk)
    with desk.db.sessions() as session:
        row = session.get(Outbox, row_id)
        assert row.state == "sent" and row.claimed_by is None
    sent = {parsed(m.content)["Message-ID"].strip("<>") for m in smtp.messages}
    assert row.message_id in sent


def test_mail_claimed_by_a_live_relay_is_left_to_it(desk, mailbox, smtp, running):
    row_id = queue_one(desk, mailbox)
    for claimer in (leases.owner_of(running.pid, "x"), f"other-host:{running.pid}:x:abc-1.1"):
        claim_as(desk, row_id, claimer)
        relay(desk)
        with desk.db.sessions() as session:
            row = session.get(Outbox, row_id)
            assert row.state == "queued" and row.claimed_by == claimer
