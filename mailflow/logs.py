"""Structured logging: every line says which mail or ticket it is about.

`context(msg_id=…, ticket=…)` binds fields for the code inside it (a contextvar, so it
follows the thread or task that set it); a filter copies them onto every record, and one of
three formatters writes the line, chosen by `[log] format`:

    text    2026-11-24 10:00:01 INFO mailflow.pipeline [msg_id=<a@b> ticket=INC-7] processed
    logfmt  ts=2026-11-24T02:00:01.123Z level=info logger=mailflow.pipeline msg_id=<a@b> …
    json    {"ts": "…", "level": "info", "logger": "…", "msg_id": "…", "ticket": "…", …}

`msg_id` and `ticket` are on every line ("-" / null when the line is about no one mail).
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

FIELDS = ("msg_id", "ticket")  # always present
_context: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "mailflow_log_context", default=None
)


@contextmanager
def context(**fields: object) -> Iterator[None]:
    """Bind fields (e.g. msg_id, ticket, mailbox) to every log line inside the block."""
    values = {k: str(v) for k, v in fields.items() if v is not None}
    token = _context.set({**(_context.get() or {}), **values})
    try:
        yield
    finally:
        _context.reset(token)


def bind(**fields: object) -> None:
    """Add fields to the current context (e.g. the ticket ref once it is known)."""
    values = {k: str(v) for k, v in fields.items() if v is not None}
    _context.set({**(_context.get() or {}), **values})


def current() -> dict[str, str]:
    return dict(_context.get() or {})


class ContextFilter(logging.Filter):
    """Copies the bound fields onto each record as `record.fields`."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields = {name: "-" for name in FIELDS}
        fields.update(_context.get() or {})
        record.fields = fields
        return True


def _fields(record: logging.LogRecord) -> dict[str, str]:
    return getattr(record, "fields", None) or {name: "-" for name in FIELDS}


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(bracket)s%(message)s")

    def format(self, record: logging.LogRecord) -> str:
        pairs = " ".join(f"{k}={v}" for k, v in _fields(record).items())
        record.bracket = f"[{pairs}] "
        return super().format(record)


def _timestamp(record: logging.LogRecord) -> str:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{stamp}.{int(record.msecs):03d}Z"


def _logfmt_value(value: str) -> str:
    if value and not any(c in value for c in ' "=\\') and value.isprintable():
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


class LogfmtFormatter(logging.Formatter):
    """key=value pairs, one line per record; exceptions folded into `exc`."""

    def format(self, record: logging.LogRecord) -> str:
        pairs: dict[str, str] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            **_fields(record),
            "msg": record.getMessage(),
        }
        if record.exc_info:
            pairs["exc"] = self.formatException(record.exc_info)
        return " ".join(f"{k}={_logfmt_value(v)}" for k, v in pairs.items())


class JsonFormatter(logging.Formatter):
    """One JSON object per line; absent fields are null."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        data.update({k: (None if v == "-" else v) for k, v in _fields(record).items()})
        data["msg"] = record.getMessage()
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, ensure_ascii=False)


FORMATTERS: dict[str, type[logging.Formatter]] = {
    "text": TextFormatter,
    "logfmt": LogfmtFormatter,
    "json": JsonFormatter,
}
_HANDLER_NAME = "mailflow"


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stderr is at the time (it may be replaced after setup)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def setup(level: str | int = logging.INFO, fmt: str = "text") -> None:
    """Configure the root logger: one stderr handler with our filter and formatter.

    Like logging.basicConfig, it adds nothing when the root logger already has handlers
    of someone else's (an embedding application, a test runner). Called again (e.g. after
    the config is read) it changes the level and format in place.
    """
    root = logging.getLogger()
    logging.getLogger("alembic").setLevel(logging.WARNING)  # schema checks on every start
    handler = next((h for h in root.handlers if h.get_name() == _HANDLER_NAME), None)
    if handler is None:
        if root.handlers:
            return
        handler = _StderrHandler()
        handler.set_name(_HANDLER_NAME)
        handler.addFilter(ContextFilter())
        root.addHandler(handler)
    handler.setFormatter(FORMATTERS[fmt]())
    root.setLevel(level)
