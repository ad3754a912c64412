"""Reply commands: read from the first line of the new text (after a greeting), in English and
Chinese; a signature is no part of what they say."""

from __future__ import annotations

from email.message import EmailMessage
from email.policy import SMTP
from pathlib import Path

import pytest
from support import make_mail

from mailflow.commands import essential_lines, parse
from mailflow.mail import parse as parse_mail

FIXTURES = Path(__file__).parent / "fixtures" / "mail"


@pytest.mark.parametrize(
    ("text", "action", "argument"),
    [
        ("已解决\n重启后恢复正常。", "resolve", "重启后恢复正常。"),
        ("解决：更换了网线", "resolve", "更换了网线"),
        ("Resolved - replaced the cable", "resolve", "replaced the cable"),
        ("resolve", "resolve", ""),
        ("ＲＥＳＯＬＶＥ：更换内存", "resolve", "更换内存"),  # full-width, as some IMEs type
        ("\n\n   已解决\n换了鼠标", "resolve", "换了鼠标"),
        ("升级", "escalate", ""),
        ("escalate: needs on-site work", "escalate", "needs on-site work"),
        ("指派 l2@example.test", "assign", "l2@example.test"),
        ("assign <L2@Example.TEST>", "assign", "l2@example.test"),
        ("指派：张工 l3@example.test。", "assign", "l3@example.test"),
        ("指派 张工", "assign", ""),
        ("优先级 P1", "priority", "P1"),
        ("priority p2", "priority", "P2"),
        ("优先级：1", "priority", "P1"),
        ("priorityP3", "priority", "P3"),
        ("优先级 高", "priority", ""),
        ("待用户 请提供错误截图", "pending", "请提供错误截图"),
        ("pending\nwhich floor?", "pending", "which floor?"),
        ("确认", "confirm", ""),
        ("confirm, thanks", "confirm", "thanks"),
        ("重开", "reopen", ""),
        ("未解决\n还是打不开", "reopen", "还是打不开"),
        ("reopen", "reopen", ""),
        ("转问题\n需根因分析", "problem", "需根因分析"),
        ("problem", "problem", ""),
        ("内部：怀疑是驱动问题", "note", "怀疑是驱动问题"),
        ("note: same model as last week", "note", "same model as last week"),
        # The text of a command reaches people as written (full width, a closing "！").
        ("待用户 请问是哪台电脑？资产编号（贴在机箱上）是多少，型号：ThinkPad", "pending",
         "请问是哪台电脑？资产编号（贴在机箱上）是多少，型号：ThinkPad"),
        ("已解决　重装了网卡驱动（版本１０.２），请重启后再试！", "resolve",
         "重装了网卡驱动（版本１０.２），请重启后再试！"),
    ],
)
def test_commands_in_both_languages(text, action, argument):
    cmd = parse(text)
    assert (cmd.action, cmd.argument) == (action, argument)
    assert cmd.text == text.strip()


@pytest.mark.parametrize(
    ("text", "signer", "action", "argument"),
    [
        # A greeting first: the command is on the next line.
        ("您好：\n同意。\n\n李四", "李四", "approve", ""),
        ("张工，你好！\n已解决\n更换了硒鼓。", "", "resolve", "更换了硒鼓。"),
        ("各位好\n升级\n需要现场处理", "", "escalate", "需要现场处理"),
        ("Hi team,\nresolve: replaced the toner", "", "resolve", "replaced the toner"),
        ("Dear Li Si,\n\nreject: no budget", "", "reject", "no budget"),
        # A signature after it: the sender's name, a closing, `-- `, or name and phone.
        ("驳回\n\n李四\n财务处 | 电话 1234", "", "reject", ""),
        ("驳回 预算不足\n李四", "李四", "reject", "预算不足"),
        ("驳回\n预算不足\nLi Si", "Li, Si (李四)", "reject", "预算不足"),
        ("已解决\n更换了硒鼓。\n\n此致\n敬礼\n王五", "", "resolve", "更换了硒鼓。"),
        ("resolve\nReplaced the cable.\n\nBest regards,\nBob", "", "resolve",
         "Replaced the cable."),
        ("resolve\nReplaced the cable.\n-- \nBob Smith\nIT", "", "resolve",
         "Replaced the cable."),
        # What only looks like one stays: a reason that mentions a phone number, a long text.
        ("驳回\n请先联系财务处 电话 1234 再申请", "", "reject", "请先联系财务处 电话 1234 再申请"),
        ("Hi, resolved.", "", "comment", ""),
    ],
)
def test_greetings_and_signatures(text, signer, action, argument):
    cmd = parse(text, signer)
    assert (cmd.action, cmd.argument) == (action, argument)
    assert cmd.text == text  # the whole text is kept as written (comments, the record)


def test_what_a_reply_says_without_greeting_and_signature():
    assert essential_lines("好的，谢谢！\n\n张三\n信息中心 网络运维班\n电话：0769-12345678") == [
        "好的，谢谢！"
    ]
    assert parse("您好\n\n谢谢！\n张三", "张三").said == "谢谢！"
    # A signature is never the first line: a mail of one name is what it says.
    assert essential_lines("张三", "张三") == ["张三"]
    # Lines after a closing are no signature when they run long: they are the mail.
    long = "已解决\n谢谢\n" + "\n".join(f"第{i}步：检查设备" for i in range(8))
    assert essential_lines(long) == long.splitlines()


@pytest.mark.parametrize(
    "text",
    [
        "确认一下是否已经处理？",  # prose that starts with a command word
        "解决了吗？",
        "resolvedly unhelpful",
        "Problems started after the update",
        "升级后电脑很慢",
        "谢谢\n已解决",  # only the first non-empty line counts
        "",
    ],
)
def test_prose_is_a_comment(text):
    assert parse(text).action == "comment"


# -- quoted history: the command below the new text is never read ------------------------


def _outlook_cn(new: str) -> str:
    return (f"{new}\n\n________________________________\n"
            "发件人: 李工 <l2@example.test>\n发送时间: 2026年11月24日 10:05\n"
            "收件人: IT服务台 <itsm@example.test>\n主题: 回复: [INC-1] 电脑蓝屏\n\n"
            "已解决\n重启后恢复正常。\n")


def _outlook_original(new: str) -> str:
    return (f"{new}\n\n-----原始邮件-----\n发件人: 李工 <l2@example.test>\n"
            "发送时间: 2026年11月24日 10:05\n主题: [INC-1] 电脑蓝屏\n\n确认\n")


def _gmail(new: str) -> str:
    return (f"{new}\n\n在 2026年11月24日周二 上午10:05，李工 <l2@example.test>\n写道：\n\n"
            "> 已解决\n> 重启后恢复正常。\n")


def _gmail_en(new: str) -> str:
    return (f"{new}\n\nOn Tue, Nov 24, 2026 at 10:05 AM Li <l2@example.test> wrote:\n\n"
            "> resolve\n> rebooted\n")


def _qq_html(new: str) -> bytes:
    html = (f"<div>{new}</div><div><br></div>"
            "<div>------------------&nbsp;原始邮件&nbsp;------------------</div>"
            "<div><b>发件人:</b>&nbsp;\"李工\"&lt;l2@example.test&gt;;</div>"
            "<div><b>发送时间:</b>&nbsp;2026年11月24日(星期二) 上午10:05</div>"
            "<div><b>主题:</b>&nbsp;[INC-1] 电脑蓝屏</div><div><br></div>"
            "<div>已解决</div><div>重启后恢复正常。</div>")
    msg = EmailMessage(policy=SMTP)
    msg["From"] = "desk1@example.test"
    msg["To"] = "itsm@example.test"
    msg["Subject"] = "回复：[INC-1] 电脑蓝屏"
    msg.set_content(html.encode("gb18030"), "text", "html", cte="base64",
                    params={"charset": "gb18030"})
    return msg.as_bytes()


def _new_text(style: str, new: str) -> str:
    if style == "qq":
        raw = _qq_html(new)
    else:
        body = {"outlook": _outlook_cn, "outlook-original": _outlook_original, "gmail": _gmail,
                "gmail-en": _gmail_en}[style](new)
        raw = make_mail("desk1@example.test", "回复：[INC-1] 电脑蓝屏", body)
    return parse_mail(raw).new_text


@pytest.mark.parametrize("style", ["outlook", "outlook-original", "qq", "gmail", "gmail-en"])
def test_a_command_in_quoted_history_is_not_read(style):
    assert parse(_new_text(style, "正在处理，请稍候。")) .action == "comment"
    assert parse(_new_text(style, "")).action == "comment"
    cmd = parse(_new_text(style, "升级"))
    assert cmd.action == "escalate" and "重启" not in cmd.text


@pytest.mark.parametrize(
    ("fixture", "action", "argument"),
    [("outlook_cn_reply.eml", "resolve", "重启后恢复正常，谢谢。"),
     ("gmail_cn_reply.eml", "escalate", "用户明天要出差，比较着急。")],
)
def test_real_client_replies(fixture, action, argument):
    mail = parse_mail((FIXTURES / fixture).read_bytes())
    cmd = parse(mail.new_text)
    assert (cmd.action, cmd.argument) == (action, argument)
    assert "resolve" not in cmd.text.replace("resolved", ""), "quoted 'resolve' is not read"
