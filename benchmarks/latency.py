"""Latency benchmark: from a mail's arrival in the mailbox to its ticket and to the
requester's acknowledgement reaching the SMTP server, with a real `mailflow run` waiting
in IMAP IDLE (the poll interval is an hour, so only IDLE can bring the mail in).

Mails arrive one at a time (APPEND on a real Dovecot); the arrival time is when APPEND
returned. Prints p50 / p95 / max of arrival→ticket (the inbound row's processed_at) and
arrival→acknowledgement (DATA accepted by the SMTP server).

    python benchmarks/latency.py [--n 50] [--mode idle|poll] [--database URL]
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

import databases  # noqa: E402
from aiosmtpd.controller import Controller  # noqa: E402
from daemons import eventually, mailflow_process, terminate  # noqa: E402
from servers import Dovecot, Mailbox, free_port  # noqa: E402
from sqlalchemy import select  # noqa: E402
from support import desk_config, make_mail  # noqa: E402

from mailflow.config import load_config  # noqa: E402
from mailflow.desk import Desk  # noqa: E402
from mailflow.models import Inbound  # noqa: E402


class TimingSink:
    """An SMTP server noting when mail for each recipient was accepted (wall clock)."""

    def __init__(self) -> None:
        self.host, self.port = "127.0.0.1", free_port()
        self.arrived: dict[str, float] = {}
        self._lock = threading.Lock()
        self._controller = Controller(self, hostname=self.host, port=self.port)

    async def handle_DATA(self, server: object, session: object, envelope) -> str:  # noqa: N802
        now = time.time()
        with self._lock:
            for rcpt in envelope.rcpt_tos:
                self.arrived.setdefault(rcpt.lower(), now)
        return "250 OK"

    def start(self) -> None:
        self._controller.start()

    def stop(self) -> None:
        self._controller.stop()


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[max(math.ceil(p / 100 * len(ordered)) - 1, 0)]


def summary(name: str, values: list[float]) -> str:
    return (f"{name:<26} p50 {percentile(values, 50) * 1000:7.0f} ms   "
            f"p95 {percentile(values, 95) * 1000:7.0f} ms   max {max(values) * 1000:7.0f} ms")


def processed_at(desk: Desk, message_id: str) -> datetime | None:
    with desk.db.sessions() as s:
        return s.scalar(select(Inbound.processed_at).where(Inbound.message_id == message_id))


def private_schema(url: str | None, schema: str) -> str | None:
    """A PostgreSQL URL gets a schema of its own (made afresh, dropped at the end)."""
    if not url or not url.startswith("postgresql"):
        return url
    databases._execute(
        url, f'DROP SCHEMA IF EXISTS "{schema}" CASCADE', f'CREATE SCHEMA "{schema}"'
    )
    return databases.schema_url(url, schema)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--mode", choices=("idle", "poll"), default="idle")
    parser.add_argument("--poll-interval", type=float, default=30.0, help="for --mode poll")
    parser.add_argument("--database", help="database URL (default: SQLite in a temp dir)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mailflow-latency-"))
    server = Dovecot(Path(tempfile.mkdtemp(prefix="mailflow-latency-imap-")))
    server.start()
    sink = TimingSink()
    sink.start()
    try:
        box = Mailbox(server, "desk@example.test")
        server.add_user(box.address, box.password)
        idle = args.mode == "idle"
        database = private_schema(args.database, "bench_latency")
        config = desk_config(
            work, mailbox=box, smtp=sink, database_url=database,
            desk={"poll_interval": 3600.0 if idle else args.poll_interval},
            imap={"idle": idle},
            digest={"weekly_report": "off", "monthly_report": "off"},
            log={"level": "WARNING"},
        )
        desk = Desk(load_config(config))
        daemon = mailflow_process(config, log=work / "daemon.log")
        to_ticket, to_ack = [], []
        try:
            time.sleep(3)  # start-up: migrations, first poll, into IDLE
            client = box.client()
            for i in range(args.n):
                sender = f"latency{i}@example.test"
                message_id = f"latency-{i}-{time.time_ns()}@example.test"
                raw = make_mail(sender, "打印机卡纸", f"第 {i} 次：三楼打印机卡纸。",
                                message_id=f"<{message_id}>")
                client.append("INBOX", raw)
                arrived = time.time()
                done = eventually(lambda mid=message_id: processed_at(desk, mid), timeout=120,
                                  what=f"mail {i} ticketed")
                acked = eventually(lambda s=sender: sink.arrived.get(s), timeout=120,
                                   what=f"mail {i} acknowledged")
                to_ticket.append(done.replace(tzinfo=done.tzinfo or UTC).timestamp() - arrived)
                to_ack.append(acked - arrived)
                time.sleep(0.2)  # the next mail comes later, as mail does
            client.logout()
        finally:
            terminate(daemon)
        print(f"{args.n} mails, one at a time, mode {args.mode}, database "
              f"{desk.settings.database_url.split(':')[0]}")
        print(summary("arrival -> ticket", to_ticket))
        print(summary("arrival -> acknowledgement", to_ack))
        desk.close()
    finally:
        if args.database and args.database.startswith("postgresql"):
            databases._execute(args.database, 'DROP SCHEMA IF EXISTS "bench_latency" CASCADE')
        sink.stop()
        server.stop()
        shutil.rmtree(server.root, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
