"""Instances on disk for tests and benchmarks: real datastores and a config naming them.

    paths = Paths.resolve("/tmp/x")
    write_stores(paths, {"store1": {"comment": "one"}, "store2": {}})   # etc/datastore.cfg, datastores/*

Each store is laid out by :func:`dsproxy.fsutil.make_store` (the directory, ``.chunks``, ``.lock``
-- what the manager's create and demo stores make) at ``<data_dir>/<name>`` unless its properties
name a ``path``; the config is written in its canonical form (:func:`dsproxy.config.dump`), by
hand: no lock, no generation bump, as an admin with an editor would.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from ..config import Value, dump
from ..fsutil import make_store
from ..paths import Paths


def store_path(paths: Paths, name: str) -> str:
    """Where a store named ``name`` lives by default (the manager's create picks the same)."""
    return os.path.join(os.fspath(paths.data_dir), name)


def write_stores(paths: Paths, stores: Mapping[str, Mapping[str, Value]]) -> None:
    """Lay out every store of ``stores`` (name -> properties) and write ``datastore.cfg`` naming them."""
    paths.ensure()
    sections: dict[str, dict[str, Value]] = {}
    for name, props in stores.items():
        path = str(props.get("path") or store_path(paths, name))
        make_store(path)
        sections[name] = {**props, "path": path}
    paths.config_file.write_text(dump(sections))
