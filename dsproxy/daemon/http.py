"""HTTP/1.1 over a Unix socket, and over TLS on TCP: an asyncio protocol around ``httptools``' parser.

Both daemons serve JSON with this module: the proxy workers (docs/design.md §6) and the manager.
The proxy's workers also serve it over HTTPS on the master's TCP listeners (``--listen``, see
"TCP and TLS" below); the manager only ever listens on its Unix socket.

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

What the protocol guarantees (docs/design.md §10: bad input gets a 4xx, the worker stays up, and no client
can make it hold much memory):

* malformed requests -> ``400`` and the connection is closed; the parser's reason is in the message;
* request target longer than :attr:`Limits.max_url` (8 KiB) -> ``414``; more than
  :attr:`Limits.max_header_bytes` (16 KiB) of request line and headers, or more than
  :attr:`Limits.max_headers` (100) fields -> ``431``, closed.  The header cap holds *while the
  bytes arrive*: a read is fed to the parser in pieces of at most the cap, and a head is refused
  as soon as the bytes counted for it pass the cap (the parser never holds more than twice the
  cap; a 64 MB header value without CRLF used to be buffered until the request timeout: 8 of
  them took a worker to 447 MB);
* a body larger than :attr:`Limits.max_body` (1 MiB) -> ``413``: checked against
  ``Content-Length`` before reading it, and chunk by chunk while reading a chunked one;
* write flow control: when the transport's write buffer passes :attr:`Limits.write_high`
  (64 KiB) the connection stops reading and parsing -- a client pipelining requests without
  reading the answers finds its own sends blocked -- and resumes below :attr:`Limits.write_low`
  (16 KiB).  Parsing also stops while an asynchronous handler runs: at most one piece of
  pipelined requests (16 KiB) waits parsed, the rest of a read waits as bytes;
* slow clients: a request must be complete :attr:`Limits.request_timeout` seconds after its first
  byte (``408``, closed); an idle keep-alive connection -- or one whose client does not read its
  answers -- is closed after :attr:`Limits.keepalive` (75 s).  A connection the application
  *pins* (:attr:`Connection.pinned`: it holds operation leases) is never closed as idle.  One
  sweeper per server checks every connection once a second, so the per-request cost of the
  timeouts is one clock read;
* pipelined requests are answered in order;
* JSON bodies (:func:`parse_json_object`): an object, nested at most :attr:`Limits.max_json_depth`
  (32) levels (checked before ``json.loads`` recurses), integers of at most 4300 digits, strings
  that are valid Unicode (no lone surrogate) -- else ``400`` naming the problem; form bodies
  (``application/x-www-form-urlencoded``, curl's ``-d``) are accepted as PBS does;
* a path segment with an invalid percent escape (``%zz``), one that is not UTF-8 decoded
  (``%ff``) or decodes to a control character (``%00``) -> ``400``;
* a handler that raises anything but :class:`HTTPError` is logged and answered ``500``;
* accepting (:meth:`Server.serve`): the listen queue is the kernel's ``somaxconn``; pre-forked
  workers balance a burst of keep-alive connections, and accept in batches when the queue stays
  deep (a connect flood: ~13,000 accepts/s for two workers instead of ~1,000).

Limits the proxy's API adds (:mod:`dsproxy.daemon.api`): at most ``MAX_LEASES_PER_CONNECTION``
(64) operation leases per connection (``429`` beyond), and a forwarded config write that the
manager has not answered after ``FORWARD_TIMEOUT`` (30 s, ``dsproxy proxy --forward-timeout``)
is answered ``504``.

**TCP and TLS** (:meth:`Server.serve` with an ``ssl`` context): the same protocol, under the event
loop's TLS transport, so every limit above holds on TLS connections too (the header cap counts
decrypted bytes).  A request on TCP has :attr:`Request.remote` (the client's address) and no
:attr:`Request.peer`; on the Unix socket it is the other way round.  Before a TCP request's
handler runs -- and before a streamed request's ``start`` -- the server's ``authenticate_remote``
callable must accept it (raise :class:`HTTPError` to refuse); a server will not serve TCP without
one.  The TLS handshake runs in a task of its own (the accept loop never waits for a client) and
must finish within :attr:`Limits.request_timeout`, or the connection is dropped: a client that
connects and never says hello holds a socket for at most that long.  Measured with
``scripts/bench-status --tls --stores 200 --rounds 3 --modes on --workers 2`` (16 keep-alive
connections, one load-generator process): HTTPS ping floor 15,600 req/s, the Unix socket's on the
same server 58,500 req/s (0.27): the TLS records (uvloop's ``SSLProtocol`` over a memory BIO) cost
more per request than everything else the worker does for a ping.

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
import re
import socket
import stat
import struct
import time
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Final, NamedTuple, NoReturn
from urllib.parse import parse_qsl, unquote

import httptools

if TYPE_CHECKING:
    import ssl

log = logging.getLogger("dsproxy.http")


class Limits(NamedTuple):
    """Per-connection limits; the module docstring says what each one does."""

    max_url: int = 8192
    max_header_bytes: int = 16384
    max_headers: int = 100
    max_body: int = 1 << 20
    request_timeout: float = 10.0
    keepalive: float = 75.0
    write_high: int = 64 * 1024
    write_low: int = 16 * 1024
    max_json_depth: int = 32


DEFAULT_LIMITS = Limits()
ACCEPT_DELAY = 0.0002
ACCEPT_DELAY_MAX = 0.002
ACCEPT_DEEP = 128
ACCEPT_BATCH_MAX = 64
#: seconds a draining server still waits for the first request of a connection it has accepted
DRAIN_FRESH_GRACE = 1.0
_SOMAXCONN = "/proc/sys/net/core/somaxconn"


def listen_backlog() -> int:
    """The kernel's ``somaxconn`` (what ``listen()`` is capped at anyway); 4096 if unreadable."""
    try:
        with open(_SOMAXCONN, "rb") as f:
            return max(128, int(f.read().strip() or 0))
    except (OSError, ValueError):
        return 4096


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

    __slots__ = (
        "auth",
        "body",
        "connection",
        "finish",
        "headers",
        "keep_alive",
        "method",
        "params",
        "path",
        "query_string",
        "remote",
    )

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
        self.remote: tuple[str, int] | None = None  # the client's address on TCP; None on the Unix socket
        self.auth: Any = None  # set by the application: the token id, or why authentication failed

    def query(self) -> dict[str, str]:
        """The query parameters (last one wins); ``400`` for a malformed query string."""
        if not self.query_string:
            return {}
        try:
            return dict(parse_qsl(self.query_string, keep_blank_values=True, strict_parsing=True, errors="strict"))
        except ValueError:  # UnicodeDecodeError included
            raise HTTPError(400, f"malformed query string '{self.query_string[:100]}'") from None

    def json(self) -> dict[str, Any]:
        """The body as a JSON object (an empty body is ``{}``); ``400`` otherwise."""
        if not self.body.strip():
            return {}
        ctype = self.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if ctype == "application/x-www-form-urlencoded":
            try:
                form = parse_qsl(self.body.decode(), keep_blank_values=True, strict_parsing=True, errors="strict")
            except ValueError:  # UnicodeDecodeError included
                raise HTTPError(400, "malformed form body (application/x-www-form-urlencoded)") from None
            return form_object(form)
        return parse_json_object(self.body, self.connection.limits.max_json_depth)

    @property
    def peer(self) -> PeerCredentials | None:
        """The client's ``SO_PEERCRED`` on the Unix socket; None on TCP."""
        return self.connection.peer


#: Form keys that are lists: repeated (``-d delete=a -d delete=b``) or comma-separated, as PBS takes them.
FORM_ARRAYS: Final = frozenset({"delete"})


def form_object(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """Form pairs -> the object a JSON body would give.  A repeated key is a list where the API takes
    one (:data:`FORM_ARRAYS`) and a ``400`` elsewhere: silently keeping the last value would lose
    part of an acknowledged write."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in FORM_ARRAYS:
            out.setdefault(key, []).extend(v.strip() for v in value.split(",") if v.strip())
        elif key in out:
            raise HTTPError(400, f"parameter '{key[:100]}' is given more than once")
        else:
            out[key] = value
    return out


_JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean"}
_JSON_TYPES[type(None)] = "null"
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_JSON_BRACKET = re.compile(rb"[\[\]{}]")


def json_depth(body: bytes) -> int:
    """The deepest nesting of arrays and objects in ``body`` (brackets inside strings ignored)."""
    depth = deepest = 0
    for bracket in _JSON_BRACKET.findall(_JSON_STRING.sub(b"", body)):
        if bracket in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def parse_json_object(body: bytes, max_depth: int) -> dict[str, Any]:
    """``body`` as a JSON object, or ``400`` naming what is wrong.

    Checked before or around :func:`json.loads`: nesting deeper than ``max_depth`` (counted
    without recursion, so ``'[' * 500000`` costs one regex pass, not a RecursionError), integers
    longer than Python's 4300 digits, and strings that are not valid Unicode (a lone surrogate
    such as ``"\\ud800"`` decodes, but cannot be written anywhere).
    """
    if body.count(b"[") + body.count(b"{") > max_depth and json_depth(body) > max_depth:
        raise HTTPError(400, f"request body is nested deeper than {max_depth} levels")
    try:
        value = json.loads(body)
    except RecursionError:
        raise HTTPError(400, f"request body is nested deeper than {max_depth} levels") from None
    except ValueError as err:  # UnicodeDecodeError included
        if "integer string conversion" in str(err):
            raise HTTPError(400, "request body has an integer of more than 4300 digits") from None
        raise HTTPError(400, f"request body is not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise HTTPError(400, f"request body must be a JSON object, not {_JSON_TYPES.get(type(value), 'a value')}")
    bad = _bad_string(value)
    if bad is not None:
        where = bad.encode("utf-8", "backslashreplace").decode() or "body"
        raise HTTPError(400, f"invalid string in '{where[:100]}': not valid Unicode (a lone surrogate)")
    return value


def _bad_string(value: Any) -> str | None:
    """The field (``a.b[2]``) of the first key or string in ``value`` that is not valid Unicode."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return ""
    elif isinstance(value, dict):
        for key, item in value.items():
            if (bad := _bad_string(key)) is not None or (bad := _bad_string(item)) is not None:
                return _field(key, bad)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if (bad := _bad_string(item)) is not None:
                return _field(f"[{i}]", bad)
    return None


def _field(outer: str, inner: str) -> str:
    return outer + ("" if not inner or inner.startswith("[") else ".") + inner


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


_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _decode_segment(seg: str) -> str:
    if "%" in seg:
        if _BAD_ESCAPE.search(seg):
            raise HTTPError(400, f"invalid percent escape in path component '{seg[:100]}'")
        try:
            value = unquote(seg, errors="strict")
        except UnicodeDecodeError:
            raise HTTPError(400, f"path component '{seg[:100]}' is not UTF-8 after percent-decoding") from None
        if _CONTROL.search(value):
            raise HTTPError(400, f"invalid path component '{seg[:100]}': control character")
    else:
        value = seg  # raw control bytes never get here: the parser refuses them
    if not value or "/" in value or value in (".", ".."):
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
        authenticate_remote: Callable[[Request], None] | None = None,
    ) -> None:
        self.router = router
        self.limits = limits
        self.on_connection_lost = on_connection_lost
        self.extra_headers = extra_headers
        self.authenticate_remote = authenticate_remote
        self.connections: set[Connection] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._aservers: list[asyncio.AbstractServer] = []
        self._accepters: list[asyncio.Future[None]] = []
        self._handshakes: set[asyncio.Future[None]] = set()
        self._wakers: set[asyncio.Future[None]] = set()  # what the accept loops wait on; the drain sets them
        self.draining = False

    def protocol(self) -> Connection:
        return Connection(self)

    def tcp_protocol(self) -> Connection:
        return Connection(self, tcp=True)

    async def serve(self, sock: socket.socket, balance: bool = False, ssl: ssl.SSLContext | None = None) -> None:
        """Start accepting on the bound, listening ``sock`` (Unix, or TCP with TLS from ``ssl``).

        With ``balance`` (pre-forked workers sharing one socket) a worker that already holds
        connections waits a little between accepts (``ACCEPT_DELAY`` per connection, at most
        ``ACCEPT_DELAY_MAX``): an idle sibling then wins the race.  Without it, the first worker
        to wake takes a whole burst of keep-alive connections (seen here: 85 % of the load on
        one of two workers).  When the listen queue stays deep -- ``ACCEPT_DEEP`` accepts in a
        row found a connection already waiting: a connect flood, not a client's pool -- the wait
        is per batch of ``ACCEPT_BATCH_MAX`` instead, so the flood is accepted as fast as it
        arrives (one connection per wait held two workers at ~1,000 accepts/s and filled the
        backlog; batched: ~18,000/s).

        A TCP socket must come with its TLS context, and the server with ``authenticate_remote``.
        """
        tcp = sock.family in (socket.AF_INET, socket.AF_INET6)
        if tcp and (ssl is None or self.authenticate_remote is None):
            raise ValueError("a TCP listener needs a TLS context and a server with authenticate_remote")
        self._loop = asyncio.get_running_loop()
        if balance:
            self._accepters.append(asyncio.ensure_future(self._accept_loop(sock, ssl if tcp else None)))
        elif tcp:
            aserver = await self._loop.create_server(
                self.tcp_protocol, sock=sock, ssl=ssl, ssl_handshake_timeout=self.limits.request_timeout,
                backlog=listen_backlog(),
            )  # fmt: skip
            self._aservers.append(aserver)
        else:
            aserver = await self._loop.create_unix_server(self.protocol, sock=sock, backlog=listen_backlog())
            self._aservers.append(aserver)
        if self._sweeper is None:
            self._sweeper = self._loop.call_later(1.0, self._sweep)

    async def _accept_loop(self, sock: socket.socket, tls: ssl.SSLContext | None = None) -> None:
        """Accept until the drain; never cancelled: the kernel's ``accept`` happens only here,
        synchronously, and what it returns is adopted -- a task cancelled between a completed
        accept and its adoption would drop the client's connection."""
        streak = 0  # accepts in a row that found a connection already waiting
        while not self.draining:
            batch = ACCEPT_BATCH_MAX if streak >= ACCEPT_DEEP else 1
            taken = 0
            try:
                while taken < batch:
                    conn, _ = sock.accept()
                    await self._adopt(conn, tls)
                    taken += 1
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as err:  # EMFILE and friends: back off instead of spinning
                log.error("accept failed: %s", err)
                await self._pause(0.1)
            if taken:
                streak += taken
            else:  # the queue is empty: wait for the next connection (or the drain)
                streak = 0
                await self._readable(sock)
            if self.connections and not self.draining:
                await asyncio.sleep(min(ACCEPT_DELAY * len(self.connections), ACCEPT_DELAY_MAX))

    async def _readable(self, sock: socket.socket) -> None:
        """Until ``sock`` is readable or the drain begins."""
        assert self._loop is not None
        waker: asyncio.Future[None] = self._loop.create_future()
        fd = sock.fileno()
        self._loop.add_reader(fd, _wake, waker)
        self._wakers.add(waker)
        try:
            await waker
        finally:
            self._loop.remove_reader(fd)
            self._wakers.discard(waker)

    async def _pause(self, seconds: float) -> None:
        """Sleep ``seconds``, or until the drain begins."""
        assert self._loop is not None
        waker: asyncio.Future[None] = self._loop.create_future()
        timer = self._loop.call_later(seconds, _wake, waker)
        self._wakers.add(waker)
        try:
            await waker
        finally:
            timer.cancel()
            self._wakers.discard(waker)

    async def _adopt(self, conn: socket.socket, tls: ssl.SSLContext | None) -> None:
        loop = self._loop
        assert loop is not None
        conn.setblocking(False)
        if tls is not None:  # the handshake waits for the client: never in the accept loop
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = asyncio.ensure_future(self._handshake(loop, conn, tls))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)
            return
        try:
            await loop.connect_accepted_socket(self.protocol, conn)
        except OSError as err:
            log.warning("dropping an accepted connection: %s", err)
            conn.close()

    async def _handshake(self, loop: asyncio.AbstractEventLoop, conn: socket.socket, tls: ssl.SSLContext) -> None:
        """TLS on an accepted TCP connection; a client that fails or stalls the handshake is dropped
        (at debug level: a port scanner or a client that does not trust us is not our error)."""
        try:
            await loop.connect_accepted_socket(
                self.tcp_protocol, conn, ssl=tls, ssl_handshake_timeout=self.limits.request_timeout
            )
        except (OSError, TimeoutError, ConnectionError) as err:  # ssl.SSLError is an OSError
            log.debug("TLS handshake failed: %s", err)
            conn.close()

    def _sweep(self) -> None:
        now = time.monotonic()
        limits = self.limits
        for conn in list(self.connections):
            conn.check_timeouts(now, limits)
        assert self._loop is not None
        self._sweeper = self._loop.call_later(1.0, self._sweep)

    async def drain(self, timeout: float) -> None:
        """Stop accepting, let in-flight requests finish, close idle connections; then close all.

        What was accepted is served: the accept loops stop at their next turn (they are woken,
        not cancelled), TLS handshakes under way get :data:`DRAIN_FRESH_GRACE` to finish, and a
        connection that has not sent its first request yet -- a client that connected just
        before the drain, its request on the way -- gets as long to send it (answered with
        ``connection: close``) before it is closed as idle.  Closing it at once
        was a failed request for each client that connected as a reload began (EPIPE, or a
        TLS handshake cut off).  A keep-alive connection that has been answered and is idle is
        closed at once: its client must expect that of any keep-alive connection.
        """
        self.draining = True
        for waker in list(self._wakers):
            _wake(waker)
        started = time.monotonic()
        deadline = started + timeout
        if self._accepters:
            await asyncio.wait(self._accepters, timeout=timeout)
        for aserver in self._aservers:
            aserver.close()
        while True:
            fresh_ok = time.monotonic() - started < DRAIN_FRESH_GRACE
            if not fresh_ok:  # a client that never says hello does not hold the drain either
                for task in list(self._handshakes):
                    task.cancel()
            for conn in list(self.connections):
                if conn.idle and not (fresh_ok and conn.fresh):
                    conn.close()
            if (not self.connections and not self._handshakes) or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.05)
        for task in (*self._accepters, *self._handshakes):
            task.cancel()
        for conn in list(self.connections):
            conn.close()
        if self._sweeper is not None:
            self._sweeper.cancel()


def _wake(waker: asyncio.Future[None]) -> None:
    if not waker.done():
        waker.set_result(None)


class Connection(asyncio.Protocol):
    """One client connection.  httptools calls the ``on_*`` methods from :meth:`data_received`.

    Reading is paused while the connection is *blocked*: an asynchronous handler runs, or the
    transport's write buffer is above :attr:`Limits.write_high` (the client does not read its
    answers).  Bytes already read stay unparsed (:attr:`_unparsed`) until it is unblocked, so at
    most one piece (:attr:`Limits.max_header_bytes`) of pipelined requests waits parsed.
    """

    def __init__(self, server: Server, tcp: bool = False) -> None:
        # per connection
        self.server = server
        self.limits = server.limits
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.tcp = tcp  # TLS on TCP (else the Unix socket)
        self.peer: PeerCredentials | None = None  # the Unix socket's client
        self.remote: tuple[str, int] | None = None  # the TCP client's address
        self.state: dict[str, Any] = {}  # per-connection state of the application (leases)
        self.pinned = False  # set by the application: never closed as idle (it holds leases)
        self._pending: collections.deque[Request] = collections.deque()
        self._busy = False  # an asynchronous handler runs
        self._write_paused = False  # the write buffer is above the high-water mark
        self._read_paused = False
        self._unparsed = b""  # read while blocked; parsed when unblocked
        self._closing = False
        self._callback_error: HTTPError | None = None
        self._since = time.monotonic()
        # per request
        self._in_request = False
        self._in_head = False  # request line and headers not complete yet
        self._head_bytes = 0  # bytes of the incomplete head seen so far (a lower bound)
        self._messages = 0
        self._url = b""
        self._headers: dict[str, str] = {}
        self._header_bytes = 0
        self._body: list[bytes] = []
        self._body_size = 0
        self._stream: Request | None = None

    # -- asyncio.Protocol ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not subclasses
        transport.set_write_buffer_limits(high=self.limits.write_high, low=self.limits.write_low)  # type: ignore[attr-defined]
        if self.tcp:
            address = transport.get_extra_info("peername") or ("", 0)
            self.remote = (str(address[0]), int(address[1]))
        else:
            self.peer = peer_credentials(transport.get_extra_info("socket"))
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._unparsed = b""
        self.server.connections.discard(self)
        if self.server.on_connection_lost is not None:
            try:
                self.server.on_connection_lost(self)
            except Exception:
                log.exception("cleaning up a closed connection failed")

    def pause_writing(self) -> None:
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._unblocked()

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        if self._unparsed:  # not expected while reading is paused; never reorder the stream
            data, self._unparsed = self._unparsed + data, b""
        try:
            if self._in_head or len(data) > self.limits.max_header_bytes or self._busy or self._write_paused:
                self._feed_pieces(data)
            else:  # the hot path: a whole small request (or a few) in one read
                self.parser.feed_data(data)  # a head left incomplete here has at most cap bytes
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

    def _feed_pieces(self, data: bytes) -> None:
        """Feed ``data`` in pieces of at most :attr:`Limits.max_header_bytes`, so that

        * the header cap holds while a head arrives: httptools joins the pieces of a header
          value it is given, and is never given more than the cap before we count (a 64 MB
          header without CRLF is refused after 16 KB, not buffered quadratically);
        * parsing stops as soon as the connection is blocked: the rest waits in ``_unparsed``.
        """
        cap = self.limits.max_header_bytes
        view = memoryview(data)
        start, end = 0, len(data)
        while start < end and not self._closing:
            if self._busy or self._write_paused:
                self._unparsed = bytes(view[start:])
                self._update_reading()
                return
            continued, begun = self._in_head, self._messages
            size = cap + 1 - self._head_bytes if continued else cap
            self.parser.feed_data(view[start : start + size])
            if self._in_head:
                if continued and self._messages == begun:
                    self._head_bytes += min(size, end - start)  # all of the piece was head
                else:  # a head began inside the piece: count what we know of it
                    self._head_bytes = len(self._url) + self._header_bytes
                if self._head_bytes > cap:
                    raise HTTPError(431, f"request headers larger than {cap} bytes")
            start += size

    def eof_received(self) -> bool | None:
        if self.tcp:
            return None  # TLS cannot stay half open (the transport would only warn)
        # a half-closed client still gets the answers to what it sent
        return bool(self._busy or self._pending or self._unparsed)

    # -- httptools callbacks ------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._in_request = True
        self._in_head = True
        self._messages += 1
        self._since = time.monotonic()
        self._url = b""
        self._headers = {}
        self._header_bytes = 0
        self._head_bytes = 0
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
        self._in_head = False
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
                    if self.tcp:
                        self._authenticate(request)
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
        request = Request(self, method, path, query, self._headers)
        request.remote = self.remote
        return request

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
        while self._pending and not self._busy and not self._write_paused and not self._closing:
            request = self._pending.popleft()
            try:
                if request.finish is not None:  # a stream's end: authenticated at its start
                    handler = request.finish
                else:
                    handler = self.server.router.resolve(request)
                    if self.tcp:
                        self._authenticate(request)
                reply = handler(request)
            except HTTPError as err:
                reply = error_reply(err.status, err.message)
            except Exception as err:
                reply = self._internal_error(request, err)
            if isinstance(reply, Reply):
                self._respond(request, reply)
            else:
                self._busy = True
                self._update_reading()
                task = asyncio.ensure_future(reply)
                task.add_done_callback(lambda t, r=request: self._finished(r, t))  # type: ignore[misc]

    def _authenticate(self, request: Request) -> None:
        """The one gate of TCP requests: the application's ``authenticate_remote`` (raises to refuse)."""
        check = self.server.authenticate_remote
        if check is None:  # serve() refuses TCP without one; never answer a remote client unchecked
            raise HTTPError(401, "authentication required")
        check(request)

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
        self._unblocked()

    def _unblocked(self) -> None:
        """Answer what waits, parse what was read meanwhile, and read again -- unless that
        blocked the connection once more."""
        if self._closing:
            return
        self._dispatch()
        if self._unparsed and not (self._busy or self._write_paused or self._pending):
            data, self._unparsed = self._unparsed, b""
            self.data_received(data)
        self._update_reading()

    def _update_reading(self) -> None:
        paused = self._busy or self._write_paused or bool(self._unparsed)
        if paused != self._read_paused and self.transport is not None and not self._closing:
            self._read_paused = paused
            if paused:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

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

    @property
    def fresh(self) -> bool:
        """Accepted, and no request begun on it yet."""
        return self._messages == 0

    def check_timeouts(self, now: float, limits: Limits) -> None:
        if self._stream is not None:
            return  # a streamed request lasts as long as its client wants (a lease)
        if self._write_paused or self._unparsed:
            # the client does not read its answers: it gets as long as an idle one, then the
            # buffered answers are dropped (a plain close would wait for them to be read)
            if now - self._since > limits.keepalive:
                self.close(abort=True)
        elif self._in_request:
            if now - self._since > limits.request_timeout:
                self._fail(408, f"request not complete after {limits.request_timeout:g} s")
        elif not self._busy and not self._pending and not self.pinned and now - self._since > limits.keepalive:
            self.close()

    def close(self, abort: bool = False) -> None:
        if self._closing:
            return
        self._closing = True
        self._unparsed = b""
        if self.transport is not None:
            with contextlib.suppress(Exception):
                if abort:
                    self.transport.abort()
                else:
                    self.transport.close()


def bind_unix_socket(path: str, mode: int = 0o660, backlog: int | None = None) -> socket.socket:
    """Bind and listen on ``path`` with ``mode``; a stale socket file (nobody listening) is replaced.

    The listen queue is ``backlog`` long, by default the kernel's maximum (``somaxconn``): a burst
    of connects waits there instead of failing with ``EAGAIN``.

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
    sock.listen(listen_backlog() if backlog is None else backlog)
    sock.setblocking(False)
    return sock


def bind_tcp(host: str, port: int, backlog: int | None = None) -> list[socket.socket]:
    """Listening TCP sockets for ``host:port``: one per address ``host`` resolves to (``localhost``:
    127.0.0.1 and ::1).  ``SO_REUSEADDR`` (a restart does not wait for ``TIME_WAIT``); an IPv6
    socket is IPv6 only (``IPV6_V6ONLY``), so that ``0.0.0.0:P`` and ``[::]:P`` can both be given.
    Raises ``OSError`` (``socket.gaierror`` for a name that does not resolve)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE | socket.AI_NUMERICSERV)
    socks: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys((i[0], i[1], i[2], "", i[4]) for i in infos):
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(listen_backlog() if backlog is None else backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def tcp_address(sock: socket.socket) -> str:
    """``host:port`` of a bound TCP socket, IPv6 in brackets (``[::1]:8007``)."""
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if sock.family == socket.AF_INET6 else f"{host}:{port}"
