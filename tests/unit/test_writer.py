"""The manager's config writer in-process: a ConfigWriter on a temp dir with a real segment.

No daemon, no socket: each case drives :class:`~dsproxy.daemon.writer.ConfigWriter` directly
(as the manager's writer thread does) and takes milliseconds.
"""

from __future__ import annotations

import contextlib
import os
import time

import pytest

import dsproxy
from dsproxy.config import DigestMismatch, LockError, Operation, PropertyError, WriteError, digest, read_config
from dsproxy.daemon import writer as writer_mod
from dsproxy.daemon.writer import ConfigWriter, WriteRefused, _status_of
from dsproxy.ipc import shm
from dsproxy.paths import Paths


@pytest.fixture
def writer(paths: Paths, seg: shm.Segment) -> ConfigWriter:
    return ConfigWriter(paths, lambda: seg)


def _refused(call: object, *args: object) -> WriteRefused:
    assert callable(call)
    with pytest.raises(WriteRefused) as info:
        call(*args)
    return info.value


def test_create_lays_the_store_out_names_it_and_publishes(writer: ConfigWriter, seg: shm.Segment) -> None:
    before = seg.generation()
    result = writer.create({"name": "store1", "comment": "first"})
    store = writer.paths.data_dir / "store1"
    assert (store / ".chunks").is_dir() and (store / ".lock").is_file()
    cfg, file_digest = read_config(writer.config_file)
    assert cfg["store1"] == {"path": str(store), "comment": "first"}
    assert result.digest == file_digest == digest(writer.config_file.read_bytes())
    assert result.generation == seg.generation() == before + 1  # published after the write
    assert _refused(writer.create, {"name": "store1"}).status == 409
    nested = _refused(writer.create, {"name": "inner", "path": str(store / "sub")})
    assert nested.status == 400 and "inside datastore 'store1'" in nested.message
    assert not (store / "sub").exists()  # nothing laid out for a refused create


def test_a_refused_create_leaves_no_lay_out_behind(writer: ConfigWriter) -> None:
    refused = _refused(writer.create, {"name": "store1", "gc-schedule": "not a schedule"})
    assert refused.status == 400 and "gc-schedule" in refused.message
    assert not (writer.paths.data_dir / "store1").exists()
    assert _refused(writer.create, {"comment": "no name"}).status == 400


@pytest.mark.parametrize("path", ["/proc/1/dsproxy-x", "{data}/" + "n" * 300, "/proc/sys/dsproxy-x"])
def test_a_path_that_cannot_hold_a_store_is_a_400_not_a_500(writer: ConfigWriter, path: str) -> None:
    path = path.format(data=writer.paths.data_dir)
    before = writer.config_file.read_bytes() if writer.config_file.exists() else b""
    refused = _refused(writer.create, {"name": "store1", "path": path})
    assert refused.status == 400 and path[:40] in refused.message
    assert (writer.config_file.read_bytes() if writer.config_file.exists() else b"") == before


def test_update_merges_and_reports_the_new_maintenance_mode(writer: ConfigWriter, seg: shm.Segment) -> None:
    writer.create({"name": "store1", "comment": "old"})
    result = writer.update("store1", {"comment": "new"})
    assert result.maintenance is None and result.generation == seg.generation()
    offline = writer.update("store1", {"maintenance-mode": "offline"})
    assert offline.maintenance is not None and offline.maintenance.evicts
    cfg, _ = read_config(writer.config_file)
    assert cfg["store1"]["comment"] == "new" and cfg["store1"]["maintenance-mode"] == "type=offline"
    writer.update("store1", {"delete": ["comment", "maintenance-mode"]})
    assert "comment" not in read_config(writer.config_file)[0]["store1"]
    assert _refused(writer.update, "ghost", {"comment": "x"}).status == 404
    writer.update("store1", {"maintenance-mode": "delete"})
    stuck = _refused(writer.update, "store1", {"maintenance-mode": "offline"})
    assert stuck.status == 400 and "being deleted" in stuck.message


def test_a_stale_digest_is_a_conflict_and_writes_nothing(writer: ConfigWriter) -> None:
    first = writer.create({"name": "store1"})
    writer.update("store1", {"comment": "by someone else"})
    text = writer.config_file.read_text()
    stale = _refused(writer.update, "store1", {"comment": "mine", "digest": first.digest})
    assert stale.status == 409 and "modified configuration" in stale.message
    assert _refused(writer.remove, "store1", first.digest).status == 409
    assert writer.config_file.read_text() == text


def test_remove_drops_the_section_keeps_the_data_and_refuses_while_operations_run(
    writer: ConfigWriter, paths: Paths
) -> None:
    writer.create({"name": "store1"})
    with dsproxy.Registry(config_dir=paths.config_dir, run_dir=paths.run_dir) as reg:
        handle = reg.lookup("store1", Operation.WRITE)
        assert writer.active_operations("store1") == (0, 1)  # this process's slot, summed by shm
        busy = _refused(writer.remove, "store1", None)
        assert busy.status == 409 and "read 0, write 1" in busy.message
        handle.release()
    assert writer.active_operations("store1") == (0, 0)
    writer.remove("store1", None)
    assert "store1" not in read_config(writer.config_file)[0]
    assert (paths.data_dir / "store1" / ".chunks").is_dir()
    assert _refused(writer.remove, "store1", None).status == 404


def test_a_hand_edit_is_published_once_and_a_broken_one_blocks_every_write(
    writer: ConfigWriter, seg: shm.Segment
) -> None:
    writer.create({"name": "store1"})
    assert writer.check_file() is None  # the writer's own write is known
    gen = seg.generation()
    text = writer.config_file.read_text()
    writer.config_file.write_text(text + "\tcomment by hand\n")
    assert writer.check_file() == gen + 1
    assert writer.check_file() is None and seg.generation() == gen + 1  # once, not on every check

    os.utime(writer.config_file, ns=(1, 1))  # a new signature, same content: no bump
    assert writer.check_file() is None and seg.generation() == gen + 1

    writer.config_file.write_text("datastore: store1\n\tbogus-key 1\n")
    assert writer.check_file() == gen + 2  # published too: each worker finds it broken, keeps the last good
    assert writer.state.error is not None and "bogus-key" in writer.state.error
    broken = writer.config_file.read_text()
    for write in (
        lambda: writer.create({"name": "store2"}),
        lambda: writer.update("store1", {"comment": "x"}),
        lambda: writer.remove("store1", None),
    ):
        refused = _refused(write)
        assert refused.status == 503 and "does not parse" in refused.message and "bogus-key" in refused.message
    assert writer.config_file.read_text() == broken  # the admin's edit is never overwritten
    assert not (writer.paths.data_dir / "store2").exists()


def test_a_hand_edit_a_registry_already_published_is_not_bumped_twice(writer: ConfigWriter, seg: shm.Segment) -> None:
    writer.create({"name": "store1"})
    gen = seg.generation()
    writer.config_file.write_text(writer.config_file.read_text() + "\tcomment by hand\n")
    assert seg.bump_generation(expected=gen) == gen + 1  # a registry's slow path noticed it first
    assert writer.check_file() is None and seg.generation() == gen + 1


def test_without_shared_memory_writes_still_work_unpublished(paths: Paths) -> None:
    writer = ConfigWriter(paths, lambda: None)
    result = writer.create({"name": "store1"})
    assert result.generation is None and "store1" in read_config(writer.config_file)[0]
    assert writer.active_operations("store1") == (0, 0)


@pytest.mark.parametrize(
    ("err", "status"),
    [
        (DigestMismatch(), 409),
        (LockError("/x/.datastore.lck", "timeout"), 503),
        (WriteError("disk full"), 500),
        (PropertyError("comment", "too long"), 400),
    ],
)
def test_each_config_error_a_write_meets_has_its_status(err: Exception, status: int) -> None:
    assert isinstance(err, dsproxy.config.ConfigError)
    assert _status_of(err) == status


def test_a_hand_edit_the_watch_has_not_seen_is_kept_by_the_next_write(writer: ConfigWriter, seg: shm.Segment) -> None:
    writer.create({"name": "store1"})
    writer.create({"name": "store2"})
    gen = seg.generation()
    text = writer.config_file.read_text()
    writer.config_file.write_text(text + "\tcomment by hand\n")  # in place, no check_file in between
    writer.update("store1", {"comment": "through the API"})
    cfg, _ = read_config(writer.config_file)
    assert cfg["store2"].get("comment") == "by hand" and cfg["store1"].get("comment") == "through the API"
    assert seg.generation() == gen + 1 and seg.changes_since(gen, gen + 1) is None  # everyone reloads whole

    os.utime(writer.config_file, ns=(1, 1))  # a new signature, the same bytes
    writer.update("store2", {"comment": "again"})
    assert seg.changes_since(gen + 1, gen + 2) == frozenset({"store2"})  # same content: only what changed


def _held_old_configs(writer: ConfigWriter) -> int:
    """Replaced versions of datastore.cfg this process still holds open (disk space not freed)."""
    target, held = f"{writer.config_file} (deleted)", 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # the listing's own fd, closed by now
            held += os.readlink(f"/proc/self/fd/{fd}") == target
    return held


def test_replaced_files_are_freed_once_writes_pause_and_never_pile_up(writer: ConfigWriter) -> None:
    """A write holds the file it replaces open and frees it after, off the write's path: never
    more than a few at once, and all of them once the watch finds no write under way."""
    writer.create({"name": "store1"})
    writer.check_file()
    for n in range(12):
        writer.update("store1", {"comment": f"n{n}"})
        writer._closer.submit(lambda: None).result()  # what was handed to the closer is closed
        assert _held_old_configs(writer) <= writer_mod.REPLACED_HELD
    time.sleep(writer_mod.CLOSE_AFTER)
    for _ in range(writer_mod.REPLACED_HELD):  # the watch frees one a pass
        writer.check_file()
    writer._closer.submit(lambda: None).result()
    assert _held_old_configs(writer) == 0
    assert read_config(writer.config_file)[0]["store1"]["comment"] == "n11"
