"""Acknowledgements in a backlog drained after an outage: does everyone who wrote hear back?

A weekend's realistic desk mail (benchmarks/maildata.py: Chinese and English, 30% replies)
from a few hundred people is stored at once, as a desk coming back after an outage would
fetch it, and processed. Printed: tickets opened, acknowledgements queued, requesters who
got none, and alerts to the lead. Every real report in the backlog should be acknowledged.

    python benchmarks/backlog_acks.py [--n 5000] [--people 150] [--hours 60] [--database URL]
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from maildata import generate  # noqa: E402
from sqlalchemy import func, select  # noqa: E402
from support import desk_config  # noqa: E402

from mailflow import pipeline  # noqa: E402
from mailflow.config import load_config  # noqa: E402
from mailflow.desk import Desk  # noqa: E402
from mailflow.models import Alert, Outbox, Ticket  # noqa: E402

_USER = re.compile(rb"user(\d+)@example\.test")
_DATE = re.compile(rb"^Date: .*$", re.MULTILINE)
ACKS = ("ack", "request_submitted", "request_missing_fields")  # to the requester, at once


def backlog(n: int, people: int, hours: float, end: datetime) -> list[bytes]:
    """n mails from `people` senders, written evenly over `hours` before `end`."""
    start, step = end - timedelta(hours=hours), timedelta(hours=hours) / n
    mails = []
    for i, raw in enumerate(generate(n, seed=15)):
        raw = _USER.sub(lambda m: b"user%d@example.test" % (int(m.group(1)) % people), raw)
        date = format_datetime(start + step * i).encode()
        mails.append(_DATE.sub(b"Date: " + date, raw, count=1))
    return mails


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--people", type=int, default=150)
    parser.add_argument("--hours", type=float, default=60.0)
    parser.add_argument("--database", default=None)
    args = parser.parse_args()
    now = datetime(2026, 11, 30, 1, 0, tzinfo=UTC)  # Monday 09:00 Shanghai
    with tempfile.TemporaryDirectory() as tmp:
        desk = Desk(load_config(desk_config(Path(tmp), database_url=args.database)))
        with desk.db.transaction() as session:
            for i, raw in enumerate(backlog(args.n, args.people, args.hours, now)):
                pipeline.store(session, "INBOX", f"INBOX:1:{i + 1}", i + 1, raw, now)
        started = time.perf_counter()
        pipeline.process_pending(desk, lambda: now)
        elapsed = time.perf_counter() - started
        with desk.db.sessions() as session:
            opened = session.scalar(select(func.count(Ticket.id)))
            requesters = set(session.scalars(select(Ticket.requester)))
            acked = set(session.scalars(
                select(Outbox.recipient).where(Outbox.template.in_(ACKS))
            ))
            acks = session.scalar(select(func.count(Outbox.id)).where(Outbox.template.in_(ACKS)))
            alerts = session.scalar(select(func.count(Alert.key)))
        desk.close()
    print(f"{args.n} mails from {args.people} people over {args.hours:g} h, "
          f"processed in {elapsed:.0f} s")
    print(f"tickets opened: {opened}; acknowledgements: {acks} (floor: {opened})")
    print(f"requesters: {len(requesters)}; without an acknowledgement: "
          f"{len(requesters - acked)} (floor: 0); alerts to the lead: {alerts} (floor: 0)")


if __name__ == "__main__":
    main()
