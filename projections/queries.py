"""SQL over the read model: parameter parsing, keyset cursors and statement building.

Everything here is pure (no I/O), so filters, sorts and cursors are unit-tested without a
database: `parse_list_query` / `parse_stats_query` / `parse_get_query` turn wire parameters into
typed queries or a `validation_error`; `build_list_sql` / `build_stats_sql` / `build_get_sql` turn
a query and a caller into one SQL statement and its parameters; `CursorCodec` signs and checks the
opaque `next_cursor`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import orjson
from psycopg import sql

from activities_client.document import (
    SCHEMA_2_DEFAULTS,
    SCHEMA_VERSION,
    format_datetime,
    is_activity_id,
    is_key_text,
    parse_datetime,
)
from activities_client.errors import field_error
from activities_client.filters import (
    DEFAULT_LIMIT,
    DEFAULT_SORT,
    LIST_FILTERS,
    LIST_PARAMETERS,
    MAX_LIMIT,
    MAX_SEARCH_WORDS,
    PAGE_PARAMETERS,
    SEARCH_WORD,
    SORT_FIELDS,
    STATS_GROUPS,
    STATS_QUERY_PARAMETERS,
    ListFilter,
)
from events.caller import Caller

READ_MODEL_TABLE: Final = "activities"
TRACKING_TABLE: Final = "activities_projection_tracking"

NOT_NULL_SORT_FIELDS: Final = frozenset({"created_at", "updated_at"})
GET_PARAMS: Final = frozenset({"id", "include_deleted", "version", "min_position"})

_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")

Params = dict[str, list[Any]]
"""Wire parameters, each name with its values (HTTP query strings repeat names; JSON does not)."""


# ---------------------------------------------------------------------------------------------
# Typed queries
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sort:
    """A sort key and its direction; ties are broken by id in the same direction."""

    field: str = "activity_date"
    descending: bool = True

    @property
    def wire(self) -> str:
        return ("-" if self.descending else "") + self.field


@dataclass(frozen=True)
class ListQuery:
    """The list parameters of docs/contract.md section 5, validated: the filters given (by wire name,
    see activities_client/filters.py; repeatable ones as tuples, date-times as datetimes) and the page."""

    filters: Mapping[str, Any] = field(default_factory=dict)
    include_deleted: bool = False
    sort: Sort = Sort()
    limit: int = DEFAULT_LIMIT
    cursor: str | None = None
    min_position: int | None = None

    def binding(self) -> dict[str, Any]:
        """What a cursor is bound to: the filters and the sort (not the limit, which may change)."""
        return {
            "filters": {name: _canonical(value) for name, value in sorted(self.filters.items())},
            "include_deleted": self.include_deleted,
            "sort": self.sort.wire,
        }


def _canonical(value: Any) -> Any:
    if isinstance(value, datetime):
        return format_datetime(value)
    if isinstance(value, tuple):
        return sorted(set(value))
    return value


@dataclass(frozen=True)
class StatsQuery:
    """The stats parameters of docs/contract.md section 5: what to count by, and the list's filters."""

    group_by: str
    filters: Mapping[str, Any] = field(default_factory=dict)
    include_deleted: bool = False
    min_position: int | None = None

    def list_query(self) -> ListQuery:
        """The same filters as a list query (whose WHERE terms the stats use)."""
        return ListQuery(filters=self.filters, include_deleted=self.include_deleted)


@dataclass(frozen=True)
class GetQuery:
    """One activity by id, optionally as it was at a version."""

    id: str
    include_deleted: bool = False
    version: int | None = None
    min_position: int | None = None


@dataclass(frozen=True)
class Keyset:
    """Where a page ended: the sort value of its last row (None when that row has none) and its id."""

    value: str | None
    id: str


# ---------------------------------------------------------------------------------------------
# Parsing wire parameters
# ---------------------------------------------------------------------------------------------


def params_from_pairs(pairs: Iterable[tuple[str, str]]) -> Params:
    """HTTP query string items (names may repeat) as Params."""
    params: Params = {}
    for name, value in pairs:
        params.setdefault(name, []).append(value)
    return params


def params_from_json(body: Mapping[str, Any]) -> Params:
    """A NATS JSON body as Params: a list value stands for a repeated parameter."""
    params: Params = {}
    for name, value in body.items():
        if value is None:
            continue
        params[name] = list(value) if isinstance(value, list) else [value]
    return params


def _check_names(params: Params, allowed: frozenset[str]) -> None:
    for name in params:
        if name not in allowed:
            raise field_error(name, f"is not a parameter; expected some of {sorted(allowed)}")


def _single(params: Params, name: str) -> Any:
    values = params.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise field_error(name, "may be given only once")
    return values[0]


def _text(params: Params, name: str) -> str | None:
    value = _single(params, name)
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > 500 or "\x00" in value:
        raise field_error(name, "must be a non-empty string without NUL characters")
    return value


def parse_bool(name: str, value: Any) -> bool:
    """true/false as JSON booleans or as the strings of a query string."""
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "1"):
        return True
    if isinstance(value, str) and value.lower() in ("false", "0"):
        return False
    raise field_error(name, "must be true or false")


def parse_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    """An integer within bounds, from JSON or from a query-string digit string."""
    if isinstance(value, bool):
        raise field_error(name, "must be an integer")
    if isinstance(value, str) and re.fullmatch(r"-?[0-9]{1,18}", value):
        value = int(value)
    if not isinstance(value, int):
        raise field_error(name, "must be an integer")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
        raise field_error(name, f"must be {bound}")
    return value


def _optional_int(params: Params, name: str, minimum: int, maximum: int | None = None) -> int | None:
    value = _single(params, name)
    return None if value is None else parse_int(name, value, minimum, maximum)


def _datetime(params: Params, name: str) -> datetime | None:
    value = _single(params, name)
    if value is None:
        return None
    try:
        return parse_datetime(value)
    except ValueError as exc:
        raise field_error(name, str(exc)) from None


def parse_sort(value: Any) -> Sort:
    if value is None:
        value = DEFAULT_SORT
    if not isinstance(value, str):
        raise field_error("sort", "must be a string")
    descending = value.startswith("-")
    name = value[1:] if descending else value
    if name not in SORT_FIELDS:
        choices = ", ".join(f"{f} or -{f}" for f in SORT_FIELDS)
        raise field_error("sort", f"must be one of {choices}")
    return Sort(name, descending)


def _strings(params: Params, name: str) -> tuple[str, ...]:
    values = params.get(name) or []
    for value in values:
        if not isinstance(value, str) or not value or "\x00" in value:
            raise field_error(name, "must be non-empty strings without NUL characters")
    return tuple(dict.fromkeys(values))


def parse_filter(spec: ListFilter, params: Params) -> Any:
    """A filter's value from the parameters (None when not given), checked by its kind."""
    if spec.kind == "text":
        return _text(params, spec.name)
    if spec.kind == "datetime":
        return _datetime(params, spec.name)
    if spec.kind == "words":
        return search_words(spec.name, _text(params, spec.name))
    if spec.kind == "boolean":
        value = _single(params, spec.name)
        return None if value is None else parse_bool(spec.name, value)
    values = _strings(params, spec.name)
    for value in values:
        if spec.choices and value not in spec.choices:
            raise field_error(spec.name, f"must be one of {sorted(spec.choices)}")
    return values or None


def search_words(name: str, text: str | None) -> tuple[str, ...] | None:
    """The words of a search, lower-cased and without repeats; a text with none is refused."""
    if text is None:
        return None
    words = tuple(dict.fromkeys(word.lower() for word in re.findall(SEARCH_WORD, text)))
    if not words:
        raise field_error(name, "must contain at least one word (letters or digits)")
    if len(words) > MAX_SEARCH_WORDS:
        raise field_error(name, f"may contain at most {MAX_SEARCH_WORDS} words")
    return words


def search_query(words: Sequence[str]) -> str:
    """The tsquery text of a search: every word, each also matching its longer forms (`word:*`).
    Words are `\\w+` only, so nothing in them is tsquery syntax."""
    return " & ".join(f"{word}:*" for word in words)


SEARCH_PREFIX_CHARS: Final = 12
"""The longest word prefix the prefix index holds (read-model migration 11): every prefix of 1 to
12 characters of every word of the search text."""

def prefix_lexemes(word: str) -> tuple[list[str], bool]:
    """The prefix index's lexemes for a search word, and whether they find exactly its matches.

    A word of letters and digits of at most SEARCH_PREFIX_CHARS characters is one lexeme, exact.
    A longer word gives its first SEARCH_PREFIX_CHARS characters, and a word with `_` its parts
    (the text search parser splits on `_`, making the word a phrase), each a superset of the word's
    matches: the search vector's `word:*` then decides among them."""
    parts = [part[:SEARCH_PREFIX_CHARS] for part in word.split("_") if part]
    return parts, parts == [word]


_EVERY_PREFIX: Final = f"""unnest(tsvector_to_array(words)) AS word,
            generate_series(1, least(length(word), {SEARCH_PREFIX_CHARS})) AS n"""
"""The rows of the prefixes of a search vector's lexemes (`left(word, n)`): one definition for
both prefix indexes."""

SEARCH_PREFIXES_SQL: Final = f"""
CREATE OR REPLACE FUNCTION activities_search_prefixes(words tsvector) RETURNS tsvector
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE COST 1000 AS $prefixes$
    SELECT array_to_tsvector(ARRAY(
        SELECT left(word, n)
        FROM {_EVERY_PREFIX}
    ))
$prefixes$
"""
"""Every prefix (1 to SEARCH_PREFIX_CHARS characters) of every lexeme of a search vector, the
lexemes of the prefix index: `pric` is then one exact lexeme of every text with `pricing`, where
`pric:*` on the search vector unions the postings of every word it begins and rechecks each row.
It takes about 30 µs a row (60,000 rows in 1.8 s), so it must never be evaluated row by row: its COST (1000, 400 times
`@@` on the stored vector) makes the planner combine the prefix index with another filter's
index rather than check it on that index's rows, and build_list_sql keeps it out of sort-order
walks. A higher COST made the planner start parallel workers for every search (3-4 ms each)."""


SEARCH_MONTH_PREFIXES_SQL: Final = f"""
CREATE OR REPLACE FUNCTION activities_search_month_prefixes(words tsvector, at timestamptz) RETURNS tsvector
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE COST 1000 AS $prefixes$
    SELECT array_to_tsvector(ARRAY(
        SELECT month || left(word, n)
        FROM (SELECT to_char(at AT TIME ZONE 'UTC', 'YYYYMM/') AS month) AS tag,
            {_EVERY_PREFIX}
    ))
$prefixes$
"""
"""The lexemes of the month prefix index (read-model migration 13): the prefix index's lexemes,
each tagged with the month (UTC) of the row's `activity_date` (`202111/pric`). A two-word search
read in windows of `activity_date` then asks each window for its months' lexemes
(search_conditions): their posting lists hold those months' rows only, where the prefix index's
hold every row of all time, intersected for each window (two thirds of a two-word search's
time on 1,000,000 activities). Rows without an `activity_date` have no lexemes (STRICT)."""

SEARCH_MONTH_FORMAT: Final = "%Y%m/"
"""A month's tag in Python (`month_tags`), as `to_char(..., 'YYYYMM/')` writes it."""

MONTH_WINDOW_MAX_MONTHS: Final = 6
"""A window of more months (wider than MONTH_WINDOW_MAX_WIDTH) is read by the prefix index and its
span of the date index: each month is one more branch of the month index's query, whose check
grows with their number (a read of 24 months took 75 ms where the prefix index took 10-15,
measured 2026-12-07)."""


MONTH_INDEX_SORT: Final = "activity_date"
"""The sort whose windows the month prefix index serves: its months are those of this field."""


def month_tags(near: datetime, far: datetime) -> tuple[str, ...]:
    """The tags of the months (UTC) from the earlier to the later of two instants, both included."""
    low, high = sorted((near.astimezone(UTC), far.astimezone(UTC)))
    tags: list[str] = []
    year, month = low.year, low.month
    while (year, month) <= (high.year, high.month):
        tags.append(datetime(year, month, 1).strftime(SEARCH_MONTH_FORMAT))
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    return tuple(tags)


def next_month_start(at: datetime) -> datetime:
    """The first instant (UTC) of the month after `at`'s."""
    at = at.astimezone(UTC)
    return datetime(at.year + 1, 1, 1, tzinfo=UTC) if at.month == 12 else datetime(at.year, at.month + 1, 1, tzinfo=UTC)


def month_start(at: datetime) -> datetime:
    """The first instant (UTC) of `at`'s month."""
    at = at.astimezone(UTC)
    return datetime(at.year, at.month, 1, tzinfo=UTC)


def searches_by_prefix_index(words: Sequence[str]) -> bool:
    """Whether the prefix index could serve a search of these words (one of them at least)."""
    return any(prefix_lexemes(word)[0] for word in words)


def searches_by_month_index(query: ListQuery) -> bool:
    """Whether the month prefix index could serve the windows of this list: `q` that the prefix
    index serves, sorted by MONTH_INDEX_SORT."""
    words = query.filters.get("q")
    return bool(words and searches_by_prefix_index(words)) and query.sort.field == MONTH_INDEX_SORT


MATCHES_FIRST_ROWS: Final = 8000
"""Up to this many expected matches, a page of a filter that an index finds exactly (`q`,
`participant`, `tag`) is chosen among its matches, found in that index, whatever the planner's
choice, rather than by a walk in sort order that checks 51 / (matches / rows) rows (0.7 µs a
row, which the planner underrates with the heap in memory). From WINDOWS_MIN_MATCHES on it reads
them in windows (sort_windows), and that beats the walk up to about 10,000 matches of 1,000,000
(measured alone, walk against windows: 4,727 matches 8.6 against 3.9 ms, 9,195 3.8 against 3.3,
19,152 2.3 against 6.2). Below, sorting all the matches costs at most about 3 ms (1.6 µs each)."""

MATCHES_FIRST_INDEX_ONLY_ROWS: Final = 1500
"""Up to this many matches an index-only walk (read-model migration 12, for `participant`) is
replaced too: it checks a row in 0.16 µs, so the matches first win only for fewer of them
(1,100 matches: 7 ms walked, 2 ms sorted)."""

MATCHES_FIRST_FILTERS: Final = ("q", "participant", "tag")
"""The filters whose GIN index finds their matches exactly (`search` and the prefix index,
`participant_ids`, `tags`)."""
_MATCH_CONDITIONS: Final = ("search @@", "participant_ids @>", "tags @>")


WINDOW_PAGES: Final = 1.5
"""A list read in windows (ListPlan.windows) makes its first window wide enough to hold this many
pages of matches, were they spread evenly over the scope's sort values."""

WINDOW_GROWTH: Final = 4
"""Each further window is this many times as wide as the one before (in share of the span)."""

WINDOW_MAX_SHARE: Final = 0.1
"""No window (but the open last one) spans more than this share of the scope's sort values: a
window costs a bitmap of the sort index's entries in its span (about 0.06 µs each, measured), and
the planner, which rates an index entry far cheaper against a heap page than it is with the
heap in memory, would combine the GIN index with a wide span too."""

WINDOWS_MIN_MATCHES: Final = 2000
"""Fewer expected matches are read in one go: their heap pages (1.6 µs each alone) cost about what
the bitmap of a first window would (on 1,000,000 activities, 2,000 matches: a window of 5%)."""

MONTH_WINDOWS_MIN_MATCHES: Final = 300
"""With the month prefix index, a window costs no span of the sort index: from this many expected
matches a list is read in windows, if its first window fits MONTH_WINDOW_MAX_WIDTH (on 1,000,000
activities over two years, from about 470)."""

MONTH_WINDOW_MAX_WIDTH: Final = timedelta(days=120)
"""The widest window the month prefix index serves alone (sort_windows): 120 days touch at most
5 months (MONTH_WINDOW_MAX_MONTHS)."""


@dataclass(frozen=True)
class ListPlan:
    """How a page is read. `matches_first`: every match is selected apart (its GIN index finds
    them), then sorted, instead of a walk of a sort index that checks each row; `prefix_index`
    (with `matches_first` only): `q` by the prefix index (search_conditions); `windows` (with
    `matches_first` only): how far from the page's start (`window_start`, the scope's first sort
    value, or the value of the keyset the page follows) each window of the sort value ends, the
    windows read one after the other until the page is full (sort_windows); `month_index` (with
    `prefix_index`, sorted by `activity_date`): `q` of windows of few months by the month prefix
    index (_windows)."""

    matches_first: bool = False
    prefix_index: bool = False
    windows: tuple[timedelta, ...] = ()
    window_start: datetime | None = None
    month_index: bool = False


def expected_matches(plan: Any) -> float | None:
    """The rows the planner expects a page's statement to choose among (EXPLAIN (FORMAT JSON)):
    those under its first Limit."""
    nodes = list(plan) if isinstance(plan, list) else [plan]
    while nodes:
        node = nodes.pop(0)
        if not isinstance(node, dict):
            continue
        if node.get("Node Type") == "Limit" and node.get("Plans"):
            rows = node["Plans"][0].get("Plan Rows")
            return float(rows) if isinstance(rows, int | float) else None
        nodes += [node.get("Plan"), *node.get("Plans", [])]
    return None


def reads_in_windows(expected: float | None, month_index: bool = False) -> bool:
    """Whether a list read matches first, expecting that many matches, is read in windows
    (`month_index`: windows of few months may read the month prefix index)."""
    return expected is not None and expected >= (MONTH_WINDOWS_MIN_MATCHES if month_index else WINDOWS_MIN_MATCHES)


def build_sort_span_sql(table: str, sort: Sort, caller: Caller) -> tuple[sql.Composed, list[Any]]:
    """The first and last sort values of the caller's scope, in sort order (`first`, `last`):
    each one probe of the sort's index."""
    where, params = _scope(caller)
    first, last = ("max", "min") if sort.descending else ("min", "max")
    column = sql.Identifier(sort.field)
    statement = sql.SQL("SELECT {}({}) AS first, {}({}) AS last FROM {} WHERE {}").format(
        sql.SQL(first), column, sql.SQL(last), column, table_identifier(table), sql.SQL(" AND ").join(where)
    )
    return statement, params


def sort_windows(
    first: datetime | None, last: datetime | None, expected: float | None, rows: int, month_index: bool = False
) -> tuple[timedelta, ...]:
    """How far from a page's start each of its windows ends (ListPlan.windows), for a page of
    `rows` among `expected` matches whose sort values lie between `first` and `last`.

    A page of a few thousand matches sorted by a time costs one heap page per match (1.6 µs, and
    5-6 µs under load) only to learn its sort value. Read in windows, the first window's matches
    (its span of the sort index combined with the GIN index in one bitmap) are fetched and sorted
    first, and the next windows are read only if it holds fewer than a page. The first window is
    sized for WINDOW_PAGES pages of evenly spread matches, each next one is WINDOW_GROWTH times
    wider up to WINDOW_MAX_SHARE of the span, and the last is the rest, read as without windows.
    Wrong guesses cost time, never rows: the windows cover every value.

    With `month_index` (the month prefix index serves `q`'s windows of few months, which cost no
    span of the sort index), lists are read in windows from MONTH_WINDOWS_MIN_MATCHES expected
    matches, and a window may be as wide as MONTH_WINDOW_MAX_WIDTH."""
    if not reads_in_windows(expected, month_index) or expected is None or first is None or last is None:
        return ()
    span = abs(last - first)
    widest = WINDOW_MAX_SHARE
    if month_index and span:  # up to MONTH_WINDOW_MAX_WIDTH, never past the span (the rest holds that)
        widest = min(max(WINDOW_MAX_SHARE, MONTH_WINDOW_MAX_WIDTH / span), 1.0)
    share = WINDOW_PAGES * rows / expected
    ends: list[timedelta] = []
    while share <= widest:
        ends.append(span * share)
        share *= WINDOW_GROWTH
    return tuple(ends)


def plan_prefers_matches_first(plan: Any, max_rows: int = MATCHES_FIRST_ROWS) -> bool:
    """Whether a page planned as usual (EXPLAIN (FORMAT JSON)) is better read matches first: the
    planner would find the matches in the search index (it expects few, and the prefix index finds
    them exactly, without the union of every word a prefix begins and the recheck of each row), or
    it would walk a sort index checking a GIN-indexed condition on each row though it expects at
    most `max_rows` matches in all."""
    nodes = list(plan) if isinstance(plan, list) else [plan]
    while nodes:
        node = nodes.pop()
        if not isinstance(node, dict):
            continue
        if node.get("Node Type") == "Bitmap Index Scan" and "search @@" in str(node.get("Index Cond", "")):
            return True
        checks = str(node.get("Filter", ""))
        expected = node.get("Plan Rows", max_rows + 1)
        # an index-only walk reads no heap page: 0.16 µs a row checked, against a heap walk's 0.7
        bound = min(max_rows, MATCHES_FIRST_INDEX_ONLY_ROWS) if node.get("Node Type") == "Index Only Scan" else max_rows
        if any(condition in checks for condition in _MATCH_CONDITIONS) and expected <= bound:
            return True
        nodes += [node.get("Plan"), *node.get("Plans", [])]
    return False


@dataclass(frozen=True)
class PlannedList:
    """What the service keeps of a list's plan (services/queries.py, ListPlans): whether it is read
    matches first (plan_prefers_matches_first), and for its windows (sort_windows) the matches the
    planner expects and the scope's first and last sort values (build_sort_span_sql)."""

    matches_first: bool
    expected: float | None = None
    first: datetime | None = None
    last: datetime | None = None

    @classmethod
    def from_plan(cls, plan: Any) -> PlannedList:
        """From the EXPLAIN (FORMAT JSON) of the list's usual statement (None: no plan)."""
        if plan is None or not plan_prefers_matches_first(plan):
            return cls(False)
        return cls(True, expected_matches(plan))

    def needs_span(self, month_index: bool = False) -> bool:
        """Whether the windows need the scope's first and last sort values (`month_index`: the
        month prefix index may serve them)."""
        return self.matches_first and reads_in_windows(self.expected, month_index)

    def with_span(self, first: datetime | None, last: datetime | None) -> PlannedList:
        return PlannedList(self.matches_first, self.expected, first, last)

    def plan(self, rows: int, prefix_index: bool, month_index: bool = False) -> ListPlan:
        """How a page of `rows` rows is read (`prefix_index`: `q` may read the prefix index;
        `month_index`: its windows may read the month prefix index)."""
        if not self.matches_first:
            return ListPlan()
        month_index = prefix_index and month_index
        windows = sort_windows(self.first, self.last, self.expected, rows, month_index)
        return ListPlan(True, prefix_index, windows, self.first, month_index)


MONTH_PREFIXES_MATCH: Final = sql.SQL(
    "activities_search_month_prefixes(search, activity_date) @@ "
    "(SELECT string_agg('(' || tagged || ')', ' | ')::tsquery "
    "FROM (SELECT string_agg(quote_literal(month || lexeme), ' & ') AS tagged "
    "FROM unnest(%s::text[]) AS month, unnest(tsvector_to_array(to_tsvector('simple', %s))) AS lexeme "
    "GROUP BY month) AS months)"
)
"""The month prefix index's condition for some months (a text array of month_tags) and lexemes
(separated by spaces): `('202111/a' & '202111/b') | ('202110/a' & '202110/b')`, composed in SQL
so that the lexemes are normalised by the same parser and dictionary as the index's (`simple`)."""


def search_conditions(
    words: Sequence[str], prefix_index: bool, months: Sequence[str] = ()
) -> tuple[list[sql.Composable], list[Any]]:
    """The WHERE terms of `q`: `search @@ 'w1:* & w2:*'`, the search vector's own condition, which
    the planner can also check row by row while walking a sort index (a common word: 51 matches
    are met soon); or, with `prefix_index`, the prefix index's lexemes of every word, and that
    condition only for the words the lexemes do not find exactly (prefix_lexemes). With `months`
    (month_tags, and `prefix_index`), the lexemes are asked of the month prefix index for those
    months only: rows of other months (or without an `activity_date`) do not match."""
    if not prefix_index:
        return [sql.SQL("search @@ to_tsquery('simple', %s)")], [search_query(words)]
    lexemes: dict[str, None] = {}
    inexact: list[str] = []
    for word in words:
        found, exact = prefix_lexemes(word)
        lexemes.update(dict.fromkeys(found))
        if not exact:
            inexact.append(word)
    terms: list[sql.Composable] = []
    params: list[Any] = []
    if lexemes:
        # The query is a subquery's value, unknown when the statement is planned: the planner then
        # takes the whole condition for 0.5% of the rows, as for one word. With the words known, and
        # no statistics for the index's expression, it multiplies 0.5% per word and expects 25
        # rows of 1,000,000 for two common words that share 3,800: it then reads every match
        # rather than combine the index with a window's span of the sort index (two words'
        # class p99 34.4 against 30.2 ms with this, 2026-12-07).
        if months:
            terms.append(MONTH_PREFIXES_MATCH)
            params += [list(months), " ".join(lexemes)]
        else:
            terms.append(sql.SQL("activities_search_prefixes(search) @@ (SELECT to_tsquery('simple', %s))"))
            params.append(" & ".join(lexemes))
    if inexact:
        # With lexemes, a filter of the rows they find (`IS TRUE` is no index condition): for a long
        # word, the search index would union the postings of every word its prefix begins (9 ms
        # for `representation:*` on 1,000,000 rows) to cut 573 rows the prefix index found.
        condition = "(search @@ to_tsquery('simple', %s)) IS TRUE" if lexemes else "search @@ to_tsquery('simple', %s)"
        terms.append(sql.SQL(condition))
        params.append(search_query(inexact))
    return terms, params


def parse_filters(params: Params) -> tuple[dict[str, Any], bool]:
    """(the filters given, include_deleted): what a list and the stats select."""
    filters = {spec.name: parse_filter(spec, params) for spec in LIST_FILTERS}
    include_deleted = parse_bool("include_deleted", _single(params, "include_deleted"))
    return {name: value for name, value in filters.items() if value is not None}, include_deleted


def parse_list_query(params: Params) -> ListQuery:
    """Validated list parameters; an unknown, repeated or malformed parameter is a validation_error."""
    _check_names(params, LIST_PARAMETERS)
    filters, include_deleted = parse_filters(params)
    return ListQuery(
        filters=filters,
        include_deleted=include_deleted,
        sort=parse_sort(_single(params, "sort")),
        limit=_optional_int(params, "limit", 1, MAX_LIMIT) or DEFAULT_LIMIT,
        cursor=_text(params, "cursor"),
        min_position=_optional_int(params, "min_position", 0),
    )


def parse_stats_query(params: Params) -> StatsQuery:
    """Validated stats parameters: `group_by` (required), the list filters, `include_deleted` and
    `min_position`; a list's paging parameters, or any other name, are a validation_error."""
    for name in params:
        if name in PAGE_PARAMETERS and name not in STATS_QUERY_PARAMETERS:
            raise field_error(name, "is not a stats parameter (stats are neither sorted nor paged)")
    _check_names(params, STATS_QUERY_PARAMETERS)
    group_by = _single(params, "group_by")
    if group_by is None:
        raise field_error("group_by", f"is required: one of {', '.join(STATS_GROUPS)}")
    if group_by not in STATS_GROUPS:
        raise field_error("group_by", f"must be one of {', '.join(STATS_GROUPS)}")
    filters, include_deleted = parse_filters(params)
    return StatsQuery(
        group_by=group_by,
        filters=filters,
        include_deleted=include_deleted,
        min_position=_optional_int(params, "min_position", 0),
    )


def parse_get_query(params: Params) -> GetQuery:
    """Validated get parameters (`id`, `include_deleted`, `version`, `min_position`)."""
    _check_names(params, GET_PARAMS)
    activity_id = _single(params, "id")
    if not is_activity_id(activity_id):
        raise field_error("id", "must be an activity id: act_ followed by a 26-character ULID")
    return GetQuery(
        id=str(activity_id),
        include_deleted=parse_bool("include_deleted", _single(params, "include_deleted")),
        version=_optional_int(params, "version", 1),
        min_position=_optional_int(params, "min_position", 0),
    )


GET_BY_KEY_PARAMS: Final = frozenset({"external_key", "include_deleted", "min_position"})


@dataclass(frozen=True)
class GetByKeyQuery:
    """The activity an upsert created under a key, in the caller's tenant and app."""

    external_key: str
    include_deleted: bool = False
    min_position: int | None = None


def parse_get_by_key_query(params: Params) -> GetByKeyQuery:
    """Validated get-by-key parameters (`external_key`, `include_deleted`, `min_position`)."""
    _check_names(params, GET_BY_KEY_PARAMS)
    key = _single(params, "external_key")
    if not is_key_text(key):
        raise field_error("external_key", "must be 1-200 printable ASCII characters")
    return GetByKeyQuery(
        external_key=key,
        include_deleted=parse_bool("include_deleted", _single(params, "include_deleted")),
        min_position=_optional_int(params, "min_position", 0),
    )


def build_get_by_key_sql(table: str, external_key: str, caller: Caller) -> tuple[sql.Composed, list[Any]]:
    """The current document of the activity keyed `external_key` in the caller's scope: a key is
    unique per tenant and app (the app of the upsert's token, none for a token without one), so a
    caller without an app finds the keys of activities without an app."""
    where, params = _scope(caller)
    if caller.app_id is None:
        where.append(sql.SQL("app_id IS NULL"))
    statement = sql.SQL(
        "SELECT {document} AS document FROM {table} WHERE external_key = %s AND {where} LIMIT 1"
    ).format(
        document=UPCAST_DOCUMENT,
        table=table_identifier(table),
        where=sql.SQL(" AND ").join(where),
    )
    return statement, [external_key, *params]


# ---------------------------------------------------------------------------------------------
# Cursors
# ---------------------------------------------------------------------------------------------


CURSOR_KEY_NAME: Final = "list-cursor"
"""The name of the cursors' signing key among the database's shared secrets (projections.database)."""


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class CursorCodec:
    """Opaque, signed keyset cursors: base64 of JSON plus an HMAC over it and what it is bound to.

    The binding (tenant, app, filters, sort) is not stored in the cursor; it is part of the
    signed message, so a cursor replayed by another tenant or app, or with other filters, or
    edited in any way, fails the signature check and is a validation_error.
    """

    def __init__(self, key: bytes) -> None:
        self._key = key

    def _signature(self, payload: bytes, query: ListQuery, caller: Caller) -> bytes:
        binding = orjson.dumps([caller.tenant_id, caller.app_id, query.binding()], option=orjson.OPT_SORT_KEYS)
        return hmac.new(self._key, binding + b"\n" + payload, hashlib.sha256).digest()[:18]

    def encode(self, keyset: Keyset, query: ListQuery, caller: Caller) -> str:
        payload = orjson.dumps({"v": 1, "k": [keyset.value, keyset.id]})
        return _b64encode(payload) + "." + _b64encode(self._signature(payload, query, caller))

    def decode(self, cursor: str, query: ListQuery, caller: Caller) -> Keyset:
        invalid = field_error("cursor", "is not a cursor of this list; start again without it")
        try:
            encoded_payload, encoded_signature = cursor.split(".")
            payload = _b64decode(encoded_payload)
            signature = _b64decode(encoded_signature)
        except (ValueError, binascii.Error):
            raise invalid from None
        if not hmac.compare_digest(signature, self._signature(payload, query, caller)):
            raise invalid
        try:
            data = orjson.loads(payload)
            value, last_id = data["k"]
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            raise invalid from None
        if not isinstance(last_id, str) or not (value is None or isinstance(value, str)):
            raise invalid
        return Keyset(value, last_id)


    def sign(self, position: Any, binding: Any, caller: Caller) -> str:
        """A cursor holding `position` (JSON), bound to `binding` and the caller, for pages other
        than the list's (the occurrences query binds its window and filters)."""
        payload = orjson.dumps({"v": 1, "p": position})
        return _b64encode(payload) + "." + _b64encode(self._bound_signature(payload, binding, caller))

    def verify(self, cursor: str, binding: Any, caller: Caller) -> Any:
        """The position of a cursor made by `sign` with the same binding and caller, else a
        validation_error naming `cursor`."""
        invalid = field_error("cursor", "is not a cursor of this query; start again without it")
        try:
            encoded_payload, encoded_signature = cursor.split(".")
            payload = _b64decode(encoded_payload)
            signature = _b64decode(encoded_signature)
        except (ValueError, binascii.Error):
            raise invalid from None
        if not hmac.compare_digest(signature, self._bound_signature(payload, binding, caller)):
            raise invalid
        try:
            return orjson.loads(payload)["p"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            raise invalid from None

    def _bound_signature(self, payload: bytes, binding: Any, caller: Caller) -> bytes:
        message = orjson.dumps([caller.tenant_id, caller.app_id, binding], option=orjson.OPT_SORT_KEYS)
        return hmac.new(self._key, message + b"\n" + payload, hashlib.sha256).digest()[:18]


def keyset_of(row: Mapping[str, Any], sort: Sort) -> Keyset:
    """The keyset of a result row (its sort value as an ISO string)."""
    value = row["sort_value"]
    if isinstance(value, datetime):
        value = value.isoformat()
    return Keyset(value, row["id"])


# ---------------------------------------------------------------------------------------------
# SQL
# ---------------------------------------------------------------------------------------------


def table_identifier(name: str) -> sql.Identifier:
    """A read-model table name, checked (it is also used to derive index names)."""
    if not _IDENTIFIER.match(name):
        raise ValueError(f"not a plain table name: {name!r}")
    return sql.Identifier(name)


SCOPED_VIEW_SUFFIXES: Final = ("_of_tenant", "_of_app")
"""The caller-scoped views of a read-model table: a caller without an app sees its tenant's rows,
one with an app only that app's (docs/contract.md section 2)."""


def scoped_view(table: str, caller: Caller) -> str:
    """The view a read-model query of this caller reads through (scoped_views_sql)."""
    return table + SCOPED_VIEW_SUFFIXES[caller.app_id is not None]


def scoped_views(table: str) -> tuple[str, ...]:
    return tuple(table + suffix for suffix in SCOPED_VIEW_SUFFIXES)


def scoped_views_sql(table: str) -> list[sql.Composed]:
    """The caller-scoped views of a read-model table: only the rows of the tenant (and app) that the
    query transaction set in `activities.tenant_id` / `activities.app_id`, none when it set nothing.

    Plain views, not row-level security, are the second wall behind every query's own tenant filter:
    PostgreSQL evaluates a table's policy before any condition that is not leakproof, so under a
    policy the full-text (`@@`) and array (`@>`) conditions could not use their GIN indexes and
    scanned the tenant (a participant filter on 1,000,000 rows: 1.2 s against 2.5 ms). A view's
    conditions are merged into each query's instead. Two views, each one equality per scope, rather
    than one view with `app unset OR app matches`: the planner estimates an equality with a setting
    from the table's statistics, but that OR at a fixed 0.5%, which made it sort every match of a
    common word instead of walking the date index (1.1 s against 28 ms)."""
    tenant = sql.SQL("tenant_id = current_setting('activities.tenant_id', true)")
    app = sql.SQL("app_id = current_setting('activities.app_id', true)")
    of_tenant, of_app = scoped_views(table)
    return [
        sql.SQL("CREATE OR REPLACE VIEW {} AS SELECT * FROM {} WHERE {}").format(
            table_identifier(view), table_identifier(table), condition
        )
        for view, condition in ((of_tenant, tenant), (of_app, sql.SQL(" AND ").join([tenant, app])))
    ]


def _scope(caller: Caller) -> tuple[list[sql.Composable], list[Any]]:
    """The tenant / app rule of docs/contract.md section 2, on every read."""
    where: list[sql.Composable] = [sql.SQL("tenant_id = %s")]
    params: list[Any] = [caller.tenant_id]
    if caller.app_id is not None:
        where.append(sql.SQL("app_id = %s"))
        params.append(caller.app_id)
    return where, params


def _order(sort: Sort, column: sql.Composable | None = None) -> sql.Composable:
    """ORDER BY terms of a sort, on its column or on `column` (the column as a subquery names it)."""
    column = column or sql.Identifier(sort.field)
    if sort.descending:
        return sql.SQL("{} DESC NULLS LAST, id DESC").format(column)
    # NOT NULL columns: ASC NULLS FIRST is the same order and is the backward scan of the DESC index.
    nulls = sql.SQL("NULLS FIRST" if sort.field in NOT_NULL_SORT_FIELDS else "NULLS LAST")
    return sql.SQL("{} ASC {}, id ASC").format(column, nulls)


def _after(sort: Sort, keyset: Keyset) -> list[tuple[sql.Composable, list[Any]]]:
    """Rows strictly after the keyset in the sort order (NULL sort values last in both directions),
    as alternatives that are each one range of the sort's index.

    After a row with a sort value, the rows after it are those further on among the values, then
    every row without one. Written as one condition with `OR ... IS NULL`, PostgreSQL could not
    bound the index scan and filtered every row before the keyset: a page 500,000 rows deep in a
    tenant of 1,000,000 took 313 ms, against 0.14 ms as two ranges (measured, 2026-12-02)."""
    column = sql.Identifier(sort.field)
    op = sql.SQL("<" if sort.descending else ">")
    if keyset.value is None:
        return [(sql.SQL("({} IS NULL AND id {} %s)").format(column, op), [keyset.id])]
    after_value = sql.SQL("(({}, id) {} (%s::timestamptz, %s))").format(column, op), [keyset.value, keyset.id]
    if sort.field in NOT_NULL_SORT_FIELDS:
        return [after_value]
    return [after_value, (sql.SQL("({} IS NULL)").format(column), [])]


FilterSql = Callable[[Any], tuple[sql.Composable, list[Any]]]

OVERDUE_SQL: Final = "(due_date < now() AND completed_at IS NULL)"
"""Overdue (contract section 5): due_date in the past (the query's transaction time) and not completed."""
NOT_OVERDUE_SQL: Final = "(due_date IS NULL OR due_date >= now() OR completed_at IS NOT NULL)"


def _equals(column: str) -> FilterSql:
    return lambda value: (sql.SQL("{} = %s").format(sql.Identifier(column)), [value])


def _compare(column: str, operator: str) -> FilterSql:
    return lambda value: (sql.SQL("{} {} %s").format(sql.Identifier(column), sql.SQL(operator)), [value])


FILTER_SQL: Final[dict[str, FilterSql]] = {
    "account_id": _equals("account_id"),
    "deal_id": _equals("deal_id"),
    "contact_id": lambda value: (sql.SQL("(contact_id = %s OR contact_ids @> ARRAY[%s]::text[])"), [value, value]),
    "owner_id": _equals("owner_id"),
    "type": lambda values: (sql.SQL("type = ANY(%s::text[])"), [list(values)]),
    "status": _equals("status"),
    "tag": lambda values: (sql.SQL("tags @> %s::text[]"), [list(values)]),
    "activity_date_from": _compare("activity_date", ">="),
    "activity_date_to": _compare("activity_date", "<="),
    "updated_since": _compare("updated_at", ">="),
    "external_key": _equals("external_key"),
    "q": lambda words: _conjunction(*search_conditions(words, prefix_index=False)),
    "priority": _equals("priority"),
    "direction": _equals("direction"),
    "outcome": _equals("outcome"),
    "source": _equals("source"),
    "performed_by_user_id": _equals("performed_by_user_id"),
    "participant": lambda value: (sql.SQL("participant_ids @> ARRAY[%s]::text[]"), [value]),
    "due_date_from": _compare("due_date", ">="),
    "due_date_to": _compare("due_date", "<="),
    # completed_at: read-model migration 6; the partial indexes there serve overdue=true and completed=true
    "overdue": lambda value: (sql.SQL(OVERDUE_SQL if value else NOT_OVERDUE_SQL), []),
    "completed": lambda value: (sql.SQL("completed_at IS NOT NULL" if value else "completed_at IS NULL"), []),
}
"""The WHERE term of each filter of activities_client/filters.py (each served by an index of schema.sql);
tests/unit/test_queries.py checks that every filter has one."""


def _conjunction(terms: list[sql.Composable], params: list[Any]) -> tuple[sql.Composable, list[Any]]:
    return sql.SQL("({})").format(sql.SQL(" AND ").join(terms)), params


def list_filters(
    query: ListQuery, prefix_index: bool = False, months: Sequence[str] = ()
) -> tuple[list[sql.Composable], list[Any]]:
    """The WHERE terms of the list filters (without scope and keyset); `q` by the prefix index
    with `prefix_index`, and by the month prefix index for `months` (search_conditions)."""
    where: list[sql.Composable] = []
    params: list[Any] = []
    for spec in LIST_FILTERS:
        value = query.filters.get(spec.name)
        if value is not None:
            if spec.name == "q":
                condition, values = _conjunction(*search_conditions(value, prefix_index, months))
            else:
                condition, values = FILTER_SQL[spec.name](value)
            where.append(condition)
            params += values
    if not query.include_deleted:
        where.append(sql.SQL("NOT is_deleted"))
    where.append(sql.SQL("NOT is_erased"))  # an erased activity's skeleton is never listed nor counted
    return where, params


@dataclass(frozen=True)
class Window:
    """One window of a page read in windows: its condition on the sort value, and with the month
    prefix index the months (month_tags) whose lexemes `q` asks for instead of the prefix index's."""

    condition: sql.Composable
    params: list[Any]
    months: tuple[str, ...] = ()


def _windows(sort: Sort, plan: ListPlan, keyset: Keyset | None) -> list[Window]:
    """The windows of a page (ListPlan.windows), in sort order: up to the first edge, between
    each two, and the rest, rows without a value included. The edges are counted from the
    keyset's value, or for a first page from the scope's first value (a row written since is
    before it: the first window is open on that side). The rest is written so that no index can
    serve it (`IS NOT TRUE`), as its span is wide: it is read as a list without windows is.
    After a row without a value only such rows are left: no windows.

    With `plan.month_index` a window of at most MONTH_WINDOW_MAX_MONTHS months finds `q`'s
    matches in the month prefix index for its months, its condition written so that no index
    serves it (`IS TRUE`: the months already bound the rows the index finds). A first page's
    open side is then a window of its own before the first: the rows beyond the month of the
    scope's first value, found through the sort's index (normally none)."""
    if keyset is not None and keyset.value is None:
        return []
    start = parse_datetime(keyset.value) if keyset is not None else plan.window_start
    if start is None or not plan.windows:
        return []
    edges = [start - end if sort.descending else start + end for end in plan.windows]
    column = sql.Identifier(sort.field)
    before = sql.SQL(">" if sort.descending else "<")
    windows: list[Window] = []
    previous: datetime | None = None
    for edge in edges:
        months = month_tags(previous or start, edge) if plan.month_index and sort.field == MONTH_INDEX_SORT else ()
        months = months if len(months) <= MONTH_WINDOW_MAX_MONTHS else ()
        if previous is None:
            condition, params = sql.SQL("{} {} %s").format(column, before), [edge]
        else:
            condition = sql.SQL("{} {} %s AND NOT {} {} %s").format(column, before, column, before)
            params = [edge, previous]
        if months:
            if previous is None and keyset is None:
                beyond = next_month_start(start) if sort.descending else month_start(start)
                windows.append(Window(sql.SQL("{} {} %s").format(column, sql.SQL(">=" if sort.descending else "<")),
                                      [beyond]))
            condition = sql.SQL("({}) IS TRUE").format(condition)
        windows.append(Window(condition, params, months))
        previous = edge
    if previous is not None:
        windows.append(Window(sql.SQL("({} {} %s) IS NOT TRUE").format(column, before), [previous]))
    return windows


def build_list_sql(
    table: str, query: ListQuery, caller: Caller, after: Keyset | None = None, plan: ListPlan = ListPlan()
) -> tuple[sql.Composed, list[Any]]:
    """One page (limit + 1 rows, to know whether there is a next page) as (statement, params).

    Rows have `id`, `sort_value` and `document`, the document as JSON text: a page goes out as it
    is stored, without being parsed into Python objects and serialised again. The page's keys are
    chosen first and only its rows' documents are read and upcast (building the document text of
    every match before the sort and limit cost 85 ms for a common word in 1,000,000 rows, against
    17 ms keys first). After a keyset
    with a value on a nullable sort, the page is the union of two index ranges (the values
    further on, then the rows without one), each limited, then ordered and limited again.

    With `plan.matches_first` the matches are selected in a subquery of their own (`OFFSET 0`
    keeps the planner from merging it), then sorted: the planner cannot walk a sort index instead
    (and, with `plan.prefix_index`, compute the prefixes of each row it passes). With
    `plan.windows` the values are read window by window (sort_windows), each window's matches
    selected and sorted apart, the rows without a value last: the windows are the branches of a
    UNION ALL in sort order under one LIMIT, which reads them in order and stops once it has its
    rows (an Append runs its branches in order; readers plan without parallel workers, which
    could interleave them).
    """
    scope, scope_params = _scope(caller)
    prefix_index = plan.matches_first and plan.prefix_index

    def where(months: tuple[str, ...] = ()) -> tuple[list[sql.Composable], list[Any]]:
        filters, filter_params = list_filters(query, prefix_index, months)
        return [*scope, *filters], [*scope_params, *filter_params]

    rows = query.limit + 1
    # each range: its conditions, their parameters, and the months of `q` by the month prefix index
    ranges: list[tuple[list[sql.Composable], list[Any], tuple[str, ...]]] = [([], [], ())]
    if after is not None:
        ranges = [([condition], values, ()) for condition, values in _after(query.sort, after)]
    windows = _windows(query.sort, plan, after) if plan.matches_first else []
    windowed = bool(windows)
    if windowed:  # the first range (the values after the keyset) cut in windows
        (conditions, values, _), rest = ranges[0], ranges[1:]
        ranges = [
            ([*conditions, window.condition], [*values, *window.params], window.months) for window in windows
        ] + rest
    page = (
        "SELECT id, sort_value FROM (SELECT id, {sort} AS sort_value FROM {table} WHERE {where} OFFSET 0) AS matches "
        "ORDER BY {sorted} LIMIT %s"
        if plan.matches_first
        else "SELECT id, {sort} AS sort_value FROM {table} WHERE {where} ORDER BY {order} LIMIT %s"
    )
    # what every page (window or range) shares, composed once: psycopg's `format` parses its
    # template on every call, and a search read in windows has up to six pages
    shared = {
        "sort": sql.Identifier(query.sort.field),
        "table": table_identifier(table),
        "order": _order(query.sort),
        "sorted": _order(query.sort, sql.Identifier("sort_value")),
    }
    page_template = sql.SQL(page)
    wheres = {months: where(months) for _, _, months in ranges}
    pages = [
        page_template.format(where=sql.SQL(" AND ").join([*wheres[months][0], *conditions]), **shared)
        for conditions, _, months in ranges
    ]
    page_params = [[*wheres[months][1], *range_params, rows] for _, range_params, months in ranges]
    keys, key_params = pages[0], page_params[0]
    if len(pages) > 1:
        union = sql.SQL(" UNION ALL ").join(sql.Composed([sql.SQL("("), page, sql.SQL(")")]) for page in pages)
        keys = (
            sql.SQL("SELECT * FROM ({}) AS windows LIMIT %s").format(union)
            if windowed
            else sql.SQL("SELECT * FROM ({}) AS ranges ORDER BY {} LIMIT %s").format(union, shared["sorted"])
        )
        key_params = [value for page_values in page_params for value in page_values] + [rows]
    statement = sql.SQL(
        "SELECT id, page.sort_value, {document}::text AS document FROM ({keys}) AS page JOIN {table} USING (id) "
        "ORDER BY {order}"
    ).format(
        document=UPCAST_DOCUMENT,
        keys=keys,
        table=shared["table"],
        order=_order(query.sort, sql.SQL("page.sort_value")),
    )
    return statement, key_params


GROUP_BY_SQL: Final[dict[str, sql.Composable]] = {
    "type": sql.Identifier("type"),
    "status": sql.Identifier("status"),
    "owner_id": sql.Identifier("owner_id"),
    "priority": sql.Identifier("priority"),  # read-model migration 4
    "outcome": sql.Identifier("outcome"),  # read-model migration 4
}
"""What each `group_by` of activities_client/filters.py (STATS_GROUPS) counts by;
tests/unit/test_queries.py checks that every group has one."""


def build_stats_sql(
    table: str, query: StatsQuery, caller: Caller, prefix_index: bool = False
) -> tuple[sql.Composed, list[Any]]:
    """The counts of the caller's activities matching the filters, by `group_by`, as rows of `key`
    and `count`: largest count first, ties by key (bytewise, as any client sorts strings), NULL last.
    `prefix_index`: `q` by the prefix index, when it is there (a count reads every match anyway)."""
    where, params = _scope(caller)
    filters, filter_params = list_filters(query.list_query(), prefix_index)
    statement = sql.SQL(
        "SELECT {key} AS key, count(*) AS count FROM {table} WHERE {where} "
        'GROUP BY 1 ORDER BY count(*) DESC, ({key}) COLLATE "C" ASC NULLS LAST'
    ).format(
        key=GROUP_BY_SQL[query.group_by],
        table=table_identifier(table),
        where=sql.SQL(" AND ").join([*where, *filters]),
    )
    return statement, [*params, *filter_params]


def upcast_sql(document: sql.Composable) -> sql.Composable:
    """A stored document (a jsonb expression) in the current schema: `upcast_document` in SQL.

    Rows written from schema 1 documents (by release 1.0, or by a 1.0 projector still running
    during a rolling upgrade) are served in the current schema all the same."""
    defaults = orjson.dumps(SCHEMA_2_DEFAULTS).decode()
    current = orjson.dumps({"schema_version": SCHEMA_VERSION}).decode()
    return sql.SQL(
        "(CASE WHEN ({d}->>'schema_version')::int < {version} THEN {defaults}::jsonb || {d} || {current}::jsonb "
        "ELSE {d} END)"
    ).format(
        d=document, version=sql.Literal(SCHEMA_VERSION), defaults=sql.Literal(defaults), current=sql.Literal(current)
    )


UPCAST_DOCUMENT: Final = upcast_sql(sql.Identifier("document"))
"""The read model's `document` column in the current schema (composed once: every read needs it)."""


def build_get_sql(table: str, activity_id: str, caller: Caller) -> tuple[sql.Composed, list[Any]]:
    """The current document of one activity visible to the caller (no row: not found)."""
    where, params = _scope(caller)
    statement = sql.SQL("SELECT {document} AS document FROM {table} WHERE id = %s AND {where}").format(
        document=UPCAST_DOCUMENT,
        table=table_identifier(table),
        where=sql.SQL(" AND ").join(where),
    )
    return statement, [activity_id, *params]


def build_position_sql(tracking_table: str, application_name: str) -> tuple[sql.Composed, list[Any]]:
    """How far the read model has applied the log (no row: nothing yet, position 0)."""
    statement = sql.SQL("SELECT notification_id FROM {} WHERE application_name = %s").format(
        table_identifier(tracking_table)
    )
    return statement, [application_name]


def build_history_sql(events_table: str) -> sql.Composed:
    """An activity's stored events, oldest first, with their global positions."""
    return sql.SQL(
        "SELECT notification_id, originator_id, originator_version, topic, state FROM {} "
        "WHERE originator_id = %s ORDER BY originator_version"
    ).format(table_identifier(events_table))


# Columns of the read model, each computed from the document JSON `d` (one element of a JSON
# array of documents, expanded in SQL: one parameter, no per-row adaptation in Python).
_ROW_COLUMNS: Final = (
    ("id", "d->>'id'"),
    ("tenant_id", "d->>'tenant_id'"),
    ("app_id", "d->>'app_id'"),
    ("account_id", "d->>'account_id'"),
    ("deal_id", "d->>'deal_id'"),
    ("contact_id", "d->>'contact_id'"),
    ("contact_ids", "ARRAY(SELECT jsonb_array_elements_text(COALESCE(d->'contact_ids', '[]'::jsonb)))"),
    ("owner_id", "d->>'owner_id'"),
    ("type", "d->>'type'"),
    ("status", "d->>'status'"),
    ("tags", "ARRAY(SELECT jsonb_array_elements_text(COALESCE(d->'tags', '[]'::jsonb)))"),
    ("activity_date", "(d->>'activity_date')::timestamptz"),
    ("due_date", "(d->>'due_date')::timestamptz"),
    ("created_at", "(d->>'created_at')::timestamptz"),
    ("updated_at", "(d->>'updated_at')::timestamptz"),
    ("is_deleted", "(d->>'is_deleted')::boolean"),
    ("version", "(d->>'version')::integer"),
    ("position", "(p.value)::bigint"),
    ("document", "d"),
    ("is_erased", "COALESCE((d->>'is_erased')::boolean, false)"),  # migration 8
)
ROW_COLUMN_NAMES: Final = tuple(name for name, _ in _ROW_COLUMNS)


def _row_sql(table: str) -> tuple[sql.Composed, sql.Composed, sql.Composed]:
    """(column names, their expressions over a document `d` and position `p.value`, the updates
    of an upsert) of the read-model row, shared by the live upsert and the rebuild's load."""
    names = sql.SQL(", ").join(sql.Identifier(name) for name, _ in _ROW_COLUMNS)
    values = sql.SQL(", ").join(sql.SQL(expression) for _, expression in _ROW_COLUMNS)
    updates = sql.SQL(", ").join(
        sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(name)) for name, _ in _ROW_COLUMNS if name != "id"
    )
    return names, values, updates


def build_upsert_sql(table: str) -> sql.Composed:
    """Upsert many documents (param 1: JSON array of documents, param 2: JSON array of positions).

    A row is replaced only by a newer version, so applying an event twice, or an older one
    after a newer one, changes nothing.
    """
    names, values, updates = _row_sql(table)
    return sql.SQL(
        "INSERT INTO {table} ({names}) "
        "SELECT {values} FROM jsonb_array_elements(%s::jsonb) WITH ORDINALITY AS x(d, n) "
        "JOIN jsonb_array_elements(%s::jsonb) WITH ORDINALITY AS p(value, n) ON p.n = x.n "
        "ON CONFLICT (id) DO UPDATE SET {updates} WHERE {table}.version < EXCLUDED.version"
    ).format(table=table_identifier(table), names=names, values=values, updates=updates)


def build_apply_sql(table: str, tracking_table: str) -> sql.Composed:
    """Upsert many documents (as `build_upsert_sql`) and move the tracking position forward
    (params 3 and 4: application name, position), in ONE statement, so one transaction and one
    round trip. Returns a row when the position moved; none when another projector is already
    there (whose rows, guarded by version, are then as new as these)."""
    return sql.SQL(
        "WITH applied AS ({upsert}) "
        "INSERT INTO {tracking} AS t (application_name, notification_id) VALUES (%s, %s) "
        "ON CONFLICT (application_name) DO UPDATE SET notification_id = EXCLUDED.notification_id "
        "WHERE t.notification_id < EXCLUDED.notification_id RETURNING t.notification_id"
    ).format(upsert=build_upsert_sql(table), tracking=table_identifier(tracking_table))


def build_load_from_log_sql(table: str, events_table: str) -> sql.Composed:
    """Project a range of the log (params: after, up to, partitions, partition) straight from the
    stored events, in SQL, for the activities of one partition (by the last byte of their id).

    The same column expressions and version guard as `build_upsert_sql`, over each activity's
    latest event in the range, found on the narrow columns first so that only those states are
    parsed. For a rebuild from a plain-JSON log (no cipher) this skips decoding every event in
    Python. Every event carries the whole document after it (`state->'document'`).
    """
    ident = table_identifier(table)
    names, values, updates = _row_sql(table)
    return sql.SQL(
        "INSERT INTO {table} ({names}) "
        "SELECT {values} FROM (SELECT {upcast} AS d, raw.value FROM ("
        "  SELECT (convert_from(e.state, 'UTF8')::jsonb)->'document' AS d, to_jsonb(e.notification_id) AS value "
        "  FROM (SELECT DISTINCT ON (originator_id) notification_id FROM {events} "
        "        WHERE notification_id > %s AND notification_id <= %s "
        "          AND get_byte(uuid_send(originator_id), 15) %% %s = %s "  # a partition of the activities
        "        ORDER BY originator_id, originator_version DESC) AS latest "
        "  JOIN {events} AS e ON e.notification_id = latest.notification_id "
        "  OFFSET 0) AS raw OFFSET 0) AS p "  # OFFSET 0 keeps `d` computed once per row, not once per column
        "ON CONFLICT (id) DO UPDATE SET {updates} WHERE {table}.version < EXCLUDED.version"
    ).format(
        table=ident,
        names=names,
        values=values,
        updates=updates,
        events=table_identifier(events_table),
        upcast=upcast_sql(sql.SQL("raw.d")),
    )


def split_statements(template: str) -> list[str]:
    """The statements of a DDL template (`--` comment lines dropped), still naming `{table}`."""
    lines = [line for line in template.splitlines() if not line.lstrip().startswith("--")]
    return [statement.strip() for statement in "\n".join(lines).split(";") if statement.strip()]


def render_statement(statement: str, table: str) -> str:
    """A DDL statement for a table name: `{table}` and `{table}_suffix` become quoted identifiers."""
    table_identifier(table)

    def identifier(match: re.Match[str]) -> str:
        name = table + match.group(1)
        if not _IDENTIFIER.match(name):
            raise ValueError(f"derived identifier too long or invalid: {name!r}")
        return f'"{name}"'

    return re.sub(r"\{table\}(\w*)", identifier, statement)


def schema_statements(template: str, table: str) -> list[str]:
    """The DDL of a template (schema.sql) for a table name."""
    return [render_statement(statement, table) for statement in split_statements(template)]
