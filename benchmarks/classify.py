"""Classification throughput of the shipped rule set on realistic mails (prints mails/s)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from test_rules import CASES, DISCLAIMER, SIGNATURE  # noqa: E402

from mailflow.rules import load_rules  # noqa: E402


def main() -> None:
    rules = load_rules(ROOT / "rules")
    for label, extra in (("bare", ""), ("with signature + disclaimer", SIGNATURE + DISCLAIMER)):
        mails = [(s, b + extra) for s, b, _ in CASES]
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < 1.0:
            for subject, body in mails:
                rules.classify(subject, body)
            n += len(mails)
        print(f"{label:>28}: {n / (time.perf_counter() - start):,.0f} mails/s")


if __name__ == "__main__":
    main()
