"""The list parameters, defined once: the filters, the sorts and the page limits of a list.

The query parser (projections/queries.py), the SQL of each filter (projections/queries.py,
`FILTER_SQL`, checked to cover every filter here), the NATS body model (`ListActivitiesBody`) and
the OpenAPI parameters of `GET /api/v1/crm/activities` all come from this table. Adding a filter
is one entry here, its SQL, and its column or index in the read model's schema.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal, get_args

from activities_client.document import ActivityKind

FilterKind = Literal["text", "datetime", "any_of", "all_of", "words", "boolean"]
"""How a filter's value is given: one string; one RFC 3339 date-time; a repeatable string that
matches when any value matches (`choices` limits the values); a repeatable string that matches
when every value matches; a text searched word by word (`q`); true or false."""


@dataclass(frozen=True)
class ListFilter:
    """One list filter: its wire name, the kind of its value and what it matches."""

    name: str
    kind: FilterKind
    description: str
    choices: tuple[str, ...] = ()

    @property
    def repeatable(self) -> bool:
        return self.kind in ("any_of", "all_of")


ACTIVITY_KINDS: Final[tuple[str, ...]] = get_args(ActivityKind)

LIST_FILTERS: Final = (
    ListFilter("account_id", "text", "only this account's activities"),
    ListFilter("deal_id", "text", "only this deal's activities"),
    ListFilter("contact_id", "text", "matches contact_id or an element of contact_ids"),
    ListFilter("owner_id", "text", "only this owner's activities"),
    ListFilter("type", "any_of", "call, email, meeting, note or task; repeatable (any of them)", ACTIVITY_KINDS),
    ListFilter("status", "text", "only activities with this status"),
    ListFilter("tag", "all_of", "repeatable; all must match"),
    ListFilter("activity_date_from", "datetime", "inclusive lower bound of activity_date (RFC 3339)"),
    ListFilter("activity_date_to", "datetime", "inclusive upper bound of activity_date (RFC 3339)"),
    ListFilter("updated_since", "datetime", "only activities updated at or after this time (RFC 3339)"),
    ListFilter("external_key", "text", "the activity an upsert created under this key"),
    ListFilter(
        "q",
        "words",
        "full-text search of subject, description and notes: every word must match, case-insensitively, "
        "a word also matching its longer forms (`pric` finds `pricing`)",
    ),
    ListFilter("priority", "text", "only activities with this priority"),
    ListFilter("direction", "text", "only activities with this direction"),
    ListFilter("outcome", "text", "only activities with this outcome"),
    ListFilter("source", "text", "only activities from this source"),
    ListFilter("performed_by_user_id", "text", "only activities performed by this user"),
    ListFilter("participant", "text", "matches the `id` of any participant"),
    ListFilter("due_date_from", "datetime", "inclusive lower bound of due_date (RFC 3339)"),
    ListFilter("due_date_to", "datetime", "inclusive upper bound of due_date (RFC 3339)"),
    ListFilter(
        "overdue",
        "boolean",
        "true: due_date in the past and not completed (completed_at unset); false: every other activity",
    ),
    ListFilter("completed", "boolean", "true: completed (completed_at set); false: not completed"),
)
FILTERS_BY_NAME: Final = {spec.name: spec for spec in LIST_FILTERS}

SORT_FIELDS: Final = ("activity_date", "created_at", "updated_at", "due_date")
DEFAULT_SORT: Final = "-activity_date"
DEFAULT_LIMIT: Final = 50
MAX_LIMIT: Final = 200

PAGE_PARAMETERS: Final = {
    "include_deleted": "true to include deleted activities",
    "sort": f"{', '.join(SORT_FIELDS)}; - for descending (default {DEFAULT_SORT})",
    "limit": f"1-{MAX_LIMIT}, default {DEFAULT_LIMIT}",
    "cursor": "next_cursor of the previous page",
    "min_position": "wait until the read model has this position (read your writes)",
}
"""The list parameters that are not filters: what to include, the order, the page."""

LIST_PARAMETERS: Final = frozenset([*FILTERS_BY_NAME, *PAGE_PARAMETERS])

MAX_SEARCH_WORDS: Final = 16
SEARCH_WORD: Final = r"\w+"
"""A word of a search (`q`) and of the searched text: letters, digits and `_`, in any script."""

STATS_GROUPS: Final = ("type", "status", "owner_id", "priority", "outcome")
"""What a stats query counts by (`group_by`): the parser, the NATS body, the OpenAPI parameter and
the SQL (`GROUP_BY_SQL` in projections/queries.py, checked to cover every group) follow."""

STATS_PARAMETERS: Final = {
    "group_by": f"required: count by one of {', '.join(STATS_GROUPS)}",
    "include_deleted": PAGE_PARAMETERS["include_deleted"],
    "min_position": PAGE_PARAMETERS["min_position"],
}
"""The stats parameters that are not filters (every list filter is also a stats filter); a list's
`sort`, `limit` and `cursor` are not stats parameters."""

STATS_QUERY_PARAMETERS: Final = frozenset([*FILTERS_BY_NAME, *STATS_PARAMETERS])

MAX_OCCURRENCE_WINDOW_DAYS: Final = 366
OCCURRENCES_PARAMETERS: Final = {
    "from": "required: the window's start, an RFC 3339 date-time with a zone (inclusive)",
    "to": f"required: the window's end (inclusive), at most {MAX_OCCURRENCE_WINDOW_DAYS} days after `from`",
    "include_deleted": "only false: occurrences are those of live activities",
    "limit": PAGE_PARAMETERS["limit"],
    "cursor": PAGE_PARAMETERS["cursor"],
    "min_position": PAGE_PARAMETERS["min_position"],
}
"""The occurrences parameters that are not filters (every list filter is also an occurrences
filter): the window and the page; occurrences are in time order, so `sort` is not one."""

OCCURRENCES_QUERY_PARAMETERS: Final = frozenset([*FILTERS_BY_NAME, *OCCURRENCES_PARAMETERS])
