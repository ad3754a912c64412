"""The service-request form (seed §4.2 step 2), read from `key: value` lines of a mail.

Keys may be written in Chinese or English (`申请类型：账号` or `Request type: account`),
with full-width or ASCII colons, optionally behind a list marker (`1.`, `-`, `•`), or as
the two cells of a table row pasted from Word. Values are kept as written. Field names
(used in `[requests.required_fields]`):

  request_type        申请类型 / request type
  line_type           行类型 / line type
  item_type           项类型 / item type
  reason              申请原因 / reason
  receiving_location  收货地点 / 仓库 / receiving location / warehouse
  consignee_location  收货人位置 / consignee location
  related             关联事件 / 关联变更 / related — refs such as INC-12 become links

A `reason` that is not written as a field is taken from the mail's own words (the text
left when the form lines are removed), so a plain request mail still has one.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

FIELDS: tuple[str, ...] = (
    "request_type",
    "line_type",
    "item_type",
    "reason",
    "receiving_location",
    "consignee_location",
    "related",
)

LABELS: dict[str, str] = {
    "request_type": "申请类型 / Request type",
    "line_type": "行类型 / Line type",
    "item_type": "项类型 / Item type",
    "reason": "申请原因 / Reason",
    "receiving_location": "收货地点（仓库） / Receiving location (warehouse)",
    "consignee_location": "收货人位置 / Consignee location",
    "related": "关联事件/变更 / Related incidents or changes",
}

# The label a requester copies to fill a field in (first Chinese alias).
FILL_IN: dict[str, str] = {
    "request_type": "申请类型",
    "line_type": "行类型",
    "item_type": "项类型",
    "reason": "申请原因",
    "receiving_location": "收货地点",
    "consignee_location": "收货人位置",
    "related": "关联事件",
}

FILL_IN_EN: dict[str, str] = {
    "request_type": "Request type",
    "line_type": "Line type",
    "item_type": "Item type",
    "reason": "Reason",
    "receiving_location": "Receiving location",
    "consignee_location": "Consignee location",
    "related": "Related",
}

_ALIASES: dict[str, tuple[str, ...]] = {
    "request_type": ("申请类型", "请求类型", "服务类型", "request type", "request_type", "type"),
    "line_type": ("行类型", "line type", "line_type"),
    "item_type": ("项类型", "物品类型", "项目类型", "item type", "item_type", "item"),
    "reason": ("申请原因", "申请理由", "原因", "理由", "reason", "justification"),
    "receiving_location": (
        "收货地点", "收货仓库", "仓库", "receiving location", "receiving_location", "warehouse",
    ),
    "consignee_location": (
        "收货人位置", "收货人地点", "收货人地址", "consignee location", "consignee_location",
        "consignee",
    ),
    "related": (
        "关联事件", "关联变更", "关联交互", "关联工单", "相关事件", "相关变更",
        "related incidents", "related changes", "related", "related_to",
    ),
}
KEYS: dict[str, str] = {
    alias.casefold(): name for name, aliases in _ALIASES.items() for alias in aliases
}

# Request types a requester may name in the form, in their own words → the type key used
# for routing (the keys of [roles.approvers] etc.). Configured type keys match as well.
TYPE_WORDS: dict[str, str] = {
    "账号": "account", "帐号": "account", "账户": "account", "帐户": "account",
    "邮箱": "account", "account": "account",
    "权限": "permission", "访问权限": "permission", "permission": "permission",
    "软件": "software", "软件安装": "software", "software": "software",
    "硬件": "hardware", "硬件领用": "hardware", "设备": "hardware", "设备领用": "hardware",
    "hardware": "hardware",
    "网络": "network-access", "网络开通": "network-access", "vpn": "network-access",
    "上网": "network-access", "network": "network-access", "network-access": "network-access",
    "其他": "other", "其它": "other", "other": "other",
}

# `key: value`, behind an optional list marker; a table pasted from Word arrives as
# `key| value` or `key：| value` (cells joined by `|`, see mail.html_to_text). Matched
# against the line without its outer spaces and bars (see _cells); every run of spaces is
# taken whole (`\s*+`), as no two parts may backtrack over the same run.
_LINE = re.compile(
    r"(?:[-*•·]\s*+|\d{1,2}[.)、]\s*+|[（(]\d{1,2}[)）]\s*+)?"
    r"(?P<key>[^:：|\n]{1,24}?)\s*+(?:[:：]\s*+\|?|\|)\s*+(?P<value>.*)"
)
REF = re.compile(r"\b(INC|REQ|CHG|IR)\s*-\s*(\d{1,9})\b", re.IGNORECASE)


@dataclass
class Form:
    """The fields found in a text, and the text that was not a field."""

    fields: dict[str, str] = field(default_factory=dict)
    links: list[str] = field(default_factory=list)
    prose: str = ""


def _key(raw: str) -> str | None:
    key = " ".join(unicodedata.normalize("NFKC", raw).replace("_", " ").split()).casefold()
    return KEYS.get(key) or KEYS.get(key.replace(" ", "_")) or KEYS.get(key.replace(" ", ""))


def refs_in(text: str) -> list[str]:
    """Ticket and change refs named in a text, normalised (`inc - 12` → `INC-12`)."""
    found = (f"{m.group(1).upper()}-{int(m.group(2))}" for m in REF.finditer(text))
    return list(dict.fromkeys(found))


def _cells(line: str) -> str:
    """A line without its outer spaces and one table bar at either end."""
    line = line.strip()
    if line.startswith("|"):
        line = line[1:].lstrip()
    if line.endswith("|"):
        line = line[:-1].rstrip()
    return line


def _field(line: str) -> tuple[str, str] | None:
    """(field name, value) of a form line; the value as written (full-width kept)."""
    for candidate in (line, unicodedata.normalize("NFKC", line)):  # e.g. "１．申请类型"
        match = _LINE.match(_cells(candidate))
        name = _key(match.group("key")) if match else None
        if match is not None and name is not None:
            return name, match.group("value").strip()
    return None


def parse(text: str, fallback: str = "") -> Form:
    """The form fields in `text`; an empty value never counts (a blank template line).

    A reason goes on over the lines that follow it up to a blank line or the next field
    (mail clients wrap long lines). Fields found only in `fallback` (the mail a request
    was forwarded from) fill the gaps.
    """
    values: dict[str, list[list[str]]] = {}  # each field's values, each value its lines
    links: dict[str, None] = {}
    prose: list[str] = []
    wrapping: list[str] | None = None  # the lines of the reason just read, which go on
    for line in (text or "").splitlines():
        found = _field(line)
        if found is None:
            if wrapping is not None and line.strip():
                wrapping.append(line.strip())
            else:
                wrapping = None
                prose.append(line)
            continue
        name, value = found
        wrapping = None
        if not value:
            continue
        if name == "related":
            links.update(dict.fromkeys(refs_in(value)))
        lines = [value]
        values.setdefault(name, []).append(lines)
        if name == "reason":
            wrapping = lines
    form = Form(
        fields={name: "; ".join("\n".join(v) for v in vs) for name, vs in values.items()},
        links=list(links),
        prose="\n".join(prose).strip(),
    )
    if fallback and fallback != text:
        earlier = parse(fallback)
        for name, value in earlier.fields.items():
            form.fields.setdefault(name, value)
        links.update(dict.fromkeys(earlier.links))
        form.links = list(links)
    return form


def request_type_of(value: str, known: Iterable[str] = ()) -> str | None:
    """The routing type a requester's words name, or None when they name none we know."""
    word = " ".join(unicodedata.normalize("NFKC", value).split()).casefold()
    for key in known:
        if key.casefold() == word and key != "default":
            return key
    return TYPE_WORDS.get(word)


def merge(current: Mapping[str, Any] | None, form: Form) -> dict[str, Any]:
    """The stored form with newly given fields added or replaced, links accumulated."""
    merged = dict(current or {})
    merged.update(form.fields)
    links = dict.fromkeys(merged.get("links") or [])
    links.update(dict.fromkeys(form.links))
    merged["links"] = list(links)
    return merged


def missing(form: Mapping[str, Any], required: Iterable[str]) -> list[str]:
    """Required fields with no value, in the order they are listed."""
    return [name for name in required if not str(form.get(name) or "").strip()]
