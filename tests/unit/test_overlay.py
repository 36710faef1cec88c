"""Fleet mode's overlay (:mod:`dsproxy.config.overlay`): a watch batch reaches the workers through
the small overlay file, the mirror file follows once the batches pause.  A fleet writer (as the
manager's writer thread drives it) and registries in every cache mode, in one process."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dsproxy import Operation, Registry
from dsproxy import registry as registry_mod
from dsproxy.config import Value, dump, parse, read_config, replace_file
from dsproxy.config import overlay as overlays
from dsproxy.config.overlay import Overlay
from dsproxy.daemon.writer import ConfigWriter, WriteRefused
from dsproxy.errors import MaintenanceRefused, NoSuchDatastore
from dsproxy.ipc import shm
from dsproxy.paths import Paths
from dsproxy.registry import DISCARD_CACHES


@pytest.fixture
def writer(paths: Paths, seg: shm.Segment) -> ConfigWriter:
    w = ConfigWriter(paths, lambda: seg)
    w.check_file()
    w.enable_fleet()
    w.mirror_replace({n: _props(paths, n) for n in ("alpha", "beta")}, {"alpha": 2, "beta": 3}, 3)
    return w


@pytest.fixture(params=["on", "config", "off"])
def reg(paths: Paths, writer: ConfigWriter, request: pytest.FixtureRequest) -> Iterator[Registry]:
    r = Registry(config_dir=paths.config_dir, run_dir=paths.run_dir, cache=request.param, create_shm=False)
    try:
        yield r
    finally:
        r.close()


def _props(paths: Paths, name: str, **extra: Any) -> dict[str, Value]:
    section: dict[str, Value] = parse(dump({name: {"path": str(paths.data_dir / name), **extra}}))[name]
    return section


def _comment(reg: Registry, name: str) -> object:
    return reg.config()[0][name].get("comment")


def test_a_batch_is_served_from_the_overlay_and_the_file_follows_once_idle(
    writer: ConfigWriter, reg: Registry, paths: Paths
) -> None:
    before = paths.config_file.read_bytes()
    assert _comment(reg, "alpha") is None
    writer.mirror_apply(
        {"alpha": _props(paths, "alpha", comment="one"), "beta": None, "gamma": _props(paths, "gamma")},
        {"alpha": 4, "beta": None, "gamma": 4},
        4,
    )
    assert paths.config_file.read_bytes() == before  # not written: the batch is in the overlay
    assert _comment(reg, "alpha") == "one"
    with pytest.raises(NoSuchDatastore):
        reg.lookup("beta")
    reg.lookup("gamma").release()
    cfg, digest = reg.config()
    assert list(cfg) == ["alpha", "gamma"] and digest == writer.served_digest(writer.kept)  # type: ignore[arg-type]
    if reg.mode == "on" and not DISCARD_CACHES:
        assert reg.changes_overlaid >= 1  # (the file not read again)
    # idle: the file whole, the digest a client holds unchanged, the same config served
    writer.flush_overlay(idle=0)
    assert list(read_config(paths.config_file)[0]) == ["alpha", "gamma"]
    assert reg.config() == (cfg, digest)
    assert _comment(reg, "alpha") == "one"
    # the next batch after the flush: the overlay again, the same stores served
    writer.mirror_apply({"alpha": _props(paths, "alpha", comment="two")}, {"alpha": 5}, 5)
    assert _comment(reg, "alpha") == "two"
    assert reg.config()[1] != digest


def test_the_writes_digest_check_takes_the_digest_the_workers_show(
    writer: ConfigWriter, reg: Registry, paths: Paths
) -> None:
    writer.mirror_apply({"alpha": _props(paths, "alpha", comment="one")}, {"alpha": 4}, 4)
    shown = reg.config()[1]
    writer.fleet_update("alpha", {"comment": "x", "digest": shown})  # validates: no DigestMismatch
    with pytest.raises(WriteRefused) as err:
        writer.fleet_update("alpha", {"comment": "x", "digest": "0" * 64})
    assert err.value.status == 409


def test_a_maintenance_mode_in_the_overlay_refuses_operations(
    writer: ConfigWriter, reg: Registry, paths: Paths
) -> None:
    reg.lookup("alpha", Operation.WRITE).release()
    writer.mirror_apply({"alpha": _props(paths, "alpha", **{"maintenance-mode": "offline"})}, {"alpha": 4}, 4)
    with pytest.raises(MaintenanceRefused):
        reg.lookup("alpha", Operation.READ)
    writer.mirror_apply({"alpha": _props(paths, "alpha")}, {"alpha": 5}, 5)  # back online: the file's again
    reg.lookup("alpha", Operation.READ).release()


def test_a_hand_edit_of_the_file_still_serves_the_overlays_stores(
    writer: ConfigWriter, reg: Registry, paths: Paths
) -> None:
    writer.mirror_apply({"gamma": _props(paths, "gamma")}, {"gamma": 4}, 4)
    # an editor that read the file (without the overlay's store) and wrote it back: no record
    replace_file(paths.config_file, paths.config_file.read_bytes() + b"\ndatastore: sneaky\n\tpath /tmp/sneaky\n")
    seg = reg.segment
    if seg is not None:
        seg.bump_generation()  # as a worker that noticed it does
    assert {"gamma", "sneaky"} <= set(reg.config()[0])  # the edit and what it left out
    writer.check_file()  # the manager's watch: the mirror restored, whole
    assert set(read_config(paths.config_file)[0]) == {"alpha", "beta", "gamma"}
    assert set(reg.config()[0]) == {"alpha", "beta", "gamma"}


def test_an_overlay_of_another_file_or_garbage_is_not_served(writer: ConfigWriter, reg: Registry, paths: Paths) -> None:
    writer.mirror_apply({"gamma": _props(paths, "gamma")}, {"gamma": 4}, 4)
    path = overlays.path_in(paths.config_dir)
    good = Path(path).read_bytes()
    overlay = overlays.read(path)
    assert overlay is not None and set(overlay.stores) == {"gamma"}
    for bad in (b"", b"{", b'{"version": 1}', good.replace(b'"version":1', b'"version":2'), b"[]" * 10):
        replace_file(path, bad)
        assert overlays.read(path) is None
    other = overlays.Overlay(os.urandom(16), overlay.stamp, overlay.carried, overlay.stores)
    replace_file(path, other.dump())
    seg = reg.segment
    if seg is not None:
        seg.bump_generation()
    assert "gamma" not in reg.config()[0]  # based on another file: the file alone
    os.chmod(path, 0o666)
    replace_file(path, good, mode=0o646)
    assert overlays.read(path) is None  # writable by others
    replace_file(path, good, mode=0o660)
    assert overlays.read(path) is None  # writable by the group (the proxy's, under systemd)
    replace_file(path, good)
    if seg is not None:
        seg.bump_generation()
    assert "gamma" in reg.config()[0]


def test_a_batch_past_the_overlays_bounds_writes_the_file_whole(
    writer: ConfigWriter, paths: Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(overlays, "MAX_STORES", 2)
    reg = Registry(config_dir=paths.config_dir, run_dir=paths.run_dir, create_shm=False)
    try:
        reg.config()
        writer.mirror_apply({"gamma": _props(paths, "gamma")}, {"gamma": 4}, 4)
        assert "gamma" not in read_config(paths.config_file)[0]
        assert "gamma" in reg.config()[0]
        applied = reg.changes_applied
        writer.mirror_apply({n: _props(paths, n) for n in ("delta1", "delta2")}, {"delta1": 5, "delta2": 5}, 5)
        assert {"gamma", "delta1", "delta2"} <= set(read_config(paths.config_file)[0])
        assert overlays.served(paths.config_file) == read_config(paths.config_file)[0]
        assert {"gamma", "delta1", "delta2"} <= set(reg.config()[0])
        if not DISCARD_CACHES:  # the overlay's stores were in the ring with the write's: spliced, not parsed
            assert reg.changes_applied == applied + 1
    finally:
        reg.close()


def test_a_single_host_manager_writes_the_overlay_left_by_fleet_mode_into_the_file(
    writer: ConfigWriter, paths: Paths, seg: shm.Segment
) -> None:
    writer.mirror_apply({"gamma": _props(paths, "gamma"), "beta": None}, {"gamma": 4, "beta": None}, 4)
    path = overlays.path_in(paths.config_dir)
    assert os.path.exists(path)
    # the same host without --etcd: what its workers served stays, in the file; the overlay goes
    single = ConfigWriter(paths, lambda: seg)
    single.drop_stale_overlay()  # (the manager without --etcd, before its start's bump)
    assert not os.path.exists(path)
    assert set(read_config(paths.config_file)[0]) == {"alpha", "gamma"}
    single.check_file()
    replace_file(paths.config_file, paths.config_file.read_bytes() + b"\n")  # a hand edit: the file alone
    assert set(overlays.served(paths.config_file)) == {"alpha", "gamma"}


@pytest.mark.parametrize("mode", ["on", "config"])
def test_a_flush_while_a_worker_reads_the_file_never_leaves_it_without_the_overlays_stores(
    writer: ConfigWriter, paths: Paths, seg: shm.Segment, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer.mirror_apply({"gamma": _props(paths, "gamma"), "beta": None}, {"gamma": 4, "beta": None}, 4)
    gen = seg.generation()
    reg = Registry(config_dir=paths.config_dir, run_dir=paths.run_dir, cache=mode, create_shm=False)
    real = registry_mod.parse  # type: ignore[attr-defined]
    flushed: list[int | None] = []

    def parse_then_flush(*args: Any, **kwargs: Any) -> Any:
        out = real(*args, **kwargs)
        if not flushed:  # the manager's idle flush lands while this worker parses the file
            flushed.append(writer.flush_overlay(idle=0))
        return out

    monkeypatch.setattr(registry_mod, "parse", parse_then_flush)
    try:
        cache = reg._load(gen)
        assert flushed and flushed[0] is not None
        assert cache.generation == gen and "gamma" in cache.served() and "beta" not in cache.served()
    finally:
        reg.close()


def test_an_overlay_of_wide_characters_stays_within_what_a_worker_reads(
    writer: ConfigWriter, reg: Registry, paths: Paths
) -> None:
    wide: dict[str, dict[str, Value] | None] = {
        f"wide{i}": parse(
            dump(
                {
                    f"wide{i}": {
                        "path": str(paths.data_dir / f"w{i}" / ("\u00e9" * 50) / ("\u00e9" * 50)),
                        "comment": "\U0001f600" * 100,
                    }
                }
            )
        )[f"wide{i}"]
        for i in range(150)
    }
    writer.mirror_apply(wide, dict.fromkeys(wide, 4), 4)  # (~285 KB as JSON: the file whole instead)
    assert os.path.getsize(overlays.path_in(paths.config_dir)) <= overlays.MAX_BYTES
    cfg, digest = reg.config()
    assert set(wide) <= set(cfg) and digest == writer.served_digest(writer.kept)  # type: ignore[arg-type]


def test_a_restarted_manager_continues_the_overlay_its_workers_serve(
    writer: ConfigWriter, reg: Registry, paths: Paths, seg: shm.Segment
) -> None:
    writer.mirror_apply({"beta": None, "gamma": _props(paths, "gamma")}, {"beta": None, "gamma": 4}, 4)
    assert set(reg.config()[0]) == {"alpha", "gamma"}
    # a new manager (as Manager.run: the watch's check, then fleet mode), etcd not answering yet
    again = ConfigWriter(paths, lambda: seg)
    again.check_file()
    mirror = again.enable_fleet()
    assert set(mirror.sections) == {"alpha", "gamma"}  # the mirror is what the workers serve
    seg.publish([(shm.ChangeKind.EVERYTHING, "*")])  # (what Mirror.start does when etcd fails)
    assert set(reg.config()[0]) == {"alpha", "gamma"}
    # and its next batch goes on in the same overlay, the digest as the workers see it
    again.mirror_apply({"delta1": _props(paths, "delta1")}, {"delta1": 5}, 5)
    assert set(reg.config()[0]) == {"alpha", "gamma", "delta1"}
    assert reg.config()[1] == again.served_digest(again.kept)  # type: ignore[arg-type]
    assert "beta" in read_config(paths.config_file)[0]  # (the file itself: not written yet)


def test_an_edit_in_place_that_keeps_the_files_stamp_is_still_undone(
    writer: ConfigWriter, paths: Paths, seg: shm.Segment
) -> None:
    writer.mirror_apply({"gamma": _props(paths, "gamma")}, {"gamma": 4}, 4)  # an overlay with stores
    path = paths.config_file
    st = os.stat(path)
    data = path.read_bytes()
    edited = data.replace(b"/alpha", b"/ALPHA")
    assert len(edited) == len(data)
    with open(path, "r+b") as f:
        f.write(edited)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # (touch -r, cp -p, coarse timestamps)
    writer.check_file()
    assert writer._fleet().hand_edits == 1
    assert read_config(path)[0]["alpha"]["path"] == str(paths.data_dir / "alpha")
    assert "gamma" in read_config(path)[0]  # restored whole: the mirror, overlay's stores included


def test_an_overlay_changed_by_someone_else_is_undone_and_counted(
    writer: ConfigWriter, reg: Registry, paths: Paths
) -> None:
    writer.mirror_apply({"gamma": _props(paths, "gamma")}, {"gamma": 4}, 4)
    path = overlays.path_in(paths.config_dir)
    forged = json.loads(Path(path).read_bytes())
    forged["stores"]["sneaky"] = "datastore: sneaky\n\tpath /tmp/sneaky\n"
    replace_file(path, json.dumps(forged).encode())
    writer.check_file()  # the watch
    assert writer._fleet().hand_edits == 1
    assert set(reg.config()[0]) == {"alpha", "beta", "gamma"}
    assert set(read_config(paths.config_file)[0]) == {"alpha", "beta", "gamma"}


@pytest.mark.parametrize(
    "raw",
    [b"[" * 200_000, b'{"version":1,"base":["00","1","2","3"],"stores":{}}', "surrogate", "carried"],
    ids=["deep", "short-token", "surrogate", "carried"],
)
def test_an_overlay_that_is_not_the_managers_reads_as_none(
    writer: ConfigWriter, reg: Registry, paths: Paths, raw: bytes | str
) -> None:
    writer.mirror_apply({"gamma": _props(paths, "gamma")}, {"gamma": 4}, 4)
    path = overlays.path_in(paths.config_dir)
    if raw == "surrogate":
        data = json.loads(Path(path).read_bytes())
        data["stores"]["gamma"] = "datastore: gamma\n\tcomment X\n"
        raw = json.dumps(data).replace("comment X", "comment \\ud800").encode()
    elif raw == "carried":
        data = json.loads(Path(path).read_bytes())
        data["carried"] = "X" * 64
        raw = json.dumps(data).replace("X" * 64, "\\ud800" * 64).encode()
    assert isinstance(raw, bytes)
    replace_file(path, raw)
    assert overlays.read(path) is None
    seg = reg.segment
    if seg is not None:
        seg.bump_generation()
    assert "gamma" not in reg.config()[0]  # the file alone (the manager's watch restores it)


def test_a_load_that_retries_after_a_flush_reads_the_overlay_of_the_file_it_then_reads(
    writer: ConfigWriter, paths: Paths, seg: shm.Segment, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg = Registry(config_dir=paths.config_dir, run_dir=paths.run_dir, create_shm=False)
    try:
        writer.mirror_apply({"gamma": _props(paths, "gamma")}, {"gamma": 4}, 4)
        reg.config()
        writer.mirror_apply({"delta1": _props(paths, "delta1")}, {"delta1": 5}, 5)
        gen = seg.generation()
        real = reg._read_overlay
        acted: list[int | None] = []

        def then_the_manager_goes_on() -> overlays.Overlay | None:
            out = real()
            if not acted:  # the worker is descheduled right after its overlay read
                acted.append(writer.flush_overlay(idle=0))  # the file whole, an empty overlay on it
                acted.append(writer.mirror_apply({"eps1": _props(paths, "eps1")}, {"eps1": 6}, 6))
            return out

        monkeypatch.setattr(reg, "_read_overlay", then_the_manager_goes_on)
        cache = reg._load(gen)
        assert cache.generation != gen or "delta1" in cache.served()
        if cache.generation == seg.generation():
            assert "eps1" in cache.served()  # the generation that made eps1 is served with eps1
        monkeypatch.undo()
        cfg, _ = reg.config()
        assert {"gamma", "delta1", "eps1"} <= set(cfg)
    finally:
        reg.close()


def test_an_overlay_a_restarted_manager_cannot_continue_is_removed(
    writer: ConfigWriter, reg: Registry, paths: Paths, seg: shm.Segment
) -> None:
    writer.mirror_apply({"gamma": _props(paths, "gamma")}, {"gamma": 4}, 4)
    path = overlays.path_in(paths.config_dir)
    data = json.loads(Path(path).read_bytes())
    data["stores"]["gamma"] = "datastore: gamma\n\tpath relative/not/allowed\n"  # does not parse
    replace_file(path, json.dumps(data).encode())
    again = ConfigWriter(paths, lambda: seg)
    again.check_file()
    mirror = again.enable_fleet()
    assert not os.path.exists(path) and set(mirror.sections) == {"alpha", "beta"}
    seg.publish([(shm.ChangeKind.EVERYTHING, "*")])
    assert set(reg.config()[0]) == {"alpha", "beta"}  # what the manager mirrors, nothing else


def test_an_overlay_where_the_manager_wrote_none_is_undone(writer: ConfigWriter, reg: Registry, paths: Paths) -> None:
    writer.mirror_apply({"gamma": _props(paths, "gamma")}, {"gamma": 4}, 4)
    path = overlays.path_in(paths.config_dir)
    stray = Path(path).read_bytes()
    writer.overlay = None  # (as after a whole write the file system took no record for)
    os.unlink(path)
    writer._overlay_reset(None, None, [])
    replace_file(path, stray)
    writer.check_file()
    assert writer._fleet().hand_edits == 1
    assert set(reg.config()[0]) == set(writer._fleet().sections)


def test_an_overlay_edited_just_before_a_flush_is_still_counted(writer: ConfigWriter, paths: Paths) -> None:
    writer.mirror_apply({"gamma": _props(paths, "gamma")}, {"gamma": 4}, 4)
    path = overlays.path_in(paths.config_dir)
    data = json.loads(Path(path).read_bytes())
    data["stores"]["sneaky"] = "datastore: sneaky\n\tpath /tmp/sneaky\n"
    replace_file(path, json.dumps(data).encode())
    writer._written = 0.0  # a flush is due
    writer.check_file()
    assert writer._fleet().hand_edits == 1
    assert "sneaky" not in read_config(paths.config_file)[0]
    # and a batch that finds it edited undoes it too
    replace_file(path, json.dumps(data).encode())
    writer.mirror_apply({"delta1": _props(paths, "delta1")}, {"delta1": 5}, 5)
    assert writer._fleet().hand_edits == 2
    assert "sneaky" not in overlays.served(paths.config_file)


# -- the tools read what the workers serve -------------------------------------------------------------


def test_config_check_reports_the_config_with_its_overlay_and_the_digest_clients_see(
    writer: ConfigWriter, reg: Registry, paths: Paths, capsys: pytest.CaptureFixture[str]
) -> None:
    from dsproxy import cli

    writer.mirror_apply({"beta": None, "gamma": _props(paths, "gamma")}, {"beta": None, "gamma": 4}, 4)
    assert sorted(read_config(paths.config_file)[0]) == ["alpha", "beta"]  # (the file alone: not yet)
    check = ["--base-dir", str(paths.config_dir.parent), "config", "check"]
    assert cli.main(check) == 0
    out = capsys.readouterr().out
    cfg, digest = reg.config()
    assert sorted(cfg) == ["alpha", "gamma"]
    assert f"OK, 2 datastores (with the changes in {overlays.NAME} not yet in the file), digest {digest}" in out
    # a copy of the file beside it is checked as it is: the overlay is the instance file's
    copy = paths.config_dir / "copy.cfg"
    copy.write_bytes(paths.config_file.read_bytes())
    assert cli.main([*check, str(copy)]) == 0
    assert "OK, 2 datastores, digest" in capsys.readouterr().out and sorted(read_config(copy)[0]) == ["alpha", "beta"]
    writer.flush_overlay(idle=0)  # the file whole: no overlay to name, the same digest
    assert cli.main(check) == 0
    assert f"OK, 2 datastores, digest {digest}" in capsys.readouterr().out


def test_served_leaves_out_an_overlay_text_a_worker_refuses(writer: ConfigWriter, reg: Registry, paths: Paths) -> None:
    writer.mirror_apply({"gamma": _props(paths, "gamma")}, {"gamma": 4}, 4)
    overlay = overlays.read_beside(paths.config_file)
    assert overlay is not None
    foreign = dump({"delta": _props(paths, "delta")})  # the text under gamma's name holds delta
    tampered = Overlay(overlay.token, overlay.stamp, overlay.carried, {"gamma": foreign, "beta": "not a section"})
    replace_file(overlays.path_in(paths.config_dir), tampered.dump())
    assert sorted(overlays.served(paths.config_file)) == ["alpha", "beta"] == sorted(reg.config()[0])


def test_served_reads_the_overlay_before_the_file(
    writer: ConfigWriter, paths: Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flush between the two reads: the overlay read (based on the file before) does not apply
    to the file read next, which holds its stores -- nothing served is lost either way."""
    writer.mirror_apply({"gamma": _props(paths, "gamma")}, {"gamma": 4}, 4)
    real = overlays.read_beside

    def then_flush(config_file: Any) -> Any:
        found = real(config_file)
        writer.flush_overlay(idle=0)
        return found

    monkeypatch.setattr(overlays, "read_beside", then_flush)
    assert sorted(overlays.served(paths.config_file)) == ["alpha", "beta", "gamma"]
