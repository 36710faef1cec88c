"""Faults injected for real into running daemons (docs/design.md §10): what breaks, and what must not."""

from __future__ import annotations

import contextlib
import mmap
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import posix_ipc
import pytest

from dsproxy.client import Client
from dsproxy.config import parse
from dsproxy.ipc import shm
from tests.daemons import Daemons, wait_for

API = "/api2/json"


def every_worker_sees(d: Daemons, store: str, comment: str, timeout: float = 10.0) -> None:
    """Several connections (spread over the workers) all see ``comment`` on ``store``."""
    clients = [Client(d.proxy_sock) for _ in range(6)]
    try:
        wait_for(
            lambda: all(c.get(f"{API}/config/datastore/{store}").data.get("comment") == comment for c in clients),
            timeout,
            what=f"every worker to see comment {comment!r}",
        )
    finally:
        for c in clients:
            c.close()


def write_comment(d: Daemons, store: str, comment: str) -> int:
    with Client(d.proxy_sock) as c:
        gen: int = c.request("PUT", f"{API}/config/datastore/{store}", {"comment": comment}).data["generation"]
    return gen


def sound_segment(run_dir: Path) -> shm.Segment | None:
    """The segment under the name, if it is sound now."""
    try:
        seg = shm.Segment.open(run_dir, create=False)
    except shm.SegmentError:
        return None
    return seg if seg.check() is None else None


def scribble(run_dir: Path, offset: int, data: bytes) -> None:
    handle = posix_ipc.SharedMemory(shm.segment_name(run_dir))
    try:
        with mmap.mmap(handle.fd, shm.PAGE) as mm:
            mm[offset : offset + len(data)] = data
    finally:
        handle.close_fd()


def test_a_scribbled_header_is_detected_and_replaced_without_a_stale_answer(daemons: Daemons) -> None:
    workers = daemons.worker_pids()
    old_generation = daemons.node()["generation"]
    scribble(daemons.run_dir, 0, b"GARBAGE!")
    # the manager notices, retires the old segment and creates a new one; everyone moves over
    wait_for(
        lambda: (seg := sound_segment(daemons.run_dir)) is not None and seg.generation() != old_generation,
        what="a new segment",
    )
    write_comment(daemons, "demo0001", "after the scribble")
    every_worker_sees(daemons, "demo0001", "after the scribble")
    wait_for(
        lambda: daemons.node()["degraded"] is None and len(daemons.node()["workers"]) == 2, what="workers back on shm"
    )
    wait_for(lambda: daemons.worker_pids() == workers, what="both original workers back on the new segment")
    for pid in workers:
        os.kill(pid, 0)  # no worker had to die for it
    assert "replacing it" in (daemons.logs / "manager.log").read_text()


def test_a_removed_segment_name_does_not_split_the_processes(daemons: Daemons) -> None:
    shm.unlink(daemons.run_dir)  # someone removes /dev/shm/dsproxy.*: the mappings live on
    wait_for(lambda: _exists(daemons.run_dir), what="the manager to put a segment back")
    # a write after the replacement must reach every worker: nobody may stay on the orphan
    write_comment(daemons, "demo0002", "after the unlink")
    every_worker_sees(daemons, "demo0002", "after the unlink")
    assert daemons.get(f"{API}/admin/datastore/demo0002/status").status == 200


def _exists(run_dir: Path) -> bool:
    try:
        posix_ipc.SharedMemory(shm.segment_name(run_dir)).close_fd()
    except posix_ipc.ExistentialError:
        return False
    return True


def test_a_truncated_segment_is_replaced_and_service_resumes(daemons: Daemons) -> None:
    handle = posix_ipc.SharedMemory(shm.segment_name(daemons.run_dir))
    try:
        os.ftruncate(handle.fd, shm.PAGE)  # processes that touch past it die of SIGBUS
    finally:
        handle.close_fd()

    def serving() -> bool:
        try:
            with Client(daemons.proxy_sock, timeout=5) as c:
                return c.get(f"{API}/admin/datastore/demo0003/status").status == 200
        except OSError:
            return False

    wait_for(lambda: sound_segment(daemons.run_dir) is not None, timeout=15, what="a sound segment")
    wait_for(serving, timeout=15, what="the proxy to serve again")
    wait_for(lambda: len(daemons.worker_pids()) == 2, timeout=15, what="two workers")
    write_comment(daemons, "demo0003", "after the truncation")
    every_worker_sees(daemons, "demo0003", "after the truncation")
    assert daemons.proxy is not None and daemons.proxy.poll() is None, "the proxy master survived"
    assert daemons.manager is not None and daemons.manager.poll() is None, "the manager survived"


def test_a_foreign_object_under_the_name_at_start_is_replaced(daemon_factory) -> None:
    d = daemon_factory()
    d.run_dir.mkdir(parents=True)
    foreign = posix_ipc.SharedMemory(shm.segment_name(d.run_dir), posix_ipc.O_CREX, size=8192)
    with mmap.mmap(foreign.fd, 8192) as mm:
        mm[:8] = b"NOTOURS!"
    foreign.close_fd()
    d.start()
    assert d.node()["degraded"] is None
    assert sound_segment(d.run_dir) is not None


def test_the_manager_killed_during_a_stream_of_writes_loses_no_acknowledged_write(daemons: Daemons) -> None:
    acked: list[str] = []
    generations: list[int] = []
    stop = threading.Event()

    def writer() -> None:
        n = 0
        with Client(daemons.proxy_sock) as c:
            while not stop.is_set():
                n += 1
                name = f"w{n:04d}"
                try:
                    r = c.request("POST", f"{API}/config/datastore", {"name": name})
                except OSError:
                    continue
                if r.status == 200:
                    acked.append(name)
                    generations.append(r.json()["data"]["generation"])

    t = threading.Thread(target=writer)
    t.start()
    try:
        wait_for(lambda: len(acked) >= 5, what="some writes")
        assert daemons.manager is not None
        daemons.manager.send_signal(signal.SIGKILL)
        daemons.manager.wait(timeout=10)
        time.sleep(0.3)
        # the file parses and holds every write acknowledged so far
        cfg = parse(daemons.config_file.read_bytes())
        assert set(acked) <= set(cfg)
        before_restart = daemons.node()["generation"]
        daemons.start_manager()
        wait_for(lambda: len(acked) >= len(set(cfg) & set(acked)) + 3, what="writes to resume")
    finally:
        stop.set()
        t.join()
    cfg = parse(daemons.config_file.read_bytes())
    assert set(acked) <= set(cfg)
    assert daemons.node()["generation"] > before_restart, "the generation never goes backwards"
    assert generations == sorted(generations)


def test_a_killed_lock_holder_does_not_wedge_config_writes(daemons: Daemons) -> None:
    holder = subprocess.Popen(
        [
            sys.executable, "-c",
            "import sys, time; from dsproxy.config import config_lock\n"
            "with config_lock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(600)",
            str(daemons.config_file.parent / ".datastore.lck"),
        ],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        result: list[int] = []
        t = threading.Thread(target=lambda: result.append(write_comment(daemons, "demo0004", "after the holder")))
        t.start()
        time.sleep(0.5)
        assert not result, "the write waits for the lock"
        holder.kill()  # inside its critical section
        t.join(timeout=15)
        assert result, "the write went through once the holder died"
    finally:
        holder.kill()
        holder.wait()
    every_worker_sees(daemons, "demo0004", "after the holder")


@pytest.fixture
def small_fs(tmp_path: Path):
    """A 1 MiB tmpfs (root can mount one in this sandbox); skipped where mounting is not allowed."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a small tmpfs")
    # (mode 0755: a tmpfs is 1777 by default, and a config dir every user can write is refused)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs", str(mnt)], capture_output=True, text=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _daemons_with_config_on(fs: Path, daemon_factory: Any) -> Daemons:
    """Running daemons whose config directory (etc/) is ``fs``."""
    d: Daemons = daemon_factory()
    d.base.mkdir(parents=True)
    (d.base / "etc").symlink_to(fs)
    return d.start()


def test_a_full_disk_during_a_write_keeps_the_old_file_and_says_why(daemon_factory, small_fs: Path) -> None:
    d = _daemons_with_config_on(small_fs, daemon_factory)
    before = d.config_file.read_bytes()
    filler = small_fs / "filler"
    with contextlib.suppress(OSError), open(filler, "wb") as f:
        while True:
            f.write(b"x" * 65536)
            f.flush()
    with Client(d.proxy_sock) as c:
        r = c.request("PUT", f"{API}/config/datastore/demo0001", {"comment": "x" * 100})
    assert r.status == 500
    assert "No space left on device" in r.json()["message"] and "datastore.cfg" in r.json()["message"]
    assert d.config_file.read_bytes() == before
    assert not [p for p in small_fs.iterdir() if p.name not in ("datastore.cfg", ".datastore.lck", "filler")]
    assert d.get(f"{API}/admin/datastore/demo0001/status").status == 200
    filler.unlink()
    with Client(d.proxy_sock) as c:
        assert c.request("PUT", f"{API}/config/datastore/demo0001", {"comment": "fits again"}).status == 200


def test_a_read_only_config_dir_refuses_the_write_clearly(daemon_factory, small_fs: Path) -> None:
    d = _daemons_with_config_on(small_fs, daemon_factory)
    before = d.config_file.read_bytes()
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    try:
        with Client(d.proxy_sock) as c:
            r = c.request("PUT", f"{API}/config/datastore/demo0001", {"comment": "nope"})
        assert r.status in (500, 503)
        assert "Read-only file system" in r.json()["message"]
        assert d.config_file.read_bytes() == before
        assert d.get(f"{API}/admin/datastore/demo0001/status").status == 200
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_fs)], check=False)
