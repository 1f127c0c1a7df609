"""Token rules of docs/contract.md section 2."""

from __future__ import annotations

import base64
import http.server
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from activities_client.errors import Unauthorized
from services.auth import JwksKeys, TokenVerifier, jwks_file_loader, jwks_url_loader, mint_token
from services.bootstrap import token_verifier
from services.config import Settings

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
        bearer(jwt.encode(claims(exp=int(time.time()) - 120), SECRET, algorithm="HS256")),  # beyond the leeway
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
    verifier = TokenVerifier(SECRET, leeway_s=0)
    token = jwt.encode(claims(exp=int(time.time()) + 1), SECRET, algorithm="HS256")
    assert verifier.verify(bearer(token)).sub == "usr-1"
    time.sleep(1.6)
    with pytest.raises(Unauthorized):
        verifier.verify(bearer(token))


# Hardening: clock leeway, audience, keys from a JWKS ----------------------------------------


@pytest.mark.parametrize("claim", ["iat", "nbf"])
def test_a_token_from_a_clock_slightly_ahead_is_accepted_within_the_leeway(claim: str) -> None:
    ahead = jwt.encode(claims(**{claim: int(time.time()) + 2}), SECRET, algorithm="HS256")
    assert TokenVerifier(SECRET).verify(bearer(ahead)).sub == "usr-1"  # default leeway 30 s
    far_ahead = jwt.encode(claims(**{claim: int(time.time()) + 60}), SECRET, algorithm="HS256")
    with pytest.raises(Unauthorized, match="not yet valid"):
        TokenVerifier(SECRET).verify(bearer(far_ahead))
    with pytest.raises(Unauthorized):
        TokenVerifier(SECRET, leeway_s=0).verify(bearer(ahead))


def test_an_expired_token_is_accepted_only_within_the_leeway() -> None:
    just_expired = jwt.encode(claims(exp=int(time.time()) - 5), SECRET, algorithm="HS256")
    assert TokenVerifier(SECRET).verify(bearer(just_expired)).sub == "usr-1"
    with pytest.raises(Unauthorized, match="expired"):
        TokenVerifier(SECRET, leeway_s=1).verify(bearer(just_expired))


def test_a_token_with_an_audience_is_refused_when_none_is_configured() -> None:
    for aud in ("activities", ["activities", "billing"]):
        token = jwt.encode(claims(aud=aud), SECRET, algorithm="HS256")
        with pytest.raises(Unauthorized, match="ACTIVITIES_JWT_AUDIENCE"):
            TokenVerifier(SECRET).verify(bearer(token))


def test_a_configured_audience_must_match_the_tokens() -> None:
    verifier = TokenVerifier(SECRET, audience="activities")
    for aud in ("activities", ["billing", "activities"]):
        assert verifier.verify(bearer(jwt.encode(claims(aud=aud), SECRET, algorithm="HS256"))).sub == "usr-1"
    for bad in (claims(aud="billing"), claims(aud=["billing"]), claims()):
        with pytest.raises(Unauthorized):
            verifier.verify(bearer(jwt.encode(bad, SECRET, algorithm="HS256")))


def _jwks(*keys: tuple[str, Any]) -> dict[str, Any]:
    """A JWKS of (kid, private key) pairs: their public halves."""
    entries = []
    for kid, private in keys:
        entry = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(private.public_key()))
        entries.append({**entry, "kid": kid, "use": "sig", "alg": "ES256"})
    return {"keys": entries}


def _signed(private: Any, kid: str, **overrides: Any) -> str:
    return bearer(jwt.encode(claims(**overrides), private, algorithm="ES256", headers={"kid": kid}))


def test_jwks_file_rotation_needs_no_restart(tmp_path: Path) -> None:
    key_a, key_b = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(_jwks(("a", key_a))))
    verifier = TokenVerifier(jwks=JwksKeys(jwks_file_loader(path)))
    assert verifier.verify(_signed(key_a, "a")).sub == "usr-1"
    with pytest.raises(Unauthorized, match="kid 'b'"):
        verifier.verify(_signed(key_b, "b", sub="usr-early"))  # not published yet
    path.write_text(json.dumps(_jwks(("b", key_b))))  # rotated: A retired, B published
    assert verifier.verify(_signed(key_b, "b", sub="usr-2")).sub == "usr-2"
    with pytest.raises(Unauthorized):
        verifier.verify(_signed(key_a, "a", sub="usr-3"))  # a new token of the retired key
    with pytest.raises(Unauthorized):
        verifier.verify(_signed(key_a, "b", sub="usr-4"))  # B's kid, A's signature


def test_jwks_keys_reload_for_an_unknown_kid_at_most_every_interval() -> None:
    key_a = ec.generate_private_key(ec.SECP256R1())
    loads: list[bool] = []
    now = [1000.0]

    def load(force: bool) -> jwt.PyJWKSet:
        loads.append(force)
        return jwt.PyJWKSet.from_dict(_jwks(("a", key_a)))

    keys = JwksKeys(load, refresh_interval_s=10, clock=lambda: now[0])
    assert keys.key("a") is not None and loads == [False]
    assert keys.key("x") is None and loads == [False, False, True]  # one forced reload
    assert keys.key("y") is None and loads == [False, False, True, False]  # too soon: none
    now[0] += 10
    assert keys.key("z") is None and loads[-1] is True


def test_jwks_and_static_keys_work_side_by_side(tmp_path: Path) -> None:
    key_a = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(_jwks(("a", key_a))))
    verifier = TokenVerifier(SECRET, jwks=JwksKeys(jwks_file_loader(path)))
    assert verifier.verify(_signed(key_a, "a")).sub == "usr-1"
    assert verifier.verify(bearer(mint_token(SECRET, "acme", "usr-9"))).sub == "usr-9"
    with_kid = jwt.encode(claims(sub="usr-8"), SECRET, algorithm="HS256", headers={"kid": "hs"})
    assert verifier.verify(bearer(with_kid)).sub == "usr-8"  # a kid unknown to the JWKS: the static keys
    with pytest.raises(Unauthorized):  # an HS256 token under the kid of an EC key
        verifier.verify(bearer(jwt.encode(claims(), SECRET, algorithm="HS256", headers={"kid": "a"})))


class _JwksServer(http.server.ThreadingHTTPServer):
    """A JWKS endpoint on 127.0.0.1:<free port>; `body` is what it serves, `requests` counts fetches."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body
        self.requests = 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests += 1
                data = json.dumps(server.body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/.well-known/jwks.json"


@pytest.fixture
def jwks_server() -> Iterator[_JwksServer]:
    server = _JwksServer({"keys": []})
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_jwks_url_rotation_needs_no_restart_and_unknown_kids_are_rate_limited(jwks_server: _JwksServer) -> None:
    key_a, key_b = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    jwks_server.body = _jwks(("a", key_a))
    verifier = TokenVerifier(jwks=JwksKeys(jwks_url_loader(jwks_server.url)))
    assert verifier.verify(_signed(key_a, "a")).sub == "usr-1"
    assert verifier.verify(_signed(key_a, "a", sub="usr-2")).sub == "usr-2"
    assert jwks_server.requests == 1  # the key set is cached
    jwks_server.body = _jwks(("b", key_b))
    assert verifier.verify(_signed(key_b, "b")).sub == "usr-1"  # unknown kid: one fetch
    assert jwks_server.requests == 2
    for kid in ("c", "d", "e"):
        with pytest.raises(Unauthorized, match="kid"):
            verifier.verify(_signed(key_b, kid))
    assert jwks_server.requests == 2  # unknown kids do not fetch again within the interval


def test_jwks_url_must_be_http() -> None:
    with pytest.raises(ValueError, match="http"):
        jwks_url_loader("file:///etc/passwd")


def test_settings_build_a_verifier_with_the_leeway_and_the_jwks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key_a = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(_jwks(("a", key_a))))
    monkeypatch.setenv("ACTIVITIES_JWT_JWKS_FILE", str(path))
    monkeypatch.setenv("ACTIVITIES_JWT_LEEWAY_S", "5")
    monkeypatch.setenv("ACTIVITIES_DATA_DIR", str(tmp_path / "data"))
    verifier = token_verifier(Settings())
    assert verifier.verify(_signed(key_a, "a", nbf=int(time.time()) + 2)).sub == "usr-1"
    with pytest.raises(Unauthorized, match="not yet valid"):
        verifier.verify(_signed(key_a, "a", nbf=int(time.time()) + 20))
    assert not (tmp_path / "data").exists()  # no dev secret: the JWKS is a key


def test_an_unreadable_jwks_refuses_tokens_as_unauthorized(tmp_path: Path) -> None:
    key_a = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "jwks.json"
    verifier = TokenVerifier(jwks=JwksKeys(jwks_file_loader(path), refresh_interval_s=0))
    with pytest.raises(Unauthorized, match="JWKS"):  # missing
        verifier.verify(_signed(key_a, "a"))
    path.write_text("{not json")
    with pytest.raises(Unauthorized, match="JWKS"):  # malformed
        verifier.verify(_signed(key_a, "a"))
    path.write_text(json.dumps(_jwks(("a", key_a))))
    assert verifier.verify(_signed(key_a, "a")).sub == "usr-1"
