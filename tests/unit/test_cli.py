"""`dsproxy config check` as an admin runs it."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dsproxy.cli", *args], capture_output=True, text=True, timeout=60)


def test_config_check_accepts_a_good_file(tmp_path: Path) -> None:
    f = tmp_path / "datastore.cfg"
    f.write_text("datastore: store1\n\tpath /srv/a\n\ndatastore: store2\n\tpath /srv/b\n")
    result = run("config", "check", str(f))
    assert result.returncode == 0
    assert "OK, 2 datastores" in result.stdout


def test_config_check_lists_every_bad_line_and_exits_1(tmp_path: Path) -> None:
    f = tmp_path / "datastore.cfg"
    f.write_text("datastore: store1\n\tpath /srv/a\n\tbogus x\n\ndatastore: s\n\tpath /b\n")
    result = run("config", "check", str(f))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"parsing \"{f}\" failed: line 3 - unknown property 'bogus'",
        f'parsing "{f}" failed: line 5 - syntax error in section identifier: value must be at least 3 characters long',
    ]


def test_config_check_defaults_to_the_instance_file_with_base_dir_after_the_subcommand(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "datastore.cfg").write_text("datastore: store1\n\tpath /srv/a\n")
    result = run("config", "check", "--base-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "OK, 1 datastore," in result.stdout
    missing = run("--base-dir", str(tmp_path / "nope"), "config", "check")
    assert missing.returncode == 1 and "no such file" in missing.stderr


def test_a_fleet_manager_with_demo_stores_refuses_to_start_before_it_makes_anything(tmp_path: Path) -> None:
    import os

    from dsproxy.ipc import shm
    from dsproxy.paths import Paths

    base = tmp_path / "base"
    out = run("manager", "--base-dir", str(base), "--etcd", "127.0.0.1:1", "--demo-stores", "3")
    assert out.returncode == 3
    assert "--demo-stores and --etcd" in out.stderr
    run_dir = Paths.resolve(base).run_dir
    assert not (run_dir / "manager.sock").exists()  # nothing bound, no segment left behind
    assert not os.path.exists("/dev/shm" + shm.segment_name(run_dir))


@pytest.mark.parametrize(
    ("state", "says"),
    [
        ("connected", "connected"),
        ("duplicate", "connected; DUPLICATE: another manager runs with this --host-id, config writes refused"),
        ("disconnected", "disconnected since 1970-01-01"),
        ("fenced", "FENCED: every datastore offline here until etcd is back"),
    ],
)
def test_the_fleet_line_of_status_names_each_state(state: str, says: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from dsproxy.cli import _fleet_line

    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    try:
        fleet = {
            "revision": 7, "mirror-revision": 8, "state": state, "hand-edits-refused": 2,
            "disconnected-since": 60.0 if state in ("disconnected", "fenced") else None,
        }  # fmt: skip
        line = _fleet_line(fleet)
    finally:
        monkeypatch.undo()
        time.tzset()
    assert line.startswith("fleet: serving etcd revision 7 (mirror 8)") and says in line
    assert line.endswith(", 2 hand edits refused")
