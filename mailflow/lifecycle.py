"""Who may do what, in which status, and where it leads: policy as data.

`INCIDENT` and `REQUEST` map an action to the statuses it applies in, the roles that may
take it and the status it leads to (None: the status stays). Roles are relative to the
ticket (senders.roles_on gives them): `requester`, `desk` (service desk and its lead), `tier`
(members of the owning tier, or the assignee), `im` (incident manager), `staff` (anyone holding
an IT support role: desk, L2, L3, incident or problem manager), `approver`, `executor`,
`watcher`, `vendor`, `anyone`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mailflow.config import ROLE_KEYS, Settings
from mailflow.models import Ticket
from mailflow.render import Phrase, label

OPEN = ("open", "pending")
EVERY_INCIDENT = ("open", "pending", "resolved", "closed", "problem")
LIVE_REQUEST = ("pending", "pending_approval", "approved", "fulfilled")
EVERY_REQUEST = (*LIVE_REQUEST, "rejected", "closed")


@dataclass(frozen=True)
class Transition:
    statuses: tuple[str, ...]
    roles: frozenset[str]
    to: str | None


def _t(statuses: tuple[str, ...], roles: str, to: str | None) -> Transition:
    return Transition(statuses, frozenset(roles.split()), to)


# Incidents. The SLA resolution clock runs only while an incident is `open`: `pending`
# (waiting for the requester) and `resolved` (waiting for confirmation) stop it.
INCIDENT: dict[str, Transition] = {
    "comment": _t(("open", "pending", "resolved", "closed", "problem"), "anyone", None),
    "note": _t(("open", "pending", "resolved", "closed", "problem"), "staff tier", None),
    "resolve": _t(OPEN, "tier im", "resolved"),
    "escalate": _t(OPEN, "tier im", None),
    "assign": _t(OPEN, "desk im", None),
    "priority": _t(OPEN, "desk im", None),
    "pending": _t(("open",), "tier", "pending"),
    "confirm": _t(("resolved",), "requester", "closed"),
    "reopen": _t(("resolved", "closed"), "requester desk", "open"),
    "problem": _t(("open", "pending", "resolved"), "im", "problem"),
    # The people kept informed, the vendor, the category and the state (parties.py).
    "cc": _t(("open", "pending", "resolved", "problem"), "requester staff", None),
    "uncc": _t(EVERY_INCIDENT, "requester staff watcher", None),
    "vendor": _t(OPEN, "tier im", None),
    "category": _t(("open", "pending", "resolved"), "desk tier im", None),
    "status": _t(EVERY_INCIDENT, "anyone", None),
}

# Requests. `approve`/`reject` are listed for `allowed()`; they are decided by the approval
# token (requests.decide → approvals.verify), not by this table's roles. `rejected` and
# `closed` are final.
REQUEST: dict[str, Transition] = {
    "comment": _t(("pending", "pending_approval", "approved", "fulfilled"), "anyone", None),
    "note": _t(("pending", "pending_approval", "approved", "fulfilled"), "desk executor", None),
    "approve": _t(("pending_approval",), "approver", None),
    "reject": _t(("pending_approval",), "approver", "rejected"),
    "done": _t(("approved",), "executor", "fulfilled"),
    "confirm": _t(("fulfilled",), "requester", "closed"),
    "reopen": _t(("fulfilled",), "requester desk", "approved"),
    "cc": _t(LIVE_REQUEST, "requester staff", None),
    "uncc": _t(EVERY_REQUEST, "requester staff watcher", None),
    "category": _t(LIVE_REQUEST, "desk", None),
    "status": _t(EVERY_REQUEST, "anyone", None),
}

# Escalation paths: desktop incidents go L1 → L2 → L3 → IM, the others L1 → L3 → IM.
DESKTOP_PATH = ("L1", "L2", "L3", "IM")
OTHER_PATH = ("L1", "L3", "IM")

# Roles that work tickets: their comments go to the requester, their first action is the response.
STAFF = frozenset({"desk", "tier", "im", "staff"})
STAFF_ROLES = frozenset(
    {"service_desk", "service_desk_lead", "l2", "l3", "incident_manager", "problem_manager"}
)

ROLE_NAMES: dict[str, dict[str, str]] = {  # who may act, as a refusal names them
    "zh-CN": {
        "requester": "报告人", "desk": "服务台", "tier": "当前处理组", "im": "事件经理",
        "staff": "技术支持人员", "approver": "审批人", "executor": "执行人",
        "watcher": "关注人", "vendor": "厂商", "anyone": "任何人",
    },
    "en": {
        "requester": "the requester", "desk": "the service desk", "tier": "the owning tier",
        "im": "the incident manager", "staff": "IT staff", "approver": "the approver",
        "executor": "the executor", "watcher": "a watcher", "vendor": "the vendor",
        "anyone": "anyone",
    },
}
ROLE_JOIN = {"zh-CN": "、", "en": " or "}

# Why a command is refused, by language: {action}, {kind}, {status}, {roles} are filled in.
REFUSALS: dict[str, dict[str, str]] = {
    "kind": {
        "zh-CN": "“{action}” 不适用于{kind}",
        "en": "“{action}” does not apply to a {kind}",
    },
    "status": {
        "zh-CN": "工单当前状态为 {status}，不能执行 “{action}”",
        "en": "not possible while the ticket is {status}",
    },
    "roles": {
        "zh-CN": "只有 {roles} 可以执行 “{action}”",
        "en": "only {roles} may do this",
    },
}


def _refusal(code: str, ticket: Ticket, action: str, roles: Sequence[str] = ()) -> Phrase:
    """One refusal in every language, each with the labels of that language."""
    return Phrase({
        lang: text.format(
            action=label("action", action, lang), kind=label("kind", ticket.kind, lang),
            status=label("status", ticket.status, lang),
            roles=ROLE_JOIN[lang].join(ROLE_NAMES[lang][r] for r in roles),
        )
        for lang, text in REFUSALS[code].items()
    })


def table(ticket: Ticket) -> dict[str, Transition]:
    return INCIDENT if ticket.kind == "incident" else REQUEST


def path_of(ticket: Ticket) -> tuple[str, ...]:
    """The escalation path the classifying rule chose (its `desktop` flag)."""
    return DESKTOP_PATH if ticket.desktop else OTHER_PATH


def next_tier(ticket: Ticket) -> str | None:
    """The tier an escalation hands the incident to: the next one up its path; None at the top.

    A tier off the path (a major non-desktop incident starts at L2) goes to the first tier of
    the path above it (L2 → L3).
    """
    path = path_of(ticket)
    rank = DESKTOP_PATH.index(ticket.tier) if ticket.tier in DESKTOP_PATH else 0
    return next((tier for tier in path if DESKTOP_PATH.index(tier) > rank), None)


def is_staff(held: frozenset[str]) -> bool:
    """Whether the sender works the ticket (desk, owning tier or incident manager)."""
    return bool(held & STAFF)


def check(ticket: Ticket, action: str, held: frozenset[str]) -> str | None:
    """None when allowed, else why not (a Phrase: in each language)."""
    transition = table(ticket).get(action)
    if transition is None:
        return _refusal("kind", ticket, action)
    if ticket.status not in transition.statuses:
        return _refusal("status", ticket, action)
    if not held & transition.roles:
        return _refusal("roles", ticket, action, sorted(transition.roles))
    return None


def allowed(ticket: Ticket, held: frozenset[str]) -> list[str]:
    """Actions this sender may take now (told to them when a command is refused)."""
    return [
        action
        for action, t in table(ticket).items()
        if ticket.status in t.statuses and held & t.roles
    ]


# -- the approval chain --------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One step of an approval chain: any one of `approvers` decides it."""

    group: str
    approvers: tuple[str, ...]


def chain(settings: Settings, request_type: str | None) -> list[Step]:
    """The steps for a request type: `[requests.approval_chain]` (its type, else `default`),
    else one step of `[roles.approvers]` for the type."""
    roles = settings.roles
    chains = settings.requests.approval_chain
    names = chains.get(request_type or "") or chains.get("default")
    if not names:
        group = request_type if request_type in roles.approvers else "default"
        return [Step(f"approvers.{group}", roles.approvers_for(request_type))]
    return [Step(name, members(settings, name)) for name in names]


def members(settings: Settings, name: str) -> tuple[str, ...]:
    """Who a chain entry names: an address, an approver group, or a desk role."""
    roles = settings.roles
    if "@" in name:
        return (name.strip().lower(),)
    if name in roles.approvers:
        return roles.approvers[name]
    if name in ROLE_KEYS:
        return tuple(getattr(roles, name))
    return ()
