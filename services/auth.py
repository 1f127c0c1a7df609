"""JWT verification: `Authorization: Bearer <JWT>` -> Caller (docs/contract.md section 2)."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import jwt

from activities_client.errors import Unauthorized
from projections.errors import describe
from services.domain import Caller

log = logging.getLogger("activities.auth")

_SCOPE_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_CACHE_LIMIT = 10_000
DEFAULT_LEEWAY_S = 30.0
JWKS_REFRESH_INTERVAL_S = 10.0
"""Least time between two refreshes of a JWKS asked for by tokens of unknown `kid` (anyone can
send such tokens: without a limit each would fetch the JWKS)."""
JWKS_URL_TTL_S = 300.0
"""How long keys fetched from a JWKS URL are used before they are fetched again."""


def load_public_key(value: str) -> str:
    """PEM text, or the path of a PEM file."""
    if "-----BEGIN" in value:
        return value
    return Path(value).read_text()


def jwks_file_loader(path: Path) -> Callable[[bool], jwt.PyJWKSet]:
    """Reads a JWKS file, again only when its mtime or size changed (or when forced)."""
    seen: dict[str, Any] = {}

    def load(force: bool) -> jwt.PyJWKSet:
        stat = path.stat()
        version = (stat.st_mtime_ns, stat.st_size)
        if force or seen.get("version") != version:
            seen["keys"] = jwt.PyJWKSet.from_dict(json.loads(path.read_text()))
            seen["version"] = version
        keys: jwt.PyJWKSet = seen["keys"]
        return keys

    return load


def jwks_url_loader(url: str, ttl_s: float = JWKS_URL_TTL_S) -> Callable[[bool], jwt.PyJWKSet]:
    """Fetches a JWKS over http(s) with PyJWT's client, whose cache keeps it `ttl_s` seconds."""
    if urlparse(url).scheme not in ("http", "https"):
        raise ValueError(f"ACTIVITIES_JWT_JWKS_URL must be an http(s) URL, not {url!r}")
    # our own rate limit decides forced refreshes (JwksKeys), so the client's cooldown is off
    client = jwt.PyJWKClient(url, cache_jwk_set=True, lifespan=ttl_s, timeout=5, cooldown_duration=0)
    return lambda force: client.get_jwk_set(refresh=force)


class JwksKeys:
    """The keys of a JWKS by `kid`, refreshed without a restart.

    `load(force)` returns the current key set (a loader above: the file re-read when it changed,
    the URL fetched again when its cache expired). A `kid` it does not know forces one reload,
    at most every `refresh_interval_s`, before the token is refused.
    """

    def __init__(
        self,
        load: Callable[[bool], jwt.PyJWKSet],
        refresh_interval_s: float = JWKS_REFRESH_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._load = load
        self._refresh_interval_s = refresh_interval_s
        self._clock = clock
        self._last_forced: float | None = None
        self._lock = threading.Lock()

    def key(self, kid: str) -> jwt.PyJWK | None:
        """The key of that `kid`, or None (also when the JWKS cannot be read: logged)."""
        with self._lock:
            found = self._find(kid, force=False)
            now = self._clock()
            if found is None and (self._last_forced is None or now - self._last_forced >= self._refresh_interval_s):
                self._last_forced = now
                found = self._find(kid, force=True)
            return found

    def _find(self, kid: str, force: bool) -> jwt.PyJWK | None:
        try:
            keys = self._load(force)
        except (OSError, ValueError, jwt.PyJWTError) as exc:  # unreadable or malformed: no keys this time
            log.warning("JWKS not loaded", extra={"error": describe(exc)})
            return None
        return next((key for key in keys.keys if key.key_id == kid), None)


class TokenVerifier:
    """Verifies bearer tokens; verified tokens are cached until they expire (PyJWT costs ~0.4 ms).

    Keys: the HS256 secret, the RS256/ES256 public key, and the keys of a JWKS chosen by the
    token header's `kid`. Time claims allow `leeway_s` of clock difference between hosts. A
    token's `aud` must match `audience`; with no audience configured, a token carrying one is
    refused (it was meant for another service).
    """

    def __init__(
        self,
        secret: str | None = None,
        public_key: str | None = None,
        issuer: str | None = None,
        audience: str | None = None,
        leeway_s: float = DEFAULT_LEEWAY_S,
        jwks: JwksKeys | None = None,
    ) -> None:
        if not secret and not public_key and jwks is None:
            raise ValueError("set ACTIVITIES_JWT_SECRET, ACTIVITIES_JWT_PUBLIC_KEY or a JWKS")
        self._keys: list[tuple[Any, list[str]]] = []
        if secret:
            self._keys.append((secret, ["HS256"]))
        if public_key:
            self._keys.append((load_public_key(public_key), ["RS256", "ES256"]))
        self._jwks = jwks
        self._issuer = issuer
        self._audience = audience
        self._leeway_s = leeway_s
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

    def _candidates(self, token: str) -> list[tuple[Any, list[str]]]:
        """The keys to try: the JWKS key of the token's `kid`, else the static keys."""
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"invalid token: {exc}") from None
        if self._jwks is not None and isinstance(kid, str):
            key = self._jwks.key(kid)
            if key is not None:
                return [(key, [key.algorithm_name])]
        if not self._keys:
            if self._jwks is not None and not isinstance(kid, str):
                raise Unauthorized("invalid token: its header has no `kid` to choose a key of the JWKS")
            raise Unauthorized(f"invalid token: no key of the JWKS (if it could be read) has the kid {kid!r}")
        return self._keys

    def _decode(self, token: str) -> dict[str, Any]:
        # `aud` is always checked: without a configured audience, a token that names one is refused
        options: jwt.types.Options = {"require": ["exp", "sub", "tenant_id"], "verify_aud": True}
        error: Exception | None = None
        for key, algorithms in self._candidates(token):
            try:
                return jwt.decode(
                    token,
                    key,
                    algorithms=algorithms,
                    issuer=self._issuer,
                    audience=self._audience,
                    leeway=self._leeway_s,
                    options=options,
                )
            except jwt.InvalidAudienceError as exc:
                if self._audience is None:
                    raise Unauthorized(
                        "invalid token: it has an `aud` claim but this service has no audience "
                        "(ACTIVITIES_JWT_AUDIENCE)"
                    ) from None
                error = exc
                break
            except jwt.PyJWTError as exc:
                error = exc
                if not isinstance(exc, jwt.InvalidSignatureError | jwt.InvalidAlgorithmError):
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
