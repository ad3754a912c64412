"""Run the real daemon for a test: in a thread of the test process, or as `mailflow run`."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from mailflow.daemon import Daemon
from mailflow.desk import Desk
from mailflow.models import utcnow

T = TypeVar("T")


def eventually(check: Callable[[], T], timeout: float = 20, what: str = "condition") -> T:
    """Wait (polling every 20 ms) until check() is truthy; return it or fail."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        time.sleep(0.02)


@contextmanager
def daemon_thread(desk: Desk, clock: Callable[[], Any] = utcnow) -> Iterator[Daemon]:
    """`Daemon.run()` in a background thread; stopped (as by SIGTERM) at the end."""
    daemon = Daemon(desk, clock)
    loop_box: list[asyncio.AbstractEventLoop] = []
    errors: list[BaseException] = []

    async def main() -> None:
        loop_box.append(asyncio.get_running_loop())
        await daemon.run()

    def target() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:  # noqa: BLE001 — re-raised in the test thread
            errors.append(exc)

    thread = threading.Thread(target=target, name="mailflow-daemon", daemon=True)
    thread.start()
    eventually(lambda: loop_box or errors, 10, "daemon start")
    try:
        yield daemon
    finally:
        if loop_box:
            loop_box[0].call_soon_threadsafe(daemon.stop)
        thread.join(30)
        assert not thread.is_alive(), "the daemon did not stop within 30 s"
    if errors:
        raise errors[0]


_started: list[subprocess.Popen[bytes]] = []


def mailflow_process(config: Path, *args: str, log: Path | None = None) -> subprocess.Popen[bytes]:
    """`python -m mailflow --config CONFIG run …` with stderr to `log` (or discarded)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    stderr = log.open("ab") if log is not None else subprocess.DEVNULL
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "mailflow", "--config", str(config), "run", *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr, env=env,
        )
    finally:
        if log is not None:
            stderr.close()  # type: ignore[union-attr]
    _started.append(process)
    return process


def reap() -> list[int]:
    """Kill the daemons a test started and left running (it failed early); their pids."""
    left = [p for p in _started if p.poll() is None]
    for process in left:
        process.kill()
        process.wait(10)
    _started.clear()
    return [p.pid for p in left]


def terminate(process: subprocess.Popen[bytes], timeout: float = 60) -> int:
    """SIGTERM the process (once) and wait for it; kill it if it will not stop."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)
        raise AssertionError(f"mailflow pid {process.pid} ignored SIGTERM for {timeout}s") from None
