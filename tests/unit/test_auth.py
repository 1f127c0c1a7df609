"""Token rules of CONTRACT.md section 2."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from activities_client.errors import Unauthorized
from services.auth import TokenVerifier, mint_token

SECRET = "unit-test-secret-long-enough-for-hs256-keys"


def claims(**overrides: Any) -> dict[str, Any]:
    base = {"sub": "usr-1", "tenant_id": "acme", "exp": int(time.time()) + 60}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def bearer(token: str) -> str:
    return f"Bearer {token}"


def test_valid_hs256_token_gives_the_caller() -> None:
    caller = TokenVerifier(SECRET).verify(bearer(mint_token(SECRET, "acme", "usr-1", "gong")))
    assert (caller.tenant_id, caller.sub, caller.app_id) == ("acme", "usr-1", "gong")


def test_app_id_is_optional() -> None:
    assert TokenVerifier(SECRET).verify(bearer(mint_token(SECRET, "acme", "usr-1"))).app_id is None


def _unsigned(payload: dict[str, Any]) -> str:
    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(payload)}."


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Basic abc",
        "Bearer ",
        "Bearer not.a.token",
        bearer(_unsigned(claims())),
        bearer(jwt.encode(claims(), "another-secret-also-long-enough-for-hs256", algorithm="HS256")),
        bearer(jwt.encode(claims(exp=int(time.time()) - 10), SECRET, algorithm="HS256")),
        bearer(jwt.encode(claims(nbf=int(time.time()) + 600), SECRET, algorithm="HS256")),
        bearer(jwt.encode(claims(sub=None), SECRET, algorithm="HS256")),
        bearer(jwt.encode(claims(tenant_id=None), SECRET, algorithm="HS256")),
        bearer(jwt.encode(claims(exp=None), SECRET, algorithm="HS256")),
        bearer(jwt.encode(claims(sub=""), SECRET, algorithm="HS256")),
        bearer(jwt.encode(claims(tenant_id=123), SECRET, algorithm="HS256")),
        bearer(jwt.encode(claims(app_id="a.b"), SECRET, algorithm="HS256")),
    ],
)
def test_bad_tokens_are_unauthorized(authorization: str | None) -> None:
    with pytest.raises(Unauthorized):
        TokenVerifier(SECRET).verify(authorization)


@pytest.mark.parametrize("tenant", ["a.b", "acme*", "acme>", "ac me", "", "x" * 65, "ténant"])
def test_tenant_ids_that_could_escape_a_subject_are_refused(tenant: str) -> None:
    token = jwt.encode(claims(tenant_id=tenant), SECRET, algorithm="HS256")
    with pytest.raises(Unauthorized):
        TokenVerifier(SECRET).verify(bearer(token))


def test_issuer_and_audience_are_enforced_when_set() -> None:
    verifier = TokenVerifier(SECRET, issuer="https://id.example", audience="activities")
    good = jwt.encode(claims(iss="https://id.example", aud="activities"), SECRET, algorithm="HS256")
    assert verifier.verify(bearer(good)).tenant_id == "acme"
    for bad in (claims(iss="https://evil.example", aud="activities"), claims(iss="https://id.example", aud="other"),
                claims()):
        with pytest.raises(Unauthorized):
            verifier.verify(bearer(jwt.encode(bad, SECRET, algorithm="HS256")))


def _pem(private_key: Any) -> str:
    return private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def test_rs256_and_es256_with_a_public_key() -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert TokenVerifier(public_key=_pem(rsa_key)).verify(bearer(jwt.encode(claims(), rsa_key, algorithm="RS256"))).sub == "usr-1"
    ec_key = ec.generate_private_key(ec.SECP256R1())
    assert TokenVerifier(public_key=_pem(ec_key)).verify(bearer(jwt.encode(claims(), ec_key, algorithm="ES256"))).sub == "usr-1"


def test_hs256_signed_with_the_public_key_is_refused() -> None:
    """The classic algorithm-confusion attack: HMAC keyed with the (public) RSA key."""
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = _pem(rsa_key)
    header = base64.urlsafe_b64encode(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()).rstrip(b"=")
    payload = base64.urlsafe_b64encode(json.dumps(claims()).encode()).rstrip(b"=")
    import hashlib
    import hmac

    signature = base64.urlsafe_b64encode(
        hmac.new(public_pem.encode(), header + b"." + payload, hashlib.sha256).digest()
    ).rstrip(b"=")
    forged = (header + b"." + payload + b"." + signature).decode()
    with pytest.raises(Unauthorized):
        TokenVerifier(public_key=public_pem).verify(bearer(forged))


def test_a_cached_token_still_expires() -> None:
    verifier = TokenVerifier(SECRET)
    token = jwt.encode(claims(exp=int(time.time()) + 1), SECRET, algorithm="HS256")
    assert verifier.verify(bearer(token)).sub == "usr-1"
    time.sleep(1.6)
    with pytest.raises(Unauthorized):
        verifier.verify(bearer(token))
