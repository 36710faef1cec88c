"""The config writer in fleet mode, in-process (no etcd): the file as a mirror of given sections.

Each case drives :class:`~dsproxy.daemon.writer.ConfigWriter` as the fleet manager's writer thread
does (:mod:`dsproxy.fleet.mirror` hands it decoded etcd batches) and checks what a worker would
see: the file, the ring's per-store changes and the fleet record in shared memory.
"""

from __future__ import annotations

import os
import urllib.parse
from typing import Any

import pytest

from dsproxy.config import MaintenanceMode, Value, dump, parse, read_config
from dsproxy.config.overlay import served
from dsproxy.daemon.writer import ConfigWriter, WriteRefused
from dsproxy.ipc import shm
from dsproxy.paths import Paths


@pytest.fixture
def writer(paths: Paths, seg: shm.Segment) -> ConfigWriter:
    w = ConfigWriter(paths, lambda: seg)
    w.check_file()
    w.enable_fleet()
    return w


def _props(paths: Paths, name: str, **extra: Any) -> dict[str, Value]:
    section: dict[str, Value] = parse(dump({name: {"path": str(paths.data_dir / name), **extra}}))[name]
    return section


def _changes(seg: shm.Segment, since: int) -> frozenset[str] | None:
    return seg.changes_since(since, seg.generation())


def test_a_full_read_makes_the_file_the_mirror_and_publishes_the_difference(
    writer: ConfigWriter, paths: Paths, seg: shm.Segment
) -> None:
    sections = {n: _props(paths, n) for n in ("alpha", "beta", "gamma")}
    gen0 = seg.generation()
    gen = writer.mirror_replace(sections, {"alpha": 5, "beta": 6, "gamma": 7}, 7)
    cfg = served(paths.config_file)
    assert cfg == sections
    assert (paths.data_dir / "beta" / ".chunks").is_dir()  # laid out on this host
    assert _changes(seg, gen0) == frozenset({"alpha", "beta", "gamma"})
    record = seg.fleet()
    assert record is not None and (record.revision, record.generation) == (7, gen)
    # a restart: the same mirror plus one change -> one store published, not everything
    again = ConfigWriter(paths, lambda: seg)
    again.check_file()
    again.enable_fleet()
    sections["beta"] = _props(paths, "beta", comment="changed elsewhere")
    gen1 = seg.generation()
    again.mirror_replace(sections, {"alpha": 5, "beta": 9, "gamma": 7}, 12)
    assert _changes(seg, gen1) == frozenset({"beta"})
    assert served(paths.config_file)["beta"]["comment"] == "changed elsewhere"


def test_a_batch_is_one_write_with_per_store_changes_and_a_batch_without_any_moves_only_the_revision(
    writer: ConfigWriter, paths: Paths, seg: shm.Segment
) -> None:
    writer.mirror_replace({"alpha": _props(paths, "alpha"), "beta": _props(paths, "beta")}, {"alpha": 2, "beta": 3}, 3)
    gen = seg.generation()
    new = writer.mirror_apply(
        {"alpha": _props(paths, "alpha", comment="x"), "beta": None}, {"alpha": 4, "beta": None}, 4
    )
    assert new == gen + 1  # one bump for the batch
    assert _changes(seg, gen) == frozenset({"alpha", "beta"})
    assert list(served(paths.config_file)) == ["alpha"]
    assert list(read_config(paths.config_file)[0]) == ["alpha", "beta"]  # the batch is in the overlay
    assert writer.flush_overlay(idle=60) is None  # not idle long enough
    flushed = writer.flush_overlay(idle=0)
    assert flushed == new + 1 and _changes(seg, new) == frozenset({"alpha", "beta"})
    assert list(read_config(paths.config_file)[0]) == ["alpha"]  # the file whole, once idle
    assert list(served(paths.config_file)) == ["alpha"]
    new = flushed
    assert writer._fleet().mod_revisions == {"alpha": 4}
    # a batch of host keys only: nothing written, the same generation now serves revision 9
    assert writer.mirror_apply({}, {}, 9) == new
    record = seg.fleet()
    assert record is not None and (record.revision, record.generation) == (9, new)
    assert seg.generation() == new


def test_a_hand_edit_is_counted_undone_and_published_as_everything(
    writer: ConfigWriter, paths: Paths, seg: shm.Segment
) -> None:
    sections = {"alpha": _props(paths, "alpha"), "beta": _props(paths, "beta")}
    writer.mirror_replace(sections, {"alpha": 2, "beta": 3}, 3)
    mirrored = paths.config_file.read_bytes()
    for edit in (mirrored + b"\ndatastore: gamma\n\tpath /tmp/c\n", b"datastore: broken\n\tno-such-key 1\n"):
        gen = seg.generation()
        tmp = paths.config_file.with_suffix(".edit")
        tmp.write_bytes(edit)
        os.replace(tmp, paths.config_file)
        assert writer.check_file() == gen + 1
        assert paths.config_file.read_bytes() == mirrored
        assert _changes(seg, gen) is None  # everything: every worker reloads the file
    record = seg.fleet()
    assert record is not None and record.hand_edits == 2 and record.revision == 3
    assert writer.check_file() is None  # restored: nothing more to do


def test_a_hand_edit_that_an_api_write_reads_first_is_still_undone(
    writer: ConfigWriter, paths: Paths, seg: shm.Segment
) -> None:
    """An API write's validation may be the first to read a hand-edited file (before the watch's
    next look): the edit must still be counted and undone -- not taken for the mirror, and kept in
    the file by the next batch's O(changed) write (found by ``scripts/stress --fleet 3``)."""
    sections = {"alpha": _props(paths, "alpha"), "beta": _props(paths, "beta", comment="mirror")}
    writer.mirror_replace(sections, {"alpha": 2, "beta": 3}, 3)
    mirrored = paths.config_file.read_bytes()
    tmp = paths.config_file.with_suffix(".edit")
    tmp.write_bytes(mirrored.replace(b"\tcomment mirror\n", b"\tcomment by hand\n"))
    os.replace(tmp, paths.config_file)
    writer.fleet_update("alpha", {"comment": "through the API"})  # validated; its transaction is etcd's
    sections["alpha"] = _props(paths, "alpha", comment="through the API")
    writer.mirror_apply({"alpha": sections["alpha"]}, {"alpha": 4}, 4)  # the watch brings it back
    writer.check_file()
    assert served(paths.config_file) == sections
    record = seg.fleet()
    assert record is not None and record.hand_edits == 1


def test_fencing_takes_every_store_offline_locally_and_unfencing_restores_the_mirror(
    writer: ConfigWriter, paths: Paths, seg: shm.Segment
) -> None:
    sections = {
        "alpha": _props(paths, "alpha"),
        "rostore": _props(paths, "rostore", **{"maintenance-mode": "read-only"}),
        "gone": _props(paths, "gone", **{"maintenance-mode": "delete"}),
    }
    writer.mirror_replace(sections, {"alpha": 2, "rostore": 3, "gone": 4}, 4)
    mirrored = paths.config_file.read_bytes()
    writer.fence("fleet: etcd unreachable, the lease expired and this is longer than a message may be")
    cfg = served(paths.config_file)
    for name in ("alpha", "rostore"):
        mode = MaintenanceMode.parse(str(cfg[name]["maintenance-mode"]))
        assert mode.type == "offline" and "lease expired" in urllib.parse.unquote(mode.message) and len(mode.message) <= 64
    assert MaintenanceMode.parse(str(cfg["gone"]["maintenance-mode"])).type == "delete"  # kept: refuses all
    record = seg.fleet()
    assert record is not None and record.state is shm.FleetState.FENCED
    # a batch arriving while fenced is applied fenced
    writer.mirror_apply({"new": _props(paths, "new")}, {"new": 5}, 5)
    assert "offline" in str(served(paths.config_file)["new"]["maintenance-mode"])
    writer.unfence()
    cfg = served(paths.config_file)
    assert cfg == {**sections, "new": _props(paths, "new")}
    writer.flush_overlay(idle=0)
    assert paths.config_file.read_bytes().startswith(mirrored)
    record = seg.fleet()
    assert record is not None and record.state is not shm.FleetState.FENCED


def test_api_writes_are_validated_against_the_mirror_and_compare_its_mod_revision(
    writer: ConfigWriter, paths: Paths
) -> None:
    writer.mirror_replace({"alpha": _props(paths, "alpha")}, {"alpha": 17}, 20)
    with pytest.raises(WriteRefused) as refused:
        writer.fleet_create({"name": "alpha"})
    assert refused.value.status == 409
    create = writer.fleet_create({"name": "beta", "comment": "new"})
    assert create.mod_revision == 0 and create.value is not None
    assert parse(create.value)["beta"] == _props(paths, "beta", comment="new")
    assert (paths.data_dir / "beta" / ".lock").is_file()  # laid out before the transaction
    writer.fleet_finish(create, False)  # the transaction lost: the lay-out goes
    assert not (paths.data_dir / "beta").exists()
    assert not served(paths.config_file).get("beta")  # nothing local was written
    update = writer.fleet_update("alpha", {"comment": "x"})
    assert update.mod_revision == 17 and update.value is not None and b"\tcomment x\n" in update.value
    offline = writer.fleet_update("alpha", {"maintenance-mode": "offline"})
    assert offline.maintenance is not None and offline.maintenance.evicts
    with pytest.raises(WriteRefused) as missing:
        writer.fleet_update("nosuch", {"comment": "x"})
    assert missing.value.status == 404
    remove = writer.fleet_remove("alpha", None)
    assert remove.value is None and remove.mod_revision == 17


def test_the_fleet_record_is_range_checked_and_garbage_is_a_problem(seg: shm.Segment) -> None:
    assert seg.fleet() is None  # not in fleet mode
    seg.set_fleet(revision=42, generation=seg.generation(), state=shm.FleetState.CONNECTED)
    record = seg.fleet()
    assert record is not None and record.revision == 42 and record.connected
    base = shm.OFF_FLEET // 8
    for word, value in ((shm.FLEET_REVISION, 2**63), (shm.FLEET_STATE, 9), (shm.FLEET_HAND_EDITS, 2**60)):
        saved = seg.words[base + word]
        seg.words[base + word] = value
        assert seg.fleet() is None
        problem = seg.check()
        assert problem is not None and problem.kind is shm.ProblemKind.GARBAGE and "fleet record" in problem.message
        seg.words[base + word] = saved
    seg.words[base + shm.FLEET_SEQ] += 1  # torn: a writer died inside
    assert seg.fleet() is None
    seg.set_fleet(revision=43)  # the manager's next write starts it over
    record = seg.fleet()
    assert record is not None and record.revision == 43 and seg.check() is None


def test_a_mirror_write_is_synced_once_writes_pause_and_a_single_host_write_before_its_answer(
    writer: ConfigWriter, paths: Paths, seg: shm.Segment, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fleet mode: etcd is the durable copy, the mirror's file is fsynced by the watch once writes
    pause (file and directory), not in the write; without ``--etcd`` a write fsyncs before it returns."""
    import time

    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    writer.mirror_replace({"alpha": _props(paths, "alpha")}, {"alpha": 3}, 3)
    assert synced == [] and served(paths.config_file)["alpha"]["path"] == str(paths.data_dir / "alpha")
    assert not writer.sync_mirror(idle=60.0)  # a write ended just now: not yet
    writer.check_file()  # the watch, right after the write: not yet either
    assert synced == []
    time.sleep(0.06)
    writer.check_file()  # the watch once writes paused: file and directory, in the closer thread
    writer._closer.submit(lambda: None).result()
    assert synced == [str(paths.config_file), str(paths.config_file.parent)]
    writer.check_file()
    writer._closer.submit(lambda: None).result()
    assert len(synced) == 2  # nothing written since: no second sync

    single = ConfigWriter(paths, lambda: seg)  # no fleet mode: the write is durable before it returns
    single.check_file()
    synced.clear()
    single.update("alpha", {"comment": "here"})
    assert any(p.startswith(str(paths.config_dir) + "/.datastore.cfg.tmp") for p in synced), synced
    assert str(paths.config_dir) in synced


def test_a_first_read_writes_the_file_first_and_lays_the_stores_out_afterwards(
    writer: ConfigWriter, paths: Paths, seg: shm.Segment
) -> None:
    sections = {n: _props(paths, n) for n in ("alpha", "beta", "gamma")}
    writer.mirror_replace(sections, {"alpha": 1, "beta": 2, "gamma": 3}, 3, defer_layout=True)
    assert served(paths.config_file) == sections  # the file (and the workers) first
    assert not (paths.data_dir / "alpha").exists()
    writer.mirror_apply({"gamma": None}, {"gamma": None}, 4)  # removed before its turn came
    assert writer.lay_out_deferred(10.0) == 0
    assert (paths.data_dir / "alpha" / ".lock").is_file() and (paths.data_dir / "beta" / ".lock").is_file()
    assert not (paths.data_dir / "gamma").exists()  # what is no longer mirrored is not laid out
    assert writer.lay_out_deferred(10.0) == 0  # nothing left: a no-op
