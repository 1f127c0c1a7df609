"""Recurrence (docs/contract.md section 9): the rules of the `recurrence` field and the expansion of
a series into occurrences. Pure: no I/O, no clock.

`recurrence` is `{"rrule": "<RFC 5545 RRULE>", "timezone": "<IANA name>" (absent: UTC),
"exdates": [date-time, ...] (absent: none)}` and needs `activity_date`, which is DTSTART and always
the first occurrence (index 0), as RFC 5545 says, even when it does not match the rule.

Expansion happens in the series' local wall-clock time (python-dateutil's `rrule` over naive local
times) and each occurrence is then converted to UTC with `zoneinfo`, so occurrences keep their
local time across daylight-saving changes. A local time that does not exist (the spring-forward
gap, e.g. 02:30 in Europe/Berlin on the last Sunday of March) is read with the offset before the
gap (`fold=0`; RFC 5545 section 3.3.5): 02:30 +01:00, which is 03:30 local summer time. A local time
that occurs twice (fall back) is its first occurrence (`fold=0`, summer time), as RFC 5545 says.

`index` is the occurrence's position in the series counted from DTSTART (0) before `exdates` are
taken out, so an occurrence keeps its index when another one is excluded. COUNT counts DTSTART.

Limits against rules that expand without end:
- a rule expanding to over MAX_OCCURRENCES_PER_DAY occurrences a day is refused (validation);
- a rule that never occurs after DTSTART is refused (validation), since searching it would run to
  year 9999;
- the occurrences query reads at most MAX_WINDOW_DAYS at a time (projections/queries.py);
- rules made only of FREQ (weekly or finer), INTERVAL, COUNT, UNTIL, WKST, BYDAY (no ordinals),
  BYHOUR, BYMINUTE, BYSECOND and BYSETPOS repeat with a fixed period of local time, and are
  fast-forwarded to the window arithmetically; other rules (monthly, yearly, or filtered by month,
  month day, year day, week number) are iterated from DTSTART, at most MAX_STEPS occurrences per
  series and query: a series that needs more stops there (occurrences_of reports it).
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import heapq
import itertools
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any, Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from dateutil import rrule as du

from activities_client.document import format_datetime, parse_datetime

RECURRENCE_KEYS: Final = frozenset({"rrule", "timezone", "exdates"})
MAX_OCCURRENCES_PER_DAY: Final = 1000
MAX_EXDATES: Final = 1000
MAX_RRULE_LENGTH: Final = 1000
MAX_INTERVAL: Final = 1000
MAX_STEPS: Final = 100_000
"""At most this many occurrences of one series are generated for one query (page)."""
WINDOW_CACHE_ITEMS: Final = 256
WINDOWS_PER_SERIES: Final = 2
SERIES_CACHE: Final = 2048
"""Series parsed and their windows' expansions kept for later queries: at most SERIES_CACHE series,
WINDOWS_PER_SERIES windows each, of at most WINDOW_CACHE_ITEMS occurrences (about 110 bytes each):
at most about 115 MB, in practice far less (a month of a weekly meeting is 5 occurrences)."""
REORDER_HORIZON: Final = timedelta(hours=16)
"""UTC offsets stay within -12..+14 hours: an occurrence later in local time is never more than
this much earlier in UTC than one before it (the spring-forward gap can reorder them)."""

_PARTS: Final = frozenset(
    {
        "FREQ",
        "INTERVAL",
        "COUNT",
        "UNTIL",
        "WKST",
        "BYSECOND",
        "BYMINUTE",
        "BYHOUR",
        "BYDAY",
        "BYMONTHDAY",
        "BYYEARDAY",
        "BYWEEKNO",
        "BYMONTH",
        "BYSETPOS",
    }
)
_FREQS: Final = {
    "YEARLY": du.YEARLY,
    "MONTHLY": du.MONTHLY,
    "WEEKLY": du.WEEKLY,
    "DAILY": du.DAILY,
    "HOURLY": du.HOURLY,
    "MINUTELY": du.MINUTELY,
    "SECONDLY": du.SECONDLY,
}
_ONLY_WITH: Final = {
    "BYWEEKNO": ("YEARLY",),
    "BYYEARDAY": ("YEARLY", "HOURLY", "MINUTELY", "SECONDLY"),
    "BYMONTHDAY": ("YEARLY", "MONTHLY", "DAILY", "HOURLY", "MINUTELY", "SECONDLY"),
}
"""RFC 5545 section 3.3.10: the BY parts that some frequencies do not take."""
_PERIODIC_PARTS: Final = frozenset(
    {"FREQ", "INTERVAL", "COUNT", "UNTIL", "WKST", "BYDAY", "BYHOUR", "BYMINUTE", "BYSECOND", "BYSETPOS"}
)
_UNIT_SECONDS: Final = {"WEEKLY": 7 * 86400, "DAILY": 86400, "HOURLY": 3600, "MINUTELY": 60, "SECONDLY": 1}
_UNTIL: Final = re.compile(r"^(\d{4})(\d{2})(\d{2})(?:T(\d{2})(\d{2})(\d{2})(Z?))?$")
_ORDINAL_DAY: Final = re.compile(r"[+-]?\d")
_CALENDAR_CYCLE_DAYS: Final = 146_097  # 400 Gregorian years, a whole number of weeks
_FIRST_SAFE = datetime(1900, 1, 1)
_LAST_SAFE = datetime(9990, 1, 1)


def _clamped(at: datetime, days: int) -> datetime:
    """`at` moved by `days` (a day covers any UTC offset), as a naive time; the ends of the
    datetime range where that would overflow (a window may reach to year 1 or 9999)."""
    try:
        return (at + timedelta(days=days)).replace(tzinfo=None)
    except OverflowError:
        return datetime.min if days < 0 else datetime.max


class RecurrenceError(ValueError):
    """A recurrence that breaks a rule: `field` names the part (`recurrence.rrule`, ...)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


@dataclass(frozen=True)
class Series:
    """A parsed, checked recurring series (see the module docstring)."""

    start: datetime  # DTSTART, UTC
    start_local: datetime  # DTSTART, naive local wall-clock time
    zone: tzinfo
    rule: Any  # dateutil rrule over naive local times, without COUNT (counted here), with UNTIL
    count: int | None
    exdates: frozenset[datetime]  # UTC
    start_in_rule: bool  # DTSTART is itself an occurrence of the rule
    period: timedelta | None  # the local-time period of a periodic rule
    per_period: int  # occurrences of the rule (from DTSTART on) in each period
    shifted: dict[int, Any] = field(default_factory=dict, compare=False, repr=False)  # _shifted's rules
    windows: dict[tuple[datetime, datetime], list[tuple[datetime, int]] | None] = field(
        default_factory=dict, compare=False, repr=False
    )  # window's expansions

    def occurrences(self, start: datetime, end: datetime) -> Iterator[tuple[datetime, int]]:
        """(occurrence in UTC, index) of every occurrence within [start, end] (UTC, inclusive), in
        time order (then index), exdates left out."""
        return self._expand(start, end)

    def window(self, start: datetime, end: datetime, since: datetime | None = None) -> Iterator[tuple[datetime, int]]:
        """The occurrences of the window [start, end] from `since` on (a page after a cursor):
        the window's expansion is kept (WINDOWS_PER_SERIES per series, up to WINDOW_CACHE_ITEMS
        occurrences each), so the pages of a window and a window asked again are not expanded again."""
        key = (start, end)
        if key not in self.windows:
            expanded = list(itertools.islice(self._expand(start, end), WINDOW_CACHE_ITEMS + 1))
            if len(self.windows) >= WINDOWS_PER_SERIES:
                self.windows.pop(next(iter(self.windows)))
            self.windows[key] = expanded if len(expanded) <= WINDOW_CACHE_ITEMS else None
        cached = self.windows[key]
        if cached is None:  # too many to keep: expanded from `since` each time
            return self._expand(max(start, since or start), end)
        if since is None or since <= start:
            return iter(cached)
        return itertools.islice(cached, bisect.bisect_left(cached, (since, -1)), None)

    def _expand(self, start: datetime, end: datetime) -> Iterator[tuple[datetime, int]]:
        for at, index in self._ordered(start, end):
            if at > end:
                return
            if at >= start and at not in self.exdates:
                yield at, index

    def _ordered(self, start: datetime, end: datetime) -> Iterator[tuple[datetime, int]]:
        """Occurrences from about `start` on, sorted by UTC time: local times map to UTC times in
        order except around a spring-forward gap, so a small buffer (REORDER_HORIZON) reorders them."""
        pending: list[tuple[datetime, int]] = []
        for local, index in self._local(start, end):
            at = self._utc(local)
            heapq.heappush(pending, (at, index))
            floor = local.replace(tzinfo=UTC) - REORDER_HORIZON  # no later occurrence is earlier in UTC
            while pending and pending[0][0] < floor:
                yield heapq.heappop(pending)
        while pending:
            yield heapq.heappop(pending)

    def _utc(self, local: datetime) -> datetime:
        return local.replace(tzinfo=self.zone).astimezone(UTC)  # fold=0: the gap's offset before it

    def _local(self, start: datetime, end: datetime) -> Iterator[tuple[datetime, int]]:
        """(local time, index) from the series' start, or fast-forwarded by whole periods to near
        `start`, up to a little past `end` (local and UTC times differ by less than a day)."""
        first_local = max(_clamped(start, -1), _FIRST_SAFE)
        last_local = min(_clamped(end, 1), _LAST_SAFE)
        offset = 0 if self.start_in_rule else 1  # DTSTART is index 0 even when the rule skips it
        if self.period is not None and first_local - self.start_local > self.period:
            # The pattern repeats every period, with per_period occurrences in each: the first
            # occurrence from DTSTART + n periods on is occurrence n * per_period of the rule.
            periods = (first_local - self.start_local) // self.period
            rule = self._shifted(periods)
            offset += periods * self.per_period
        else:
            rule = self.rule
            yield self.start_local, 0
        # No UNTIL is needed to end the iteration: it stops past `last_local`, and a rule that never
        # occurs again (which dateutil would search to year 9999) was refused by parse_series.
        for steps, local in enumerate(rule):
            if local == self.start_local:
                continue  # DTSTART, given above
            index = steps + offset
            if local > last_local or (self.count is not None and index >= self.count) or steps >= MAX_STEPS:
                return
            yield local, index

    def _shifted(self, periods: int) -> Any:
        """The rule from DTSTART + n periods on, kept: pages of one window shift by the same n."""
        rule = self.shifted.get(periods)
        if rule is None:
            assert self.period is not None, "only a periodic rule is shifted"
            if len(self.shifted) >= 8:
                self.shifted.clear()
            rule = self.shifted[periods] = self.rule.replace(dtstart=self.start_local + periods * self.period)
        return rule


def _zone(value: Any) -> tzinfo:
    if value is None:
        return UTC
    if not isinstance(value, str) or not value or len(value) > 100:
        raise RecurrenceError("recurrence.timezone", "must be an IANA time zone name, e.g. Europe/Berlin")
    if value.upper() == "UTC":
        return UTC
    try:
        return ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise RecurrenceError(
            "recurrence.timezone", f"{value!r} is not a known IANA time zone name (e.g. Europe/Berlin)"
        ) from None


def _exdates(value: Any) -> list[datetime]:
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_EXDATES:
        raise RecurrenceError("recurrence.exdates", f"must be a list of at most {MAX_EXDATES} date-times")
    result = []
    for item in value:
        try:
            result.append(parse_datetime(item))
        except (ValueError, TypeError) as exc:
            raise RecurrenceError("recurrence.exdates", f"must hold RFC 3339 date-times with a zone: {exc}") from None
    return result


def _parts(text: Any) -> dict[str, str]:
    field = "recurrence.rrule"
    if not isinstance(text, str) or not text.strip():
        raise RecurrenceError(field, "is required: an RFC 5545 RRULE such as FREQ=WEEKLY;BYDAY=MO")
    if len(text) > MAX_RRULE_LENGTH or any(c in text for c in "\r\n\x00"):
        raise RecurrenceError(field, f"must be one RRULE line of at most {MAX_RRULE_LENGTH} characters")
    body = text.strip()
    if body.upper().startswith("RRULE:"):
        body = body[6:]
    parts: dict[str, str] = {}
    for item in body.split(";"):
        name, sep, value = item.partition("=")
        name = name.strip().upper()
        if not sep or not value.strip():
            raise RecurrenceError(field, f"{item!r} is not NAME=VALUE")
        if name not in _PARTS:
            raise RecurrenceError(field, f"{name} is not an RRULE part; expected some of {sorted(_PARTS)}")
        if name in parts:
            raise RecurrenceError(field, f"{name} is given twice")
        parts[name] = value.strip().upper()
    if "FREQ" not in parts:
        raise RecurrenceError(field, "FREQ is required (YEARLY, MONTHLY, WEEKLY, DAILY, HOURLY, MINUTELY or SECONDLY)")
    if parts["FREQ"] not in _FREQS:
        raise RecurrenceError(field, f"FREQ must be one of {', '.join(_FREQS)}")
    for name, freqs in _ONLY_WITH.items():
        if name in parts and parts["FREQ"] not in freqs:
            raise RecurrenceError(field, f"{name} is not allowed with FREQ={parts['FREQ']} (RFC 5545)")
    if "COUNT" in parts and "UNTIL" in parts:
        raise RecurrenceError(field, "COUNT and UNTIL exclude each other (RFC 5545)")
    return parts


def _int_list(parts: Mapping[str, str], name: str) -> list[int]:
    try:
        return [int(v) for v in parts[name].split(",")] if name in parts else []
    except ValueError:
        raise RecurrenceError("recurrence.rrule", f"{name} must be a comma-separated list of integers") from None


def _interval(parts: Mapping[str, str]) -> int:
    value = parts.get("INTERVAL", "1")
    if not value.isdigit() or not 1 <= int(value) <= MAX_INTERVAL:
        raise RecurrenceError("recurrence.rrule", f"INTERVAL must be an integer from 1 to {MAX_INTERVAL}")
    return int(value)


def _per_day(parts: Mapping[str, str], interval: int) -> int:
    """An upper bound of the occurrences a rule has in one day."""
    hours = len(set(_int_list(parts, "BYHOUR"))) or None
    minutes = len(set(_int_list(parts, "BYMINUTE"))) or None
    seconds = len(set(_int_list(parts, "BYSECOND"))) or None
    freq = parts["FREQ"]
    if freq == "SECONDLY":
        return min(math.ceil(86400 / interval), (hours or 24) * (minutes or 60) * (seconds or 60))
    if freq == "MINUTELY":
        return min(math.ceil(1440 / interval) * (seconds or 1), (hours or 24) * (minutes or 60) * (seconds or 1))
    if freq == "HOURLY":
        return min(math.ceil(24 / interval), hours or 24) * (minutes or 1) * (seconds or 1)
    return (hours or 1) * (minutes or 1) * (seconds or 1)


def _until(value: str, zone: tzinfo) -> datetime:
    """UNTIL as naive local time: a UTC value (`Z`) converted, a local one as it is, a date the end
    of that day (inclusive, as calendar users mean it)."""
    match = _UNTIL.match(value)
    if not match:
        raise RecurrenceError("recurrence.rrule", "UNTIL must be YYYYMMDD or YYYYMMDDTHHMMSS[Z]")
    year, month, day, hour, minute, second, utc = match.groups()
    try:
        if hour is None:
            return datetime(int(year), int(month), int(day), 23, 59, 59)
        naive = datetime(int(year), int(month), int(day), int(hour), int(minute), int(second))
    except ValueError:
        raise RecurrenceError("recurrence.rrule", f"UNTIL {value} is not a valid date-time") from None
    if utc:
        return naive.replace(tzinfo=UTC).astimezone(zone).replace(tzinfo=None)
    return naive


def _period(parts: Mapping[str, str], interval: int) -> timedelta | None:
    """The local-time period of a rule whose occurrence pattern repeats with one, else None."""
    if parts["FREQ"] not in _UNIT_SECONDS or not set(parts) <= _PERIODIC_PARTS:
        return None
    if "BYDAY" in parts and _ORDINAL_DAY.search(parts["BYDAY"]):
        return None
    step = interval * _UNIT_SECONDS[parts["FREQ"]]
    whole = 7 * 86400 if ("BYDAY" in parts or parts["FREQ"] == "WEEKLY") else 86400
    return timedelta(seconds=math.lcm(step, whole))


def _calendar_period_days(parts: Mapping[str, str], interval: int) -> int:
    """A whole number of days after which a non-periodic rule's pattern repeats: 400 Gregorian
    years (a whole number of weeks) times what its interval needs."""
    freq = parts["FREQ"]
    if freq == "YEARLY":
        return _CALENDAR_CYCLE_DAYS * (interval // math.gcd(interval, 400))
    if freq == "MONTHLY":
        return _CALENDAR_CYCLE_DAYS * (interval // math.gcd(interval, 4800))
    step = interval * _UNIT_SECONDS[freq]
    return math.lcm(step, _CALENDAR_CYCLE_DAYS * 86400) // 86400


def _shift_days(value: datetime, days: int, floor: datetime) -> datetime | None:
    """`value` moved by the largest multiple of `days` that keeps it before `floor`, or None."""
    if value >= floor:
        return value
    times = (floor - value).days // days
    if times < 1:
        return value
    try:
        return value + timedelta(days=times * days)
    except OverflowError:
        return None


_FINER_THAN_WEEKLY: Final = frozenset({"DAILY", "HOURLY", "MINUTELY", "SECONDLY"})
_DAY_PARTS: Final = ("BYMONTH", "BYMONTHDAY", "BYYEARDAY", "BYWEEKNO", "BYDAY")


def _day_probe(parts: Mapping[str, str], start_local: datetime) -> Any:
    """For a daily or finer rule filtered by month, month day, year day or week number: the yearly
    rule of the days it may occur on. With INTERVAL 1 and no BYSETPOS the rule occurs (at the
    times of its other parts, which dateutil checks) exactly on those days, and searching the
    yearly rule for an occurrence takes one step a year instead of one a day."""
    if parts.get("INTERVAL", "1") != "1" or "BYSETPOS" in parts:
        raise RecurrenceError(
            "recurrence.rrule",
            "INTERVAL above 1 or BYSETPOS with BYMONTH, BYMONTHDAY, BYYEARDAY or BYWEEKNO needs FREQ=WEEKLY or "
            "coarser (e.g. FREQ=YEARLY;BYMONTH=6;BYDAY=MO,TU,WE,TH,FR)",
        )
    days = {name: parts[name] for name in _DAY_PARTS if name in parts}
    days.setdefault("BYDAY", "MO,TU,WE,TH,FR,SA,SU")
    text = ";".join(["FREQ=YEARLY", *(f"{name}={value}" for name, value in days.items())])
    return du.rrulestr(text, dtstart=start_local.replace(hour=0, minute=0, second=0), cache=False)


def _never_occurs(rule: Any, start_local: datetime, period: timedelta | None, cycle_days: int) -> bool:
    """Whether the rule has no occurrence after DTSTART. Its pattern repeats (every `period`, or
    every `cycle_days`), so a repetition moved near year 9999 holds one if any does, and
    dateutil's search there ends at year 9999 quickly."""
    days = period.days if period is not None else cycle_days  # periods are whole days
    late = _shift_days(start_local, days, datetime(9997, 1, 1))
    if late is None:
        return False
    probe = rule.replace(dtstart=late, until=None)
    return probe.after(late) is None


def parse_series(recurrence: Any, activity_date: Any) -> Series:
    """A checked series, or a RecurrenceError naming the part that breaks a rule."""
    if not isinstance(recurrence, dict):
        raise RecurrenceError("recurrence", "must be null or an object {rrule, timezone?, exdates?}")
    for key in recurrence:
        if key not in RECURRENCE_KEYS:
            raise RecurrenceError(f"recurrence.{key}", "is not a recurrence key; expected rrule, timezone, exdates")
    if activity_date is None:
        raise RecurrenceError("activity_date", "is required with a recurrence: it is the first occurrence (DTSTART)")
    rrule, timezone, exdates = recurrence.get("rrule"), recurrence.get("timezone"), recurrence.get("exdates")
    if isinstance(rrule, str) and isinstance(timezone, str | None) and isinstance(exdates, list | None):
        key = (rrule, timezone, tuple(exdates) if exdates is not None else None, activity_date)
        with contextlib.suppress(TypeError):  # exdates of other types than strings: the slow path
            found = _PARSED.get(key)
            if found is None:
                found = _PARSED[key] = _parse_series(recurrence, activity_date)
                if len(_PARSED) > SERIES_CACHE:
                    _PARSED.pop(next(iter(_PARSED)))
            return found
    return _parse_series(recurrence, activity_date)


_PARSED: dict[tuple[Any, ...], Series] = {}
"""Series by their raw recurrence and activity_date (a query reads the same ones again and again)."""


def _parse_series(recurrence: dict[str, Any], activity_date: Any) -> Series:
    start = activity_date if isinstance(activity_date, datetime) else parse_datetime(activity_date)
    return _series(
        str(recurrence.get("rrule")) if isinstance(recurrence.get("rrule"), str) else recurrence.get("rrule"),
        recurrence.get("timezone"),
        tuple(format_datetime(d) for d in _exdates(recurrence.get("exdates"))),
        format_datetime(start),
    )


@functools.lru_cache(maxsize=SERIES_CACHE)
def _series(text: Any, timezone: Any, exdates: tuple[str, ...], start_text: str) -> Series:
    """Parsed series, cached: a query expands the same series again and again."""
    parts = _parts(text)
    zone = _zone(timezone)
    interval = _interval(parts)
    if _per_day(parts, interval) > MAX_OCCURRENCES_PER_DAY:
        raise RecurrenceError(
            "recurrence.rrule", f"expands to over {MAX_OCCURRENCES_PER_DAY} occurrences a day; use a coarser rule"
        )
    count = None
    if "COUNT" in parts:
        if not parts["COUNT"].isdigit() or not 1 <= int(parts["COUNT"]) <= 1_000_000:
            raise RecurrenceError("recurrence.rrule", "COUNT must be an integer from 1 to 1000000")
        count = int(parts["COUNT"])
    start = parse_datetime(start_text)
    if not _FIRST_SAFE.year < start.year < _LAST_SAFE.year:
        raise RecurrenceError("activity_date", "must be between the years 1901 and 9989 for a recurring activity")
    start_local = start.astimezone(zone).replace(tzinfo=None)
    until = _until(parts["UNTIL"], zone) if "UNTIL" in parts else None
    rest = ";".join(f"{name}={value}" for name, value in parts.items() if name not in ("COUNT", "UNTIL"))
    try:
        rule = du.rrulestr(rest, dtstart=start_local, cache=False)
        if until is not None:
            rule = rule.replace(until=until)
    except (ValueError, KeyError, TypeError, IndexError, OverflowError) as exc:
        raise RecurrenceError("recurrence.rrule", f"is not a valid RFC 5545 RRULE: {exc}") from None
    period = _period(parts, interval)
    try:
        probe, probe_period = rule, period
        if period is None and parts["FREQ"] in _FINER_THAN_WEEKLY:
            probe, probe_period = _day_probe(parts, start_local), None
        never = _never_occurs(probe, start_local, probe_period, _calendar_period_days(parts, interval))
    except RecurrenceError:
        raise
    except (ValueError, OverflowError):
        never = True
    if never:
        raise RecurrenceError("recurrence.rrule", "never occurs after activity_date; check its BY parts and INTERVAL")
    first = rule.after(start_local, inc=True)
    per_period = 0
    if period is not None:
        end_of_first = start_local + period
        per_period = sum(1 for _ in itertools.takewhile(lambda x: x < end_of_first, rule.replace(until=None)))
    return Series(
        start=start,
        start_local=start_local,
        zone=zone,
        rule=rule,
        count=count,
        exdates=frozenset(parse_datetime(d) for d in exdates),
        start_in_rule=first == start_local,
        period=period,
        per_period=per_period,
    )


def check_recurrence(recurrence: Any, activity_date: Any) -> dict[str, Any] | None:
    """The recurrence of a command, checked, in its canonical form (exdates in UTC, sorted, no
    repeats); a RecurrenceError names what breaks a rule."""
    if recurrence is None:
        return None
    series = parse_series(recurrence, activity_date)
    canonical: dict[str, Any] = {"rrule": recurrence["rrule"]}
    if recurrence.get("timezone") is not None:
        canonical["timezone"] = recurrence["timezone"]
    if recurrence.get("exdates") is not None:
        canonical["exdates"] = sorted({format_datetime(d) for d in series.exdates})
    return canonical


__all__ = ["MAX_OCCURRENCES_PER_DAY", "MAX_STEPS", "RecurrenceError", "Series", "check_recurrence", "parse_series"]
