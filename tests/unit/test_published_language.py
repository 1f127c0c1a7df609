"""The published language is defined once: the API documents accept exactly what the service does.

Every activity-id pattern in the OpenAPI and AsyncAPI documents accepts the same strings as the
service's own check (`is_activity_id`), and the documents list exactly the registry's operations,
the contract's error codes, and the list filters.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any, cast, get_args

from hypothesis import given
from hypothesis import strategies as st
from ulid import ULID

from activities_client.document import EVENT_TYPES, is_activity_id
from activities_client.errors import ERRORS_BY_CODE
from activities_client.filters import LIST_FILTERS, PAGE_PARAMETERS
from events.activity import ActivityEvent
from events.commands import COMMANDS
from events.queries import QUERIES
from services.asyncapi import asyncapi_document
from services.gateway import CommandGateway
from services.http_app import BASE, create_http_app
from services.queries import QueryGateway

CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def openapi_document() -> dict[str, Any]:
    """The OpenAPI document as served (the routes only hold the gateways; none is called here)."""
    return create_http_app(cast(QueryGateway, None), cast(CommandGateway, None)).openapi()


def id_patterns(node: Any, key: str | None = None) -> Iterator[str]:
    """Every `pattern` given to something named `id` anywhere in a document."""
    if isinstance(node, dict):
        if key == "id" and isinstance(node.get("pattern"), str):
            yield node["pattern"]
        if node.get("name") == "id" and isinstance(node.get("schema"), dict) and "pattern" in node["schema"]:
            yield node["schema"]["pattern"]
        for name, value in node.items():
            yield from id_patterns(value, name)
    elif isinstance(node, list):
        for value in node:
            yield from id_patterns(value)


OPENAPI = openapi_document()
ASYNCAPI = asyncapi_document()
PATTERNS = sorted({*id_patterns(OPENAPI), *id_patterns(ASYNCAPI)})

near_ids = st.builds(
    lambda prefix, body: prefix + body,
    st.sampled_from(["act_", "act-", "ACT_", "", "act_ "]),
    st.text(alphabet=CROCKFORD + "ilou0189_-", min_size=24, max_size=28),
)
real_ids = st.builds(lambda: "act_" + str(ULID()))


def test_every_id_is_documented_with_a_pattern() -> None:
    # get, events (query routes); patch, delete, restore (command routes); the NATS bodies
    assert len(PATTERNS) >= 1
    documented_paths = [path for path in OPENAPI["paths"] if "{id}" in path]
    for path in documented_paths:
        for operation in OPENAPI["paths"][path].values():
            assert any(p["name"] == "id" and "pattern" in p["schema"] for p in operation["parameters"]), (path, operation)


@given(st.one_of(near_ids, real_ids, st.text(max_size=40)))
def test_the_documents_and_the_service_accept_the_same_ids(candidate: str) -> None:
    for pattern in PATTERNS:
        assert bool(re.search(pattern, candidate)) == is_activity_id(candidate), (pattern, candidate)


def test_an_id_past_the_ulid_range_is_refused_by_both() -> None:
    too_large = "act_8" + "0" * 25  # a ULID's first character is 0-7 (128 bits)
    assert not is_activity_id(too_large)
    assert all(not re.search(pattern, too_large) for pattern in PATTERNS)


def test_the_documents_list_the_registry_the_filters_and_the_error_codes() -> None:
    subjects = {address for address in ASYNCAPI["channels"]}
    assert {f"crm.activities.cmd.{name}" for name in COMMANDS} <= subjects
    assert {f"crm.activities.query.{name}" for name in QUERIES} <= subjects
    operations = {(method.upper(), path) for path, item in OPENAPI["paths"].items() for method in item}
    assert {("GET", BASE)} | {(spec.http.method, BASE + spec.http.path) for spec in COMMANDS.values()} <= operations
    listed = {p["name"] for p in OPENAPI["paths"][BASE]["get"]["parameters"]}
    assert listed == {spec.name for spec in LIST_FILTERS} | set(PAGE_PARAMETERS)
    codes = OPENAPI["components"]["schemas"]["ErrorBody"]["properties"]["code"]["enum"]
    assert set(codes) == set(ERRORS_BY_CODE)


def test_openapi_declares_bearer_auth() -> None:
    assert OPENAPI["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    assert OPENAPI["security"] == [{"bearerAuth": []}]


def test_the_stored_event_classes_are_the_published_event_types() -> None:
    assert {cls.__name__ for cls in get_args(ActivityEvent)} == {event.name for event in EVENT_TYPES}
    published = {channel["address"] for channel in ASYNCAPI["channels"].values() if ".events." in channel["address"]}
    assert published == {f"crm.activities.events.{{tenant_id}}.{event.kind}" for event in EVENT_TYPES}
