"""The worker's answers to TCP clients (``request.remote`` set): tokens, privileges, PBS's codes.

Requests are built in process as the TCP listener will build them; the Unix-socket rules are
checked to be unchanged."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from dsproxy.auth.writer import AccessWriter
from dsproxy.config import update_config
from dsproxy.daemon.api import WorkerApp
from dsproxy.daemon.http import Connection, HTTPError, Limits, Reply, Request
from dsproxy.ipc import shm
from dsproxy.paths import Paths
from dsproxy.registry import Registry

TOKEN = "root@pam!remote"


class _Conn:
    limits = Limits()
    peer = None

    def __init__(self) -> None:
        self.state: dict[str, Any] = {}
        self.pinned = False


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[WorkerApp, AccessWriter, str]]:
    paths = Paths.resolve(tmp_path / "base")
    paths.ensure()
    for name in ("st1", "st2"):
        store = paths.data_dir / name
        (store / ".chunks").mkdir(parents=True)
        (store / ".lock").touch()
    update_config(
        paths.config_file,
        lambda cfg: cfg.update({n: {"path": str(paths.data_dir / n)} for n in ("st1", "st2")}),
    )
    registry = Registry(tmp_path / "base", role=shm.Role.WORKER)
    writer = AccessWriter(paths.config_dir, lambda: registry.segment)
    secret = writer.create_token(TOKEN, {})["value"]
    try:
        yield WorkerApp(registry, str(paths.run_dir / "manager.sock")), writer, secret
    finally:
        registry.close()
        shm.unlink(paths.run_dir)


def call(
    app: WorkerApp, method: str, path: str, auth: str | None = None, remote: bool = True
) -> tuple[int, Any, float]:
    target, _, query = path.partition("?")
    headers = {} if auth is None else {"authorization": auth}
    request = Request(cast(Connection, _Conn()), method, target, query, headers)
    if remote:
        request.remote = ("192.0.2.7", 40000)
    start = time.monotonic()
    try:
        handler = app.router().resolve(request)
        reply = handler(request)
        if not isinstance(reply, Reply):
            reply = asyncio.run(_await(reply))
    except HTTPError as err:
        return err.status, err.message, time.monotonic() - start
    return reply.status, json.loads(reply.body) if reply.body.startswith(b"{") else reply.body, time.monotonic() - start


async def _await(awaitable: Any) -> Reply:
    result: Reply = await awaitable
    return result


def token(secret: str) -> str:
    return f"PBSAPIToken={TOKEN}:{secret}"


def test_unauthenticated_and_bad_tokens_get_401_after_a_delay(setup: tuple[WorkerApp, AccessWriter, str]) -> None:
    app, _, secret = setup
    path = "/api2/json/admin/datastore/st1/status"
    for auth in (None, "Basic abc", token(secret + "x"), f"PBSAPIToken=root@pam!nosuch:{secret}"):
        status, message, took = call(app, "GET", path, auth)
        assert status == 401, message
        assert message.startswith("authentication failed")
        assert took >= 0.25  # answered after the delay (slept, not blocking)
        assert secret not in message
    assert app.auth_failures == 4
    status, body, _ = call(app, "GET", "/metrics", auth=None, remote=False)
    assert status == 200 and b"dsproxy_auth_failures_total" in body and b" 4.0" in body


def test_new_token_has_no_permissions_then_acl_grants(setup: tuple[WorkerApp, AccessWriter, str]) -> None:
    app, writer, secret = setup
    status, message, _ = call(app, "GET", "/api2/json/admin/datastore/st1/status", token(secret))
    assert status == 403
    assert message == "permission check failed - missing Datastore.Audit or Datastore.Backup on /datastore/st1"
    assert call(app, "GET", "/api2/json/admin/datastore", token(secret))[1] == {"data": []}  # filtered
    writer.update_acl({"path": "/datastore/st1", "role": "DatastoreAudit", "auth-id": TOKEN})
    status, body, _ = call(app, "GET", "/api2/json/admin/datastore/st1/status", token(secret))
    assert status == 200 and set(body["data"]) == {"total", "used", "avail"}
    assert call(app, "GET", "/api2/json/admin/datastore/st2/status", token(secret))[0] == 403
    names = [d["name"] for d in call(app, "GET", "/api2/json/admin/datastore", token(secret))[1]["data"]]
    assert names == ["st1"]
    usage = call(app, "GET", "/api2/json/status/datastore-usage", token(secret))[1]["data"]
    assert [u["store"] for u in usage] == ["st1"]
    assert [c["name"] for c in call(app, "GET", "/api2/json/config/datastore", token(secret))[1]["data"]] == ["st1"]
    # leases need Read or Backup; Audit is not enough
    status, message, _ = call(app, "POST", "/api2/json/admin/datastore/st1/operation?operation=read", token(secret))
    assert status == 403 and "Datastore.Read or Datastore.Backup" in message
    # config writes: Modify / Allocate
    status, message, _ = call(app, "PUT", "/api2/json/config/datastore/st1", token(secret))
    assert status == 403 and message.endswith("missing Datastore.Modify on /datastore/st1")
    status, message, _ = call(app, "POST", "/api2/json/config/datastore", token(secret))
    assert status == 403 and message.endswith("missing Datastore.Allocate on /datastore")
    # node status: Sys.Audit on /system/status
    assert call(app, "GET", "/api2/json/nodes/localhost/status", token(secret))[0] == 403
    # token management is not offered over TCP at all
    assert call(app, "GET", "/api2/json/access/acl", token(secret))[0] == 403


def test_revoke_and_disable_refused_at_once(setup: tuple[WorkerApp, AccessWriter, str]) -> None:
    app, writer, secret = setup
    writer.update_acl({"path": "/", "role": "Admin", "auth-id": TOKEN})
    assert call(app, "GET", "/api2/json/admin/datastore/st1/status", token(secret))[0] == 200
    assert call(app, "GET", "/api2/json/admin/datastore/st1/status", f"PBSAPIToken {TOKEN}:{secret}")[0] == 200
    writer.update_token(TOKEN, {"enable": False})
    status, message, _ = call(app, "GET", "/api2/json/admin/datastore/st1/status", token(secret))
    assert status == 401 and "disabled or expired" in message
    writer.update_token(TOKEN, {"enable": True})
    assert call(app, "GET", "/api2/json/admin/datastore/st1/status", token(secret))[0] == 200
    writer.remove_token(TOKEN)
    assert call(app, "GET", "/api2/json/admin/datastore/st1/status", token(secret))[0] == 401


def test_ping_needs_nothing_and_unix_socket_rules_unchanged(setup: tuple[WorkerApp, AccessWriter, str]) -> None:
    app, _, _ = setup
    assert call(app, "GET", "/api2/json/ping")[0] == 200
    assert call(app, "GET", "/api2/json/admin/datastore/st1/status", remote=False)[0] == 200
    assert len(call(app, "GET", "/api2/json/admin/datastore", remote=False)[1]["data"]) == 2
    assert app.auth_failures == 0
