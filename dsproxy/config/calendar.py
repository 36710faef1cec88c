"""Calendar events (``gc-schedule``, ``prune-schedule``, ``counter-reset-schedule``): the grammar of
proxmox-time's ``CalendarEvent`` (systemd.time-like), accepted or refused exactly as PBS does.

Only *validation* is needed here (dsproxy never computes the next event), so the parser answers
"does the whole text parse?" and nothing else.  The grammar, as proxmox-time parses it::

    event     = [weekdays] [date] [time] [" UTC"]        -- at least one of the three parts
              | keyword [" UTC"]
    keyword   = minutely | hourly | daily | weekly | monthly | quarterly
              | semiannually | semi-annually | yearly | annually
    weekdays  = wdrange ("," wdrange)*   then spaces      wdrange = weekday [".." weekday]
    weekday   = mon|tue|wed|thu|fri|sat|sun or the full name, any case
    date      = years "-" months "-" days  |  months "-" days   then spaces
    time      = [hours ":"] minutes [":" seconds]
    list(max) = "*" ["/" N]  |  comp ("," comp)*           (N > 0, else the "/N" is left over)
    comp(max) = N [".." N] ["/" N]                         (every N < max; a range not reversed)

with ``max`` 2200 (years), 13 (months), 32 (days), 24 (hours), 60 (minutes, seconds); digits are
ASCII only, spaces are `` `` and tab, and the UTC suffix is stripped first (with the spaces before
it).  The details that make it PBS's language rather than a look-alike are kept: a lone number is
a *minute* (``"0"`` is every hour), a failed ``..``/``:`` is left unconsumed (and so refused at the
end), a date is tried as year-month-day first, then month-day, and a value is never too large for
the machine (a digit run is length-checked before ``int()``).

The parser is a handful of loops over the string: no regex, no recursion, linear in the length.
Results are memoised (most stores share a schedule), so a reload pays for each distinct text once.
"""

from __future__ import annotations

import contextlib
from typing import Final

_KEYWORDS: Final = frozenset(
    {
        "minutely",
        "hourly",
        "daily",
        "weekly",
        "monthly",
        "quarterly",
        "semiannually",
        "semi-annually",
        "yearly",
        "annually",
    }
)
_WEEKDAYS: Final = frozenset(
    {
        "mon",
        "monday",
        "tue",
        "tuesday",
        "wed",
        "wednesday",
        "thu",
        "thursday",
        "fri",
        "friday",
        "sat",
        "saturday",
        "sun",
        "sunday",
    }
)
_DIGITS: Final = frozenset("0123456789")
_U32_MAX: Final = 0xFFFF_FFFF


class _NoMatch(Exception):
    """A sub-parser did not match (nom's recoverable ``Err::Error``)."""


_NO_MATCH: Final = _NoMatch()


def _number(s: str, i: int, maximum: int) -> tuple[int, int]:
    """``digit1`` parsed as u32 and below ``maximum``: (end, value)."""
    j, n = i, len(s)
    while j < n and s[j] in _DIGITS:
        j += 1
    if j == i or j - i > 10:  # more than 10 digits never fits a u32 (and never reaches int())
        raise _NO_MATCH
    value = int(s[i:j])
    if value > _U32_MAX or value >= maximum:
        raise _NO_MATCH
    return j, value


def _component(s: str, i: int, maximum: int) -> int:
    """``N``, ``N..M``, ``N/R``, ``N..M/R``."""
    i, value = _number(s, i, maximum)
    if s.startswith("..", i):
        try:
            j, end = _number(s, i + 2, maximum)
        except _NoMatch:
            j = -1  # the ".." is not consumed
        if j >= 0:
            if value > end:
                raise _NO_MATCH  # range start is bigger than end
            i = j
    if s.startswith("/", i):
        i, _ = _number(s, i + 1, maximum)
    return i


def _list(s: str, i: int, maximum: int) -> int:
    """``*``, ``*/R`` (R > 0) or a comma-separated list of components."""
    if s.startswith("*", i):
        if s.startswith("/", i + 1):
            j, repeat = _number(s, i + 2, maximum)
            if repeat > 0:
                return j
        return i + 1
    i = _component(s, i, maximum)
    while s.startswith(",", i):
        try:
            i = _component(s, i + 1, maximum)
        except _NoMatch:
            return i  # the "," is left over
    return i


def _weekday(s: str, i: int) -> int:
    j, n = i, len(s)
    while j < n and s[j].isascii() and s[j].isalpha():
        j += 1
    if j == i or s[i:j].lower() not in _WEEKDAYS:
        raise _NO_MATCH
    return j


def _weekdays(s: str, i: int) -> int:
    def one(i: int) -> int:
        i = _weekday(s, i)
        if s.startswith("..", i):
            try:
                return _weekday(s, i + 2)
            except _NoMatch:
                pass
        return i

    i = one(i)
    while s.startswith(",", i):
        try:
            i = one(i + 1)
        except _NoMatch:
            return i
    return i


def _spaces(s: str, i: int) -> int:
    n = len(s)
    while i < n and s[i] in " \t":
        i += 1
    return i


def _date(s: str, i: int) -> int:
    try:
        j = _list(s, i, 2200)  # the upper limit of systemd
        if not s.startswith("-", j):
            raise _NO_MATCH
        j = _list(s, j + 1, 13)
        if not s.startswith("-", j):
            raise _NO_MATCH
        return _list(s, j + 1, 32)
    except _NoMatch:
        pass
    j = _list(s, i, 13)
    if not s.startswith("-", j):
        raise _NO_MATCH
    return _list(s, j + 1, 32)


def _time(s: str, i: int) -> int:
    try:
        j = _list(s, i, 24)
        if s.startswith(":", j):
            i = j + 1  # there were hours
    except _NoMatch:
        pass
    i = _list(s, i, 60)
    if s.startswith(":", i):
        with contextlib.suppress(_NoMatch):  # else the ":" is left over
            i = _list(s, i + 1, 60)
    return i


def is_calendar_event(text: str) -> bool:
    """Whether proxmox-time would parse ``text`` as a calendar event."""
    if text.endswith("UTC"):
        text = text[:-3].rstrip(" ")
    first = text[:1]
    i = 0
    found = False
    try:
        if first.isascii() and first.isalpha():
            if text in _KEYWORDS:
                return True
            i = _spaces(text, _weekdays(text, 0))
            found = True
        try:
            i = _spaces(text, _date(text, i))
            found = True
        except _NoMatch:
            pass
        try:
            i = _time(text, i)
            found = True
        except _NoMatch:
            pass
    except _NoMatch:
        return False
    return found and i == len(text)
