"""Size limits: a mail too big is parsed within `[limits]`, and what was left out is named."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mailflow.mail import ParsedMail, parse

if TYPE_CHECKING:
    from mailflow.config import LimitSettings


def _size(n: int) -> str:
    return f"{n / 1_000_000:.1f} MB" if n >= 100_000 else f"{n} bytes"


def parse_limited(raw: bytes, limits: LimitSettings) -> ParsedMail:
    """Parse within the size limits; what was left out is listed in `omitted`.

    A message over `max_message_bytes` keeps its text but none of its attachments (each is
    listed with its size); one over four times the limit is read only up to the limit.
    """
    size = len(raw)
    if size <= limits.max_message_bytes:
        return parse(
            raw,
            max_attachment_bytes=limits.max_attachment_bytes,
            max_attachments=limits.max_attachments,
        )
    cut = size > 4 * limits.max_message_bytes
    mail = parse(raw[: limits.max_message_bytes] if cut else raw, max_attachment_bytes=0)
    note = (
        f"邮件 {_size(size)} 超过上限 {_size(limits.max_message_bytes)}，附件未收录 / "
        f"message of {_size(size)} is over the {_size(limits.max_message_bytes)} limit: "
        + ("only its beginning was read" if cut else "attachments not kept")
    )
    mail.omitted.insert(0, note)
    return mail


def omitted_text(mail: ParsedMail) -> str:
    """One line naming everything the size limits left out ("" when nothing)."""
    return "; ".join(mail.omitted)[:4000]
