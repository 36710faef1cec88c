"""scripts/bench-lookup runs end to end (tiny grid) and writes its table, JSON and chart."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_lookup_small_run_writes_table_json_and_plot(tmp_path: Path) -> None:
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "bench-lookup"),
            "--stores", "12", "--grid", "1x5,10x1", "--runs", "1", "--warmup", "0",
            "--inprocess-stores", "12", "--repeats", "1",
            "--json", str(out_json), "--plot", str(out_png),
        ],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "drop-direct: whole process, 12 stores" in result.stdout
    assert "bulk-drop" in result.stdout and "on vs off" in result.stdout
    data = json.loads(out_json.read_text())
    assert {(r["program"], r["m"], r["n"], r["mode"]) for r in data["rows"]} == {
        (p, m, n, mode)
        for p in ("drop-direct", "bulk-drop")
        for m, n in ((1, 5), (10, 1))
        for mode in ("off", "config", "on")
    }
    assert all(r["mean_s"] > 0 for r in data["rows"])
    assert all(s["on_vs_off"] > 0 and s["on_vs_config"] > 0 for s in data["speedups"])
    assert data["inprocess"][0]["stores"] == 12 and data["inprocess"][0]["median_ns"] > 0
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_lookup_rejects_a_bad_grid() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench-lookup"), "--stores", "5", "--grid", "10x1"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert "needs at least 10 stores" in result.stderr
