"""Who a mail is from, and who is on a ticket: the one place that decides whom the desk trusts.

A From header is only a claim. A mail *proves* its sender (`identify`) by

- `token`: it answers a mail the desk sent to that very address about that very ticket. Every
  mail about a ticket carries a reply token bound to its recipient and the ticket,
  `HMAC-SHA256(secret, "reply|ticket|address")`, in its Message-ID (`mf.<n>.r-<token>@domain`,
  which In-Reply-To/References carry back) and, unless `[security] plus_address = false`, in
  its Reply-To (`desk+r-<token>@domain`, which becomes the reply's To);
- `dmarc`: the topmost Authentication-Results header written by our own MTA
  (`[security] trusted_authserv_id`) shows DMARC pass for the From domain, or a DKIM pass
  aligned with it; headers with any other authserv-id are ignored (RFC 8601 §5: our MTA
  removes copies of its own id from incoming mail);
- either (`token_or_dmarc`, the default), or the From header alone (`from`, today's old
  behaviour, which `mailflow check` warns about).

Only one From address counts, and a Sender naming someone else defeats the proof (the mail is
sent on their behalf). Commands, staff text that would reach the requester and approvals
count only from a proven sender; `NEEDS_NO_PROOF` lists what does not (a requester's or
watcher's comment is passed to the engineers as written, like a phone call).

Who is on a ticket (`roles_on`, `on_ticket`): its requester, watchers and vendor (`parties`
rows), its assignee, the staff of its tiers (the service desk and its lead, the incident
manager, the members of every tier the incident reached, the post lead of a major incident,
problem management once handed over), and a request's approvers and executors. Mail from
anyone else about a ticket is recorded for the staff and passed on to nobody.

- Who may write (`refused_sender`): `[limits] deny` and `allow` by address or `@domain` (an
  @domain covers its subdomains); people in `[roles]` pass `allow` but not `deny`. Mail that
  claims to come from the desk itself (From or Sender, its +tag addresses too) is never
  trusted (`claims_desk`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sqlalchemy import bindparam, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from mailflow import lifecycle
from mailflow.models import KeyValue, Party, Ticket
from mailflow.render import LANGUAGES, Phrase
from mailflow.tracking import REFS_KEPT

if TYPE_CHECKING:
    from mailflow.config import Settings
    from mailflow.desk import Desk
    from mailflow.mail import ParsedMail

_ADDRESS = re.compile(r"^[^@\s<>\"]+@[^@\s<>\"]+$")


def is_desk_address(desk: Desk, address: str) -> bool:
    """The desk's address or one of its +tag forms (e.g. approval reply addresses)."""
    local, _, domain = desk.address.lower().partition("@")
    a_local, _, a_domain = address.strip().lower().partition("@")
    return a_domain == domain and (a_local == local or a_local.startswith(local + "+"))


def claims_desk(desk: Desk, mail: ParsedMail) -> str | None:
    """Why the mail claims to come from the desk itself (From or Sender); None otherwise.

    Addresses are read from the raw headers, so a display name such as
    `"itsm@example.test" <someone@else>` is only a name: that mail is from someone else.
    """
    for name in ("from", "sender"):
        addresses = mail.addresses(name)
        if name == "from":
            addresses.append(mail.from_addr)
        if any(is_desk_address(desk, a) for a in addresses if a):
            return f"{name.title()} is the desk's own address"
    return None


def _listed(address: str, entries: tuple[str, ...]) -> bool:
    domain = address.rpartition("@")[2]
    for entry in entries:
        if entry == address:
            return True
        if entry.startswith("@") and (domain == entry[1:] or domain.endswith("." + entry[1:])):
            return True
    return False


def refused_sender(desk: Desk, mail: ParsedMail) -> str | None:
    """Why mail from this sender is recorded but not acted on; None when it is accepted."""
    address = mail.from_addr
    limits = desk.settings.limits
    local = address.partition("@")[0]
    if not _ADDRESS.match(address) or len(address) > 254 or len(local) > 64:  # RFC 5321
        return f"sender address {address[:100]!r} is not usable"
    if _listed(address, limits.deny):
        return f"sender {address} is on [limits] deny"
    if limits.allow and not _listed(address, limits.allow) and not desk.settings.roles.of(address):
        return f"sender {address} is not on [limits] allow"
    return None


# -- the secret and reply tokens ---------------------------------------------------------

SECRET_KEY = "approval_secret"  # one secret for every token the desk issues
_SECRET_CACHE = "mailflow.secret"
REPLY_TAG = "r-"
_REPLY_BYTES = 15
REPLY_TOKEN_LENGTH = _REPLY_BYTES * 8 // 5  # 24 base32 characters
_REPLY = rf"{REPLY_TAG}([a-z2-7]{{{REPLY_TOKEN_LENGTH}}})"
# Headers naming where the mail was delivered (added by the receiving MTA) besides To/Cc.
DELIVERY_HEADERS = ("delivered-to", "x-original-to", "envelope-to")


def secret(session: Session, desk: Desk) -> bytes:
    """`[desk] secret`, else the one generated once and kept in the database."""
    configured = desk.settings.desk.secret
    if configured:
        return configured.encode("utf-8")
    cached = session.info.get(_SECRET_CACHE)
    if cached is not None:
        return cached
    value = session.scalar(select(KeyValue.value).where(KeyValue.key == SECRET_KEY))
    if value is None:
        # Insert-if-absent, so two daemons making it at once end up sharing one.
        dialect = session.get_bind().dialect.name
        insert = pg_insert if dialect == "postgresql" else sqlite_insert
        session.execute(
            insert(KeyValue)
            .values(key=SECRET_KEY, value=secrets.token_hex(32))
            .on_conflict_do_nothing(index_elements=["key"])
        )
        value = session.scalar(select(KeyValue.value).where(KeyValue.key == SECRET_KEY))
        assert value is not None
        return value.encode("utf-8")  # not cached: the insert may yet roll back
    session.info[_SECRET_CACHE] = value.encode("utf-8")
    return session.info[_SECRET_CACHE]


def b32(data: bytes) -> str:
    return base64.b32encode(data).decode("ascii").rstrip("=").lower()


def reply_token(key: bytes, ticket_id: int, address: str) -> str:
    """The token that proves `address` in replies about ticket `ticket_id`."""
    message = f"mailflow-reply|{ticket_id}|{address.strip().lower()}".encode()
    return b32(hmac.new(key, message, hashlib.sha256).digest()[:_REPLY_BYTES])


def reply_address(desk_address: str, token: str) -> str:
    """`desk+r-<token>@domain`: the Reply-To of a mail carrying a reply token."""
    local, _, domain = desk_address.partition("@")
    return f"{local}+{REPLY_TAG}{token}@{domain}"


def reply_message_id(desk_address: str, token: str, unique: str) -> str:
    """`mf.<unique>.r-<token>@domain`: a Message-ID that carries a reply token."""
    domain = desk_address.rpartition("@")[2] or "mailflow.invalid"
    return f"mf.{unique}.{REPLY_TAG}{token}@{domain}"


def recipients(mail: ParsedMail) -> list[str]:
    """Every address the mail was sent or delivered to (To, Cc and the MTA's headers)."""
    found = [*mail.to, *mail.cc]
    for header in DELIVERY_HEADERS:
        found += mail.addresses(header)
    return found


def reply_tokens(mail: ParsedMail, desk_address: str) -> list[str]:
    """Every distinct reply token in the mail's recipients and thread references."""
    local, _, domain = desk_address.lower().partition("@")
    address = re.compile(rf"{re.escape(local)}\+{_REPLY}@{re.escape(domain)}")
    thread = re.compile(rf"mf\.[a-z0-9.]{{1,120}}\.{_REPLY}@")
    found = [m.group(1) for a in recipients(mail) if (m := address.fullmatch(a.strip().lower()))]
    refs = [*mail.in_reply_to[-REFS_KEPT:], *mail.references[-REFS_KEPT:]]
    found += [m.group(1) for r in refs if (m := thread.match(r.strip().lower()))]
    return list(dict.fromkeys(found))


# -- Authentication-Results (RFC 8601) -----------------------------------------------------

_COMMENT = re.compile(r"\((?:[^()\\]|\\.)*\)")
_PAIR = re.compile(r'([A-Za-z0-9_.-]+(?:/\d+)?)\s*=\s*("(?:[^"\\]|\\.)*"|[^\s;]+)')


def _strip_comments(value: str) -> str:
    previous = None
    while previous != value:  # nested comments
        previous, value = value, _COMMENT.sub(" ", value)
    return value


def _split(value: str) -> list[str]:
    """Split on ';' outside quoted strings."""
    parts, current, quoted, escaped = [], [], False, False
    for char in value:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == ";" and not quoted:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    parts.append("".join(current))
    return parts


@dataclass(frozen=True)
class AuthResult:
    method: str
    result: str
    props: dict[str, str] = field(default_factory=dict)


def parse_authentication_results(value: str) -> tuple[str, list[AuthResult]]:
    """(authserv-id, results) of one header value; ("", []) when unreadable."""
    parts = _split(_strip_comments(" ".join(value.split())))
    head = parts[0].split()
    if not head:
        return "", []
    authserv = head[0].strip('"').lower()
    results = []
    for part in parts[1:]:
        pairs = _PAIR.findall(part)
        if not pairs:
            continue
        method, result = pairs[0]
        props = {k.lower(): v.strip('"').lower() for k, v in pairs[1:]}
        results.append(AuthResult(method.split("/")[0].lower(), result.lower(), props))
    return authserv, results


def _aligned(signing: str, domain: str) -> bool:
    signing = signing.strip().strip(".").lower()
    return bool(signing) and (
        domain == signing or ("." in signing and domain.endswith("." + signing))
    )


def authenticated(headers: list[str], trusted: str, address: str) -> tuple[bool, str]:
    """Whether our own MTA's (topmost trusted) Authentication-Results vouch for the domain."""
    domain = address.rpartition("@")[2].lower()
    trusted = trusted.strip().lower()
    for value in headers:  # top first: the header our MTA added last is above forged ones
        authserv, results = parse_authentication_results(value)
        if not trusted or authserv != trusted:
            continue
        for res in results:
            if res.result != "pass":
                continue
            if res.method == "dkim":
                signer = res.props.get("header.d") or res.props.get("header.i", "").rpartition(
                    "@"
                )[2]
                if _aligned(signer, domain):
                    return True, f"dkim=pass header.d={signer} ({authserv})"
            if res.method == "dmarc" and res.props.get("header.from", "") == domain:
                return True, f"dmarc=pass header.from={domain} ({authserv})"
        summary = ", ".join(f"{r.method}={r.result}" for r in results) or "no results"
        return False, f"{authserv}: {summary} for {domain}"
    return False, f"no Authentication-Results from {trusted or '(trusted_authserv_id unset)'}"


def mta_verdict(desk: Desk, mail: ParsedMail, address: str) -> tuple[bool, str]:
    """Whether our own MTA vouches for `address`'s domain (see `authenticated`)."""
    trusted = desk.settings.security.trusted_authserv_id
    return authenticated(mail.header_all("Authentication-Results"), trusted, address)


# -- who is on a ticket ------------------------------------------------------------------

_PARTIES = select(Party.address, Party.role).where(Party.ticket_id == bindparam("ticket_id"))


def parties(session: Session, ticket: Ticket) -> dict[str, set[str]]:
    """The ticket's watchers and vendor: address → {"watcher", "vendor"}."""
    found: dict[str, set[str]] = {}
    if ticket.id is None:
        return found
    for address, role in session.connection().execute(_PARTIES, {"ticket_id": ticket.id}):
        found.setdefault(address, set()).add(role)
    return found


def staff_on(desk: Desk, ticket: Ticket) -> set[str]:
    """The staff of the ticket's tiers (see the module docstring)."""
    roles = desk.settings.roles
    staff = {*roles.service_desk, *roles.service_desk_lead}
    if ticket.kind == "request":
        for step in lifecycle.chain(desk.settings, ticket.request_type):
            staff.update(step.approvers)
        staff.update(roles.executors_for(ticket.request_type))
        return staff
    staff.update(roles.incident_manager)
    path = lifecycle.path_of(ticket)
    rank = lifecycle.DESKTOP_PATH.index(ticket.tier) if ticket.tier in lifecycle.DESKTOP_PATH else 0
    for tier in lifecycle.DESKTOP_PATH[: rank + 1]:
        if tier in path or tier == ticket.tier or (ticket.major and tier == "L2"):
            staff.update(roles.tier_members(tier))
    if ticket.major:
        staff.update(roles.post_lead)
    if ticket.status == "problem":
        staff.update(roles.problem_manager)
    return staff


def roles_on(
    settings: Settings, ticket: Ticket, address: str, people: dict[str, set[str]] | None = None
) -> frozenset[str]:
    """The roles `address` holds relative to this ticket (lifecycle's role names); `people`
    are its parties (`parties`)."""
    roles = settings.roles
    address = address.strip().lower()
    global_roles = roles.of(address)
    held = {"anyone", *(people or {}).get(address, ())}
    if address == ticket.requester:
        held.add("requester")
    if global_roles & {"service_desk", "service_desk_lead"}:
        held.add("desk")
    if address == ticket.assignee or address in roles.tier_members(ticket.tier):
        held.add("tier")
    if "incident_manager" in global_roles:
        held.add("im")
    if global_roles & lifecycle.STAFF_ROLES:
        held.add("staff")
    if ticket.kind == "request":
        steps = lifecycle.chain(settings, ticket.request_type)
        if address in roles.approvers_for(ticket.request_type) or any(
            address in step.approvers for step in steps
        ):
            held.add("approver")
        if address in roles.executors_for(ticket.request_type):
            held.add("executor")
    return frozenset(held)


_ON_TICKET = frozenset({"requester", "watcher", "vendor", "tier", "approver", "executor"})


def on_ticket(desk: Desk, ticket: Ticket, address: str, held: frozenset[str]) -> bool:
    """Whether `address` is one of the people on the ticket."""
    return bool(held & _ON_TICKET) or address.strip().lower() in staff_on(desk, ticket)


# -- proving a sender ----------------------------------------------------------------------

# What a sender on the ticket may do without proof, by the roles that may: a requester's or
# watcher's comment reaches the engineers as written (a forged one changes nothing), and a
# status query is answered to the claimed address alone.
NEEDS_NO_PROOF: dict[str, frozenset[str]] = {
    "comment": frozenset({"requester", "watcher", "vendor", "approver", "executor"}),
    "status": frozenset({"anyone"}),
}


@dataclass(frozen=True)
class Sender:
    """Who a mail about a ticket claims to be from, and what proves it."""

    address: str
    roles: frozenset[str]
    on_ticket: bool
    proof: str | None  # "token" | "dmarc" | "from" | None (unproven)
    doubt: str = ""  # why unproven
    checked: tuple[str, ...] = field(default=())  # what was tried, for the record

    @property
    def proven(self) -> bool:
        return self.proof is not None

    def may_unproven(self, action: str) -> bool:
        """Whether this action counts from this sender without proof."""
        allowed = NEEDS_NO_PROOF.get(action, frozenset())
        if lifecycle.is_staff(self.roles) and action == "comment":
            return False  # staff text reaches the requester: it must be proven
        return bool(self.roles & allowed)


# Why a mail does not prove its sender, by language (shown to the claimed sender).
DOUBTS: dict[str, dict[str, str]] = {
    "several_senders": {
        "zh-CN": "邮件的发件人（From）不唯一", "en": "the mail names more than one sender (From)",
    },
    "on_behalf": {
        "zh-CN": "邮件由 {agent} 代发（Sender）",
        "en": "sent on the sender's behalf by {agent} (Sender)",
    },
    "no_token": {
        "zh-CN": "它没有回复服务台就本工单发给该地址的任何邮件",
        "en": "it answers no mail the desk sent to this address about this ticket",
    },
    "mta": {"zh-CN": "发件域验证未通过（{verdict}）", "en": "{verdict}"},
}


def _joined(doubts: list[Phrase]) -> Phrase:
    sep = {"zh-CN": "；", "en": "; "}
    return Phrase({lang: sep[lang].join(d.in_(lang) for d in doubts) for lang in LANGUAGES})


def _single_sender(mail: ParsedMail) -> Phrase | None:
    """Why the mail has no single accountable sender; None when it has one."""
    senders = mail.addresses("from") or ([mail.from_addr] if mail.from_addr else [])
    if len(senders) != 1:
        return Phrase(DOUBTS["several_senders"])
    agents = [a for a in mail.addresses("sender") if a != senders[0]]
    if agents:
        return Phrase(DOUBTS["on_behalf"], agent=agents[0])
    return None


def _token_proof(session: Session, desk: Desk, ticket: Ticket, mail: ParsedMail) -> bool:
    tokens = reply_tokens(mail, desk.address)
    if not tokens or ticket.id is None:
        return False
    expected = reply_token(secret(session, desk), ticket.id, mail.from_addr).encode("ascii")
    return any(hmac.compare_digest(t.encode("ascii"), expected) for t in tokens)


def prove(
    session: Session, desk: Desk, ticket: Ticket, mail: ParsedMail
) -> tuple[str | None, str]:
    """(how the sender is proven or None, why not) under `[security] commands`."""
    mode = desk.settings.security.commands
    if mode == "from":
        return "from", ""
    doubt = _single_sender(mail)
    if doubt:
        return None, doubt
    why: list[Phrase] = []
    if mode in ("token", "token_or_dmarc"):
        if _token_proof(session, desk, ticket, mail):
            return "token", ""
        why.append(Phrase(DOUBTS["no_token"]))
    if mode in ("dmarc", "token_or_dmarc") and desk.settings.security.trusted_authserv_id:
        passed, verdict = mta_verdict(desk, mail, mail.from_addr)
        if passed:
            return "dmarc", ""
        why.append(Phrase(DOUBTS["mta"], verdict=verdict))
    return None, _joined(why) if why else ""


def identify(session: Session, desk: Desk, ticket: Ticket, mail: ParsedMail) -> Sender:
    """Who the mail is from relative to `ticket`, and whether that is proven."""
    address = mail.from_addr.strip().lower()
    held = roles_on(desk.settings, ticket, address, parties(session, ticket))
    proof, doubt = prove(session, desk, ticket, mail)
    return Sender(address, held, on_ticket(desk, ticket, address, held), proof, doubt)
