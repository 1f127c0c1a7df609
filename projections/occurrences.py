"""The occurrences query (docs/contract.md section 9): parameters, candidate SQL, and the page.

Pure, like projections/queries.py: `parse_occurrences_query` turns wire parameters into an
`OccurrencesQuery` or a `validation_error`; `build_candidates_sql` selects the activities whose
occurrences can fall in the window (one-offs whose `activity_date` is in it, at most a page of
them, in time order after the cursor; series that start by its end and do not end before its
start, by the derived columns `is_recurring` and `occurrences_end` of read-model migration 9);
`page_of` expands the candidates (events/recurrence.py) and merges them into one page in time
order; `build_documents_sql` reads the documents of the page's activities.

Order and paging: occurrences are ordered by (time, activity id, index); a cursor is the last
one's key, signed and bound to the caller, the window and the filters (CursorCodec.sign), so
following `next_cursor` visits every occurrence once.

A recurrence stored before it was checked (release 1.0 took any object) that does not parse is
served as a one-off: its one occurrence at `activity_date`, index 0.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import logging
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final

from psycopg import sql

from activities_client.document import format_datetime, parse_datetime
from activities_client.errors import field_error
from activities_client.filters import (
    DEFAULT_LIMIT,
    MAX_LIMIT,
    MAX_OCCURRENCE_WINDOW_DAYS,
    OCCURRENCES_QUERY_PARAMETERS,
)
from events.caller import Caller
from events.recurrence import RecurrenceError, parse_series
from projections.queries import (
    UPCAST_DOCUMENT,
    ListQuery,
    Params,
    _check_names,
    _datetime,
    _optional_int,
    _scope,
    _single,
    _text,
    list_filters,
    parse_bool,
    parse_filters,
    table_identifier,
)

log = logging.getLogger("activities.occurrences")

MAX_WINDOW: Final = timedelta(days=MAX_OCCURRENCE_WINDOW_DAYS)


@dataclass(frozen=True)
class OccurrencesQuery:
    """The window (inclusive, UTC), the list filters and the page."""

    start: datetime
    end: datetime
    filters: Mapping[str, Any] = field(default_factory=dict)
    limit: int = DEFAULT_LIMIT
    cursor: str | None = None
    min_position: int | None = None

    def list_query(self) -> ListQuery:
        """The same filters as a list of live activities (whose WHERE terms select candidates)."""
        return ListQuery(filters=self.filters)

    def binding(self) -> dict[str, Any]:
        """What a cursor is bound to: the query, the window and the filters (not the limit)."""
        return {
            "query": "occurrences",
            "from": format_datetime(self.start),
            "to": format_datetime(self.end),
            **self.list_query().binding(),
        }


@dataclass(frozen=True, order=True)
class OccurrenceKey:
    """Where an occurrence is in the order of a page: its time, its activity, its index."""

    at: datetime
    activity_id: str
    index: int

    def to_json(self) -> list[Any]:
        return [format_datetime(self.at), self.activity_id, self.index]

    @classmethod
    def from_json(cls, value: Any) -> OccurrenceKey:
        invalid = field_error("cursor", "is not a cursor of this query; start again without it")
        if not isinstance(value, list) or len(value) != 3:
            raise invalid
        at, activity_id, index = value
        if not isinstance(activity_id, str) or not isinstance(index, int) or isinstance(index, bool):
            raise invalid
        try:
            return cls(parse_datetime(at), activity_id, index)
        except (ValueError, TypeError):
            raise invalid from None


def parse_occurrences_query(params: Params) -> OccurrencesQuery:
    """Validated occurrences parameters: `from` and `to` (required, at most 366 days apart), the list
    filters, `limit`, `cursor`, `min_position`; anything else is a validation_error."""
    if "sort" in params:
        raise field_error("sort", "is not an occurrences parameter: occurrences come in time order")
    _check_names(params, OCCURRENCES_QUERY_PARAMETERS)
    start = _datetime(params, "from")
    end = _datetime(params, "to")
    if start is None:
        raise field_error("from", "is required: the window's start, an RFC 3339 date-time with a zone")
    if end is None:
        raise field_error("to", "is required: the window's end, an RFC 3339 date-time with a zone")
    if end < start:
        raise field_error("to", "must not be before from")
    if end - start > MAX_WINDOW:
        raise field_error("to", f"must be at most {MAX_OCCURRENCE_WINDOW_DAYS} days after from; ask window by window")
    if parse_bool("include_deleted", _single(params, "include_deleted")):
        raise field_error("include_deleted", "must be false: occurrences are those of live activities")
    filters, _ = parse_filters({name: values for name, values in params.items() if name != "include_deleted"})
    return OccurrencesQuery(
        start=start,
        end=end,
        filters=filters,
        limit=_optional_int(params, "limit", 1, MAX_LIMIT) or DEFAULT_LIMIT,
        cursor=_text(params, "cursor"),
        min_position=_optional_int(params, "min_position", 0),
    )


def build_candidates_sql(
    table: str, query: OccurrencesQuery, caller: Caller, after: OccurrenceKey | None = None
) -> tuple[sql.Composed, list[Any]]:
    """The activities with occurrences that may fall in the window, as rows of `id`, `version`,
    `activity_date`, `is_recurring` and `recurrence`: at most a page of one-offs (in time order,
    after the cursor: each is one occurrence) and every series that may reach into the window."""
    where, params = _scope(caller)
    filters, filter_params = list_filters(query.list_query())  # includes NOT is_deleted
    where += filters
    params += filter_params
    # Only columns of migration 9's covering indexes in the series' arm: index-only scans.
    columns = sql.SQL("id, version, activity_date, {} AS is_recurring, recurrence")
    table_sql = table_identifier(table)
    common = sql.SQL(" AND ").join(where)
    one_offs_after: sql.Composable = sql.SQL("activity_date >= %s")
    one_offs_params: list[Any] = [query.start]
    if after is not None and after.at >= query.start:
        one_offs_after = sql.SQL("(activity_date, id) > (%s, %s)")
        one_offs_params = [after.at, after.activity_id]
    statement = sql.SQL(
        "(SELECT {one_off} FROM {table} WHERE {common} AND NOT is_recurring AND {after} AND activity_date <= %s "
        "ORDER BY activity_date, id LIMIT %s) "
        "UNION ALL "
        "(SELECT {series} FROM {table} WHERE {common} AND is_recurring AND activity_date <= %s "
        "AND (occurrences_end IS NULL OR occurrences_end >= %s))"
    ).format(
        one_off=columns.format(sql.SQL("false")),
        series=columns.format(sql.SQL("true")),
        table=table_sql,
        common=common,
        after=one_offs_after,
    )
    return statement, [
        *params,
        *one_offs_params,
        query.end,
        query.limit + 1,
        *params,
        query.end,
        query.start,
    ]


def build_documents_sql(table: str, ids: Sequence[str], caller: Caller) -> tuple[sql.Composed, list[Any]]:
    """The current documents (JSON text, in the current schema) and versions of some activities."""
    where, params = _scope(caller)
    statement = sql.SQL(
        "SELECT id, version, {document}::text AS document FROM {table} WHERE id = ANY(%s) AND {where}"
    ).format(
        document=UPCAST_DOCUMENT,
        table=table_identifier(table),
        where=sql.SQL(" AND ").join(where),
    )
    return statement, [list(ids), *params]


Key = tuple[datetime, str, int]
"""An occurrence in the order of a page, as a plain tuple (merged by the thousand: cheaper than objects)."""


def _occurrences_of(row: Mapping[str, Any], start: datetime, end: datetime, since: datetime | None) -> Iterator[Key]:
    """An activity's occurrences in [start, end] in order; a series whose stored recurrence does
    not parse is served as a one-off."""
    activity_id, activity_date = row["id"], row["activity_date"]
    if activity_date is None:
        return iter(())
    if row["is_recurring"]:
        try:
            series = parse_series(row["recurrence"], activity_date)
        except (RecurrenceError, ValueError, TypeError) as error:
            log.debug(
                "stored recurrence not expandable, served as one occurrence",
                extra={"activity_id": activity_id, "field": getattr(error, "field", "recurrence")},
            )
        else:
            return ((at, activity_id, index) for at, index in series.window(start, end, since))
    if max(start, since or start) <= activity_date <= end:
        return iter(((activity_date, activity_id, 0),))
    return iter(())


MERGED_CACHE_ENTRIES: Final = 32
MERGED_CACHE_ITEMS: Final = 10_000
_MERGED: OrderedDict[tuple[Any, ...], list[Key] | None] = OrderedDict()
"""The series' occurrences of a window, merged, by the window and the series' (id, version): the
pages of a window and a window asked again (a calendar refreshed) are then a slice of a list. At
most MERGED_CACHE_ENTRIES windows of MERGED_CACHE_ITEMS occurrences (about 25 MB); a window with
more is merged page by page (and remembered as such: None). A series that changed has a new
version, so a new entry."""


def _series_stream(rows: Sequence[Mapping[str, Any]], query: OccurrencesQuery, since: datetime | None) -> Iterator[Key]:
    """The occurrences of the candidate series in order, from `since` on."""
    ident = (query.start, query.end, tuple(sorted((row["id"], row["version"]) for row in rows)))
    if ident in _MERGED:
        merged = _MERGED[ident]
        _MERGED.move_to_end(ident)
    else:
        streams = (_occurrences_of(row, query.start, query.end, None) for row in rows)
        expanded = list(itertools.islice(heapq.merge(*streams), MERGED_CACHE_ITEMS + 1))
        merged = _MERGED[ident] = expanded if len(expanded) <= MERGED_CACHE_ITEMS else None
        if len(_MERGED) > MERGED_CACHE_ENTRIES:
            _MERGED.popitem(last=False)
    if merged is None:  # too many to keep: merged page by page
        return heapq.merge(*(_occurrences_of(row, query.start, query.end, since) for row in rows))
    if since is None:
        return iter(merged)
    return itertools.islice(merged, bisect.bisect_left(merged, (since, "", -1)), None)


def page_of(
    rows: Sequence[Mapping[str, Any]], query: OccurrencesQuery, after: OccurrenceKey | None
) -> tuple[list[OccurrenceKey], bool]:
    """The page's occurrences (at most `limit`, in order, after the cursor) and whether more follow."""
    since = None if after is None else after.at
    series = [row for row in rows if row["is_recurring"]]
    one_offs = (_occurrences_of(row, query.start, query.end, since) for row in rows if not row["is_recurring"])
    merged: Iterator[Key] = heapq.merge(_series_stream(series, query, since), *one_offs)
    if after is not None:
        last = (after.at, after.activity_id, after.index)
        merged = itertools.dropwhile(lambda key: key <= last, merged)
    page = list(itertools.islice(merged, query.limit + 1))
    return [OccurrenceKey(*key) for key in page[: query.limit]], len(page) > query.limit
