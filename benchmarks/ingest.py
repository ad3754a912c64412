"""Ingest benchmark: N realistic desk mails through a real Dovecot into tickets.

Prints, for each N: the floor (IMAP UID FETCH + stdlib parse of the same mails), mailflow's
ingest (fetch → store → parse → classify → ticket → notifications queued), msgs/s, the
ratio to the floor, and the peak RSS of a fresh process — run per N in its own process so
memory figures are comparable (flat memory means the same peak for 1,000 and 4,000).

    python benchmarks/ingest.py [--n 1000] [--sizes 1000,2000,4000] [--database URL]
"""

from __future__ import annotations

import argparse
import email
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from maildata import generate  # noqa: E402
from servers import Dovecot  # noqa: E402
from support import desk_config  # noqa: E402

from mailflow.config import load_config  # noqa: E402
from mailflow.daemon import Daemon  # noqa: E402
from mailflow.desk import Desk  # noqa: E402
from mailflow.fetch import ImapSettings, ImapSource  # noqa: E402
from mailflow.models import utcnow  # noqa: E402


class Box:
    def __init__(self, server: Dovecot, address: str) -> None:
        self.host, self.port, self.address, self.password = (
            server.host,
            server.port,
            address,
            "secret",
        )


def load(server: Dovecot, address: str, mails: list[bytes]) -> None:
    client = server.client(address)
    for raw in mails:
        client.append("INBOX", raw)
    client.logout()


def floor(box: Box) -> float:
    """Seconds to UID FETCH everything and parse it with the stdlib (compat32)."""
    source = ImapSource(
        ImapSettings(
            host=box.host,
            port=box.port,
            security="none",
            username=box.address,
            password=box.password,
        )
    )
    start = time.perf_counter()
    source.connect()
    for fetched in source.fetch(source.uids_after(0)):
        msg = email.message_from_bytes(fetched.raw)
        for part in msg.walk():
            part.get_payload(decode=True)
    elapsed = time.perf_counter() - start
    source.close()
    return elapsed


def one(n: int, database: str | None) -> dict[str, float]:
    mails = generate(n)
    root = Path(tempfile.mkdtemp(prefix="mailflow-bench-"))
    server = Dovecot(Path(tempfile.mkdtemp(prefix="mailflow-bench-imap-")))
    server.start()
    try:
        floor_box = Box(server, "floor@example.test")
        desk_box = Box(server, "desk@example.test")
        for box in (floor_box, desk_box):
            server.add_user(box.address, box.password)
            load(server, box.address, mails)
        floor_s = floor(floor_box)
        desk = Desk(load_config(desk_config(root, mailbox=desk_box, database_url=database)))
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        fetched, processed, errors = Daemon(desk, utcnow).intake_pass()
        ingest_s = time.perf_counter() - start
        assert not errors and processed == n == fetched, (fetched, processed, errors)
        from sqlalchemy import func, select

        from mailflow.models import Outbox, Ticket

        with desk.db.sessions() as s:
            tickets = s.scalar(select(func.count(Ticket.id)))
            queued = s.scalar(select(func.count(Outbox.id)))
        desk.close()
    finally:
        server.stop()
    return {
        "n": n,
        "floor_s": round(floor_s, 3),
        "floor_msgs_s": round(n / floor_s),
        "ingest_s": round(ingest_s, 3),
        "ingest_msgs_s": round(n / ingest_s),
        "ratio_to_floor": round(ingest_s / floor_s, 2),
        "tickets": tickets,
        "notifications_queued": queued,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_before_ingest_mb": round(rss_before / 1024, 1),
        # what the ingest itself added: flat as N grows (the generated mails are not in it)
        "rss_added_by_ingest_mb": round(
            (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024, 1
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--sizes", help="comma-separated Ns, each in a fresh process")
    parser.add_argument("--database", help="database URL (default: SQLite in a temp dir)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.sizes:
        for n in args.sizes.split(","):
            cmd = [sys.executable, __file__, "--n", n, "--json"]
            if args.database:
                cmd += ["--database", args.database]
            print(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip())
        return
    result = one(args.n, args.database)
    if args.json:
        print(json.dumps(result))
        return
    for key, value in result.items():
        print(f"{key:>22}: {value}")


if __name__ == "__main__":
    main()
