"""The HTTP server in one event loop: a real :class:`Server` on a temp Unix socket, raw bytes.

Each test runs the server and its clients in the same (uvloop) loop, so a case costs
milliseconds and needs no process.  What is asserted is what a client sees: status codes,
messages, when the connection closes, and how much the server buffers for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import pytest
import uvloop

from dsproxy import client as client_mod
from dsproxy.daemon import api, http
from dsproxy.daemon.api import MAX_LEASES_PER_CONNECTION, WorkerApp
from dsproxy.daemon.http import (
    DEFAULT_LIMITS,
    HTTPError,
    Limits,
    Reply,
    Request,
    Router,
    Server,
    bind_unix_socket,
    data_reply,
    listen_backlog,
)
from dsproxy.registry import Registry
from tests.helpers import Instance

BIG = b"x" * 2000  # a reply body: 20,000 of them are 40 MB if nothing holds the server back


def run(coro: Awaitable[Any]) -> Any:
    return uvloop.run(asyncio.wait_for(coro, 30))


def echo_router() -> Router:
    r = Router()
    r.add("GET", "/ping", lambda req: data_reply({"pong": True}))
    r.add("GET", "/big", lambda req: Reply(200, BIG))
    r.add("POST", "/echo", lambda req: data_reply(req.json()))
    r.add("GET", "/item/{name}", lambda req: data_reply(req.params["name"]))

    async def slow(req: Request) -> Reply:
        await asyncio.sleep(0.05)
        return data_reply("slow")

    r.add("GET", "/slow", slow)
    return r


@contextlib.asynccontextmanager
async def serving(
    tmp_path: Path, router: Router | None = None, limits: Limits = DEFAULT_LIMITS, **server_args: Any
) -> AsyncIterator[tuple[Server, str]]:
    path = str(tmp_path / "http.sock")
    sock = bind_unix_socket(path)
    server = Server(router or echo_router(), limits, **server_args)
    await server.serve(sock, balance=True)
    try:
        yield server, path
    finally:
        await server.drain(0.2)
        sock.close()


class Raw:
    """A client connection that sends and reads raw bytes (a non-blocking socket in the loop)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.buffer = b""

    @classmethod
    async def open(cls, path: str) -> Raw:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, path)
        return cls(sock)

    async def send(self, data: bytes) -> None:
        await self.loop.sock_sendall(self.sock, data)

    def send_later(self, data: bytes) -> asyncio.Future[None]:
        """Send in the background (as far as the server reads)."""
        return asyncio.ensure_future(self.loop.sock_sendall(self.sock, data))

    async def _fill(self, timeout: float) -> None:
        data = await asyncio.wait_for(self.loop.sock_recv(self.sock, 1 << 16), timeout)
        if not data:
            raise EOFError("the server closed the connection")
        self.buffer += data

    async def response(self, timeout: float = 3.0) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buffer:
            await self._fill(timeout)
        head, rest = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in lines[1:] if line)
        length = int(headers["content-length"])
        while len(rest) < length:
            await self._fill(timeout)
            rest = self.buffer.split(b"\r\n\r\n", 1)[1]
        self.buffer = rest[length:]
        return int(lines[0].split()[1]), headers, rest[:length]

    async def closed(self, timeout: float = 3.0) -> bool:
        """True when the server closes the connection (EOF or reset) within ``timeout``."""
        try:
            while True:
                await self._fill(timeout)
        except (EOFError, ConnectionError):
            return True

    def close(self) -> None:
        self.sock.close()


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nhost: x\r\n\r\n".encode()


def post(path: str, body: bytes, ctype: str = "application/json") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: {ctype}\r\ncontent-length: {len(body)}\r\n\r\n".encode()
        + body
    )


# -- header and body caps ---------------------------------------------------------------------------


def test_a_header_without_end_is_refused_once_past_the_cap(tmp_path: Path) -> None:
    """The 64 MB header attack: refused after ~16 KB, not buffered until the request timeout."""

    async def main() -> None:
        async with serving(tmp_path) as (_, path):
            c = await Raw.open(path)
            started = time.monotonic()
            with contextlib.suppress(ConnectionError):
                await c.send(b"GET /ping HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * (4 << 20))  # 4 MB, no CRLF
            status, _, body = await c.response(timeout=5.0)
            assert status == 431
            assert b"larger than 16384 bytes" in body
            assert time.monotonic() - started < 5.0
            assert await c.closed()

    run(main())


def test_a_header_split_into_many_reads_is_counted_as_a_whole(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (_, path):
            c = await Raw.open(path)
            head = b"GET /ping HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 20000
            with contextlib.suppress(ConnectionError):
                for i in range(0, len(head), 1000):
                    await c.send(head[i : i + 1000])
                    await asyncio.sleep(0)
            status, _, _ = await c.response()
            assert status == 431

    run(main())


def test_headers_just_under_the_cap_are_served_in_any_split(tmp_path: Path) -> None:
    """No false 431: 15 KB of headers followed by a body and a pipelined request, in one read or
    in small pieces."""
    headers = "".join(f"x-h{i}: {'v' * 140}\r\n" for i in range(100 - 3))  # ~14.9 KB, 97 fields
    body = json.dumps({"a": "b" * 30000}).encode()
    request = (
        f"POST /echo HTTP/1.1\r\nhost: x\r\n{headers}content-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode() + body
    assert 14000 < request.index(b"\r\n\r\n") < DEFAULT_LIMITS.max_header_bytes

    async def main() -> None:
        async with serving(tmp_path) as (_, path):
            for piece in (len(request) + 100, 4096, 333):
                c = await Raw.open(path)
                data = request + get("/ping")
                for i in range(0, len(data), piece):
                    await c.send(data[i : i + piece])
                status, _, answer = await c.response()
                assert status == 200, answer[:200]
                assert json.loads(answer)["data"]["a"] == "b" * 30000
                assert (await c.response())[0] == 200
                c.close()

    run(main())


def test_a_body_past_the_cap_is_refused_while_it_arrives(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path, limits=Limits(max_body=100_000)) as (_, path):
            c = await Raw.open(path)
            await c.send(b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 200000\r\n\r\n")
            assert (await c.response())[0] == 413  # from Content-Length, before any body byte
            c = await Raw.open(path)
            await c.send(b"POST /echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n")
            chunk = b"%x\r\n%s\r\n" % (30000, b"a" * 30000)
            with contextlib.suppress(ConnectionError):
                for _ in range(4):  # 120,000 bytes: past the cap in the 4th chunk
                    await c.send(chunk)
            status, _, body = await c.response()
            assert status == 413
            assert b"larger than 100000 bytes" in body

    run(main())


# -- write flow control -----------------------------------------------------------------------------


def test_pipelining_without_reading_does_not_grow_the_write_buffer(tmp_path: Path) -> None:
    """20,000 pipelined requests from a client that does not read: the server stops reading
    (the client's own send buffer fills) instead of buffering 40 MB of answers; when the client
    reads, every answer arrives, in order."""
    n = 20000
    high = DEFAULT_LIMITS.write_high

    async def main() -> None:
        async with serving(tmp_path) as (server, path):
            c = await Raw.open(path)
            sending = c.send_later((get("/big") + get("/ping")) * (n // 2))  # and never reads
            peak = 0
            for _ in range(50):
                await asyncio.sleep(0.01)
                (conn,) = server.connections
                assert conn.transport is not None
                peak = max(peak, conn.transport.get_write_buffer_size())
            assert peak <= high + len(BIG) + 200, peak
            assert not sending.done()  # the server stopped reading: the client cannot send
            for i in range(n):
                status, _, body = await c.response()
                assert status == 200
                assert (body == BIG) == (i % 2 == 0)

    run(main())


def test_pipelined_requests_wait_for_an_asynchronous_one(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (_, path):
            c = await Raw.open(path)
            await c.send(get("/slow") + get("/item/one") + get("/slow") + get("/item/two"))
            answers = [json.loads((await c.response())[2])["data"] for _ in range(4)]
            assert answers == ["slow", "one", "slow", "two"]

    run(main())


def test_a_client_that_never_reads_is_closed_after_the_keepalive_time(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path, limits=Limits(keepalive=0.2)) as (server, path):
            c = await Raw.open(path)
            c.send_later(get("/big") * 2000)
            await asyncio.sleep(2.5)  # the sweep runs once a second
            assert not server.connections

    run(main())


# -- accepting ------------------------------------------------------------------------------------


def test_the_listen_queue_is_the_kernels_maximum(tmp_path: Path) -> None:
    assert listen_backlog() >= 128
    with open("/proc/sys/net/core/somaxconn") as f:
        assert listen_backlog() == max(128, int(f.read()))


def test_a_connect_burst_is_accepted_quickly(tmp_path: Path) -> None:
    """3,000 connects (more than a 1,024 queue) are all accepted within a few seconds, and every
    one is served."""
    n = 3000

    async def main() -> None:
        async with serving(tmp_path) as (server, path):
            loop = asyncio.get_running_loop()
            socks = []
            started = time.monotonic()
            for _ in range(n):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.setblocking(False)
                while True:
                    try:
                        s.connect(path)
                        break
                    except BlockingIOError:  # the queue is full: let the server accept
                        await asyncio.sleep(0.001)
                socks.append(s)
            while len(server.connections) < n and time.monotonic() - started < 10:
                await asyncio.sleep(0.01)
            elapsed = time.monotonic() - started
            assert len(server.connections) == n
            assert elapsed < 5.0, f"{n} accepts took {elapsed:.2f} s"
            for s in socks[:: n // 10]:
                await loop.sock_sendall(s, get("/ping"))
                assert b"200 OK" in await loop.sock_recv(s, 4096)
            for s in socks:
                s.close()

    run(main())


# -- draining (a reload's old workers) --------------------------------------------------------------


def test_a_connection_accepted_before_the_drain_is_served_if_its_request_comes_late(tmp_path: Path) -> None:
    """A client that connected just before the drain (accepted, its request not sent yet) still
    gets its answer -- with ``connection: close`` -- instead of a closed socket (a reload's
    fresh-connection client saw EPIPE)."""

    async def main() -> None:
        async with serving(tmp_path) as (server, path):
            c = await Raw.open(path)
            while not server.connections:
                await asyncio.sleep(0.001)
            draining = asyncio.ensure_future(server.drain(5.0))
            await asyncio.sleep(0.2)  # the drain has looked at its connections a few times
            await c.send(get("/ping"))
            status, headers, body = await c.response()
            assert (status, headers.get("connection"), json.loads(body)) == (200, "close", {"data": {"pong": True}})
            assert await c.closed()
            await asyncio.wait_for(draining, 2.0)  # done once that one was answered

    run(main())


def test_a_silent_connection_holds_the_drain_for_the_grace_only(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (server, path):
            c = await Raw.open(path)
            while not server.connections:
                await asyncio.sleep(0.001)
            started = time.monotonic()
            await server.drain(30.0)
            took = time.monotonic() - started
            assert http.DRAIN_FRESH_GRACE <= took < http.DRAIN_FRESH_GRACE + 1.0
            assert await c.closed()

    run(main())


def test_a_served_idle_connection_is_closed_at_once_by_the_drain(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (server, path):
            c = await Raw.open(path)
            await c.send(get("/ping"))
            assert (await c.response())[0] == 200
            started = time.monotonic()
            await server.drain(30.0)
            assert time.monotonic() - started < http.DRAIN_FRESH_GRACE
            assert await c.closed()

    run(main())


def test_the_client_retries_a_connect_the_queue_refuses(tmp_path: Path) -> None:
    """A full listen queue answers EAGAIN to a connect with a timeout: the CLI's client retries."""
    path = str(tmp_path / "full.sock")
    listener = bind_unix_socket(path, backlog=0)
    fillers = []
    try:
        with contextlib.suppress(BlockingIOError):
            for _ in range(10):
                s = socket.socket(socket.AF_UNIX)
                s.setblocking(False)
                s.connect(path)
                fillers.append(s)
        with pytest.raises(BlockingIOError):
            client_mod.connect_unix(path, timeout=1.0)
        started = time.monotonic()
        with pytest.raises(BlockingIOError):
            client_mod.connect_unix(path, timeout=1.0, retry=0.3)
        assert 0.25 < time.monotonic() - started < 3.0  # bounded
        # the queue drains meanwhile: the retry gets in
        accepted = []

        def drain() -> None:
            time.sleep(0.1)
            while True:
                try:
                    accepted.append(listener.accept()[0])
                except BlockingIOError:
                    return

        import threading

        t = threading.Thread(target=drain)
        t.start()
        sock = client_mod.connect_unix(path, timeout=1.0, retry=2.0)
        t.join()
        sock.close()
        for s in accepted:
            s.close()
    finally:
        for s in fillers:
            s.close()
        listener.close()


# -- client errors are 4xx --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"[" * 500000, 400, "nested deeper than 32 levels"),
        (b'{"a":' * 100 + b"1" + b"}" * 100, 400, "nested deeper than 32 levels"),
        (b'{"name": "\\ud800"}', 400, "invalid string in 'name'"),
        (b'{"x": {"y": ["ok", "\\udfff"]}}', 400, "invalid string in 'x.y[1]'"),
        (b'{"\\ud800": 1}', 400, "not valid Unicode"),
        (b'{"keep-last": ' + b"9" * 5000 + b"}", 400, "more than 4300 digits"),
        (b"[1, 2]", 400, "must be a JSON object, not an array"),
        (b'"text"', 400, "must be a JSON object, not a string"),
        (b"null", 400, "must be a JSON object, not null"),
        (b"7", 400, "must be a JSON object, not a number"),
        (b"{bad", 400, "not valid JSON"),
        (b"\xff\xfe", 400, "not valid JSON"),
        (b'{"a": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}', 200, ""),  # brackets in strings are text
        (b'{"a": [[[[1]]]]}', 200, ""),
    ],
)
def test_bad_json_bodies_are_400_with_a_message(tmp_path: Path, body: bytes, status: int, message: str) -> None:
    async def main() -> None:
        async with serving(tmp_path, limits=Limits(max_body=1 << 20)) as (_, path):
            c = await Raw.open(path)
            await c.send(post("/echo", body))
            got, _, answer = await c.response()
            assert got == status, answer[:300]
            if message:
                assert message in json.loads(answer)["message"]

    run(main())


@pytest.mark.parametrize(
    ("segment", "status", "message"),
    [
        ("%ff", 400, "not UTF-8"),
        ("%zz", 400, "invalid percent escape"),
        ("ab%2", 400, "invalid percent escape"),
        ("%00", 400, "control character"),
        ("a%0ab", 400, "control character"),
        ("%2e%2e", 400, "invalid path component"),
        ("a%2fb", 400, "invalid path component"),
        ("%41bc", 200, ""),
        ("%c3%a9t%C3%A9", 200, ""),
    ],
)
def test_percent_escapes_in_a_path_segment(tmp_path: Path, segment: str, status: int, message: str) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (_, path):
            c = await Raw.open(path)
            await c.send(get(f"/item/{segment}"))
            got, _, answer = await c.response()
            assert got == status, answer
            if message:
                assert message in json.loads(answer)["message"]
                assert segment in json.loads(answer)["message"]

    run(main())


def test_form_bodies_are_parsed_and_bad_ones_refused(tmp_path: Path) -> None:
    form = "application/x-www-form-urlencoded"

    async def main() -> None:
        async with serving(tmp_path) as (_, path):
            c = await Raw.open(path)
            await c.send(post("/echo", b"name=store1&path=%2Fsrv%2Fa&comment=", form))
            status, _, body = await c.response()
            assert status == 200
            assert json.loads(body)["data"] == {"name": "store1", "path": "/srv/a", "comment": ""}
            for bad in (b"name=%ff", b"a=1&&=", b"\xff=1"):
                await c.send(post("/echo", bad, form))
                status, _, body = await c.response()
                assert status == 400, bad
                assert "form body" in json.loads(body)["message"]
            # curl -d delete=a -d delete=b sends an array; keeping only the last key lost part of a write
            await c.send(post("/echo", b"delete=comment&delete=keep-last,keep-daily&comment=x", form))
            status, _, body = await c.response()
            assert status == 200
            assert json.loads(body)["data"] == {"delete": ["comment", "keep-last", "keep-daily"], "comment": "x"}
            await c.send(post("/echo", b"comment=a&comment=b", form))
            status, _, body = await c.response()
            assert status == 400
            assert json.loads(body)["message"] == "parameter 'comment' is given more than once"

    run(main())


def test_a_bad_query_string_is_400(tmp_path: Path) -> None:
    r = Router()
    r.add("GET", "/q", lambda req: data_reply(req.query()))

    async def main() -> None:
        async with serving(tmp_path, r) as (_, path):
            c = await Raw.open(path)
            for query, status in (("a=1&b=%2F", 200), ("a=%ff", 400), ("a=1&&", 400)):
                await c.send(get(f"/q?{query}"))
                assert (await c.response())[0] == status, query

    run(main())


# -- the worker's forwarder -------------------------------------------------------------------------


def manager_double(answer: Callable[[Request], Awaitable[Reply]]) -> Router:
    r = Router()
    r.add("POST", "/api2/json/config/datastore", answer)
    return r


def worker_app(manager_sock: str, **kwargs: Any) -> WorkerApp:
    return WorkerApp(cast(Registry, None), manager_sock, **kwargs)  # forward() needs no registry


def test_a_form_body_is_forwarded_with_one_content_type(tmp_path: Path) -> None:
    """curl -d: the manager gets the form and its one content-type, not a JSON one added on top."""

    async def answer(req: Request) -> Reply:
        return data_reply({"content-type": req.headers.get("content-type"), "body": req.json()})

    async def main() -> None:
        (tmp_path / "m").mkdir()
        (tmp_path / "w").mkdir()
        async with serving(tmp_path / "m", manager_double(answer)) as (_, msock):
            app = worker_app(msock)
            async with serving(tmp_path / "w", app.router()) as (_, wsock):
                c = await Raw.open(wsock)
                await c.send(
                    post("/api2/json/config/datastore", b"name=store1&path=%2Fsrv", "application/x-www-form-urlencoded")
                )
                status, _, body = await c.response()
                assert status == 200, body
                data = json.loads(body)["data"]
                assert data == {
                    "content-type": "application/x-www-form-urlencoded",
                    "body": {"name": "store1", "path": "/srv"},
                }
                await c.send(post("/api2/json/config/datastore", b'{"name": "s2"}'))
                data = json.loads((await c.response())[2])["data"]
                assert data == {"content-type": "application/json", "body": {"name": "s2"}}

    run(main())


def test_a_forward_the_manager_does_not_answer_is_504(tmp_path: Path) -> None:
    async def answer(req: Request) -> Reply:
        await asyncio.Event().wait()  # a stopped manager
        raise AssertionError

    async def main() -> None:
        (tmp_path / "m").mkdir()
        (tmp_path / "w").mkdir()
        async with serving(tmp_path / "m", manager_double(answer)) as (_, msock):
            app = worker_app(msock, forward_timeout=0.3)
            async with serving(tmp_path / "w", app.router()) as (_, wsock):
                c = await Raw.open(wsock)
                started = time.monotonic()
                await c.send(post("/api2/json/config/datastore", b'{"name": "s2"}'))
                status, _, body = await c.response()
                assert status == 504
                assert "did not answer within 0.3 s" in json.loads(body)["message"]
                assert 0.3 <= time.monotonic() - started < 10  # its own timeout, not the 30 s default
                await c.send(get("/api2/json/ping"))  # the connection is still usable
                assert (await c.response())[0] == 200

    run(main())


def test_the_default_forward_timeout_is_30_s() -> None:
    assert api.FORWARD_TIMEOUT == 30.0
    assert worker_app("/nonexistent").forward_timeout == 30.0


# -- leases ---------------------------------------------------------------------------------------


@pytest.fixture
def registry(inst: Instance) -> Any:
    inst.add_stores("store1")
    reg = Registry(config_dir=inst.paths.config_dir, run_dir=inst.paths.run_dir, cache="on", ttl=60.0)
    try:
        yield reg
    finally:
        reg.close()


def lease(store: str = "store1", operation: str = "read") -> bytes:
    return post(f"/api2/json/admin/datastore/{store}/operation", json.dumps({"operation": operation}).encode())


def test_a_connection_holding_a_lease_is_not_closed_as_idle(tmp_path: Path, registry: Registry) -> None:
    async def main() -> None:
        app = WorkerApp(registry, "/nonexistent")
        router = app.router()
        async with serving(tmp_path, router, Limits(keepalive=0.2), on_connection_lost=app.connection_lost) as (
            server,
            path,
        ):
            holder, idle = await Raw.open(path), await Raw.open(path)
            await holder.send(lease())
            status, _, body = await holder.response()
            assert status == 200, body
            lease_id = json.loads(body)["data"]["lease"]
            await idle.send(get("/api2/json/ping"))
            await idle.response()
            await asyncio.sleep(2.3)  # the sweep runs once a second
            assert len(server.connections) == 1  # the idle one is gone, the holder is not
            assert registry.active_operations("store1")["read"] == 1
            await holder.send(
                f"DELETE /api2/json/admin/datastore/store1/operation?lease={lease_id} HTTP/1.1\r\n\r\n".encode()
            )
            assert json.loads((await holder.response())[2])["data"] == {"released": 1}
            await asyncio.sleep(2.3)  # released: idle again, closed
            assert not server.connections

    run(main())


def test_leases_per_connection_are_capped_with_429(tmp_path: Path, registry: Registry) -> None:
    async def main() -> None:
        app = WorkerApp(registry, "/nonexistent")
        async with serving(tmp_path, app.router(), on_connection_lost=app.connection_lost) as (_, path):
            c = await Raw.open(path)
            await c.send(lease() * MAX_LEASES_PER_CONNECTION)
            for _ in range(MAX_LEASES_PER_CONNECTION):
                assert (await c.response())[0] == 200
            await c.send(lease())
            status, _, body = await c.response()
            assert status == 429
            assert f"at most {MAX_LEASES_PER_CONNECTION}" in json.loads(body)["message"]
            assert registry.active_operations("store1")["read"] == MAX_LEASES_PER_CONNECTION
            other = await Raw.open(path)  # the cap is per connection
            await other.send(lease())
            assert (await other.response())[0] == 200
            await c.send(
                b"DELETE /api2/json/admin/datastore/store1/operation?lease=" + b"9" * 5000 + b" HTTP/1.1\r\n\r\n"
            )
            assert (await c.response())[0] == 404
            c.close()
            other.close()
            for _ in range(100):
                await asyncio.sleep(0.01)
                if registry.active_operations("store1")["read"] == 0:
                    break
            assert registry.active_operations("store1")["read"] == 0

    run(main())


def test_an_http_error_from_a_handler_keeps_the_connection(tmp_path: Path) -> None:
    def refuse(req: Request) -> Reply:
        raise HTTPError(418, "no")

    r = Router()
    r.add("GET", "/refuse", refuse)
    r.add("GET", "/ping", lambda req: data_reply(1))

    async def main() -> None:
        async with serving(tmp_path, r) as (_, path):
            c = await Raw.open(path)
            await c.send(get("/refuse") + get("/ping"))
            assert (await c.response())[0] == 418
            assert (await c.response())[0] == 200

    run(main())
