"""The byte-bounded cache of activities (services/cache.py)."""

from __future__ import annotations

import orjson

from services.cache import ENTRY_BYTES, SizedLRUCache, estimated_size


def test_least_recently_used_go_first_until_the_total_fits() -> None:
    cache: SizedLRUCache[str, str] = SizedLRUCache(max_bytes=100)
    cache.put("a", "A", 40)
    cache.put("b", "B", 40)
    assert cache.get("a") == "A"  # now b is the least recently used
    cache.put("c", "C", 40)
    assert cache.get("b") is None and cache.get("a") == "A" and cache.get("c") == "C"
    assert cache.bytes == 80 and len(cache) == 2


def test_a_value_replaced_is_counted_once_and_one_larger_than_the_bound_is_not_cached() -> None:
    cache: SizedLRUCache[str, str] = SizedLRUCache(max_bytes=100)
    cache.put("a", "A1", 30)
    cache.put("a", "A2", 50)
    assert cache.get("a") == "A2" and cache.bytes == 50
    cache.put("huge", "H", 101)  # would evict everything else for one entry
    assert cache.get("huge") is None and cache.get("a") == "A2"
    cache.put("a", "A3", 500)  # an entry that grows past the bound leaves the cache
    assert cache.get("a") is None and cache.bytes == 0


def test_the_estimate_grows_with_the_json_and_with_its_items() -> None:
    long_text = orjson.dumps({"description": "x" * 100_000})
    many_items = orjson.dumps({f"f{i}": i for i in range(1000)})
    assert estimated_size(long_text) >= len(long_text)
    assert estimated_size(many_items) >= len(many_items) + 999 * 100  # a Python object per item
    assert estimated_size(b"{}") == 2 + ENTRY_BYTES
