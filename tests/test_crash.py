"""Crash safety: SIGKILL `mailflow run --once` at every stage, restart, and count.

Each run is a real process (tests/crashrun.py) reading the real Dovecot mailbox and sending
to the real SMTP sink. Whatever the point of death, after a restart every message is
processed exactly once, no ticket is made twice, every notification is delivered, and at
most the relay's batch in flight is delivered twice — then with the same Message-IDs.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import select
from support import desk_config, make_mail, parsed

from mailflow import outbox
from mailflow.config import load_config
from mailflow.db import Database
from mailflow.models import Inbound, Outbox, Ticket

CRASHRUN = Path(__file__).parent / "crashrun.py"
LATER = 11 * 60  # a restart after the dead run's lease (60 s) and outbox claims (10 min) ran out
USERS = ["zhao@example.test", "qian@example.test", "sun@example.test"]
SUBJECTS = ["打印机卡纸", "显示器不亮", "无法登录 OA"]


def crashrun(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(CRASHRUN), "--config", str(config), *args],
        capture_output=True, text=True, timeout=120,
    )


def scenario(tmp_path: Path, mailbox, smtp) -> Path:
    config = desk_config(tmp_path, mailbox=mailbox, smtp=smtp,
                         imap={"batch_size": 2, "idle": False})
    for user, subject in zip(USERS, SUBJECTS, strict=True):
        mailbox.append(make_mail(user, subject, f"{subject}，请处理"))
    return config


def flagged(mailbox) -> list[bool]:
    client = mailbox.client()
    try:
        client.select_folder("INBOX", readonly=True)
        flags = client.get_flags(client.search("ALL"))
    finally:
        client.logout()
    return [b"$MailflowDone" in f for _, f in sorted(flags.items())]


def check_exactly_once(config: Path, mailbox, smtp) -> dict[str, int]:
    """The invariants after the last restart; returns what was counted."""
    db = Database(load_config(config).database_url)
    try:
        with db.sessions() as session:
            states = Counter(session.scalars(select(Inbound.state)))
            tickets = session.scalars(select(Ticket)).all()
            rows = session.scalars(select(Outbox)).all()
    finally:
        db.close()
    assert states == {"processed": 3}, "every message processed exactly once"
    assert sorted(t.requester for t in tickets) == sorted(USERS), "one ticket per message"
    assert sorted(t.number for t in tickets) == [1, 2, 3]
    queued = Counter((r.ticket_id, r.template, r.recipient) for r in rows)
    assert max(queued.values()) == 1, "no notification queued twice"
    acks = {r.recipient for r in rows if r.template == "ack"}
    assert acks == set(USERS), "every requester acknowledged"
    assert {r.ticket_id for r in rows if r.recipient == "desk1@example.test"} == {
        t.id for t in tickets
    }, "the service desk told of every ticket"
    assert {r.state for r in rows} == {"sent"}, "no notification lost"
    delivered = Counter(parsed(m.content)["Message-ID"].strip("<>") for m in smtp.messages)
    assert set(delivered) == {r.message_id for r in rows}, "every queued mail was delivered"
    twice = {mid: n for mid, n in delivered.items() if n > 1}
    assert sum(n - 1 for n in twice.values()) <= outbox.BATCH, f"more than a batch: {twice}"
    assert flagged(mailbox) == [True, True, True], "every message flagged on the server"
    return {"deliveries": len(smtp.messages), "duplicates": sum(n - 1 for n in twice.values())}


KILLS = [
    ("fetched", 1),     # fetched, nothing stored
    ("fetched", 3),     # first batch stored and flagged; third message fetched, not stored
    ("stored", 1),      # first batch committed, not flagged on the server
    ("stored", 2),      # second batch committed, not flagged
    ("processing", 1),  # inside the first message's savepoint
    ("processing", 3),  # inside the last one's: the first two done but not committed
    ("processed", 1),   # after the batch's commit: everything processed, nothing sent
    ("sending", 1),     # the server accepted the first mail; not marked sent
    ("sending", 6),     # … the sixth
    ("sent", 4),        # the batch holding the fourth mail sent and marked
]


@pytest.mark.parametrize(("point", "after"), KILLS, ids=[f"{p}-{n}" for p, n in KILLS])
def test_killed_then_restarted_loses_nothing_and_doubles_nothing(
    point, after, tmp_path, mailbox, smtp
):
    config = scenario(tmp_path, mailbox, smtp)
    killed = crashrun(config, "--kill-at", point, "--after", str(after))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    restarted = crashrun(config, "--later", str(LATER))
    assert restarted.returncode == 0, restarted.stderr[-2000:]
    counted = check_exactly_once(config, mailbox, smtp)
    if point == "sending":
        assert counted["duplicates"] == after, "what its batch had sent goes once more"
    else:
        assert counted["duplicates"] == 0


AT_ONCE = [
    ("fetched", 1),  # dies holding the mailbox lease
    ("sending", 1),  # dies holding the claim on the mail the server just accepted
]


@pytest.mark.parametrize(("point", "after"), AT_ONCE, ids=[f"{p}-{n}" for p, n in AT_ONCE])
def test_restarted_at_once_the_dead_runs_lease_and_claims_give_way(
    point, after, tmp_path, mailbox, smtp
):
    """No waiting out `lease_ttl` (60 s) or `CLAIM_FOR` (10 min): the dead run was on this
    host and its process is gone, so the next run takes its mailbox and mail over."""
    config = scenario(tmp_path, mailbox, smtp)
    killed = crashrun(config, "--kill-at", point, "--after", str(after))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    restarted = crashrun(config)  # at once: the dead run's lease and claims have not run out
    assert restarted.returncode == 0, restarted.stderr[-2000:]
    assert "not polled" not in restarted.stderr
    counted = check_exactly_once(config, mailbox, smtp)
    assert counted["duplicates"] == (point == "sending")


def test_killed_at_every_stage_in_turn(tmp_path, mailbox, smtp):
    """One desk dies at each stage in turn, restarting after each death."""
    config = scenario(tmp_path, mailbox, smtp)
    for n, point in enumerate(("fetched", "stored", "processing", "processed", "sending")):
        killed = crashrun(config, "--kill-at", point, "--later", str(LATER * n))
        assert killed.returncode == -signal.SIGKILL, (point, killed.stderr[-2000:])
    final = crashrun(config, "--later", str(LATER * 6))
    assert final.returncode == 0, final.stderr[-2000:]
    check_exactly_once(config, mailbox, smtp)
