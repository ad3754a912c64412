"""Charts for the review report: PNG images drawn with matplotlib's Agg backend (no display).

Labels are English (plus the data's own names), so no CJK font is needed; a CJK font is
used when one is installed, for category or requester names in Chinese.
"""

from __future__ import annotations

import io
import uuid
from datetime import date, timedelta
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import font_manager  # noqa: E402

CJK_FONTS = ("Noto Sans CJK SC", "Source Han Sans SC", "WenQuanYi Zen Hei", "SimHei")


def _fonts() -> list[str]:
    installed = {f.name for f in font_manager.fontManager.ttflist}
    return [name for name in CJK_FONTS if name in installed] + ["DejaVu Sans"]


def _png(fig: Any) -> bytes:
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return out.getvalue()


def _label(since: str, until: str) -> str:
    """A whole month as 2026-10, anything else as 10-05–10-11."""
    first, last = date.fromisoformat(since), date.fromisoformat(until)
    next_day = last + timedelta(days=1)
    if first.day == 1 and next_day.day == 1 and (next_day.month - first.month) % 12 == 1:
        return since[:7]
    return f"{since[5:]}–{until[5:]}"


def rate_trend(trend: list[dict[str, Any]]) -> bytes:
    """Target achievement rate per period (a gap where nothing was due)."""
    with plt.rc_context({"font.family": _fonts()}):
        fig, ax = plt.subplots(figsize=(6.4, 3.2))
        labels = [_label(item["since"], item["until"]) for item in trend]
        values = [
            None if item["target_achievement_rate"] is None else item["target_achievement_rate"]
            for item in trend
        ]
        xs = list(range(len(trend)))
        points = [(x, v * 100) for x, v in zip(xs, values, strict=True) if v is not None]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", color="#1f77b4")
            for x, y in points:
                ax.annotate(
                    f"{y:.0f}%",
                    (x, y),
                    textcoords="offset points",
                    xytext=(0, 6),
                    ha="center",
                    fontsize=8,
                )
        ax.set_xticks(xs, labels, rotation=30, ha="right", fontsize=8)
        ax.set_xlim(-0.5, len(xs) - 0.5)
        ax.set_ylim(0, 110)
        ax.set_ylabel("%")
        ax.set_title("Target achievement rate")
        ax.grid(axis="y", alpha=0.3)
        return _png(fig)


def by_category(by_cat: dict[str, dict[str, Any]]) -> bytes:
    """Incidents opened in the period, by category (largest first)."""
    with plt.rc_context({"font.family": _fonts()}):
        items = [(name, v["opened"]) for name, v in by_cat.items() if v["opened"]][:12]
        fig, ax = plt.subplots(figsize=(6.4, 0.4 * max(len(items), 3) + 1))
        names = [name for name, _ in reversed(items)]
        counts = [count for _, count in reversed(items)]
        ax.barh(names, counts, color="#ff7f0e")
        for y, count in enumerate(counts):
            ax.annotate(
                str(count), (count, y), textcoords="offset points", xytext=(3, -3), fontsize=8
            )
        ax.set_xlabel("incidents opened")
        ax.set_title("Incidents by category")
        ax.xaxis.get_major_locator().set_params(integer=True)
        return _png(fig)


def images(data: dict[str, Any]) -> list[tuple[str, str, bytes]]:
    """The report's charts as inline parts: (Content-ID, "image/png", bytes)."""
    token = uuid.uuid4().hex[:12]
    return [
        (f"rate_trend.png@{token}.mailflow", "image/png", rate_trend(data["trend"])),
        (f"by_category.png@{token}.mailflow", "image/png", by_category(data["by_category"])),
    ]
