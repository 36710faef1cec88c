"""The proxy master's supervision decisions, driven directly (no forking, no sockets)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dsproxy.daemon import master as master_mod
from dsproxy.daemon.http import Limits
from dsproxy.daemon.master import Master, ProxyOptions, _Worker
from dsproxy.daemon.protocol import EXIT_BOOT_FAILURE
from dsproxy.daemon.worker import WorkerSpec
from dsproxy.ipc import shm
from dsproxy.paths import Paths


@pytest.fixture
def master(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Master:
    spec = WorkerSpec(Paths.resolve(tmp_path), "on", 60.0, Limits(), 1.0, 1)
    m = Master(ProxyOptions(spec=spec, workers=2, crash_limit=3, crash_window=60.0))
    killed: list[tuple[int, int]] = []
    monkeypatch.setattr(master_mod, "_kill", lambda pid, sig: killed.append((pid, sig)))
    m.killed = killed  # type: ignore[attr-defined]
    return m


def crash(m: Master, pid: int, ready: bool = True, code: int = -9, age: float = 0.0) -> None:
    m.workers[pid] = _Worker(pid, time.monotonic() - age, m.reload_generation, ready=ready)
    status = (-code) if code < 0 else (code << 8)
    m.worker_exited(m.workers.pop(pid), status)


def test_workers_killed_after_serving_a_while_are_always_replaced_at_once(master: Master) -> None:
    for pid in range(400, 403):
        crash(master, pid, age=30.0)
        assert master.backoff.delay == 0.0
    assert not master.stopping


def test_the_first_crash_is_replaced_at_once_then_restarts_back_off(master: Master) -> None:
    crash(master, 101)
    assert master.backoff.delay == 0.0
    crash(master, 102)
    assert master.backoff.delay == pytest.approx(0.1)
    crash(master, 103)
    assert master.backoff.delay == pytest.approx(0.2)
    assert not master.stopping


def test_a_crash_loop_stops_the_master_with_exit_1(master: Master) -> None:
    master.workers[7] = _Worker(7, 0.0, 0, ready=True)
    for pid in range(200, 204):
        crash(master, pid)
    assert master.stopping and master.exit_code == master_mod.EXIT_CRASH_LOOP
    assert (7, signal.SIGTERM) in master.killed  # type: ignore[attr-defined]


def test_workers_that_never_boot_end_the_master_with_exit_3(master: Master) -> None:
    for pid in range(300, 303):
        crash(master, pid, ready=False, code=EXIT_BOOT_FAILURE)
    assert master.stopping and master.exit_code == EXIT_BOOT_FAILURE


def test_sighup_replaces_the_workers_only_once_the_new_ones_are_ready(master: Master) -> None:
    master.workers = {1: _Worker(1, 0.0, 0, True), 2: _Worker(2, 0.0, 0, True)}
    master.booted_once = True
    master.signals.append(signal.SIGHUP)
    master.dispatch(master.signals.popleft())
    assert master.reload_generation == 1 and master.current_workers() == []
    master.workers[3] = _Worker(3, 0.0, 1)
    master.workers[4] = _Worker(4, 0.0, 1)
    master.worker_ready(3)
    assert master.killed == []  # type: ignore[attr-defined]
    master.worker_ready(4)
    assert sorted(master.killed) == [(1, signal.SIGTERM), (2, signal.SIGTERM)]  # type: ignore[attr-defined]
    assert master.reload_started is None
    # the drained old workers exiting 0 are not crashes
    master.worker_exited(master.workers.pop(1), 0)
    assert not master.backoff.crashes


def test_sigterm_drains_every_worker(master: Master) -> None:
    master.workers = {1: _Worker(1, 0.0, 0, True), 2: _Worker(2, 0.0, 0, True)}
    master.dispatch(signal.SIGTERM)
    assert master.stopping
    assert sorted(master.killed) == [(1, signal.SIGTERM), (2, signal.SIGTERM)]  # type: ignore[attr-defined]
    master.worker_exited(master.workers.pop(1), 0)
    assert master.exit_code == 0


@pytest.fixture
def seg(master: Master) -> Iterator[shm.Segment]:
    run_dir = master.spec.paths.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    segment = shm.Segment.open(run_dir, create=True)
    try:
        yield segment
    finally:
        if master.seg is not None:
            master.seg.close()
        segment.close()
        shm.unlink(run_dir)


def _stale(seg: shm.Segment, slot: int, seconds: float) -> None:
    seg.words[seg.slot_base(slot) + shm.SLOT_HEARTBEAT] = time.monotonic_ns() - int(seconds * 1e9)


def test_a_ready_worker_silent_past_the_timeout_is_killed_and_its_slots_freed(master: Master, seg: shm.Segment) -> None:
    hung, fresh, booting = 1, os.getpid(), os.getppid()  # live pids, so that their slots are sound
    slots = {pid: seg.claim_slot(shm.Role.WORKER, pid=pid) for pid in (hung, fresh, booting)}
    _stale(seg, slots[hung], 2 * master.options.worker_timeout)
    _stale(seg, slots[booting], 2 * master.options.worker_timeout)  # not ready: the boot timeout's business
    for pid in slots:
        master.workers[pid] = _Worker(pid, time.monotonic(), master.reload_generation, ready=pid != booting)
    master.check_workers()
    assert master.killed == [(hung, signal.SIGKILL)]  # type: ignore[attr-defined]
    master.free_slot(hung)  # what worker_exited does once it is reaped
    assert seg.slot_pid(slots[hung]) == 0
    assert {s.pid for s in seg.slots()} == {fresh, booting}
