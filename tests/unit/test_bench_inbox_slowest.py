"""The inbox benchmark says when its latency phase's slowest commands were published: one stall
shows as a short span of send times."""

from __future__ import annotations

from bench.inbox import slowest_share


def test_the_slowest_share_says_when_a_stall_happened() -> None:
    offsets = [i / 100 for i in range(1000)]  # 100 commands a second for 10 s
    latencies = [2.0] * 1000
    for i in range(300, 310):  # a stall 3 s in: the ten commands sent during it wait 200-191 ms
        latencies[i] = 200.0 - (i - 300)
    assert slowest_share(offsets, latencies) == {
        "count": 10, "sent_from_s": 3.0, "sent_to_s": 3.09, "min_ms": 191.0, "max_ms": 200.0,
    }
    spread = slowest_share(offsets, [float(i % 97) for i in range(1000)])
    assert spread["count"] == 10 and spread["sent_to_s"] - spread["sent_from_s"] > 5  # a steady tail
