"""The relay sends a batch at a time: one SMTP connection for a pass, two commits a batch,
and a crash mid-batch re-sends only what that batch had sent, with the same Message-IDs."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections import Counter
from datetime import timedelta
from email.message import EmailMessage
from pathlib import Path

from sqlalchemy import event, insert, select
from support import desk_config, make_desk, parsed

from mailflow import outbox
from mailflow.config import load_config
from mailflow.db import Database
from mailflow.models import Outbox, utcnow

CRASHRUN = Path(__file__).parent / "crashrun.py"


def queue(db: Database, n: int) -> list[str]:
    """Queue n due mails, one recipient each; returns their Message-IDs in queue order."""
    now = utcnow() - timedelta(minutes=1)
    rows = []
    for i in range(n):
        mail = EmailMessage()
        mail["From"], mail["To"] = "desk@example.test", f"user{i}@example.test"
        mail["Subject"], mail["Message-ID"] = f"工单 #{i} 已受理", f"<batch-{i}@example.test>"
        mail.set_content("您好，您的工单已受理。")
        rows.append({
            "message_id": f"batch-{i}@example.test", "template": "ack",
            "sender": "desk@example.test", "recipient": f"user{i}@example.test",
            "subject": mail["Subject"], "text": "", "raw": mail.as_bytes(), "state": "queued",
            "attempts": 0, "next_attempt_at": now, "created_at": now,
        })
    with db.transaction() as session:
        session.execute(insert(Outbox), rows)
    return [row["message_id"] for row in rows]


def delivered(smtp) -> Counter:
    return Counter(parsed(m.content)["Message-ID"].strip("<>") for m in smtp.messages)


def test_one_connection_serves_every_batch_of_a_pass(tmp_path, mailbox, smtp, monkeypatch):
    monkeypatch.setattr(outbox, "BATCH", 3)
    desk = make_desk(tmp_path, mailbox=mailbox, smtp=smtp)
    try:
        ids = queue(desk.db, 7)
        commits: list[object] = []
        event.listen(desk.db.engine, "commit", commits.append)
        result = asyncio.run(outbox.relay(desk.db, desk.settings.smtp, utcnow))
        assert result.sent == 7
        assert delivered(smtp) == Counter(ids), "each mail once"
        assert smtp.connections == 1, "one SMTP connection for the three batches"
        assert len(commits) <= 2 * 3, "a claim and a record of outcomes per batch"
    finally:
        desk.close()


def test_a_crash_mid_batch_resends_what_the_batch_sent_with_the_same_message_ids(
    tmp_path, mailbox, smtp
):
    config = desk_config(tmp_path, mailbox=mailbox, smtp=smtp, imap={"idle": False})
    db = Database(load_config(config).database_url)
    try:
        ids = queue(db, 5)
        killed = subprocess.run(
            [sys.executable, str(CRASHRUN), "--config", str(config),
             "--kill-at", "sending", "--after", "3"],
            capture_output=True, text=True, timeout=120,
        )
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
        before = list(smtp.messages)
        assert [parsed(m.content)["Message-ID"].strip("<>") for m in before] == ids[:3]
        restarted = subprocess.run(
            [sys.executable, str(CRASHRUN), "--config", str(config)],
            capture_output=True, text=True, timeout=120,
        )
        assert restarted.returncode == 0, restarted.stderr[-2000:]
        again = smtp.messages[len(before):]
        assert delivered(smtp) == Counter(ids) + Counter(ids[:3]), (
            "the three the dead batch had sent go once more, the rest once"
        )
        first = {parsed(m.content)["Message-ID"]: m.content for m in before}
        assert all(first[parsed(m.content)["Message-ID"]] == m.content
                   for m in again if parsed(m.content)["Message-ID"] in first), "the same mail"
        with db.sessions() as session:
            assert set(session.scalars(select(Outbox.state))) == {"sent"}
    finally:
        db.close()
