"""Relay benchmark: N queued mails sent by `outbox.relay` to an SMTP server in another
process (SQLite), beside the floor: the same mails over one connection with `smtplib`.

Prints mails/s, commits a mail, and the ratio to the floor; `--pickup` writes them to the
pickup directory instead (no floor).

    python benchmarks/relay.py [--n 1000] [--pickup]
"""

from __future__ import annotations

import argparse
import asyncio
import smtplib
import subprocess
import sys
import tempfile
import time
from email.message import EmailMessage
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent / "tests")]

from servers import LOOPBACK, free_port, wait_for_port  # noqa: E402
from sqlalchemy import event, insert  # noqa: E402

from mailflow import outbox  # noqa: E402
from mailflow.config import SmtpConfig  # noqa: E402
from mailflow.db import Database  # noqa: E402
from mailflow.models import Outbox, utcnow  # noqa: E402

SINK = """
import sys, time
from aiosmtpd.controller import Controller
class Accept:
    async def handle_DATA(self, server, session, envelope): return '250 OK'
Controller(Accept(), hostname=sys.argv[1], port=int(sys.argv[2])).start()
time.sleep(3600)
"""


def rows(n: int) -> list[dict[str, Any]]:
    now = utcnow()
    queued = []
    for i in range(n):
        mail = EmailMessage()
        mail["From"], mail["To"] = "desk@example.test", f"user{i}@example.test"
        mail["Subject"], mail["Message-ID"] = f"工单 #{i} 已受理", f"<{i}@example.test>"
        mail.set_content("您好，您的工单已受理，我们会尽快处理。\n" * 40)
        queued.append({
            "message_id": f"{i}@example.test", "template": "ack", "sender": mail["From"],
            "recipient": mail["To"], "subject": mail["Subject"], "text": "",
            "raw": mail.as_bytes(), "state": "queued", "attempts": 0,
            "next_attempt_at": now, "created_at": now,
        })
    return queued


def floor(port: int, queued: list[dict[str, Any]]) -> float:
    """Seconds to send the mails over one smtplib connection."""
    mails = [(r["sender"], r["recipient"], r["raw"].replace(b"\n", b"\r\n")) for r in queued]
    started = time.perf_counter()  # smtplib sends bytes as they are: CRLF made beforehand
    with smtplib.SMTP(LOOPBACK, port) as smtp:
        for sender, recipient, raw in mails:
            smtp.sendmail(sender, [recipient], raw)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--pickup", action="store_true")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    db = Database(f"sqlite:///{tmp}/desk.db")
    queued = rows(args.n)
    with db.transaction() as session:
        session.execute(insert(Outbox), queued)
    port = free_port()
    sink = subprocess.Popen([sys.executable, "-c", SINK, LOOPBACK, str(port)])
    try:
        assert wait_for_port(LOOPBACK, port, 10), "the SMTP server did not start"
        commits = [0]
        event.listen(db.engine, "commit", lambda *_: commits.__setitem__(0, commits[0] + 1))
        cfg = SmtpConfig(host="" if args.pickup else LOOPBACK, port=port, security="none",
                         timeout=10, pickup_dir=tmp / "outgoing")
        started = time.perf_counter()
        sent = asyncio.run(outbox.relay(db, cfg, utcnow)).sent
        seconds = time.perf_counter() - started
        print(f"{'pickup' if args.pickup else 'relay'}: {sent} mails in {seconds:.2f} s = "
              f"{sent / seconds:.0f} mails/s, {commits[0] / args.n:.3f} commits a mail")
        if not args.pickup:
            base = floor(port, queued)
            print(f"floor (smtplib, one connection): {args.n / base:.0f} mails/s; "
                  f"relay / floor {seconds / base:.2f}×")
    finally:
        sink.terminate()
        db.close()


if __name__ == "__main__":
    main()
