"""Fuzz: 100,000+ generated and mutated mails through parse and the pipeline.

Half the mails are generated from hostile header values and bodies, half are real-world
fixture mails (tests/fixtures/mail) damaged by cutting, repeating, inserting and flipping
bytes (tests/hostile_mail.py). Each goes through `mail.parse` and then through the whole
pipeline (store → parse → automatic/bounce/sender checks → thread → classify → ticket →
command → notifications) on a throwaway SQLite database. Prints what happened to them:
parse exceptions and quarantined messages (an exception escaped the pipeline) must be 0,
and every queued outgoing mail is checked for headers it should not have.

    python benchmarks/fuzz.py [--count 100000] [--seed 1] [--database URL]
"""

from __future__ import annotations

import argparse
import email
import hashlib
import logging
import random
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from email.policy import compat32
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from hostile_mail import fixtures, generate, mutate, renamed  # noqa: E402
from sqlalchemy import func, select  # noqa: E402
from support import desk_config  # noqa: E402

from mailflow import pipeline  # noqa: E402
from mailflow.config import load_config  # noqa: E402
from mailflow.desk import Desk  # noqa: E402
from mailflow.mail import parse  # noqa: E402
from mailflow.models import Inbound, Outbox, Ticket  # noqa: E402

ALLOWED = {
    "from", "to", "subject", "date", "message-id", "in-reply-to", "references", "reply-to",
    "auto-submitted", "x-auto-response-suppress", "x-mailflow", "content-type",
    "mime-version", "content-transfer-encoding",
}
BATCH = 500


def mails(count: int, seed: int) -> list[tuple[str, bytes]]:
    rng = random.Random(seed)
    corpus = fixtures()
    out = []
    for i in range(count):
        if i % 2:
            out.append(("generated", generate(rng)))
        else:
            out.append(("mutated", mutate(rng, renamed(rng.choice(corpus), i))))
    return out


def _kind_of(reason: str | None) -> str:
    """The kind of an `ignored` reason, for the summary."""
    reason = reason or ""
    for prefix, kind in (
        ("automatic mail: not trusted", "claims the desk's address"),
        ("automatic mail: sent from the desk", "claims the desk's address"),
        ("automatic mail: no sender", "no sender address"),
        ("automatic mail", "automatic"),
        ("delivery report", "delivery report"),
        ("duplicate", "duplicate Message-ID"),
        ("sender address", "unusable sender address"),
        ("sender ", "allow/deny"),
    ):
        if reason.startswith(prefix):
            return kind
    return reason[:40] or "-"


def run(count: int, seed: int, database: str | None) -> int:
    logging.disable(logging.CRITICAL)  # quarantines are counted, not logged
    tmp = Path(tempfile.mkdtemp(prefix="mailflow-fuzz-"))
    desk = Desk(load_config(desk_config(tmp, database_url=database)))
    started = time.perf_counter()
    batch = mails(count, seed)
    made = time.perf_counter() - started

    kinds = Counter(kind for kind, _ in batch)
    parse_errors: Counter[str] = Counter()
    defects = omitted = automatic = 0
    started = time.perf_counter()
    for _, raw in batch:
        try:
            mail = parse(raw)
        except Exception as exc:  # noqa: BLE001 — counted: parse must never raise
            parse_errors[type(exc).__name__] += 1
            continue
        defects += bool(mail.defects)
        omitted += bool(mail.omitted)
        automatic += bool(mail.auto)
    parse_seconds = time.perf_counter() - started

    now = datetime(2026, 11, 24, 2, 0, tzinfo=UTC)
    started = time.perf_counter()
    for start in range(0, len(batch), BATCH):
        with desk.db.transaction() as session:
            for n, (_, raw) in enumerate(batch[start : start + BATCH], start):
                key = f"fuzz:{n}:{hashlib.sha256(raw).hexdigest()[:16]}"
                pipeline.store(session, "fuzz", key, None, raw, now)
        pipeline.process_pending(desk, lambda at=now: at)
        now += timedelta(minutes=1)
    pipeline_seconds = time.perf_counter() - started

    with desk.db.sessions() as session:
        states = Counter(dict(session.execute(
            select(Inbound.state, func.count()).group_by(Inbound.state)).all()))
        quarantined = Counter(
            (r or "")[:90] for r in session.scalars(
                select(Inbound.reason).where(Inbound.state == "quarantined"))
        )
        why_ignored = Counter(
            _kind_of(r) for r in session.scalars(
                select(Inbound.reason).where(Inbound.state == "ignored"))
        )
        tickets = session.scalar(select(func.count(Ticket.id))) or 0
        outgoing = bad = 0
        for raw in session.scalars(select(Outbox.raw)):
            outgoing += 1
            names = {n.lower() for n in email.message_from_bytes(raw, policy=compat32)}
            bad += not names <= ALLOWED
    desk.close()

    total = len(batch)
    print(f"messages:            {total:,} ({kinds['generated']:,} generated, "
          f"{kinds['mutated']:,} mutated fixtures; made in {made:.1f} s, seed {seed})")
    print(f"parse:               {total - sum(parse_errors.values()):,} parsed, "
          f"{sum(parse_errors.values())} exceptions {dict(parse_errors)}; "
          f"{total / parse_seconds:,.0f} msgs/s")
    print(f"  with defects:      {defects:,}; with something left out: {omitted:,}; "
          f"automatic: {automatic:,}")
    print(f"pipeline:            {dict(states)}; {total / pipeline_seconds:,.0f} msgs/s")
    print(f"  quarantined:       {sum(quarantined.values())} {dict(quarantined.most_common(5))}")
    print("  ignored because:   " + "; ".join(f"{k} {n:,}" for k, n in why_ignored.most_common()))
    print(f"  tickets opened:    {tickets:,}")
    print(f"  outgoing queued:   {outgoing:,}; with an unexpected header: {bad}")
    return 1 if parse_errors or quarantined or bad else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--database", default=None, help="default: SQLite in a temp dir")
    args = parser.parse_args()
    return run(args.count, args.seed, args.database)


if __name__ == "__main__":
    sys.exit(main())
