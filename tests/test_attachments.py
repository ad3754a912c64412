"""Attachments reach the engineers: over the real IMAP (Dovecot) and SMTP (aiosmtpd) servers."""

from __future__ import annotations

import json
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, make_msgid

from sqlalchemy import text
from support import DESK, body_of, make_desk, make_mail, parsed, reply, run_once

from mailflow.cli import main

REQUESTER = "zhang.san@example.test"
SCREENSHOT = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 20  # 5,128 bytes, every byte value


def with_files(raw: bytes, *files: tuple[str, str, bytes]) -> bytes:
    """`raw` (from make_mail) with files attached, as a mail client attaches them."""
    msg = parsed(raw)
    for filename, ctype, data in files:
        maintype, _, subtype = ctype.partition("/")
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    return msg.as_bytes(policy=SMTP)


def report(subject: str = "打印机卡纸", *files: tuple[str, str, bytes]) -> bytes:
    raw = make_mail(REQUESTER, subject, "打印机一直卡纸，截图见附件。", name="张三")
    return with_files(raw, *files) if files else raw


def sent_to(smtp, address: str) -> list:
    return [m for m in smtp.messages if address in m.rcpt_tos]


def files_of(raw: bytes) -> dict[str, bytes]:
    """Every non-body part of a received mail, by file name."""
    msg = parsed(raw)
    return {
        part.get_filename(): part.get_content()
        for part in msg.walk()
        if part.get_filename() and not part.is_multipart()
    }


def cli(desk, capsys, *args: str) -> str:
    capsys.readouterr()
    assert main(["--config", str(desk.settings.path), *args]) == 0
    return capsys.readouterr().out


def test_the_screenshot_reaches_l1_byte_for_byte_and_the_ack_lists_it(desk, mailbox, smtp, clock):
    mailbox.append(report("打印机卡纸", ("故障截图.png", "image/png", SCREENSHOT)))
    run_once(desk, clock)

    notice = sent_to(smtp, "desk1@example.test")[0].content
    assert files_of(notice) == {"故障截图.png": SCREENSHOT}
    assert "故障截图.png (5 KB)" in body_of(notice)
    ack = sent_to(smtp, REQUESTER)[0].content
    assert files_of(ack) == {}, "the requester is not sent their own file back"
    assert "故障截图.png (5 KB)" in body_of(ack)


def test_a_later_notice_names_the_files_of_the_ticket(desk, mailbox, smtp, clock):
    mailbox.append(report("打印机卡纸", ("故障截图.png", "image/png", SCREENSHOT)))
    run_once(desk, clock)
    notice = sent_to(smtp, "desk1@example.test")[0].content
    ack = sent_to(smtp, REQUESTER)[0].content
    # The requester adds a log file in a reply; the engineer then resolves it.
    answer = with_files(reply(ack, REQUESTER, "补充日志"), ("printer.log", "text/plain", b"E42\n"))
    mailbox.append(answer)
    run_once(desk, clock)
    mailbox.append(reply(notice, "desk1@example.test", "已解决\n清理了搓纸轮。", prefix="回复："))
    run_once(desk, clock)

    resolved = [m for m in sent_to(smtp, REQUESTER) if "清理了搓纸轮" in body_of(m.content)]
    assert len(resolved) == 1
    assert "故障截图.png (5 KB)" in body_of(resolved[0].content)
    assert "printer.log (4 bytes)" in body_of(resolved[0].content)


def test_files_over_the_forwarding_limit_are_listed_with_sizes_not_attached(
    tmp_path, mailbox, smtp, clock
):
    desk = make_desk(tmp_path, mailbox=mailbox, smtp=smtp,
                     limits={"forward_attachment_bytes": 6000})
    big = bytes(range(256)) * 12  # 3,072 bytes
    mailbox.append(report("打印机卡纸", ("a.png", "image/png", SCREENSHOT),
                          ("trace.bin", "application/octet-stream", big)))
    run_once(desk, clock)

    notice = sent_to(smtp, "desk1@example.test")[0].content
    assert files_of(notice) == {"a.png": SCREENSHOT}
    text = body_of(notice)
    assert "a.png (5 KB); " in text, "attached: no note after it"
    assert "trace.bin (3 KB)，超出转发上限" in text


def test_two_tickets_with_the_same_screenshot_store_one_blob(desk, mailbox, smtp, clock):
    mailbox.append(report("打印机卡纸", ("shot.png", "image/png", SCREENSHOT)))
    mailbox.append(report("复印机卡纸", ("截图.png", "image/png", SCREENSHOT)))
    run_once(desk, clock)

    with desk.db.sessions() as session:
        assert session.scalar(text("SELECT count(*) FROM blobs")) == 1
        assert session.scalar(text("SELECT count(*) FROM attachments")) == 2
    for address in ("desk1@example.test",):
        assert [files_of(m.content) for m in sent_to(smtp, address)] == [
            {"shot.png": SCREENSHOT}, {"截图.png": SCREENSHOT}
        ]


def test_show_lists_the_files_and_saves_them_without_overwriting(
    desk, mailbox, smtp, clock, capsys, tmp_path
):
    log = b"paper jam at tray 2\n"
    mailbox.append(report("打印机卡纸", ("故障截图.png", "image/png", SCREENSHOT),
                          ("../../etc/passwd", "text/plain", log)))
    run_once(desk, clock)

    data = json.loads(cli(desk, capsys, "show", "INC-1", "--json"))
    assert data["attachments"] == [
        {"filename": "故障截图.png", "content_type": "image/png", "size": len(SCREENSHOT)},
        {"filename": "../../etc/passwd", "content_type": "text/plain", "size": len(log)},
    ]
    assert "故障截图.png (5 KB, image/png)" in cli(desk, capsys, "show", "INC-1")

    target = tmp_path / "saved"
    out = cli(desk, capsys, "show", "INC-1", "--save-attachments", str(target))
    assert "2 attachment(s) of INC-1 written" in out
    out = cli(desk, capsys, "show", "INC-1", "--save-attachments", str(target))
    assert "2 attachment(s) of INC-1 written" in out
    saved = {p.name: p.read_bytes() for p in target.iterdir()}
    assert saved == {
        "故障截图.png": SCREENSHOT, "故障截图-2.png": SCREENSHOT,
        "passwd": log, "passwd-2": log,
    }


def html_only_with_inline_image() -> bytes:
    """HTML mail whose screenshot is pasted into the text: multipart/related, a cid: image."""
    msg = EmailMessage(policy=SMTP)
    msg["From"] = f"张三 <{REQUESTER}>"
    msg["To"] = DESK
    msg["Subject"] = "系统报错"
    msg["Date"] = format_datetime(clock_now())
    msg["Message-ID"] = make_msgid("html", "example.test")
    msg.set_content('<p>报错如下：</p><p><img src="cid:shot1@example.test"></p>', subtype="html")
    msg.add_related(SCREENSHOT, maintype="image", subtype="png", cid="<shot1@example.test>")
    return msg.as_bytes()


def clock_now():
    from support import Clock

    return Clock()()


def test_an_inline_image_of_html_only_mail_reaches_l1(desk, mailbox, smtp, clock, capsys):
    raw = html_only_with_inline_image()
    assert parsed(raw).get_body(preferencelist=("plain",)) is None  # no text part at all
    mailbox.append(raw)
    run_once(desk, clock)

    notice = sent_to(smtp, "desk1@example.test")[0].content
    assert list(files_of(notice).values()) == [SCREENSHOT]
    data = json.loads(cli(desk, capsys, "show", "INC-1", "--json"))
    assert [(a["content_type"], a["size"]) for a in data["attachments"]] == [
        ("image/png", len(SCREENSHOT))
    ]


def test_a_major_incident_alert_carries_the_screenshot_to_l2(desk, mailbox, smtp, clock):
    raw = make_mail(REQUESTER, "营销系统瘫痪", "营销系统宕机，所有人都无法登录。", name="张三")
    mailbox.append(with_files(raw, ("报错.png", "image/png", SCREENSHOT)))
    run_once(desk, clock)

    alert = sent_to(smtp, "l2@example.test")[0].content
    assert "重大事件" in str(parsed(alert)["Subject"])
    assert files_of(alert) == {"报错.png": SCREENSHOT}
    assert "报错.png (5 KB)" in body_of(alert)
