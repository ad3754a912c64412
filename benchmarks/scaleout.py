"""Scale-out benchmark: N desk mails processed by one, two and three `mailflow run` daemons
sharing one PostgreSQL database, over a real Dovecot and a recording SMTP sink.

For each daemon count: a fresh mailbox holding the same N mails, a fresh schema, the daemons
started together; prints the time until every mail is processed and until every
notification is sent, the processing rate (from the first to the last mail processed,
without process start-up), how the mails were shared between the daemons, and checks that
each mail made one ticket and each notification reached the SMTP server once.

    python benchmarks/scaleout.py [--n 1000] [--daemons 1,2,3]
        [--database postgresql+psycopg://postgres@127.0.0.1:5432/test]
"""

from __future__ import annotations

import argparse
import email
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

import databases  # noqa: E402
from daemons import mailflow_process, terminate  # noqa: E402
from maildata import generate  # noqa: E402
from servers import Dovecot, Mailbox, SmtpSink  # noqa: E402
from sqlalchemy import func, select  # noqa: E402
from support import desk_config  # noqa: E402

from mailflow.config import load_config  # noqa: E402
from mailflow.desk import Desk  # noqa: E402
from mailflow.models import Inbound, Outbox, Ticket  # noqa: E402

DEFAULT_DB = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
OUTCOMES = ("processed", '"ignored', '"quarantined')  # how logfmt writes each outcome line


def load(box: Mailbox, mails: list[bytes]) -> None:
    client = box.client()
    for raw in mails:
        client.append("INBOX", raw)
    client.logout()


def state(desk: Desk) -> tuple[int, int]:
    """(inbound mails no longer pending, outbox rows still queued)."""
    with desk.db.sessions() as s:
        done = s.scalar(select(func.count()).where(Inbound.state != "pending"))
        queued = s.scalar(select(func.count()).where(Outbox.state == "queued"))
    return done or 0, queued or 0


def run(k: int, mails: list[bytes], server: Dovecot, base_url: str, work: Path) -> dict:
    box = Mailbox(server, f"desk{k}@example.test")
    server.add_user(box.address, box.password)
    load(box, mails)
    sink = SmtpSink()
    sink.start()
    tmp = work / f"run{k}"
    tmp.mkdir()
    schema = f"bench_scaleout_{k}"
    databases._execute(base_url, f'DROP SCHEMA IF EXISTS "{schema}" CASCADE',
                       f'CREATE SCHEMA "{schema}"')
    config = desk_config(
        tmp, mailbox=box, smtp=sink, database_url=databases.schema_url(base_url, schema),
        desk={"poll_interval": 1.0},
        digest={"weekly_report": "off", "monthly_report": "off"},
        limits={"auto_replies_per_sender_per_hour": 1000},
        log={"format": "logfmt"},
    )
    desk = Desk(load_config(config))  # migrates once, before the daemons start
    n = len(mails)
    started = time.perf_counter()
    procs = [mailflow_process(config, log=tmp / f"daemon{i}.log") for i in range(k)]
    processed_at = sent_at = None
    try:
        while True:
            done, queued = state(desk)
            now = time.perf_counter()
            if processed_at is None and done >= n:
                processed_at = now - started
            if processed_at is not None and queued == 0:
                sent_at = now - started
                break
            if now - started > 1800:
                raise SystemExit(f"{k} daemon(s): not done after 30 minutes ({done}/{n})")
            time.sleep(0.1)
    finally:
        codes = [terminate(p) for p in procs]
    with desk.db.sessions() as s:
        first, last = s.execute(
            select(func.min(Inbound.processed_at), func.max(Inbound.processed_at))
        ).one()
        tickets = s.scalar(select(func.count(Ticket.id)))
        attempts = s.scalar(select(func.max(Inbound.attempts)))
        outbox = Counter(st for (st,) in s.execute(select(Outbox.state)))
    seen = Counter(email.message_from_bytes(m.content)["Message-ID"] for m in sink.messages)
    logs = [(tmp / f"daemon{i}.log").read_text() for i in range(k)]
    shares = [sum(log.count(f"msg={w}") for w in OUTCOMES) for log in logs]
    conflicts = sum(log.count("conflict with a concurrent transaction") for log in logs)
    sink.stop()
    desk.close()
    databases._execute(base_url, f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    span = (last - first).total_seconds() if first and last else float("nan")
    return {
        "daemons": k,
        "exit_codes": codes,
        "all_processed_s": round(processed_at or 0, 1),
        "all_sent_s": round(sent_at or 0, 1),
        "processing_span_s": round(span, 1),
        "msgs_per_s": round(n / span, 1) if span else None,
        "notifications_per_s": round(sum(seen.values()) / (sent_at or 1), 1),
        "mails_per_daemon": shares,
        "write_conflicts_retried": conflicts,
        "tickets": tickets,
        "max_attempts": attempts,
        "outbox": dict(outbox),
        "smtp_received": sum(seen.values()),
        "smtp_duplicates": sum(1 for c in seen.values() if c > 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--daemons", default="1,2,3")
    parser.add_argument("--database", default=DEFAULT_DB)
    args = parser.parse_args()
    mails = generate(args.n)
    work = Path(tempfile.mkdtemp(prefix="mailflow-scaleout-"))
    server = Dovecot(Path(tempfile.mkdtemp(prefix="mailflow-scaleout-imap-")))
    server.start()
    try:
        print(f"{args.n} mails, database {args.database}")
        for k in (int(x) for x in args.daemons.split(",")):
            result = run(k, mails, server, args.database, work)
            print("  ".join(f"{key}={value}" for key, value in result.items()), flush=True)
    finally:
        server.stop()
        shutil.rmtree(server.root, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
