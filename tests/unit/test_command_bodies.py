"""What a command body may hold: `parse_json_object`'s cheap check (`plainly_storable`) decides
exactly as the full walk (`check_storable`) does, and names the same field when it refuses."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from activities_client.document import is_key_text
from activities_client.errors import ValidationError
from events.commands import MAX_BODY_DEPTH, check_storable, parse_batch, parse_json_object, plainly_storable

_TEXT = st.text(alphabet=st.sampled_from(["a", "\x00", "\\", "u", "0", "é"]), max_size=6)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**63 - 1) | _TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXT, inner, max_size=3),
    max_leaves=40,
)


def _nested(depth: int) -> Any:
    """A value whose innermost container is `depth` levels deep."""
    value: Any = []
    for level in range(depth - 1):
        value = {"k": value} if level % 2 else [value]
    return value


def _outcome(check: Any, *args: Any) -> str | None:
    try:
        check(*args)
    except ValidationError as error:
        return str(error)
    return None


@settings(max_examples=300)
@given(st.dictionaries(_TEXT, _JSON, max_size=4), st.integers(min_value=1, max_value=MAX_BODY_DEPTH + 2))
def test_the_cheap_check_decides_as_the_full_walk(data: dict[str, Any], depth: int) -> None:
    data = {**data, "deep": _nested(depth)}
    body = orjson.dumps(data)
    expected = _outcome(check_storable, data)
    assert _outcome(parse_json_object, body) == expected
    assert _outcome(parse_json_object, body.decode()) == expected
    if plainly_storable(body, data):
        assert expected is None


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b'{"subject": "a\\u0000b"}', "subject: holds a NUL character"),
        (b'{"custom_fields": {"x\\u0000": 1}}', "custom_fields: holds a key with a NUL character"),
        (b'{"a\\u0000": 1}', "body: holds a key with a NUL character"),
    ],
)
def test_a_nul_is_refused_and_named(body: bytes, error: str) -> None:
    with pytest.raises(ValidationError) as caught:
        parse_json_object(body)
    assert str(caught.value) == error


def test_an_escaped_backslash_before_u0000_is_no_nul() -> None:
    body = b'{"subject": "a\\\\u0000b"}'
    assert not plainly_storable(body, orjson.loads(body))  # not known cheaply ...
    assert parse_json_object(body) == {"subject": "a\\u0000b"}  # ... and the full walk lets it through


def test_depth_up_to_the_limit_and_one_more() -> None:
    deepest = {"custom_fields": _nested(MAX_BODY_DEPTH - 1)}
    assert plainly_storable(orjson.dumps(deepest), deepest)
    assert parse_json_object(orjson.dumps(deepest)) == deepest
    too_deep = {"custom_fields": _nested(MAX_BODY_DEPTH)}
    assert not plainly_storable(orjson.dumps(too_deep), too_deep)
    with pytest.raises(ValidationError, match=f"custom_fields: is nested deeper than {MAX_BODY_DEPTH} levels"):
        parse_json_object(orjson.dumps(too_deep))


def test_a_batch_with_a_nul_in_one_item_is_refused_whole() -> None:
    items = [{"op": "create", "account_id": "acc-1"}, {"op": "create", "account_id": "acc-\x00"}]
    with pytest.raises(ValidationError, match="commands.1.account_id: holds a NUL character"):
        parse_batch(orjson.dumps({"commands": items}))


@settings(max_examples=500)
@given(st.one_of(st.text(max_size=210), st.text(st.characters(max_codepoint=0x80), max_size=210), st.integers(), st.none()))
def test_key_text_is_one_to_200_printable_ascii_characters(value: Any) -> None:
    """`is_key_text` (Idempotency-Keys, external keys) is the rule as written in the contract."""
    expected = isinstance(value, str) and 1 <= len(value) <= 200 and all(" " <= ch <= "~" for ch in value)
    assert is_key_text(value) == expected


@pytest.mark.parametrize("value", ["a", " ", "~", "k" * 200, "a b~!"])
def test_key_text_accepts(value: str) -> None:
    assert is_key_text(value)


@pytest.mark.parametrize("value", ["", "k" * 201, "\x7f", "a\x00", "é", "tab\t", "\u00a0", "new\nline"])
def test_key_text_refuses(value: str) -> None:
    assert not is_key_text(value)
