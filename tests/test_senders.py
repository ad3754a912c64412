"""Who may do what by mail, over the real IMAP (Dovecot) and SMTP (aiosmtpd) servers.

Commands are applied only from people whose role allows them; unknown senders can open
tickets but change nothing; `[limits] allow` / `deny` by address and @domain; mail that claims
to come from the desk's own address — directly, by display name, by Sender or Reply-To, in
capitals or with a +tag — is never trusted.
"""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select
from support import DESK, make_desk, make_mail, parsed, reply, run_once

from mailflow.cli import main
from mailflow.models import Inbound

USER = "zhang@example.test"
STRANGER = "stranger@elsewhere.test"


def cli_json(desk, capsys, *args: str):
    capsys.readouterr()
    assert main(["--config", str(desk.settings.path), *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def sent_to(smtp, address: str) -> list:
    return [m for m in smtp.messages if address in m.rcpt_tos]


def fields(ticket: dict) -> tuple:
    return (ticket["status"], ticket["priority"], ticket["tier"], ticket["assignee"])


def reasons(desk) -> list[str]:
    with desk.db.sessions() as session:
        return [r or "" for r in session.scalars(select(Inbound.reason).order_by(Inbound.id))]


@pytest.fixture
def opened(desk, mailbox, smtp, clock):
    """INC-1 from USER, waiting at L1; returns the L1 notice (what staff reply to)."""
    mailbox.append(make_mail(USER, "电脑无法开机", "按电源键没有反应", name="张三"))
    run_once(desk, clock)
    return sent_to(smtp, "desk1@example.test")[0].content


# -- roles --------------------------------------------------------------------------------------

MX = "mx.example.test"


@pytest.fixture
def desk(tmp_path, mailbox, smtp):
    """The test desk, whose own MTA vouches for senders (DMARC): these tests are about roles."""
    made = make_desk(tmp_path, mailbox=mailbox, smtp=smtp, security={"trusted_authserv_id": MX})
    yield made
    made.close()


def proven(raw: bytes, sender: str) -> bytes:
    """The mail as our MTA delivers it after a DMARC pass for the sender's domain."""
    domain = sender.rpartition("@")[2]
    return f"Authentication-Results: {MX}; dmarc=pass header.from={domain}\r\n".encode() + raw


REFUSED = [
    (USER, "resolve"),  # the requester cannot resolve their own incident
    (USER, "指派 l3@example.test"),
    ("desk2@example.test", "转问题"),  # only the incident manager hands over to problem
    ("im@example.test", "待用户 请问是哪台电脑？"),  # only the owning tier asks the requester
]
# Not on an L1 incident at all: recorded for the staff, passed on to nobody, never refused.
STRANGERS = [
    (STRANGER, "已解决\n重启就好了"),
    (STRANGER, "assign stranger@elsewhere.test"),
    (STRANGER, "priority P1"),
    ("l2@example.test", "已解决"),  # L2 is no tier of an L1 incident yet
    ("l3@example.test", "priority P1"),
    ("post@example.test", "problem"),  # the post lead is on major incidents only
]


@pytest.mark.parametrize(("sender", "command"), REFUSED)
def test_commands_need_the_right_role(sender, command, desk, mailbox, smtp, clock, capsys, opened):
    before = cli_json(desk, capsys, "show", "INC-1")
    had = len(sent_to(smtp, sender))
    mailbox.append(proven(reply(opened, sender, command), sender))
    run_once(desk, clock)
    after = cli_json(desk, capsys, "show", "INC-1")
    assert fields(after) == fields(before), "nothing changed"
    refused = [e for e in after["events"] if e["action"] == "refused"]
    assert len(refused) == 1 and refused[0]["actor"] == sender
    assert len(sent_to(smtp, sender)) == had + 1, "told why, once"


@pytest.mark.parametrize(("sender", "command"), STRANGERS)
def test_people_not_on_the_ticket_change_nothing(sender, command, desk, mailbox, smtp, clock,
                                                 capsys, opened):
    before = cli_json(desk, capsys, "show", "INC-1")
    mailbox.append(proven(reply(opened, sender, command), sender))
    run_once(desk, clock)
    after = cli_json(desk, capsys, "show", "INC-1")
    assert fields(after) == fields(before), "nothing changed"
    assert [e["actor"] for e in after["events"] if e["action"] == "stranger"] == [sender]
    assert not [e for e in after["events"] if e["action"] == "refused"]
    [told] = sent_to(smtp, sender)
    assert "INC-1" not in str(parsed(told.content)["Subject"]), "names nothing of the ticket"


def test_the_right_roles_are_obeyed(desk, mailbox, smtp, clock, capsys, opened):
    mailbox.append(reply(opened, "desk1@example.test", "优先级 P2"))  # their own notice
    run_once(desk, clock)
    assert cli_json(desk, capsys, "show", "INC-1")["priority"] == "P2"
    mailbox.append(proven(reply(opened, "im@example.test", "升级"), "im@example.test"))
    run_once(desk, clock)
    assert cli_json(desk, capsys, "show", "INC-1")["tier"] != "L1"


def test_an_unknown_sender_can_open_a_ticket_but_change_nothing(
    desk, mailbox, smtp, clock, capsys, opened
):
    mailbox.append(make_mail(STRANGER, "外部来信：网站打不开", "你们的网站打不开"))
    run_once(desk, clock)
    tickets = {t["ref"]: t for t in cli_json(desk, capsys, "tickets")}
    assert tickets["INC-2"]["requester"] == STRANGER, "a stranger may open a ticket"
    assert len(sent_to(smtp, STRANGER)) == 1

    # On someone else's ticket a stranger's reply is a comment at most: fields stay.
    before = fields(cli_json(desk, capsys, "show", "INC-1"))
    for text in ("已解决", "确认", "重开", "待用户 请补充", "内部: secret note"):
        mailbox.append(reply(opened, STRANGER, text))
    clock.advance(minutes=10)
    run_once(desk, clock)
    after = cli_json(desk, capsys, "show", "INC-1")
    assert fields(after) == before
    assert not {e["action"] for e in after["events"]} & {
        "resolved",
        "confirmed",
        "reopened",
        "pending",
        "note",
        "assigned",
        "escalated",
    }


# -- allow / deny ---------------------------------------------------------------------------------


def test_allow_and_deny_by_address_and_domain(tmp_path, mailbox, smtp, clock, capsys):
    desk = make_desk(
        tmp_path,
        mailbox=mailbox,
        smtp=smtp,
        limits={
            "allow": ["@example.test", "partner@vendor.test"],
            "deny": ["@spam.test", "noisy@example.test"],
        },
        roles={"l3": ["expert@vendor-support.test"]},
    )
    senders = {
        "user@example.test": True,  # allowed domain
        "user@sub.example.test": True,  # … and its subdomains
        "partner@vendor.test": True,  # allowed address
        "expert@vendor-support.test": True,  # a role holder passes the allow list
        "other@vendor.test": False,  # not on the allow list
        "noisy@example.test": False,  # denied address beats the allowed domain
        "ads@spam.test": False,  # denied domain
        "ads@mail.spam.test": False,  # … and its subdomains
    }
    for i, sender in enumerate(senders):
        mailbox.append(make_mail(sender, f"问题 {i}", "请处理"))
    run_once(desk, clock)
    requesters = {t["requester"] for t in cli_json(desk, capsys, "tickets")}
    assert requesters == {s for s, ok in senders.items() if ok}
    for sender, ok in senders.items():
        assert bool(sent_to(smtp, sender)) == ok, sender
    refused = [r for r in reasons(desk) if "[limits]" in r]
    assert len(refused) == 4
    assert sum("on [limits] deny" in r for r in refused) == 3
    assert sum("not on [limits] allow" in r for r in refused) == 1
    desk.close()


def test_allow_and_deny_entries_are_checked(tmp_path, capsys):
    from support import desk_config

    config = desk_config(tmp_path, limits={"allow": ["example.test", "@ok.test"], "deny": [42]})
    capsys.readouterr()
    assert main(["--config", str(config), "check"]) == 1
    out = capsys.readouterr().out
    assert "limits.allow: 'example.test' is not an address or an @domain" in out
    assert "limits.deny: 42 is not an address or an @domain" in out


# -- the desk's own address ------------------------------------------------------------------------


def raw_mail(headers: str, body: str = "已解决") -> bytes:
    return (
        headers + "\r\nTo: " + DESK + "\r\nDate: Tue, 24 Nov 2026 10:00:00 +0800\r\n"
        "Subject: [INC-1] 电脑无法开机\r\n\r\n" + body + "\r\n"
    ).encode()


FORGED = {
    "From the desk": f"From: {DESK}\r\nMessage-ID: <f1@evil.test>",
    "From the desk in capitals": f"From: IT <{DESK.upper()}>\r\nMessage-ID: <f2@evil.test>",
    "From a +tag of the desk": "From: itsm+approve@example.test\r\nMessage-ID: <f3@evil.test>",
    "Sender is the desk": f"From: desk1@example.test\r\nSender: {DESK}\r\nMessage-ID: <f4@e.test>",
    "From the desk, Sender someone": f"From: {DESK}\r\nSender: evil@evil.test\r\n"
    "Message-ID: <f5@evil.test>",
    "desk among two From": f"From: {DESK}, evil@evil.test\r\nMessage-ID: <f6@evil.test>",
}


@pytest.mark.parametrize("trick", list(FORGED))
def test_mail_claiming_the_desk_address_is_never_trusted(
    trick, desk, mailbox, smtp, clock, capsys, opened
):
    before = fields(cli_json(desk, capsys, "show", "INC-1"))
    sent = len(smtp.messages)
    mailbox.append(raw_mail(FORGED[trick]))
    run_once(desk, clock)
    assert fields(cli_json(desk, capsys, "show", "INC-1")) == before
    assert len(smtp.messages) == sent, "nothing is answered"
    assert cli_json(desk, capsys, "status")["inbound"]["ignored"] == 1
    assert "desk's own address" in reasons(desk)[-1] or "own mail" in reasons(desk)[-1]


def test_a_display_name_naming_the_desk_is_only_a_name(desk, mailbox, smtp, clock, capsys, opened):
    # Quoted, the desk's address is a name: the mail is from evil@evil.test, a stranger.
    mailbox.append(raw_mail(f'From: "{DESK}" <evil@evil.test>\r\nMessage-ID: <d1@evil.test>'))
    # Unquoted it reads as two addresses, the desk's first: not trusted, ignored.
    mailbox.append(
        raw_mail(f"From: {DESK} <evil@evil.test>\r\nMessage-ID: <d2@evil.test>", body="priority P1")
    )
    run_once(desk, clock)
    ticket = cli_json(desk, capsys, "show", "INC-1")
    assert (ticket["status"], ticket["priority"]) == ("open", "P3")
    strangers = [e for e in ticket["events"] if e["action"] == "stranger"]
    assert [e["actor"] for e in strangers] == ["evil@evil.test"]
    # Ignored either as the desk's own address or, where Python's stricter getaddresses
    # (e.g. Debian's 3.11.2) finds no address in the ambiguous From, as no sender at all.
    assert "desk's own address" in reasons(desk)[-1] or "no sender" in reasons(desk)[-1]
    assert all(DESK not in m.rcpt_tos for m in smtp.messages)


def test_reply_to_the_desk_never_makes_the_desk_write_to_itself(desk, mailbox, smtp, clock, capsys):
    raw = (
        f"From: evil@evil.test\r\nReply-To: {DESK}\r\nTo: {DESK}\r\n"
        "Message-ID: <r1@evil.test>\r\nSubject: 打印机坏了\r\n\r\n打印机坏了\r\n"
    ).encode()
    mailbox.append(raw)
    run_once(desk, clock)
    tickets = cli_json(desk, capsys, "tickets")
    assert [t["requester"] for t in tickets] == ["evil@evil.test"]
    assert all(DESK not in m.rcpt_tos for m in smtp.messages)
    assert len(sent_to(smtp, "evil@evil.test")) == 1
