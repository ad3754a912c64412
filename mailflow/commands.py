"""Commands read from the first lines of the new text of a reply (English and Chinese).

People write as they write to a colleague: a greeting may come first (`您好：`, `Hi team,`)
and a signature last (their name, department and phone). The greeting is passed over to
find the command, and the signature is no part of what the command says (a reason, a
solution) nor of whether a reply says only thanks.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

# word → action; longest words are tried first so "已解决" wins over "解决".
WORDS: dict[str, str] = {
    "resolve": "resolve",
    "resolved": "resolve",
    "已解决": "resolve",
    "解决": "resolve",
    "escalate": "escalate",
    "升级": "escalate",
    "assign": "assign",
    "指派": "assign",
    "priority": "priority",
    "优先级": "priority",
    "pending": "pending",
    "待用户": "pending",
    "confirm": "confirm",
    "确认": "confirm",
    "reopen": "reopen",
    "重开": "reopen",
    "未解决": "reopen",
    "problem": "problem",
    "转问题": "problem",
    "approve": "approve",
    "同意": "approve",
    "批准": "approve",
    "reject": "reject",
    "驳回": "reject",
    "拒绝": "reject",
    "done": "done",
    "完成": "done",
    "已完成": "done",
    "note": "note",
    "内部": "note",
    "cc": "cc",
    "抄送": "cc",
    "uncc": "uncc",
    "取消抄送": "uncc",
    "vendor": "vendor",
    "转厂商": "vendor",
    "category": "category",
    "分类": "category",
    "status": "status",
    "状态": "status",
    "查询": "status",
}
_ORDERED = sorted(WORDS, key=len, reverse=True)
_SEPARATORS = " \t:：,，.。!！;；-—"


# A line that only greets: "您好：", "张工，你好！", "各位好", "Hi team,", "Dear Li Si,".
_GREETING = re.compile(
    r"(?:.{0,12}?(?:您好|你好)|(?:各位|大家|.{1,4}(?:老师|经理|领导|同事)们?)好"
    r"|(?:hi|hello|hey|dear|good (?:morning|afternoon|evening))(?:\s+[\w.' -]{1,30})?)"
    r"[\s!,:.。~]*",
    re.IGNORECASE,
)
# A line that closes a mail before the signature: "此致 敬礼", "Best regards,", "谢谢！".
_CLOSING = re.compile(
    r"(?:此致|敬礼|此致敬礼|祝好|顺祝.{0,6}|谢谢|多谢|感谢|best regards|kind regards|regards"
    r"|best wishes|best|cheers|thanks|thank you|many thanks)[\s!,:.。~]*",
    re.IGNORECASE,
)
_CONTACT = re.compile(
    r"(?:电话|手机|座机|分机|传真|邮箱|tel|phone|mobile|fax|e-?mail)\s*[:：]?\s*\S"
    r"|\+?\d[\d() -]{6,}\d|[^\s@]+@[^\s@]+\.\w+",
    re.IGNORECASE,
)
_SENTENCE_END = re.compile(r"[。？！?!]")
# An address in an `assign` argument; the look-behind makes each run of address characters
# one attempt (else a 40,000-letter word is scanned again from each of its letters).
_ADDRESS = re.compile(r"(?<![^\s<>@:：,，])[^\s<>@:：,，]+@[^\s<>@,，]+")
SIGNATURE_LINES = 6  # at most this many lines, each of at most SIGNATURE_WIDTH characters
SIGNATURE_WIDTH = 40
GREETING_WIDTH = 80  # a longer line is no greeting (and is not matched against one)


@dataclass(frozen=True)
class Command:
    """What a reply asks for; `comment` when its first lines hold no command."""

    action: str
    argument: str = ""  # e.g. the address for assign, "P1" for priority, the reason for reject
    text: str = ""  # the whole new text (a comment is kept and forwarded as written)
    said: str = ""  # the new text without its greeting and signature (default: `text`)

    def __post_init__(self) -> None:
        if not self.said:  # a text is never all greeting and signature: its first line stays
            object.__setattr__(self, "said", self.text)


def _normalise(line: str) -> str:
    return unicodedata.normalize("NFKC", line).strip()


def _key(line: str) -> str:
    return "".join(_normalise(line).casefold().split())


def _names(signer: str) -> set[str]:
    """How a sender may sign, spaces left out: the display name, its words in either order,
    one word, or what it gives in brackets ("Li, Si (李四)": lisi, sili, li, si, 李四)."""
    name = _normalise(signer).casefold()
    inner = ["".join(part.split()) for part in re.findall(r"\(([^()]*)\)", name)]
    words = [w for w in re.split(r"[\s,/|]+", re.sub(r"\([^()]*\)", " ", name)) if w]
    keys = {_key(signer), "".join(words), "".join(reversed(words)), *words, *inner}
    return {k for k in keys if len(k) >= 2}


def _short(lines: list[str]) -> bool:
    return len(lines) <= SIGNATURE_LINES and all(len(x.strip()) <= SIGNATURE_WIDTH for x in lines)


def _signature_at(lines: list[str], signer: str) -> int | None:
    """Where a trailing signature starts (never at the first line), or None.

    A signature starts at a `-- ` line, a closing line ("此致", "Best regards,") or a line
    naming the sender, when what follows is short. Without either, a last paragraph of a
    few short lines with no sentence in them, the first a name's length, that gives a phone
    number or an address is one too.
    """
    names = _names(signer)
    for i in range(max(1, len(lines) - SIGNATURE_LINES), len(lines)):  # what follows is short
        line = _normalise(lines[i])
        starts = line == "--" or _key(line) in names or _CLOSING.fullmatch(line) is not None
        if starts and _short(lines[i:]):
            return i
    blank = max((i for i, line in enumerate(lines) if not line.strip()), default=None)
    if blank is None:
        return None
    block = lines[blank + 1 :]
    if (
        len(block) >= 2
        and _short(block)
        and len(block[0].strip()) <= 12
        and not any(_SENTENCE_END.search(line) for line in block)
        and any(_CONTACT.search(_normalise(line)) for line in block)
    ):
        return blank + 1
    return None


def _greeting(line: str) -> bool:
    """Whether a line is blank or only greets."""
    line = _normalise(line)
    return not line or (len(line) <= GREETING_WIDTH and _GREETING.fullmatch(line) is not None)


def essential_lines(text: str, signer: str = "") -> list[str]:
    """The lines of a reply's new text without the greeting before it and the signature
    after it (blank lines at either end dropped too)."""
    lines = text.strip().splitlines()
    start = 0
    while start < len(lines) - 1 and _greeting(lines[start]):
        start += 1
    lines = lines[start:]
    end = _signature_at(lines, signer)
    if end is not None:
        lines = lines[:end]
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def _after(line: str, n: int) -> str:
    """What follows, in `line` as written, the first `n` characters of its NFKC form."""
    for k in range(len(line) + 1):
        if len(unicodedata.normalize("NFKC", line[:k]).lstrip()) >= n:
            return line[k:]
    return ""


def parse(new_text: str, signer: str = "") -> Command:
    """Read the command from the first line of the new text after any greeting; `signer` is
    the sender's display name, which marks where a signature starts."""
    text = new_text.strip()
    lines = essential_lines(text, signer)
    said = "\n".join(lines)
    first = _normalise(lines[0]) if lines else ""
    lowered = first.casefold()
    for word in _ORDERED:
        if not lowered.startswith(word.casefold()):
            continue
        rest = first[len(word) :]
        action = WORDS[word]
        # The word must stand alone: "确认一下…" and "resolvedly" are prose, not commands.
        if rest and not (
            rest[0] in _SEPARATORS
            or rest[0].isspace()
            or (action == "priority" and rest[0] in "Pp")
        ):
            continue
        argument = rest.strip(_SEPARATORS).strip()
        if action == "priority":
            match = re.search(r"\bP?([1-4])\b", argument, re.IGNORECASE)
            argument = f"P{match.group(1)}" if match else ""
        elif action == "assign":
            match = _ADDRESS.search(argument)
            argument = match.group(0).lower().rstrip(".。") if match else ""
        elif action in (
            "reject", "note", "resolve", "pending", "reopen", "done", "problem", "escalate"
        ):
            # Text goes to people as written: full-width punctuation, a closing "！".
            argument = _after(lines[0].strip(), len(word)).lstrip(_SEPARATORS + "\u3000")
            remaining = "\n".join(lines[1:]).strip()
            argument = "\n".join(p for p in (argument.rstrip(), remaining) if p)
        return Command(action, argument, text, said)
    return Command("comment", "", text, said)
