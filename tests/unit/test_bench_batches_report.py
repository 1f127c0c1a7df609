"""bench/batches.py's summary: each round's ratios to its own raw limit, medians over rounds, and a
report that names both the one-process and the scaled-out figures."""

from __future__ import annotations

from typing import Any

from bench.batches import Plan, encoded_batch, markdown, summarise


def _phase(rate: float, busy: float = 0.5) -> dict[str, Any]:
    return {"activities_per_s": rate, "machine_busy_share": busy, "p50_ms": 1.0, "p99_ms": 2.0}


def _round(raw: float, one: tuple[float, float], scaled: tuple[float, float]) -> dict[str, Any]:
    return {
        "raw_limit": {"rows_per_s": raw, "executemany": {"rows_per_s": raw * 0.9}, "unnest": {"rows_per_s": raw}},
        "one": {"singles": _phase(one[0]), "batches": _phase(one[1])},
        "scaled": {"singles": _phase(scaled[0]), "batches": _phase(scaled[1], 0.9)},
    }


def test_ratios_are_taken_per_round_then_their_median() -> None:
    rounds = [
        _round(40_000, (4_000, 12_000), (5_000, 20_000)),
        _round(60_000, (6_000, 15_000), (6_000, 24_000)),
        _round(50_000, (5_000, 10_000), (5_000, 30_000)),
    ]
    summary = summarise(rounds)
    assert summary["raw_limit_per_s"] == 50_000
    assert summary["one"]["batches_to_raw_per_round"] == [0.3, 0.25, 0.2]
    assert summary["one"]["batches_to_raw"] == 0.25
    assert summary["scaled"]["batches_to_raw_per_round"] == [0.5, 0.4, 0.6]
    assert summary["scaled"]["batches_to_raw"] == 0.5
    assert summary["scaled"]["batches_to_singles"] == 4.0
    assert summary["scaled"]["machine_busy_share"] == 0.9


def test_the_report_shows_both_deployments_against_the_aim() -> None:
    rounds = [_round(40_000, (4_000, 12_000), (5_000, 20_000))]
    plan = Plan(rounds=1)
    cpu = {"batches": {"creates": 20_000, "cpu_us_per_create": 60.0, "creates_per_commit": 150.0},
           "singles": {"creates": 20_000, "cpu_us_per_create": 500.0, "creates_per_commit": 1.2}}
    results = {"date": "d", "machine": "m", "loadavg_start": "0", "loadavg_end": "0", "quick": False, "command": "c",
               "plan": plan.__dict__, "summary": summarise(rounds), "cpu": cpu}
    report = markdown(results)
    assert "| one command process: batches of 100 creates, 4 in flight | 12,000 | **0.3**" in report
    assert "| 2 command processes: batches of 100 creates, 16 in flight | 20,000 | **0.5**" in report
    assert "**60.0** | 150.0 | <= 80 us" in report


def test_batch_bodies_are_encoded_once_and_taken_in_turn() -> None:
    assert encoded_batch(0) is encoded_batch(64)
    assert encoded_batch(0) != encoded_batch(1)
    assert encoded_batch(3).startswith(b'{"commands":[{"op":"create"')
