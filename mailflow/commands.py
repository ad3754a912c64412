"""Commands read from the first lines of the new text of a reply (English and Chinese)."""

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
}
_ORDERED = sorted(WORDS, key=len, reverse=True)
_SEPARATORS = " \t:：,，.。!！;；-—"


@dataclass(frozen=True)
class Command:
    """What a reply asks for; `comment` when its first line is no command."""

    action: str
    argument: str = ""  # e.g. the address for assign, "P1" for priority, the reason for reject
    text: str = ""  # the whole new text (solution, reason, comment)


def _normalise(line: str) -> str:
    return unicodedata.normalize("NFKC", line).strip()


def parse(new_text: str) -> Command:
    """Read the command from the first non-empty line of the new text."""
    text = new_text.strip()
    first = next((_normalise(line) for line in text.splitlines() if line.strip()), "")
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
            match = re.search(r"[^\s<>@:：,，]+@[^\s<>@,，]+", argument)
            argument = match.group(0).lower().rstrip(".。") if match else ""
        elif action in ("reject", "note", "resolve", "pending", "reopen", "done", "problem"):
            remaining = "\n".join(text.splitlines()[1:]).strip()
            argument = "\n".join(p for p in (argument, remaining) if p)
        return Command(action, argument, text)
    return Command("comment", "", text)
