"""Classification accuracy of the shipped rules on the labelled desk mails.

``tests/fixtures/labelled/`` holds hand-written mails as a bureau's staff write them, each
with the kind, category and priority the desk should give it: ``tune.toml`` is the part the
shipped rules were tuned on, ``holdout.toml`` a part they were not. The whole set must stay
at or above FLOOR; ``benchmarks/accuracy.py`` prints the figures of each part and every miss.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mailflow.rules import KINDS, PRIORITIES, RuleSet, load_rules

ROOT = Path(__file__).resolve().parent.parent
LABELLED = ROOT / "tests" / "fixtures" / "labelled"
PARTS = ("tune", "holdout")
FIELDS = ("category", "kind", "priority")
FLOOR = 0.95


@dataclass(frozen=True)
class Mail:
    """One labelled mail: what a user wrote, and how the desk should file it."""

    subject: str
    body: str
    kind: str
    category: str
    priority: str


@dataclass
class Score:
    """How many of a part's mails the rules filed right, field by field, and the misses."""

    total: int = 0
    right: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FIELDS, 0))
    misses: list[tuple[Mail, tuple[str, str, str], str]] = field(default_factory=list)

    def accuracy(self, name: str) -> float:
        return self.right[name] / self.total if self.total else 0.0


def labelled(part: str) -> list[Mail]:
    """The mails of one part of the labelled set (``tune`` or ``holdout``)."""
    data = tomllib.loads((LABELLED / f"{part}.toml").read_text(encoding="utf-8"))
    return [Mail(**m) for m in data["mail"]]


def measure(rules: RuleSet, mails: list[Mail]) -> Score:
    """Classify every mail; count the right fields and keep the mails filed wrong."""
    score = Score(total=len(mails))
    for mail in mails:
        c = rules.classify(mail.subject, mail.body)
        got = {"category": c.category, "kind": c.kind, "priority": c.priority}
        for name in FIELDS:
            score.right[name] += got[name] == getattr(mail, name)
        if any(got[name] != getattr(mail, name) for name in FIELDS):
            score.misses.append((mail, (c.kind, c.category, c.priority), c.rule))
    return score


@pytest.fixture(scope="module")
def rules() -> RuleSet:
    return load_rules(ROOT / "rules")


@pytest.mark.parametrize("part", PARTS)
def test_labels_are_ones_the_rules_can_give(rules: RuleSet, part: str) -> None:
    """Every expected (kind, category, priority) is the outcome of some shipped rule."""
    outcomes = {(r.result.kind, r.result.category, r.result.priority) for r in rules.rules}
    mails = labelled(part)
    assert all(m.kind in KINDS and m.priority in PRIORITIES for m in mails)
    assert [m for m in mails if (m.kind, m.category, m.priority) not in outcomes] == []


def test_the_set_is_big_and_mostly_chinese() -> None:
    mails = every_mail()
    english = sum((m.subject + m.body).isascii() for m in mails)
    assert len(mails) >= 200
    assert 0.2 <= english / len(mails) <= 0.4
    assert len(labelled("holdout")) >= len(mails) // 5


def every_mail() -> list[Mail]:
    """The whole labelled set: every part."""
    return [m for part in PARTS for m in labelled(part)]


@pytest.mark.parametrize("name", FIELDS)
def test_accuracy_floor(rules: RuleSet, name: str) -> None:
    score = measure(rules, every_mail())
    wrong = [f"{m.subject}: expected {m.kind}/{m.category}/{m.priority}, got {'/'.join(g)}"
             for m, g, _ in score.misses]
    assert score.accuracy(name) >= FLOOR, "\n".join(wrong)
