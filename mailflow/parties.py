"""The people on a ticket besides its requester and staff, and what anyone on it asks by mail.

Who may give each command is in lifecycle.py; what proves a sender in senders.py. Here:

- `cc <email>` / `抄送` adds a watcher (told so at once), `uncc <email>` / `取消抄送` removes
  one (a watcher may remove only themself). Watchers get the public updates the requester
  gets (`tickets.public`), never internal notes or engineer notices.
- `vendor <email or key>` / `转厂商` records the ticket's vendor and mails it the ticket in
  its own language (`[vendors]`), with what the engineer wrote after the command. An address
  not in `[vendors]` needs the incident manager (the vendor gets the whole description).
  The vendor's first reply after a hand-over is recorded (`vendor_replied`, with its
  response time against the contract) for the review report.
- `category <code or label>` / `分类` corrects the category (`category_rule` finds the rule
  meant; incidents.py re-plans the SLA). The event `category` holds old and new.
- `status` / `状态` / `查询` is answered to the sender alone: state, owner tier, deadline
  and the last public update. No engineer is told.
- A fresh mail (pipeline.py) `查询 INC-12` (subject or first line) is answered the same way
  when its sender is on that ticket, else with a neutral answer naming nothing;
  `我的工单` / `my tickets` lists the sender's open tickets. Neither opens a ticket.
"""

from __future__ import annotations

import copy
import re
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from mailflow import commands, lifecycle, notify, refusals, senders, tickets, tracking
from mailflow.config import Settings, Vendor
from mailflow.models import Event, Inbound, Ticket
from mailflow.render import Renderer

if TYPE_CHECKING:
    from mailflow.commands import Command
    from mailflow.desk import Desk
    from mailflow.mail import ParsedMail
    from mailflow.rules import Rule

_ADDRESS = re.compile(r"[^\s<>@:：,，;；()（）\"']+@[^\s<>@,，;；()（）\"']+")
USAGE = {
    "cc": "抄送 <邮箱> / cc <email>",
    "uncc": "取消抄送 <邮箱> / uncc <email>",
    "vendor": "转厂商 <邮箱或厂商> / vendor <email or vendor>",
    "category": "分类 <分类> / category <name>",
}

# What the requester has been told, newest last: the "last public update" of a status answer.
PUBLIC_EVENTS = {
    "opened": ("已登记", "registered"),
    "resolved": ("已解决", "resolved"),
    "pending": ("等待报告人答复", "waiting for the requester"),
    "reopened": ("重新打开", "reopened"),
    "confirmed": ("已确认关闭", "confirmed and closed"),
    "auto_closed": ("已自动关闭", "closed"),
    "approved": ("已批准", "approved"),
    "rejected": ("已驳回", "rejected"),
    "fulfilled": ("已完成", "fulfilled"),
    "comment": ("处理进展", "update"),
}
# The events whose words were the requester's to read (the rest show only their name).
PUBLIC_WORDS = frozenset({"resolved", "pending", "reopened", "fulfilled", "comment"})
STATUS_NAMES = {
    "open": ("处理中", "open"),
    "pending": ("等待补充信息", "waiting for information"),
    "resolved": ("已解决，待确认", "resolved, awaiting confirmation"),
    "closed": ("已关闭", "closed"),
    "problem": ("已转问题管理", "with problem management"),
    "pending_approval": ("待审批", "awaiting approval"),
    "approved": ("已批准，执行中", "approved, being carried out"),
    "rejected": ("已驳回", "rejected"),
    "fulfilled": ("已完成，待确认", "fulfilled, awaiting confirmation"),
}
TIER_NAMES = {
    "L1": ("一线（服务台）", "L1 (service desk)"),
    "L2": ("二线支持", "L2 support"),
    "L3": ("三线支持", "L3 support"),
    "IM": ("事件经理", "the incident manager"),
}
_QUERY_WORDS = r"(?:查询|状态|status|query)"
_STATUS_QUERY = re.compile(
    rf"{_QUERY_WORDS}\s*[:：]?\s*\[?\s*((?:INC|REQ)\s*-\s*\d{{1,9}})\s*\]?[\s。.!！?？]*",
    re.IGNORECASE,
)
_MINE_QUERY = re.compile(r"(?:查询)?\s*(?:我的工单|my tickets)[\s。.!！?？]*", re.IGNORECASE)


def address_in(text: str) -> str:
    """The first email address in a command's argument, lower case; "" when none."""
    match = _ADDRESS.search(text)
    return match.group(0).lower().rstrip(".。") if match else ""


# -- vendors and categories ----------------------------------------------------------------


def find_vendor(settings: Settings, word: str) -> Vendor | None:
    """The `[vendors]` entry named by its key, its name or one of its addresses."""
    word = word.strip().casefold()
    for vendor in settings.vendors.values():
        if word in (vendor.key.casefold(), vendor.name.casefold(), *vendor.addresses):
            return vendor
    return None


def _vendor_meant(desk: Desk, cmd: Command, held: frozenset[str]) -> tuple[Vendor, str] | None:
    """(the vendor, the address to mail) a `vendor` command names; an address outside
    `[vendors]` only from the incident manager."""
    first = cmd.argument.split()[0] if cmd.argument.split() else ""
    address = address_in(first)
    vendor = find_vendor(desk.settings, address or first)
    if vendor is not None:
        return vendor, address or vendor.addresses[0]
    if address and "im" in held:
        return Vendor(key="", name=address, addresses=(address,),
                      language=desk.settings.desk.language), address
    return None


def category_rule(desk: Desk, ticket: Ticket, word: str) -> Rule | None:
    """The rule a category correction means: by category code or by a label (any language);
    of the ticket's kind, one as major as the ticket when there is one."""
    key = " ".join(word.split()).casefold()
    found = [
        r for r in desk.rules.rules
        if r.result.kind == ticket.kind and (
            r.result.category.casefold() == key
            or any(v.casefold() == key for v in (r.label or {}).values())
        )
    ]
    same = [r for r in found if r.result.major == ticket.major]
    return (same or found or [None])[0]


def set_category(session: Session, desk: Desk, ticket: Ticket, rule: Rule, actor: str,
                 now: datetime) -> None:
    """Correct the category: an event `category` with old and new, countable for reports."""
    old = ticket.category
    ticket.category = rule.result.category
    if ticket.kind == "incident":
        ticket.desktop = rule.result.desktop  # the escalation path follows the category
    tickets.record(
        session, ticket, "category", actor, now, f"{old} → {ticket.category}", old=old,
        new=ticket.category, rule=ticket.rule, new_rule=rule.name,
    )


# -- the checks the tables cannot express ------------------------------------------------


def _cc_problem(session, desk, ticket, cmd, sender, held) -> str | None:
    address = address_in(cmd.argument)
    if not address:
        return f"缺少邮箱 / missing address: {USAGE['cc']}"
    held_by = senders.roles_on(desk.settings, ticket, address, senders.parties(session, ticket))
    if held_by & {"requester", "watcher", "vendor"} or senders.is_desk_address(desk, address) \
            or desk.settings.roles.of(address) & lifecycle.STAFF_ROLES:
        return f"{address} 已是工单相关人员 / is on the ticket already"
    if len(senders.parties(session, ticket)) >= tickets.MAX_WATCHERS:
        return f"关注人已达上限 {tickets.MAX_WATCHERS} / too many watchers"
    return None


def _uncc_problem(session, desk, ticket, cmd, sender, held) -> str | None:
    address = address_in(cmd.argument)
    if not address:
        return f"缺少邮箱 / missing address: {USAGE['uncc']}"
    if address not in tickets.watchers(session, ticket):
        return f"{address} 不是关注人 / is not a watcher of this ticket"
    if not held & {"requester", "staff"} and address != sender:
        return "关注人只能取消自己的抄送 / a watcher may only remove themself"
    return None


def _vendor_problem(session, desk, ticket, cmd, sender, held) -> str | None:
    if not cmd.argument.strip():
        return f"缺少厂商 / missing vendor: {USAGE['vendor']}"
    if _vendor_meant(desk, cmd, held) is None:
        known = ", ".join(desk.settings.vendors) or "-"
        return (
            f"“{cmd.argument.split()[0]}” 不是已登记的厂商（[vendors]: {known}），"
            "其他地址须由事件经理转交 / is not a vendor in [vendors]; only the incident manager "
            "may hand the ticket to another address"
        )
    return None


def _category_problem(session, desk, ticket, cmd, sender, held) -> str | None:
    if not cmd.argument.strip():
        return f"缺少分类 / missing category: {USAGE['category']}"
    rule = category_rule(desk, ticket, cmd.argument)
    if rule is None:
        known = sorted({r.result.category for r in desk.rules.rules
                        if r.result.kind == ticket.kind})
        return f"未知分类 / unknown category “{cmd.argument}”; known: {', '.join(known)}"
    if rule.result.category == ticket.category:
        return f"分类已是 {ticket.category} / the category is {ticket.category} already"
    return None


_PROBLEMS = {
    "cc": _cc_problem,
    "uncc": _uncc_problem,
    "vendor": _vendor_problem,
    "category": _category_problem,
}


def why_not(
    session: Session, desk: Desk, ticket: Ticket, cmd: Command, sender: str,
    held: frozenset[str],
) -> str | None:
    """Why a party command cannot be applied as given (its argument); None when it can."""
    problem = _PROBLEMS.get(cmd.action)
    return problem(session, desk, ticket, cmd, sender, held) if problem else None


# -- the actions (Apply: session, desk, ticket, sender, cmd, held, now) -----------------------


def cc(session, desk, ticket, sender, cmd, held, now) -> None:
    address = address_in(cmd.argument)
    tickets.add_watchers(session, desk, ticket, [address], sender, now)
    notify.queue(session, desk, "watcher_added", [address], now, ticket=ticket, author=sender,
                 address=address, status_name=STATUS_NAMES.get(ticket.status))


def uncc(session, desk, ticket, sender, cmd, held, now) -> None:
    tickets.remove_party(session, ticket, address_in(cmd.argument), "watcher", sender, now)


def _after_target(cmd: Command) -> str:
    """What the engineer wrote after `转厂商 <vendor>`: the rest of that line and below."""
    lines = cmd.said.strip().splitlines()
    first = lines[0].split(None, 2) if lines else []
    rest = first[2] if len(first) > 2 else ""
    if len(first) == 1:  # "转厂商:service@…" written without a space
        rest = ""
    return "\n".join(p for p in (rest.strip(), "\n".join(lines[1:]).strip()) if p)


def speaking(desk: Desk, language: str) -> Desk:
    """The desk writing in `language` (a vendor's): the same desk with that renderer."""
    if language == desk.renderer.language:
        return desk
    view = copy.copy(desk)
    view.renderer = Renderer(desk.settings.templates_dir, language, desk.settings.desk.tz)
    return view


def vendor(session, desk, ticket, sender, cmd, held, now) -> None:
    chosen, address = _vendor_meant(desk, cmd, held) or (None, "")
    assert chosen is not None  # why_not checked it
    old = next((a for a, r in senders.parties(session, ticket).items() if "vendor" in r), None)
    if old is not None and old != address:
        tickets.remove_party(session, ticket, old, "vendor", sender, now)
    if old != address:
        tickets.add_party(session, ticket, address, "vendor", sender, now)
    text = _after_target(cmd)
    contract = chosen.response.total_seconds() if chosen.response else None
    tickets.record(
        session, ticket, "vendor", sender, now, f"{chosen.name} <{address}>", vendor=chosen.key,
        name=chosen.name, address=address, old=old, text=text[:4000], contract=contract,
    )
    notify.queue(
        session, speaking(desk, chosen.language), "vendor_handoff", [address], now,
        ticket=ticket, vendor=chosen, author=sender, text=text,
        category=desk.rules.label(ticket.category, chosen.language),
    )


_HANDOVERS = (
    select(Event.action, Event.at, Event.data)
    .where(Event.ticket_id == bindparam("ticket_id"),
           Event.action.in_(("vendor", "vendor_replied")))
    .order_by(Event.id.desc())
    .limit(1)
)


def note_vendor_reply(session: Session, ticket: Ticket, sender: str, now: datetime) -> bool:
    """Record the vendor's first mail after a hand-over, with its response time against the
    contract; whether this was it."""
    last = session.connection().execute(_HANDOVERS, {"ticket_id": ticket.id}).first()
    if last is None or last.action != "vendor" or (last.data or {}).get("address") != sender:
        return False
    seconds = (now - last.at).total_seconds()
    contract = (last.data or {}).get("contract")
    tickets.record(
        session, ticket, "vendor_replied", sender, now, f"after {seconds / 3600:.1f} h",
        vendor=(last.data or {}).get("vendor"), seconds=seconds, contract=contract,
        within=None if contract is None else seconds <= contract,
    )
    return True


# -- status by mail ------------------------------------------------------------------------


def last_public(session: Session, ticket: Ticket) -> Event | None:
    """The last thing the requester was told: a public event (staff comments only)."""
    rows = session.scalars(
        select(Event)
        .where(Event.ticket_id == ticket.id, Event.action.in_(PUBLIC_EVENTS))
        .order_by(Event.id.desc())
        .limit(50)
    )
    for event in rows:
        if event.action != "comment" or (event.data or {}).get("public"):
            return event
    return None


def answer_status(
    session: Session, desk: Desk, ticket: Ticket, address: str, now: datetime,
    in_reply_to: str | None = None,
) -> None:
    """Tell `address` alone how the ticket stands; recorded, no engineer told."""
    tickets.record(session, ticket, "status_asked", address, now, ticket.status)
    update = last_public(session, ticket)
    words = ""
    if update is not None and update.action in PUBLIC_WORDS:
        words = update.detail
    elif update is not None and update.action == "rejected":
        words = (update.data or {}).get("reason") or ""
    notify.queue(
        session, desk, "status", [address], now, ticket=ticket, in_reply_to=in_reply_to,
        status_name=STATUS_NAMES.get(ticket.status, (ticket.status, ticket.status)),
        tier_name=TIER_NAMES.get(ticket.tier or ""),
        update=update, update_name=PUBLIC_EVENTS.get(update.action) if update else None,
        update_text=words,
    )


def status(session, desk, ticket, sender, cmd, held, now) -> None:
    answer_status(session, desk, ticket, sender, now)


# -- fresh mail: 查询 INC-12, 我的工单 -------------------------------------------------------


def fresh_query(mail: ParsedMail) -> tuple[str, str] | None:
    """("status", ref) or ("mine", "") when a new mail only asks; None otherwise."""
    lines = commands.essential_lines(mail.new_text or "", mail.from_name)
    for text in (mail.subject or "", lines[0] if lines else ""):
        text = " ".join(text.split())
        if match := _STATUS_QUERY.fullmatch(text):
            return "status", re.sub(r"\s", "", match.group(1)).upper()
        if _MINE_QUERY.fullmatch(text):
            return "mine", ""
    return None


def answer_query(
    session: Session, desk: Desk, mail: ParsedMail, inbound: Inbound, query: tuple[str, str],
    now: datetime,
) -> tuple[str, Ticket | None]:
    """Answer a fresh query to its sender alone; (what was done, the ticket it was about)."""
    address = mail.from_addr.strip().lower()
    kind, ref = query
    if kind == "mine":
        found = tickets.open_tickets_of(session, address)
        notify.queue(session, desk, "my_tickets", [address], now, in_reply_to=mail.message_id,
                     found=found, names=STATUS_NAMES)
        return f"listed {len(found)} open ticket(s) for {address}", None
    ticket = tracking.by_ref(session, ref)
    if ticket is not None and senders.identify(session, desk, ticket, mail).on_ticket:
        inbound.ticket_id = ticket.id
        tracking.remember(session, ticket, mail.message_id)
        answer_status(session, desk, ticket, address, now, in_reply_to=mail.message_id)
        return f"status of {ticket.ref} for {address}", ticket
    if ticket is not None:  # kept for the staff, answered as strangers are: once, blandly
        refusals.stranger(session, desk, ticket, mail, inbound.id, now)
    else:  # the same answer as for a ticket of someone else's: nothing to tell them apart
        notify.queue(session, desk, "not_on_ticket", [address], now, in_reply_to=mail.message_id)
    return f"{address} asked about {ref}, which is none of theirs", None

