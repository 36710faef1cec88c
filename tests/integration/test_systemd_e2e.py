"""dsproxy under a real systemd: ``scripts/systemd-e2e``, one test per line it prints.

The script boots systemd 252 as PID 1 in private namespaces, installs with the real
``scripts/install-systemd`` and checks start, fd limits, journald, writes, reload, SIGKILL, the
watchdog, socket activation and stop (see its docstring).  It runs once per session (about a
minute with the cached venv); each check is reported as its own test.  Skipped, with the reason,
only where the boot is impossible (not root, no unshare, no cgroup access) and in the second pass
of ``scripts/test`` (``DSPROXY_DEBUG_DISCARD_CACHES=1``: the e2e exercises the units, not the
caches, and one run per CI job is enough).  ``-m "not systemd_e2e"`` deselects it.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "systemd-e2e"
EXIT_SKIP = 77
RUN_TIMEOUT = 540.0


def _script() -> Any:
    loader = importlib.machinery.SourceFileLoader("systemd_e2e_script", str(SCRIPT))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


CHECKS = ["boot", "install", *(name for name, _ in _script().CHECKS), "cleanup"]

pytestmark = [pytest.mark.systemd_e2e, pytest.mark.timeout(RUN_TIMEOUT + 60)]


@pytest.fixture(scope="module")
def e2e_lines() -> dict[str, str]:
    """Run the script once; its lines by check name (``PASS|FAIL name detail``)."""
    if os.environ.get("DSPROXY_DEBUG_DISCARD_CACHES", "") not in ("", "0"):
        pytest.skip("the systemd e2e runs in the first pass only (it tests the units, not the caches)")
    if os.geteuid() != 0:
        pytest.skip("the systemd e2e needs root (namespaces, mounts, cgroups)")
    proc = subprocess.Popen([sys.executable, str(SCRIPT)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the script cleans up (namespace, cgroups) on SIGTERM
        output, _ = proc.communicate(timeout=60)
    print(output)
    if proc.returncode == EXIT_SKIP:
        pytest.skip(output.strip().removeprefix("SKIP ").strip())
    lines: dict[str, str] = {}
    for line in output.splitlines():
        verdict, _, rest = line.partition(" ")
        if verdict in ("PASS", "FAIL"):
            name = rest.partition(" ")[0]
            lines.setdefault(name, line)
            if verdict == "FAIL":
                lines[name] = line
    lines["_output"] = output
    lines["_returncode"] = str(proc.returncode)
    return lines


@pytest.mark.parametrize("check", CHECKS)
def test_systemd_e2e(e2e_lines: dict[str, str], check: str) -> None:
    line = e2e_lines.get(check)
    if line is None:
        pytest.fail(f"no line for {check!r} (exit {e2e_lines['_returncode']}):\n{e2e_lines['_output']}")
    print(line)
    assert line.startswith("PASS "), line


def test_systemd_e2e_exits_zero_only_when_every_check_passed(e2e_lines: dict[str, str]) -> None:
    failed = [line for line in e2e_lines["_output"].splitlines() if line.startswith("FAIL")]
    assert (e2e_lines["_returncode"] == "0") == (not failed), e2e_lines["_output"]
