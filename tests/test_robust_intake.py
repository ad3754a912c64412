"""No mail can stop the desk: a header as long as a mail allows, a statement it breaks."""

from __future__ import annotations

import databases
import pytest
from sqlalchemy import select
from support import make_mail, parsed, run_once

from mailflow import tracking
from mailflow.models import Inbound, Ticket

# Past SQLite's variable limit (32,766) by far, and PostgreSQL's 65,535 parameters.
REFERENCES = 70_000 if databases.configured() else 260_000
HUGE = "huge@example.test"


def with_references(raw: bytes, count: int) -> bytes:
    """The mail with a References header of `count` ids (folded, as a client would)."""
    ids = "\r\n ".join(f"<thread-{n}.{n * 7919}@mail.example.test>" for n in range(count))
    head, _, body = raw.partition(b"\r\n\r\n")
    return head + f"\r\nReferences: {ids}".encode() + b"\r\n\r\n" + body


def huge_then_ordinary(mailbox) -> None:
    huge = make_mail("flood@example.test", "Re: 会议纪要", "见下方", message_id=f"<{HUGE}>")
    mailbox.append(with_references(huge, REFERENCES))
    mailbox.append(make_mail("user@example.test", "打印机卡纸", "三楼打印机卡纸了"))


def the_next_mail_went_through(desk, smtp) -> None:
    """The ordinary mail made its ticket, and its acknowledgement reached its sender."""
    with desk.db.sessions() as session:
        tickets = session.scalars(select(Ticket).where(Ticket.requester == "user@example.test"))
        assert [t.subject for t in tickets] == ["打印机卡纸"]
        states = dict(session.execute(select(Inbound.from_addr, Inbound.state)).all())
    assert states.get("user@example.test") == "processed"
    acks = [m for m in smtp.messages if m.rcpt_tos == ["user@example.test"]]
    assert len(acks) == 1 and "打印机卡纸" in str(parsed(acks[0].content)["Subject"])


def test_a_mail_with_a_huge_references_list_does_not_stop_the_desk(desk, mailbox, smtp, clock):
    """The pending-answers lookup asks about the last References only: the mail is handled
    like any other, and the next one goes through in the same pass."""
    huge_then_ordinary(mailbox)
    result = run_once(desk, clock)
    assert result.fetched == 2 and result.processed == 2
    the_next_mail_went_through(desk, smtp)
    with desk.db.sessions() as session:
        huge = session.scalars(select(Inbound).where(Inbound.message_id == HUGE)).one()
    assert (huge.state, huge.from_addr) == ("processed", "flood@example.test")


def test_a_statement_a_mail_breaks_quarantines_that_mail_alone(
    desk, mailbox, smtp, clock, monkeypatch
):
    """Were the lookups before a mail's savepoint unbounded, the database refuses the
    statement: that mail is quarantined with the reason, and the rest go on."""
    monkeypatch.setattr(tracking, "REFS_KEPT", 10**9, raising=False)
    huge_then_ordinary(mailbox)
    result = run_once(desk, clock)
    assert result.fetched == 2 and result.processed == 2
    the_next_mail_went_through(desk, smtp)
    with desk.db.sessions() as session:
        rows = session.scalars(select(Inbound).where(Inbound.state == "quarantined")).all()
    assert [row.message_id for row in rows] == [HUGE]
    assert rows[0].reason, "the reason is recorded for the operator"


@pytest.fixture(autouse=True)
def _quiet(caplog):  # the quarantine logs the refused statement, parameters and all
    caplog.set_level("CRITICAL", logger="mailflow.pipeline")
