"""SLA clock: working time between instants in the desk's calendar, deadlines and pauses.

A :class:`Calendar` says when the clock runs: around the clock (``hours=None``), or only in
the configured periods of each working day in the calendar's time zone. Working days are the
country's working days from the ``holidays`` package (public holidays off, make-up working
days on); without a country, or for years the package does not cover, Monday to Friday.

Internally every instant is an integer count of microseconds since the Unix epoch, so sums
are exact and :meth:`Calendar.add` is the exact inverse of :meth:`Calendar.working_seconds`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from functools import lru_cache
from zoneinfo import ZoneInfo

import holidays

__all__ = [
    "Calendar",
    "Pause",
    "due_at",
    "elapsed",
    "fraction_used",
    "parse_duration",
    "parse_hours",
]

Pause = tuple[datetime, datetime | None]
"""A pending period (start, end); ``end`` is None while still paused."""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)
_DAY_US = 86_400_000_000
_ONE_DAY = timedelta(days=1)
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()

_DURATION_RE = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?", re.IGNORECASE)
_PERIOD_RE = re.compile(r"(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})")


# --------------------------------------------------------------------------- parsing


def parse_duration(text: str) -> timedelta:
    """Parse an SLA target: ``"15m"``, ``"4h"``, ``"1d"``, ``"2h30m"``, ``"1d4h"`` or ``"90"``.

    A bare number is minutes; ``d`` is 24 hours of clock time (for a business-hours
    calendar write working hours, e.g. ``"8h"``). Raises ValueError for anything else or zero.
    """
    raw = text.strip() if isinstance(text, str) else ""
    if raw.isdigit():
        minutes = int(raw)
        result = timedelta(minutes=minutes)
    else:
        m = _DURATION_RE.fullmatch(raw)
        if not raw or m is None:
            raise ValueError(
                f"invalid duration {text!r}: use minutes ('90') or units d/h/m "
                "in that order, e.g. '15m', '4h', '1d', '2h30m'"
            )
        days, hours, minutes = (int(g) if g else 0 for g in m.groups())
        result = timedelta(days=days, hours=hours, minutes=minutes)
    if result <= timedelta(0):
        raise ValueError(f"invalid duration {text!r}: it must be longer than zero")
    return result


def _parse_clock(hh: str, mm: str, *, end: bool, where: str) -> time:
    h, m = int(hh), int(mm)
    if end and (h, m) == (24, 0):
        return time(0, 0)  # 24:00, the end of the day
    if h > 23 or m > 59:
        raise ValueError(f"invalid time {hh}:{mm} in {where!r}: use HH:MM from 00:00 to 23:59")
    return time(h, m)


def _clock(us: int) -> time:
    """Microseconds since local midnight (below 24h) -> wall-clock time."""
    sec, micro = divmod(us, 1_000_000)
    return time(sec // 3600, sec // 60 % 60, sec % 60, micro)


def _sec(t: time, *, end: bool = False) -> int:
    """Microseconds since local midnight; an end of 00:00 means 24:00."""
    us = ((t.hour * 60 + t.minute) * 60 + t.second) * 1_000_000 + t.microsecond
    return _DAY_US if end and us == 0 else us


def _check_periods(periods: Sequence[tuple[time, time]]) -> tuple[tuple[time, time], ...]:
    """Validate working periods and return them sorted; ValueError on empty/overlap/backwards."""
    if not periods:
        raise ValueError("working hours are empty: give at least one period or None for 24x7")
    for start, end in periods:
        if not (isinstance(start, time) and isinstance(end, time)):
            raise ValueError(f"working period {(start, end)!r} must be a pair of datetime.time")
        if start.tzinfo is not None or end.tzinfo is not None:
            raise ValueError("working period times must be naive: the calendar's tz applies")
        if _sec(end, end=True) <= _sec(start):
            raise ValueError(
                f"working period {start:%H:%M}-{end:%H:%M} ends before it starts; "
                "periods may not cross midnight"
            )
    ordered = tuple(sorted(periods, key=lambda p: _sec(p[0])))
    for (s1, e1), (s2, e2) in zip(ordered, ordered[1:], strict=False):
        if _sec(s2) < _sec(e1, end=True):
            raise ValueError(
                f"working periods {s1:%H:%M}-{e1:%H:%M} and {s2:%H:%M}-{e2:%H:%M} overlap"
            )
    return ordered


def parse_hours(ranges: list[str]) -> tuple[tuple[time, time], ...]:
    """Parse working periods like ``["08:30-12:00", "13:30-17:30"]`` (sorted; end may be 24:00).

    Raises ValueError on garbage, empty input, a period that ends before it starts, or overlap.
    """
    if isinstance(ranges, str):
        raise ValueError(f"working hours must be a list of 'HH:MM-HH:MM' strings, not {ranges!r}")
    periods = []
    for item in ranges:
        m = _PERIOD_RE.fullmatch(item.strip()) if isinstance(item, str) else None
        if m is None:
            raise ValueError(f"invalid working period {item!r}: expected 'HH:MM-HH:MM'")
        start = _parse_clock(m[1], m[2], end=False, where=item)
        end = _parse_clock(m[3], m[4], end=True, where=item)
        periods.append((start, end))
    return _check_periods(periods)


# --------------------------------------------------------------------------- calendar


@lru_cache(maxsize=16)
def _country_class(country: str) -> type[holidays.HolidayBase]:
    """The holidays class of a country; ValueError naming the fix when unknown."""
    try:
        return type(holidays.country_holidays(country))
    except NotImplementedError as exc:
        raise ValueError(
            f"unknown holiday country {country!r}: use an ISO code such as 'CN', "
            "or None for Monday-Friday"
        ) from exc


@lru_cache(maxsize=64)
def _holidays_for(country: str, year: int) -> holidays.HolidayBase | None:
    """The holidays object for (country, year); None when the package does not cover the year."""
    cls = _country_class(country)
    if not (cls.start_year <= year <= cls.end_year):
        return None
    try:
        return holidays.country_holidays(country, years=year)
    except (NotImplementedError, ValueError, KeyError):
        return None


@lru_cache(maxsize=64)
def _working_flags(country: str, year: int) -> tuple[bool, ...] | None:
    """Working-day flag for each day of the year (index = day of year - 1), or None."""
    hol = _holidays_for(country, year)
    if hol is None:
        return None
    first = date(year, 1, 1)
    days = (date(year + 1, 1, 1) - first).days
    return tuple(hol.is_working_day(first + timedelta(days=i)) for i in range(days))


@lru_cache(maxsize=256)
def _first_ordinal(year: int) -> int:
    return date(year, 1, 1).toordinal()


def _us(dt: datetime) -> int:
    """Aware datetime -> integer microseconds since the epoch; ValueError when naive."""
    if not isinstance(dt, datetime):
        raise ValueError(f"expected a timezone-aware datetime, got {dt!r}")
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise ValueError(f"naive datetime {dt.isoformat()}: attach a timezone (store UTC)")
    return (dt - _EPOCH) // _US


def _dt(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


@dataclass(frozen=True)
class Calendar:
    """When the SLA clock runs.

    ``hours=None`` is 24x7 (every day, holidays ignored); otherwise the working periods of
    each working day, local to ``tz``. ``country`` picks public holidays and make-up working
    days from the ``holidays`` package; None means Monday to Friday.
    """

    tz: ZoneInfo
    hours: tuple[tuple[time, time], ...] | None
    country: str | None = "CN"

    _spans: tuple[tuple[int, int], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.tz, tzinfo):
            raise ValueError(f"calendar tz {self.tz!r} must be a ZoneInfo, e.g. Asia/Shanghai")
        spans: tuple[tuple[int, int], ...] = ()
        if self.hours is not None:
            object.__setattr__(self, "hours", _check_periods(self.hours))
            spans = tuple((_sec(a), _sec(b, end=True)) for a, b in self.hours)
        object.__setattr__(self, "_spans", spans)
        if self.country is not None:
            _country_class(self.country)

    def is_working_day(self, day: date) -> bool:
        """Whether the clock runs on ``day`` (always True for a 24x7 calendar)."""
        if self.hours is None:
            return True
        if self.country is not None:
            flags = _working_flags(self.country, day.year)
            if flags is not None:
                return flags[day.toordinal() - _first_ordinal(day.year)]
        return day.weekday() < 5

    def _periods_us(self, day: date) -> list[tuple[int, int]]:
        """Working intervals of local ``day`` as epoch microseconds (empty if not working)."""
        if not self.is_working_day(day):
            return []
        base = (day.toordinal() - _EPOCH_ORDINAL) * _DAY_US  # local midnight, read as UTC
        off = self._offset_us(day, time(0))
        if off == self._offset_us(day + _ONE_DAY, time(0)):  # no UTC offset change today
            return [(base + a - off, base + b - off) for a, b in self._spans]
        out = []
        for a, b in self._spans:  # a transition day: look up each boundary's offset
            lo = base + a - self._offset_us(day, _clock(a))
            end_day = day + _ONE_DAY if b == _DAY_US else day
            hi = base + b - self._offset_us(end_day, _clock(b % _DAY_US))
            if hi > lo:
                out.append((lo, hi))
        return out

    def _offset_us(self, day: date, wall: time) -> int:
        """UTC offset of the local wall time ``wall`` on ``day``, in microseconds."""
        off = self.tz.utcoffset(datetime.combine(day, wall))
        assert off is not None
        return (off.days * 86_400 + off.seconds) * 1_000_000 + off.microseconds

    def _local_day(self, us: int) -> date:
        return _dt(us).astimezone(self.tz).date()

    def _working_us(self, s: int, e: int) -> int:
        if e <= s:
            return 0
        if self.hours is None:
            return e - s
        total = 0
        day, last = self._local_day(s), self._local_day(e)
        while day <= last:
            for a, b in self._periods_us(day):
                if a >= s and b <= e:
                    total += b - a
                elif b > s and a < e:
                    total += min(b, e) - max(a, s)
            day += _ONE_DAY
        return total

    def _add_us(self, s: int, amount: int) -> int:
        if amount < 0:
            raise ValueError(f"cannot add negative working time ({amount / 1e6} s)")
        if self.hours is None or amount == 0:
            return s + amount
        day = self._local_day(s)
        while True:
            for a, b in self._periods_us(day):
                if b <= s:
                    continue
                lo = max(a, s)
                if b - lo >= amount:
                    return lo + amount
                amount -= b - lo
            day += _ONE_DAY

    def working_seconds(self, start: datetime, end: datetime) -> float:
        """Clock seconds between two aware datetimes (0 if ``end <= start``)."""
        return self._working_us(_us(start), _us(end)) / 1e6

    def add(self, start: datetime, seconds: float) -> datetime:
        """Earliest instant t with ``working_seconds(start, t) == seconds``, in UTC.

        A start outside working time begins counting at the next working period.
        """
        return _dt(self._add_us(_us(start), round(seconds * 1_000_000)))


# --------------------------------------------------------------------------- SLA clock


def _merged_pauses(pauses: Sequence[Pause], lo: int, hi: int | None) -> list[tuple[int, int]]:
    """Closed pauses clipped to [lo, hi] (hi None = unbounded), sorted and merged."""
    spans = []
    for p_start, p_end in pauses:
        if p_end is None:
            raise ValueError("an open pause has no end: give it one before measuring")
        a, b = max(_us(p_start), lo), _us(p_end)
        if hi is not None:
            b = min(b, hi)
        if b > a:
            spans.append((a, b))
    spans.sort()
    merged: list[tuple[int, int]] = []
    for a, b in spans:
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def _elapsed_us(cal: Calendar, start: datetime, now: datetime, pauses: Sequence[Pause]) -> int:
    s, n = _us(start), _us(now)
    closed = [(p, q if q is not None else now) for p, q in pauses]
    total, cursor = 0, s
    for a, b in _merged_pauses(closed, s, n):
        total += cal._working_us(cursor, a)
        cursor = b
    return total + cal._working_us(cursor, n)


def elapsed(cal: Calendar, start: datetime, now: datetime, pauses: Sequence[Pause] = ()) -> float:
    """Clock seconds from ``start`` to ``now`` minus paused time (overlaps counted once).

    An open pause (end None) runs until ``now``.
    """
    return _elapsed_us(cal, start, now, pauses) / 1e6


def due_at(
    cal: Calendar,
    start: datetime,
    target: timedelta,
    pauses: Sequence[Pause] = (),
    now: datetime | None = None,
) -> datetime | None:
    """The deadline (UTC): the instant where :func:`elapsed` reaches ``target``.

    Returns None while paused, i.e. with an open pause (one that began by ``now``, when
    given); the deadline is unknown until it ends. Pauses beginning after ``now`` are ignored.
    """
    amount = target // _US
    if amount < 0:
        raise ValueError(f"SLA target {target} is negative")
    s = _us(start)
    n = None if now is None else _us(now)
    known: list[Pause] = []
    for p_start, p_end in pauses:
        if n is not None and _us(p_start) > n:
            continue
        if p_end is None:
            return None
        known.append((p_start, p_end))
    cursor = s
    for a, b in _merged_pauses(known, s, None):
        run = cal._working_us(cursor, a)
        if run >= amount:
            break
        amount -= run
        cursor = b
    return _dt(cal._add_us(cursor, amount))


def fraction_used(
    cal: Calendar,
    start: datetime,
    now: datetime,
    target: timedelta,
    pauses: Sequence[Pause] = (),
) -> float:
    """Share of the SLA target used so far: ``elapsed / target`` (may exceed 1)."""
    amount = target // _US
    if amount <= 0:
        raise ValueError(f"SLA target {target} must be longer than zero")
    return _elapsed_us(cal, start, now, pauses) / amount
