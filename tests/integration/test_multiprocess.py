"""Several real processes on one instance: counters, kills, locks, publishing and hand edits."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable

import pytest

import dsproxy
from dsproxy.daemon.manager import wait_for_generation
from dsproxy.ipc import shm
from tests.helpers import Agent, Instance

AgentFactory = Callable[..., Agent]


def test_an_operation_held_in_one_process_is_counted_in_another(inst: Instance, agents: AgentFactory) -> None:
    inst.add_stores("store1")
    a, b = agents(), agents()
    h = a.call("lookup", name="store1", op="WRITE")["ok"]
    a.call("lookup", name="store1", op="READ")
    assert b.call("active", name="store1")["ok"] == {"read": 1, "write": 1}
    a.call("release", handle=h)
    assert b.call("active", name="store1")["ok"] == {"read": 1, "write": 0}


@pytest.mark.parametrize("mode", ["on", "config"])
def test_sigkill_of_a_holder_makes_its_operations_vanish(inst: Instance, agents: AgentFactory, mode: str) -> None:
    inst.add_stores("store1")
    holder, observer = agents(cache=mode), agents()
    holder.call("lookup", name="store1", op="WRITE")
    holder.call("lookup", name="store1", op="READ")
    assert observer.call("active", name="store1")["ok"] == {"read": 1, "write": 1}
    holder.kill()
    assert observer.call("active", name="store1")["ok"] == {"read": 0, "write": 0}


def test_a_slot_of_a_killed_process_is_reclaimed(inst: Instance, agents: AgentFactory) -> None:
    inst.add_stores("store1")
    victim = agents()
    victim.call("lookup", name="store1", op="WRITE")
    seg = inst.segment()
    try:
        slot = next(s for s in seg.slots() if s.pid == victim.pid)
        victim.kill()
        assert all(s.pid != victim.pid for s in seg.slots())
        reg = dsproxy.Registry(base_dir=inst.base)
        try:
            assert reg.slot == slot.slot  # the dead process's slot, with its counters zeroed
            assert reg.active_operations("store1") == {"read": 0, "write": 0}
        finally:
            reg.close()
    finally:
        seg.close()


def test_sigkill_inside_the_writers_critical_section_does_not_wedge_anyone(
    inst: Instance, agents: AgentFactory
) -> None:
    inst.add_stores("store1")
    holder = agents()
    holder.send("hold_writer_lock")
    assert holder._read()["ok"] == "holding"
    seg = inst.segment()
    try:
        with pytest.raises(shm.SegmentError, match="timed out"):
            _bump_with_timeout(seg, 0.2)
        os.kill(holder.pid, signal.SIGKILL)
        holder.kill()
        start = time.monotonic()
        gen = seg.generation()
        assert seg.bump_generation() == gen + 1  # the kernel released the dead holder's lock
        assert time.monotonic() - start < 2
        other = agents()  # claiming a slot takes the same lock
        assert other.call("lookup", name="store1", op="READ")["ok"]
    finally:
        seg.close()


def _bump_with_timeout(seg: shm.Segment, timeout: float) -> int:
    with seg.writer_lock(timeout=timeout):
        raise AssertionError("the lock should have been held by the other process")


def test_a_write_is_seen_by_every_other_process_on_its_very_next_lookup(inst: Instance, agents: AgentFactory) -> None:
    inst.add_stores("store1")
    readers = [agents(ttl=3600), agents(ttl=3600)]
    for r in readers:
        r.call("release", handle=r.call("lookup", name="store1", op="READ")["ok"])
    gen = inst.set_maintenance("store1", "type=offline,message=swap")
    inst.add_stores("store2")
    for r in readers:
        refused = r.call("lookup", name="store1", op="READ")
        assert refused["message"] == "datastore 'store1' is unavailable: offline maintenance mode: swap"
        ok = r.call("lookup", name="store2", op="READ")
        assert ok["ok"] and ok["generation"] == (gen or 0) + 1


def test_a_hand_edit_is_seen_within_the_ttl_and_bumps_the_generation_for_all(
    inst: Instance, agents: AgentFactory
) -> None:
    inst.add_stores("store1")
    quick, slow = agents(ttl=0.3), agents(ttl=3600)
    for a in (quick, slow):
        assert a.call("lookup", name="store1", op="READ")["ok"]
    gen = slow.call("state")["ok"]["generation"]
    inst.write_text(inst.config_file.read_text() + "\tmaintenance-mode offline\n")
    # the long-TTL process may still serve its cached config (nobody told it yet); with every
    # cache discarded it reads the file and already refuses -- fresher is always allowed
    stale = slow.call("lookup", name="store1", op="READ")
    assert "ok" in stale or dsproxy.registry.DISCARD_CACHES
    time.sleep(0.35)
    refused = quick.call("lookup", name="store1", op="READ")
    assert refused["message"] == "datastore 'store1' is unavailable: offline maintenance mode: "
    assert quick.call("state")["ok"]["generation"] == gen + 1
    # the bump reaches the long-TTL process on its very next lookup
    refused = slow.call("lookup", name="store1", op="READ")
    assert refused["message"] == "datastore 'store1' is unavailable: offline maintenance mode: "


def test_maintenance_transition_waits_for_every_process_and_counts_what_still_runs(
    inst: Instance, agents: AgentFactory
) -> None:
    inst.add_stores("store1")
    worker, idle = agents(), agents()
    held = worker.call("lookup", name="store1", op="WRITE")["ok"]
    idle.call("release", handle=idle.call("lookup", name="store1", op="READ")["ok"])
    assert "store1" in idle.call("state")["ok"]["instances"]
    seg = inst.segment()
    try:
        gen = inst.set_maintenance("store1", "offline")
        assert gen is not None
        # both processes run their refresh loop (what a daemon worker does between requests)
        worker.send("poll", seconds=0.5)
        idle.send("poll", seconds=0.5)
        lagging = asyncio.run(wait_for_generation(seg, gen, timeout=5))
        assert lagging == []
        assert seg.active_operations("store1") == (0, 1)  # the WRITE granted before the transition
        for a in (worker, idle):
            assert a._read()["ok"]
        state = idle.call("state")["ok"]
        assert "store1" not in state["instances"]  # idle process dropped its instance by itself
        assert worker.call("lookup", name="store1", op="READ")["status"] == 409
        worker.call("release", handle=held)
        assert "store1" not in worker.call("state")["ok"]["instances"]
        assert seg.active_operations("store1") == (0, 0)
    finally:
        seg.close()


def test_a_process_that_never_catches_up_is_reported_after_the_timeout(inst: Instance, agents: AgentFactory) -> None:
    inst.add_stores("store1")
    sleeper = agents()
    assert sleeper.call("lookup", name="store1", op="READ")["ok"]
    seg = inst.segment()
    try:
        gen = inst.set_maintenance("store1", "offline")
        assert gen is not None
        lagging = asyncio.run(wait_for_generation(seg, gen, timeout=0.2))
        assert [s.pid for s in lagging] == [sleeper.pid]
    finally:
        seg.close()
