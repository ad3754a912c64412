"""Know-how reuse: the resolved incidents most like a new one, so the desk resolves faster.

Text is normalised (NFKC, case-folded). A run of Chinese characters gives its overlapping
character bigrams (a lone character stands for itself); a run of letters and digits gives
one word. Subject (counted twice) and description make a profile; candidates are scored by
TF-IDF cosine, the IDF taken over the candidate set itself. Pure Python and cheap: the
candidates are the most recent resolved or closed incidents that have a solution — those of
the same category first, topped up with the others — at most `CANDIDATES` rows, and the
profiles of texts already seen are cached.
"""

from __future__ import annotations

import math
import re
import sys
import unicodedata
from collections import Counter
from functools import lru_cache
from typing import NamedTuple

from sqlalchemy import Integer, Select, bindparam, func, select
from sqlalchemy.orm import Session

from mailflow.models import Ticket

CANDIDATES = 300  # rows read per new incident, same category first
MIN_SCORE = 0.15  # below this a "similar" incident is noise, not know-how
OTHER_CATEGORY = 0.8  # a match from another category counts a little less
TEXT_LIMIT = 2000  # characters of a description that take part

_RUNS = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+|[a-z0-9]+(?:[._-][a-z0-9]+)*")
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
# Tokens that say nothing about the fault: greetings, politeness, filler.
_STOP = frozenset(
    {
        *("您好", "你好", "谢谢", "感谢", "麻烦", "请问", "一下", "帮忙", "我的", "我们"),
        *("一个", "这个", "那个", "现在", "今天", "时候", "问题", "情况"),
        *("the", "a", "an", "is", "are", "was", "to", "of", "and", "or", "in", "on", "at"),
        *("for", "my", "i", "it", "its", "this", "that", "be", "with", "please", "can"),
        *("could", "not", "no", "do", "does", "help", "hello", "hi", "thanks", "thank"),
        *("you", "we", "our"),
    }
)


def tokens(text: str) -> tuple[str, ...]:
    """Character bigrams of Chinese runs and whole words of Latin/digit runs."""
    text = unicodedata.normalize("NFKC", text or "").casefold()
    out: list[str] = []
    for run in _RUNS.findall(text):
        if _CJK.match(run):
            grams = [run] if len(run) == 1 else [run[i : i + 2] for i in range(len(run) - 1)]
        else:
            grams = [run] if len(run) > 1 else []
        out.extend(g for g in grams if g not in _STOP)
    return tuple(out)


class Profile(NamedTuple):
    """An incident's terms with their log-scaled weights, and the squared norm of those."""

    weights: dict[str, float]
    norm2: float


def profile(subject: str, description: str) -> Profile:
    """Term weights of one incident (1 + log count): the subject's terms count twice."""
    return _profile(subject[:TEXT_LIMIT], description[:TEXT_LIMIT])


@lru_cache(maxsize=1024)  # > the candidates read per search; keys are cut to TEXT_LIMIT
def _profile(subject: str, description: str) -> Profile:
    counts = Counter(tokens(subject))
    for term in counts:
        counts[term] *= 2
    counts.update(tokens(description))
    # Up to 1,024 profiles stay cached. Terms are interned (incidents share their words) and
    # weights are shared floats: 13 -> 6 MB for 1,024 of the benchmarks' generated mails.
    weights = {
        sys.intern(t): _WEIGHTS[c] if c < len(_WEIGHTS) else 1 + math.log(c)
        for t, c in counts.items()
    }
    return Profile(weights, sum(w * w for w in weights.values()))


_WEIGHTS = tuple(1 + math.log(c) if c else 0.0 for c in range(256))  # 1 + log(count)


def rank(
    query: Profile, docs: list[tuple[int, Profile, float]], limit: int
) -> list[tuple[float, int]]:
    """(score, id) of the best documents by TF-IDF cosine; each doc is (id, profile, factor).

    Only the query's terms take an IDF (others weigh 1), so a document's norm is its cached
    norm corrected for the shared terms: the work per document is O(query terms).
    """
    terms = query.weights
    matched = []  # (order, id, profile, factor, the terms it shares with the query)
    df: Counter[str] = Counter()
    for order, (doc_id, doc, factor) in enumerate(docs):
        small, large = (
            (doc.weights, terms) if len(doc.weights) < len(terms) else (terms, doc.weights)
        )
        shared = [t for t in small if t in large]
        if shared:
            df.update(shared)
            matched.append((order, doc_id, doc, factor, shared))
    n = len(docs) + 1
    idf = {t: math.log((n + 1) / (df[t] + 2)) + 1 for t in terms}
    q = {t: w * idf[t] for t, w in terms.items()}
    q_norm = math.sqrt(sum(w * w for w in q.values()))
    lift = {t: idf[t] ** 2 - 1 for t in terms}  # what a shared term's IDF adds to a norm
    scored = []
    for order, doc_id, doc, factor, shared in matched:  # one plain loop: the hot spot
        weights, dot, extra = doc.weights, 0.0, 0.0
        for t in shared:
            w = weights[t]
            dot += w * q[t] * idf[t]
            extra += w**2 * lift[t]
        score = dot / (q_norm * math.sqrt(doc.norm2 + extra)) * factor
        if score >= MIN_SCORE:
            scored.append((score, -order, doc_id))
    scored.sort(reverse=True)  # best score first; ties: the more recent (earlier in docs)
    return [(score, doc_id) for score, _, doc_id in scored[:limit]]


def _candidates(same_category: bool) -> Select:
    """Resolved incidents with a solution, newest first: built once (building costs as
    much as running it), with the ticket, its category and the row limit bound per call."""
    category = Ticket.category == bindparam("category")
    return (
        # Only the part of a description that takes part: a mail's text may be long.
        select(Ticket.id, Ticket.subject, func.substr(Ticket.description, 1, TEXT_LIMIT))
        .where(
            Ticket.kind == "incident",
            Ticket.status.in_(("resolved", "closed")),
            Ticket.resolved_at.is_not(None),  # the indexes' range: never the open tickets
            Ticket.solution.is_not(None),
            Ticket.solution != "",
            Ticket.id != bindparam("ticket_id"),
            category if same_category else ~category,
        )
        .order_by(Ticket.resolved_at.desc(), Ticket.id.desc())
        .limit(bindparam("limit", type_=Integer))
    )


_SAME_CATEGORY, _OTHER_CATEGORIES = _candidates(True), _candidates(False)


def similar_resolved(session: Session, ticket: Ticket, limit: int = 3) -> list[Ticket]:
    """Up to `limit` resolved incidents most similar to `ticket`, best first."""
    query = profile(ticket.subject or "", ticket.description or "")
    if limit <= 0 or not query.weights:
        return []
    rows: list[tuple[int, Profile, float]] = []
    for statement, factor in ((_SAME_CATEGORY, 1.0), (_OTHER_CATEGORIES, OTHER_CATEGORY)):
        params = {"ticket_id": ticket.id, "category": ticket.category}
        for doc_id, subject, text in session.execute(
            statement, {**params, "limit": CANDIDATES - len(rows)}
        ):
            rows.append((doc_id, profile(subject or "", text or ""), factor))
        if len(rows) >= CANDIDATES:
            break
    best = [doc_id for _, doc_id in rank(query, rows, limit)]
    if not best:
        return []
    found = {t.id: t for t in session.scalars(select(Ticket).where(Ticket.id.in_(best)))}
    return [found[doc_id] for doc_id in best if doc_id in found]
