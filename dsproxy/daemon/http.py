"""HTTP/1.1 over a Unix socket: an asyncio protocol around ``httptools``' parser.

Both daemons serve JSON with this module: the proxy workers (DESIGN §6) and the manager.

**Why this stack** -- measured side by side in one run on the project machine (2 cores) with
``scripts/bench-http-stack``: one server process each, 16 keep-alive connections from the same
load generator, 5 rounds of 20,000 ``GET /api2/json/ping``, same JSON body::

    server                                               req/s    server CPU per request
    this module (httptools parser, asyncio protocol,     58,252   17.2 us
      uvloop)
    uvicorn 0.54 (httptools + uvloop, raw ASGI app,      41,861   24.0 us
      no access log)

uvicorn runs the same parser and event loop, but every request also goes through the ASGI
scope/receive/send machinery (dict building, two awaits): 7 us per request, seven times the warm
lookup+release it exists to serve.  The parser is not hand written: ``httptools`` wraps llhttp,
the parser of Node.js.  Responses are assembled here (status line, two headers, body).

What the protocol guarantees (DESIGN §10: bad input gets a 4xx, the worker stays up):

* malformed requests -> ``400`` and the connection is closed; the parser's reason is in the message;
* request target longer than :attr:`Limits.max_url` -> ``414``; more header bytes than
  :attr:`Limits.max_header_bytes` or more than :attr:`Limits.max_headers` fields -> ``431``;
  a body larger than :attr:`Limits.max_body` -> ``413`` (checked against ``Content-Length`` before
  reading it, and while reading a chunked one);
* slow clients: a request must be complete :attr:`Limits.request_timeout` seconds after its first
  byte (``408``, closed); an idle keep-alive connection is closed after :attr:`Limits.keepalive`
  seconds.  One sweeper per server checks every connection once a second, so the per-request cost
  of the timeouts is one clock read;
* pipelined requests are answered in order; while an asynchronous handler runs, reading pauses;
* a handler that raises anything but :class:`HTTPError` is logged and answered ``500``.

A handler gets a :class:`Request` and returns a :class:`Reply` (or an awaitable of one).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import json
import logging
import os
import socket
import stat
import struct
import time
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any, NamedTuple, NoReturn
from urllib.parse import parse_qsl, unquote

import httptools

log = logging.getLogger("dsproxy.http")


class Limits(NamedTuple):
    max_url: int = 8192
    max_header_bytes: int = 16384
    max_headers: int = 100
    max_body: int = 1 << 20
    request_timeout: float = 10.0
    keepalive: float = 75.0


DEFAULT_LIMITS = Limits()
ACCEPT_DELAY = 0.0002
ACCEPT_DELAY_MAX = 0.002


class HTTPError(Exception):
    """Answer ``status`` with ``{"message": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Reply(NamedTuple):
    status: int
    body: bytes
    content_type: bytes = b"application/json"
    headers: tuple[tuple[bytes, bytes], ...] = ()


def json_reply(status: int, payload: Any, headers: tuple[tuple[bytes, bytes], ...] = ()) -> Reply:
    return Reply(status, json.dumps(payload, separators=(",", ":")).encode(), b"application/json", headers)


def data_reply(data: Any, *, digest: str | None = None, headers: tuple[tuple[bytes, bytes], ...] = ()) -> Reply:
    payload: dict[str, Any] = {"data": data}
    if digest is not None:
        payload["digest"] = digest
    return json_reply(200, payload, headers)


def error_reply(status: int, message: str) -> Reply:
    return json_reply(status, {"message": message})


class PeerCredentials(NamedTuple):
    pid: int
    uid: int
    gid: int


_UCRED = struct.Struct("3i")


def peer_credentials(sock: socket.socket | None) -> PeerCredentials | None:
    """``SO_PEERCRED`` of a Unix socket connection (None if unavailable)."""
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError:
        return None
    return PeerCredentials(*_UCRED.unpack(raw))


class Request:
    """One parsed request.  ``path`` is the raw path (no query); use :meth:`segments`."""

    __slots__ = ("body", "connection", "finish", "headers", "keep_alive", "method", "params", "path", "query_string")

    def __init__(self, connection: Connection, method: str, path: str, query_string: str, headers: dict[str, str]):
        self.connection = connection
        self.method = method
        self.path = path
        self.query_string = query_string
        self.headers = headers
        self.body = b""
        self.params: dict[str, str] = {}
        self.keep_alive = True
        self.finish: Handler | None = None  # a streamed request's end handler

    def query(self) -> dict[str, str]:
        """The query parameters (last one wins); ``400`` for a malformed query string."""
        if not self.query_string:
            return {}
        try:
            return dict(parse_qsl(self.query_string, keep_blank_values=True, strict_parsing=True))
        except ValueError:
            raise HTTPError(400, f"malformed query string '{self.query_string[:100]}'") from None

    def json(self) -> dict[str, Any]:
        """The body as a JSON object (an empty body is ``{}``); ``400`` otherwise."""
        if not self.body.strip():
            return {}
        ctype = self.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if ctype == "application/x-www-form-urlencoded":
            try:
                return dict(parse_qsl(self.body.decode(), keep_blank_values=True, strict_parsing=True))
            except (ValueError, UnicodeDecodeError):
                raise HTTPError(400, "malformed form body") from None
        try:
            value = json.loads(self.body)
        except (ValueError, UnicodeDecodeError) as err:
            raise HTTPError(400, f"request body is not valid JSON: {err}") from None
        if not isinstance(value, dict):
            raise HTTPError(400, "request body must be a JSON object")
        return value

    @property
    def peer(self) -> PeerCredentials | None:
        return self.connection.peer


Handler = Callable[[Request], "Reply | Awaitable[Reply]"]


class StreamRoute(NamedTuple):
    start: Callable[[Request], None]
    finish: Handler


class Router:
    """Routes ``METHOD /path/{param}/...`` to handlers.  Static paths are one dict lookup."""

    def __init__(self) -> None:
        self._static: dict[str, dict[str, Handler]] = {}
        self._dynamic: list[tuple[tuple[str, ...], dict[str, Handler]]] = []
        self.streams: dict[tuple[str, str], StreamRoute] = {}

    def add_stream(self, method: str, pattern: str, start: Callable[[Request], None], finish: Handler) -> None:
        """A route for requests with a chunked body: ``start`` runs when the headers are in (raise
        :class:`HTTPError` to refuse), ``finish`` when the body ends and answers.  The route must
        also be :meth:`add`-ed for requests that arrive whole."""
        self.streams[(method, pattern)] = StreamRoute(start, finish)
        self._stream_patterns = {(m, tuple(p.strip("/").split("/"))): r for (m, p), r in self.streams.items()}

    def resolve_stream(self, request: Request) -> StreamRoute | None:
        segments = request.path.strip("/").split("/")
        for (method, parts), route in self._stream_patterns.items():
            if method == request.method and (params := _match(parts, segments)) is not None:
                request.params = params
                return route
        return None

    def add(self, method: str, pattern: str, handler: Handler) -> None:
        parts = tuple(pattern.strip("/").split("/"))
        if any(p.startswith("{") for p in parts):
            for known, methods in self._dynamic:
                if known == parts:
                    methods[method] = handler
                    return
            self._dynamic.append((parts, {method: handler}))
        else:
            self._static.setdefault(pattern, {})[method] = handler

    def resolve(self, request: Request) -> Handler:
        methods = self._static.get(request.path)
        if methods is None:
            methods = self._match_dynamic(request)
        handler = methods.get(request.method)
        if handler is None:
            if request.method == "HEAD" and "GET" in methods:
                return methods["GET"]
            raise HTTPError(405, f"method {request.method} not allowed on {request.path}")
        return handler

    def _match_dynamic(self, request: Request) -> dict[str, Handler]:
        segments = request.path.strip("/").split("/")
        for parts, methods in self._dynamic:
            if (params := _match(parts, segments)) is not None:
                request.params = params
                return methods
        raise HTTPError(404, f"no such route: {request.path[:200]}")


def _match(parts: tuple[str, ...], segments: list[str]) -> dict[str, str] | None:
    """The ``{param}`` values if the path ``segments`` fit the pattern ``parts``, else None."""
    if len(parts) != len(segments):
        return None
    params = {}
    for part, seg in zip(parts, segments, strict=True):
        if part.startswith("{"):
            params[part[1:-1]] = _decode_segment(seg)
        elif part != seg:
            return None
    return params


def _decode_segment(seg: str) -> str:
    value = unquote(seg, errors="strict") if "%" in seg else seg
    if not value or "/" in value or "\x00" in value or value in (".", ".."):
        raise HTTPError(400, f"invalid path component '{seg[:100]}'")
    return value


_STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in HTTPStatus}


def encode_reply(reply: Reply, keep_alive: bool, head: bool = False, extra: bytes = b"") -> bytes:
    """The response bytes; ``extra`` is raw header lines (``name: value\\r\\n``) to add."""
    out = [
        _STATUS_LINES.get(reply.status) or f"HTTP/1.1 {reply.status} Unknown\r\n".encode(),
        b"content-type: ",
        reply.content_type,
        b"\r\ncontent-length: ",
        str(len(reply.body)).encode(),
        b"\r\n",
        extra,
    ]
    for name, value in reply.headers:
        out += (name, b": ", value, b"\r\n")
    if not keep_alive:
        out.append(b"connection: close\r\n")
    out.append(b"\r\n")
    if not head:
        out.append(reply.body)
    return b"".join(out)


class Server:
    """The set of connections of one listening socket, with the sweeper that times them out."""

    def __init__(
        self,
        router: Router,
        limits: Limits = DEFAULT_LIMITS,
        on_connection_lost: Callable[[Connection], None] | None = None,
        extra_headers: Callable[[], bytes] | None = None,
    ) -> None:
        self.router = router
        self.limits = limits
        self.on_connection_lost = on_connection_lost
        self.extra_headers = extra_headers
        self.connections: set[Connection] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._aserver: asyncio.AbstractServer | None = None
        self._accepter: asyncio.Future[None] | None = None
        self.draining = False

    def protocol(self) -> Connection:
        return Connection(self)

    async def serve(self, sock: socket.socket, balance: bool = False) -> None:
        """Start accepting on the bound, listening ``sock``.

        With ``balance`` (pre-forked workers sharing one socket) connections are accepted one per
        wake-up, and a worker that already holds connections waits a little before its next
        accept (``ACCEPT_DELAY`` per connection, at most ``ACCEPT_DELAY_MAX``): an idle sibling
        then wins the race.  Without it, the first worker to wake takes a whole burst of
        keep-alive connections (seen here: 85 % of the load on one of two workers).
        """
        self._loop = asyncio.get_running_loop()
        if balance:
            self._accepter = asyncio.ensure_future(self._accept_loop(sock))
        else:
            self._aserver = await self._loop.create_unix_server(self.protocol, sock=sock, backlog=1024)
        self._sweeper = self._loop.call_later(1.0, self._sweep)

    async def _accept_loop(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while not self.draining:
            try:
                conn, _ = await loop.sock_accept(sock)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as err:  # EMFILE and friends: back off instead of spinning
                log.error("accept failed: %s", err)
                await asyncio.sleep(0.1)
                continue
            try:
                await loop.connect_accepted_socket(self.protocol, conn)
            except OSError as err:
                log.warning("dropping an accepted connection: %s", err)
                conn.close()
                continue
            if self.connections:
                await asyncio.sleep(min(ACCEPT_DELAY * len(self.connections), ACCEPT_DELAY_MAX))

    def _sweep(self) -> None:
        now = time.monotonic()
        limits = self.limits
        for conn in list(self.connections):
            conn.check_timeouts(now, limits)
        assert self._loop is not None
        self._sweeper = self._loop.call_later(1.0, self._sweep)

    async def drain(self, timeout: float) -> None:
        """Stop accepting, let in-flight requests finish, close idle connections; then close all."""
        self.draining = True
        if self._aserver is not None:
            self._aserver.close()
        if self._accepter is not None:
            self._accepter.cancel()
        deadline = time.monotonic() + timeout
        while True:
            for conn in list(self.connections):
                if conn.idle:
                    conn.close()
            if not self.connections or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.close()
        if self._sweeper is not None:
            self._sweeper.cancel()


class Connection(asyncio.Protocol):
    """One client connection.  httptools calls the ``on_*`` methods from :meth:`data_received`."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.limits = server.limits
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.peer: PeerCredentials | None = None
        self.state: dict[str, Any] = {}  # per-connection state of the application (leases)
        self._url = b""
        self._headers: dict[str, str] = {}
        self._header_bytes = 0
        self._header_name = b""
        self._body: list[bytes] = []
        self._body_size = 0
        self._pending: collections.deque[Request] = collections.deque()
        self._busy = False
        self._closing = False
        self._in_request = False
        self._callback_error: HTTPError | None = None
        self._stream: Request | None = None
        self._since = time.monotonic()

    # -- asyncio.Protocol ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not subclasses
        self.peer = peer_credentials(transport.get_extra_info("socket"))
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self.server.connections.discard(self)
        if self.server.on_connection_lost is not None:
            try:
                self.server.on_connection_lost(self)
            except Exception:
                log.exception("cleaning up a closed connection failed")

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        try:
            self.parser.feed_data(data)
        except HTTPError as err:
            self._fail(err.status, err.message)
        except httptools.HttpParserCallbackError:
            # httptools wraps what our callbacks raise; the HTTPError itself was kept aside
            kept = self._callback_error or HTTPError(400, "malformed HTTP request")
            self._fail(kept.status, kept.message)
        except httptools.HttpParserUpgrade:
            self._fail(400, "protocol upgrades are not supported")
        except httptools.HttpParserError as err:
            self._fail(400, f"malformed HTTP request: {err}")

    def eof_received(self) -> bool | None:
        # a half-closed client still gets the answers to what it sent
        return bool(self._busy or self._pending)

    # -- httptools callbacks ------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._in_request = True
        self._since = time.monotonic()
        self._url = b""
        self._headers = {}
        self._header_bytes = 0
        self._body = []
        self._body_size = 0

    def _reject(self, status: int, message: str) -> NoReturn:
        self._callback_error = HTTPError(status, message)
        raise self._callback_error

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self.limits.max_url:
            self._reject(414, f"request target longer than {self.limits.max_url} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > self.limits.max_header_bytes:
            self._reject(431, f"request headers larger than {self.limits.max_header_bytes} bytes")
        if len(self._headers) >= self.limits.max_headers:
            self._reject(431, f"more than {self.limits.max_headers} request headers")
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        self._headers[key] = self._headers[key] + ", " + text if key in self._headers else text

    def on_headers_complete(self) -> None:
        length = self._headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.limits.max_body:
            self._reject(413, f"request body larger than {self.limits.max_body} bytes")
        self._stream = None
        if "chunked" in self._headers.get("transfer-encoding", "") and self.server.router.streams:
            request = self._make_request()
            try:
                route = self.server.router.resolve_stream(request)
            except HTTPError as err:
                self._reject(err.status, err.message)
            if route is not None:
                if self._busy or self._pending:
                    self._reject(400, "a streamed request cannot be pipelined behind another one")
                try:
                    route.start(request)  # e.g. takes the lease; held while the body streams
                except HTTPError as err:
                    self._reject(err.status, err.message)
                request.finish = route.finish
                self._stream = request

    def on_body(self, body: bytes) -> None:
        if self._stream is not None:
            self._since = time.monotonic()  # the stream is the point: its content is not kept
            return
        self._body_size += len(body)
        if self._body_size > self.limits.max_body:
            self._reject(413, f"request body larger than {self.limits.max_body} bytes")
        self._body.append(body)

    def _make_request(self) -> Request:
        method = self.parser.get_method().decode("ascii", "replace")
        try:
            url = httptools.parse_url(self._url)
            path = url.path.decode("utf-8")
        except (httptools.HttpParserInvalidURLError, UnicodeDecodeError):
            self._reject(400, "malformed request target")
        query = url.query.decode("utf-8", "replace") if url.query else ""
        return Request(self, method, path, query, self._headers)

    def on_message_complete(self) -> None:
        self._in_request = False
        request = self._stream or self._make_request()
        self._stream = None
        request.body = b"".join(self._body)
        request.keep_alive = self.parser.should_keep_alive()
        self._pending.append(request)
        if not self._busy:
            self._dispatch()

    # -- dispatch -----------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        while self._pending and not self._busy and not self._closing:
            request = self._pending.popleft()
            try:
                handler = request.finish or self.server.router.resolve(request)
                reply = handler(request)
            except HTTPError as err:
                reply = error_reply(err.status, err.message)
            except Exception as err:
                reply = self._internal_error(request, err)
            if isinstance(reply, Reply):
                self._respond(request, reply)
            else:
                self._busy = True
                if self.transport is not None:
                    self.transport.pause_reading()
                task = asyncio.ensure_future(reply)
                task.add_done_callback(lambda t, r=request: self._finished(r, t))  # type: ignore[misc]

    def _finished(self, request: Request, task: asyncio.Future[Reply]) -> None:
        self._busy = False
        if task.cancelled():
            reply = error_reply(503, "request cancelled: the server is shutting down")
        else:
            err = task.exception()
            if err is None:
                reply = task.result()
            elif isinstance(err, HTTPError):
                reply = error_reply(err.status, err.message)
            else:
                reply = self._internal_error(request, err)
        self._respond(request, reply)
        if not self._closing and self.transport is not None:
            self.transport.resume_reading()
            self._dispatch()

    def _internal_error(self, request: Request, err: BaseException) -> Reply:
        log.error("%s %s failed", request.method, request.path[:200], exc_info=err)
        return error_reply(500, f"internal error: {type(err).__name__}: {err}")

    def _respond(self, request: Request, reply: Reply) -> None:
        if self._closing or self.transport is None:
            return
        extra = b"" if self.server.extra_headers is None else self.server.extra_headers()
        keep_alive = request.keep_alive and not self.server.draining
        self.transport.write(encode_reply(reply, keep_alive, request.method == "HEAD", extra))
        self._since = time.monotonic()
        if not keep_alive:
            self.close()

    def _fail(self, status: int, message: str) -> None:
        """Answer a protocol-level error and close (the stream cannot be trusted any more)."""
        if self.transport is not None and not self._closing:
            self.transport.write(encode_reply(error_reply(status, message), keep_alive=False))
        self.close()

    # -- state --------------------------------------------------------------------------------------

    @property
    def idle(self) -> bool:
        return not (self._busy or self._pending or self._in_request)

    def check_timeouts(self, now: float, limits: Limits) -> None:
        if self._stream is not None:
            return  # a streamed request lasts as long as its client wants (a lease)
        if self._in_request:
            if now - self._since > limits.request_timeout:
                self._fail(408, f"request not complete after {limits.request_timeout:g} s")
        elif not self._busy and not self._pending and now - self._since > limits.keepalive:
            self.close()

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self.transport is not None:
            with contextlib.suppress(Exception):
                self.transport.close()


def bind_unix_socket(path: str, mode: int = 0o660, backlog: int = 1024) -> socket.socket:
    """Bind and listen on ``path`` with ``mode``; a stale socket file (nobody listening) is replaced.

    Raises ``OSError(EADDRINUSE)`` if a live server already listens there, and ``OSError(EEXIST)``
    if something that is not a socket is in the way (it is never removed).
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket; not touching it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except FileNotFoundError:
        pass
    except OSError:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a socket nobody listens on: left behind by a dead server
    else:
        raise OSError(errno.EADDRINUSE, f"{path}: another server is listening there")
    finally:
        probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o777 & ~mode)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    os.chmod(path, mode)
    sock.listen(backlog)
    sock.setblocking(False)
    return sock
