"""Hostile and broken mail, generated or mutated from the real-world fixtures.

Used by the property-based test (tests/test_hostile.py, driven by hypothesis' Random) and
by benchmarks/fuzz.py (100,000+ messages). Every function takes a `random.Random`, so a run
is reproducible from its seed.
"""

from __future__ import annotations

import base64
import random
import re
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures" / "mail"
DESK = "itsm@example.test"

HEADERS = [
    "From", "To", "Cc", "Subject", "Message-ID", "In-Reply-To", "References", "Date",
    "Content-Type", "Content-Transfer-Encoding", "MIME-Version", "Content-Disposition",
    "Auto-Submitted", "Sender", "Reply-To", "Precedence", "List-Id", "Return-Path",
    "X-Mailflow", "X-Autoreply", "Authentication-Results", "Received",
]
ADDRESSES = [
    "", " ", "<>", DESK, f'"{DESK}" <evil@evil.test>', "itsm+x@example.test", "ITSM@EXAMPLE.TEST",
    "zhang@example.test", "张三 <zhang@example.test>", "=?gbk?b?1cXI/Q==?= <z@example.test>",
    "undisclosed-recipients:;", "a@b, c@d, , ,", "<@>", "@", "a" * 1000 + "@example.test",
    "desk1@example.test", "im@example.test", "MAILER-DAEMON@mx.example.test",
]
SUBJECTS = [
    "[INC-1] 打印机", "Re: [REQ-1] 申请", "[INC-999999999999] x", "回复：[INC-1]",
    "=?utf-8?q?hello=0D=0ABcc:_evil@evil.test?=", "=?utf-8?b?" + "A" * 30 + "?=",
    "=?unknown-8bit?q?=FF=FE?=", "=?utf-7?q?+ZeVnLIqe-?=", "=?utf-8?q?broken", "?=",
    "自动回复：休假", "Undelivered Mail Returned to Sender", "系统退信",
]
CTYPES = [
    "multipart/mixed; boundary=b", "multipart/alternative; boundary=b", "multipart/mixed",
    "multipart/report; report-type=delivery-status; boundary=b", "message/rfc822",
    "message/delivery-status", "text/html; charset=gb2312", "text/plain; charset=x-unknown",
    "text/plain; charset=\"utf-16\"", "text/plain; charset=base64", "application/octet-stream",
    "text/rfc822-headers", "multipart/related; boundary=\"\"", "text/plain; charset=rot13",
]
ENCODINGS = ["base64", "quoted-printable", "8bit", "x-uuencode", "7bit", "binary", "bogus"]
DISPOSITIONS = [
    "attachment; filename*=gbk''%D6%D0%CE%C4.txt", "attachment; filename=\"\x00.exe\"",
    "inline", "attachment; filename=\"../../etc/passwd\"",
]
MISC = [
    "auto-replied", "auto-generated", "no", "bulk", "list", "<list.example.test>",
    "Mon, 32 Foo 2026 25:61:61 +9999", "Tue, 24 Nov 2026 10:00:00 +0800", "0",
    "<a@b> <c@d> " * 50, "<mf.0123@example.test>", "\t folded\r\n value",
    "mx.example.test; dkim=pass header.d=example.test; dmarc=pass",
]
VALUES = ADDRESSES + SUBJECTS + CTYPES + ENCODINGS + DISPOSITIONS + MISC
BODIES = [
    "已解决\n问题已处理", "resolve", "assign evil@evil.test\r\nBcc: evil@evil.test", "确认",
    "同意", "reject no", "priority P1", "升级", "转问题", "<script>alert(1)</script>",
    "-----原始邮件-----\n发件人: a\n已解决", "> quoted\n>> 已解决", "=?utf-8?q?x?=",
    "This is the mail system at host mx.example.test.\n<x@example.test>: 550 5.1.1 no",
    "--b\r\nContent-Type: text/plain\r\n\r\npart\r\n--b--", "begin 644 x\n`\nend\n",
    "\x00\x01\x02\xff", "\u202e\u200b\ufeff", "中文" * 200, "a" * 70000,
]
MUTATIONS = ("cut", "drop", "repeat", "insert", "flip", "swap_lines", "truncate", "crlf")


def fixtures() -> list[bytes]:
    return [p.read_bytes() for p in sorted(FIXTURES.glob("*.eml"))]


def _text(rng: random.Random, size: int) -> str:
    alphabet = "abcXYZ 0129<>@:;,\"=?\r\n\t\x00\x7f中文汉字，。é\u202e\U0001f600"
    return "".join(rng.choice(alphabet) for _ in range(rng.randrange(size + 1)))


def _value(rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.6:
        return rng.choice(VALUES)
    if roll < 0.8:
        return _text(rng, 60)
    encoded = base64.b64encode(_text(rng, 30).encode("utf-8", "replace")).decode()
    return f"=?{rng.choice(['utf-8', 'gb2312', 'x-bogus', 'utf-7'])}?b?{encoded}?="


def _part(rng: random.Random, depth: int) -> str:
    headers = [f"Content-Type: {rng.choice(CTYPES)}"]
    if rng.random() < 0.5:
        headers.append(f"Content-Transfer-Encoding: {rng.choice(ENCODINGS)}")
    if rng.random() < 0.3:
        headers.append(f"Content-Disposition: {rng.choice(DISPOSITIONS)}")
    body = _body(rng, depth + 1)
    return "\r\n".join(headers) + "\r\n\r\n" + body


def _body(rng: random.Random, depth: int = 0) -> str:
    if depth < 3 and rng.random() < 0.3:
        boundary = rng.choice(["b", "b", "", "--", "x" * 80])
        parts = [_part(rng, depth) for _ in range(rng.randrange(4))]
        end = "" if rng.random() < 0.2 else f"\r\n--{boundary}--\r\n"
        return "".join(f"\r\n--{boundary}\r\n{p}" for p in parts) + end
    return rng.choice(BODIES) if rng.random() < 0.6 else _text(rng, 400)


def generate(rng: random.Random) -> bytes:
    """A message built from hostile header values and bodies."""
    lines = []
    for _ in range(rng.randrange(14)):
        lines.append(f"{rng.choice(HEADERS)}: {_value(rng)}")
    if rng.random() < 0.8:
        lines.insert(0, f"From: {rng.choice(ADDRESSES)}")
    if rng.random() < 0.5:
        lines.append(f"Message-ID: <g{rng.randrange(10**9)}@fuzz.example.test>")
    separator = rng.choice(["\r\n", "\n", "\r"])
    raw = separator.join(lines) + separator + separator + _body(rng)
    return raw.encode(rng.choice(["utf-8", "utf-8", "gb18030", "latin-1"]), "replace")


def mutate(rng: random.Random, raw: bytes, rounds: int | None = None) -> bytes:
    """A real mail damaged a few times: bytes cut, repeated, inserted, flipped, reordered."""
    data = bytearray(raw)
    for _ in range(rounds if rounds is not None else rng.randrange(1, 6)):
        if not data:
            data.extend(b"From: x@example.test\r\n\r\n")
        op = rng.choice(MUTATIONS)
        at = rng.randrange(len(data))
        span = rng.randrange(1, 200)
        if op == "cut":
            del data[at : at + span]
        elif op == "drop":
            del data[at:]
        elif op == "repeat":
            data[at:at] = data[at : at + span] * rng.randrange(1, 20)
        elif op == "insert":
            data[at:at] = rng.choice(
                [b"\r\n", b"\n\n", b"\x00", b"=?", b"?=", b"--b\r\n", b": ", b"\xff\xfe",
                 b"Content-Type: multipart/mixed; boundary=\r\n",
                 b"Subject: =?utf-8?q?x=0D=0AX-Injected:_1?=\r\n", _value(rng).encode()]
            )
        elif op == "flip":
            data[at] = rng.randrange(256)
        elif op == "swap_lines":
            lines = bytes(data).split(b"\n")
            rng.shuffle(lines)
            data = bytearray(b"\n".join(lines))
        elif op == "truncate":
            del data[rng.randrange(len(data) // 2 + 1):]
        elif op == "crlf":
            data = bytearray(bytes(data).replace(b"\r\n", rng.choice([b"\n", b"\r", b"\r\r\n"])))
    return bytes(data)


def renamed(raw: bytes, n: int) -> bytes:
    """The mail with a Message-ID of its own, so copies of one fixture are not duplicates."""
    return re.sub(rb"(?im)^(message-id:[ \t]*<?)", rb"\g<1>fz%d." % n, raw, count=1)


def one(rng: random.Random, corpus: list[bytes]) -> tuple[str, bytes]:
    """A generated or a mutated message, half and half, with its kind."""
    if rng.random() < 0.5:
        return "generated", generate(rng)
    return "mutated", mutate(rng, renamed(rng.choice(corpus), rng.randrange(10**9)))
