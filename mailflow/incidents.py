"""The incident process (seed §4.1) driven by mail: routing of new incidents and replies.

A new incident is acknowledged and dispatched: to the service desk (L1) with the most similar
resolved incidents, or — when major — straight to L2 with the service desk, the post lead, the
service desk lead and the incident manager alerted at once. A reply is read as a command through
`lifecycle.INCIDENT`; the SLA state lives here too: the resolution clock runs only while the
incident is `open` (the pauses are derived from the status events) and, with `[sla]
pause_for_vendor`, not waiting on a vendor's first reply; `due_at` moves by the paused time
whenever the status changes or a wait ends, and the first staff action is the response.
Watchers get the requester's public updates (`tickets.public`); the commands about the people
on a ticket, its category and its state are parties.py's.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import bindparam, select, update
from sqlalchemy.orm import Session

from mailflow import commands, lifecycle, notify, parties, refusals, sla
from mailflow.attachments import forwardable
from mailflow.commands import Command
from mailflow.models import Event, Inbound, Ticket
from mailflow.render import Phrase
from mailflow.similar import similar_resolved
from mailflow.tickets import SYSTEM, confirm_deadline, public, record

if TYPE_CHECKING:
    from mailflow.desk import Desk
    from mailflow.mail import ParsedMail
    from mailflow.senders import Sender


# A reply made only of these (after punctuation and spaces are removed) is a courtesy, not a
# report that the problem is back: "好的，谢谢！" to a closed incident does not reopen it.
_COURTESY = sorted(
    [
        "谢谢", "多谢", "感谢", "谢了", "好的", "好", "收到", "了解", "明白", "知道了", "辛苦了",
        "辛苦", "已确认", "确认", "确定", "没问题", "可以了", "您", "你", "们", "啦", "了", "的",
        "thanks", "thank you", "thankyou", "thx", "ok", "okay", "got it", "great", "fine",
        "confirmed", "confirm", "received", "much", "very", "a lot", "cheers",
    ],
    key=len,
    reverse=True,
)
_NOT_WORDS = re.compile(r"[\W_]+", re.UNICODE)
USAGE = {  # how a command with an argument is written, by language
    "zh-CN": {"assign": "指派 <邮箱>", "priority": "优先级 P1"},
    "en": {"assign": "assign <email>", "priority": "priority P1..P4"},
}
# Why an incident command is refused, by language ({argument}, {usage} filled in).
REFUSALS: dict[str, dict[str, str]] = {
    "missing_argument": {"zh-CN": "缺少参数：{usage}", "en": "missing argument: {usage}"},
    "top_tier": {
        "zh-CN": "已在最高处理层级，可转问题管理（转问题）",
        "en": "already at the top tier; use `problem`",
    },
    "not_an_address": {
        "zh-CN": "“{argument}” 不是邮箱地址：{usage}",
        "en": "“{argument}” is not an email address: {usage}",
    },
    "outside_support": {
        "zh-CN": "指派给技术支持人员以外的人须由事件经理执行",
        "en": "only the incident manager may assign an incident to someone outside IT support",
    },
}


def _refusal(code: str, action: str = "", argument: str = "") -> Phrase:
    return Phrase({
        lang: text.format(argument=argument, usage=USAGE[lang].get(action, ""))
        for lang, text in REFUSALS[code].items()
    })


# Actions that are no response to the incident (the first staff action is): asking its state.
NOT_A_RESPONSE = frozenset({"status"})


# -- new incidents -----------------------------------------------------------------------


def on_new(
    session: Session, desk: Desk, ticket: Ticket, mail: ParsedMail, inbound: Inbound, now: datetime
) -> None:
    """Acknowledge the requester and dispatch: L1 normally, L2 plus alerts when major."""
    roles = desk.settings.roles
    notify.queue(
        session, desk, "ack", [ticket.requester], now, ticket=ticket, in_reply_to=mail.message_id
    )
    if ticket.major:
        alerted = [
            *roles.service_desk,  # every new incident reaches the desk, the users' contact
            *roles.l2, *roles.post_lead, *roles.service_desk_lead, *roles.incident_manager,
        ]
        notify.queue(
            session, desk, "major_incident", alerted, now, ticket=ticket,
            in_reply_to=mail.message_id, **_forwarded(session, desk, ticket, inbound),
        )
        record(session, ticket, "major_alert", SYSTEM, now, ", ".join(dict.fromkeys(alerted)))
        return
    similar = desk_similar(session, desk, ticket)
    if similar:
        refs = [s.ref for s in similar]
        record(session, ticket, "similar", SYSTEM, now, ", ".join(refs), refs=refs)
    # The desk owns every incident; a rule may also dispatch it straight to another tier.
    team = [*roles.service_desk, *roles.tier_members(ticket.tier)]
    notify.queue(
        session, desk, "new_incident", team, now, ticket=ticket, similar=similar,
        in_reply_to=mail.message_id, **_forwarded(session, desk, ticket, inbound),
    )


def _forwarded(session: Session, desk: Desk, ticket: Ticket, inbound: Inbound) -> dict[str, Any]:
    """The requester's files for the owning tier's notice, up to `forward_attachment_bytes`
    in all; the rest are named in it (`not_attached`) with their sizes."""
    files, rest = forwardable(
        session, ticket.id, inbound.id, desk.settings.limits.forward_attachment_bytes
    )
    return {"attachments": files, "not_attached": rest}


def desk_similar(session: Session, desk: Desk, ticket: Ticket) -> list[Ticket]:
    """Resolved incidents like this one, with their solutions (know-how reuse)."""
    return similar_resolved(session, ticket, limit=desk.settings.incident.similar_count)


# -- SLA state ---------------------------------------------------------------------------


def pauses(session: Session, ticket: Ticket) -> list[sla.Pause]:
    """Periods the resolution clock stood still: every stretch not in status `open`.

    Derived from the status events (the audit trail is the source); the last one is open
    (end None) while the incident is not open now.
    """
    return pauses_of(status_history(session, [ticket.id]).get(ticket.id, []))


def status_history(
    session: Session, ticket_ids: list[int]
) -> dict[int, list[tuple[datetime, dict[str, Any] | None]]]:
    """(at, data) of the status events of many tickets, in order, in few queries."""
    history: dict[int, list[tuple[datetime, dict[str, Any] | None]]] = {}
    for i in range(0, len(ticket_ids), 500):
        rows = session.execute(
            select(Event.ticket_id, Event.at, Event.data)
            .where(Event.ticket_id.in_(ticket_ids[i : i + 500]), Event.action == "status")
            .order_by(Event.id)
        )
        for ticket_id, at, data in rows:
            history.setdefault(ticket_id, []).append((at, data))
    return history


def pauses_of(history: list[tuple[datetime, dict[str, Any] | None]]) -> list[sla.Pause]:
    """The pauses in one ticket's status history (see `pauses`)."""
    found: list[sla.Pause] = []
    start: datetime | None = None
    for at, data in history:
        new = (data or {}).get("new")
        if new != "open" and start is None:
            start = at
        elif new == "open" and start is not None:
            found.append((start, at))
            start = None
    if start is not None:
        found.append((start, None))
    return found


_WAITS = ("vendor", "vendor_replied", "status")


def vendor_waits(session: Session, ticket_ids: list[int]) -> dict[int, list[sla.Pause]]:
    """Time spent waiting on a vendor: from each hand-over (`vendor`) to the vendor's reply
    or the next status change, whichever comes first; the last one open (end None)."""
    events: dict[int, list[tuple[datetime, str]]] = {}
    for i in range(0, len(ticket_ids), 500):
        rows = session.execute(
            select(Event.ticket_id, Event.at, Event.action)
            .where(Event.ticket_id.in_(ticket_ids[i : i + 500]), Event.action.in_(_WAITS))
            .order_by(Event.id)
        )
        for ticket_id, at, action in rows:
            events.setdefault(ticket_id, []).append((at, action))
    waits: dict[int, list[sla.Pause]] = {}
    for ticket_id, history in events.items():
        start: datetime | None = None
        for at, action in history:
            if action == "vendor" and start is None:
                start = at
            elif action != "vendor" and start is not None:
                waits.setdefault(ticket_id, []).append((start, at))
                start = None
        if start is not None:
            waits.setdefault(ticket_id, []).append((start, None))
    return waits


def clock_pauses(session: Session, desk: Desk, ticket: Ticket) -> list[sla.Pause]:
    """Every pause of the resolution clock: not `open`, and with `[sla] pause_for_vendor`
    the waits on a vendor too."""
    found = pauses(session, ticket)
    if desk.settings.sla.pause_for_vendor:
        found += vendor_waits(session, [ticket.id]).get(ticket.id, [])
    return found


def refresh_due(session: Session, desk: Desk, ticket: Ticket, now: datetime) -> None:
    """Set `due_at`: the resolution deadline moved by all time paused so far (up to now)."""
    closed = [(a, b or now) for a, b in clock_pauses(session, desk, ticket)]
    target = desk.target(ticket.priority).resolve
    ticket.due_at = sla.due_at(desk.calendar(ticket.priority), ticket.created_at, target, closed)


def set_status(
    session: Session, desk: Desk, ticket: Ticket, new: str, actor: str, now: datetime, why: str = ""
) -> None:
    """Change the status: one event, and the deadline moves by any pause that just ended."""
    old = ticket.status
    if old == new:
        return
    detail = f"{old} → {new}" + (f" ({why})" if why else "")
    record(session, ticket, "status", actor, now, detail, old=old, new=new)
    ticket.status = new
    refresh_due(session, desk, ticket, now)


def mark_responded(session: Session, ticket: Ticket, actor: str, now: datetime) -> None:
    """The first staff action is the response; a late one also records the response breach."""
    if ticket.responded_at is not None:
        return
    ticket.responded_at = now
    late = ticket.response_due_at is not None and now > ticket.response_due_at
    record(session, ticket, "responded", actor, now, "first response", late=late)
    if late:
        record_response_breach(session, ticket, now)


def record_response_breach(session: Session, ticket: Ticket, now: datetime) -> bool:
    """Record the response breach once (a conditional update: also once across daemons)."""
    claimed = session.execute(
        update(Ticket)
        .where(Ticket.id == ticket.id, Ticket.response_breached_at.is_(None))
        .values(response_breached_at=now)
        .execution_options(synchronize_session="fetch")
    )
    if claimed.rowcount != 1:  # type: ignore[attr-defined]
        return False
    due = ticket.response_due_at
    record(
        session,
        ticket,
        "response_breached",
        SYSTEM,
        now,
        f"response target {ticket.priority} passed without a response",
        due=due.isoformat() if due else None,
    )
    return True


# -- replies -----------------------------------------------------------------------------


def on_reply(
    session: Session, desk: Desk, ticket: Ticket, mail: ParsedMail, inbound: Inbound,
    now: datetime, who: Sender,
) -> None:
    """Apply the command in the new text of a reply, if the sender may give it and is proven
    (senders.py); an unproven requester's words still reach the team as a comment."""
    sender, held = who.address, who.roles
    cmd = interpret(ticket, commands.parse(mail.new_text, mail.from_name), held)
    if cmd is None:  # a thank-you to a closed incident: kept on record, nothing to do
        record(session, ticket, "comment", sender, now, mail.new_text)
        return
    if not who.proven and not who.may_unproven(cmd.action):
        refusals.unproven(session, desk, ticket, who, cmd, now)
        if not lifecycle.is_staff(held) and cmd.text.strip():
            record(session, ticket, "comment", sender, now, cmd.text)
            tell_team(session, desk, ticket, sender, cmd.text, now)
        return
    if "vendor" in held and parties.note_vendor_reply(session, ticket, sender, now):
        refresh_due(session, desk, ticket, now)  # a wait on the vendor may have ended
    why = why_not(desk, ticket, cmd, held) or parties.why_not(
        session, desk, ticket, cmd, sender, held
    )
    if why is not None:
        refuse(session, desk, ticket, sender, cmd, why, held, now, mail.message_id)
        return
    APPLY[cmd.action](session, desk, ticket, sender, cmd, held, now)
    responds = cmd.action not in NOT_A_RESPONSE
    if responds and lifecycle.is_staff(held) and sender != ticket.requester:
        mark_responded(session, ticket, sender, now)
    target = lifecycle.INCIDENT[cmd.action].to
    if target:
        set_status(session, desk, ticket, target, sender, now)


def courtesy(text: str) -> bool:
    """Whether a reply says nothing but thanks/OK (or nothing at all)."""
    rest = _NOT_WORDS.sub("", unicodedata.normalize("NFKC", text).casefold())
    for word in _COURTESY:
        rest = rest.replace(_NOT_WORDS.sub("", word), "")
    return not rest


def acknowledges(cmd: Command) -> bool:
    """Whether a user's reply only confirms, says thanks or asks the state: nothing to act on
    (and no new incident when it answers one closed long ago)."""
    return cmd.action in ("confirm", "resolve", "status") or (
        cmd.action == "comment" and courtesy(cmd.said)
    )


def interpret(ticket: Ticket, cmd: Command, held: frozenset[str]) -> Command | None:
    """What a reply means in context; None when it needs no action.

    A user's `note:` or request word (`同意` …) is an ordinary comment, and so is whatever
    the requester answers to a question (`待用户`): "同意，下午可以" is an answer. The
    requester's `已解决` on a resolved incident confirms it; anything else but thanks says
    it is not solved and reopens it. A requester's reply to a closed incident reopens it too
    (pipeline.py sends replies after the grace period to a new incident instead), unless it
    only says thanks or confirms.
    """
    staff = lifecycle.is_staff(held)
    if not staff and (cmd.action == "note" or cmd.action not in lifecycle.INCIDENT):
        cmd = replace(cmd, action="comment", argument="")
    if staff or "requester" not in held:
        return cmd
    if ticket.status == "pending" and lifecycle.check(ticket, cmd.action, held) is not None:
        return replace(cmd, action="comment", argument="")
    if ticket.status == "resolved" and cmd.action == "resolve":
        return replace(cmd, action="confirm", argument="")
    if ticket.status == "resolved" and cmd.action == "comment" and not courtesy(cmd.said):
        return replace(cmd, action="reopen", argument=cmd.said)
    if ticket.status == "closed" and cmd.action in ("comment", "confirm", "resolve"):
        return None if acknowledges(cmd) else replace(cmd, action="reopen", argument=cmd.said)
    return cmd


def why_not(desk: Desk, ticket: Ticket, cmd: Command, held: frozenset[str]) -> str | None:
    """Why the command cannot be applied now; None when it can."""
    why = lifecycle.check(ticket, cmd.action, held)
    if why is None and cmd.action in ("assign", "priority") and not cmd.argument:
        why = _refusal("missing_argument", cmd.action)
    if why is None and cmd.action == "assign":
        why = _assignee_problem(desk, cmd.argument, held)
    if why is None and cmd.action == "escalate" and lifecycle.next_tier(ticket) is None:
        why = _refusal("top_tier")
    return why


_EMAIL = re.compile(r"[^@\s<>\"]{1,64}@[^@\s<>\"]{1,253}")


def _assignee_problem(desk: Desk, assignee: str, held: frozenset[str]) -> str | None:
    """Why `assignee` cannot be given the incident: not an address, or outside IT support
    and the sender is not the incident manager (the assignee gets the whole description)."""
    if not _EMAIL.fullmatch(assignee):
        return _refusal("not_an_address", "assign", assignee)
    if desk.settings.roles.of(assignee) & lifecycle.STAFF_ROLES or "im" in held:
        return None
    return _refusal("outside_support")


def refuse(
    session: Session,
    desk: Desk,
    ticket: Ticket,
    sender: str,
    cmd: Command,
    why: str,
    held: frozenset[str],
    now: datetime,
    in_reply_to: str,
) -> None:
    """Tell the sender the command was not applied, why, and what they may do.

    A user's text is not lost: it goes to the team as a comment (a staff member's refused
    command is never forwarded — it may read like a resolution).
    """
    forwarded = not lifecycle.is_staff(held) and bool(cmd.text.strip())
    record(session, ticket, "refused", sender, now, f"{cmd.action}: {why}", text=cmd.text)
    if forwarded:
        record(session, ticket, "comment", sender, now, cmd.text)
        tell_team(session, desk, ticket, sender, cmd.text, now)
    notify.queue(
        session,
        desk,
        "refused",
        [sender],
        now,
        ticket=ticket,
        command=cmd,
        reason=why,
        allowed=lifecycle.allowed(ticket, held),
        forwarded=forwarded,
        in_reply_to=in_reply_to,
    )


def team(desk: Desk, ticket: Ticket) -> list[str]:
    """Who works the incident now: its assignee, else every member of its tier."""
    return [ticket.assignee] if ticket.assignee else list(
        desk.settings.roles.tier_members(ticket.tier)
    )


def tell_team(
    session: Session,
    desk: Desk,
    ticket: Ticket,
    sender: str,
    text: str,
    now: datetime,
    internal: bool = False,
) -> None:
    others = [p for p in team(desk, ticket) if p != sender]
    notify.queue(
        session,
        desk,
        "comment_to_team",
        others,
        now,
        ticket=ticket,
        author=sender,
        text=text,
        internal=internal,
    )


# -- the actions -------------------------------------------------------------------------

Apply = Callable[..., None]  # (session, desk, ticket, sender, cmd, held, now)


def _comment(session, desk, ticket, sender, cmd, held, now) -> None:
    text = cmd.text.strip()
    if lifecycle.is_staff(held) and sender != ticket.requester:
        record(session, ticket, "comment", sender, now, text, public=bool(text))
        if text:  # forwarded from the desk address: the desk stays the single contact
            notify.queue(
                session, desk, "comment", public(session, ticket), now, ticket=ticket, text=text
            )
        return
    record(session, ticket, "comment", sender, now, text)
    if "requester" in held and ticket.status == "pending":
        set_status(session, desk, ticket, "open", sender, now, "requester answered")
    if text:
        tell_team(session, desk, ticket, sender, text, now)


def _note(session, desk, ticket, sender, cmd, held, now) -> None:
    text = cmd.argument or cmd.text
    record(session, ticket, "note", sender, now, text)
    tell_team(session, desk, ticket, sender, text, now, internal=True)


def _resolve(session, desk, ticket, sender, cmd, held, now) -> None:
    ticket.solution = cmd.argument.strip() or None
    ticket.resolved_at = now
    record(
        session,
        ticket,
        "resolved",
        sender,
        now,
        ticket.solution or "",
        tier=ticket.tier,
        assignee=ticket.assignee,
    )
    notify.queue(
        session,
        desk,
        "resolved",
        public(session, ticket),
        now,
        ticket=ticket,
        confirm_by=confirm_deadline(desk, now),
    )


def escalate(
    session: Session,
    desk: Desk,
    ticket: Ticket,
    actor: str,
    now: datetime,
    text: str = "",
    automatic: bool = False,
) -> str | None:
    """Hand the incident to the next tier of its path; the new tier's members are told."""
    old, new = ticket.tier, lifecycle.next_tier(ticket)
    if new is None:
        return None
    ticket.tier, ticket.assignee = new, None
    path = "desktop" if ticket.desktop else "other"
    detail = f"{old} → {new}" + (f": {text}" if text else "")
    record(session, ticket, "escalated", actor, now, detail, old=old, new=new, path=path)
    notify.queue(
        session,
        desk,
        "escalated",
        desk.settings.roles.tier_members(new),
        now,
        ticket=ticket,
        author=actor,
        old_tier=old,
        text=text,
        automatic=automatic,
    )
    return new


def _escalate(session, desk, ticket, sender, cmd, held, now) -> None:
    escalate(session, desk, ticket, sender, now, cmd.argument)


def _assign(session, desk, ticket, sender, cmd, held, now) -> None:
    roles = desk.settings.roles
    old = ticket.assignee
    ticket.assignee = cmd.argument
    for tier in lifecycle.DESKTOP_PATH:
        if cmd.argument in roles.tier_members(tier):
            ticket.tier = tier
            break
    record(session, ticket, "assigned", sender, now, cmd.argument, old=old, tier=ticket.tier)
    notify.queue(session, desk, "assigned", [cmd.argument], now, ticket=ticket, author=sender)


def _priority(session, desk, ticket, sender, cmd, held, now) -> None:
    old = ticket.priority
    replan(session, desk, ticket, cmd.argument, now)
    record(
        session, ticket, "priority", sender, now, f"{old} → {cmd.argument}", old=old,
        new=cmd.argument,
    )


def replan(session: Session, desk: Desk, ticket: Ticket, priority: str, now: datetime) -> None:
    """Give the incident a priority and re-plan its SLA from the new target."""
    ticket.priority = priority
    refresh_due(session, desk, ticket, now)
    # The new target re-plans the incident: a warning or breach the new target has not
    # reached yet is to come (once), as if the incident had had this priority all along.
    target = desk.target(ticket.priority).resolve
    cal = desk.calendar(ticket.priority)
    used = sla.fraction_used(cal, ticket.created_at, now, target,
                             clock_pauses(session, desk, ticket))
    if used < desk.settings.sla.warn_at:
        ticket.sla_warned_at = None
    if used < 1.0:
        ticket.sla_breached_at = None
    if ticket.responded_at is None:
        ticket.response_due_at = desk.due(ticket.priority, ticket.created_at, "response")


def _vendor(session, desk, ticket, sender, cmd, held, now) -> None:
    parties.vendor(session, desk, ticket, sender, cmd, held, now)
    refresh_due(session, desk, ticket, now)  # a wait on the vendor begins


_SET_BY_HAND = select(Event.id).where(  # a `priority` command (the rule's own is SYSTEM's)
    Event.ticket_id == bindparam("ticket_id"), Event.action == "priority", Event.actor != SYSTEM
).limit(1)


def _category(session, desk, ticket, sender, cmd, held, now) -> None:
    """Correct the category; the priority follows the new category's rule unless someone set
    it by hand (`priority`), and the SLA is re-planned from it."""
    rule = parties.category_rule(desk, ticket, cmd.argument)
    assert rule is not None  # why_not checked it
    parties.set_category(session, desk, ticket, rule, sender, now)
    by_hand = session.connection().scalar(_SET_BY_HAND, {"ticket_id": ticket.id}) is not None
    old = ticket.priority
    if not by_hand and rule.result.priority != old:
        replan(session, desk, ticket, rule.result.priority, now)
        record(
            session, ticket, "priority", SYSTEM, now,
            f"{old} → {ticket.priority} (category {ticket.category})", old=old,
            new=ticket.priority, category=ticket.category,
        )


def _pending(session, desk, ticket, sender, cmd, held, now) -> None:
    question = cmd.argument or cmd.text
    record(session, ticket, "pending", sender, now, question)
    notify.queue(
        session, desk, "question", public(session, ticket), now, ticket=ticket, text=question
    )


def _confirm(session, desk, ticket, sender, cmd, held, now) -> None:
    ticket.closed_at = now
    record(session, ticket, "confirmed", sender, now, cmd.text)
    notify.queue(
        session, desk, "closed", public(session, ticket), now, ticket=ticket, reason="confirmed"
    )


def last_resolution(session: Session, ticket: Ticket) -> Event | None:
    return session.scalar(
        select(Event)
        .where(Event.ticket_id == ticket.id, Event.action == "resolved")
        .order_by(Event.id.desc())
        .limit(1)
    )


def _reopen(session, desk, ticket, sender, cmd, held, now) -> None:
    resolution = last_resolution(session, ticket)
    if resolution is not None:  # back to the tier (and engineer) that resolved it
        data = resolution.data or {}
        ticket.tier = data.get("tier") or ticket.tier
        ticket.assignee = data.get("assignee")
    ticket.resolved_at = ticket.closed_at = ticket.solution = None
    text = cmd.argument or cmd.text
    record(session, ticket, "reopened", sender, now, text, tier=ticket.tier)
    notify.queue(
        session, desk, "reopened", team(desk, ticket), now, ticket=ticket, author=sender, text=text
    )
    told = [p for p in public(session, ticket) if p != sender]  # the public side, not its words
    notify.queue(session, desk, "reopened_notice", told, now, ticket=ticket)


def history(session: Session, ticket: Ticket) -> list[Event]:
    """Every event so far, including those of the current transaction."""
    return list(
        session.scalars(select(Event).where(Event.ticket_id == ticket.id).order_by(Event.id))
    )


def _problem(session, desk, ticket, sender, cmd, held, now) -> None:
    text = cmd.argument or cmd.text
    record(session, ticket, "problem", sender, now, text)
    notify.queue(
        session,
        desk,
        "problem",
        desk.settings.roles.problem_manager,
        now,
        ticket=ticket,
        author=sender,
        text=text,
        events=history(session, ticket),
    )


APPLY: dict[str, Apply] = {
    "comment": _comment,
    "note": _note,
    "resolve": _resolve,
    "escalate": _escalate,
    "assign": _assign,
    "priority": _priority,
    "pending": _pending,
    "confirm": _confirm,
    "reopen": _reopen,
    "problem": _problem,
    "cc": parties.cc,
    "uncc": parties.uncc,
    "vendor": _vendor,
    "category": _category,
    "status": parties.status,
}
