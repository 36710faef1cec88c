"""Clients of the dsproxy sockets (``proxy.sock``, ``manager.sock``).

* :class:`Client` -- synchronous, on :mod:`http.client` with a Unix-socket connection; what the
  command line uses.  One keep-alive connection, reconnected when the server closed it.
* :class:`AsyncConnection` -- one keep-alive connection for asyncio code: the proxy workers forward
  config writes to the manager with it, and the benchmark and stress load generators drive the
  proxy with many of them.  An ``asyncio.Protocol`` with ``httptools``' response parser: the load
  generator must cost far less than the server it measures (scripts/bench-status reports its CPU).

Every request answers :class:`Response`; :meth:`Response.json` decodes the body, and
:class:`ApiError` carries the server's ``message`` for non-2xx answers (``raise_for_status``).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import time
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import quote, urlencode

import httptools

from .daemon.protocol import GENERATION_HEADER

if TYPE_CHECKING:
    import ssl
    import subprocess

#: how long the command line retries a refused / queue-full connect before it gives up
CLI_CONNECT_RETRY = 2.0


class ApiError(Exception):
    """A non-2xx answer; ``str(err)`` is the server's message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Response(NamedTuple):
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None

    def raise_for_status(self) -> Response:
        if not 200 <= self.status < 300:
            try:
                message = str(self.json().get("message", ""))
            except (ValueError, AttributeError):
                message = self.body[:200].decode("utf-8", "replace")
            raise ApiError(self.status, message or f"HTTP {self.status}")
        return self

    @property
    def data(self) -> Any:
        return self.raise_for_status().json()["data"]

    @property
    def generation(self) -> int | None:
        value = self.headers.get(GENERATION_HEADER)
        return int(value) if value else None


def path_for(*parts: str, query: dict[str, Any] | None = None) -> str:
    """``/api2/json/<parts...>`` with each part percent-quoted and an optional query."""
    path = "/api2/json/" + "/".join(quote(p, safe="") for p in parts)
    if query:
        path += "?" + urlencode({k: v for k, v in query.items() if v is not None})
    return path


#: errors of a connect that a moment later may succeed: nobody listening yet (a restart) and a full
#: listen queue (a burst of connects; a socket with a timeout gets EAGAIN instead of waiting)
_RETRY_CONNECT = (ConnectionRefusedError, BlockingIOError, InterruptedError)


def connect_unix(socket_path: str, timeout: float | None, retry: float = 0.0) -> socket.socket:
    """A connected ``AF_UNIX`` stream socket; a refused or ``EAGAIN`` connect is retried for up
    to ``retry`` seconds (backing off from 5 ms to 200 ms), then its error is raised."""
    deadline = time.monotonic() + retry
    delay = 0.005
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(socket_path)
        except _RETRY_CONNECT:
            sock.close()
            left = deadline - time.monotonic()
            if left <= 0:
                raise
        except OSError:
            sock.close()
            raise
        else:
            return sock
        time.sleep(min(delay, left))
        delay = min(delay * 2, 0.2)


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, socket_path: str, timeout: float, connect_retry: float = 0.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = socket_path
        self.connect_retry = connect_retry

    def connect(self) -> None:
        self.sock = connect_unix(self.socket_path, self.timeout, self.connect_retry)


class Client:
    """Synchronous client of one dsproxy socket.

    ``connect_retry``: seconds to keep retrying a connect that is refused or finds the listen
    queue full (the command line uses :data:`CLI_CONNECT_RETRY`); 0 fails at once.
    """

    def __init__(
        self,
        socket_path: str,
        timeout: float = 60.0,
        headers: dict[str, str] | None = None,
        connect_retry: float = 0.0,
    ) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self.connect_retry = connect_retry
        self.headers = dict(headers or {})
        self._conn: _UnixHTTPConnection | None = None

    def request(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> Response:
        payload = None if body is None else json.dumps(body).encode()
        hdrs = {**self.headers, **(headers or {})}
        if payload is not None:
            hdrs["content-type"] = "application/json"
        for attempt in (0, 1):
            conn = self._conn or _UnixHTTPConnection(self.socket_path, self.timeout, self.connect_retry)
            self._conn = conn
            try:
                conn.request(method, path, body=payload, headers=hdrs)
                resp = conn.getresponse()
                data = resp.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                # a keep-alive connection the server closed meanwhile: retry once, fresh
                self.close()
                if attempt or method not in ("GET", "HEAD"):
                    raise
                continue
            except BaseException:
                self.close()
                raise
            if resp.will_close:
                self.close()
            return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
        raise AssertionError("unreachable")

    def get(self, path: str) -> Response:
        return self.request("GET", path)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_for_daemon(socket_path: str, timeout: float, proc: subprocess.Popen[Any] | None = None) -> bool:
    """Poll until the daemon on ``socket_path`` answers ``GET /api2/json/ping``.

    False when ``timeout`` seconds pass first, or as soon as ``proc`` (the daemon, if the caller
    started it) has exited -- ``proc.poll()`` then tells which.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with Client(socket_path, timeout=2.0) as c:
                if c.get("/api2/json/ping").status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.05)
    return False


class AsyncConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection to a Unix socket (or over TLS), one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[Response] | None = None
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._closed: asyncio.Future[None] | None = None
        self.keep_alive = True

    @classmethod
    async def open(cls, socket_path: str) -> AsyncConnection:
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_unix_connection(cls, socket_path)
        return protocol

    @classmethod
    async def open_tls(cls, host: str, port: int, context: ssl.SSLContext) -> AsyncConnection:
        """A connection over TLS to ``host:port`` (the proxy's ``--listen``), verified by ``context``."""
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_connection(cls, host, port, ssl=context)
        return protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not subclasses

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(ConnectionResetError("the server closed the connection"))

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as err:
            if self._waiter is not None and not self._waiter.done():
                self._waiter.set_exception(ConnectionError(f"malformed response: {err}"))
            if self.transport is not None:
                self.transport.close()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        response = Response(self._parser.get_status_code(), self._headers, b"".join(self._body))
        self.keep_alive = self._parser.should_keep_alive()
        self._headers, self._body = {}, []
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(response)
        if not self.keep_alive and self.transport is not None:
            self.transport.close()

    @property
    def usable(self) -> bool:
        return self.transport is not None and self.keep_alive and not self.transport.is_closing()

    async def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> Response:
        """Send one request and wait for its answer; a ``body`` is JSON unless ``headers`` name
        another ``content-type`` (a forwarded form body keeps its own)."""
        if self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("the connection is closed")
        head = [f"{method} {path} HTTP/1.1\r\nhost: localhost\r\n"]
        for key, value in (headers or {}).items():
            head.append(f"{key}: {value}\r\n")
        if body is not None:
            if not any(key.lower() == "content-type" for key in headers or ()):
                head.append("content-type: application/json\r\n")
            head.append(f"content-length: {len(body)}\r\n")
        head.append("\r\n")
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write("".join(head).encode() + (body or b""))
        return await self._waiter

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None
