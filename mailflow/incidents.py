"""The incident process (seed §4.1) driven by mail: routing of new incidents and replies."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session

from mailflow import commands, lifecycle, notify
from mailflow.commands import Command
from mailflow.models import Inbound, Ticket
from mailflow.tickets import record

if TYPE_CHECKING:
    from mailflow.desk import Desk
    from mailflow.mail import ParsedMail


def on_new(
    session: Session, desk: Desk, ticket: Ticket, mail: ParsedMail, inbound: Inbound, now: datetime
) -> None:
    """Acknowledge the requester and dispatch: L1 normally, L2 plus alerts when major."""
    roles = desk.settings.roles
    notify.queue(
        session, desk, "ack", [ticket.requester], now, ticket=ticket, in_reply_to=mail.message_id
    )
    if ticket.major:
        alerted = [*roles.l2, *roles.post_lead, *roles.service_desk_lead, *roles.incident_manager]
        notify.queue(session, desk, "major_incident", alerted, now, ticket=ticket)
        record(session, ticket, "major_alert", "mailflow", now, ", ".join(dict.fromkeys(alerted)))
    else:
        similar = desk_similar(session, desk, ticket)
        notify.queue(
            session,
            desk,
            "new_incident",
            roles.tier_members(ticket.tier),
            now,
            ticket=ticket,
            similar=similar,
        )


def desk_similar(session: Session, desk: Desk, ticket: Ticket) -> list[Ticket]:
    """Resolved incidents like this one, with their solutions (know-how reuse)."""
    try:
        from mailflow.similar import similar_resolved
    except ImportError:
        return []
    return similar_resolved(session, ticket, limit=desk.settings.incident.similar_count)


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
    """Tell the sender the command was not applied, why, and what they may do."""
    record(session, ticket, "refused", sender, now, f"{cmd.action}: {why}")
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
        in_reply_to=in_reply_to,
    )


def on_reply(
    session: Session, desk: Desk, ticket: Ticket, mail: ParsedMail, inbound: Inbound, now: datetime
) -> None:
    """Apply the command in the new text of a reply, if the sender may give it."""
    sender = mail.from_addr
    cmd = commands.parse(mail.new_text)
    held = lifecycle.roles_on(ticket, sender, desk.settings.roles)
    if cmd.action == "comment" and ticket.status == "closed" and "requester" in held:
        cmd = Command("reopen", cmd.text, cmd.text)  # a reply to a closed incident reopens it
    why = lifecycle.check(ticket, cmd.action, held)
    if why is None and cmd.action in ("assign", "priority") and not cmd.argument:
        why = "缺少参数 / missing argument: " + (
            "assign <email>" if cmd.action == "assign" else "priority P1..P4"
        )
    if why is None and cmd.action == "escalate" and lifecycle.next_tier(ticket) is None:
        why = "已在最高处理层级，可转问题管理 / already at the top tier; use `problem`"
    if why is not None:
        refuse(session, desk, ticket, sender, cmd, why, held, now, mail.message_id)
        return
    APPLY[cmd.action](session, desk, ticket, sender, cmd, held, now)
    target = lifecycle.INCIDENT[cmd.action].to
    if target and ticket.status != target:
        record(
            session,
            ticket,
            "status",
            sender,
            now,
            f"{ticket.status} → {target}",
            old=ticket.status,
            new=target,
        )
        ticket.status = target


def _team(desk: Desk, ticket: Ticket) -> list[str]:
    members = list(desk.settings.roles.tier_members(ticket.tier))
    return [ticket.assignee] if ticket.assignee else members


def _comment(session, desk, ticket, sender, cmd, held, now) -> None:
    record(session, ticket, "comment", sender, now, cmd.text)
    if held & {"desk", "tier", "im"} and sender != ticket.requester:
        if ticket.responded_at is None:
            ticket.responded_at = now
        notify.queue(
            session,
            desk,
            "comment",
            [ticket.requester],
            now,
            ticket=ticket,
            author=sender,
            text=cmd.text,
        )
    else:
        if "requester" in held and ticket.status == "pending":
            record(
                session,
                ticket,
                "status",
                sender,
                now,
                "pending → open (requester answered)",
                old="pending",
                new="open",
            )
            ticket.status = "open"
        others = [p for p in _team(desk, ticket) if p != sender]
        notify.queue(
            session,
            desk,
            "comment_to_team",
            others,
            now,
            ticket=ticket,
            author=sender,
            text=cmd.text,
        )


def _note(session, desk, ticket, sender, cmd, held, now) -> None:
    record(session, ticket, "note", sender, now, cmd.argument or cmd.text)


def _resolve(session, desk, ticket, sender, cmd, held, now) -> None:
    ticket.solution = cmd.argument or cmd.text
    ticket.resolved_at = now
    ticket.responded_at = ticket.responded_at or now
    record(session, ticket, "resolved", sender, now, ticket.solution, tier=ticket.tier)
    notify.queue(session, desk, "resolved", [ticket.requester], now, ticket=ticket, author=sender)


def _escalate(session, desk, ticket, sender, cmd, held, now) -> None:
    old, new = ticket.tier, lifecycle.next_tier(ticket)
    ticket.tier, ticket.assignee = new, None
    record(session, ticket, "escalated", sender, now, f"{old} → {new}", old=old, new=new)
    notify.queue(
        session,
        desk,
        "escalated",
        desk.settings.roles.tier_members(new),
        now,
        ticket=ticket,
        author=sender,
        old_tier=old,
        text=cmd.text,
    )


def _assign(session, desk, ticket, sender, cmd, held, now) -> None:
    roles = desk.settings.roles
    ticket.assignee = cmd.argument
    for tier in ("L1", "L2", "L3", "IM"):
        if cmd.argument in roles.tier_members(tier):
            ticket.tier = tier
            break
    record(session, ticket, "assigned", sender, now, cmd.argument, tier=ticket.tier)
    notify.queue(session, desk, "assigned", [cmd.argument], now, ticket=ticket, author=sender)


def _priority(session, desk, ticket, sender, cmd, held, now) -> None:
    old = ticket.priority
    ticket.priority = cmd.argument
    ticket.due_at = desk.due(ticket.priority, ticket.created_at, "resolve")
    record(
        session,
        ticket,
        "priority",
        sender,
        now,
        f"{old} → {cmd.argument}",
        old=old,
        new=cmd.argument,
    )


def _pending(session, desk, ticket, sender, cmd, held, now) -> None:
    ticket.responded_at = ticket.responded_at or now
    record(session, ticket, "pending", sender, now, cmd.argument)
    notify.queue(
        session,
        desk,
        "question",
        [ticket.requester],
        now,
        ticket=ticket,
        author=sender,
        text=cmd.argument or cmd.text,
    )


def _confirm(session, desk, ticket, sender, cmd, held, now) -> None:
    ticket.closed_at = now
    record(session, ticket, "confirmed", sender, now, cmd.text)
    notify.queue(
        session, desk, "closed", [ticket.requester], now, ticket=ticket, reason="confirmed"
    )


def _reopen(session, desk, ticket, sender, cmd, held, now) -> None:
    resolutions = [e for e in ticket.events if e.action == "resolved"]
    if resolutions:  # back to the tier that resolved it
        ticket.tier = (resolutions[-1].data or {}).get("tier") or ticket.tier
    ticket.resolved_at = ticket.closed_at = None
    record(session, ticket, "reopened", sender, now, cmd.argument or cmd.text, tier=ticket.tier)
    notify.queue(
        session,
        desk,
        "reopened",
        _team(desk, ticket),
        now,
        ticket=ticket,
        author=sender,
        text=cmd.argument or cmd.text,
    )


def _problem(session, desk, ticket, sender, cmd, held, now) -> None:
    record(session, ticket, "problem", sender, now, cmd.argument or cmd.text)
    notify.queue(
        session,
        desk,
        "problem",
        desk.settings.roles.problem_manager,
        now,
        ticket=ticket,
        author=sender,
        text=cmd.argument or cmd.text,
        events=list(ticket.events),
    )


APPLY = {
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
}
