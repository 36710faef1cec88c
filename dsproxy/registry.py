"""Lookup and release of datastores: the per-process cache (docs/design.md §5).

A :class:`Registry` is what a worker (or any library user) asks for a datastore::

    with registry.lookup("store1", Operation.WRITE) as store:
        ...

Two paths to fresh data, as everywhere in dsproxy:

* **fast path** -- one aligned 8-byte read of the shared generation, compared with the generation
  the cached parsed config was loaded under, plus a monotonic-clock TTL check.  On a hit nothing
  touches the file system: the maintenance decision is precomputed per store, the operation is
  registered by incrementing this process's own counter in shared memory, and the cached instance
  is reused.  ~1.5 us for lookup+release on the project machine.
* **slow path** (:meth:`Registry._load`) -- read, hash and parse ``datastore.cfg`` and cache it under
  the generation read *before* the file.  If the cache had the same generation but the digest
  differs, the file was edited by hand: bump the generation so every other process reloads too.

``DSPROXY_DEBUG_DISCARD_CACHES=1`` in the environment (or :data:`DISCARD_CACHES`) forces the slow
path and an instance rebuild on every lookup, like PostgreSQL's ``debug_discard_caches``; the test
suite passes under it, which shows the cache changes speed, not answers.

Modes (docs/design.md §5.2), all giving the same answers:

* ``cache="on"``: the above.
* ``cache="config"``: the fix as first shipped -- cached config keyed by the generation, but still
  the ``flock`` on ``.datastore.lck`` and the file-based counters (:mod:`dsproxy.ipc.opfile`) on
  every lookup and release.
* ``cache="off"``: before the fix -- lock, read, hash and parse on every lookup, and again on the
  release of a process's last operation on a store; file-based counters.

A process whose shared memory is missing or unusable runs **degraded**: exactly the ``off`` path
(correct, slow), logged once and visible as :attr:`Registry.degraded`.

Registration vs. a maintenance transition: see "Ordering rules" in :mod:`dsproxy.ipc.shm`.  In
short, the counter is incremented before the generation is read a second time; a moved generation
undoes the increment and starts over, and the process acknowledges a generation (its slot's
*served generation*) only after it has loaded that config.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import time
import weakref
from collections.abc import Iterable
from typing import Final

from . import _gc
from . import instance as instance_mod
from ._lazylog import LazyLogger
from .config import (
    LockError,
    MaintenanceMode,
    Operation,
    ParseError,
    SectionConfig,
    Value,
    config_lock,
    digest,
    parse,
    parsed,
    read_raw,
)
from .config import overlay as overlays
from .config import record as file_record
from .config.maintenance import not_mounted_text, refusal_text
from .config.overlay import Overlay
from .config.record import Stamp
from .config.schema import absolute_path
from .config.splice import PATCH_MAX, Regions, edited_names, patch, splice
from .errors import ConfigUnavailable, DatastoreError, MaintenanceRefused, NoSuchDatastore, OutOfDescriptors
from .fdbudget import POOL as _fds
from .fdbudget import FdBudgetExhausted
from .instance import Instance
from .ipc import shm
from .ipc.opfile import FileCounters, OpFileError
from .paths import CONFIG_NAME, LOCK_NAME, Paths, resolve_dirs

log = LazyLogger("dsproxy.registry")

#: Force the slow path (and an instance rebuild) on every lookup.  For tests; see module docs.
DISCARD_CACHES: bool = os.environ.get("DSPROXY_DEBUG_DISCARD_CACHES", "") not in ("", "0")
#: ``DSPROXY_INVALIDATION=full``: never apply the ring's per-store changes, reload the whole file on
#: every bump as before the ring (``scripts/bench-scale --invalidation full`` measures against it).
FULL_INVALIDATION: bool = os.environ.get("DSPROXY_INVALIDATION", "delta") == "full"

DEFAULT_TTL: Final = 60.0
#: reads of the file one delta apply makes when a newer generation explains what it found
APPLY_TRIES: Final = 3
#: stores the warm-up registers in the store table at a time (the writers' lock once for them)
REGISTER_CHUNK: Final = 256
SEGMENT_CHECK_INTERVAL: Final = 1.0  # seconds between integrity checks of the shared memory
MODES: Final = ("on", "config", "off")
_GEN: Final = shm.OFF_GENERATIONS // 8 + shm.GEN_DATASTORE
_monotonic = time.monotonic
_UNPRIMED: Final = (-1, -1, -1)
#: a file as a registry read it: its record's token and its stamp (dsproxy.config.record)
Identity = tuple[bytes, Stamp]


class _Entry:
    """One store as the cached config describes it, with its decisions precomputed."""

    __slots__ = ("counter", "evicts", "fast", "instance", "maintenance", "mount", "name", "props", "refusals")

    def __init__(
        self,
        name: str,
        props: dict[str, Value],
        maintenance: MaintenanceMode | None,
        refusals: tuple[str | None, str | None, str | None],
        evicts: bool,
        mount: str | None = None,
    ) -> None:
        self.name = name
        self.props = props
        self.maintenance = maintenance
        self.refusals = refusals  # full error text per Operation, or None
        self.evicts = evicts
        self.mount = mount  # a removable store's mount point (checked on every lookup), or None
        self.counter = -1  # word index of this process's READ counter (WRITE is +1); -1: not resolved
        self.instance: Instance | None = None  # built under this entry's generation
        self.fast: tuple[int, int, int] = (-1, -1, -1)

    def prime(self) -> None:
        """Precompute the fast path's one decision: per Operation, the counter word to increment,
        or -1 where the slow path has to answer (refused, no instance or counter yet, LOOKUP)."""
        if self.instance is None or self.instance.lock_fd < 0 or self.counter < 0 or self.mount is not None:
            self.fast = _UNPRIMED
            return
        read = self.counter if self.refusals[0] is None else -1
        write = self.counter + 1 if self.refusals[1] is None else -1
        self.fast = (read, write, -1)


def _make_entry(name: str, props: dict[str, Value]) -> _Entry:
    mount = None
    if "backing-device" in props:
        # a removable store: its content is where PBS mounts the device, not at its (on-device) path
        mount = absolute_path(name, props)
        props = {**props, "path": mount}
    text = props.get("maintenance-mode")
    mode = MaintenanceMode.parse(str(text)) if text is not None else None
    if mode is None:
        return _Entry(name, props, None, (None, None, None), False, mount)
    refusals = tuple(None if (reason := mode.check(op)) is None else refusal_text(name, reason) for op in Operation)
    return _Entry(name, props, mode, (refusals[0], refusals[1], refusals[2]), mode.evicts, mount)


def _make_entries(config: SectionConfig) -> dict[str, _Entry]:
    return {name: _make_entry(name, props) for name, props in config.items()}


def _refusal(entry: _Entry, operation: Operation) -> str | None:
    """Why ``operation`` may not start on ``entry``'s store, or ``None``.

    A removable store is "mounted" when its mount point is one (``os.path.ismount``: another
    device than its parent directory); two ``lstat`` calls on every lookup of such a store, since
    a device comes and goes without the config changing.
    """
    refusal = entry.refusals[operation]
    if refusal is None and entry.mount is not None and not os.path.ismount(entry.mount):
        return not_mounted_text(entry.name)
    return refusal


class _Cache:
    """The parsed config of one generation, with an entry per store."""

    __slots__ = (
        "_digest", "_served", "config", "entries", "expires", "generation", "identity", "over", "overlay", "regions",
        "text",
    )  # fmt: skip

    def __init__(
        self,
        generation: int,
        expires: float,
        text: bytes | bytearray,
        config: SectionConfig,
        entries: dict[str, _Entry],
        file_digest: str | None = None,
        regions: Regions | None = None,
        identity: Identity | None = None,
    ) -> None:
        self.generation = generation
        self.expires = expires  # monotonic deadline of the TTL
        # the file's bytes with a "\n" in front (what splice() compares with); never written while
        # this is the registry's cache (once replaced by a delta, the buffer is read into again)
        self.text = text
        self._digest = file_digest
        self.config = config
        self.entries = entries
        self.regions = regions  # where each store's region starts in text (splice), or None
        # (token, stamp) of the file text is (dsproxy.config.record), or None: no patch from it
        self.identity = identity
        # fleet mode: the overlay served on top of the file (dsproxy.config.overlay), and its
        # stores' properties (None: removed); ``config`` and ``text`` stay the file's
        self.overlay: Overlay | None = None
        self.over: dict[str, dict[str, Value] | None] = {}
        self._served: SectionConfig | None = None

    @property
    def file_digest(self) -> str:
        """SHA-256 of the file (computed when first asked: a change applied needs none)."""
        if self._digest is None:
            self._digest = _digest_after(self.text)
        return self._digest

    @property
    def digest(self) -> str:
        """The digest clients see: the file's, or with an overlay the overlay's."""
        if self.overlay is not None:
            return self.overlay.digest(None)
        return self.file_digest

    def served(self) -> SectionConfig:
        """The config served: the file's, with the overlay's stores on top (a copy, made once)."""
        if not self.over:
            return self.config
        if self._served is None:
            self._served = _with_overlay(self.config, self.over)
        return self._served


def _with_overlay(config: SectionConfig, over: dict[str, dict[str, Value] | None]) -> SectionConfig:
    served = SectionConfig(config)
    for name, props in over.items():
        if props is None:
            served.pop(name, None)
        else:
            served[name] = props
    return served


class Handle(list):  # type: ignore[type-arg]
    """A datastore handed out by :meth:`Registry.lookup`; :meth:`release` (or ``with``) ends it.

    ``name``, ``path``, ``instance`` and ``operation`` describe it.  Underneath it is a ``list``
    (``[registry or None, instance, operation, counter words or None, counter index]``) only because
    CPython builds a list subclass in C: ~130 ns cheaper than a class with ``__init__``, a tenth of
    a warm lookup+release.  Equality and hashing are by identity, like any object; treat the list
    part as private.
    """

    __slots__ = ()
    __eq__ = object.__eq__
    __ne__ = object.__ne__
    __hash__ = object.__hash__  # type: ignore[assignment]

    @property
    def instance(self) -> Instance:
        inst: Instance = self[1]
        return inst

    @property
    def name(self) -> str:
        return self.instance.name

    @property
    def path(self) -> str:
        return self.instance.path

    @property
    def operation(self) -> Operation:
        op: Operation = self[2]
        return op

    @property
    def released(self) -> bool:
        return self[0] is None

    def release(self) -> None:
        """End the operation (idempotent).  Never parses, never bumps, never blocks."""
        registry = self[0]
        if registry is None:
            return
        self[0] = None
        words = self[3]
        if words is None:
            registry._release_slow(self)
        elif words is registry._words:
            try:  # noqa: SIM105 -- contextlib.suppress would cost ~0.2 us on every release
                words[self[4]] -= 1
            except ValueError:  # somebody zeroed the word: the count is lost either way
                pass
            name = self[1].name
            if name in registry._evict_names:
                registry._maybe_evict(name)
        else:  # counted in a segment the registry moved from (its count moved too), or gone (fork, close)
            registry._release_carried(words, self[4])

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "released" if self[0] is None else "active"
        return f"<Handle {self.name!r} {self.operation.name} {state}>"


def _read_after(path: str, prefix: bytes, buf: bytearray | None = None) -> tuple[bytearray, Identity | None]:
    """``prefix`` followed by the file's bytes (a missing file reads as empty), in one buffer:
    ``buf`` if given (its old contents are overwritten), else a new one; and the file's identity
    -- the token of its record and its stamp (:mod:`dsproxy.config.record`) -- if it has a record
    that names its stamp (no edit in place since it was written) and the stamp was the same
    before and after the read (else None).

    The buffer is sized before the read: trimming a spare byte off an 11 MB ``bytearray``
    reallocates and copies it (~1 ms of a ~6 ms apply at 100,000 stores, cProfile); a file that
    grew after the ``fstat`` (an edit in place) is noticed by one more one-byte read.  Reading
    into a buffer used before saves the page faults of fresh memory: at 100,000 stores (14 MB)
    0.5 ms against 1.2-12 ms for a new one on the project machine.
    """
    try:
        f = open(path, "rb", buffering=0)  # noqa: SIM115 -- closed below, after one fstat and one readinto
    except FileNotFoundError:
        return bytearray(prefix), None
    with f:
        st = os.fstat(f.fileno())
        size = st.st_size
        total = len(prefix) + size
        if buf is None:
            buf = bytearray(total)
        elif len(buf) > total:
            del buf[total:]  # no reallocation above half the buffer's size
        elif len(buf) < total:
            buf += bytes(total - len(buf))
        buf[: len(prefix)] = prefix
        view = memoryview(buf)
        got = 0
        while got < size and (n := f.readinto(view[len(prefix) + got :])):
            got += n
        view.release()
        if got < size:  # shrank meanwhile
            del buf[len(prefix) + got :]
        elif more := f.read(1):
            buf += more + f.read()
        stamp = file_record.stamp_of(st)
        record = file_record.read(f.fileno()) if stamp == file_record.stamp_of(os.fstat(f.fileno())) else None
    return buf, None if record is None or record.new != stamp else (record.token, stamp)


def _digest_after(text: bytes | bytearray) -> str:
    """The file's digest from what :func:`_read_after` read after a one-byte prefix: hashed in
    place, not from a copy of the bytes (14 MB of fresh memory at 100,000 stores, 3,500 page
    faults of every full load), and the view released (a view kept would pin the buffer's size)."""
    with memoryview(text) as view, view[1:] as data:
        return hashlib.sha256(data).hexdigest()


class _Preloaded:
    """A parse of the config file made in the proxy master before it forks workers (:func:`preload`)."""

    __slots__ = ("config", "digest", "entries", "evicting", "read_at", "regions", "seen", "text")

    def __init__(
        self,
        text: bytearray,
        digest: str,
        seen: tuple[Identity, int] | None,
        read_at: float,
        config: SectionConfig,
        entries: dict[str, _Entry],
        regions: Regions | None,
    ) -> None:
        #: what the master read (after a newline, as :func:`_read_after`), when, and the file's
        #: identity and ctime just before, if the read found that identity too (else None): a
        #: worker whose file still has those takes these bytes instead of reading them
        #: (:func:`_take_unchanged_preload`)
        self.text, self.seen, self.read_at = text, seen, read_at
        self.digest = digest
        self.config = config
        self.entries = entries
        # the stores whose instances a load evicts, found here once: a worker's look at every
        # entry wrote each one's reference count, copying its pages from the master's (12,000
        # page faults and 31 ms of each worker's start at 100,000 stores, 2026-12-04)
        self.evicting = [name for name, e in entries.items() if e.evicts]
        self.regions = regions


#: this process's :func:`preload`, inherited by the workers it forks; taken by the first load
_preloaded: _Preloaded | None = None


def preload(config_file: str) -> int | None:
    """Read and parse ``config_file`` (and make its stores' entries) in this process, for the
    registries of the processes it forks next: a worker's first load that reads the same bytes
    (same SHA-256) adopts them instead of parsing the file again.  The proxy master calls it
    before it forks its first workers; returns the file's store count, or None if the file
    cannot be read or parsed (then each worker parses it and reports the error as always).

    Why: at 100,000 stores a parse is ~0.6-0.9 s of CPU per worker and making the entries and
    regions ~0.3 s more, two workers doing it at once on a 2-core machine with the manager's
    directory lay-out running beside them.  Parsed once here, each worker's first load is a read
    and a hash (~25 ms).  With the names registered in the warm-up instead of at the load, a
    fleet host's workers served 2.0-2.1 s after its manager answered, against 2.9-3.1 s before
    (a cold start from a 1-member etcd at 100,000 stores, A/B in the same minutes).  When the
    manager left its own parse of these bytes beside the file (:mod:`dsproxy.config.parsed`),
    that is taken instead of parsing here.

    The cyclic GC is off meanwhile (:func:`dsproxy._gc.paused`); the master then freezes what
    was built.
    """
    global _preloaded
    _preloaded = None
    if DISCARD_CACHES:
        return None
    with _gc.paused():
        return _preload(config_file)


def _preload(config_file: str) -> int | None:
    global _preloaded
    try:
        read_at, seen = _monotonic(), file_record.identity_and_ctime_of(config_file)
        text, identity = _read_after(config_file, b"\n")
        if seen is not None and seen[0] != identity:
            seen = None  # (changed meanwhile: the workers read it themselves)
        file_digest = _digest_after(text)
        # the manager's own parse of these bytes, when it left one (dsproxy.config.parsed: ~0.09
        # s at 100,000 stores against the parse's ~0.45 s)
        taken = parsed.load(config_file, file_digest, len(text) - 1)
        if taken is not None:
            try:
                _preloaded = _preloaded_of(text, file_digest, seen, read_at, taken)
                log.info("took the manager's parse of %s (%d stores)", config_file, len(taken))
                return len(taken)
            except Exception as err:  # (the owner's file, checked whole: yet never the reason a proxy stops)
                log.warning("the manager's parse of %s is not usable (%s): parsing the file", config_file, err)
        config = parse(bytes(memoryview(text)[1:]), filename=config_file)
    except (OSError, ParseError):
        return None
    _preloaded = _preloaded_of(text, file_digest, seen, read_at, config)
    return len(config)


def _preloaded_of(
    text: bytearray, file_digest: str, seen: tuple[Identity, int] | None, read_at: float, config: SectionConfig
) -> _Preloaded:
    regions = None if FULL_INVALIDATION else Regions.of(text, config)
    return _Preloaded(text, file_digest, seen, read_at, config, _make_entries(config), regions)


def drop_preloaded() -> None:
    """Forget this process's :func:`preload` (the master, once its first workers are up)."""
    global _preloaded
    _preloaded = None


def _take_unchanged_preload(config_file: str) -> tuple[_Preloaded, Identity] | None:
    """The preload inherited from the master if the file still has the identity and ctime it had
    just before the master read it (its record names its stamp: the manager's write; the same
    ctime: not edited in place since, even by a tool that puts the mtime back), else None (and
    it stays for :func:`_take_preloaded`), with that identity.  What is trusted is what :meth:`Registry._patch`
    trusts of the record; an edit within the same clock tick as the manager's write (coarse
    timestamps) is seen once the cache's TTL, counted from the master's read, is over.  A
    worker's first load then neither reads nor hashes the 14 MB at 100,000 stores: 3,500 page
    faults of fresh memory and ~25 ms of each worker's start on the way to serving."""
    global _preloaded
    pre = _preloaded
    if pre is None or pre.seen is None or file_record.identity_and_ctime_of(config_file) != pre.seen:
        return None
    _preloaded = None
    return pre, pre.seen[0]


def _take_preloaded(file_digest: str) -> _Preloaded | None:
    """The preload inherited from the master if it is of these bytes; None from now on either way
    (its entries become this registry's own: a second registry of the process parses)."""
    global _preloaded
    pre, _preloaded = _preloaded, None
    return pre if pre is not None and pre.digest == file_digest else None


def _pread_all(fd: int, length: int, offset: int) -> bytes | None:
    """``length`` bytes of ``fd`` at ``offset``, or None if the file ends before."""
    parts = []
    while length > 0:
        part = os.pread(fd, length, offset)
        if not part:
            return None
        parts.append(part)
        length -= len(part)
        offset += len(part)
    return b"".join(parts)


_registries: weakref.WeakSet[Registry] = weakref.WeakSet()


class Registry:
    """The datastore registry of one process (docs/design.md §5.3).

    Not thread-safe: use one per process (a dsproxy worker is a single-threaded event loop) or
    guard it.  After ``os.fork()`` the child gets its own process slot automatically.
    """

    def __init__(
        self,
        base_dir: str | os.PathLike[str] | None = None,
        *,
        config_dir: str | os.PathLike[str] | None = None,
        run_dir: str | os.PathLike[str] | None = None,
        cache: str = "on",
        ttl: float = DEFAULT_TTL,
        create_shm: bool = True,
        role: shm.Role = shm.Role.LIBRARY,
    ) -> None:
        if cache not in MODES:
            raise ValueError(f"cache must be one of {', '.join(MODES)}, not {cache!r}")
        if not ttl > 0:
            raise ValueError(f"ttl must be positive, not {ttl!r}")
        self._config_dir, self._run_dir, self._data_dir = resolve_dirs(base_dir, config_dir, run_dir)
        for d in (self._config_dir, self._run_dir):
            os.makedirs(d, mode=0o750, exist_ok=True)
        self.mode = cache
        self.ttl = float(ttl)
        # the TTL the cache checks use: 0 forces the slow path on every lookup
        self._ttl = 0.0 if DISCARD_CACHES else self.ttl
        self._fast = cache == "on"
        self.role = role
        self._create_shm = create_shm
        self._config_file = os.path.join(self._config_dir, CONFIG_NAME)
        self._lock_file = os.path.join(self._config_dir, LOCK_NAME)
        self._files = FileCounters(self._run_dir)
        self._cache: _Cache | None = None
        self._instances: dict[str, Instance] = {}
        self._seg: shm.Segment | None = None
        self._words: memoryview | None = None
        self._fast_words: memoryview | None = None  # = _words when cache="on": one check on the hot path
        self._slot = -1
        self.degraded: str | None = None  #: why shared memory is not used, or None
        self.config_error: str | None = None  #: the last parse error of the file, while it lasts
        self._evict_names: frozenset[str] = frozenset()  # stores to drop once idle (current config)
        self._prewarm_failed: set[str] = set()  # stores prewarm() could not open (current config)
        self._warm: _Cache | None = None  # the cache prewarm() last completed
        self._warm_at: tuple[_Cache | None, int] = (None, 0)  # the cache being warmed, and how far it got
        self._spare: bytearray | None = None  # the text buffer of a cache a delta replaced: read into next
        self._next_check = _monotonic() + SEGMENT_CHECK_INTERVAL
        self.reloads = 0
        self.changes_applied = 0  #: loads that applied the ring's changes instead of parsing the whole file
        self.changes_patched = 0  #: ... of which read only the changed bytes (the manager's file record)
        self.changes_overlaid = 0  #: ... of which read only the overlay (fleet mode: dsproxy.config.overlay)
        self._overlay_file = overlays.path_in(self._config_dir)
        self._loading: Overlay | None = None  # the overlay the load under way read (before the file)
        #: the overlay's stores as last parsed: name -> (text, properties)
        self._overlay_parsed: dict[str, tuple[str, dict[str, Value]]] = {}
        # counts carried to a new segment: (old words, {old counter index: new index}, new words)
        self._carried: list[tuple[memoryview, dict[int, int], memoryview]] = []
        #: the segment this process moved from, while others may still count there (active_operations)
        self._previous: shm.Segment | None = None
        self.errors = 0  #: config errors: the file could not be read or parsed (SLOT_CONFIG_ERRORS)
        self._closed = False
        self._attach()  # also with cache=off: the slot makes the process visible, totals need the segment
        _registries.add(self)

    # -- shared memory ------------------------------------------------------------------------------

    def _attach(self) -> None:
        try:
            seg = shm.Segment.open(self._run_dir, create=self._create_shm)
            slot = seg.claim_slot(self.role)
        except shm.SegmentError as err:
            self._set_degraded(str(err))
            return
        self._seg, self._words, self._slot = seg, seg.words, slot
        self._fast_words = seg.words if self._fast else None
        self.degraded = None

    def _check_segment(self) -> None:
        """At most once a second: is the segment still sound, and is our slot still ours?

        A segment found removed, replaced, truncated or scribbled over is dropped without being
        touched again (a truncated mapping kills with SIGBUS) and the process runs degraded --
        correct and slow -- until the manager has put a new one in place; then it attaches again.
        """
        now = _monotonic()
        if now < self._next_check or self._closed:
            return
        self._next_check = now + SEGMENT_CHECK_INTERVAL
        seg = self._seg
        if seg is None:
            if self.degraded is not None and self.mode != "off":
                self._attach()
                if self._seg is not None:
                    log.info("shared memory is usable again: leaving degraded mode")
                    self._cache = None
            return
        problem = seg.check(contents=False)  # garbage in other slots: readers skip it, the manager repairs
        if problem is None and self._words is not None and seg.slot_pid(self._slot) != os.getpid():
            problem = shm.SegmentProblem(
                shm.ProblemKind.OVERWRITTEN, f"the process slot {self._slot} of {seg.name} was taken over"
            )
        if problem is None:
            if self._previous is not None:
                self._moving_from()  # unmaps the segment moved from once nobody counts there
            return
        if problem.kind is shm.ProblemKind.RETIRED:
            self._reattach()
            return
        self._seg = None
        with contextlib.suppress(Exception):
            seg.close()
        self._cache = None
        self._set_degraded(problem.message)

    def _drop_slot(self, what: str) -> None:
        """``what``, a word of our own slot, holds garbage that a lookup cannot count on: give the
        slot up and run degraded until the next check claims a fresh one (zeroed counters).  The
        operations counted in the old slot vanish with it, as with a replaced segment."""
        reason = f"{what} in process slot {self._slot} holds garbage"
        self._detach()
        self._cache = None  # its entries point at the old slot's counters
        self._set_degraded(reason)

    def _set_degraded(self, reason: str) -> None:
        if self.degraded != reason:
            log.warning("running degraded (no caching, every lookup reads the config): %s", reason)
        self.degraded = reason
        self._seg = self._words = self._fast_words = None
        self._slot = -1

    def _detach(self) -> None:
        self._close_old(self._previous, -1)
        self._previous = None
        seg = self._seg
        if seg is not None:
            with contextlib.suppress(Exception):
                seg.free_slot(self._slot)
            self._words = self._fast_words = None
            seg.close()
        self._seg = None
        self._slot = -1

    def _after_fork(self) -> None:
        """In a forked child: the parent's slot, counters and lock fds are not ours."""
        for inst in self._instances.values():
            inst.close()
        self._instances.clear()
        self._cache = None
        self._carried = []
        self._close_old(self._previous, -1)  # unmaps the child's copy only
        self._previous = None
        if self._seg is not None:
            self._words = self._fast_words = None
            self._seg.close()
            self._seg = None
            self._slot = -1
            self._attach()

    @property
    def paths(self) -> Paths:
        """The instance's directories (config, run, data) as :class:`~dsproxy.paths.Paths`."""
        return Paths.resolve(config_dir=self._config_dir, run_dir=self._run_dir, data_dir=self._data_dir)

    @property
    def generation(self) -> int | None:
        """The shared datastore generation now (``None`` without shared memory)."""
        return None if self._seg is None else self._seg.generation()

    @property
    def loaded_generation(self) -> int | None:
        """The generation of the config this process serves (``None`` if nothing is loaded)."""
        return None if self._cache is None else self._cache.generation

    @property
    def slot(self) -> int | None:
        return None if self._slot < 0 else self._slot

    @property
    def segment(self) -> shm.Segment | None:
        """The shared-memory segment (None when degraded); for status pages."""
        return self._seg

    def publish_stats(self, lookups: int, cache_hits: int, lookup_errors: int = 0, booted: bool = True) -> None:
        """Daemon workers: copy their lookup statistics (and this registry's config errors) into
        this process's slot and beat the heartbeat the master uses to find hung workers."""
        seg = self._seg
        if seg is not None and self._words is not None:  # in every mode: the master watches the heartbeat
            seg.publish_stats(
                self._slot,
                lookups=lookups,
                cache_hits=cache_hits,
                lookup_errors=lookup_errors,
                config_errors=self.errors,
                booted=booted,
            )

    # -- lookup ---------------------------------------------------------------------------------------

    def lookup(self, name: str, operation: Operation = Operation.READ) -> Handle:
        """Look ``name`` up for ``operation``; raises :class:`~dsproxy.errors.DatastoreError`."""
        words = self._fast_words
        if words is not None:
            # The fast path, in as few bytecodes as possible (it is the product): one generation
            # read, one clock read, one dict lookup, one precomputed decision, one increment, and
            # the re-read of the generation that makes the registration safe (see module docs).
            gen = words[_GEN]
            cache = self._cache
            if cache is not None and cache.generation == gen and _monotonic() < cache.expires:
                entry = cache.entries.get(name)
                if entry is not None:
                    counter = entry.fast[operation]
                    if counter >= 0:
                        try:  # free unless raised (3.11): garbage in the word makes += raise
                            words[counter] += 1
                            if words[_GEN] == gen:
                                return Handle((self, entry.instance, operation, words, counter))
                            words[counter] -= 1
                        except ValueError:
                            pass  # the slow path gives the slot up
            return self._lookup_slow(name, operation, words)
        if self._words is not None and self._fast:
            return self._lookup_slow(name, operation, self._words)
        return self._lookup_locked(name, operation)

    def _lookup_slow(self, name: str, operation: Operation, words: memoryview) -> Handle:
        """Everything the fast path does not answer: reloads, misses, refusals, first use, races."""
        while True:
            gen = words[_GEN]
            cache = self._cache
            if cache is None or cache.generation != gen or _monotonic() >= cache.expires:
                cache = self._load(gen)
                if self._words is not words:  # the segment was replaced or lost while loading
                    return self.lookup(name, operation)
            entry = cache.entries.get(name)
            if entry is None:
                raise NoSuchDatastore(name)
            refusal = _refusal(entry, operation)
            if refusal is not None:
                raise MaintenanceRefused(refusal)
            if operation == Operation.LOOKUP:  # registers nothing
                counter = -1
                break
            counter = entry.counter
            if counter < 0:
                counter = self._resolve_counter(entry)
            counter += operation
            try:
                words[counter] += 1
                if words[_GEN] == gen:
                    break
                # a config was published between our check and our registration: undo, start over
                words[counter] -= 1
            except ValueError:  # our own counter holds garbage (u64 overflow): see _drop_slot
                self._drop_slot(f"the operation counter of '{name}'")
                return self._lookup_locked(name, operation)
        inst = entry.instance
        if inst is None or inst.lock_fd < 0:
            try:
                inst = self._build(entry, cache.generation) if inst is None else self._reopen(entry, inst)
            except BaseException:
                if counter >= 0:
                    with contextlib.suppress(ValueError):
                        words[counter] -= 1
                raise
        else:  # the fd budget's clock mark: in use since the hand passed (and re-arm the fast path)
            inst.used = True
            entry.prime()
        if counter < 0:
            return Handle((self, inst, operation, None, -1))
        return Handle((self, inst, operation, words, counter))

    def _resolve_counter(self, entry: _Entry) -> int:
        assert self._seg is not None
        try:
            store = self._seg.store_index(entry.name, create=True)
        except shm.SegmentError as err:
            raise DatastoreError(f"cannot register an operation on '{entry.name}': {err}") from None
        assert store is not None
        entry.counter = self._seg.counter_index(self._slot, store)
        entry.prime()
        return entry.counter

    def _build(self, entry: _Entry, generation: int) -> Instance:
        """A new instance of ``entry``, around the previous one's fd if it has one (fd budget: §3.2)."""
        name, path = entry.name, str(entry.props["path"])
        previous = self._instances.get(name)
        while True:
            handover = previous is not None and previous.lock_fd >= 0 and previous.path == path
            if not handover:
                _fds.make_room(name)
            try:
                inst = instance_mod.build(name, entry.props, generation, previous)
                break
            except FdBudgetExhausted:
                raise
            except OutOfDescriptors:  # EMFILE within the budget: the reserve ran out; shed and retry
                if not _fds.shed():
                    raise
        if previous is not None:
            _fds.discard(previous)
        if handover:
            _fds.handover(inst, self)
        else:
            _fds.add(inst, self, reopened=previous is not None and previous.path == path)
        self._instances[name] = inst
        entry.instance = inst
        entry.prime()
        return inst

    def _reopen(self, entry: _Entry, inst: Instance) -> Instance:
        """Open the fd the budget closed (and take the shared lock again); re-arm the fast path."""
        while True:
            _fds.make_room(entry.name)
            try:
                inst.reopen()
                break
            except FdBudgetExhausted:
                raise
            except OutOfDescriptors:
                if not _fds.shed():
                    raise
        _fds.add(inst, self, reopened=True)
        entry.prime()
        return inst

    # -- the fd budget's questions (dsproxy.fdbudget.Owner) ----------------------------------------

    def _fd_busy(self, inst: Instance) -> bool:
        return self._instances.get(inst.name) is inst and self._own_counts(inst.name) != (0, 0)

    def _fd_recent(self, inst: Instance) -> bool:
        used, inst.used = inst.used, False
        cache = self._cache
        entry = None if cache is None else cache.entries.get(inst.name)
        if entry is not None and entry.instance is inst and entry.fast != _UNPRIMED:
            entry.fast = _UNPRIMED  # the next lookup takes the slow path, which marks it again
            used = True
        return used

    def _fd_close(self, inst: Instance) -> None:
        inst.close()
        cache = self._cache
        entry = None if cache is None else cache.entries.get(inst.name)
        if entry is not None and entry.instance is inst:
            entry.fast = _UNPRIMED  # the slow path reopens

    @property
    def fds(self) -> dict[str, int]:
        """This process's fd budget figures (:meth:`dsproxy.fdbudget.FdPool.stats`)."""
        return _fds.stats()

    def _load(self, gen: int) -> _Cache:
        """Slow path: read, hash and parse the file; cache it under ``gen`` (read before the file)."""
        self.reloads += 1
        seg = self._seg
        if seg is not None and seg.retired:
            self._reattach()
            seg = self._seg
            gen = seg.generation() if seg is not None else gen
        old = self._cache
        now = _monotonic()
        # the overlay before the file: based on the file read next, both are served; based on an
        # older one (or an overlay of another file), the file read next holds what it holds -- a
        # flush writes the file before the next overlay, so the other order could pair a file
        # with the empty overlay of a newer one and serve the file without its stores
        self._loading = overlay = self._read_overlay()
        delta = old is not None and seg is not None and self._fast and not (DISCARD_CACHES or FULL_INVALIDATION)
        if delta and old is not None and seg is not None and old.generation != gen:
            overlaid = None if now >= old.expires else self._overlay_only(old, gen, seg, overlay)
            if overlaid is not None:
                return overlaid
            # also past the TTL: the splice reads the whole file and proves every byte outside the
            # changed stores unchanged (else None: a full reload), so it notices what a full
            # reload would.  A first change after each TTL parsed 14 MB at 100,000 stores (0.8 s
            # alone, 2.7-3.4 s on the loaded machine: bench-fleet's transition outliers).  Past the
            # TTL it is also the full check a patch (which reads only the changed bytes) never is
            applied = self._apply_changes(old, gen, seg, now >= old.expires)  # DISCARD_CACHES: full reload
            if applied is not None:
                return applied
        checked = now  # (when the bytes served were last read whole)
        pre: _Preloaded | None
        identity: Identity | None
        unchanged = _take_unchanged_preload(self._config_file) if old is None and self._fast else None
        if unchanged is not None:  # the file as the master read it, still (after the overlay: as if read now)
            pre, identity = unchanged
            text, file_digest, checked = pre.text, pre.digest, pre.read_at
        else:
            text, identity = self._read_text()
            file_digest = _digest_after(text)
            pre = _take_preloaded(file_digest) if old is None and self._fast else None
        if pre is not None:
            config = pre.config
            self.config_error = None
        elif old is not None and old.file_digest == file_digest and not DISCARD_CACHES:
            self.config_error = None
            if old.generation == gen:  # TTL expired, nothing changed: instances stay valid
                old.expires = now + self._ttl
                old.identity = identity  # the same bytes (a touch: the next record names this stamp)
                self._spare = text
                if self._loading != old.overlay:  # (the file did not change; the overlay on it did)
                    self._install_changes(old, old, {})
                else:
                    self._acknowledge(gen)
                return old
            config = old.config
        else:
            try:
                config = parse(bytes(memoryview(text)[1:]), filename=self._config_file)
            except ParseError as err:
                return self._keep_last_good(gen, err)
            self.config_error = None
        if old is not None and old.generation == gen and old.file_digest != file_digest and seg is not None:
            # same generation, other content: edited by hand -- make everyone reload
            bumped = seg.bump_generation(expected=gen)
            if bumped == (gen + 1) & shm.MASK64:
                log.info("datastore.cfg changed on disk without a generation bump; bumped to %d", bumped)
                gen = bumped
        # (the stores' table entries come with the warm-up, a chunk at a time, or with a lookup:
        # all 100,000 at once were ~0.5 s of each worker's start before it could serve)
        entries = pre.entries if pre is not None else _make_entries(config)
        regions = None
        if pre is not None:
            regions = pre.regions  # (made under the same conditions as below)
        elif seg is not None and self._fast and not (DISCARD_CACHES or FULL_INVALIDATION):  # a delta may follow
            same = old is not None and old.regions is not None and old.file_digest == file_digest
            regions = old.regions if same and old is not None else Regions.of(text, config)
        cache = _Cache(gen, checked + self._ttl, text, config, entries, file_digest, regions, identity)
        self._install(cache, None if pre is None else pre.evicting)
        return cache

    def _apply_changes(self, old: _Cache, gen: int, seg: shm.Segment, verify: bool = False) -> _Cache | None:
        """The delta path: the stores the ring says changed since ``old``, spliced into it
        (:mod:`dsproxy.config.splice`: only their sections are parsed, the rest of the file is
        proven unchanged); None when the ring or the file does not allow it (then: full reload).
        Only the changed stores' entries are new: the others keep their instances and fds.
        Without ``verify`` (the TTL of ``old``'s last whole-file check not over) the file's record
        may let it read just the changed bytes (:meth:`_patch`)."""
        patched = None if verify else self._patch(old, gen, seg)
        if patched is not None:
            return patched
        for _ in range(APPLY_TRIES):
            told = seg.changes_since(old.generation, gen)
            text, identity = self._read_text()
            # a hand edit, or the ring does not tell: the stores where the texts differ (a guess,
            # proven by the splice like the ring's names: docs/design.md §4)
            changed = told if told is not None else edited_names(old.text, text)
            spliced = None if changed is None else splice(old.text, old.config, text, changed, old.regions)
            if spliced is None:
                # The file may be newer than ``gen``: the next write renamed its file after ``gen``
                # was read, and publishes it a moment later.  With the generation that names that
                # change, and the file read again after it, this is a delta still, not a full parse
                # of 100,000 stores (1-3 s); with the same generation, the file holds what no ring
                # entry says (a hand edit right after a write): the stores where it differs are
                # taken as changed too.
                now = seg.generation()
                if told is not None and now == gen:
                    edited = edited_names(old.text, text)
                    if edited is not None and not edited <= told:
                        spliced = splice(old.text, old.config, text, told | edited, old.regions)
            if spliced is not None:
                break
            self._spare = text
            if changed is None or now == gen:
                return None
            gen = now
            self._loading = self._read_overlay()  # (for the file read next: see _load)
        else:
            return None
        config, props = spliced
        cache = self._changed(old, gen, seg, text, config, props, identity, _monotonic() + self._ttl)
        self._spare = old.text if isinstance(old.text, bytearray) else None  # nobody reads it any more
        return cache

    def _patch(self, old: _Cache, gen: int, seg: shm.Segment) -> _Cache | None:
        """The delta path without a read of the whole file: when the file's record
        (:mod:`dsproxy.config.record`, set by the manager with the file) describes the open file
        (the stamp it names is the file's) and says it replaced exactly the file ``old`` was read
        from (that file's token and stamp), only the bytes between the start and the end both
        share are read (``pread``) and patched into ``old``'s text
        (:func:`dsproxy.config.splice.patch`); None when the record does not allow it.  At 100,000
        stores a one-store write was a 14 MB read and compare (~2 ms of a ~3 ms apply).

        The record is trusted as far as the file is (only who may write the file can set it); an
        edit in place that keeps the stamp (coarse timestamps) is not seen here, so the cache
        keeps the TTL of its last whole-file check: past it, the next change is read whole."""
        text, known = old.text, old.identity
        if known is None or not isinstance(text, bytearray) or len(text) - 1 != known[1][1]:
            return None
        try:
            fd = os.open(self._config_file, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None  # the read path reports it
        try:
            stamp = file_record.stamp_of(os.fstat(fd))
            record = file_record.read(fd)
            if record is None or record.new != stamp or record.old_token != known[0] or record.old != known[1]:
                return None  # not the manager's write after the one we read, or edited in place since
            length = stamp[1] - record.prefix - record.suffix
            if length > PATCH_MAX:
                return None
            middle = _pread_all(fd, length, record.prefix)
            after = file_record.stamp_of(os.fstat(fd))
        except OSError:
            return None
        finally:
            os.close(fd)
        if middle is None or after != stamp:
            return None  # edited in place while read
        props = patch(text, old.config, 1 + record.prefix, len(text) - record.suffix, middle, old.regions)
        if props is None:
            return None
        self.changes_patched += 1
        return self._changed(old, gen, seg, text, old.config, props, (record.token, stamp), old.expires)

    def _changed(
        self,
        old: _Cache,
        gen: int,
        seg: shm.Segment,
        text: bytearray,
        config: SectionConfig,
        props: dict[str, dict[str, Value] | None],
        identity: Identity | None,
        expires: float,
    ) -> _Cache:
        """The cache of ``gen`` after a delta: ``old``'s entries, those of the stores in ``props``
        made again (the others keep their instances and fds); installed and acknowledged."""
        entries = old.entries  # in place (~1 ms less at 100,000 stores): the old cache is dropped
        for name, new in props.items():
            entries.pop(name, None)
            if new is not None:
                entries[name] = _make_entry(name, new)
        with contextlib.suppress(shm.SegmentError):  # a lookup of the store reports it
            seg.register_stores([name for name in props if name in entries])
        self.config_error = None
        self.changes_applied += 1
        cache = _Cache(gen, expires, text, config, entries, regions=old.regions, identity=identity)
        self._install_changes(cache, old, props)
        return cache

    def _overlay_only(self, old: _Cache, gen: int, seg: shm.Segment, overlay: Overlay | None) -> _Cache | None:
        """The delta path when the file is still the one ``old`` was read from (its record's token
        and stamp) and ``overlay`` (read before this look at the file) is based on it
        (:mod:`dsproxy.config.overlay`): only the overlay's stores are looked at -- no read of
        the file, no splice.  None otherwise."""
        if old.identity is None or overlay is None or not overlay.applies_to(old.identity):
            return None
        if file_record.identity_of(self._config_file) != old.identity:
            return None
        if overlay == old.overlay:  # read already, with the load before (written before its bump)
            told = seg.changes_since(old.generation, gen)
            if told is None or not told <= overlay.stores.keys():
                return None  # something the overlay does not say: the file's paths look
        cache = _Cache(gen, old.expires, old.text, old.config, old.entries, old._digest, old.regions, old.identity)
        self.changes_applied += 1
        self.changes_overlaid += 1
        self._install_changes(cache, old, {})
        return cache

    def _read_overlay(self) -> Overlay | None:
        return overlays.read_beside(self._config_file)

    def _overlaid(
        self, cache: _Cache, before: dict[str, dict[str, Value] | None], overlay: Overlay | None
    ) -> dict[str, dict[str, Value] | None]:
        """Serve ``overlay`` (if it applies to ``cache``'s file) on top of it: the entries of its
        stores, and of those ``before`` (the overlay served until now) held, made again where
        what they serve changes; returns those stores' served properties (None: gone)."""
        if overlay is not None and not overlay.applies_to(cache.identity):
            overlay = None
        over = {} if overlay is None else self._overlay_sections(overlay)
        cache.overlay, cache.over, cache._served = overlay, over, None
        entries, config = cache.entries, cache.config
        changed: dict[str, dict[str, Value] | None] = {}
        for name in [*before, *(n for n in over if n not in before)]:
            want = over[name] if name in over else config.get(name)
            entry = entries.get(name)
            if (entry is None and want is None) or (entry is not None and entry.props == want):
                continue
            if want is None:
                entries.pop(name, None)
            else:
                entries[name] = _make_entry(name, want)
            changed[name] = want
        return changed

    def _overlay_sections(self, overlay: Overlay) -> dict[str, dict[str, Value] | None]:
        """The overlay's stores parsed (each text once: the last parse of a store is kept); a text
        that does not parse to exactly its store's section is logged and left out."""
        known = self._overlay_parsed
        out: dict[str, dict[str, Value] | None] = {}
        for name, text in overlay.stores.items():
            if text is None:
                out[name] = None
                continue
            hit = known.get(name)
            if hit is not None and hit[0] == text:
                out[name] = hit[1]
                continue
            section = overlays.store_section(name, text, self._overlay_file)
            if isinstance(section, str):
                log.error("overlay: not serving datastore '%s': %s", name, section)
                continue
            known[name] = (text, section)
            out[name] = section
        for name in [n for n in known if n not in overlay.stores]:
            del known[name]
        return out

    def _install_changes(
        self,
        cache: _Cache,
        old: _Cache,
        props: dict[str, dict[str, Value] | None],
    ) -> None:
        """:meth:`_install` for a delta: only the changed stores are looked at (and the overlay's,
        as the load read it before the file)."""
        props = {**props, **self._overlaid(cache, old.over, self._loading)}
        self._cache = cache
        entries = cache.entries
        evict = set(self._evict_names).difference(props)
        for name in props:
            self._prewarm_failed.discard(name)
            entry = entries.get(name)
            if (entry is not None and entry.evicts) or (entry is None and name in self._instances):
                evict.add(name)
        self._evict_names = frozenset(evict)
        for name in props:
            if name in evict:
                self._maybe_evict(name)
        if self._warm is old:  # keep it warm: build just the changed stores' instances
            self._prewarm_entries([e for name in props if (e := entries.get(name)) is not None])
            self._warm = cache
        self._acknowledge(cache.generation)

    def _read_text(self) -> tuple[bytearray, Identity | None]:
        """The config file's bytes after a ``"\n"`` (what :func:`splice` compares), read into one
        buffer -- the spare one if there is one: no 14 MB copy, no fresh memory at 100,000 stores.
        Errors as :meth:`_read_file`."""
        spare, self._spare = self._spare, None
        try:
            return _read_after(self._config_file, b"\n", spare)
        except OSError as err:
            self.errors += 1
            raise ConfigUnavailable(
                f'config unavailable: cannot read "{self._config_file}": {err.strerror or err}'
            ) from None

    def _read_file(self) -> bytes:
        """The config file's bytes; a file that cannot be read (EMFILE, EACCES) is a 503."""
        try:
            return read_raw(self._config_file)
        except OSError as err:
            self.errors += 1
            raise ConfigUnavailable(
                f'config unavailable: cannot read "{self._config_file}": {err.strerror or err}'
            ) from None

    def _install(self, cache: _Cache, evicting: list[str] | None = None) -> None:
        """Make ``cache`` current, evict what it says must go, then acknowledge its generation
        (``evicting``: its file's entries that evict, if known: a preload's)."""
        remade = self._overlaid(cache, {}, self._loading)
        self._cache = cache
        self._prewarm_failed = set()
        entries = cache.entries
        if evicting is None:
            evict = {name for name, e in entries.items() if e.evicts}
        else:  # (the overlay's stores have entries of their own now)
            evict = set(evicting).difference(remade)
            evict.update(n for n in remade if (e := entries.get(n)) is not None and e.evicts)
        evict.update(n for n in self._instances if n not in entries)
        self._evict_names = frozenset(evict)
        for name in self._evict_names:
            self._maybe_evict(name)
        self._acknowledge(cache.generation)

    def _keep_last_good(self, gen: int, err: ParseError) -> _Cache:
        """The file does not parse: keep serving the last good config (or fail if there is none)."""
        self.errors += 1
        if self.config_error != str(err):
            log.error("%s (still serving the last good config)", err)
        self.config_error = str(err)
        old = self._cache
        if old is None:
            raise ConfigUnavailable(f"config unavailable: {err}") from None
        old.generation, old.expires = gen, _monotonic() + self._ttl
        self._acknowledge(gen)
        return old

    def _acknowledge(self, gen: int) -> None:
        """Publish, in this process's slot, that it now serves ``gen`` (after it loaded it)."""
        seg = self._seg
        if seg is not None and self._words is not None:
            seg.acknowledge(self._slot, gen, reloads=self.reloads, config_errors=self.errors)

    def _reattach(self) -> None:
        """Move to the segment that replaced ours, carrying this process's operations over.

        The new slot is claimed with the operations already in its counters and the old slot as
        its origin, and only then is the old slot freed (see :func:`dsproxy.ipc.shm.moving_totals`),
        so a remove or maintenance transition counting meanwhile sees each operation once.  A
        handle of the old segment is released against the new counter it moved to.  The old
        segment stays mapped while others still count there (:meth:`active_operations`).
        """
        old, old_slot, old_words = self._seg, self._slot, self._words
        log.info("shared memory %s was replaced; reopening", old.name if old else "?")
        held = {} if old is None or old_words is None else old.held_operations(old_slot)
        self._seg = self._words = self._fast_words = None
        self._slot = -1
        self._cache = None
        try:
            seg = shm.Segment.open(self._run_dir, create=self._create_shm)
            carried = self._carry_into(seg, held)
            slot = seg.claim_slot(self.role, origin=old_slot, carried=carried)
        except shm.SegmentError as err:
            self._close_old(old, old_slot)
            self._set_degraded(str(err))
            return
        if old is not None and old_words is not None and held:
            mapping = {}
            for name in held:
                before, after = old.store_index(name), seg.store_index(name)
                if before is not None and after is not None:
                    i, j = old.counter_index(old_slot, before), seg.counter_index(slot, after)
                    mapping[i], mapping[i + 1] = j, j + 1
            self._carried.append((old_words, mapping, seg.words))
        self._keep_previous(old, old_slot)
        self._seg, self._words, self._slot = seg, seg.words, slot
        self._fast_words = seg.words if self._fast else None
        self.degraded = None

    @staticmethod
    def _carry_into(seg: shm.Segment, held: dict[str, tuple[int, int]]) -> dict[int, tuple[int, int]]:
        """``held`` by store index of ``seg`` (names registered first)."""
        if not held:
            return {}
        seg.register_stores(held)
        out = {}
        for name, counts in held.items():
            store = seg.store_index(name)
            if store is not None:  # a table without room: that count is lost (logged by lookups)
                out[store] = counts
        return out

    def _keep_previous(self, old: shm.Segment | None, slot: int) -> None:
        """Free our slot in the segment moved from, but keep it mapped while other processes may
        still count there: :meth:`active_operations` sums both meanwhile, as the manager does."""
        if old is None:
            return
        with contextlib.suppress(Exception):
            old.free_slot(slot)
        self._close_old(self._previous, -1)
        self._previous = old

    def _moving_from(self) -> shm.Segment | None:
        """The segment moved from, while a live process in it has not moved yet (else closed)."""
        prev, seg = self._previous, self._seg
        if prev is None:
            return None
        if seg is not None:
            superseded = {s.origin - 1 for s in seg.slots() if s.origin}
            if not all(s.slot in superseded for s in prev.slots()):
                return prev
        self._previous = None
        self._close_old(prev, -1)
        return None

    @staticmethod
    def _close_old(old: shm.Segment | None, slot: int) -> None:
        if old is not None:
            if slot >= 0:
                with contextlib.suppress(Exception):
                    old.free_slot(slot)
            old.close()

    def _release_carried(self, words: memoryview, index: int) -> None:
        """Release a handle counted in a segment this registry moved from: at its new counter."""
        for old_words, mapping, new_words in self._carried:
            if old_words is words:
                new_index = mapping.get(index)
                if new_index is None:
                    return
                if new_words is self._words:
                    with contextlib.suppress(ValueError):
                        new_words[new_index] -= 1
                else:  # moved again since
                    self._release_carried(new_words, new_index)
                return

    # -- release and eviction -----------------------------------------------------------------------

    def _release_slow(self, handle: Handle) -> None:
        """Release of a LOOKUP handle, or of any handle in the locked modes."""
        name = handle.instance.name
        if handle.operation == Operation.LOOKUP:
            if name in self._evict_names:
                self._maybe_evict(name)
            return
        try:
            read, write = self._files.update(name, int(handle.operation), -1)
        except OpFileError as err:
            log.error("release of '%s': %s", name, err)
            return
        if read or write or name not in self._instances:
            return
        if self._words is not None and self.mode == "config":
            evict = name in self._evict_names
        else:  # off / degraded: the last release of a store parses the file (what the fix removed)
            try:
                config = self.config()[0]  # (the file, with a fleet mirror's overlay)
            except (ParseError, ConfigUnavailable) as err:
                log.warning("release of '%s': cannot read the config, not evicting: %s", name, err)
                return
            props = config.get(name)
            evict = props is None or _make_entry(name, props).evicts
        if evict:
            self._evict(name)

    def _own_counts(self, name: str) -> tuple[int, int]:
        """This process's (read, write) operations on ``name``, from wherever this mode keeps them."""
        words, seg = self._words, self._seg
        if words is None or seg is None or self.mode != "on":
            return self._files.own(name)
        store = seg.store_index(name)
        if store is None:
            return 0, 0
        i = seg.counter_index(self._slot, store)
        return words[i], words[i + 1]

    def _maybe_evict(self, name: str) -> None:
        if name in self._instances and self._own_counts(name) == (0, 0):
            self._evict(name)

    def _evict(self, name: str) -> None:
        inst = self._instances.pop(name)
        inst.close()
        _fds.discard(inst)
        cache = self._cache
        entry = None if cache is None else cache.entries.get(name)
        if entry is not None and entry.instance is inst:
            entry.instance = None
            entry.prime()

    def refresh(self) -> bool:
        """Catch up with the shared generation (and the TTL) without a lookup; evict idle instances.

        Daemon workers call this from their event loop so that a maintenance transition is
        acknowledged, and fds released, without waiting for a request.  Returns True if it reloaded.
        """
        self._check_segment()
        words = self._words
        if words is None or self.mode == "off":
            return False
        cache = self._cache
        gen = words[_GEN]
        if cache is not None and cache.generation == gen and _monotonic() < cache.expires:
            assert self._seg is not None  # _words is the segment's
            self._seg.beat(self._slot)
            for name in self._evict_names:  # an operation may have ended since the last check
                self._maybe_evict(name)
            return False
        try:
            self._load(gen)
        except DatastoreError:
            return False
        return True

    def prewarm(self, budget: float | None = None) -> int:
        """Build the instances (and counter slots) of configured stores that have none yet.

        Idle-time work for daemon workers: each worker keeps its own instance map, so without it a
        store's first request *on each worker* pays for opening ``.lock`` -- with N workers the
        "cold" phase lasts several rounds of requests.  Stores whose maintenance mode evicts, or
        whose directory cannot be opened, are skipped (a lookup reports the latter), and so are new
        fds once the fd budget (:mod:`dsproxy.fdbudget`) is spent: prewarm never closes one store's
        fd to open another's, those stores open on their first lookup.  Stops after ``budget``
        seconds, and the next call goes on from there; returns 0 once through every store, else
        (roughly) how many are still to go.
        """
        cache = self._cache
        if cache is None or not self._fast or self._words is None or DISCARD_CACHES or self._warm is cache:
            return 0
        deadline = None if budget is None else _monotonic() + budget
        # resume where the last slice stopped: from the start each time, a first boot's warm-up
        # in slices walked all 100,000 entries per slice (the built ones skipped, each of the rest
        # timed) -- a third of the warm-up's samples at 100,000 stores (py-spy)
        at, start = self._warm_at
        start = start if at is cache else 0
        done = self._prewarm_entries(itertools.islice(cache.entries.values(), start, None), deadline)
        if done is None:
            self._warm, self._warm_at = cache, (None, 0)  # every tick would scan all stores again for nothing
            return 0
        self._warm_at = (cache, start + done)
        return max(len(cache.entries) - start - done, 1)

    def _prewarm_entries(self, entries: Iterable[_Entry], deadline: float | None = None) -> int | None:
        """Build the instances of ``entries`` that have none, until ``deadline``: None once through
        them all, else how many it went through (where the next slice starts)."""
        cache, seg = self._cache, self._seg
        assert cache is not None and seg is not None
        skip = self._prewarm_failed
        fds, instances = _fds.budget, self._instances
        built = False
        done = 0
        source = iter(entries)
        while chunk := list(itertools.islice(source, REGISTER_CHUNK)):
            # the chunk's store-table entries, the writers' lock taken once for those missing (one
            # lock per store would be 100,000 at a first boot)
            with contextlib.suppress(shm.SegmentError):  # _resolve_counter reports it
                seg.register_stores([e.name for e in chunk if e.counter < 0])
            for entry in chunk:
                done += 1
                if entry.instance is not None or entry.evicts or entry.name in skip:
                    continue
                if _fds.open >= fds and ((held := instances.get(entry.name)) is None or held.lock_fd < 0):
                    continue  # the fd budget is spent: a new fd would close another store's (§3.2)
                if built and deadline is not None and _monotonic() > deadline:
                    return done - 1  # (one store a slice at least: a slice shorter than a build gets on)
                built = True
                try:
                    if entry.counter < 0:
                        self._resolve_counter(entry)
                    inst = self._build(entry, cache.generation)
                except DatastoreError:
                    skip.add(entry.name)
                    continue
                # prewarm is not a use: the fd budget's clock marks (primed, ``used``) are cleared: the
                # store's first lookup takes the slow path once (~2 us), which marks it.  Marked, a
                # full budget of prewarmed stores (19,744 here at 100,000 stores) made the first miss
                # after prewarm sweep every one of them to clear its mark (and a store looked up since
                # lost its fd first: its mark was cleared with the rest) -- 0.2-0.9 s on the first
                # requests for stores outside the budget in bench-fleet at 100,000 stores.
                entry.fast = _UNPRIMED
                inst.used = False
        return None

    # -- the locked paths: cache=config, cache=off, degraded ---------------------------------------

    def _lookup_locked(self, name: str, operation: Operation) -> Handle:
        if self._closed:
            raise DatastoreError("the registry is closed")
        try:
            with config_lock(self._lock_file):
                entry, gen = self._locked_entry(name)
                refusal = _refusal(entry, operation)
                if refusal is not None:
                    raise MaintenanceRefused(refusal)
                if operation != Operation.LOOKUP:
                    self._files.update(name, int(operation), +1)
        except OpFileError as err:
            raise DatastoreError(str(err)) from None
        except LockError as err:  # timeout, out of fds, a refused lock file: the config is out of reach
            raise ConfigUnavailable(str(err)) from None
        inst = self._instances.get(name)
        if inst is None or inst.generation != gen or inst.lock_fd < 0:
            try:
                inst = self._build(entry, gen) if inst is None or inst.generation != gen else self._reopen(entry, inst)
            except BaseException:
                if operation != Operation.LOOKUP:
                    self._files.update(name, int(operation), -1)
                raise
        inst.used = True
        return Handle((self, inst, operation, None, -1))

    def _locked_entry(self, name: str) -> tuple[_Entry, int]:
        """The entry of ``name`` while holding the config lock; ``(entry, generation)``."""
        words = self._words
        if words is not None and self.mode != "off":  # cache=config
            gen = words[_GEN]
            cache = self._cache
            if cache is None or cache.generation != gen or _monotonic() >= cache.expires:
                cache = self._load(gen)
            entry = cache.entries.get(name)
            if entry is None:
                raise NoSuchDatastore(name)
            return entry, cache.generation
        # cache=off / degraded: parse every time; instances are keyed by the digest
        overlay = self._read_overlay()  # (before the file: see _load)
        text, identity = self._read_text()
        data = bytes(memoryview(text)[1:])
        file_digest = digest(data)
        try:
            config = parse(data, filename=self._config_file)
        except ParseError as err:
            self.errors += 1
            self.config_error = str(err)
            raise ConfigUnavailable(f"config unavailable: {err}") from None
        self.config_error = None
        config, file_digest = self._overlay_off(config, file_digest, overlay, identity)
        for other in list(self._instances):
            other_props = config.get(other)
            if other_props is None or _make_entry(other, other_props).evicts:
                self._maybe_evict(other)
        props = config.get(name)
        if props is None:
            raise NoSuchDatastore(name)
        return _make_entry(name, props), int(file_digest[:15], 16)

    # -- queries ----------------------------------------------------------------------------------------

    def active_operations(self, name: str) -> dict[str, int]:
        """``{"read": N, "write": M}`` over every live process (shared memory and counter files;
        while processes move to a new segment, in both: :func:`dsproxy.ipc.shm.moving_totals`)."""
        if self._seg is not None and self._seg.retired:  # its slots moved away: count where they went
            self._reattach()
        read, write = shm.total_operations(name, self._seg, self._files, self._moving_from())
        return {"read": read, "write": write}

    def config(self) -> tuple[SectionConfig, str]:
        """The config this process serves and its digest (refreshing it first, like a lookup).

        The mapping is the registry's own, read-only: a later lookup or refresh that applies the
        ring's changes may update it in place (copy it to keep a snapshot).  In fleet mode, with
        an overlay (:mod:`dsproxy.config.overlay`), it is a copy made once per overlay served."""
        if self._words is not None and self.mode != "off":
            gen = self._words[_GEN]
            cache = self._cache
            if cache is None or cache.generation != gen or _monotonic() >= cache.expires:
                cache = self._load(gen)
            return cache.served(), cache.digest
        overlay = self._read_overlay()  # (before the file: see _load)
        text, identity = self._read_text()
        data = bytes(memoryview(text)[1:])
        try:
            config = parse(data, filename=self._config_file)
        except ParseError as err:
            raise ConfigUnavailable(f"config unavailable: {err}") from None
        return self._overlay_off(config, digest(data), overlay, identity)

    def _overlay_off(
        self, config: SectionConfig, file_digest: str, overlay: Overlay | None, identity: Identity | None
    ) -> tuple[SectionConfig, str]:
        """cache=off (or degraded): the file just parsed (its ``identity``) with ``overlay``, read
        before it, if that applies to it."""
        if overlay is None or not overlay.applies_to(identity):
            return config, file_digest
        return _with_overlay(config, self._overlay_sections(overlay)), overlay.digest(None)

    @property
    def instances(self) -> dict[str, Instance]:
        """This process's instances by name (read-only view for status and tests)."""
        return dict(self._instances)

    def close(self) -> None:
        """Close every instance and free the process slot.  The registry is unusable afterwards."""
        if self._closed:
            return
        self._closed = True
        for inst in self._instances.values():
            inst.close()
            _fds.discard(inst)
        self._instances.clear()
        self._cache = None
        self._detach()
        _registries.discard(self)

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def _after_fork_in_child() -> None:
    for registry in list(_registries):
        with contextlib.suppress(Exception):
            registry._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)

__all__ = ["DISCARD_CACHES", "Handle", "Registry"]
