"""A worker's figures, in-process: one name per figure in its slot, node status and /metrics.

A :class:`~dsproxy.daemon.api.WorkerApp` on a registry of a temp instance, its handlers called
directly (no server, no fork): milliseconds.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dsproxy import Registry
from dsproxy import registry as registry_mod
from dsproxy.config import Operation, update_config
from dsproxy.daemon import metrics
from dsproxy.daemon.api import WorkerApp
from dsproxy.daemon.http import HTTPError
from dsproxy.ipc import shm
from dsproxy.paths import Paths


@pytest.fixture
def app(tmp_path: Path) -> Iterator[WorkerApp]:
    paths = Paths.resolve(tmp_path / "base")
    paths.ensure()
    store = paths.data_dir / "store1"
    (store / ".chunks").mkdir(parents=True)
    (store / ".lock").touch()
    update_config(paths.config_file, lambda cfg: cfg.update({"store1": {"path": str(store)}}))
    registry = Registry(tmp_path / "base", role=shm.Role.WORKER)
    try:
        yield WorkerApp(registry, str(paths.run_dir / "manager.sock"))
    finally:
        registry.close()
        shm.unlink(paths.run_dir)


def _node_status(app: WorkerApp) -> dict[str, Any]:
    reply = app.node_status(None)  # type: ignore[arg-type]  # the handler reads nothing of the request
    data: dict[str, Any] = json.loads(reply.body)["data"]
    return data


def test_lookups_hits_and_both_kinds_of_errors_are_published_under_one_name(app: WorkerApp) -> None:
    reg = app.registry
    seg = reg.segment
    assert seg is not None
    for _ in range(3):
        app._lookup("store1", Operation.READ).release()
    config_file = reg.paths.config_file
    good = config_file.read_text()
    config_file.write_text(good + "\tbogus-key 1\n")  # a broken hand edit, published
    seg.bump_generation()
    reg.refresh()  # the registry's count: it keeps serving the last good config
    config_file.write_text(good + "\tmaintenance-mode offline\n")
    seg.bump_generation()
    with pytest.raises(HTTPError) as refused:  # a lookup answered with an error: the daemon's count
        app._lookup("store1", Operation.READ)
    assert refused.value.status == 409
    app.publish()

    (worker,) = _node_status(app)["workers"]
    assert worker["pid"] == os.getpid()
    assert worker["lookups"] == worker["requests"] == 4  # "requests": the old key, kept for old clients
    # the first lookup loaded the config, the refused one reloaded; DISCARD_CACHES: every lookup reloads
    assert worker["cache-hits"] == (0 if registry_mod.DISCARD_CACHES else 2)
    assert (worker["config-errors"], worker["lookup-errors"], worker["errors"]) == (1, 1, 2)

    body, content_type = metrics.render(app.registry)
    assert content_type.startswith(b"text/plain")
    pid = os.getpid()
    for series, value in (
        ("dsproxy_worker_lookups_total", 4),
        ("dsproxy_worker_config_errors_total", 1),
        ("dsproxy_worker_lookup_errors_total", 1),
        ("dsproxy_worker_errors_total", 2),
    ):
        assert f'{series}{{pid="{pid}"}} {float(value)}'.encode() in body, series


def test_every_answer_names_the_worker_and_once_loaded_the_generation(app: WorkerApp) -> None:
    assert app.response_headers() == f"x-dsproxy-worker: {os.getpid()}\r\n".encode()
    app.registry.refresh()
    gen = app.registry.loaded_generation
    assert gen is not None
    assert app.response_headers() == f"x-dsproxy-worker: {os.getpid()}\r\nx-dsproxy-generation: {gen}\r\n".encode()


def test_a_backup_type_dir_that_cannot_be_listed_is_an_inline_count_error(tmp_path: Path) -> None:
    """The store's tree is its owner's: what cannot be listed must not fail the status request."""
    from dsproxy.daemon.api import _counts

    (tmp_path / "ct" / "100" / "2026-01-01T00:00:00Z").mkdir(parents=True)
    (tmp_path / "vm").symlink_to(tmp_path / "vm")  # a link loop: ELOOP on listing
    counts = _counts(str(tmp_path))
    assert counts["ct"] == {"groups": 1, "snapshots": 1}
    assert "unable to list backup groups" in counts["vm"]["error"]


def _revision_header(app: WorkerApp) -> int | None:
    for line in app.response_headers().decode().splitlines():
        name, _, value = line.partition(": ")
        if name == "x-dsproxy-revision":
            return int(value)
    return None


def test_a_worker_names_the_etcd_revision_it_serves_in_fleet_mode_and_never_a_newer_one(app: WorkerApp) -> None:
    reg = app.registry
    seg = reg.segment
    assert seg is not None
    reg.refresh()
    assert _revision_header(app) is None and "fleet" not in _node_status(app)  # not in fleet mode
    gen = seg.publish([(shm.ChangeKind.UPDATED, "store1")], revision=40)  # the manager mirrored revision 40
    reg.refresh()
    assert reg.loaded_generation == gen and _revision_header(app) == 40
    seg.set_fleet(revision=41, generation=gen)  # a batch of host keys: same config, later revision
    assert _revision_header(app) == 41
    seg.publish([(shm.ChangeKind.UPDATED, "store1")], revision=45)  # not loaded by this worker yet
    assert _revision_header(app) == 41
    reg.refresh()
    assert _revision_header(app) == 45
    fleet = _node_status(app)["fleet"]
    assert (fleet["revision"], fleet["mirror-revision"], fleet["state"]) == (45, 45, "connected")
    seg.set_fleet(state=shm.FleetState.DISCONNECTED, disconnected_since=1_700_000_000.5, hand_edits=2)
    fleet = _node_status(app)["fleet"]
    assert (fleet["state"], fleet["disconnected-since"], fleet["hand-edits-refused"]) == (
        "disconnected", 1_700_000_000.5, 2,
    )  # fmt: skip
    body = metrics.render(reg, app.fleet_status())[0].decode()
    assert "dsproxy_fleet_revision 45.0" in body and "dsproxy_fleet_connected 0.0" in body
    assert "dsproxy_fleet_hand_edits_refused_total 2.0" in body
