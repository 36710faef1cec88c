"""The etcd client of fleet mode: failover, deadlines, leases, resumable watches -- over aetcd's gRPC stubs.

This is the ONLY module of dsproxy that imports ``grpc`` or ``aetcd``; everything else speaks
:class:`Etcd` and the plain dataclasses below (:class:`KV`, :class:`Txn`, :class:`Event`,
:class:`WatchBatch`, :class:`BatchResult`, :class:`Status`).  aetcd 1.0 (asyncio over grpc.aio) is
used only for its generated protobuf messages and stubs (``aetcd.rpc``): its ``Client`` has one
address, the 4 MiB gRPC receive limit, no deadline by default, and a watcher that flattens the
events of one etcd response into single callbacks and drops a compacted watch -- the gaps the
reference (``/work/shared/reference/etcd.md``) lists, filled here:

* **One channel, endpoint failover.**  An :class:`Etcd` holds one gRPC channel, to
  ``endpoints[i]`` (``endpoint``).  A call that fails with a transport error (UNAVAILABLE,
  DEADLINE_EXCEEDED, CANCELLED, UNKNOWN, INTERNAL -- a dead member, a frozen one, "leader changed",
  "request timed out", "no leader") closes that channel (in-flight calls on it are cancelled and
  retry too), rotates to the next endpoint and tries again, with a short backoff once every endpoint
  failed in a row, until ``timeout * len(endpoints)`` has passed; then it raises
  :class:`EtcdUnavailable`, naming every endpoint and the last error.  That budget should cover a
  leader election (~1.2 s here; during one, a follower holds a write until the call's deadline):
  the default 2 s x 3 members does, 0.5 s x 3 does not always.  Every attempt has a gRPC
  deadline (``timeout``, whatever is left of the budget); etcd's own refusals (too many operations,
  request too large, compacted revision, no space) raise :class:`EtcdRequestError` at once.
  ``connected`` / ``disconnected_since`` / ``endpoint`` are updated by every call and by the watch.
* **Limits.**  gRPC's receive AND send limits are ``max_message`` (256 MiB): a Range of 100,000
  keys of 200 B is ~25 MB, a 100k-event watch response 4.3 MB, both past gRPC's 4 MiB default.
  :meth:`Etcd.get_prefix` reads in pages of 10,000 keys pinned at the first page's revision (one
  consistent read; fewer page faults than one Range), smaller pages if one is too large for
  ``max_message``.
* **Compare-and-set, safe to retry.**  :meth:`Etcd.put_if` / :meth:`Etcd.delete_if` are txns that
  compare the key's mod_revision and read the key in the failure branch.  After an attempt whose
  outcome is unknown (any transport error after the request may have been sent), the same txn is
  sent again: both compare the same mod_revision, so at most one applies; if the retry's compare
  fails and the key holds exactly what was written (put) at a newer revision -- or is gone, for a
  delete -- the first attempt applied and success is reported with that revision (a delete's
  revision is read from a one-shot watch on the key from ``mod_revision + 1``; if that history is
  compacted, the header revision of the read, which is >= the delete's).  A caller that gets
  :class:`EtcdOutcomeUnknown` (the budget ran out after an ambiguous attempt) must treat the write
  as possibly applied: the mirror will tell.  :meth:`Etcd.put` (host keys) is unconditional and
  retried as is: a late duplicate of an older value is healed by the next refresh (TTL/3).
* **Leases.**  :meth:`Etcd.grant` returns a :class:`Lease` that refreshes itself every ``ttl/3`` in
  a background task (one LeaseKeepAlive exchange per refresh, on whatever endpoint is in use).
  ``expired`` is set -- and refreshing stops for good -- when etcd answers TTL <= 0 (the lease is
  gone) or no refresh succeeded for a whole TTL since the last good one (counted from when that
  request was sent); the owner then grants a new lease and writes its keys again.
* **Watch.**  :meth:`Etcd.watch_prefix` is one long-lived gRPC Watch stream; the events of one etcd
  response come as one :class:`WatchBatch` (etcd never splits a revision across responses when
  fragmenting is off, and ``revision`` is the last event's, so a resume from ``revision + 1`` can
  neither skip nor repeat an event).  After any failure the stream is re-created from that revision
  on the next endpoint (forever, with backoff: the watch never gives up); a stream that is silent
  for ``heartbeat`` seconds -- or sooner, when a caller knows of a revision it has not delivered
  (:meth:`Etcd.check_watches`: the mirror after its own write) -- is asked for a progress
  notification, and one that does not answer that within ``timeout`` is treated as dead (a
  SIGSTOPped member keeps its TCP connection open).  A new stream must be created (etcd's first
  reply) within ``timeout`` and every write on it has that deadline: gRPC's stream write waits
  without bound for the call to start, and a call on a channel that another call's failover
  closed may never start -- a watch stuck there for good was seen after a member's restart.
  Progress notifications themselves are not yielded: etcd 3.4 may send one whose revision is ahead
  of events an unsynced watcher has not been sent yet.  A compacted start revision (etcd cancels
  the watch with ``compact_revision``) makes it re-list the prefix and yield a batch with
  ``relist`` = every key at ``revision``, then watch from ``revision + 1``.  The stream asks for
  ``hasleader``: a member cut off from the leader ends the stream rather than going quiet.
* **TLS.**  With an :class:`~dsproxy.fleet.tls.EtcdTLS` (``--etcd-cacert``, ``--etcd-cert``,
  ``--etcd-key``) or ``https://`` endpoints, every channel is a gRPC secure channel: the members'
  certificates verified against the CA given (else the system's), the client certificate shown to
  a cluster with ``--client-cert-auth``.  A handshake that fails (an unknown CA, no client
  certificate) is a transport error like a dead member: the call tries the next endpoint and, once
  every one failed, :class:`EtcdUnavailable` carries gRPC's reason.
* **Not fork-safe.**  gRPC's core threads and an asyncio channel do not survive ``fork()``: create an
  :class:`Etcd` after any fork, in the process (and event loop) that uses it -- the manager never
  forks, ``dsproxy fleet`` runs one ``asyncio.run``.

Measured on this machine (2 cores shared with other work, 3 members on loopback, two runs of
``python -m dsproxy.testing.etcd --measure``): put_if p50 1.4-1.7 ms, p99 3.6-3.8 ms (500
sequential); put -> watch batch in the same client p50 1.3-1.6 ms, p99 1.9-5.7 ms; txn_batch of
100,000 keys of 200 B (782 txns of 128) 3.7-4.6 s (parallel=4: 3.6-4.3 s -- the cores, not the
round trips, are the limit here); get_prefix of those 100,000 keys in one Range 0.61-0.84 s
(paged at a 4 MiB limit: 0.70-1.12 s); the first put after SIGKILL of the member in use 3-5 ms
(connection refused -> next endpoint); the first put after SIGKILL of the leader 2.0 s (one
``timeout``: the follower holds the proposal through the ~1.2 s election, the retry succeeds).

    async with Etcd(["127.0.0.1:2379", "127.0.0.1:22379"]) as etcd:
        rev, kvs = await etcd.get_prefix(b"/dsproxy/datastores/")
        txn = await etcd.put_if(b"/dsproxy/datastores/a", b"datastore: a\\n\\tpath /x\\n", 0)
        async for batch in etcd.watch_prefix(b"/dsproxy/", rev + 1):
            ...
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, NamedTuple, TypeVar

import grpc
from aetcd import rpc

from .tls import EtcdTLS
from .tls import wanted as tls_wanted

log = logging.getLogger("dsproxy.fleet")

T = TypeVar("T")

DEFAULT_TIMEOUT = 2.0
DEFAULT_MAX_MESSAGE = 256 << 20
DEFAULT_HEARTBEAT = 5.0
MAX_TXN_OPS = 128  # etcd 3.4 --max-txn-ops default
MAX_REQUEST_BYTES = 1_572_864  # etcd 3.4 --max-request-bytes default (1.5 MiB)
TXN_BYTES = MAX_REQUEST_BYTES - 64 * 1024  # what txn_batch packs into one request, with room for framing
PAGE_KEYS = 10_000  # keys per page of get_prefix (smaller pages when one is too large for max_message)

# A member cut off from the leader ends a watch (and refuses calls) instead of serving from its past.
_METADATA = (("hasleader", "true"),)
_TRANSPORT = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
}


# -- errors -----------------------------------------------------------------------------------------------


class EtcdError(Exception):
    """Base of the errors of this module."""


class EtcdUnavailable(EtcdError):
    """No endpoint answered within the budget; ``str()`` names every endpoint and the last error."""

    def __init__(self, what: str, endpoints: Sequence[str], last_error: str) -> None:
        super().__init__(f"etcd unreachable ({what}): tried {', '.join(endpoints)}; last error: {last_error}")
        self.endpoints = list(endpoints)
        self.last_error = last_error


class EtcdOutcomeUnknown(EtcdUnavailable):
    """A write was sent, its answer lost, and no later attempt could tell whether it applied."""


class EtcdRequestError(EtcdError):
    """etcd refused the request itself (too many operations, too large, compacted, no space): no retry helps."""

    def __init__(self, what: str, code: str, details: str) -> None:
        super().__init__(f"etcd refused {what}: {code}: {details}")
        self.code = code
        self.details = details


def _too_large(err: EtcdRequestError) -> bool:
    """Whether ``err`` is gRPC's refusal of an answer larger than ``max_message`` (not any other
    RESOURCE_EXHAUSTED: a rate limit is not a reason for smaller pages)."""
    return err.code == grpc.StatusCode.RESOURCE_EXHAUSTED.name and "larger than max" in err.details


class _Compacted(Exception):
    """(Within :meth:`Etcd.get_prefix`.)  A later page's pinned revision was compacted."""

    def __init__(self, error: EtcdRequestError) -> None:
        super().__init__(str(error))
        self.error = error


# -- values -----------------------------------------------------------------------------------------------


class KV(NamedTuple):
    """One key as etcd returned it.  (A named tuple: built for every key of a full read, it
    costs 0.6 us against a frozen dataclass's 1.6 us -- 0.1 s of a 100,000-key cold start.)"""

    key: bytes
    value: bytes
    mod_revision: int
    create_revision: int


@dataclass(frozen=True, slots=True)
class Txn:
    """A compare-and-set's outcome: ``revision`` is the write's (success) or the read's (failure);
    ``current`` is the key as it is when the compare failed (None: it does not exist)."""

    succeeded: bool
    revision: int
    current: KV | None = None


@dataclass(frozen=True, slots=True)
class BatchResult:
    """:meth:`Etcd.txn_batch`: ``created`` items were written, the last at ``revision`` (sequential:
    ``items[:created]``); a non-empty ``conflicts`` (keys that already existed, as they are now)
    stopped it: their txn wrote nothing, and no txn was sent after."""

    created: int
    revision: int
    conflicts: list[KV]


@dataclass(frozen=True, slots=True)
class Event:
    kind: Literal["put", "delete"]
    key: bytes
    value: bytes
    mod_revision: int


@dataclass(frozen=True, slots=True)
class WatchBatch:
    """The events of one etcd watch response (``revision``: the last one's), or after a compaction
    ``relist`` = every key of the prefix at ``revision`` (and no events)."""

    revision: int
    events: list[Event]
    relist: list[KV] | None = None


@dataclass(frozen=True, slots=True)
class Status:
    """The member that answered :meth:`Etcd.status`."""

    endpoint: str
    member_id: int
    leader: int
    version: str
    db_size: int
    raft_term: int
    raft_index: int
    revision: int


_tuple_new: Final = tuple.__new__


def _kv(kv: Any) -> KV:
    """One key of a reply, built as a tuple directly: the named tuple's own ``__new__`` is a
    Python function, 10 against 6 ms a page of 10,000 keys (upb gives the fields as ``bytes``
    and ``int`` already)."""
    return _tuple_new(KV, (kv.key, kv.value, kv.mod_revision, kv.create_revision))


def _kvs(kvs: Any) -> list[KV]:
    return list(map(_kv, kvs))


def prefix_end(prefix: bytes) -> bytes:
    """The ``range_end`` of every key starting with ``prefix`` (etcd's convention; b"\\0" = to the end)."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


def normalize_endpoint(endpoint: str) -> str:
    """``host:port`` from ``host:port``, ``http://host:port`` or ``https://host:port`` (ValueError
    naming the endpoint otherwise; whether TLS is used is :func:`dsproxy.fleet.tls.wanted`'s)."""
    text = endpoint.strip()
    text = text.removeprefix("https://").removeprefix("http://").rstrip("/")
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or "/" in text:
        raise ValueError(f"etcd endpoint {endpoint!r}: expected host:port, http://host:port or https://host:port")
    return text


def _describe(err: BaseException) -> str:
    if isinstance(err, grpc.aio.AioRpcError):
        return f"{err.code().name}: {err.details()}"
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__


# -- the channel ------------------------------------------------------------------------------------------


class _Conn:
    """One gRPC channel to one endpoint and its stubs; replaced (never reopened) on failure."""

    def __init__(
        self, endpoint: str, options: list[tuple[str, int]], credentials: grpc.ChannelCredentials | None = None
    ) -> None:
        self.endpoint = endpoint
        self.closing = False
        if credentials is None:
            self.channel = grpc.aio.insecure_channel(endpoint, options=options)
        else:
            self.channel = grpc.aio.secure_channel(endpoint, credentials, options=options)
        self.kv = rpc.KVStub(self.channel)
        self.watch = rpc.WatchStub(self.channel)
        self.lease = rpc.LeaseStub(self.channel)
        self.maintenance = rpc.MaintenanceStub(self.channel)


class Etcd:
    """A client of one etcd cluster (see the module); an async context manager.

    ``endpoints``: ``host:port``, ``http://host:port`` or ``https://host:port``; ``timeout``: the
    deadline of each attempt (a call retries on other endpoints for about ``timeout *
    len(endpoints)``); ``max_message``: gRPC's receive and send limits; ``tls``: TLS to every
    member (:mod:`dsproxy.fleet.tls`; ``https://`` endpoints without it: the system's trust store).
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        timeout: float = DEFAULT_TIMEOUT,
        max_message: int = DEFAULT_MAX_MESSAGE,
        tls: EtcdTLS | None = None,
    ) -> None:
        if isinstance(endpoints, str) or not endpoints:
            raise ValueError("etcd: give at least one endpoint, as a list of host:port")
        if timeout <= 0:
            raise ValueError(f"etcd: timeout must be positive, not {timeout!r}")
        if tls_wanted(endpoints, tls is not None) and tls is None:
            tls = EtcdTLS()  # https:// endpoints alone: the system's trust store
        self.tls = tls
        self._credentials = None if tls is None else grpc.ssl_channel_credentials(tls.ca, tls.key, tls.cert)
        self.endpoints = [normalize_endpoint(e) for e in endpoints]
        self.timeout = timeout
        self.max_message = max_message
        self._options = [
            ("grpc.max_receive_message_length", max_message),
            ("grpc.max_send_message_length", max_message),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]
        # Per-connection state: the channel in use and where the next rotation goes.
        self._index = 0
        self._conn: _Conn | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self._leases: set[Lease] = set()
        self._closed = False
        self._poked = asyncio.Event()  # check_watches(): every watch sends a progress request now
        # What status shows: updated by every call and by the watch.
        self.connected = False
        self.disconnected_since: float | None = None
        self._failing_since: float | None = None

    @property
    def endpoint(self) -> str:
        """The endpoint in use (or the next one to be tried)."""
        return self._conn.endpoint if self._conn is not None else self.endpoints[self._index]

    # -- life ---------------------------------------------------------------------------------------

    async def connect(self) -> None:
        """Open the channel and check that some member answers (EtcdUnavailable otherwise)."""
        self._closed = False
        request = rpc.RangeRequest(key=b"\0", count_only=True)
        await self._call("connect", lambda c, t: c.kv.Range(request, timeout=t, metadata=_METADATA))

    async def close(self) -> None:
        """Stop every lease's refresh (the leases are NOT revoked: they expire), close the channel."""
        self._closed = True
        for lease in list(self._leases):
            await lease._stop()
        if self._conn is not None:
            self._drop(self._conn)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        self.connected = False

    async def __aenter__(self) -> Etcd:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _current(self) -> _Conn:
        if self._closed:
            raise EtcdError("etcd: the client is closed")
        if self._conn is None:
            self._conn = _Conn(self.endpoints[self._index], self._options, self._credentials)
        return self._conn

    def _drop(self, conn: _Conn) -> None:
        """Forget ``conn`` (if still in use: rotate to the next endpoint) and close it in the background."""
        if self._conn is conn:
            self._conn = None
            self._index = (self._index + 1) % len(self.endpoints)
        if conn.closing:
            return
        conn.closing = True
        task = asyncio.ensure_future(conn.channel.close(grace=None))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _succeeded(self) -> None:
        if not self.connected and self.disconnected_since is not None:
            log.warning("fleet: etcd reachable again at %s", self.endpoint)
        self.connected = True
        self.disconnected_since = None
        self._failing_since = None

    def _failed(self, conn: _Conn, err: BaseException) -> None:
        if self._failing_since is None:
            self._failing_since = time.time()
        log.info("fleet: etcd endpoint %s failed (%s); rotating", conn.endpoint, _describe(err))
        self._drop(conn)

    def _gave_up(self) -> None:
        if self.connected or self.disconnected_since is None:
            log.warning("fleet: etcd unreachable (%s)", ", ".join(self.endpoints))
        self.connected = False
        self.disconnected_since = self._failing_since or time.time()

    async def _call(
        self,
        what: str,
        attempt: Callable[[_Conn, float], Awaitable[T]],
        *,
        budget: float | None = None,
        attempt_timeout: float | None = None,
        on_retry: Callable[[], None] | None = None,
    ) -> T:
        """``attempt(conn, deadline)`` on the endpoint in use, rotating on transport errors (see the module).

        ``on_retry`` is called before every attempt after the first: the caller's flag that an
        earlier outcome is unknown.
        """
        per_attempt = attempt_timeout or self.timeout
        deadline = time.monotonic() + (budget if budget is not None else per_attempt * len(self.endpoints))
        last = "no attempt made"
        failures = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 and failures:
                break
            conn = self._current()
            try:
                result = await attempt(conn, max(min(per_attempt, remaining), 0.05))
            except grpc.aio.AioRpcError as err:
                if err.code() not in _TRANSPORT:
                    self._succeeded()  # the member answered, it just said no
                    raise EtcdRequestError(what, err.code().name, err.details() or "") from None
                last = f"{conn.endpoint}: {_describe(err)}"
                self._failed(conn, err)
            except (TimeoutError, OSError, asyncio.InvalidStateError) as err:  # the last: a stream already ended
                last = f"{conn.endpoint}: {_describe(err)}"
                self._failed(conn, err)
            except asyncio.CancelledError:
                if _cancelled_by_caller():
                    raise
                last = f"{conn.endpoint}: the channel was closed under the call (another call failed over)"
                self._failed(conn, ChannelClosed(last))
            else:
                self._succeeded()
                return result
            failures += 1
            if on_retry is not None:
                on_retry()
            if failures % len(self.endpoints) == 0:  # a whole round failed: let the cluster breathe
                await asyncio.sleep(min(0.05 * 2 ** (failures // len(self.endpoints)), 0.5) * random.uniform(0.8, 1.2))
        self._gave_up()
        raise EtcdUnavailable(what, self.endpoints, self._hint(last))

    def _hint(self, last: str) -> str:
        """``last`` (gRPC's reason), with what it usually means when it is about TLS."""
        if "TSI_" not in last and "handshake" not in last.lower():
            return last
        if self.tls is None:
            return f"{last} (a TLS member? give https:// endpoints and --etcd-cacert)"
        if "CERTIFICATE_VERIFY_FAILED" in last:
            return f"{last} (the member's certificate is not signed by --etcd-cacert, or does not name its host)"
        return f"{last} (the member refused this client: no --etcd-cert, or one its CA did not sign)"

    # -- reads --------------------------------------------------------------------------------------

    async def revision(self) -> int:
        """The cluster's current revision (a linearizable read's header)."""
        request = rpc.RangeRequest(key=b"\0", count_only=True)
        reply = await self._call("revision", lambda c, t: c.kv.Range(request, timeout=t, metadata=_METADATA))
        return int(reply.header.revision)

    async def get(self, key: bytes) -> KV | None:
        """The key as it is now, or None."""
        request = rpc.RangeRequest(key=key)
        reply = await self._call(f"get {key!r}", lambda c, t: c.kv.Range(request, timeout=t, metadata=_METADATA))
        return _kv(reply.kvs[0]) if reply.kvs else None

    async def get_prefix(self, prefix: bytes, *, revision: int = 0, keys_only: bool = False) -> tuple[int, list[KV]]:
        """``(revision, every key under prefix)`` from one consistent read, sorted by key -- at
        ``revision`` if given (0: the current one), without the values if ``keys_only``.

        Pages of :data:`PAGE_KEYS` keys, each pinned at the first one's revision (so the result is
        one consistent read; each attempt may take ``5 * timeout``); a page too large for
        ``max_message`` is asked again smaller.  Why pages and not one Range: the same 0.33 s
        for 100,000 keys of 140 B, but 15,000 page faults of the reader against 27,500 (gRPC's
        and protobuf's copies of a 14 MB answer at once; 2026-12-04, a fresh process each).  If
        that revision is compacted before the last page (the caller pinned none), the read
        starts over at the current one -- three times, then as one Range (which a compaction
        cannot overtake: the errors of a read at the current revision stay what they were).
        """
        for _ in range(3):
            try:
                return await self._get_prefix_paged(prefix, revision, keys_only)
            except _Compacted as err:
                if revision:
                    raise err.error from None
        request = rpc.RangeRequest(key=prefix, range_end=prefix_end(prefix), keys_only=keys_only)
        try:
            reply = await self._call(
                f"get_prefix {prefix!r}",
                lambda c, t: c.kv.Range(request, timeout=t, metadata=_METADATA),
                attempt_timeout=self.timeout * 5,
            )
        except EtcdRequestError as err:
            if not _too_large(err):
                raise
            return await self._get_prefix_paged(prefix, 0, keys_only, restart=False)
        return int(reply.header.revision), _kvs(reply.kvs)

    async def _get_prefix_paged(
        self, prefix: bytes, revision: int, keys_only: bool, restart: bool = True
    ) -> tuple[int, list[KV]]:
        end = prefix_end(prefix)
        start, limit, pinned = prefix, PAGE_KEYS, revision
        found: list[KV] = []
        while True:
            request = rpc.RangeRequest(key=start, range_end=end, limit=limit, revision=pinned, keys_only=keys_only)

            def page(conn: _Conn, timeout: float, request: Any = request) -> Any:
                return conn.kv.Range(request, timeout=timeout, metadata=_METADATA)

            try:
                reply = await self._call(f"get_prefix {prefix!r} (page)", page, attempt_timeout=self.timeout * 5)
            except EtcdRequestError as err:
                if restart and found and err.code == grpc.StatusCode.OUT_OF_RANGE.name:
                    raise _Compacted(err) from None  # (the revision the pages are pinned at)
                if not _too_large(err) or limit == 1:
                    raise
                limit = max(limit // 4, 1)
                continue
            if not pinned:
                pinned = int(reply.header.revision)
            found.extend(_kvs(reply.kvs))
            if not reply.more or not reply.kvs:
                return pinned, found
            start = bytes(reply.kvs[-1].key) + b"\0"

    async def status(self) -> Status:
        """The status of the member in use (its id, the leader's, version, db size, raft term/index)."""
        reply = await self._call(
            "status", lambda c, t: c.maintenance.Status(rpc.StatusRequest(), timeout=t, metadata=_METADATA)
        )
        return Status(
            self.endpoint,
            int(reply.header.member_id),
            int(reply.leader),
            str(reply.version),
            int(reply.dbSize),
            int(reply.raftTerm),
            int(reply.raftIndex),
            int(reply.header.revision),
        )

    # -- writes -------------------------------------------------------------------------------------

    async def put(self, key: bytes, value: bytes, lease: int | None = None) -> int:
        """Write ``key`` unconditionally (host keys); the write's revision."""
        request = rpc.PutRequest(key=key, value=value, lease=lease or 0)
        reply = await self._call(f"put {key!r}", lambda c, t: c.kv.Put(request, timeout=t, metadata=_METADATA))
        return int(reply.header.revision)

    async def put_if(self, key: bytes, value: bytes, mod_revision: int, lease: int | None = None) -> Txn:
        """Write ``key`` if its mod_revision is still ``mod_revision`` (0: if it does not exist)."""
        put = rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value, lease=lease or 0))
        reply, unsure = await self._cas(f"put_if {key!r}", key, mod_revision, put)
        if reply.succeeded:
            return Txn(True, int(reply.header.revision))
        current = self._failure_kv(reply)
        if unsure and current is not None and current.value == value and current.mod_revision > mod_revision:
            return Txn(True, current.mod_revision)  # an earlier attempt applied
        return Txn(False, int(reply.header.revision), current)

    async def delete_if(self, key: bytes, mod_revision: int) -> Txn:
        """Delete ``key`` if its mod_revision is still ``mod_revision``."""
        delete = rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key))
        reply, unsure = await self._cas(f"delete_if {key!r}", key, mod_revision, delete)
        if reply.succeeded:
            return Txn(True, int(reply.header.revision))
        current = self._failure_kv(reply)
        if unsure and current is None and mod_revision > 0:
            return Txn(True, await self._deleted_at(key, mod_revision, int(reply.header.revision)))
        return Txn(False, int(reply.header.revision), current)

    async def _cas(self, what: str, key: bytes, mod_revision: int, op: Any) -> tuple[Any, bool]:
        compare = rpc.Compare(
            key=key, target=rpc.Compare.CompareTarget.MOD, result=rpc.Compare.CompareResult.EQUAL,
            mod_revision=mod_revision,
        )  # fmt: skip
        request = rpc.TxnRequest(
            compare=[compare], success=[op], failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=key))]
        )
        return await self._txn(what, request)

    async def _txn(self, what: str, request: Any) -> tuple[Any, bool]:
        """Send the txn ``request`` (retried as :meth:`_call` does): its reply, and whether an
        earlier attempt may have applied it (a retry after a transport error).  Out of budget
        after such an attempt: :class:`EtcdOutcomeUnknown`."""
        unsure = False

        def retrying() -> None:
            nonlocal unsure
            unsure = True

        try:
            reply = await self._call(
                what, lambda c, t: c.kv.Txn(request, timeout=t, metadata=_METADATA), on_retry=retrying
            )
        except EtcdUnavailable as err:
            if unsure:
                raise EtcdOutcomeUnknown(f"{what}, outcome unknown", err.endpoints, err.last_error) from None
            raise
        return reply, unsure

    @staticmethod
    def _failure_kv(reply: Any) -> KV | None:
        kvs = reply.responses[0].response_range.kvs if reply.responses else []
        return _kv(kvs[0]) if kvs else None

    async def _deleted_at(self, key: bytes, mod_revision: int, fallback: int) -> int:
        """The revision of the first change of ``key`` after ``mod_revision`` if it is a delete (from a
        one-shot watch); ``fallback`` (a revision >= it) if that history is compacted."""

        async def attempt(conn: _Conn, timeout: float) -> int:
            call = conn.watch.Watch(timeout=timeout, metadata=_METADATA)
            try:
                create = rpc.WatchCreateRequest(key=key, start_revision=mod_revision + 1)
                await call.write(rpc.WatchRequest(create_request=create))
                while True:
                    reply = await call.read()
                    if reply is grpc.aio.EOF:
                        raise TimeoutError("watch ended")
                    if reply.compact_revision:
                        return fallback
                    for event in reply.events:
                        return int(event.kv.mod_revision)
            finally:
                call.cancel()

        return await self._call(f"delete_if {key!r} (resolving)", attempt)

    async def txn_batch(
        self,
        items: Sequence[tuple[bytes, bytes]],
        *,
        max_ops: int = MAX_TXN_OPS,
        max_bytes: int = TXN_BYTES,
        parallel: int = 1,
    ) -> BatchResult:
        """Create every ``(key, value)`` of ``items`` in create-only txns (compare version == 0) of at
        most ``max_ops`` keys and ``max_bytes`` bytes each; a txn that finds an existing key writes
        nothing and no further txn is sent (see :class:`BatchResult`).  ``parallel`` txns are in
        flight at once (little gain on 2 cores); then the txns already sent when one conflicted may
        still be written, so ``created`` counts the items written but they are not ``items[:created]``.
        An item too large for one request raises ValueError before anything is written."""
        chunks = self._chunks(items, max_ops, max_bytes)
        created, revision = 0, 0
        conflicts: list[KV] = []
        pending = iter(chunks)

        async def lane() -> None:
            nonlocal created, revision
            for chunk in pending:
                if conflicts:
                    return
                outcome = await self._create_chunk(chunk)
                if isinstance(outcome, list):
                    conflicts.extend(outcome)
                    return
                created += len(chunk)
                revision = max(revision, outcome)

        await asyncio.gather(*(lane() for _ in range(max(1, parallel))))
        if conflicts:
            conflicts.sort(key=lambda kv: kv.key)
            revision = max(revision, max(kv.mod_revision for kv in conflicts))
        return BatchResult(created, revision, conflicts)

    async def _create_chunk(self, chunk: list[tuple[bytes, bytes]]) -> int | list[KV]:
        """One create-only txn: its revision, or the keys that already existed."""
        reply, unsure = await self._create_only(chunk)
        if reply.succeeded:
            return int(reply.header.revision)
        existing = [_kv(r.response_range.kvs[0]) if r.response_range.kvs else None for r in reply.responses]
        if unsure and all(kv is not None and kv.value == v for kv, (_, v) in zip(existing, chunk, strict=True)):
            return max(kv.mod_revision for kv in existing if kv is not None)  # an earlier attempt applied
        return [kv for kv in existing if kv is not None]

    @staticmethod
    def _chunks(items: Sequence[tuple[bytes, bytes]], max_ops: int, max_bytes: int) -> list[list[tuple[bytes, bytes]]]:
        chunks: list[list[tuple[bytes, bytes]]] = []
        chunk: list[tuple[bytes, bytes]] = []
        size = 0
        for key, value in items:
            cost = 3 * len(key) + len(value) + 48  # compare + put + the failure branch's range, with framing
            if cost > max_bytes:
                raise ValueError(f"etcd: key {key!r} with {len(value)} bytes of value is too large for one request")
            if chunk and (len(chunk) >= max_ops or size + cost > max_bytes):
                chunks.append(chunk)
                chunk, size = [], 0
            chunk.append((key, value))
            size += cost
        if chunk:
            chunks.append(chunk)
        return chunks

    async def _create_only(self, chunk: list[tuple[bytes, bytes]]) -> tuple[Any, bool]:
        target, equal = rpc.Compare.CompareTarget.VERSION, rpc.Compare.CompareResult.EQUAL
        request = rpc.TxnRequest(
            compare=[rpc.Compare(key=k, target=target, result=equal, version=0) for k, _ in chunk],
            success=[rpc.RequestOp(request_put=rpc.PutRequest(key=k, value=v)) for k, v in chunk],
            failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=k)) for k, _ in chunk],
        )
        return await self._txn(f"txn_batch of {len(chunk)} keys from {chunk[0][0]!r}", request)

    async def delete_prefix(self, prefix: bytes) -> int:
        """Delete every key under ``prefix`` (tests, benchmarks); how many were deleted."""
        request = rpc.DeleteRangeRequest(key=prefix, range_end=prefix_end(prefix))
        reply = await self._call(
            f"delete_prefix {prefix!r}", lambda c, t: c.kv.DeleteRange(request, timeout=t, metadata=_METADATA)
        )
        return int(reply.deleted)

    async def compact(self, revision: int) -> None:
        """Compact the history up to ``revision`` (physical: done when this returns)."""
        request = rpc.CompactionRequest(revision=revision, physical=True)
        await self._call(
            f"compact {revision}", lambda c, t: c.kv.Compact(request, timeout=t, metadata=_METADATA),
            attempt_timeout=self.timeout * 5,
        )  # fmt: skip

    # -- leases -------------------------------------------------------------------------------------

    async def grant(self, ttl: float) -> Lease:
        """A lease of ``ttl`` seconds (rounded up; etcd may raise it to its minimum), kept alive until
        :meth:`Lease.revoke`, :meth:`close` or its expiry."""
        sent = time.monotonic()
        request = rpc.LeaseGrantRequest(TTL=max(1, math.ceil(ttl)))
        reply = await self._call("lease grant", lambda c, t: c.lease.LeaseGrant(request, timeout=t, metadata=_METADATA))
        if reply.error:
            raise EtcdRequestError("lease grant", "ERROR", str(reply.error))
        lease = Lease(self, int(reply.ID), int(reply.TTL), sent)
        self._leases.add(lease)
        return lease

    async def _keepalive(self, lease_id: int, budget: float) -> int:
        """One LeaseKeepAlive exchange; the TTL etcd answers (<= 0: the lease is gone)."""

        async def attempt(conn: _Conn, timeout: float) -> int:
            call = conn.lease.LeaseKeepAlive(timeout=timeout, metadata=_METADATA)
            try:
                # bounded here too: the call's deadline did not always end a stream write to a dead
                # member (a lease then never expired, so a --fleet-fencing offline host never fenced:
                # 1 run in ~8 of the fencing test; see also _replies)
                async with asyncio.timeout(timeout):
                    await call.write(rpc.LeaseKeepAliveRequest(ID=lease_id))
                    reply = await call.read()
                if reply is grpc.aio.EOF:
                    raise TimeoutError("keepalive stream ended")
                return int(reply.TTL)
            finally:
                call.cancel()

        return await self._call(f"lease {lease_id:x} keepalive", attempt, budget=budget)

    async def revoke(self, lease_id: int) -> None:
        """Revoke the lease ``lease_id`` (also another client's); its keys go at once.  Gone already: no error."""
        request = rpc.LeaseRevokeRequest(ID=lease_id)
        with contextlib.suppress(EtcdRequestError):  # NOT_FOUND: already gone
            await self._call(
                f"lease {lease_id:x} revoke", lambda c, t: c.lease.LeaseRevoke(request, timeout=t, metadata=_METADATA)
            )

    # -- watch --------------------------------------------------------------------------------------

    async def watch_prefix(
        self, prefix: bytes, start_revision: int, *, heartbeat: float = DEFAULT_HEARTBEAT
    ) -> AsyncGenerator[WatchBatch, None]:
        """Every change under ``prefix`` from ``start_revision`` on, as batches (see the module); never ends
        by itself (``aclose()`` it, or cancel the task that iterates, to end it)."""
        next_revision = start_revision
        failures = 0
        while True:
            conn = self._current()
            call = conn.watch.Watch(metadata=_METADATA)
            relist = False
            try:
                create = rpc.WatchCreateRequest(key=prefix, range_end=prefix_end(prefix), start_revision=next_revision)
                async with asyncio.timeout(self.timeout):  # see _replies: a stream write can wait for ever
                    await call.write(rpc.WatchRequest(create_request=create))
                async for reply in self._replies(call, heartbeat):
                    if reply.compact_revision:
                        relist = True
                        break
                    if reply.created:
                        self._succeeded()
                        failures = 0
                    if reply.canceled:
                        raise _StreamEnded(f"watch canceled: {reply.cancel_reason or 'no reason given'}")
                    if not reply.events:
                        continue
                    events = [_event(e) for e in reply.events]
                    next_revision = events[-1].mod_revision + 1
                    yield WatchBatch(events[-1].mod_revision, events)
            except (
                grpc.aio.AioRpcError,
                _StreamEnded,
                OSError,
                asyncio.InvalidStateError,
                asyncio.CancelledError,
            ) as err:
                if isinstance(err, asyncio.CancelledError) and _cancelled_by_caller():
                    raise
                if isinstance(err, grpc.aio.AioRpcError) and err.code() not in _TRANSPORT:
                    raise EtcdRequestError(f"watch of {prefix!r}", err.code().name, err.details() or "") from None
                failures += 1
                self._failed(conn, err)
                if failures >= len(self.endpoints):
                    self._gave_up()
                    await asyncio.sleep(min(0.05 * 2 ** (failures // len(self.endpoints)), 1.0))
                continue
            finally:
                call.cancel()
            if relist:
                revision, kvs = await self._relist(prefix)
                log.warning("fleet: watch of %r compacted before revision %d; re-listed %d keys at %d",
                            prefix, next_revision, len(kvs), revision)  # fmt: skip
                next_revision = revision + 1
                yield WatchBatch(revision, [], kvs)

    async def _relist(self, prefix: bytes) -> tuple[int, list[KV]]:
        while True:
            try:
                return await self.get_prefix(prefix)
            except EtcdUnavailable:
                await asyncio.sleep(0.5)

    def check_watches(self) -> None:
        """Ask every watch stream for a progress notification now, instead of after its next
        ``heartbeat`` of silence: one that does not answer within ``timeout`` is re-created on the
        next endpoint.  For a caller that knows a revision exists (its own write) that the watch has
        not delivered yet -- a stream can stay open and silent (a frozen member; gRPC cut from a
        member it still believes connected)."""
        self._poked.set()

    async def _replies(self, call: Any, heartbeat: float) -> AsyncIterator[Any]:
        """The stream's replies.  The first (etcd's ``created``) must come within ``timeout``; after
        ``heartbeat`` s of silence, or when :meth:`check_watches` asks, a progress request goes out,
        and the stream is dead (_StreamEnded) if nothing answers it within ``timeout``.  Every write
        on the stream has that deadline too: gRPC's stream write waits, unbounded, for the call's
        start, and a call on a channel closed under it may never start.  (The read is never
        cancelled, only awaited again.)"""
        read: asyncio.Future[Any] = asyncio.ensure_future(call.read())
        poked = asyncio.ensure_future(self._poked.wait())
        first = True
        try:
            while True:
                if first:
                    done, _ = await asyncio.wait({read}, timeout=self.timeout)
                    if not done:
                        raise _StreamEnded(f"the watch was not created within {self.timeout:g} s")
                    first = False
                else:
                    done, _ = await asyncio.wait({read, poked}, timeout=heartbeat, return_when=asyncio.FIRST_COMPLETED)
                if read not in done:
                    self._poked.clear()
                    poked = asyncio.ensure_future(self._poked.wait())
                    async with asyncio.timeout(self.timeout):
                        await call.write(rpc.WatchRequest(progress_request=rpc.WatchProgressRequest()))
                    done, _ = await asyncio.wait({read}, timeout=self.timeout)
                    if not done:
                        raise _StreamEnded(f"no answer to a progress request within {self.timeout:g} s")
                reply = read.result()
                if reply is grpc.aio.EOF:
                    raise _StreamEnded("watch stream ended")
                read = asyncio.ensure_future(call.read())
                yield reply
        finally:
            poked.cancel()
            if read.done() and not read.cancelled():
                read.exception()  # retrieved: it is the stream's end, already handled or moot
            read.cancel()


class _StreamEnded(Exception):
    """A watch stream ended, was canceled by etcd or went silent."""


class ChannelClosed(Exception):
    """gRPC cancelled a call because its channel was closed by a failover (not the caller's cancellation)."""


def _cancelled_by_caller() -> bool:
    """Whether a CancelledError is this task's own cancellation -- else gRPC raised it for a call on a
    channel another call's failover closed, and it is just another transport error."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


def _event(event: Any) -> Event:
    kind: Literal["put", "delete"] = "delete" if event.type == rpc.Event.DELETE else "put"
    return Event(kind, bytes(event.kv.key), bytes(event.kv.value), int(event.kv.mod_revision))


class Lease:
    """A granted lease, refreshed every ``ttl/3`` in the background (see the module)."""

    def __init__(self, etcd: Etcd, lease_id: int, ttl: int, granted_at: float) -> None:
        self.id = lease_id
        self.ttl = ttl
        self.expired = asyncio.Event()
        self.reason = ""  # why it expired, for the log / status
        self._etcd = etcd
        self._last_ok = granted_at
        self._revoked = False
        self._task = asyncio.ensure_future(self._keep_alive())

    @property
    def alive(self) -> bool:
        """Not expired nor revoked -- and refreshed within its TTL: past that etcd has dropped it
        whatever the refresh task is doing (a refresh that hangs must not keep a lease alive)."""
        if time.monotonic() - self._last_ok >= self.ttl and not self.expired.is_set():
            self._expire(f"no refresh succeeded for {self.ttl} s")
        return not self.expired.is_set() and not self._revoked

    async def revoke(self) -> None:
        """Stop refreshing and revoke it (its keys go at once)."""
        await self._stop()
        self._revoked = True
        await self._etcd.revoke(self.id)

    async def _stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._etcd._leases.discard(self)

    def _expire(self, reason: str) -> None:
        self.reason = reason
        log.warning("fleet: lease %x expired: %s", self.id, reason)
        self.expired.set()
        self._etcd._leases.discard(self)

    async def _keep_alive(self) -> None:
        interval = self.ttl / 3
        while True:
            await asyncio.sleep(max(self._last_ok + interval - time.monotonic(), 0.0))
            if self.expired.is_set():  # (found so by alive)
                return
            sent = time.monotonic()
            budget = self._last_ok + self.ttl - sent
            if budget <= 0:
                self._expire(f"no refresh succeeded for {self.ttl} s")
                return
            try:
                ttl = await self._etcd._keepalive(self.id, budget)
            except EtcdUnavailable as err:
                if time.monotonic() - self._last_ok >= self.ttl:
                    self._expire(f"no refresh succeeded for {self.ttl} s: {err}")
                    return
                await asyncio.sleep(min(0.1, interval))
                continue
            except EtcdError as err:  # refused, or the client was closed
                self._expire(str(err))
                return
            if ttl <= 0:
                self._expire("etcd says it is gone")
                return
            self._last_ok = sent
