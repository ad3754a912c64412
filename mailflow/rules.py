"""Classification rules: one TOML file per rule in ``rules/``, the best-scoring match wins.

Each file says which mails it matches (``[match]``), how strongly a matched mail is about
it (its keywords, weighed by ``[score]``) and how to classify them (``[set]``), with the
category's ``label`` for people to read.  Of the rules that match a mail, the one with the
highest score wins; equal scores go to the earlier file in file-name order.  A rule without
``[match]`` matches every mail and must be the last file (the default).  See
``rules/README.md`` for the file format.
"""

from __future__ import annotations

import re
import tomllib
import unicodedata
import weakref
from dataclasses import dataclass
from email.utils import parseaddr
from pathlib import Path
from typing import Any

from mailflow.errors import RuleError

KINDS = ("incident", "request")
PRIORITIES = ("P1", "P2", "P3", "P4")
TIERS = ("L1", "L2", "L3", "IM")
MAJOR_TIER = "L2"
BODY_LIMIT = 5000
"""Only the first BODY_LIMIT characters of a body are matched."""
LANGUAGES = ("zh-CN", "en")
"""The languages a rule's ``label`` may name."""
SUBJECT_WEIGHT = 2
"""A keyword found in the subject counts this many times its weight."""
WEIGHTS = {"strong": 3, "against": -1}
"""The weight of a keyword listed in ``[score]`` (any other keyword of a rule weighs 1)."""

_TOP_KEYS = ("description", "label", "match", "score", "set")
_SCORE_KEYS = (*WEIGHTS, "base")
_KEYWORD_KEYS = ("any", "subject_any", "all", "none")
_MATCH_KEYS = (*_KEYWORD_KEYS, "regex", "from_domain")
_SET_KEYS = ("kind", "category", "priority", "tier", "major", "desktop", "request_type")
_NAME_RE = re.compile(r"[a-z][a-z0-9_-]*")
_DOMAIN_RE = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*")
_ASCII_WORD = frozenset("abcdefghijklmnopqrstuvwxyz0123456789")


_FULLWIDTH = {c: unicodedata.normalize("NFKC", chr(c)) for c in (*range(0xFF01, 0xFF5F), 0x3000)}
_FULLWIDTH_RE = re.compile("[\uff01-\uff5e\u3000]")


def _halfwidth(match: re.Match[str]) -> str:
    return _FULLWIDTH[ord(match.group())]


def normalise(text: str) -> str:
    """Return ``text`` as rules see it: NFKC (full-width to half-width), then casefolded."""
    # Full-width forms are common in Chinese mail and make NFKC take its slow path; map
    # them first, so that most texts then pass NFKC's quick check unchanged.
    text = _FULLWIDTH_RE.sub(_halfwidth, text)
    if not unicodedata.is_normalized("NFKC", text):
        text = unicodedata.normalize("NFKC", text)
    return text.casefold()


@dataclass(frozen=True)
class Classification:
    """The outcome of classifying one mail, and the rule that decided it."""

    rule: str
    kind: str
    category: str
    priority: str
    tier: str | None
    major: bool
    desktop: bool
    request_type: str | None


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a rule file (or with the rules directory as a whole)."""

    file: str
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.key}: {self.message}" if self.key else (
            f"{self.file}: {self.message}"
        )


class _Keywords:
    """A normalised keyword list with fast substring tests.

    A keyword that begins with an ASCII letter or digit only matches at the start of a word,
    so ``oa`` matches ``OA系统`` but not ``download``; other keywords match anywhere.
    The "any" test is one regular expression shaped as a trie (shared prefixes merged),
    which scans the text once.  Identical lists (the same words in several rules) are one
    shared object, so a RuleSet tests each of them once per mail.
    """

    __slots__ = ("words", "_search", "__weakref__")

    def __init__(self, words: tuple[str, ...]) -> None:
        self.words = words
        self._search = re.compile(_trie_pattern(words)).search

    @classmethod
    def of(cls, words: list[str], *, every: bool = False) -> _Keywords:
        """The shared keyword list for ``words``, without redundant words.

        For "any"/"none" a word containing another word is redundant; for "all"
        (``every``) a word contained in another is.
        """
        norm = sorted({normalise(w) for w in words}, key=len)
        if every:
            keep = [w for i, w in enumerate(norm) if not any(_implies(o, w) for o in norm[i + 1:])]
        else:
            keep = [w for i, w in enumerate(norm) if not any(_implies(w, o) for o in norm[:i])]
        key = (every, tuple(keep))
        found = _SHARED.get(key)
        if found is None:
            found = _SHARED[key] = cls(key[1])
        return found

    def any_in(self, text: str) -> bool:
        """True when at least one keyword occurs in ``text``."""
        m = self._search(text)
        while m is not None:
            i = m.start()
            if i == 0 or text[i] not in _ASCII_WORD or text[i - 1] not in _ASCII_WORD:
                return True
            m = self._search(text, i + 1)
        return False

    def all_in(self, text: str) -> bool:
        """True when every keyword occurs in ``text``."""
        return all(w in text and _occurs(w, text) for w in self.words)


def _trie_pattern(words: tuple[str, ...]) -> str:
    """A regex matching any of ``words``, longest first, with common prefixes merged."""
    root: dict[str, dict] = {}
    for word in words:
        node = root
        for ch in word:
            node = node.setdefault(ch, {})
        node[""] = {}

    def build(node: dict[str, dict]) -> str:
        alts = [re.escape(ch) + build(child) for ch, child in sorted(node.items()) if ch]
        if not alts:
            return ""
        group = "(?:" + "|".join(alts) + ")"
        return group + "?" if "" in node else group

    return build(root)


def _occurs(word: str, text: str) -> bool:
    """True when ``word`` occurs in ``text`` (at a word start if it begins with ASCII)."""
    if word[0] not in _ASCII_WORD:
        return word in text
    i = text.find(word)
    while i != -1:
        if i == 0 or text[i - 1] not in _ASCII_WORD:
            return True
        i = text.find(word, i + 1)
    return False


def _implies(word: str, part: str) -> bool:
    """True when every match of keyword ``word`` is also a match of keyword ``part``."""
    return _occurs(part, word)


_SHARED: weakref.WeakValueDictionary[tuple[bool, tuple[str, ...]], _Keywords] = (
    weakref.WeakValueDictionary()
)


class _Weights:
    """How strongly a mail is about one rule: its keywords with their weights, and a base.

    The subject and the body are each scanned once, left to right, longest keyword first at
    each place, so a keyword inside a longer one of the same rule is not counted there:
    against ``抄表单`` (-1), ``抄表`` (+1) does not count in "打印抄表单".  Each keyword found
    counts once: SUBJECT_WEIGHT times its weight if it is in the subject, else its weight.
    """

    __slots__ = ("base", "floor", "weight", "_search")

    def __init__(self, weight: dict[str, int], base: int) -> None:
        self.base = base
        self.weight = weight
        # the lowest score a mail can get: every negative keyword, in the subject
        self.floor = base + SUBJECT_WEIGHT * sum(min(w, 0) for w in weight.values())
        self._search = re.compile(_trie_pattern(tuple(weight))).search if weight else None

    def score(self, subject: str, text: str) -> int:
        """The score of normalised ``subject`` and ``text`` (subject + "\\n" + body)."""
        if self._search is None:
            return self.base
        in_subject = self._found(subject, 0, len(subject))
        in_body = self._found(text, len(subject) + 1, len(text)) - in_subject
        return (self.base + SUBJECT_WEIGHT * sum(self.weight[w] for w in in_subject)
                + sum(self.weight[w] for w in in_body))

    def _found(self, text: str, start: int, end: int) -> set[str]:
        """The keywords in ``text[start:end]``, longest first at each place, not overlapping."""
        found: set[str] = set()
        m = self._search(text, start, end)
        while m is not None:
            i = m.start()
            if text[i] in _ASCII_WORD and i > start and text[i - 1] in _ASCII_WORD:
                m = self._search(text, i + 1, end)  # not at a word start: look further on
                continue
            found.add(m.group())
            m = self._search(text, m.end(), end)
        return found


_NO_WEIGHTS = _Weights({}, 0)


@dataclass(frozen=True, eq=False)
class Rule:
    """One parsed rule file; ``catch_all`` rules have no ``[match]`` table."""

    name: str
    path: Path
    description: str
    result: Classification
    catch_all: bool = True
    label: dict[str, str] | None = None
    weights: _Weights = _NO_WEIGHTS
    any: _Keywords | None = None
    subject_any: _Keywords | None = None
    all: _Keywords | None = None
    none: _Keywords | None = None
    regex: re.Pattern[str] | None = None
    from_domain: tuple[str, ...] | None = None

    def score(self, subject: str, text: str) -> int:
        """How strongly normalised ``subject`` and ``text`` are about this rule."""
        return self.weights.score(subject, text)

    def matches(self, subject: str, text: str, domain: str, memo: dict[_Keywords, bool]) -> bool:
        """Test normalised ``subject``, normalised ``subject + "\\n" + body`` and ``domain``.

        ``memo`` caches keyword-list results for one mail across rules.
        """
        if self.catch_all:
            return True
        if self.from_domain is not None and not any(
            domain == d or domain.endswith("." + d) for d in self.from_domain
        ):
            return False
        if self.subject_any is not None and not self.subject_any.any_in(subject):
            return False
        if self.any is not None:
            hit = memo.get(self.any)
            if hit is None:
                hit = memo[self.any] = self.any.any_in(text)
            if not hit:
                return False
        if self.all is not None and not self.all.all_in(text):
            return False
        if self.regex is not None and self.regex.search(text) is None:
            return False
        if self.none is not None:
            hit = memo.get(self.none)
            if hit is None:
                hit = memo[self.none] = self.none.any_in(text)
            if hit:
                return False
        return True


FALLBACK_RULE = Rule(
    name="builtin-default",
    path=Path("<built-in>"),
    description="Built-in default: used when rules/ has no usable default rule",
    result=Classification(
        rule="builtin-default", kind="incident", category="other", priority="P3",
        tier="L1", major=False, desktop=True, request_type=None,
    ),
)


def _sender_domain(sender: str) -> str:
    addr = parseaddr(sender)[1] or sender
    return addr.rpartition("@")[2].strip().strip(">").lower().rstrip(".")


class RuleSet:
    """An ordered, validated tuple of rules ending with a catch-all default."""

    def __init__(self, rules: tuple[Rule, ...] | list[Rule]) -> None:
        rules = tuple(rules)
        if not rules or not rules[-1].catch_all:
            raise RuleError("a rule set must end with a default rule (one without [match])")
        self.rules: tuple[Rule, ...] = rules
        self._uses_domain = any(r.from_domain is not None for r in rules)
        self._labels: dict[tuple[str, str], str] = {}
        for r in rules:
            for language, text in (r.label or {}).items():
                self._labels.setdefault((r.result.category, language), text)

    def __len__(self) -> int:
        return len(self.rules)

    def __repr__(self) -> str:
        return f"RuleSet({[r.name for r in self.rules]!r})"

    def _matching(self, subject: str, body: str, sender: str) -> tuple[list[Rule], str, str]:
        """The rules that match a new mail, in file order, and its normalised subject and text."""
        subj = normalise(subject)
        text = subj + "\n" + normalise(body[:BODY_LIMIT])
        domain = _sender_domain(sender) if self._uses_domain and sender else ""
        memo: dict[_Keywords, bool] = {}
        return [r for r in self.rules if r.matches(subj, text, domain, memo)], subj, text

    def scores(self, subject: str, body: str, sender: str = "") -> list[tuple[Rule, int]]:
        """The rules that match a new mail, in file order, each with its score."""
        rules, subj, text = self._matching(subject, body, sender)
        return [(rule, rule.score(subj, text)) for rule in rules]

    def classify(self, subject: str, body: str, sender: str = "") -> Classification:
        """Classify a new mail by the matching rule with the highest score (earliest on a tie).

        The default rule always matches, so there is always a rule.
        """
        rules, subj, text = self._matching(subject, body, sender)
        if len(rules) == 2 and rules[0].weights.floor >= rules[1].weights.base:
            return rules[0].result  # it cannot score below the default, which it precedes
        best, best_score = rules[-1], None
        for rule in rules:
            score = rule.score(subj, text)
            if best_score is None or score > best_score:
                best, best_score = rule, score
        return best.result

    def label(self, category: str, language: str) -> str:
        """The label of ``category`` in ``language`` (zh-CN or en), else the category code."""
        return self._labels.get((category, language), category)


# --- parsing and checking -------------------------------------------------------------


class _Checker:
    """Collects problems while turning one file's TOML data into a Rule."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.problems: list[Problem] = []

    def add(self, key: str, message: str) -> None:
        self.problems.append(Problem(self.file, key, message))

    def table(self, data: dict[str, Any], key: str, allowed: tuple[str, ...]) -> dict[str, Any]:
        value = data.get(key)
        if not isinstance(value, dict):
            self.add(key, f"must be a table ([{key}]), got {_tname(value)}")
            return {}
        for k in value:
            if k not in allowed:
                self.add(f"{key}.{k}", f"unknown key; allowed: {', '.join(allowed)}")
        return value

    def word_list(self, match: dict[str, Any], key: str, table: str = "match") -> list[str] | None:
        if key not in match:
            return None
        value = match[key]
        if not isinstance(value, list) or not all(
            isinstance(w, str) and w.strip() for w in value
        ):
            self.add(f"{table}.{key}", "must be a list of non-empty strings, "
                     f"e.g. {key} = [\"网络\", \"VPN\"]")
            return None
        if not value:
            self.add(f"{table}.{key}", "must not be empty; remove the key instead")
            return None
        return value

    def choice(self, s: dict[str, Any], key: str, choices: tuple[str, ...]) -> str | None:
        value = s.get(key)
        if value is None:
            return None
        if value not in choices:
            self.add(f"set.{key}", f"must be one of {', '.join(choices)}, got {value!r}")
            return None
        return str(value)

    def name(self, s: dict[str, Any], key: str) -> str | None:
        value = s.get(key)
        if value is None:
            return None
        if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
            self.add(f"set.{key}", "must be a lower-case name such as \"network\" or "
                     f"\"network-access\", got {value!r}")
            return None
        return value

    def flag(self, s: dict[str, Any], key: str) -> bool:
        value = s.get(key, False)
        if not isinstance(value, bool):
            self.add(f"set.{key}", f"must be true or false, got {value!r}")
            return False
        return value


def _tname(value: object) -> str:
    return "nothing" if value is None else type(value).__name__


def _regex_flags(pattern: str) -> re.RegexFlag:
    """MULTILINE, plus IGNORECASE only where needed: the text is already casefolded, and
    case-insensitive matching disables the regex engine's fast scan for the first character.
    """
    literal = re.sub(r"\\.", "", pattern)
    cased = any(ch != ch.casefold() for ch in literal)
    return re.MULTILINE | re.IGNORECASE if cased else re.MULTILINE


def _parse_match(c: _Checker, match: dict[str, Any]) -> dict[str, Any]:
    fields: dict[str, Any] = {"catch_all": False}
    if not match:
        c.add("match", "an empty [match] matches every mail; remove the table to make "
              "this the default rule, or add conditions")
    for key in _KEYWORD_KEYS:
        words = c.word_list(match, key)
        if words is not None:
            fields[key] = _Keywords.of(words, every=key == "all")
    if "regex" in match:
        pattern = match["regex"]
        if not isinstance(pattern, str) or not pattern:
            c.add("match.regex", f"must be a non-empty string, got {_tname(pattern)}")
        else:
            try:
                fields["regex"] = re.compile(pattern, _regex_flags(pattern))
            except re.error as exc:
                c.add("match.regex", f"invalid regular expression: {exc}")
    domains = c.word_list(match, "from_domain")
    if domains is not None:
        norm = tuple(d.strip().lstrip("@").strip(".").lower() for d in domains)
        bad = [d for d in norm if not _DOMAIN_RE.fullmatch(d)]
        if bad:
            c.add("match.from_domain", f"not a domain name: {', '.join(map(repr, bad))}")
        else:
            fields["from_domain"] = norm
    return fields


def _parse_label(c: _Checker, data: dict[str, Any]) -> dict[str, str] | None:
    """``label = { zh-CN = "打印机", en = "Printer" }``: the category's name for people."""
    if "label" not in data:
        return None
    value = data["label"]
    example = 'e.g. label = { zh-CN = "打印机", en = "Printer" }'
    if not isinstance(value, dict) or not value:
        c.add("label", f"must be a table of language = text, {example}")
        return None
    label: dict[str, str] = {}
    for language, text in value.items():
        if language not in LANGUAGES:
            c.add(f"label.{language}", f"unknown language; allowed: {', '.join(LANGUAGES)}")
        elif not isinstance(text, str) or not text.strip():
            c.add(f"label.{language}", f"must be a non-empty string, got {text!r}")
        else:
            label[language] = text.strip()
    return label


def _parse_score(c: _Checker, data: dict[str, Any], match: dict[str, Any],
                 catch_all: bool) -> _Weights:
    """The rule's weighed keywords: those of [match] weigh 1, [score] strong/against more."""
    score = c.table(data, "score", _SCORE_KEYS) if "score" in data else {}
    base = score.get("base", 0)
    if isinstance(base, bool) or not isinstance(base, int) or not -1000 <= base <= 1000:
        c.add("score.base", f"must be a whole number from -1000 to 1000, got {base!r}")
        base = 0
    weight: dict[str, int] = {}
    for key in ("any", "subject_any", "all"):
        words = match.get(key)
        if isinstance(words, list):
            weight.update((normalise(w), 1) for w in words if isinstance(w, str) and w.strip())
    for key, points in WEIGHTS.items():
        words = c.word_list(score, key, table="score")
        if words is None:
            continue
        if catch_all:
            c.add(f"score.{key}", "the default rule matches every mail: keywords cannot "
                  "change its score; keep only score.base")
        clash = [w for w in words if weight.get(normalise(w), 0) * points < 0]
        if clash:
            c.add(f"score.{key}", f"also weighed the other way: {', '.join(map(repr, clash))}")
        weight.update((normalise(w), points) for w in words)
    return _Weights(weight, base)


def _parse_set(c: _Checker, s: dict[str, Any], stem: str) -> Classification | None:
    before = len(c.problems)
    for key in ("kind", "category", "priority"):
        if key not in s:
            c.add(f"set.{key}", "is required")
    kind = c.choice(s, "kind", KINDS)
    priority = c.choice(s, "priority", PRIORITIES)
    category = c.name(s, "category")
    tier = c.choice(s, "tier", TIERS)
    request_type = c.name(s, "request_type")
    major = c.flag(s, "major")
    desktop = c.flag(s, "desktop")
    if kind == "request":
        for key in ("tier", "major", "desktop"):
            if key in s:
                c.add(f"set.{key}", "only incidents have this; remove it from a request rule")
        if "request_type" not in s:
            c.add("set.request_type", "is required for requests (used to route approvals), "
                  "e.g. request_type = \"account\"")
    elif kind == "incident":
        if "request_type" in s:
            c.add("set.request_type", "only requests have this; remove it or set "
                  "kind = \"request\"")
        if major and tier not in (None, MAJOR_TIER):
            c.add("set.tier", f"major incidents go straight to {MAJOR_TIER}; "
                  f"remove tier or set tier = \"{MAJOR_TIER}\"")
        tier = MAJOR_TIER if major else (tier or "L1")
    if len(c.problems) > before or kind is None or priority is None or category is None:
        return None
    return Classification(
        rule=stem, kind=kind, category=category, priority=priority,
        tier=tier if kind == "incident" else None,
        major=major, desktop=desktop,
        request_type=request_type if kind == "request" else None,
    )


def _parse_file(path: Path, file: str) -> tuple[Rule | None, bool | None, list[Problem]]:
    """Parse one file: (rule or None, whether it is a catch-all if known, problems)."""
    c = _Checker(file)
    try:
        data = tomllib.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        c.add("", f"not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8")
        return None, None, c.problems
    except tomllib.TOMLDecodeError as exc:
        c.add("", f"invalid TOML: {exc}")
        return None, None, c.problems
    except OSError as exc:
        c.add("", f"cannot read: {exc.strerror or exc}")
        return None, None, c.problems
    for key in data:
        if key not in _TOP_KEYS:
            c.add(key, f"unknown key; allowed: {', '.join(_TOP_KEYS)}")
    description = data.get("description", "")
    if not isinstance(description, str):
        c.add("description", f"must be a string, got {_tname(description)}")
        description = ""
    catch_all = "match" not in data
    fields: dict[str, Any] = {}
    match: dict[str, Any] = {}
    if not catch_all:
        match = c.table(data, "match", _MATCH_KEYS)
        fields = _parse_match(c, match)
    fields["label"] = _parse_label(c, data)
    fields["weights"] = _parse_score(c, data, match, catch_all)
    if "set" not in data:
        c.add("set", "is required: a [set] table with kind, category and priority")
        result = None
    else:
        result = _parse_set(c, c.table(data, "set", _SET_KEYS), path.stem)
    if c.problems or result is None:
        return None, catch_all, c.problems
    rule = Rule(name=path.stem, path=path, description=description, result=result, **fields)
    return rule, catch_all, c.problems


def _scan(directory: Path) -> tuple[list[Rule], list[Problem]]:
    """Parse every rule file; return the good rules in order and every problem."""
    where = str(directory)
    if not directory.is_dir():
        return [], [Problem(where, "", "rules directory does not exist or is not a directory")]
    paths = sorted(
        (p for p in directory.glob("*.toml") if not p.name.startswith(".") and p.is_file()),
        key=lambda p: p.name,
    )
    if not paths:
        return [], [Problem(where, "", "no rule files (*.toml); add at least a default rule "
                            "such as 99-default.toml")]
    rules: list[Rule] = []
    problems: list[Problem] = []
    has_default = False
    for i, path in enumerate(paths):
        file = str(path)
        rule, catch_all, found = _parse_file(path, file)
        if catch_all and i < len(paths) - 1:
            later = ", ".join(p.name for p in paths[i + 1:])
            found.append(Problem(file, "match", "a rule without [match] matches every mail "
                                 f"and must be the last file; these would never run: {later}"))
            rule = None
        if catch_all:
            has_default = True
        problems.extend(found)
        if rule is not None:
            rules.append(rule)
    if not has_default:
        problems.append(Problem(where, "", "no default rule: the last file (e.g. "
                                "99-default.toml) must have no [match] table"))
    problems.extend(_label_clashes(rules))
    return rules, problems


def _label_clashes(rules: list[Rule]) -> list[Problem]:
    """Rules of one category must give it one label per language (RuleSet.label is one)."""
    first: dict[tuple[str, str], Rule] = {}
    problems = []
    for rule in rules:
        for language, text in (rule.label or {}).items():
            other = first.setdefault((rule.result.category, language), rule)
            if other.label and other.label[language] != text:
                problems.append(Problem(
                    str(rule.path), f"label.{language}",
                    f"category {rule.result.category!r} is already labelled "
                    f"{other.label[language]!r} by {other.path.name}; give both the same label",
                ))
    return problems


def check_rules(directory: Path) -> list[Problem]:
    """Return every problem in every rule file of ``directory`` (empty when all is well)."""
    return _scan(directory)[1]


def load_rules(directory: Path) -> RuleSet:
    """Load ``directory`` strictly; raise RuleError listing every problem if any."""
    rules, problems = _scan(directory)
    if problems:
        raise RuleError(
            f"{len(problems)} problem(s) in rules at {directory}; fix them and reload:\n"
            + "\n".join(f"  {p}" for p in problems)
        )
    return RuleSet(rules)


def load_rules_lenient(directory: Path) -> tuple[RuleSet, list[Problem]]:
    """Load the good rule files and report the bad ones; a default rule is guaranteed."""
    rules, problems = _scan(directory)
    if not rules or not rules[-1].catch_all:
        rules.append(FALLBACK_RULE)
    return RuleSet(rules), problems
