"""Cursor signing keys (issue "Hardening"): a random key in the database, shared by every instance,
independent of the JWT settings: a key derived from them let anyone who knows a public key (or
the JWT secret) forge cursors."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any

import httpx
import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from projections.queries import CursorCodec, Keyset, params_from_pairs, parse_list_query
from services.bootstrap import Runtime
from services.config import Settings
from services.domain import Caller
from tests.conftest import JWT_SECRET

BASE = "/api/v1/crm/activities"


async def started(settings: Settings, stack: AsyncExitStack) -> httpx.AsyncClient:
    service = Runtime(settings)
    await service.start()
    stack.push_async_callback(service.stop)
    return await stack.enter_async_context(httpx.AsyncClient(base_url=service.endpoints["http_url"], timeout=10))


async def first_page(http: httpx.AsyncClient, bearer: str, count: int = 3) -> tuple[list[str], str]:
    """Create `count` activities; the ids of the first page (limit 1) and its next_cursor."""
    headers = {"Authorization": f"Bearer {bearer}"}
    position = 0
    for _ in range(count):
        created = await http.post(BASE, json={"account_id": "acc_k", "type": "call"}, headers=headers)
        assert created.status_code == 201, created.text
        position = created.json()["meta"]["position"]
    page = await http.get(BASE, params={"limit": 1, "min_position": position}, headers=headers)
    assert page.status_code == 200, page.text
    return [a["id"] for a in page.json()["data"]], page.json()["meta"]["next_cursor"]


async def follow(http: httpx.AsyncClient, bearer: str, cursor: str) -> httpx.Response:
    return await http.get(BASE, params={"limit": 1, "cursor": cursor}, headers={"Authorization": f"Bearer {bearer}"})


async def test_instances_on_one_database_accept_each_others_cursors(
    make_settings: Callable[..., Settings], token: Callable[..., str]
) -> None:
    first_settings = make_settings()
    second_settings = make_settings(database_url=first_settings.database_url)
    bearer = token(tenant="keys")
    async with AsyncExitStack() as stack:
        first = await started(first_settings, stack)
        second = await started(second_settings, stack)
        seen, cursor = await first_page(first, bearer)
        on_second = await follow(second, bearer, cursor)
        assert on_second.status_code == 200, on_second.text
        seen += [a["id"] for a in on_second.json()["data"]]
        on_first = await follow(first, bearer, on_second.json()["meta"]["next_cursor"])
        assert on_first.status_code == 200, on_first.text
        seen += [a["id"] for a in on_first.json()["data"]]
        assert len(set(seen)) == 3


def old_cursor_key(secret: str) -> bytes:
    """The old scheme: the key derived from the JWT secret, or from the public key without one."""
    return hmac.new(secret.encode(), b"activities/list-cursor/v1", hashlib.sha256).digest()


@pytest.fixture(scope="module")
def rsa_key() -> tuple[str, Any]:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    return pem, private


@pytest.mark.parametrize("configured", ["jwt_secret", "jwt_public_key"])
async def test_a_cursor_signed_with_a_key_derived_from_the_jwt_settings_is_refused(
    configured: str, make_settings: Callable[..., Settings], token: Callable[..., str], rsa_key: tuple[str, Any]
) -> None:
    public_pem, private = rsa_key
    if configured == "jwt_secret":
        settings, bearer, known = make_settings(), token(tenant="forge"), JWT_SECRET
    else:
        settings = make_settings(jwt_secret=None, jwt_public_key=public_pem)
        claims = {"sub": "usr-1", "tenant_id": "forge", "exp": int(time.time()) + 600}
        bearer, known = jwt.encode(claims, private, algorithm="RS256"), public_pem
    async with AsyncExitStack() as stack:
        http = await started(settings, stack)
        _, cursor = await first_page(http, bearer)
        assert (await follow(http, bearer, cursor)).status_code == 200  # the service's own cursor
        payload = orjson.loads(base64.urlsafe_b64decode(cursor.split(".")[0] + "=="))
        query = parse_list_query(params_from_pairs([("limit", "1")]))
        forged = CursorCodec(old_cursor_key(known)).encode(Keyset(*payload["k"]), query, Caller("forge", "usr-1"))
        refused = await follow(http, bearer, forged)
        assert refused.status_code == 422, refused.text
        assert refused.json()["error"]["code"] == "validation_error"
        assert refused.json()["error"]["details"][0]["field"] == "cursor"
