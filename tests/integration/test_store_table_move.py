"""A store-table move with real daemons, while leases are held on both workers.

An admin hand-edits 34,000 stores into ``datastore.cfg``: more than a 65,536-entry table holds at
half load, so the manager moves everyone to a 131,072-entry segment (``shm.move_size``).  Leases
taken before -- whole-body ones on each worker's connection and a streamed one -- must be counted
exactly by every worker before, during and after the move, a remove of a leased store is refused
throughout, the leases release cleanly afterwards, both workers end up on the manager's new
segment, and none of them restarted (nor went degraded, which would drop the counts).
"""

from __future__ import annotations

import itertools
import os
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from dsproxy.client import Client, Response
from dsproxy.config import config_lock, read_raw, replace_file
from dsproxy.daemon.protocol import WORKER_HEADER
from dsproxy.testing.daemons import frozen
from tests.daemons import Daemons, wait_for

API = "/api2/json"
BULK = 34_000  # configured stores that need a table of 131,072 (twice the count, a power of two)
#: whole-body leases per worker (by its rank in the pid order): (store, operation)
WHOLE = (
    [("demo0001", "read"), ("demo0001", "read"), ("demo0002", "write")],
    [("demo0001", "write"), ("demo0003", "read")],
)
STREAMED = ("demo0002", "read")
EXPECTED = {
    "demo0001": {"read": 2, "write": 1},
    "demo0002": {"read": 1, "write": 1},
    "demo0003": {"read": 1, "write": 0},
}
IDLE = {"read": 0, "write": 0}


def _ask(c: Client, pid: int, method: str, path: str, body: object = None) -> Response:
    r = c.request(method, path, body)
    assert int(r.headers[WORKER_HEADER]) == pid, "the keep-alive connection moved to another worker"
    return r


def _totals(workers: dict[int, Client]) -> dict[int, dict[str, dict[str, int]]]:
    """Each worker's active-operations of the leased stores."""
    return {
        pid: {name: _ask(c, pid, "GET", f"{API}/admin/datastore/{name}/active-operations").data for name in EXPECTED}
        for pid, c in workers.items()
    }


def _segments(workers: dict[int, Client]) -> dict[int, Any]:
    return {pid: _ask(c, pid, "GET", f"{API}/nodes/localhost/status").data["shm"] for pid, c in workers.items()}


@contextmanager
def _streamed_lease(d: Daemons, name: str, operation: str) -> Iterator[socket.socket]:
    """A lease for the life of a chunked request body; the body ends when the block does."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(20)
        s.connect(d.proxy_sock)
        head = f"POST {API}/admin/datastore/{name}/operation?operation={operation} HTTP/1.1\r\n"
        s.sendall(f"{head}host: x\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n".encode())
        yield s
        s.sendall(b"0\r\n\r\n")
        answer = s.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200") and b'"held":' in answer, answer[:300]


def _hand_edit_bulk(d: Daemons) -> None:
    """Append ``BULK`` stores (their directories need not exist: nobody looks them up)."""
    with config_lock(d.paths.lock_file):
        text = read_raw(d.config_file).decode()
        bulk = "".join(f"\ndatastore: bulk{i:06d}\n\tpath {d.paths.data_dir}/bulk/{i:06d}\n" for i in range(BULK))
        replace_file(d.config_file, (text + bulk).encode())


def _check_counted(workers: dict[int, Client]) -> None:
    """Every worker counts every lease."""
    for pid, totals in _totals(workers).items():
        assert totals == EXPECTED, f"worker {pid} counts {totals}"


def _check_refused(writer: Client, name: str) -> None:
    refused = writer.request("DELETE", f"{API}/config/datastore/{name}")
    assert refused.status == 409 and "has active operations" in refused.json()["message"], refused.body[:300]


def _take_leases(workers: dict[int, Client], pids: list[int]) -> None:
    for pid, leases in zip(pids, WHOLE, strict=True):
        for name, operation in leases:
            r = _ask(workers[pid], pid, "POST", f"{API}/admin/datastore/{name}/operation", {"operation": operation})
            assert r.status == 200, r.body[:300]


def _drop_leases(workers: dict[int, Client], pids: list[int]) -> None:
    for pid, leases in zip(pids, WHOLE, strict=True):
        for name in {name for name, _ in leases}:
            assert _ask(workers[pid], pid, "DELETE", f"{API}/admin/datastore/{name}/operation").status == 200


def _moved(workers: dict[int, Client], before: dict[int, Any]) -> dict[int, Any] | None:
    """The segments ``workers`` serve from, once all of them have left the one of ``before``."""
    segments = _segments(workers)
    if all(seg is not None and seg["inode"] != before[pid]["inode"] for pid, seg in segments.items()):
        return segments
    return None


def _poll_until_moved(workers: dict[int, Client], before: dict[int, Any], writer: Client | None) -> dict[int, Any]:
    """Check the counts of ``workers`` (and with ``writer``, a remove) until they have moved."""
    deadline = time.monotonic() + 30
    for poll in itertools.count():
        segments = _moved(workers, before)
        if segments is not None:
            return segments
        assert time.monotonic() < deadline, f"workers {sorted(workers)} did not move to a new segment within 30 s"
        _check_counted(workers)
        if writer is not None:
            _check_refused(writer, tuple(EXPECTED)[poll % len(EXPECTED)])
    raise AssertionError("unreachable")


def _maps_old_segment(pid: int, name: str) -> bool:
    """Whether ``pid`` still maps a segment of ``name`` that the name no longer holds."""
    with open(f"/proc/{pid}/maps") as maps:
        return any(line.rstrip().endswith(f"/dev/shm{name} (deleted)") for line in maps)


def _move_with_one_worker_behind(d: Daemons, workers: dict[int, Client], writer: Client) -> dict[int, Any]:
    """The hand edit, then the move polled through: first with the second worker frozen in the
    old segment (the first one, moved, must still count the other's leases where they are; the
    manager, refuse a remove), then with both (the second one moving with its leases)."""
    first, second = sorted(workers)
    before = _segments(workers)
    assert all(seg["store-table"] == 65_536 for seg in before.values())
    with frozen(second):
        _hand_edit_bulk(d)
        # no remove before the move: a write re-reads the edited file, the move must not need one
        _poll_until_moved({first: workers[first]}, before, None)
        for name in EXPECTED:  # the middle of the move, for as long as it takes
            _check_counted({first: workers[first]})
            _check_refused(workers[first], name)  # (forwarded by the worker that answers)
    return _poll_until_moved(workers, before, writer)


def test_leases_stay_counted_exactly_across_a_store_table_move(tmp_path: Path) -> None:
    with Daemons(tmp_path / "base", workers=2, stores=5) as d, ExitStack() as held:
        d.start()
        workers = held.enter_context(d.worker_clients())
        writer = held.enter_context(d.client())
        pids = sorted(workers)
        _take_leases(workers, pids)
        held.enter_context(_streamed_lease(d, *STREAMED))
        wait_for(lambda: all(t == EXPECTED for t in _totals(workers).values()), what="every lease counted")
        _check_refused(writer, "demo0001")

        after = _move_with_one_worker_behind(d, workers, writer)
        # one segment, the manager's (under the name), sized for the configuration
        assert len({seg["inode"] for seg in after.values()}) == 1
        seg = after[pids[0]]
        assert seg["store-table"] == 131_072 and os.stat(f"/dev/shm{seg['name']}").st_ino == seg["inode"]
        for name in EXPECTED:  # after it, while the manager drops the old segment (nobody counts there)
            _check_counted(workers)
            _check_refused(writer, name)
            time.sleep(0.5)
        assert _segments(workers) == after  # one move: the manager's checks since found nothing to move
        wait_for(lambda: not any(_maps_old_segment(pid, seg["name"]) for pid in pids), what="the old segment unmapped")

        _drop_leases(workers, pids)
        held.close()  # ends the streamed lease's body (and closes the connections)
        with d.worker_clients() as again:
            idle = dict.fromkeys(EXPECTED, IDLE)
            wait_for(lambda: all(t == idle for t in _totals(again).values()), what="every lease released")
            assert sorted(again) == pids, "a worker restarted"
            for pid, c in again.items():
                node = _ask(c, pid, "GET", f"{API}/nodes/localhost/status").data
                assert node["degraded"] is None and sorted(d.booted_workers(node)) == pids
        for name in EXPECTED:  # released: the removes go through now
            assert writer.request("DELETE", f"{API}/config/datastore/{name}").status == 200
        assert d.proxy is not None and d.proxy.poll() is None
