"""No mail can stop the desk: a header as long as a mail allows, a statement it breaks."""

from __future__ import annotations

import databases
import pytest
from sqlalchemy import select
from support import make_mail, parsed, run_once

from mailflow import fetch, pipeline, tracking
from mailflow.fetch import ImapSettings, ImapSource
from mailflow.models import Inbound, Ticket

# Past SQLite's variable limit (32,766 by default, 250,000 in Debian's build) and
# PostgreSQL's 65,535 parameters.
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
    assert huge.size > 40 * REFERENCES  # stored whole: every reference kept in the raw mail


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


def test_fetch_round_trips_are_bounded_by_bytes_as_well_as_count(mailbox, monkeypatch):
    """Each UID FETCH takes at most FETCH_BYTES of mail (a bigger mail alone), so memory
    follows the bytes in hand, not `[imap] batch_size`."""
    sizes = [3_000, 3_000, 9_000, 1_000, 1_000]
    for n, size in enumerate(sizes):
        mailbox.append(make_mail(f"u{n}@example.test", f"问题 {n}", "x" * size))
    monkeypatch.setattr(fetch, "FETCH_BYTES", 7_000)
    source = ImapSource(ImapSettings(host=mailbox.host, port=mailbox.port, security="none",
                                     username=mailbox.address, password=mailbox.password))
    with source:
        batches = [[f.uid for f in batch] for batch in source.fetch_batches(source.uids_after(0))]
    assert batches == [[1, 2], [3], [4, 5]]


def test_processing_batches_are_bounded_by_bytes_as_well_as_count():
    rows = [(1, 10), (2, 10), (3, 28), (4, 1), (5, 1), (6, 1)]
    assert pipeline.batches(rows, count=50, size=30) == [[1, 2], [3, 4, 5], [6]]
    assert pipeline.batches(rows, count=2, size=30) == [[1, 2], [3, 4], [5, 6]]
    assert pipeline.batches([(1, 99), (2, 1)], count=50, size=30) == [[1], [2]]
