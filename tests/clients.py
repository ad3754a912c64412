"""Replies as real mail clients write them: where they send, what they thread, how they quote.

Each style answers the desk's mail the way that client does by default: to the Reply-To
(which carries the desk's reply token), with its own subject prefix and quoting, and with or
without In-Reply-To/References (an old webmail keeps neither).
"""

from __future__ import annotations

from dataclasses import dataclass

from support import DESK, body_of, make_mail, parsed


@dataclass(frozen=True)
class Client:
    name: str
    prefix: str
    threads: bool  # sends In-Reply-To and References
    quote: str  # "outlook" | "foxmail" | "gmail" | "iphone" | "none"


CLIENTS = [
    Client("Outlook-CN", "答复: ", True, "outlook"),
    Client("Foxmail", "回复：", True, "foxmail"),
    Client("QQ Mail", "回复：", True, "foxmail"),
    Client("Gmail", "Re: ", True, "gmail"),
    Client("iPhone Mail", "Re: ", True, "iphone"),
    Client("old webmail", "Re: ", False, "none"),
]


def _quoted(client: Client, original: bytes) -> str:
    msg = parsed(original)
    body = body_of(original)
    sender = str(msg["From"])
    if client.quote == "outlook":
        return (
            "\n\n发件人: " + sender + "\n发送时间: 2026年11月24日 10:00\n收件人: me\n主题: "
            + str(msg["Subject"]) + "\n\n" + body
        )
    if client.quote == "foxmail":
        return (
            "\n\n------------------ 原始邮件 ------------------\n发件人: " + sender
            + "\n发送时间: 2026年11月24日(星期二) 上午10:00\n主题: " + str(msg["Subject"])
            + "\n\n" + body
        )
    marked = "\n".join("> " + line for line in body.splitlines())
    if client.quote == "gmail":
        return f"\n\n在 2026年11月24日周二 10:00，{sender} 写道：\n{marked}"
    if client.quote == "iphone":
        return f"\n\nOn 24 Nov 2026, at 10:00, {sender} wrote:\n\n{marked}"
    return ""


def reply_as(client: Client, original: bytes, sender: str, body: str) -> bytes:
    """`sender`'s reply to `original` as `client` writes it."""
    msg = parsed(original)
    to = str(msg.get("Reply-To") or DESK)
    subject = client.prefix + str(msg["Subject"])
    text = body + _quoted(client, original)
    if not client.threads:
        return make_mail(sender, subject, text, to=to)
    message_id = str(msg["Message-ID"]).strip()
    refs = (str(msg.get("References", "")) + " " + message_id).split()
    return make_mail(sender, subject, text, to=to, in_reply_to=message_id, references=refs)
