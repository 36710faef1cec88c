"""The HTTP API a proxy worker serves (docs/design.md §6), on the worker's own :class:`~dsproxy.Registry`.

Every answer carries ``x-dsproxy-generation``: the generation of the config the worker served it
under (the stress script checks that it never goes behind an acknowledged write), and
``x-dsproxy-worker``: the worker's pid.  In fleet mode (``dsproxy manager --etcd``) it also carries
``x-dsproxy-revision``: the etcd revision of that config, from the fleet record in shared memory --
the one the manager wrote for the generation the worker loaded, or, when the manager has
published again since, the revision the worker knew for an earlier generation (a lower bound:
never a revision newer than what it serves; 0 before it knew any).  A degraded worker (no shared
memory) cannot tell and sends none.

Reads are answered in the worker.  Config writes are forwarded to the manager over
``manager.sock`` with the end client's ``SO_PEERCRED`` in ``x-dsproxy-client``; the manager decides
who may write.

Operation leases (``POST .../{store}/operation``, ``operation=read|write``) let external jobs take
part in maintenance.  Sent with a chunked body, the lease lives exactly as long as the body stream:
taken when the headers arrive (or refused at once), released when the body ends or the connection
drops.  Sent whole, it belongs to the connection: held until ``DELETE .../{store}/operation`` on that
connection (``?lease=ID`` for one, else all of that store) or until the connection closes -- a job
that dies loses its connection and with it its operations.  A connection that holds a lease is never
closed as idle, and holds at most :data:`MAX_LEASES_PER_CONNECTION` at once (``429`` beyond).

Remote clients (TCP, ``request.remote`` set) authenticate with an API token
(:meth:`WorkerApp.authenticate_remote`, :mod:`dsproxy.auth.cache`) and each handler checks the
PBS privilege of its path (``/datastore/{store}``; ``Datastore.Audit`` for status, list, usage and
active operations, ``Datastore.Read``/``Backup`` for leases, ``Modify``/``Allocate`` for config
writes, ``Sys.Audit`` on ``/system/status`` for node status and metrics); lists and usage show
only the stores the token may audit.  A failed authentication is answered ``401`` after
:data:`AUTH_FAILURE_DELAY` seconds, slept without blocking the worker (PBS sleeps 3 s for its
logins; 0.3 s keeps a guessing client slow without holding honest clients with a typo long) and
counted (``dsproxy_auth_failures_total`` in ``/metrics``, of the answering worker); a missing
privilege is ``403`` naming the privilege and path.  Token and ACL management (``/access/...``)
is only offered on the Unix socket.  On the Unix socket nothing changes: ``SO_PEERCRED`` rules.

A forwarded write the manager has not answered after :data:`FORWARD_TIMEOUT` seconds (a stopped
manager) is answered ``504``; whether it was applied then is unknown -- read the config to see.
Forwards go over keep-alive connections to ``manager.sock`` that the worker keeps between writes
(at most :data:`MANAGER_POOL` idle ones, each for :data:`MANAGER_IDLE` s -- well below the
manager's keep-alive of 75 s, so the manager never closes one as idle under a request): a new
connection per write cost ~0.2-0.5 ms of the write on the project machine.  A connection the
manager closed (a restart drains them) is seen closed by the loop before it is picked again; one
whose request fails or times out is closed, never reused.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import math
import os
import time
from typing import Any, Final

from .. import client as client_mod
from ..auth import acl
from ..auth.cache import AuthCache
from ..auth.errors import AuthConfigError, AuthError
from ..config import Operation, schema
from ..errors import DatastoreError, NoSuchDatastore
from ..ipc import shm
from ..registry import DISCARD_CACHES, Handle, Registry
from . import limits
from .http import Connection, Handler, HTTPError, Reply, Request, Router, data_reply, error_reply
from .protocol import (
    AUTH_ID_HEADER,
    CLIENT_HEADER,
    GENERATION_HEADER,
    MIN_REVISION_HEADER,
    MIN_REVISION_WAIT,
    MIN_REVISION_WAIT_LIMIT,
    REVISION_HEADER,
    WAIT_HEADER,
    WORKER_HEADER,
)

_FALSE = schema.FALSE | {""}  # a bare ``?verbose=`` is false
_BACKUP_TYPES = ("vm", "ct", "host")
_lease_ids = itertools.count(1)
#: leases one connection may hold at once (whole and streamed together)
MAX_LEASES_PER_CONNECTION = 64
#: seconds a forwarded config write waits for the manager's answer (``--forward-timeout``)
FORWARD_TIMEOUT = 30.0
#: idle keep-alive connections to the manager a worker keeps for its next forwards, and for how long
MANAGER_POOL = 4
MANAGER_IDLE = 30.0
#: seconds before a failed authentication is answered (slept, the worker serves others meanwhile)
AUTH_FAILURE_DELAY = 0.3
_STATUS_PATH = ("system", "status")


def _flag(request: Request, name: str) -> bool:
    if not request.query_string:
        return False
    value = request.query().get(name)
    if value is None:
        return False
    value = value.lower()
    if value in schema.TRUE:
        return True
    if value in _FALSE:
        return False
    raise HTTPError(400, f"parameter verification failed - '{name}': value '{value[:40]}' is not a boolean")


class WorkerApp:
    """Routes and handlers of one worker process."""

    def __init__(
        self,
        registry: Registry,
        manager_socket: str,
        started: float | None = None,
        forward_timeout: float = FORWARD_TIMEOUT,
        config_dir: str | None = None,
    ) -> None:
        self.registry = registry
        self.config_dir = config_dir
        self._auth: AuthCache | None = None
        self.auth_failures = 0
        self.manager_socket = manager_socket
        self.forward_timeout = forward_timeout
        self._manager_idle: list[tuple[float, client_mod.AsyncConnection]] = []  # (since, connection)
        self.started = started or time.time()
        # this worker's figures, published into its process slot (same names in status and metrics)
        self.lookups = 0
        self.cache_hits = 0
        self.lookup_errors = 0
        self._worker_header = f"{WORKER_HEADER}: {os.getpid()}\r\n".encode()
        self._generation_header = f"{GENERATION_HEADER}: %d\r\n".encode()
        self._revision_header = f"{REVISION_HEADER}: %d\r\n".encode()
        # fleet mode: the record's sequence and our generation when last looked, and the revision of
        # the last generation the record named as ours
        self._fleet_seen: tuple[int, int | None] = (0, None)
        self._fleet_revision = 0
        self._loaded = asyncio.Event()  # set (and replaced) each time the worker's tick has loaded

    def router(self) -> Router:
        r = Router()
        base = "/api2/json"
        r.add("GET", f"{base}/ping", self.ping)
        g = self._guarded
        r.add("GET", f"{base}/admin/datastore", g(self.list_stores))
        r.add("GET", f"{base}/admin/datastore/{{store}}/status", g(self.status))
        r.add("GET", f"{base}/admin/datastore/{{store}}/active-operations", g(self.active_operations))
        r.add("POST", f"{base}/admin/datastore/{{store}}/operation", g(self.take_lease))
        r.add_stream(
            "POST",
            f"{base}/admin/datastore/{{store}}/operation",
            self._guarded_start(self.start_stream_lease),
            self.end_stream_lease,
        )
        r.add("DELETE", f"{base}/admin/datastore/{{store}}/operation", g(self.drop_lease))
        r.add("GET", f"{base}/status/datastore-usage", g(self.usage))
        r.add("GET", f"{base}/config/datastore", g(self.config_list))
        r.add("POST", f"{base}/config/datastore", g(self.forward))
        r.add("GET", f"{base}/config/datastore/{{name}}", g(self.config_show))
        r.add("PUT", f"{base}/config/datastore/{{name}}", g(self.forward))
        r.add("DELETE", f"{base}/config/datastore/{{name}}", g(self.forward))
        r.add("GET", f"{base}/nodes/localhost/status", g(self.node_status))
        r.add("GET", "/metrics", g(self.metrics))
        for method in ("GET", "POST", "PUT", "DELETE"):  # token and ACL management: the manager's
            r.add(method, f"{base}/access/users", g(self.forward_access))
            r.add(method, f"{base}/access/users/{{userid}}/token", g(self.forward_access))
            r.add(method, f"{base}/access/users/{{userid}}/token/{{name}}", g(self.forward_access))
            r.add(method, f"{base}/access/acl", g(self.forward_access))
        return r

    # -- remote clients: tokens and privileges ----------------------------------------------------

    @property
    def auth(self) -> AuthCache:
        if self._auth is None:
            reg = self.registry
            # the registry's own config dir unless the worker was told one
            config_dir = self.config_dir or reg._config_dir
            self._auth = AuthCache(config_dir, lambda: reg.segment, mode=reg.mode, ttl=reg.ttl, discard=DISCARD_CACHES)
        return self._auth

    def authenticate_remote(self, request: Request) -> None:
        """Verify a TCP request's API token; the handler's guard answers a failure (after the delay).

        Never raises: the result (token id, or the :class:`AuthError`) is kept on ``request.auth``,
        so the failure can be answered after a sleep instead of at once.  Idempotent."""
        if request.auth is not None:
            return
        try:
            request.auth = self.auth.authenticate(request.headers.get("authorization"))
        except AuthError as err:
            request.auth = err

    def _auth_failure(self, request: Request) -> AuthError | None:
        self.authenticate_remote(request)
        return request.auth if isinstance(request.auth, AuthError) else None

    def _guarded(self, handler: Handler) -> Handler:
        def guarded(request: Request) -> Any:
            call = self._at_revision(handler) if MIN_REVISION_HEADER in request.headers else handler
            if request.remote is None:
                return call(request)
            failure = self._auth_failure(request)
            if failure is None:
                return call(request)
            if isinstance(failure, AuthConfigError):
                raise HTTPError(failure.status, failure.message)
            return self._refuse_later(failure)

        return guarded

    # -- read your writes across hosts (fleet mode) -------------------------------------------------

    def loaded(self) -> None:
        """The worker's tick has loaded what the manager published: wake the requests waiting for
        a revision (:meth:`_at_revision`)."""
        self._loaded.set()
        self._loaded = asyncio.Event()

    def _at_revision(self, handler: Handler) -> Handler:
        return lambda request: self._revision_then(handler, request)

    async def _revision_then(self, handler: Handler, request: Request) -> Any:
        """``handler``'s answer once this worker serves the revision ``x-dsproxy-min-revision``
        names (or a later one): it catches up at once when the manager has published it, else
        waits for its tick to load it (the manager nudges its workers after each mirror write),
        up to ``x-dsproxy-wait`` s -- then 504 naming both revisions.  Outside fleet mode: 400.
        No polling: the answer comes with the load (what ``scripts/bench-fleet`` times with it)."""
        wanted, wait = _revision_request(request)
        deadline = time.monotonic() + wait
        while True:
            self.registry.refresh()  # what the manager published is loaded now
            served = self.served_revision()
            seg = self.registry.segment
            if served is not None and seg is not None and self.registry.loaded_generation is None:
                # nothing kept (cache=off or config, degraded): each lookup reads the file, which
                # the manager writes before the record names its revision
                record = seg.fleet()
                served = served if record is None else record.revision
            if served is None:
                raise HTTPError(400, f"{MIN_REVISION_HEADER}: this host is not in fleet mode (no etcd revision)")
            if served >= wanted:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise HTTPError(
                    504, f"this host serves etcd revision {served}, not {wanted} or later, after waiting {wait:g} s"
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._loaded.wait(), min(remaining, REVISION_LOOK))
        result = handler(request)
        return await result if inspect.isawaitable(result) else result

    def _guarded_start(self, start: Any) -> Any:
        def guarded(request: Request) -> None:
            failure = None if request.remote is None else self._auth_failure(request)
            if failure is not None:  # at the headers of a stream there is no later: refuse now
                self.auth_failures += 1
                raise HTTPError(failure.status, failure.message)
            start(request)

        return guarded

    async def _refuse_later(self, failure: AuthError) -> Reply:
        self.auth_failures += 1
        await asyncio.sleep(AUTH_FAILURE_DELAY)
        raise HTTPError(failure.status, failure.message)

    def _may(self, request: Request, bits: int, parts: tuple[str, ...]) -> bool:
        """Whether the request's client has any of ``bits`` on ``parts`` (always, on the Unix socket)."""
        if getattr(request, "remote", None) is None:  # (tests call some handlers without a request)
            return True
        try:
            return bool(self.auth.privileges(str(request.auth), parts) & bits)
        except AuthConfigError as err:
            raise HTTPError(err.status, err.message) from None

    def _require(self, request: Request, bits: int, *parts: str) -> None:
        if not self._may(request, bits, parts):
            names = " or ".join(acl.privilege_names(bits))
            raise HTTPError(403, f"permission check failed - missing {names} on /{'/'.join(parts)}")

    def response_headers(self) -> bytes:
        """The headers of every answer: ``x-dsproxy-worker`` (this pid) and ``x-dsproxy-generation``
        (the generation this worker serves, once it has loaded one); in fleet mode
        ``x-dsproxy-revision`` too."""
        gen = self.registry.loaded_generation
        if gen is None:
            return self._worker_header
        headers = self._worker_header + self._generation_header % gen
        revision = self.served_revision()
        return headers if revision is None else headers + self._revision_header % revision

    def served_revision(self) -> int | None:
        """Fleet mode: the etcd revision of the config this worker serves (never a newer one; see
        the module); None outside fleet mode or without shared memory.  One load while nothing moved."""
        seg = self.registry.segment
        if seg is None:
            return None
        seq = seg.fleet_sequence()
        if seq == 0:
            return None
        gen = self.registry.loaded_generation
        if (seq, gen) != self._fleet_seen:
            record = seg.fleet()
            if record is not None and record.generation == gen:
                self._fleet_revision = record.revision
            self._fleet_seen = (seq, gen)
        return self._fleet_revision

    # -- lookups --------------------------------------------------------------------------------------

    def _lookup(self, name: str, operation: Operation) -> Handle:
        reloads = self.registry.reloads
        self.lookups += 1
        try:
            handle = self.registry.lookup(name, operation)
        except NoSuchDatastore:
            if not schema.is_name(name):
                raise HTTPError(
                    400, f"parameter verification failed - 'store': invalid datastore name '{name[:64]}'"
                ) from None
            raise HTTPError(404, f"no such datastore '{name}'") from None
        except DatastoreError as err:
            self.lookup_errors += 1
            raise HTTPError(err.status, err.message) from None
        if self.registry.reloads == reloads:
            self.cache_hits += 1
        return handle

    def ping(self, request: Request) -> Reply:
        return data_reply({"pong": True})

    def status(self, request: Request) -> Reply:
        name = request.params["store"]
        if request.remote is not None:
            self._require(request, acl.DATASTORE_AUDIT | acl.DATASTORE_BACKUP, "datastore", name)
        qs = request.query_string
        verbose = False if not qs or qs == "verbose=0" else _flag(request, "verbose")
        handle = self._lookup(name, Operation.READ)
        try:
            if not verbose:  # the hot request: a preformatted body, no json.dumps (~3 us)
                return Reply(200, _USAGE_BODY % _statvfs(handle.path))
            data = _usage(handle.path)
            data["gc-status"] = handle.instance.gc_status
            data["counts"] = _counts(handle.path)
        finally:
            handle.release()
        return data_reply(data)

    def usage(self, request: Request) -> Reply:
        cfg, _ = self._config()
        out = []
        for name in cfg:
            if not self._may(request, acl.DATASTORE_AUDIT | acl.DATASTORE_BACKUP, ("datastore", name)):
                continue  # PBS leaves out what the client may not see
            entry: dict[str, Any] = {"store": name}
            try:
                handle = self._lookup(name, Operation.READ)
            except HTTPError as err:
                entry["error"] = err.message
            else:
                try:
                    entry.update(_usage(handle.path))
                except HTTPError as err:
                    entry["error"] = err.message
                finally:
                    handle.release()
            out.append(entry)
        return data_reply(out)

    def active_operations(self, request: Request) -> Reply:
        name = request.params["store"]
        self._require(request, acl.DATASTORE_AUDIT, "datastore", name)
        cfg, _ = self._config()
        if name not in cfg:
            raise HTTPError(404, f"no such datastore '{name}'")
        return data_reply(self.registry.active_operations(name))

    # -- leases ---------------------------------------------------------------------------------------

    def _lease(self, request: Request, params: dict[str, Any]) -> tuple[int, str]:
        name = request.params["store"]
        op_name = str(params.get("operation", "read")).lower()
        operation = {"read": Operation.READ, "write": Operation.WRITE}.get(op_name)
        if operation is None:
            raise HTTPError(400, f"parameter verification failed - 'operation': '{op_name[:20]}' is not read or write")
        self._require(request, acl.DATASTORE_READ | acl.DATASTORE_BACKUP, "datastore", name)
        leases: dict[int, Handle] = request.connection.state.setdefault("leases", {})
        if len(leases) >= MAX_LEASES_PER_CONNECTION:
            raise HTTPError(
                429,
                f"too many operation leases on this connection: at most {MAX_LEASES_PER_CONNECTION} are held at "
                "once; release one (DELETE .../operation?lease=ID) or use another connection",
            )
        handle = self._lookup(name, operation)
        lease = next(_lease_ids)
        leases[lease] = handle
        request.connection.pinned = True  # a lease holder is not idle: the keep-alive sweep spares it
        return lease, op_name

    def take_lease(self, request: Request) -> Reply:
        """A lease held until ``DELETE`` on this connection or until the connection closes."""
        lease, op_name = self._lease(request, {**request.json(), **request.query()})
        return data_reply(
            {"lease": lease, "store": request.params["store"], "operation": op_name, "worker": os.getpid()}
        )

    def start_stream_lease(self, request: Request) -> None:
        """A lease for the life of a chunked request body (``operation`` in the query string):
        taken when the headers arrive, released when the body ends or the connection drops."""
        lease, _ = self._lease(request, request.query())
        request.connection.state["stream-lease"] = (lease, time.monotonic())

    def end_stream_lease(self, request: Request) -> Reply:
        lease, started = request.connection.state.pop("stream-lease")
        leases: dict[int, Handle] = request.connection.state.get("leases", {})
        handle = leases.pop(lease, None)
        if handle is not None:
            handle.release()
        request.connection.pinned = bool(leases)
        return data_reply(
            {"lease": lease, "store": request.params["store"], "held": round(time.monotonic() - started, 3)}
        )

    def drop_lease(self, request: Request) -> Reply:
        name = request.params["store"]
        leases: dict[int, Handle] = request.connection.state.get("leases", {})
        wanted = request.query().get("lease")
        if wanted is not None:
            lease = int(wanted) if wanted.isascii() and wanted.isdigit() and len(wanted) < 19 else -1
            if lease not in leases or leases[lease].name != name:
                raise HTTPError(404, f"no lease {wanted[:20]} on datastore '{name}' on this connection")
            ids = [lease]
        else:
            ids = [i for i, h in leases.items() if h.name == name]
        for i in ids:
            leases.pop(i).release()
        request.connection.pinned = bool(leases)
        return data_reply({"released": len(ids)})

    @staticmethod
    def connection_lost(connection: Connection) -> None:
        leases: dict[int, Handle] = connection.state.pop("leases", {})
        for handle in leases.values():
            handle.release()

    # -- config ---------------------------------------------------------------------------------------

    def _config(self) -> tuple[Any, str]:
        try:
            return self.registry.config()
        except DatastoreError as err:
            raise HTTPError(err.status, err.message) from None

    def config_list(self, request: Request) -> Reply:
        cfg, digest = self._config()
        return data_reply(
            [{"name": name, **props} for name, props in cfg.items() if self._audits(request, name)], digest=digest
        )

    def _audits(self, request: Request, name: str) -> bool:
        return self._may(request, acl.DATASTORE_AUDIT, ("datastore", name))

    def config_show(self, request: Request) -> Reply:
        name = request.params["name"]
        self._require(request, acl.DATASTORE_AUDIT, "datastore", name)
        cfg, digest = self._config()
        props = cfg.get(name)
        if props is None:
            raise HTTPError(404, f"no such datastore '{name}'")
        return data_reply({"name": name, **props}, digest=digest)

    def list_stores(self, request: Request) -> Reply:
        cfg, _ = self._config()
        return data_reply(
            [
                {"name": name, "comment": props.get("comment"), "maintenance": props.get("maintenance-mode")}
                for name, props in cfg.items()
                if self._audits(request, name)
            ]
        )

    def forward_access(self, request: Request) -> Any:
        """Token and ACL management: forwarded to the manager from the Unix socket only."""
        if request.remote is not None:
            raise HTTPError(
                403, "permission check failed - tokens and ACLs are managed on the local socket (dsproxy token/acl)"
            )
        return self.forward(request)

    def forward(self, request: Request) -> Any:
        if request.remote is not None:
            bits, parts = acl.config_write_privilege(request.method, request.params.get("name"))
            self._require(request, bits, *parts)
            return self._forward(request, {AUTH_ID_HEADER: str(request.auth)})
        peer = request.peer
        if peer is None or request.remote is not None:  # the client id header is for Unix peers only
            raise HTTPError(401, "cannot identify the client (no peer credentials on this socket)")
        return self._forward(request, {CLIENT_HEADER: f"{peer.uid},{peer.gid},{peer.pid}"})

    async def _forward(self, request: Request, headers: dict[str, str]) -> Reply:
        target = request.path + (f"?{request.query_string}" if request.query_string else "")
        ctype = request.headers.get("content-type")
        if ctype:
            headers["content-type"] = ctype
        try:
            async with asyncio.timeout(self.forward_timeout):
                resp = await self._ask_manager(request.method, target, request.body or None, headers)
        except TimeoutError:
            raise HTTPError(
                504,
                f"the manager did not answer within {self.forward_timeout:g} s ({self.manager_socket}); "
                "the change may or may not have been made: read the configuration to see",
            ) from None
        # no refresh here: the write was published (bumped) before the manager answered, so this
        # worker's next lookup sees the new generation anyway -- and the client need not wait for it
        return Reply(resp.status, resp.body, resp.headers.get("content-type", "application/json").encode())

    async def _ask_manager(
        self, method: str, target: str, body: bytes | None, headers: dict[str, str]
    ) -> client_mod.Response:
        conn = self._idle_manager_connection()
        if conn is None:
            try:
                conn = await client_mod.AsyncConnection.open(self.manager_socket)
            except OSError as err:
                raise HTTPError(503, f"the manager is not running ({self.manager_socket}: {err.strerror})") from None
        answered = False
        try:
            resp = await conn.request(method, target, body, headers)
            answered = True
            return resp
        except OSError as err:
            raise HTTPError(503, f"the manager closed the connection: {err}") from None
        finally:  # unanswered (failed, timed out): its state is unknown, never reuse it
            if answered and conn.usable and len(self._manager_idle) < MANAGER_POOL:
                self._manager_idle.append((time.monotonic(), conn))
            else:
                conn.close()

    def _idle_manager_connection(self) -> client_mod.AsyncConnection | None:
        """The most recently used idle connection to the manager still open, or None."""
        pool, fresh = self._manager_idle, time.monotonic() - MANAGER_IDLE
        while pool:
            since, conn = pool.pop()
            if since >= fresh and conn.usable:
                return conn
            conn.close()
        return None

    # -- status and metrics ---------------------------------------------------------------------------

    def node_status(self, request: Request) -> Reply:
        self._require(request, acl.SYS_AUDIT, *_STATUS_PATH)
        reg = self.registry
        seg = reg.segment
        workers = []
        processes = 0
        if seg is not None:
            now = time.monotonic_ns()
            for s in seg.slots():
                processes += 1
                if s.role != shm.Role.WORKER:
                    continue
                workers.append(
                    {
                        "pid": s.pid,
                        "slot": s.slot,
                        "booted": s.booted,
                        "generation": s.generation,
                        "lookups": s.lookups,
                        "requests": s.lookups,  # the name before "lookups", kept for older clients
                        "cache-hits": s.cache_hits,
                        "reloads": s.reloads,
                        "errors": s.errors,
                        "config-errors": s.config_errors,
                        "lookup-errors": s.lookup_errors,
                        "heartbeat-age": round(max(0, now - s.heartbeat_ns) / 1e9, 3),
                    }
                )
        data = {
            "pid": os.getpid(),
            "uptime": round(time.time() - self.started, 3),
            "cache": reg.mode,
            "ttl": reg.ttl,
            "generation": reg.generation,
            "loaded-generation": reg.loaded_generation,
            "degraded": reg.degraded,
            "config-error": reg.config_error,
            "instances": len(reg.instances),
            # the answering worker's: loads that applied the ring's per-store changes (issue 9)
            "changes-applied": reg.changes_applied,
            # ... of which read only the changed bytes of the file (the manager's file record)
            "changes-patched": reg.changes_patched,
            # ... of which read only the overlay (fleet mode: dsproxy.config.overlay)
            "changes-overlaid": reg.changes_overlaid,
            "workers": workers,
            "processes": processes,
            "rlimit-nofile": limits.of_registry(reg).as_dict(),
            "auth-failures": self.auth_failures,
            "fds": reg.fds,  # the answering worker's fd budget (dsproxy.fdbudget)
            # the segment the answering worker maps: a store-table move gives a new inode (same name)
            "shm": None if seg is None else {"name": seg.name, "inode": seg.inode, "store-table": seg.max_stores},
        }
        fleet = self.fleet_status()
        if fleet is not None:
            data["fleet"] = fleet
        return data_reply(data)

    def fleet_status(self) -> dict[str, Any] | None:
        """Fleet mode: the revision this worker serves and the manager's link to etcd (the record)."""
        seg = self.registry.segment
        record = None if seg is None else seg.fleet()
        if record is None:
            return None
        return {
            "revision": self.served_revision(),  # of the answering worker
            "mirror-revision": record.revision,  # what the manager has written to the file
            "state": record.state.name.lower(),
            "disconnected-since": record.disconnected_since,
            "hand-edits-refused": record.hand_edits,
        }

    def metrics(self, request: Request) -> Reply:
        from .metrics import render

        self._require(request, acl.SYS_AUDIT, *_STATUS_PATH)
        body, content_type = render(self.registry, self.fleet_status())
        body += (
            b"# HELP dsproxy_auth_failures_total Failed token authentications answered by this worker\n"
            b"# TYPE dsproxy_auth_failures_total counter\n"
            b'dsproxy_auth_failures_total{pid="%d"} %d.0\n' % (os.getpid(), self.auth_failures)
        )
        return Reply(200, body, content_type)

    def publish(self) -> None:
        """Copy this worker's statistics into its process slot (called from the worker's tick)."""
        self.registry.publish_stats(self.lookups, self.cache_hits, self.lookup_errors)


#: s between looks at the record while a min-revision request waits without a load to wake it
#: (a nudge lost to a worker still booting: the tick comes within its own 0.1 s anyway)
REVISION_LOOK: Final = 0.25


def _revision_request(request: Request) -> tuple[int, float]:
    """The revision and the wait a min-revision request asks for (400 naming a bad header)."""
    raw = request.headers.get(MIN_REVISION_HEADER, "").strip()
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 19 and 0 < int(raw) < 2**63):
        raise HTTPError(400, f"{MIN_REVISION_HEADER}: expected an etcd revision (a positive integer), got {raw[:40]!r}")
    wait_raw = request.headers.get(WAIT_HEADER)
    if wait_raw is None:
        return int(raw), MIN_REVISION_WAIT
    try:
        wait = float(wait_raw) if len(wait_raw) <= 40 else math.nan
    except ValueError:
        wait = math.nan
    if not 0 <= wait <= MIN_REVISION_WAIT_LIMIT:  # (NaN too)
        raise HTTPError(
            400, f"{WAIT_HEADER}: expected seconds from 0 to {MIN_REVISION_WAIT_LIMIT:g}, got {wait_raw[:40]!r}"
        )
    return int(raw), wait


_USAGE_BODY = b'{"data":{"total":%d,"used":%d,"avail":%d}}'


def _statvfs(path: str) -> tuple[int, int, int]:
    """``(total, used, avail)`` bytes of the file system holding ``path``."""
    try:
        st = os.statvfs(path)
    except OSError as err:
        raise HTTPError(500, f"unable to stat datastore path '{path}' - {err.strerror}") from None
    total = st.f_blocks * st.f_frsize
    return total, total - st.f_bfree * st.f_frsize, st.f_bavail * st.f_frsize


def _usage(path: str) -> dict[str, Any]:
    total, used, avail = _statvfs(path)
    return {"total": total, "used": used, "avail": avail}


def _counts(path: str) -> dict[str, dict[str, Any]]:
    """Backup groups and snapshots per type (``<path>/<type>/<id>/<time>/``), as PBS counts them.

    The store's tree belongs to its owner: a directory that cannot be listed is an inline
    ``{"error": ...}`` for that type, never a failed status request."""
    counts: dict[str, dict[str, Any]] = {}
    for kind in _BACKUP_TYPES:
        groups = snapshots = 0
        try:
            with os.scandir(os.path.join(path, kind)) as it:
                for group in it:
                    if not group.is_dir(follow_symlinks=False):
                        continue
                    groups += 1
                    with os.scandir(group.path) as snaps:
                        snapshots += sum(1 for s in snaps if s.is_dir(follow_symlinks=False))
        except (FileNotFoundError, NotADirectoryError):
            pass
        except OSError as err:
            counts[kind] = {"error": f"unable to list backup groups in '{path}/{kind}' - {err.strerror}"}
            continue
        if groups:
            counts[kind] = {"groups": groups, "snapshots": snapshots}
    return counts


__all__ = ["WorkerApp", "error_reply"]
