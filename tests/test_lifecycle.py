"""The incident transition table as data: statuses, who may, paths, what a reply means."""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace

import pytest
from support import ROLES

from mailflow import incidents, lifecycle, senders
from mailflow.commands import Command
from mailflow.config import RequestSettings, Roles
from mailflow.models import Ticket

STATUSES = {"open", "pending", "resolved", "closed", "problem"}
NOW = datetime(2026, 11, 24, 2, 0, tzinfo=UTC)
ROLE_SET = Roles(**{k: tuple(v) for k, v in ROLES.items()})
USER = "user@example.test"


def incident(**fields) -> Ticket:
    values = dict(kind="incident", number=1, status="open", priority="P3", category="desktop",
                  tier="L1", major=False, desktop=True, rule="r", requester=USER,
                  subject="s", created_at=NOW, updated_at=NOW)
    values.update(fields)
    return Ticket(**values)


def held(ticket: Ticket, sender: str) -> frozenset[str]:
    settings = SimpleNamespace(roles=ROLE_SET, requests=RequestSettings())
    return senders.roles_on(settings, ticket, sender)  # type: ignore[arg-type]


def test_every_action_has_a_handler_and_only_contract_statuses():
    assert set(lifecycle.INCIDENT) == set(incidents.APPLY)
    for action, t in lifecycle.INCIDENT.items():
        assert set(t.statuses) <= STATUSES, action
        assert t.to is None or t.to in STATUSES, action
        assert t.roles <= set(lifecycle.ROLE_NAMES["en"]), action


@pytest.mark.parametrize(
    ("action", "roles", "statuses", "to"),
    [
        ("resolve", {"tier", "im"}, {"open", "pending"}, "resolved"),
        ("escalate", {"tier", "im"}, {"open", "pending"}, None),
        ("assign", {"desk", "im"}, {"open", "pending"}, None),
        ("priority", {"desk", "im"}, {"open", "pending"}, None),
        ("pending", {"tier"}, {"open"}, "pending"),
        ("confirm", {"requester"}, {"resolved"}, "closed"),
        ("reopen", {"requester", "desk"}, {"resolved", "closed"}, "open"),
        ("problem", {"im"}, {"open", "pending", "resolved"}, "problem"),
        ("comment", {"anyone"}, STATUSES, None),
    ],
)
def test_the_table_follows_the_contract(action, roles, statuses, to):
    t = lifecycle.INCIDENT[action]
    assert (set(t.roles), set(t.statuses), t.to) == (roles, statuses, to)


@pytest.mark.parametrize(
    ("desktop", "tier", "expected"),
    [
        (True, "L1", "L2"), (True, "L2", "L3"), (True, "L3", "IM"), (True, "IM", None),
        (False, "L1", "L3"), (False, "L3", "IM"), (False, "IM", None),
        (False, "L2", "L3"),  # a major non-desktop incident starts at L2
        (True, None, "L2"),
    ],
)
def test_escalation_paths_follow_the_rules_desktop_flag(desktop, tier, expected):
    assert lifecycle.next_tier(incident(desktop=desktop, tier=tier)) == expected


def test_roles_are_relative_to_the_ticket():
    l1, l2 = incident(tier="L1"), incident(tier="L2")
    assert held(l1, USER) == {"anyone", "requester"}
    assert held(l1, "USER@Example.test") == {"anyone", "requester"}
    assert held(l1, "desk1@example.test") == {"anyone", "desk", "tier", "staff"}
    assert held(l2, "desk1@example.test") == {"anyone", "desk", "staff"}
    assert held(l1, "lead@example.test") == {"anyone", "desk", "staff"}
    assert held(l1, "l2@example.test") == {"anyone", "staff"}
    assert held(l2, "l2@example.test") == {"anyone", "tier", "staff"}
    assert held(l1, "im@example.test") == {"anyone", "im", "staff"}
    assert held(l1, "pm@example.test") == {"anyone", "staff"}
    assert held(l1, "post@example.test") == {"anyone"}
    vendor = incident(tier="L3", assignee="vendor@example.test")
    assert held(vendor, "vendor@example.test") == {"anyone", "tier"}


def test_check_says_why_and_allowed_says_what_instead():
    ticket = incident(tier="L2")
    desk = held(ticket, "desk1@example.test")
    why = lifecycle.check(ticket, "resolve", desk)
    assert why is not None and "当前处理组" in why and "only" in why
    assert lifecycle.check(ticket, "assign", desk) is None
    assert lifecycle.allowed(ticket, desk) == [
        "comment", "note", "assign", "priority", "cc", "uncc", "category", "status"]
    ticket.status = "closed"
    why = lifecycle.check(ticket, "resolve", held(ticket, "l2@example.test"))
    assert why is not None and "closed" in why
    assert lifecycle.allowed(ticket, held(ticket, USER)) == ["comment", "reopen", "uncc", "status"]
    assert lifecycle.check(ticket, "approve", desk) is not None


@pytest.mark.parametrize(
    ("text", "expected"),
    [("好的，谢谢！", True), ("谢谢您", True), ("OK, thanks a lot.", True), ("", True),
     ("收到，谢谢", True), ("又坏了", False), ("谢谢，但是还是不行", False),
     ("ok but broken", False)],
)
def test_courtesy_replies(text, expected):
    assert incidents.courtesy(text) is expected


def test_what_a_reply_means_in_context():
    ticket = incident(status="resolved")
    user = held(ticket, USER)
    assert incidents.interpret(ticket, Command("resolve", "", "已解决，谢谢"), user).action == (
        "confirm"
    )
    # Anything else from the requester but thanks says it is not solved.
    assert incidents.interpret(ticket, Command("comment", "", "好的，谢谢"), user).action == (
        "comment"
    )
    still = incidents.interpret(ticket, Command("comment", "", "还是不行"), user)
    assert still is not None and (still.action, still.argument) == ("reopen", "还是不行")
    engineer = held(ticket, "desk1@example.test")
    assert incidents.interpret(ticket, Command("note", "x", "note: x"), engineer).action == "note"
    ticket.status = "open"
    assert incidents.interpret(ticket, Command("note", "x", "note: x"), user).action == "comment"
    # A request's words are prose on an incident: "同意" from a user is no approval.
    assert incidents.interpret(ticket, Command("approve", "", "同意"), user).action == "comment"
    # Whatever the requester answers to a question is the answer, not a refused command.
    ticket.status = "pending"
    answered = incidents.interpret(ticket, Command("confirm", "", "确认：靠窗那台"), user)
    assert answered is not None and answered.action == "comment"
    assert incidents.interpret(ticket, Command("reopen", "", "重开"), user).action == "comment"
    ticket.status = "closed"
    assert incidents.interpret(ticket, Command("comment", "", "谢谢！"), user) is None
    assert incidents.interpret(ticket, Command("confirm", "", "确认"), user) is None
    reopened = incidents.interpret(ticket, Command("comment", "", "又坏了"), user)
    assert reopened is not None and reopened.action == "reopen" and reopened.argument == "又坏了"
    # Someone else's reply to a closed incident is just a comment.
    other = held(ticket, "colleague@example.test")
    assert incidents.interpret(ticket, Command("comment", "", "又坏了"), other).action == "comment"


def test_a_refusal_names_the_roles_in_each_language():
    ticket = incident(status="open")
    why = lifecycle.check(ticket, "resolve", held(ticket, USER))
    zh, en = why.in_("zh-CN"), why.in_("en")
    assert zh == "只有 事件经理、当前处理组 可以执行 “已解决”"
    assert en == "only the incident manager or the owning tier may do this"
    assert why == f"{zh} / {en}"  # as events record it
