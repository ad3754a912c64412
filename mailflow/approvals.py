"""Approval decisions by mail that cannot be forged.

Each approver of each step of a request's approval chain gets their own single-use token:

    token = nonce ‖ HMAC-SHA256(secret, "ticket|step|approver|nonce")[:15 bytes]   (base32)

It travels in the reply path of the approval mail, where any ordinary client keeps it:
the Reply-To address (`itsm+<token>@domain`) and the approval mail's own Message-ID
(`mf.approval.<token>@domain`, so In-Reply-To/References carry it). Only a SHA-256 of the
token is stored. A decision counts only when all of these hold (`verify`):

1. the mail carries exactly one token (in its recipients and/or In-Reply-To/References),
   issued by us (HMAC checked with `hmac.compare_digest`) for this request;
2. the sender (a single From address, and no Sender header naming someone else) is the
   approver the token was issued to;
3. whenever our MTA is trusted (`[security] trusted_authserv_id`, or the older
   `[requests] require_dkim`), the topmost `Authentication-Results` header with that
   authserv-id shows dkim=pass (aligned with the approver's domain) or dmarc=pass
   (header.from = that domain); every other such header, e.g. one the sender wrote, is
   ignored (senders.authenticated);
4. the token has not been used (nor voided by another decision of its step) and has not
   expired, and the request is still waiting for that step.

The secret is `[desk] secret`; when that is empty one is generated once and kept in the
`kv` table.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session

from mailflow import senders
from mailflow.models import Approval, Ticket
from mailflow.render import Phrase
from mailflow.senders import b32 as _b32
from mailflow.senders import secret
from mailflow.tracking import REFS_KEPT

if TYPE_CHECKING:
    from mailflow.desk import Desk
    from mailflow.mail import ParsedMail

_NONCE_BYTES, _MAC_BYTES = 10, 15
TOKEN_LENGTH = (_NONCE_BYTES + _MAC_BYTES) * 8 // 5  # 40 base32 characters
_TOKEN = rf"[a-z2-7]{{{TOKEN_LENGTH}}}"
MESSAGE_ID_PREFIX = "mf.approval."


# -- the secret and the tokens -------------------------------------------------------------


def _mac(key: bytes, ticket_id: int, step: int, approver: str, nonce: str) -> str:
    message = f"mailflow-approval|{ticket_id}|{step}|{approver.lower()}|{nonce}".encode()
    return _b32(hmac.new(key, message, hashlib.sha256).digest()[:_MAC_BYTES])


def make_token(key: bytes, ticket_id: int, step: int, approver: str) -> str:
    nonce = _b32(secrets.token_bytes(_NONCE_BYTES))
    return nonce + _mac(key, ticket_id, step, approver, nonce)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("ascii")).hexdigest()


def token_valid_for(key: bytes, token: str, row: Approval) -> bool:
    """Whether the token's MAC is ours for this row's request, step and approver."""
    split = TOKEN_LENGTH - _MAC_BYTES * 8 // 5
    nonce, mac = token[:split], token[split:]
    expected = _mac(key, row.ticket_id, row.step, row.approver, nonce)
    return hmac.compare_digest(mac.encode("ascii"), expected.encode("ascii"))


def reply_address(desk_address: str, token: str) -> str:
    """`itsm+<token>@domain`: replies to the approval mail go here."""
    local, _, domain = desk_address.partition("@")
    return f"{local}+{token}@{domain}"


def message_id(desk_address: str, token: str, reply: str = "") -> str:
    """`mf.approval.<token>[.r-<reply token>]@domain`: the approval mail's Message-ID, which
    may also carry the approver's reply token (senders.py) for their other replies."""
    domain = desk_address.rpartition("@")[2] or "mailflow.invalid"
    tail = f".{senders.REPLY_TAG}{reply}" if reply else ""
    return f"{MESSAGE_ID_PREFIX}{token}{tail}@{domain}"


def tokens_in(mail: ParsedMail, desk_address: str) -> list[str]:
    """Every distinct token the mail carries in its recipients or its thread references."""
    local, _, domain = desk_address.lower().partition("@")
    address = re.compile(rf"^{re.escape(local)}\+({_TOKEN})@{re.escape(domain)}$")
    thread = re.compile(rf"^{re.escape(MESSAGE_ID_PREFIX)}({_TOKEN})[.@]")
    found: list[str] = []
    for candidate in senders.recipients(mail):
        match = address.match(candidate.strip().lower())
        if match:
            found.append(match.group(1))
    for candidate in [*mail.in_reply_to[-REFS_KEPT:], *mail.references[-REFS_KEPT:]]:
        match = thread.match(candidate.strip().lower())
        if match:
            found.append(match.group(1))
    return list(dict.fromkeys(found))


def ticket_by_token(session: Session, mail: ParsedMail, desk_address: str) -> Ticket | None:
    """The request a reply token names (threading only: `verify` decides what it may do)."""
    for token in tokens_in(mail, desk_address):
        row = session.scalar(select(Approval).where(Approval.token_hash == token_hash(token)))
        if row is not None:
            return session.get(Ticket, row.ticket_id)
    return None


# -- issuing -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Issued:
    approval: Approval
    token: str


def issue(
    session: Session, desk: Desk, ticket: Ticket, step: int, group: str, approver: str,
    now: datetime,
) -> Issued:
    """A new token for one approver on one step (the mail is the caller's)."""
    token = make_token(secret(session, desk), ticket.id, step, approver)
    row = Approval(
        ticket_id=ticket.id,
        step=step,
        group=group,
        approver=approver.lower(),
        token_hash=token_hash(token),
        message_id=message_id(
            desk.address, token, senders.reply_token(secret(session, desk), ticket.id, approver)
        ),
        created_at=now,
        expires_at=now + desk.settings.requests.token_ttl,
    )
    session.add(row)
    return Issued(row, token)


def open_rows(session: Session, ticket: Ticket, step: int | None = None) -> list[Approval]:
    """Undecided tokens of the request (of one step when given)."""
    query = select(Approval).where(Approval.ticket_id == ticket.id, Approval.decision.is_(None))
    if step is not None:
        query = query.where(Approval.step == step)
    return list(session.scalars(query.order_by(Approval.id)))


def rows_of(session: Session, ticket: Ticket) -> list[Approval]:
    return list(
        session.scalars(
            select(Approval).where(Approval.ticket_id == ticket.id).order_by(Approval.id)
        )
    )


def current_step(session: Session, ticket: Ticket) -> int | None:
    """The step waiting for a decision, or None."""
    rows = open_rows(session, ticket)
    return min(r.step for r in rows) if rows else None


def void(rows: list[Approval], now: datetime, why: str) -> None:
    for row in rows:
        if row.decision is None:
            row.decision, row.used_at, row.reason = "void", now, why


# -- verifying a decision ------------------------------------------------------------------


@dataclass
class Verdict:
    """The outcome of checking a decision mail: `approval` is set when the token resolved."""

    ok: bool
    code: str
    why: str
    approval: Approval | None = None
    auth: str = ""


REASONS: dict[str, dict[str, str]] = {  # why a decision mail is refused, by language
    "no_token": {
        "zh-CN": "邮件中没有审批凭证：请直接回复您收到的审批邮件",
        "en": "no approval token: reply to the approval mail itself",
    },
    "several_tokens": {
        "zh-CN": "邮件中含有多个不同的审批凭证",
        "en": "the mail carries more than one approval token",
    },
    "invalid_token": {"zh-CN": "审批凭证无效", "en": "the approval token is not valid"},
    "other_request": {
        "zh-CN": "审批凭证属于另一个申请 {other}",
        "en": "the token belongs to another request, {other}",
    },
    "wrong_sender": {
        "zh-CN": "发件人 {sender} 不是该审批凭证的审批人",
        "en": "{sender} is not the approver this token was issued to",
    },
    "several_senders": {"zh-CN": "发件人不唯一", "en": "the mail names more than one sender"},
    "on_behalf": {
        "zh-CN": "邮件由 {sender} 代发，审批须由审批人本人发送",
        "en": "sent on the approver's behalf by {sender}; approvers decide themselves",
    },
    "not_authenticated": {
        "zh-CN": "发件域未通过 DKIM/DMARC 验证（{auth}）",
        "en": "no DKIM or DMARC pass for the sender's domain ({auth})",
    },
    "used": {"zh-CN": "该审批凭证已使用过", "en": "this approval token has already been used"},
    "void": {
        "zh-CN": "该审批步骤已有决定或凭证已被替换",
        "en": "this step was already decided or the token replaced",
    },
    "expired": {
        "zh-CN": "审批凭证已于 {expires} 过期", "en": "the approval token expired at {expires}",
    },
    "not_waiting": {
        "zh-CN": "申请当前不在等待此审批", "en": "the request is not waiting for this approval",
    },
    "reason_required": {
        "zh-CN": "驳回须写明原因，例如 “驳回 预算不足”",
        "en": "a rejection needs a reason, e.g. “reject no budget”",
    },
}


def reason(code: str, **values: str) -> Phrase:
    """Why a decision mail was refused, in each language."""
    return Phrase(REASONS[code], **values)


def _refuse(code: str, approval: Approval | None = None, **values: str) -> Verdict:
    return Verdict(False, code, reason(code, **values), approval)


def from_addresses(mail: ParsedMail) -> list[str]:
    """Every address in the From header(s), lowercased."""
    return mail.addresses("from") or ([mail.from_addr] if mail.from_addr else [])


def verify(
    session: Session, desk: Desk, ticket: Ticket, mail: ParsedMail, now: datetime
) -> Verdict:
    """Whether this mail may decide an approval of `ticket` (see the module docstring)."""
    tokens = tokens_in(mail, desk.address)
    if not tokens:
        return _refuse("no_token")
    if len(tokens) > 1:
        return _refuse("several_tokens")
    token = tokens[0]
    row = session.scalar(select(Approval).where(Approval.token_hash == token_hash(token)))
    if row is None or not token_valid_for(secret(session, desk), token, row):
        return _refuse("invalid_token")
    if row.ticket_id != ticket.id:
        other = session.get(Ticket, row.ticket_id)
        return _refuse("other_request", row, other=other.ref if other else "?")
    addresses = from_addresses(mail)
    if len(addresses) != 1:
        return _refuse("several_senders", row)
    if addresses[0] != row.approver:
        return _refuse("wrong_sender", row, sender=addresses[0])
    agents = mail.addresses("sender")
    if any(a != row.approver for a in agents):
        return _refuse("on_behalf", row, sender=agents[0] if len(agents) == 1 else "?")
    auth = ""
    # The token, and our own MTA's word too whenever it is trusted ([security]) or required.
    if desk.settings.requests.require_dkim or desk.settings.security.trusted_authserv_id:
        passed, auth = senders.mta_verdict(desk, mail, row.approver)
        if not passed:
            return _refuse("not_authenticated", row, auth=auth)
    if row.decision == "void":
        return _refuse("void", row)
    if row.decision is not None or row.used_at is not None:
        return _refuse("used", row)
    if now >= row.expires_at:
        expires = row.expires_at.astimezone(desk.settings.desk.tz).strftime("%Y-%m-%d %H:%M")
        return _refuse("expired", row, expires=expires)
    if ticket.status != "pending_approval" or current_step(session, ticket) != row.step:
        return _refuse("not_waiting", row)
    return Verdict(True, "ok", "", row, auth)
