"""Opening without following links (issue 8): the helpers and the files that use them."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from dsproxy import fsutil
from dsproxy.config import LockError, config_lock, replace_file
from dsproxy.daemon import systemd
from dsproxy.daemon.journal import CreateJournal
from dsproxy.ipc import flock
from dsproxy.ipc.opfile import FileCounters, OpFileError
from dsproxy.paths import Paths


def test_a_walk_refuses_a_link_anywhere_in_the_path_and_names_it(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(fsutil.UnsafePath) as err:
        fsutil.walk(str(tmp_path / "link" / "store"), create_mode=0o750)
    assert str(err.value) == f"'{tmp_path / 'link'}' is a symbolic link (refused: links are not followed here)"
    assert not (tmp_path / "real" / "store").exists()
    with fsutil.walk(str(tmp_path / "a" / "b"), create_mode=0o750) as chain:
        assert chain.path(chain.created_from) == str(tmp_path / "a")
        assert os.path.samestat(os.fstat(chain.fd), os.stat(tmp_path / "a" / "b"))
    assert fsutil.first_missing(str(tmp_path / "a" / "b" / "c" / "d")) == str(tmp_path / "a" / "b" / "c")


def test_paths_compare_by_components_and_a_leading_double_slash_collapses() -> None:
    assert fsutil.normalise("//srv/a/") == "/srv/a"
    assert fsutil.normalise("///srv/./a") == "/srv/a"
    assert fsutil.is_within("//srv/a/sub", "/srv/a")
    assert fsutil.is_within("/srv/a", "/srv/a/")
    assert not fsutil.is_within("/srv/ab", "/srv/a")


def test_a_planted_fifo_hard_link_or_link_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    other = tmp_path / "other"
    other.write_text("x")
    os.link(other, tmp_path / "hard")
    (tmp_path / "sym").symlink_to(tmp_path / "nowhere")
    for name, reason in (("fifo", "not a regular file"), ("hard", "hard links"), ("sym", "symbolic link")):
        with pytest.raises(fsutil.UnsafePath, match=reason):
            fsutil.open_file(tmp_path / name, os.O_WRONLY | os.O_CREAT)
    assert not (tmp_path / "nowhere").exists() and other.read_text() == "x"


def test_a_run_dir_lock_replaces_a_planted_link_and_the_config_lock_refuses_it(tmp_path: Path) -> None:
    lock = tmp_path / "shm.lock"
    lock.symlink_to(tmp_path / "target")
    with flock.exclusive(lock, 1.0, replace_unsafe=True):
        assert lock.is_file() and not lock.is_symlink()
    assert not (tmp_path / "target").exists()
    cfg_lock = tmp_path / ".datastore.lck"
    cfg_lock.symlink_to(tmp_path / "target")
    with pytest.raises(LockError, match="symbolic link"), config_lock(cfg_lock):
        pass
    assert not (tmp_path / "target").exists()


def test_replace_file_writes_no_link_and_leaves_no_temp(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep")
    for fixed in (".datastore.cfg.tmp", ".datastore.cfg.tmp_x"):
        (tmp_path / fixed).symlink_to(victim)
    replace_file(tmp_path / "datastore.cfg", b"new\n")
    assert (tmp_path / "datastore.cfg").read_bytes() == b"new\n"
    assert stat.S_IMODE(os.stat(tmp_path / "datastore.cfg").st_mode) == 0o640
    assert victim.read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [".datastore.cfg.tmp", ".datastore.cfg.tmp_x", "datastore.cfg", "victim"]
    )


def test_the_pid_file_replaces_a_link_instead_of_writing_through_it(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (tmp_path / "manager.pid.tmp").symlink_to(victim)
    (tmp_path / "manager.pid").symlink_to(victim)
    assert systemd.write_pid_file(tmp_path / "manager.pid")
    assert (tmp_path / "manager.pid").read_text() == f"{os.getpid()}\n"
    assert victim.read_text() == "keep"
    (tmp_path / "manager.pid").unlink()
    (tmp_path / "manager.pid").mkdir()  # cannot be replaced: a warning, not a crash
    assert systemd.write_pid_file(tmp_path / "manager.pid") is False


def test_counter_files_refuse_a_linked_directory_and_a_fifo_without_blocking(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = tmp_path / "run"
    run.mkdir()
    (run / "active-operations").symlink_to(elsewhere)
    counters = FileCounters(run)
    with pytest.raises(OpFileError, match="symbolic link"):
        counters.update("store1", 0, 1)
    assert list(elsewhere.iterdir()) == []
    (run / "active-operations").unlink()
    (run / "active-operations").mkdir()
    os.mkfifo(run / "active-operations" / "store2")
    done = threading.Event()

    def read() -> None:
        assert counters.totals("store2") == (0, 0)
        done.set()

    threading.Thread(target=read, daemon=True).start()
    assert done.wait(5), "reading a planted FIFO blocked"
    assert counters.update("store1", 1, 1) == (0, 1)
    assert counters.totals("store1") == (0, 1)


def test_ensure_refuses_a_config_dir_another_user_owns(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give the directory to another user")
    paths = Paths.resolve(tmp_path / "base")
    paths.ensure()
    os.chown(paths.config_dir, 65534, 65534)
    with pytest.raises(fsutil.UnsafePath, match="owned by uid 65534"):
        paths.ensure()
    os.chown(paths.run_dir, 65534, 65534)  # the run dir is shared on purpose: not refused for that
    os.chown(paths.config_dir, 0, 0)
    paths.ensure()


def test_ensure_refuses_a_config_dir_every_user_can_write(tmp_path: Path) -> None:
    """Anyone could swap datastore.cfg or add the overlay beside it (a sticky bit still lets them
    add a file); a group-writable one is the admin's choice of who edits the config."""
    paths = Paths.resolve(tmp_path / "base")
    paths.ensure()
    for mode in (0o777, 0o1777):
        os.chmod(paths.config_dir, mode)
        with pytest.raises(fsutil.UnsafePath, match=f"writable by every user \\(mode {mode:04o}\\)"):
            paths.ensure()
    os.chmod(paths.config_dir, 0o770)
    os.chmod(paths.run_dir, 0o777)  # the run dir is shared on purpose: not refused for that
    paths.ensure()


def test_the_journal_keeps_only_open_creates_and_ignores_a_torn_line(tmp_path: Path) -> None:
    journal = CreateJournal(tmp_path)
    first = journal.begin("a", "/srv/a", "/srv/a")
    journal.begin("b", "/srv/b", None)
    journal.end(first)
    with open(journal.path, "a") as f:
        f.write('{"begin": "torn", "na')
    assert [(e.name, e.path, e.top) for e in CreateJournal(tmp_path).pending()] == [("b", "/srv/b", None)]
    journal.keep([])
    assert not os.path.exists(journal.path)


def test_a_file_written_from_many_buffers_holds_them_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The manager writes datastore.cfg as a list of blocks: more than one ``writev`` can take,
    and a short write that ends inside a buffer, still give the joined bytes."""
    pieces = [f"block {i}\n".encode() * (i % 7) for i in range(3000)]  # > IOV_MAX, empty ones too
    replace_file(tmp_path / "cfg", pieces)
    monkeypatch.setattr(os, "writev", lambda fd, bufs: os.write(fd, bytes(bufs[0])[:3]))  # 3 bytes a call
    replace_file(tmp_path / "small", pieces[:40])
    assert (tmp_path / "cfg").read_bytes() == b"".join(pieces)
    assert (tmp_path / "small").read_bytes() == b"".join(pieces[:40])
