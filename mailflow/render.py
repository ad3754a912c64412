"""Jinja2 templates, one file per notification, in zh-CN (first) and en.

A template `NAME.txt` defines `{% block subject %}` and `{% block body %}`; `NAME.html`, when
present, is an HTML alternative (autoescaped). Macros in `_macros.txt` are there as `m`.
Templates beside the config override the shipped ones; a language falls back to zh-CN.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import jinja2

PACKAGE_TEMPLATES = Path(__file__).parent / "default" / "templates"


@dataclass(frozen=True)
class Rendered:
    subject: str
    text: str
    html: str | None = None


class Renderer:
    """Renders notifications in the desk's language and time zone."""

    def __init__(self, directory: Path, language: str, tz: ZoneInfo) -> None:
        self.language = language
        self.tz = tz
        search = []
        for base in dict.fromkeys([directory, PACKAGE_TEMPLATES]):
            search += [base / language, base / "zh-CN"]
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader([str(p) for p in search]),
            autoescape=jinja2.select_autoescape(enabled_extensions=("html",), default=False),
            undefined=jinja2.ChainableUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=False,
            auto_reload=False,  # read once; SIGHUP builds a new Renderer (Desk.reload_config)
        )
        self.env.filters["local"] = self.local
        # Shared macros (summary, footer, how to reply) are available to every template as `m`.
        self.env.globals["m"] = self.env.get_template("_macros.txt").module
        # Which notifications have an HTML alternative: asked once, not on every mail.
        self._html = {n[:-5] for n in self.env.list_templates(extensions=["html"])}

    def local(self, value: datetime | None, fmt: str = "%Y-%m-%d %H:%M") -> str:
        """A UTC datetime shown in the desk's time zone."""
        return value.astimezone(self.tz).strftime(fmt) if value else "-"

    def _block(self, template: jinja2.Template, name: str, context: dict[str, Any]) -> str:
        render = template.blocks.get(name)
        if render is None:
            raise jinja2.TemplateError(f"template {template.name} has no {{% block {name} %}}")
        return "".join(render(template.new_context(context))).strip()

    def render(self, name: str, **context: Any) -> Rendered:
        template = self.env.get_template(f"{name}.txt")
        subject = " ".join(self._block(template, "subject", context).split())
        text = self._block(template, "body", context) + "\n"
        html = None
        if name in self._html:
            html = self.env.get_template(f"{name}.html").render(**context)
        return Rendered(subject, text, html)

    def names(self) -> list[str]:
        return sorted(
            {n[:-4] for n in self.env.list_templates(extensions=["txt"]) if not n.startswith("_")}
        )
