"""What each template is given, as data, and the check of the templates against it.

`VARIABLES` names, per notification, what its `notify.queue(...)` (or `Renderer.render`)
calls pass beside the ones every mail gets (`COMMON`); the environment's globals (`m`,
`format`, `language`, `action`, `bilingual`, jinja2's own) are known to every template.
Partials (`_macros.txt`, `_request.txt`, ...) are imported without the caller's context, so
they may use globals only. `check` reports, for each file the renderer resolves (override
directory first, then the packaged one; each language), its syntax errors with the line,
any variable it is not given and any `ticket.<name>` that a ticket does not have.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from pathlib import Path
from zoneinfo import ZoneInfo

import jinja2
from jinja2 import meta, nodes

from mailflow.models import Ticket
from mailflow.render import LANGUAGES, PACKAGE_TEMPLATES, Renderer

# What notify.queue gives every template (it passes rules and attachments; ticket may be None).
COMMON = frozenset({"ticket", "desk", "rules", "attachments"})
_FORWARDED = ("not_attached",)  # incidents._forwarded (its files go as attachments)
_DIGEST = (
    "recipient", "roles", "day", "as_of", "queue", "queue_total", "states", "approvals",
    "approvals_total", "overview", "empty",
)  # digest.context_for
_REPORT = ("report", "kind", "mail", "when", "charts")  # report.template_context

VARIABLES: dict[str, frozenset[str]] = {
    name: frozenset(given)
    for name, given in {
        "ack": (),
        "approval_decision": ("decision", "reason", "step", "steps"),
        "approval_refused": (
            "action", "code", "received_at", "reissued", "sender", "subject", "why",
        ),
        "approval_request": ("decided", "expires_at", "form", "group", "labels", "step", "steps"),
        "assigned": ("author",),
        "closed": ("reason",),
        "comment": ("author", "text"),
        "comment_to_team": ("author", "internal", "text"),
        "digest_approver": _DIGEST,
        "digest_engineer": _DIGEST,
        "digest_manager": _DIGEST,
        "escalated": ("author", "automatic", "old_tier", "text"),
        "guard_alert": ("at", "detail", "key"),
        "major_incident": _FORWARDED,
        "my_tickets": ("found", "names"),
        "new_incident": (*_FORWARDED, "similar"),
        "not_on_ticket": (),
        "problem": ("author", "events", "text"),
        "question": ("text",),
        "refused": ("allowed", "command", "forwarded", "reason"),
        "reopened": ("author", "text"),
        "reopened_notice": (),
        "report": _REPORT,
        "request_approved": ("decided",),
        "request_closed": ("reason",),
        "request_fulfilled": ("author", "text"),
        "request_missing_fields": ("fill_in", "fill_in_en", "form", "labels", "missing"),
        "request_no_approver": ("group", "step"),
        "request_rejected": ("approver", "reason"),
        "request_submitted": ("form", "labels", "steps"),
        "request_to_executor": ("decided", "form", "labels", "reopened_by", "text"),
        "resolved": ("confirm_by",),
        "sla_breached": ("new_tier", "old_tier", "used"),
        "sla_warning": ("used",),
        "status": ("status_name", "tier_name", "update", "update_name", "update_text"),
        "unproven": ("address", "command", "reason", "received_at"),
        "vendor_handoff": ("author", "category", "text", "vendor"),
        "watcher_added": ("address", "author", "status_name"),
    }.items()
}
# Partials given something of their own (the page frame); any other partial: globals only.
PARTIALS: dict[str, frozenset[str]] = {"_layout": frozenset({"mail_subject", "body"})}
_PACKAGED = Path("mailflow/default/templates")
TICKET_ATTRIBUTES = frozenset(name for name in dir(Ticket) if not name.startswith("_"))


def declared(name: str) -> frozenset[str]:
    """The variables template `name` (no extension) is given; globals aside."""
    if name.startswith("_"):
        return PARTIALS.get(name, frozenset())
    return VARIABLES.get(name, frozenset()) | COMMON


def check(directory: Path, tz: ZoneInfo) -> list[str]:
    """Every problem of the templates the renderer would use, as `file:line: message`."""
    problems: list[str] = []
    seen: set[str] = set()
    for language in LANGUAGES:
        try:
            env = Renderer(directory, language, tz).env
        except jinja2.TemplateSyntaxError as exc:  # a broken _macros.txt
            problems.append(_syntax(exc, directory))
            continue
        except jinja2.TemplateError as exc:  # e.g. no _macros.txt at all
            problems.append(f"{directory}: {' '.join(str(exc).split())}")
            continue
        for template, filename, source in _resolved(env):
            if filename not in seen:
                seen.add(filename)
                problems += _check_one(env, template, filename, source, directory)
    return list(dict.fromkeys(problems))  # a broken partial both languages resolve: once


def _resolved(env: jinja2.Environment) -> Iterator[tuple[str, str, str]]:
    """Each template name with the file the loader picks for it, and its source."""
    assert env.loader is not None
    for template in env.list_templates(extensions=["txt", "html"]):
        source, filename, _ = env.loader.get_source(env, template)
        yield template, filename or template, source


def _check_one(
    env: jinja2.Environment, template: str, filename: str, source: str, directory: Path
) -> list[str]:
    shown = shown_path(filename, directory)
    try:
        tree = env.parse(source, template, filename)
        env.compile(tree, template, filename)  # unknown filters and tests
    except jinja2.TemplateSyntaxError as exc:
        return [_syntax(exc, directory)]
    known = declared(template.rsplit(".", 1)[0]) | set(env.globals) | _assigned(tree)
    problems = [
        f"{shown}:{_line(tree, name)}: `{name}` is not given to this template"
        f"{_nearest(name, known)}"
        for name in sorted(meta.find_undeclared_variables(tree) - known)
    ]
    return problems + [
        f"{shown}:{node.lineno}: a ticket has no `{node.attr}`"
        f"{_nearest(node.attr, TICKET_ATTRIBUTES)}"
        for node in _ticket_attributes(tree)
        if node.attr not in TICKET_ATTRIBUTES
    ]


def _ticket_attributes(tree: nodes.Template) -> Iterator[nodes.Getattr]:
    for node in tree.find_all(nodes.Getattr):
        if isinstance(node.node, nodes.Name) and node.node.name == "ticket":
            yield node


def _assigned(tree: nodes.Template) -> set[str]:
    """Names the template sets itself: jinja2.meta misses a `set` in both branches of an
    `if` inside a loop, read after it."""
    return {n.name for n in tree.find_all(nodes.Name) if n.ctx in ("store", "param")}


def _line(tree: nodes.Template, name: str) -> int:
    """The first line that reads `name`."""
    return min(
        (n.lineno for n in tree.find_all(nodes.Name) if n.name == name and n.ctx == "load"),
        default=1,
    )


def _nearest(word: str, known: frozenset[str] | set[str]) -> str:
    close = difflib.get_close_matches(word, sorted(known), n=1)
    return f"; did you mean `{close[0]}`?" if close else ""


def _syntax(exc: jinja2.TemplateSyntaxError, directory: Path) -> str:
    shown = shown_path(exc.filename or exc.name or "?", directory)
    return f"{shown}:{exc.lineno}: {' '.join(exc.message.split()) if exc.message else exc}"


def shown_path(filename: str, directory: Path) -> str:
    """A template file as a person finds it: under the override directory by that
    directory's name (`templates/zh-CN/ack.txt`), else under the package."""
    path = Path(filename)
    for base, shown in ((directory, Path(directory.name)), (PACKAGE_TEMPLATES, _PACKAGED)):
        if path.is_relative_to(base):
            return str(shown / path.relative_to(base))
    return filename
