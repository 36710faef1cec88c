"""Who is alive, through pidfds (:class:`dsproxy.ipc.proc.Liveness`): the manager's look at its
slots, and the signal that wakes its workers, never reach a process that took a dead one's pid."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dsproxy.ipc import shm
from dsproxy.ipc.proc import LIVENESS_FDS, Liveness, start_time

# a child that prints a line for each SIGUSR2 it takes, and exits on SIGTERM
_CHILD = """
import signal, sys, time
signal.signal(signal.SIGUSR2, lambda *_: print("usr2", flush=True))
print("ready", flush=True)
while True:
    time.sleep(1)
"""


@pytest.fixture
def child() -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen([sys.executable, "-c", _CHILD], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        yield proc
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture(params=["pidfd", "no pidfd"])
def live(request: pytest.FixtureRequest) -> Iterator[Liveness]:
    liveness = Liveness()
    if request.param == "no pidfd":
        liveness._supported = False  # an old kernel: every look the slow way, the same answers
    try:
        yield liveness
    finally:
        liveness.close()


def _key(proc: subprocess.Popen[str]) -> tuple[int, int]:
    start = start_time(proc.pid)
    assert start is not None
    return proc.pid, start


def test_a_running_process_is_alive_until_it_exits_and_a_zombie_is_not(
    live: Liveness, child: subprocess.Popen[str]
) -> None:
    key = _key(child)
    assert live.alive([key]) == {key}
    assert live.alive([key]) == {key}  # (the second look: the pidfd kept)
    child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while live.alive([key]) and time.monotonic() < deadline:  # a zombie until reaped below
        time.sleep(0.01)
    assert live.alive([key]) == set()
    assert os.waitpid(child.pid, os.WNOHANG)[0] == child.pid  # it was a zombie, not gone
    child.returncode = -signal.SIGTERM
    assert live._fds == {}  # its pidfd closed once it had exited


def test_another_start_time_and_garbage_pids_are_not_alive(live: Liveness, child: subprocess.Popen[str]) -> None:
    pid, start = _key(child)
    garbage = [(pid, start + 1), (0, start), (-1, 1), (2**64 - 1, start), (2**22 + 1, 1)]
    assert live.alive([(pid, start), *garbage]) == {(pid, start)}
    assert set(live._fds) <= {(pid, start)}  # no pidfd for anything but the process itself


def test_a_signal_reaches_the_process_and_not_one_with_another_start_time(
    live: Liveness, child: subprocess.Popen[str]
) -> None:
    pid, start = _key(child)
    assert child.stdout is not None
    assert not live.signal(pid, start + 1, signal.SIGUSR2)  # what a reused pid looks like
    assert live.signal(pid, start, signal.SIGUSR2)
    assert child.stdout.readline() == "usr2\n"  # one line: the first signal was not sent
    child.kill()
    child.wait()
    assert not live.signal(pid, start, signal.SIGUSR2)


def test_the_pidfds_kept_are_bounded(child: subprocess.Popen[str]) -> None:
    live = Liveness()  # (with pidfds: without, nothing is kept)
    try:
        pid, start = _key(child)
        me = (os.getpid(), start_time(os.getpid()) or 0)
        live._fds.update({(10**9 + i, 1): os.dup(0) for i in range(LIVENESS_FDS)})  # stand-ins, already full
        assert live.alive([(pid, start), me]) == {(pid, start), me}
        assert len(live._fds) == LIVENESS_FDS and (pid, start) in live._fds and me in live._fds
    finally:
        live.close()


def test_slots_through_pidfds_are_the_slots_through_proc(seg: shm.Segment, tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", _CHILD], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        mine = seg.claim_slot(shm.Role.MANAGER)
        theirs = seg.claim_slot(shm.Role.WORKER, child.pid)
        slow = [s.slot for s in seg.slots()]
        seg.liveness = Liveness()
        assert [s.slot for s in seg.slots()] == slow == [mine, theirs]
        child.kill()
        child.wait()
        assert [s.slot for s in seg.slots()] == [mine]
        seg.liveness.close()
        seg.liveness = None
        assert [s.slot for s in seg.slots()] == [mine]
    finally:
        child.kill()
        child.wait()
