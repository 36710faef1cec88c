"""Per-store invalidation and store-table moves, in process: a ConfigWriter (the manager's writes)
and registries (the workers' views), compared with a fresh parse of the file after every write."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dsproxy import registry as registry_mod
from dsproxy.config import Operation, Value, dump, parse, read_raw, replace_file
from dsproxy.daemon.writer import ConfigWriter, WriteRefused
from dsproxy.ipc import shm
from dsproxy.paths import Paths
from dsproxy.registry import Registry


@pytest.fixture
def paths(tmp_path: Path) -> Iterator[Paths]:
    p = Paths.resolve(tmp_path / "base")
    p.ensure()
    p.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        yield p
    finally:
        shm.unlink(p.run_dir)


class _Manager:
    """What the manager does with its segment here: writes, and moves (check_names)."""

    def __init__(self, paths: Paths) -> None:
        self.paths = paths
        self.seg: shm.Segment | None = shm.Segment.open(paths.run_dir, create=True)
        self.previous: shm.Segment | None = None
        self.writer = ConfigWriter(paths, lambda: self.seg)
        self.writer._previous = lambda: self.previous

    def move(self, stores: int) -> None:
        assert self.seg is not None
        self.previous = self.seg
        self.seg = shm.recreate(self.paths.run_dir, mapped=self.seg, stores=stores)
        self.writer.rebase(self.seg.generation())  # as Manager.check_names does

    def close(self) -> None:
        for seg in (self.seg, self.previous):
            if seg is not None:
                seg.close()


@pytest.fixture
def manager(paths: Paths) -> Iterator[_Manager]:
    m = _Manager(paths)
    try:
        yield m
    finally:
        m.close()


def _fresh(paths: Paths) -> dict[str, dict[str, Value]]:
    return dict(parse(read_raw(paths.config_file)))


def _assert_views(paths: Paths, registries: list[Registry]) -> None:
    fresh = parse(read_raw(paths.config_file))
    for reg in registries:
        config, _ = reg.config()
        assert config == fresh and list(config) == list(fresh)
        for name, props in fresh.items():
            if "maintenance-mode" in props:
                continue
            with reg.lookup(name, Operation.READ) as handle:
                assert handle.path == props["path"]


def _overwrite(paths: Paths, old: bytes, new: bytes) -> None:
    """An edit in place (same inode, same size): the first ``old`` in the file becomes ``new``."""
    assert len(old) == len(new)
    with open(paths.config_file, "r+b") as f:
        data = f.read()
        f.seek(data.index(old))
        f.write(new)


def _hand_edit(paths: Paths, rng: random.Random) -> None:
    cfg = _fresh(paths)
    if cfg and rng.random() < 0.5:
        name = rng.choice(list(cfg))
        cfg[name] = {**cfg[name], "comment": f"edited by hand {rng.random()}"}
    text = dump(cfg)
    paths.config_file.write_text(text.replace("\tcomment", "  comment") if rng.random() < 0.3 else text)


@pytest.mark.parametrize("seed", range(3))
def test_every_view_is_a_fresh_parse_after_random_writes_and_hand_edits(
    paths: Paths, manager: _Manager, seed: int
) -> None:
    rng = random.Random(seed)
    w = manager.writer
    registries = [Registry(config_dir=paths.config_dir, run_dir=paths.run_dir) for _ in range(2)]
    try:
        names: list[str] = []
        for step in range(60):
            op = rng.random()
            if op < 0.08:
                _hand_edit(paths, rng)
                w.check_file()
            elif op < 0.45 or not names:
                name = f"st{seed}x{step:03d}"
                w.create({"name": name, "comment": rng.choice(["", "fresh"])})
                names.append(name)
            elif op < 0.8:
                name = rng.choice(names)
                body: dict[str, object] = {"comment": f"c{step}"}
                if rng.random() < 0.2:
                    body["maintenance-mode"] = "read-only"
                with_delete = rng.random() < 0.2
                w.update(name, {"delete": ["maintenance-mode"]} if with_delete else body)
            else:
                name = names.pop(rng.randrange(len(names)))
                w.remove(name, None)
            _assert_views(paths, registries)
            # the written file is byte-identical to a full dump of what it says
            assert read_raw(paths.config_file) == dump(parse(read_raw(paths.config_file))).encode() or op < 0.08
        if not registry_mod.DISCARD_CACHES:
            assert all(reg.changes_applied > 20 for reg in registries)  # the ring was used, mostly
            # and mostly without reading the file: the manager's file record said what changed
            assert all(reg.changes_patched > 35 for reg in registries), [r.changes_patched for r in registries]
    finally:
        for reg in registries:
            reg.close()


def test_a_hand_edit_the_watch_publishes_is_applied_without_a_full_parse(
    paths: Paths, manager: _Manager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The watch publishes a hand edit as "everything"; a registry finds the edited stores itself
    (where the file differs) and parses only those -- unless the edit spans too many stores, or
    does not parse: then a full reload, as before."""
    from dsproxy.config import splice as splice_mod

    w = manager.writer
    for i in range(300):
        w.create({"name": f"he{i:03d}"})
    reg = Registry(config_dir=paths.config_dir, run_dir=paths.run_dir)
    try:
        reg.refresh()
        cfg = _fresh(paths)
        cfg["he150"] = {**cfg["he150"], "comment": "edited by hand"}  # an edit in place
        removed = cfg.pop("he007")  # a store removed by hand
        cfg["hand1"] = {"path": removed["path"]}  # and one added at the end (its lay-out)
        paths.config_file.write_text(dump(cfg))
        assert w.check_file() is not None  # published as EVERYTHING
        applied, reloads = reg.changes_applied, reg.reloads
        assert reg.refresh()
        if not registry_mod.DISCARD_CACHES:
            assert (reg.changes_applied, reg.reloads) == (applied + 1, reloads + 1)
        _assert_views(paths, [reg])
        assert reg.config()[0]["he150"]["comment"] == "edited by hand" and "he007" not in reg.config()[0]

        # an edit spanning more stores than a guess may name: parsed whole
        monkeypatch.setattr(splice_mod, "EDITED_MAX", 10)
        cfg = _fresh(paths)
        cfg["he010"] = {**cfg["he010"], "comment": "far"}
        cfg["he290"] = {**cfg["he290"], "comment": "apart"}
        paths.config_file.write_text(dump(cfg))
        assert w.check_file() is not None
        applied = reg.changes_applied
        assert reg.refresh()
        assert reg.changes_applied == applied
        _assert_views(paths, [reg])

        # a hand edit that does not parse: the last good config is served, and the fix is applied
        good = read_raw(paths.config_file)
        paths.config_file.write_bytes(good.replace(b"datastore: he200\n", b"datastore: he200\n\tbogus x\n"))
        assert w.check_file() is not None
        reg.refresh()
        error = reg.config_error
        assert error is not None and "bogus" in error
        assert reg.config()[0] == parse(good)
        paths.config_file.write_bytes(good)
        w.check_file()
        reg.refresh()
        assert reg.config_error is None
        _assert_views(paths, [reg])
    finally:
        reg.close()


def test_the_written_file_is_a_full_dump_byte_for_byte(paths: Paths, manager: _Manager) -> None:
    w = manager.writer
    for i in range(30):
        w.create({"name": f"s{i:02d}", "comment": "x" * i})
    w.update("s05", {"maintenance-mode": "offline"})
    w.remove("s00", None)
    w.create({"name": "s00", "path": f"{paths.data_dir}/s00-again"})
    data = read_raw(paths.config_file)
    assert w.kept is not None
    assert data == dump(w.kept.config).encode() == dump(parse(data)).encode()


def _moved(reg: Registry, manager: _Manager) -> bool:
    """Whether ``reg`` maps the manager's current segment (the same object, its own mapping)."""
    seg = reg.segment
    return seg is not None and manager.seg is not None and seg.inode == manager.seg.inode


def _totals(manager: _Manager, name: str, workers: list[Registry] | None = None) -> tuple[int, int]:
    """The manager's totals of ``name``, checked to be what each of ``workers`` answers too."""
    totals = manager.writer.active_operations(name)
    for reg in workers or []:
        assert reg.active_operations(name) == {"read": totals[0], "write": totals[1]}
    return totals


def test_a_move_carries_held_operations_over_and_a_remove_is_refused_throughout(
    paths: Paths, manager: _Manager
) -> None:
    w = manager.writer
    for name in ("held1", "held2", "idle"):
        w.create({"name": name})
    workers = [Registry(config_dir=paths.config_dir, run_dir=paths.run_dir) for _ in range(2)]
    try:
        handles = [workers[0].lookup("held1", Operation.WRITE), workers[1].lookup("held1", Operation.READ)]
        handles += [workers[1].lookup("held2", Operation.READ) for _ in range(3)]
        assert _totals(manager, "held1", workers) == (1, 1) and _totals(manager, "held2", workers) == (3, 0)
        manager.move(shm.MAX_STORES * 2)
        # nobody has moved yet: the old segment still counts
        assert _totals(manager, "held1") == (1, 1) and _totals(manager, "held2") == (3, 0)
        with pytest.raises(WriteRefused, match="active operations"):
            w.remove("held1", None)
        workers[0].refresh()  # moves this one; the other is still in the old segment
        assert _moved(workers[0], manager) and not _moved(workers[1], manager)
        # the moved one counts the other's operations where they still are
        assert _totals(manager, "held1", workers[:1]) == (1, 1) and _totals(manager, "held2", workers[:1]) == (3, 0)
        with pytest.raises(WriteRefused, match="active operations"):
            w.remove("held2", None)
        workers[1].lookup("idle", Operation.READ).release()  # moves on its slow path
        assert _moved(workers[1], manager)
        assert _totals(manager, "held1", workers) == (1, 1) and _totals(manager, "held2", workers) == (3, 0)
        manager.previous = None  # every process has moved: the new segment alone counts
        assert _totals(manager, "held1", workers) == (1, 1) and _totals(manager, "held2", workers) == (3, 0)
        for h in handles:
            h.release()  # released against the counters they moved to
        assert _totals(manager, "held1", workers) == (0, 0) and _totals(manager, "held2", workers) == (0, 0)
        w.remove("held1", None)
    finally:
        for reg in workers:
            reg.close()


def test_a_move_is_sized_by_the_stores_a_hand_edit_configured(paths: Paths, manager: _Manager) -> None:
    """The kept config is re-read only by the next write: until then the count of the watch's parse
    rules (a move sized by the stale one was too small, and repeated on every check)."""
    w = manager.writer
    w.create({"name": "api"})
    assert w.configured() == 1
    paths.config_file.write_text(dump({f"hand{i}": {"path": f"{paths.data_dir}/hand{i}"} for i in range(40)}))
    w.check_file()
    assert w.configured() == 40
    w.create({"name": "api2"})
    assert w.configured() == 41


def test_200000_names_over_a_run_never_fill_the_table(paths: Paths, manager: _Manager) -> None:
    """Churn through 200,000 distinct names (hand edits of 2,000 stores at a time); the table is
    moved to a compacted one whenever it fills, and lookups keep working."""
    reg = Registry(config_dir=paths.config_dir, run_dir=paths.run_dir)
    data = paths.data_dir
    moves = 0
    try:
        for batch in range(100):
            names = [f"n{batch:03d}x{i:04d}" for i in range(2000)]
            paths.config_file.write_text(dump({n: {"path": f"{data}/{n}"} for n in names}))
            manager.writer.check_file()
            assert manager.seg is not None
            reg.refresh()  # loads the 2,000 names
            assert reg.segment is not None
            reg.segment.register_stores(names)  # what its warm-up (or a lookup of each) registers
            assert manager.seg.check() is None  # counts the names in use
            size = shm.move_size(manager.seg, len(names))
            if size is not None:
                manager.move(size)
                moves += 1
                reg.refresh()
                manager.previous = None
                assert reg.segment is not None
                reg.segment.register_stores(names)  # again in the new segment, as its warm-up does
            assert _moved(reg, manager) and reg.segment is not None
            assert reg.segment.store_index(names[-1]) is not None  # the table had room for it
        assert moves >= 2
        # compacted, not grown: 2,000 stores live
        assert manager.seg is not None and manager.seg.max_stores == shm.MAX_STORES
    finally:
        reg.close()


def test_a_file_renamed_before_its_generation_is_published_is_still_a_delta(
    paths: Paths, manager: _Manager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker reads the generation, then the file -- and the next write may have renamed its
    file in between and publish a moment later.  The file then holds a change the ring does not
    name yet: once that generation is published, the worker applies both changes as a delta (a
    full parse of 100,000 stores is 1-3 s of a worker) and serves exactly the file."""
    w = manager.writer
    for name in ("first", "second", "third"):
        w.create({"name": name})
    reg = Registry(config_dir=paths.config_dir, run_dir=paths.run_dir)
    try:
        reg.refresh()
        w.update("first", {"comment": "published"})
        held: list[list[tuple[shm.ChangeKind, str]]] = []
        monkeypatch.setattr(w, "_publish", lambda records: held.append(records))
        w.update("third", {"comment": "renamed, not yet published"})
        monkeypatch.undo()
        read_text = reg._read_text

        def read_then_publish() -> tuple[bytearray, registry_mod.Identity | None]:  # published right after the read
            text = read_text()
            while held:
                assert manager.seg is not None
                manager.seg.publish(held.pop())
            return text

        monkeypatch.setattr(reg, "_read_text", read_then_publish)
        applied = reg.changes_applied
        reg.refresh()
        if not registry_mod.DISCARD_CACHES:  # (which makes every load a full one)
            assert reg.changes_applied == applied + 1  # a delta, not a full parse
        else:  # a full load serves the generation read before the file: the next one catches up
            reg.refresh()
        assert manager.seg is not None and reg.loaded_generation == manager.seg.generation()
        _assert_views(paths, [reg])
    finally:
        reg.close()


def test_a_change_after_the_ttl_ran_out_is_applied_as_a_delta_and_a_hand_edit_beside_it_too(
    paths: Paths, manager: _Manager
) -> None:
    """The TTL does not turn the next change into a full parse (the splice proves the rest of the
    file unchanged itself), and a hand edit the ring did not name is still seen: the registry takes
    the stores where the file differs as changed too, and the splice proves them."""
    import time

    w = manager.writer
    for name in ("ttl01", "ttl02", "ttl03"):
        w.create({"name": name})
    reg = Registry(config_dir=paths.config_dir, run_dir=paths.run_dir, ttl=0.05)
    try:
        reg.refresh()
        applied = reg.changes_applied
        time.sleep(0.1)  # the TTL ran out
        w.update("ttl02", {"comment": "after the ttl"})
        assert reg.refresh()
        assert reg.config()[0]["ttl02"]["comment"] == "after the ttl"
        if not registry_mod.DISCARD_CACHES:
            assert reg.changes_applied == applied + 1  # spliced, not parsed whole
        _assert_views(paths, [reg])
        # a hand edit right after a published change, past the TTL: the ring names ttl01 only, the
        # file differs at ttl03 too; both are applied (and proven), without a parse of the whole file
        time.sleep(0.1)
        w.update("ttl01", {"comment": "published"})
        cfg = _fresh(paths)
        cfg["ttl03"] = {**cfg["ttl03"], "comment": "edited by hand"}
        paths.config_file.write_text(dump(cfg))
        applied, reloads = reg.changes_applied, reg.reloads
        assert reg.refresh()
        if not registry_mod.DISCARD_CACHES:
            assert (reg.changes_applied, reg.reloads) == (applied + 1, reloads + 1)
        config = reg.config()[0]
        assert config["ttl01"]["comment"] == "published" and config["ttl03"]["comment"] == "edited by hand"
        _assert_views(paths, [reg])
    finally:
        reg.close()


def test_a_hand_edit_in_place_after_a_write_is_read_not_patched(paths: Paths, manager: _Manager) -> None:
    """A worker reads only the changed bytes when the file is the one the manager's record names;
    a file edited in place after that write (same inode, another mtime) is read and compared
    instead, so the hand edit is served with the write -- and writes after it patch again."""
    w = manager.writer
    for i in range(20):
        w.create({"name": f"ip{i:02d}"})
    reg = Registry(config_dir=paths.config_dir, run_dir=paths.run_dir)
    try:
        reg.refresh()
        w.update("ip05", {"comment": "patched"})
        patched = reg.changes_patched
        assert reg.refresh()
        _assert_views(paths, [reg])
        if not registry_mod.DISCARD_CACHES:
            assert reg.changes_patched == patched + 1
        w.update("ip07", {"comment": "written"})
        _overwrite(paths, b"\tcomment patched", b"\tcomment by-hand")  # same size: only the mtime tells
        os.utime(paths.config_file, ns=(time.time_ns(), time.time_ns() + 10_000_000))  # past the write's tick
        patched = reg.changes_patched
        assert reg.refresh()
        _assert_views(paths, [reg])
        assert reg.config()[0]["ip05"]["comment"] == "by-hand" and reg.config()[0]["ip07"]["comment"] == "written"
        assert reg.changes_patched == patched
        w.check_file()  # the watch publishes the hand edit
        reg.refresh()
        w.update("ip09", {"comment": "first after the edit"})  # (the file was not the manager's: read)
        reg.refresh()
        w.update("ip10", {"comment": "second"})
        reg.refresh()
        _assert_views(paths, [reg])
        if not registry_mod.DISCARD_CACHES:
            assert reg.changes_patched == patched + 1
    finally:
        reg.close()


def _edit_keeping_the_stamp(paths: Paths, old: bytes, new: bytes, writer: ConfigWriter | None = None) -> None:
    """An edit in place of the same size whose mtime is set back: what a file system with coarse
    timestamps shows of an edit within one tick of the write before.  With ``writer``, its watch
    misses it too (the ctime it would see move is taken as the file's: the same tick)."""
    st = os.stat(paths.config_file)
    _overwrite(paths, old, new)
    os.utime(paths.config_file, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = os.stat(paths.config_file)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (st.st_ino, st.st_size, st.st_mtime_ns)
    if writer is not None:
        writer.state.signature = (after.st_ino, after.st_size, after.st_mtime_ns, after.st_ctime_ns)


def test_a_patch_never_outlives_the_ttl_of_the_last_whole_file_check(paths: Paths, manager: _Manager) -> None:
    """A worker that patches writes in trusts that the file it read is the one the manager wrote
    from; an edit in place nobody saw (coarse timestamps) breaks that, and the patches carry the
    difference along.  They never extend the TTL, so within one TTL of the last whole-file check
    the next change is read whole and the worker serves exactly the file again -- while writes go
    on (each of them patched before the fix: the stale text was served for ever)."""
    w = manager.writer
    for i in range(10):
        w.create({"name": f"tl{i:02d}", "comment": "aaaa"})
    _edit_keeping_the_stamp(paths, b"comment aaaa", b"comment bbbb", w)
    reg = Registry(config_dir=paths.config_dir, run_dir=paths.run_dir, ttl=0.5)
    try:
        reg.refresh()  # reads the edit; the manager writes on from what it wrote
        patched = reg.changes_patched
        deadline = time.monotonic() + 1.2
        serial = 0
        while time.monotonic() < deadline:
            serial += 1
            w.update(f"tl{1 + serial % 9:02d}", {"comment": f"w{serial:03d}"})
            assert reg.refresh()
            time.sleep(0.02)
        if not registry_mod.DISCARD_CACHES:
            assert reg.changes_patched > patched  # patches were taken, in between
        w.update("tl05", {"comment": "last"})
        reg.refresh()
        _assert_views(paths, [reg])
    finally:
        reg.close()


def test_an_edit_in_place_during_the_patch_read_is_read_whole(
    paths: Paths, manager: _Manager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file is looked at again after the changed bytes are read: an edit in place meanwhile
    (its mtime moves) makes the worker read the whole file, and the edit is served with the write."""
    w = manager.writer
    for i in range(6):
        w.create({"name": f"pr{i:02d}", "comment": "aaaa"})
    reg = Registry(config_dir=paths.config_dir, run_dir=paths.run_dir)
    try:
        reg.refresh()
        w.update("pr02", {"comment": "cccc"})
        pread = registry_mod._pread_all
        fired: list[int] = []

        def edit() -> None:
            _overwrite(paths, b"pr04\n\tcomment aaaa", b"pr04\n\tcomment dddd")
            now = time.time_ns() + 50_000_000
            os.utime(paths.config_file, ns=(now, now))

        def pread_then_edit(fd: int, length: int, offset: int) -> bytes | None:
            got = pread(fd, length, offset)
            edit()
            fired.append(length)
            return got

        monkeypatch.setattr(registry_mod, "_pread_all", pread_then_edit)
        if registry_mod.DISCARD_CACHES:
            edit()  # no patch path to read during: the full read must serve the edit all the same
        patched = reg.changes_patched
        assert reg.refresh()
        monkeypatch.undo()
        assert fired or registry_mod.DISCARD_CACHES  # the edit did land during the patch's read
        config = reg.config()[0]
        assert (config["pr02"]["comment"], config["pr04"]["comment"]) == ("cccc", "dddd")
        assert reg.changes_patched == patched
        _assert_views(paths, [reg])
    finally:
        reg.close()


@pytest.mark.parametrize("forged", ["token", "stamp"])
def test_a_record_that_names_another_file_is_not_patched_from(paths: Paths, manager: _Manager, forged: str) -> None:
    """A worker patches only from the file the record says was replaced, by its token *and* its
    stamp: an inode reused with the same size within one tick (coarse timestamps) gives the same
    stamp to another file, never the same token."""
    from dsproxy.config import record as file_record

    w = manager.writer
    for i in range(6):
        w.create({"name": f"fr{i:02d}"})
    reg = Registry(config_dir=paths.config_dir, run_dir=paths.run_dir)
    try:
        reg.refresh()
        w.update("fr01", {"comment": "written"})
        fd = os.open(paths.config_file, os.O_RDONLY)
        try:
            record = file_record.read(fd)
        finally:
            os.close(fd)
        assert record is not None
        old = record.old
        assert old is not None
        if forged == "token":
            record = record._replace(old_token=file_record.new_token())
        else:
            record = record._replace(old=(old[0] + 1, old[1], old[2]))
        os.setxattr(paths.config_file, file_record.NAME, record.pack())
        patched, applied = reg.changes_patched, reg.changes_applied
        assert reg.refresh()
        _assert_views(paths, [reg])
        if not registry_mod.DISCARD_CACHES:
            assert (reg.changes_patched, reg.changes_applied) == (patched, applied + 1)  # read and compared
    finally:
        reg.close()


def test_a_hand_edit_only_a_worker_saw_is_kept_by_the_next_write(paths: Paths, manager: _Manager) -> None:
    """An edit in place that keeps the file's stat signature (coarse timestamps) escapes the
    manager's watch; a worker's whole-file check at its TTL sees it and bumps the generation.  The
    manager then no longer trusts what it kept: its next write starts from the file, so the hand
    edit is not written over -- and the workers serve both."""
    w = manager.writer
    for i in range(4):
        w.create({"name": f"he{i:02d}", "comment": "aaaa"})
    reg = Registry(config_dir=paths.config_dir, run_dir=paths.run_dir, ttl=0.05)
    try:
        reg.refresh()
        _edit_keeping_the_stamp(paths, b"he01\n\tcomment aaaa", b"he01\n\tcomment bbbb", w)
        time.sleep(0.1)
        assert manager.seg is not None
        gen = manager.seg.generation()
        assert reg.refresh()
        assert manager.seg.generation() == gen + 1  # the worker published the edit
        w.update("he03", {"comment": "written"})
        config = _fresh(paths)
        assert (config["he01"]["comment"], config["he03"]["comment"]) == ("bbbb", "written")
        reg.refresh()
        _assert_views(paths, [reg])
    finally:
        reg.close()


def test_after_someone_elses_bump_the_manager_reads_the_file_once(
    paths: Paths, manager: _Manager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bump the manager did not make has its next write read the file (was it edited?); found
    as kept, the file is trusted again -- refused writes after it read nothing more."""
    from dsproxy.daemon import writer as writer_mod

    w = manager.writer
    for i in range(5):
        w.create({"name": f"rb{i:02d}"})
    reads: list[object] = []
    real = read_raw

    def counted(path: Path) -> bytes:
        reads.append(path)
        return real(path)

    monkeypatch.setattr(writer_mod, "read_raw", counted)
    w.update("rb01", {"comment": "x"})
    assert reads == []
    assert manager.seg is not None
    manager.seg.bump_generation()
    for _ in range(5):
        with pytest.raises(WriteRefused):
            w.remove("nope", None)
    w.update("rb02", {"comment": "ok"})
    assert len(reads) == 1


def test_a_same_size_rename_right_after_the_managers_is_not_taken_for_its_file(
    paths: Paths, manager: _Manager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An editor's rename (``sed -i``) between the manager's rename and its look at the file, with
    the same size: the manager compares the stamp of the file it wrote, so the next write starts
    from the file and keeps the edit."""
    from dsproxy.daemon import writer as writer_mod

    w = manager.writer
    for i in range(5):
        w.create({"name": f"rr{i:02d}", "comment": "aaaa"})
    real = replace_file

    def replace_then_edit(path: Path, data: list[bytes], *args: object, **kwargs: object) -> object:
        written = real(path, data, *args, **kwargs)  # type: ignore[arg-type]
        text = read_raw(path).replace(b"rr00\n\tcomment aaaa", b"rr00\n\tcomment EDIT")
        tmp = Path(f"{path}.sed")
        tmp.write_bytes(text)
        os.rename(tmp, path)
        return written

    monkeypatch.setattr(writer_mod, "replace_file", replace_then_edit)
    w.update("rr03", {"comment": "bbbb"})
    monkeypatch.undo()
    w.update("rr04", {"comment": "cccc"})
    config = _fresh(paths)
    assert (config["rr00"]["comment"], config["rr03"]["comment"], config["rr04"]["comment"]) == ("EDIT", "bbbb", "cccc")
