"""JWT verification: `Authorization: Bearer <JWT>` -> Caller (CONTRACT.md section 2)."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import jwt

from activities_client.errors import Unauthorized
from services.domain import Caller

_SCOPE_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_CACHE_LIMIT = 10_000


def load_public_key(value: str) -> str:
    """PEM text, or the path of a PEM file."""
    if "-----BEGIN" in value:
        return value
    return Path(value).read_text()


class TokenVerifier:
    """Verifies bearer tokens; verified tokens are cached until they expire (PyJWT costs ~0.4 ms)."""

    def __init__(
        self,
        secret: str | None = None,
        public_key: str | None = None,
        issuer: str | None = None,
        audience: str | None = None,
    ) -> None:
        if not secret and not public_key:
            raise ValueError("set ACTIVITIES_JWT_SECRET or ACTIVITIES_JWT_PUBLIC_KEY")
        self._keys: list[tuple[Any, list[str]]] = []
        if secret:
            self._keys.append((secret, ["HS256"]))
        if public_key:
            self._keys.append((load_public_key(public_key), ["RS256", "ES256"]))
        self._issuer = issuer
        self._audience = audience
        self._cache: dict[str, tuple[Caller, float]] = {}

    def verify(self, authorization: str | None) -> Caller:
        """The caller of a request, or `Unauthorized`."""
        if not authorization or not authorization.startswith("Bearer "):
            raise Unauthorized("missing bearer token: send the header 'Authorization: Bearer <JWT>'")
        token = authorization[len("Bearer ") :].strip()
        cached = self._cache.get(token)
        now = time.time()
        if cached is not None and cached[1] > now:
            return cached[0]
        claims = self._decode(token)
        caller = _caller_of(claims)
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[token] = (caller, float(claims["exp"]))
        return caller

    def _decode(self, token: str) -> dict[str, Any]:
        options: jwt.types.Options = {"require": ["exp", "sub", "tenant_id"], "verify_aud": self._audience is not None}
        error: Exception | None = None
        for key, algorithms in self._keys:
            try:
                return jwt.decode(
                    token,
                    key,
                    algorithms=algorithms,
                    issuer=self._issuer,
                    audience=self._audience,
                    options=options,
                )
            except jwt.InvalidAlgorithmError as exc:
                error = exc
            except jwt.PyJWTError as exc:
                error = exc
                if not isinstance(exc, jwt.InvalidSignatureError):
                    break
        raise Unauthorized(f"invalid token: {error}")


def _caller_of(claims: dict[str, Any]) -> Caller:
    tenant_id = claims.get("tenant_id")
    app_id = claims.get("app_id")
    sub = claims.get("sub")
    if not isinstance(tenant_id, str) or not _SCOPE_ID.match(tenant_id):
        raise Unauthorized("invalid token: tenant_id must match ^[A-Za-z0-9_-]{1,64}$")
    if app_id is not None and (not isinstance(app_id, str) or not _SCOPE_ID.match(app_id)):
        raise Unauthorized("invalid token: app_id must match ^[A-Za-z0-9_-]{1,64}$")
    if not isinstance(sub, str) or not sub:
        raise Unauthorized("invalid token: sub must be a non-empty string")
    return Caller(tenant_id=tenant_id, sub=sub, app_id=app_id)


def mint_token(
    secret: str,
    tenant_id: str,
    sub: str,
    app_id: str | None = None,
    ttl_s: int = 24 * 3600,
    issuer: str | None = None,
    audience: str | None = None,
) -> str:
    """An HS256 token for development and tests (`activities token`)."""
    now = int(time.time())
    claims: dict[str, Any] = {"sub": sub, "tenant_id": tenant_id, "iat": now, "exp": now + ttl_s}
    if app_id:
        claims["app_id"] = app_id
    if issuer:
        claims["iss"] = issuer
    if audience:
        claims["aud"] = audience
    return jwt.encode(claims, secret, algorithm="HS256")
