"""Jinja2 templates, one file per notification, in zh-CN (first) and en.

A template `NAME.txt` defines `{% block subject %}` and `{% block body %}`, written once. The
body is rendered twice: as the text part (`format == "text"`) and as the HTML part
(`format == "html"`, autoescaped), the shared macros of `_macros.txt` (there as `m`) laying
out ticket fields and command lists as text lines or as tables with action links. Free text
becomes paragraphs and the page is framed by `_layout.html`. A hand-written `NAME.html`
(e.g. the review report with its charts) is used instead when present.

Templates beside the config override the shipped ones; a language falls back to zh-CN.
Every code a person reads has a label (`LABELS`, filters `tier`, `status`, `priority`,
`kind`, `action`, and `category` from the rules), and sentences built in Python are
`Phrase`s, one text per language, picked by the `say` filter.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote
from zoneinfo import ZoneInfo

import jinja2
from markupsafe import Markup

PACKAGE_TEMPLATES = Path(__file__).parent / "default" / "templates"
LANGUAGES = ("zh-CN", "en")
FORMATS = ("text", "html")
# Where the recipient's own reply address goes in an action link: replaced for each
# recipient when the mail is addressed (notify.addressed), since the MIME is built once.
REPLY_PLACEHOLDER = "mailflow-reply-address.invalid"
TIME_FORMAT = "%Y-%m-%d %H:%M %Z"
# What the mail being rendered is: its subject, rules and desk settings, for the macros
# (imported without the template's context) and filters. Per thread: jobs render beside mail.
_MAIL: ContextVar[dict[str, Any] | None] = ContextVar("mail", default=None)

# What a person reads instead of a code, by language.
LABELS: dict[str, dict[str, dict[str, str]]] = {
    "zh-CN": {
        "tier": {"L1": "一线 服务台", "L2": "二线 桌面支持", "L3": "三线 专家", "IM": "事件经理"},
        "status": {
            "open": "处理中", "pending": "等待用户", "resolved": "已解决待确认",
            "closed": "已关闭", "problem": "已转问题管理", "pending_approval": "待审批",
            "approved": "已批准", "rejected": "已驳回", "fulfilled": "已完成待确认",
        },
        "priority": {"P1": "P1 紧急", "P2": "P2 高", "P3": "P3 中", "P4": "P4 低"},
        "kind": {"incident": "事件", "request": "服务请求"},
        "action": {
            "resolve": "已解决", "escalate": "升级", "assign": "指派", "priority": "优先级",
            "pending": "待用户", "confirm": "确认", "reopen": "未解决", "problem": "转问题",
            "approve": "同意", "reject": "驳回", "done": "完成", "note": "内部:",
            "comment": "留言",
        },
    },
    "en": {
        "tier": {
            "L1": "L1 service desk", "L2": "L2 desktop support", "L3": "L3 experts",
            "IM": "incident manager",
        },
        "status": {
            "open": "open", "pending": "waiting for the requester",
            "resolved": "resolved, awaiting confirmation", "closed": "closed",
            "problem": "handed to problem management", "pending_approval": "awaiting approval",
            "approved": "approved", "rejected": "rejected",
            "fulfilled": "fulfilled, awaiting confirmation",
        },
        "priority": {"P1": "P1 critical", "P2": "P2 high", "P3": "P3 medium", "P4": "P4 low"},
        "kind": {"incident": "incident", "request": "service request"},
        "action": {
            "resolve": "resolve", "escalate": "escalate", "assign": "assign",
            "priority": "priority", "pending": "pending", "confirm": "confirm",
            "reopen": "reopen", "problem": "problem", "approve": "approve", "reject": "reject",
            "done": "done", "note": "note:", "comment": "comment",
        },
    },
}


def label(kind: str, code: str | None, language: str) -> str:
    """The label of a tier, status, priority, kind or action code; the code when unknown."""
    if not code:
        return "-"
    table = LABELS.get(language, LABELS["zh-CN"])[kind]
    return table.get(code, code)


def _mail() -> dict[str, Any]:
    return _MAIL.get() or {}


def _bilingual() -> bool:
    """Whether the desk being rendered for writes zh-CN mail in both languages (for macros,
    which do not see the template's `desk`)."""
    return bool(getattr(_mail().get("desk"), "bilingual", False))


class Phrase(str):
    """A sentence given in every language. As a str it is the bilingual "中文 / English"
    (what events record); `in_(language)` is the one a mail in that language shows."""

    texts: dict[str, str]

    def __new__(cls, texts: Mapping[str, str], **values: Any) -> Phrase:
        filled = {lang: text.format(**values) for lang, text in texts.items()}
        both = " / ".join(filled[lang] for lang in LANGUAGES if lang in filled)
        phrase = super().__new__(cls, both)
        phrase.texts = filled
        return phrase

    def in_(self, language: str) -> str:
        return self.texts.get(language) or self.texts.get("zh-CN") or str(self)


@dataclass(frozen=True)
class Rendered:
    subject: str
    text: str
    html: str | None = None


def mailto(address: str, subject: str, body: str) -> str:
    """A `mailto:` URL (RFC 6068) with the subject and body pre-filled."""
    return f"mailto:{address}?subject={quote(subject, safe='')}&body={quote(body, safe='')}"


class Renderer:
    """Renders notifications in the desk's language and time zone, as text and as HTML."""

    def __init__(self, directory: Path, language: str, tz: ZoneInfo) -> None:
        self.language = language
        self.tz = tz
        search = []
        for base in dict.fromkeys([directory, PACKAGE_TEMPLATES]):
            search += [base / language, base / "zh-CN"]
        loader = jinja2.FileSystemLoader([str(p) for p in search])
        self.envs = {fmt: self._environment(loader, fmt) for fmt in FORMATS}
        self.env = self.envs["text"]
        # Which notifications have a hand-written HTML alternative: asked once.
        self._html = {
            n[:-5] for n in self.env.list_templates(extensions=["html"]) if not n.startswith("_")
        }

    def _environment(self, loader: jinja2.BaseLoader, fmt: str) -> jinja2.Environment:
        env = jinja2.Environment(
            loader=loader,
            autoescape=lambda name: fmt == "html" or bool(name and name.endswith(".html")),
            undefined=jinja2.ChainableUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=False,
            auto_reload=False,  # read once; SIGHUP builds a new Renderer (Desk.reload_config)
        )
        env.filters["local"] = self.local
        for kind in ("tier", "status", "priority", "kind", "action"):
            env.filters[kind] = self._labeller(kind)
        env.filters["category"] = self._category
        env.filters["say"] = self._say
        env.globals.update(
            format=fmt, language=self.language, action=self._action, bilingual=_bilingual
        )
        # Shared macros (summary, commands, footer) are available to every template as `m`.
        env.globals["m"] = env.get_template("_macros.txt").module
        return env

    def _labeller(self, kind: str) -> Any:
        return lambda code: label(kind, code, self.language)

    def _category(self, code: str | None) -> str:
        rules = _mail().get("rules")
        if not code:
            return "-"
        return rules.label(code, self.language) if rules is not None else code

    def _say(self, value: Any) -> str:
        """A Phrase in the mail's language (both, on a bilingual desk); anything else as is."""
        desk = _mail().get("desk")
        if isinstance(value, Phrase) and not getattr(desk, "bilingual", False):
            return value.in_(self.language)
        return "" if value is None else str(value)

    def _action(self, code: str) -> str:
        """The action link of a command: a reply to the recipient's own reply address (filled
        in per recipient), keeping the subject's ticket tag, the command word pre-filled."""
        subject = _mail().get("subject", "")
        word = label("action", code, self.language)
        return mailto(REPLY_PLACEHOLDER, f"Re: {subject}", f"{word} ")

    def local(self, value: datetime | None, fmt: str = TIME_FORMAT) -> str:
        """A UTC datetime shown in the desk's time zone, with the zone."""
        return value.astimezone(self.tz).strftime(fmt) if value else "-"

    def _block(self, template: jinja2.Template, name: str, context: dict[str, Any]) -> str:
        render = template.blocks.get(name)
        if render is None:
            raise jinja2.TemplateError(f"template {template.name} has no {{% block {name} %}}")
        return "".join(render(template.new_context(context))).strip()

    def render(self, name: str, **context: Any) -> Rendered:
        template = self.env.get_template(f"{name}.txt")
        mail = {"rules": context.get("rules"), "desk": context.get("desk")}
        token = _MAIL.set(mail)
        try:
            subject = " ".join(self._block(template, "subject", context).split())
            ref = getattr(context.get("ticket"), "ref", None)
            if ref and f"[{ref}]" not in subject:
                subject = f"[{ref}] {subject}"
            mail["subject"] = subject
            text = _BLANKS.sub("\n\n", self._block(template, "body", context)) + "\n"
            if name in self._html:
                html = self.env.get_template(f"{name}.html").render(**context)
            else:
                html = self._html_part(name, subject, context)
        finally:
            _MAIL.reset(token)
        return Rendered(subject, text, html)

    def _html_part(self, name: str, subject: str, context: dict[str, Any]) -> str:
        """The body rendered with the HTML macro set, its free text made paragraphs, framed."""
        env = self.envs["html"]
        body = _paragraphs(self._block(env.get_template(f"{name}.txt"), "body", context))
        layout = env.get_template("_layout.html")
        return layout.render(mail_subject=subject, body=Markup(body))

    def names(self) -> list[str]:
        return sorted(
            {n[:-4] for n in self.env.list_templates(extensions=["txt"]) if not n.startswith("_")}
        )


_BLANKS = re.compile(r"\n\s*\n(?:\s*\n)+")
_PARAGRAPH = '<p style="margin:0 0 12px 0;">'


def _paragraphs(body: str) -> str:
    """HTML body lines: a line starting with a tag is a block from a macro, kept as it is;
    runs of other (escaped) lines become paragraphs, a blank line ending one."""
    out: list[str] = []
    lines: list[str] = []

    def flush() -> None:
        if lines:
            out.append(_PARAGRAPH + "<br>\n".join(lines) + "</p>")
            lines.clear()

    for raw in body.splitlines():
        line = raw.strip()
        if not line:
            flush()
        elif line.startswith("<"):
            flush()
            out.append(line)
        else:
            lines.append(line)
    flush()
    return "\n".join(out)
