"""The benchmark's machine probe: the floor it reports under a latency phase's replies."""

import time
from pathlib import Path

from bench.machine_probe import machine_probe, steal_share, summarize_fsyncs


def test_fsync_summary_bounds_the_replies_the_disk_alone_held_past_50_ms() -> None:
    fsyncs = [0.5] * 97 + [60.0, 140.0, 300.0]
    summary = summarize_fsyncs(fsyncs, elapsed_s=10.0)
    assert summary["fsyncs"] == 100
    assert summary["p50_ms"] == 0.5
    assert summary["p99_ms"] == 300.0
    assert summary["max_ms"] == 300.0
    assert summary["stalls_over_50_ms"] == 3
    # (60-50) + (140-50) + (300-50) = 350 ms of the 10 s: 3.5% of steady arrivals wait > 50 ms
    assert summary["share_held_over_50_ms"] == 0.035


def test_fsync_summary_rounds_alike_so_p99_never_exceeds_max() -> None:
    summary = summarize_fsyncs([1.0] * 99 + [10.744], elapsed_s=1.0)
    assert summary["p99_ms"] == summary["max_ms"] == 10.74


def test_fsync_summary_of_no_fsyncs_says_so() -> None:
    assert summarize_fsyncs([], elapsed_s=1.0) == {"fsyncs": 0}


def test_steal_share_is_the_stolen_part_of_all_cpu_time() -> None:
    before = [100, 0, 50, 800, 10, 0, 5, 35, 0, 0]
    after = [300, 0, 100, 1435, 20, 0, 10, 135, 0, 0]  # 1000 ticks spent, 100 of them stolen
    assert steal_share(before, after) == 0.1
    assert steal_share(None, after) is None
    assert steal_share(before, before) is None  # no time passed


def test_probe_measures_real_fsyncs_and_cpu_and_leaves_no_file(tmp_path: Path) -> None:
    with machine_probe(tmp_path) as machine:
        time.sleep(1.0)
    disk = machine["disk_fsync"]
    assert disk["fsyncs"] >= 10  # one every 10 ms plus the fsync itself
    assert 0 < disk["p50_ms"] <= disk["p99_ms"] <= disk["max_ms"]
    assert 0.0 <= machine["cpu_steal_share"] < 1.0
    assert list(tmp_path.iterdir()) == []
