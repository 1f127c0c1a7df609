"""The search benchmark shows the read-model migrations' progress (a long step printed nothing)."""

from __future__ import annotations

import logging

import pytest

from bench.search_reads import MigrationProgress


def test_migrations_print_each_one_applied_and_their_backfill_every_100000_rows(
    capsys: pytest.CaptureFixture[str],
) -> None:
    logger = logging.getLogger("test.migrations.progress")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(MigrationProgress())
    for changed in range(5_000, 250_001, 5_000):
        logger.info("read-model backfill", extra={"version": 4, "after": "x", "changed": changed})
    logger.info("read-model migration applied", extra={"version": 4, "table": "activities"})
    lines = [line.split("] ", 1)[1] for line in capsys.readouterr().err.splitlines()]
    assert lines == [
        "  migration 4: backfilled 100,000 rows",
        "  migration 4: backfilled 200,000 rows",
        "  migration 4 applied",
    ]
