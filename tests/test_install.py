"""The default install, as a new desk gets it: `pip install .` (no extras) into a fresh virtual
environment, then the installed `mailflow` against the test IMAP and SMTP servers.

Slow by nature (it installs the package and its dependencies): one virtual environment for the
whole module, made once, 17–36 s on a busy 2-core machine with the wheels in pip's cache (the
module: 40–66 s).

- The review report and its charts need nothing beyond the default install: a running daemon
  sends last week's report with its chart PNGs inline.
- A configured feature whose optional package is not installed (prometheus-client for
  `[metrics] port`, psycopg for a PostgreSQL URL) fails `mailflow check`, naming the file and
  the key, and `mailflow run` stops at once with one sentence and exit 2 (which the systemd
  unit does not restart), not a traceback.
"""

from __future__ import annotations

import email.policy
import os
import shutil
import struct
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from email import message_from_bytes
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from daemons import terminate
from support import DESK, REPO, ROLES, make_mail, write_config

from mailflow import intake, pipeline
from mailflow.config import load_config
from mailflow.desk import Desk

SHANGHAI = ZoneInfo("Asia/Shanghai")
REVIEW = {"im@example.test", "lead@example.test", "l2@example.test", "l3@example.test"}


class Venv:
    """A virtual environment holding the package as `pip install .` installs it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.python = root / "bin" / "python"
        self.mailflow = root / "bin" / "mailflow"

    def env(self) -> dict[str, str]:
        """The environment without this test run's PYTHONPATH: the installed code runs."""
        return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def run(self, *args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(self.mailflow), *args], cwd=cwd, env=self.env(), capture_output=True,
            text=True, timeout=timeout, stdin=subprocess.DEVNULL,
        )


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Venv:
    """`python -m venv` and `pip install <a copy of this tree>`: the default install."""
    base = tmp_path_factory.mktemp("install")
    tree = base / "src"  # a copy, so the build leaves nothing in the working tree
    tree.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, tree / name)
    shutil.copytree(  # the package's default rules/ and templates/ are symlinks: followed
        REPO / "mailflow", tree / "mailflow", ignore=shutil.ignore_patterns("__pycache__")
    )
    root = base / "venv"
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True, timeout=120)
    done = subprocess.run(
        [str(root / "bin" / "python"), "-m", "pip", "install", "--quiet",
         "--disable-pip-version-check", str(tree)],
        capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    print(f"fresh venv + pip install .: {time.monotonic() - started:.1f} s")
    return Venv(root)


def _config(tmp: Path, **sections: dict[str, Any]) -> Path:
    """A desk on SQLite (the default install has no PostgreSQL driver), with the package's
    own rules and templates."""
    tables: dict[str, dict[str, Any]] = {
        "desk": {"address": DESK, "name": "IT服务台", "language": "zh-CN",
                 "timezone": "Asia/Shanghai", "secret": "test-secret", "poll_interval": 0.2},
        "database": {"url": f"sqlite:///{tmp / 'mailflow.db'}"},
        "roles": {**ROLES, "approvers": {"default": ["approver@example.test"]},
                  "executors": {"default": ["exec@example.test"]}},
        "smtp": {"host": "", "pickup_dir": str(tmp / "outgoing")},
    }
    for name, table in sections.items():
        tables[name] = {**tables.get(name, {}), **table}
    return write_config(tmp / "config.toml", tables)


def _png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _parts(raw: bytes) -> tuple[EmailMessage, str, dict[str, bytes]]:
    msg: EmailMessage = message_from_bytes(raw, policy=email.policy.default)  # type: ignore
    html, images = "", {}
    for part in msg.walk():
        if part.get_content_type() == "text/html":
            html = part.get_content()
        elif part.get_content_type() == "image/png":
            images[part["Content-ID"].strip("<>")] = part.get_payload(decode=True)
    return msg, html, images


def _last_week() -> datetime:
    """Wednesday 10:00 (desk time) of the last full week, Monday to Sunday."""
    today = datetime.now(SHANGHAI).date()
    wednesday = today - timedelta(days=today.weekday() + 5)
    return datetime(wednesday.year, wednesday.month, wednesday.day, 10, tzinfo=SHANGHAI)


@pytest.mark.install
def test_a_fresh_install_sends_the_weekly_report_with_its_charts(venv, tmp_path, mailbox, smtp):
    config = _config(
        tmp_path,
        imap={"host": mailbox.host, "port": mailbox.port, "security": "none",
              "username": mailbox.address, "password": mailbox.password, "timeout": 10},
        smtp={"host": smtp.host, "port": smtp.port, "security": "none", "timeout": 5},
        # Monday 00:00: whatever day the test runs, last week's report is due at start.
        digest={"time": "off", "weekly_report": "mon 00:00", "monthly_report": "off"},
    )
    checked = venv.run("--config", str(config), "check", cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # An incident of last week, so the report and its charts have something in them.
    seeded = Desk(load_config(config))
    when = _last_week().astimezone(UTC)
    raw = make_mail("user@example.test", "三楼打印机卡纸", "打印机卡纸，打印不了", date=when)
    inbound = intake.ingest_bytes(seeded, raw, when)
    assert inbound is not None
    assert pipeline.process_one(seeded, inbound, when).state == "processed"
    seeded.close()
    log = tmp_path / "daemon.log"

    process = subprocess.Popen(
        [str(venv.mailflow), "--config", str(config), "run"], cwd=tmp_path, env=venv.env(),
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log.open("wb"),
    )
    try:
        reports = _wait_for_reports(smtp, process, log)
    finally:
        stopped = terminate(process)
    assert stopped == 0, log.read_text(errors="replace")[-3000:]  # SIGTERM: a clean stop

    assert {r for m in reports for r in m.rcpt_tos} == REVIEW
    msg, html, images = _parts(reports[0].content)
    week = _last_week().date() - timedelta(days=2)
    assert "周报" in msg["Subject"] and f"{week}" in msg["Subject"]
    assert f"{week + timedelta(days=6)}" in msg["Subject"]
    assert len(images) == 2
    for cid, png in images.items():
        assert f'src="cid:{cid}"' in html
        width, height = _png_size(png)
        assert width > 300 and height > 150
    assert "matplotlib" not in log.read_text(errors="replace")


def _wait_for_reports(smtp: Any, process: subprocess.Popen, log: Path) -> list[Any]:
    """The report mails (one per review member) the daemon sent, within 60 s."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text(errors="replace")[-3000:]
        found = [m for m in smtp.messages if b"image/png" in m.content]
        if len({r for m in found for r in m.rcpt_tos}) >= len(REVIEW):
            return found
        time.sleep(0.1)
    raise AssertionError(f"no weekly report within 60 s: {log.read_text(errors='replace')[-3000:]}")


# -- optional packages a configured feature needs -----------------------------------------


def _one_sentence(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mailflow: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.mark.install
def test_metrics_without_prometheus_client_fail_check_and_stop_run(venv, tmp_path):
    config = _config(tmp_path, metrics={"port": 9464})

    checked = venv.run("--config", str(config), "check", cwd=tmp_path)
    assert checked.returncode == 1
    assert f"{config}: metrics.port: " in checked.stdout
    assert "prometheus-client is not installed: pip install 'mailflow[metrics]'" in checked.stdout

    started = venv.run("--config", str(config), "run", cwd=tmp_path, timeout=60)
    assert started.returncode == 2  # a configuration error: systemd does not restart it
    line = _one_sentence(started.stderr)
    assert f"{config}: metrics.port: " in line and "mailflow[metrics]" in line
    # One pass serves no metrics and runs no job: it needs neither.
    once = venv.run("--config", str(config), "run", "--once", cwd=tmp_path, timeout=60)
    assert once.returncode == 0, once.stderr


@pytest.mark.install
def test_a_postgresql_url_without_psycopg_fails_check_and_every_command(venv, tmp_path):
    config = _config(tmp_path, database={"url": "postgresql+psycopg://desk@127.0.0.1:1/desk"})

    checked = venv.run("--config", str(config), "check", cwd=tmp_path)
    assert checked.returncode == 1
    assert f"{config}: database.url: the database is postgresql+psycopg, but psycopg is not " \
           "installed: pip install 'mailflow[postgres]'" in checked.stdout

    for command in (["run"], ["run", "--once"], ["tickets"]):
        done = venv.run("--config", str(config), *command, cwd=tmp_path, timeout=60)
        assert done.returncode == 2, (command, done.stderr)
        assert f"{config}: database.url: " in _one_sentence(done.stderr)


@pytest.mark.install
def test_a_report_job_whose_chart_library_cannot_load_fails_check(venv, tmp_path):
    """A job names the modules it needs (jobs.Job.needs): matplotlib made unimportable (a
    broken install) fails `check` on the report's own key, and only while the report is on."""
    blocked = tmp_path / "blocked"
    (blocked / "matplotlib").mkdir(parents=True)
    (blocked / "matplotlib" / "__init__.py").write_text(
        "raise ImportError('matplotlib is broken here', name='matplotlib')\n"
    )
    config = _config(tmp_path, digest={"weekly_report": "off", "monthly_report": "1 09:00"})
    env = {**venv.env(), "PYTHONPATH": str(blocked)}

    done = subprocess.run([str(venv.mailflow), "--config", str(config), "check"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert f"{config}: digest.monthly_report: the scheduled job report-monthly is on, but " \
           "matplotlib cannot be imported (matplotlib is broken here)" in done.stdout
    assert "digest.weekly_report" not in done.stdout  # off: it needs nothing

    _config(tmp_path, digest={"weekly_report": "off", "monthly_report": "off"})
    done = subprocess.run([str(venv.mailflow), "--config", str(config), "check"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout
