"""Who a mail is from, and who may write: the one place that decides whom the desk trusts.

- Who may write (`refused_sender`): `[limits] deny` and `allow` by address or `@domain` (an
  @domain covers its subdomains); people in `[roles]` pass `allow` but not `deny`. Mail that
  claims to come from the desk itself (From or Sender, its +tag addresses too) is never
  trusted (`claims_desk`).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
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


