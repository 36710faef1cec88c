"""The manager's locked write of datastore.cfg."""

from __future__ import annotations

import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dsproxy import config
from dsproxy.config import DigestMismatch, LockError, ParseError, update_config


def _add(name: str, path: str):
    def mutate(cfg: config.SectionConfig) -> None:
        cfg[name] = {"path": path}

    return mutate


def test_write_replaces_the_file_atomically_with_mode_0640(tmp_path: Path) -> None:
    cfg_file = tmp_path / "datastore.cfg"
    new, digest, _ = update_config(cfg_file, _add("store1", "/srv/a"))
    assert cfg_file.read_text() == "datastore: store1\n\tpath /srv/a\n"
    assert stat.S_IMODE(cfg_file.stat().st_mode) == 0o640
    assert digest == config.digest(cfg_file.read_bytes())
    assert new == {"store1": {"path": "/srv/a"}}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".datastore.lck", "datastore.cfg"]  # no temp left


def test_generation_is_bumped_after_the_new_file_is_in_place(tmp_path: Path) -> None:
    cfg_file = tmp_path / "datastore.cfg"
    seen: list[str] = []

    def bump() -> int:
        seen.append(cfg_file.read_text())
        return 7

    _, _, gen = update_config(cfg_file, _add("store1", "/srv/a"), bump=bump)
    assert gen == 7
    assert seen == ["datastore: store1\n\tpath /srv/a\n"]


def test_stale_digest_is_refused_and_nothing_written(tmp_path: Path) -> None:
    cfg_file = tmp_path / "datastore.cfg"
    _, first, _ = update_config(cfg_file, _add("store1", "/srv/a"))
    update_config(cfg_file, _add("store2", "/srv/b"), expected_digest=first)
    before = cfg_file.read_bytes()
    with pytest.raises(
        DigestMismatch, match=r"detected modified configuration - file changed by other user\? Try again\."
    ):
        update_config(cfg_file, _add("store3", "/srv/c"), expected_digest=first)
    assert cfg_file.read_bytes() == before


def test_a_broken_hand_edit_is_never_overwritten(tmp_path: Path) -> None:
    cfg_file = tmp_path / "datastore.cfg"
    cfg_file.write_text("datastore: store1\n\tpath /srv/a\n\tbogus 1\n")
    with pytest.raises(ParseError, match="line 3 - unknown property 'bogus'"):
        update_config(cfg_file, _add("store2", "/srv/b"))
    assert cfg_file.read_text() == "datastore: store1\n\tpath /srv/a\n\tbogus 1\n"


def test_lock_held_by_another_process_times_out_with_a_clear_error(tmp_path: Path) -> None:
    cfg_file = tmp_path / "datastore.cfg"
    lock = tmp_path / ".datastore.lck"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import fcntl, os, sys, time
                fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT)
                fcntl.flock(fd, fcntl.LOCK_EX)
                print("locked", flush=True)
                time.sleep(60)
                """
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        start = time.monotonic()
        with pytest.raises(LockError) as info:
            update_config(cfg_file, _add("store1", "/srv/a"), timeout=0.3)
        assert time.monotonic() - start >= 0.3
        assert str(info.value) == f'unable to acquire lock "{lock}" - timed out after 0.3 s'
        holder.kill()
        holder.wait()
        # the kernel released the dead holder's lock: the next write goes through
        update_config(cfg_file, _add("store1", "/srv/a"), timeout=5)
        assert "store1" in cfg_file.read_text()
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout:
            holder.stdout.close()
