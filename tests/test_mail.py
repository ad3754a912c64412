"""Tests for mailflow.mail: decoding awkward real-world mail exactly, and never raising."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import make_mail

from mailflow.mail import (
    NAME_LIMIT,
    ParsedMail,
    decode_bytes,
    decode_header_value,
    parse,
    strip_quoted,
    strip_subject_prefixes,
)

FIXTURES = Path(__file__).parent / "fixtures" / "mail"
ALL_FIXTURES = sorted(FIXTURES.glob("*.eml"))


def load(name: str) -> ParsedMail:
    return parse((FIXTURES / name).read_bytes())


def test_gbk_body_labelled_gb2312() -> None:
    m = load("gbk_labelled_gb2312.eml")
    assert m.subject == "电脑开不了机（朱喆）"
    assert m.from_name == "刘镕"
    assert m.from_addr == "liu.rong@example.com.cn"
    assert m.to == ["servicedesk@example.com"]
    assert m.message_id == "202411010912300187654@example.com.cn"
    assert m.has_message_id is True
    assert m.date == datetime(2024, 11, 1, 1, 12, 30, tzinfo=UTC)
    assert m.text == (
        "王工您好：\n\n财务部朱喆的电脑开不了机，显示器黑屏，麻烦尽快安排人处理。\n"
        "资产编号：PC-2023-0815，位置：3楼东区。\n\n谢谢！\n刘镕"
    )
    assert m.defects == []
    assert m.auto is None


def test_unknown_charset_falls_back_and_records_defect() -> None:
    m = load("unknown_charset.eml")
    assert m.text == "VPN 每隔十分钟就断开一次，客户端版本 5.1.2。\nError: 连接超时 (code 809)"
    assert m.defects == ["unknown charset 'x-unknown'"]


def test_broken_mime_missing_closing_boundary() -> None:
    m = load("broken_mime.eml")
    assert m.text == "Backup job finished with 2 warnings, log attached."
    assert [(a.filename, a.content_type, a.data) for a in m.attachments] == [
        ("backup.log", "text/plain", b"WARN disk 91% full\nWARN slow!\n")
    ]
    assert m.defects == ["broken MIME: CloseBoundaryNotFoundDefect"]


def test_html_only_chinese() -> None:
    m = load("html_only_cn.eml")
    assert m.subject == "投影仪无信号"
    assert m.from_name == "赵敏"
    assert m.text == (
        "各位好，\n\n会议室 3A 的投影仪无法连接笔记本，HDMI 显示“无信号”。\n\n"
        "详情见 会议室说明。\n\n行政部 赵敏"
    )
    assert "https://" not in m.text and "![" not in m.text


def test_no_message_id_uses_hash() -> None:
    raw = (FIXTURES / "no_message_id.eml").read_bytes()
    m = parse(raw)
    assert m.has_message_id is False
    assert m.message_id.startswith("sha256-") and m.message_id.endswith("@mailflow.invalid")
    assert m.message_id == parse(raw).message_id
    assert m.from_name == "Printer Monitor"
    assert m.date == datetime(2024, 11, 7, 21, 45, 12, tzinfo=UTC)


def test_no_subject_addresses_duplicates_and_bad_date() -> None:
    m = load("no_subject.eml")
    assert m.subject == ""
    assert m.from_addr == "bob.smith@example.com"
    assert m.from_name == "Bob Smith"
    assert m.to == ["servicedesk@example.com", "alice@example.com"]
    assert m.cc == ["li.lei@example.com", "carol@example.com"]
    assert m.date is None
    assert m.header("x-tag") == "first"
    assert m.header_all("X-TAG") == ["first", "second"]
    assert m.header("Cc") == "Li Lei (李雷) <li.lei@example.com>"
    assert m.header("X-Missing") is None


def test_outlook_cn_reply() -> None:
    m = load("outlook_cn_reply.eml")
    assert m.subject == "回复: [INC-42] 打印机无法打印"
    assert strip_subject_prefixes(m.subject) == "[INC-42] 打印机无法打印"
    assert m.from_name == "孙丽"
    assert m.in_reply_to == ["mf.inc42.1730987400.a1b2c3@desk.example.com"]
    assert m.references == ["mf.inc42.1730987400.a1b2c3@desk.example.com"]
    assert m.text.startswith("已解决\n\n重启后恢复正常，谢谢。\n\n发件人: IT服务台")
    assert m.new_text == "已解决\n\n重启后恢复正常，谢谢。"
    assert m.header("Thread-Topic") == "[INC-42] 打印机无法打印"


def test_qq_foxmail_reply() -> None:
    m = load("qq_reply.eml")
    assert m.subject == "回复：[REQ-7] 审批：申请 Visio 许可证"
    assert strip_subject_prefixes(m.subject) == "[REQ-7] 审批：申请 Visio 许可证"
    assert m.from_name == "赵磊"
    assert m.from_addr == "12345678@qq.com"
    assert "------------------ 原始邮件 ------------------" in m.text
    assert m.new_text == "同意"


def test_gmail_chinese_reply_wrapped_attribution() -> None:
    m = load("gmail_cn_reply.eml")
    assert m.subject == "Re: [INC-51] 笔记本电池鼓包"
    assert m.from_name == "钱雷"
    assert m.references == ["mf.inc51.a@desk.example.com", "mf.inc51.x@desk.example.com"]
    assert m.new_text == "升级\n用户明天要出差，比较着急。"


def test_english_reply() -> None:
    m = load("english_reply.eml")
    assert m.subject == "RE: Re: FW: [INC-60] Outlook keeps asking for password"
    assert strip_subject_prefixes(m.subject) == "[INC-60] Outlook keeps asking for password"
    assert m.from_name == "O'Brien, Mary"
    assert m.from_addr == "mary.obrien@example.com"
    assert m.reply_to == ["mary.obrien+desk@example.com"]
    assert m.new_text == "resolve\nThe vendor wrote back yesterday; the new profile fixed it."


def test_rfc2231_gbk_attachment_names() -> None:
    m = load("rfc2231_gbk_attachment.eml")
    assert m.subject == "新员工入职"
    assert m.text == "请为新同事开通邮箱和VPN，申请表见附件。"
    assert [(a.filename, a.content_type, a.size) for a in m.attachments] == [
        ("员工入职申请表.xlsx",
         "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet", 42),
        ("样式.pdf", "application/pdf", 13),
        ("notes.txt", "text/plain", 17),
    ]
    assert m.attachments[2].data == b"badge number 4711"


def test_raw_8bit_utf8_headers() -> None:
    m = load("raw_utf8_subject.eml")
    assert m.subject == "回复：[INC-77] 网络 很慢"
    assert m.from_name == "周杰"
    assert m.from_addr == "zhou.jie@example.com"
    assert m.header("Subject") == "回复：[INC-77]   网络   很慢"
    assert m.text == "还是很慢，ping 网关 200ms。"


def test_raw_8bit_gbk_header() -> None:
    raw = b"From: " + "王五".encode("gbk") + b" <w@x.cn>\nSubject: " + "密码重置".encode("gbk")
    m = parse(raw + b"\n\nbody\n")
    assert (m.subject, m.from_name, m.from_addr) == ("密码重置", "王五", "w@x.cn")


def test_nested_rfc822_is_attachment() -> None:
    m = load("forward_nested.eml")
    assert m.text == "Is this phishing? See attached."
    assert [(a.filename, a.content_type) for a in m.attachments] == [
        ("账户冻结.eml", "message/rfc822"), ("", "image/png")
    ]
    assert m.attachments[0].data is not None and b"Click here." in m.attachments[0].data


def test_mislabelled_parts_are_readable() -> None:
    m = load("mislabelled.eml")
    assert m.text == "打印机卡纸\n\n请尽快处理\n\nGrüße, Müller"


def test_exchange_auto_reply_is_automatic() -> None:
    m = load("exchange_ooo.eml")
    assert m.subject == "自动回复: [INC-42] 打印机无法打印"
    assert m.auto == "Auto-Submitted: auto-replied"


def test_oversize_attachment_kept_out() -> None:
    payload = base64.encodebytes(b"\0" * (30 * 1024 * 1024)).decode()
    raw = (
        "From: a@example.com\nSubject: big\nMIME-Version: 1.0\n"
        'Content-Type: multipart/mixed; boundary="b"\n\n--b\nContent-Type: text/plain\n\n'
        "see zip\n--b\nContent-Type: application/zip\n"
        'Content-Disposition: attachment; filename="x.zip"\n'
        f"Content-Transfer-Encoding: base64\n\n{payload}--b--\n"
    ).encode()
    m = parse(raw)
    assert m.text == "see zip"
    (att,) = m.attachments
    assert (att.filename, att.size, att.data) == ("x.zip", 30 * 1024 * 1024, None)
    assert m.omitted == ["x.zip (30 MB)"]


def test_too_many_attachments_and_long_text() -> None:
    parts = "".join(
        f'--b\nContent-Type: application/octet-stream; name="f{i}.bin"\n\nx\n' for i in range(5)
    )
    raw = (
        'Content-Type: multipart/mixed; boundary="b"\n\n--b\nContent-Type: text/plain\n\n'
        + "a" * 50 + "\n" + parts + "--b--\n"
    ).encode()
    m = parse(raw, max_attachments=3, max_text_chars=10)
    assert [a.data is not None for a in m.attachments] == [True, True, True, False, False]
    assert m.text == "a" * 10
    assert m.omitted == [
        "text truncated to 10 of 50 characters",
        "2 attachment(s) not kept (limit 3 attachments)",
    ]


def test_multipart_alternative_prefers_plain() -> None:
    raw = (
        b'Content-Type: multipart/alternative; boundary="a"\n\n--a\n'
        b"Content-Type: text/plain; charset=utf-8\n\nplain body\n--a\n"
        b"Content-Type: text/html; charset=utf-8\n\n<p>html body</p>\n--a--\n"
    )
    assert parse(raw).text == "plain body"
    empty_plain = raw.replace(b"plain body", b"   ")
    assert parse(empty_plain).text == "html body"


def test_missing_boundary_parameter_is_repaired() -> None:
    raw = (
        b"Subject: x\nContent-Type: multipart/mixed\n\n--zz\nContent-Type: text/plain\n\n"
        b"hello\n--zz\nContent-Type: application/pdf; name=a.pdf\n\n%PDF\n--zz--\n"
    )
    m = parse(raw)
    assert m.text == "hello"
    assert [a.filename for a in m.attachments] == ["a.pdf"]
    assert "broken MIME: multipart without usable boundary" in m.defects


@pytest.mark.parametrize(
    ("raw", "subject"),
    [
        (b"", ""),
        (b"no headers at all, just text", ""),
        (b"Subject: =?utf-8?B?5L2g5aW9?=\n\n", "你好"),
        (b"Subject: =?utf-8?B?5L2g5aW?=\n\n", "你\ufffd"),  # bad padding, cut char
        (b"\x00\xff\xfe\x80garbage", ""),
    ],
)
def test_degenerate_inputs(raw: bytes, subject: str) -> None:
    m = parse(raw)
    assert m.subject == subject
    assert m.message_id.endswith("@mailflow.invalid")


def test_decode_header_value() -> None:
    assert decode_header_value(None) == ""
    assert decode_header_value("=?gb2312?B?suLK1A==?= =?GBK?B?0MLUsQ==?=") == "测试新员"
    # A multi-byte character split across two encoded words.
    assert decode_header_value("=?utf-8?B?5L2g5Q==?= =?utf-8?B?pb0=?=") == "你好"
    assert decode_header_value("=?utf-8?Q?a_b=21?= c") == "a b! c"
    assert decode_header_value("=?x-unknown?Q?abc?=") == "abc"
    assert decode_header_value("=?big5?B?pKSk5Q==?=") == "中文"


def test_strip_subject_prefixes() -> None:
    assert strip_subject_prefixes("Re: RE: Fw: FW: Fwd: AW: WG: SV: VS: x") == "x"
    assert strip_subject_prefixes("Re[2]: 回复: 回复：答复: 答复：转发: 转发：Antw: y") == "y"
    assert strip_subject_prefixes("[INC-42] Re: stays") == "[INC-42] Re: stays"
    assert strip_subject_prefixes("Regarding: laptop") == "Regarding: laptop"
    assert strip_subject_prefixes("") == ""


@pytest.mark.parametrize(
    ("text", "new"),
    [
        ("ok\n> quoted\nafter", "ok"),
        ("同意\n\n-----原始邮件-----\n发件人: a", "同意"),
        ("yes\n-----Original Message-----\nFrom: a", "yes"),
        ("批准\n------------------ 原始邮件 ------------------\n发件人: x", "批准"),
        ("升级\n在 2024年11月1日 周五 10:00，张三 <z@x.com> 写道：\n> a", "升级"),
        ("好的\n张三 <z@x.com> 于2024年11月1日周五 10:00写道:\nold", "好的"),
        ("done\nOn Mon, Nov 4, 2024 at 9:00 AM Desk <d@x.com> wrote:\nold", "done"),
        ("done\nOn Mon, Nov 4, 2024 at 9:00 AM Desk <d@x.com>\nwrote:\nold", "done"),
        ("resolve\n\nFrom: Desk\nSent: Monday\nTo: me\nSubject: x", "resolve"),
        ("已解决\n发件人: 服务台\n日期: 2024年11月1日\n主题: x", "已解决"),
        ("a\n________________________________\nFrom: Desk <d@x.com>\nSent: x", "a"),
        ("thanks\n-- \nBob\nIT", "thanks"),
        ("He wrote: the log is attached\nmore\n\n\n", "He wrote: the log is attached\nmore"),
        ("The vendor wrote:\nsee below", "The vendor wrote:\nsee below"),
        ("From: the start of the story\nthere was text", "From: the start of the story\n"
         "there was text"),
    ],
)
def test_strip_quoted(text: str, new: str) -> None:
    assert strip_quoted(text) == new


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=3000))
def test_parse_never_raises_on_arbitrary_bytes(raw: bytes) -> None:
    m = parse(raw)
    assert isinstance(m, ParsedMail) and m.message_id


_SEEDS = [p.read_bytes() for p in ALL_FIXTURES]


@st.composite
def mutated_fixture(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(_SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.integers(0, 3))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == 0 and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == 1:
            data[pos:pos] = draw(st.binary(min_size=1, max_size=40))
        elif op == 2:
            del data[pos : pos + draw(st.integers(1, 200))]
        else:
            data[pos:pos] = draw(st.sampled_from(
                [b"\n--", b"=?gbk?B?", b"?=", b"\nContent-Type: multipart/mixed\n",
                 b"\n\n", b"charset=x-y", b"base64", b"\r\n", b">", b"%"]
            ))
    return bytes(data)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_fixture())
def test_parse_never_raises_on_mutated_fixtures(raw: bytes) -> None:
    m = parse(raw)
    assert isinstance(m, ParsedMail) and m.message_id
    assert isinstance(m.text, str) and isinstance(m.new_text, str)


# -- what real senders do: Latin-1 that pairs up, a BOM, short base64, raw 8-bit names ---


def test_latin1_labelled_as_such_keeps_its_label_when_accented_letters_pair_up():
    for text in ("Mit freundlichen Grüßen", "Solicitação de instalação"):
        assert decode_bytes(text.encode("latin-1"), "iso-8859-1") == text
    assert decode_header_value("=?iso-8859-1?q?Gr=FC=DFe?=") == "Grüße"
    # GBK mislabelled as Latin-1 (old Chinese clients) is still read as Chinese.
    chinese = "打印机卡纸，无法打印"
    assert decode_bytes(chinese.encode("gbk"), "iso-8859-1") == chinese


def test_a_utf8_byte_order_mark_is_no_text():
    raw = (b"From: a@example.test\r\nSubject: x\r\nContent-Type: text/plain; charset=utf-8"
           b"\r\n\r\n\xef\xbb\xbf\xe5\xb7\xb2\xe8\xa7\xa3\xe5\x86\xb3\r\n")
    assert parse(raw).new_text == "已解决"
    assert decode_bytes(b"\xef\xbb\xbfresolve", None) == "resolve"


def test_base64_one_character_past_a_group_is_decoded_not_kept_as_base64():
    body = base64.b64encode("打印机坏了，请尽快处理。谢谢！".encode("gbk")).decode()
    raw = ("From: u@example.test\r\nSubject: x\r\nContent-Type: text/plain; charset=gb2312\r\n"
           f"Content-Transfer-Encoding: base64\r\n\r\n{body[:-3]}\r\n").encode()
    assert parse(raw).text.startswith("打印机坏了，请尽快处理")


@pytest.mark.parametrize("charset", ["utf-8", "gbk"])
def test_a_raw_8bit_attachment_name_is_decoded(charset):
    raw = (b"From: u@example.test\r\nSubject: x\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
           b"Content-Type: text/plain; charset=utf-8\r\n\r\nsee attachment\r\n--b\r\n"
           b'Content-Type: image/png\r\nContent-Disposition: attachment; filename="'
           + "故障截图.png".encode(charset) + b'"\r\nContent-Transfer-Encoding: base64\r\n\r\n'
           + b"QUFB\r\n--b--\r\n")
    assert [a.filename for a in parse(raw).attachments] == ["故障截图.png"]


def test_a_display_name_is_cut_to_fit_its_column():
    raw = make_mail("u@example.test", "x", "y", name="信息中心运维部" * 50)
    assert parse(raw).from_name == ("信息中心运维部" * 50)[:NAME_LIMIT]
