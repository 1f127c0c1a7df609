"""FastAPI adapters: the query endpoint and the HTTP write gateway (docs/contract.md section 5).

Routes are thin: they collect the path, query string, headers and raw body, call the same
gateways as the NATS subjects (`QueryGateway`, `CommandGateway`) and turn the envelope into a
response with the contract's status code. Query parameters are declared for the OpenAPI
document, but validated by the gateway so that HTTP and NATS answer alike.

`HttpRole` is the `http` role's component: it serves this app with uvicorn inside the service's
own asyncio loop, and it also registers the NATS query subscribers (the read side of a process).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Annotated, Any, Final

import orjson
import uvicorn
from fastapi import FastAPI, Path, Request, Response
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from activities_client.document import ACTIVITY_ID_PATTERN
from activities_client.errors import ActivitiesError, NotFound, ValidationError, field_error
from activities_client.filters import (
    LIST_FILTERS,
    OCCURRENCES_PARAMETERS,
    PAGE_PARAMETERS,
    STATS_GROUPS,
    STATS_PARAMETERS,
)
from activities_client.subjects import Subjects
from activities_client.wire import (
    EXTERNAL_KEY_PATTERN,
    ActivityListReply,
    ActivityReply,
    ErrorReply,
    EventHistoryReply,
    OccurrencesReply,
    StatsReply,
)
from events.commands import COMMANDS, CommandSpec, HttpRoute, parse_json_object
from events.queries import QUERIES
from projections.queries import Params, params_from_pairs
from services.gateway import CommandGateway
from services.logs import start_request
from services.nats_app import RequestServer
from services.queries import QueryGateway

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient

    from services.metrics import Metrics, Operations

log = logging.getLogger("activities.http")

BASE = "/api/v1/crm/activities"
ACTIVITY_ID_DESCRIPTION: Final = "act_ followed by a 26-character ULID"
_IF_MATCH = re.compile(r'^\s*(?:W/)?"?([0-9]{1,18})"?\s*$')

SCHEMA_REF: Final = "#/components/schemas/{model}"
ActivityId = Annotated[
    str,  # documented with the id pattern; checked by the query gateway, which answers HTTP and NATS alike
    Path(alias="id", description=ACTIVITY_ID_DESCRIPTION, json_schema_extra={"pattern": ACTIVITY_ID_PATTERN}),
]

ExternalKey = Annotated[
    str,
    Path(
        description="1-200 printable ASCII characters, unique in the caller's tenant (and app)",
        json_schema_extra={"pattern": EXTERNAL_KEY_PATTERN},
    ),
]

BEARER_AUTH: Final = {"type": "http", "scheme": "bearer", "bearerFormat": "JWT", "description": "Bearer <JWT>"}
IDEMPOTENCY_KEY_PARAMETER: Final = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "1-200 printable characters; a repeat within 24 hours gets the original reply",
    "schema": {"type": "string", "minLength": 1, "maxLength": 200},
}
IF_MATCH_PARAMETER: Final = {
    "name": "If-Match",
    "in": "header",
    "required": False,
    "description": '"<version>": fail with 412 unless it is the current version',
    "schema": {"type": "string"},
}


# The error replies each route can give (docs/contract.md section 3), all in the contract's envelope.
# Listing 422 replaces FastAPI's own validation-error shape, which this service never sends.
ERROR_STATUSES: Final = {
    401: "`unauthorized`: the token is missing or invalid",
    404: "`not_found`: no such activity visible to the caller",
    409: "`version_conflict` (`expected_version` is not current) or `idempotency_conflict`",
    410: "`gone`: the activity is deleted; restore it first",
    412: "`version_conflict`: `If-Match` is not the current version",
    422: "`validation_error`: the request is malformed or breaks a rule; `details` names the fields",
    500: "`internal`: a bug, logged with the reply's correlation id",
    503: "`unavailable`: a backing service is down or a consistency wait timed out; retry",
}
ALWAYS_POSSIBLE: Final = (401, 422, 500, 503)
OPEN: Final[dict[str, Any]] = {"security": []}  # operations routes need no token


def replies(status: int, success: type[BaseModel], *errors: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI `responses` of a route: its success reply and its error replies."""
    documented: dict[int | str, dict[str, Any]] = {status: {"model": success, "description": success.__doc__ or ""}}
    for code in sorted({*errors, *ALWAYS_POSSIBLE}):
        documented[code] = {"model": ErrorReply, "description": ERROR_STATUSES[code]}
    return documented


def query_string(repeatable: frozenset[str] = frozenset(), **descriptions: str) -> dict[str, Any]:
    """OpenAPI `parameters` of optional query-string parameters, all strings (the gateway parses
    them, as it does a NATS query's, so that HTTP and NATS answer alike). They are documented here
    rather than declared as endpoint arguments, which FastAPI would also parse and validate on every
    request: for a list, a tenth of its CPU."""
    string: dict[str, Any] = {"type": "string"}
    return {
        "parameters": [
            {
                "name": name,
                "in": "query",
                "required": False,
                "description": description,
                "schema": {"type": "array", "items": string} if name in repeatable else string,
            }
            for name, description in descriptions.items()
        ]
    }


MIN_POSITION: Final = PAGE_PARAMETERS["min_position"]
LIST_QUERY_STRING: Final = query_string(
    frozenset(spec.name for spec in LIST_FILTERS if spec.repeatable),
    **{spec.name: spec.description for spec in LIST_FILTERS},
    **PAGE_PARAMETERS,
)


def stats_query_string() -> dict[str, Any]:
    """The stats parameters: `group_by` (required, one of STATS_GROUPS), the list filters,
    `include_deleted` and `min_position`."""
    documented = query_string(
        frozenset(spec.name for spec in LIST_FILTERS if spec.repeatable),
        **{"group_by": STATS_PARAMETERS["group_by"]},
        **{spec.name: spec.description for spec in LIST_FILTERS},
        **{name: text for name, text in STATS_PARAMETERS.items() if name != "group_by"},
    )
    group_by = documented["parameters"][0]
    group_by["required"] = True
    group_by["schema"] = {"type": "string", "enum": list(STATS_GROUPS)}
    return documented


STATS_QUERY_STRING: Final = stats_query_string()


def occurrences_query_string() -> dict[str, Any]:
    """The occurrences parameters: `from` and `to` (required date-times), the list filters and the page."""
    documented = query_string(
        frozenset(spec.name for spec in LIST_FILTERS if spec.repeatable),
        **{name: OCCURRENCES_PARAMETERS[name] for name in ("from", "to")},
        **{spec.name: spec.description for spec in LIST_FILTERS},
        **{name: text for name, text in OCCURRENCES_PARAMETERS.items() if name not in ("from", "to")},
    )
    for parameter in documented["parameters"][:2]:
        parameter["required"] = True
        parameter["schema"] = {"type": "string", "format": "date-time"}
    return documented


OCCURRENCES_QUERY_STRING: Final = occurrences_query_string()
GET_PARAMETERS = query_string(
    version="the activity as it was at this version",
    include_deleted="true to read a deleted activity",
    min_position=MIN_POSITION,
)


def json_response(status: int, envelope: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    all_headers = dict(headers or {})
    if status == 401:
        all_headers["WWW-Authenticate"] = "Bearer"
    return Response(orjson.dumps(envelope), status_code=status, media_type="application/json", headers=all_headers)


ReadQuery = Callable[[Params, str | None], Awaitable[tuple[int, dict[str, Any]]]]


async def answer_read(request: Request, read: ReadQuery, from_path: tuple[str, str] | None = None,
                      etag: bool = False) -> Response:
    """A read route: the query string (and a parameter taken from the path, which the query string
    may not give too) read by the query gateway for the caller, its reply as the response."""
    params = params_from_pairs(request.query_params.multi_items())
    if from_path is not None:
        name, value = from_path
        if name in params:
            return error_response(field_error(name, "is taken from the path"))
        params[name] = [value]
    status_code, envelope = await read(params, request.headers.get("authorization"))
    return json_response(status_code, envelope, etag_headers(status_code, envelope) if etag else None)


def etag_headers(status: int, envelope: dict[str, Any]) -> dict[str, str]:
    data = envelope.get("data")
    if status < 300 and isinstance(data, dict) and "version" in data:
        return {"ETag": f'"{data["version"]}"'}
    return {}


def parse_if_match(value: str | None) -> int | None:
    """`If-Match: "<version>"` as an expected version; `*` or absent means any version."""
    if value is None or value.strip() in ("", "*"):
        return None
    match = _IF_MATCH.match(value)
    if not match:
        raise field_error("If-Match", 'must be "<version>", e.g. "3"')
    return int(match.group(1))


def error_response(error: ActivitiesError) -> Response:
    return json_response(error.http_status, error.to_envelope())


def create_http_app(queries: QueryGateway, commands: CommandGateway) -> FastAPI:
    """The FastAPI application over the two gateways (no state of its own)."""
    app = FastAPI(
        title="activities",
        version="1",
        description="CRM activities: queries from the read model, writes to the event store (docs/contract.md).",
    )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            return error_response(NotFound("no such route"))
        error = ValidationError(str(exc.detail))
        return json_response(exc.status_code, error.to_envelope())

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        details = [
            {"field": str(error["loc"][-1]) if error.get("loc") else "request", "message": str(error.get("msg", ""))}
            for error in exc.errors()
        ]
        return error_response(ValidationError("invalid request", details))

    @app.get(
        BASE,
        summary="List activities",
        tags=["queries"],
        openapi_extra=LIST_QUERY_STRING,
        responses=replies(200, ActivityListReply),
    )
    async def list_activities(request: Request) -> Response:
        return await answer_read(request, queries.list)

    @app.get(
        BASE + "/stats",  # before /{id}, which would take `stats` for an id
        summary="Count activities by type, status, owner, priority or outcome",
        tags=["queries"],
        openapi_extra=STATS_QUERY_STRING,
        responses=replies(200, StatsReply),
    )
    async def activity_stats(request: Request) -> Response:
        return await answer_read(request, queries.stats)

    @app.get(
        BASE + "/by-key/{external_key:path}",  # before /{id}/events, which would take `by-key` for an id
        summary="The activity an upsert created under this external_key",
        tags=["queries"],
        openapi_extra=query_string(include_deleted="true to read a deleted activity", min_position=MIN_POSITION),
        responses=replies(200, ActivityReply, 404, 410),
    )
    async def get_activity_by_key(request: Request, external_key: ExternalKey) -> Response:
        return await answer_read(request, queries.get_by_key, ("external_key", external_key), etag=True)

    @app.get(
        BASE + "/occurrences",  # before /{id}, which would take `occurrences` for an id
        summary="Occurrences of activities in a window, recurring ones expanded (section 9)",
        tags=["queries"],
        openapi_extra=OCCURRENCES_QUERY_STRING,
        responses=replies(200, OccurrencesReply),
    )
    async def activity_occurrences(request: Request) -> Response:
        return await answer_read(request, queries.occurrences)

    @app.get(
        BASE + "/{id}",
        summary="Get one activity",
        tags=["queries"],
        openapi_extra=GET_PARAMETERS,
        responses=replies(200, ActivityReply, 404, 410),
    )
    async def get_activity(request: Request, activity_id: ActivityId) -> Response:
        return await answer_read(request, queries.get, ("id", activity_id), etag=True)

    @app.get(
        BASE + "/{id}/events",
        summary="An activity's event history, oldest first",
        tags=["queries"],
        openapi_extra=query_string(min_position=MIN_POSITION),
        responses=replies(200, EventHistoryReply, 404),
    )
    async def activity_events(request: Request, activity_id: ActivityId) -> Response:
        params = params_from_pairs(request.query_params.multi_items())
        for name in params:
            if name != "min_position":
                return error_response(field_error(name, "is not a parameter; expected only min_position"))
        status_code, envelope = await queries.history(activity_id, params, request.headers.get("authorization"))
        return json_response(status_code, envelope)

    add_command_routes(app, commands)
    document_security_and_bodies(app)
    return app


def _not_null(schema: dict[str, Any]) -> dict[str, Any]:
    """A path parameter's schema: a field optional in the body (`anyOf` with null) is required in a path."""
    variants = [v for v in schema.get("anyOf", []) if v.get("type") != "null"]
    return variants[0] if len(variants) == 1 else schema


def command_route_documentation(spec: CommandSpec, route: HttpRoute | None = None) -> dict[str, Any]:
    """OpenAPI of a command route: its path parameters, its headers and its request body."""
    route = route or spec.http
    fields = spec.body.model_json_schema()["properties"]
    parameters: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": _not_null(fields[name])}
        for name in route.path_parameters
    ]
    parameters.append(IDEMPOTENCY_KEY_PARAMETER)
    if route.if_match:
        parameters.append(IF_MATCH_PARAMETER)
    documented: dict[str, Any] = {"parameters": parameters}
    if route.has_body:
        schema = spec.body.model_json_schema(ref_template=SCHEMA_REF)
        schema.pop("$defs", None)  # added to the document's components by `document_security_and_bodies`
        if route.body_field is not None:
            schema = schema["properties"][route.body_field]
        documented["requestBody"] = {"content": {route.media_type: {"schema": schema}}, "required": True}
    return documented


async def command_body(route: HttpRoute, request: Request) -> bytes | dict[str, Any]:
    """The command's body as the NATS subject takes it, from an HTTP request to `route`."""
    if route.body_field is None and route.has_body and not route.path_parameters and not route.if_match:
        return await request.body()  # parsed once, by the gateway
    body: dict[str, Any] = {}
    if route.has_body:
        data = parse_json_object(await request.body())
        body = {route.body_field: data} if route.body_field else dict(data)
    body.update(request.path_params)
    if route.if_match:
        expected = parse_if_match(request.headers.get("if-match"))
        if expected is not None:
            body["expected_version"] = expected
    return body


def document_security_and_bodies(app: FastAPI) -> None:
    """Complete the generated OpenAPI document: bearer auth on every route (so /docs has an
    Authorize button) and the models the command bodies refer to."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        document = generate()
        components = document.setdefault("components", {})
        components.setdefault("securitySchemes", {})["bearerAuth"] = BEARER_AUTH
        document["security"] = [{"bearerAuth": []}]
        schemas = components.setdefault("schemas", {})
        for spec in COMMANDS.values():
            schemas.update(spec.body.model_json_schema(ref_template=SCHEMA_REF).get("$defs", {}))
        app.openapi_schema = document
        return document

    app.openapi = openapi  # type: ignore[method-assign]


def add_command_routes(app: FastAPI, commands: CommandGateway) -> None:
    """One HTTP route per command of the registry, each calling the same gateway as its NATS subject."""
    for spec in COMMANDS.values():
        for index, route in enumerate((spec.http, *spec.more_http)):
            _add_command_route(app, spec, commands, route, index)


def _add_command_route(
    app: FastAPI, spec: CommandSpec, commands: CommandGateway, route: HttpRoute | None = None, index: int = 0
) -> None:
    route = route or spec.http

    async def endpoint(request: Request) -> Response:
        try:
            body = await command_body(route, request)
        except ActivitiesError as error:
            return error_response(error)
        headers = request.headers
        status_code, envelope = await commands.handle(
            spec.name, body, headers.get("authorization"), headers.get("idempotency-key"), headers.get("traceparent")
        )
        conditional = isinstance(body, dict) and "expected_version" in body and route.if_match
        if status_code == 409 and conditional and envelope["error"]["code"] == "version_conflict":
            status_code = 412  # If-Match failed: HTTP's precondition status
        return json_response(status_code, envelope, etag_headers(status_code, envelope))

    endpoint.__name__ = f"{spec.name}_activity" + (f"_{index}" if index else "")
    app.add_api_route(
        BASE + route.route_path,
        endpoint,
        methods=[route.method],
        summary=spec.summary,
        tags=["commands"],
        status_code=route.status,
        openapi_extra=command_route_documentation(spec, route),
        responses=command_replies(spec, route),
    )


def command_replies(spec: CommandSpec, route: HttpRoute) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI `responses` of a command route (an upsert also has its `created` status)."""
    documented = replies(route.status, spec.reply, *route.errors)
    if route.created_status is not None:
        description = "created: " + (spec.reply.__doc__ or "")
        documented[route.created_status] = {"model": spec.reply, "description": description}
    return documented


class MeasureRequests:
    """Gives each HTTP request its correlation id, and counts and times it by route and status.

    A plain ASGI middleware: Starlette's `BaseHTTPMiddleware` runs every request in a task of its
    own behind memory streams, which cost about a tenth of the CPU of a whole query."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        traceparent = next((value for name, value in scope["headers"] if name == b"traceparent"), None)
        start_request(traceparent.decode("latin-1") if traceparent else None)
        started = time.perf_counter()
        status = 500

        async def send_and_note_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note_status)
        finally:
            path = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.http_requests.labels(scope["method"], path, str(status)).inc()
            self.metrics.http_seconds.labels(scope["method"], path).observe(time.perf_counter() - started)


def add_operations_routes(app: FastAPI, operations: Operations) -> None:
    """/metrics (Prometheus), /healthz (the process answers), /readyz (database, NATS, lag)."""
    app.add_middleware(MeasureRequests, metrics=operations.metrics)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        return Response(await operations.scrape(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz", tags=["operations"], summary="The process is alive", openapi_extra=OPEN)
    async def healthz() -> Response:
        return json_response(200, {"status": "ok"})

    @app.get(
        "/readyz", tags=["operations"], summary="Ready to serve: database, NATS and projection lag", openapi_extra=OPEN
    )
    async def readyz() -> Response:
        ready, checks = await operations.readiness()
        return json_response(200 if ready else 503, {"status": "ready" if ready else "not ready", "checks": checks})


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside the service's loop: signals belong to the composition root, not to uvicorn."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpRole:
    """The read side of a process: the NATS query subscribers and the HTTP server (queries and writes).

    `connection` is the process's NATS connection, known once its broker has started."""

    def __init__(
        self,
        http_app: FastAPI,
        queries: QueryGateway,
        connection: Callable[[], NatsClient],
        subjects: Subjects,
        host: str,
        port: int,
        concurrency: int,
    ) -> None:
        self.http_app = http_app
        self.queries = queries
        self._connection = connection
        self._subjects = subjects
        self._host = host
        self._port = port
        self._nats_queries = RequestServer(queries.handle_message, concurrency)
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None
        self.url: str | None = None

    async def start(self) -> None:
        self.queries.read_model.bind_loop(asyncio.get_running_loop())
        await self.queries.read_model.open()
        connection = self._connection()
        for name in QUERIES:
            await self._nats_queries.serve(connection, self._subjects.query(name), name)
        await connection.flush()
        config = uvicorn.Config(
            self.http_app, host=self._host, port=self._port, lifespan="off", log_config=None, access_log=False
        )
        server = _EmbeddedServer(config)
        self._server = server
        self._task = asyncio.get_running_loop().create_task(server.serve(), name="http")
        while not server.started:
            if self._task.done():
                self._task.result()
                raise RuntimeError(f"HTTP server did not start on {self._host}:{self._port}")
            await asyncio.sleep(0.01)
        host, port = server.servers[0].sockets[0].getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{port}"
        log.info("HTTP serving", extra={"http_url": self.url})

    async def stop(self) -> None:
        await self._nats_queries.drain()
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.queries.read_model.close()
