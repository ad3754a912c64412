"""SLA clock: hand-checked deadlines, parsing, and a minute-by-minute brute-force reference."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, date, datetime, time, timedelta
from functools import cache
from zoneinfo import ZoneInfo

import holidays
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailflow.sla import (
    Calendar,
    Pause,
    due_at,
    elapsed,
    fraction_used,
    parse_duration,
    parse_hours,
)

SH = ZoneInfo("Asia/Shanghai")
HOURS = parse_hours(["08:30-12:00", "13:30-17:30"])  # 7.5 working hours a day
DESK = Calendar(SH, HOURS)  # China: holidays and make-up working days
WEEKDAYS = Calendar(SH, HOURS, country=None)  # Monday-Friday only
AROUND = Calendar(SH, None)  # 24x7
MIN = timedelta(minutes=1)
US = timedelta(microseconds=1)


def sh(*args: int) -> datetime:
    return datetime(*args, tzinfo=SH)


# --------------------------------------------------------------------------- brute force


@cache
def _cn_working(day: date) -> bool:
    return holidays.China(years=day.year).is_working_day(day)


def _is_working_minute(cal: Calendar, instant: datetime) -> bool:
    """Reference: is the minute starting at ``instant`` on the clock? (independent of sla.py)"""
    if cal.hours is None:
        return True
    local = instant.astimezone(cal.tz)
    day = local.date()
    working_day = _cn_working(day) if cal.country == "CN" else day.weekday() < 5
    return working_day and any(a <= local.time() < b for a, b in cal.hours)


def _brute_minutes(
    cal: Calendar, start: datetime, end: datetime, pauses: Sequence[tuple[datetime, datetime]] = ()
) -> int:
    count, t = 0, start
    while t < end:
        if _is_working_minute(cal, t) and not any(a <= t < b for a, b in pauses):
            count += 1
        t += MIN
    return count


def _brute_due(
    cal: Calendar, start: datetime, minutes: int, pauses: list[tuple[datetime, datetime]]
) -> datetime:
    t, left = start, minutes
    while True:
        if _is_working_minute(cal, t) and not any(a <= t < b for a, b in pauses):
            left -= 1
            if left == 0:
                return t + MIN
        t += MIN


# Anchors around the interesting periods of 2026 (and a year boundary); spans up to 20 days.
ANCHORS = [
    sh(2026, 2, 5),  # Spring Festival 02-15..02-23, make-up days 02-14 and 02-28 (Saturdays)
    sh(2026, 9, 12),  # Mid-Autumn 09-25, make-up 09-20 (Sunday), National Day 10-01..10-07
    sh(2026, 10, 1),  # National Day and make-up 10-10 (Saturday)
    sh(2026, 12, 20),  # across the new year
    sh(2026, 3, 2),  # ordinary weeks
]
CALENDARS = [DESK, WEEKDAYS, AROUND, Calendar(SH, parse_hours(["09:00-18:00"]))]
starts = st.builds(
    lambda anchor, minutes: (anchor + minutes * MIN).astimezone(UTC),
    st.sampled_from(ANCHORS),
    st.integers(0, 25 * 1440),
)
spans = st.integers(0, 20 * 1440)


def examples(n: int) -> settings:
    """Bounded, deterministic-enough runs that write nothing to disk."""
    return settings(
        max_examples=n,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )


@examples(300)
@given(cal=st.sampled_from(CALENDARS), start=starts, span=spans)
def test_working_seconds_matches_brute_force(cal: Calendar, start: datetime, span: int) -> None:
    end = start + span * MIN
    assert cal.working_seconds(start, end) == 60 * _brute_minutes(cal, start, end)
    assert cal.working_seconds(end, start) == 0


pause_lists = st.lists(
    st.tuples(st.integers(-2 * 1440, 15 * 1440), st.integers(1, 4 * 1440), st.booleans()),
    max_size=4,
)


@examples(150)
@given(
    cal=st.sampled_from([DESK, AROUND]),
    start=starts,
    span=st.integers(0, 15 * 1440),
    raw=pause_lists,
)
def test_elapsed_with_pauses_matches_brute_force(
    cal: Calendar, start: datetime, span: int, raw: list[tuple[int, int, bool]]
) -> None:
    now = start + span * MIN
    pauses: list[Pause] = [
        (start + a * MIN, None if is_open else start + (a + n) * MIN) for a, n, is_open in raw
    ]
    closed = [(a, b if b is not None else now) for a, b in pauses if a <= now]
    assert elapsed(cal, start, now, pauses) == 60 * _brute_minutes(cal, start, now, closed)


@examples(150)
@given(
    cal=st.sampled_from([DESK, WEEKDAYS, AROUND]),
    start=starts,
    target=st.integers(1, 40 * 60),
    raw=st.lists(st.tuples(st.integers(-1440, 6 * 1440), st.integers(1, 2 * 1440)), max_size=3),
)
def test_due_at_matches_brute_force(
    cal: Calendar, start: datetime, target: int, raw: list[tuple[int, int]]
) -> None:
    pauses = [(start + a * MIN, start + (a + n) * MIN) for a, n in raw]
    due = due_at(cal, start, target * MIN, pauses)
    assert due == _brute_due(cal, start, target, pauses)
    assert due is not None and due.tzinfo is UTC
    assert elapsed(cal, start, due, pauses) == 60 * target


# --------------------------------------------------------------------------- add()


@examples(300)
@given(
    cal=st.sampled_from(CALENDARS),
    start=st.builds(
        lambda anchor, us: (anchor + us * US).astimezone(SH),
        st.sampled_from(ANCHORS),
        st.integers(0, 25 * 86_400 * 10**6),
    ),
    micros=st.integers(0, 30 * 86_400 * 10**6),
)
def test_add_is_minimal_inverse_of_working_seconds(
    cal: Calendar, start: datetime, micros: int
) -> None:
    seconds = micros / 1e6
    end = cal.add(start, seconds)
    assert end.tzinfo is UTC
    assert cal.working_seconds(start, end) == seconds
    if micros:
        assert cal.working_seconds(start, end - US) < seconds  # nothing earlier reaches it
    else:
        assert end == start


def test_add_outside_working_time_starts_at_next_period() -> None:
    assert DESK.add(sh(2026, 3, 7, 10), 60) == sh(2026, 3, 9, 8, 31)  # Saturday -> Monday
    assert DESK.add(sh(2026, 3, 9, 12, 15), 60) == sh(2026, 3, 9, 13, 31)  # lunch break
    assert DESK.add(sh(2026, 3, 9, 20), 60) == sh(2026, 3, 10, 8, 31)  # evening
    assert DESK.add(sh(2026, 3, 9, 11), 3600) == sh(2026, 3, 9, 12)  # earliest, not 13:30
    assert DESK.add(sh(2026, 9, 19, 10), 3600) == sh(2026, 9, 20, 9, 30)  # make-up Sunday


# --------------------------------------------------------------------------- hand-checked


def test_p3_opened_on_mid_autumn_friday_crosses_the_weekend() -> None:
    # 2026-09-25 is the Mid-Autumn Festival (a public holiday), so the clock starts on
    # Monday 09-28 08:30: 7.5 h that day, the last 0.5 h on Tuesday.
    due = due_at(DESK, sh(2026, 9, 25, 16), parse_duration("8h"))
    assert due == sh(2026, 9, 29, 9, 0)
    # Mon-Fri only: Friday 16:00-17:30 counts (1.5 h), then 6.5 h on Monday.
    assert due_at(WEEKDAYS, sh(2026, 9, 25, 16), timedelta(hours=8)) == sh(2026, 9, 28, 16, 30)


def test_ticket_before_national_day_resumes_after_it_with_make_up_saturday() -> None:
    opened = sh(2026, 9, 30, 17)  # Wednesday: 0.5 h left that day, then 10-01..10-07 off
    assert DESK.add(opened, 8 * 3600) == sh(2026, 10, 8, 17, 30)
    # 0.5 + 7.5 (Thu 10-08) + 7.5 (Fri 10-09) = 15.5 h; Saturday 10-10 is a working day.
    assert due_at(DESK, opened, timedelta(hours=16)) == sh(2026, 10, 10, 9, 0)
    assert DESK.is_working_day(date(2026, 10, 10)) and not DESK.is_working_day(date(2026, 10, 1))
    assert WEEKDAYS.add(opened, 16 * 3600) == sh(2026, 10, 5, 9, 0)


def test_spring_festival_make_up_saturdays() -> None:
    assert DESK.add(sh(2026, 2, 13, 16), 8 * 3600) == sh(2026, 2, 14, 16, 30)  # Sat 02-14 works
    assert DESK.add(sh(2026, 2, 14, 17), 3600) == sh(2026, 2, 24, 9, 0)  # 02-15..02-23 off
    assert DESK.add(sh(2026, 2, 27, 17), 3600) == sh(2026, 2, 28, 9, 0)  # Sat 02-28 works


def test_p1_24x7_runs_across_midnight_and_holidays() -> None:
    assert due_at(AROUND, sh(2026, 3, 3, 22, 30), parse_duration("4h")) == sh(2026, 3, 4, 2, 30)
    assert AROUND.add(sh(2026, 10, 1, 22), 4 * 3600) == datetime(2026, 10, 1, 18, tzinfo=UTC)
    assert AROUND.is_working_day(date(2026, 10, 1))
    assert AROUND.working_seconds(sh(2026, 10, 1), sh(2026, 10, 8)) == 7 * 86_400


def test_pending_pause_moves_the_deadline() -> None:
    opened, target = sh(2026, 3, 2, 9), timedelta(hours=8)  # Monday
    assert due_at(DESK, opened, target) == sh(2026, 3, 3, 9, 30)
    # Waiting for the requester 10:00-14:30 removes 3 working hours (10-12, 13:30-14:30).
    pauses = [(sh(2026, 3, 2, 10), sh(2026, 3, 2, 14, 30))]
    assert due_at(DESK, opened, target, pauses) == sh(2026, 3, 3, 14, 0)
    assert elapsed(DESK, opened, sh(2026, 3, 2, 17, 30), pauses) == 4 * 3600
    # Overlapping pauses count once.
    doubled = [*pauses, (sh(2026, 3, 2, 11), sh(2026, 3, 2, 13))]
    assert due_at(DESK, opened, target, doubled) == sh(2026, 3, 3, 14, 0)


def test_open_pause_leaves_the_deadline_unknown() -> None:
    opened = sh(2026, 3, 2, 9)
    pauses: list[Pause] = [(sh(2026, 3, 2, 10), None)]
    assert due_at(DESK, opened, timedelta(hours=8), pauses) is None
    assert due_at(DESK, opened, timedelta(hours=8), pauses, now=sh(2026, 3, 2, 11)) is None
    # A pause that has not begun by `now` does not count yet.
    early = sh(2026, 3, 2, 9, 30)
    assert due_at(DESK, opened, timedelta(hours=8), pauses, now=early) == sh(2026, 3, 3, 9, 30)
    # While paused the clock stands still: elapsed stops at the pause start.
    assert elapsed(DESK, opened, sh(2026, 3, 4, 12), pauses) == 3600


def test_fraction_used() -> None:
    opened = sh(2026, 3, 2, 9)
    assert fraction_used(DESK, opened, sh(2026, 3, 2, 13), timedelta(hours=6)) == 0.5
    assert fraction_used(DESK, opened, sh(2026, 3, 4, 9), timedelta(hours=6)) > 1
    with pytest.raises(ValueError, match="longer than zero"):
        fraction_used(DESK, opened, opened, timedelta(0))


# --------------------------------------------------------------------------- parsing, errors


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("15m", timedelta(minutes=15)),
        ("4h", timedelta(hours=4)),
        ("1d", timedelta(days=1)),
        ("2h30m", timedelta(hours=2, minutes=30)),
        ("1d4h", timedelta(days=1, hours=4)),
        ("90", timedelta(minutes=90)),
        (" 8H ", timedelta(hours=8)),
    ],
)
def test_parse_duration(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "h", "4x", "30m2h", "1.5h", "-4h", "4 h", "0", "0h"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


def test_parse_hours() -> None:
    assert parse_hours(["13:30-17:30", "08:30-12:00"]) == (
        (time(8, 30), time(12)),
        (time(13, 30), time(17, 30)),
    )
    assert parse_hours(["08:00-12:00", "12:00-24:00"])[-1] == (time(12), time(0))
    assert (
        Calendar(SH, parse_hours(["20:00-24:00"]), None).working_seconds(
            sh(2026, 3, 2), sh(2026, 3, 3, 1)
        )
        == 4 * 3600
    )


@pytest.mark.parametrize(
    ("ranges", "message"),
    [
        (["08:30-12:00", "11:00-13:00"], "overlap"),
        (["12:00-08:00"], "ends before it starts"),
        (["08:30-08:30"], "ends before it starts"),
        (["8.30-12"], "expected 'HH:MM-HH:MM'"),
        (["25:00-26:00"], "invalid time"),
        ([], "empty"),
        ("08:30-12:00", "must be a list"),
    ],
)
def test_parse_hours_rejects(ranges: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_hours(ranges)


def test_naive_datetimes_are_rejected() -> None:
    naive = datetime(2026, 3, 2, 9)
    with pytest.raises(ValueError, match="naive"):
        DESK.working_seconds(naive, sh(2026, 3, 3))
    with pytest.raises(ValueError, match="naive"):
        DESK.add(naive, 60)
    with pytest.raises(ValueError, match="naive"):
        due_at(DESK, sh(2026, 3, 2), timedelta(hours=1), [(naive, naive)])


def test_unknown_country_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown holiday country"):
        Calendar(SH, HOURS, country="XX")


def test_years_unknown_to_holidays_fall_back_to_monday_to_friday() -> None:
    for day in (date(2150, 1, 1), date(2150, 1, 2), date(2150, 1, 3), date(1900, 10, 1)):
        assert DESK.is_working_day(day) == (day.weekday() < 5)
    assert DESK.working_seconds(sh(2150, 1, 1), sh(2150, 1, 8)) == 5 * 7.5 * 3600


def test_a_whole_year_counts_every_working_day_of_2026() -> None:
    start, end = sh(2026, 1, 1), sh(2027, 1, 1)
    total = DESK.working_seconds(start, end)
    assert total == 248 * 7.5 * 3600  # 248 working days in 2026
    assert DESK.add(start, total) <= end
