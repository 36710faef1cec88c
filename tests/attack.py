"""A systemd-like instance for attack tests, and an attacker that is a real unprivileged user.

The layout is the one of ``systemd/`` reproduced on a temp dir: the manager runs as root with
``--store-owner nobody``; the run dir is ``0770 root:nogroup`` (group ``dsproxy`` there) and the
data dir belongs to ``nobody`` -- so uid 65534 is both a member of the run dir's group and the
store owner.  The attacker's actions run as uid/gid 65534 through ``setpriv`` (no other groups).
A root-only file and an empty root-only directory outside every store are the targets; their
snapshots must not change.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from dsproxy.client import Client
from tests.daemons import Daemons

NOBODY = 65534

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="the attacks run as uid 65534 through setpriv: needs root and setpriv",
)


def as_nobody(script: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the Python ``script`` as uid/gid 65534 with no supplementary groups."""
    return subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=check,
        timeout=60,
    )


def spawn_as_nobody(script: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def snapshot(path: Path) -> tuple[object, ...]:
    """What must not change about a target: type, owner, group, mode and content."""
    st = os.lstat(path)
    content: object = sorted(os.listdir(path)) if path.is_dir() else path.read_bytes()
    return (st.st_mode, st.st_uid, st.st_gid, content)


class SystemdLike:
    """Base dir ``/tmp/dsproxy-attack-*`` laid out as under systemd; targets ``secret`` and ``rootdir``."""

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="dsproxy-attack-", dir="/tmp"))
        self.base.chmod(0o755)  # nobody must reach the run and data dirs
        self.run_dir = self.base / "run"
        self.run_dir.mkdir()
        os.chown(self.run_dir, 0, NOBODY)
        self.run_dir.chmod(0o770)
        self.data_dir = self.base / "datastores"
        self.data_dir.mkdir()
        os.chown(self.data_dir, NOBODY, NOBODY)
        self.data_dir.chmod(0o750)
        self.secret = self.base / "secret"
        self.secret.write_bytes(b"root only\n")
        self.secret.chmod(0o600)
        self.rootdir = self.base / "rootdir"
        self.rootdir.mkdir(mode=0o700)
        self.targets = {p: snapshot(p) for p in (self.secret, self.rootdir)}
        self.daemons = Daemons(self.base, stores=2)

    def start_manager(self) -> None:
        self.daemons.start_manager("--store-owner", "nobody")

    def manager(self) -> Client:
        return Client(str(self.run_dir / "manager.sock"), timeout=30.0)

    def assert_targets_untouched(self) -> None:
        for path, before in self.targets.items():
            assert snapshot(path) == before, f"{path} was changed"

    def close(self) -> None:
        try:
            self.daemons.stop()
        finally:
            shutil.rmtree(self.base, ignore_errors=True)
