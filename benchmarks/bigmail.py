"""Large-mail backlog benchmark: peak memory of `mailflow run --once` taking eight 24 MB mails.

The mails (a short text and two attachments each, just under the default
`max_message_bytes`) go into a real Dovecot mailbox first; `mailflow run --once` then
fetches, stores and processes them in a subprocess whose peak RSS (from wait4) is compared
with that of the same command taking one small mail (the baseline: every code path
loaded). The floor: the growth stays under three times the largest mail, however many of
them are queued.

    python benchmarks/bigmail.py [--n 8] [--mb 24] [--database URL]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from email.message import EmailMessage
from email.policy import SMTP
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

import databases  # noqa: E402
from backlog import CountingSink, private_schema  # noqa: E402
from servers import Dovecot, Mailbox  # noqa: E402
from sqlalchemy import func, select  # noqa: E402
from support import desk_config  # noqa: E402

from mailflow.config import load_config  # noqa: E402
from mailflow.desk import Desk  # noqa: E402
from mailflow.models import Inbound  # noqa: E402

FLOOR = 3.0  # peak RSS growth, in multiples of the largest mail


def big_mail(n: int, megabytes: float) -> bytes:
    """A mail of about `megabytes` MB: two base64 attachments of random bytes."""
    msg = EmailMessage(policy=SMTP)
    msg["From"] = f"user{n}@example.test"
    msg["To"] = "itsm@example.test"
    msg["Subject"] = f"扫描件 {n}"
    msg["Message-ID"] = f"<big-{n}@example.test>"
    msg.set_content("附件是扫描的合同，请归档。\n")
    part = int(megabytes * 1_000_000 * 3 / 4 / 2 * 0.985)  # base64 grows by 4/3 and CRLFs
    for k in (1, 2):
        msg.add_attachment(os.urandom(part), maintype="application", subtype="pdf",
                           filename=f"scan-{n}-{k}.pdf")
    return msg.as_bytes()


def small_mail() -> bytes:
    msg = EmailMessage(policy=SMTP)
    msg["From"], msg["To"], msg["Subject"] = "warm@example.test", "itsm@example.test", "打印机卡纸"
    msg["Message-ID"] = "<small@example.test>"
    msg.set_content("三楼打印机卡纸了。\n")
    return msg.as_bytes()


def peak_rss_mb(config: Path, log: Path) -> tuple[float, int]:
    """`mailflow run --once` in a subprocess: its peak RSS in MB and its exit status."""
    with log.open("ab") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "mailflow", "--config", str(config), "run", "--once"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
        )
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_maxrss / 1024, process.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--mb", type=float, default=24.0)
    parser.add_argument("--database", help="database URL (default: SQLite in a temp dir)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mailflow-bigmail-"))
    server = Dovecot(Path(tempfile.mkdtemp(prefix="mailflow-bigmail-imap-")))
    server.start()
    sink = CountingSink()
    sink.start()
    try:
        box = Mailbox(server, "desk@example.test")
        server.add_user(box.address, box.password)
        database = private_schema(args.database, "bench_bigmail")
        config = desk_config(work, mailbox=box, smtp=sink, database_url=database,
                             log={"level": "WARNING"})
        # The baseline: the same command taking one small mail (every code path loaded).
        box.append(small_mail())
        baseline, _ = peak_rss_mb(config, work / "run.log")
        largest = 0
        for n in range(args.n):
            raw = big_mail(n, args.mb)
            largest = max(largest, len(raw))
            box.append(raw)
        peak, code = peak_rss_mb(config, work / "run.log")
        desk = Desk(load_config(config))
        with desk.db.sessions() as session:
            done = session.scalar(select(func.count()).where(Inbound.state == "processed")) - 1
        desk.close()
        growth, allowed = peak - baseline, FLOOR * largest / 2**20
        print(f"{args.n} mails of {largest / 2**20:.1f} MB (largest): {done} processed, "
              f"exit status {code}")
        print(f"peak RSS {peak:.0f} MB, baseline {baseline:.0f} MB, growth {growth:.0f} MB "
              f"(floor: under {allowed:.0f} MB = {FLOOR:g}x the largest mail) "
              f"{'ok' if growth < allowed and code == 0 else 'OVER'}")
    finally:
        if args.database and args.database.startswith("postgresql"):
            databases._execute(args.database, 'DROP SCHEMA IF EXISTS "bench_bigmail" CASCADE')
        sink.stop()
        server.stop()
        shutil.rmtree(server.root, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
