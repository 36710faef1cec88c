"""The shipped units are valid for systemd and install where the script says."""

from __future__ import annotations

import os
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
