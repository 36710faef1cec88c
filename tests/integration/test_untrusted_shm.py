"""Garbage written into the shared memory by a process of the proxy's user (issue 8).

The segment is writable by the proxy's user and group, so a compromised or buggy process can
scribble anything over it.  Nothing may crash, nothing may answer 500, and the segment must heal
without a restart: the manager's check finds the garbage and replaces the segment.
"""

from __future__ import annotations

import mmap
import os
import time
from pathlib import Path
from typing import Any

import posix_ipc
import pytest

import dsproxy
from dsproxy.client import Client
from dsproxy.ipc import shm
from tests.daemons import Daemons, wait_for
from tests.helpers import Instance

API = "/api2/json"
U64_MAX = 2**64 - 1


def scribble(run_dir: Path, offset: int, data: bytes) -> None:
    """Write ``data`` at ``offset`` of whatever segment the name holds now, as an attacker would."""
    handle = posix_ipc.SharedMemory(shm.segment_name(run_dir))
    try:
        with mmap.mmap(handle.fd, shm.SEGMENT_SIZE) as mm:  # sparse: only the written pages cost
            mm[offset : offset + len(data)] = data
    finally:
        handle.close_fd()


def sound(run_dir: Path) -> bool:
    """The segment under the name passes the manager's full check (slots, counters, names)."""
    try:
        seg = shm.Segment.open(run_dir, create=False)
    except shm.SegmentError:
        return False
    try:
        return seg.check() is None
    finally:
        seg.close()


def answers(c: Client) -> list[int]:
    """The status codes of the read requests a user makes, one of each."""
    return [
        c.get(f"{API}/admin/datastore/demo0001/status").status,
        c.get(f"{API}/admin/datastore/demo0001/active-operations").status,
        c.get(f"{API}/nodes/localhost/status").status,
        c.get(f"{API}/status/datastore-usage").status,
    ]


def healed(d: Daemons, workers: int = 2) -> bool:
    node = d.node()
    booted = [w for w in node["workers"] if w["booted"]]
    return node["degraded"] is None and len(booted) == workers and sound(d.run_dir)


def assert_still_running(d: Daemons) -> None:
    assert d.proxy is not None and d.proxy.poll() is None, f"the master gave up:\n{d.log_text()}"
    assert d.manager is not None and d.manager.poll() is None, f"the manager died:\n{d.log_text()}"


@pytest.mark.parametrize(
    "offset",
    [shm.OFF_SLOTS, shm.OFF_NAMES, shm.OFF_COUNTERS],
    ids=["slots", "store-table", "counters-of-slot-0"],
)
def test_random_bytes_heal_without_a_restart(daemons: Daemons, offset: int) -> None:
    workers = daemons.worker_pids()
    scribble(daemons.run_dir, offset, os.urandom(4096))
    started = time.monotonic()
    seen: list[int] = []
    with Client(daemons.proxy_sock, timeout=10.0) as c:
        while time.monotonic() - started < 3.0:  # while the garbage is there and while it heals
            seen += answers(c)
            time.sleep(0.05)
    assert set(seen) == {200}, seen
    wait_for(lambda: healed(daemons), timeout=10.0, what="a sound segment and every worker booted on it")
    assert_still_running(daemons)
    for pid in workers:
        os.kill(pid, 0)  # no worker died of it
    assert "holds garbage" in (daemons.logs / "manager.log").read_text()
    with daemons.client() as c:  # and the healed segment carries writes to every worker
        assert c.request("PUT", f"{API}/config/datastore/demo0002", {"comment": "healed"}).status == 200
        assert c.get(f"{API}/config/datastore/demo0002").data["comment"] == "healed"


def test_a_pid_word_of_u64_max_answers_200_and_heals(daemons: Daemons) -> None:
    pid_word = shm.OFF_SLOTS + (shm.MAX_SLOTS - 1) * shm.SLOT_SIZE + shm.SLOT_PID * 8

    def attack() -> None:  # again before every request: the manager repairs within 0.5 s
        scribble(daemons.run_dir, pid_word, U64_MAX.to_bytes(8, "little"))

    with Client(daemons.proxy_sock, timeout=30.0) as c:
        for _ in range(5):
            attack()
            assert answers(c) == [200] * 4
        attack()
        ops = c.get(f"{API}/admin/datastore/demo0001/active-operations")
        assert (ops.status, ops.data) == (200, {"read": 0, "write": 0})
        attack()
        put = c.request("PUT", f"{API}/config/datastore/demo0003", {"maintenance-mode": "offline"})
        assert put.status == 200, put
        assert put.data["active-operations"] == {"read": 0, "write": 0}
        assert put.data["lagging-processes"] == []
        refused = c.get(f"{API}/admin/datastore/demo0003/status")
        assert refused.status == 409 and "offline" in refused.json()["message"]
        attack()
        removed = c.request("DELETE", f"{API}/config/datastore/demo0003")
        assert removed.status == 200, removed
        assert c.get(f"{API}/config/datastore/demo0003").status == 404
    wait_for(lambda: healed(daemons), timeout=10.0, what="a sound segment and every worker booted on it")
    assert_still_running(daemons)


def test_a_restarted_proxy_boots_on_a_scribbled_segment(daemon_factory: Any) -> None:
    d: Daemons = daemon_factory()
    d.start_manager()
    scribble(d.run_dir, shm.OFF_SLOTS, os.urandom(shm.MAX_SLOTS * shm.SLOT_SIZE))  # every slot
    d.start_proxy()  # waits for every worker to boot
    wait_for(lambda: healed(d), timeout=10.0, what="a sound segment and every worker booted on it")
    with d.client() as c:
        assert answers(c) == [200] * 4


# -- library users, no manager to repair: they work on around the garbage --------------------------------


def test_a_library_registry_works_on_around_garbage_slots(inst: Instance) -> None:
    inst.add_stores("store1")
    seg = inst.segment()
    try:
        seg.mm[shm.OFF_SLOTS : shm.OFF_SLOTS + 4096] = os.urandom(4096)
        with dsproxy.Registry(base_dir=inst.base) as reg:  # its slot claim reclaims a garbage slot
            assert reg.degraded is None
            with reg.lookup("store1", dsproxy.Operation.WRITE):
                assert reg.active_operations("store1") == {"read": 0, "write": 1}
            assert reg.active_operations("store1") == {"read": 0, "write": 0}
    finally:
        seg.close()


def test_garbage_in_a_processes_own_counter_costs_its_slot_not_a_lookup(inst: Instance) -> None:
    inst.add_stores("store1")
    with dsproxy.Registry(base_dir=inst.base) as reg:
        reg.lookup("store1", dsproxy.Operation.WRITE).release()  # warm: the fast path from now on
        seg = reg.segment
        assert seg is not None and reg.slot is not None
        store = seg.store_index("store1")
        assert store is not None
        counter = seg.counter_index(reg.slot, store) + 1
        seg.words[counter] = U64_MAX  # += 1 overflows
        with reg.lookup("store1", dsproxy.Operation.WRITE) as handle:
            assert handle.name == "store1"
            assert reg.active_operations("store1") == {"read": 0, "write": 1}
        held = reg.lookup("store1", dsproxy.Operation.READ)
        seg2 = reg.segment
        if seg2 is not None and reg.slot is not None:
            seg2.words[seg2.counter_index(reg.slot, store)] = 0  # the release's -= 1 underflows
        held.release()  # never raises
        # a fresh slot within a check interval, with sound counters
        wait_for(lambda: (reg.refresh() or True) and reg.degraded is None, timeout=5.0, what="a fresh slot")
        with reg.lookup("store1", dsproxy.Operation.WRITE):
            assert reg.active_operations("store1") == {"read": 0, "write": 1}
