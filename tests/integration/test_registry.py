"""The registry in one process: lookups, maintenance, eviction, the modes, degraded operation."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import posix_ipc
import pytest

import dsproxy
import dsproxy.registry as registry_mod
from dsproxy import Operation
from dsproxy.config import digest, parse, parsed
from dsproxy.config import record as file_record
from dsproxy.config.file import replace_file
from dsproxy.config.overlay import Overlay
from dsproxy.config.section import render_section
from dsproxy.ipc import shm
from tests.helpers import Instance

MODES = ["on", "config", "off"]


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def reg(inst: Instance, mode: str) -> Iterator[dsproxy.Registry]:
    inst.add_stores("store1", "store2", comment="demo")
    r = dsproxy.Registry(base_dir=inst.base, cache=mode)
    yield r
    r.close()


def test_lookup_hands_out_the_store_and_counts_the_operation(reg: dsproxy.Registry, inst: Instance) -> None:
    with reg.lookup("store1", Operation.WRITE) as h:
        assert h.name == "store1"
        assert h.path == str(inst.paths.data_dir / "store1")
        assert reg.active_operations("store1") == {"read": 0, "write": 1}
        r = reg.lookup("store1", Operation.READ)
        assert reg.active_operations("store1") == {"read": 1, "write": 1}
        r.release()
        r.release()  # idempotent
    assert reg.active_operations("store1") == {"read": 0, "write": 0}
    assert reg.active_operations("store2") == {"read": 0, "write": 0}


def test_unknown_store(reg: dsproxy.Registry) -> None:
    with pytest.raises(dsproxy.NoSuchDatastore, match=r"^no such datastore 'nope'$") as info:
        reg.lookup("nope", Operation.READ)
    assert info.value.status == 404
    assert reg.active_operations("nope") == {"read": 0, "write": 0}


@pytest.mark.parametrize(
    ("maintenance", "op", "text"),
    [
        (
            "type=read-only,message=disk swap",
            Operation.WRITE,
            "datastore 'store1' is unavailable: read-only maintenance mode: disk swap",
        ),
        (
            "type=offline,message=disk swap",
            Operation.READ,
            "datastore 'store1' is unavailable: offline maintenance mode: disk swap",
        ),
        ("unmount", Operation.WRITE, "datastore 'store1' is unavailable: datastore is being unmounted"),
        ("delete", Operation.LOOKUP, "datastore 'store1' is unavailable: datastore is being deleted"),
    ],
)
def test_maintenance_refusals_have_the_pbs_texts(
    reg: dsproxy.Registry, inst: Instance, maintenance: str, op: Operation, text: str
) -> None:
    inst.set_maintenance("store1", maintenance)
    with pytest.raises(dsproxy.MaintenanceRefused) as info:
        reg.lookup("store1", op)
    assert str(info.value) == text
    assert reg.active_operations("store1") == {"read": 0, "write": 0}  # nothing left registered
    with reg.lookup("store2", op):  # other stores are untouched
        pass


def test_read_only_still_allows_reads_and_offline_allows_lookup(reg: dsproxy.Registry, inst: Instance) -> None:
    inst.set_maintenance("store1", "read-only")
    with reg.lookup("store1", Operation.READ):
        pass
    inst.set_maintenance("store1", "offline")
    with reg.lookup("store1", Operation.LOOKUP) as h:
        assert h.name == "store1"


def test_offline_store_is_evicted_when_the_last_operation_ends(reg: dsproxy.Registry, inst: Instance) -> None:
    held = reg.lookup("store1", Operation.WRITE)
    fd = held.instance.lock_fd
    inst.set_maintenance("store1", "type=offline,message=swap")
    with pytest.raises(dsproxy.MaintenanceRefused):
        reg.lookup("store1", Operation.READ)  # the new config is loaded; the held operation stays
    assert "store1" in reg.instances and os.fstat(fd)
    held.release()
    assert "store1" not in reg.instances
    with pytest.raises(OSError):
        os.fstat(fd)  # the .lock fd is closed: this process holds nothing on the store


def test_removed_store_instance_is_dropped(reg: dsproxy.Registry, inst: Instance) -> None:
    with reg.lookup("store2", Operation.READ):
        pass
    inst.update(lambda cfg: cfg.pop("store2"))
    with pytest.raises(dsproxy.NoSuchDatastore):
        reg.lookup("store2", Operation.READ)
    assert "store2" not in reg.instances


def test_rebuild_after_a_config_change_keeps_the_lock_fd_and_its_lock(inst: Instance) -> None:
    inst.add_stores("store1")
    reg = dsproxy.Registry(base_dir=inst.base)
    try:
        first = reg.lookup("store1", Operation.WRITE)
        fd = first.instance.lock_fd
        inst.update(lambda cfg: cfg["store1"].update(comment="changed"))
        with reg.lookup("store1", Operation.READ) as second:
            assert second.instance is not first.instance
            assert second.instance.props["comment"] == "changed"
            assert second.instance.lock_fd == fd
        first.release()
        # another process cannot take an exclusive lock: our shared fcntl lock survived the rebuild
        probe = textwrap.dedent(
            f"""
            import fcntl, os, sys
            fd = os.open({str(inst.paths.data_dir / "store1" / ".lock")!r}, os.O_RDWR)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                sys.exit(3)
            """
        )
        assert subprocess.run([sys.executable, "-c", probe], timeout=30).returncode == 3
        assert fcntl.F_GETFD and os.fstat(fd)
    finally:
        reg.close()


def test_missing_chunk_store_is_a_clear_error_and_nothing_stays_registered(
    reg: dsproxy.Registry, inst: Instance
) -> None:
    inst.update(lambda cfg: cfg.update({"ghost": {"path": str(inst.base / "nowhere")}}))
    with pytest.raises(dsproxy.InstanceError, match=r"unable to open chunk store 'ghost' at .*nowhere/.chunks"):
        reg.lookup("ghost", Operation.WRITE)
    assert reg.active_operations("ghost") == {"read": 0, "write": 0}


def test_all_modes_give_the_same_answers(inst: Instance) -> None:
    inst.add_stores("store1", "store2", "store3")
    inst.set_maintenance("store2", "read-only")
    inst.set_maintenance("store3", "offline")
    regs = [dsproxy.Registry(base_dir=inst.base, cache=m) for m in MODES]

    def answer(r: dsproxy.Registry, name: str, op: Operation) -> str:
        try:
            with r.lookup(name, op) as h:
                return f"ok {h.name} {h.path}"
        except dsproxy.DatastoreError as err:
            return f"{type(err).__name__}: {err}"

    try:
        for name in ("store1", "store2", "store3", "nope"):
            for op in Operation:
                answers = {answer(r, name, op) for r in regs}
                assert len(answers) == 1, (name, op, answers)
        held = [r.lookup("store1", Operation.WRITE) for r in regs]
        assert all(r.active_operations("store1") == {"read": 0, "write": 3} for r in regs)
        for h in held:
            h.release()
    finally:
        for r in regs:
            r.close()


def test_misses_are_answered_from_the_cache(inst: Instance) -> None:
    inst.add_stores("store1")
    reg = dsproxy.Registry(base_dir=inst.base)
    try:
        with reg.lookup("store1"):
            pass
        reloads = reg.reloads
        for i in range(200):
            with pytest.raises(dsproxy.NoSuchDatastore):
                reg.lookup(f"missing{i}")
        expected = 200 if dsproxy.registry.DISCARD_CACHES else 0
        assert reg.reloads - reloads == expected
    finally:
        reg.close()


def test_a_hand_edit_is_seen_after_the_ttl_and_bumps_the_generation(inst: Instance) -> None:
    inst.add_stores("store1")
    reg = dsproxy.Registry(base_dir=inst.base, ttl=0.2)
    try:
        with reg.lookup("store1"):
            pass
        gen = reg.generation
        text = inst.config_file.read_text()
        inst.write_text(text + f"\ndatastore: store9\n\tpath {inst.store_dir('store9')}\n")
        assert reg.generation == gen  # nobody bumped: a hand edit
        time.sleep(0.25)
        with reg.lookup("store9") as h:
            assert h.name == "store9"
        assert gen is not None and reg.generation == gen + 1
    finally:
        reg.close()


def test_a_hand_edit_that_does_not_parse_keeps_the_last_good_config(inst: Instance) -> None:
    inst.add_stores("store1")
    reg = dsproxy.Registry(base_dir=inst.base)
    try:
        with reg.lookup("store1"):
            pass
        inst.write_text(inst.config_file.read_text() + "\tbogus 1\n")
        inst.segment().bump_generation()  # the manager noticed the edit
        with reg.lookup("store1") as h:
            assert h.name == "store1"
        assert reg.config_error is not None and "unknown property 'bogus'" in reg.config_error
    finally:
        reg.close()


def test_no_config_at_all_is_config_unavailable(inst: Instance) -> None:
    inst.write_text("datastore: store1\n\tpath relative\n")
    reg = dsproxy.Registry(base_dir=inst.base)
    try:
        with pytest.raises(dsproxy.ConfigUnavailable, match=r"config unavailable: parsing .* line 2") as info:
            reg.lookup("store1")
        assert info.value.status == 503
    finally:
        reg.close()


def test_foreign_shared_memory_runs_degraded_and_still_correct(inst: Instance) -> None:
    inst.add_stores("store1")
    shm.unlink(inst.paths.run_dir)
    foreign = posix_ipc.SharedMemory(shm.segment_name(inst.paths.run_dir), posix_ipc.O_CREX, size=4096)
    os.write(foreign.fd, b"SOMEBODY ELSE'S")
    foreign.close_fd()
    reg = dsproxy.Registry(base_dir=inst.base)
    try:
        assert reg.degraded is not None and "foreign" in reg.degraded
        assert reg.generation is None
        with reg.lookup("store1", Operation.WRITE):
            assert reg.active_operations("store1") == {"read": 0, "write": 1}
        inst.write_text(inst.config_file.read_text() + "\tmaintenance-mode offline\n")
        with pytest.raises(dsproxy.MaintenanceRefused):  # no caching: the very next lookup sees it
            reg.lookup("store1", Operation.READ)
    finally:
        reg.close()


def test_closed_registry_frees_its_slot_and_refuses_lookups(inst: Instance) -> None:
    inst.add_stores("store1")
    reg = dsproxy.Registry(base_dir=inst.base)
    slot = reg.slot
    assert slot is not None
    seg = inst.segment()
    try:
        assert seg.words[seg.slot_base(slot) + shm.SLOT_PID] == os.getpid()
        reg.close()
        assert seg.words[seg.slot_base(slot) + shm.SLOT_PID] == 0
        with pytest.raises(dsproxy.DatastoreError, match="closed"):
            reg.lookup("store1")
    finally:
        seg.close()


def test_a_segment_replaced_by_the_manager_is_reopened_on_the_next_lookup(inst: Instance) -> None:
    inst.add_stores("store1")
    reg = dsproxy.Registry(base_dir=inst.base)
    new = None
    try:
        with reg.lookup("store1", Operation.WRITE):
            pass
        new = shm.recreate(inst.paths.run_dir)  # what the manager does with a stale segment
        with reg.lookup("store1", Operation.WRITE) as h:
            assert h.name == "store1"
            assert new.active_operations("store1") == (0, 1)  # registered in the new segment
        assert new.active_operations("store1") == (0, 0)
        assert reg.generation == new.generation()
    finally:
        reg.close()
        if new is not None:
            new.close()


def test_a_forked_child_gets_its_own_slot_and_leaves_the_parents_counts_alone(inst: Instance) -> None:
    inst.add_stores("store1")
    reg = dsproxy.Registry(base_dir=inst.base)
    try:
        held = reg.lookup("store1", Operation.WRITE)
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: its own slot; the inherited handle is not its to release
            code = 1
            try:
                held.release()
                with reg.lookup("store1", Operation.READ):
                    ok = reg.slot is not None and reg.active_operations("store1") == {"read": 1, "write": 1}
                code = 0 if ok else 2
            finally:
                os.write(write_fd, bytes([code]))
                os._exit(code)
        os.close(write_fd)
        assert os.read(read_fd, 1) == b"\x00"
        os.close(read_fd)
        os.waitpid(pid, 0)
        assert reg.active_operations("store1") == {"read": 0, "write": 1}
        held.release()
        assert reg.active_operations("store1") == {"read": 0, "write": 0}
    finally:
        reg.close()


@pytest.mark.parametrize("mode", ["config", "off"])
def test_a_config_lock_out_of_reach_is_a_datastore_error_not_a_crash(inst: Instance, mode: str) -> None:
    """The locked modes take the config lock on every lookup; a lock file that cannot be taken
    (here a symlink planted in its place, which is refused) is a 503 DatastoreError, never a raw
    LockError that a worker would answer with 500."""
    inst.add_stores("store1")
    r = dsproxy.Registry(base_dir=inst.base, cache=mode)
    try:
        lock = inst.paths.lock_file
        lock.unlink(missing_ok=True)
        lock.symlink_to(inst.base / "elsewhere")
        with pytest.raises(dsproxy.DatastoreError, match="lock") as info:
            r.lookup("store1", Operation.READ)
        assert info.value.status == 503
        assert not (inst.base / "elsewhere").exists()
        lock.unlink()
        with r.lookup("store1", Operation.READ) as h:
            assert h.name == "store1"
    finally:
        r.close()


# -- the proxy master's parse, inherited by its workers (registry.preload) ------------------------------


def _parse_refused(data: object, filename: str = "") -> None:
    raise AssertionError("parsed again: the preload was not adopted")


@pytest.mark.skipif(registry_mod.DISCARD_CACHES, reason="no preload under DSPROXY_DEBUG_DISCARD_CACHES")
def test_a_registry_after_a_preload_serves_that_parse_without_parsing_again(
    inst: Instance, monkeypatch: pytest.MonkeyPatch
) -> None:
    inst.add_stores("store1", "store2", comment="demo")
    assert registry_mod.preload(str(inst.config_file)) == 2
    monkeypatch.setattr(registry_mod, "parse", _parse_refused)
    reg = dsproxy.Registry(base_dir=inst.base)
    try:
        with reg.lookup("store2", Operation.WRITE) as store:
            assert store.instance.props["comment"] == "demo"
            assert reg.active_operations("store2") == {"read": 0, "write": 1}
        assert sorted(reg.config()[0]) == ["store1", "store2"]
    finally:
        reg.close()
    monkeypatch.undo()
    # taken once: a second registry of the process parses the file itself (its entries are its own)
    assert _served_comment(inst, "store1") == "demo"


def _served_comment(inst: Instance, name: str) -> object:
    """What a new registry of this process serves as ``name``'s comment."""
    reg = dsproxy.Registry(base_dir=inst.base)
    try:
        with reg.lookup(name) as store:
            return store.instance.props.get("comment")
    finally:
        reg.close()


def _read_refused(*args: object) -> None:
    raise AssertionError("the file was read again: the master's read was not adopted")


@pytest.mark.skipif(registry_mod.DISCARD_CACHES, reason="no preload under DSPROXY_DEBUG_DISCARD_CACHES")
def test_a_first_load_takes_the_masters_bytes_while_the_file_keeps_its_identity(
    inst: Instance, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file the manager wrote (its record names its stamp) and nobody touched since the
    master's preload: the worker's first load serves the master's read, without reading or
    hashing the file again."""
    inst.add_stores("store1", "store2", comment="demo")
    # written again as the manager's writer writes it: with a record naming the file's stamp
    replace_file(inst.config_file, inst.config_file.read_bytes(), record=file_record.FileRecord(os.urandom(16)))
    assert file_record.identity_of(str(inst.config_file)) is not None  # (else this tests nothing)
    assert registry_mod.preload(str(inst.config_file)) == 2
    monkeypatch.setattr(registry_mod, "_read_after", _read_refused)
    monkeypatch.setattr(registry_mod, "parse", _parse_refused)
    reg = dsproxy.Registry(base_dir=inst.base)
    try:
        with reg.lookup("store2") as store:
            assert store.instance.props["comment"] == "demo"
        _, served_digest = reg.config()
        assert served_digest == digest(inst.config_file.read_bytes())
    finally:
        reg.close()


@pytest.mark.skipif(registry_mod.DISCARD_CACHES, reason="no preload under DSPROXY_DEBUG_DISCARD_CACHES")
def test_an_edit_in_place_after_the_preload_is_served_by_the_first_load(inst: Instance) -> None:
    """An edit between the master's read and a worker's first load (in place: the record no
    longer names the file's stamp) is read, not the master's bytes served."""
    inst.add_stores("store1", "store2", comment="demo")
    replace_file(inst.config_file, inst.config_file.read_bytes(), record=file_record.FileRecord(os.urandom(16)))
    assert registry_mod.preload(str(inst.config_file)) == 2
    data, before = inst.config_file.read_bytes(), inst.config_file.stat()
    with open(inst.config_file, "r+b") as f:  # same size, same inode: only the mtime tells
        f.write(data.replace(b"comment demo", b"comment DEMO"))
    os.utime(inst.config_file, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))  # (any clock tick)
    assert _served_comment(inst, "store1") == "DEMO"


@pytest.mark.skipif(registry_mod.DISCARD_CACHES, reason="no preload under DSPROXY_DEBUG_DISCARD_CACHES")
def test_an_edit_in_place_that_puts_the_mtime_back_is_served_by_the_first_load(inst: Instance) -> None:
    """``touch -r``, ``cp --preserve=timestamps``, ``rsync -t --inplace``: the stamp the record
    names is the file's again, but its ctime moved -- the bytes are read, not the master's served."""
    inst.add_stores("store1", "store2", comment="demo")
    replace_file(inst.config_file, inst.config_file.read_bytes(), record=file_record.FileRecord(os.urandom(16)))
    assert registry_mod.preload(str(inst.config_file)) == 2
    data, before = inst.config_file.read_bytes(), inst.config_file.stat()
    time.sleep(0.05)  # (past a coarse clock tick of the ctime)
    with open(inst.config_file, "r+b") as f:
        f.write(data.replace(b"comment demo", b"comment DEMO"))
    os.utime(inst.config_file, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert file_record.identity_of(str(inst.config_file)) is not None  # the record names the stamp again
    assert _served_comment(inst, "store1") == "DEMO"


@pytest.mark.skipif(registry_mod.DISCARD_CACHES, reason="no preload under DSPROXY_DEBUG_DISCARD_CACHES")
def test_a_preload_takes_the_managers_parse_of_the_same_bytes(inst: Instance, monkeypatch: pytest.MonkeyPatch) -> None:
    inst.add_stores("store1", "store2", comment="demo")
    data = inst.config_file.read_bytes()
    parsed.save(inst.config_file, digest(data), parse(data))  # as the manager leaves it (leave_parse)
    monkeypatch.setattr(registry_mod, "parse", _parse_refused)
    assert registry_mod.preload(str(inst.config_file)) == 2
    reg = dsproxy.Registry(base_dir=inst.base)
    try:
        with reg.lookup("store2") as store:
            assert store.instance.props["comment"] == "demo"
        assert list(reg.config()[0]) == ["store1", "store2"]
    finally:
        reg.close()


@pytest.mark.skipif(registry_mod.DISCARD_CACHES, reason="no preload under DSPROXY_DEBUG_DISCARD_CACHES")
def test_an_offline_store_of_a_preload_is_evicted_after_its_lookup(
    inst: Instance, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The master found the stores to evict (a worker looking at every entry copied its pages):
    the worker still drops an offline store's instance once its lookup ends."""
    inst.add_stores("store1", "store2")
    inst.set_maintenance("store1", "offline")
    assert registry_mod.preload(str(inst.config_file)) == 2
    monkeypatch.setattr(registry_mod, "parse", _parse_refused)
    reg = dsproxy.Registry(base_dir=inst.base)
    try:
        for name in ("store1", "store2"):
            with reg.lookup(name, Operation.LOOKUP):
                assert name in reg.instances
        assert "store1" not in reg.instances and "store2" in reg.instances
    finally:
        reg.close()


@pytest.mark.skipif(registry_mod.DISCARD_CACHES, reason="no preload under DSPROXY_DEBUG_DISCARD_CACHES")
@pytest.mark.parametrize("with_overlay", [False, True])
def test_a_preloads_stores_to_evict_are_those_a_parse_finds(
    inst: Instance, monkeypatch: pytest.MonkeyPatch, with_overlay: bool
) -> None:
    """The master's list of the stores to evict, with an overlay on top that turns evicting stores
    into others and back, removes one, adds one and holds a text that does not parse: the
    worker evicts exactly what a registry that parsed the file itself does."""
    inst.add_stores("sta", "stb", "stc", "std", "ste", "stg")
    for name, mode in (("sta", "offline"), ("stc", "offline"), ("ste", "offline"), ("stg", "unmount")):
        inst.set_maintenance(name, mode)

    def text(name: str, **props: str) -> str:
        return render_section(name, {"path": str(inst.store_dir(name)), **props}, "overlay")[0]

    offline = {"maintenance-mode": "offline"}
    stores = {
        "sta": text("sta"),  # evicting -> not
        "stb": text("stb", **offline),  # not -> evicting
        "stc": None,  # evicting, removed
        "ste": text("ste", **offline),  # as in the file
        "stf": text("stf", **offline),  # new, evicting
        "stg": "datastore: stg\n\tbogus-key 1\n",  # does not parse: the file's entry stays
        "sth": None,  # removed, never there
    }
    if with_overlay:  # (its base: whatever file the registry read)
        overlay = Overlay(b"t" * 16, (0, 0, 0), None, stores)
        monkeypatch.setattr(registry_mod.Registry, "_read_overlay", lambda self: overlay)
        monkeypatch.setattr(Overlay, "applies_to", lambda self, identity: True)
    assert registry_mod.preload(str(inst.config_file)) == 6
    monkeypatch.setattr(registry_mod, "parse", _parse_refused)  # (the first registry takes the preload)
    first = dsproxy.Registry(base_dir=inst.base)
    try:
        first.lookup("std", Operation.LOOKUP).release()
        monkeypatch.setattr(registry_mod, "parse", parse)
        second = dsproxy.Registry(base_dir=inst.base)  # parses: no preload left
        try:
            second.lookup("std", Operation.LOOKUP).release()
            assert first._evict_names == second._evict_names
            expected = {"stb", "ste", "stf", "stg"} if with_overlay else {"sta", "stc", "ste", "stg"}
            assert first._evict_names == expected
        finally:
            second.close()
    finally:
        first.close()


def test_a_preload_parses_the_file_when_the_managers_parse_is_not_usable(inst: Instance) -> None:
    """The owner's file, checked whole, but its entries cannot be made (a maintenance mode the
    parser would have refused): the master parses the file and serves it -- it never stops."""
    inst.add_stores("store1", comment="demo")
    data = inst.config_file.read_bytes()
    bad = parse(data)
    bad["store1"] = {**bad["store1"], "maintenance-mode": "type=offlinf"}
    parsed.save(inst.config_file, digest(data), bad)
    assert registry_mod.preload(str(inst.config_file)) == (None if registry_mod.DISCARD_CACHES else 1)
    reg = dsproxy.Registry(base_dir=inst.base)
    try:
        with reg.lookup("store1") as store:
            assert store.instance.props["comment"] == "demo" and "maintenance-mode" not in store.instance.props
    finally:
        reg.close()


def test_a_preload_parses_a_file_changed_since_the_managers_parse(inst: Instance) -> None:
    inst.add_stores("store1", comment="before")
    data = inst.config_file.read_bytes()
    parsed.save(inst.config_file, digest(data), parse(data))
    inst.update(lambda cfg: cfg["store1"].update(comment="after"))
    assert registry_mod.preload(str(inst.config_file)) == (None if registry_mod.DISCARD_CACHES else 1)
    assert _served_comment(inst, "store1") == "after"


def test_a_file_changed_after_the_preload_is_served_as_it_is_now(inst: Instance) -> None:
    inst.add_stores("store1", comment="before")
    assert registry_mod.preload(str(inst.config_file)) == (None if registry_mod.DISCARD_CACHES else 1)
    inst.update(lambda cfg: cfg["store1"].update(comment="after"))
    inst.add_stores("store2")
    reg = dsproxy.Registry(base_dir=inst.base)
    try:
        with reg.lookup("store1") as store:
            assert store.instance.props["comment"] == "after"
        with reg.lookup("store2"):
            pass
    finally:
        reg.close()


def test_a_preload_of_a_file_that_does_not_parse_leaves_the_error_to_the_registry(inst: Instance) -> None:
    inst.write_text("datastore: store1\n\tpath relative\n")
    assert registry_mod.preload(str(inst.config_file)) is None
    reg = dsproxy.Registry(base_dir=inst.base)
    try:
        with pytest.raises(dsproxy.ConfigUnavailable, match=r"config unavailable: parsing .* line 2"):
            reg.lookup("store1")
    finally:
        reg.close()


@pytest.mark.skipif(registry_mod.DISCARD_CACHES, reason="no preload under DSPROXY_DEBUG_DISCARD_CACHES")
def test_a_worker_forked_after_the_preload_adopts_it(inst: Instance) -> None:
    inst.add_stores("store1", comment="demo")
    assert registry_mod.preload(str(inst.config_file)) == 1
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker: its first load takes the parse it inherited
        code = 1
        try:
            setattr(registry_mod, "parse", _parse_refused)  # noqa: B010 -- the child only, never undone
            reg = dsproxy.Registry(base_dir=inst.base)
            with reg.lookup("store1") as store:
                code = 0 if store.instance.props["comment"] == "demo" else 2
            reg.close()
        finally:
            os.write(write_fd, bytes([code]))
            os._exit(code)
    os.close(write_fd)
    try:
        assert os.read(read_fd, 1) == b"\x00"
    finally:
        os.close(read_fd)
        os.waitpid(pid, 0)
    registry_mod.drop_preloaded()
    assert registry_mod._preloaded is None
