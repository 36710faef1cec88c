"""The fd budget end to end: more stores than RLIMIT_NOFILE allows, in a library process and in a proxy."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from dsproxy.client import Client
from dsproxy.ipc import shm
from dsproxy.paths import Paths
from dsproxy.testing.stores import write_stores
from tests.daemons import Daemons, wait_for

API = "/api2/json"
ROOT = Path(__file__).resolve().parents[2]

LIBRARY_PROGRAM = r"""
import json, os, resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (300, 300))
import dsproxy
reg = dsproxy.Registry(base_dir=sys.argv[1])
names = [f"store{i:04d}" for i in range(2000)]
result = {"served": 0, "max_fds": 0}
for name in names:
    with reg.lookup(name, dsproxy.Operation.WRITE) as store:
        assert store.instance.lock_fd >= 0
    result["served"] += 1
    if result["served"] % 100 == 0:
        result["max_fds"] = max(result["max_fds"], len(os.listdir("/proc/self/fd")))
held = []
try:
    for name in names:
        held.append(reg.lookup(name, dsproxy.Operation.READ))
except dsproxy.DatastoreError as err:
    result["refused"] = {"type": type(err).__name__, "status": err.status, "message": str(err)}
except BaseException as err:
    result["refused"] = {"type": "raw " + type(err).__name__, "message": str(err)}
result["held"] = len(held)
for h in held:
    h.release()
reg.lookup(names[-1], dsproxy.Operation.WRITE).release()  # served again once operations ended
result["fds"] = reg.fds
print(json.dumps(result))
"""


def test_a_library_registry_under_a_low_limit_serves_2000_stores(tmp_path: Path) -> None:
    paths = Paths.resolve(tmp_path / "base")
    write_stores(paths, {f"store{i:04d}": {} for i in range(2000)})
    try:
        out = subprocess.run(
            [sys.executable, "-c", LIBRARY_PROGRAM, str(tmp_path / "base")],
            capture_output=True, text=True, timeout=300, cwd=ROOT,
        )  # fmt: skip
    finally:
        shm.unlink(paths.run_dir)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["served"] == 2000 and result["max_fds"] <= 300
    budget = 300 - 256
    assert result["held"] == budget  # every fd of the budget in use ...
    assert result["refused"] == {  # ... and the next is a 503 that names the limit, not EMFILE
        "type": "FdBudgetExhausted",
        "status": 503,
        "message": f"datastore 'store{budget:04d}': {budget} datastores are in use in this process, "
        "the file-descriptor budget (RLIMIT_NOFILE 300 - 256 reserve); raise LimitNOFILE",
    }
    fds = result["fds"]
    assert fds["budget"] == budget and fds["open"] <= budget and fds["opens"] == 2000 and fds["refused"] == 1


needs_prlimit = pytest.mark.skipif(shutil.which("prlimit") is None, reason="prlimit (util-linux) is not installed")

STORES = 1000
PROXY_BUDGET = 400 - 256


def _lease(c: Client, name: str) -> int:
    r = c.request("POST", f"{API}/admin/datastore/{name}/operation", {"operation": "read"})
    return r.status


@needs_prlimit
def test_a_proxy_under_prlimit_serves_1000_stores_and_shows_the_budget(daemon_factory: Callable[..., Daemons]) -> None:
    d = daemon_factory(stores=STORES, workers=1, ready_timeout=120.0)
    d.start_manager()
    d.start_proxy(args=["prlimit", "--nofile=400:400", "--", *d.command("proxy", "--workers", "1")])
    names = [f"demo{i:04d}" for i in range(1, STORES + 1)]
    with d.client(timeout=60) as c:
        for _ in range(2):  # twice: the second round reopens what the first had to close
            for name in names:
                r = c.get(f"{API}/admin/datastore/{name}/status")
                assert r.status == 200, (name, r.body[:300])
        node = c.get(f"{API}/nodes/localhost/status").data
        metrics = c.get("/metrics").body.decode()
    fds = node["fds"]
    assert fds["budget"] == PROXY_BUDGET and fds["limit"] == 400 and fds["reserve"] == 256
    assert 0 < fds["open"] <= PROXY_BUDGET and fds["reopens"] > 0 and fds["closes"] > 0
    assert f"dsproxy_fd_budget {float(PROXY_BUDGET)}" in metrics and "dsproxy_fd_reopens_total" in metrics
    status = subprocess.run(
        [sys.executable, "-m", "dsproxy", "--base-dir", str(d.base), "status"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert status.returncode == 0, status.stderr
    assert f"of a budget of {PROXY_BUDGET} (RLIMIT_NOFILE 400 - 256 reserve)" in status.stdout


@needs_prlimit
def test_a_proxy_with_every_fd_in_use_answers_503_naming_the_limit(daemon_factory: Callable[..., Daemons]) -> None:
    d = daemon_factory(stores=PROXY_BUDGET + 10, workers=1, ready_timeout=120.0)
    d.start_manager()
    d.start_proxy(args=["prlimit", "--nofile=400:400", "--", *d.command("proxy", "--workers", "1")])
    names = [f"demo{i:04d}" for i in range(1, PROXY_BUDGET + 11)]
    holders = [d.client(timeout=60) for _ in range(3)]  # 64 leases per connection at most
    try:
        for i, name in enumerate(names[:PROXY_BUDGET]):
            assert _lease(holders[i // 64], name) == 200, name
        with d.client() as c:
            refused = c.get(f"{API}/admin/datastore/{names[PROXY_BUDGET]}/status")
            assert refused.status == 503
            assert refused.json()["message"] == (
                f"datastore '{names[PROXY_BUDGET]}': {PROXY_BUDGET} datastores are in use in this process, "
                "the file-descriptor budget (RLIMIT_NOFILE 400 - 256 reserve); raise LimitNOFILE"
            )
            assert c.get(f"{API}/admin/datastore/{names[0]}/status").status == 200  # the open ones still serve
    finally:
        for h in holders:
            h.close()  # the leases end with their connections
    with d.client() as c:  # served again once the leases ended with their connections
        wait_for(lambda: c.get(f"{API}/admin/datastore/{names[PROXY_BUDGET]}/status").status == 200)
        assert c.get(f"{API}/nodes/localhost/status").data["fds"]["refused"] >= 1
