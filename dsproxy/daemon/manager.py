"""``dsproxy manager``: the only writer of ``datastore.cfg`` (docs/design.md §2).

One process, one asyncio loop, one writer thread.  It

* creates the shared-memory segment at start (or recreates it when it is foreign, truncated or of
  another layout -- docs/design.md §10) and bumps the generation once, so that edits made while no manager
  ran are published;
* removes, before it serves, what creates interrupted by a crash laid out and no section names --
  only what the create journal says this manager was making (:mod:`dsproxy.daemon.journal`);
* serves config writes on ``<run>/manager.sock`` (mode 0660): ``POST /api2/json/config/datastore``,
  ``PUT|DELETE /api2/json/config/datastore/{name}``; :mod:`dsproxy.daemon.writer` does the work in
  the writer thread, so a slow write (the 10 s config lock) never stalls the loop;
* checks who asks (:class:`Authorizer`): the connecting peer by ``SO_PEERCRED``; a proxy worker
  passes the end client's credentials in ``x-dsproxy-client`` (``uid,gid,pid``), which is believed
  only from a trusted peer (root, the manager's own user, or ``--proxy-user``);
* watches the file (``stat`` every ``--watch-interval`` s, default 0.5) and bumps the generation when
  it changed without a bump (a manual edit), so every worker reloads within a second;
* is the only writer of ``token.shadow``, ``user.cfg`` and ``acl.cfg`` too
  (``/api2/json/access/users/{userid}/token/{name}``, ``/api2/json/access/acl``, PBS's endpoints;
  :mod:`dsproxy.auth.writer`), bumps their generations and watches them for hand edits; a TCP
  client's config write arrives with its token id (``x-dsproxy-auth-id``) and is checked against
  the ACL from the files;
* completes maintenance transitions (§5.1): after setting ``offline``/``unmount``/``delete`` it
  waits until every live process serving datastores has loaded the new generation (or
  ``--maintenance-timeout`` passes) and reports the operations still active and who lags;
* in fleet mode (``--etcd``, :mod:`dsproxy.fleet.mirror`, imported only then) mirrors etcd into
  ``datastore.cfg``: config writes become etcd transactions, hand edits are undone, and a
  maintenance transition waits for every host of the fleet.

Exit codes: 0 stopped by a signal, 1 runtime failure, 3 cannot start (socket in use, no access).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import grp
import logging
import os
import pwd
import re
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import uvloop

from ..auth import acl
from ..auth.errors import AuthError, Refused
from ..auth.files import AccessFiles
from ..auth.writer import AccessWriter
from ..ipc import shm
from ..ipc.proc import Liveness
from . import limits, systemd
from .http import HTTPError, Limits, PeerCredentials, Reply, Request, Router, Server, bind_unix_socket, data_reply
from .options import ManagerOptions as ManagerOptions  # re-exported: it used to live here
from .protocol import AUTH_ID_HEADER, CLIENT_HEADER, EXIT_BOOT_FAILURE
from .writer import ConfigWriter, FleetWrite, WriteRefused, WriteResult

if TYPE_CHECKING:
    from ..fleet.mirror import Mirror
    from ..fleet.tls import EtcdTLS

log = logging.getLogger("dsproxy.manager")

#: the processes a maintenance transition waits for: those that serve lookups
SERVING_ROLES = frozenset({shm.Role.WORKER, shm.Role.LIBRARY})
T = TypeVar("T")


@dataclass(frozen=True)
class Authorizer:
    """Who may change the configuration.

    Writers: root, the manager's own user, members of ``admin_group``.  Trusted forwarders (whose
    ``x-dsproxy-client`` header is believed): root, the manager's user, ``proxy_uids``.
    """

    own_uid: int
    admin_gid: int | None = None
    proxy_uids: frozenset[int] = frozenset()
    access: AccessFiles | None = None  # the token privileges of forwarded TCP writes

    def _trusted_forwarder(self, peer: PeerCredentials) -> None:
        if peer.uid not in (0, self.own_uid) and peer.uid not in self.proxy_uids:
            raise HTTPError(403, f"uid {peer.uid} may not forward requests for other clients")

    def client_of(self, request: Request) -> PeerCredentials:
        peer = request.peer
        if peer is None:
            raise HTTPError(401, "cannot identify the client (no peer credentials on this socket)")
        forwarded = request.headers.get(CLIENT_HEADER)
        if forwarded is None:
            return peer
        self._trusted_forwarder(peer)
        try:
            uid, gid, pid = (int(x) for x in forwarded.split(","))
        except ValueError:
            raise HTTPError(400, f"malformed {CLIENT_HEADER} header") from None
        return PeerCredentials(pid, uid, gid)

    def check_token_writer(self, request: Request, auth_id: str) -> PeerCredentials:
        """A TCP client's write, forwarded by a worker that verified its token: the privilege is
        checked again here, from the files (the manager trusts the worker's token check, not its
        permission check)."""
        peer = request.peer
        if peer is None or self.access is None:
            raise HTTPError(401, "cannot identify the client (no peer credentials on this socket)")
        self._trusted_forwarder(peer)
        bits, parts = acl.config_write_privilege(request.method, request.params.get("name"))
        try:
            have = self.access.read_access().privileges(auth_id, parts)
        except AuthError as err:
            raise HTTPError(err.status, err.message) from None
        if not have & bits:
            names = " or ".join(acl.privilege_names(bits))
            raise HTTPError(403, f"permission check failed - missing {names} on /{'/'.join(parts)}")
        return peer

    def check_writer(self, request: Request) -> PeerCredentials:
        auth_id = request.headers.get(AUTH_ID_HEADER)
        if auth_id is not None:
            return self.check_token_writer(request, auth_id)
        client = self.client_of(request)
        if client.uid in (0, self.own_uid):
            return client
        if self.admin_gid is not None and self.admin_gid in _groups_of(client.uid, client.gid):
            return client
        raise HTTPError(403, f"permission denied: uid {client.uid} may not change the datastore configuration")


def _groups_of(uid: int, gid: int) -> set[int]:
    try:
        return set(os.getgrouplist(pwd.getpwuid(uid).pw_name, gid))
    except KeyError:
        return {gid}


class Manager:
    def __init__(self, options: ManagerOptions) -> None:
        self.options = options
        self.paths = options.paths
        self.seg: shm.Segment | None = None
        self.slot = -1
        self.liveness = Liveness()  # the segments' look at who is alive (pidfds: one poll a look)
        #: the segment processes are still moving from after a move (their operations count there)
        self.previous: shm.Segment | None = None
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="writer")
        owner = None
        if options.store_owner:
            pw = pwd.getpwnam(options.store_owner)
            owner = (pw.pw_uid, pw.pw_gid)
        self.writer = ConfigWriter(self.paths, lambda: self.seg, owner)
        self.writer._previous = lambda: self.previous
        self.authorizer = Authorizer(
            own_uid=os.geteuid(),
            admin_gid=grp.getgrnam(options.admin_group).gr_gid if options.admin_group else None,
            proxy_uids=frozenset({pwd.getpwnam(options.proxy_user).pw_uid}) if options.proxy_user else frozenset(),
            access=AccessFiles(self.paths.config_dir),
        )
        self.access = AccessWriter(self.paths.config_dir, lambda: self.seg)
        self.stopping = asyncio.Event()
        self.fleet: Mirror | None = None  # fleet mode (--etcd)

    # -- start ----------------------------------------------------------------------------------------

    def open_segment(self, publish: bool = True) -> None:
        """Open (or create) the segment and bump the generation once -- unless not ``publish``:
        in fleet mode the first mirror write publishes what changed, per store."""
        stores = shm.table_size(_configured_estimate(self.paths.config_file))
        try:
            self.seg = shm.Segment.open(self.paths.run_dir, create=True, stores=stores)
        except shm.SegmentError as err:
            log.warning("%s: replacing it with a fresh segment", err)
            try:
                self.seg = shm.recreate(self.paths.run_dir, stores=stores)
            except shm.SegmentError as err2:
                log.error("running without shared memory (workers run degraded): %s", err2)
                return
        self._adopt(self.seg)
        # publish whatever changed while no manager ran
        gen = self.seg.bump_generation() if publish else self.seg.generation()
        log.info("shared memory %s ready, generation %d", self.seg.name, gen)

    def _adopt(self, seg: shm.Segment) -> None:
        """Make ``seg`` the manager's segment: a slot of its own, marked booted."""
        self.seg = seg
        seg.liveness = self.liveness
        self.slot = seg.claim_slot(shm.Role.MANAGER)
        seg.set_booted(self.slot)

    async def run(self) -> int:
        if self.options.etcd and self.options.demo_stores:  # before anything is made or bound
            log.error("--demo-stores and --etcd: in fleet mode the datastores are etcd's (see dsproxy fleet import)")
            return EXIT_BOOT_FAILURE
        try:
            self.paths.ensure()
        except OSError as err:
            log.error("cannot use the config or run directory: %s", err)
            return EXIT_BOOT_FAILURE
        try:
            sock = bind_unix_socket(str(self.paths.run_dir / "manager.sock"), self.options.socket_mode)
        except OSError as err:
            log.error("cannot listen on %s: %s", self.paths.run_dir / "manager.sock", err.strerror or err)
            return EXIT_BOOT_FAILURE
        if not self.options.etcd:
            self.writer.drop_stale_overlay()
        self.open_segment(publish=not self.options.etcd)
        if not self.options.etcd:  # fleet mode: after the first read of etcd, which names the stores (Mirror.load)
            await self.in_writer(self.writer.recover_interrupted_creates)
        if self.options.demo_stores:
            try:
                added = await self.in_writer(self.writer.ensure_demo_stores, self.options.demo_stores)
            except WriteRefused as err:
                log.error("cannot create the demo datastores: %s", err.message)
                return EXIT_BOOT_FAILURE
            if added:
                log.info("added %d demo datastores", added)
        await self.in_writer(self.writer.check_file)
        await self.in_writer(self.access.check_files)  # the files as they are now: later changes are edits
        if self.options.etcd:
            await self.start_fleet()
        await self.in_writer(self.writer.leave_parse)  # (the file as read or first mirrored)
        server = Server(self.router(), Limits(request_timeout=30.0))
        await server.serve(sock)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload()))
        systemd.write_pid_file(self.paths.run_dir / "manager.pid")
        systemd.notify("READY=1", f"STATUS=serving {self.paths.run_dir / 'manager.sock'}")
        log.info("manager ready on %s", self.paths.run_dir / "manager.sock")
        watch = asyncio.ensure_future(self.watch())
        await self.stopping.wait()
        systemd.notify("STOPPING=1")
        watch.cancel()
        await server.drain(5.0)
        if self.fleet is not None:
            await self.fleet.stop()
        self.executor.shutdown(wait=True)
        self.close()
        return 0

    async def start_fleet(self) -> None:
        """Fleet mode: etcd read (if it answers) and followed from now on."""
        from ..fleet.mirror import Mirror

        options = self.options
        assert options.etcd
        tls = etcd_tls(options)
        self.fleet = Mirror(
            self.writer,
            self.in_writer,
            lambda: self.seg,
            endpoints=options.etcd,
            prefix=options.etcd_prefix,
            host_id=options.host_id,
            lease_ttl=options.fleet_lease_ttl,
            fencing=options.fleet_fencing,
            timeout=options.etcd_timeout,
            maintenance_timeout=options.maintenance_timeout,
            tls=tls,
        )
        etcd = ",".join(options.etcd)
        secured = "" if tls is None else f" over TLS ({', '.join(tls.subjects) or 'the system trust store'})"
        log.info("fleet mode: host '%s', etcd %s%s, prefix %s", self.fleet.host_id, etcd, secured, options.etcd_prefix)
        await self.fleet.start()
        # the store table for what the first read mirrored, before anyone serves it: a host that
        # starts with an empty file has a table of 65,536 entries, and its workers loading 100,000
        # names filled it and then probed all of it for each name left (a worker stuck >60 s in
        # register_stores, or a move under way while they boot) until the watch's check moved it
        await self.in_writer(self.check_names)

    async def reload(self) -> None:
        """SIGHUP: re-check the file now (publishing a manual edit) and the segment."""
        systemd.notify("RELOADING=1", f"MONOTONIC_USEC={systemd.monotonic_usec()}")
        # the watch's own checks, now, and like them in the writer thread
        await self.in_writer(self.check_segment)
        await self.in_writer(self.writer.check_file)
        await self.in_writer(self.access.check_files)
        log.info("reloaded")
        systemd.notify("READY=1")

    def close(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.paths.run_dir / "manager.pid")
        if self.seg is not None:
            self.seg.free_slot(self.slot)
            last = not self.seg.slots()  # nobody attached: a clean stop leaves nothing in /dev/shm
            self.seg.close()
            self.seg = None
            if last:
                shm.unlink(self.paths.run_dir)

    def check_segment(self) -> None:
        """Detect a segment that was removed, replaced, truncated or scribbled over, and replace it
        (docs/design.md §10): the old one is retired so that every process moves to the new one."""
        seg = self.seg
        if seg is None:
            self.open_segment()  # none at start, or a failed replacement: try again
            return
        problem = seg.check()
        if problem is None:
            seg.beat(self.slot)
            self._drop_previous()
            self.check_names()
            return
        log.error("%s: replacing it", problem)
        self.seg = None
        try:
            new = shm.recreate(self.paths.run_dir, mapped=seg, stores=seg.max_stores)
        except shm.SegmentError as err:
            log.error("cannot replace the shared memory (workers run degraded): %s", err)
            return
        finally:
            # Only a truncated mapping is closed at once (touching it kills).  Any other stays
            # mapped until its last user drops it: a maintenance wait in progress keeps reading it,
            # and sees each process acknowledge by freeing its old slot as it moves over.
            if problem.kind is shm.ProblemKind.TRUNCATED:
                with contextlib.suppress(Exception):
                    seg.close()
        if problem.kind is not shm.ProblemKind.TRUNCATED and self.previous is None:
            seg.free_slot(self.slot)
            self.previous = seg  # processes carry their operations over: count in both meanwhile
        self._adopt(new)
        self.writer.rebase(new.generation())
        log.info("shared memory %s replaced, generation %d", new.name, new.generation())

    def check_names(self) -> None:
        """Move everyone to a larger or compacted segment when the store table fills or is mostly
        dead names (:func:`dsproxy.ipc.shm.move_size`): the replace-and-retire path, with each
        process carrying its operations over, counted meanwhile in both (``moving_totals``)."""
        seg, configured = self.seg, self.writer.configured()
        if seg is None or configured is None or self.previous is not None or not self.writer.counted():
            return  # (a file edited since it was counted: the watch counts it first, the next check moves)
        size = shm.move_size(seg, configured)
        if size is None:
            return
        log.info(
            "store table: %d of %d entries used, %d stores configured; moving to a table of %d",
            seg.names_used,
            seg.max_stores,
            configured,
            size,
        )
        try:
            new = shm.recreate(self.paths.run_dir, mapped=seg, stores=size)
        except shm.SegmentError as err:
            log.error("cannot move to a larger store table: %s", err)
            return
        seg.free_slot(self.slot)
        self.previous = seg
        self._adopt(new)
        self.writer.rebase(new.generation())

    def _drop_previous(self) -> None:
        """Unmap the segment moved from once no live process counts there any more."""
        prev, seg = self.previous, self.seg
        if prev is None or seg is None:
            return
        superseded = {s.origin - 1 for s in seg.slots() if s.origin}
        if all(s.slot in superseded for s in prev.slots()):
            self.previous = None
            prev.close()

    async def in_writer(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def watch(self) -> None:
        interval = self.options.watch_interval
        watchdog = systemd.watchdog_interval()
        last_ping = 0.0
        while True:
            await asyncio.sleep(interval)
            try:
                # both in the writer thread: a write never bumps a segment being replaced
                await self.in_writer(self.check_segment)
                await self.in_writer(self.writer.check_file)
                await self.in_writer(self.access.check_files)
            except Exception:
                log.exception("checking datastore.cfg or the shared memory failed")
            if watchdog is not None and time.monotonic() - last_ping >= watchdog:
                systemd.notify("WATCHDOG=1")
                last_ping = time.monotonic()

    # -- the API --------------------------------------------------------------------------------------

    def router(self) -> Router:
        r = Router()
        r.add("GET", "/api2/json/ping", lambda req: data_reply({"pong": True}))
        r.add("POST", "/api2/json/config/datastore", self.create)
        r.add("PUT", "/api2/json/config/datastore/{name}", self.update)
        r.add("DELETE", "/api2/json/config/datastore/{name}", self.remove)
        r.add("GET", "/api2/json/access/users", self.list_users)
        r.add("GET", "/api2/json/access/users/{userid}/token", self.list_tokens)
        r.add("POST", "/api2/json/access/users/{userid}/token/{name}", self.create_token)
        r.add("PUT", "/api2/json/access/users/{userid}/token/{name}", self.update_token)
        r.add("DELETE", "/api2/json/access/users/{userid}/token/{name}", self.remove_token)
        r.add("GET", "/api2/json/access/acl", self.list_acl)
        r.add("PUT", "/api2/json/access/acl", self.update_acl)
        return r

    # -- tokens and ACLs (dsproxy.auth.writer) ------------------------------------------------------

    async def _access(self, request: Request, fn: Callable[..., T], *args: Any) -> T:
        if request.headers.get(AUTH_ID_HEADER) is not None:
            raise HTTPError(403, "permission check failed - API tokens cannot manage tokens or ACLs")
        self.authorizer.check_writer(request)
        try:
            return await self.in_writer(fn, *args)
        except Refused as err:
            raise HTTPError(err.status, err.message) from None

    @staticmethod
    def _token_id(request: Request) -> str:
        return f"{request.params['userid']}!{request.params['name']}"

    async def list_users(self, request: Request) -> Reply:
        tokens = await self._access(request, self.access.list_tokens)
        users: dict[str, list[dict[str, Any]]] = {}
        for t in tokens:
            users.setdefault(t["tokenid"].partition("!")[0], []).append(t)
        return data_reply([{"userid": u, "tokens": ts} for u, ts in users.items()])

    async def list_tokens(self, request: Request) -> Reply:
        return data_reply(await self._access(request, self.access.list_tokens, request.params["userid"]))

    async def create_token(self, request: Request) -> Reply:
        return data_reply(
            await self._access(request, self.access.create_token, self._token_id(request), request.json())
        )

    async def update_token(self, request: Request) -> Reply:
        return data_reply(
            await self._access(request, self.access.update_token, self._token_id(request), request.json())
        )

    async def remove_token(self, request: Request) -> Reply:
        await self._access(request, self.access.remove_token, self._token_id(request))
        return data_reply(None)

    async def list_acl(self, request: Request) -> Reply:
        return data_reply(await self._access(request, self.access.list_acl))

    async def update_acl(self, request: Request) -> Reply:
        await self._access(request, self.access.update_acl, {**request.query(), **request.json()})
        return data_reply(None)

    async def _do(self, request: Request, fn: Callable[..., WriteResult], *args: Any) -> WriteResult:
        client = self.authorizer.check_writer(request)
        try:
            result = await self.in_writer(self._write_then_check, fn, *args)
        except WriteRefused as err:
            raise HTTPError(err.status, err.message) from None
        log.debug("write by uid %d pid %d: generation %s", client.uid, client.pid, result.generation)
        return result

    # -- fleet mode: a write is an etcd transaction (dsproxy.fleet.mirror) ----------------------------

    async def _fleet_write(
        self, request: Request, fn: Callable[..., FleetWrite], *args: Any
    ) -> tuple[Mirror, FleetWrite, int, tuple[int | None, str | None]]:
        """Validate (writer thread), commit to etcd, wait for the mirror here: ``(fleet, write,
        revision, (generation, digest) of the file then)``.  A create's lay-out is undone when the
        transaction did not apply."""
        from ..fleet.mirror import FleetRefused

        fleet = self.fleet
        assert fleet is not None
        client = self.authorizer.check_writer(request)
        try:
            fleet.check_writable()
            write = await self.in_writer(fn, *args)
        except (WriteRefused, FleetRefused) as err:
            raise HTTPError(err.status, err.message) from None
        done: bool | None = False
        try:
            if write.value is None:
                await fleet.check_idle_everywhere(write.name)
            txn = await fleet.commit(write)
            done = True
        except FleetRefused as err:
            done = True if err.committed else None if err.unknown else False
            raise HTTPError(err.status, err.message) from None
        finally:
            now = await self.in_writer(self._fleet_done, write, done)
        log.debug("fleet write by uid %d pid %d: etcd revision %d", client.uid, client.pid, txn.revision)
        return fleet, write, txn.revision, now

    def _fleet_done(self, write: FleetWrite, done: bool | None) -> tuple[int | None, str | None]:
        """(Writer thread.)  After a fleet write's transaction, in one turn (three turns were
        ~1-3 ms of a 1,000-store fleet's write answer under load): its create's lay-out kept or
        undone (:meth:`ConfigWriter.fleet_finish`); once applied, the store-table check and the
        file's generation and digest for the answer."""
        self.writer.fleet_finish(write, done)
        if not done:
            return None, None
        self.check_names()
        return self._file_now()

    async def _fleet_reply(
        self,
        name: str,
        revision: int,
        extra: dict[str, Any] | None = None,
        now: tuple[int | None, str | None] | None = None,
    ) -> Reply:
        """A fleet write's answer, with the file's digest -- hashed in the writer thread if no one
        asked since the last mirror write (:attr:`KeptConfig.digest`: the hosts that did not take
        the request do not hash at all), not on this loop (~5-10 ms at 100,000 stores); ``now``:
        the generation and digest :meth:`_fleet_done` took (else taken here)."""
        generation, file_digest = now if now is not None else await self.in_writer(self._file_now)
        data = {"name": name, "generation": generation, "revision": revision, **(extra or {})}
        return data_reply(data, digest=file_digest)

    def _file_now(self) -> tuple[int | None, str | None]:
        """(Writer thread.)  The generation and digest of the file as last written."""
        kept = self.writer.kept
        return self.writer.state.generation, None if kept is None else self.writer.served_digest(kept)

    async def fleet_update(self, request: Request, name: str) -> Reply:
        from ..fleet.mirror import waits

        fleet, write, revision, now = await self._fleet_write(request, self.writer.fleet_update, name, request.json())
        if not waits(write.maintenance):
            return await self._fleet_reply(name, revision, now=now)
        timeout = self.options.maintenance_timeout
        lagging, others = await asyncio.gather(
            fleet.wait_served(revision, timeout), fleet.transition(name, revision, timeout)
        )
        read, write_ops = await self.in_writer(self.writer.active_operations, name)
        if lagging:
            log.warning(
                "maintenance of '%s': %d processes here had not loaded etcd revision %d after %.0f s: %s",
                name, len(lagging), revision, timeout, ", ".join(str(s.pid) for s in lagging),
            )  # fmt: skip
        return await self._fleet_reply(
            name,
            revision,
            {
                "active-operations": {"read": read + others.active[0], "write": write_ops + others.active[1]},
                "lagging-processes": [s.pid for s in lagging],
                "lagging-hosts": others.lagging_hosts,
            },
        )

    # -- the config writes ------------------------------------------------------------------------------

    def _write_then_check(self, fn: Callable[..., WriteResult], *args: Any) -> WriteResult:
        """A write, then the store-table check it may call for, in one turn of the writer thread
        (two turns let a watch tick in between: up to ~10 ms more for the write at 100,000 stores)."""
        result = fn(*args)
        self.check_names()
        return result

    async def create(self, request: Request) -> Reply:
        if self.fleet is not None:
            _, write, revision, now = await self._fleet_write(request, self.writer.fleet_create, request.json())
            return await self._fleet_reply(write.name, revision, now=now)
        result = await self._do(request, self.writer.create, request.json())
        return data_reply({"name": result.name, "generation": result.generation}, digest=result.digest)

    async def update(self, request: Request) -> Reply:
        name = request.params["name"]
        if self.fleet is not None:
            return await self.fleet_update(request, name)
        result = await self._do(request, self.writer.update, name, request.json())
        data: dict[str, Any] = {"name": name, "generation": result.generation}
        mode = result.maintenance
        if mode is not None and mode.evicts and result.generation is not None:
            data.update(await self.complete_transition(name, result.generation))
        return data_reply(data, digest=result.digest)

    async def remove(self, request: Request) -> Reply:
        name = request.params["name"]
        query = request.query()
        expected = query.get("digest") or request.json().get("digest")
        if self.fleet is not None:
            _, _, revision, now = await self._fleet_write(request, self.writer.fleet_remove, name, expected)
            return await self._fleet_reply(name, revision, now=now)
        result = await self._do(request, self.writer.remove, name, expected)
        return data_reply({"name": name, "generation": result.generation}, digest=result.digest)

    async def complete_transition(self, name: str, generation: int) -> dict[str, Any]:
        """Wait until every serving process has loaded ``generation`` (§5.1)."""
        seg = self.seg
        lagging = [] if seg is None else await wait_for_generation(seg, generation, self.options.maintenance_timeout)
        read, write = await self.in_writer(self.writer.active_operations, name)
        if lagging:
            log.warning(
                "maintenance of '%s': %d processes had not loaded generation %d after %.0f s: %s",
                name,
                len(lagging),
                generation,
                self.options.maintenance_timeout,
                ", ".join(str(s.pid) for s in lagging),
            )
        return {
            "active-operations": {"read": read, "write": write},
            "lagging-processes": [s.pid for s in lagging],
        }


async def wait_for_generation(
    seg: shm.Segment, generation: int, timeout: float, roles: frozenset[int] = SERVING_ROLES
) -> list[shm.SlotInfo]:
    """Wait, without blocking the loop, until every live process of ``roles`` serves ``generation``.

    Returns the slots that still had not acknowledged when ``timeout`` passed (empty on success).
    """
    deadline = time.monotonic() + timeout
    while True:
        lagging = seg.lagging(generation, roles=roles)
        if not lagging or time.monotonic() >= deadline:
            return lagging
        await asyncio.sleep(0.005)


def _configured_estimate(config_file: os.PathLike[str] | str) -> int:
    """About how many stores the file names (its header lines): to size a new store table."""
    try:
        with open(config_file, "rb") as f:
            return len(re.findall(rb"(?m)^[A-Za-z]", f.read()))
    except OSError:
        return 0


def etcd_tls(options: ManagerOptions) -> EtcdTLS | None:
    """TLS to etcd as the options ask (:mod:`dsproxy.fleet.tls`): None for plain text; ValueError
    (a :class:`~dsproxy.fleet.tls.TLSFileError` for a file) naming what is wrong."""
    from ..fleet import tls

    files = (options.etcd_cacert, options.etcd_cert, options.etcd_key)
    if not tls.wanted(options.etcd or (), any(f is not None for f in files)):
        return None
    return tls.load(*files)


def main(options: ManagerOptions) -> int:
    systemd.setup_logging("dsproxy-manager")
    limits.raise_soft_limit()  # a create lays out stores; the proxy master reports the store need
    if options.etcd:
        try:
            etcd_tls(options)  # a wrong file is a start failure naming it, not a handshake failing forever
        except ValueError as err:
            log.error("%s", err)
            return EXIT_BOOT_FAILURE
    elif any(f is not None for f in (options.etcd_cacert, options.etcd_cert, options.etcd_key)):
        log.error("--etcd-cacert/--etcd-cert/--etcd-key are for fleet mode: give --etcd too")
        return EXIT_BOOT_FAILURE
    try:
        manager = Manager(options)
    except KeyError as err:
        log.error("unknown user or group: %s", err)
        return EXIT_BOOT_FAILURE
    try:
        return uvloop.run(manager.run())
    except Exception:
        log.exception("the manager failed")
        manager.close()
        return 1
