"""Report and digest benchmark: the cost of reading N incidents' event logs and computing
every figure (SQLite, no servers). The incidents are written straight into the database:
a year of registrations, a third of them with a pending period, one in ten reopened.

Prints numbers only; nothing is asserted.

    python benchmarks/reports.py [--n 10000]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "tests")]

from support import desk_config  # noqa: E402

from mailflow import digest, metrics, report  # noqa: E402
from mailflow.config import load_config  # noqa: E402
from mailflow.desk import Desk  # noqa: E402
from mailflow.models import Event, Ticket  # noqa: E402

START = datetime(2026, 1, 5, 1, 0, tzinfo=UTC)
NOW = datetime(2026, 12, 31, 2, 0, tzinfo=UTC)


def _status(ticket_id: int, at: datetime, old: str, new: str) -> Event:
    return Event(ticket_id=ticket_id, at=at, action="status", actor="x@example.test",
                 detail=f"{old} → {new}", data={"old": old, "new": new})


def populate(desk: Desk, n: int, seed: int = 7) -> None:
    rnd = random.Random(seed)
    span = (NOW - START).total_seconds() - 86_400 * 10
    with desk.db.transaction() as session:
        for number in range(1, n + 1):
            created = START + timedelta(seconds=rnd.uniform(0, span))
            priority = rnd.choice(("P1", "P2", "P3", "P3", "P3", "P4", "P4"))
            ticket = Ticket(kind="incident", number=number, status="open", priority=priority,
                            category=rnd.choice(("network", "desktop", "printer", "oa", "email")),
                            tier=rnd.choice(("L1", "L1", "L1", "L2", "L3")), major=False,
                            desktop=True, rule="bench", requester=f"u{rnd.randrange(300)}@x.test",
                            subject="bench", created_at=created, updated_at=created,
                            responded_at=created + timedelta(minutes=rnd.uniform(5, 300)))
            session.add(ticket)
            session.flush()
            events = [Event(ticket_id=ticket.id, at=created, action="opened", actor="u",
                            detail="", data=None)]
            at = created + timedelta(hours=rnd.uniform(1, 30))
            if rnd.random() < 0.33:
                events += [Event(ticket_id=ticket.id, at=at, action="pending", actor="x",
                                 detail="", data=None), _status(ticket.id, at, "open", "pending")]
                at += timedelta(hours=rnd.uniform(1, 48))
                events.append(_status(ticket.id, at, "pending", "open"))
                at += timedelta(hours=rnd.uniform(1, 20))
            if rnd.random() < 0.9:
                events += [Event(ticket_id=ticket.id, at=at, action="resolved", actor="x",
                                 detail="", data=None), _status(ticket.id, at, "open", "resolved")]
                ticket.status, ticket.resolved_at = "resolved", at
                if rnd.random() < 0.1:
                    at += timedelta(hours=rnd.uniform(1, 48))
                    events += [Event(ticket_id=ticket.id, at=at, action="reopened", actor="u",
                                     detail="", data=None),
                               _status(ticket.id, at, "resolved", "open")]
                    ticket.status, ticket.resolved_at = "open", None
            ticket.updated_at = at
            session.add_all(events)


def timed(label: str, fn):  # noqa: ANN001, ANN201
    start = time.perf_counter()
    result = fn()
    print(f"{label:<52} {time.perf_counter() - start:8.3f} s")
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        desk = Desk(load_config(desk_config(Path(tmp))))
        timed(f"write {args.n} incidents with their events", lambda: populate(desk, args.n))
        with desk.db.sessions() as session:
            facts = timed("metrics.iter_facts: every incident's facts", lambda: list(
                metrics.iter_facts(session, desk, NOW)))
        print(f"  {len(facts)} incidents, {sum(f.is_open for f in facts)} of them open")
        data = timed("report.compute: one month (+ previous, 6-month trend)",
                     lambda: report.compute(desk, date(2026, 11, 1), date(2026, 11, 30), NOW))
        print(f"  November: {data['incidents']} due, rate {data['target_achievement_rate']}")
        timed("report.compute: one week", lambda: report.compute(
            desk, date(2026, 12, 21), date(2026, 12, 27), NOW))
        timed("report.render csv + json", lambda: (report.render(data, "csv"),
                                                   report.render(data, "json")))
        from mailflow import charts

        timed("charts.images (2 PNG)", lambda: charts.images(data))
        items = timed("digest.run_digests (dry run, every role)",
                      lambda: digest.run_digests(desk, NOW, dry_run=True))
        print(f"  {len(items)} digests")
        desk.close()


if __name__ == "__main__":
    main()
