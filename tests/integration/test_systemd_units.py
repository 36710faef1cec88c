"""The shipped units are valid for systemd and install where the script says."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNITS = ("dsproxy-manager.service", "dsproxy-proxy.service", "dsproxy-proxy.socket")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_install_systemd_stages_units_that_systemd_analyze_verifies(tmp_path: Path) -> None:
    dsproxy_bin = Path(sys.executable).parent / "dsproxy"
    assert dsproxy_bin.exists()
    env = {**os.environ, "DESTDIR": str(tmp_path)}
    prefix = str(dsproxy_bin.parent.parent)
    subprocess.run([str(ROOT / "scripts" / "install-systemd"), "--prefix", prefix, "--no-start"], check=True, env=env)
    unitdir = tmp_path / "etc" / "systemd" / "system"
    for unit in UNITS:
        text = (unitdir / unit).read_text()
        if unit.endswith(".service"):
            assert f"ExecStart={dsproxy_bin} " in text
            assert "Type=notify" in text and "NotifyAccess=main" in text and "WatchdogSec=" in text
    assert "LimitNOFILE=1048576" in (unitdir / "dsproxy-proxy.service.d" / "10-limits.conf").read_text()
    assert (tmp_path / "etc" / "sysusers.d" / "dsproxy.conf").exists()
    assert (tmp_path / "etc" / "tmpfiles.d" / "dsproxy.conf").exists()
    result = subprocess.run(
        ["systemd-analyze", "verify", *(str(unitdir / u) for u in UNITS)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    # nothing but harmless notes about the host
    assert "dsproxy" not in result.stderr, result.stderr


#: the ceilings of issue 11; the units score lower today (README): a weakened sandbox fails here
SECURITY_CEILINGS = {"dsproxy-proxy.service": 2.0, "dsproxy-manager.service": 4.5}


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("unit", sorted(SECURITY_CEILINGS))
def test_the_units_are_sandboxed_below_their_exposure_ceiling(unit: str) -> None:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(ROOT / "systemd" / unit)],
        capture_output=True,
        text=True,
    )
    match = re.search(rf"Overall exposure level for {re.escape(unit)}: (\d+\.\d+)", result.stdout + result.stderr)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= SECURITY_CEILINGS[unit], result.stdout


def test_the_sandbox_keeps_the_shared_memory_shared() -> None:
    """Both units must map the same /dev/shm objects: no private IPC, no hidden /dev/shm, no
    RemoveIPC= (it would delete the manager's segment, group dsproxy, at every proxy stop)."""
    for unit in ("dsproxy-manager.service", "dsproxy-proxy.service"):
        directives = {
            line.split("=", 1)[0]: line.split("=", 1)[1]
            for line in (ROOT / "systemd" / unit).read_text().splitlines()
            if "=" in line and not line.startswith("#")
        }
        assert directives.get("PrivateIPC", "no") == "no", unit
        assert directives.get("RemoveIPC", "no") == "no", unit
        assert "/dev/shm" not in directives.get("InaccessiblePaths", "") + directives.get("TemporaryFileSystem", "")
        assert directives.get("ProtectSystem") == "strict" and directives.get("NoNewPrivileges") == "yes", unit
