"""scripts/bench-status and bench-http-stack run end to end (small) and report what they promise."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.daemons import Daemons

ROOT = Path(__file__).resolve().parents[2]


def test_bench_status_small_run_writes_table_json_and_plot(tmp_path: Path) -> None:
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    result = subprocess.run(
        [
            sys.executable, str(ROOT / "scripts" / "bench-status"),
            "--stores", "20", "--rounds", "2", "--parallel", "4", "--modes", "config,on", "--writes", "2",
            "--min-round-seconds", "0.2", "--json", str(out_json), "--plot", str(out_png),
        ],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "bench-status: 20 stores, 2 rounds, 4 connections" in result.stdout
    assert "ping floor" in result.stdout and "on warm rounds / ping floor" in result.stdout
    data = json.loads(out_json.read_text())
    for mode in ("config", "on"):
        res = data["results"][mode]
        assert res["errors"] == 0 and len(res["rounds"]) == 2 and res["stores"] == 20
        for r in res["rounds"] + res["ping"]:  # the store list again and again, for 0.2 s at least
            assert r["wall"] >= 0.2 and r["passes"] >= 1 and r["requests"] == 20 * r["passes"]
        assert res["worker_rss_mb"] > 0
    writes = data["results"]["on"]["writes"]
    assert writes["update_p50_ms"] > 0 and writes["manual_edit_visible_s"] > 0
    assert "on / config total throughput" in data["ratios"]
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_status_against_a_running_proxy(daemons: Daemons) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench-status"), "--socket", daemons.proxy_sock, "--rounds", "2", "--min-round-seconds", "0", "--clients", "2"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "as-is" in result.stdout


def test_bench_status_rejects_a_bad_mode() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench-status"), "--modes", "on,fast"], capture_output=True, text=True
    )
    assert result.returncode == 2 and "--modes takes a list of off, config, on" in result.stderr


def test_bench_http_stack_compares_both_servers(tmp_path: Path) -> None:
    out = tmp_path / "h.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench-http-stack"), "--requests", "500", "--rounds", "2", "--min-round-seconds", "0", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert [r["server"] for r in json.loads(out.read_text())] == ["dsproxy", "uvicorn"]
    assert "dsproxy / uvicorn throughput" in result.stdout
