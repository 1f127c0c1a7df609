"""A least-recently-used cache bounded by the estimated size of its values, not by their count.

eventsourcing's `LRUCache` counts entries: 10,000 activities were a few tens of MB with typical
documents and up to 2.5 GB with documents near the 256 KiB limit. Here each value comes with an
estimate of its size (the caller knows one for free, e.g. the length of its stored JSON), and the
least recently used entries go until the total is within the bound. The estimate of a document
comes from its stored JSON (`estimated_size`), known when it is read or saved: no deep sizeof.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Final, Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")

# A decoded document takes more memory than its JSON: a Python object and a dict slot per item.
# Measured with tracemalloc (2026-12-06), memory per cached activity against this estimate:
# typical create 2.6 KB / 6.1 KB, 100 KiB description 103 KB / 106 KB, 9,000 short custom
# fields 1.33 MB / 1.12 MB, 5,000 integer fields 532 KB / 564 KB. Commas count the items (every
# item but the last of each object or array is followed by one); counting them is a C scan of
# bytes already in memory (0.4 µs for a typical state, 110 µs at the 256 KiB limit).
ITEM_BYTES: Final = 100
ENTRY_BYTES: Final = 1024  # the key, the aggregate object, the cache's own entry


def estimated_size(state: bytes) -> int:
    """The memory a document decoded from the JSON `state` takes, estimated without decoding it."""
    return len(state) + ITEM_BYTES * state.count(b",") + ENTRY_BYTES


class SizedLRUCache(Generic[K, V]):
    """LRU cache whose entries' estimated sizes add up to at most `max_bytes`.

    Not thread-safe: the command path uses it on the event loop only.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0  # the estimated size of what is cached
        self._entries: OrderedDict[K, tuple[V, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: K) -> V | None:
        """The value, now the most recently used; None when not cached."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: K, value: V, size: int) -> None:
        """Cache `value` (estimated at `size` bytes), evicting the least recently used to fit.
        A value larger than the whole bound is not cached: it would evict everything else."""
        self.discard(key)
        if size > self.max_bytes:
            return
        self._entries[key] = (value, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, evicted) = self._entries.popitem(last=False)
            self.bytes -= evicted

    def discard(self, key: K) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.bytes -= entry[1]

    def clear(self) -> None:
        """Forget everything."""
        self._entries.clear()
        self.bytes = 0

