"""scripts/bench-fleet runs end to end (tiny: 50 stores, 20 writes) and reports every figure it promises."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsproxy.testing import fleetbench, scale
from tests.helpers import run_bench, run_script

TINY = (
    "--workers", "1", "--writes", "20", "--throughput-writes", "10", "--transitions", "3", "--floor-repeats", "20",
)  # fmt: skip


@pytest.mark.timeout(90)
def test_bench_fleet_small_run_writes_table_json_and_plot(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    out, data = run_bench("bench-fleet", tmp_path, "--stores", "50", "--layout-dir", str(layout), *TINY)
    for header in ("put_if p50/p99 ms", "put->watch p50/p99 ms", "ack p50/p99 ms", "served p50/p99 ms", "after ack p50/p99 ms",
                   "writes/s",
                   "offline p50/p99 ms", "cold start s [manager]", "targets of issue 13"):  # fmt: skip
        assert header in out, header
    assert "error" not in out
    (row,) = data["rows"]
    assert "error" not in row, row["error"]
    assert row["stores"] == 50 and row["populate"]["keys"] == 50 and row["layout"]["made"] == 50
    floor = row["floor"]
    for key in ("put_if", "watch"):
        assert 0 < floor[f"{key}_p50_ms"] <= floor[f"{key}_p99_ms"]
    assert len(row["served"]) == 20 and row["pollers"] == 3  # one worker on each of the 3 hosts
    assert 0 < row["ack_p50_ms"] <= row["served_p50_ms"] <= row["served_p99_ms"]
    after = [s - a for s, a in zip(row["served"], row["acks"], strict=True)]
    assert (
        min(after) >= 0
        and row["after_ack_p99_ms"] <= row["served_p99_ms"]
        and max(after) * 1e3 >= row["after_ack_p99_ms"]
    )
    assert "served from the send at 50 stores" in out and row["quiet_s"] >= fleetbench.QUIET_SETTLE
    assert row["throughput_wps"] > 0 and row["throughput_writes"] == 10
    assert len(row["offline"]) == 3 and 0 < row["offline_p50_ms"] <= row["offline_p99_ms"]
    assert row["online_p50_ms"] > 0
    cold = row["cold_start"]
    assert 0 < cold["manager_s"] < cold["serving_s"] and cold["revision"] > row["populate"]["revision"]
    assert 0 <= cold["etcd_read_s"] <= cold["manager_s"] and "cold start at 50 stores: the manager answered" in out
    for daemon in ("manager", "proxy"):
        assert (
            cold["cpu"][daemon]["user_s"] + cold["cpu"][daemon]["sys_s"] > 0 and cold["cpu"][daemon]["minor_faults"] > 0
        )
    assert "CPU user/system until then: manager" in out
    targets = {t["target"]: t for t in data["targets"]}
    assert set(targets) == {
        "acknowledged -> served everywhere p99 / etcd put->watch p99 at 50 <= 3",
        "offline transition p50 at 50 (ms) <= 50",
        "cold start to serving at 50 (s) <= 3",
    }
    assert all(t["value"] is not None and t["holds"] is not None for t in targets.values())
    assert (layout / scale.sections(layout, 1).popitem()[0] / ".lock").is_file()  # the lay-out is kept


def test_bench_fleet_reports_a_failed_row_and_exits_1(tmp_path: Path) -> None:
    out = tmp_path / "failed.json"
    result = run_script("bench-fleet", "--stores", "5", "--ready-timeout", "0.001", *TINY, "--json", out)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "rows that failed: 5" in result.stderr
    (row,) = json.loads(out.read_text())["rows"]
    assert row["populate"]["keys"] == 5 and "floor" not in row  # measured up to the failure
    assert "DaemonFailed" in row["error"] and "DaemonFailed" in result.stdout


def test_bench_fleet_rejects_a_bad_store_list() -> None:
    result = run_script("bench-fleet", "--stores", "1k")
    assert result.returncode == 2 and "--stores takes a comma-separated list" in result.stderr
