"""Test support: build desks on the real test servers, write mails like real clients do."""

from __future__ import annotations

import email
import itertools
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, make_msgid
from pathlib import Path
from typing import Any

import databases

from mailflow.config import load_config
from mailflow.daemon import Daemon
from mailflow.desk import Desk

REPO = Path(__file__).resolve().parent.parent
DESK = "itsm@example.test"
ROLES = {
    "service_desk": ["desk1@example.test", "desk2@example.test"],
    "service_desk_lead": ["lead@example.test"],
    "l2": ["l2@example.test"],
    "l3": ["l3@example.test"],
    "incident_manager": ["im@example.test"],
    "post_lead": ["post@example.test"],
    "problem_manager": ["pm@example.test"],
}


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    """Write a config.toml from nested dicts (tables of tables become [a.b])."""
    lines: list[str] = []

    def emit(name: str, table: dict[str, Any]) -> None:
        scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
        lines.append(f"[{name}]")
        lines.extend(f"{k} = {toml_value(v)}" for k, v in scalars.items())
        lines.append("")
        for key, value in table.items():
            if isinstance(value, dict):
                emit(f"{name}.{key}", value)

    for name, table in sections.items():
        emit(name, table)
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def desk_config(
    tmp: Path,
    *,
    mailbox: Any = None,
    smtp: Any = None,
    database_url: str | None = None,
    **overrides: dict[str, Any],
) -> Path:
    """A config for a desk on the test servers (IMAP mailbox, SMTP sink) in tmp."""
    sections: dict[str, dict[str, Any]] = {
        "desk": {
            "address": DESK,
            "name": "IT服务台",
            "language": "zh-CN",
            "timezone": "Asia/Shanghai",
            "secret": "test-secret",
            "poll_interval": 0.2,
        },
        "database": {"url": database_url or databases.url_for(tmp)},
        "roles": {
            **ROLES,
            "approvers": {"default": ["approver@example.test"]},
            "executors": {"default": ["exec@example.test"]},
        },
        "paths": {"rules": str(REPO / "rules"), "templates": str(REPO / "templates")},
    }
    if mailbox is not None:
        sections["imap"] = {
            "host": mailbox.host,
            "port": mailbox.port,
            "security": "none",
            "username": mailbox.address,
            "password": mailbox.password,
            "timeout": 10,
        }
    if smtp is not None:
        sections["smtp"] = {"host": smtp.host, "port": smtp.port, "security": "none", "timeout": 5}
    else:
        sections["smtp"] = {"host": "", "pickup_dir": str(tmp / "outgoing")}
    for name, table in overrides.items():
        sections[name] = {**sections.get(name, {}), **table}
    return write_config(tmp / "config.toml", sections)


def make_desk(tmp: Path, **kwargs: Any) -> Desk:
    return Desk(load_config(desk_config(tmp, **kwargs)))


class Clock:
    """A clock the test moves by hand; time is passed in, never slept."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime(2026, 11, 24, 2, 0, tzinfo=UTC)  # Tue 10:00 Shanghai

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> datetime:
        self.now += timedelta(**delta)
        return self.now


_counter = itertools.count(1)


def make_mail(
    sender: str,
    subject: str,
    body: str,
    *,
    to: str = DESK,
    cc: str | None = None,
    name: str | None = None,
    in_reply_to: str | None = None,
    references: list[str] | None = None,
    message_id: str | None = None,
    html: str | None = None,
    headers: dict[str, str] | None = None,
    date: datetime | None = None,
) -> bytes:
    """A mail as a person's client would send it."""
    msg = EmailMessage(policy=SMTP.clone(max_line_length=998))  # msg-ids stay unfolded
    msg["From"] = f"{name} <{sender}>" if name else sender
    msg["To"] = to
    if cc:
        msg["Cc"] = cc
    msg["Subject"] = subject
    msg["Date"] = format_datetime(date or datetime.now(UTC))
    msg["Message-ID"] = message_id or make_msgid(f"m{next(_counter)}", sender.split("@")[1])
    if in_reply_to:
        msg["In-Reply-To"] = f"<{in_reply_to.strip('<>')}>"
    if references:
        msg["References"] = " ".join(f"<{r.strip('<>')}>" for r in references)
    for key, value in (headers or {}).items():
        msg[key] = value
    msg.set_content(body)
    if html:
        msg.add_alternative(html, subtype="html")
    return msg.as_bytes()


def parsed(raw: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(raw, policy=email.policy.default)  # type: ignore[return-value]


def body_of(raw: bytes) -> str:
    msg = parsed(raw)
    part = msg.get_body(preferencelist=("plain",))
    return part.get_content() if part is not None else ""


def reply(
    original: bytes,
    sender: str,
    body: str,
    *,
    prefix: str = "Re: ",
    keep_subject: bool = True,
    subject: str | None = None,
    quote: bool = True,
    to: str | None = None,
) -> bytes:
    """A reply to a mail we received, quoting it below like Outlook does.

    Like every mail client it goes to the original's Reply-To (which carries the desk's reply
    token for that recipient), else to the desk; `to` overrides that.
    """
    msg = parsed(original)
    if to is None:
        to = str(msg.get("Reply-To") or DESK)
    message_id = msg["Message-ID"].strip()
    refs = (msg.get("References", "") + " " + message_id).split()
    new_subject = (
        subject if subject is not None else (prefix + msg["Subject"] if keep_subject else prefix)
    )
    text = body
    if quote:
        text += (
            "\n\n-----原始邮件-----\n发件人: " + msg["From"] + "\n发送时间: 2026年11月24日 10:00\n"
            "主题: " + msg["Subject"] + "\n\n" + body_of(original)
        )
    return make_mail(sender, new_subject, text, to=to, in_reply_to=message_id, references=refs)


def run_once(desk: Desk, clock: Clock | None = None) -> Any:
    return Daemon(desk, clock or Clock()).run_once()
