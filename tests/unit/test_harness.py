"""The harness (dsproxy.testing) and the one store lay-out: what tests, benches and creates share."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import dsproxy
from dsproxy.config import read_config
from dsproxy.fsutil import UnsafePath, lay_out_store, make_store, walk
from dsproxy.ipc import shm
from dsproxy.paths import Paths
from dsproxy.testing.stores import write_stores
from tests.helpers import modules_loaded_by_the_daemons


def test_the_daemons_and_the_library_never_load_the_harness() -> None:
    assert modules_loaded_by_the_daemons("dsproxy.testing") == []


def test_a_made_store_serves_lookups_and_a_second_make_reuses_it(tmp_path: Path) -> None:
    paths = Paths.resolve(tmp_path / "base")
    write_stores(paths, {"one": {"comment": "first"}, "two": {"path": str(tmp_path / "elsewhere" / "two")}})
    (tmp_path / "elsewhere" / "two" / ".chunks" / "0000").mkdir()
    make_store(str(tmp_path / "elsewhere" / "two"))  # what exists stays
    assert (tmp_path / "elsewhere" / "two" / ".chunks" / "0000").is_dir()
    assert read_config(paths.config_file)[0]["one"]["comment"] == "first"
    try:
        with dsproxy.Registry(base_dir=tmp_path / "base") as reg:
            for name in ("one", "two"):
                reg.lookup(name, dsproxy.Operation.WRITE).release()
    finally:
        shm.unlink(paths.run_dir)


def test_make_store_refuses_a_link_anywhere_in_the_path(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(UnsafePath, match="symbolic link"):
        make_store(str(tmp_path / "link" / "store"))
    assert os.listdir(tmp_path / "real") == []


def test_a_fresh_lay_out_refuses_what_exists_and_says_what_it_made(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    (store / ".lock").symlink_to(tmp_path / "target")
    made: list[str] = []
    with walk(str(store)) as chain, pytest.raises(FileExistsError):
        lay_out_store(chain.fd, str(store), fresh=True, made=made)
    assert made == [".chunks"]  # an undo removes exactly this
    assert not (tmp_path / "target").exists()
