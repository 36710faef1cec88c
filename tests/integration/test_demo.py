"""``scripts/demo --exit``: the README's first command, as a new user runs it.

It installs (``scripts/install-deps``: with the venv already there, a quick no-op), starts
``dsproxy run`` with demo stores, benchmarks it, prints the status and stops.  The test runs it on a
private base directory with a few stores and checks what the user would look at: exit status 0,
the benchmark's table, the status lines, and nothing left running or in ``/dev/shm`` afterwards.
First pass of ``scripts/test`` only (like the systemd e2e: it tests the script, not the caches).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import psutil  # type: ignore[import-untyped]
import pytest

from dsproxy.ipc import shm
from dsproxy.paths import Paths

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(300)


def test_demo_exits_cleanly_after_benchmarking_and_printing_status(tmp_path: Path) -> None:
    if os.environ.get("DSPROXY_DEBUG_DISCARD_CACHES", "") not in ("", "0"):
        pytest.skip("the demo runs in the first pass only (it tests the script, not the caches)")
    base = tmp_path / "base"
    env = {**os.environ, "DSPROXY_BASE_DIR": str(base), "STORES": "30", "WORKERS": "1"}
    env.pop("DSPROXY_DEBUG_DISCARD_CACHES", None)
    proc = subprocess.run(
        [str(ROOT / "scripts" / "demo"), "--exit"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=240,
    )
    out = proc.stdout
    print(out)
    assert proc.returncode == 0, out[-3000:]
    assert "== bench-status against the running proxy" in out
    assert "30 stores" in out
    assert "as-is warm rounds / ping floor" in out  # the benchmark's ratio table
    assert "generation" in out and "cache=on" in out  # `dsproxy status`
    assert "demo0001" in out  # the status's store table
    run_dir = Paths.resolve(base).run_dir
    left = [
        p.info["pid"]
        for p in psutil.process_iter(["pid", "cmdline"])
        if str(base) in " ".join(p.info["cmdline"] or [])
        or "dsproxy run --demo-stores 30" in " ".join(p.info["cmdline"] or [])
    ]
    assert not left, f"processes left running after the demo: {left}"
    assert not Path("/dev/shm" + shm.segment_name(run_dir)).exists(), "the demo left its shared memory behind"
