"""The manager in fleet mode (``dsproxy manager --etcd``): etcd's datastores mirrored into this host.

The fleet's datastore configuration lives in etcd, one key per store (``PREFIX/datastores/NAME`` ->
the store's section in canonical PBS syntax).  Each host's manager mirrors it into its local
``datastore.cfg`` through the writer it has always had (:mod:`dsproxy.daemon.writer`: locked
O(changed) writes, per-store changes in the invalidation ring), so workers, the API and every
guarantee inside a host stay what they are; what changes is where a config write goes and what a
maintenance transition waits for.

* **Start**: one consistent read of ``PREFIX/datastores/``; the file becomes exactly the mirror in
  one write that publishes the per-store difference with the file as it was (a restarted host's
  workers apply a delta), mirrored stores lacking directories on this host are laid out.  Then
  one long-lived watch of ``PREFIX/`` (datastores and host keys) from the next revision; each
  batch of datastore events is one local write + one bump (:meth:`ConfigWriter.mirror_apply`), a
  re-list after compaction the difference with the mirror.  A value that does not parse, or whose
  header names another store, is logged with its key and mod_revision and not mirrored: the host
  keeps that store's last good section (or lacks it).  Values are decoded in the writer thread:
  one parse of all of them joined at a full read (checked to give exactly one section per key, in
  key order -- else each value is parsed on its own to find the bad ones).
* **Writes** (create/update/remove on ``manager.sock``, forwarded ones included) are validated as
  before, against the mirror (:meth:`ConfigWriter.fleet_create` ...; a create lays the store out
  here first), then become a compare-and-set on the store's key with the mod_revision the mirror
  knows (create: the key must not exist): two hosts racing on one store give one winner, and the
  loser a 409 naming the store.  The answer waits until this host's mirror applied the
  transaction's revision, so it carries the local generation as before.  etcd unreachable (or
  not read yet, or this host fenced): 503, nothing written.
* **Host keys** ``PREFIX/hosts/ID`` (JSON, on a lease of ``--fleet-lease-ttl`` s refreshed every
  TTL/3 by :class:`~dsproxy.fleet.etcd.Lease`): the revision every serving process of this host
  has loaded (the fleet record in shared memory names the revision of each generation; a worker
  still on an older generation holds the host's revision back), the generation, the workers, and
  ``active``: the operation counts (non-zero ones) of the stores other hosts wait on -- a store
  written in a waiting maintenance mode lately, a store another host is ``asking`` about
  for a remove.  A host puts its key when it first serves a revision someone may wait for (a datastore
  change, or another host's question) and when what it reports changes -- never in answer to a
  plain refresh of another host's key, so the hosts do not ping-pong.
* **Fleet-wide transitions** (``offline``/``unmount``/``delete``/``s3-refresh``): after the
  transaction, wait until this host's workers serve it and every live host key shows a revision at
  least the transaction's (event driven: the watch wakes the wait), or ``--maintenance-timeout``
  passes -- then the answer names ``lagging-hosts``; ``active-operations`` is the fleet-wide sum.
* **Remove** asks first: this host's key gets ``asking: [NAME]``; every live host answers with
  its count for NAME at a revision past the question; any operation anywhere (here included) is a
  409, a host that does not answer within the maintenance timeout a 503 naming it.
* **Partitions**: cut off from etcd, the host keeps serving its last mirror, refuses config
  writes (503), and the fleet record says ``disconnected since`` (status, metrics); on reconnect
  the watch resumes where it stopped (or re-lists) and the host catches up.  Once its lease is
  gone the other hosts no longer wait for it; ``--fleet-fencing offline`` then rewrites its file
  with every store ``offline`` (naming the reason: new operations are refused with a clear
  error, running ones finish), until it has a lease again and restores the real mirror.  The
  default ``serve`` keeps serving what it last knew: a store taken offline meanwhile elsewhere
  is still served here until the host catches up.
* **Hand edits** of ``datastore.cfg`` are refused loudly: logged naming the file, counted in the
  fleet record (status, metrics) and undone (the mirror rewritten whole, everyone reloads).

gRPC is not fork-safe: the :class:`~dsproxy.fleet.etcd.Etcd` client is made here, in the manager's
event loop (the manager never forks).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import secrets
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar, cast

from .. import _gc
from ..config import MaintenanceMode, ParseError, Value, parse
from ..config.section import parse_values
from ..daemon.writer import ConfigWriter, FleetWrite, MirrorState, WriteRefused
from ..ipc import shm
from . import datastores_prefix, hosts_prefix
from .etcd import KV, Etcd, EtcdError, EtcdOutcomeUnknown, EtcdRequestError, EtcdUnavailable, Lease, Txn, WatchBatch
from .tls import EtcdTLS

log = logging.getLogger("dsproxy.fleet")

T = TypeVar("T")
V = TypeVar("V")
#: the processes whose loaded generation a host's revision stands for
SERVING_ROLES: Final = frozenset({shm.Role.WORKER, shm.Role.LIBRARY})
#: maintenance modes a fleet-wide transition waits for (each refuses new reads and writes)
WAITING_MODES: Final = frozenset({"offline", "unmount", "delete", "s3-refresh"})
HOST_KEY_VERSION: Final = 1
#: seconds between looks at the workers' slots while they catch up (someone waits for it: a
#: fleet-wide transition; a look is ~50 us since the slots are read through pidfds -- at 5 ms the
#: wait added ~2.5 ms on average to each host's part of a transition)
POLL: Final = 0.001
#: seconds after a datastore change nobody waits for before the host key shows it (``dsproxy fleet
#: status``' lag): reporting each at once made every config write four etcd writes (the txn and
#: three host keys) and raised the txn's p50 from ~2 to 3-9 ms with 3 hosts
LAZY_REPORT: Final = 1.0
KEEP_INTERVAL: Final = 0.25  # seconds between looks at the link to etcd and the lease
#: lease TTLs after another manager's last put of this host's key during which writes stay refused
DUPLICATE_HOLD: Final = 3
LAYOUT_SLICE_SECONDS: Final = 0.02  # writer-thread time per slice of a first read's deferred lay-out


def waits(mode: MaintenanceMode | None) -> bool:
    """Whether setting ``mode`` is a fleet-wide transition (waits for every host)."""
    return mode is not None and mode.type in WAITING_MODES


# -- decoding what etcd holds ---------------------------------------------------------------------------


def decode_section(name: str, kv: KV) -> dict[str, Value] | str:
    """The typed section ``kv`` holds for store ``name``, or why it cannot be mirrored."""
    where = f"etcd key {kv.key.decode(errors='replace')} (mod_revision {kv.mod_revision})"
    try:
        cfg = parse(kv.value, filename=where)
    except ParseError as err:
        return str(err)
    if list(cfg) != [name]:
        found = ", ".join(f"'{n}'" for n in cfg) or "no section"
        return f"{where}: holds {found}; expected exactly the section of '{name}'"
    return cfg[name]


@dataclass
class Decoded:
    """Datastore keys decoded: the sections to mirror, every key's mod_revision, what was refused,
    and (a full read's) the values that are well-formed section texts, to be written as they are."""

    sections: dict[str, dict[str, Value] | None] = field(default_factory=dict)
    mod_revisions: dict[str, int | None] = field(default_factory=dict)
    refused: int = 0
    texts: dict[str, bytes] = field(default_factory=dict)


def well_formed(name: str, value: bytes) -> bool:
    """Whether ``value`` (which parses to exactly the section of ``name``) can be a kept text as it
    is: it starts with its header line, ends with a newline and holds no blank or comment line --
    so it is one block the O(changed) splice finds by its header (:mod:`dsproxy.daemon.kept`).
    What dsproxy writes (the canonical text) always is; a value put by other means that is not
    is rendered again.  (Checking canonical form itself costs a render per store: ~0.6 s at
    100,000.)"""
    return (
        value.startswith(b"datastore: " + name.encode() + b"\n")
        and value.endswith(b"\n")
        and b"\n\n" not in value
        and b"\n#" not in value
    )


def _present(table: dict[str, V | None]) -> dict[str, V]:
    """``table`` without its None values: itself when it has none -- a full read, which names no
    deleted key (no copy of 100,000s of entries)."""
    if None not in table.values():
        return cast(dict[str, V], table)
    return {k: v for k, v in table.items() if v is not None}


def decode_all(prefix: bytes, kvs: list[KV]) -> Decoded:
    """Every datastore key of a full read: one parse of all values joined when that gives exactly
    one section per key in key order (every value ending in a newline: a value's lines cannot
    reach into another's section), else one parse per value."""
    out = Decoded()
    names = [_name(prefix, kv.key) for kv in kvs]
    if all(kv.value.endswith(b"\n") for kv in kvs):
        with contextlib.suppress(ParseError):
            values = [kv.value for kv in kvs]
            cfg = parse_values(values)  # (the common case, without the joined copies)
            if cfg is None:
                cfg = parse(b"\n".join(values), filename=f"etcd {prefix.decode(errors='replace')}")
            if list(cfg) == names:
                out.sections = cast(dict[str, dict[str, Value] | None], cfg)  # (as it is: 100,000s of entries)
                # (keyed by the parse's own name strings: the names from the keys, equal, go)
                out.mod_revisions = {n: kv.mod_revision for n, kv in zip(cfg, kvs, strict=True)}
                out.texts = {n: kv.value for n, kv in zip(cfg, kvs, strict=True) if well_formed(n, kv.value)}
                return out
    for name, kv in zip(names, kvs, strict=True):
        _decode_into(out, name, kv)
        if out.sections.get(name) is not None and well_formed(name, kv.value):
            out.texts[name] = kv.value
    return out


def decode_events(prefix: bytes, batch: WatchBatch) -> Decoded:
    """The datastore events of one watch batch (a later event of a key wins)."""
    out = Decoded()
    for event in batch.events:
        if not event.key.startswith(prefix):
            continue
        name = _name(prefix, event.key)
        if event.kind == "delete":
            out.sections[name] = None
            out.mod_revisions[name] = None
        else:
            _decode_into(out, name, KV(event.key, event.value, event.mod_revision, 0))
    return out


def _decode_into(out: Decoded, name: str, kv: KV) -> None:
    section = decode_section(name, kv)
    out.mod_revisions[name] = kv.mod_revision
    if isinstance(section, str):
        out.refused += 1
        out.sections.pop(name, None)  # keep the last good section of this store (or none)
        log.error("not mirroring datastore '%s': %s", name, section)
    else:
        out.sections[name] = section


def _name(prefix: bytes, key: bytes) -> str:
    return key[len(prefix) :].decode(errors="replace")


# -- host keys ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HostState:
    """Another host's key, as decoded (garbage reads as a host at revision 0 that reports nothing)."""

    host: str
    revision: int
    mod_revision: int  # of the key: when it said this
    active: dict[str, tuple[int, int]]
    asking: frozenset[str]
    error: str | None = None


def decode_host(host: str, kv: KV) -> HostState:
    try:
        data = json.loads(kv.value)
        revision = data["revision"]
        active = {str(n): (int(c[0]), int(c[1])) for n, c in data.get("active", {}).items() if isinstance(c, list)}
        asking = frozenset(str(n) for n in data.get("asking", []))
        if not isinstance(revision, int) or revision < 0:
            raise ValueError(f"revision {revision!r}")
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as err:
        return HostState(host, 0, kv.mod_revision, {}, frozenset(), f"undecodable host key: {err}")
    return HostState(host, revision, kv.mod_revision, active, asking)


# -- the mirror ---------------------------------------------------------------------------------------------


class FleetRefused(Exception):
    """A fleet config write refused; ``status`` is the HTTP status; ``unknown``: the transaction
    was sent and whether it applied is not known; ``committed``: it applied in etcd, but this host
    did not serve it in time (the answer is an error all the same: a 200 here promises that this
    host's workers serve the change)."""

    def __init__(self, status: int, message: str, unknown: bool = False, committed: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.unknown = unknown
        self.committed = committed


@dataclass
class Transition:
    """What a fleet-wide maintenance transition reports."""

    active: tuple[int, int]
    lagging_hosts: list[str]


class Mirror:
    """The fleet side of one manager (see the module): the etcd client, the watch, the host key."""

    def __init__(
        self,
        writer: ConfigWriter,
        in_writer: Callable[..., Awaitable[Any]],
        segment: Callable[[], shm.Segment | None],
        *,
        endpoints: Iterable[str],
        prefix: str,
        host_id: str | None = None,
        lease_ttl: int = 10,
        fencing: str = "serve",
        timeout: float = 2.0,
        maintenance_timeout: float = 10.0,
        tls: EtcdTLS | None = None,
    ) -> None:
        # Global state: what this host is in the fleet
        self.writer = writer
        self.in_writer = in_writer
        self.segment = segment
        self.endpoints = list(endpoints)
        self.prefix = prefix.rstrip("/")
        self.datastores = datastores_prefix(prefix)
        self.hosts_key = hosts_prefix(prefix)
        self.host_id = host_id or socket.gethostname().split(".")[0]
        self.key = self.hosts_key + self.host_id.encode()
        self.lease_ttl = lease_ttl
        self.fencing = fencing
        self.timeout = timeout
        self.maintenance_timeout = maintenance_timeout
        self.etcd = Etcd(self.endpoints, timeout=timeout, tls=tls)
        self.started = time.time()
        self.recovered = False  # interrupted creates cleaned up (after the first read of etcd)
        # Per-connection state: the lease, the watch's progress, the other hosts as last seen
        self.lease: Lease | None = None
        self.connected_since: float | None = None
        self.revision = 0  # the etcd revision the local file mirrors
        self.hosts: dict[str, HostState] = {}
        self.changed = asyncio.Condition()  # notified after each applied batch (revision, hosts)
        # What this host reports in its key
        self.asking: set[str] = set()  # stores this host asks the others about (a remove)
        self.transitions: dict[str, float] = {}  # stores entered a waiting mode lately -> until (monotonic)
        self.want = 0  # the revision this host must report once it serves it
        self.due: float | None = None  # when to report a datastore change nobody waits for (monotonic)
        self.reported: dict[str, Any] | None = None  # the last value put
        self.poke = asyncio.Event()
        self._nudged: int | None = None  # the generation this host's workers were last nudged to load
        self.tasks: list[asyncio.Task[None]] = []
        # Another manager running with this host id: (when its put was seen (monotonic), its pid)
        self.instance = secrets.token_hex(8)  # in every put of the host key: which manager wrote it
        self.duplicate: tuple[float, int | None] | None = None
        self._duplicates_logged: set[str] = set()

    @property
    def state(self) -> MirrorState:
        mirror = self.writer.mirror
        assert mirror is not None
        return mirror

    # -- life ---------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Fleet mode on; read etcd once if it answers (else keep serving the file and retry)."""
        await self.in_writer(self.writer.enable_fleet)
        try:
            await self.load(start=True)  # its write publishes what changed since the workers last loaded
        except EtcdError as err:
            log.error(
                "fleet: cannot read etcd at start (serving %s as it is; retrying): %s", self.writer.config_file, err
            )
            seg = self.segment()
            if seg is not None:  # the manager's start bump, left to the first mirror write
                await self.in_writer(seg.publish, [(shm.ChangeKind.EVERYTHING, "*")])
        self.tasks += [
            asyncio.ensure_future(self._follow()),
            asyncio.ensure_future(self._report()),
            asyncio.ensure_future(self._keep()),
        ]

    async def stop(self) -> None:
        """A clean stop: the host key goes at once (nobody waits for this host any more)."""
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        lease, self.lease = self.lease, None
        if lease is not None:  # (etcd unreachable: the key goes with the lease's TTL)
            with contextlib.suppress(EtcdError, TimeoutError):
                async with asyncio.timeout(self.timeout):
                    await lease.revoke()
        await self.etcd.close()

    async def load(self, start: bool = False) -> None:
        """One consistent read of the datastores; the file becomes exactly the mirror.

        The one at ``start`` (before the manager serves) runs with the cyclic GC off, and the
        first that succeeds freezes what it built: collections walked the millions of objects
        being made (a 100,000-store read, decode and write), ~0.3 s of such a host's cold start
        (``gc.callbacks``); reference counts still free what the read leaves behind.  A retry
        later (etcd was down at start) keeps the GC on: it waits for etcd while the manager
        serves."""
        if not start:
            return await self._load()
        with _gc.paused():
            await self._load()

    async def _load(self) -> None:
        started = time.monotonic()
        revision, every = await self.etcd.get_prefix(f"{self.prefix}/".encode())  # datastores and hosts at once
        read = time.monotonic() - started
        kvs = [kv for kv in every if kv.key.startswith(self.datastores)]
        hosts = [kv for kv in every if kv.key.startswith(self.hosts_key)]
        count = len(kvs)
        del every  # (with kvs emptied by _replace once decoded, the keys' tuples go before the write)
        # the first read looks at the stores' directories after the write (lay_out_deferred)
        gen = await self.in_writer(self._replace, kvs, revision, not self.recovered)
        first = False
        if not self.recovered:
            # creates interrupted by a crash: only now does the file name every store etcd has -- a
            # create whose transaction applied before the crash keeps its lay-out (no API write is
            # in flight yet: they wait for this first read)
            await self.in_writer(self.writer.recover_interrupted_creates)
            self.recovered = True
            first = True
        self.hosts = {}
        self._hosts_seen(hosts)
        self.revision = revision
        self.want = max(self.want, revision)
        log.info(
            "fleet: mirrored %d datastores of etcd revision %d (read %.2f s, written %.2f s), generation %s",
            count,
            revision,
            read,
            time.monotonic() - started - read,
            gen,
        )
        if first:
            # the first mirror (100,000s of objects at a large prefix) out of the cyclic GC's way:
            # later collections do not walk it (no full collection first: it would hold the
            # start ~0.1 s; what is garbage now is freed by reference counts, the read included)
            gc.freeze()
            self.tasks.append(asyncio.ensure_future(self._lay_out()))
        await self._applied()

    async def _lay_out(self) -> None:
        """The stores' directories the first read did not look at: slices in the writer thread,
        config writes served between them."""
        started = time.monotonic()
        while await self.in_writer(self.writer.lay_out_deferred, LAYOUT_SLICE_SECONDS):
            await asyncio.sleep(0)
        log.debug("fleet: the mirrored stores' directories looked at in %.2f s", time.monotonic() - started)

    def _replace(self, kvs: list[KV], revision: int, first: bool = False) -> int | None:
        """(Writer thread.)  A full read: decode every value (``kvs`` is emptied then), mirror
        exactly those (the first: the lay-out of missing directories deferred)."""
        decoded = decode_all(self.datastores, kvs)
        # consumed: the keys' tuples and bytes freed before the write allocates (13 MB of fresh
        # memory at 100,000 stores; the values live on as the kept texts)
        kvs.clear()
        sections, mods = _present(decoded.sections), _present(decoded.mod_revisions)
        return self.writer.mirror_replace(sections, mods, revision, decoded.texts, defer_layout=first)

    # -- the watch ----------------------------------------------------------------------------------

    async def _follow(self) -> None:
        """Load (until it succeeds), then follow the watch for ever (it resumes and re-lists itself)."""
        while True:
            try:
                if not self.state.loaded:
                    await self.load()
                async for batch in self.etcd.watch_prefix(f"{self.prefix}/".encode(), self.revision + 1):
                    await self._apply(batch)
            except asyncio.CancelledError:
                raise
            except EtcdError as err:
                log.warning("fleet: %s; retrying", err)
                await asyncio.sleep(0.5)
            except Exception:
                log.exception("fleet: applying a watch batch failed; re-reading etcd")
                self.state.loaded = False
                await asyncio.sleep(0.5)

    async def _apply(self, batch: WatchBatch) -> None:
        if batch.relist is not None:
            ours = [kv for kv in batch.relist if kv.key.startswith(self.datastores)]
            await self.in_writer(self._replace, ours, batch.revision)
            self.hosts = {}
            self._hosts_seen([kv for kv in batch.relist if kv.key.startswith(self.hosts_key)])
            self.want = max(self.want, batch.revision)
        else:
            decoded, entered = await self.in_writer(self._apply_events, batch)
            if entered:  # a transition elsewhere waits for this host: report as soon as it is served
                self.want = max(self.want, batch.revision)
            elif decoded.mod_revisions and self.due is None:  # fleet status' lag: soon is enough
                self.due = time.monotonic() + LAZY_REPORT
            until = time.monotonic() + self.maintenance_timeout + 2 * self.lease_ttl
            self.transitions.update(dict.fromkeys(entered, until))
            self._host_events(batch)
        self.revision = max(self.revision, batch.revision)
        await self._applied()

    def _apply_events(self, batch: WatchBatch) -> tuple[Decoded, list[str]]:
        """(Writer thread.)  One batch: its datastore events as one local write (or, without any,
        the record moved to its revision); and the stores it leaves in a waiting mode (the host
        that wrote it waits for this one -- any write of such a store is a transition to it, as
        in :meth:`dsproxy.daemon.manager.Manager.update` -- so this host reports at once, with the
        stores' operation counts, and keeps reporting them for a while)."""
        decoded = decode_events(self.datastores, batch)
        entered = [name for name, props in decoded.sections.items() if props is not None and waits(_mode(props))]
        if decoded.mod_revisions or batch.revision > self.state.revision:
            self.writer.mirror_apply(decoded.sections, decoded.mod_revisions, batch.revision)
        return decoded, entered

    def _host_events(self, batch: WatchBatch) -> None:
        for event in batch.events:
            if not event.key.startswith(self.hosts_key):
                continue
            host = _name(self.hosts_key, event.key)
            if host == self.host_id:
                if event.kind == "put":
                    self._own_key_put(event.value)
                continue
            if event.kind == "delete":
                self.hosts.pop(host, None)
                continue
            state = decode_host(host, KV(event.key, event.value, event.mod_revision, 0))
            self._host_seen(state)

    def _own_key_put(self, value: bytes) -> None:
        """A put of this host's key: ours, or another live manager's with the same ``--host-id``
        (a crashed predecessor's key is never put again).  Two managers reporting as one host would
        let a transition elsewhere count one host's revision for the other's: this host refuses
        config writes while the other one puts (:data:`DUPLICATE_HOLD` lease TTLs after its last)."""
        try:
            data = json.loads(value)
            instance, pid = str(data.get("instance")), data.get("pid")
        except (ValueError, TypeError, AttributeError):
            instance, pid = "?", None
        if instance == self.instance:
            return
        self.duplicate = (time.monotonic(), pid if isinstance(pid, int) else None)
        if instance not in self._duplicates_logged:
            self._duplicates_logged.add(instance)
            log.error(
                "fleet: another manager (pid %s, on its own host) also runs as host '%s' -- its key %s is "
                "written by both; give each host its own --host-id.  Config writes are refused here while it runs",
                pid, self.host_id, self.key.decode(),
            )  # fmt: skip
            self.reported = None  # put ours once more: the other one learns of us too (once per instance)
            self.poke.set()

    def _duplicate_message(self) -> str | None:
        seen = self.duplicate
        if seen is None or time.monotonic() - seen[0] > DUPLICATE_HOLD * self.lease_ttl:
            return None
        return (
            f"fleet: another manager (pid {seen[1] if seen[1] is not None else '?'}) also runs as host "
            f"'{self.host_id}'; give each host its own --host-id (config writes are refused here meanwhile)"
        )

    def _hosts_seen(self, kvs: list[KV]) -> None:
        for kv in kvs:
            host = _name(self.hosts_key, kv.key)
            if host != self.host_id:
                self._host_seen(decode_host(host, kv))

    def _host_seen(self, state: HostState) -> None:
        old = self.hosts.get(state.host)
        if state.error is not None and (old is None or old.error != state.error):
            log.error("fleet: host '%s': %s", state.host, state.error)
        self.hosts[state.host] = state
        if state.asking and (old is None or state.asking != old.asking or state.mod_revision > self.want):
            self.want = max(self.want, state.mod_revision)  # a question: answer past it
            self.poke.set()

    async def _applied(self) -> None:
        seg = self.segment()
        record = None if seg is None else seg.fleet()
        if record is None or record.generation != self._nudged:  # (a batch of host keys alone: no)
            self._nudged = None if record is None else record.generation
            self.nudge()
        self.poke.set()
        async with self.changed:
            self.changed.notify_all()

    def nudge(self) -> None:
        """Wake this host's workers (SIGUSR2): they load a mirror write now, not at their next tick
        (:mod:`dsproxy.daemon.worker`).  Only workers: a library process may not expect the signal.
        Through the manager's pidfds (:class:`~dsproxy.ipc.proc.Liveness`): no signal reaches a
        process that took a dead worker's pid."""
        seg = self.segment()
        if seg is None:
            return
        live = seg.liveness
        for slot in seg.claimed_slots() if live is not None else seg.slots():
            if slot.role != shm.Role.WORKER:
                continue
            if live is not None:
                live.signal(slot.pid, slot.start, signal.SIGUSR2)
            else:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(slot.pid, signal.SIGUSR2)

    # -- this host's key ----------------------------------------------------------------------------

    def served(self) -> tuple[int, int | None, int]:
        """``(revision every serving process has loaded, generation, serving processes)``; the
        revision is the record's while every serving slot is on its generation, else -1 (behind)."""
        seg = self.segment()
        record = None if seg is None else seg.fleet()
        if seg is None or record is None:
            return self.revision, None, 0
        slots = [s for s in seg.slots() if s.role in SERVING_ROLES]
        behind = any(s.generation != record.generation for s in slots)
        return (-1 if behind else record.revision), record.generation, len(slots)

    def _asked(self) -> set[str]:
        now = time.monotonic()
        for name, until in list(self.transitions.items()):
            if until < now:
                del self.transitions[name]
        asked = set(self.transitions)
        for host in self.hosts.values():
            asked |= host.asking
        return asked

    async def _report(self) -> None:
        """Put this host's key whenever it serves what someone may wait for, or reports other counts."""
        while True:
            timeout = None if self.due is None else max(0.0, self.due - time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.poke.wait(), timeout)
            self.poke.clear()
            try:
                await self._report_once()
            except asyncio.CancelledError:
                raise
            except EtcdError as err:
                log.warning("fleet: cannot update this host's key: %s", err)
                await asyncio.sleep(0.5)
                self.poke.set()
            except Exception:
                log.exception("fleet: updating this host's key failed")
                await asyncio.sleep(0.5)

    def _report_due(self) -> bool:
        """Whether a put of this host's key may be due: someone waits for a revision it has not
        reported, the lazy report's time came, its question or the stores others wait on may
        have news, or it runs another number of workers.  Otherwise a batch needs no look at the
        workers and no count of operations (a thread hop): a plain write is reported lazily."""
        previous = self.reported
        if previous is None or self.want > previous.get("revision", -1):
            return True
        if sorted(self.asking) != previous.get("asking") or previous.get("active") or self._asked():
            return True
        if self.due is not None and time.monotonic() >= self.due:
            return True
        return self.served()[2] != previous.get("workers")

    async def _report_once(self) -> None:
        if not self._report_due():
            return
        while True:
            revision, gen, workers = self.served()
            if revision >= 0:
                break
            await asyncio.sleep(POLL)  # the workers load it within their tick
            if self.poke.is_set():
                self.poke.clear()
        lease = self.lease
        if lease is None or not lease.alive or not self.state.loaded:
            return
        asked = sorted(self._asked())
        counts = await self.in_writer(_counts, self.writer, asked)
        value = {
            "host": self.host_id,
            "revision": revision,
            "generation": gen,
            "workers": workers,
            "active": {n: list(c) for n, c in counts.items() if c != (0, 0)},
            "asking": sorted(self.asking),
            "connected_since": self.connected_since,
            "pid": os.getpid(),
            "instance": self.instance,
            "version": HOST_KEY_VERSION,
        }
        previous = self.reported
        due = self.due is not None and time.monotonic() >= self.due
        stale = previous is None or previous["revision"] < self.want <= revision or due
        if not stale and previous is not None and _same(previous, value):
            return
        if due:
            self.due = None
        await self.etcd.put(self.key, json.dumps(value, sort_keys=True).encode(), lease=lease.id)
        self.reported = value

    # -- the link to etcd ---------------------------------------------------------------------------

    async def _keep(self) -> None:
        """The lease (granted again after it expired), the link state in the record, fencing."""
        link: shm.FleetState | None = None
        while True:
            try:
                link = await self._keep_once(link)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("fleet: keeping the lease failed")
            await asyncio.sleep(KEEP_INTERVAL)

    async def _keep_once(self, link: shm.FleetState | None) -> shm.FleetState:
        etcd, state = self.etcd, self.state
        lost = self.lease is None or not self.lease.alive
        if not etcd.connected and lost and self.fencing == "offline" and state.fenced is None:
            since = etcd.disconnected_since or self.started
            if time.time() - since >= self.lease_ttl:
                log.error(
                    "fleet: host %s cannot reach etcd since %s and its lease is gone, so the fleet no longer "
                    "waits for it: every datastore offline here until etcd is back (--fleet-fencing offline)",
                    self.host_id,
                    _when(since),
                )
                await self.in_writer(self.writer.fence, f"fleet: cut off from etcd since {_when(since, short=True)}")
                self.nudge()
        now = shm.FleetState.CONNECTED if etcd.connected else shm.FleetState.DISCONNECTED
        if now is shm.FleetState.CONNECTED and self._duplicate_message() is not None:
            now = shm.FleetState.DUPLICATE  # (status and metrics say so, not only the log and the 503s)
        if now != link:
            cut = None if etcd.connected else (etcd.disconnected_since or time.time())
            await self.in_writer(self.writer.set_link, now, cut)
        if state.loaded and lost:
            await self._new_lease()  # also the probe that finds etcd back (the watch may be waiting)
        return now

    async def _new_lease(self) -> None:
        old, self.lease = self.lease, None
        if old is not None:
            log.warning("fleet: the lease of host key %s ended (%s); granting a new one", self.key.decode(), old.reason)
        try:
            lease = await self.etcd.grant(self.lease_ttl)
        except EtcdError as err:
            log.warning("fleet: cannot grant a lease: %s", err)
            return
        self.lease, self.connected_since, self.reported = lease, time.time(), None
        await self._report_once()
        if self.state.fenced is not None:
            log.info("fleet: host key %s is back: restoring the mirror (no longer fenced)", self.key.decode())
            await self.in_writer(self.writer.unfence)
            self.nudge()
        log.info("fleet: host key %s on lease %x (TTL %d s)", self.key.decode(), lease.id, lease.ttl)

    # -- config writes ------------------------------------------------------------------------------

    def check_writable(self) -> None:
        state, etcd = self.state, self.etcd
        if not etcd.connected:
            since = etcd.disconnected_since or self.started
            raise FleetRefused(
                503, f"fleet: etcd unreachable since {_when(since)}; config writes are refused until it is back"
            )
        if not state.loaded:
            raise FleetRefused(503, "fleet: etcd has not been read yet; config writes are refused until it is")
        if state.fenced is not None:
            raise FleetRefused(503, f"fleet: this host is fenced ({state.fenced}); config writes are refused")
        duplicate = self._duplicate_message()
        if duplicate is not None:
            raise FleetRefused(503, duplicate)

    async def commit(self, write: FleetWrite) -> Txn:
        """The transaction of a validated write; then wait until the mirror here applied it."""
        self.check_writable()
        key = self.datastores + write.name.encode()
        try:
            if write.value is None:
                txn = await self.etcd.delete_if(key, write.mod_revision)
            else:
                txn = await self.etcd.put_if(key, write.value, write.mod_revision)
        except EtcdOutcomeUnknown as err:
            raise FleetRefused(
                503, f"fleet: {err}; the change may or may not have been made: read the configuration to see", True
            ) from None
        except EtcdUnavailable as err:
            raise FleetRefused(503, f"fleet: {err}; config writes are refused until it is back") from None
        except EtcdRequestError as err:
            raise FleetRefused(503, f"fleet: {err}") from None
        if not txn.succeeded:
            raise FleetRefused(409, _conflict(write, txn))
        # the watch may be failing over right now (the member it used died, a leader election):
        # give it what the client's own failover may take, at least
        patience = max(self.maintenance_timeout, self.timeout * len(self.endpoints) + 1.0)
        if not await self.wait_revision(txn.revision, patience):
            raise FleetRefused(
                504,
                f"fleet: the change of '{write.name}' is in etcd (revision {txn.revision}) but this host's mirror "
                f"had not applied it after {patience:g} s (it is at revision {self.revision}); "
                "it is not lost: every host applies it as its watch catches up",
                committed=True,
            )
        return txn

    async def wait_revision(self, revision: int, timeout: float) -> bool:
        """Wait until the local file mirrors ``revision``; False after ``timeout``.  A revision that
        exists (this host's own write) but has not come after half the etcd timeout makes the watch
        check its stream at once (:meth:`Etcd.check_watches`) rather than after its heartbeat."""
        poke = self.timeout / 2

        async def until(seconds: float) -> bool:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await self.changed.wait_for(lambda: self.revision >= revision)
            return self.revision >= revision

        async with self.changed:
            if await until(min(poke, timeout)) or timeout <= poke:
                return self.revision >= revision
            self.etcd.check_watches()
            return await until(timeout - poke)

    async def wait_served(self, revision: int, timeout: float) -> list[shm.SlotInfo]:
        """Wait until every serving process here has loaded a generation of ``revision`` or later;
        the processes that had not after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            seg = self.segment()
            record = None if seg is None else seg.fleet()
            if seg is None or record is None:
                return []
            lagging = [s for s in seg.slots() if s.role in SERVING_ROLES and s.generation != record.generation]
            if (not lagging and record.revision >= revision) or time.monotonic() >= deadline:
                return lagging
            await asyncio.sleep(POLL)

    async def wait_hosts(self, revision: int, timeout: float) -> list[str]:
        """Wait until every other live host reports ``revision``; the hosts that did not in time."""

        def lagging() -> list[str]:
            return sorted(h.host for h in self.hosts.values() if h.revision < revision)

        async with self.changed:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self.changed.wait_for(lambda: not lagging())
        return lagging()

    async def transition(self, name: str, revision: int, timeout: float) -> Transition:
        """A fleet-wide maintenance transition at ``revision``: the other hosts' part."""
        lagging = await self.wait_hosts(revision, timeout)
        read = sum(h.active.get(name, (0, 0))[0] for h in self.hosts.values())
        write = sum(h.active.get(name, (0, 0))[1] for h in self.hosts.values())
        if lagging:
            log.warning(
                "maintenance of '%s': hosts %s had not reported etcd revision %d after %.0f s",
                name,
                ", ".join(lagging),
                revision,
                timeout,
            )
        return Transition((read, write), lagging)

    async def check_idle_everywhere(self, name: str) -> None:
        """Before a remove: ask every live host for its operations on ``name`` (409 if any has some,
        503 if one does not answer within the maintenance timeout)."""
        self.check_writable()
        lease = self.lease
        if lease is None or not lease.alive:
            raise FleetRefused(503, "fleet: this host has no host key yet; config writes are refused until it has")
        self.asking.add(name)
        try:
            revision = await self._ask()
            lagging = await self.wait_hosts(revision, self.maintenance_timeout)
        finally:
            self.asking.discard(name)
            self.poke.set()
        busy = [(h.host, h.active[name]) for h in self.hosts.values() if h.active.get(name, (0, 0)) != (0, 0)]
        if busy:
            hosts = ", ".join(f"{host} (read {r}, write {w})" for host, (r, w) in sorted(busy))
            raise FleetRefused(409, f"datastore '{name}' has active operations on host {hosts}; not removing it")
        if lagging:
            raise FleetRefused(
                503,
                f"datastore '{name}': hosts {', '.join(lagging)} did not report their operations within "
                f"{self.maintenance_timeout:g} s; not removing it (retry once they answer or their lease expires)",
            )

    async def _ask(self) -> int:
        """Put this host's key with the question now; the revision of that put."""
        lease = self.lease
        assert lease is not None
        revision = self.served()[0]
        value = dict(self.reported or {}, asking=sorted(self.asking), host=self.host_id, version=HOST_KEY_VERSION)
        value.setdefault("revision", max(revision, 0))
        value.setdefault("active", {})
        put = await self.etcd.put(self.key, json.dumps(value, sort_keys=True).encode(), lease=lease.id)
        self.reported = value
        return put


def _counts(writer: ConfigWriter, names: list[str]) -> dict[str, tuple[int, int]]:
    return {name: writer.active_operations(name) for name in names}


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two host-key values report the same (a revision or generation moved alone is not
    news: the first are others' puts, the second changes nobody waits for -- reported lazily)."""
    keys = ("active", "asking", "workers")
    return all(a.get(k) == b.get(k) for k in keys)


def _mode(props: dict[str, Value] | None) -> MaintenanceMode | None:
    raw = None if props is None else props.get("maintenance-mode")
    if raw is None:
        return None
    try:
        return MaintenanceMode.parse(str(raw))
    except Exception:
        return None


def _conflict(write: FleetWrite, txn: Txn) -> str:
    name, current = write.name, txn.current
    if write.mod_revision == 0:
        return f"datastore '{name}' already exists."
    if current is None:
        return f"datastore '{name}' was removed on another host (etcd revision {txn.revision}); not changed"
    return (
        f"datastore '{name}' was changed on another host (its etcd key is at revision {current.mod_revision}, "
        f"this host had {write.mod_revision}); read it again and retry"
    )


def _when(t: float, short: bool = False) -> str:
    return time.strftime("%H:%M:%S" if short else "%Y-%m-%d %H:%M:%S", time.localtime(t))


__all__ = ["FleetRefused", "Mirror", "Transition", "WriteRefused", "decode_all", "decode_section", "waits"]
