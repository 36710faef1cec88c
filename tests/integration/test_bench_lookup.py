"""scripts/bench-lookup runs end to end (tiny grid) and writes its table, JSON and chart."""

from __future__ import annotations

from pathlib import Path

from tests.helpers import run_bench, run_script


def test_bench_lookup_small_run_writes_table_json_and_plot(tmp_path: Path) -> None:
    out, data = run_bench(
        "bench-lookup", tmp_path,
        "--stores", "12", "--grid", "1x5,10x1", "--runs", "1", "--warmup", "0", "--inprocess-stores", "12", "--repeats", "1",
    )  # fmt: skip
    assert "drop-direct: whole process, 12 stores" in out
    assert "bulk-drop" in out and "on vs off" in out
    assert {(r["program"], r["m"], r["n"], r["mode"]) for r in data["rows"]} == {
        (p, m, n, mode)
        for p in ("drop-direct", "bulk-drop")
        for m, n in ((1, 5), (10, 1))
        for mode in ("off", "config", "on")
    }
    assert all(r["mean_s"] > 0 for r in data["rows"])
    assert all(s["on_vs_off"] > 0 and s["on_vs_config"] > 0 for s in data["speedups"])
    assert data["inprocess"][0]["stores"] == 12 and data["inprocess"][0]["median_ns"] > 0


def test_bench_lookup_rejects_a_bad_grid() -> None:
    result = run_script("bench-lookup", "--stores", "5", "--grid", "10x1", timeout=60)
    assert result.returncode == 2
    assert "needs at least 10 stores" in result.stderr
