"""Request/approval benchmark: the cost of tokens, of checking Authentication-Results, and
of N requests and their N approval replies through the pipeline (SQLite, no servers).

Prints numbers only; nothing is asserted.

    python benchmarks/approvals.py [--n 500]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from email import message_from_bytes
from email.policy import default
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "tests")]

from support import Clock, desk_config, make_mail, reply  # noqa: E402

from mailflow import approvals, pipeline, senders  # noqa: E402
from mailflow.config import load_config  # noqa: E402
from mailflow.desk import Desk  # noqa: E402
from mailflow.models import Outbox  # noqa: E402

AR = [
    "mx.example.test 1; spf=pass smtp.mailfrom=example.test; dkim=pass (2048-bit key) "
    "header.d=example.test header.s=s1 header.b=abcd; dmarc=pass (p=reject) "
    "header.from=example.test",
    "mx.evil.test; dkim=pass header.d=example.test",
]


def rate(label: str, count: int, seconds: float) -> None:
    print(f"{label:<44} {count:>7} in {seconds:7.3f} s  = {count / seconds:>10,.0f} /s")


def tokens(n: int) -> None:
    key = b"k" * 32
    start = time.perf_counter()
    made = [approvals.make_token(key, i, 0, "approver@example.test") for i in range(n)]
    rate("make_token (HMAC-SHA256)", n, time.perf_counter() - start)
    rows = [SimpleNamespace(ticket_id=i, step=0, approver="approver@example.test")
            for i in range(n)]
    start = time.perf_counter()
    assert all(approvals.token_valid_for(key, t, r) for t, r in zip(made, rows, strict=True))
    rate("token_valid_for (compare_digest)", n, time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(n):
        senders.authenticated(AR, "mx.example.test", "approver@example.test")
    rate("authenticated (2 Authentication-Results)", n, time.perf_counter() - start)


def store_all(desk: Desk, raws: list[bytes], clock: Clock, tag: str) -> None:
    with desk.db.transaction() as session:
        for i, raw in enumerate(raws):
            pipeline.store(session, "bench", f"{tag}-{i}", i, raw, clock())


def conversation(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        desk = Desk(load_config(desk_config(Path(tmp))))
        clock = Clock()
        requests = [
            make_mail(f"user{i}@example.test", f"申请开通VPN {i}", "申请原因：出差期间访问内网")
            for i in range(n)
        ]
        store_all(desk, requests, clock, "req")
        start = time.perf_counter()
        done = pipeline.process_pending(desk, clock)
        rate("new requests → approval mails queued", done, time.perf_counter() - start)
        with desk.db.sessions() as session:
            asks = [o.raw for o in session.query(Outbox).filter_by(template="approval_request")]
        answers = []
        for raw in asks:
            reply_to = str(message_from_bytes(raw, policy=default)["Reply-To"])
            answers.append(reply(raw, "approver@example.test", "同意", to=reply_to))
        store_all(desk, answers, clock, "ans")
        start = time.perf_counter()
        done = pipeline.process_pending(desk, clock)
        rate("approval replies verified and applied", done, time.perf_counter() - start)
        forged = [reply(raw, "mallory@example.test", "同意", to="itsm@example.test")
                  for raw in asks]
        store_all(desk, forged, clock, "forged")
        start = time.perf_counter()
        done = pipeline.process_pending(desk, clock)
        rate("forged replies refused (approver told)", done, time.perf_counter() - start)
        desk.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=500)
    args = parser.parse_args()
    tokens(args.n * 20)
    conversation(args.n)


if __name__ == "__main__":
    main()
