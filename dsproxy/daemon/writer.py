"""The manager's config writes: create, update, remove, maintenance, and the manual-edit watch.

Everything here runs in the manager's single writer thread, so writes and watch checks never
interleave inside this process; against other processes the config lock (``.datastore.lck``)
serialises them.  Every write takes that lock, checks the file is still the one it kept (stat
signature, else digest), writes from the kept blocks of section texts in O(changed)
(:mod:`dsproxy.daemon.kept`; temp file + ``writev`` + fsync + rename + directory fsync -- in fleet
mode without the fsyncs, done later by :meth:`ConfigWriter.sync_mirror` -- the digest
of the new bytes computed by a helper thread meanwhile, from the first changed block on)
and publishes what changed in the shared invalidation ring with the generation bump, from inside
the lock, *after* the rename: publish after write.  A write that finds the file changed by hand
publishes "everything"; so does the watch when it notices a hand edit.  The file a write replaced
is freed later, off the write's path and the workers' (:meth:`ConfigWriter._replaced_later`).

Where a one-store write at 100,000 stores (a 14 MB file) goes, on the loaded 2-core project
machine, in ``scripts/bench-scale``: the forward and the answer through a worker ~1 ms; the lock,
the kept config and the changed section ~0.5 ms; ``replace_file`` 11-13 ms (the floor the bench
measures, ~12-15 ms, also frees the old file's blocks in its rename); the publish ~0.2 ms; then
each worker applies it in ~2.5 ms (:mod:`dsproxy.config.splice`).

Decisions the spec leaves open (recorded here, enforced below):

* ``path`` is fixed at create (default ``<data_dir>/<name>``): moving a store is not an update.
* Create lays the store out (§3.2) *before* the config names it, and removes what it created if
  the config write then fails, so a listed store always has its ``.chunks`` and ``.lock``.  What it
  is about to create is written to the create journal first (:mod:`dsproxy.daemon.journal`), and
  a manager killed in between removes the leftovers on its next start.
* The lay-out never follows a link (:mod:`dsproxy.fsutil`): the store path is walked from ``/``
  one directory fd at a time with ``O_NOFOLLOW`` (``mkdirat`` for missing parents), so a path
  with a symbolic link anywhere in it is refused (400, naming the link) -- the store owner owns
  the data dir and could otherwise point root anywhere.  ``.chunks`` and ``.lock`` are created
  inside the store's fd (``mkdirat``, ``O_CREAT|O_EXCL|O_NOFOLLOW``) and handed to the store owner
  with ``fchown`` on their fds, the store directory last: swapping a name meanwhile changes
  nothing root does.  A path must be canonical (no ``.``, ``..``, ``//``) and the nesting check
  compares components, so ``//srv/a/sub`` is ``/srv/a/sub``, inside ``/srv/a``.  An existing
  empty directory is accepted if root, the manager's user or the store owner owns it.
* Remove only drops the section; the data stays on disk (as with PBS without ``destroy-data``).
* Remove checks the active operations while holding the config lock.  Under ``cache=config|off``
  registrations take that lock too, so the check is exact; under ``cache=on`` a lookup that raced
  the check may still finish -- its instance then sees "no such datastore" on its next lookup.
* When ``datastore.cfg`` does not parse, every write is refused with the parse error (503): the
  admin's hand edit is never overwritten.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import hashlib
import logging
import os
import stat
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from ..config import (
    ConfigError,
    DigestMismatch,
    LockError,
    MaintenanceMode,
    ParseError,
    PropertyError,
    SectionConfig,
    Value,
    WriteError,
    check_section,
    check_value,
    config_lock,
    digest,
    dump,
    parse,
    parsed,
    read_raw,
    replace_file,
    request,
)
from ..config import overlay as overlays
from ..config import record as file_record
from ..config.overlay import Overlay
from ..config.record import FileRecord, Stamp, new_token
from ..fsutil import (
    STORE_DIR_MODE,
    DirChain,
    UnsafePath,
    components,
    first_missing,
    is_within,
    lay_out_store,
    make_store,
    normalise,
    walk,
)
from ..ipc import shm
from ..ipc.opfile import FileCounters
from ..paths import Paths
from .journal import CreateJournal, PendingCreate
from .kept import Change, KeptConfig, PathIndex, PendingWrite, section_bytes

log = logging.getLogger("dsproxy.writer")


class WriteRefused(Exception):
    """A write the manager will not do; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class UnparsableFile(WriteRefused):
    """The write found ``datastore.cfg`` not parsing (a hand edit): refused, the file untouched."""


class _HandEdited(Exception):
    """Fleet mode: the write found the file edited by hand -- it is rewritten whole instead."""


@dataclass
class WriteResult:
    generation: int | None
    digest: str
    name: str
    maintenance: MaintenanceMode | None = None


@dataclass
class MirrorState:
    """What this host mirrors of etcd (fleet mode), kept by the writer thread."""

    sections: dict[str, dict[str, Value]]  #: the valid sections etcd holds, typed
    mod_revisions: dict[str, int] = field(default_factory=dict)  #: every store key's (the write compares)
    #: values of a full read known to be well-formed section texts that parse to their section:
    #: written as they are (no render and re-parse of 100,000 sections)
    texts: dict[str, bytes] = field(default_factory=dict)
    revision: int = 0  #: the etcd revision the file mirrors (0: not read yet)
    loaded: bool = False  #: etcd was read (else: the file as found at start)
    fenced: str | None = None  #: why every store is offline locally (``--fleet-fencing offline``)
    fenced_mode: Value = ""
    hand_edits: int = 0
    link: shm.FleetState = shm.FleetState.DISCONNECTED
    disconnected_since: float | None = field(default_factory=time.time)

    def record(self, seg: shm.Segment, generation: int) -> None:
        """Write the whole fleet record: ``generation`` serves :attr:`revision`."""
        state = shm.FleetState.FENCED if self.fenced is not None else self.link
        seg.set_fleet(
            revision=self.revision,
            generation=generation,
            state=state,
            disconnected_since=None if state in shm.CONNECTED_STATES else self.disconnected_since,
            hand_edits=self.hand_edits,
        )


@dataclass
class FleetWrite:
    """A config write validated for etcd: the section text to put (``None``: delete the key) and
    the key's mod_revision to compare (0: the key must not exist)."""

    name: str
    value: bytes | None
    mod_revision: int
    maintenance: MaintenanceMode | None = None
    layout: _Layout | None = None


class _FileState:
    """What the writer last saw of the file: its stat signature (ino, size, mtime_ns, ctime_ns),
    its digest -- or the kept config that was written, whose digest is hashed when first asked
    (:attr:`KeptConfig.digest`) -- the generation that published it, and its parse error."""

    __slots__ = ("_digest", "error", "generation", "kept", "signature")

    def __init__(
        self,
        signature: tuple[int, int, int, int] | None = None,
        digest: str | None = None,
        generation: int | None = None,
        error: str | None = None,
        kept: KeptConfig | None = None,
    ) -> None:
        self.signature, self._digest, self.kept = signature, digest, kept
        self.generation, self.error = generation, error

    @property
    def digest(self) -> str | None:
        if self._digest is None and self.kept is not None:
            self._digest = self.kept.digest
        return self._digest

    @property
    def known(self) -> bool:
        """Whether the digest is known (or can be hashed from the kept config)."""
        return self._digest is not None or self.kept is not None

    def describes(self, kept: KeptConfig) -> bool:
        """Whether the file as seen is ``kept`` (the one written last, or the same digest)."""
        return self.kept is kept or (self.known and self.digest == kept.digest)


def _stat_signature(path: Path) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _text_props(body: dict[str, Any], skip: tuple[str, ...]) -> dict[str, object]:
    """Request properties -> raw values for the schema (see :mod:`dsproxy.config.request`)."""
    try:
        return request.request_properties(body, skip)
    except PropertyError as err:
        raise WriteRefused(400, str(err)) from None


class ConfigWriter:
    """Config writes of one instance.  Not thread-safe: the manager calls it from one thread."""

    #: a file of at least this many stores gets the manager's parse left beside it (leave_parse;
    #: its parse is ~45 ms here)
    PARSED_MIN_STORES: int = 10_000

    def __init__(
        self,
        paths: Paths,
        segment: Callable[[], shm.Segment | None],
        store_owner: tuple[int, int] | None = None,
    ) -> None:
        self.paths = paths
        self.config_file = paths.config_file
        self.lock_file = paths.lock_file
        self._segment = segment
        self.store_owner = store_owner
        self.files = FileCounters(paths.run_dir)
        self.state = _FileState()
        self.group = os.getegid()
        self.journal = CreateJournal(paths.config_dir)
        self.kept: KeptConfig | None = None  # the file as last written or read (O(changed) writes)
        #: hashes the bytes being written while they are written and synced (hashlib drops the GIL)
        self._hasher = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="digest")
        #: closes replaced files (frees their blocks) once no write is under way: see _replaced_later
        self._closer = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="closer")
        self._replaced: list[int] = []  # fds of replaced files not closed yet, oldest first
        #: mirrored stores whose directories a first read has not looked at yet, the next last
        self._layout_pending: list[str] = []
        self._written = 0.0  # monotonic time the last write ended
        self._watched: int | None = None  # stores in the file as the watch last parsed it
        #: the retired segment processes are still moving from (the manager's), for the totals
        self._previous: Callable[[], shm.Segment | None] = lambda: None
        self.mirror: MirrorState | None = None  #: fleet mode: what this host mirrors of etcd
        self._reread = False  # the current write found the file edited by hand
        self._unsynced = False  # fleet mode: the last write's file is not fsynced yet (sync_mirror)
        #: fleet mode: the overlay on disk (:mod:`dsproxy.config.overlay`) and the file it is based on
        #: (this manager's last whole write, with its record), or None: batches write the file whole
        self.overlay: Overlay | None = None
        self._overlay_path = overlays.path_in(paths.config_dir)
        self._overlay_since = 0.0  # monotonic time the overlay's first store came
        self._overlay_signature: tuple[int, int, int, int] | None = None  # of the overlay as written
        #: the file the overlay is based on, as written (its digest: hashed when first asked)
        self._base_pieces: list[bytes] | None = None
        self._base_hash: str | None = None

    # -- publishing ---------------------------------------------------------------------------------

    def _publish(self, records: list[tuple[shm.ChangeKind, str]]) -> int | None:
        seg = self._segment()
        revision = None if self.mirror is None else self.mirror.revision
        return None if seg is None else seg.publish(records, revision=revision)

    @staticmethod
    def _record_of(kept: KeptConfig, pending: PendingWrite, reread: bool) -> FileRecord:
        """The file record of the write of ``pending``: a new token, and -- when the file it replaces
        is the one this manager wrote from ``kept`` (not edited by hand since) -- that file's token
        and stamp and the bytes both share at the start and the end (:meth:`KeptConfig.window`)."""
        token = new_token()
        if reread or kept.identity is None:
            return FileRecord(token)
        old_token, old_stamp = kept.identity
        prefix, suffix = kept.window(pending)
        return FileRecord(token, old_token=old_token, old=old_stamp, prefix=prefix, suffix=suffix)

    def _replace(
        self, pending: PendingWrite, record: FileRecord, sync: bool = True
    ) -> tuple[tuple[bytes, Stamp] | None, tuple[int, int, int, int] | None]:
        """Replace the file with ``pending``'s bytes and ``record``; returns the written file's
        identity for :meth:`KeptConfig.commit` (None: no record was set, or the file was replaced
        again meanwhile) and its stat signature (None if it is not the file written: the next write
        reads the file -- an editor's rename of the same size, ``sed -i``, right after ours)."""
        written = replace_file(self.config_file, pending.pieces, sync=sync, record=record)
        signature = _stat_signature(self.config_file)
        if signature is None or signature[:3] != written.stamp:
            signature = None
        identity = (record.token, written.stamp) if signature is not None and written.recorded else None
        return identity, signature

    def _write(
        self,
        plan: Callable[[SectionConfig], list[Change]],
        expected_digest: str | None,
        verified: dict[str, bytes] | None = None,
        flush: bool = False,
    ) -> tuple[KeptConfig, int | None]:
        """One locked write in O(changed) (:mod:`dsproxy.daemon.kept`): ``plan`` gets the current
        config (read-only) and returns the changes; returns ``(the kept config written, generation)``
        (its digest: :attr:`KeptConfig.digest`, hashed when first asked in fleet mode).

        In fleet mode a plan without changes writes nothing (the generation stays), and the
        publish names the mirror's revision in the fleet record; :attr:`_reread` tells the plan
        whether the file was found edited by hand.  A fleet write that fits the overlay goes there
        and not into the file (:mod:`dsproxy.config.overlay`); ``flush`` writes the file whole with
        what the overlay holds (:meth:`flush_overlay`)."""
        try:
            with config_lock(self.lock_file):
                kept, reread = self._current()
                self._reread = reread
                if expected_digest is not None and expected_digest != kept.digest:
                    raise DigestMismatch()
                changes = plan(kept.config)
                if not changes and self.mirror is not None and not flush:
                    return kept, self._unchanged(kept)
                pending = kept.prepare(changes, str(self.config_file), verified)
                overlay = None if reread or flush else self._overlay_after(pending)
                if overlay is not None:  # fleet mode: the batch into the overlay, the file later
                    return kept, self._write_overlay(kept, pending, *overlay)
                # what the overlay held is in this file too: its stores go into the ring with the write's
                # own (the workers' splice proves every other byte unchanged: without them, a full parse)
                held = self.overlay if self.overlay is not None and self.overlay.stores else None
                # meanwhile: write and fsync (fleet mode: no fsync to hash beside -- hashed when asked)
                hashing = self._hasher.submit(kept.hash, pending) if self.mirror is None else None
                # what the workers need not read again: the file record (dsproxy.config.record),
                # naming the file replaced when it is one this manager wrote from the kept blocks
                record = self._record_of(kept, pending, reread)
                with self._replaced_later():
                    # fleet mode: etcd is the durable copy, the file is synced later (sync_mirror)
                    identity, signature = self._replace(pending, record, sync=self.mirror is None)
                    self._unsynced = self.mirror is not None
                    hashed = None if hashing is None else hashing.result()
                    kept.commit(pending, hashed, identity)
                    records = pending.records
                    if held is not None:
                        records = records + [
                            (shm.ChangeKind.UPDATED, name) for name in held.stores if name not in pending.sections
                        ]
                    if reread:  # a file changed by hand since the last write: everyone reloads
                        records = [(shm.ChangeKind.EVERYTHING, "*")]
                    self._overlay_reset(identity, held if flush else None, pending.pieces)  # (a flush: same digest)
                    gen = self._publish(records)  # (after the write)
        except ParseError as err:
            self.state.error = str(err)
            raise UnparsableFile(
                503, f"refusing to write: the configuration on disk does not parse (fix it first): {err}"
            ) from None
        except ConfigError as err:
            raise WriteRefused(_status_of(err), str(err)) from None
        self.state = _FileState(signature, None, gen, None, kept)
        return kept, gen

    # -- fleet mode: the overlay (dsproxy.config.overlay) ------------------------------------------

    def _overlay_after(self, pending: PendingWrite) -> tuple[Overlay, bytes] | None:
        """The overlay with ``pending``'s stores added and its bytes, or None: not in fleet mode, no
        overlay based on the file (its last whole write had no record), a change of everything, or
        past the overlay's bounds (stores; bytes as written, which a reader refuses above) -- then
        the write goes into the file whole, as before."""
        base = self.overlay
        if self.mirror is None or base is None or not pending.records:
            return None
        if any(kind is shm.ChangeKind.EVERYTHING for kind, _ in pending.records):
            return None
        stores = dict(base.stores)
        for name, section in pending.sections.items():
            stores[name] = None if section is None else section[0].decode()
        if len(stores) > overlays.MAX_STORES:
            return None
        overlay = Overlay(base.token, base.stamp, base.carried, stores)
        data = overlay.dump()
        return None if len(data) > overlays.MAX_BYTES else (overlay, data)

    def _write_overlay(self, kept: KeptConfig, pending: PendingWrite, overlay: Overlay, data: bytes) -> int | None:
        """(Under the config lock.)  Publish ``pending`` through the overlay (``data``: its bytes):
        written before the bump, as the file would be; the kept config then holds what the file
        will (its record window is no longer the file's: the next whole write names no old file)."""
        try:
            replace_file(self._overlay_path, data, sync=False)
        except WriteError as err:
            raise WriteRefused(500, str(err)) from None
        kept.commit(pending, None, None)
        if self.overlay is None or not self.overlay.stores:
            self._overlay_since = time.monotonic()
        self.overlay, self._overlay_signature = overlay, _stat_signature(Path(self._overlay_path))
        self._written = time.monotonic()
        self._unsynced = True
        gen = self._publish(pending.records)
        self.state = _FileState(self.state.signature, None, gen, None, kept)
        return gen

    def _overlay_reset(
        self, identity: tuple[bytes, Stamp] | None, flushed: Overlay | None, pieces: list[bytes]
    ) -> None:
        """(After a whole write in fleet mode, before its publish.)  An empty overlay based on the
        file just written (``pieces``: its bytes) -- carrying on the digest of ``flushed`` (the
        overlay it took in), else a new one -- or, for a file without a record, none: batches
        then write the file whole."""
        if self.mirror is None:
            return
        self._base_pieces, self._base_hash = pieces, None
        if identity is None:
            self.overlay = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._overlay_path)
            return
        carried = flushed.digest(None) if flushed is not None else overlays.fresh_digest(identity[0])
        overlay = Overlay(identity[0], identity[1], carried, {})
        try:
            replace_file(self._overlay_path, overlay.dump(), sync=False)
        except WriteError as err:  # the workers ignore an overlay of another file: none is as good
            log.warning("%s", err)
            self.overlay = None
            return
        self.overlay, self._overlay_signature = overlay, _stat_signature(Path(self._overlay_path))

    def _fold_overlay(self, kept: KeptConfig) -> None:
        """(Start in fleet mode.)  The overlay an earlier manager left on the file, into ``kept``
        -- the workers serve it, so the mirror until etcd is read again is the file with it --
        and continued by this one's batches.  An overlay of another file, or a store text that
        does not parse, is not taken (the file alone; the first read of etcd writes it whole)."""
        path = str(self.config_file)
        if not os.path.lexists(self._overlay_path):
            return
        identity = file_record.identity_of(path)
        overlay = overlays.read_beside(path)
        if overlay is None or not overlay.applies_to(identity) or not self._fold(kept, overlay, path):
            log.warning("%s is not the overlay of %s: removed", self._overlay_path, path)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._overlay_path)  # (before the first publish: nobody serves it any more)
            return
        log.info("fleet: continuing the overlay of %d datastores on %s", len(overlay.stores), path)

    def _fold(self, kept: KeptConfig, overlay: Overlay, path: str) -> bool:
        changes: list[Change] = []
        verified: dict[str, bytes] = {}
        try:
            for name, text in overlay.stores.items():
                if text is None:
                    if name in kept.config:
                        changes.append((name, None))
                    continue
                cfg = parse(text.encode(), filename=self._overlay_path)
                if list(cfg) != [name]:
                    return False
                changes.append((name, cfg[name]))
                verified[name] = text.encode()
            base = read_raw(path)
            if digest(base) != kept.digest:
                return False  # (replaced since the watch read it)
            pending = kept.prepare(changes, path, verified)
        except (ConfigError, OSError):
            return False
        kept.commit(pending, None, None)
        self.overlay, self._overlay_signature = overlay, _stat_signature(Path(self._overlay_path))
        self._base_pieces, self._base_hash = [base], None
        self._overlay_since = time.monotonic()
        self.state = _FileState(self.state.signature, None, self.state.generation, self.state.error, kept)
        return True

    def _written_digest(self, kept: KeptConfig) -> str:
        """SHA-256 of the file as this manager last wrote it: ``kept``'s bytes, or -- while the
        overlay holds stores -- those of the file it is based on (hashed when first asked: only a
        file whose stat signature changed, or a generation someone else bumped, asks)."""
        if self.mirror is None or self.overlay is None or not self.overlay.stores or self._base_pieces is None:
            return kept.digest
        if self._base_hash is None:
            h = hashlib.sha256()
            for piece in self._base_pieces:
                h.update(piece)
            self._base_hash = h.hexdigest()
        return self._base_hash

    def _overlay_edited(self) -> bool:
        """Fleet mode: whether the overlay on disk is not the one this manager wrote last (its stat
        signature), or there is one where this manager wrote none."""
        if self.mirror is None:
            return False
        return _stat_signature(Path(self._overlay_path)) != (
            self._overlay_signature if self.overlay is not None else None
        )

    def drop_stale_overlay(self) -> None:
        """A manager without ``--etcd`` (before its start's bump): an overlay an earlier run in fleet
        mode left is written into the file -- its workers served it -- and removed; one that does
        not apply to the file (or does not parse on it) is only removed."""
        if not os.path.lexists(self._overlay_path):
            return
        path = str(self.config_file)
        try:
            with config_lock(self.lock_file):
                overlay = overlays.read_beside(path)
                if overlay is not None and overlay.stores and overlay.applies_to(file_record.identity_of(path)):
                    served = overlays.served(path)
                    replace_file(path, dump(served).encode())
                    log.info("wrote the %d datastores of the fleet overlay into %s", len(overlay.stores), path)
        except (ConfigError, OSError) as err:
            log.warning("the fleet overlay %s is not written into %s: %s", self._overlay_path, path, err)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._overlay_path)

    def served_digest(self, kept: KeptConfig) -> str:
        """The config's digest as the workers show it: the overlay's in fleet mode, else the file's."""
        if self.mirror is not None and self.overlay is not None:
            return self.overlay.digest(None)
        return kept.digest

    def flush_overlay(self, idle: float = overlays.FLUSH_IDLE) -> int | None:
        """Fleet mode: write the file whole with the overlay's stores once no write ended for
        ``idle`` s (or the overlay is :data:`~dsproxy.config.overlay.MAX_AGE` old); the
        generation, or None when nothing was due."""
        overlay, now = self.overlay, time.monotonic()
        if self.mirror is None or overlay is None or not overlay.stores:
            return None
        if now - self._written < idle and now - self._overlay_since < overlays.MAX_AGE:
            return None

        def plan(cfg: SectionConfig) -> list[Change]:
            if self._reread:
                raise _HandEdited()
            return []

        try:
            return self._write(plan, None, flush=True)[1]
        except (_HandEdited, UnparsableFile):
            self._hand_edit()
            return self._rewrite_mirror()

    def _unchanged(self, kept: KeptConfig) -> int | None:
        """A fleet write that changes nothing: the file (as kept) mirrors the new revision too."""
        state, seg, mirror = self.state, self._segment(), self.mirror
        if seg is not None and mirror is not None and state.generation is not None:
            seg.set_fleet(revision=mirror.revision, generation=state.generation)
        return state.generation

    @contextlib.contextmanager
    def _replaced_later(self) -> Iterator[None]:
        """Hold the file about to be replaced open, and close it later, when no write is under way:
        the rename then only unlinks it, and freeing its blocks (~2.5-4 ms of kernel time for
        14 MB on ext4, a quarter of the write floor) happens neither in the write nor beside the
        workers applying it.  Closed right after the publish, in a helper thread, it took CPU from
        them on this 2-core machine: the workers served the write 7.0-7.8 ms after the answer
        against 3.9-4.2 ms with the close 0.2 s later (bench-scale's write at 100,000 stores, A/B).
        So the fd waits for :meth:`close_replaced` (the watch, once no write ended for
        :data:`CLOSE_AFTER` s, one a pass: the frees spread out); in a burst of writes, with
        :data:`REPLACED_HELD` waiting, the oldest is closed as the next write starts, beside its
        write and fsync (I/O waits)."""
        while len(self._replaced) >= REPLACED_HELD:
            self._closer.submit(os.close, self._replaced.pop(0))
        try:
            fd = os.open(self.config_file, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            fd = -1  # missing (the first create) or unreadable: the rename frees it, as it would
        try:
            yield
        finally:
            self._written = time.monotonic()
            if fd >= 0:
                self._replaced.append(fd)

    def close_replaced(self, idle: float = 0.0) -> bool:
        """Close the oldest replaced file still held (in the closer thread) if no write ended in
        the last ``idle`` seconds; whether there was one."""
        held = self._replaced
        if not held or time.monotonic() - self._written < idle:
            return False
        self._closer.submit(os.close, held.pop(0))
        return True

    def _current(self) -> tuple[KeptConfig, bool]:
        """The kept config, re-read from the file when it may not be the file any more (a hand edit,
        or the first write); and whether it was re-read after a hand edit.

        The file is trusted to be what was kept while its stat signature is the one taken right
        after the last write or check (inode, size, mtime, ctime: a rename or a write in place
        changes one) and nobody else bumped the generation since (a registry that found the file
        edited by hand under an unchanged signature -- coarse timestamps -- bumps it); otherwise
        it is read and its digest compared, as before.
        """
        kept, state, seg = self.kept, self.state, self._segment()
        if kept is not None and self._overlay_edited():
            log.error("%s was changed by someone else than this manager", self._overlay_path)
            return kept, True  # (the plan of a mirror write undoes it; the kept config is still the mirror)
        current = None if seg is None else seg.generation()
        trusted = kept is not None and state.signature is not None and state.describes(kept)
        if trusted and state.generation is not None and current is not None:
            trusted = current == state.generation
        signature = _stat_signature(self.config_file)
        if trusted and signature == state.signature:
            assert kept is not None
            return kept, False
        data = read_raw(self.config_file)
        if kept is not None and digest(data) == self._written_digest(kept):
            # the file is what was kept, at the generation now current: trusted again from here on
            # (else every write -- refused ones too -- read the file again after someone else's bump)
            generation = current if current is not None else state.generation
            self.state = _FileState(signature, kept.digest, generation, state.error, kept)
            return kept, False
        self.kept = KeptConfig.read(data, str(self.config_file))
        return self.kept, kept is not None

    def _kept_of(self, data: bytes, file_digest: str) -> KeptConfig:
        """The kept config for the file ``data`` as the watch read it: the next write starts from it
        (the whole file parsed and rendered once here, at start or after a hand edit, not in that write)."""
        if self.kept is None or self.kept.digest != file_digest:
            self.kept = KeptConfig.read(data, str(self.config_file))
        return self.kept

    def leave_parse(self) -> None:
        """(Writer thread, once the start has read the file or written its first mirror.)  The
        parse of the file as it is now, beside it for the proxy master's preload
        (:mod:`dsproxy.config.parsed`); a file of fewer than :attr:`PARSED_MIN_STORES` stores
        gets none (its parse is quick), nor one while the overlay holds changes (a restart that
        continued it), and a parse left by an earlier start goes.  ~45 ms at
        100,000 stores (the dump, the digest if not known yet, 11 MB written)."""
        kept = self.kept
        # (with an overlay's stores the kept config is not the file's: its parse would never be taken)
        if kept is None or len(kept.config) < self.PARSED_MIN_STORES or (self.overlay and self.overlay.stores):
            with contextlib.suppress(OSError):
                parsed.remove(self.config_file)
            return
        started = time.monotonic()
        try:
            parsed.save(self.config_file, kept.digest, kept.config)
        except (OSError, WriteError) as err:  # the master parses the file itself, as without one
            log.warning("cannot leave the parse of %s for the proxy: %s", self.config_file, err)
            with contextlib.suppress(OSError):
                parsed.remove(self.config_file)
            return
        log.debug("the parse of %d stores left for the proxy in %.3f s", len(kept.config), time.monotonic() - started)

    def rebase(self, generation: int) -> None:
        """A new segment serves ``generation``: the file as last seen is what it publishes, so a
        hand edit from now on is still noticed (its generation is compared with this one).  In
        fleet mode the new segment's fleet record is written for it."""
        self.state.generation = generation
        seg, mirror = self._segment(), self.mirror
        if seg is not None and mirror is not None:
            mirror.record(seg, generation)

    def configured(self) -> int | None:
        """How many stores the file has (None before the first write or check): the kept config's
        count, or the watch's once it parsed a hand edit (the kept config is re-read only by the
        next write; until then its count is stale, and a store-table move sized by it would be
        too small -- and repeated on every check, since the names come back at once)."""
        kept = self.kept
        if kept is not None and (self._watched is None or self.state.describes(kept)):
            return len(kept.config)
        return self._watched

    def counted(self) -> bool:
        """Whether :meth:`configured` describes the file as it is (no change since the watch or a
        write last looked: a registry may register a hand edit's names before the watch parses it)."""
        return _stat_signature(self.config_file) == self.state.signature

    def active_operations(self, name: str) -> tuple[int, int]:
        return shm.total_operations(name, self._segment(), self.files, self._previous())

    # -- create ---------------------------------------------------------------------------------------

    def _create_request(self, body: dict[str, Any]) -> tuple[str, dict[str, Value], str]:
        """A create's ``(name, typed properties, path)``, validated (400 naming the field)."""
        name = body.get("name")
        if not isinstance(name, str):
            raise WriteRefused(
                400, "parameter verification failed - 'name': property is missing and it is not optional"
            )
        props = _text_props(body, ("name", "digest"))
        props.setdefault("path", str(self.paths.data_dir / name))
        try:
            request.check_create(props)
            typed = check_section(name, props)
        except PropertyError as err:
            raise WriteRefused(400, str(err)) from None
        path = str(typed["path"])
        _check_store_path(path)
        return name, typed, path

    def create(self, body: dict[str, Any]) -> WriteResult:
        name, typed, path = self._create_request(body)
        layout = _Layout(name, path)

        def plan(cfg: SectionConfig) -> list[Change]:
            if name in cfg:
                raise WriteRefused(409, f"datastore '{name}' already exists.")
            assert self.kept is not None
            if self.kept.paths.conflicts(path):
                _check_not_nested(path, cfg)  # the full scan, for the message naming the other store
            self._lay_out(layout)
            return [(name, typed)]

        try:
            written, gen = self._write(plan, body.get("digest"))
        except BaseException:
            _remove_created(layout)
            raise
        finally:
            self._finish(layout)
        log.info("created datastore '%s' at %s (generation %s)", name, path, gen)
        return WriteResult(gen, written.digest, name)

    def _lay_out(self, layout: _Layout) -> None:
        """Create the store directory (missing, or an existing empty one), ``.chunks`` and ``.lock``.

        Journalled first, walked without following links; see the module docstring.
        """
        try:
            self._open_store_dir(layout)
            self._make_inside(layout)
        except UnsafePath as err:
            raise WriteRefused(400, f"datastore path '{layout.path}' refused: {err}") from None
        except FileExistsError:  # something appeared in the directory meanwhile
            raise WriteRefused(400, f"datastore path '{layout.path}' is not empty") from None
        except OSError as err:
            status = 400 if err.errno in _PATH_ERRNOS else 500  # the path asked for vs. this host's trouble
            raise WriteRefused(
                status, f"unable to create datastore '{layout.name}' at '{layout.path}': {err.strerror}"
            ) from None

    def _open_store_dir(self, layout: _Layout) -> None:
        """``layout.chain`` down to the store directory, made if missing -- after the journal entry."""
        top = first_missing(layout.path)
        if top is None:  # an existing directory: check it before anything is recorded
            layout.chain = walk(layout.path)
            self._check_existing(layout.chain.fd, layout.path)
        try:
            layout.journal_id = self.journal.begin(layout.name, layout.path, top)
        except OSError as err:
            raise WriteRefused(500, f"unable to create datastore '{layout.name}': cannot record it in {err}") from None
        if layout.chain is None:
            layout.chain = walk(layout.path, create_mode=STORE_DIR_MODE)
            layout.top = layout.chain.created_from

    def _make_inside(self, layout: _Layout) -> None:
        assert layout.chain is not None
        lay_out_store(layout.chain.fd, layout.path, owner=self.store_owner, fresh=True, made=layout.made)

    def _check_existing(self, fd: int, path: str) -> None:
        st = os.fstat(fd)
        owners = {0, os.geteuid()} | ({self.store_owner[0]} if self.store_owner else set())
        if st.st_uid not in owners:
            raise WriteRefused(400, f"datastore path '{path}' is owned by uid {st.st_uid}; refusing to take it over")
        if os.listdir(fd):
            raise WriteRefused(400, f"datastore path '{path}' is not empty")

    def _finish(self, layout: _Layout) -> None:
        if layout.journal_id is not None:
            try:
                self.journal.end(layout.journal_id)
            except OSError as err:  # the next start finds the store configured and drops the entry
                log.warning("cannot close the create journal entry of '%s': %s", layout.name, err)
        if layout.chain is not None:
            layout.chain.close()

    # -- clean-up of interrupted creates --------------------------------------------------------------

    def recover_interrupted_creates(self) -> list[str]:
        """Remove what creates interrupted by a crash laid out (see :mod:`dsproxy.daemon.journal`).

        Returns the store paths cleaned up.  Never raises: a problem is logged and start goes on.
        """
        try:
            pending = self.journal.pending()
        except OSError as err:
            log.error("not cleaning up interrupted creates: cannot read %s: %s", self.journal.path, err)
            return []
        if not pending:
            return []
        try:
            with config_lock(self.lock_file):
                return self._recover_locked(pending)
        except ConfigError as err:
            log.error("not cleaning up interrupted creates yet: %s", err)
            return []

    def _recover_locked(self, pending: list[PendingCreate]) -> list[str]:
        try:
            if self.mirror is not None and self.kept is not None:
                cfg = self.kept.config  # fleet mode, after the first read: the mirror (the file and its overlay)
            else:
                cfg = parse(read_raw(self.config_file), filename=str(self.config_file))
        except ParseError as err:
            log.error("not cleaning up interrupted creates while datastore.cfg does not parse: %s", err)
            self.journal.keep(pending)
            return []
        configured = {components(str(props.get("path", ""))) for props in cfg.values()}
        cleaned: list[str] = []
        for entry in pending:
            if components(entry.path) in configured:
                continue  # killed after the rename: the create is complete
            top = entry.top if entry.top is not None and is_within(entry.path, entry.top) else None
            try:
                chain = walk(entry.path)
            except FileNotFoundError:
                continue  # killed before anything was made, or already gone
            except OSError as err:
                log.warning("interrupted create of '%s': leaving %s alone: %s", entry.name, entry.path, err)
                continue
            with chain:
                left = _unlay(chain, len(components(top)) if top else None, lock=True, chunks=True)
            if left:
                log.warning("interrupted create of '%s': %s", entry.name, left)
            else:
                log.info("removed the lay-out of the interrupted create of '%s' at %s", entry.name, entry.path)
                cleaned.append(entry.path)
        self.journal.keep([])
        return cleaned

    # -- update ---------------------------------------------------------------------------------------

    @staticmethod
    def _update_request(body: dict[str, Any]) -> tuple[dict[str, object], list[str]]:
        """An update's ``(properties to set, properties to delete)``, validated (400)."""
        delete = body.get("delete") or []
        if isinstance(delete, str):
            delete = [k.strip() for k in delete.split(",") if k.strip()]
        if not isinstance(delete, list) or not all(isinstance(k, str) for k in delete):
            raise WriteRefused(400, "parameter verification failed - 'delete': expected a list of property names")
        props = _text_props(body, ("name", "digest", "delete"))
        try:
            request.check_update(props, delete)
        except PropertyError as err:
            raise WriteRefused(400, str(err)) from None
        return props, delete

    @staticmethod
    def _updated(
        name: str, current: dict[str, Value] | None, props: dict[str, object], delete: list[str]
    ) -> tuple[dict[str, Value], MaintenanceMode | None]:
        """The store's typed properties after the update, and its new maintenance mode."""
        if current is None:
            raise WriteRefused(404, f"no such datastore '{name}'")
        merged: dict[str, object] = {k: v for k, v in current.items() if k not in delete}
        merged.update(props)
        try:
            typed = check_section(name, merged)
        except PropertyError as err:
            raise WriteRefused(400, str(err)) from None
        old = _maintenance(current)
        new = _maintenance(typed)
        if old is not None and not old.allows_transition_to(new):
            raise WriteRefused(400, f"datastore '{name}' is being deleted: its maintenance mode cannot change")
        return typed, new

    def update(self, name: str, body: dict[str, Any]) -> WriteResult:
        props, delete = self._update_request(body)
        maintenance: MaintenanceMode | None = None  # the new mode, once written

        def plan(cfg: SectionConfig) -> list[Change]:
            nonlocal maintenance
            typed, maintenance = self._updated(name, cfg.get(name), props, delete)
            return [(name, typed)]

        written, gen = self._write(plan, body.get("digest"))
        log.info("updated datastore '%s' (generation %s)", name, gen)
        return WriteResult(gen, written.digest, name, maintenance=maintenance)

    # -- remove ---------------------------------------------------------------------------------------

    def _check_idle(self, name: str) -> None:
        read, write = self.active_operations(name)
        if read or write:
            raise WriteRefused(
                409, f"datastore '{name}' has active operations (read {read}, write {write}); not removing it"
            )

    def remove(self, name: str, expected_digest: str | None) -> WriteResult:
        def plan(cfg: SectionConfig) -> list[Change]:
            if name not in cfg:
                raise WriteRefused(404, f"no such datastore '{name}'")
            self._check_idle(name)
            return [(name, None)]

        written, gen = self._write(plan, expected_digest)
        log.info("removed datastore '%s' from the configuration (generation %s); its data stays", name, gen)
        return WriteResult(gen, written.digest, name)

    # -- demo stores ----------------------------------------------------------------------------------

    def ensure_demo_stores(self, count: int) -> int:
        """Make sure ``demo0001``... ``demoNNNN`` exist (one write); returns how many were added."""
        width = max(4, len(str(count)))
        wanted = [f"demo{i:0{width}d}" for i in range(1, count + 1)]
        added: list[str] = []

        def plan(cfg: SectionConfig) -> list[Change]:
            changes: list[Change] = []
            for name in wanted:
                if name in cfg:
                    continue
                path = self.paths.data_dir / name
                self._lay_out_demo(str(path))
                try:
                    changes.append((name, check_section(name, {"path": str(path), "comment": "demo datastore"})))
                except PropertyError as err:
                    raise WriteRefused(400, str(err)) from None
                added.append(name)
            return changes

        if not all(_configured(self.config_file, wanted)):
            self._write(plan, None)
        return len(added)

    def _lay_out_demo(self, path: str) -> None:
        """A demo store's lay-out, reusing what an earlier run made (no journal: nothing blocks)."""
        try:
            make_store(path, owner=self.store_owner)
        except UnsafePath as err:
            raise WriteRefused(400, f"datastore path '{path}' refused: {err}") from None
        except OSError as err:
            raise WriteRefused(500, f"unable to create datastore at '{path}': {err.strerror}") from None

    # -- the manual-edit watch ------------------------------------------------------------------------

    def check_file(self) -> int | None:
        """Bump the generation if the file changed without a bump; return the new generation.
        (And close the files earlier writes replaced, once none is under way.)  In fleet mode a hand
        edit is not published but undone (:meth:`_check_mirrored_file`)."""
        self.close_replaced(CLOSE_AFTER)
        if self.mirror is not None:
            checked = self._check_mirrored_file()  # (first: a flush would replace an edited overlay)
            flushed = self.flush_overlay()
            self.sync_mirror(CLOSE_AFTER)
            return checked if checked is not None else flushed
        signature = _stat_signature(self.config_file)
        if signature == self.state.signature and self.state.known:
            return None
        data = read_raw(self.config_file)
        file_digest = digest(data)
        seg = self._segment()
        current_gen = None if seg is None else seg.generation()
        state = self.state
        bumped = None
        if seg is not None and current_gen is not None:
            # published before the manager parses the file itself (~0.8 s at 100,000 stores): the
            # workers find what changed on their own (dsproxy.config.splice.edited_names)
            if state.digest is not None and file_digest != state.digest and current_gen == state.generation:
                # nobody published this change (a registry may have noticed it first: then
                # ``expected`` no longer matches and this is not a second bump)
                now = seg.publish([(shm.ChangeKind.EVERYTHING, "*")], expected=current_gen)
                if now != current_gen:
                    bumped = now
                    log.info("datastore.cfg changed on disk: generation bumped to %d", now)
            current_gen = seg.generation()
        try:
            self._watched = len(self._kept_of(data, file_digest).config)
            error = None
        except ParseError as err:
            error = str(err)
            if error != state.error:
                log.error("datastore.cfg was edited and does not parse; serving the last good config: %s", err)
        if error is None and state.error is not None:
            log.info("datastore.cfg parses again")
        self.state = _FileState(signature, file_digest, current_gen, error)
        return bumped

    # -- fleet mode: the file is a mirror of etcd (dsproxy.fleet.mirror) ------------------------------

    def enable_fleet(self) -> MirrorState:
        """From now on the file mirrors :attr:`mirror`: until the first read of etcd, the file as it
        is (the last mirror this host wrote) with the overlay on it (what its workers serve: a
        restarted manager continues it), at revision 0 (unknown)."""
        kept = self.kept
        if kept is not None:
            self._fold_overlay(kept)
        else:  # (a file that does not parse: nothing to continue)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._overlay_path)
        self.mirror = MirrorState(dict(kept.config) if kept is not None else {})
        seg = self._segment()
        if seg is not None and self.state.generation is not None:
            self.mirror.record(seg, self.state.generation)
        return self.mirror

    def sync_mirror(self, idle: float = 0.0) -> bool:
        """Fleet mode: fsync the file (and its directory) in the closer thread if the last write
        left it unsynced and no write ended in the last ``idle`` seconds; whether it did.

        A mirror write is temp file + rename without fsync: etcd (a quorum, which fsyncs every
        write) is the durable copy, every manager start reads etcd and rewrites the file before
        it answers, and the file is always whole for its readers (the rename).  Three hosts each
        fsyncing 14 MB per write on one disk (100,000 stores) was the tail of bench-fleet's
        served-everywhere time.  What a crash loses is at most the mirror writes of the last
        watch pass (this sync follows once writes pause): with etcd reachable at the restart,
        nothing (the file is rewritten from etcd); with etcd unreachable then too, the host
        serves an older mirror -- as a host cut off from etcd does -- or, on a file system that
        does not order a rename after its data (ext4 does, by default), possibly an empty or
        unparsable file until etcd is back.  A single-host write (no ``--etcd``) still fsyncs
        before its rename and its answer."""
        if not self._unsynced or time.monotonic() - self._written < idle:
            return False
        self._unsynced = False
        self._closer.submit(_sync_file, str(self.config_file))
        return True

    def _fleet(self) -> MirrorState:
        if self.mirror is None:
            raise RuntimeError("not in fleet mode")
        return self.mirror

    def mirror_replace(
        self,
        sections: dict[str, dict[str, Value]],
        mod_revisions: dict[str, int],
        revision: int,
        texts: dict[str, bytes] | None = None,
        defer_layout: bool = False,
    ) -> int | None:
        """A full read of etcd (start, or a re-list after compaction): the mirror becomes exactly
        ``sections`` at ``revision``; one write of the difference with the file, publishing the
        stores that differ (a restarted host's workers apply a delta).  ``texts``: values known
        to be well-formed texts of their sections (see :attr:`MirrorState.texts`).  With
        ``defer_layout`` (the first read) the stores' directories are looked at afterwards, in
        :meth:`lay_out_deferred`'s slices, not before the file is written.  Returns the
        generation."""
        m = self._fleet()
        m.sections, m.mod_revisions, m.revision, m.loaded = sections, mod_revisions, revision, True
        m.texts = texts or {}
        return self._sync(None, defer_layout)

    def mirror_apply(
        self, sections: dict[str, dict[str, Value] | None], mod_revisions: dict[str, int | None], revision: int
    ) -> int | None:
        """One watch batch at ``revision``: the stores changed (``None``: deleted) and every key's
        mod_revision (``None``: deleted; a key whose value was not mirrored is only here).  One
        locked write with the per-store changes, or none when nothing local changes -- the
        fleet record then names the new revision for the same generation.  Returns the generation."""
        m = self._fleet()
        for name, mod in mod_revisions.items():
            if mod is None:
                m.mod_revisions.pop(name, None)
            else:
                m.mod_revisions[name] = mod
        for name, props in sections.items():
            m.texts.pop(name, None)
            if props is None:
                m.sections.pop(name, None)
            else:
                m.sections[name] = props
        m.revision = max(m.revision, revision)
        return self._sync(list(sections))

    def _sync(self, names: list[str] | None, defer_layout: bool = False) -> int | None:
        """Make the file the mirror for ``names`` (None: every store) in one locked write; a hand
        edit the write finds is undone whole and counted.  With ``defer_layout`` the stores to
        lay out are only noted (:meth:`lay_out_deferred`)."""
        m = self._fleet()
        verified: dict[str, bytes] = {}
        deferred: list[str] = []

        def plan(cfg: SectionConfig) -> list[Change]:
            if self._reread:
                raise _HandEdited()
            if not cfg and names is None and m.fenced is None and defer_layout:
                # a first read into an empty file (a fleet host's cold start): every store is new,
                # none laid out yet -- the loop below's outcome without its ~3 us per store (0.27 s
                # at 100,000, py-spy of a cold start)
                deferred.extend(m.sections)
                if m.texts.keys() <= m.sections.keys():  # (a first read's: one C loop, no generator)
                    verified.update(m.texts)
                else:
                    verified.update((n, t) for n, t in m.texts.items() if n in m.sections)
                return list(m.sections.items())
            candidates = [*cfg, *(n for n in m.sections if n not in cfg)] if names is None else names
            changes: list[Change] = []
            for name in candidates:
                want, have = self._local_props(name), cfg.get(name)
                if want == have:
                    continue
                if want is not None:
                    if not defer_layout:
                        self._lay_out_mirrored(name, want, have)
                    elif have is None or have.get("path") != want.get("path"):
                        deferred.append(name)
                    text = m.texts.get(name)
                    if text is not None and want is m.sections.get(name):  # not fenced
                        verified[name] = text
                changes.append((name, want))
            return changes

        try:
            generation = self._write(plan, None, verified)[1]
        except (_HandEdited, UnparsableFile):
            self._hand_edit()
            generation = self._rewrite_mirror()
            deferred = list(m.sections) if defer_layout else []
        deferred.reverse()  # (taken from the end: in file order)
        self._layout_pending[:0] = deferred
        return generation

    def lay_out_deferred(self, budget: float) -> int:
        """Look at the directories of the stores a first read deferred (:meth:`mirror_replace`) for
        about ``budget`` s, laying out those missing on this host; how many are left to look at.

        Why after the write: one ``lstat`` per store was 0.46 s of a 100,000-store host's cold
        start (py-spy), all before its workers could load the mirror.  Until a store is looked
        at, a lookup on a store still missing its directory says what is wrong -- as it does for
        one that cannot be laid out at all."""
        m, pending = self._fleet(), self._layout_pending
        deadline = time.monotonic() + budget
        while pending and time.monotonic() < deadline:
            for name in pending[-LAYOUT_SLICE:]:
                props = m.sections.get(name)  # as it is now: removed or moved meanwhile, or not
                if props is not None:
                    self._lay_out_mirrored(name, props, None)
            del pending[-LAYOUT_SLICE:]
        return len(pending)

    def _local_props(self, name: str) -> dict[str, Value] | None:
        """What the file holds for ``name``: the mirror's section -- fenced, while fenced."""
        m = self._fleet()
        props = m.sections.get(name)
        if props is None or m.fenced is None:
            return props
        mode = _maintenance(props)
        if mode is not None and mode.type != "read-only":  # refuses new operations already
            return props
        return {**props, "maintenance-mode": m.fenced_mode}

    def _lay_out_mirrored(self, name: str, props: dict[str, Value], had: dict[str, Value] | None) -> None:
        """Lay out a mirrored store that lacks its directories on this host (a host's disk is its
        own: a failure is logged, the store is mirrored anyway and its lookups say what is wrong)."""
        path = str(props.get("path", ""))
        if not path or "backing-device" in props or (had is not None and had.get("path") == props.get("path")):
            return
        if _laid_out(path):
            return
        try:
            make_store(path, owner=self.store_owner)
        except (UnsafePath, OSError) as err:
            reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
            log.error("datastore '%s' (mirrored from etcd): cannot lay out %s on this host: %s", name, path, reason)

    def _rewrite_mirror(self) -> int | None:
        """Replace the file whole with the mirror (after a hand edit, which may not even parse),
        publishing everything."""
        m = self._fleet()
        kept = KeptConfig(SectionConfig(), {}, "", PathIndex())
        changes: list[Change] = [(n, self._local_props(n)) for n in m.sections]
        verified = {n: m.texts[n] for n, props in changes if n in m.texts and props is m.sections[n]}
        try:
            with config_lock(self.lock_file):
                pending = kept.prepare(changes, str(self.config_file), verified)
                identity, signature = self._replace(pending, FileRecord(new_token()))
                kept.commit(pending, kept.hash(pending), identity)
                self.kept = kept
                self._overlay_reset(identity, None, pending.pieces)
                gen = self._publish([(shm.ChangeKind.EVERYTHING, "*")])
        except ConfigError as err:
            raise WriteRefused(_status_of(err), str(err)) from None
        self.state = _FileState(signature, kept.digest, gen, None)
        return gen

    def _hand_edit(self) -> None:
        m = self._fleet()
        m.hand_edits += 1
        log.error(
            "%s was edited by hand: in fleet mode the datastore configuration is etcd's (change it through "
            "the API of any host); restored the mirror of etcd revision %d (%d hand edits refused so far)",
            self.config_file,
            m.revision,
            m.hand_edits,
        )
        seg = self._segment()
        if seg is not None:
            seg.set_fleet(hand_edits=m.hand_edits)

    def _check_mirrored_file(self) -> int | None:
        """The watch in fleet mode: a file changed by hand is restored (whole: publish everything)."""
        signature = _stat_signature(self.config_file)
        state = self.state
        if self._overlay_edited():  # only the manager writes it: undone like a hand edit of the file
            log.error("%s was changed by someone else than this manager", self._overlay_path)
            self._hand_edit()
            return self._rewrite_mirror()
        if signature == state.signature and state.known:
            return None
        if state.kept is not None:
            if digest(read_raw(self.config_file)) == self._written_digest(state.kept):
                self.state = _FileState(signature, None, state.generation, None, state.kept)  # touched, not changed
                return None
        elif state.known and digest(read_raw(self.config_file)) == state.digest:
            self.state = _FileState(signature, state.digest, state.generation, None)  # touched, not changed
            return None
        return self._sync(None)

    def fence(self, reason: str) -> int | None:
        """``--fleet-fencing offline``: every store offline locally until :meth:`unfence`, its
        maintenance message ``reason`` (cut to the 64 characters a message may have, encoded); the
        mirror itself is unchanged."""
        m = self._fleet()
        m.fenced = reason
        while len(urllib.parse.quote(reason)) > MESSAGE_LIMIT:
            reason = reason[:-1]
        m.fenced_mode = check_value("maintenance-mode", str(MaintenanceMode("offline", urllib.parse.quote(reason))))
        gen = self._sync(None)
        self._record()
        return gen

    def unfence(self) -> int | None:
        m = self._fleet()
        if m.fenced is None:
            return None
        m.fenced = None
        gen = self._sync(None)
        self._record()
        return gen

    def set_link(self, link: shm.FleetState, since: float | None) -> None:
        """The link to etcd changed (connected, or disconnected since ``since``): into the record."""
        m = self._fleet()
        m.link, m.disconnected_since = link, since
        self._record()

    def _record(self) -> None:
        seg, m = self._segment(), self._fleet()
        if seg is not None and self.state.generation is not None:
            m.record(seg, self.state.generation)

    # -- fleet mode: a config write through the API becomes an etcd transaction ----------------------

    def fleet_create(self, body: dict[str, Any]) -> FleetWrite:
        """Validate a create as :meth:`create` does and lay the store out (journalled); the caller
        puts the section into etcd and then calls :meth:`fleet_finish`."""
        m = self._fleet()
        name, typed, path = self._create_request(body)
        layout = _Layout(name, path)
        try:
            with config_lock(self.lock_file):
                kept = self._validation_base(body.get("digest"))
                if name in m.sections or name in m.mod_revisions:
                    raise WriteRefused(409, f"datastore '{name}' already exists.")
                if kept.paths.conflicts(path):
                    _check_not_nested(path, kept.config)
                self._lay_out(layout)
            value = section_bytes(name, typed, str(self.config_file))[0]
        except ConfigError as err:
            self.fleet_finish(FleetWrite(name, None, 0, layout=layout), False)
            raise WriteRefused(_status_of(err), str(err)) from None
        except BaseException:
            self.fleet_finish(FleetWrite(name, None, 0, layout=layout), False)
            raise
        return FleetWrite(name, value, 0, layout=layout)

    def fleet_finish(self, write: FleetWrite, done: bool | None) -> None:
        """After the transaction of a create: undo the lay-out unless ``done``, close the journal
        entry; ``done=None`` (outcome unknown): leave both -- the next start removes the lay-out
        if no section names it then (:meth:`recover_interrupted_creates`)."""
        layout = write.layout
        if layout is None:
            return
        if done is None:
            if layout.chain is not None:
                layout.chain.close()
            return
        if not done:
            _remove_created(layout)
        self._finish(layout)

    def fleet_update(self, name: str, body: dict[str, Any]) -> FleetWrite:
        """Validate an update against the mirror; the section to put and the mod_revision to compare."""
        m = self._fleet()
        props, delete = self._update_request(body)
        try:
            with config_lock(self.lock_file):
                self._validation_base(body.get("digest"))
        except ConfigError as err:
            raise WriteRefused(_status_of(err), str(err)) from None
        typed, mode = self._updated(name, m.sections.get(name), props, delete)
        try:
            value = section_bytes(name, typed, str(self.config_file))[0]
        except PropertyError as err:
            raise WriteRefused(400, str(err)) from None
        return FleetWrite(name, value, m.mod_revisions.get(name, 0), maintenance=mode)

    def fleet_remove(self, name: str, expected_digest: str | None) -> FleetWrite:
        """Validate a remove (this host's operations included); the mod_revision to compare."""
        m = self._fleet()
        try:
            with config_lock(self.lock_file):
                self._validation_base(expected_digest)
                if name not in m.sections and name not in m.mod_revisions:
                    raise WriteRefused(404, f"no such datastore '{name}'")
                self._check_idle(name)
        except ConfigError as err:
            raise WriteRefused(_status_of(err), str(err)) from None
        return FleetWrite(name, None, m.mod_revisions.get(name, 0))

    def _validation_base(self, expected_digest: str | None) -> KeptConfig:
        """The kept config a write is validated against (the file, under the config lock).  A hand
        edit found here is validated against but not kept: the kept config stays the mirror as
        written, so the next mirror write or the watch still finds the edit and undoes it (kept, it
        would pass for the mirror, and a batch's O(changed) write would keep it in the file)."""
        before = self.kept
        try:
            kept, reread = self._current()
        except ParseError as err:
            raise WriteRefused(
                503, f"refusing to write: the configuration on disk does not parse (it is being restored): {err}"
            ) from None
        if reread:
            self.kept = before
        if expected_digest is not None and expected_digest != self.served_digest(kept):
            raise DigestMismatch()
        return kept


#: the longest maintenance message (``MAINTENANCE_SCHEMA``: 64 characters, as PBS)
MESSAGE_LIMIT: Final = 64
#: a replaced file is closed once no write ended for this long (s), and at most this many wait
CLOSE_AFTER: Final = 0.05
LAYOUT_SLICE: Final = 256  # stores a deferred lay-out looks at between looks at the clock
REPLACED_HELD: Final = 4

#: the HTTP status of a config error a write meets (any other -- a bad property -- is the client's: 400)
#: Lay-out failures that the requested path causes (a name too long, a parent that cannot hold a
#: directory: ``/proc/1/x``, a read-only mount): 400.  Others (``ENOSPC``, ``EIO``) are the host's: 500.
_PATH_ERRNOS: Final = frozenset(
    {errno.ENAMETOOLONG, errno.ENOENT, errno.ENOTDIR, errno.EACCES, errno.EPERM, errno.EROFS, errno.EINVAL, errno.ELOOP}
)
_STATUS: Final[dict[type[ConfigError], int]] = {DigestMismatch: 409, LockError: 503, WriteError: 500}


def _sync_file(path: str) -> None:
    """fsync ``path`` and its directory (the closer thread: a failure is logged, nothing else)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.EROFS):
            log.warning("cannot fsync %s (fleet mode's mirror: etcd holds the config): %s", path, err)


def _status_of(err: ConfigError) -> int:
    return next((_STATUS[kind] for kind in type(err).__mro__ if kind in _STATUS), 400)


@dataclass
class _Layout:
    """What one create has laid out so far (for the undo and the journal)."""

    name: str
    path: str
    chain: DirChain | None = None  # every directory down to the store, opened without links
    top: int | None = None  # index in ``chain.fds`` of the first directory this create made
    made: list[str] = field(default_factory=list)  # what lay_out_store made in it: .chunks, .lock
    journal_id: str | None = None


def _remove_created(layout: _Layout) -> None:
    """Undo a store lay-out: remove what it created, newest first (by fd, empty things only)."""
    if layout.chain is not None and layout.chain.fds:
        left = _unlay(layout.chain, layout.top, lock=".lock" in layout.made, chunks=".chunks" in layout.made)
        if left:
            log.warning("undoing the lay-out of '%s': %s", layout.name, left)


def _unlay(chain: DirChain, top: int | None, *, lock: bool, chunks: bool) -> str | None:
    """Remove ``.lock`` (a plain file), ``.chunks`` and the directories ``chain.fds[top:]`` -- each
    only if empty, from the fds of ``chain`` (no link followed).  Returns what was left and why."""
    store = chain.fd
    try:
        if lock:
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISREG(os.lstat(".lock", dir_fd=store).st_mode):
                    os.unlink(".lock", dir_fd=store)
        if chunks:
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(".chunks", dir_fd=store)
        if top is not None:
            for i in range(len(chain.fds) - 1, max(top, 1) - 1, -1):
                os.rmdir(chain.names[i - 1], dir_fd=chain.fds[i - 1])
    except OSError as err:
        if err.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
            return f"left {chain.path()} in place: something else is in it now ({err.strerror})"
        return f"left {chain.path()} in place: {err.strerror}"
    return None


def _check_store_path(path: str) -> None:
    if normalise(path) != path:
        raise WriteRefused(400, f"parameter verification failed - 'path': '{path}' is not a normalised absolute path")


def _check_not_nested(path: str, cfg: SectionConfig) -> None:
    """Refuse a store inside another's path or containing one, compared by path components."""
    for other, other_props in cfg.items():
        other_path = str(other_props.get("path", ""))
        if not other_path:
            continue
        if is_within(path, other_path):
            raise WriteRefused(400, f"datastore path '{path}' is inside datastore '{other}' ('{other_path}')")
        if is_within(other_path, path):
            raise WriteRefused(400, f"datastore path '{path}' contains datastore '{other}' ('{other_path}')")


def _maintenance(props: dict[str, Value]) -> MaintenanceMode | None:
    raw = props.get("maintenance-mode")
    return None if raw is None else MaintenanceMode.parse(str(raw))


def _laid_out(path: str) -> bool:
    """Whether ``path`` holds a store's ``.lock`` file (not followed): the lay-out makes it after
    ``.chunks`` (one ``lstat`` per mirrored store at a full read: ~0.2 s at 100,000)."""
    try:
        return stat.S_ISREG(os.lstat(path + "/.lock").st_mode)
    except OSError:
        return False


def _configured(path: Path, names: list[str]) -> list[bool]:
    try:
        cfg = parse(read_raw(path), filename=str(path))
    except ParseError:
        return [False]
    return [n in cfg for n in names]
