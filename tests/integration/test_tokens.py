"""Tokens and ACLs through the real manager + proxy: the CLI, the files, the shared generations.

The workers' TCP listener is the transport half's; here the workers' view is an in-process
:class:`~dsproxy.auth.cache.AuthCache` on the daemons' own segment (what every worker runs), so
revokes and hand edits are checked against the real manager and its watch."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dsproxy import cli
from dsproxy.auth import crypt
from dsproxy.auth.cache import AuthCache
from dsproxy.auth.errors import AuthenticationFailed
from dsproxy.client import Client
from dsproxy.daemon.protocol import AUTH_ID_HEADER
from dsproxy.ipc import shm
from tests.daemons import Daemons, wait_for

TOKEN = "root@pam!ci"


def run_cli(d: Daemons, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(["--base-dir", str(d.base), *args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def worker_view(daemons: Daemons) -> Iterator[AuthCache]:
    seg = shm.Segment.open(daemons.paths.run_dir, create=False)
    try:
        yield AuthCache(daemons.paths.config_dir, lambda: seg)
    finally:
        seg.close()


def ok(cache: AuthCache, secret: str) -> bool:
    try:
        cache.authenticate(f"PBSAPIToken={TOKEN}:{secret}")
    except AuthenticationFailed:
        return False
    return True


def test_token_and_acl_lifecycle_through_the_cli(
    daemons: Daemons, worker_view: AuthCache, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(daemons, capsys, "token", "create", TOKEN, "--comment", "ci run", "--json")
    assert code == 0
    created = json.loads(out)
    secret = created["value"]
    assert created["tokenid"] == TOKEN and len(secret) == 36
    code, out, err = run_cli(daemons, capsys, "token", "create", TOKEN)
    assert code == 1 and "already exists" in err
    code, out, _ = run_cli(daemons, capsys, "token", "list", "--json")
    assert [t["tokenid"] for t in json.loads(out)] == [TOKEN]
    assert secret not in out
    # no permission until granted
    assert ok(worker_view, secret)
    assert worker_view.privileges(TOKEN, ("datastore", "demo0001")) == 0
    code, out, _ = run_cli(daemons, capsys, "acl", "update", "/datastore", "DatastoreAudit", "--auth-id", TOKEN)
    assert code == 0
    assert worker_view.privileges(TOKEN, ("datastore", "demo0001")) != 0
    code, out, _ = run_cli(daemons, capsys, "acl", "list", "--json")
    assert json.loads(out) == [
        {"path": "/datastore", "ugid": TOKEN, "ugid_type": "user", "roleid": "DatastoreAudit", "propagate": True}
    ]
    cfg = daemons.paths.config_dir
    assert (cfg / "acl.cfg").read_text() == f"acl:1:/datastore:{TOKEN}:DatastoreAudit\n"
    assert f"token: {TOKEN}\n\tcomment ci run\n" in (cfg / "user.cfg").read_text()
    for name in ("token.shadow", "user.cfg", "acl.cfg"):
        assert os.stat(cfg / name).st_mode & 0o777 == 0o640
    # disable, enable, revoke: refused at once (the manager bumped before it answered)
    assert run_cli(daemons, capsys, "token", "update", TOKEN, "--disable")[0] == 0
    assert not ok(worker_view, secret)
    assert run_cli(daemons, capsys, "token", "update", TOKEN, "--enable")[0] == 0
    assert ok(worker_view, secret)
    assert run_cli(daemons, capsys, "token", "remove", TOKEN)[0] == 0
    assert not ok(worker_view, secret)
    assert (cfg / "acl.cfg").read_text() == ""
    # nothing secret in the daemons' logs
    logs = "".join(p.read_text(errors="replace") for p in daemons.logs.glob("*") if p.is_file())
    assert secret not in logs and "$5$" not in logs


def test_hand_edits_seen_by_every_worker_within_seconds(
    daemons: Daemons, worker_view: AuthCache, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = json.loads(run_cli(daemons, capsys, "token", "create", TOKEN, "--json")[1])["value"]
    assert ok(worker_view, secret)
    cfg = daemons.paths.config_dir
    other = "2c6f7e0a-9d55-4b51-a1e7-5c3f0f5a0b42"
    start = time.monotonic()
    (cfg / "token.shadow").write_text(json.dumps({TOKEN: crypt.hash_secret(other)}))
    wait_for(lambda: not ok(worker_view, secret), timeout=5.0, what="the old secret refused")
    took = time.monotonic() - start
    assert ok(worker_view, other)
    (cfg / "acl.cfg").write_text(f"acl:1:/:{TOKEN}:Admin\n")
    wait_for(lambda: worker_view.privileges(TOKEN, ("datastore", "x")) != 0, timeout=5.0, what="acl.cfg edit")
    print(f"hand edit of token.shadow refused after {took:.2f} s")


def test_token_forwarded_write_is_rechecked_by_the_manager(
    daemons: Daemons, capsys: pytest.CaptureFixture[str]
) -> None:
    run_cli(daemons, capsys, "token", "create", TOKEN)
    manager = str(daemons.paths.run_dir / "manager.sock")
    body = {"comment": "from a token"}
    headers = {AUTH_ID_HEADER: TOKEN}
    with Client(manager) as c:
        refused = c.request("PUT", "/api2/json/config/datastore/demo0001", body, headers)
        assert refused.status == 403
        assert "Datastore.Modify on /datastore/demo0001" in refused.json()["message"]
        # and a token cannot manage tokens, even through a trusted forwarder
        assert c.request("GET", "/api2/json/access/acl", None, headers).status == 403
    run_cli(daemons, capsys, "acl", "update", "/datastore/demo0001", "DatastoreAdmin", "--auth-id", TOKEN)
    with Client(manager) as c:
        assert c.request("PUT", "/api2/json/config/datastore/demo0001", body, headers).status == 200


def test_bad_input_is_a_clear_error(daemons: Daemons, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(daemons, capsys, "token", "create", "root@pam")
    assert code == 1 and "not a token id" in err
    code, _, err = run_cli(daemons, capsys, "token", "create", "bad user@pam!x")
    assert code == 1 and "invalid user id" in err
    code, _, err = run_cli(daemons, capsys, "acl", "update", "/datastore", "Superuser", "--auth-id", "root@pam")
    assert code == 1 and "unknown role" in err
    code, _, err = run_cli(daemons, capsys, "acl", "update", "/datastore", "Audit", "--auth-id", "nobody@pbs")
    assert code == 1 and "does not exist" in err
    code, _, err = run_cli(daemons, capsys, "token", "remove", "root@pam!nosuch")
    assert code == 1 and "no such token" in err
    assert Path(daemons.paths.config_dir / "token.shadow").exists() is False
