"""Advisory lock keys. Single-active leadership itself belongs to the tracked-consumer core
(projections/consumer.py, `TrackedConsumer`), which runs one active instance per consumer name."""

from __future__ import annotations

from projections.consumer import lock_key

__all__ = ["lock_key"]
