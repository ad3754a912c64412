"""Linear time: the per-KB cost of reading a mail, for hostile headers and body lines.

Each case grows one part of an otherwise ordinary mail (a header, or the body) to 1 KB,
10 KB, 100 KB and 1 MB, and times what the desk does with every new mail before it
touches the database:

  - parse       mail.parse (headers, addresses, charsets, quoted history removed)
  - subject     mail.strip_subject_prefixes
  - commands    commands.parse of the new text, signed by the sender's name
  - form        forms.parse of the text
  - classify    RuleSet.classify with the shipped rules/

The cost printed is the time the grown part adds, per KB: (t(size) - t(base)) / KB, with
t(base) the same mail with that part empty, each the best of several rounds. Linear code
gives the same figure at every size: the floor is max/min within 2x ("flat"). A case whose
cost per KB only falls ("falls") does bounded work past some size (rules read the first
5,000 characters of a body; a name is cut to its limit); "GROWS" is superlinear time.
The body cases are parsed with max_text_chars above 1 MB, so the whole body reaches quote
stripping, not the first 200,000 characters a desk keeps by default. A size that takes over
--budget seconds is stopped and the larger ones are not run ("> budget": quadratic code
would take hours).

    python benchmarks/linear.py [--stages] [--only NAME] [--budget 5]
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mailflow import commands, forms  # noqa: E402
from mailflow.mail import ParsedMail, parse, strip_subject_prefixes  # noqa: E402
from mailflow.rules import RuleSet, load_rules  # noqa: E402

SIZES = (1024, 10 * 1024, 100 * 1024, 1024 * 1024)
FLOOR = 2.0  # max/min per-KB cost of a linear case
NOISE = 0.5  # µs per KB: below this a stage costs nothing measurable
MAX_TEXT = 4 * 1024 * 1024
HEAD = (
    "From: Li Si <li.si@example.test>\r\nTo: itsm@example.test\r\n"
    "Subject: VPN down\r\nMessage-ID: <m1@example.test>\r\n"
    "Date: Mon, 3 Mar 2025 09:00:00 +0800\r\n"
)
BODY_HEAD = (
    "From: Li Si <li.si@example.test>\r\nTo: itsm@example.test\r\nSubject: VPN down\r\n"
    "Message-ID: <m1@example.test>\r\nMIME-Version: 1.0\r\n"
    "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
)


def _repeat(unit: str, n: int) -> str:
    """`unit` repeated to about n bytes (UTF-8)."""
    return unit * max(0, n // len(unit.encode()))


def header(name: str, value: Callable[[int], str]) -> Callable[[int], bytes]:
    """A mail whose header `name` holds value(n); the other headers as usual."""
    def build(n: int) -> bytes:
        head = "".join(h + "\r\n" for h in HEAD.split("\r\n") if h and
                       not h.lower().startswith(name.lower() + ":"))
        return f"{head}{name}:{value(n)}\r\n\r\nThe VPN is down.\r\n".encode()
    return build


def body(text: Callable[[int], str], html: bool = False) -> Callable[[int], bytes]:
    """A mail whose body is text(n)."""
    def build(n: int) -> bytes:
        head = BODY_HEAD.replace("text/plain", "text/html") if html else BODY_HEAD
        return (head + text(n).replace("\n", "\r\n") + "\r\n").encode()
    return build


def mime(head: Callable[[int], str], parts: Callable[[int], str]) -> Callable[[int], bytes]:
    """A mail with the Content-Type head(n) and the MIME body parts(n)."""
    def build(n: int) -> bytes:
        top = BODY_HEAD.split("Content-Type:")[0]
        return f"{top}Content-Type: {head(n)}\r\n\r\n{parts(n)}".encode()
    return build


def _parts(n: int) -> str:
    one = "--B\r\nContent-Type: text/plain; charset=utf-8\r\n\r\npart\r\n"
    return _repeat(one, n) + "--B--\r\n"


def _refs(n: int) -> str:
    return "".join(f"\r\n <r{i}.{i * 7}@mail.example.test>" for i in range(n // 32))


def _addrs(n: int) -> str:
    return ",\r\n ".join(f"User {i} <user{i}@example.test>" for i in range(n // 32))


CASES: dict[str, Callable[[int], bytes]] = {
    "From: folded whitespace": header("From", lambda n: _repeat(" \r\n", n) + " li@ex.test"),
    "From: long name": header("From", lambda n: f' "{_repeat("Li Si ", n)}" <li@ex.test>'),
    "To: many addresses": header("To", lambda n: " " + _addrs(n)),
    "Cc: folded whitespace": header("Cc", lambda n: _repeat(" \r\n", n) + " a@ex.test"),
    "Reply-To: spaces": header("Reply-To", lambda n: " a" + " " * n + "b@ex.test"),
    "Subject: words": header("Subject", lambda n: " " + _repeat("VPN down again ", n)),
    "Subject: encoded words": header(
        "Subject", lambda n: _repeat(" =?utf-8?b?5pWF6Zqc?=\r\n", n) + " x"),
    "Subject: folded whitespace": header("Subject", lambda n: _repeat(" \r\n", n) + " x"),
    "Subject: Re + spaces": header("Subject", lambda n: " Re" + " " * n + "x"),
    "References": header("References", _refs),
    "In-Reply-To": header("In-Reply-To", _refs),
    "header lines: many": lambda n: (HEAD + _repeat("X-Note: b\r\n", n) + "\r\nhi\r\n").encode(),
    "Content-Type: many parameters": mime(
        lambda n: "text/plain; charset=utf-8" + _repeat('; a="b"', n), lambda n: "hi\r\n"),
    "Content-Type: quoted ;": mime(
        lambda n: 'text/plain; charset=utf-8; x="' + _repeat("; ", n) + '"', lambda n: "hi\r\n"),
    "MIME: many parts": mime(lambda n: 'multipart/mixed; boundary="B"', _parts),
    "body: quote-marker line ---": body(lambda n: "-" * n),
    "body: quote-marker line ___": body(lambda n: "_" * n),
    "body: From + spaces": body(lambda n: "From" + " " * n),
    "body: From: lines": body(lambda n: _repeat("From: li@ex.test\n", n)),
    "body: long line, no breaks": body(lambda n: _repeat("network down ", n)),
    "body: many short lines": body(lambda n: _repeat("hi\n", n)),
    "body: deep > quoting": body(lambda n: "resolve\n" + ">" * n + " x"),
    "body: > quoted lines": body(lambda n: "resolve\n" + _repeat("> > > quoted\n", n)),
    "body: leading spaces": body(lambda n: " " * n + "x"),
    "body: wrote + spaces": body(lambda n: "wrote" + " " * n + "x"),
    "body: signature lines": body(lambda n: "resolve\n" + _repeat("thanks\n", n)),
    "body: assign + word": body(lambda n: "assign " + "a" * n),
    "body: hi + spaces": body(lambda n: "hi" + " " * n + "x\nresolve"),
    "body: form value spaces": body(lambda n: "reason: a" + " " * n + "b"),
    "body: form reason wrapped": body(lambda n: "申请原因: x\n" + _repeat("more\n", n)),
    "body: form fields repeated": body(lambda n: _repeat("原因: x\n", n)),
    "body: form refs": body(lambda n: "关联事件: " + _repeat("INC-1 ", n)),
    "body: HTML <br>": body(lambda n: _repeat("<br>", n), html=True),
    "body: HTML nested <blockquote>": body(lambda n: _repeat("<blockquote>", n) + "x", html=True),
    "body: HTML table rows": body(
        lambda n: "<table>" + _repeat("<tr><td>a</td><td>b</td></tr>", n) + "</table>", html=True),
}


def stages(rules: RuleSet) -> dict[str, Callable[[bytes, dict], object]]:
    def do_parse(raw: bytes, state: dict) -> object:
        state["mail"] = parse(raw, max_text_chars=MAX_TEXT)
        return state["mail"]

    def mail(state: dict) -> ParsedMail:
        return state["mail"]

    return {
        "parse": do_parse,
        "subject": lambda raw, s: strip_subject_prefixes(mail(s).subject),
        "commands": lambda raw, s: commands.parse(mail(s).new_text, mail(s).from_name),
        "form": lambda raw, s: forms.parse(mail(s).text),
        "classify": lambda raw, s: rules.classify(mail(s).subject, mail(s).text,
                                                  mail(s).from_addr),
    }


def timing(raw: bytes, steps: dict[str, Callable[[bytes, dict], object]],
           rounds: int) -> dict[str, float]:
    """Best seconds per stage for one mail, over `rounds` rounds (more for fast mails)."""
    best = {name: float("inf") for name in steps}
    deadline = time.perf_counter() + 0.3
    done = 0
    while done < rounds or (time.perf_counter() < deadline and done < 200):
        state: dict = {}
        for name, step in steps.items():
            start = time.perf_counter()
            step(raw, state)
            best[name] = min(best[name], time.perf_counter() - start)
        done += 1
    best["all"] = sum(best.values())
    return best


class _OverBudget(BaseException):  # parse() catches every Exception
    pass


def _over_budget(signum: int, frame: object) -> None:
    raise _OverBudget


def run_case(build: Callable[[int], bytes], steps: dict, budget: float,
             rounds: int) -> dict[str, list[float | None]]:
    """Per-KB microseconds per stage and size (None: over budget, at this size or before)."""
    base = timing(build(0), steps, rounds)
    out: dict[str, list[float | None]] = {name: [] for name in base}
    slow = False
    signal.signal(signal.SIGALRM, _over_budget)
    for size in SIZES:
        t: dict[str, float] | None = None
        if not slow:
            raw = build(size)
            signal.setitimer(signal.ITIMER_REAL, budget)
            try:
                t = timing(raw, steps, rounds)
            except _OverBudget:
                slow = True
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        for name in out:
            cost = None if t is None else max(t[name] - base[name], 0.0) * 1e6 / (size / 1024)
            out[name].append(cost)
    return out


def verdict(costs: list[float]) -> tuple[float, str]:
    """max/min of the per-KB costs, and whether they are flat, only fall, or grow.

    Costs under NOISE µs/KB count as NOISE. Falling costs (a bounded part, such as a name
    cut to its limit, or fixed costs spread over more bytes) are no sign of superlinear
    time; growth beyond FLOOR between a size and a larger one is.
    """
    c = [max(x, NOISE) for x in costs]
    ratio = max(c) / min(c)
    growth = max(c[j] / c[i] for i in range(len(c)) for j in range(i + 1, len(c)))
    if ratio <= FLOOR:
        return ratio, "flat"
    return ratio, "falls" if growth <= FLOOR else f"GROWS {growth:.0f}x"


def row(label: str, costs: list[float | None]) -> str:
    cells = [f"{c:10.2f}" if c is not None else f"{'> budget':>10}" for c in costs]
    known = [c for c in costs if c is not None]
    if len(known) == len(costs):
        ratio, word = verdict(known)
        tail = f"{ratio:8.2f}  {word}"
    else:
        tail = f"{'—':>8}  too slow"
    return f"{label:<36}{''.join(cells)}{tail}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stages", action="store_true", help="a row per stage as well")
    parser.add_argument("--only", default="", help="cases whose name contains this")
    parser.add_argument("--budget", type=float, default=5.0,
                        help="seconds a size may take before larger sizes are skipped")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    steps = stages(load_rules(ROOT / "rules"))
    sizes = "".join(f"{f'{s // 1024} KB':>10}" for s in SIZES)
    print(f"µs per KB of the grown part (floor: max/min ≤ {FLOOR:g}x)")
    print(f"{'case':<36}{sizes}  max/min")
    for name, build in CASES.items():
        if args.only.lower() not in name.lower():
            continue
        costs = run_case(build, steps, args.budget, args.rounds)
        print(row(name, costs["all"]), flush=True)
        if args.stages:
            for stage in steps:
                print(row(f"  · {stage}", costs[stage]))


if __name__ == "__main__":
    main()
