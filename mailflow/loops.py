"""Recognise mail that must never be answered (auto replies, lists, our own mail) and bounces."""

from __future__ import annotations

import email
import email.message
import email.policy
import re
from dataclasses import dataclass

__all__ = ["Bounce", "BounceRecipient", "automatic_reason", "parse_bounce"]

# Out-of-office subjects as vendors write them, anchored at the start of the subject.
_OOO_SUBJECT_RE = re.compile(
    r"^\s*[\[【(（]?\s*(?:自动回复|自動回覆|自动答复|自動回復|休假(?:自动回复|通知|中)|"
    r"Automatic reply|Auto(?:matic)?[- ]?Reply|Auto(?:matic)?[- ]Response|Autoresponse|"
    r"Out of (?:the )?Office(?: AutoReply)?|OOO|Abwesenheitsnotiz|Abwesend|Réponse automatique|"
    r"Respuesta automática|Risposta automatica|Autosvar|Automatisch antwoord|Fuera de la oficina|"
    r"Absence)"
    r"\s*(?:[:：\]】)）\-]|$)",
    re.IGNORECASE,
)
# Looser out-of-office words, used only with X-Auto-Response-Suppress.
_OOO_WORDS_RE = re.compile(
    r"自动回复|自動回覆|休假|不在办公室|out of (?:the )?office|auto[- ]?reply|automatic reply|"
    r"abwesen|vacation|on leave",
    re.IGNORECASE,
)
_BULK_PRECEDENCE = {"bulk", "junk", "list", "auto_reply"}
_DAEMONS = {"mailer-daemon", "postmaster"}


def _first_headers(msg: email.message.Message) -> dict[str, str]:
    """Lowercased header name -> first raw value."""
    first: dict[str, str] = {}
    for name, value in msg.raw_items():
        first.setdefault(str(name).lower(), str(value))
    return first


def _local_parts(value: str) -> list[str]:
    return [a.split("@", 1)[0].strip().lower() for a in re.findall(r"[^\s<>,;\"]+", value)]


_COMMENT = re.compile(r"\([^()]*\)")


def automatic_reason(msg: email.message.Message, subject: str,
                     desk_marker: str = "X-Mailflow") -> str | None:
    """Why ``msg`` is automatic mail that must not be answered, or None for a person's mail."""
    h = _first_headers(msg)
    if desk_marker and desk_marker.lower() in h:
        return f"own mail ({desk_marker})"
    auto = h.get("auto-submitted")
    if auto is not None:
        # RFC 3834: a keyword, then optional parameters; comments in () may go anywhere.
        token = _COMMENT.sub(" ", auto).split(";", 1)[0].strip().lower()
        if token and token != "no":
            return f"Auto-Submitted: {token}"
    for name in ("x-autoreply", "x-autorespond"):
        if name in h and h[name].strip().lower() not in ("no", "false", "0"):
            return "X-Autoreply" if name == "x-autoreply" else "X-Autorespond"
    prec = h.get("precedence", "").strip().lower()
    if prec in _BULK_PRECEDENCE:
        return f"Precedence: {prec}"
    if "list-id" in h:
        return "mailing list (List-Id)"
    if "list-unsubscribe" in h:
        return "mailing list (List-Unsubscribe)"
    if "return-path" in h and re.fullmatch(r"\s*<\s*>\s*", h["return-path"]):
        return "null return path"
    for name in ("from", "sender"):
        for local in _local_parts(h.get(name, "")):
            if local in _DAEMONS:
                return f"sender is {local}"
    if msg.get_content_type() == "multipart/report":
        return "delivery or read report (multipart/report)"
    for name in ("x-ms-exchange-generated-message-source", "x-ms-exchange-inbox-rules-loop"):
        if name in h:
            return "Exchange generated (X-MS-Exchange-Generated-Message-Source)" if (
                name.endswith("source")
            ) else "Exchange inbox rule (X-MS-Exchange-Inbox-Rules-Loop)"
    subject = subject or ""
    if _OOO_SUBJECT_RE.match(subject):
        return "out-of-office subject"
    suppress = h.get("x-auto-response-suppress", "").lower()
    if suppress and re.search(r"\b(?:all|oof|autoreply)\b", suppress) and _OOO_WORDS_RE.search(
        subject
    ):
        return "out-of-office subject with X-Auto-Response-Suppress"
    return None


# --------------------------------------------------------------------------- bounces


@dataclass
class BounceRecipient:
    """One failed (or delayed) recipient from a bounce."""

    address: str
    status: str
    action: str
    diagnostic: str
    permanent: bool


@dataclass
class Bounce:
    """A delivery failure report."""

    original_message_id: str | None
    recipients: list[BounceRecipient]


_STATUS_RE = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")
_SMTP_RE = re.compile(r"(?<![\d.])([45])\d\d(?![\d.])")
_ADDR_RE = re.compile(r"[A-Za-z0-9._%+!#$&'*/=?^`{|}~-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+")
_MSGID_HDR_RE = re.compile(r"^[ \t>]*Message-ID[ \t]*:[ \t]*<?([^\s<>]+@[^\s<>]+)>?", re.I | re.M)
_WS_RE = re.compile(r"\s+")

_QMAIL = "This is the qmail-send program"
_EXIM = "This message was created automatically by mail delivery software"
_BOUNCE_SUBJECT_RE = re.compile(
    r"undeliver|delivery status notification|delivery failure|mail delivery failed|"
    r"returned mail|failure notice|delivery has failed|could not be delivered|"
    r"退信|投递失败|發送失敗|发送失败|无法投递|未能送达|递送失败",
    re.IGNORECASE,
)
_CN_BODY_RE = re.compile(r"退信|投递失败|发送失败|无法投递|被退回|未能成功送达|递送失败")


def _collapse(text: str) -> str:
    return _WS_RE.sub(" ", text).strip()


def _recipient(address: str, status: str, action: str, diagnostic: str) -> BounceRecipient:
    """Build a recipient, inferring status/permanence from the SMTP diagnostic when needed."""
    diagnostic = _collapse(diagnostic)
    if not status:
        m = _STATUS_RE.search(diagnostic)
        if m:
            status = m.group(0)
        else:
            code = _SMTP_RE.search(diagnostic)
            if code:
                status = f"{code.group(1)}.0.0"
            elif action.lower() == "delayed":
                status = "4.0.0"
            elif action.lower() in ("failed", ""):
                status = "5.0.0"
    if not action:
        action = "failed" if status.startswith("5") else "delayed"
    permanent = status.startswith("5") or (not status and action.lower() == "failed")
    return BounceRecipient(address.strip().strip("<>").lower(), status, action.lower(),
                           diagnostic, permanent)


def _dsn_blocks(part: email.message.Message) -> list[dict[str, str]]:
    """Field blocks of a message/delivery-status part (per-message first, then recipients)."""
    payload = part.get_payload()
    blocks: list[dict[str, str]] = []
    if isinstance(payload, list):
        for sub in payload:
            blocks.append({str(k).lower(): _collapse(str(v)) for k, v in sub.raw_items()})
        if any(blocks):
            return blocks
    from mailflow.mail import decode_bytes

    raw = part.get_payload(decode=True)
    text = decode_bytes(raw if isinstance(raw, bytes) else b"")
    for chunk in re.split(r"\r?\n[ \t]*\r?\n", text):
        fields: dict[str, str] = {}
        last = None
        for line in chunk.splitlines():
            if line[:1] in (" ", "\t") and last:
                fields[last] += " " + line.strip()
            elif ":" in line:
                key, val = line.split(":", 1)
                last = key.strip().lower()
                fields[last] = val.strip()
        blocks.append({k: _collapse(v) for k, v in fields.items()})
    return blocks


def _typed_value(value: str) -> str:
    """``rfc822; a@b`` -> ``a@b``."""
    return value.split(";", 1)[1].strip() if ";" in value else value.strip()


def _original_id_from(part: email.message.Message) -> str | None:
    payload = part.get_payload()
    if isinstance(payload, list):
        for sub in payload:
            for name, value in sub.raw_items():
                if str(name).lower() == "message-id":
                    m = re.search(r"<?([^\s<>]+)>?", str(value))
                    if m:
                        return m.group(1)
        return None
    raw = part.get_payload(decode=True)
    if isinstance(raw, bytes):
        m = _MSGID_HDR_RE.search(raw.decode("utf-8", "replace"))
        if m:
            return m.group(1)
    return None


def _parse_dsn(msg: email.message.Message) -> Bounce | None:
    status_parts = []
    original: str | None = None
    for part in msg.walk():
        ctype = part.get_content_type()
        if ctype == "message/delivery-status":
            status_parts.append(part)
        elif ctype in ("message/rfc822", "text/rfc822-headers") and original is None:
            original = _original_id_from(part)
    if not status_parts:
        return None
    recipients: list[BounceRecipient] = []
    for part in status_parts:
        blocks = _dsn_blocks(part)
        for block in blocks:
            addr = _typed_value(block.get("final-recipient") or block.get("original-recipient", ""))
            if not addr:
                continue
            recipients.append(_recipient(
                addr,
                (_STATUS_RE.search(block.get("status", "")) or [""])[0],
                block.get("action", ""),
                _typed_value(block.get("diagnostic-code", "")),
            ))
    return Bounce(original, recipients)


def _qmail_recipients(text: str) -> list[BounceRecipient]:
    body = text.split("--- Below this line is a copy of the message.", 1)[0]
    out = []
    for m in re.finditer(r"^<([^<>\s]+@[^<>\s]+)>:[ \t]*\n((?:.+\n?)*)", body, re.M):
        diag = m.group(2)
        permanent = "permanent error" in text.lower() or bool(re.search(r"\b5\d\d\b", diag))
        out.append(_recipient(m.group(1), "", "failed" if permanent else "delayed", diag))
    return out


def _exim_recipients(text: str) -> list[BounceRecipient]:
    m = re.search(r"following address(?:\(es\)|es)? (?:failed|ha(?:ve|s) not yet been delivered)"
                  r"[^\n]*\n", text, re.I)
    if not m:
        return []
    action = "delayed" if "not yet been delivered" in text else "failed"
    entries: list[tuple[str, int, list[str]]] = []
    for line in text[m.end():].splitlines():
        stripped = line.strip()
        if line.startswith("------"):
            break
        if not stripped:
            continue
        indent = len(line) - len(line.lstrip())
        addr = _ADDR_RE.fullmatch(stripped.split(" ", 1)[0].strip("<>"))
        if addr and (not entries or indent <= entries[-1][1]):
            entries.append((addr.group(0), indent, []))
        elif entries and indent > entries[-1][1]:
            entries[-1][2].append(stripped)
        elif entries:
            break
    return [_recipient(a, "", action, " ".join(diag)) for a, _, diag in entries]


def _postfix_recipients(text: str) -> list[BounceRecipient]:
    out = []
    pattern = r"^[ \t]*<([^<>\s]+@[^<>\s]+)>(?: \([^)]*\))?:[ \t]*(.+(?:\n[ \t]+.+)*)"
    for m in re.finditer(pattern, text, re.M):
        diag = m.group(2)
        if _SMTP_RE.search(diag) or _STATUS_RE.search(diag):
            out.append(_recipient(m.group(1), "", "", diag))
    return out


_CN_ADDR_LABEL_RE = re.compile(
    r"(?:收件人|收信人|收件人地址|收件地址|接收人|目标地址|Recipient)\s*[:：]?\s*[<(]?"
    r"(" + _ADDR_RE.pattern + r")",
    re.I,
)
_CN_REASON_RE = re.compile(
    r"(?:退信原因|失败原因|错误原因|原因|错误信息|Reason)\s*[:：]\s*(.+)", re.IGNORECASE
)


def _chinese_recipients(text: str) -> list[BounceRecipient]:
    addrs = []
    for m in _CN_ADDR_LABEL_RE.finditer(text):
        if m.group(1).lower() not in addrs:
            addrs.append(m.group(1).lower())
    if not addrs:
        return []
    diag = ""
    for m in _CN_REASON_RE.finditer(text):
        diag = m.group(1)
        if _SMTP_RE.search(diag) or _STATUS_RE.search(diag):
            break
    if not (_SMTP_RE.search(diag) or _STATUS_RE.search(diag)):
        for line in text.splitlines():
            if _STATUS_RE.search(line) or re.search(r"(?<![\d.])[45]\d\d\s", line):
                diag = line
                break
    return [_recipient(a, "", "", diag) for a in addrs]


def _original_id_in_text(text: str) -> str | None:
    m = _MSGID_HDR_RE.search(text)
    return m.group(1) if m else None


def parse_bounce(raw: bytes) -> Bounce | None:
    """Parse a delivery failure (RFC 3464 DSN or common plain-text formats); None if not one."""
    try:
        return _parse_bounce(raw)
    except Exception:  # a bounce check must never break mail handling
        return None


def _parse_bounce(raw: bytes) -> Bounce | None:
    from mailflow.mail import parse

    msg = email.message_from_bytes(bytes(raw), policy=email.policy.compat32)
    report_type = str(msg.get_param("report-type", "") or "").lower()
    if msg.get_content_type() == "multipart/report" and report_type not in ("", "delivery-status"):
        return None  # e.g. a read receipt (disposition-notification)
    dsn = _parse_dsn(msg)
    if dsn is not None and dsn.recipients:
        return dsn
    mail = parse(raw)
    if dsn is None and (mail.auto is None or mail.auto.startswith("own mail")):
        return None  # a person's mail, even if it quotes a bounce
    text = mail.text.replace("\r\n", "\n")
    original = dsn.original_message_id if dsn is not None else None
    for att in mail.attachments:
        if original is None and att.data and att.content_type in (
            "message/rfc822", "text/rfc822-headers"
        ):
            original = _original_id_in_text(att.data.decode("utf-8", "replace"))
    if original is None:
        original = _original_id_in_text(text)

    daemon = any(p in _DAEMONS for p in _local_parts(mail.from_addr))
    recipients: list[BounceRecipient] = []
    strong = dsn is not None or bool(
        _BOUNCE_SUBJECT_RE.search(mail.subject) or _CN_BODY_RE.search(text)
    )
    if _QMAIL in text:
        strong, recipients = True, _qmail_recipients(text)
    elif _EXIM in text or "could not be delivered to one or more" in text:
        strong, recipients = True, _exim_recipients(text) or _postfix_recipients(text)
    elif "This is the mail system at host" in text:
        strong, recipients = True, _postfix_recipients(text)
    else:
        recipients = _postfix_recipients(text) or _chinese_recipients(text)
    if strong or (recipients and daemon):
        return Bounce(original, recipients)
    return None
