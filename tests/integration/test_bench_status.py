"""scripts/bench-status and bench-http-stack run end to end (small) and report what they promise."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import subprocess
import sys
import termios
from pathlib import Path

from tests.daemons import Daemons, wait_for
from tests.helpers import run_bench, run_script


def test_bench_status_small_run_writes_table_json_and_plot(tmp_path: Path) -> None:
    out, data = run_bench(
        "bench-status", tmp_path,
        "--stores", "20", "--rounds", "2", "--parallel", "4", "--modes", "config,on", "--writes", "2",
        "--min-round-seconds", "0.2",
    )  # fmt: skip
    assert "bench-status: 20 stores, 2 rounds, 4 connections" in out
    assert "ping floor" in out and "on warm rounds / ping floor" in out
    for mode in ("config", "on"):
        res = data["results"][mode]
        assert res["errors"] == 0 and len(res["rounds"]) == 2 and res["stores"] == 20
        for r in res["rounds"] + res["ping"]:  # the store list again and again, for 0.2 s at least
            assert r["wall"] >= 0.2 and r["passes"] >= 1 and r["requests"] == 20 * r["passes"]
        assert res["worker_rss_mb"] > 0
    writes = data["results"]["on"]["writes"]
    assert writes["update_p50_ms"] > 0 and writes["manual_edit_visible_s"] > 0
    assert "on / config total throughput" in data["ratios"]


def test_bench_status_against_a_running_proxy(daemons: Daemons) -> None:
    result = run_script(
        "bench-status", "--socket", daemons.proxy_sock, "--rounds", "2", "--min-round-seconds", "0", "--clients", "2"
    )
    assert result.returncode == 0, result.stderr
    assert "as-is" in result.stdout


def test_bench_status_over_https_measures_the_ping_floor_and_names_401s(tmp_path: Path) -> None:
    """Until tokens exist every status request over TCP is refused: the run says so and fails,
    while both ping floors (HTTPS, unauthenticated, and the Unix socket's) are measured."""
    out_json = tmp_path / "tls.json"
    result = run_script(
        "bench-status", "--tls", "--stores", "10", "--rounds", "2", "--parallel", "4", "--modes", "on",
        "--writes", "0", "--min-round-seconds", "0.2", "--token", "bench@pbs!t:not-a-secret", "--json", out_json,
    )  # fmt: skip
    assert result.returncode == 1
    assert "401: no token or a refused one" in result.stderr and "HTTPS ping floor" in result.stderr
    data = json.loads(out_json.read_text())
    on = data["results"]["on"]
    assert on["tls"] and on["ping_rps"] > 0 and on["unix_ping_rps"] > 0
    assert all(p["errors"] == 0 for p in on["ping"])  # the floor: ping passes the gate unauthenticated
    assert all(r["errors_by_kind"] == {"401": r["requests"]} for r in on["rounds"])
    assert "on HTTPS ping floor / Unix ping floor" in data["ratios"]
    assert "not-a-secret" not in out_json.read_text() + result.stdout + result.stderr


UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def test_bench_status_over_https_with_a_token_it_makes_and_revokes(tmp_path: Path) -> None:
    """--token without a value: the bench makes root@pam!bench in its instance and grants it, so
    every status over HTTPS is a 200; at the end it revokes it and times the refusal by every worker."""
    out_json = tmp_path / "token.json"
    result = run_script(
        "bench-status", "--tls", "--token", "--stores", "20", "--rounds", "2", "--parallel", "4", "--workers", "2",
        "--modes", "on", "--writes", "0", "--min-round-seconds", "0.2", "--json", out_json, check=True,
    )  # fmt: skip
    data = json.loads(out_json.read_text())
    on = data["results"]["on"]
    assert on["tls"] and on["errors"] == 0 and on["token"] == "root@pam!bench"
    assert all(r["requests"] > 0 and r["errors_by_kind"] == {} for r in on["rounds"])
    assert on["revoke_workers"] == 2 and on["revoke_refused_s"] > 0  # every worker refused it (bounded: 30 s)
    assert "on revoke -> refused by every worker: " in result.stderr
    assert data["ratios"]["revoke -> refused by every worker, slowest mode, s (<= 2)"] == on["revoke_refused_s"]
    assert "on warm rounds / HTTPS ping floor (>= 0.7)" in data["ratios"]
    # the secret (a UUID) is in no output and not in the figures
    shown = out_json.read_text() + result.stdout + result.stderr
    assert UUID.search(shown) is None and "PBSAPIToken" not in shown


def test_load_generator_child_writes_all_of_its_json_into_a_full_pipe(daemons: Daemons) -> None:
    """A child of a --clients run whose parent is still reading another child's results fills its
    pipe: its JSON must come whole (it was cut at 64 KiB under PYTHONUNBUFFERED=1)."""
    child = subprocess.Popen(
        [sys.executable, "-m", "dsproxy.testing.loadgen", daemons.proxy_sock, "2", "0"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert child.stdin is not None and child.stdout is not None
    child.stdin.write(json.dumps({"groups": [[["/api2/json/ping"] * 12_000]], "cafile": None, "headers": []}).encode())
    child.stdin.close()

    def pipe_full_or_exited() -> bool:
        waiting = bytearray(4)
        fcntl.ioctl(child.stdout.fileno(), termios.FIONREAD, waiting)  # type: ignore[union-attr]
        return int.from_bytes(waiting, sys.byteorder) >= 65536 or child.poll() is not None

    wait_for(pipe_full_or_exited, timeout=120, what="the child's results")  # not read yet: the pipe fills
    with contextlib.suppress(subprocess.TimeoutExpired):  # a short write here comes within ~20 ms
        child.wait(timeout=1.0)  # the (fixed) child stays blocked in its next write until we read
    with child.stdout:
        results = json.loads(child.stdout.read())
    assert child.wait(timeout=60) == 0
    assert len(results[0][0]["latencies"]) == 12_000


def test_bench_status_rejects_a_bad_mode() -> None:
    result = run_script("bench-status", "--modes", "on,fast")
    assert result.returncode == 2 and "--modes takes a list of off, config, on" in result.stderr


def test_bench_http_stack_compares_both_servers(tmp_path: Path) -> None:
    out = tmp_path / "h.json"
    result = run_script(
        "bench-http-stack", "--requests", "500", "--rounds", "2", "--min-round-seconds", "0", "--json", out
    )
    assert result.returncode == 0, result.stderr
    assert [r["server"] for r in json.loads(out.read_text())] == ["dsproxy", "uvicorn"]
    assert "dsproxy / uvicorn throughput" in result.stdout
