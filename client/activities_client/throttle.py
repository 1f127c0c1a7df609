"""Client-side adaptive throttling: a client stops sending what the service would refuse anyway.

When the service is at capacity it answers `unavailable` at once, but each refusal still costs
it a message to read and one to write, and a client that retries every refusal multiplies its
own load: at three times the maximum rate, clients that only retried kept the service busy
refusing, and its goodput fell far below its maximum. The remedy is the one of Google's SRE book
("Handling Overload", client-side throttling): each client counts, over the last `window_s`
seconds, the requests it wanted to send (less those that got no reply at all) and the ones the service
accepted (any reply but `unavailable`), and refuses a new request itself with probability

    max(0, (requests - ratio * accepts) / (requests + 1))

so that it sends at most about `ratio` requests per request the service takes. While the service
accepts everything the probability is 0, and a client with fewer than `min_requests` in the window
never refuses (one `unavailable` of a quiet client is no overload: like Envoy's admission control,
the throttle only acts on a rate worth throttling). A refused attempt is retried with backoff like an
`unavailable` reply, and spends one of the request's attempts.

The ratio is 1.2, not the book's 2: here a refusal costs the service's machine about a quarter of
what an accepted create costs (NATS carries the request and the reply, the service reads it and
answers), so every request sent beyond what is accepted takes CPU from the accepted ones. At three
times the maximum rate, single runs on one morning (docs/performance.md, "Overload"): goodput
0.73x-0.84x the maximum with 1.2 (six runs, median 0.80x), 0.75x-0.79x with 1.5 (three runs,
median 0.77x). The price of a small ratio is a slower climb when the
service's capacity grows during an overload (another instance starting): the accepted rate can
grow by about 4% a second with 1.2 and a 10 s window, against 9% with 1.5.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable

DEFAULT_RATIO = 1.2


def refusal_probability(requests: int, accepts: int, ratio: float) -> float:
    """The chance that a client refuses its next request itself (the SRE book's formula)."""
    return max(0.0, (requests - ratio * accepts) / (requests + 1))


class AdaptiveThrottle:
    """Requests and accepts of the last `window_s` seconds, kept in one-second buckets."""

    def __init__(self, ratio: float = DEFAULT_RATIO, window_s: int = 10, min_requests: int = 20,
                 clock: Callable[[], float] = time.monotonic, chance: Callable[[], float] = random.random) -> None:
        self.ratio = ratio
        self.window_s = window_s
        self.min_requests = min_requests
        self._clock = clock
        self._chance = chance
        self._buckets: deque[list[int]] = deque()  # [second, requests, accepts], oldest first
        self._requests = 0
        self._accepts = 0

    def admits(self) -> bool:
        """Count a request the caller wants to send; False when this client refuses it itself."""
        bucket = self._bucket()
        refused = (self._requests >= self.min_requests
                   and self._chance() < refusal_probability(self._requests, self._accepts, self.ratio))
        bucket[1] += 1
        self._requests += 1
        return not refused

    def unanswered(self) -> None:
        """The request got no reply (a timeout, no responder, no connection): not counted at all.
        An outage is not an overload; retries with backoff take care of it, and a client that
        throttled itself through an outage would hold requests back for a window after it."""
        self._bucket()  # drop what has left the window
        for bucket in reversed(self._buckets):  # the request was counted when sent, maybe seconds ago
            if bucket[1] > 0:
                bucket[1] -= 1
                self._requests -= 1
                return

    def accepted(self) -> None:
        """The service took a request (it answered anything but `unavailable`)."""
        self._bucket()[2] += 1
        self._accepts += 1

    def _bucket(self) -> list[int]:
        second = int(self._clock())
        while self._buckets and self._buckets[0][0] <= second - self.window_s:
            _, requests, accepts = self._buckets.popleft()
            self._requests -= requests
            self._accepts -= accepts
        if not self._buckets or self._buckets[-1][0] != second:
            self._buckets.append([second, 0, 0])
        return self._buckets[-1]
