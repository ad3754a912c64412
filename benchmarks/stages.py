"""Where a mail's processing time goes: per-stage milliseconds inside a real run.

Stores N generated desk mails (the same generator as ingest.py) straight into a SQLite
desk, so IMAP is left out, then runs `process_pending` with a timer around each stage:

  - parse      size_limits.parse_limited (charsets, HTML to text, quoted history removed)
  - classify   RuleSet.classify (rules/)
  - similar    the similar-incident search (tokenising the new incident, its query)
  - render     Renderer.render (jinja2 templates)
  - mime       notify.build (the outgoing message's bytes)
  - the rest   the database (SQLAlchemy and SQLite), threading, guards and glue

and prints ms per mail for each, how many SQL statements ran and the time the driver (and
SQLite inside it) spent on them, the stdlib parse of the same mails (the floor's parse in
ingest.py) beside it, and the rate the pure-Python stages alone would allow if the
database and the glue cost nothing.

    python benchmarks/stages.py [--n 1000]
"""

from __future__ import annotations

import argparse
import email
import logging
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from maildata import generate  # noqa: E402
from sqlalchemy import event  # noqa: E402
from support import desk_config  # noqa: E402

from mailflow import incidents, notify, pipeline, size_limits  # noqa: E402
from mailflow.config import load_config  # noqa: E402
from mailflow.desk import Desk  # noqa: E402
from mailflow.models import utcnow  # noqa: E402
from mailflow.render import Renderer  # noqa: E402
from mailflow.rules import RuleSet  # noqa: E402

spent: Counter[str] = Counter()


def timed(stage: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[stage] += time.perf_counter() - start

    return wrapper


STAGES: list[tuple[str, object, str]] = [
    ("parse", size_limits, "parse_limited"),
    ("classify", RuleSet, "classify"),
    ("similar", incidents, "similar_resolved"),
    ("render", Renderer, "render"),
    ("mime", notify, "build"),
]


def stdlib_parse(mails: list[bytes]) -> float:
    """Seconds for the floor's parse: compat32, every part's payload decoded."""
    start = time.perf_counter()
    for raw in mails:
        for part in email.message_from_bytes(raw).walk():
            part.get_payload(decode=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    n = parser.parse_args().n
    logging.disable(logging.ERROR)  # the per-sender caps warn and alert about busy senders
    mails = generate(n)
    desk = Desk(load_config(desk_config(Path(tempfile.mkdtemp(prefix="mailflow-stages-")))))
    now = utcnow()
    with desk.db.transaction() as session:
        for uid, raw in enumerate(mails, 1):
            pipeline.store(session, "INBOX", f"bench:{uid}", uid, raw, now)
    for stage, owner, name in STAGES:
        setattr(owner, name, timed(stage, getattr(owner, name)))
    statements: list[float] = []

    @event.listens_for(desk.db.engine, "before_cursor_execute")
    def before(*_: Any) -> None:
        statements.append(time.perf_counter())

    @event.listens_for(desk.db.engine, "after_cursor_execute")
    def after(*_: Any) -> None:
        spent["driver"] += time.perf_counter() - statements[-1]

    start = time.perf_counter()
    done = pipeline.process_pending(desk, utcnow)
    total = time.perf_counter() - start
    desk.close()
    assert done == n, (done, n)

    def ms(seconds: float) -> str:
        return f"{seconds / n * 1000:6.3f} ms  {seconds / total:6.1%}"

    print(f"{n} mails processed in {total:.2f} s: {n / total:.0f} mails/s")
    for stage, _, _ in STAGES:
        print(f"{stage:>10}: {ms(spent[stage])}")
    pure = sum(v for k, v in spent.items() if k != "driver")
    print(f"{'the rest':>10}: {ms(total - pure)}  (database, threading, guards, glue)")
    print(
        f"{len(statements) / n:.1f} SQL statements per mail; the driver ran them in "
        f"{spent['driver'] / n * 1000:.3f} ms (SQLAlchemy's own work is in the rest)"
    )
    print(f"stdlib parse of the same mails (the floor's): {stdlib_parse(mails) / n * 1000:.3f} ms")
    print(f"the stages alone allow {n / pure:.0f} mails/s, the rest costing nothing")


if __name__ == "__main__":
    main()
