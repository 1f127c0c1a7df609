"""Recurrence rules and expansion (events/recurrence.py) and the occurrences page (projections/occurrences.py):
daylight-saving switches in Europe/Berlin and America/New_York, exdates, COUNT and UNTIL, the
fast-forward against plain iteration, the limits, and the query's parameters and paging."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from dateutil import rrule as du

from activities_client.errors import ValidationError
from events import recurrence
from events.commands import parse_create
from events.recurrence import RecurrenceError, check_recurrence, parse_series
from projections.occurrences import OccurrenceKey, page_of, parse_occurrences_query


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def expand(rule: str, start: str, since: str, until: str, **extra: Any) -> list[tuple[str, int]]:
    series = parse_series({"rrule": rule, **extra}, start)
    return [(at.strftime("%Y-%m-%dT%H:%M:%SZ"), index) for at, index in series.occurrences(utc(since), utc(until))]


# --- daylight saving: local wall-clock time is kept ----------------------------------------------


def test_berlin_spring_forward_keeps_local_time_and_reads_the_gap_with_the_offset_before_it() -> None:
    # 29 March 2026, 02:00 CET -> 03:00 CEST. A daily 09:00 stays 09:00 local: 08:00Z, then 07:00Z.
    assert expand("FREQ=DAILY", "2026-03-28T08:00:00Z", "2026-03-28T00:00:00Z", "2026-03-30T23:00:00Z",
                  timezone="Europe/Berlin") == [
        ("2026-03-28T08:00:00Z", 0),
        ("2026-03-29T07:00:00Z", 1),
        ("2026-03-30T07:00:00Z", 2),
    ]  # fmt: skip
    # 02:30 local does not exist on the 29th: read with the offset before the gap (+01:00, fold=0,
    # RFC 5545 3.3.5), i.e. 01:30Z, which is 03:30 summer time; the day after it is 02:30 CEST again.
    assert expand("FREQ=DAILY", "2026-03-28T01:30:00Z", "2026-03-28T00:00:00Z", "2026-03-30T23:00:00Z",
                  timezone="Europe/Berlin") == [
        ("2026-03-28T01:30:00Z", 0),
        ("2026-03-29T01:30:00Z", 1),
        ("2026-03-30T00:30:00Z", 2),
    ]  # fmt: skip


def test_berlin_fall_back_takes_the_first_of_a_repeated_local_time() -> None:
    # 25 October 2026, 03:00 CEST -> 02:00 CET: 02:30 happens twice; the occurrence is the first (CEST).
    assert expand("FREQ=DAILY", "2026-10-24T00:30:00Z", "2026-10-24T00:00:00Z", "2026-10-26T23:00:00Z",
                  timezone="Europe/Berlin") == [
        ("2026-10-24T00:30:00Z", 0),
        ("2026-10-25T00:30:00Z", 1),
        ("2026-10-26T01:30:00Z", 2),
    ]  # fmt: skip


def test_new_york_both_switches() -> None:
    # 8 March 2026 02:00 EST -> 03:00 EDT; 1 November 2026 02:00 EDT -> 01:00 EST.
    assert expand("FREQ=WEEKLY;BYDAY=SU", "2026-03-01T07:30:00Z", "2026-03-01T00:00:00Z", "2026-03-16T00:00:00Z",
                  timezone="America/New_York") == [
        ("2026-03-01T07:30:00Z", 0),  # 02:30 EST
        ("2026-03-08T07:30:00Z", 1),  # 02:30 does not exist: read as EST, i.e. 03:30 EDT
        ("2026-03-15T06:30:00Z", 2),  # 02:30 EDT
    ]  # fmt: skip
    assert expand("FREQ=DAILY", "2026-10-31T05:30:00Z", "2026-10-31T00:00:00Z", "2026-11-02T23:00:00Z",
                  timezone="America/New_York") == [
        ("2026-10-31T05:30:00Z", 0),  # 01:30 EDT
        ("2026-11-01T05:30:00Z", 1),  # 01:30 twice: the first, EDT
        ("2026-11-02T06:30:00Z", 2),  # 01:30 EST
    ]  # fmt: skip


def test_occurrences_come_in_utc_order_across_the_gap() -> None:
    # Every half hour in Berlin on the spring-forward night: 02:00 and 02:30 do not exist and map to
    # the same instants as 03:00 and 03:30; the expansion returns them in time order, then index.
    found = expand("FREQ=HOURLY;BYMINUTE=0,30", "2026-03-29T00:00:00Z", "2026-03-29T00:00:00Z",
                   "2026-03-29T02:00:00Z", timezone="Europe/Berlin")  # fmt: skip
    assert found == [
        ("2026-03-29T00:00:00Z", 0),
        ("2026-03-29T00:30:00Z", 1),
        ("2026-03-29T01:00:00Z", 2),
        ("2026-03-29T01:00:00Z", 4),
        ("2026-03-29T01:30:00Z", 3),
        ("2026-03-29T01:30:00Z", 5),
        ("2026-03-29T02:00:00Z", 6),
    ]


# --- exdates, COUNT, UNTIL, DTSTART ------------------------------------------------------------


def test_exdates_are_left_out_and_indexes_count_on() -> None:
    found = expand("FREQ=DAILY;COUNT=5", "2026-03-01T09:00:00Z", "2026-03-01T00:00:00Z", "2026-03-31T00:00:00Z",
                   exdates=["2026-03-02T10:00:00+01:00", "2026-03-04T09:00:00Z", "2026-03-20T09:00:00Z"])  # fmt: skip
    assert found == [("2026-03-01T09:00:00Z", 0), ("2026-03-03T09:00:00Z", 2), ("2026-03-05T09:00:00Z", 4)]


def test_count_counts_dtstart_even_when_the_rule_does_not_match_it() -> None:
    # activity_date is a Tuesday; the rule says Mondays: DTSTART is still occurrence 0 (RFC 5545).
    assert expand("FREQ=WEEKLY;BYDAY=MO;COUNT=3", "2026-03-03T09:00:00Z", "2026-03-01T00:00:00Z",
                  "2026-06-01T00:00:00Z") == [
        ("2026-03-03T09:00:00Z", 0),
        ("2026-03-09T09:00:00Z", 1),
        ("2026-03-16T09:00:00Z", 2),
    ]  # fmt: skip


@pytest.mark.parametrize(
    "until",
    ["20260305T090000Z", "20260305", "20260305T100000"],  # UTC; a date (its whole day); local (Berlin)
)
def test_until_is_inclusive(until: str) -> None:
    found = expand(f"FREQ=DAILY;UNTIL={until}", "2026-03-01T09:00:00Z", "2026-03-01T00:00:00Z",
                   "2026-03-31T00:00:00Z", timezone="Europe/Berlin")  # fmt: skip
    assert [at for at, _ in found] == [f"2026-03-0{day}T09:00:00Z" for day in range(1, 6)]


def test_window_bounds_are_inclusive_and_the_index_is_the_series_position() -> None:
    found = expand("FREQ=DAILY", "2026-01-01T09:00:00Z", "2026-03-01T09:00:00Z", "2026-03-03T09:00:00Z")
    assert found == [("2026-03-01T09:00:00Z", 59), ("2026-03-02T09:00:00Z", 60), ("2026-03-03T09:00:00Z", 61)]


# --- the fast-forward gives what plain iteration gives ---------------------------------------------


@pytest.mark.parametrize(
    ("rule", "zone"),
    [
        ("FREQ=DAILY", "Europe/Berlin"),
        ("FREQ=DAILY;INTERVAL=3;BYHOUR=8,20", "America/New_York"),
        ("FREQ=DAILY;BYDAY=MO,WE,FR;BYHOUR=9;BYMINUTE=0,45", "Europe/Berlin"),
        ("FREQ=WEEKLY;INTERVAL=2;BYDAY=TU,TH;WKST=SU", "America/New_York"),
        ("FREQ=WEEKLY;BYDAY=MO,TU,WE,TH,FR;BYSETPOS=-1", "UTC"),
        ("FREQ=HOURLY;INTERVAL=5", "Europe/Berlin"),
        ("FREQ=HOURLY;BYDAY=SA,SU;BYHOUR=10,14", "America/New_York"),
        ("FREQ=MINUTELY;INTERVAL=97;COUNT=20000", "UTC"),
        ("FREQ=WEEKLY;COUNT=150;BYDAY=MO,FR", "Europe/Berlin"),
        ("FREQ=MONTHLY;BYDAY=-1FR", "America/New_York"),
        ("FREQ=YEARLY;BYMONTH=3;BYDAY=SU;BYSETPOS=-1", "Europe/Berlin"),
        ("FREQ=DAILY;BYMONTH=3,4", "UTC"),
    ],
)
def test_expansion_matches_plain_iteration(rule: str, zone: str) -> None:
    start = datetime(2024, 1, 5, 9, 15, tzinfo=UTC)  # a Friday
    series = parse_series({"rrule": rule, "timezone": zone}, start)
    since, until = datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 4, 15, tzinfo=UTC)
    tz = ZoneInfo(zone)
    local = start.astimezone(tz).replace(tzinfo=None)
    parts = [part for part in rule.split(";") if not part.startswith("COUNT=")]
    count = next((int(part[6:]) for part in rule.split(";") if part.startswith("COUNT=")), None)
    plain = du.rrulestr(";".join(parts), dtstart=local)
    series_times = [local, *(x for x in itertools.takewhile(lambda x: x < datetime(2026, 4, 17), plain) if x != local)]
    expected = []
    for index, when in enumerate(series_times[:count]):  # DTSTART first, counted by COUNT (RFC 5545)
        at = when.replace(tzinfo=tz).astimezone(UTC)
        if since <= at <= until:
            expected.append((at, index))
    assert list(series.occurrences(since, until)) == sorted(expected)
    assert expected or "COUNT" in rule


# --- limits and rules -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "field"),
    [
        ("FREQ=SECONDLY", "recurrence.rrule"),  # 86,400 a day
        ("FREQ=MINUTELY", "recurrence.rrule"),  # 1,440 a day
        ("FREQ=HOURLY;BYMINUTE=0,10,20,30,40,50", "recurrence.rrule"),  # 24 x 6 = 144: allowed below
        ("FREQ=DAILY;BYHOUR=0,1,2,3,4,5,6,7,8,9,10,11;BYMINUTE=0,5,10,15,20,25,30,35,40,45,50,55;BYSECOND=0,30",
         "recurrence.rrule"),  # 288 x 2 ... = 12*12*2 = 288: allowed below
        ("FREQ=DAILY;INTERVAL=7;BYDAY=MO", "recurrence.rrule"),  # never occurs after a Friday DTSTART
        ("FREQ=YEARLY;BYMONTH=2;BYMONTHDAY=30", "recurrence.rrule"),  # never
        ("FREQ=DAILY;BYMONTH=2;BYMONTHDAY=31", "recurrence.rrule"),  # never, found by the yearly probe
        ("FREQ=DAILY;INTERVAL=2;BYMONTH=2", "recurrence.rrule"),  # unsupported combination
        ("FREQ=MONTHLY;BYWEEKNO=3", "recurrence.rrule"),  # RFC 5545: BYWEEKNO only with YEARLY
        ("FREQ=WEEKLY;BYMONTHDAY=3", "recurrence.rrule"),
        ("FREQ=DAILY;COUNT=3;UNTIL=20260101", "recurrence.rrule"),
        ("FREQ=DAILY;COUNT=0", "recurrence.rrule"),
        ("FREQ=DAILY;FREQ=WEEKLY", "recurrence.rrule"),
        ("FREQ=DAILY;BYDAY=XX", "recurrence.rrule"),
        ("FREQ=DAILY;UNTIL=2026-01-01", "recurrence.rrule"),
        ("FREQ=DAILY;UNTIL=20261340", "recurrence.rrule"),
        ("FREQ=DAILY;X-NAME=1", "recurrence.rrule"),
        ("INTERVAL=2", "recurrence.rrule"),
        ("FREQ=DAILY\nEXDATE:20260101", "recurrence.rrule"),
        ("DTSTART:20260101T000000Z", "recurrence.rrule"),
        ("", "recurrence.rrule"),
    ],
)
def test_rules_that_are_refused(value: str, field: str) -> None:
    if value in ("FREQ=HOURLY;BYMINUTE=0,10,20,30,40,50",) or value.startswith("FREQ=DAILY;BYHOUR=0,1"):
        parse_series({"rrule": value}, "2026-01-02T09:00:00Z")  # within 1,000 a day
        return
    with pytest.raises(RecurrenceError) as error:
        parse_series({"rrule": value}, "2026-01-02T09:00:00Z")  # a Friday
    assert error.value.field == field


def test_the_daily_limit_is_1000() -> None:
    hours = ",".join(str(hour) for hour in range(16))
    parse_series({"rrule": f"FREQ=MINUTELY;INTERVAL=2;BYHOUR={hours}"}, "2026-01-02T00:00:00Z")
    with pytest.raises(RecurrenceError, match="1000 occurrences a day"):
        parse_series({"rrule": "FREQ=MINUTELY;BYHOUR=0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16"}, "2026-01-02T00:00:00Z")
    with pytest.raises(RecurrenceError, match="1000 occurrences a day"):
        parse_series({"rrule": "FREQ=HOURLY;BYMINUTE=0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,"
                      "24,25,26,27,28,29,30,31,32,33,34,35,36,37,38,39,40,41,42"}, "2026-01-02T00:00:00Z")  # fmt: skip


@pytest.mark.parametrize(
    ("value", "activity_date", "field"),
    [
        ({"rrule": "FREQ=DAILY"}, None, "activity_date"),
        ({"rrule": "FREQ=DAILY", "timezone": "Mars/Olympus"}, "2026-01-01T00:00:00Z", "recurrence.timezone"),
        ({"rrule": "FREQ=DAILY", "timezone": "../etc/passwd"}, "2026-01-01T00:00:00Z", "recurrence.timezone"),
        ({"rrule": "FREQ=DAILY", "timezone": 1}, "2026-01-01T00:00:00Z", "recurrence.timezone"),
        ({"rrule": "FREQ=DAILY", "exdates": "2026-01-02T00:00:00Z"}, "2026-01-01T00:00:00Z", "recurrence.exdates"),
        ({"rrule": "FREQ=DAILY", "exdates": ["2026-01-02T00:00:00"]}, "2026-01-01T00:00:00Z", "recurrence.exdates"),
        ({"rrule": "FREQ=DAILY", "freq": "DAILY"}, "2026-01-01T00:00:00Z", "recurrence.freq"),
        ({"rrule": 7}, "2026-01-01T00:00:00Z", "recurrence.rrule"),
        ({"freq": "WEEKLY", "count": 4}, "2026-01-01T00:00:00Z", "recurrence.freq"),  # release 1.0 style
    ],
)
def test_recurrence_objects_that_are_refused(value: Any, activity_date: str | None, field: str) -> None:
    with pytest.raises(RecurrenceError) as error:
        check_recurrence(value, activity_date)
    assert error.value.field == field
    body = {"account_id": "acc_1", "recurrence": value, **({"activity_date": activity_date} if activity_date else {})}
    with pytest.raises(ValidationError) as refused:
        parse_create(body)
    assert refused.value.details[0]["field"] == field


def test_recurrence_is_stored_canonical() -> None:
    command = parse_create(
        {
            "account_id": "acc_1",
            "activity_date": "2026-01-01T10:00:00+01:00",
            "recurrence": {
                "rrule": "RRULE:FREQ=WEEKLY;BYDAY=TH",
                "timezone": "Europe/Berlin",
                "exdates": ["2026-01-08T10:00:00+01:00", "2026-01-08T09:00:00Z"],
            },
        }
    )
    assert command.fields["recurrence"] == {
        "rrule": "RRULE:FREQ=WEEKLY;BYDAY=TH",
        "timezone": "Europe/Berlin",
        "exdates": ["2026-01-08T09:00:00Z"],
    }
    assert parse_create({"account_id": "a", "recurrence": None})


def test_a_long_calendar_series_stops_at_the_step_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    # Monthly rules are iterated from DTSTART (no fixed period in days); MAX_STEPS bounds the work.
    series = parse_series({"rrule": "FREQ=MONTHLY;BYMONTHDAY=1,15"}, "2000-01-01T09:00:00Z")
    since, until = utc("2026-03-01T00:00:00Z"), utc("2026-04-30T00:00:00Z")
    assert [index for _, index in series.occurrences(since, until)] == [628, 629, 630, 631]  # 314 months, 2 each
    monkeypatch.setattr(recurrence, "MAX_STEPS", 600)
    assert list(series.occurrences(since, until)) == []


# --- the occurrences page -------------------------------------------------------------------------


def row(activity_id: str, when: str, rule: Any = None) -> dict[str, Any]:
    return {"id": activity_id, "version": 1, "activity_date": utc(when), "is_recurring": rule is not None,
            "recurrence": rule}  # fmt: skip


def test_pages_merge_series_in_time_order_and_follow_the_cursor() -> None:
    rows = [
        row("act_a", "2026-03-01T09:00:00Z", {"rrule": "FREQ=DAILY"}),
        row("act_b", "2026-03-01T09:00:00Z", {"rrule": "FREQ=HOURLY;INTERVAL=12"}),
        row("act_c", "2026-03-02T09:00:00Z"),  # a one-off at the same instant as two occurrences
        row("act_d", "2026-02-01T09:00:00Z", {"freq": "WEEKLY"}),  # stored by release 1.0: a one-off
        row("act_e", "2026-03-03T09:00:00Z", {"rrule": "garbage"}),  # a one-off in the window
    ]
    params = {"from": ["2026-03-01T00:00:00Z"], "to": ["2026-03-04T00:00:00Z"], "limit": ["200"]}
    whole, more = page_of(rows, parse_occurrences_query(params), None)
    assert not more
    assert [(k.at.isoformat()[:16], k.activity_id, k.index) for k in whole] == [
        ("2026-03-01T09:00", "act_a", 0),
        ("2026-03-01T09:00", "act_b", 0),
        ("2026-03-01T21:00", "act_b", 1),
        ("2026-03-02T09:00", "act_a", 1),
        ("2026-03-02T09:00", "act_b", 2),
        ("2026-03-02T09:00", "act_c", 0),
        ("2026-03-02T21:00", "act_b", 3),
        ("2026-03-03T09:00", "act_a", 2),
        ("2026-03-03T09:00", "act_b", 4),
        ("2026-03-03T09:00", "act_e", 0),
        ("2026-03-03T21:00", "act_b", 5),
    ]
    for limit in (1, 2, 3, 4):
        query = parse_occurrences_query({**params, "limit": [str(limit)]})
        seen: list[OccurrenceKey] = []
        after = None
        while True:
            keys, more = page_of(rows, query, after)
            seen += keys
            if not more:
                break
            after = OccurrenceKey.from_json(keys[-1].to_json())
        assert seen == whole


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"to": ["2026-03-01T00:00:00Z"]}, "from"),
        ({"from": ["2026-03-01T00:00:00Z"]}, "to"),
        ({"from": ["2026-03-01T00:00:00Z"], "to": ["2026-02-01T00:00:00Z"]}, "to"),
        ({"from": ["2026-01-01T00:00:00Z"], "to": ["2027-01-02T00:00:00.001Z"]}, "to"),
        ({"from": ["2026-01-01T00:00:00Z"], "to": ["2026-01-02T00:00:00Z"], "sort": ["due_date"]}, "sort"),
        ({"from": ["2026-01-01T00:00:00Z", "2026-01-01T00:00:00Z"], "to": ["2026-01-02T00:00:00Z"]}, "from"),
    ],
)
def test_query_parameters_that_are_refused(params: dict[str, list[Any]], field: str) -> None:
    with pytest.raises(ValidationError) as error:
        parse_occurrences_query(params)
    assert error.value.details[0]["field"] == field


def test_the_window_may_be_366_days() -> None:
    start = datetime(2028, 1, 1, tzinfo=UTC)
    query = parse_occurrences_query({"from": [start.isoformat()], "to": [(start + timedelta(days=366)).isoformat()]})
    assert query.end - query.start == timedelta(days=366)


def test_windows_at_the_ends_of_time_and_old_or_far_starts() -> None:
    series = parse_series({"rrule": "FREQ=DAILY", "timezone": "America/New_York"}, "2026-01-01T09:00:00Z")
    assert list(series.window(datetime(1, 1, 1, tzinfo=UTC), datetime(1, 12, 1, tzinfo=UTC))) == []
    assert list(series.window(datetime(9999, 1, 1, tzinfo=UTC), datetime(9999, 12, 31, tzinfo=UTC))) == []
    for start in ("0001-01-01T00:00:00Z", "9999-12-31T00:00:00Z"):
        with pytest.raises(RecurrenceError) as error:
            parse_series({"rrule": "FREQ=DAILY", "timezone": "America/New_York"}, start)
        assert error.value.field == "activity_date"
    query = parse_occurrences_query({"from": ["0001-01-01T00:00:00Z"], "to": ["0001-12-31T00:00:00Z"]})
    assert page_of([row("act_a", "2026-03-01T09:00:00Z", {"rrule": "FREQ=DAILY"})], query, None) == ([], False)


def test_a_window_too_large_to_keep_is_merged_page_by_page(monkeypatch: pytest.MonkeyPatch) -> None:
    from projections import occurrences

    rows = [
        row("act_x", "2026-03-01T09:00:00Z", {"rrule": "FREQ=HOURLY;INTERVAL=5"}),
        row("act_y", "2026-03-01T10:00:00Z", {"rrule": "FREQ=DAILY;BYHOUR=10,22", "timezone": "Europe/Berlin"}),
        row("act_z", "2026-03-15T12:00:00Z"),
    ]
    params = {"from": ["2026-03-01T00:00:00Z"], "to": ["2026-04-01T00:00:00Z"], "limit": ["7"]}

    def all_pages() -> list[OccurrenceKey]:
        query = parse_occurrences_query(params)
        seen: list[OccurrenceKey] = []
        after = None
        while True:
            keys, more = page_of(rows, query, after)
            seen += keys
            if not more:
                return seen
            after = keys[-1]

    kept = all_pages()
    monkeypatch.setattr(occurrences, "MERGED_CACHE_ITEMS", 10)
    occurrences._MERGED.clear()
    assert all_pages() == kept and len(kept) == len(set(kept)) > 150 and kept == sorted(kept)
    assert sum(key.activity_id == "act_z" for key in kept) == 1
