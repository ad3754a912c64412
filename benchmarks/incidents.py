"""Incident benchmark: know-how reuse and the SLA scan on a desk with many tickets.

Builds a SQLite desk with N resolved incidents (varied Chinese/English subjects, several
categories) and M open ones, then prints:
  - similar_resolved: ms per new incident, cold (profiles not cached) and warm;
  - sla_jobs.scan: ms per scan over the M open incidents (the job runs every minute);
  - sla_jobs.auto_close: ms per run.

    python benchmarks/incidents.py [--resolved 5000] [--open 1000]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "tests")]

from support import make_desk  # noqa: E402

from mailflow import similar, sla_jobs  # noqa: E402
from mailflow.models import Event, Ticket  # noqa: E402

OBJECTS = ["电脑", "打印机", "Outlook", "OA系统", "营销系统", "VPN", "显示器", "网络", "邮箱",
           "WPS"]
FAULTS = ["蓝屏", "无法登录", "卡纸", "无法发送邮件", "很慢", "报错 0x800CCC0E", "打不开",
          "掉线", "黑屏", "提示证书过期", "cannot connect", "keeps crashing"]
PLACES = ["三楼", "营业厅", "计量中心", "财务部", "二号楼", "供电所"]
CATEGORIES = ["desktop", "printer", "email", "oa", "marketing", "network"]


def text(rng: random.Random) -> tuple[str, str]:
    subject = f"{rng.choice(PLACES)}{rng.choice(OBJECTS)}{rng.choice(FAULTS)}"
    body = "，".join(f"{rng.choice(OBJECTS)}{rng.choice(FAULTS)}" for _ in range(rng.randint(2, 8)))
    return subject, body + "。请尽快处理，谢谢。"


def populate(desk, resolved: int, opened: int, now: datetime) -> None:
    rng = random.Random(7)
    with desk.db.transaction() as session:
        for n in range(1, resolved + opened + 1):
            subject, body = text(rng)
            done = n <= resolved
            # Resolved ones over two months; the open backlog over the last five days.
            at = now - timedelta(minutes=rng.randint(10, (60 if done else 5) * 24 * 60))
            ticket = Ticket(
                kind="incident", number=n, status="closed" if done else "open", priority="P3",
                category=rng.choice(CATEGORIES), tier="L1", desktop=True, rule="bench",
                requester=f"u{n}@example.test", subject=subject, description=body,
                solution="重启服务并清理缓存。" if done else None, created_at=at, updated_at=at,
                resolved_at=at + timedelta(hours=2) if done else None,
            )
            session.add(ticket)
            session.flush()
            session.add(Event(ticket_id=ticket.id, at=at, action="opened", actor="bench",
                              detail=""))
            if not done and rng.random() < 0.3:  # some were pending for a while
                for minutes, old, new in ((30, "open", "pending"), (90, "pending", "open")):
                    session.add(Event(ticket_id=ticket.id, at=at + timedelta(minutes=minutes),
                                      action="status", actor="bench", detail="",
                                      data={"old": old, "new": new}))


def timed(fn, repeat: int) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--resolved", type=int, default=5000)
    parser.add_argument("--open", type=int, default=1000)
    args = parser.parse_args()
    now = datetime(2026, 11, 24, 2, 0, tzinfo=UTC)
    with tempfile.TemporaryDirectory() as tmp:
        desk = make_desk(Path(tmp))
        populate(desk, args.resolved, args.open, now)
        rng = random.Random(11)
        with desk.db.sessions() as session:
            probes = []
            for n in range(20):
                subject, body = text(rng)
                probes.append(Ticket(id=10_000_000 + n, kind="incident", category="desktop",
                                     subject=subject, description=body))
            similar._profile.cache_clear()
            cold = timed(lambda: similar.similar_resolved(session, probes[0], 3), 1)
            warm = sum(
                timed(lambda p=p: similar.similar_resolved(session, p, 3), 1) for p in probes
            ) / len(probes)
        print(f"similar_resolved over {args.resolved} resolved "
              f"(reads {similar.CANDIDATES}): cold {cold:.1f} ms, warm {warm:.1f} ms")
        later = now + timedelta(minutes=1)
        found: list[sla_jobs.ScanResult] = []
        first = timed(lambda: found.append(sla_jobs.scan(desk, later)), 1)
        acted = len(found[0].warned) + len(found[0].breached) + len(found[0].response_breached)
        print(f"sla_jobs.scan over {args.open} open incidents, first run: {first:.0f} ms "
              f"({acted} warnings/breaches recorded and mailed)")
        steady = timed(lambda: sla_jobs.scan(desk, later + timedelta(minutes=1)), 3)
        print(f"sla_jobs.scan, steady state (nothing new due): {steady:.0f} ms per run")
        close_ms = timed(lambda: sla_jobs.auto_close(desk, later), 3)
        print(f"sla_jobs.auto_close: {close_ms:.1f} ms per run")
        desk.close()


if __name__ == "__main__":
    main()
