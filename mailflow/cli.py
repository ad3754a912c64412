"""The `mailflow` command line (see the contract in the README).

The config file is `--config PATH`, else $MAILFLOW_CONFIG, else ./config.toml. Errors are
one clear sentence on stderr and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import sys
from collections.abc import Sequence
from datetime import date, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session

from mailflow import __version__, attachments, leases, tracking
from mailflow.config import load_config, read_config, resolve_config_path
from mailflow.errors import MailflowError, TemporaryFailure
from mailflow.models import Inbound, MailboxState, Outbox, Ticket, utcnow
from mailflow.tickets import as_json, detail_json

EX_TEMPFAIL = 75
EX_PIPE = 128 + 13  # as a command ended by SIGPIPE: the reader closed the pipe
INBOUND_STATES = ("processed", "ignored", "quarantined", "pending")
OUTBOX_STATES = ("queued", "sent", "dead")
# Where tomllib says a file went wrong: "... (at line 3, column 8)" or "(at end of document)".
_TOML_AT = re.compile(r"\s*\(at (line \d+, column \d+|end of document)\)$")


def _sentence(exc: BaseException) -> str:
    """An error as one line: a database error by its driver's short message (no SQL, no
    parameters, no link), also inside an error raised from one."""
    text = str(exc)
    for error in (exc, exc.__cause__):
        if isinstance(error, DBAPIError) and error.orig is not None:
            short = str(error.orig)
            text = short if error is exc else text.replace(str(error), short)
    return " ".join(text.split())


def _os_error(exc: OSError) -> str:
    """`FILE: reason` for a file that cannot be used, else the reason."""
    reason = exc.strerror or str(exc)
    return f"{exc.filename}: {reason}" if exc.filename else reason


def _log_format(args: argparse.Namespace) -> str:
    """[log] format, read before anything logs (the config is validated later)."""
    import tomllib

    from mailflow.logs import FORMATTERS

    try:
        with resolve_config_path(args.config).open("rb") as handle:
            value = tomllib.load(handle).get("log", {}).get("format", "text")
    except (OSError, tomllib.TOMLDecodeError, AttributeError):
        return "text"
    return value if value in FORMATTERS else "text"


def _desk(args: argparse.Namespace, *, daemon: bool = False) -> Any:
    """The desk of the config; a package its settings need and that is missing is a
    configuration error (the daemon's features and jobs only with `daemon`)."""
    from mailflow import extras, logs
    from mailflow.desk import Desk

    settings = load_config(resolve_config_path(args.config))
    level = "DEBUG" if args.verbose else settings.log.level
    logs.setup(level, settings.log.format)
    extras.require(settings, daemon=daemon)
    return Desk(settings)


def cmd_run(args: argparse.Namespace) -> int:
    from mailflow.daemon import Daemon

    daemon = Daemon(_desk(args, daemon=not args.once))  # one pass: no endpoint, no jobs
    if args.once:
        result = daemon.run_once()
        print(
            f"fetched {result.fetched}, processed {result.processed}, "
            f"sent {result.relay.sent}, retrying {result.relay.retried}, dead {result.relay.dead}"
        )
        for skipped in result.skipped:  # another daemon polls it: not an error
            print(f"mailflow: {skipped}", file=sys.stderr)
        for error in result.errors:  # a mail source failed: the rest of the pass was done
            print(f"mailflow: {' '.join(str(error).split())}", file=sys.stderr)
        return 1 if result.errors else 0
    asyncio.run(daemon.run())
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from mailflow import intake, pipeline

    try:
        raw = Path(args.file).read_bytes() if args.file else sys.stdin.buffer.read()
    except OSError as exc:  # missing, a directory, unreadable: retrying will not help
        where = args.file or "standard input"
        print(f"mailflow: cannot read {where}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    if not raw.strip():
        print("mailflow: no message on input", file=sys.stderr)
        return 1
    try:
        desk = _desk(args)
        now = utcnow()
        inbound_id = intake.ingest_bytes(desk, raw, now)
        if inbound_id is not None:
            outcome = pipeline.process_one(desk, inbound_id, utcnow())
            ref = outcome.ticket.ref if outcome.ticket is not None else "-"
            print(f"{outcome.state} {ref}")
        else:
            print("already stored")
    except (TemporaryFailure, DBAPIError) as exc:  # the MTA keeps the mail and retries
        print(f"mailflow: temporary failure, try again later: {_sentence(exc)}", file=sys.stderr)
        return EX_TEMPFAIL
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from mailflow import extras
    from mailflow.rules import check_rules

    path = resolve_config_path(args.config)
    # The settings come back despite problems whenever the file is TOML: its [paths] (or the
    # defaults, as the loader finds them) locate rules/ and templates/ to check them too.
    settings, found = read_config(path)
    problems = [_problem(p) for p in found]
    if settings is not None:
        problems += [_problem(p) for p in check_rules(settings.rules_dir)]
        problems += _check_templates(settings)
        problems += [_problem(p) for p in extras.problems(settings)]
    for problem in problems:
        print(problem)
    if settings is not None:
        for warning in security_warnings(settings):
            print(f"{path}: warning: {warning}", file=sys.stderr)
    if problems:
        print(f"{len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"{path}: configuration, rules and templates are valid")
    return 0


def security_warnings(settings: Any) -> list[str]:
    """What in [security] leaves the desk open to forged mail (valid, but worth saying)."""
    security = settings.security
    if security.commands == "from":
        return [
            'security.commands = "from": a From header alone is trusted, so anyone can '
            "forge a command in the name of staff or a requester; use token_or_dmarc"
        ]
    return []


def _problem(problem: Any) -> str:
    """`file: key: message`; a file that is not TOML has its line and column as the key."""
    key, message = problem.key, problem.message
    if key in ("", "-") and (at := _TOML_AT.search(message)):
        key, message = at.group(1), message[: at.start()]
    return f"{problem.file}: {key}: {message}" if key else f"{problem.file}: {message}"


def _check_templates(settings: Any) -> list[str]:
    """Syntax, and the variables each template is given (mailflow.template_vars)."""
    from mailflow import template_vars

    return template_vars.check(settings.templates_dir, settings.desk.tz)


def status_json(desk: Any) -> dict[str, Any]:
    with desk.db.sessions() as session:
        inbound = dict(
            session.execute(select(Inbound.state, func.count()).group_by(Inbound.state)).all()
        )
        out = dict(session.execute(select(Outbox.state, func.count()).group_by(Outbox.state)).all())
        last = session.scalar(select(func.max(MailboxState.last_poll_at)))
        errors = {
            name: error
            for name, error in session.execute(
                select(MailboxState.name, MailboxState.last_error).where(
                    MailboxState.last_error.is_not(None)
                )
            )
        }
        mailboxes = _mailboxes_json(session)
    return {
        "inbound": {s: inbound.get(s, 0) for s in INBOUND_STATES},
        "outbox": {s: out.get(s, 0) for s in OUTBOX_STATES},
        "last_poll": _iso(last),
        "errors": errors,
        "mailboxes": mailboxes,
    }


def _mailboxes_json(session: Any) -> dict[str, dict[str, Any]]:
    """Per mailbox: its last successful poll, the daemon holding its poller lease and until
    when, and the holder of a lease whose process is gone (it passes at the next poll)."""
    now = utcnow()
    out = {}
    for row in session.execute(
        select(
            MailboxState.name,
            MailboxState.last_poll_at,
            MailboxState.lease_owner,
            MailboxState.lease_until,
        ).order_by(MailboxState.name)
    ):
        lease = leases.current(row.lease_owner, row.lease_until, now)
        dead = lease is not None and leases.gone(lease.owner)
        live = lease if lease is not None and not dead else None
        out[row.name] = {
            "last_poll": _iso(row.last_poll_at),
            "poller": live.owner if live else None,
            "lease_until": _iso(live.until) if live else None,
            "gone_holder": lease.owner if lease is not None and dead else None,
        }
    return out


def _iso(at: datetime | None) -> str | None:
    return at.isoformat().replace("+00:00", "Z") if at else None


def cmd_status(args: argparse.Namespace) -> int:
    data = status_json(_desk(args))
    if args.json:
        print(json.dumps(data, ensure_ascii=False))
        return 0
    print("inbound: " + ", ".join(f"{k} {v}" for k, v in data["inbound"].items()))
    print("outbox:  " + ", ".join(f"{k} {v}" for k, v in data["outbox"].items()))
    print(f"last poll: {data['last_poll'] or 'never'}")
    for name, box in data["mailboxes"].items():
        print(f"mailbox {name}: last poll {box['last_poll'] or 'never'}, {_poller_text(box)}")
    for name, error in data["errors"].items():
        print(f"error: {name}: {error}")
    return 0


def _poller_text(box: dict[str, Any]) -> str:
    if box["poller"]:
        return f"polled by {box['poller']} (lease until {box['lease_until']})"
    if box["gone_holder"]:
        return (f"polled by no one now (its holder {box['gone_holder']} is gone; "
                "the next daemon to poll takes it over)")
    return "polled by no one now"


def cmd_tickets(args: argparse.Namespace) -> int:
    desk = _desk(args)
    with desk.db.sessions() as session:
        query = select(Ticket).order_by(Ticket.id)
        if args.kind:
            query = query.where(Ticket.kind == args.kind)
        if args.status:
            query = query.where(Ticket.status == args.status)
        tickets = list(session.scalars(query))
        counts = dict(
            session.execute(
                select(Inbound.ticket_id, func.count())
                .where(Inbound.state == "processed", Inbound.ticket_id.is_not(None))
                .group_by(Inbound.ticket_id)
            ).all()
        )
        rows = [as_json(session, t, counts.get(t.id, 0)) for t in tickets]
    if args.json:
        print(json.dumps(rows, ensure_ascii=False))
        return 0
    for row in rows:
        tier = row["tier"] or "-"
        due = _when(desk, row.get("due_at"))
        print(
            f"{row['ref']:<9} {row['status']:<17} {row['priority']} {tier:<3} "
            f"{row['category']:<14} {row['requester']:<28} {due:<20} {row['subject']}"
        )
    return 0


TIME_KEYS = frozenset({"created_at", "due_at", "resolved_at"})


def _when(desk: Any, iso: str | None) -> str:
    """An ISO 8601 UTC time of the JSON output as a person reads it: local, with the zone."""
    if not iso:
        return "-"
    return desk.renderer.local(datetime.fromisoformat(iso.replace("Z", "+00:00")))


def _save_attachments(session: Session, ticket: Ticket, directory: Path) -> int:
    """`show REF --save-attachments DIR`: write the ticket's files, never over another."""
    try:
        written = attachments.save(session, ticket.id, directory)
    except OSError as exc:
        print(f"mailflow: cannot save into {directory}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    print(f"{len(written)} attachment(s) of {ticket.ref} written to {directory}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    desk = _desk(args)
    with desk.db.sessions() as session:
        ticket = tracking.by_ref(session, args.ref)
        if ticket is None:
            print(f"mailflow: no ticket {args.ref}", file=sys.stderr)
            return 1
        data = detail_json(session, ticket)
        if args.save_attachments is not None:
            return _save_attachments(session, ticket, args.save_attachments)
    if args.json:
        print(json.dumps(data, ensure_ascii=False, indent=2))
        return 0
    for key in (
        "ref",
        "kind",
        "status",
        "priority",
        "category",
        "tier",
        "major",
        "requester",
        "assignee",
        "subject",
        "created_at",
        "due_at",
        "resolved_at",
    ):
        print(f"{key:>12}: {_when(desk, data[key]) if key in TIME_KEYS else data[key]}")
    for key, value in data["requester_details"].items():  # from the people directory
        if value and key in ("department", "phone", "location"):
            print(f"{key:>12}: {value}")
    if data.get("kind") == "request":
        print(f"{'request_type':>12}: {data.get('request_type')}")
        for name, value in (data.get("form") or {}).items():
            shown = ", ".join(value) if isinstance(value, list) else str(value)
            print(f"{'form.' + name:>24}: {shown.replace(chr(10), ' / ')}")
    if data["attachments"]:
        print("\nattachments:")
        for att in data["attachments"]:
            size = attachments.human_size(att["size"])
            print(f"  {att['filename']} ({size}, {att['content_type']})")
    print("\ninteractions:")
    for item in data["interactions"]:
        arrow = "→" if item["direction"] == "out" else "←"
        when = _when(desk, item["at"])
        print(f"  {when} {arrow} {item['from']} → {item['to']}: {item['subject']}")
        for line in (item["text"] or "").strip().splitlines()[:6]:
            print(f"      {line}")
    print("\nevents:")
    for event in data["events"]:
        when = _when(desk, event["at"])
        print(f"  {when} {event['action']:<12} {event['actor']}  {event['detail'][:80]}")
    return 0


def cmd_people(args: argparse.Namespace) -> int:
    """`people import FILE`, `people sync`, or list the directory (`people [--json]`)."""
    from mailflow import people

    desk = _desk(args)
    if args.action in ("import", "sync"):
        if args.action == "import":
            loaded = people.import_csv(desk, Path(args.file), utcnow())
        else:
            loaded = people.sync(desk, utcnow())
        for reason in loaded.skipped:
            print(f"mailflow: skipped {reason}", file=sys.stderr)
        print(loaded)
        return 0
    with desk.db.sessions() as session:
        rows = people.listing(session)
    if args.json:
        print(json.dumps(rows, ensure_ascii=False))
        return 0
    for row in rows:
        shown = [row[k] or "-" for k in ("name", "department", "phone", "location", "language")]
        print(f"{row['email']:<32} {'VIP ' if row['vip'] else ''}{'  '.join(shown)}")
    return 0


def cmd_digest(args: argparse.Namespace) -> int:
    from mailflow import digest

    desk = _desk(args)
    results = digest.run_digests(desk, utcnow(), dry_run=args.dry_run)
    for item in results:
        print(f"{'would send' if args.dry_run else 'queued'} {item.role} digest → {item.recipient}")
        if args.dry_run:
            print(item.text)
    if not results:
        print("no digest due (already sent today, or nothing to report)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from mailflow import report

    desk = _desk(args)
    data = report.compute(desk, since=args.since, until=args.until, now=utcnow())
    print(report.render(data, args.format, desk))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from mailflow.demo import run_demo

    logging.getLogger().setLevel(logging.WARNING)
    return run_demo(Path(args.dir) if args.dir else None)


def cmd_requeue(args: argparse.Namespace) -> int:
    desk = _desk(args)
    with desk.db.transaction() as session:
        query = select(Inbound).where(Inbound.state == "quarantined")
        if args.ids:
            query = query.where(Inbound.id.in_(args.ids))
        rows = list(session.scalars(query))
        for row in rows:
            row.state, row.attempts, row.next_attempt_at = "pending", 0, None
    print(f"requeued {len(rows)} message(s)")
    return 0


def cmd_resend(args: argparse.Namespace) -> int:
    """Queue dead outgoing mail again (after fixing an address or the relay)."""
    desk = _desk(args)
    with desk.db.transaction() as session:
        query = select(Outbox).where(Outbox.state == "dead")
        if args.ids:
            query = query.where(Outbox.id.in_(args.ids))
        rows = list(session.scalars(query))
        for row in rows:  # due at once: its first due time has passed
            row.state, row.attempts, row.next_attempt_at = "queued", 0, row.created_at
    print(f"queued {len(rows)} message(s) again")
    return 0


def _date(value: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{value!r} is not a date like 2026-11-01") from exc


# Help for options that several sub-commands share, given where an option was added
# without its own (`_describe`), so that `--help` describes every option.
SHARED_HELP = {
    "json": "print JSON in the public interface's shape instead of text",
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mailflow", description="Email-driven IT service desk.")
    p.add_argument("--config", metavar="PATH",
                   help="config file (default: $MAILFLOW_CONFIG or ./config.toml)")
    p.add_argument("--version", action="version", version=f"mailflow {__version__}",
                   help="print the version and exit")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="debug logging (overrides [log] level)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="the daemon: fetch, process, send, run scheduled jobs",
                         description="Run the desk until SIGTERM; SIGHUP reloads the config.")
    run.add_argument("--once", action="store_true",
                     help="fetch and process everything new, deliver the due outbox, then exit")
    run.set_defaults(func=cmd_run)
    ingest = sub.add_parser("ingest", help="process one message from FILE or stdin",
                            description="For an MTA pipe: exit 0 done, 75 temporary failure.")
    ingest.add_argument("file", nargs="?",
                        help="an RFC 5322 message (default: read it from standard input)")
    ingest.set_defaults(func=cmd_ingest)
    sub.add_parser(
        "check", help="validate config, rules, templates and the packages they need",
        description="Print each problem with file and key; exit 1 on any.",
    ).set_defaults(func=cmd_check)
    status = sub.add_parser("status", help="health")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)
    tickets = sub.add_parser("tickets", help="list tickets")
    tickets.add_argument("--json", action="store_true", help=SHARED_HELP["json"])
    tickets.add_argument("--kind", choices=("incident", "request"),
                         help="only incidents or only service requests")
    tickets.add_argument("--status", help="only tickets in this status (e.g. open, resolved)")
    tickets.set_defaults(func=cmd_tickets)
    show = sub.add_parser("show", help="one ticket: fields, messages, events")
    show.add_argument("ref", help="the ticket's reference, e.g. INC-42 or REQ-7")
    show.add_argument("--json", action="store_true", help=SHARED_HELP["json"])
    show.add_argument(
        "--save-attachments", metavar="DIR", type=Path,
        help="write the ticket's attachments into DIR (made if missing); a name already "
        "there gets a suffix, nothing is overwritten",
    )
    show.set_defaults(func=cmd_show)
    people = sub.add_parser("people", help="the people directory: list, import a CSV, sync",
                            description="List the directory, or load it (by email address).")
    people.add_argument("--json", action="store_true", help=SHARED_HELP["json"])
    people.set_defaults(func=cmd_people, action=None)
    actions = people.add_subparsers(dest="action", metavar="ACTION")
    load = actions.add_parser(
        "import", help="load people from a CSV file (UTF-8 or GB18030)",
        description="Header: email,name,department,phone,location (optional: language,vip). "
                    "Bad rows are named by line and skipped; prints the counts.")
    load.add_argument("file", help="the CSV file")
    actions.add_parser("sync", help="load people from the [directory] LDAP server now")
    digest = sub.add_parser("digest", help="build and queue today's digests now")
    digest.add_argument("--dry-run", action="store_true",
                        help="print the digests instead of queueing them")
    digest.set_defaults(func=cmd_digest)
    report = sub.add_parser("report", help="incident-management report")
    report.add_argument("--since", type=_date, metavar="DATE",
                        help="first day, YYYY-MM-DD (default: the first of --until's month)")
    report.add_argument("--until", type=_date, metavar="DATE",
                        help="last day, YYYY-MM-DD (default: today)")
    report.add_argument("--format", choices=("text", "json", "csv"), default="text",
                        help="text (default), json or csv")
    report.set_defaults(func=cmd_report)
    demo = sub.add_parser("demo", help="a self-contained demonstration, no outside server")
    demo.add_argument("--dir", help="keep the demo's files here (default: a temp dir)")
    demo.set_defaults(func=cmd_demo)
    requeue = sub.add_parser("requeue", help="process quarantined mail again")
    requeue.add_argument("ids", nargs="*", type=int, metavar="ID",
                         help="inbound mail ids (default: every quarantined mail)")
    requeue.set_defaults(func=cmd_requeue)
    resend = sub.add_parser("resend", help="queue dead outgoing mail again")
    resend.add_argument("ids", nargs="*", type=int, metavar="ID",
                        help="outbox ids (default: every dead mail)")
    resend.set_defaults(func=cmd_resend)
    _describe(p)
    return p


def _describe(p: argparse.ArgumentParser) -> None:
    """Give each option of every sub-command still without help its shared one."""
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _describe(sub)
        elif action.help is None and action.dest in SHARED_HELP:
            action.help = SHARED_HELP[action.dest]


def _reader_gone() -> bool:
    """Whether standard output is a pipe whose reader has closed it (poll says POLLERR)."""
    try:
        from select import POLLERR, POLLOUT, poll  # not on every platform

        poller = poll()
        poller.register(sys.stdout.fileno(), POLLOUT)
        return any(events & POLLERR for _, events in poller.poll(0))
    except (ImportError, OSError, ValueError, AttributeError):  # no poll, or stdout no file
        return False


def _quiet_stdout() -> None:
    """Point stdout at /dev/null: the interpreter's last flush at exit then has nowhere to
    fail, so no "Broken pipe" message follows the reader's exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    from mailflow import logs

    args = parser().parse_args(argv)
    logs.setup(logging.DEBUG if args.verbose else logging.INFO, _log_format(args))
    try:
        code = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, while it can still be caught
        return code
    except BrokenPipeError as exc:
        if not _reader_gone():  # a connection's broken pipe, not ours: an error like others
            print(f"mailflow: {_os_error(exc)}", file=sys.stderr)
            return 1
        _quiet_stdout()  # `mailflow show INC-1 | head -2`: the reader has what it wanted
        return EX_PIPE
    except TemporaryFailure as exc:
        print(f"mailflow: {_sentence(exc)}", file=sys.stderr)
        return EX_TEMPFAIL
    except MailflowError as exc:
        print(f"mailflow: {exc}", file=sys.stderr)
        return 2
    except OperationalError as exc:
        print(f"mailflow: database unavailable: {_sentence(exc)}", file=sys.stderr)
        return EX_TEMPFAIL
    except DBAPIError as exc:  # e.g. a database file that is no database: retrying won't help
        print(f"mailflow: database error: {_sentence(exc)}", file=sys.stderr)
        return 1
    except OSError as exc:  # a file that cannot be read or written: no traceback
        print(f"mailflow: {_os_error(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
