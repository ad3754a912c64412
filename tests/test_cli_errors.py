"""The command line's errors per the contract: one clear sentence on stderr, a non-zero exit
status, never a traceback; `check` names every problem; `show --json` in a fixed order."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, event, select
from support import REPO, desk_config, make_desk, make_mail, run_once, write_config

import mailflow.cli
import mailflow.db
from mailflow.cli import main
from mailflow.config import load_config
from mailflow.daemon import Daemon
from mailflow.models import Inbound, Outbox


def cli(config: Path, capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["--config", str(config), *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def one_sentence(err: str) -> str:
    """stderr holds exactly one line, from mailflow."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("mailflow: ") and "Traceback" not in err
    return lines[0]


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A local TCP port that refuses connections: bound (so no one else takes it), not
    listening."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


# -- run --once -------------------------------------------------------------------------------


def test_run_once_delivers_the_outbox_but_exits_1_when_fetching_failed(
    tmp_path, capsys, refused_port
):
    imap = {
        "host": "127.0.0.1",
        "port": refused_port,
        "security": "none",
        "username": "itsm@example.test",
        "password": "pw",
        "timeout": 5,
        "idle": False,
    }
    config = desk_config(tmp_path, imap=imap)
    eml = tmp_path / "m.eml"
    eml.write_bytes(make_mail("pipe@example.test", "打印机卡纸", "三楼打印机"))
    assert cli(config, capsys, "ingest", str(eml))[:2] == (0, "processed INC-1\n")
    outgoing = tmp_path / "outgoing"
    assert not list(outgoing.glob("*.eml"))

    code, out, err = cli(config, capsys, "run", "--once")

    assert code == 1
    line = one_sentence(err)
    assert "IMAP connection to 127.0.0.1" in line and "refused" in line
    assert out.startswith("fetched 0, processed 0, sent ")
    assert len(list(outgoing.glob("*.eml"))) >= 2, "the outbox was delivered all the same"


def test_run_once_without_errors_still_exits_0(tmp_path, capsys):
    config = desk_config(tmp_path)
    code, out, err = cli(config, capsys, "run", "--once")
    assert (code, err) == (0, "")
    assert out.startswith("fetched 0, processed 0")


# -- ingest -----------------------------------------------------------------------------------


def test_ingest_of_a_missing_file_is_one_sentence_and_exit_1(tmp_path, capsys):
    config = desk_config(tmp_path)
    missing = tmp_path / "nonexistent.eml"
    code, out, err = cli(config, capsys, "ingest", str(missing))
    assert (code, out) == (1, "")
    assert one_sentence(err) == f"mailflow: cannot read {missing}: No such file or directory"


def test_ingest_of_a_directory_is_one_sentence_and_exit_1(tmp_path, capsys):
    config = desk_config(tmp_path)
    code, _, err = cli(config, capsys, "ingest", str(tmp_path))
    assert code == 1
    assert one_sentence(err) == f"mailflow: cannot read {tmp_path}: Is a directory"


def test_an_os_error_in_any_command_is_one_sentence(tmp_path, capsys, monkeypatch):
    config = desk_config(tmp_path)

    def unreadable(args):
        raise PermissionError(13, "Permission denied", "/srv/mailflow/var/export.csv")

    monkeypatch.setattr(mailflow.cli, "cmd_status", unreadable)
    code, _, err = cli(config, capsys, "status")
    assert code == 1
    assert one_sentence(err) == "mailflow: /srv/mailflow/var/export.csv: Permission denied"


def sqlite_desk(tmp_path: Path) -> Path:
    """A desk on SQLite whatever database the suite runs on: these tests are about its file."""
    return desk_config(tmp_path, database_url=f"sqlite:///{tmp_path / 'mailflow.db'}")


def test_ingest_on_a_locked_database_prints_the_driver_message_only(tmp_path, capsys, monkeypatch):
    config = sqlite_desk(tmp_path)
    first, second = tmp_path / "1.eml", tmp_path / "2.eml"
    first.write_bytes(make_mail("a@example.test", "打印机卡纸", "卡纸"))
    second.write_bytes(make_mail("b@example.test", "显示器不亮", "黑屏"))
    assert cli(config, capsys, "ingest", str(first))[0] == 0

    real = mailflow.db._sqlite_pragmas

    def no_waiting(dbapi_connection, record):  # fail at once instead of after 30 s
        real(dbapi_connection, record)
        dbapi_connection.execute("PRAGMA busy_timeout=0")

    monkeypatch.setattr(mailflow.db, "_sqlite_pragmas", no_waiting)
    path = load_config(config).database_url[len("sqlite:///") :]
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")  # another writer holds the database
        code, _, err = cli(config, capsys, "ingest", str(second))
    finally:
        holder.close()
    assert code == 75
    line = one_sentence(err)
    assert "database is locked" in line
    for noise in ("[SQL", "[parameters", "sqlalche.me", "INSERT"):
        assert noise not in err


def test_a_file_that_is_no_database_is_one_sentence(tmp_path, capsys):
    config = sqlite_desk(tmp_path)
    (tmp_path / "mailflow.db").write_text("not a database, only text\n" * 100)
    code, _, err = cli(config, capsys, "status")
    assert code == 1
    assert one_sentence(err) == "mailflow: database error: file is not a database"
    # An MTA pipe keeps the mail and tries again once the operator has fixed it.
    message = tmp_path / "1.eml"
    message.write_bytes(make_mail("a@example.test", "打印机卡纸", "卡纸"))
    code, _, err = cli(config, capsys, "ingest", str(message))
    assert code == 75
    assert "file is not a database" in one_sentence(err)


# -- check ------------------------------------------------------------------------------------


def broken_rules(directory: Path) -> Path:
    """The shipped rules with one bad priority in 40-marketing.toml."""
    shutil.copytree(REPO / "rules", directory)
    marketing = directory / "40-marketing.toml"
    marketing.write_text(
        marketing.read_text(encoding="utf-8").replace('"P2"', '"P9"'), encoding="utf-8"
    )
    return directory


def test_check_prints_config_and_rule_problems_together(tmp_path, capsys, monkeypatch):
    etc = tmp_path / "etc"
    etc.mkdir()
    rules = broken_rules(etc / "my-rules")
    config = write_config(
        etc / "config.toml",
        {
            "desk": {"language": "fr"},
            "roles": {"service_desk": ["desk1@example.test"]},
            "paths": {"rules": "my-rules"},  # relative: against the config's directory
        },
    )
    monkeypatch.chdir(tmp_path)
    code, out, _ = cli(config, capsys, "check")
    assert code == 1
    assert f"{config}: desk.language:" in out
    assert f"{rules / '40-marketing.toml'}: set.priority:" in out


def test_check_finds_the_rules_beside_the_config_when_the_config_has_problems(tmp_path, capsys):
    rules = broken_rules(tmp_path / "rules")
    config = write_config(
        tmp_path / "config.toml",
        {"desk": {"language": "fr"}, "roles": {"service_desk": ["desk1@example.test"]}},
    )
    code, out, _ = cli(config, capsys, "check")
    assert code == 1
    assert f"{config}: desk.language:" in out
    assert f"{rules / '40-marketing.toml'}: set.priority:" in out


def test_check_gives_the_line_and_column_of_a_rule_file_that_is_not_toml(tmp_path, capsys):
    rules = tmp_path / "rules"
    shutil.copytree(REPO / "rules", rules)
    (rules / "06-broken.toml").write_text('description = "x"\n[match\n', encoding="utf-8")
    config = write_config(
        tmp_path / "config.toml",
        {"roles": {"service_desk": ["desk1@example.test"]}, "paths": {"rules": str(rules)}},
    )
    code, out, _ = cli(config, capsys, "check")
    assert code == 1
    broken = [line for line in out.splitlines() if "06-broken.toml" in line]
    assert len(broken) == 1
    assert re.fullmatch(
        re.escape(str(rules / "06-broken.toml")) + r": line 2, column \d+: invalid TOML: .+",
        broken[0],
    ), broken[0]
    assert "(at line" not in broken[0]


def test_check_gives_the_line_of_a_config_file_that_is_not_toml(tmp_path, capsys):
    config = tmp_path / "config.toml"
    config.write_text('[desk]\naddress = "itsm@example.test"\nname = \n', encoding="utf-8")
    code, out, _ = cli(config, capsys, "check")
    assert code == 1
    assert out.startswith(f"{config}: line 3, column 8: not valid TOML: ")


# -- show --json ------------------------------------------------------------------------------


@pytest.fixture
def unordered_selects_reversed() -> Iterator[None]:
    """SQLite returns the rows of a SELECT without ORDER BY in reverse order, as another
    database (PostgreSQL) may return them in any order."""

    def reverse(dbapi_connection, _record):
        if isinstance(dbapi_connection, sqlite3.Connection):
            dbapi_connection.execute("PRAGMA reverse_unordered_selects = ON")

    event.listen(Engine, "connect", reverse)
    try:
        yield
    finally:
        event.remove(Engine, "connect", reverse)


def test_show_json_orders_interactions_by_time_then_id(
    tmp_path, mailbox, smtp, clock, capsys, unordered_selects_reversed
):
    desk = make_desk(tmp_path, mailbox=mailbox, smtp=smtp)
    daemon = Daemon(desk, clock)  # the clock stands still: every mail gets the same time
    mailbox.append(make_mail("u@example.test", "打印机卡纸", "三楼打印机卡纸"))
    daemon.run_once()
    for n in (1, 2, 3):
        mailbox.append(make_mail("u@example.test", "Re: [INC-1] 打印机卡纸", f"补充 {n}"))
    daemon.run_once()
    with desk.db.sessions() as session:
        inbound = session.scalars(
            select(Inbound.text).where(Inbound.ticket_id.is_not(None)).order_by(Inbound.id)
        ).all()
        outbound = session.execute(
            select(Outbox.recipient, Outbox.subject).order_by(Outbox.id)
        ).all()
    desk.close()
    assert len(inbound) == 4 and len(outbound) >= 3

    code, out, _ = cli(desk.settings.path, capsys, "show", "INC-1", "--json")
    assert code == 0
    interactions = json.loads(out)["interactions"]
    assert len({item["at"] for item in interactions}) == 1, "one time for all: a tie"
    assert [item["direction"] for item in interactions] == ["in"] * 4 + ["out"] * len(outbound)
    assert [item["text"] for item in interactions[:4]] == list(inbound)
    assert [(item["to"], item["subject"]) for item in interactions[4:]] == [
        tuple(row) for row in outbound
    ]


# -- help, pipes, files that are no mail ------------------------------------------------------


def _options(parser: argparse.ArgumentParser, path: str = "mailflow") -> Iterator[tuple]:
    """(command, option, help) for every option and argument of every sub-command."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _options(sub, f"{path} {name}")
        elif not isinstance(action, argparse._HelpAction):
            yield path, "/".join(action.option_strings) or action.dest, action.help


def test_help_describes_every_option_of_every_command(capsys):
    options = list(_options(mailflow.cli.parser()))
    assert {command for command, _, _ in options} >= {
        "mailflow", "mailflow run", "mailflow show", "mailflow report", "mailflow status"
    }
    undescribed = [f"{command} {option}" for command, option, text in options if not text]
    assert undescribed == []
    with pytest.raises(SystemExit) as exited:
        main(["show", "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "INC-42" in out and "JSON" in out


def test_a_closed_pipe_ends_the_command_quietly(tmp_path, capsys):
    """`mailflow show INC-1 | head -2`: the reader has gone before the output is written."""
    config = desk_config(tmp_path)
    eml = tmp_path / "m.eml"
    eml.write_bytes(make_mail("pipe@example.test", "打印机卡纸", "三楼打印机\n" * 50))
    assert cli(config, capsys, "ingest", str(eml))[:2] == (0, "processed INC-1\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    for command in (["show", "INC-1"], ["show", "INC-1", "--json"], ["tickets"]):
        read, write = os.pipe()
        os.close(read)  # `head` has read its lines and exited
        try:
            done = subprocess.run(
                [sys.executable, "-m", "mailflow", "--config", str(config), *command],
                stdout=write, stderr=subprocess.PIPE, env=env, timeout=120,
            )
        finally:
            os.close(write)
        assert done.stderr.decode() == "", command  # no "Broken pipe", no traceback
        assert done.returncode == 141, command  # as a command ended by SIGPIPE


def test_a_file_that_is_no_mail_is_labelled_so(tmp_path, clock):
    desk = make_desk(tmp_path, maildir={"path": "var/maildir"})
    new = tmp_path / "var" / "maildir" / "new"
    new.mkdir(parents=True, exist_ok=True)
    (new / "1700000000.1.host").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR junk")
    (new / "1700000000.2.host").write_bytes(b"just some notes\nsaved in the wrong folder\n")
    (new / "1700000000.3.host").write_bytes(b"")
    result = run_once(desk, clock)
    assert result.fetched == 3
    with desk.db.sessions() as session:
        rows = session.execute(select(Inbound.state, Inbound.reason)).all()
    desk.close()
    assert [tuple(row) for row in rows] == [("ignored", "not a mail message")] * 3


# -- strict configuration: a misspelt key is an error, not a silent default ---------------


@pytest.mark.parametrize(
    ("extra", "named", "hint"),
    [
        ('[desk]\npol_interval = 5\n', "desk.pol_interval", "did you mean `poll_interval`?"),
        ('[desk2]\naddress = "x@example.test"\n', "desk2", "did you mean `desk`?"),
        ('[security]\ncomands = "from"\n', "security.comands", "did you mean `commands`?"),
        ('[sla.P2]\nresolv = "8h"\n', "sla.P2.resolv", "did you mean `resolve`?"),
        ('[limits]\nmax_mesage_bytes = 10\n', "limits.max_mesage_bytes", "`max_message_bytes`"),
    ],
)
def test_check_names_unknown_keys_and_tables_with_the_nearest_known_one(
    tmp_path, capsys, extra, named, hint
):
    config = desk_config(tmp_path)
    text = config.read_text(encoding="utf-8")
    section = extra.split("\n", 1)[0]
    if section in text:  # add the key to the existing table, as a user would
        text = text.replace(section + "\n", extra, 1)
    else:
        text += "\n" + extra
    config.write_text(text, encoding="utf-8")
    assert main(["--config", str(config), "check"]) == 1
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if f": {named}: " in line)
    assert "unknown" in line and hint in line


def test_the_shipped_configurations_have_no_unknown_key(capsys):
    from mailflow.config import read_config

    for name in ("config.toml", "deploy/config.production.toml"):
        _, problems = read_config(REPO / name)
        assert [p for p in problems if "unknown" in p.message] == [], name


# -- check: templates against the variables each is given ---------------------------------


def _desk_with_templates(tmp_path: Path) -> tuple[Path, Path]:
    """A config whose templates directory is a copy of the shipped one, to break."""
    templates = tmp_path / "templates"
    shutil.copytree(REPO / "templates", templates)
    return desk_config(tmp_path, paths={"templates": str(templates)}), templates


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


def _line_of(path: Path, needle: str) -> int:
    lines = path.read_text(encoding="utf-8").splitlines()
    return next(n for n, line in enumerate(lines, 1) if needle in line)


def test_check_names_a_variable_a_template_is_not_given_with_file_and_line(tmp_path, capsys):
    config, templates = _desk_with_templates(tmp_path)
    ack = templates / "zh-CN" / "ack.txt"
    _edit(ack, "工单编号 {{ ticket.ref }}", "工单编号 {{ tiket.ref }}")
    code, out, _ = cli(config, capsys, "check")
    assert code == 1
    line = _line_of(ack, "tiket.ref")
    assert f"templates/zh-CN/ack.txt:{line}: `tiket` is not given" in out
    assert "did you mean `ticket`?" in out


def test_check_names_an_attribute_a_ticket_does_not_have(tmp_path, capsys):
    config, templates = _desk_with_templates(tmp_path)
    ack = templates / "en" / "ack.txt"
    _edit(ack, "{{ ticket.ref }}", "{{ ticket.refx }}")
    code, out, _ = cli(config, capsys, "check")
    assert code == 1
    line = _line_of(ack, "ticket.refx")
    assert f"templates/en/ack.txt:{line}: a ticket has no `refx`; did you mean `ref`?" in out


@pytest.mark.parametrize("partial", [False, True])
def test_check_names_a_syntax_error_by_its_full_path_and_line(tmp_path, capsys, partial):
    config, templates = _desk_with_templates(tmp_path)
    name = "_macros.txt" if partial else "ack.txt"
    broken = templates / "zh-CN" / name
    lines = broken.read_text(encoding="utf-8").splitlines()
    lines.insert(4, "{% if %}")
    broken.write_text("\n".join(lines) + "\n", encoding="utf-8")
    code, out, _ = cli(config, capsys, "check")
    assert code == 1
    assert f"templates/zh-CN/{name}:5: " in out, out
    assert f"templates/{name}" not in out


def test_every_shipped_template_passes_the_check(capsys):
    from mailflow import template_vars
    from mailflow.render import PACKAGE_TEMPLATES

    settings = load_config(REPO / "config.toml")
    for directory in (REPO / "templates", PACKAGE_TEMPLATES):
        assert template_vars.check(directory, settings.desk.tz) == [], directory


def _strict_renderer(desk, language: str):
    import jinja2

    from mailflow.render import Renderer

    renderer = Renderer(desk.settings.templates_dir, language, desk.settings.desk.tz)
    for env in renderer.envs.values():
        env.undefined = jinja2.StrictUndefined
    return renderer


def _sample_context(desk, now) -> dict[str, dict]:
    """For each notification, a value for every variable the table declares for it, of the
    shape its sender passes; digests and reports from the functions that build them."""
    from datetime import timedelta

    from mailflow import charts, digest, report
    from mailflow.attachments import Listed
    from mailflow.commands import Command
    from mailflow.config import Vendor
    from mailflow.models import Event, Ticket
    from mailflow.parties import STATUS_NAMES

    ticket = Ticket(
        id=1, kind="incident", number=7, status="open", priority="P2", category="printer",
        tier="L1", major=False, desktop=True, rule="printer", requester="user@example.test",
        requester_name="张三", assignee="eng@example.test", subject="打印机无法打印",
        description="3楼打印机卡纸", solution="换了硒鼓", omitted=None,
        form={"reason": "新员工入职"}, created_at=now, updated_at=now, due_at=now,
        response_due_at=now,
    )
    event = Event(at=now, action="comment", actor="eng@example.test", detail="已联系")
    listed = Listed(1, 1, "screen.png", "image/png", 2048, "ab" * 32)
    step = {"step": 0, "group": "default", "approver": "approver@example.test",
            "decision": "approve", "reason": "ok", "used_at": now}
    common = {"ticket": ticket, "desk": desk.settings.desk, "rules": desk.rules,
              "attachments": [listed]}
    values = {
        "action": "approve", "address": "watcher@example.test", "allowed": ["resolve"],
        "approver": "approver@example.test", "at": now, "author": "eng@example.test",
        "automatic": False, "category": "printer", "code": "approve",
        "command": Command("resolve"), "confirm_by": now + timedelta(days=3),
        "decided": [step], "decision": "approve", "detail": "a loop of mail",
        "events": [event], "expires_at": now, "fill_in": {"reason": "原因："},
        "fill_in_en": {"reason": "Reason:"}, "form": {"reason": "新员工入职"},
        "forwarded": True, "found": [ticket], "group": "default", "internal": False,
        "key": "loop:x", "labels": {"reason": "原因 / Reason"}, "missing": ["reason"],
        "names": STATUS_NAMES, "new_tier": "L2", "not_attached": [listed], "old_tier": "L1",
        "reason": "已处理", "received_at": now, "reissued": False,
        "reopened_by": "user@example.test", "sender": "someone@example.test",
        "similar": [ticket], "status_name": STATUS_NAMES["open"], "step": 1, "steps": 1,
        "subject": "Re: [REQ-7]", "text": "请重启打印机", "tier_name": None, "update": event,
        "update_name": ("留言", "comment"), "update_text": "已联系", "used": 0.8,
        "vendor": Vendor("hp", "HP", ("support@hp.example",)), "why": "not signed",
    }
    per_template = {"request_submitted": {"steps": [step]}}
    snap = digest.snapshot(desk, now)
    everyone = digest.context_for(desk, snap, "eng@example.test", list(digest.TEMPLATES))
    data = report.compute(desk, None, None, now)
    built = {
        **{name: everyone for name in digest.TEMPLATES.values()},
        "report": report.template_context(
            desk, data, "weekly", mail=True, images=charts.images(data)
        ),
    }
    from mailflow.template_vars import VARIABLES

    contexts = {}
    for name, given in VARIABLES.items():
        if name in built:
            assert set(built[name]) == given, name  # the table names what is built
            contexts[name] = {**common, **built[name]}
        else:
            own = per_template.get(name, {})
            contexts[name] = {**common, **{v: own.get(v, values[v]) for v in given}}
    return contexts


@pytest.mark.parametrize("language", ["zh-CN", "en"])
def test_every_notification_renders_strictly_with_its_declared_variables(
    tmp_path, clock, language
):
    from mailflow.template_vars import VARIABLES

    desk = make_desk(tmp_path)
    renderer = _strict_renderer(desk, language)
    assert set(VARIABLES) == set(renderer.names())  # one entry per notification
    for name, context in _sample_context(desk, clock()).items():
        rendered = renderer.render(name, **context)
        assert rendered.subject and rendered.text.strip(), name
