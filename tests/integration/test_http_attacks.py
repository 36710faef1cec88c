"""Attacks on the proxy's HTTP server that need the real daemons: worker memory (RSS, by psutil)
through oversized headers, pipelining without reading and a connect flood; the CLI during the
flood; a forwarded write while the manager is stopped; a form body end to end."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil  # type: ignore[import-untyped]
import pytest

from tests.daemons import Daemons

RSS_LIMIT = 100 << 20


class PeakRSS:
    """The highest RSS of each process in ``pids``, sampled every 20 ms while in the ``with``."""

    def __init__(self, pids: set[int]) -> None:
        self.procs = [psutil.Process(pid) for pid in pids]
        self.peak = dict.fromkeys(pids, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while True:
            for proc in self.procs:
                with contextlib.suppress(psutil.Error):
                    self.peak[proc.pid] = max(self.peak[proc.pid], proc.memory_info().rss)
            if self._stop.wait(0.02):
                return

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def report(self) -> str:
        return ", ".join(f"{pid}: {rss / 2**20:.0f} MB" for pid, rss in self.peak.items())


@pytest.fixture
def proxy(daemon_factory: Callable[..., Daemons]) -> Iterator[Daemons]:
    d = daemon_factory(workers=2, stores=40)  # a 4 KB config list: 20,000 of them are 80 MB
    d.start()
    yield d


def connect(d: Daemons) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(d.proxy_sock)
    return s


def test_endless_headers_leave_worker_memory_flat(proxy: Daemons) -> None:
    """8 connections each sending 16 MB of one header value without CRLF (a worker reached 447 MB
    with 64 MB each): each is answered 431 after 16 KB, and the workers stay under 100 MB."""
    replies: list[bytes] = []

    def attack() -> None:
        s = connect(proxy)
        s.settimeout(15)
        with contextlib.suppress(OSError):
            s.sendall(b"GET /api2/json/ping HTTP/1.1\r\nhost: x\r\nx-big: ")
            chunk = b"a" * (1 << 20)
            for _ in range(16):
                s.sendall(chunk)
        with contextlib.suppress(OSError):
            replies.append(s.recv(100))
        s.close()

    with PeakRSS(proxy.worker_pids()) as rss:
        threads = [threading.Thread(target=attack) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(replies) == 8 and all(r.startswith(b"HTTP/1.1 431 ") for r in replies), replies
    assert max(rss.peak.values()) < RSS_LIMIT, rss.report()
    assert proxy.get("/api2/json/ping").status == 200


def test_pipelining_without_reading_leaves_worker_memory_flat(proxy: Daemons) -> None:
    """20,000 pipelined config lists, never read: the worker stops reading (the sender blocks)
    instead of buffering ~80 MB of answers; the connection is still served once it reads."""
    n = 20000
    request = b"GET /api2/json/config/datastore HTTP/1.1\r\nhost: x\r\n\r\n"
    s = connect(proxy)
    s.setblocking(False)
    data = request * n
    sent = 0
    with PeakRSS(proxy.worker_pids()) as rss:
        deadline = time.monotonic() + 3
        while sent < len(data) and time.monotonic() < deadline:
            try:
                sent += s.send(data[sent : sent + 65536])
            except BlockingIOError:
                time.sleep(0.01)
        time.sleep(0.5)
    assert sent < len(data) // 2, "the worker kept reading what it could not answer"
    assert max(rss.peak.values()) < RSS_LIMIT, rss.report()
    # a reader gets its answers again, in order
    s.setblocking(True)
    s.settimeout(10)
    got = b""
    while got.count(b"HTTP/1.1 200 OK") < 100:
        got += s.recv(1 << 20)
    s.close()
    assert proxy.get("/api2/json/ping").status == 200


def test_a_connect_flood_is_accepted_and_the_cli_still_works(proxy: Daemons) -> None:
    """9,000 connects as fast as one client makes them (with the accept throttled to ~1,000/s the
    listen queue filled and `dsproxy datastore list` failed 20 of 20): all accepted within a few
    seconds, the CLI succeeds during the flood, the workers stay under 100 MB."""
    n = 9000
    pids = proxy.worker_pids()
    cli_codes: list[int] = []

    def cli() -> None:
        for _ in range(5):
            result = subprocess.run(proxy.command("datastore", "list"), capture_output=True, timeout=30)
            cli_codes.append(result.returncode)

    socks: list[socket.socket] = []
    with PeakRSS(pids) as rss:
        started = time.monotonic()
        runner = threading.Thread(target=cli)
        runner.start()
        while len(socks) < n and time.monotonic() - started < 20:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(5)
            try:
                s.connect(proxy.proxy_sock)
            except BlockingIOError:  # the queue is full for a moment
                s.close()
                continue
            socks.append(s)
        runner.join()

        def accepted() -> int:
            return sum(psutil.Process(pid).num_fds() for pid in pids)

        base = accepted() - n
        while accepted() - base < n and time.monotonic() - started < 30:
            time.sleep(0.01)
        elapsed = time.monotonic() - started
    try:
        assert len(socks) == n
        assert elapsed < 5.0, f"{n} connects accepted after {elapsed:.1f} s"
        assert cli_codes == [0] * 5, proxy.log_text()
        assert max(rss.peak.values()) < RSS_LIMIT, rss.report()
        for s in socks[:: n // 20]:  # flood connections are real connections
            s.sendall(b"GET /api2/json/ping HTTP/1.1\r\nhost: x\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.1 200 ")
    finally:
        for s in socks:
            s.close()


def test_a_write_forwarded_to_a_stopped_manager_is_504(daemon_factory: Callable[..., Daemons]) -> None:
    d = daemon_factory(workers=1, stores=1)
    d.start_manager()
    d.start_proxy("--forward-timeout", "1")
    assert d.manager is not None
    os.kill(d.manager.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with d.client() as c:
            resp = c.request("POST", "/api2/json/config/datastore", {"name": "late1"})
        elapsed = time.monotonic() - started
        assert resp.status == 504
        assert "did not answer within 1 s" in resp.json()["message"]
        assert elapsed < 5
        assert d.get("/api2/json/ping").status == 200  # reads are not held up
    finally:
        os.kill(d.manager.pid, signal.SIGCONT)
    with d.client() as c:  # the next write gets its own answer, not the late one of the first
        resp = c.request("POST", "/api2/json/config/datastore", {"name": "late2"})
    assert resp.status == 200 and resp.json()["data"]["name"] == "late2", resp


def test_writes_forwarded_over_kept_connections_survive_a_manager_restart(
    daemon_factory: Callable[..., Daemons],
) -> None:
    """A worker keeps its connections to the manager between writes: a manager that stopped (it
    closes them) or was killed, and runs again, must not make the next write fail."""
    d = daemon_factory(workers=1, stores=1)
    d.start_manager()
    d.start_proxy()
    with d.client() as c:
        for n, how in enumerate((signal.SIGTERM, signal.SIGKILL)):
            assert c.request("PUT", "/api2/json/config/datastore/demo0001", {"comment": f"a{n}"}).status == 200
            assert d.manager is not None
            d.manager.send_signal(how)
            d.manager.wait(timeout=10)
            d.start_manager()
            resp = c.request("PUT", "/api2/json/config/datastore/demo0001", {"comment": f"b{n}"})
            assert resp.status == 200, resp
        assert c.get("/api2/json/config/datastore/demo0001").json()["data"]["comment"] == "b1"


def curl(d: Daemons, *args: str) -> tuple[int, Any]:
    out = subprocess.run(
        ["curl", "-s", "-w", "\n%{http_code}", "--unix-socket", d.proxy_sock, *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    body, code = out.rsplit("\n", 1)
    return int(code), json.loads(body)


@pytest.mark.skipif(subprocess.run(["which", "curl"], capture_output=True).returncode != 0, reason="needs curl")
def test_form_bodies_work_through_the_proxy(daemon_factory: Callable[..., Daemons]) -> None:
    """curl -d (application/x-www-form-urlencoded) creates and updates a store, as PBS allows;
    the forwarder used to add a JSON content-type on top and the manager answered 400."""
    d = daemon_factory(workers=1, stores=1)
    d.start()
    path = d.base / "datastores" / "formstore"
    url = "http://localhost/api2/json/config/datastore"
    code, body = curl(d, "-d", f"name=formstore&path={path}&comment=made%20by%20curl&keep-last=3", url)
    assert code == 200, body
    code, body = curl(d, "-X", "PUT", "-d", "comment=changed&keep-last=5", f"{url}/formstore")
    assert code == 200, body
    code, body = curl(d, f"{url}/formstore")
    assert body["data"]["comment"] == "changed"
    assert body["data"]["keep-last"] == 5
    code, body = curl(d, "-X", "PUT", "-d", "comment=%ff", f"{url}/formstore")
    assert code == 400
    assert "form body" in body["message"]
    assert "Traceback" not in d.log_text()
