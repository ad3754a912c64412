"""The request process (seed §4.2) by mail: form → approval chain → execution → closed.

    new mail ──form complete?──no──▶ pending (one reply listing what is missing)
        │ yes                           │ the requester answers with the fields
        ▼                               ▼
    pending_approval: each approver of the current step gets an approval mail with a
        personal single-use token (approvals.py); one approval per step moves to the next
        step, a rejection (with a reason) ends the request as `rejected`
        ▼ last step approved
    approved: the executors for the type are mailed; `完成`/`done` → fulfilled
        ▼ the requester confirms (or the confirmation time runs out)
    closed
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from mailflow import (
    approvals,
    commands,
    forms,
    jobs,
    lifecycle,
    notify,
    parties,
    refusals,
    tracking,
)
from mailflow.commands import Command
from mailflow.models import Approval, Inbound, Outbox, Ticket
from mailflow.tickets import SYSTEM, close_unconfirmed, public, record

if TYPE_CHECKING:
    from mailflow.desk import Desk
    from mailflow.mail import ParsedMail
    from mailflow.senders import Sender


# -- the form ------------------------------------------------------------------------------


def known_types(desk: Desk) -> set[str]:
    """Request types the configuration names (routing keys)."""
    s = desk.settings
    return {
        *s.roles.approvers,
        *s.roles.executors,
        *s.requests.approval_chain,
        *s.requests.required_fields,
    }


def required(desk: Desk, ticket: Ticket) -> tuple[str, ...]:
    fields = desk.settings.requests.required_fields
    return tuple(fields.get(ticket.request_type or "") or fields.get("default") or ())


def take_form(
    session: Session, desk: Desk, ticket: Ticket, text: str, actor: str, now: datetime,
    *, reply: bool = False, quoted: str = "",
) -> list[str]:
    """Read form fields from `text` into the ticket; returns the fields now given.

    With no `reason` field, the mail's own words are the reason: those of the request
    mail, or of a reply that gives no field at all (a reply filling in fields may carry
    a greeting, which is no reason). Fields only in `quoted` (a forwarded request) count.
    """
    form = forms.parse(text, quoted)
    stored = dict(ticket.form or {})
    merged = forms.merge(stored, form)
    prose_counts = not reply or not form.fields
    if not str(merged.get("reason") or "").strip() and form.prose and prose_counts:
        merged["reason"] = form.prose[:4000]
    named = form.fields.get("request_type")
    chosen = forms.request_type_of(named, known_types(desk)) if named else None
    if chosen and chosen != ticket.request_type:
        record(
            session, ticket, "request_type", actor, now,
            f"{ticket.request_type} → {chosen} (form: {named})",
            old=ticket.request_type, new=chosen,
        )
        ticket.request_type = chosen
    if not merged.get("request_type") and ticket.request_type:
        merged["request_type"] = ticket.request_type  # the rule's type, when the form has none
    for ref in merged["links"]:
        if ref not in (stored.get("links") or []):
            _link(session, ticket, ref, actor, now)
    given = [name for name in forms.FIELDS if name in form.fields]
    ticket.form = merged  # a new dict, so the JSON column is written
    return given


def _link(session: Session, ticket: Ticket, ref: str, actor: str, now: datetime) -> None:
    """Record a related incident/request/change; our own refs are checked to exist."""
    known = None
    if tracking.parse_ref(ref) is not None:
        known = tracking.by_ref(session, ref) is not None
    note = {True: "", False: " (no such ticket)", None: " (external)"}[known]
    record(session, ticket, "linked", actor, now, ref + note, ref=ref, exists=known)


# -- new requests and replies -------------------------------------------------------------


def on_new(
    session: Session, desk: Desk, ticket: Ticket, mail: ParsedMail, inbound: Inbound, now: datetime
) -> None:
    """Read the form; ask once for what is missing, else send it for approval."""
    take_form(
        session, desk, ticket, mail.new_text or mail.text, mail.from_addr, now, quoted=mail.text
    )
    missing = forms.missing(ticket.form or {}, required(desk, ticket))
    if missing:
        _set_status(session, ticket, "pending", "mailflow", now, "form incomplete")
        _ask_for(session, desk, ticket, missing, now, mail.message_id)
        return
    _submit(session, desk, ticket, now, mail.message_id)


def on_reply(
    session: Session, desk: Desk, ticket: Ticket, mail: ParsedMail, inbound: Inbound,
    now: datetime, who: Sender,
) -> None:
    """A decision, the missing fields, or a command through the REQUEST table.

    Decisions are proven by their approval token (`decide`); everything else but the
    requester's own words needs a proven sender (senders.py).
    """
    sender, held = who.address, who.roles
    cmd = commands.parse(mail.new_text, mail.from_name)
    if _answers_the_form(ticket, cmd, held, mail):
        if "requester" not in held and not who.proven:  # the desk filling fields in
            refusals.unproven(session, desk, ticket, who, cmd, now)
            return
        _answer(session, desk, ticket, mail, now)
        return
    if cmd.action in ("approve", "reject"):
        decide(session, desk, ticket, mail, cmd, now)
        return
    if not who.on_ticket:  # came with an approval token that is not theirs
        refusals.stranger(session, desk, ticket, mail, inbound.id, now)
        return
    if not who.proven and not who.may_unproven(cmd.action):
        refusals.unproven(session, desk, ticket, who, cmd, now)
        return
    why = lifecycle.check(ticket, cmd.action, held) or parties.why_not(
        session, desk, ticket, cmd, sender, held
    )
    if why is not None:
        _refuse_command(session, desk, ticket, sender, cmd, why, held, now, mail.message_id)
        return
    APPLY[cmd.action](session, desk, ticket, sender, cmd, held, now)
    target = lifecycle.REQUEST[cmd.action].to
    if target:
        _set_status(session, ticket, target, sender, now)


def _answers_the_form(
    ticket: Ticket, cmd: Command, held: frozenset[str], mail: ParsedMail
) -> bool:
    """While fields are missing, what the requester writes is the answer ("同意，补充如下："
    is no approval: nothing awaits one yet), and the service desk, which makes out the
    form (seed §4.2 step 2), may fill fields in for them."""
    if ticket.status != "pending":
        return False
    if cmd.action != "comment" and lifecycle.check(ticket, cmd.action, held) is None:
        return False  # a command that applies now (e.g. the desk's internal note)
    return "requester" in held or ("desk" in held and bool(forms.parse(mail.new_text).fields))


def _answer(
    session: Session, desk: Desk, ticket: Ticket, mail: ParsedMail, now: datetime
) -> None:
    """The requester answered the missing-fields mail: re-check, then on to approval."""
    given = take_form(session, desk, ticket, mail.new_text, mail.from_addr, now, reply=True)
    record(session, ticket, "form", mail.from_addr, now, ", ".join(given) or mail.new_text[:500])
    missing = forms.missing(ticket.form or {}, required(desk, ticket))
    if missing:
        _ask_for(session, desk, ticket, missing, now, mail.message_id)
        return
    _set_status(session, ticket, "pending_approval", mail.from_addr, now, "form complete")
    _submit(session, desk, ticket, now, mail.message_id)


def _ask_for(
    session: Session, desk: Desk, ticket: Ticket, missing: list[str], now: datetime,
    in_reply_to: str,
) -> None:
    record(session, ticket, "form_incomplete", "mailflow", now, ", ".join(missing),
           missing=missing)
    notify.queue(
        session, desk, "request_missing_fields", [ticket.requester], now, ticket=ticket,
        in_reply_to=in_reply_to, missing=missing, labels=forms.LABELS, fill_in=forms.FILL_IN,
        fill_in_en=forms.FILL_IN_EN,
        form=ticket.form or {},
    )


def _submit(
    session: Session, desk: Desk, ticket: Ticket, now: datetime, in_reply_to: str
) -> None:
    """Tell the requester the request is registered and start the approval chain."""
    steps = lifecycle.chain(desk.settings, ticket.request_type)
    notify.queue(
        session, desk, "request_submitted", [ticket.requester], now, ticket=ticket,
        in_reply_to=in_reply_to, form=ticket.form or {}, labels=forms.LABELS, steps=steps,
    )
    _request_step(session, desk, ticket, steps, 0, now)


# -- approvals ------------------------------------------------------------------------------


def _request_step(
    session: Session, desk: Desk, ticket: Ticket, steps: list[lifecycle.Step], index: int,
    now: datetime,
) -> None:
    """Issue a token to every approver of step `index` and mail each their approval mail.

    The requester does not approve their own request when the step has anyone else.
    """
    step = steps[index]
    people = [a for a in step.approvers if a != ticket.requester] or list(step.approvers)
    if not people:
        record(session, ticket, "approval_unroutable", "mailflow", now,
               f"no approvers for step {index + 1} ({step.group})", step=index)
        notify.queue(session, desk, "request_no_approver", desk.settings.roles.service_desk,
                     now, ticket=ticket, group=step.group, step=index + 1)
        return
    for approver in people:
        _send_approval(session, desk, ticket, steps, index, approver, now)
    record(session, ticket, "approval_requested", "mailflow", now,
           f"step {index + 1}/{len(steps)} {step.group}: {', '.join(people)}",
           step=index, group=step.group, approvers=people)


def _send_approval(
    session: Session, desk: Desk, ticket: Ticket, steps: list[lifecycle.Step], index: int,
    approver: str, now: datetime,
) -> Approval:
    issued = approvals.issue(session, desk, ticket, index, steps[index].group, approver, now)
    notify.queue(
        session, desk, "approval_request", [approver], now, ticket=ticket,
        reply_to=approvals.reply_address(desk.address, issued.token),
        message_id=issued.approval.message_id,
        form=ticket.form or {}, labels=forms.LABELS, step=index + 1, steps=len(steps),
        group=steps[index].group, expires_at=issued.approval.expires_at,
        decided=_decided(session, ticket),
    )
    return issued.approval


def _decided(session: Session, ticket: Ticket) -> list[Approval]:
    return [r for r in approvals.rows_of(session, ticket) if r.decision in ("approve", "reject")]


def decide(
    session: Session, desk: Desk, ticket: Ticket, mail: ParsedMail, cmd: Command, now: datetime
) -> None:
    """Apply an approve/reject only when `approvals.verify` accepts the mail; else refuse."""
    verdict = approvals.verify(session, desk, ticket, mail, now)
    if verdict.ok and cmd.action == "reject" and not cmd.argument.strip():
        verdict = approvals.Verdict(
            False, "reason_required", approvals.reason("reason_required"), verdict.approval
        )
    row = verdict.approval
    if verdict.ok and row is not None and _claim(session, row, cmd, now):
        _decided_now(session, desk, ticket, mail, cmd, row, verdict.auth, now)
        return
    if verdict.ok:  # another process decided this token a moment ago
        verdict = approvals.Verdict(False, "used", approvals.reason("used"), row)
    refuse_decision(session, desk, ticket, mail, cmd, verdict, now)


def _claim(session: Session, row: Approval, cmd: Command, now: datetime) -> bool:
    """Mark the token used, once: a conditional update, so two deciders cannot both win."""
    done = session.execute(
        update(Approval)
        .where(Approval.id == row.id, Approval.decision.is_(None))
        .values(decision=cmd.action, used_at=now, reason=cmd.argument.strip() or None)
        .execution_options(synchronize_session=False)
    )
    session.refresh(row)
    return done.rowcount == 1  # type: ignore[attr-defined]


def _decided_now(
    session: Session, desk: Desk, ticket: Ticket, mail: ParsedMail, cmd: Command, row: Approval,
    auth: str, now: datetime,
) -> None:
    approver = row.approver
    steps = lifecycle.chain(desk.settings, ticket.request_type)
    action = "approved" if cmd.action == "approve" else "rejected"
    record(
        session, ticket, action, approver, now,
        f"step {row.step + 1}/{len(steps)} {row.group}" + (f": {row.reason}" if row.reason else ""),
        step=row.step, group=row.group, approval=row.id, message_id=mail.message_id,
        reason=row.reason, auth=auth or None,
    )
    notify.queue(session, desk, "approval_decision", [approver], now, ticket=ticket,
                 decision=cmd.action, reason=row.reason, step=row.step + 1, steps=len(steps),
                 in_reply_to=mail.message_id)
    if cmd.action == "reject":
        approvals.void(approvals.open_rows(session, ticket), now, f"rejected by {approver}")
        ticket.closed_at = now
        _set_status(session, ticket, "rejected", approver, now)
        notify.queue(session, desk, "request_rejected", public(session, ticket), now, ticket=ticket,
                     approver=approver, reason=row.reason)
        return
    approvals.void(approvals.open_rows(session, ticket, row.step), now, f"decided by {approver}")
    if row.step + 1 < len(steps):
        _request_step(session, desk, ticket, steps, row.step + 1, now)
        return
    _set_status(session, ticket, "approved", approver, now)
    _dispatch(session, desk, ticket, now)


def _dispatch(session: Session, desk: Desk, ticket: Ticket, now: datetime) -> None:
    """Approved: the executors for the type carry it out; the requester is told."""
    executors = desk.settings.roles.executors_for(ticket.request_type)
    record(session, ticket, "dispatched", "mailflow", now, ", ".join(executors),
           executors=list(executors))
    decided = _decided(session, ticket)
    notify.queue(session, desk, "request_to_executor", executors, now, ticket=ticket,
                 form=ticket.form or {}, labels=forms.LABELS, decided=decided)
    notify.queue(session, desk, "request_approved", public(session, ticket), now, ticket=ticket,
                 decided=decided)


def _to_tell(session: Session, desk: Desk, ticket: Ticket, verdict: approvals.Verdict,
             sender: str) -> list[str]:
    """The approver a refused decision concerns — never a sender who is not one."""
    if verdict.approval is not None:
        return [verdict.approval.approver]
    rows = approvals.open_rows(session, ticket) or approvals.rows_of(session, ticket)
    people = list(dict.fromkeys(r.approver for r in rows))
    if not people:
        people = list(lifecycle.chain(desk.settings, ticket.request_type)[0].approvers)
    return [sender] if sender in people else people


def refuse_decision(
    session: Session, desk: Desk, ticket: Ticket, mail: ParsedMail, cmd: Command,
    verdict: approvals.Verdict, now: datetime,
) -> None:
    """Record the refused decision and tell the approver (not the sender) what happened."""
    sender = mail.from_addr
    row = verdict.approval
    record(
        session, ticket, "approval_refused", sender, now, f"{cmd.action}: {verdict.why}",
        code=verdict.code, approval=row.id if row else None, message_id=mail.message_id,
        approver=row.approver if row else None,
    )
    reissued = False
    if verdict.code == "expired" and row is not None and ticket.status == "pending_approval":
        # The real approver (sender and authentication checked) answered too late: a new token.
        approvals.void([row], now, "expired; replaced")
        steps = lifecycle.chain(desk.settings, ticket.request_type)
        if row.step < len(steps):
            _send_approval(session, desk, ticket, steps, row.step, row.approver, now)
            reissued = True
    cap = desk.settings.limits.auto_replies_per_sender_per_hour
    tell = [a for a in _to_tell(session, desk, ticket, verdict, sender)
            if _notices_this_hour(session, a, now) < cap]
    notify.queue(
        session, desk, "approval_refused", tell, now,
        ticket=ticket, sender=sender, action=cmd.action, why=verdict.why, code=verdict.code,
        received_at=now, subject=mail.subject, reissued=reissued,
    )


def _notices_this_hour(session: Session, approver: str, now: datetime) -> int:
    """Refusal notices an approver got in the last hour: forged mail cannot flood them."""
    return session.scalar(
        select(func.count(Outbox.id)).where(
            Outbox.template == "approval_refused",
            Outbox.recipient == approver,
            Outbox.created_at > now - timedelta(hours=1),
        )
    ) or 0


# -- other commands -------------------------------------------------------------------------


def _set_status(
    session: Session, ticket: Ticket, target: str, actor: str, now: datetime, why: str = ""
) -> None:
    if ticket.status == target:
        return
    detail = f"{ticket.status} → {target}" + (f" ({why})" if why else "")
    record(session, ticket, "status", actor, now, detail, old=ticket.status, new=target)
    ticket.status = target


def _refuse_command(
    session: Session, desk: Desk, ticket: Ticket, sender: str, cmd: Command, why: str,
    held: frozenset[str], now: datetime, in_reply_to: str,
) -> None:
    record(session, ticket, "refused", sender, now, f"{cmd.action}: {why}")
    notify.queue(session, desk, "refused", [sender], now, ticket=ticket, command=cmd,
                 reason=why, allowed=lifecycle.allowed(ticket, held), in_reply_to=in_reply_to)


_REQUESTER_SIDE = frozenset({"requester", "watcher", "vendor"})


def _workers(desk: Desk, ticket: Ticket) -> tuple[str, ...]:
    """Who works the request now: the executors once approved, else the service desk."""
    roles = desk.settings.roles
    if ticket.status in ("approved", "fulfilled"):
        return roles.executors_for(ticket.request_type)
    return roles.service_desk


def _comment(session, desk, ticket, sender, cmd, held, now) -> None:
    """The requester's (or a watcher's) words go to whoever works the request; those of the
    people working it (proven: on_reply) go to the requester."""
    if held & _REQUESTER_SIDE:
        record(session, ticket, "comment", sender, now, cmd.text)
        others = [p for p in _workers(desk, ticket) if p != sender]
        notify.queue(session, desk, "comment_to_team", others, now, ticket=ticket,
                     author=sender, text=cmd.text)
    else:
        record(session, ticket, "comment", sender, now, cmd.text, public=True)
        notify.queue(session, desk, "comment", public(session, ticket), now, ticket=ticket,
                     author=sender, text=cmd.text)


def _note(session, desk, ticket, sender, cmd, held, now) -> None:
    record(session, ticket, "note", sender, now, cmd.argument or cmd.text)


def _done(session, desk, ticket, sender, cmd, held, now) -> None:
    ticket.solution = cmd.argument or None
    ticket.resolved_at = now
    record(session, ticket, "fulfilled", sender, now, cmd.argument)
    notify.queue(session, desk, "request_fulfilled", public(session, ticket), now, ticket=ticket,
                 author=sender, text=cmd.argument)


def _category(session, desk, ticket, sender, cmd, held, now) -> None:
    rule = parties.category_rule(desk, ticket, cmd.argument)
    assert rule is not None  # why_not checked it
    parties.set_category(session, desk, ticket, rule, sender, now)


def _confirm(session, desk, ticket, sender, cmd, held, now) -> None:
    _close(session, desk, ticket, sender, now, "confirmed")


def _reopen(session, desk, ticket, sender, cmd, held, now) -> None:
    ticket.resolved_at = None
    text = cmd.argument or cmd.text
    record(session, ticket, "reopened", sender, now, text)
    notify.queue(session, desk, "request_to_executor", desk.settings.roles.executors_for(
        ticket.request_type), now, ticket=ticket, form=ticket.form or {}, labels=forms.LABELS,
        decided=_decided(session, ticket), reopened_by=sender, text=text)


def _close(
    session: Session, desk: Desk, ticket: Ticket, actor: str, now: datetime, reason: str
) -> None:
    ticket.closed_at = now
    record(session, ticket, "confirmed" if reason == "confirmed" else "auto_closed", actor, now,
           reason)
    notify.queue(session, desk, "request_closed", public(session, ticket), now, ticket=ticket,
                 reason=reason)


APPLY: dict[str, Any] = {
    "comment": _comment,
    "note": _note,
    "done": _done,
    "confirm": _confirm,
    "reopen": _reopen,
    "cc": parties.cc,
    "uncc": parties.uncc,
    "category": _category,
    "status": parties.status,
}


# -- closing fulfilled requests nobody confirms --------------------------------------------


def auto_close(desk: Desk, now: datetime) -> int:
    """Close requests fulfilled longer ago than `[incident] confirm_timeout` (working time)."""

    def closing(session: Session, ticket: Ticket) -> None:
        _close(session, desk, ticket, SYSTEM, now, "timeout")

    return len(close_unconfirmed(desk, "request", "fulfilled", now, closing))


def _every_ten_minutes(desk: Desk) -> Any:
    from apscheduler.triggers.interval import IntervalTrigger

    return IntervalTrigger(minutes=10)


jobs.register(jobs.Job("request-auto-close", auto_close, _every_ten_minutes, catch_up=True))
