"""Fleet mode end to end: a real 3-member etcd cluster and 3 dsproxy hosts (manager + 2 workers
each, own base dirs and shared memory), talked to over each host's proxy.sock as a user would.

The cluster is the module's (tests/fleet/conftest.py); the hosts of the tests that break nothing
are the module's too (``fleet``: started once, ~4 s), the tests that kill, freeze or cut off a
manager start their own (``own_fleet``).  Every test uses store names of its own, so the shared
hosts never see another test's stores in a way that matters.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from dsproxy import registry as registry_mod
from dsproxy.client import Client, Response
from dsproxy.config import dump, read_config
from dsproxy.daemon.journal import CreateJournal
from dsproxy.daemon.protocol import REVISION_HEADER
from dsproxy.daemon.run import API
from dsproxy.testing.daemons import wait_for
from dsproxy.testing.etcd import EtcdCluster
from dsproxy.testing.fleet import Fleet, FleetHost

MAINTENANCE_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def fleet(etcd_cluster_module: EtcdCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """3 hosts on the module's cluster, prefix /t/shared (maintenance timeout 2 s, lease 10 s)."""
    base = tmp_path_factory.mktemp("fleet")
    args = ["--maintenance-timeout", str(MAINTENANCE_TIMEOUT)]
    with Fleet(base, etcd_cluster_module.endpoints, "/t/shared", manager_args=args) as started:
        yield started.start()


@pytest.fixture
def own_fleet(
    etcd_cluster: EtcdCluster, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., Fleet]]:
    """Hosts of this test's own (``own_fleet(size, **host_args)``), prefix /t/<test>; stopped after.

    Their logs are printed at teardown: pytest shows them with a failing test's report."""
    prefix = "/t/" + re.sub(r"[^A-Za-z0-9._-]", "-", request.node.name)[:60]
    made: list[Fleet] = []
    with contextlib.ExitStack() as stack:

        def make(size: int = 3, **host_args: Any) -> Fleet:
            fleet = stack.enter_context(Fleet(tmp_path, etcd_cluster.endpoints, prefix, size, **host_args))
            made.append(fleet)
            return fleet.start()

        try:
            yield make
        finally:
            for fleet in made:
                print(fleet.log_text())


def _create(host: FleetHost, name: str, **props: Any) -> Response:
    return host.request("POST", "/config/datastore", {"name": name, **props})


def _revision(response: Response) -> int:
    revision: int = response.raise_for_status().data["revision"]
    return revision


def _race(calls: list[tuple[FleetHost, str, str, dict[str, Any]]]) -> dict[str, Response]:
    """The requests sent at the same moment (one thread each), their answers by host id."""
    barrier = threading.Barrier(len(calls))
    answers: dict[str, Response] = {}

    def send(host: FleetHost, method: str, path: str, body: dict[str, Any]) -> None:
        with host.client() as c:
            barrier.wait()
            answers[host.host_id] = c.request(method, API + path, body)

    threads = [threading.Thread(target=send, args=call) for call in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return answers


@contextlib.contextmanager
def _operation(host: FleetHost, store: str, kind: str = "read") -> Iterator[Client]:
    """An operation lease on ``store`` held on one of ``host``'s workers while the block runs."""
    with host.client() as c:
        c.request("POST", f"{API}/admin/datastore/{store}/operation", {"operation": kind}).raise_for_status()
        yield c


# -- writes from any host ------------------------------------------------------------------------------------


def test_a_write_on_one_host_is_served_by_every_worker_of_the_others(fleet: Fleet) -> None:
    a, b, c = fleet.hosts
    started = time.monotonic()
    revision = _revision(_create(a, "served1", comment="made on host0"))
    for host in (b, c):
        host.wait_revision(revision)
        assert host.datastores()["served1"]["comment"] == "made on host0"
    took = time.monotonic() - started
    # and back: an update on b, seen by a's and c's workers with the revision it made
    revision = _revision(b.request("PUT", "/config/datastore/served1", {"comment": "changed on host1"}))
    for host in (a, c):
        host.wait_revision(revision)
        with host.worker_clients() as clients:
            for worker in clients.values():
                answer = worker.get(f"{API}/config/datastore/served1").raise_for_status()
                assert answer.data["comment"] == "changed on host1"
                assert int(answer.headers[REVISION_HEADER]) >= revision
                if not registry_mod.DISCARD_CACHES:  # through the overlay: the file was not read again
                    status = worker.get(f"{API}/nodes/localhost/status").raise_for_status().data
                    assert status["changes-overlaid"] >= 1, status
    assert took < 5.0


def test_a_read_on_another_host_can_wait_for_the_revision_a_write_answered(fleet: Fleet) -> None:
    """Read your writes across hosts: ``x-dsproxy-min-revision`` makes a worker answer once it
    serves that etcd revision (a write's answer names it), ``x-dsproxy-wait`` bounds the wait
    (then 504 naming both revisions); a header that is not a revision is a 400."""
    a, b, _ = fleet.hosts
    with b.manager_frozen():  # b's mirror cannot follow: the read must wait for it, then get it
        revision = _revision(_create(a, "ryw1", comment="written on host0"))
        answers: list[Response] = []
        reader = threading.Thread(
            target=lambda: answers.append(
                b.client().request(
                    "GET", f"{API}/config/datastore/ryw1", headers={"x-dsproxy-min-revision": str(revision)}
                )
            )
        )
        reader.start()
        time.sleep(0.5)
        assert not answers  # still waiting: host1 does not serve the revision yet
    reader.join(10)
    assert answers and answers[0].raise_for_status().data["comment"] == "written on host0"
    assert int(answers[0].headers[REVISION_HEADER]) >= revision
    with b.client() as c:
        started = time.monotonic()
        late = c.request(
            "GET",
            f"{API}/admin/datastore",
            headers={"x-dsproxy-min-revision": str(revision + 10**6), "x-dsproxy-wait": "0.3"},
        )
        assert late.status == 504 and f"not {revision + 10**6} or later" in late.body.decode()
        assert 0.3 <= time.monotonic() - started < 5
        for bad in ("-1", "0", "12a", "1e3", "9" * 30):
            answer = c.request("GET", f"{API}/admin/datastore", headers={"x-dsproxy-min-revision": bad})
            assert answer.status == 400 and b"x-dsproxy-min-revision" in answer.body, (bad, answer.body)
        for wait in ("nan", "-1", "61", "inf"):
            headers = {"x-dsproxy-min-revision": "1", "x-dsproxy-wait": wait}
            answer = c.request("GET", f"{API}/admin/datastore", headers=headers)
            assert answer.status == 400 and b"x-dsproxy-wait" in answer.body, (wait, answer.body)


@pytest.mark.parametrize("cache", ["off", "config"])
def test_a_min_revision_read_on_a_worker_that_keeps_no_config_is_answered_from_the_file(
    own_fleet: Callable[..., Fleet], cache: str
) -> None:
    """With ``--cache off``/``config`` a worker reads the file per lookup and loads no generation:
    the revision it serves is the one the manager's record names for the file."""
    a, b = own_fleet(2, per_host=[{}, {"cache": cache}]).hosts
    name = f"ryw-{cache}"  # (the two cases' prefixes are one: the test name is cut at 60 characters)
    revision = _revision(_create(a, name, comment="written on host0"))
    with b.client() as c:
        headers = {"x-dsproxy-min-revision": str(revision), "x-dsproxy-wait": "10"}
        answer = c.request("GET", f"{API}/config/datastore/{name}", headers=headers)
        assert answer.raise_for_status().data["comment"] == "written on host0"
        late = {"x-dsproxy-min-revision": str(revision + 10**6), "x-dsproxy-wait": "0.2"}
        assert c.request("GET", f"{API}/config/datastore/{name}", headers=late).status == 504


def test_racing_creates_of_one_name_on_two_hosts_give_one_winner_and_one_409(fleet: Fleet) -> None:
    a, b, _ = fleet.hosts
    for round_ in range(5):
        name = f"race{round_}"
        answers = _race(
            [(a, "POST", "/config/datastore", {"name": name}), (b, "POST", "/config/datastore", {"name": name})]
        )
        statuses = sorted(r.status for r in answers.values())
        assert statuses == [200, 409], {h: (r.status, r.body) for h, r in answers.items()}
        winner = next(h for h in (a, b) if answers[h.host_id].status == 200)
        loser = b if winner is a else a
        assert f"datastore '{name}' already exists" in answers[loser.host_id].json()["message"]
        assert not (loser.paths.data_dir / name).exists()  # the loser's lay-out is undone
        revision = _revision(answers[winner.host_id])
        for host in fleet.hosts:
            host.wait_revision(revision)
            assert host.datastores()[name]["path"] == str(winner.paths.data_dir / name)


def test_racing_updates_on_two_hosts_never_lose_an_acknowledged_one(fleet: Fleet) -> None:
    a, b, _ = fleet.hosts
    revision = _revision(_create(a, "both1"))
    b.wait_revision(revision)
    comment, keep_last = None, None
    for round_ in range(1, 9):
        path = "/config/datastore/both1"
        answers = _race([(a, "PUT", path, {"comment": f"a{round_}"}), (b, "PUT", path, {"keep-last": round_})])
        for answer in answers.values():
            if answer.status == 409:
                assert "datastore 'both1' was changed on another host" in answer.json()["message"]
            else:
                assert answer.status == 200, answer.body
        if answers["host0"].status == 200:
            comment = f"a{round_}"
        if answers["host1"].status == 200:
            keep_last = round_
        last = max(r.data["revision"] for r in answers.values() if r.status == 200)
        a.wait_revision(last)
        section = a.datastores()["both1"]
        assert (section.get("comment"), section.get("keep-last")) == (comment, keep_last), answers


# -- fleet-wide maintenance ----------------------------------------------------------------------------------


def test_an_offline_transition_counts_the_operations_of_every_host(fleet: Fleet) -> None:
    a, b, c = fleet.hosts
    revision = _revision(_create(a, "maint1"))
    for host in fleet.hosts:
        host.wait_revision(revision)
    with _operation(b, "maint1"), _operation(c, "maint1", "write"):
        started = time.monotonic()
        answer = a.request("PUT", "/config/datastore/maint1", {"maintenance-mode": "offline"}).raise_for_status()
        took = time.monotonic() - started
        data = answer.data
        assert data["active-operations"] == {"read": 1, "write": 1}
        assert data["lagging-hosts"] == [] and data["lagging-processes"] == []
        refused = c.request("POST", "/admin/datastore/maint1/operation", {"operation": "read"})
        assert refused.status >= 400 and "offline maintenance mode" in refused.json()["message"]
        # any later write of the offline store is a transition too: the other hosts answer at once
        started = time.monotonic()
        again = a.request("PUT", "/config/datastore/maint1", {"comment": "still offline"}).raise_for_status()
        assert again.data["active-operations"] == {"read": 1, "write": 1} and again.data["lagging-hosts"] == []
        assert time.monotonic() - started < 0.8  # not the 1 s of a host key nobody waits for
    assert took < MAINTENANCE_TIMEOUT


def test_an_offline_transition_names_a_host_whose_manager_is_stopped_and_it_catches_up(fleet: Fleet) -> None:
    a, _, c = fleet.hosts
    revision = _revision(_create(a, "slow1"))
    for host in fleet.hosts:
        host.wait_revision(revision)
    with c.manager_frozen():
        started = time.monotonic()
        answer = a.request("PUT", "/config/datastore/slow1", {"maintenance-mode": "offline"}).raise_for_status()
        took = time.monotonic() - started
        assert answer.data["lagging-hosts"] == ["host2"]
        assert MAINTENANCE_TIMEOUT <= took < MAINTENANCE_TIMEOUT + 2
        offline = answer.data["revision"]
        assert (c.served_revision() or 0) < offline  # still the old config there
    c.wait_revision(offline)
    assert "offline" in c.datastores()["slow1"]["maintenance-mode"]


def test_a_remove_is_refused_while_another_host_has_operations_on_the_store(fleet: Fleet) -> None:
    a, b, _ = fleet.hosts
    revision = _revision(_create(a, "busy1"))
    b.wait_revision(revision)
    with _operation(b, "busy1"):
        refused = a.request("DELETE", "/config/datastore/busy1")
        assert refused.status == 409
        assert refused.json()["message"] == (
            "datastore 'busy1' has active operations on host host1 (read 1, write 0); not removing it"
        )
    removed = a.request("DELETE", "/config/datastore/busy1").raise_for_status()
    for host in fleet.hosts:
        host.wait_revision(removed.data["revision"])
        assert "busy1" not in host.datastores()


# -- hand edits ----------------------------------------------------------------------------------------------


def test_a_hand_edit_in_fleet_mode_is_undone_and_reported(fleet: Fleet) -> None:
    a = fleet.hosts[0]
    revision = _revision(_create(a, "edit1"))
    a.wait_revision(revision)
    # served at once (the overlay), in the file once the batches pause (dsproxy.config.overlay)
    wait_for(lambda: b"datastore: edit1\n" in a.config_file.read_bytes(), 5, what="the mirror file written")
    mirrored = a.config_file.read_bytes()
    before = a.fleet_status()["hand-edits-refused"]
    tmp = a.config_file.with_suffix(".edit")
    tmp.write_bytes(mirrored + b"\ndatastore: sneaky\n\tpath /tmp/sneaky\n")
    tmp.replace(a.config_file)
    wait_for(lambda: a.config_file.read_bytes() == mirrored, 5, what="the mirror restored")
    wait_for(lambda: a.fleet_status()["hand-edits-refused"] == before + 1, 5, what="the hand edit counted")
    assert "sneaky" not in a.datastores()
    assert f"{a.config_file} was edited by hand" in a.log_text(100_000)
    metrics = a.get("/metrics").body.decode()
    assert f"dsproxy_fleet_hand_edits_refused_total {before + 1}.0" in metrics


# -- a manager restarted, a host cut off ---------------------------------------------------------------------


def _changes_applied(host: FleetHost) -> dict[int, int]:
    """Each worker's count of config loads that applied per-store changes (not a whole reload)."""
    with host.worker_clients() as clients:
        return {
            pid: c.get(f"{API}/nodes/localhost/status").raise_for_status().data["changes-applied"]
            for pid, c in clients.items()
        }


def test_a_restarted_manager_catches_up_from_its_revision_with_a_per_store_delta(
    own_fleet: Callable[..., Fleet],
) -> None:
    a, b = own_fleet(2).hosts
    for name in ("keep1", "keep2", "keep3"):
        revision = _revision(_create(a, name))
    b.wait_revision(revision)
    assert b.manager is not None
    b.manager.kill()
    b.manager.wait()
    _revision(a.request("PUT", "/config/datastore/keep2", {"comment": "while host1 was down"}))
    revision = _revision(_create(a, "keep4"))
    assert (b.served_revision() or 0) < revision  # its workers serve what they had
    before = _changes_applied(b)
    b.start_manager()
    b.wait_revision(revision)
    stores = b.datastores()
    assert sorted(stores) == ["keep1", "keep2", "keep3", "keep4"]
    assert stores["keep2"]["comment"] == "while host1 was down"
    after = _changes_applied(b)
    if not registry_mod.DISCARD_CACHES:  # (which makes every load a whole one)
        assert all(after[pid] > before[pid] for pid in before), (before, after)  # a delta, not a reload


def test_a_create_whose_manager_died_after_its_transaction_keeps_its_lay_out_at_restart(
    own_fleet: Callable[..., Fleet],
) -> None:
    """A manager killed between a create's transaction and its mirror's write of the file finds the
    create in its journal at restart; etcd names the store, so its lay-out stays -- it is not the
    half-made store of a create that never happened (the local file, not yet the mirror, does not
    name it; found by ``scripts/stress --fleet 3 --chaos heavy``: the other hosts then answered 500
    "unable to stat datastore path")."""
    a, b = own_fleet(2).hosts
    revision = _revision(_create(b, "cut1"))
    a.wait_revision(revision)
    path = Path(a.datastores()["cut1"]["path"])
    lock = (path / ".lock").stat().st_ino
    assert a.manager is not None
    a.manager.kill()
    a.manager.wait()
    # as if host0 had made the create itself and died after the transaction, before writing its file
    cfg, _ = read_config(a.config_file)
    del cfg["cut1"]
    a.config_file.write_text(dump(cfg))
    CreateJournal(a.paths.config_dir).begin("cut1", str(path), str(path))
    a.start_manager()
    a.wait_revision(revision)
    assert (path / ".lock").stat().st_ino == lock  # never removed (and laid out again)
    assert "removed the lay-out" not in a.log_text()
    assert b.request("GET", "/admin/datastore/cut1/status").status == 200


def _cut_off(fleet: Fleet) -> tuple[FleetHost, FleetHost]:
    return fleet.hosts[0], fleet.hosts[1]


CUT = ["--etcd-timeout", "1", "--fleet-lease-ttl", "3", "--maintenance-timeout", "2"]


def test_a_host_cut_off_from_etcd_keeps_serving_refuses_writes_and_catches_up(
    own_fleet: Callable[..., Fleet], etcd_cluster: EtcdCluster
) -> None:
    """``--fleet-fencing serve`` (the default): the last mirror is served, past the lease too."""
    cut, other = own_fleet(2, manager_args=CUT, per_host=[{"endpoints": etcd_cluster.endpoints[:1]}]).hosts
    revision = _revision(_create(other, "part1"))
    cut.wait_revision(revision)
    etcd_cluster.kill(0)  # the only member host0 knows
    wait_for(lambda: cut.fleet_status()["state"] == "disconnected", 10, what="host0 disconnected")
    refused = _create(cut, "part2")
    assert refused.status == 503
    assert re.fullmatch(
        r"fleet: etcd unreachable since \S+ \S+; config writes are refused until it is back", refused.json()["message"]
    )
    assert "dsproxy_fleet_connected 0.0" in cut.get("/metrics").body.decode()
    revision = _revision(other.request("PUT", "/config/datastore/part1", {"comment": "during the partition"}))
    time.sleep(3.5)  # past host0's lease: the fleet no longer waits for it
    offline = other.request("PUT", "/config/datastore/part1", {"maintenance-mode": "read-only"}).raise_for_status()
    assert "part1" in cut.datastores() and "comment" not in cut.datastores()["part1"]  # the last mirror
    with _operation(cut, "part1", "write"):
        pass  # serve: new operations still granted from the last mirror
    etcd_cluster.restart(0)
    cut.wait_revision(offline.data["revision"], timeout=15)
    assert cut.datastores()["part1"]["comment"] == "during the partition"
    wait_for(lambda: cut.fleet_status()["state"] == "connected", 10, what="host0 connected again")
    assert _create(cut, "part2").status == 200


def test_fencing_offline_takes_every_store_offline_once_the_lease_is_gone_and_restores_after(
    own_fleet: Callable[..., Fleet], etcd_cluster: EtcdCluster
) -> None:
    """``--fleet-fencing offline``: new operations refused (running ones finish) until etcd is back."""
    fenced, other = own_fleet(
        2,
        manager_args=CUT,
        per_host=[{"endpoints": etcd_cluster.endpoints[:1], "manager_args": [*CUT, "--fleet-fencing", "offline"]}],
    ).hosts
    revision = _revision(_create(other, "fence1"))
    fenced.wait_revision(revision)
    with _operation(fenced, "fence1") as running:
        etcd_cluster.kill(0)
        started = time.monotonic()
        wait_for(lambda: fenced.fleet_status()["state"] == "fenced", 15, what="host0 fenced")
        took = time.monotonic() - started
        refused = fenced.request("POST", "/admin/datastore/fence1/operation", {"operation": "read"})
        message = refused.json()["message"]
        assert refused.status >= 400 and "offline maintenance mode: fleet: cut off from etcd since " in message
        # the other host does not wait for the fenced one: its transition is quick and names nobody
        answer = other.request("PUT", "/config/datastore/fence1", {"comment": "fenced elsewhere"}).raise_for_status()
        revision = answer.data["revision"]
        released = running.request("DELETE", f"{API}/admin/datastore/fence1/operation").raise_for_status()
        assert released.data == {"released": 1}  # the running one finished normally
    assert 3.0 <= took < 10.0
    etcd_cluster.restart(0)
    fenced.wait_revision(revision, timeout=15)
    wait_for(lambda: fenced.fleet_status()["state"] == "connected", 10, what="host0 unfenced")
    section = fenced.datastores()["fence1"]
    assert section["comment"] == "fenced elsewhere" and "maintenance-mode" not in section
    with _operation(fenced, "fence1"):
        pass


def _mod_revision(cluster: EtcdCluster, prefix: str, name: str) -> int:
    import asyncio

    from dsproxy.fleet.etcd import Etcd

    async def get() -> int:
        async with Etcd(cluster.endpoints) as etcd:
            kv = await etcd.get(f"{prefix}/datastores/{name}".encode())
            assert kv is not None
            return kv.mod_revision

    return asyncio.run(get())


def test_a_host_whose_watch_was_compacted_away_re_lists_and_catches_up(
    own_fleet: Callable[..., Fleet], etcd_cluster: EtcdCluster
) -> None:
    import asyncio

    from dsproxy.fleet.etcd import Etcd

    a, b = own_fleet(2, per_host=[{}, {"endpoints": etcd_cluster.endpoints[:1]}]).hosts
    for name in ("comp1", "comp2"):
        revision = _revision(_create(a, name))
    b.wait_revision(revision)
    with b.manager_frozen():  # b's watch stands at an old revision...
        a.request("PUT", "/config/datastore/comp1", {"comment": "after the freeze"}).raise_for_status()
        _create(a, "comp3").raise_for_status()

        async def change() -> int:  # an admin's etcdctl del, then a compaction: b's history is gone
            async with Etcd(etcd_cluster.endpoints) as etcd:
                txn = await etcd.delete_if(f"{a.prefix}/datastores/comp2".encode(), stores_of_a["comp2"])
                assert txn.succeeded
                await etcd.compact(txn.revision)
                return txn.revision

        stores_of_a = {name: _mod_revision(etcd_cluster, a.prefix, name) for name in ("comp2",)}
        revision = asyncio.run(change())
        etcd_cluster.kill(0)  # ...and its stream ends: it must watch again, from a compacted revision
        etcd_cluster.restart(0)
    b.wait_revision(revision)
    stores = b.datastores()
    assert sorted(stores) == ["comp1", "comp3"] and stores["comp1"]["comment"] == "after the freeze"
    assert "re-listed" in b.log_text(100_000)


# -- a cold host -------------------------------------------------------------------------------------------------


COLD_STORES = 34_000  # more than a 65,536-entry store table holds at half load: the table is 131,072


def test_a_cold_host_sizes_its_store_table_for_the_prefix_before_it_answers_and_serves_at_once(
    etcd_cluster: EtcdCluster, tmp_path: Path
) -> None:
    """A host with an empty base dir starts on a 65,536-entry table; with 34,000 stores in etcd its
    manager moves to a 131,072-entry one before it answers (its workers never load the names into
    a table too small for them), and the proxy's first workers are ready before their prewarm.  A
    store whose directory this host lacks is laid out (after the first write: not on its way to
    serving) and then served."""
    from dsproxy.fleet.admin import import_config
    from dsproxy.fleet.etcd import Etcd
    from dsproxy.testing.fleetbench import _uv
    from dsproxy.testing.scale import lay_out, sections

    data_dir = tmp_path / "stores"
    lay_out(data_dir, COLD_STORES)
    missing = data_dir / "store00007"  # a store this host lacks: laid out after the first write
    shutil.rmtree(missing)
    prefix = "/t/cold-start"

    async def populate() -> int:
        async with Etcd(etcd_cluster.endpoints, timeout=10.0) as etcd:
            result = await import_config(etcd, prefix, sections(data_dir, COLD_STORES), "test")
            return result.imported

    assert _uv(populate()) == COLD_STORES
    host = FleetHost(tmp_path / "host", etcd_cluster.endpoints, prefix, "cold", ready_timeout=25.0)
    try:
        host.start_manager()
        log = host.log_text(100_000)
        moved, answered = log.find("moving to a table of 131072"), log.find("manager ready on")
        assert 0 <= moved < answered, log[-3000:]
        host.start_proxy()
        status = host.get(f"{API}/admin/datastore/store33999/status?verbose=0")
        assert status.status == 200 and status.headers.get(REVISION_HEADER) is not None
        log = host.log_text(100_000)
        assert log.count("moving to a table") == 1  # none while (or after) the workers booted
        ready = [line for line in log.splitlines() if "ready: generation" in line]
        assert len(ready) == 2 and all(line.endswith(" 0 stores open") for line in ready), ready
        wait_for(lambda: host.log_text(100_000).count("warm: ") == 2, 20.0, what="both workers warm")
        wait_for((missing / ".lock").is_file, 20.0, what="the missing store laid out")
        assert host.get(f"{API}/admin/datastore/store00007/status?verbose=0").status == 200
    finally:
        host.stop()


def test_two_managers_with_one_host_id_refuse_writes_and_say_why(
    own_fleet: Callable[..., Fleet], etcd_cluster: EtcdCluster
) -> None:
    """A copied unit file: two managers run as ``host0``.  Each sees the other's puts of its key
    and refuses config writes, naming the problem, instead of letting transitions elsewhere count
    one's revision for the other's."""
    a, b = own_fleet(2, per_host=[{}, {"host_id": "host0"}]).hosts
    said = "give each host its own --host-id"
    for host in (a, b):
        wait_for(partial(_said, host, said), 10, what=f"{host.base.name}'s manager to notice")
        refused = _create(host, "dup2")
        assert refused.status == 503
        assert f"also runs as host 'host0'; {said}" in refused.json()["message"]
        # and the status and the metrics say so, not only the log and the 503
        wait_for(partial(_state_is, host, "duplicate"), 5, what="the record to say duplicate")
        metrics = _metrics(host)
        assert "dsproxy_fleet_duplicate_host_id 1.0" in metrics and "dsproxy_fleet_connected 1.0" in metrics
    assert "dup2" not in a.datastores()


def _state_is(host: FleetHost, state: str) -> bool:
    return bool(host.fleet_status()["state"] == state)


def _metrics(host: FleetHost) -> str:
    return host.get("/metrics").raise_for_status().body.decode()


def _said(host: FleetHost, text: str) -> bool:
    return text in host.log_text()
