"""Loop detection: does a mail look like a machine answering our mail?

A person and an auto-responder differ less in how much they write than in how: a machine
answers *every* mail we send it within minutes, with the same text each time, under a
subject that repeats with a counter, at a regular beat. Each mail is compared with its
sender's earlier mails (`[limits] loop_lookback`) and our mails to that sender, all placed
at the time they were *written*: the Date header, clipped to arrival (and to at most
`written_within` before it), never the time the desk happened to process them — so a
backlog drained after an outage answers nothing and is never taken for a loop.

- `quiet`: a new mail written within `[limits] loop_window` of our mail to its sender is an
  answer at machine speed: no automatic reply goes back (everything else goes on).
- `machine`: a mail (new or a reply on a ticket) written within `answer_window` of our mail
  whose signals (`machine_signals`, weighed) reach `machine_score`: nothing is mailed about
  it to anyone; the governor records that and alerts the lead.

Signals (each on a mail that answers ours, against the sender's earlier mails):
`answered_before` (the previous one answered our mail too), `same_text` (subject and text,
normalised, as similar as `same_text` to an earlier mail's), `counted_subject` (the same
subject but for its numbers), `regular_timing` (the last three intervals within
`regular_spread` of their mean).
"""

from __future__ import annotations

import re
import unicodedata
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import bindparam, or_, select
from sqlalchemy.orm import Session

from mailflow.mail import strip_subject_prefixes
from mailflow.mail_in_hand import InHand
from mailflow.models import Inbound, Outbox, Ticket

if TYPE_CHECKING:
    from mailflow.config import LimitSettings

LOOP_SUSPECTED = "mail loop suspected"  # how every reason given here starts
DATE_SKEW = timedelta(minutes=2)  # tolerated clock difference between us and a sender
HISTORY = 20  # the sender's earlier mails compared, most recent first
TEXT_CHARS = 1000  # normalised characters of a text compared (an answer says it first)
SENT_ROWS = 500  # our mails to the sender read, most recent first

_NOT_LETTERS = re.compile(r"[\W\d_]+")  # digits go too: counters, dates, ticket numbers
_DIGITS = re.compile(r"\d+")


@dataclass(frozen=True)
class Written:
    """One mail as the detector sees it: when it was written, its subject and new text."""

    at: datetime
    arrived: datetime
    subject: str
    text: str


@dataclass(frozen=True)
class Verdict:
    quiet: str | None = None  # no automatic reply to the sender
    machine: str | None = None  # nothing mailed to anyone about it


def written_at(date: datetime | None, arrived: datetime, limits: LimitSettings) -> datetime:
    """When a mail was written: its Date, clipped to its arrival (and `written_within`)."""
    if date is None:
        return arrived
    return min(max(date, arrived - limits.written_within), arrived)


# -- the signals: pure functions of text and times ------------------------------------------


def letters(text: str) -> str:
    """Text reduced to its letters (NFKC, case-folded; digits, spaces, punctuation gone)."""
    return _NOT_LETTERS.sub("", unicodedata.normalize("NFKC", text or "").casefold())


def similarity(a: str, b: str) -> float:
    """Jaccard similarity of the character bigrams of two `letters` strings."""
    grams_a = {a[i : i + 2] for i in range(len(a) - 1)}
    grams_b = {b[i : i + 2] for i in range(len(b) - 1)}
    if not grams_a or not grams_b:
        return 1.0 if a == b else 0.0
    return len(grams_a & grams_b) / len(grams_a | grams_b)


def counted(a: str, b: str) -> bool:
    """Two subjects the same but for their numbers (`Ticket 1001 received` / `… 1002 …`)."""
    a, b = strip_subject_prefixes(a), strip_subject_prefixes(b)
    return a != b and _DIGITS.search(a) is not None and (
        _DIGITS.sub("#", a).casefold() == _DIGITS.sub("#", b).casefold()
    )


def regular(times: Sequence[datetime], spread: float) -> bool:
    """The last three intervals between `times` (oldest first) lie within `spread` of their
    mean."""
    if len(times) < 4:
        return False
    last = times[-4:]
    gaps = [(b - a).total_seconds() for a, b in zip(last, last[1:], strict=False)]
    mean = sum(gaps) / len(gaps)
    return mean > 0 and max(gaps) - min(gaps) <= spread * mean


def answered(mail: Written, sent: Sequence[datetime], window: timedelta) -> datetime | None:
    """Our mail (of `sent`, oldest first) that `mail` answers within `window`, else None.

    A mail dated up to DATE_SKEW before ours may still answer it; one that arrived before
    ours went out (our answer to it, say) cannot.
    """
    i = min(bisect_right(sent, mail.at + DATE_SKEW), bisect_left(sent, mail.arrived))
    if i == 0:
        return None
    ours = sent[i - 1]
    return ours if mail.at - ours <= window else None


@dataclass(frozen=True)
class Evidence:
    """What a signal looks at: the mail, the sender's earlier mails and our mails to them."""

    mail: Written
    earlier: Sequence[Written]  # most recent first
    sent: Sequence[datetime]  # oldest first
    limits: LimitSettings


def _answered_before(e: Evidence) -> bool:
    return bool(e.earlier) and answered(e.earlier[0], e.sent, e.limits.answer_window) is not None


def _said(mail: Written) -> str:
    """What a mail says, for comparing: its subject (no prefixes) and text, letters only."""
    return letters(strip_subject_prefixes(mail.subject) + mail.text)[:TEXT_CHARS]


def _same_text(e: Evidence) -> bool:
    mine = _said(e.mail)
    if len(letters(e.mail.text)) < e.limits.same_text_min_chars:
        return False
    return any(similarity(mine, _said(w)) >= e.limits.same_text for w in e.earlier)


def _counted_subject(e: Evidence) -> bool:
    return any(counted(e.mail.subject, w.subject) for w in e.earlier)


def _regular_timing(e: Evidence) -> bool:
    times = sorted([w.at for w in e.earlier[:3]] + [e.mail.at])
    return regular(times, e.limits.regular_spread)


SIGNALS: dict[str, Callable[[Evidence], bool]] = {
    "answered_before": _answered_before,
    "same_text": _same_text,
    "counted_subject": _counted_subject,
    "regular_timing": _regular_timing,
}
_SAID = {
    "answered_before": "its previous mail answered ours too",
    "same_text": "the same subject and text as an earlier mail",
    "counted_subject": "its subject repeats with a counter",
    "regular_timing": "at a regular beat",
}


def judge(e: Evidence, new: bool) -> Verdict:
    """The verdict on one mail from its evidence (no database: see `verdict`)."""
    limits = e.limits
    ours = answered(e.mail, e.sent, limits.answer_window)
    if ours is None:
        return Verdict()
    minutes = max((e.mail.at - ours).total_seconds(), 0) / 60
    said = f"{LOOP_SUSPECTED}: written {minutes:.1f} min after our mail of {ours:%H:%M:%S} UTC"
    weights = dict(limits.machine_signals)
    found = [name for name, signal in SIGNALS.items() if weights.get(name) and signal(e)]
    score = sum(weights[name] for name in found)
    if score >= limits.machine_score:
        why = "; ".join(_SAID[name] for name in found)
        machine = f"{said}, {why} ([limits] machine_score {score} >= {limits.machine_score})"
        return Verdict(quiet=machine, machine=machine)
    if new and limits.loop_window > timedelta(0) and e.mail.at - ours <= limits.loop_window:
        return Verdict(quiet=f"{said} (within [limits] loop_window)")
    return Verdict()


# -- reading the evidence ---------------------------------------------------------------------

# Built once (building costs as much as running) and run on the session's connection: they
# read only rows already written. The sender's mails are found through the tickets they
# opened (tickets.requester is indexed) and the ticket in hand (inbound.ticket_id).
_EARLIER = (
    select(Inbound.received_at, Inbound.sent_at, Inbound.subject, Inbound.text)
    .where(
        or_(
            Inbound.ticket_id.in_(
                select(Ticket.id).where(
                    Ticket.requester == bindparam("sender"), Ticket.created_at > bindparam("since")
                )
            ),
            Inbound.ticket_id == bindparam("ticket_id"),
        ),
        Inbound.from_addr == bindparam("sender"),
        Inbound.received_at > bindparam("since"),
        Inbound.id != bindparam("inbound_id"),
    )
    .order_by(Inbound.id.desc())
    .limit(HISTORY)
)
_SENT = (
    select(Outbox.sent_at)
    .where(
        Outbox.recipient == bindparam("sender"),
        Outbox.state == "sent",
        Outbox.sent_at >= bindparam("since"),
        Outbox.sent_at <= bindparam("until"),
    )
    .order_by(Outbox.sent_at.desc())
    .limit(SENT_ROWS)
)


def verdict(
    session: Session, limits: LimitSettings, mail: InHand, subject: str, text: str
) -> Verdict:
    """Judge the mail in hand (its ticket known) against what its sender sent before."""
    if mail.received_at is None:
        return Verdict()
    at = written_at(mail.date, mail.received_at, limits)
    connection = session.connection()
    sent = sorted(connection.scalars(_SENT, {
        "sender": mail.sender, "until": at + DATE_SKEW,
        "since": at - limits.loop_lookback - limits.answer_window,
    }))
    mine = Written(at, mail.received_at, subject, text)
    if not sent or answered(mine, sent, limits.answer_window) is None:
        return Verdict()  # answers nothing of ours: a person's, however alike (one query)
    rows = connection.execute(_EARLIER, {
        "sender": mail.sender, "since": at - limits.loop_lookback,
        "ticket_id": mail.ticket.id if mail.ticket is not None else None,
        "inbound_id": mail.inbound_id,
    })
    earlier = [
        Written(written_at(date, arrived, limits), arrived, subj or "", body or "")
        for arrived, date, subj, body in rows
    ]
    return judge(Evidence(mine, earlier, sent, limits), mail.new)
