"""Classification accuracy of a rule set on the labelled desk mails, and its confusion list.

    python benchmarks/accuracy.py [RULES_DIR] [--holdout-misses]

Prints, for the tuning part, the held-out part of tests/fixtures/labelled/ and both, the share
of mails whose category, kind and priority the rules got right (the floor is 95%), then each
miss of the tuning part: expected → got, the rule that decided, and the subject. The
held-out part's misses are printed only with --holdout-misses: rules are tuned on the
tuning part alone, so that the held-out figure stays an honest one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from test_classification import (  # noqa: E402
    FIELDS,
    FLOOR,
    PARTS,
    Score,
    every_mail,
    labelled,
    measure,
)

from mailflow.rules import load_rules  # noqa: E402


def _figures(part: str, score: Score) -> str:
    cells = "  ".join(f"{name} {score.accuracy(name):6.1%}" for name in FIELDS)
    return f"{part:>8} ({score.total:3} mails): {cells}   floor {FLOOR:.0%}"


def _misses(part: str, score: Score) -> list[str]:
    lines = [f"\n{part}: {len(score.misses)} miss(es)"]
    for mail, got, rule in score.misses:
        expected = f"{mail.kind}/{mail.category}/{mail.priority}"
        lines.append(f"  {expected:<28} → {'/'.join(got):<28} [{rule}]  {mail.subject}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rules", nargs="?", type=Path, default=ROOT / "rules",
                        help="the rules directory to measure (default: the shipped rules/)")
    parser.add_argument("--holdout-misses", action="store_true",
                        help="also list the held-out part's misses (do not tune on them)")
    args = parser.parse_args()
    rules = load_rules(args.rules)
    scores = {part: measure(rules, labelled(part)) for part in PARTS}
    for part, score in scores.items():
        print(_figures(part, score))
    print(_figures("all", measure(rules, every_mail())))
    for part, score in scores.items():
        if part == "tune" or args.holdout_misses:
            print("\n".join(_misses(part, score)))


if __name__ == "__main__":
    main()
