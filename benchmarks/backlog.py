"""Backlog benchmark: a mailbox holding N mails (default 50,000) worked off by one
`mailflow run` daemon, printing its resident memory at intervals — it must stay flat.

The mails go into a real Dovecot first (realistic desk mail, 2–20 KB, 30% replies); the
daemon's notifications go to an SMTP server that only counts them (keeping 100,000+ mails
in memory would measure the sink, not mailflow). Each line: elapsed time, mails processed,
the rate over the last interval, outbox queued/sent, digests queued, and the daemon's RSS.

The daily digest is set to fire `--digest-after` seconds into the run, as a real desk's
would on a long backlog: it reads every open incident, so its memory shows up here too.

    python benchmarks/backlog.py [--n 50000] [--interval 30] [--digest-after 1200]
                                 [--database URL]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

import databases  # noqa: E402
from aiosmtpd.controller import Controller  # noqa: E402
from daemons import mailflow_process, terminate  # noqa: E402
from maildata import generate  # noqa: E402
from servers import Dovecot, Mailbox, free_port  # noqa: E402
from sqlalchemy import func, select  # noqa: E402
from support import desk_config  # noqa: E402

from mailflow.config import load_config  # noqa: E402
from mailflow.desk import Desk  # noqa: E402
from mailflow.models import Inbound, JobRun, Outbox  # noqa: E402

CHUNK = 1000


class CountingSink:
    """An SMTP server that accepts everything and keeps only a count."""

    def __init__(self) -> None:
        self.count = 0
        self.host, self.port = "127.0.0.1", free_port()
        self._controller = Controller(self, hostname=self.host, port=self.port)

    async def handle_DATA(self, server: object, session: object, envelope: object) -> str:  # noqa: N802
        self.count += 1
        return "250 OK"

    def start(self) -> None:
        self._controller.start()

    def stop(self) -> None:
        self._controller.stop()


def fill(box: Mailbox, n: int) -> float:
    """APPEND n mails in chunks (generated per chunk to keep this process small)."""
    started = time.perf_counter()
    client = box.client()
    for chunk in range(0, n, CHUNK):
        mails = generate(min(CHUNK, n - chunk), seed=chunk)
        for start in range(0, len(mails), 100):  # MULTIAPPEND: one command per 100 mails
            client.multiappend("INBOX", mails[start : start + 100])
        print(f"  appended {min(chunk + CHUNK, n)}/{n}", flush=True)
    client.logout()
    return time.perf_counter() - started


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def progress(desk: Desk) -> tuple[int, int, int, int, int]:
    """(inbound stored, inbound done, outbox queued, outbox sent, digests queued)."""
    with desk.db.sessions() as s:
        stored = s.scalar(select(func.count(Inbound.id))) or 0
        done = s.scalar(select(func.count()).where(Inbound.state != "pending")) or 0
        queued = s.scalar(select(func.count()).where(Outbox.state == "queued")) or 0
        sent = s.scalar(select(func.count()).where(Outbox.state == "sent")) or 0
        digests = s.scalar(select(func.count()).where(JobRun.job == "digest")) or 0
    return stored, done, queued, sent, digests


def digest_time(after: float, tz: str = "Asia/Shanghai") -> str:
    """The desk-local "HH:MM" at least `after` seconds from now (the digest's hour)."""
    at = datetime.now(ZoneInfo(tz)) + timedelta(seconds=after + 59)
    return at.strftime("%H:%M")


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
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--interval", type=float, default=30.0)
    parser.add_argument("--digest-after", type=float, default=1200.0,
                        help="seconds into the run when the daily digest fires")
    parser.add_argument("--database", help="database URL (default: SQLite in a temp dir)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mailflow-backlog-"))
    server = Dovecot(Path(tempfile.mkdtemp(prefix="mailflow-backlog-imap-")))
    server.start()
    sink = CountingSink()
    sink.start()
    try:
        box = Mailbox(server, "desk@example.test")
        server.add_user(box.address, box.password)
        print(f"filling the mailbox with {args.n} mails", flush=True)
        print(f"  took {fill(box, args.n):.0f} s", flush=True)
        database = private_schema(args.database, "bench_backlog")
        config = desk_config(
            work, mailbox=box, smtp=sink, database_url=database,
            desk={"poll_interval": 5.0},
            digest={"time": digest_time(args.digest_after), "weekly_report": "off",
                    "monthly_report": "off"},
            log={"format": "logfmt", "level": "WARNING"},
        )
        desk = Desk(load_config(config))
        started = time.perf_counter()
        daemon = mailflow_process(config, log=work / "daemon.log")
        last_done, last_t, samples = 0, started, []
        try:
            print(f"{'s':>6} {'stored':>7} {'done':>7} {'msg/s':>6} {'queued':>7} {'sent':>7} "
                  f"{'digest':>6} {'rss MB':>7}", flush=True)
            while True:
                time.sleep(args.interval)
                now = time.perf_counter()
                stored, done, queued, sent, digests = progress(desk)
                rss = rss_mb(daemon.pid)
                samples.append(rss)
                rate = (done - last_done) / (now - last_t)
                last_done, last_t = done, now
                print(f"{now - started:6.0f} {stored:7d} {done:7d} {rate:6.1f} {queued:7d} "
                      f"{sent:7d} {digests:6d} {rss:7.1f}", flush=True)
                if done >= args.n and queued == 0:
                    break
                if daemon.poll() is not None:
                    raise SystemExit(f"the daemon exited with {daemon.returncode}")
        finally:
            print(f"daemon exit code {terminate(daemon, timeout=120)}")
        elapsed = time.perf_counter() - started
        tail = samples[len(samples) // 5:] or samples
        print(f"{args.n} mails in {elapsed:.0f} s = {args.n / elapsed:.1f} msg/s; "
              f"notifications received {sink.count}")
        print(f"RSS: first {samples[0]:.1f} MB, after warm-up min {min(tail):.1f} / "
              f"max {max(tail):.1f} MB, last {samples[-1]:.1f} MB")
        desk.close()
    finally:
        if args.database and args.database.startswith("postgresql"):
            databases._execute(args.database, 'DROP SCHEMA IF EXISTS "bench_backlog" CASCADE')
        sink.stop()
        server.stop()
        shutil.rmtree(server.root, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
