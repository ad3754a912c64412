"""Run `mailflow run --once` and kill the process with SIGKILL at a named point.

    python tests/crashrun.py --config X [--kill-at POINT [--after N]] [--within SECONDS]
                             [--later SECONDS]

The crash tests (tests/test_crash.py) use it: production code has no fault hooks; this
script wraps one function of the real code so that its N-th call ends the process the
hard way, then hands over to `mailflow.cli.main(["--config", X, "run", "--once"])`.

POINT        the process dies …
fetched      … when the N-th message has been fetched from IMAP, before it is stored
stored       … after the N-th batch was committed, before it is flagged on the server
processing   … inside the N-th message's savepoint, before its batch commits
processed    … after the N-th processing batch committed, before anything else
sending      … after the SMTP server accepted the N-th mail, before its batch is marked sent
sent         … after the batch holding the N-th mail is marked sent
migrating    … after the N-th SQL statement of the schema migration on start

`--within SECONDS` ends it at a moment of the clock instead: that many seconds after the
schema migration began (inside a statement, a commit, or after the migration).
`--measure` prints on stderr how many statements the migration ran and how long it took,
as `migration: N statements in S s`.

`--later SECONDS` runs with the clock that many seconds ahead, as a restart after the dead
process's mailbox lease and outbox claims ran out would.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from functools import wraps
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import event  # noqa: E402

from mailflow import daemon, db, outbox, pipeline  # noqa: E402
from mailflow.cli import main  # noqa: E402
from mailflow.fetch import ImapSource  # noqa: E402
from mailflow.models import utcnow  # noqa: E402

POINTS = ("fetched", "stored", "processing", "processed", "sending", "sent", "migrating")


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class Countdown:
    def __init__(self, after: int) -> None:
        self.left = after

    def tick(self) -> None:
        self.left -= 1
        if self.left <= 0:
            die()


def _after_call(fn: Callable[..., Any], count: Countdown) -> Callable[..., Any]:
    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = fn(*args, **kwargs)
        count.tick()
        return result

    return wrapper


def arm(point: str, after: int) -> None:
    """Wrap the function of `point` so that its `after`-th use kills the process."""
    count = Countdown(after)
    if point == "fetched":
        fetch = ImapSource.fetch_batches

        def fetching(self: ImapSource, uids: Any) -> Iterator[Any]:
            for batch in fetch(self, uids):
                for _ in batch:
                    count.tick()
                yield batch

        ImapSource.fetch_batches = fetching  # type: ignore[method-assign]
    elif point == "stored":
        mark_done = ImapSource.mark_done

        def marking(self: ImapSource, uids: Any) -> None:
            count.tick()
            mark_done(self, uids)

        ImapSource.mark_done = marking  # type: ignore[method-assign]
    elif point == "processing":
        pipeline.handle = _after_call(pipeline.handle, count)
    elif point == "processed":
        pipeline.process_batch = _after_call(pipeline.process_batch, count)
    elif point == "sending":
        attempted = outbox._attempted

        def accepted(*args: Any, **kwargs: Any) -> Any:
            if args[1] is None:  # error is None: the server accepted the mail
                count.tick()
            return attempted(*args, **kwargs)

        outbox._attempted = accepted
    elif point == "sent":
        finish = outbox._finish

        def finishing(*args: Any, **kwargs: Any) -> Any:
            states = finish(*args, **kwargs)
            for state in states:
                if state == "sent":
                    count.tick()
            return states

        outbox._finish = finishing
    elif point == "migrating":
        on_migration(lambda engine: _counting(engine, count))
    else:
        raise SystemExit(f"unknown point {point!r}; one of {', '.join(POINTS)}")


def _counting(engine: Any, count: Countdown) -> Callable[[], None]:
    """Count the engine's statements from now; returns what stops counting."""

    def executed(*_: Any) -> None:
        count.tick()

    event.listen(engine, "after_cursor_execute", executed)
    return lambda: event.remove(engine, "after_cursor_execute", executed)


def on_migration(start: Callable[[Any], Callable[[], None] | None]) -> None:
    """Call `start(engine)` as the schema migration on start begins, and what it returns
    when the migration ends."""
    migrate = db.migrate

    def migrating(engine: Any, *args: Any, **kwargs: Any) -> None:
        stop = start(engine)
        try:
            migrate(engine, *args, **kwargs)
        finally:
            if stop is not None:
                stop()

    db.migrate = migrating


def die_within(seconds: float) -> None:
    """End the process `seconds` after the schema migration began, whatever it is doing."""

    def start(_engine: Any) -> None:
        timer = threading.Timer(seconds, die)
        timer.daemon = True
        timer.start()

    on_migration(start)


def measure() -> None:
    """Report the schema migration's statements and duration on stderr when it ends."""

    def start(engine: Any) -> Callable[[], None]:
        count = Countdown(sys.maxsize)
        stop = _counting(engine, count)
        started = time.perf_counter()

        def report() -> None:
            stop()
            seconds = time.perf_counter() - started
            print(f"migration: {sys.maxsize - count.left} statements in {seconds:.4f} s",
                  file=sys.stderr)

        return report

    on_migration(start)


def shift_clock(seconds: float) -> None:
    """Every Daemon the CLI builds runs `seconds` ahead of the wall clock."""
    ahead = timedelta(seconds=seconds)
    base = daemon.Daemon

    class Later(base):  # type: ignore[misc, valid-type]
        def __init__(self, desk: Any, clock: Any = None) -> None:
            super().__init__(desk, lambda: utcnow() + ahead)

    daemon.Daemon = Later  # type: ignore[misc]


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--kill-at", choices=POINTS)
    parser.add_argument("--after", type=int, default=1)
    parser.add_argument("--within", type=float)
    parser.add_argument("--measure", action="store_true")
    parser.add_argument("--later", type=float, default=0.0)
    args = parser.parse_args(argv)
    if args.later:
        shift_clock(args.later)
    if args.kill_at:
        arm(args.kill_at, args.after)
    if args.within is not None:
        die_within(args.within)
    if args.measure:
        measure()
    return main(["--config", args.config, "run", "--once"])


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
