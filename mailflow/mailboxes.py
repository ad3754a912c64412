"""The configured IMAP mailboxes: find one by its source name, apply its defaults.

A stored message remembers its mailbox by source name (``imap:user@host:port/folder``);
mail that only the default rule matched takes the mailbox's kind, category and priority, so
e.g. a "requests" folder opens service requests.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from mailflow.config import ImapConfig
from mailflow.rules import Classification

if TYPE_CHECKING:
    from mailflow.desk import Desk


def mailbox_config(desk: Desk, mailbox: str) -> ImapConfig | None:
    """The settings of the mailbox a stored message came from (by its source name)."""
    for cfg in desk.settings.mailboxes or (desk.settings.imap,):
        if cfg.enabled and _name(cfg) == mailbox:
            return cfg
    return None


def _name(cfg: ImapConfig) -> str:
    return f"imap:{cfg.username}@{cfg.host}:{cfg.port}/{cfg.folder}"


def with_mailbox_defaults(desk: Desk, mailbox: str, found: Classification) -> Classification:
    """Apply the mailbox's kind/category/priority to mail only the default rule matched."""
    cfg = mailbox_config(desk, mailbox)
    rules = desk.rules.rules
    if cfg is None or not rules or found.rule != rules[-1].name:
        return found
    changes: dict[str, object] = {}
    if cfg.kind and cfg.kind != found.kind:
        changes["kind"] = cfg.kind
        changes["tier"] = "L1" if cfg.kind == "incident" else None
    if cfg.category:
        changes["category"] = cfg.category
    if cfg.priority:
        changes["priority"] = cfg.priority
    if not changes:
        return found
    return dataclasses.replace(found, rule=f"{found.rule}+mailbox", **changes)  # type: ignore[arg-type]
