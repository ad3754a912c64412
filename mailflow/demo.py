"""`mailflow demo`: a whole mail conversation on the embedded defaults, no outside server.

An in-process SMTP server (aiosmtpd) delivers mail for the desk into a local Maildir that
the daemon reads, and everyone else's mail into their own Maildir, from which the scripted
people read the desk's mail and reply to it — the same path real mail takes.
"""

from __future__ import annotations

import email
import email.policy
import mailbox
import shutil
import smtplib
import socket
import tempfile
from collections.abc import Callable
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller

from mailflow.config import load_config
from mailflow.daemon import Daemon
from mailflow.desk import Desk
from mailflow.models import Ticket

DESK = "itsm@example.test"
CONFIG = """\
[desk]
address = "{desk}"
name = "IT服务台"
language = "{language}"

[database]
url = "sqlite:///var/mailflow.db"

[maildir]
path = "var/maildir"

[smtp]
host = "127.0.0.1"
port = {port}
security = "none"

[roles]
service_desk = ["desk1@example.test"]
service_desk_lead = ["lead@example.test"]
l2 = ["l2@example.test"]
l3 = ["l3@example.test"]
incident_manager = ["im@example.test"]
post_lead = ["post@example.test"]
problem_manager = ["pm@example.test"]

[roles.approvers]
default = ["approver@example.test"]

[roles.executors]
default = ["exec@example.test"]
"""


class _Deliver:
    """aiosmtpd handler: the desk's mail goes into its Maildir; people's mail is kept in order."""

    def __init__(self, root: Path) -> None:
        (root / "var").mkdir(parents=True, exist_ok=True)
        self.desk_box = mailbox.Maildir(root / "var" / "maildir")
        self.people: dict[str, list[bytes]] = {}

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        for rcpt in envelope.rcpt_tos:
            local, _, domain = rcpt.lower().partition("@")
            if f"{local.split('+')[0]}@{domain}" == DESK:  # itsm+<token>@… is the desk too
                self.desk_box.add(envelope.original_content or envelope.content)
            else:
                self.people.setdefault(rcpt.lower(), []).append(envelope.content)
        return "250 OK"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Demo:
    """The scripted people and the desk between them."""

    def __init__(self, root: Path, say: Callable[[str], None] = print) -> None:
        self.root = root
        self.say = say
        self.port = _free_port()
        self.handler = _Deliver(root)
        self.controller = Controller(self.handler, hostname="127.0.0.1", port=self.port)
        (root / "config.toml").write_text(
            CONFIG.format(desk=DESK, language="zh-CN", port=self.port), encoding="utf-8"
        )
        self.desk = Desk(load_config(root / "config.toml"))
        self.daemon = Daemon(self.desk)
        self.seen: dict[str, int] = {}

    def send(
        self,
        sender: str,
        subject: str,
        body: str,
        reply_to: EmailMessage | None = None,
        name: str | None = None,
    ) -> None:
        msg = EmailMessage()
        msg["From"] = f"{name} <{sender}>" if name else sender
        # Like a mail client: a reply goes to the Reply-To address when there is one.
        msg["To"] = (reply_to["Reply-To"] if reply_to is not None else None) or DESK
        msg["Subject"] = subject
        msg["Message-ID"] = make_msgid(domain=sender.split("@")[1])
        if reply_to is not None:
            msg["In-Reply-To"] = reply_to["Message-ID"]
            msg["References"] = reply_to["Message-ID"]
            quoted = "\n".join("> " + line for line in _text(reply_to).splitlines())
            body = f"{body}\n\n在 {reply_to['Date']}，{reply_to['From']} 写道：\n{quoted}\n"
        msg.set_content(body)
        self.say(f"\n✉  {sender} → {msg['To']}: {subject}\n   {body.splitlines()[0]}")
        with smtplib.SMTP("127.0.0.1", self.port) as client:
            client.send_message(msg)
        self.daemon.run_once()
        self.daemon.run_once()  # deliver what the first pass queued

    def inbox(self, address: str) -> list[EmailMessage]:
        """New mail for a person since their last look, printed as it arrives."""
        received = self.handler.people.get(address, [])
        new = [
            email.message_from_bytes(raw, policy=email.policy.default)
            for raw in received[self.seen.get(address, 0) :]
        ]
        self.seen[address] = len(received)
        for msg in new:
            self.say(f"   ← {address} received: {msg['Subject']}")
        return new  # type: ignore[return-value]

    def latest(self, address: str, contains: str) -> EmailMessage:
        """Show the person's new mail, then return the newest about `contains`."""
        self.inbox(address)
        for raw in reversed(self.handler.people.get(address, [])):
            msg = email.message_from_bytes(raw, policy=email.policy.default)
            if contains in msg["Subject"]:
                return msg  # type: ignore[return-value]
        raise LookupError(f"{address} got no mail about {contains}")

    def tickets(self) -> list[Ticket]:
        with self.desk.db.sessions() as session:
            return list(session.query(Ticket).order_by(Ticket.id))

    def script(self) -> None:
        self.say("== 1. 用户报告故障 / a user reports an incident ==")
        self.send(
            "zhangsan@example.test",
            "我的电脑蓝屏了",
            "开机后蓝屏，错误代码 0x0000007B。",
            name="张三",
        )
        self.inbox("zhangsan@example.test")
        notice = self.latest("desk1@example.test", "INC-1")
        self.say("\n== 2. 服务台升级到二线 / the desk escalates to L2 ==")
        self.send(
            "desk1@example.test",
            "回复：" + notice["Subject"],
            "升级\n需要现场更换硬件。",
            reply_to=notice,
        )
        escalated = self.latest("l2@example.test", "INC-1")
        self.say("\n== 3. 二线解决 / L2 resolves ==")
        self.send(
            "l2@example.test",
            "答复: " + escalated["Subject"],
            "已解决\n更换了内存条，系统恢复正常。",
            reply_to=escalated,
        )
        resolved = self.latest("zhangsan@example.test", "INC-1")
        self.say("\n== 4. 用户确认 / the requester confirms ==")
        self.send(
            "zhangsan@example.test", "Re: " + resolved["Subject"], "确认，谢谢！", reply_to=resolved
        )
        self.inbox("zhangsan@example.test")
        self.say("\n== 5. 重大事件 / a major incident ==")
        self.send(
            "wangwu@example.test",
            "【紧急】营销系统全局无法登录",
            "全局所有营业厅都无法登录营销系统，业务中断。",
        )
        for person in ("l2@example.test", "post@example.test", "im@example.test"):
            self.inbox(person)
        self.say("\n== 6. A service request, approved and fulfilled ==")
        self.send(
            "bob@example.test",
            "Request: VPN access",
            "Request type: network-access\nReason: working from the substation site\n",
        )
        self.inbox("bob@example.test")
        approval = self.latest("approver@example.test", "REQ-1")
        self.send("approver@example.test", "Re: " + approval["Subject"], "同意", reply_to=approval)
        task = self.latest("exec@example.test", "REQ-1")
        self.send(
            "exec@example.test", "Re: " + task["Subject"], "完成\nVPN 账号已开通。", reply_to=task
        )
        done = self.latest("bob@example.test", "REQ-1")
        self.send("bob@example.test", "Re: " + done["Subject"], "confirm", reply_to=done)
        self.inbox("bob@example.test")

    def run(self) -> int:
        self.controller.start()
        try:
            self.script()
        finally:
            self.controller.stop()
        self.say("\n== 工单 / tickets ==")
        for t in self.tickets():
            self.say(
                f"  {t.ref:<7} {t.status:<17} {t.priority} {t.tier or '-':<3} "
                f"{'MAJOR ' if t.major else ''}{t.category:<12} {t.requester}  {t.subject}"
            )
        self.say(
            f"\nEverything is in {self.root} — try: "
            f"mailflow --config {self.root / 'config.toml'} show INC-1"
        )
        self.desk.close()
        return 0


def _text(msg: EmailMessage) -> str:
    part = msg.get_body(preferencelist=("plain",))
    return part.get_content() if part is not None else ""


def run_demo(directory: Path | None = None) -> int:
    """Run the scripted conversation in `directory` (a new temp dir by default)."""
    root = directory or Path(tempfile.mkdtemp(prefix="mailflow-demo-"))
    if directory is not None and (root / "var").exists():
        shutil.rmtree(root / "var")
    root.mkdir(parents=True, exist_ok=True)
    return Demo(root).run()
