"""Realistic desk mail for benchmarks: Chinese and English, replies, HTML, attachments."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, make_msgid

DESK = "itsm@example.test"
SUBJECTS = [
    "我的电脑蓝屏了",
    "打印机卡纸，无法打印",
    "收不到外部邮件",
    "营销系统登录很慢",
    "计量自动化主站采集失败",
    "OA公文流转报错",
    "无法连接VPN",
    "账号被锁定，请重置密码",
    "申请开通VPN账号",
    "申请领用一台显示器",
    "Outlook keeps asking for my password",
    "Printer on 3rd floor is offline",
    "Cannot access the billing system",
    "Request: new laptop for a new colleague",
    "Network drive not reachable",
]
LINES = [
    "今天上午开始出现这个问题，重启后仍然不行。",
    "影响到日常工作，请尽快处理，谢谢！",
    "错误提示：操作超时，请联系管理员。",
    "我的分机号是 8123，办公室在三楼 305。",
    "It started this morning after the Windows update.",
    "Several colleagues in the billing office see the same thing.",
    "Error message: The operation timed out (0x80070079).",
    "Please call me on extension 8123 if you need more details.",
]


def _body(rng: random.Random, size: int) -> str:
    out: list[str] = []
    while sum(len(line.encode()) for line in out) < size:
        out.append(rng.choice(LINES))
    return "\n".join(out)


def generate(n: int, seed: int = 7) -> list[bytes]:
    """n mails of 2–20 KB: 70% new reports, 30% replies to earlier ones (In-Reply-To)."""
    rng = random.Random(seed)
    start = datetime(2026, 11, 24, 1, 0, tzinfo=UTC)
    sent: list[tuple[str, str, str]] = []  # (message-id, subject, sender)
    mails = []
    for i in range(n):
        msg = EmailMessage(policy=SMTP)
        size = rng.randint(2_000, 20_000)
        if sent and rng.random() < 0.3:
            parent_id, subject, sender = rng.choice(sent)
            msg["Subject"] = rng.choice(["Re: ", "回复：", "答复: ", "AW: "]) + subject
            msg["In-Reply-To"] = parent_id
            msg["References"] = parent_id
            text = (
                "补充一下情况：\n"
                + _body(rng, size // 2)
                + "\n\n-----原始邮件-----\n"
                + _body(rng, size // 2)
            )
        else:
            sender = f"user{rng.randint(1, 300)}@example.test"
            subject = rng.choice(SUBJECTS)
            msg["Subject"] = subject
            text = _body(rng, size)
        msg["From"] = f"用户{i % 300} <{sender}>"
        msg["To"] = DESK
        msg["Date"] = format_datetime(start + timedelta(seconds=i * 7))
        message_id = make_msgid(f"b{i}", "example.test")
        msg["Message-ID"] = message_id
        kind = rng.random()
        if kind < 0.1:
            html = "<html><body>" + "".join(f"<p>{line}</p>" for line in text.splitlines())
            msg.set_content(html + "</body></html>", subtype="html")
        else:
            msg.set_content(text)
            if kind > 0.9:
                msg.add_attachment(
                    rng.randbytes(8_000), maintype="image", subtype="png", filename="截图.png"
                )
        sent.append((message_id, subject, sender))
        mails.append(msg.as_bytes())
    return mails
